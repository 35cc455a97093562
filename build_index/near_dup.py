"""Near-duplicate removal (`build --near-dup T`, `add --near-dup T`): drop a prompt whose MiniLM cosine to an
already KEPT prompt is ≥ T (inclusive). Deterministic: corpus order, first kept wins.

Time linear in N and memory that does not hold the kept vectors: the rows are read back from the MiniLM files
already on disk, and the work is sharded by coarse cell.

1. cells: a two-level coarse quantiser (spherical k-means on seeded samples; about N / CELL_ROWS cells) so that a
   row is compared with a bounded number of others whatever N is;
2. bucket: each row gets a home cell (its nearest) and `probes` probe cells (its nearest few, home first);
   the row ids are counting-sorted by cell into memory-mapped files beside the output;
3. edges: per cell, the exact cosines of the rows probing it against the rows living there; every pair
   (later row i, earlier row j) with cosine ≥ T is an edge, written to disk bucketed by i. k-means cells come
   out unbalanced (at 400k rows the size-biased mean cell was 5× the mean, and it grew with N), so a cell with
   more than SPLIT_FACTOR × its mean members is first cut into sub-cells the same way (homes, SPLIT_PROBES
   probes): the cosines per row stay bounded (NearDupStats.pairs counts them);
4. greedy: in corpus order, row i is kept unless an earlier KEPT row shares an edge with it.

The greedy is the exact first-kept-wins rule over the pairs looked at; the approximation is only in which pairs
are looked at (a near-duplicate whose home is not among the row's probe cells is missed). Assigning a row
costs ≈ k1 + TOP_PROBES × cells / k1 dot products with k1 = √cells (≈ 2√(N / CELL_ROWS): the one term that
grows with N, 0.5k dot products a row at 4M rows, 1.9k at 50M, against ≈ 2–4k cosines a row in the cells). Below SMALL_ROWS rows
there is one cell: exact. In RAM: the centroids (≈ N / CELL_ROWS × 1.5 KB, i.e. ≈ 6 B a row), CHUNK-row buffers,
one cell's Gram matrix and the keep mask itself (1 B a row): nothing else per row. NaN or zero vectors are
refused (one-line error): normalised MiniLM vectors never are, so one means a damaged shard.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from img2prompt.errors import UserError
from img2prompt.index.segments import concat_rows

CELL_ROWS = 128  # rows per cell: each row meets ≈ PROBES × HOMES × CELL_ROWS others
PROBES = 4  # cells each row is checked in (its nearest): recall of near-duplicates across cell borders
HOMES = 2  # cells each row lives in (its nearest): a pair is looked at when a home of one is a probe of the other
TOP_PROBES = 2  # top-level cells whose fine cells are candidates for the probes
SMALL_ROWS = 8192  # up to this many rows: one cell, i.e. exact
TOP_SAMPLE = 16_384  # rows the top level is trained on (at least 39 a top cell)
FINE_SAMPLE_PER_CELL = 16  # rows per fine cell the fine level is trained on
CHUNK = 16_384  # rows read and assigned at a time
EDGE_FLUSH = 1 << 20  # edges held before they are appended to their bucket files
SEED = 1234
SPLIT_FACTOR = 4  # a cell with more members than SPLIT_FACTOR × its mean is cut into sub-cells
SPLIT_PROBES = 2  # sub-cells a prober looks in, inside a crowded cell
GRAM_SIDE = 4096  # rows a side of one cell's Gram block (64 MiB of float32 at most)


@dataclass
class NearDupStats:
    threshold: float
    seen: int = 0
    dropped: int = 0
    method: str = "exact"
    pairs: int = 0  # cosines computed (the work: ≈ N × a bounded number when the cells are balanced)
    split: int = 0  # crowded cells cut into sub-cells

    def manifest(self) -> dict:
        return {"threshold": self.threshold, "dropped": self.dropped, "seen": self.seen, "method": self.method}


@dataclass(frozen=True)
class NearDupParams:
    """How the work is sharded (the defaults are what build and add use; tests shrink them)."""
    cell_rows: int = CELL_ROWS
    probes: int = PROBES
    homes: int = HOMES
    top_probes: int = TOP_PROBES
    small_rows: int = SMALL_ROWS
    chunk: int = CHUNK
    seed: int = SEED
    split_rows: int = 0  # 0: SPLIT_FACTOR × cell_rows × homes (the mean members of a cell times SPLIT_FACTOR)
    split_probes: int = SPLIT_PROBES

    @property
    def split_limit(self) -> int:
        return self.split_rows or SPLIT_FACTOR * self.cell_rows * self.homes


class BadRow(UserError):
    """A NaN or zero MiniLM row (`row`: its number in the rows given)."""

    def __init__(self, row: int) -> None:
        super().__init__(f"near-dup: row {row} has a NaN or zero MiniLM vector")
        self.row = row


def check_threshold(threshold: float) -> float:
    if not 0 < threshold <= 1:
        raise UserError(f"--near-dup must be in (0, 1], got {threshold}")
    return float(threshold)


@dataclass
class CoarseCells:
    """Two-level spherical quantiser: `top` centroids, each with its own block of fine centroids."""
    top: np.ndarray  # [k1, d] float32
    fine: np.ndarray  # [cells, d] float32, the fine centroids of top t at rows first[t]:first[t + 1]
    first: np.ndarray  # [k1 + 1] int64

    @property
    def count(self) -> int:
        return len(self.fine)

    def probe(self, rows: np.ndarray, probes: int, top_probes: int) -> np.ndarray:
        """[n, probes] cell numbers of each row, nearest first (-1 where fewer cells exist). Each row is scored
        against the fine cells of its `top_probes` nearest tops only, grouped by top (no table padded to the
        widest top), so a row costs ≈ k1 + top_probes × (cells / k1) dot products."""
        tops = _top_k(rows @ self.top.T, min(top_probes, len(self.top)))
        width = min(probes, int(np.diff(self.first).max()))  # a top's best `probes` cells hold the row's best
        scores = np.full((len(rows), tops.shape[1], width), -np.inf, np.float32)
        cells = np.full(scores.shape, -1, np.int64)
        for slot in range(tops.shape[1]):
            order = np.argsort(tops[:, slot], kind="stable")
            bounds = np.searchsorted(tops[order, slot], np.arange(len(self.top) + 1))
            for top in np.flatnonzero(np.diff(bounds)):
                where = order[bounds[top]:bounds[top + 1]]
                low, high = int(self.first[top]), int(self.first[top + 1])
                block = rows[where] @ self.fine[low:high].T
                best = _top_k(block, min(width, high - low))
                scores[where, slot, :best.shape[1]] = np.take_along_axis(block, best, axis=1)
                cells[where, slot, :best.shape[1]] = best + low
        scores, cells = scores.reshape(len(rows), -1), cells.reshape(len(rows), -1)
        best = _top_k(scores, min(probes, scores.shape[1]))
        return np.take_along_axis(cells, best, axis=1)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column numbers of each row's k best scores, best first (ties: argpartition's choice, which is
    deterministic for the same input)."""
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    best = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, best, axis=1)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k spherical centroids of `points` (k ≤ len(points)); one centroid is the normalised mean."""
    if k <= 1:
        return _unit(points.mean(axis=0, keepdims=True)).astype(np.float32)
    import faiss
    kmeans = faiss.Kmeans(points.shape[1], k, niter=10, seed=seed, spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    kmeans.train(np.ascontiguousarray(points, dtype=np.float32))
    return _unit(kmeans.centroids).astype(np.float32)


def _gather(source, ids: np.ndarray) -> np.ndarray:
    """float32 rows of `source` at sorted ids (reads from the memory-mapped files)."""
    if len(ids) == 0:
        return np.zeros((0, source.shape[1]), np.float32)
    return np.asarray(source[ids], dtype=np.float32)


def train_cells(source, cells: int, seed: int) -> CoarseCells:
    """About `cells` cells trained on seeded samples of `source` (never more than a bounded sample in RAM
    at once: the fine level is trained one top cell at a time)."""
    count = len(source)
    rng = np.random.default_rng(seed)
    k1 = max(1, min(1024, int(round(np.sqrt(cells)))))
    sample = np.sort(rng.choice(count, size=min(count, max(TOP_SAMPLE, 39 * k1)), replace=False))
    top = _kmeans(_gather(source, sample), min(k1, len(sample)), seed)
    fine_ids = np.sort(rng.choice(count, size=min(count, FINE_SAMPLE_PER_CELL * cells), replace=False))
    labels = np.concatenate([np.argmax(_gather(source, fine_ids[start:start + CHUNK]) @ top.T, axis=1)
                             for start in range(0, len(fine_ids), CHUNK)])
    fine, first = [], [0]
    for number in range(len(top)):
        members = fine_ids[labels == number]
        k2 = min(len(members), max(1, int(round(cells * len(members) / len(fine_ids)))))
        fine.append(_kmeans(_gather(source, members), k2, seed + number + 1) if len(members)
                    else top[number:number + 1])
        first.append(first[-1] + len(fine[-1]))
    return CoarseCells(top, np.concatenate(fine), np.asarray(first, np.int64))


class _CellFiles:
    """Row ids counting-sorted by cell into memory-mapped files (homes: `homes` per row; probes: `probes` per
    decided row), so that a cell's rows are one contiguous slice."""

    def __init__(self, folder: Path, cells: int, count: int, decided: int, probes: int, homes: int) -> None:
        self.folder, self.cells = folder, cells
        self.home_cell = np.lib.format.open_memmap(folder / "home_cell.npy", "w+", np.int32, (count, homes))
        self.probe_cell = np.lib.format.open_memmap(folder / "probe_cell.npy", "w+", np.int32,
                                                    (max(decided, 1), probes))
        self.home_counts = np.zeros(cells + 1, np.int64)
        self.probe_counts = np.zeros(cells + 1, np.int64)

    def sort(self, fixed: int) -> None:
        self.home_ids, self.home_start = self._sort("home", self.home_cell, self.home_counts, 0)
        self.probe_ids, self.probe_start = self._sort("probe", self.probe_cell, self.probe_counts, fixed)

    def _sort(self, name: str, cells_of: np.ndarray, counts: np.ndarray, first_id: int):
        """Counting sort: ids (ascending within a cell) laid out cell after cell; returns (ids, starts)."""
        counts[-1] = 0  # the last slot counted -1 (no cell): not laid out
        starts = np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.int64)
        ids = np.lib.format.open_memmap(self.folder / f"{name}_ids.npy", "w+", np.int64, (max(int(counts.sum()), 1),))
        cursor = starts.copy()
        for low in range(0, len(cells_of), CHUNK):
            block = np.asarray(cells_of[low:low + CHUNK])
            width = block.shape[1] if block.ndim == 2 else 1
            flat = block.reshape(-1).astype(np.int64)
            row_ids = np.repeat(np.arange(low, low + len(block), dtype=np.int64) + first_id, width)
            flat, row_ids = flat[flat >= 0], row_ids[flat >= 0]  # -1: fewer cells than probes
            order = np.argsort(flat, kind="stable")
            flat, row_ids = flat[order], row_ids[order]
            groups = np.bincount(flat, minlength=self.cells + 1)
            group_start = np.concatenate([[0], np.cumsum(groups[:-1])])
            rank = np.arange(len(flat)) - group_start[flat]
            ids[cursor[flat] + rank] = row_ids
            cursor += groups
        return ids, starts


def _assign(source, cells: CoarseCells, files: _CellFiles, fixed: int, params: NearDupParams) -> None:
    """Home cell of every row, probe cells of every decided row (id ≥ fixed); refuses NaN or zero rows."""
    for low in range(0, len(source), params.chunk):
        rows = _gather(source, np.arange(low, min(low + params.chunk, len(source))))
        norms = np.linalg.norm(rows, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms < 1e-6))
        if len(bad):
            raise BadRow(low + int(bad[0]))
        probes = cells.probe(rows, max(params.probes, params.homes), params.top_probes)
        homes = np.full((len(rows), files.home_cell.shape[1]), -1, np.int64)
        homes[:, :min(params.homes, probes.shape[1])] = probes[:, :params.homes]
        files.home_cell[low:low + len(rows)] = homes
        files.home_counts += np.bincount(np.where(homes < 0, cells.count, homes).reshape(-1),
                                         minlength=cells.count + 1)
        probes = probes[:, :params.probes]
        decided = slice(max(fixed - low, 0), len(rows))
        if decided.start < len(rows):
            chosen = probes[decided]
            files.probe_cell[low + decided.start - fixed:low + len(rows) - fixed, :chosen.shape[1]] = chosen
            if chosen.shape[1] < files.probe_cell.shape[1]:
                files.probe_cell[low + decided.start - fixed:low + len(rows) - fixed, chosen.shape[1]:] = -1
            flat = chosen.reshape(-1)
            files.probe_counts += np.bincount(np.where(flat < 0, cells.count, flat), minlength=cells.count + 1)


class _Edges:
    """(later row, earlier row) pairs at cosine ≥ T, appended to files bucketed by the later row."""

    def __init__(self, folder: Path, count: int, buckets: int = 64) -> None:
        self.folder, self.count, self.buckets = folder, max(count, 1), buckets
        self.pending: list[np.ndarray] = []
        self.held = 0
        self.pairs = 0  # cosines computed
        self.split = 0  # crowded cells cut

    def add(self, pairs: np.ndarray) -> None:
        if len(pairs):
            self.pending.append(pairs)
            self.held += len(pairs)
            if self.held >= EDGE_FLUSH:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pairs = np.concatenate(self.pending)
        bucket = pairs[:, 0] * self.buckets // self.count
        for number in np.unique(bucket):
            with open(self.folder / f"edges-{number:03d}.bin", "ab") as handle:
                handle.write(np.ascontiguousarray(pairs[bucket == number]).tobytes())
        self.pending, self.held = [], 0

    def bucket(self, number: int) -> np.ndarray:
        path = self.folder / f"edges-{number:03d}.bin"
        if not path.exists():
            return np.zeros((0, 2), np.int64)
        return np.fromfile(path, dtype=np.int64).reshape(-1, 2)


def _cell_edges(source, files: _CellFiles, edges: _Edges, threshold: float, params: NearDupParams) -> None:
    """Per cell: exact cosines of the rows probing it against its earlier rows living there; a crowded cell
    (more than params.split_limit members: k-means cells are unbalanced, and the work of a cell is members ×
    probers) is split first, so the pairs looked at per row stay bounded whatever N is."""
    for cell in range(files.cells):
        members = np.asarray(files.home_ids[files.home_start[cell]:files.home_start[cell] + files.home_counts[cell]])
        probers = np.asarray(files.probe_ids[files.probe_start[cell]:
                                             files.probe_start[cell] + files.probe_counts[cell]])
        if len(members) == 0 or len(probers) == 0 or probers[-1] <= members[0]:
            continue
        if files.cells > 1 and len(members) > params.split_limit:
            _split_cell_edges(source, members, probers, edges, threshold, params, cell)
        else:
            _block_edges(source, members, probers, edges, threshold)
    edges.flush()


def _block_edges(source, members: np.ndarray, probers: np.ndarray, edges: _Edges, threshold: float) -> None:
    """Edges between sorted `probers` and the earlier of sorted `members`, GRAM_SIDE rows a side at a time
    (bounds the Gram matrix of a crowded cell)."""
    for start in range(0, len(members), GRAM_SIDE):
        near = members[start:start + GRAM_SIDE]
        near_rows = _gather(source, near)
        for low in range(0, len(probers), GRAM_SIDE):
            ids = probers[low:low + GRAM_SIDE]
            if ids[-1] <= near[0]:
                continue
            hit_i, hit_j = np.nonzero(_gather(source, ids) @ near_rows.T >= threshold)
            edges.pairs += len(ids) * len(near)
            later = ids[hit_i] > near[hit_j]  # only (later, earlier) pairs: the few hits, not the whole block
            edges.add(np.stack([ids[hit_i[later]], near[hit_j[later]]], axis=1))


def _split_cell_edges(source, members: np.ndarray, probers: np.ndarray, edges: _Edges, threshold: float,
                      params: NearDupParams, cell: int) -> None:
    """A crowded cell cut into ≈ len(members) / cell_rows sub-cells (k-means on a bounded sample of its members):
    each member lives in its `homes` nearest sub-cells, each prober looks in its `split_probes` nearest."""
    count = -(-len(members) // params.cell_rows)
    edges.split += 1
    rng = np.random.default_rng(params.seed + cell)
    sample = np.sort(rng.choice(members, size=min(len(members), 32 * count, TOP_SAMPLE), replace=False))
    centroids = _kmeans(_gather(source, sample), min(count, len(sample)), params.seed + cell)
    home_of = _nearest(source, members, centroids, params.homes)
    probe_of = _nearest(source, probers, centroids, params.split_probes)
    home_ids, home_start = _group(members, home_of, len(centroids))
    probe_ids, probe_start = _group(probers, probe_of, len(centroids))
    for sub in range(len(centroids)):
        near = home_ids[home_start[sub]:home_start[sub + 1]]
        ids = probe_ids[probe_start[sub]:probe_start[sub + 1]]
        if len(near) and len(ids) and ids[-1] > near[0]:
            _block_edges(source, near, ids, edges, threshold)


def _nearest(source, ids: np.ndarray, centroids: np.ndarray, k: int) -> np.ndarray:
    """[len(ids), k] nearest centroid numbers of the rows `ids` (read GRAM_SIDE rows at a time)."""
    k = min(k, len(centroids))
    return np.concatenate([_top_k(_gather(source, ids[low:low + GRAM_SIDE]) @ centroids.T, k)
                           for low in range(0, len(ids), GRAM_SIDE)])


def _group(ids: np.ndarray, groups: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """ids laid out group after group (ascending within a group, as `ids` is sorted) and the groups' starts."""
    flat = groups.reshape(-1)
    order = np.argsort(flat, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=count))])
    return np.repeat(ids, groups.shape[1])[order], starts


def _greedy(edges: _Edges, count: int, fixed: int) -> np.ndarray:
    """Corpus order: a decided row is kept unless an earlier kept row shares an edge with it."""
    keep = np.ones(count, dtype=bool)
    for number in range(edges.buckets):
        pairs = edges.bucket(number)
        if not len(pairs):
            continue
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
        rows, starts = np.unique(pairs[:, 0], return_index=True)
        ends = np.append(starts[1:], len(pairs))
        earlier = pairs[:, 1]
        for row, low, high in zip(rows.tolist(), starts.tolist(), ends.tolist()):
            if keep[earlier[low:high]].any():
                keep[row] = False
    return keep


def near_dup_keep(source, threshold: float, *, fixed: int = 0, work_dir: str | Path | None = None,
                  params: NearDupParams = NearDupParams()) -> tuple[np.ndarray, NearDupStats]:
    """Keep mask of rows [fixed, len(source)) of `source` (an array or memory map of unit vectors, or a
    ConcatRows over several): rows before `fixed` count as kept already (an index's rows, for add).
    Scratch files go in a temporary folder under `work_dir` (removed after)."""
    threshold = check_threshold(threshold)
    count = len(source)
    stats = NearDupStats(threshold, seen=count - fixed)
    if count - fixed <= 0:
        return np.zeros(0, dtype=bool), stats
    n_cells = 1 if count <= params.small_rows else max(1, count // params.cell_rows)
    if n_cells == 1:
        cells = CoarseCells(np.ones((1, source.shape[1]), np.float32), np.ones((1, source.shape[1]), np.float32),
                            np.asarray([0, 1], np.int64))
    else:
        cells = train_cells(source, n_cells, params.seed)
    with tempfile.TemporaryDirectory(prefix=".near-dup-", dir=work_dir) as folder:
        files = _CellFiles(Path(folder), cells.count, count, count - fixed, params.probes, params.homes)
        _assign(source, cells, files, fixed, params)
        files.sort(fixed)
        edges = _Edges(Path(folder), count)
        _cell_edges(source, files, edges, threshold, params)
        keep = _greedy(edges, count, fixed)[fixed:]
        del files
    stats.dropped = int((~keep).sum())
    stats.pairs, stats.split = edges.pairs, edges.split
    stats.method = "exact" if cells.count == 1 else \
        f"cells(n={cells.count}, homes={params.homes}, probes={params.probes}) exact within cells"
    return keep, stats


def near_dup_mask(vectors: np.ndarray, threshold: float, *, params: NearDupParams = NearDupParams(),
                  work_dir: str | Path | None = None) -> tuple[np.ndarray, NearDupStats]:
    """Keep mask of the whole array (rows in corpus order)."""
    return near_dup_keep(vectors, threshold, params=params, work_dir=work_dir)


class RowWindow:
    """Rows [start, stop) of a row array, gathered by id without reading the window whole (an int8 index's
    rows slice into a dequantised copy)."""

    def __init__(self, base, start: int, stop: int) -> None:
        self.base, self.start = base, int(start)
        self.shape = (int(stop) - int(start), int(base.shape[1]))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids) -> np.ndarray:
        if isinstance(ids, slice):
            ids = np.arange(*ids.indices(len(self)))
        return np.asarray(self.base[np.asarray(ids, np.int64) + self.start], np.float32)


def text_shard_blocks(writer) -> list[tuple[int, np.ndarray]]:
    """(shard number, memory-mapped MiniLM rows) of the committed text-keyed shards, in corpus order."""
    from img2prompt.index.layout import TEXT_KEYS, shard_path

    return [(record["number"], np.load(shard_path(writer.root, record["number"], "minilm"), mmap_mode="r"))
            for record in writer._ordered_records() if record.get("keys", TEXT_KEYS) == TEXT_KEYS]


def shard_keep_masks(writer, threshold: float, before=None) -> tuple[dict[int, np.ndarray], NearDupStats]:
    """{shard: keep mask} of the committed text-keyed MiniLM shards in corpus order (first kept wins), each
    also checked against the rows of `before` (an index's text MiniLM rows, for add: all count as kept).
    Recomputed from the committed shards on every run, so a resumed build makes the identical decisions."""
    blocks = text_shard_blocks(writer)
    threshold = check_threshold(threshold)
    if not blocks:
        return {}, NearDupStats(threshold)
    parts = ([before] if before is not None and len(before) else []) + [block for _, block in blocks]
    fixed = len(before) if before is not None else 0
    try:
        keep, stats = near_dup_keep(concat_rows(parts), threshold, fixed=fixed, work_dir=writer.root)
    except BadRow as exc:
        row = exc.row - fixed
        if row < 0:
            raise UserError(f"near-dup: the index's MiniLM row {exc.row} is NaN or zero: the index is damaged, "
                            "rebuild it") from None
        for number, block in blocks:
            if row < len(block):
                raise UserError(f"shard {number}: near-dup: row {row} has a NaN or zero MiniLM vector") from None
            row -= len(block)
        raise
    masks, start = {}, 0
    for number, block in blocks:
        masks[number] = keep[start:start + len(block)]
        start += len(block)
    return masks, stats
