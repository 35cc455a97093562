"""Each query's running top-k over scored row blocks, and the scoring kernel chosen by measurement.

Order: score descending, then row id ascending (what a stable sort of a brute-force score matrix gives).
Blocks arrive in increasing row order, so once a query's list is full only scores strictly above its k-th
can enter: one vectorised comparison of the block replaces a per-row selection (argpartition or a heap),
and the few rows that pass are merged with one lexsort. A tie with the k-th stays out (its id is larger).

Two kernels score a block:
    blas   numpy matmul into a reused float32 buffer (OpenBLAS sgemm), then the threshold select
    faiss  faiss.knn on the block (its own BLAS + heap), its top-k merged the same way
`choose_kernel` times both once per process for each query-batch size (a power-of-two bucket) and dim on a
synthetic block, and keeps the faster: measured, not assumed (faiss.knn measured 2–7× slower than the matmul
for 1–256 queries on this machine when the issue was filed). KERNEL_TIMINGS keeps what was measured.
"""
from __future__ import annotations

import time

import numpy as np

CALIBRATION_ROWS = 8_192  # rows of the synthetic block each kernel is timed on
CALIBRATION_MIN_WORK = 4e9  # multiply-adds below which a search does not pay for a calibration: blas
KERNELS = ("blas", "faiss")
KERNEL_TIMINGS: dict[tuple[int, int, int], dict[str, float]] = {}  # (batch bucket, dim, k) → kernel → seconds


class RunningTopK:
    """The best k (score desc, id asc) of n queries over blocks of rows met in increasing id order."""

    def __init__(self, n: int, k: int) -> None:
        self.k = k
        self.scores = np.full((n, k), -np.inf, dtype=np.float32)
        self.ids = np.full((n, k), -1, dtype=np.int64)
        self.seen = 0  # rows met so far by every query

    def add_scores(self, scores: np.ndarray, first_row: int, mask_buffer: np.ndarray) -> None:
        """Merge a [n, rows] score block for rows first_row, first_row + 1, ... (all after the rows met)."""
        n, rows = scores.shape
        if self.seen >= self.k:  # full lists: only a score above the k-th can enter
            mask = mask_buffer[:n * rows].reshape(n, rows)
            np.greater(scores, self.scores[:, -1:], out=mask)
        else:  # the block's own top min(k, rows), ties at its boundary kept (the merge orders them by id)
            kept = min(self.k, rows)
            mask = scores >= np.partition(scores, rows - kept, axis=1)[:, rows - kept:rows - kept + 1]
        query, row = np.nonzero(mask)
        if len(query):
            self.merge(query, scores[query, row], row + first_row)
        self.seen += rows

    def add_top(self, scores: np.ndarray, ids: np.ndarray, rows: int) -> None:
        """Merge a block's own top lists ([n, m] scores and global ids, -1 = none) over `rows` rows."""
        query, column = np.nonzero(ids >= 0)
        if len(query):
            self.merge(query, scores[query, column], ids[query, column])
        self.seen += rows

    def merge(self, query: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
        """Candidates (query, score, id), query ascending, merged into those queries' lists."""
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
                score_buffer: np.ndarray, mask_buffer: np.ndarray) -> None:
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
    scores = score_buffer[:n * rows].reshape(n, rows)
    np.matmul(queries, block.T, out=scores)
    state.add_scores(scores, first_row, mask_buffer)


def bucket(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def choose_kernel(n: int, dim: int, k: int, work: float) -> str:
    """The faster kernel for a batch of n queries at `dim` (measured once per process and bucket)."""
    if work < CALIBRATION_MIN_WORK:
        return "blas"
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "blas"
    key = (bucket(n), dim, min(k, 1024))
    if key not in KERNEL_TIMINGS:
        KERNEL_TIMINGS[key] = time_kernels(*key)
    timings = KERNEL_TIMINGS[key]
    return min(timings, key=timings.get)


def time_kernels(n: int, dim: int, k: int) -> dict[str, float]:
    """Seconds per block for each kernel, the best of two runs, over synthetic unit vectors."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((CALIBRATION_ROWS, dim), dtype=np.float32)
    queries = rng.standard_normal((n, dim), dtype=np.float32)
    score_buffer = np.empty(n * CALIBRATION_ROWS, dtype=np.float32)
    mask_buffer = np.empty(n * CALIBRATION_ROWS, dtype=bool)
    timings = {}
    for kernel in KERNELS:
        best = float("inf")
        for _ in range(2):
            state = RunningTopK(n, min(k, CALIBRATION_ROWS))
            started = time.perf_counter()
            for first in (0, CALIBRATION_ROWS):  # a full list and a threshold pass, as in a long scan
                score_block(kernel, queries, block, first, state, score_buffer, mask_buffer)
            best = min(best, time.perf_counter() - started)
        timings[kernel] = best
    return timings
