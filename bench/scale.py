"""Scale: one pass over the stored vectors (issue #21) against the old per-batch loop, in the same run.

A synthetic index of --rows × --dim float16 keys is written straight to a memmap in a temp dir; --queries
go through the flat backend's one pass (corpus chunk outer); --old-queries go through the old loop (query
batch outer, corpus re-read per 1,024 queries) and its rate is extrapolated to --queries (the loop's cost is
linear in the number of batches). Prints rows read ÷ corpus rows, peak RSS and q/s for both, then the 56M
table at real dims (each figure labelled measured or assumed). Run by hand; asserts nothing about speed.

    python bench/scale.py --rows 20000000 --queries 16384 --old-queries 2048
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from img2prompt.index import flat
from img2prompt.index.backend import QUERY_BATCH
from img2prompt.index.flat import FlatBackend, exact_search


class CountingVectors:
    """A memmap wrapper counting the rows each slice reads."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.rows_read = array, 0

    def __len__(self) -> int:
        return len(self.array)

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)

    def __getitem__(self, key):
        out = self.array[key]
        self.rows_read += len(out) if np.ndim(out) > 1 else 1
        return out


def write_corpus(path: Path, rows: int, dim: int) -> np.memmap:
    vectors = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 1 << 20):
        block = rng.standard_normal((min(1 << 20, rows - start), dim), dtype=np.float32)
        vectors[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    vectors.flush()
    return np.load(path, mmap_mode="r")


def old_loop(vectors, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The search before one pass: each batch of QUERY_BATCH queries streamed the whole corpus."""
    parts = [exact_search(vectors, queries[first:first + QUERY_BATCH], k) for first in range(0, len(queries), QUERY_BATCH)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table_56m(one_pass_qps: float, old_over_new: float) -> None:
    n, k_dim, t_dim, queries = 56_000_000, 768, 384, 16_384
    keys, texts = n * k_dim * 2, n * t_dim
    pcie, disk, t4_flops = 12e9, 1e9, 65e12  # assumed: PCIe 3 x16 effective per T4, disk read, T4 fp16 peak
    torch_batch = (1 << 30) // (4_194_304 * 2)  # torch_exact: queries per batch at 4M-row chunks
    print("\n56M prompts at real dims (PCA 768 fp16 keys + MiniLM 384 int8)")
    rows = [
        ("keys on disk", f"{keys / 2**30:.1f} GiB", "computed"),
        ("MiniLM int8 on disk", f"{texts / 2**30:.1f} GiB", "computed"),
        ("one-pass RAM (flat): chunk f32 + score matrix + top-k state",
         f"{(65_536 * k_dim * 4 + QUERY_BATCH * 65_536 * 4 + queries * 10 * 12) / 2**20:.0f} MiB", "computed"),
        ("2×T4 memory (32 GiB) holds keys?", "no: keys stream", "computed"),
        ("one pass, PCIe-bound (2×T4 at 12 GB/s each)", f"{keys / (2 * pcie):.1f} s", "assumed"),
        ("one pass, disk-bound (1 GB/s)", f"{keys / disk:.0f} s", "assumed"),
        ("matmul 16k queries (2×T4 at fp16 peak)", f"{2 * queries * n * k_dim / (2 * t4_flops):.0f} s", "assumed"),
        ("old loop: corpus streams per torch batch", f"{-(-queries // torch_batch)} passes", "computed"),
        ("old loop disk-bound", f"{-(-queries // torch_batch) * keys / disk / 3600:.1f} h", "assumed"),
        ("CPU flat one pass q/s (this box, bench size)", f"{one_pass_qps:.1f} q/s", "measured"),
        ("one pass ÷ old loop q/s (this box, bench size)", f"{old_over_new:.2f}×", "measured"),
    ]
    for name, value, how in rows:
        print(f"  {name:<62} {value:>22}  [{how}]")
    print("  GPU: not measured")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=16_384)
    parser.add_argument("--old-queries", type=int, default=2_048, help="queries through the old loop (extrapolated)")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mapped = write_corpus(Path(tmp) / "clip.npy", args.rows, args.dim)
        print(f"corpus {args.rows:,} × {args.dim} fp16 = {args.rows * args.dim * 2 / 2**30:.2f} GiB "
              f"written in {time.perf_counter() - t0:.0f} s; chunk {flat.chunk_rows(args.dim):,} rows")
        queries = np.random.default_rng(1).standard_normal((args.queries, args.dim)).astype(np.float32)
        counted = CountingVectors(mapped)
        rss0 = peak_rss_mib()
        t0 = time.perf_counter()
        new_scores, new_ids = FlatBackend(counted, {}).search(queries, args.k)
        new_s = time.perf_counter() - t0
        print(f"one pass: {args.queries:,} queries in {new_s:.1f} s = {args.queries / new_s:.1f} q/s, "
              f"rows read ÷ corpus rows = {counted.rows_read / args.rows:.2f}, peak RSS {peak_rss_mib():.0f} MiB "
              f"(before {rss0:.0f})")
        counted.rows_read = 0
        old_q = queries[:args.old_queries]
        t0 = time.perf_counter()
        old_scores, old_ids = old_loop(counted, old_q, args.k)
        old_s = time.perf_counter() - t0
        same = np.array_equal(old_ids, new_ids[:len(old_q)]) and np.array_equal(old_scores, new_scores[:len(old_q)])
        batches = -(-args.queries // QUERY_BATCH)
        print(f"old loop: {len(old_q):,} queries in {old_s:.1f} s = {len(old_q) / old_s:.1f} q/s, rows read ÷ corpus "
              f"rows = {counted.rows_read / args.rows:.2f} (→ {batches} at {args.queries:,} queries, extrapolated); "
              f"ids and scores identical: {same}")
        ratio = (old_s / len(old_q)) / (new_s / args.queries)
        print(f"one pass ÷ old loop q/s = {ratio:.2f} (old loop extrapolated linearly from {len(old_q):,} queries)")
        table_56m(args.queries / new_s, ratio)


if __name__ == "__main__":
    main()
