"""Search backends at scale on synthetic clustered vectors: build time, search QPS and recall@10 (against exact
search, on held-out queries pushed off the indexed manifold and on in-index queries), flat vs HNSW vs IVF-PQ
vs torch exact, each through the backend code `build`/`submit` use (index/plan.py, index/backend.py,
index/recall.py; approximate kinds re-rank exactly).

    python bench/ann_search.py --count 1000000 --dim 512
    python bench/ann_search.py --count 1000000 --dim 768 --kinds flat torch --device cuda
--device: where the torch backend runs (cuda: fp16 vectors resident on the GPU; cpu: float32) and where
approximate kinds are loaded (IVF-PQ moves to the GPU only with faiss-gpu installed; flat and HNSW stay
on the CPU). The torch row's recall is measured against exact search, not assumed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import add_device_flag, check_device, clustered, held_out_queries, synchronize

K = 10


def qps(backend, queries: np.ndarray, device: str) -> tuple[float, np.ndarray]:
    backend.search(queries[:min(len(queries), 64)], K)  # warm-up (first CUDA kernels, FAISS threads)
    synchronize(device)
    started = time.perf_counter()
    ids = backend.search(queries, K)[1]
    synchronize(device)
    return len(queries) / (time.perf_counter() - started), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", nargs="+", default=["flat", "torch", "hnsw", "ivfpq"],
                        choices=["flat", "torch", "hnsw", "ivfpq"])
    add_device_flag(parser)
    args = parser.parse_args()
    check_device(args.device)
    import faiss

    from img2prompt.index.backend import backend_class
    from img2prompt.index.flat import exact_search
    from img2prompt.index.plan import plan_index
    from img2prompt.index.recall import RECALL_TARGET, measure_recall, recall_at_k, recall_queries

    print(f"{args.count:,} clustered vectors, dim {args.dim}, {args.queries} queries, k {K}, "
          f"{faiss.omp_get_max_threads()} FAISS threads, device {args.device}")
    vectors = clustered(args.count, args.dim)
    queries = held_out_queries(vectors, args.queries)
    print(f"{'index':>6} {'search setting':>26} {'build s':>8} {'memory MiB':>11} {'QPS (k=10)':>11} "
          f"{'recall held-out':>16} {'in-index':>9}", flush=True)
    with tempfile.TemporaryDirectory() as root:
        for kind in args.kinds:
            started = time.perf_counter()
            if kind == "torch":  # not in plan_index's table: flat loads as torch on a GPU
                cls = backend_class("torch")
                backend = cls(vectors, {}, device=args.device)
                memory = cls.estimate_bytes(args.count, args.dim, {})
            else:
                plan = plan_index(args.count, args.dim, kind)
                folder = Path(root) / kind
                folder.mkdir()
                backend = backend_class(kind).build(vectors, plan.params, folder, seed=0)
                if kind == "ivfpq" and args.device != "cpu":  # moves to the GPU with faiss-gpu only
                    backend = backend_class(kind).load(folder, vectors, backend.params, args.device)
                memory = plan.estimated_bytes
            synchronize(args.device)
            build_s = time.perf_counter() - started
            if kind == "torch":  # exact by design, but fp16 candidate selection on a GPU: measure it
                sets = recall_queries(vectors, args.queries)["report"]
                found = {name: recall_at_k(backend.search(query, K)[1], exact_search(vectors, query, K)[1])
                         for name, query in sets.items()}
                targets = {None: lambda: found}
            else:  # first the plan's defaults, then the setting `build` would choose (tuned to recall >= 0.95)
                targets = {None: lambda: measure_recall(backend, queries=args.queries)}
                if backend.tune_steps:
                    targets[RECALL_TARGET] = lambda: measure_recall(backend, queries=args.queries,
                                                                    target=RECALL_TARGET)
            for target, measure in targets.items():
                recall = measure()  # tuning changes backend.params: measure QPS after each
                rate, _ = qps(backend, queries, args.device)
                if kind == "torch":
                    setting = f"exact {'fp16' if args.device != 'cpu' else 'fp32'} {args.device}"
                elif not backend.tune_steps:
                    setting = "exact (faiss-cpu)"
                else:
                    setting = ("tuned " if target else "default ") + ", ".join(
                        f"{key} {value}" for key, value in backend.params.items()
                        if key in ("ef_search", "nprobe", "rerank"))
                print(f"{kind:>6} {setting:>26} {build_s:>8.1f} {memory / 2**20:>11.0f} {rate:>11.0f} "
                      f"{recall['held_out']:>16.3f} {recall['in_index']:>9.3f}", flush=True)
            backend.close()
            del backend


if __name__ == "__main__":
    main()
