"""FAISS at scale on synthetic clustered vectors: build time, search QPS and recall@10 (against exact
search, on held-out queries pushed off the indexed manifold and on in-index queries), flat vs HNSW vs
IVF-PQ, each through the same code path `build`/`submit` use (approximate kinds re-rank exactly).

    python bench/ann_search.py --count 1000000 --dim 512
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from img2prompt.index import ann


def clustered(count: int, dim: int, clusters: int = 2000, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((count, dim), dtype=np.float16)
    for start in range(0, count, chunk):
        rows = min(chunk, count - start)
        block = centres[rng.integers(0, clusters, rows)] + 0.6 * rng.standard_normal((rows, dim)).astype(np.float32)
        out[start:start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivfpq"])
    args = parser.parse_args()
    import faiss

    print(f"{args.count:,} clustered vectors, dim {args.dim}, {faiss.omp_get_max_threads()} threads")
    vectors = clustered(args.count, args.dim)
    rng = np.random.default_rng(1)
    queries = np.asarray(vectors[rng.choice(args.count, args.queries, replace=False)], dtype=np.float32)
    noise = rng.standard_normal(queries.shape).astype(np.float32)
    noise -= (noise * queries).sum(1, keepdims=True) * queries
    queries = 0.5 * queries + np.sqrt(0.75) * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    print(f"{'index':>6} {'search setting':>26} {'build s':>8} {'memory MiB':>11} {'QPS (k=10)':>11} "
          f"{'recall held-out':>16} {'in-index':>9}")
    for kind in args.kinds:
        plan = ann.plan_index(args.count, args.dim, kind)
        started = time.perf_counter()
        index = ann.build_faiss(plan, vectors, seed=0)
        build_s = time.perf_counter() - started
        info = ann.plan_dict(plan)
        # First the plan's defaults, then the setting `build` would choose (tuned to recall >= 0.95).
        for target in (None, ann.RECALL_WARN):
            recall = ann.measure_recall(index, info, vectors, queries=args.queries, target=target)
            started = time.perf_counter()
            ann.search(index, info, queries, 10, vectors)
            qps = len(queries) / (time.perf_counter() - started)
            setting = ("exact" if kind == "flat" else
                       ("tuned " if target else "default ") + ", ".join(
                           f"{key} {value}" for key, value in info["params"].items()
                           if key in ("ef_search", "nprobe", "rerank")))
            print(f"{kind:>6} {setting:>26} {build_s:>8.1f} {plan.estimated_bytes / 2**20:>11.0f} {qps:>11.0f} "
                  f"{recall['held_out']:>16.3f} {recall['in_index']:>9.3f}", flush=True)
            if kind == "flat":
                break
        del index


if __name__ == "__main__":
    main()
