"""The search-backend seam: one small interface, one file per index kind.

    kind      file                  searches with
    flat      index/flat.py         exact inner products over clip.f16 (FAISS knn on CPU chunks)
    torch     index/torch_exact.py  exact, fp16 vectors resident on the GPU (matmul + top-k per chunk)
    hnsw      index/hnsw.py         FAISS HNSW, re-ranked exactly
    ivfpq     index/ivfpq.py        FAISS IVF-PQ, re-ranked exactly

A backend is planned (`default_params`, `estimate_bytes`), built (writes its own files atomically), loaded
and searched. Search settings travel with each call and are never stored on the shared object, so one
loaded backend can serve concurrent searches. One call answers all its queries in ONE pass over the stored
vectors (corpus chunk outer, query batches inner, each query's running top-k kept), so 16k queries over a
memory-mapped corpus read it once, not once per batch; memory = one chunk + one score block + the top-k state.
Adding a kind = one new file + one line in BACKENDS.
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

    def grow(self, vectors: np.ndarray, root: Path, progress: Callable[[int], None] | None = None) -> "SearchBackend":
        """This backend over `vectors` -- its own rows, then the rows an add appended -- with the kind's files
        written into `root` atomically. Exact kinds only take the longer array; FAISS kinds add the new rows to
        their trained structure (this backend must be a private copy: its structure is extended)."""
        if progress:
            progress(len(vectors) - self.count)
        return type(self)(vectors, self.params)

    # searching -------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [n, k], ids int64 [n, k]) best first; `params` override the stored settings."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.count)
        if len(queries) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return self._search(queries, k, {**self.params, **(params or {})})

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int, settings: dict) -> tuple[np.ndarray, np.ndarray]:
        """Every float32 query of the call, in one pass over the stored vectors."""

    def close(self) -> None:
        """Release device memory or native resources."""


class RerankedBackend(SearchBackend):
    """An approximate kind: fetch k × rerank candidates, score them exactly from the fp16 vectors, keep k."""

    default_rerank: ClassVar[int] = 8

    def rerank_depth(self, k: int, settings: dict) -> int:
        return min(self.count, k * int(settings.get("rerank", self.default_rerank)))

    def candidate_batch(self, depth: int) -> int:
        per_query = depth * 8  # the int64 candidate ids; their vectors are read later, in file order
        return max(1, min(QUERY_BATCH, RERANK_BATCH_BYTES // max(per_query, 1)))

    def _search(self, queries, k, settings):
        depth = self.rerank_depth(k, settings)
        batch = self.candidate_batch(depth)
        candidate_ids = np.concatenate([self._candidates(queries[start:start + batch], depth, settings)
                                        for start in range(0, len(queries), batch)])
        return rerank_exact(queries, candidate_ids, self.vectors, k)

    @abstractmethod
    def _candidates(self, queries: np.ndarray, depth: int, settings: dict) -> np.ndarray:
        """int64 [n, depth] candidate ids (-1 where the index found fewer)."""


def rerank_exact(queries: np.ndarray, candidate_ids: np.ndarray, vectors: np.ndarray, k: int,
                 chunk_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products for the candidates, best k first; missing candidates (-1) rank last.

    One pass over the needed rows in file order (a memory map is read forwards, each row once however many
    queries want it), `chunk_bytes` of gathered vectors at a time: memory is bounded by the candidate lists,
    never by the corpus."""
    flat_ids = candidate_ids.ravel()
    depth = candidate_ids.shape[1]
    exact = np.full(flat_ids.size, -np.inf, dtype=np.float32)
    wanted = np.flatnonzero(flat_ids >= 0)
    wanted = wanted[np.argsort(flat_ids[wanted], kind="stable")]  # pair positions in file order of their row
    per_chunk = max(1, (chunk_bytes or RERANK_BATCH_BYTES) // (vectors.shape[1] * 4 * 2))
    for start in range(0, len(wanted), per_chunk):
        positions = wanted[start:start + per_chunk]
        rows, inverse = np.unique(flat_ids[positions], return_inverse=True)
        gathered = np.asarray(vectors[rows], dtype=np.float32)[inverse]
        exact[positions] = np.einsum("pd,pd->p", queries[positions // depth], gathered)
    exact = exact.reshape(candidate_ids.shape)
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(candidate_ids, order, axis=1)


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
