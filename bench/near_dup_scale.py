"""build --near-dup at scale: time and peak memory per row of build_index/near_dup.py at growing N, with the
50M figure computed from the measured slope, and its agreement with an exact greedy reference where exact is
feasible.

Rows: synthetic clustered 384-d unit vectors (64 topics × 64 sub-clusters, cosine to the sub-cluster ≈ 0.8) with 5% planted
near-duplicates of earlier rows (cosine ≈ 0.97), written once as a float16 .npy under --work (the MiniLM shards'
dtype; the filter reads them back from disk as it does the shards). Each size runs in its own process, so its
peak RSS (ru_maxrss, which counts the mapped rows' pages it touched) and the peak of its anonymous memory
(RssAnon sampled every 50 ms: what the filter itself holds, outside the page cache) are its own.

Usage: python bench/near_dup_scale.py [--sizes 500000 1000000 2000000 4000000] [--exact 50000] [--work /tmp/nds]
       [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import anon_peak_sampler

DIM = 384
THRESHOLD = 0.95


def write_rows(path: Path, count: int, seed: int = 0, block: int = 262_144) -> None:
    """Clustered unit rows with planted near-duplicates, float16, written a block at a time."""
    if path.exists() and np.load(path, mmap_mode="r").shape[0] >= count:
        return
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(64, DIM)).astype(np.float32)  # 64 topics, 64 sub-clusters each (cosine ≈ 0.7)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    centres = topics[np.arange(4096) // 64] + rng.normal(scale=1 / np.sqrt(DIM), size=(4096, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(path, "w+", np.float16, (count, DIM))
    for low in range(0, count, block):
        n = min(block, count - low)
        rows = centres[rng.integers(0, 4096, n)] + rng.normal(scale=0.75 / np.sqrt(DIM), size=(n, DIM)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        planted = np.flatnonzero(rng.random(n) < 0.05)  # 5% of the rows: a near-copy of an earlier row
        planted = planted[low + planted > 0]
        sources = (rng.random(len(planted)) * (low + planted)).astype(np.int64)
        inside = sources >= low
        source = np.empty((len(planted), DIM), np.float32)
        source[inside] = rows[sources[inside] - low]
        source[~inside] = np.asarray(out[np.sort(sources[~inside])], np.float32)[np.argsort(np.argsort(sources[~inside]))]
        copies = source + rng.normal(scale=0.25 / np.sqrt(DIM), size=source.shape).astype(np.float32)
        rows[planted] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
        out[low:low + n] = rows.astype(np.float16)
    out.flush()


def child(path: Path, count: int, work: Path) -> None:
    """One size: the filter over the first `count` rows; prints one JSON line."""
    from img2prompt.build_index.near_dup import near_dup_mask

    rows = np.load(path, mmap_mode="r")[:count]
    stop, anon = anon_peak_sampler()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    keep, stats = near_dup_mask(rows, THRESHOLD, work_dir=work)
    seconds = time.perf_counter() - start
    stop.set()
    print(json.dumps({"rows": count, "seconds": seconds, "dropped": stats.dropped, "method": stats.method,
                      "pairs": stats.pairs, "split": stats.split,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_before": before, "anon_peak": anon[0]}))


def exact_reference(rows: np.ndarray, threshold: float, chunk: int = 512) -> np.ndarray:
    """Row i kept iff its cosine to every earlier kept row is < T (independent of near_dup.py)."""
    keep = np.ones(len(rows), dtype=bool)
    for start in range(0, len(rows), chunk):
        stop = min(start + chunk, len(rows))
        hits = (rows[start:stop] @ rows[:stop].T) >= threshold
        for i in range(start, stop):
            row = hits[i - start, :i]
            if row.any() and (row & keep[:i]).any():
                keep[i] = False
    return keep


def agreement(path: Path, count: int) -> str:
    from img2prompt.build_index.near_dup import NearDupParams, near_dup_mask

    rows = np.asarray(np.load(path, mmap_mode="r")[:count], np.float32)
    exact = exact_reference(rows, THRESHOLD)
    ours, stats = near_dup_mask(rows, THRESHOLD, params=NearDupParams(small_rows=1000))  # cells, not exact
    return (f"agreement with exact at {count:,} rows (T {THRESHOLD}, forced into {stats.method}): "
            f"{(ours == exact).mean():.5f}; dropped exact {(~exact).sum():,}, ours {stats.dropped:,}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000, 4_000_000])
    parser.add_argument("--exact", type=int, default=50_000, help="rows for the agreement check (0: skip)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/near-dup-scale"))
    parser.add_argument("--threads", type=int, default=1,
                        help="OpenMP/BLAS threads of each size's process (0: the libraries' default); 1 by default "
                             "because on a shared 2-core box spinning BLAS/OpenMP threads made the times 3-18x noisier")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.work / "rows.npy", int(args.child[0]), Path(args.child[1]))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "rows.npy"
    start = time.perf_counter()
    write_rows(path, max(args.sizes + [args.exact]))
    print(f"rows written in {time.perf_counter() - start:.0f} s: {path}", flush=True)
    if args.exact:
        print(agreement(path, args.exact), flush=True)
    results = []
    env = dict(os.environ)
    if args.threads:
        env.update({name: str(args.threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    for count in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--child", str(count),
                              str(args.work)], capture_output=True, text=True, check=True, env=env)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{count:,} rows: {r['seconds']:.1f} s ({r['seconds'] / count * 1e6:.1f} µs/row), peak RSS "
              f"{r['peak_rss'] / 2**20:.0f} MiB, peak anonymous {r['anon_peak'] / 2**20:.0f} MiB, dropped "
              f"{r['dropped']:,}; cosines/row {r['pairs'] / count:.0f}, {r['split']} cells split; {r['method']}",
              flush=True)
    print("\n| rows | s | µs/row | cosines/row | cells split | peak RSS MiB | RSS B/row | peak anon MiB | anon B/row | dropped |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['seconds']:.1f} | {r['seconds'] / r['rows'] * 1e6:.1f} | "
              f"{r['pairs'] / r['rows']:.0f} | {r['split']:,} | {r['peak_rss'] / 2**20:.0f} | "
              f"{r['peak_rss'] / r['rows']:.0f} | {r['anon_peak'] / 2**20:.0f} | {r['anon_peak'] / r['rows']:.1f} | "
              f"{r['dropped']:,} |")
    if len(results) >= 2:
        n = np.array([r["rows"] for r in results], float)
        for key, unit in (("seconds", "s"), ("anon_peak", "B"), ("peak_rss", "B")):
            slope, intercept = np.polyfit(n, [r[key] for r in results], 1)
            at = slope * 50e6 + intercept
            shown = f"{at:.0f} s ({at / 3600:.1f} h)" if key == "seconds" else f"{at / 2**30:.2f} GiB"
            print(f"fit {key}: {slope * (1e6 if key == 'seconds' else 1):.3g} {'µs' if key == 'seconds' else unit} "
                  f"per row + {intercept:.3g} {unit}; at 50M rows (computed): {shown}")


if __name__ == "__main__":
    main()
