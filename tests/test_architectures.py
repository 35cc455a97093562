"""The architectures top Kaggle solutions used, through the real checkpoint path (a local-dir folder with random
weights, loaded as a user's folder would be).

Every architecture's text tower runs at its real width, heads, activation and projection (depth cut to one
layer: the short-context forward is per layer, so one layer checks the same code); ViT-B-32 runs whole, at its
real size, through build → submit → search. The real-size matrix of the large ones is bench/arch_matrix.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DATA, read_data_prompts

# open_clip names; the -quickgelu twin differs only in the activation, which the fingerprint must see
ARCHITECTURES = ["ViT-B-32", "ViT-L-14", "ViT-L-14-quickgelu", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14",
                 "convnext_xxlarge", "EVA02-L-14"]
TINY_VISION = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32}
PROMPTS = ["a castle on a hill, matte painting, trending on artstation",
           "portrait of an old fisherman, oil on canvas, dramatic lighting, highly detailed, 8k, by greg rutkowski "
           "and alphonse mucha, intricate, elegant, sharp focus, octane render, unreal engine, concept art",
           "cat", ""]


def text_tower_folder(tmp_path, architecture: str):
    """`architecture`'s real text tower (one layer deep) beside a tiny ViT image tower: the text side at its real
    width without the gigabytes of a timm/ViT image tower that this test never runs."""
    from img2prompt.stand_in import architecture_config, write_clip_folder

    config, preprocess_cfg = architecture_config(architecture, text_layers=1)
    config["vision_cfg"] = dict(TINY_VISION)
    return write_clip_folder(tmp_path / architecture, config, preprocess_cfg, seed=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_short_context_text_equals_open_clips_encode_text(tmp_path, architecture):
    from img2prompt.encoders.models import clip_encode_text, load_clip, supports_short_context
    from img2prompt.encoders.text import clip_text_embeddings

    clip = load_clip(str(text_tower_folder(tmp_path, architecture)), device="cpu")
    assert supports_short_context(clip), architecture  # every causal open_clip tower takes the fast path
    tokens = clip.tokenizer(PROMPTS)
    with torch.inference_mode():
        reference = clip.model.encode_text(tokens).float()  # open_clip's own forward over all 77 positions
        length = int((tokens != 0).sum(dim=1).max())
        short = clip_encode_text(clip, tokens[:, :length]).float()
    assert length < clip.context_length  # the test really cuts the context
    torch.testing.assert_close(short, reference, rtol=1e-5, atol=1e-5)
    reference_unit = torch.nn.functional.normalize(reference, dim=-1).numpy()
    np.testing.assert_allclose(clip_text_embeddings(clip, PROMPTS, batch_size=3).vectors, reference_unit, atol=2e-6)


def test_quickgelu_twin_is_another_architecture(tmp_path):
    from img2prompt.encoders.models import load_clip

    plain = load_clip(str(text_tower_folder(tmp_path, "ViT-L-14")), device="cpu")
    quick = load_clip(str(text_tower_folder(tmp_path, "ViT-L-14-quickgelu")), device="cpu")
    assert plain.sha256 == quick.sha256  # the same random weights (same seed, same shapes) ...
    assert plain.architecture_sha256 != quick.architecture_sha256  # ... under another activation: refused


def test_eva02_text_tower_is_the_custom_text_layout(tmp_path):
    import open_clip

    from img2prompt.encoders.models import load_clip

    clip = load_clip(str(text_tower_folder(tmp_path, "EVA02-L-14")), device="cpu")
    assert type(clip.model) is open_clip.CustomTextCLIP  # the tower under .text, reached by the fast path too


@pytest.mark.slow
def test_vit_b_32_at_real_size_builds_submits_and_searches(tmp_path):
    """ViT-B-32 whole (151M parameters): the manifest's dims and preprocessing are open_clip's own for that name."""
    import open_clip

    import img2prompt
    from img2prompt.encoders.models import preprocess_fingerprint
    from img2prompt.stand_in import write_random_clip

    folder = write_random_clip(tmp_path / "vit-b-32", "ViT-B-32", seed=0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(read_data_prompts(16)) + "\n", encoding="utf-8")
    index_dir = tmp_path / "index"
    img2prompt.build(str(corpus), str(index_dir), clip_model=str(folder), overwrite=True)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    _, _, reference_preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    clip_entry = manifest["models"]["clip"]
    assert clip_entry["dim"] == 512
    assert clip_entry["preprocess"] == preprocess_fingerprint(reference_preprocess)
    assert "224" in clip_entry["preprocess"]
    images = sorted((DATA / "images").glob("*.png"))[:2]
    with img2prompt.open_index(str(index_dir), device="cpu") as index:
        vectors = index.predict([str(path) for path in images], img2prompt.RetrievalSettings(k=5))
        assert vectors.shape == (2, 384)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        prompt = read_data_prompts(16)[3]
        [hits] = index.search_texts([prompt], k=3)
    assert hits.prompts[0] == prompt  # a prompt's own CLIP text vector finds itself first
    assert float(hits.scores[0]) == pytest.approx(1.0, abs=1e-2)
