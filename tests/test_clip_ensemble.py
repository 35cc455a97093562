"""Several CLIP models behind one index: the ensemble's vectors, weights and identity checks, against
vectors made by hand from each member's own open_clip towers."""
from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from img2prompt.encoders.clip_ensemble import (ClipEnsemble, load_clip_ensemble, split_parts,
                                      weighted_query)
from img2prompt.errors import UserError
from img2prompt.encoders.models import ClipModel, load_clip
from img2prompt.encoders.image_embed import embed_images
from img2prompt.query.session import ModelOverrides, check_clip, load_index_clip
from img2prompt.stand_in import TINY_CLIP_CONFIG, write_tiny_clip

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at dusk, dramatic light", "Ünïcödé prompt",
           " ".join(["long"] * 100)]
HALF = math.sqrt(0.5)


@pytest.fixture(scope="module")
def pair(tiny_clip_dir, other_clip_dir) -> tuple[ClipModel, ClipModel]:
    return load_clip(str(tiny_clip_dir), device="cpu"), load_clip(str(other_clip_dir), device="cpu")


@pytest.fixture(scope="module")
def ensemble(tiny_clip_dir, other_clip_dir) -> ClipEnsemble:
    return load_clip_ensemble([str(tiny_clip_dir), str(other_clip_dir)], None, "cpu")


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """Another architecture: 48-pixel images (another preprocess), 32-d vectors, an 8-token context."""
    config = {**TINY_CLIP_CONFIG, "embed_dim": 32, "vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "image_size": 48},
              "text_cfg": {**TINY_CLIP_CONFIG["text_cfg"], "context_length": 8}}
    return write_tiny_clip(tmp_path_factory.mktemp("models") / "wide-clip", seed=3, config=config)


def unit(vectors: torch.Tensor) -> np.ndarray:
    vectors = vectors.detach().float().numpy()
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def by_hand_text(member: ClipModel, prompts: list[str]) -> np.ndarray:
    with torch.inference_mode():  # open_clip's own full-context tower, nothing of ours but the tokenizer
        return unit(member.model.encode_text(member.tokenizer(prompts)))


def by_hand_image(member: ClipModel, images: list[Image.Image]) -> np.ndarray:
    with torch.inference_mode():
        return unit(member.model.encode_image(torch.stack([member.preprocess(image) for image in images])))


def small_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8)) for i in range(count)]


def test_text_vectors_are_the_scaled_concatenation_and_score_the_mean_cosine(pair, ensemble):
    a, b = (by_hand_text(member, PROMPTS) for member in pair)
    expected = np.concatenate([HALF * a, HALF * b], axis=1)
    result = ensemble.text_embeddings(PROMPTS, batch_size=3)
    assert ensemble.dim == pair[0].dim + pair[1].dim == result.vectors.shape[1]
    np.testing.assert_allclose(result.vectors, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(result.vectors @ result.vectors[::-1].T, (a @ a[::-1].T + b @ b[::-1].T) / 2,
                               atol=1e-6)
    assert result.truncated == 1  # only the 100-word prompt is longer than the context
    assert ensemble.tokenizer is pair[0].tokenizer or type(ensemble.tokenizer) is type(pair[0].tokenizer)
    tokens = ensemble.tokenizer(PROMPTS)
    np.testing.assert_allclose(ensemble.embed_tokens(tokens, 2), expected, atol=1e-6)
    assert ensemble.count_truncated(PROMPTS, tokens) == 1
    done = []
    ensemble.text_embeddings(PROMPTS, batch_size=1, progress=done.append)
    assert sum(done) == len(PROMPTS)  # each prompt counted once, not once per member


def test_members_that_tokenize_differently_are_encoded_per_member(pair, ensemble):
    import open_clip

    # The same tokens under another tokenizer class: no shared tokenizer, yet the same vectors.
    slow = dataclasses.replace(pair[1], tokenizer=open_clip.tokenizer.SimpleTokenizer())
    mixed = ClipEnsemble([pair[0], slow])
    assert mixed.tokenizer is None
    with pytest.raises(ValueError, match="tokenize differently"):
        mixed.embed_tokens(pair[0].tokenizer(PROMPTS))
    result = mixed.text_embeddings(PROMPTS)
    np.testing.assert_allclose(result.vectors, ensemble.text_embeddings(PROMPTS).vectors, atol=1e-6)
    assert result.truncated == 1
    assert mixed.count_truncated(PROMPTS, pair[0].tokenizer(PROMPTS)) == 1


class Shifted:
    """A tokenizer of one class whose output depends on `offset`: only the probe can tell two apart."""

    def __init__(self, inner, offset: int) -> None:
        self.inner, self.offset = inner, offset

    def __call__(self, texts):
        return self.inner(texts) + self.offset


def test_a_shared_tokenizer_needs_identical_tokens_on_the_probes(pair):
    same = [dataclasses.replace(member, tokenizer=Shifted(pair[0].tokenizer, 0)) for member in pair]
    assert ClipEnsemble(same).tokenizer is same[0].tokenizer
    other = [same[0], dataclasses.replace(pair[1], tokenizer=Shifted(pair[0].tokenizer, 1))]
    assert ClipEnsemble(other).tokenizer is None


def test_image_vectors_are_the_scaled_concatenation_and_failures_are_named(pair, ensemble, tmp_path):
    images = small_images(3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all\n" * 20)
    result = embed_images(ensemble, [images[0], str(broken), images[1], images[2]], batch_size=2, workers=0)
    assert result.ok == [0, 2, 3] and list(result.failed) == [1]
    a, b = (by_hand_image(member, images) for member in pair)
    np.testing.assert_allclose(result.vectors, np.concatenate([HALF * a, HALF * b], axis=1), atol=1e-6)
    np.testing.assert_allclose(result.vectors @ result.vectors.T, (a @ a.T + b @ b.T) / 2, atol=1e-6)
    assert ensemble.shared_preprocess and isinstance(ensemble.preprocess(images[0]), torch.Tensor)


def test_members_with_other_preprocessing_get_their_own_pixels(pair, wide_dir):
    wide = load_clip(str(wide_dir), device="cpu")
    mixed = ClipEnsemble([pair[0], wide])
    assert not mixed.shared_preprocess and mixed.dim == pair[0].dim + 32
    pixels = pickle.loads(pickle.dumps(mixed.preprocess))(small_images(1)[0])  # spawned workers pickle it
    assert [tuple(part.shape) for part in pixels] == [(3, 32, 32), (3, 48, 48)]
    images = small_images(3)
    result = embed_images(mixed, images, batch_size=2, workers=0)
    a, w = by_hand_image(pair[0], images), by_hand_image(wide, images)
    np.testing.assert_allclose(result.vectors, np.concatenate([HALF * a, HALF * w], axis=1), atol=1e-6)
    in_worker = embed_images(mixed, images, batch_size=2, workers=1)  # tuples of pixels cross a process
    np.testing.assert_allclose(in_worker.vectors, result.vectors, atol=1e-6)
    # Another context length: no shared tokenizer; each member tokenizes for itself.
    assert mixed.tokenizer is None and mixed.context_length == 8
    text = mixed.text_embeddings(PROMPTS)
    np.testing.assert_allclose(text.vectors, np.concatenate([HALF * by_hand_text(pair[0], PROMPTS),
                                                             HALF * by_hand_text(wide, PROMPTS)], axis=1), atol=1e-6)
    assert text.truncated == 3  # cut by the 8-token member: all but the cat; by both: the 100 words


def test_weighted_query_scores_the_weighted_cosines(pair, ensemble):
    queries, keys = PROMPTS[:2], PROMPTS[2:]
    q = ensemble.text_embeddings(queries).vectors
    k = ensemble.text_embeddings(keys).vectors
    cos_a = by_hand_text(pair[0], queries) @ by_hand_text(pair[0], keys).T
    cos_b = by_hand_text(pair[1], queries) @ by_hand_text(pair[1], keys).T
    dims = [member.dim for member in ensemble.members]
    np.testing.assert_allclose(weighted_query(q, dims, [0.8, 0.2]) @ k.T, 0.8 * cos_a + 0.2 * cos_b, atol=1e-6)
    np.testing.assert_allclose(weighted_query(q, dims, [4, 1]) @ k.T, 0.8 * cos_a + 0.2 * cos_b, atol=1e-6)
    np.testing.assert_allclose(weighted_query(q, dims, [1, 1]), q, atol=1e-7)
    np.testing.assert_allclose(weighted_query(q[0], dims, [1, 0]) @ k.T, cos_a[0], atol=1e-6)  # one vector
    parts = split_parts(q, dims)
    assert [part.shape[1] for part in parts] == dims
    np.testing.assert_allclose(parts[1], HALF * by_hand_text(pair[1], queries), atol=1e-6)
    with pytest.raises(ValueError):
        split_parts(q, [dims[0], dims[1] + 1])


class FakeIndex:
    """What check_clip / load_index_clip read of a PromptIndex: the manifest's CLIP identity."""

    def __init__(self, clip_identity: dict) -> None:
        self.manifest = {"models": {"clip": clip_identity, "text": {"name": "t", "sha256": "0" * 64, "dim": 4}}}

    @property
    def clip_identity(self) -> dict:
        return self.manifest["models"]["clip"]


def test_index_checks_each_member(pair, ensemble, tiny_clip_dir, other_clip_dir, tmp_path):
    index = FakeIndex(ensemble.identity())
    assert [member["sha256"] for member in index.clip_identity["members"]] == [m.sha256 for m in pair]
    check_clip(index, ensemble)
    loaded = load_index_clip(index, ModelOverrides(), "cpu")  # the manifest's own names
    assert isinstance(loaded, ClipEnsemble) and loaded.sha256 == ensemble.sha256
    assert load_index_clip(index, ModelOverrides([str(tiny_clip_dir), str(other_clip_dir)]), "cpu").dim == ensemble.dim

    swapped = write_tiny_clip(tmp_path / "third-clip", seed=2)  # same architecture, other weights
    with pytest.raises(UserError, match=r"^CLIP member 2 of 2 \('local-dir:.*other-clip.*'\): the index was built"
                                        r" with CLIP") as caught:
        load_index_clip(index, ModelOverrides([str(tiny_clip_dir), str(swapped)]), "cpu")
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match=r"^CLIP member 1 of 2"):
        check_clip(index, ClipEnsemble(pair[::-1]))  # the same members in another order are other vectors
    with pytest.raises(UserError, match="built with an ensemble of 2 CLIP models .* but one CLIP model was given"):
        check_clip(index, ClipEnsemble([pair[0]]))
    with pytest.raises(UserError, match="the index holds an ensemble of 2 CLIP models, but 1 --clip-model"):
        load_index_clip(index, ModelOverrides(str(tiny_clip_dir)), "cpu")
    with pytest.raises(UserError, match="built with one CLIP model .* but an ensemble of 2 CLIP models was given"):
        check_clip(FakeIndex(pair[0].identity()), ensemble)
    with pytest.raises(UserError, match="preprocessing differs"):
        check_clip(index, ClipEnsemble([pair[0], dataclasses.replace(pair[1], preprocess_config="other")]))


def test_loading_refuses_twins_and_misaligned_pretrained(tiny_clip_dir, other_clip_dir, pair):
    single = load_clip_ensemble([str(tiny_clip_dir)], [None], "cpu")
    # one model is an ensemble of one whose identity (what a manifest records) is the model's own
    assert type(single) is ClipEnsemble and single.sha256 == pair[0].sha256
    assert single.identity() == pair[0].identity() and single.dim == pair[0].dim
    with pytest.raises(UserError, match="given twice"):
        load_clip_ensemble([str(tiny_clip_dir), str(tiny_clip_dir)], None, "cpu")
    with pytest.raises(UserError, match="2 CLIP models but 1 --clip-pretrained"):
        load_clip_ensemble([str(tiny_clip_dir), str(other_clip_dir)], [None], "cpu")
    with pytest.raises(UserError, match="^CLIP member 2 of 2: .*no open_clip_config.json"):
        load_clip_ensemble([str(tiny_clip_dir), str(tiny_clip_dir.parent)], None, "cpu")
    ensemble = ClipEnsemble(pair)
    assert ensemble.name == f"{pair[0].name} + {pair[1].name}" and ensemble.context_length == 77
    assert ensemble.identity()["members"] == [pair[0].identity(), pair[1].identity()]
    assert ClipEnsemble(pair[::-1]).sha256 != ensemble.sha256  # order is part of the layout
