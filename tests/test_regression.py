"""The streamed ridge head: checked against direct numpy computations on the full matrices."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from img2prompt.index.ridge import DEFAULT_RATIO, RIDGE_GRID, RidgeAccumulator, RidgeHead


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def clustered(seed: int, d: int = 8, t: int = 5, text: int = 70, image: int = 50, noise: float = 0.1):
    """Unit keys in two modalities with different means (a modality gap); unit targets, linear + noise."""
    rng = np.random.default_rng(seed)
    gap = rng.standard_normal((2, d)) * 2.0
    keys = {"text": unit(gap[0] + rng.standard_normal((text, d))),
            "image": unit(gap[1] + rng.standard_normal((image, d)))}
    mixing = rng.standard_normal((d, t))
    targets = {m: unit(k @ mixing + 0.5 + noise * rng.standard_normal((len(k), t))) for m, k in keys.items()}
    return keys, targets


def feed(acc: RidgeAccumulator, keys: dict, targets: dict, sizes: dict[str, list[int]]) -> None:
    """Text rows get ids 0..; image rows follow them. Each modality is fed in chunks of the given sizes."""
    first = 0
    for m in ("text", "image"):
        assert sum(sizes[m]) == len(keys[m])
        start = 0
        for size in sizes[m]:
            acc.add(keys[m][start:start + size], targets[m][start:start + size], first + start, m)
            start += size
        first += len(keys[m])


def direct(keys: dict, targets: dict, lam: float | None = None, ratio: float | None = None):
    """W on the full centred matrices: per-modality key means, the global target mean."""
    xc = np.concatenate([keys[m] - keys[m].mean(axis=0) for m in ("text", "image")])
    y = np.concatenate([targets["text"], targets["image"]])
    yc = y - y.mean(axis=0)
    if lam is None:
        lam = ratio * np.trace(xc.T @ xc) / xc.shape[1]
    return np.linalg.solve(xc.T @ xc + lam * np.eye(xc.shape[1]), xc.T @ yc), lam, y.mean(axis=0)


def test_streamed_solution_equals_the_direct_closed_form():
    keys, targets = clustered(0)
    acc = RidgeAccumulator(8, 5, stride=1000)  # only row 0 is held out; solve/fit use all rows anyway
    feed(acc, keys, targets, {"text": [1, 13, 29, 27], "image": [17, 2, 31]})
    expected, _, _ = direct(keys, targets, lam=0.37)
    np.testing.assert_allclose(acc.solve(0.37), expected, rtol=1e-8, atol=1e-10)

    head = acc.fit()
    weights, lam, y_mean = direct(keys, targets, ratio=head.ratio)
    assert head.lam == pytest.approx(lam, rel=1e-10)
    np.testing.assert_allclose(head.weights, weights, rtol=1e-5, atol=1e-6)
    assert head.weights.dtype == np.float32
    np.testing.assert_allclose(head.target_mean, y_mean, atol=1e-7)
    for m in ("text", "image"):
        np.testing.assert_allclose(head.key_means[m], keys[m].mean(axis=0), atol=1e-7)
    assert head.rows == {"text": 70, "image": 50}


def test_chunking_does_not_change_the_result():
    keys, targets = clustered(1)
    whole, pieces = RidgeAccumulator(8, 5, stride=7), RidgeAccumulator(8, 5, stride=7)
    feed(whole, keys, targets, {"text": [70], "image": [50]})
    feed(pieces, keys, targets, {"text": [3, 4, 5, 58], "image": [9, 9, 9, 23]})
    a, b = whole.fit(), pieces.fit()
    assert a.ratio == b.ratio and a.heldout["rows"] == b.heldout["rows"] == 18  # ids 0, 7, ..., 119
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-6, atol=1e-7)
    for r in a.heldout["cosine_by_ratio"]:
        assert a.heldout["cosine_by_ratio"][r] == pytest.approx(b.heldout["cosine_by_ratio"][r], abs=1e-12)


def test_heldout_rows_are_scored_with_training_statistics_only():
    keys, targets = clustered(2, noise=0.5)
    acc = RidgeAccumulator(8, 5, stride=4)
    feed(acc, keys, targets, {"text": [11, 59], "image": [6, 44]})
    head = acc.fit()
    ids = {"text": np.arange(70), "image": 70 + np.arange(50)}
    held = {m: ids[m] % 4 == 0 for m in ids}
    assert head.heldout["rows"] == 30 and head.heldout["training_rows"] == 90
    assert head.rows == {"text": 70, "image": 50}  # the final fit uses every row
    train_keys = {m: keys[m][~held[m]] for m in keys}
    train_targets = {m: targets[m][~held[m]] for m in keys}
    for ratio in RIDGE_GRID:
        weights, _, y_mean = direct(train_keys, train_targets, ratio=ratio)
        got = np.concatenate([(keys[m][held[m]] - train_keys[m].mean(axis=0)) @ weights + y_mean for m in keys])
        truth = np.concatenate([targets[m][held[m]] for m in keys])
        cosine = np.mean(np.sum(unit(got) * unit(truth), axis=1))
        assert head.heldout["cosine_by_ratio"][str(ratio)] == pytest.approx(cosine, abs=1e-10)
    assert head.heldout["chosen_cosine"] == max(head.heldout["cosine_by_ratio"].values())


def one_modality(keys: np.ndarray, targets: np.ndarray) -> RidgeHead:
    acc = RidgeAccumulator(keys.shape[1], targets.shape[1], stride=3)
    acc.add(keys, targets, 0)
    return acc.fit()


def test_noiseless_linear_targets_choose_the_smallest_ratio():
    rng = np.random.default_rng(3)
    mixing = rng.standard_normal((6, 4))
    keys = rng.standard_normal((300, 6))
    head = one_modality(keys, keys @ mixing + 1.0)
    assert head.ratio == RIDGE_GRID[0]
    assert head.heldout["chosen_cosine"] > 0.9999


def test_targets_unrelated_to_the_keys_choose_the_largest_ratio():
    rng = np.random.default_rng(4)
    noise = unit(np.array([1.0, 1.0, 0.0, 0.0]) + rng.standard_normal((60, 4)))
    head = one_modality(rng.standard_normal((60, 20)), noise)  # 40 training rows, 20 dims: a loose map only fits noise
    assert head.ratio == RIDGE_GRID[-1]


def test_ties_go_to_the_larger_ratio():
    # training keys come in ± pairs and every target is [1, 0]: XcᵀYc is exactly 0, so every ratio
    # predicts exactly ȳ and scores exactly the same cosine
    rng = np.random.default_rng(5)
    pairs = rng.integers(-3, 4, size=(10, 3)).astype(np.float64)
    keys = np.empty((30, 3))
    held = np.arange(30) % 3 == 0
    keys[~held], keys[held] = np.concatenate([pairs, -pairs]), rng.integers(-3, 4, size=(10, 3))
    acc = RidgeAccumulator(3, 2, stride=3)
    acc.add(keys, np.tile([1.0, 0.0], (30, 1)), 0)
    head = acc.fit()
    assert len(set(head.heldout["cosine_by_ratio"].values())) == 1
    assert head.ratio == RIDGE_GRID[-1]


def test_the_heldout_cap_stops_holding_rows_out():
    keys, targets = clustered(6)
    acc = RidgeAccumulator(8, 5, stride=2, max_heldout=3)
    feed(acc, keys, targets, {"text": [2, 2, 2, 64], "image": [50]})  # the cap is reached across chunks
    head = acc.fit()
    assert head.heldout["rows"] == 3 and head.heldout["training_rows"] == 117


def test_nothing_held_out_uses_the_default_ratio():
    keys, targets = clustered(7, text=10, image=0)
    acc = RidgeAccumulator(8, 5, stride=1000)
    acc.add(keys["text"], targets["text"], 1)  # ids 1..10: none is a multiple of 1000
    head = acc.fit()
    assert head.ratio == DEFAULT_RATIO and head.heldout["rows"] == 0 and head.heldout["chosen_cosine"] is None
    assert "default" in head.heldout["note"]


def toy_head() -> RidgeHead:
    return RidgeHead(weights=np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=np.float32),
                     key_means={"image": np.array([0.5, 0.0, 0.0], dtype=np.float32)},
                     target_mean=np.array([0.1, -0.2], dtype=np.float32), lam=0.5, ratio=0.1,
                     heldout={"rows": 0}, rows={"text": 4})


def test_predict_centres_by_the_query_mean_and_adds_the_target_mean():
    head = toy_head()
    queries = np.array([[1.5, 1.0, 0.0], [0.5, 0.0, 1.0]])
    # q − μ = [1, 1, 0] → qW = [1, 2] → + ȳ = [1.1, 1.8];  q − μ = [0, 0, 1] → [1, 1] → [1.1, 0.8]
    expected = unit(np.array([[1.1, 1.8], [1.1, 0.8]]))
    got = head.predict(queries, head.key_means["image"])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_save_load_round_trip_is_atomic(tmp_path, monkeypatch):
    keys, targets = clustered(8)
    acc = RidgeAccumulator(8, 5, stride=5)
    feed(acc, keys, targets, {"text": [70], "image": [50]})
    head = acc.fit()
    path = tmp_path / "ridge.npz"
    head.save(path)
    assert os.listdir(tmp_path) == ["ridge.npz"]
    info = json.loads(json.dumps(head.info()))  # the manifest is JSON
    loaded = RidgeHead.load(path, info)
    for name in ("weights", "target_mean"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(head, name))
    assert loaded.key_means.keys() == head.key_means.keys()
    for m in head.key_means:
        np.testing.assert_array_equal(loaded.key_means[m], head.key_means[m])
    assert (loaded.lam, loaded.ratio, loaded.heldout, loaded.rows) == (head.lam, head.ratio, head.heldout, head.rows)

    def crash(file, **arrays):  # a write that dies half way
        file.write(b"partial") if hasattr(file, "write") else open(file, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError):
        toy_head().save(path)
    assert os.listdir(tmp_path) == ["ridge.npz"]  # no temp file left, the old head intact
    np.testing.assert_array_equal(RidgeHead.load(path, info).weights, head.weights)
