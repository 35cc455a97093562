"""Exact search over the index's own float16 vectors (clip.f16): no second copy of them on disk.

On CPU the vectors stream once per call, whatever the number of queries (corpus chunk outer, query batches
inner), in lanes: one scanning thread per BLAS thread (numpy's count: OMP/OPENBLAS_NUM_THREADS=1 gives one),
each claiming the next chunk, converting it into its own float32 buffer (index/chunks.py, while the kernel reads
the file ahead) and scoring it with a one-thread matmul into its own top-k lists, merged at the end. A
matmul per core instead of one over both cores lets one lane's cast and top-k select overlap the other's
matmul instead of leaving BLAS's second thread waiting (in RAM, 1M × 768: 16 queries 1.76× → 2.79× of faiss,
256 queries 0.85× → 0.89–0.95×; bench/RESULTS.md "Exact scan in lanes"). index/topk.py scores each (query batch × row tile) with the kernel
measured fastest for the batch size (BLAS matmul into a reused score buffer + a threshold select against each
query's running k-th score, or faiss.knn in one lane) and keeps each query's running top-k. Memory per lane:
one chunk buffer, one score tile, the top-k lists. On a GPU the same kind loads as the torch backend, see
index/torch_exact.py.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from img2prompt.index.backend import QUERY_BATCH, SearchBackend, backend_class
from img2prompt.index.blas_threads import blas_threads, one_blas_thread
from img2prompt.index.chunks import ChunkQueue
from img2prompt.index.topk import RunningTopK, choose_kernel, score_block

SCAN_BYTES = 24 * 2**20  # one lane's float32 chunk buffer (fits the 32 MiB L3 beside the score tile)
SCORE_BYTES = 16 * 2**20  # one query batch × row tile of float32 scores (one lane: BLAS on every core)
LANE_SCORE_BYTES = 4 * 2**20  # the same in a lane: a one-thread matmul ran 83 GFLOP/s on 4,096 rows × 256
                              # queries, 61 on 8,192 (its tiles then spill the L2; bench/RESULTS.md)
SCAN_CHUNK: int | None = None  # rows per chunk; None: SCAN_BYTES' worth (tests set a tiny one)
SCAN_LANES: int | None = None  # scanning threads; None: numpy's BLAS thread count (tests force one)


def chunk_rows(dim: int) -> int:
    return SCAN_CHUNK or max(1, SCAN_BYTES // (4 * dim))


def scan_lanes(chunks: int) -> int:
    """Lanes for a scan of `chunks` chunks: as many as BLAS has threads (so OMP/OPENBLAS_NUM_THREADS=1 gives
    one), never more than the chunks."""
    return 1 if chunks <= 1 else max(1, min(SCAN_LANES or blas_threads(), chunks))


@dataclass
class _Plan:
    """What every lane of one search scores: the query batches, their row tiles and kernels."""
    batches: list[np.ndarray]
    tiles: list[int]
    kernels: list[str]
    k: int

    def scan(self, chunks) -> list[RunningTopK]:
        """Each batch's top-k over the chunks this lane is handed (in increasing row order)."""
        states = [RunningTopK(len(batch), self.k) for batch in self.batches]
        cells = max(len(batch) * tile for batch, tile in zip(self.batches, self.tiles))
        score_buffer = np.empty(cells, dtype=np.float32)
        for start, block in chunks:
            for batch, state, tile, name in zip(self.batches, states, self.tiles, self.kernels):
                for low in range(0, len(block), tile):
                    score_block(name, batch, block[low:low + tile], start + low, state, score_buffer)
        return states


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int | None = None,
                 query_batch: int = QUERY_BATCH, kernel: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over (memory-mapped) vectors: the ground truth. One pass over the vectors for
    any number of queries. Best first; equal scores in row order. `kernel` forces "blas" or "faiss".

    With several BLAS threads the scan runs in lanes: one thread per core, each converting and scoring the
    next unclaimed chunk with a one-thread matmul into its own top-k lists, merged at the end (the same lists:
    a row's rank depends on its score and id only)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    count, dim = len(vectors), int(vectors.shape[1])
    k = min(k, count)
    if len(queries) == 0 or k == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    rows = min(chunk or chunk_rows(dim), count)
    lanes = scan_lanes(-(-count // rows))
    batches = [queries[first:first + query_batch] for first in range(0, len(queries), query_batch)]
    tile_bytes = SCORE_BYTES if lanes == 1 else LANE_SCORE_BYTES
    tiles = [max(1, min(rows, tile_bytes // (4 * len(batch)))) for batch in batches]
    holding = one_blas_thread() if lanes > 1 else contextlib.nullcontext()
    with holding:  # in lanes each matmul runs on one core; the kernels are timed under the same condition
        kernels = [kernel or choose_kernel(len(batch), dim, k, tile, float(len(batch)) * count * dim, lanes > 1)
                   for batch, tile in zip(batches, tiles)]
        plan = _Plan(batches, tiles, kernels, k)
        with ChunkQueue(vectors, rows, lanes) as queue:
            if lanes == 1:
                return _joined(plan.scan(queue.lane()))
            per_lane = _run_lanes([lambda: plan.scan(queue.lane()) for _ in range(lanes)], queue.cancel)
    merged = []
    for number, batch in enumerate(batches):
        state = RunningTopK(len(batch), k)
        for lane in per_lane:
            state.add_top(lane[number].scores, lane[number].ids, lane[number].seen)
        merged.append(state)
    return _joined(merged)


def _run_lanes(work: list, cancel) -> list:
    """Each callable in its own thread; their results in order. On an error the others are cancelled (no
    further chunks handed out) and the first error is raised here."""
    results, errors = [None] * len(work), []

    def run(number: int) -> None:
        try:
            results[number] = work[number]()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            cancel()

    threads = [threading.Thread(target=run, args=(number,), name=f"scan-lane-{number}") for number in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _joined(states: list[RunningTopK]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([state.scores for state in states]), np.concatenate([state.ids for state in states])


class FlatBackend(SearchBackend):
    kind = "flat"

    @classmethod
    def estimate_bytes(cls, count: int, dim: int, params: dict) -> int:
        chunk = min(count, chunk_rows(dim)) * dim * 4
        lanes = scan_lanes(-(-count // max(1, chunk_rows(dim))))
        score = SCORE_BYTES if lanes == 1 else LANE_SCORE_BYTES
        return lanes * (chunk + score)  # each lane's chunk buffer and score tile; the keys are mapped

    @classmethod
    def load(cls, root: Path, vectors: np.ndarray, params: dict, device: str = "cpu") -> SearchBackend:
        if str(device).startswith("cuda"):
            return backend_class("torch").load(root, vectors, params, device)
        return cls(vectors, params)

    def _search(self, queries, k, settings):
        return exact_search(self.vectors, queries, k)
