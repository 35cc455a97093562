"""Boundaries of build_index/near_dup.py (issue 35's mutation pass, docs/mutation.md): --near-dup T is in
(0, 1] with 1 included (exact copies only), up to SMALL_ROWS rows inclusive the filter is one exact cell,
above it cells (never fewer than one), nothing to decide gives an empty mask, and the keep mask is split
over the shards in corpus order with the index's rows (`before`) counting as kept and a bad row named by
its shard. (The ≥ T boundary itself: tests/test_near_dup.py test_threshold_boundary_is_inclusive.)"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from img2prompt.build_index.near_dup import NearDupParams, check_threshold, near_dup_keep, near_dup_mask, shard_keep_masks
from img2prompt.errors import UserError
from img2prompt.index.layout import IMAGE_KEYS, TEXT_KEYS, shard_path

TINY = NearDupParams(cell_rows=4, small_rows=10, chunk=16)


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def spread(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, dim)))


def test_the_threshold_range_is_zero_exclusive_one_inclusive():
    assert check_threshold(1.0) == 1.0 and check_threshold(1e-9) == 1e-9
    for bad in (0.0, -0.1, float(np.nextafter(1.0, 2.0)), 1.5):
        with pytest.raises(UserError, match=r"--near-dup must be in \(0, 1\]"):
            check_threshold(bad)
    # T = 1: an exact copy is dropped, a row a rounding away is not
    rows = unit([[1, 0], [0, 1], [1, 0], [1, 1e-3]])
    mask, stats = near_dup_mask(rows, 1.0)
    assert mask.tolist() == [True, True, False, True] and stats.dropped == 1 and stats.threshold == 1.0


def test_small_rows_inclusive_is_one_exact_cell_and_above_is_cells():
    rows = spread(11)
    assert near_dup_keep(rows[:10], 0.99, params=TINY)[1].method == "exact"  # count == small_rows
    assert near_dup_keep(rows, 0.99, params=TINY)[1].method.startswith("cells(n=")  # small_rows + 1
    # above small_rows but fewer rows than a cell: max(1, count // cell_rows) = 1 cell, i.e. exact
    few = NearDupParams(cell_rows=11, small_rows=10, chunk=16)
    mask, stats = near_dup_keep(np.concatenate([rows, rows[:1]]), 0.99, params=few)
    assert stats.method == "exact" and mask.tolist() == [True] * 11 + [False]


def test_one_home_and_one_probe_in_the_single_cell_still_find_every_pair():
    rows = np.concatenate([spread(6), spread(6)[:3]])  # rows 6..8 copy rows 0..2
    single = NearDupParams(homes=1, probes=1, top_probes=1, cell_rows=4, small_rows=100, chunk=4)
    mask, stats = near_dup_keep(rows, 0.999, params=single)
    assert mask.tolist() == [True] * 6 + [False] * 3 and stats.method == "exact"


def test_nothing_to_decide_gives_an_empty_mask():
    rows = spread(4)
    for fixed in (4, 5):
        keep, stats = near_dup_keep(rows, 0.9, fixed=fixed)
        assert keep.shape == (0,) and keep.dtype == bool and stats.dropped == 0
    keep, stats = near_dup_mask(np.zeros((0, 8), np.float32), 0.9)
    assert keep.shape == (0,) and stats.seen == 0 and stats.dropped == 0


def _writer(tmp_path, blocks: dict[int, np.ndarray], image_shards=()) -> SimpleNamespace:
    records = []
    for number, rows in blocks.items():
        path = shard_path(tmp_path, number, "minilm")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rows)
        records.append({"number": number, "keys": IMAGE_KEYS if number in image_shards else TEXT_KEYS})
    return SimpleNamespace(root=tmp_path, _ordered_records=lambda: records)


def test_shard_masks_split_the_corpus_order_decision(tmp_path):
    base = spread(5, seed=1)
    blocks = {3: base[:2], 7: np.concatenate([base[2:4], base[:1]]), 9: np.concatenate([base[1:2], base[4:]])}
    masks, stats = shard_keep_masks(_writer(tmp_path, blocks), 0.999)
    assert {n: m.tolist() for n, m in masks.items()} == {3: [True, True], 7: [True, True, False],
                                                           9: [False, True]}
    assert stats.dropped == 2 and stats.seen == 7
    # the index's rows come first and count as kept: a shard row copying one is dropped, they are not
    masks, stats = shard_keep_masks(_writer(tmp_path, blocks), 0.999, before=np.concatenate([base[4:], base[4:]]))
    assert {n: m.tolist() for n, m in masks.items()} == {3: [True, True], 7: [True, True, False],
                                                           9: [False, False]}
    assert stats.seen == 7
    # an empty `before` changes nothing; image-keyed shards are not text rows
    masks, _ = shard_keep_masks(_writer(tmp_path, blocks), 0.999, before=np.zeros((0, 8), np.float32))
    assert masks[9].tolist() == [False, True]
    assert shard_keep_masks(SimpleNamespace(root=tmp_path, _ordered_records=lambda: []), 0.9)[0] == {}


@pytest.mark.parametrize("where, message", [
    ((3, 0), "shard 3: near-dup: row 0 has a NaN or zero MiniLM vector"),
    ((3, 1), "shard 3: near-dup: row 1 has a NaN or zero MiniLM vector"),
    ((7, 0), "shard 7: near-dup: row 0 has a NaN or zero MiniLM vector"),
    ((7, 2), "shard 7: near-dup: row 2 has a NaN or zero MiniLM vector"),
])
def test_a_bad_shard_row_is_named_by_its_shard_and_row(tmp_path, where, message):
    base = spread(5, seed=2)
    blocks = {3: base[:2].copy(), 7: base[2:].copy()}
    blocks[where[0]][where[1]] = 0
    for before in (None, spread(2, seed=9)):  # the index's rows shift the numbers; the message does not
        with pytest.raises(UserError) as caught:
            shard_keep_masks(_writer(tmp_path, blocks), 0.9, before=before)
        assert str(caught.value) == message


def test_a_bad_index_row_is_named_as_the_index_s(tmp_path):
    for row in range(3):
        damaged = spread(3, seed=4)
        damaged[row] = np.nan
        with pytest.raises(UserError, match=f"the index's MiniLM row {row} is NaN or zero: the index is damaged"):
            shard_keep_masks(_writer(tmp_path, {1: spread(2)}), 0.9, before=damaged)


def test_one_new_row_against_the_index_rows_is_compared():
    """add with a single new prompt: one decided row (one prober) is still checked against the index's rows."""
    rows = unit([[1, 0, 0], [0, 1, 0], [0, 0.001, 1], [1, 0.001, 0]])
    keep, stats = near_dup_keep(rows, 0.99, fixed=3)
    assert keep.tolist() == [False] and stats.seen == 1 and stats.dropped == 1
    keep, _ = near_dup_keep(rows[[0, 1]], 0.99, fixed=1)
    assert keep.tolist() == [True]


def test_the_first_bad_row_is_named_and_zero_means_a_norm_below_1e_6():
    rows = spread(6)
    rows[[2, 4]] = 0
    with pytest.raises(UserError, match="row 2 has a NaN or zero MiniLM vector"):
        near_dup_mask(rows, 0.9)
    tiny = np.zeros((2, 8), np.float32)
    tiny[0, 1] = 1
    tiny[1, 0] = np.float32(1e-6)  # norm exactly 1e-6 (float32): small, not zero
    assert near_dup_mask(tiny, 0.9)[0].tolist() == [True, True]
    tiny[1, 0] = np.nextafter(np.float32(1e-6), np.float32(0))
    with pytest.raises(UserError, match="row 1 has a NaN or zero"):
        near_dup_mask(tiny, 0.9)


def test_more_rows_than_small_rows_but_fewer_than_a_cell_is_one_exact_cell():
    rows = np.concatenate([spread(11), spread(11)[:1]])
    for cell_rows in (11, 20):  # count // cell_rows = 1, then 0: at least one cell
        mask, stats = near_dup_keep(rows, 0.99, params=NearDupParams(cell_rows=cell_rows, small_rows=10, chunk=16))
        assert stats.method == "exact" and mask.tolist() == [True] * 11 + [False]
