"""The blend's cost per weighting and k: softmax vs inverse distance (1 / (d^p + eps)), against the peer that
bounds it, the gather of the k neighbours' MiniLM rows (numpy fancy indexing, which every blend does first).

    python bench/blend_weighting.py --queries 2000 --rows 200000

Prints seconds and ratios; asserts nothing about speed."""
from __future__ import annotations

import argparse
import time

import numpy as np

from img2prompt.query.blend import blend


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=200_000, help="MiniLM rows (fp16, 384-d)")
    parser.add_argument("--ks", default="20,150,300")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    minilm = rng.standard_normal((args.rows, 384)).astype(np.float16)
    print(f"{args.queries} queries, {args.rows} fp16 MiniLM rows, best of {args.runs}")
    print(f"{'k':>4} {'gather s':>9} {'softmax s':>10} {'inv-dist s':>11} {'inv/softmax':>12} {'inv/gather':>11}")
    for k in (int(k) for k in args.ks.split(",")):
        scores = -np.sort(-rng.uniform(0.1, 0.9, (args.queries, k)), axis=1)
        ids = rng.integers(0, args.rows, (args.queries, k))
        gather = best_of(args.runs, lambda: minilm[ids.ravel()].astype(np.float64))
        softmax = best_of(args.runs, lambda: blend(scores, ids, minilm, k=k, temperature=0.05))
        inverse = best_of(args.runs, lambda: blend(scores, ids, minilm, k=k, temperature=0.05,
                                                   weighting="inverse-distance", power=6, epsilon=1e-4))
        print(f"{k:>4} {gather:>9.3f} {softmax:>10.3f} {inverse:>11.3f} {inverse / softmax:>12.2f} "
              f"{inverse / gather:>11.2f}")


if __name__ == "__main__":
    main()
