"""build --near-dup: the streaming filter on hand-made vectors with known cosines, and IVF vs brute force."""
import numpy as np
import pytest

from build_index.near_dup import NearDupParams, near_dup_keep, near_dup_mask
from img2prompt.errors import UserError


def unit(*rows):
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def exact_greedy(rows: np.ndarray, threshold: float, fixed: int = 0) -> np.ndarray:
    """The reference: row i (≥ fixed) is kept iff its cosine to every EARLIER KEPT row is < T."""
    keep = np.ones(len(rows), dtype=bool)
    for i in range(fixed, len(rows)):
        earlier = np.flatnonzero(keep[:i])
        if len(earlier) and (rows[earlier] @ rows[i] >= threshold).any():
            keep[i] = False
    return keep[fixed:]


def clustered(n: int, dim: int = 32, centres: int = 60, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dim)).astype(np.float32)
    rows = middle[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


SHARDED = NearDupParams(cell_rows=64, small_rows=256, chunk=300)  # forces many cells at test sizes


def test_first_kept_wins_in_corpus_order():
    # cos([1,0],[1,0.1]) = 0.995 → dropped; [0,1] is far → kept; a later copy of [0,1] falls to it
    mask, stats = near_dup_mask(unit([1, 0], [1, 0.1], [0, 1], [0, 1]), 0.9)
    assert mask.tolist() == [True, False, True, False]
    assert stats.dropped == 2 and stats.seen == 4


def test_only_kept_rows_drop_later_ones():
    # b near a (drop), c near b but not a: b was dropped, so c stays (compared with KEPT rows only)
    a, b, c = [1, 0], [np.cos(0.3), np.sin(0.3)], [np.cos(0.6), np.sin(0.6)]
    mask, stats = near_dup_mask(unit(a, b, c), float(np.cos(0.35)))
    assert mask.tolist() == [True, False, True] and stats.dropped == 1


def test_threshold_boundary_is_inclusive():
    # the rule is cosine ≥ T (as before this change): exactly at T drops, the next float32 above keeps
    v = unit([1, 0], [0.8, 0.6])
    cos = float((v[0] @ v[1]))
    assert near_dup_mask(v, cos)[0].tolist() == [True, False]
    assert near_dup_mask(v, float(np.nextafter(np.float32(cos), np.float32(2))))[0].tolist() == [True, True]
    # and in the sharded path (many cells): a pair whose cosine is exactly float32(0.6) whatever the summation
    # order (one non-zero product), among rows orthogonal to both
    others = np.zeros((58, 8), np.float32)
    others[:, 2:] = clustered(58, dim=6, seed=3)
    a, b = np.zeros(8, np.float32), np.zeros(8, np.float32)
    a[0], b[0], b[1] = 1, 0.6, 0.8
    rows = np.concatenate([others[:20], a[None], others[20:40], b[None], others[40:]])
    tiny = NearDupParams(cell_rows=4, small_rows=10, chunk=16)
    at = float(np.float32(0.6))
    assert near_dup_mask(rows, at, params=tiny)[0][[20, 41]].tolist() == [True, False]
    above = float(np.nextafter(np.float32(0.6), np.float32(2)))
    assert near_dup_mask(rows, above, params=tiny)[0][[20, 41]].tolist() == [True, True]


def test_refuses_nan_and_zero_and_bad_threshold():
    with pytest.raises(UserError, match="row 1 has a NaN or zero"):
        near_dup_mask(np.array([[1, 0], [0, 0]], np.float32), 0.9)
    with pytest.raises(UserError, match="row 0"):
        near_dup_mask(np.array([[np.nan, 0]], np.float32), 0.9)
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        near_dup_mask(unit([1, 0]), 0.0)


def test_small_sizes_are_exact():
    rows = clustered(1500, seed=1)
    mask, stats = near_dup_mask(rows, 0.9)
    assert stats.method == "exact"
    assert mask.tolist() == exact_greedy(rows, 0.9).tolist()


def test_sharded_agrees_with_exact():
    rows = clustered(4000)
    exact = exact_greedy(rows, 0.9)
    approx, stats = near_dup_mask(rows, 0.9, params=SHARDED)
    assert "cells(" in stats.method
    assert 0 < (~exact).sum() < len(rows)
    assert (approx == exact).mean() >= 0.999
    # deterministic: a second run (a resumed build) decides the same
    assert (near_dup_mask(rows, 0.9, params=SHARDED)[0] == approx).all()


def test_planted_duplicates_found_across_cells():
    rng = np.random.default_rng(5)
    base = clustered(3000, dim=48, centres=40, noise=0.8, seed=5)
    copies = base[rng.integers(0, 3000, 600)] + 0.02 * rng.normal(size=(600, 48)).astype(np.float32)
    rows = np.concatenate([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    exact = exact_greedy(rows, 0.95)
    approx, _ = near_dup_mask(rows, 0.95, params=SHARDED)
    assert (~exact[3000:]).sum() >= 590
    assert (approx == exact).mean() >= 0.999


def test_fixed_rows_count_as_kept():
    # add --near-dup: the index's rows are kept already (even if near each other) and drop new rows near them
    rows = unit([1, 0], [1, 0.01], [0, 1], [1, 0.02], [-1, 0])
    keep, stats = near_dup_keep(rows, 0.99, fixed=2)
    assert keep.tolist() == [True, False, True] and stats.seen == 3 and stats.dropped == 1
    big = clustered(3000, seed=7)
    keep, _ = near_dup_keep(big, 0.9, fixed=1000, params=SHARDED)
    assert (keep == exact_greedy(big, 0.9, fixed=1000)).mean() >= 0.999


def test_memory_held_does_not_grow_with_rows(tmp_path):
    """Structural: what the filter holds in RAM besides the keep mask is the centroid table (rows / cell_rows
    centroids) and bounded buffers; its per-cell work reads rows back from the source, never a copy of it."""
    from build_index import near_dup as module

    rows = clustered(4000, seed=2)
    seen_shapes = []
    original = module._gather

    def spy(source, ids):
        seen_shapes.append(len(ids))
        return original(source, ids)

    module._gather, saved = spy, module._gather
    try:
        near_dup_mask(rows, 0.9, params=SHARDED, work_dir=tmp_path)
    finally:
        module._gather = saved
    # no gather ever reads more than a chunk / a bounded cell slice / a training sample
    assert max(seen_shapes) <= max(SHARDED.chunk, 4096, module.TOP_SAMPLE)
    assert not list(tmp_path.iterdir())  # scratch files removed
    cells = module.train_cells(rows, 4000 // 64, 0)
    assert cells.count <= 2 * 4000 // 64  # the centroid table is sized to rows / cell_rows


@pytest.mark.slow
def test_build_with_near_dup_drops_planted_rows(tmp_path, tiny_clip_dir, text_model):
    import json

    from img2prompt.api import open_index
    from img2prompt.build_index.runner import BuildOptions, run_build
    from img2prompt.encoders.text import minilm_embeddings
    from tests.conftest import read_data_prompts

    prompts = read_data_prompts(40)
    planted = [prompts[i] + ", hd" for i in (3, 10, 20)]
    lines = prompts[:25] + planted + prompts[25:]
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    reference, _ = near_dup_mask(minilm_embeddings(text_model, lines), 0.96)
    assert not reference[25:28].any()  # the planted rows are near-duplicates at 0.96
    out = tmp_path / "idx"
    result = run_build(BuildOptions(corpus=[str(corpus)], out=str(out), clip_model=str(tiny_clip_dir),
                                    shard_size=16, batch_size=16, device="cpu", progress=False, near_dup=0.96))
    dropped = int((~reference).sum())
    assert result.report["skipped"]["near_duplicate"] == dropped
    assert result.report["kept"] == len(lines) - dropped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == len(lines) - dropped
    assert manifest["near_dup"]["threshold"] == 0.96 and manifest["near_dup"]["dropped"] == dropped
    import pyarrow.parquet as pq
    table = pq.read_table(out / "prompts.parquet")
    kept = [p for p, k in zip(lines, reference) if k]
    assert table.column("id").to_pylist() == list(range(len(kept)))  # ids stay dense
    assert table.column("prompt").to_pylist() == kept
    with open_index(out, device="cpu") as index:
        [hit] = index.search(texts=[kept[30]], k=1)
        assert hit.prompts == [kept[30]] and int(hit.ids[0]) == 30


def test_crowded_cell_in_bounded_gram_blocks(monkeypatch):
    """One cell's Gram matrix is computed GRAM_SIDE rows a side at a time (a crowded cell never builds a
    members × probers matrix at once), with the same decisions."""
    from build_index import near_dup as module

    rows = clustered(700, seed=4)
    monkeypatch.setattr(module, "GRAM_SIDE", 37)
    assert near_dup_mask(rows, 0.9)[0].tolist() == exact_greedy(rows, 0.9).tolist()


def test_crowded_cells_are_split_bounding_the_work_with_the_same_decisions(monkeypatch):
    """A cell with more than split_limit members is cut into sub-cells, so the cosines computed per row stay
    bounded (a crowded cell alone costs members × probers), with the same decisions. Crowded cells are forced
    here by a quantiser with 8× too few cells (k-means' own imbalance grows them the same way at scale)."""
    from build_index import near_dup as module

    rng = np.random.default_rng(5)
    base = clustered(4000, dim=48, centres=40, noise=0.8, seed=5)
    copies = base[rng.integers(0, 4000, 800)] + 0.02 * rng.normal(size=(800, 48)).astype(np.float32)
    rows = np.concatenate([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    exact = exact_greedy(rows, 0.95)
    original = module.train_cells
    monkeypatch.setattr(module, "train_cells", lambda source, cells, seed: original(source, max(2, cells // 8), seed))
    keep, stats = near_dup_mask(rows, 0.95, params=SHARDED)
    unsplit, whole = near_dup_mask(rows, 0.95, params=NearDupParams(cell_rows=64, small_rows=256, chunk=300,
                                                                    split_rows=10 ** 9))
    assert stats.split >= 5 and whole.split == 0
    assert stats.pairs < 0.5 * whole.pairs  # the crowded cells' members × probers blocks are gone
    assert stats.pairs / len(rows) < 4 * SHARDED.probes * SHARDED.homes * SHARDED.cell_rows
    assert (~exact).sum() >= 790 and (keep == exact).mean() >= 0.999 and (unsplit == exact).mean() >= 0.999
    assert (near_dup_mask(rows, 0.95, params=SHARDED)[0] == keep).all()  # deterministic


def test_probe_is_the_best_cells_under_the_nearest_tops():
    """probe() (grouped by top, no padded table) returns, per row, the `probes` best-scoring fine cells among
    the fine cells of its `top_probes` nearest tops, best first."""
    from build_index.near_dup import train_cells

    rows = clustered(3000, seed=8)
    cells = train_cells(rows, 60, 3)
    assert len(cells.top) > 2 and len(set(np.diff(cells.first).tolist())) > 1  # tops of unequal widths
    got = cells.probe(rows[:400], 4, 2)
    for row, chosen in zip(rows[:400], got):
        tops = np.argsort(-(cells.top @ row))[:2]
        candidates = np.concatenate([np.arange(cells.first[t], cells.first[t + 1]) for t in tops])
        scores = cells.fine[candidates] @ row
        want = candidates[np.argsort(-scores, kind="stable")[:4]]
        assert np.allclose(cells.fine[chosen] @ row, cells.fine[want] @ row, atol=1e-6)
