"""Exact search against its limits, at a size that does not fit in RAM (issue #31 items 1 and 6, search).

    cold    writes --rows × --dim float16 unit vectors as a raw clip.f16 (the layout the flat backend reads:
            index/layout.py) into --dir, drops the page cache (root), measures `dd`'s sequential read rate of
            the file and the compute rate (numpy fp32 GEMM + argpartition top-k over float32 chunks held in
            RAM, per query count), then our flat search, cold, for each --queries: ratio = the slower limit's
            time ÷ ours (target ≥ 0.85). Query counts whose compute alone would outlast --budget-s run on the
            file's first rows (a multiple of the chunk; the ratio is a rate, the rows are printed). The file is
            deleted at the end, on error and on Ctrl+C / SIGTERM too.
    in-ram  --ram-rows × --ram-dim fp16 keys in RAM: ours vs faiss IndexFlatIP (its own fp32 copy, as a faiss
            user holds it) and numpy chunked over the same fp16 keys (astype per chunk, matmul, argpartition),
            for each --ram-queries; ratio = best peer's time ÷ ours (target ≥ 0.95). Best of --repeat runs,
            interleaved, so a load change on a shared machine hits every contender.

Prints a markdown table (figure | ours | peer or limit | ratio | conditions). Asserts nothing about speed.

    python bench/at_scale.py --rows 20000000 --dim 704               # both parts, ~28 GB on disk
    python bench/at_scale.py --skip cold --ram-rows 200000           # a quick in-RAM look
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from img2prompt.index import flat, topk
from img2prompt.index.flat import exact_search
from img2prompt.index.layout import CLIP_VECTORS

GiB = 2**30
BASE_ROWS = 1 << 18  # distinct random rows; the file repeats them with rolled columns (still unit vectors)


def log(text: str) -> None:
    print(text, flush=True)


def print_table(rows: list[tuple]) -> None:
    """The bench's rows as one markdown table."""
    print("\n| figure | ours | peer or limit | ratio | conditions |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def synthetic_keys(rows: int, dim: int):
    """Blocks of float16 unit rows: a base block, rolled by its block number along the dims each time."""
    base = unit_rows(min(BASE_ROWS, rows), dim, seed=0).astype(np.float16)
    for number, start in enumerate(range(0, rows, len(base))):
        block = np.roll(base, number, axis=1) if number else base
        yield block[:rows - start]


def write_keys(path: Path, rows: int, dim: int) -> None:
    with open(path, "wb") as handle:
        for block in synthetic_keys(rows, dim):
            handle.write(block.tobytes())
        handle.flush()
        os.fsync(handle.fileno())


def drop_cache() -> str:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return "cold (page cache dropped)"
    except OSError as exc:
        return f"NOT cold: cannot drop the page cache ({exc.strerror})"


def dd_rate(path: Path) -> tuple[float, float]:
    """(bytes/s, seconds) of `dd` reading the file sequentially to /dev/null."""
    started = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    seconds = time.perf_counter() - started
    return path.stat().st_size / seconds, seconds


def numpy_top_k(queries: np.ndarray, block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ block.T
    kept = min(k, scores.shape[1])
    part = np.argpartition(scores, scores.shape[1] - kept, axis=1)[:, -kept:]
    return np.take_along_axis(scores, part, axis=1), part


def compute_rate(dim: int, queries: int, k: int, rows: int) -> float:
    """Rows/s of numpy fp32 GEMM + argpartition top-k over float32 chunks already in RAM (no reading)."""
    chunk = flat.chunk_rows(dim)
    blocks = [unit_rows(min(chunk, rows), dim, seed=5)]
    query = unit_rows(queries, dim, seed=6)
    batch = 1024
    done, started = 0, time.perf_counter()
    while done < rows:
        block = blocks[0][:rows - done]
        for first in range(0, queries, batch):
            numpy_top_k(query[first:first + batch], block, k)
        done += len(block)
    return done / (time.perf_counter() - started)


def cold_part(args) -> list[tuple]:
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if args.reuse and (folder / CLIP_VECTORS).exists():  # its space counts as free: it is what would be written
        free += (folder / CLIP_VECTORS).stat().st_size
    rows = args.rows
    note = ""
    if free < 40 * GiB:
        rows = min(rows, int((free - 10 * GiB) // (args.dim * 2)))
        note = f"; only {free / GiB:.0f} GiB free: {rows:,} rows (leaves 10 GiB)"
    if rows <= 0:
        sys.exit(f"not enough free disk in {folder}")
    path = folder / CLIP_VECTORS
    size = rows * args.dim * 2
    try:
        started = time.perf_counter()
        if args.reuse and path.exists() and path.stat().st_size == size:
            log(f"# reused {path} ({size / 1e9:.1f} GB, {rows:,} × {args.dim} fp16){note}")
        else:
            write_keys(path, rows, args.dim)
            log(f"# wrote {rows:,} × {args.dim} fp16 = {size / 1e9:.1f} GB to {path} in "
                f"{time.perf_counter() - started:.0f} s{note}")
        return cold_search(path, rows, args.dim, args)[0]
    finally:
        path.unlink(missing_ok=True)
        log(f"# removed {path}")


def cold_search(path: Path, rows: int, dim: int, args) -> tuple[list[tuple], float]:
    """dd's cold sequential rate of the key file `path` (rows × dim float16, raw: a folder's clip.f16 or the file
    cold_part writes), then our cold flat search for each of args.queries against the slower of dd and the numpy
    GEMM limit (args: queries, k, budget_s, compute_flop). Returns (table rows, dd bytes/s)."""
    size = rows * dim * 2
    out = []
    state = drop_cache()
    rate, dd_s = dd_rate(path)
    log(f"# dd: {rate / 1e6:.0f} MB/s ({dd_s:.0f} s), {state}")
    out.append(("dd sequential read of the key file", f"{rate / 1e6:.0f} MB/s", "-", "-", f"{size / 1e9:.1f} GB, {state}"))
    chunk = flat.chunk_rows(dim)
    # a search command has torch imported (its CLIP encoder) before it scans: time the scan, not the import
    exact_search(unit_rows(1000, dim, seed=9).astype(np.float16), unit_rows(2, dim, seed=9), args.k)
    for count in args.queries:
        rate_c = compute_rate(dim, count, args.k, max(chunk, int(args.compute_flop / (2 * count * dim))))
        limit_rows = rows
        if rows / rate_c > args.budget_s:  # compute-bound: a prefix, whole chunks
            limit_rows = min(rows, max(chunk, int(rate_c * args.budget_s) // chunk * chunk))
        # a fresh map each time: pages still mapped by a live map survive drop_caches (not cold otherwise)
        keys = np.memmap(path, dtype=np.float16, mode="r", shape=(rows, dim))
        state = drop_cache()
        query = unit_rows(count, dim, seed=7)
        started = time.perf_counter()
        exact_search(keys[:limit_rows], query, args.k)
        ours = time.perf_counter() - started
        del keys
        read_s, compute_s = limit_rows * dim * 2 / rate, limit_rows / rate_c
        bound = "disk" if read_s >= compute_s else "compute"
        ratio = max(read_s, compute_s) / ours
        log(f"# {count:,} queries over {limit_rows:,} rows: ours {ours:.1f} s; dd would read them in {read_s:.1f} s, "
            f"numpy GEMM + top-k in RAM computes them in {compute_s:.1f} s; {ratio:.2f}× of the {bound} limit; "
            f"kernels measured {topk.KERNEL_TIMINGS}")
        out.append((f"cold search, {count:,} queries, k {args.k}", f"{ours:.1f} s ({limit_rows:,} rows)",
                    f"{max(read_s, compute_s):.1f} s ({bound}: dd {read_s:.1f} s, GEMM {compute_s:.1f} s)",
                    f"{ratio:.2f}×", state))
    return out, rate


def in_ram_part(args) -> list[tuple]:
    import faiss

    dim, rows = args.ram_dim, args.ram_rows
    keys = np.concatenate(list(synthetic_keys(rows, dim)))
    index = faiss.IndexFlatIP(dim)
    for start in range(0, rows, 1 << 16):  # its own fp32 copy, added a chunk at a time
        index.add(keys[start:start + (1 << 16)].astype(np.float32))
    chunk = 65_536

    def numpy_chunked(query):
        best_s = np.full((len(query), args.k), -np.inf, np.float32)
        best_i = np.full((len(query), args.k), -1, np.int64)
        for start in range(0, rows, chunk):
            scores, ids = numpy_top_k(query, keys[start:start + chunk].astype(np.float32), args.k)
            merged_s, merged_i = np.concatenate([best_s, scores], 1), np.concatenate([best_i, ids + start], 1)
            order = np.argsort(-merged_s, axis=1, kind="stable")[:, :args.k]
            best_s, best_i = np.take_along_axis(merged_s, order, 1), np.take_along_axis(merged_i, order, 1)
        return best_s, best_i

    exact_search(keys[:1000], unit_rows(2, dim, seed=9), args.k)  # imports torch (the fp16 cast) once
    contenders = {"ours": lambda query: exact_search(keys, query, args.k),
                  "faiss IndexFlatIP": lambda query: index.search(query, args.k),
                  "numpy chunked fp16": numpy_chunked}
    out = []
    for count in args.ram_queries:
        query = unit_rows(count, dim, seed=8)
        best = {name: float("inf") for name in contenders}
        answers = {}
        for _ in range(args.repeat):
            for name, run in contenders.items():
                started = time.perf_counter()
                answers[name] = run(query)
                best[name] = min(best[name], time.perf_counter() - started)
        same = np.mean(np.sort(answers["ours"][1], 1) == np.sort(answers["faiss IndexFlatIP"][1], 1))
        peer = min((name for name in contenders if name != "ours"), key=best.get)
        log(f"# in RAM, {count} queries: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in best.items())
            + f"; ids equal to faiss's: {same:.4f}; kernel {topk.KERNEL_TIMINGS}")
        out.append((f"in RAM {rows:,} × {dim} fp16, {count} queries, k {args.k}", f"{best['ours']:.2f} s",
                    f"{best[peer]:.2f} s ({peer}; other: " + ", ".join(f"{name} {best[name]:.2f} s" for name in contenders
                                                                  if name not in ("ours", peer)) + ")",
                    f"{best[peer] / best['ours']:.2f}×", f"best of {args.repeat}, interleaved"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--dim", type=int, default=704)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 64, 1024, 16384])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--dir", default="/work/at-scale-tmp", help="where the key file is written (and removed)")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="a query count whose compute limit exceeds this runs on the file's first rows")
    parser.add_argument("--compute-flop", type=float, default=2e11, help="work per compute-rate measurement")
    parser.add_argument("--ram-rows", type=int, default=1_000_000)
    parser.add_argument("--ram-dim", type=int, default=768)
    parser.add_argument("--ram-queries", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip", default="", help="cold and/or in-ram")
    parser.add_argument("--reuse", action="store_true",
                        help="use a key file of the right size already in --dir (written by this bench), not a new one;"
                             " it is still removed at the end")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # the finally blocks remove the file
    log(f"# at_scale: {os.cpu_count()} cores (shared with other jobs), load {os.getloadavg()[0]:.1f}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}; chunk {flat.chunk_rows(args.dim):,} rows at {args.dim}-d")
    rows = []
    if "cold" not in args.skip:  # first: nothing of the in-RAM part's allocations left for the reclaim to meet
        rows += cold_part(args)
    if "in-ram" not in args.skip:
        rows += in_ram_part(args)
    log(f"# load at the end {os.getloadavg()[0]:.1f}")
    print_table(rows)


if __name__ == "__main__":
    main()
