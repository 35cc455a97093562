"""Issue 31 item 5: `merge` takes the compact layout.

int8 MiniLM: rows are carried per row as their input stored them (float16 inputs' rows quantised per row,
as a build does), so the merge of int8 halves -- or of an int8 and a float16 half -- equals an int8 build of
all prompts byte for byte. --key-dims: inputs sharing one projection keep their projected keys; full-width
inputs beside them are projected through it with recall@10 re-measured and recorded; different projections
are refused in one line; merge --key-dims refits over full-width inputs (byte for byte a --key-dims build)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from img2prompt.errors import UserError
from img2prompt.index.key_pca import reduced_recall
from img2prompt.index.reader import open_index
from tests.conftest import read_data_prompts
from tests.test_add import _build, _rows, _write
from tests.test_merge import _merge


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    prompts = read_data_prompts(150)
    folder = tmp_path_factory.mktemp("merge-compact-corpus")
    return {"a": _write(folder / "a.txt", prompts[:60]), "b": _write(folder / "b.txt", prompts[60:120]),
            "d": _write(folder / "d.txt", prompts[120:150]),
            "c": _write(folder / "c.txt", prompts[90:120] + [prompts[3].upper()])}


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpora, tiny_clip_dir):
    root = tmp_path_factory.mktemp("merge-compact")
    a, b, c, d = corpora["a"], corpora["b"], corpora["c"], corpora["d"]
    for name, corpus, extra in (("all_i8", [a, b], {"minilm_dtype": "int8"}), ("a_i8", [a], {"minilm_dtype": "int8"}),
                                ("b_i8", [b], {"minilm_dtype": "int8"}), ("c_i8", [c], {"minilm_dtype": "int8"}),
                                ("a", [a], {}), ("b", [b], {}), ("d", [d], {}),
                                ("all_pca", [a, b], {"key_dims": 8}), ("a_pca", [a], {"key_dims": 8}),
                                ("b_pca", [b], {"key_dims": 8})):
        _build(corpus, root / name, tiny_clip_dir, index="flat", **extra)
    return root


def _bytes(folder, name):
    return (folder / name).read_bytes()


def _assert_int8_equal(merged, full):
    for name in ("minilm.i8", "minilm_scale.f32", "clip.f16"):
        assert _bytes(merged, name) == _bytes(full, name), name
    assert open_index(merged).prompts == open_index(full).prompts
    np.testing.assert_allclose(np.load(merged / "minilm_mean.npy"), np.load(full / "minilm_mean.npy"), atol=1e-6)
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["minilm"]["dtype"] == "int8" and not (merged / "minilm.f16").exists()


@pytest.mark.parametrize("parts", [("a_i8", "b_i8"), ("a", "b_i8"), ("a_i8", "b")], ids=["int8+int8", "fp16+int8",
                                                                                    "int8+fp16"])
def test_int8_merge_equals_an_int8_build_byte_for_byte(tmp_path, built, tiny_clip_dir, parts):
    result = _merge([built / part for part in parts], tmp_path / "m", tiny_clip_dir)
    _assert_int8_equal(tmp_path / "m", built / "all_i8")
    assert result.manifest["minilm"]["int8_inputs"] == [str(built / part) for part in parts if part.endswith("i8")]


def test_int8_merge_drops_duplicates_row_by_row(tmp_path, built, tiny_clip_dir):
    """c repeats b's second half and one prompt of a: dropped, and the mean is computed without them."""
    result = _merge([built / "a_i8", built / "b_i8", built / "c_i8"], tmp_path / "m", tiny_clip_dir)
    assert [entry["duplicates"] for entry in result.report["merged"]] == [0, 0, 31]
    _assert_int8_equal(tmp_path / "m", built / "all_i8")


def test_an_int8_merge_searches_like_the_int8_build(tmp_path, built, tiny_clip_dir):
    _merge([built / "a_i8", built / "b_i8"], tmp_path / "m", tiny_clip_dir)
    merged, full = open_index(tmp_path / "m"), open_index(built / "all_i8")
    np.testing.assert_array_equal(np.asarray(merged.minilm), np.asarray(full.minilm))
    assert merged.manifest["search"]["kind"] == "flat"


def test_different_projections_are_refused_in_one_line(tmp_path, built, tiny_clip_dir):
    with pytest.raises(UserError, match=r"b_pca: built with another --key-dims projection than .*a_pca") as caught:
        _merge([built / "a_pca", built / "b_pca"], tmp_path / "m", tiny_clip_dir)
    assert "\n" not in str(caught.value) and not (tmp_path / "m").exists()


def test_a_full_width_input_is_projected_and_its_recall_measured(tmp_path, built, tiny_clip_dir):
    result = _merge([built / "a_pca", built / "b"], tmp_path / "m", tiny_clip_dir)
    merged, a_pca, b = open_index(tmp_path / "m"), open_index(built / "a_pca"), open_index(built / "b")
    assert merged.key_dim == 8 and np.array_equal(merged.key_pca.components, a_pca.key_pca.components)
    keys = np.asarray(merged.clip_vectors)
    np.testing.assert_array_equal(keys[:60], np.asarray(a_pca.clip_vectors))  # copied as stored
    projected = a_pca.key_pca.project(np.asarray(b.clip_vectors)).astype(np.float16)
    np.testing.assert_array_equal(keys[60:], projected)
    section = merged.manifest["key_pca"]
    rows = np.sort(np.random.default_rng(0).choice(60, size=60, replace=False))
    expected = reduced_recall(b.clip_vectors, np.asarray(b.clip_vectors[rows], np.float32), a_pca.key_pca)
    assert section["recall_at_10"] == pytest.approx(expected) and section["queries"] == 60
    assert section["remeasured"][0]["index"] == str(built / "b") and result.report["key_pca"] == section
    assert "regression" not in merged.manifest  # the head maps full-width keys, as a --key-dims build


def test_inputs_sharing_a_projection_keep_their_keys(tmp_path, built, tiny_clip_dir):
    first = _merge([built / "a_pca", built / "b"], tmp_path / "ab", tiny_clip_dir)  # both carry a_pca's PCA
    _merge([built / "a_pca", built / "d"], tmp_path / "ac", tiny_clip_dir)
    result = _merge([tmp_path / "ab", tmp_path / "ac"], tmp_path / "m", tiny_clip_dir)
    merged, ab, ac = (open_index(tmp_path / name) for name in ("m", "ab", "ac"))
    ac_prompts = ac.prompts
    kept = [row for row, prompt in enumerate(ac_prompts) if prompt in set(ac_prompts[60:]) - set(ab.prompts)]
    assert merged.prompts == ab.prompts + [ac_prompts[row] for row in kept]
    np.testing.assert_array_equal(np.asarray(merged.clip_vectors),
                                  np.concatenate([np.asarray(ab.clip_vectors), np.asarray(ac.clip_vectors)[kept]]))
    assert result.manifest["key_pca"]["recall_at_10"] == min(first.manifest["key_pca"]["recall_at_10"],
                                                             ac.manifest["key_pca"]["recall_at_10"])
    assert "shared" in result.manifest["key_pca"]["merged"]


def test_merge_key_dims_refits_like_a_key_dims_build(tmp_path, built, tiny_clip_dir):
    _merge([built / "a", built / "b"], tmp_path / "m", tiny_clip_dir, key_dims=8)
    for name in ("clip.f16", "key_pca.npz", "minilm.f16"):
        assert _bytes(tmp_path / "m", name) == _bytes(built / "all_pca", name), name
    merged = json.loads((tmp_path / "m" / "manifest.json").read_text())["key_pca"]
    full = json.loads((built / "all_pca" / "manifest.json").read_text())["key_pca"]
    assert merged == full  # fitted and measured over the same keys, as the build did
    with pytest.raises(UserError, match=r"a_pca: holds only PCA-projected keys"):
        _merge([built / "a_pca", built / "b"], tmp_path / "m2", tiny_clip_dir, key_dims=8)
