"""Compact storage (issue #21 part 2): int8 MiniLM rows with a per-row scale (index/minilm_store.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, run_cli
from img2prompt.errors import UserError
from img2prompt.index.layout import FORMAT_VERSION, INT8_FORMAT_VERSION, MANIFEST, MINILM_I8, MINILM_SCALE
from img2prompt.index.layout import MINILM as MINILM_F16
from img2prompt.index.minilm_store import Int8Rows, dequantise, prediction_change, quantise
from img2prompt.index.reader import open_index


def _unit_rows(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_int8_round_trip_error_is_at_most_half_a_step_per_row():
    rows = _unit_rows(500, 384)
    rows[3] = 0.0  # an all-zero row stays zero
    quantised, scale = quantise(rows)
    assert quantised.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (500,)
    back = dequantise(quantised, scale)
    error = np.abs(back - rows).max(axis=1)
    peak = np.abs(rows).max(axis=1)
    assert np.all(error <= peak / 254 + 1e-7)
    assert np.all(back[3] == 0) and np.abs(quantised).max() == 127
    rows_view = Int8Rows(quantised, scale)
    ids = np.array([[4, 1], [0, 499]])
    assert rows_view[ids].shape == (2, 2, 384) and np.array_equal(rows_view[ids][1, 1], back[499])


def test_prediction_change_is_zero_for_identical_rows_and_small_for_int8():
    keys = _unit_rows(300, 32, seed=1)
    full = _unit_rows(300, 384, seed=2).astype(np.float16)
    assert prediction_change(keys, full, full)["mean_abs_delta_cos"] == 0.0
    change = prediction_change(keys, full, Int8Rows(*quantise(full)))
    assert change["queries"] == 300 and 0 < change["mean_abs_delta_cos"] < 0.001


@pytest.fixture(scope="module")
def int8_index(tmp_path_factory, tiny_clip_dir, corpus_file):
    from img2prompt.build_index.runner import BuildOptions, run_build

    out = tmp_path_factory.mktemp("int8") / "idx"
    run_build(BuildOptions(corpus=[str(corpus_file)], out=str(out), clip_model=str(tiny_clip_dir), shard_size=64,
                           batch_size=32, device="cpu", progress=False, minilm_dtype="int8"))
    return out


def test_int8_index_opens_with_its_files_and_matches_fp16(int8_index, built_index):
    compact, full = open_index(int8_index, verify=True), open_index(built_index)
    manifest = compact.manifest
    assert manifest["format_version"] == INT8_FORMAT_VERSION and manifest["minilm"]["dtype"] == "int8"
    assert full.manifest["format_version"] == FORMAT_VERSION and "minilm" not in full.manifest  # fp16 unchanged
    assert MINILM_F16 not in manifest["files"] and {MINILM_I8, MINILM_SCALE} <= set(manifest["files"])
    assert not (int8_index / MINILM_F16).exists()
    assert (int8_index / MINILM_I8).stat().st_size == compact.count * compact.text_dim
    assert manifest["minilm"]["prediction_change_vs_fp16"]["mean_abs_delta_cos"] < 0.001
    ids = np.arange(compact.count)
    rows, reference = compact.minilm[ids], np.asarray(full.minilm[ids], np.float32)
    assert rows.dtype == np.float32 and rows.shape == reference.shape
    cos = np.sum(rows * reference, axis=1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() > 0.9999


def test_prediction_on_int8_index_matches_fp16(int8_index, built_index, sample_images):
    from img2prompt.api import open_index as api_open

    images = sorted(sample_images.glob("*.png"))
    with api_open(int8_index, device="cpu") as compact, api_open(built_index, device="cpu") as full:
        a, b = compact.predict(images), full.predict(images)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape == (len(images), 384)
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999


def test_a_reader_without_format_4_refuses_an_int8_index(int8_index, monkeypatch):
    import img2prompt.index.reader as reader

    monkeypatch.setattr(reader, "READABLE_VERSIONS", (1, 2, 3))  # an img2prompt from before int8 storage
    with pytest.raises(UserError, match=f"has index format {INT8_FORMAT_VERSION}; this img2prompt reads formats "
                                        "1, 2, 3: upgrade img2prompt"):
        reader.open_index(int8_index)


def test_int8_manifest_without_the_int8_files_is_refused_in_one_line(int8_index, tmp_path):
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(int8_index, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["files"][MINILM_SCALE]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"files.{MINILM_SCALE}"):
        open_index(copy)
    manifest["minilm"]["dtype"] = "int4"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="minilm.dtype 'int4'"):
        open_index(copy)


def test_a_bad_minilm_dtype_is_refused_before_any_work(tmp_path, corpus_file):
    from img2prompt.build_index.runner import BuildOptions, run_build

    with pytest.raises(UserError, match="--minilm-dtype must be fp16 or int8"):
        run_build(BuildOptions(corpus=[str(corpus_file)], out=str(tmp_path / "x"), clip_model="none",
                               minilm_dtype="int4", progress=False))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_build_pca_int8_then_search_and_submit(tmp_path, tiny_clip_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join((DATA / "prompts.txt").read_text().splitlines()[:80]) + "\n")
    index = tmp_path / "index"
    built = run_cli("build", corpus, "--out", index, "--clip-model", tiny_clip_dir, "--minilm-dtype", "int8",
                    "--key-dims", "24")
    assert built.returncode == 0, built.stderr
    assert "minilm: int8, prediction change vs fp16: mean |Δcos|" in built.stdout
    assert "keys: PCA " in built.stdout and "→ 24 dims, recall@10 vs full width" in built.stdout
    query = corpus.read_text().splitlines()[5]
    searched = run_cli("search", index, "--text", query, "--k", "2", "--json")
    assert searched.returncode == 0, searched.stderr
    assert json.loads(searched.stdout)[0]["results"][0]["id"] == 5
    out = tmp_path / "submission.csv"
    submitted = run_cli("submit", index, DATA / "images", "--out", out, "--k", "4", "--json", "--verify")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["predicted"] == 6


# ---------------------------------------------------------------------------------------------- key PCA

def _clustered_keys(count: int, dim: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((16, dim))
    keys = rng.standard_normal((count, 16)) @ basis + 0.05 * rng.standard_normal((count, dim))
    return (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype(np.float32)


def test_pca_projection_equals_numpys_reference_and_keys_and_queries_project_alike():
    from img2prompt.index.key_pca import fit_pca

    keys = _clustered_keys(400, 64)
    pca = fit_pca(keys, 8, sample=400)
    data = keys.astype(np.float64)
    _, _, vt = np.linalg.svd(data, full_matrices=False)  # numpy's reference: uncentred PCA (SVD of the keys)
    assert np.allclose(np.abs(pca.components @ vt[:8].T), np.eye(8), atol=1e-4)
    reference = data @ vt[:8].T * np.sign(np.sum(pca.components * vt[:8], axis=1))
    assert np.allclose(pca.components, vt[:8] * np.sign(np.sum(pca.components * vt[:8], axis=1))[:, None], atol=1e-4)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    assert np.allclose(pca.project(keys), reference, atol=1e-4)
    assert np.allclose(np.linalg.norm(pca.project(keys[:5]), axis=1), 1.0, atol=1e-5)
    assert np.allclose(pca.project(keys[7:8]), pca.project(keys)[7:8], atol=1e-6)  # a query projects like a key


def test_pca_recall_and_dims_and_damaged_file(tmp_path):
    from img2prompt.index.key_pca import check_key_dims, fit_pca, load_pca, reduced_recall, save_pca

    keys = _clustered_keys(600, 64)
    pca = fit_pca(keys[:500], 16)
    assert reduced_recall(keys[:500], keys[500:], pca) > 0.8
    for bad in (0, 64, 65):
        with pytest.raises(UserError, match="--key-dims must be from 1 to 63"):
            check_key_dims(bad, 64)
    path = tmp_path / "key_pca.npz"
    save_pca(path, pca)
    loaded = load_pca(path, 64, 16)
    assert np.array_equal(loaded.components, pca.components)
    with pytest.raises(UserError, match=r"key_pca.npz: PCA of shape \(16, 64\), expected \(16, 32\)"):
        load_pca(path, 32, 16)
    path.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="key_pca.npz: not readable"):
        load_pca(path, 64, 16)


@pytest.fixture(scope="module")
def pca_int8_index(tmp_path_factory, tiny_clip_dir, corpus_file):
    from img2prompt.build_index.runner import BuildOptions, run_build

    out = tmp_path_factory.mktemp("pca") / "idx"
    run_build(BuildOptions(corpus=[str(corpus_file)], out=str(out), clip_model=str(tiny_clip_dir), shard_size=64,
                           batch_size=32, device="cpu", progress=False, minilm_dtype="int8", key_dims=16))
    return out


def test_pca_index_stores_reduced_keys_its_pca_and_recall(pca_int8_index):
    from img2prompt.index.layout import KEY_PCA

    index = open_index(pca_int8_index, verify=True)
    pca = index.manifest["key_pca"]
    assert pca["dims"] == 16 and pca["key_dim"] == index.clip_dim and 0 <= pca["recall_at_10"] <= 1
    assert KEY_PCA in index.manifest["files"] and index.clip_vectors.shape == (index.count, 16)
    assert np.allclose(np.linalg.norm(np.asarray(index.clip_vectors[:10], np.float32), axis=1), 1, atol=1e-2)
    assert index.key_pca.dims == 16


def test_a_mis_shaped_pca_is_one_line_on_open(pca_int8_index, tmp_path):
    import shutil

    from img2prompt.index.layout import KEY_PCA

    copy = tmp_path / "idx"
    shutil.copytree(pca_int8_index, copy)
    np.savez(copy / KEY_PCA, components=np.zeros((2, 3), np.float32))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"][KEY_PCA]["bytes"] = (copy / KEY_PCA).stat().st_size
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="key_pca.npz: PCA of shape"):
        open_index(copy)


def test_key_dims_at_or_above_the_key_dim_is_refused_before_any_work(tmp_path, tiny_clip_dir, corpus_file):
    from img2prompt.build_index.runner import BuildOptions, run_build

    for dims in (0, 10_000):
        with pytest.raises(UserError, match="--key-dims must be"):
            run_build(BuildOptions(corpus=[str(corpus_file)], out=str(tmp_path / "x"), clip_model=str(tiny_clip_dir),
                                   device="cpu", progress=False, key_dims=dims))
        assert not (tmp_path / "x").exists()


def test_search_on_a_pca_index_finds_the_prompt_itself(pca_int8_index):
    from img2prompt.api import open_index as api_open

    with api_open(pca_int8_index, device="cpu") as index:
        prompts = index.prompts([3, 40])
        results = index.search(texts=prompts, k=3)
    assert [int(result.ids[0]) for result in results] == [3, 40]  # the query text's own key, through the PCA


@pytest.mark.slow
def test_a_pca_index_with_fp16_minilm_is_format_4_so_older_readers_refuse_it(tmp_path, tiny_clip_dir):
    from img2prompt.build_index.runner import BuildOptions, run_build

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join((DATA / "prompts.txt").read_text().splitlines()[:40]) + "\n")
    result = run_build(BuildOptions(corpus=[str(corpus)], out=str(tmp_path / "index"), clip_model=str(tiny_clip_dir),
                                    key_dims=24, device="cpu", progress=False))
    assert result.manifest["format_version"] == INT8_FORMAT_VERSION > FORMAT_VERSION
    assert "minilm" not in result.manifest and result.manifest["key_pca"]["dims"] == 24
