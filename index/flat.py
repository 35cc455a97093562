"""Exact search over the index's own float16 vectors (clip.f16): no second copy of them on disk.

On CPU the vectors stream from the memory map in chunks (converted to float32 a chunk at a time, so memory
stays bounded at any corpus size) and FAISS's knn scores each chunk; per-chunk top-k lists are merged. On a
GPU the same kind loads as the torch backend (vectors resident on the device), see index/torch_exact.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from img2prompt.index.backend import QUERY_BATCH, SearchBackend, backend_class, merge_top_k

SCAN_CHUNK = 65_536  # rows converted to float32 at a time: 192 MiB at 768-d


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = SCAN_CHUNK,
                 query_batch: int = QUERY_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over (memory-mapped) vectors: the ground truth. One pass over the vectors for
    any number of queries: each chunk is converted once and scored against every query batch in turn."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(vectors))
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        block = np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32)
        for first in range(0, len(queries), query_batch):
            rows = slice(first, first + query_batch)
            scores, ids = faiss.knn(queries[rows], block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            best_scores[rows], best_ids[rows] = merge_top_k(best_scores[rows], best_ids[rows], scores, ids + start, k)
    return best_scores, best_ids


class FlatBackend(SearchBackend):
    kind = "flat"

    @classmethod
    def estimate_bytes(cls, count: int, dim: int, params: dict) -> int:
        return min(count, SCAN_CHUNK) * dim * 4  # one float32 chunk; the vectors themselves are mapped

    @classmethod
    def load(cls, root: Path, vectors: np.ndarray, params: dict, device: str = "cpu") -> SearchBackend:
        if str(device).startswith("cuda"):
            return backend_class("torch").load(root, vectors, params, device)
        return cls(vectors, params)

    def _search(self, queries, k, settings):
        return exact_search(self.vectors, queries, k)
