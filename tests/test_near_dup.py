"""build --near-dup: the streaming filter on hand-made vectors with known cosines, and IVF vs brute force."""
import numpy as np
import pytest

from build_index.near_dup import NearDupFilter, near_dup_mask
from img2prompt.errors import UserError


def unit(*rows):
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_first_kept_wins_across_batches():
    f = NearDupFilter(0.9, 2)
    assert f.feed(unit([1, 0])).tolist() == [True]
    # cos([1,0],[1,0.1]) = 0.995 → dropped; [0,1] is far → kept
    assert f.feed(unit([1, 0.1], [0, 1])).tolist() == [False, True]
    assert f.stats.dropped == 1 and f.stats.seen == 3


def test_within_batch_only_against_kept_rows():
    # b near a (drop), c near b but not a: b was dropped, so c stays (compared with KEPT rows only)
    a, b, c = [1, 0], [np.cos(0.3), np.sin(0.3)], [np.cos(0.6), np.sin(0.6)]
    mask, stats = near_dup_mask(unit(a, b, c), float(np.cos(0.35)))
    assert mask.tolist() == [True, False, True] and stats.dropped == 1


def test_threshold_boundary_is_inclusive():
    v = unit([1, 0], [0.8, 0.6])
    cos = float((v[0] @ v[1]))
    assert near_dup_mask(v, cos)[0].tolist() == [True, False]
    assert near_dup_mask(v, float(np.nextafter(np.float32(cos), np.float32(2))))[0].tolist() == [True, True]


def test_refuses_nan_and_zero_and_bad_threshold():
    with pytest.raises(UserError, match="row 1 has a NaN or zero"):
        near_dup_mask(np.array([[1, 0], [0, 0]], np.float32), 0.9)
    with pytest.raises(UserError, match="row 0"):
        near_dup_mask(np.array([[np.nan, 0]], np.float32), 0.9)
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        NearDupFilter(0.0, 2)


def test_ivf_phase_agrees_with_brute_force():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(60, 32)).astype(np.float32)
    rows = centres[rng.integers(0, 60, 4000)] + 0.5 * rng.normal(size=(4000, 32)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    exact, _ = near_dup_mask(rows, 0.9, exact_until=10**9)
    approx, stats = near_dup_mask(rows, 0.9, exact_until=500, batch=300)
    assert "ivf-flat" in stats.method
    assert 0 < (~exact).sum() < len(rows)
    assert (approx == exact).mean() >= 0.995
    # deterministic: a second run (a resumed build) decides the same
    assert (near_dup_mask(rows, 0.9, exact_until=500, batch=300)[0] == approx).all()
