"""FAISS IVF-PQ for corpora whose vectors do not fit the memory budget; candidates re-ranked exactly.

Trained on a seeded random sample (corpora are often sorted by source, so the first rows are not
representative). With faiss-gpu installed and a CUDA device, the index moves to GPU `device`'s number;
GPU indexes take no per-call parameters, so there nprobe is set under a lock and k is capped at 2048.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from img2prompt.errors import UserError
from img2prompt.index.backend import RerankedBackend, ivf_list_count
from img2prompt.index.faiss_file import GrowsFaissIndex, add_in_chunks, read_faiss, write_faiss
from img2prompt.index.layout import FAISS

log = logging.getLogger(__name__)

PQ_CHOICES = (96, 64, 48, 32, 24, 16, 12, 8, 4)  # sub-quantisers, most accurate first
GPU_MAX_K = 2048


class IvfPqBackend(GrowsFaissIndex, RerankedBackend):
    kind = "ivfpq"
    min_count = 10_000  # fewer points cannot train a useful quantiser
    # For IVF-PQ the re-rank depth matters as much as nprobe: PQ distances blur near neighbours.
    tune_steps = [{"nprobe": nprobe, "rerank": rerank}
                  for nprobe, rerank in ((32, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256))]

    def __init__(self, vectors, params, index, on_gpu: bool = False, keepalive=None) -> None:
        super().__init__(vectors, params)
        self.index = index
        self._keepalive = keepalive  # native objects (quantizer, GPU resources) the index points into
        self.on_gpu = on_gpu
        self._gpu_lock = threading.Lock()

    @classmethod
    def default_params(cls, count, dim, budget):
        nlist = ivf_list_count(count)
        choices = [m for m in PQ_CHOICES if dim % m == 0]
        for m in choices:
            params = {"nlist": nlist, "m": m, "nbits": 8, "nprobe": min(nlist, 64)}
            if budget is None or cls.estimate_bytes(count, dim, params) <= budget:
                return params
        return {"nlist": nlist, "m": choices[-1], "nbits": 8, "nprobe": min(nlist, 64)}

    @classmethod
    def estimate_bytes(cls, count, dim, params):
        return count * (params["m"] + 8) + params["nlist"] * dim * 4

    @classmethod
    def files(cls):
        return (FAISS,)

    @classmethod
    def build(cls, vectors, params, root: Path, *, seed=0, progress=None):
        import faiss

        count, dim = vectors.shape
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"],
                                 faiss.METRIC_INNER_PRODUCT)
        sample_size = min(count, max(50_000, 64 * params["nlist"]))  # FAISS wants 39–256 per list
        sample_ids = np.sort(np.random.default_rng(seed).choice(count, size=sample_size, replace=False))
        index.train(np.ascontiguousarray(vectors[sample_ids], dtype=np.float32))
        add_in_chunks(index, vectors, progress)
        write_faiss(index, Path(root) / FAISS)
        return cls(vectors, params, index, keepalive=quantizer)

    @classmethod
    def load(cls, root, vectors, params, device="cpu"):
        import faiss

        index = read_faiss(Path(root) / FAISS, len(vectors))
        device = str(device).split(",")[0]  # a device list (exact search splits over it): the IVF takes the first
        device = "cuda:0" if device == "cuda:all" else device
        if device.startswith("cuda") and hasattr(faiss, "StandardGpuResources"):
            number = int(device.partition(":")[2] or 0)
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, number, index)
            log.info("IVF-PQ index moved to GPU %d (faiss-gpu)", number)
            return cls(vectors, params, index, on_gpu=True, keepalive=resources)
        return cls(vectors, params, index)

    def rerank_depth(self, k, settings):
        if self.on_gpu and k > GPU_MAX_K:
            raise UserError(f"k {k} is over what a GPU IVF index returns ({GPU_MAX_K}): use a smaller --k, or "
                            "search on the CPU")
        depth = super().rerank_depth(k, settings)
        return min(depth, GPU_MAX_K) if self.on_gpu else depth

    def _candidates(self, queries, depth, settings):
        import faiss

        nprobe = min(int(settings["nprobe"]), int(self.params["nlist"]))
        if self.on_gpu:
            with self._gpu_lock:  # GPU indexes only take nprobe as state (extract_index_ivf is CPU-only)
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
                return self.index.search(queries, depth)[1]
        return self.index.search(queries, depth, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]
