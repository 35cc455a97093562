"""The search-backend seam: one small interface, one file per index kind.

    kind      file                  searches with
    flat      index/flat.py         exact inner products over clip.f16 (FAISS knn on CPU chunks)
    torch     index/torch_exact.py  exact, fp16 vectors resident on the GPU (matmul + top-k per chunk)
    hnsw      index/hnsw.py         FAISS HNSW, re-ranked exactly
    ivfpq     index/ivfpq.py        FAISS IVF-PQ, re-ranked exactly

A backend is planned (`default_params`, `estimate_bytes`), built (writes its own files atomically), loaded
and searched. Search settings travel with each call and are never stored on the shared object, so one
loaded backend can serve concurrent searches; queries go through in bounded batches, so memory does not
grow with the number of queries. Adding a kind = one new file + one line in BACKENDS.
"""
from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

QUERY_BATCH = 1024  # queries per batch for exact search
RERANK_BATCH_BYTES = 256 * 2**20  # bound on the gathered candidate vectors of one approximate batch

# kind → "module:Class", imported on first use (faiss and torch only load when a kind needs them)
BACKENDS = {
    "flat": "img2prompt.index.flat:FlatBackend",
    "torch": "img2prompt.index.torch_exact:TorchExactBackend",
    "hnsw": "img2prompt.index.hnsw:HnswBackend",
    "ivfpq": "img2prompt.index.ivfpq:IvfPqBackend",
}


def backend_class(kind: str) -> type["SearchBackend"]:
    module, _, name = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


class SearchBackend(ABC):
    """Top-k inner-product search over the index's CLIP vectors (L2-normalised, row i = prompt id i)."""

    kind: ClassVar[str]
    min_count: ClassVar[int] = 1  # fewer vectors than this: the kind is not usable
    tune_steps: ClassVar[list[dict]] = []  # search settings tried in order to reach a recall target

    def __init__(self, vectors: np.ndarray, params: dict) -> None:
        self.vectors = vectors  # float16 [count, dim] (memory-mapped): exact re-rank and ground truth
        self.params = dict(params)  # stored settings; a call's own settings override them for that call

    @property
    def count(self) -> int:
        return len(self.vectors)

    # planning -------------------------------------------------------------------------------------------
    @classmethod
    def default_params(cls, count: int, dim: int, budget: int | None) -> dict:
        return {}

    @classmethod
    @abstractmethod
    def estimate_bytes(cls, count: int, dim: int, params: dict) -> int:
        """Memory the loaded index needs beyond the memory-mapped vectors."""

    # building and loading --------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, params: dict, root: Path, *, seed: int = 0,
              progress: Callable[[int], None] | None = None) -> "SearchBackend":
        """Build over `vectors` and write the kind's own files into `root` atomically (exact kinds: none)."""
        if progress:
            progress(len(vectors))
        return cls(vectors, params)

    @classmethod
    def files(cls) -> tuple[str, ...]:
        """Names of the files this kind writes into the index folder (recorded in the manifest)."""
        return ()

    @classmethod
    def load(cls, root: Path, vectors: np.ndarray, params: dict, device: str = "cpu") -> "SearchBackend":
        return cls(vectors, params)

    # searching -------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [n, k], ids int64 [n, k]) best first; `params` override the stored settings."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.count)
        settings = {**self.params, **(params or {})}
        batch = self.batch_size(k, settings, queries.shape[1])
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), batch):
            scores[start:start + batch], ids[start:start + batch] = self._search_batch(
                queries[start:start + batch], k, settings)
        return scores, ids

    def batch_size(self, k: int, settings: dict, dim: int) -> int:
        return QUERY_BATCH

    @abstractmethod
    def _search_batch(self, queries: np.ndarray, k: int, settings: dict) -> tuple[np.ndarray, np.ndarray]:
        """One bounded batch of float32 queries."""

    def close(self) -> None:
        """Release device memory or native resources."""


class RerankedBackend(SearchBackend):
    """An approximate kind: fetch k × rerank candidates, score them exactly from the fp16 vectors, keep k."""

    default_rerank: ClassVar[int] = 8

    def rerank_depth(self, k: int, settings: dict) -> int:
        return min(self.count, k * int(settings.get("rerank", self.default_rerank)))

    def batch_size(self, k: int, settings: dict, dim: int) -> int:
        per_query = self.rerank_depth(k, settings) * dim * 4  # the gathered float32 candidate vectors
        return max(1, min(QUERY_BATCH, RERANK_BATCH_BYTES // max(per_query, 1)))

    def _search_batch(self, queries, k, settings):
        candidate_ids = self._candidates(queries, self.rerank_depth(k, settings), settings)
        return rerank_exact(queries, candidate_ids, self.vectors, k)

    @abstractmethod
    def _candidates(self, queries: np.ndarray, depth: int, settings: dict) -> np.ndarray:
        """int64 [n, depth] candidate ids (-1 where the index found fewer)."""


def rerank_exact(queries: np.ndarray, candidate_ids: np.ndarray, vectors: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products for the candidates, best k first; missing candidates (-1) rank last."""
    safe = np.where(candidate_ids < 0, 0, candidate_ids)
    order_in_file = np.argsort(safe.ravel(), kind="stable")  # sorted reads are kinder to a memmap
    gathered = np.empty((safe.size, vectors.shape[1]), dtype=np.float32)
    gathered[order_in_file] = vectors[safe.ravel()[order_in_file]]
    exact = np.einsum("qd,qcd->qc", queries, gathered.reshape(*safe.shape, -1))
    exact[candidate_ids < 0] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, axis=1).astype(np.float32), np.take_along_axis(candidate_ids, order, axis=1)


def merge_top_k(best_scores: np.ndarray, best_ids: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge two per-row top lists into one top-k (ties keep the earlier list's order)."""
    merged_scores = np.concatenate([best_scores, scores], axis=1)
    merged_ids = np.concatenate([best_ids, ids], axis=1)
    order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(merged_scores, order, axis=1), np.take_along_axis(merged_ids, order, axis=1)


def ivf_list_count(count: int) -> int:
    nlist = int(min(65_536, max(16, 4 * math.sqrt(count))))
    return min(nlist, max(1, count // 39))  # FAISS wants ≥39 training points per centroid
