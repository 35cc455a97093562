"""Model loading: local folders and checkpoint files go through open_clip's real loading path; identity is
the weights' sha256; bad names fail with a clear message."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from img2prompt.errors import UserError
from img2prompt.encoders.models import load_clip, resolve_device, weights_sha256


def test_local_dir_loads_the_checkpoint_weights(tiny_clip_dir, clip):
    saved = torch.load(tiny_clip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    loaded = clip.model.state_dict()
    assert set(saved) == set(loaded)
    for name, tensor in saved.items():
        assert torch.equal(tensor, loaded[name]), name
    assert clip.dim == 64 and clip.context_length == 77
    assert clip.name.startswith("local-dir:")


def test_identity_is_content_not_path(tmp_path, tiny_clip_dir, other_clip_dir, clip):
    copy = shutil.copytree(tiny_clip_dir, tmp_path / "elsewhere")
    assert load_clip(f"local-dir:{copy}").sha256 == clip.sha256
    assert load_clip(str(other_clip_dir)).sha256 != clip.sha256
    assert len(clip.sha256) == 64


def test_architecture_name_with_checkpoint_file(tmp_path, tiny_clip_dir, clip):
    """The Kaggle form `--clip-model ARCH --clip-pretrained FILE`, with the tiny config registered as ARCH."""
    import open_clip

    config = json.loads((tiny_clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "tiny-test-arch.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-test-arch.json")
    loaded = load_clip("tiny-test-arch", str(tiny_clip_dir / "open_clip_pytorch_model.bin"))
    assert loaded.sha256 == clip.sha256


@pytest.mark.parametrize("name, pretrained, message", [
    ("ViT-B-32", None, "needs weights: pass --clip-pretrained"),
    ("ViT-B-32", "/no/such/file.bin", "CLIP checkpoint file not found: /no/such/file.bin"),
    ("no-such-arch", "openai", "unknown open_clip model 'no-such-arch'"),
])
def test_bad_clip_names_are_clear_errors(name, pretrained, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_clip(name, pretrained)


def test_hub_name_offline_fails_with_local_path_hint():
    with pytest.raises(UserError) as error:
        load_clip("ViT-B-32", "openai")
    assert "--clip-pretrained /kaggle/input/" in str(error.value)


def test_folder_without_weights_is_refused(tmp_path, tiny_clip_dir):
    shutil.copy(tiny_clip_dir / "open_clip_config.json", tmp_path / "open_clip_config.json")
    with pytest.raises(UserError, match="holds no weights file"):
        load_clip(str(tmp_path))


def test_cuda_asked_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_weights_sha256_changes_with_any_weight():
    layer = torch.nn.Linear(3, 2)
    before = weights_sha256(layer)
    with torch.no_grad():
        layer.weight[0, 0] += 1e-6
    assert weights_sha256(layer) != before
    assert np.isfinite(layer.weight.detach().numpy()).all()


def _variant(tiny_clip_dir, folder, edit) -> str:
    """A copy of the tiny CLIP folder with the same weights and an edited open_clip_config.json."""
    copy = shutil.copytree(tiny_clip_dir, folder)
    config = json.loads((copy / "open_clip_config.json").read_text())
    edit(config)
    (copy / "open_clip_config.json").write_text(json.dumps(config))
    return str(copy)


def test_same_weights_under_another_architecture_are_refused(built_index, tiny_clip_dir, tmp_path, clip):
    """The ViT-L-14 vs ViT-L-14-quickgelu trap: identical weights, another activation, other embeddings."""
    import img2prompt

    quick = _variant(tiny_clip_dir, tmp_path / "quick", lambda c: c["model_cfg"].update(quick_gelu=True))
    loaded = load_clip(quick)
    assert loaded.sha256 == clip.sha256 and loaded.architecture_sha256 != clip.architecture_sha256
    with pytest.raises(UserError, match="the CLIP weights match the index's but the architecture differs"):
        img2prompt.open_index(built_index, device="cpu", clip_model=quick)
    normalised = _variant(tiny_clip_dir, tmp_path / "mean", lambda c: c["preprocess_cfg"].update(mean=[0.5] * 3))
    with pytest.raises(UserError, match="image preprocessing differs"):
        img2prompt.open_index(built_index, device="cpu", clip_model=normalised)


def test_weights_hash_is_cached_per_file_and_verify_recomputes(tiny_clip_dir, tmp_path, monkeypatch, clip):
    import img2prompt.encoders.models as models

    copy = shutil.copytree(tiny_clip_dir, tmp_path / "cached")
    assert load_clip(str(copy)).sha256 == clip.sha256  # hashed once, remembered
    calls = []
    original = models.weights_sha256
    monkeypatch.setattr(models, "weights_sha256", lambda module: calls.append(1) or original(module))
    assert load_clip(str(copy)).sha256 == clip.sha256 and calls == []  # start-up without re-hashing
    assert load_clip(str(copy), verify=True).sha256 == clip.sha256 and calls == [1]
    weights = copy / "open_clip_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1
    torch.save(state, weights)  # new content, new size/mtime: the cache must not answer for it
    assert load_clip(str(copy)).sha256 != clip.sha256 and calls == [1, 1]


def test_hub_name_with_a_slash_is_a_hub_name_not_a_missing_folder():
    from img2prompt.encoders.models import load_text_model, looks_like_path

    assert not looks_like_path("sentence-transformers/all-MiniLM-L6-v2")
    assert looks_like_path("./models/minilm") and looks_like_path("/abs/minilm")
    with pytest.raises(UserError) as error:
        load_text_model("sentence-transformers/all-MiniLM-L6-v2")  # offline in tests: no hub, no cache
    assert "folder not found" not in str(error.value) and "could not load the text model" in str(error.value)
    with pytest.raises(UserError, match="text model folder not found: /no/such/minilm"):
        load_text_model("/no/such/minilm")


def test_missing_scorer_package_names_the_extra(monkeypatch):
    import sys

    from img2prompt.encoders.models import load_text_model

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"needs sentence-transformers.*pip install 'img2prompt\[scorer\]'"):
        load_text_model(None)


def test_open_clip_imports_without_the_towers_a_model_does_not_use(tmp_path):
    """transformers/timm cost seconds of a query's start-up: left out for a plain CLIP, loaded for one that needs
    them (a fresh interpreter: open_clip is imported once per process)."""
    import json
    import subprocess
    import sys

    hf_folder = tmp_path / "hf-tower"
    hf_folder.mkdir()
    (hf_folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": 8, "text_cfg": {"hf_model_name": "some/bert"}, "vision_cfg": {}}}))
    code = ("import sys; from img2prompt.encoders.models import import_open_clip\n"
            "oc = import_open_clip('ViT-B-32')\n"
            "print('plain', 'transformers' in sys.modules, 'timm' in sys.modules)\n"
            f"oc = import_open_clip('local-dir:{hf_folder}')\n"
            "print('hf', oc.hf_model.transformers is not None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["plain False False", "hf True"]


@pytest.mark.parametrize("torch_version, vision_version, expected", [
    ("2.14.1", "0.29.1", None), ("2.5.1+cpu", "0.20.1+cpu", None), ("2.5.1", "0.21.0", "needs torchvision 0.20"),
    ("2.14.1+cu128", "0.28.0", "pip install 'torchvision==0.29.*' (the same build as torch: +cu128)"),
    (None, "0.29.1", "torch is not installed"), ("2.14.1", None, "torchvision is not installed")])
def test_a_mismatched_torch_pair_is_named_in_one_line(torch_version, vision_version, expected):
    from img2prompt.encoders.stack import torch_stack_problem

    problem = torch_stack_problem(torch_version, vision_version)
    assert (problem is None) if expected is None else (expected in problem and "\n" not in problem)


def test_every_command_refuses_a_mismatched_pair_before_any_import(monkeypatch, capsys):
    from img2prompt import cli
    from img2prompt.encoders import stack

    monkeypatch.setattr(stack, "installed_version", lambda name: {"torch": "2.5.1", "torchvision": "0.21.0"}[name])
    assert cli.main(["search", "nowhere", "--text", "x"]) == 2
    assert "needs torchvision 0.20" in capsys.readouterr().err
