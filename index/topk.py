"""Each query's running top-k over scored row blocks, and the scoring kernel chosen by measurement.

Order: score descending, then row id ascending (what a stable sort of a brute-force score matrix gives).
Blocks arrive in increasing row order, so once a query's list is full only scores strictly above its k-th
can enter: one vectorised comparison of the block replaces a per-row selection (argpartition or a heap),
and the few rows that pass are merged with one lexsort. A tie with the k-th stays out (its id is larger).

Three kernels score a block:
    blas       numpy matmul queries @ block.T into a reused float32 [n, rows] buffer, then the threshold select
    blas_rows  the same product as block @ queries.T into [rows, n] (OpenBLAS is faster this way round for
               16-256 queries, slower for 1, on this machine), the same select
    faiss      faiss.knn on the block (its own BLAS + heap), its top-k merged the same way
`choose_kernel` times them once per process for each query-batch size (a power-of-two bucket), dim and tile
(up to CALIBRATION_ROWS rows) on a synthetic block, and keeps the faster: measured, not assumed (faiss.knn measured 2–7× slower than the matmul
for 1–256 queries on this machine when the issue was filed). KERNEL_TIMINGS keeps what was measured.
"""
from __future__ import annotations

import time

import numpy as np

CALIBRATION_PASSES = 3  # blocks each kernel scores when timed (the first fills the lists)
CALIBRATION_PAYBACK = 10  # a search measures the kernels only if it does 10× the measurement's work
CALIBRATION_ROWS = 4_096  # at most this many rows in the timed block (the tile's own size when smaller)
KERNELS = ("blas", "blas_rows", "faiss")
LANE_KERNELS = ("blas", "blas_rows")  # a scan in lanes (one matmul per core): no faiss, see choose_kernel
KERNEL_TIMINGS: dict[tuple, dict[str, float]] = {}  # (batch bucket, dim, k, tile rows) → kernel → seconds


class RunningTopK:
    """The best k (score desc, id asc) of n queries over blocks of rows met in increasing id order."""

    def __init__(self, n: int, k: int) -> None:
        self.k = k
        self.scores = np.full((n, k), -np.inf, dtype=np.float32)
        self.ids = np.full((n, k), -1, dtype=np.int64)
        self.seen = 0  # rows met so far by every query
        self.mask: np.ndarray | None = None  # add_scores' comparison buffer

    def add_scores(self, scores: np.ndarray, first_row: int, by_row: bool = False) -> None:
        """Merge a [n, rows] score block (by_row: [rows, n]) for rows first_row, first_row + 1, ... (all after
        the rows met so far)."""
        per_query = scores.T if by_row else scores
        n, rows = per_query.shape
        if self.seen >= self.k:  # full lists: only a score above the k-th can enter
            self.seen += rows
            kth = np.ascontiguousarray(self.scores[:, -1])  # broadcast along every row: strided is 2× slower
            if by_row:  # [rows, n]: one comparison of every cell (a per-query max down columns is slower)
                if self.mask is None or self.mask.size < scores.size:
                    self.mask = np.empty(scores.size, dtype=bool)  # reused: a fresh mask per tile costs 2×
                mask = self.mask[:scores.size].reshape(scores.shape)
                np.greater(scores, kth, out=mask)
                row, first = np.divmod(np.flatnonzero(mask), n)
                block, query = per_query, first
            else:  # each query's best first: most have none above their k-th late in a scan, and a max per
                # query costs less than a mask over every cell (0.26 vs 0.66 ms a 256 × 4,096 tile)
                hit = np.flatnonzero(per_query.max(axis=1) > kth)
                if len(hit) == 0:
                    return
                block = per_query[hit]
                first, row = np.divmod(np.flatnonzero(block > kth[hit, None]), rows)
                query = hit[first]
            # flat indices, then (row, column): np.nonzero of a 2-D mask measured 8× slower (9.7 vs 1.2 ms a tile)
            if len(first):
                self.merge(query, block[first, row], row + first_row)
            return
        # the block's own top min(k, rows), ties at its boundary kept (the merge orders them by id)
        kept = min(self.k, rows)
        floor = np.partition(per_query, rows - kept, axis=1)[:, rows - kept]
        query, row = np.nonzero(per_query >= floor[:, None])
        if len(query):
            self.merge(query, per_query[query, row], row + first_row)
        self.seen += rows

    def add_top(self, scores: np.ndarray, ids: np.ndarray, rows: int) -> None:
        """Merge a block's own top lists ([n, m] scores and global ids, -1 = none) over `rows` rows."""
        query, column = np.nonzero(ids >= 0)
        if len(query):
            self.merge(query, scores[query, column], ids[query, column])
        self.seen += rows

    def merge(self, query: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
        """Candidates (query, score, id), in any order, merged into those queries' lists."""
        touched, counts = np.unique(query, return_counts=True)
        k = self.k
        all_query = np.concatenate([np.repeat(touched, k), query])
        all_scores = np.concatenate([self.scores[touched].ravel(), scores])
        all_ids = np.concatenate([self.ids[touched].ravel(), ids])
        order = np.lexsort((np.where(all_ids < 0, np.iinfo(np.int64).max, all_ids), -all_scores, all_query))
        starts = np.concatenate([[0], np.cumsum(counts + k)[:-1]])
        picks = order[starts[:, None] + np.arange(k)]
        self.scores[touched] = all_scores[picks]
        self.ids[touched] = all_ids[picks]


def score_block(kernel: str, queries: np.ndarray, block: np.ndarray, first_row: int, state: RunningTopK,
                score_buffer: np.ndarray) -> None:
    """Score float32 `block` (rows first_row, ...) against `queries` with `kernel`; merge into `state`."""
    n, rows = len(queries), len(block)
    if kernel == "faiss":
        import faiss

        kept = min(state.k, rows)
        # one more than needed: where it equals the last kept score, a tie crosses the boundary and faiss's
        # pick among the tied rows is its own; those queries' tied rows are all taken from a numpy product
        scores, ids = faiss.knn(queries, block, min(kept + 1, rows), metric=faiss.METRIC_INNER_PRODUCT)
        tied = np.flatnonzero(scores[:, kept - 1] == scores[:, -1]) if kept < rows else np.zeros(0, np.int64)
        ids = np.where(ids >= 0, ids + first_row, -1)
        ids[tied] = -1
        for query in tied:
            exact = block @ queries[query]
            rows_in = np.flatnonzero(exact >= scores[query, kept - 1])
            state.merge(np.full(len(rows_in), query), exact[rows_in], rows_in + first_row)
        state.add_top(scores[:, :kept], ids[:, :kept], rows)
        return
    if kernel == "blas_rows":  # [rows, n]: the faster orientation of OpenBLAS for some batch sizes
        scores = score_buffer[:n * rows].reshape(rows, n)
        np.matmul(block, queries.T, out=scores)
    else:
        scores = score_buffer[:n * rows].reshape(n, rows)
        np.matmul(queries, block.T, out=scores)
    state.add_scores(scores, first_row, by_row=kernel == "blas_rows")


def bucket(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def choose_kernel(n: int, dim: int, k: int, rows: int, work: float, lanes: bool = False) -> str:
    """The faster kernel for a batch of n queries at `dim` on `rows`-row tiles (measured once per process and
    bucket). A search doing less than CALIBRATION_PAYBACK× the measurement's own work takes "blas" unmeasured.
    lanes: the scan runs one single-threaded matmul per core (timed so, by the caller's BLAS setting); faiss
    is left out there, its OpenMP pool in every lane would put two threads on each core."""
    kernels = LANE_KERNELS if lanes else KERNELS
    key = (bucket(n), dim, min(k, 1024), min(rows, CALIBRATION_ROWS)) + (("lanes",) if lanes else ())
    if key not in KERNEL_TIMINGS:
        if work < CALIBRATION_PAYBACK * CALIBRATION_PASSES * len(kernels) * key[0] * key[3] * dim:
            return "blas"
        if "faiss" in kernels:
            try:
                import faiss  # noqa: F401
            except ImportError:
                kernels = LANE_KERNELS
        KERNEL_TIMINGS[key] = time_kernels(*key[:4], kernels=kernels)
    timings = KERNEL_TIMINGS[key]
    return min(timings, key=timings.get)


def time_kernels(n: int, dim: int, k: int, rows: int, kernels: tuple[str, ...] = KERNELS) -> dict[str, float]:
    """Seconds per block for each kernel over synthetic vectors: a first block fills the lists, then the best
    of two threshold passes (what nearly every block of a long scan is)."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((rows, dim), dtype=np.float32)
    queries = rng.standard_normal((n, dim), dtype=np.float32)
    score_buffer = np.empty(n * rows, dtype=np.float32)
    timings = {}
    for kernel in kernels:
        state = RunningTopK(n, min(k, rows))
        score_block(kernel, queries, block, 0, state, score_buffer)
        best = float("inf")
        for first in range(1, CALIBRATION_PASSES):
            started = time.perf_counter()
            score_block(kernel, queries, block, first * rows, state, score_buffer)
            best = min(best, time.perf_counter() - started)
        timings[kernel] = best
    return timings
