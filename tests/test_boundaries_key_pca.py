"""Boundaries of index/key_pca.py (issue 35's mutation pass, docs/mutation.md): --key-dims from 1 to
key_dim - 1 inclusive, the components ordered by variance with the deterministic sign (largest-|x| entry
positive), the projection re-normalised (a zero vector stays zero), a damaged PCA file refused (shape,
non-finite values), the fit sample and held-out query rows, and the streamed rewrite equal to one projection."""
from __future__ import annotations

import numpy as np
import pytest

from img2prompt.errors import UserError
from img2prompt.index import key_pca
from img2prompt.index.key_pca import (KeyPCA, check_key_dims, fit_keys, fit_pca, load_pca, plan_fit, save_pca,
                                      write_projected)


def _keys(count: int = 300, dim: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((count, dim)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])[:dim]
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_key_dims_range_is_one_to_key_dim_minus_one_inclusive():
    check_key_dims(1, 6)
    check_key_dims(5, 6)
    for bad in (0, -1, 6, 7):
        with pytest.raises(UserError, match=rf"--key-dims must be from 1 to 5, below the key dim 6 \(got {bad}\)"):
            check_key_dims(bad, 6)


def test_components_are_the_top_second_moment_directions_in_order_with_fixed_signs():
    keys = _keys()
    pca = fit_pca(keys, 3)
    assert pca.dims == 3 and pca.key_dim == 6 and pca.components.dtype == np.float32
    data = keys.astype(np.float64)
    values, vectors = np.linalg.eigh(data.T @ data / len(data))
    want = vectors[:, ::-1][:, :3].T
    for got, ref in zip(pca.components, want):
        ref = ref * np.sign(ref[np.abs(ref).argmax()])
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert got[np.abs(got).argmax()] > 0
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-5)
    # a sample smaller than the keys: the fit uses exactly that many rows (a seeded choice)
    assert not np.allclose(fit_pca(keys, 3, sample=20).components, pca.components, atol=1e-3)
    np.testing.assert_array_equal(fit_pca(keys, 3, sample=len(keys)).components, pca.components)


def test_projection_is_renormalised_and_zero_stays_zero():
    pca = fit_pca(_keys(), 2)
    vectors = np.array([[1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0]], np.float32)
    got = pca.project(vectors)
    raw = vectors[0] @ pca.components.T
    np.testing.assert_allclose(got[0], raw / np.linalg.norm(raw), rtol=1e-6)
    np.testing.assert_array_equal(got[1], [0, 0])


def test_a_damaged_or_misshapen_pca_file_is_refused(tmp_path):
    path = tmp_path / key_pca.KEY_PCA
    good = fit_pca(_keys(), 2)
    save_pca(path, good)
    np.testing.assert_array_equal(load_pca(path, 6, 2).components, good.components)
    for key_dim, dims in ((6, 3), (5, 2)):
        with pytest.raises(UserError, match=rf"PCA of shape \(2, 6\), expected \({dims}, {key_dim}\) with finite"):
            load_pca(path, key_dim, dims)
    for bad in (np.nan, np.inf):
        components = good.components.copy()
        components[1, 3] = bad
        save_pca(path, KeyPCA(components))
        with pytest.raises(UserError, match="with finite values: the index is damaged"):
            load_pca(path, 6, 2)


def test_plan_fit_holds_queries_out_when_it_can(monkeypatch):
    fit, queries, held_out = plan_fit(50, queries=10)
    np.testing.assert_array_equal(fit, np.arange(50))  # ≤ FIT_SAMPLE: every row is fitted
    assert len(queries) == 10 and not held_out and np.all(np.diff(queries) > 0)
    monkeypatch.setattr(key_pca, "FIT_SAMPLE", 40)
    fit, queries, held_out = plan_fit(50, queries=20)
    assert len(fit) == 40 and held_out and len(queries) == 10  # only 10 rows lie outside the fit
    assert not set(fit.tolist()) & set(queries.tolist()) and np.all(np.diff(fit) > 0)
    fit, queries, held_out = plan_fit(50, queries=4)
    assert len(queries) == 4 and not set(fit.tolist()) & set(queries.tolist())


def test_fit_keys_section_and_the_streamed_rewrite(tmp_path, monkeypatch):
    keys = _keys(120)
    pca, queries, section = fit_keys(keys, 3, seed=0, queries=7)
    np.testing.assert_array_equal(pca.components, fit_pca(keys, 3).components)
    assert section == {"dims": 3, "key_dim": 6, "fit_rows": 120, "seed": 0, "recall_at_10": None, "queries": 7,
                       "held_out": False}
    monkeypatch.setattr(key_pca, "FIT_SAMPLE", 100)
    pca, queries, section = fit_keys(keys, 3, seed=0, queries=7)
    assert section["fit_rows"] == 100 and section["held_out"] and len(queries) == 7
    target = tmp_path / "clip.f16"
    write_projected(target, pca, keys, block=7)
    stored = np.fromfile(target, dtype=np.float16).reshape(-1, 3)
    np.testing.assert_array_equal(stored, pca.project(keys).astype(np.float16))


def test_a_pickled_pca_file_is_refused_not_loaded(tmp_path):
    path = tmp_path / key_pca.KEY_PCA
    with open(path, "wb") as handle:
        np.savez(handle, components=np.array([[object()] * 6] * 2, dtype=object))
    with pytest.raises(UserError, match=r"key_pca.npz: not readable \(ValueError\): the index is damaged"):
        load_pca(path, 6, 2)


def test_the_fit_uses_the_sampled_rows_and_refuses_dims_at_the_key_dim(monkeypatch):
    keys = _keys(120)
    monkeypatch.setattr(key_pca, "FIT_SAMPLE", 100)
    pca, _, _ = fit_keys(keys, 3, seed=0, queries=7)
    fit_rows, _, _ = plan_fit(120, 0, 7)
    np.testing.assert_array_equal(pca.components, fit_pca(keys[fit_rows], 3).components)
    assert not np.allclose(pca.components, fit_pca(keys, 3).components, atol=1e-4)
    with pytest.raises(UserError, match="--key-dims must be from 1 to 5"):
        fit_pca(keys, 6)


def test_reduced_recall_is_recall_at_10_by_default():
    keys, queries = _keys(200, seed=1), _keys(5, seed=2)
    pca = fit_pca(keys, 2)
    full = np.argsort(-(queries @ keys.T), axis=1, kind="stable")
    reduced = np.argsort(-(pca.project(queries) @ pca.project(keys).T), axis=1, kind="stable")
    expected = {k: np.mean([len(set(full[q, :k]) & set(reduced[q, :k])) / k for q in range(5)]) for k in (9, 10, 11)}
    assert len(set(expected.values())) == 3  # the data tells k = 9, 10 and 11 apart
    assert key_pca.reduced_recall(keys, queries, pca) == pytest.approx(expected[10])


@pytest.mark.parametrize("count, taken", [(1, 0), (10, 3), (1_000, 0), (1_000, 1), (5_000, 300), (7, 7)])
def test_nth_not_in_is_the_complement_in_order(count, taken):
    rng = np.random.default_rng(count + taken)
    ids = np.sort(rng.choice(count, size=taken, replace=False))
    others = np.setdiff1d(np.arange(count), ids)
    np.testing.assert_array_equal(key_pca.nth_not_in(ids, np.arange(len(others))), others)


def test_the_grown_recall_samples_the_other_rows_without_an_array_of_every_row():
    """The same rows as drawing from an array of the other ids, in memory that follows the sample, not the index
    (an add to a 20M-prompt index held 1.2 GB in setdiff1d over every row; bench/RESULTS.md)."""
    import tracemalloc

    pca = fit_pca(_keys(400, 6), 3)
    drawn = []

    def full_keys_of(ids):
        drawn.append(ids)
        return _keys(len(ids), 6, seed=int(ids.sum() % 1000))

    count, new_rows = 5_000_000, np.arange(4_999_900, 5_000_000)
    key_pca.grown_recall(pca, lambda ids: _keys(len(ids), 6), 3_000, np.arange(2_900, 3_000))  # imports done
    tracemalloc.start()
    key_pca.grown_recall(pca, full_keys_of, count, new_rows, seed=3, queries=50, sample=2_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20, peak  # 5M ids as int64 alone are 40 MB

    rng = np.random.default_rng(3)
    query_ids = np.sort(rng.choice(new_rows, size=50, replace=False))
    others = rng.choice(np.setdiff1d(np.arange(count), query_ids), size=1_950, replace=False)
    np.testing.assert_array_equal(drawn[0], np.union1d(query_ids, others))
