"""FAISS HNSW over the CLIP vectors, candidates re-ranked exactly. No GPU version exists in FAISS."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from img2prompt.index.backend import RerankedBackend
from img2prompt.index.faiss_file import GrowsFaissIndex, add_in_chunks, read_faiss, write_faiss
from img2prompt.index.layout import FAISS

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128


class HnswBackend(GrowsFaissIndex, RerankedBackend):
    kind = "hnsw"
    tune_steps = [{"ef_search": ef} for ef in (128, 256, 512, 1024, 2048, 4096)]

    def __init__(self, vectors: np.ndarray, params: dict, index) -> None:
        super().__init__(vectors, params)
        self.index = index

    @classmethod
    def default_params(cls, count, dim, budget):
        return {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}

    @classmethod
    def estimate_bytes(cls, count, dim, params):
        return count * (dim * 4 + params.get("M", HNSW_M) * 2 * 4 + 16)

    @classmethod
    def files(cls):
        return (FAISS,)

    @classmethod
    def build(cls, vectors, params, root: Path, *, seed=0, progress=None):
        import faiss

        index = faiss.IndexHNSWFlat(vectors.shape[1], params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        add_in_chunks(index, vectors, progress)
        write_faiss(index, Path(root) / FAISS)
        return cls(vectors, params, index)

    @classmethod
    def load(cls, root, vectors, params, device="cpu"):
        return cls(vectors, params, read_faiss(Path(root) / FAISS, len(vectors)))

    def _candidates(self, queries, depth, settings):
        import faiss

        # Per-call parameters: the shared index object is never reconfigured by a search.
        search_params = faiss.SearchParametersHNSW(efSearch=max(int(settings["ef_search"]), depth))
        return self.index.search(queries, depth, params=search_params)[1]
