"""Exact search over the index's own float16 vectors (clip.f16): no second copy of them on disk.

On CPU the vectors stream once per call, whatever the number of queries (corpus chunk outer, query batches
inner): index/chunks.py converts each chunk into a reused float32 buffer in this thread while the kernel reads
the next chunks of the file ahead (advice, no second CPU thread beside BLAS's); index/topk.py scores each (query batch × row tile) with the kernel
measured fastest for the batch size (BLAS matmul into a reused score buffer + a threshold select against each
query's running k-th score, or faiss.knn) and keeps each query's running top-k. Memory: one chunk buffer,
one score tile, the top-k state. On a GPU the same kind loads as the torch backend, see index/torch_exact.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from img2prompt.index.backend import QUERY_BATCH, SearchBackend, backend_class
from img2prompt.index.chunks import float32_chunks
from img2prompt.index.topk import RunningTopK, choose_kernel, score_block

SCAN_BYTES = 64 * 2**20  # the float32 chunk buffer
SCORE_BYTES = 16 * 2**20  # one query batch × row tile of float32 scores
SCAN_CHUNK: int | None = None  # rows per chunk; None: SCAN_BYTES' worth (tests set a tiny one)


def chunk_rows(dim: int) -> int:
    return SCAN_CHUNK or max(1, SCAN_BYTES // (4 * dim))


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int | None = None,
                 query_batch: int = QUERY_BATCH, kernel: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over (memory-mapped) vectors: the ground truth. One pass over the vectors for
    any number of queries. Best first; equal scores in row order. `kernel` forces "blas" or "faiss"."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    count, dim = len(vectors), int(vectors.shape[1])
    k = min(k, count)
    if len(queries) == 0 or k == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    rows = chunk or chunk_rows(dim)
    batches = [queries[first:first + query_batch] for first in range(0, len(queries), query_batch)]
    states = [RunningTopK(len(batch), k) for batch in batches]
    tiles = [max(1, min(rows, count, SCORE_BYTES // (4 * len(batch)))) for batch in batches]
    kernels = [kernel or choose_kernel(len(batch), dim, k, tile, float(len(batch)) * count * dim)
               for batch, tile in zip(batches, tiles)]
    cells = max(len(batch) * min(tile, rows, count) for batch, tile in zip(batches, tiles))
    score_buffer = np.empty(cells, dtype=np.float32)
    mask_buffer = np.empty(cells, dtype=bool)
    for start, block in float32_chunks(vectors, rows):
        for batch, state, tile, name in zip(batches, states, tiles, kernels):
            for low in range(0, len(block), tile):
                score_block(name, batch, block[low:low + tile], start + low, state, score_buffer, mask_buffer)
    return (np.concatenate([state.scores for state in states]), np.concatenate([state.ids for state in states]))


class FlatBackend(SearchBackend):
    kind = "flat"

    @classmethod
    def estimate_bytes(cls, count: int, dim: int, params: dict) -> int:
        chunk = min(count, chunk_rows(dim)) * dim * 4
        return chunk + SCORE_BYTES * 5 // 4  # the chunk buffer, a score tile and its mask; keys are mapped

    @classmethod
    def load(cls, root: Path, vectors: np.ndarray, params: dict, device: str = "cpu") -> SearchBackend:
        if str(device).startswith("cuda"):
            return backend_class("torch").load(root, vectors, params, device)
        return cls(vectors, params)

    def _search(self, queries, k, settings):
        return exact_search(self.vectors, queries, k)
