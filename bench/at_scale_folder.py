"""Issue #31 item 6: items 1, 3 and 4 measured in one run on one index folder larger than RAM.

Writes a --rows index folder directly in the on-disk format of the 50M recipe (README "A 50M-prompt index on
Kaggle": `build --key-dims 704 --minilm-dtype int8`): a 400-prompt real build with stand-in models of the
recipe's widths (768-d CLIP PCA-projected to 704-d keys, 384-d MiniLM stored int8; random weights), then its
row files replaced by --rows synthetic rows (bench/scale_memory.py's scaled_index: prompts.parquet in row
groups, prompt_keys.npy, manifest updated). Keys: bench/at_scale.py's synthetic unit rows (a 2^18-row block,
rolled along the dims per block); MiniLM: bench/near_dup_scale.py's clustered rows with 5% planted
near-duplicates (one 2^18-row block, rolled likewise: near-duplicates within a block, none across), int8.
Vectorised block writes, no per-row Python except the prompt strings and their dedup keys.

On that folder, in this order:
  (a) item 1   dd's cold sequential rate of clip.f16, then our cold exact search per --queries against the
               slower of dd and the numpy GEMM + top-k limit (bench/at_scale.py's cold_search, unchanged logic)
  (b) item 4   each of --commands in its own process (bench/scale_memory.py's measure): wall time, peak
               anonymous memory (RssAnon sampled every 20 ms) and VmHWM. `search` runs twice: cold (page cache
               dropped) and again as it left the cache. `merge` (a second full copy) is skipped, saying why,
               when free disk is short; `add-neardup` (reads every old MiniLM row) only with --add-neardup
  (c) item 3   with --near-dup-rows N: build_index/near_dup.py's filter (T 0.95, 1 thread) over the folder's
               first N MiniLM rows (int8, dequantised as add --near-dup reads them): µs/row, peak anonymous
               memory, VmHWM
The page cache is dropped as root (else the rows say NOT cold). Everything is written in a fresh folder under
--dir, deleted at the end, on error and on Ctrl+C / SIGTERM. Prints one markdown table (figure | ours | peer
or limit | ratio | conditions). Asserts nothing about speed.

The 20M run (the issue's size; run it on an idle machine, nothing else on the disk or CPUs):

    python bench/at_scale_folder.py --rows 20000000 --near-dup-rows 2000000 --compute-flop 5e10

  Measured (2026-12-08, idle 2 cores, bench/RESULTS.md): 36.4 GB of disk (the check asks ≈ 40 GiB free under
  --dir before any work; `merge` would need ≈ 37 GB more and is skipped below that, saying so); 1,118 s in all:
  folder written in 250 s, item 1 ≈ 6 min (dd + 4 searches, 1,024 and 16,384 queries capped by --budget-s),
  item 4 ≈ 8 min, near-dup over 2M rows 132 s. --add-neardup adds ≈ 1 h at 20M (ESTIMATED from 5,800 old
  rows/s measured at 300k). A quick functional run (< 1 GB of disk, ~5 min):

    python bench/at_scale_folder.py --rows 300000 --near-dup-rows 100000 --budget-s 20
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import at_scale
import near_dup_scale
import scale_memory
from at_scale import GiB, log
from common import anon_peak_sampler

COMMANDS = ("search", "explain", "interrogate", "eval", "add", "add-prekeys", "add-dedup", "merge-dedup", "merge")
SCANS = ("search", "explain", "interrogate", "eval")  # a full pass over the keys: dd's time bounds them
PROMPT_BYTES = 48  # prompts.parquet per row, with slack (measured ≈ 18-25 B at 0.3-0.5M rows)
MARGIN = 5 * GiB  # left free for the add / near-dup scratch files and the rest of the machine
NEAR_DUP_T = 0.95


def row_bytes() -> int:
    recipe = scale_memory.RECIPE
    return recipe["key_dims"] * 2 + recipe["text_dim"] + 4 + 8 + PROMPT_BYTES  # keys, int8 MiniLM, scale, dedup key


def needed_bytes(rows: int) -> int:
    """The folder, and the N/2 input of merge-dedup (prompts and keys only: its vectors are sparse files)."""
    return rows * row_bytes() + rows // 2 * (8 + PROMPT_BYTES) + MARGIN


def recipe_blocks(work: Path):
    """blocks(kind, count, dim) for scale_memory.write_vectors: keys as at_scale writes them, MiniLM rows as
    near_dup_scale writes them (one clustered 2^18-row block), each rolled along the dims block after block;
    the MiniLM block is quantised once (a roll keeps each row's scale)."""
    from img2prompt.index.minilm_store import quantise

    def blocks(kind: str, count: int, dim: int):
        if kind == "clip":
            yield from at_scale.synthetic_keys(count, dim)
            return
        assert dim == near_dup_scale.DIM, dim
        path = work / "minilm-base.npy"
        near_dup_scale.write_rows(path, min(at_scale.BASE_ROWS, count))
        base, scale = quantise(np.load(path))
        for number, start in enumerate(range(0, count, len(base))):
            yield (np.roll(base, number, axis=1) if number else base)[:count - start], scale[:count - start]
    return blocks


def prepare(work: Path, rows: int, commands: list[str]) -> None:
    """The folder (and merge's N/2 input); run in a child of its own."""
    started = time.perf_counter()
    base = scale_memory.base_index(work, recipe=True)
    log(f"# base index built (stand-in models, {scale_memory.RECIPE}) in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    scale_memory.scaled_index(base, work, rows, recipe_blocks(work))
    seconds = time.perf_counter() - started
    log(f"# {rows:,} rows written in {seconds:.0f} s ({seconds / rows * 1e6:.1f} µs/row)")
    if {"merge", "merge-dedup"} & set(commands):  # merge-dedup reads its prompts only
        started = time.perf_counter()
        scale_memory.scaled_index(base, work, rows // 2, sparse=True)
        log(f"# merge's {rows // 2:,}-prompt input (prompts and keys; sparse vector files) in "
            f"{time.perf_counter() - started:.0f} s")
    if "build-dedup" in commands:
        scale_memory.corpus_file(work, rows)


def near_dup_child(folder: Path, rows: int) -> None:
    """item 3 on the folder's first `rows` MiniLM rows, as add --near-dup reads an index's rows; one JSON line."""
    from img2prompt.build_index.near_dup import RowWindow, near_dup_mask
    from img2prompt.index.reader import open_index

    window = RowWindow(open_index(folder).minilm, 0, rows)
    stop, anon = anon_peak_sampler()
    started = time.perf_counter()
    keep, stats = near_dup_mask(window, NEAR_DUP_T, work_dir=folder.parent)
    seconds = time.perf_counter() - started
    stop.set()
    print(json.dumps({"seconds": seconds, "dropped": stats.dropped, "method": stats.method,
                      "anon_peak": anon[0], "peak_rss": scale_memory.vm_hwm()}))


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def memory_row(name: str, row: dict, rows: int, limit: tuple[str, str], state: str) -> tuple:
    """B/prompt = peak ÷ N: fixed costs (torch, the models) included, an upper bound on scale_memory's slope."""
    ours = (f"{row['seconds']:.1f} s; anon {mib(row['anon_peak'])} (≤ {row['anon_peak'] / rows:.1f} B/prompt); "
            f"VmHWM {mib(row['peak_rss'])}")
    if name == "add-neardup":
        ours += f"; {rows / row['seconds']:,.0f} old rows/s"
    return f"{name}, {rows:,} prompts", ours, *limit, f"own process, whole command; {state}"


def memory_part(args, work: Path, folder: Path, rows: int, dd_rate: float) -> list[tuple]:
    from img2prompt.index.layout import CLIP_VECTORS, MINILM_I8

    key_s = (folder / CLIP_VECTORS).stat().st_size / dd_rate
    minilm_s = (folder / MINILM_I8).stat().st_size / dd_rate
    commands = list(args.commands) + (["add-neardup"] if args.add_neardup else [])
    out = []
    for command in commands:
        if command == "merge":
            need = folder_bytes(folder) + folder_bytes(work / f"idx-{rows // 2}") + MARGIN
            free = shutil.disk_usage(work).free
            if free < need:
                why = f"skipped: writes a full copy ({need / GiB:.0f} GiB with margin), {free / GiB:.0f} GiB free"
                log(f"# merge: {why}")
                out.append((f"merge, {rows:,} prompts", why, "-", "-", "-"))
                continue
        for label, cold in ((" first answer, cold", True), (" first answer, warm", False)) if command == "search" \
                else (("", False),):
            state = at_scale.drop_cache() if cold else "cache as left"
            started = time.perf_counter()
            row = scale_memory.measure(command, folder, work, rows)
            if row is None:
                out.append((f"{command}{label}, {rows:,} prompts", "failed (see the log)", "-", "-", state))
                continue
            log(f"# {command}{label}: {row['seconds']:.1f} s (process {time.perf_counter() - started:.1f} s), "
                f"anon {mib(row['anon_peak'])}, VmHWM {mib(row['peak_rss'])}, load {os.getloadavg()[0]:.1f}"
                + (f", {rows / row['seconds']:,.0f} old rows/s" if command == "add-neardup" else ""))
            if command in SCANS:
                limit = (f"{key_s:.1f} s (dd reads the keys once)", f"{key_s / row['seconds']:.2f}×")
            elif command == "add-neardup":
                limit = (f"{minilm_s:.1f} s (dd reads the MiniLM rows once)", f"{minilm_s / row['seconds']:.2f}×")
            else:
                limit = ("target: anon independent of N (dedup ≤ 16 B/prompt)", "-")
            out.append(memory_row(command + label, row, rows, limit, state))
    return out


def near_dup_part(args, folder: Path) -> list[tuple]:
    count = min(args.near_dup_rows, args.rows)
    env = dict(os.environ, **{name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    done = subprocess.run([sys.executable, __file__, "--near-dup-child", str(folder), str(count)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        log(f"# near-dup failed: {done.stderr.strip().splitlines()[-3:]}")
        return [(f"near-dup over {count:,} MiniLM rows", "failed (see the log)", "-", "-", "-")]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    per_row = row["seconds"] / count * 1e6
    log(f"# near-dup over {count:,} rows: {row['seconds']:.1f} s ({per_row:.1f} µs/row), anon {mib(row['anon_peak'])}, "
        f"VmHWM {mib(row['peak_rss'])}, dropped {row['dropped']:,}; {row['method']}")
    return [(f"near-dup T {NEAR_DUP_T} over the first {count:,} MiniLM rows (int8)",
             f"{per_row:.1f} µs/row ({row['seconds']:.1f} s); anon {mib(row['anon_peak'])} "
             f"({row['anon_peak'] / count:.0f} B/row); VmHWM {mib(row['peak_rss'])}; dropped {row['dropped']:,}",
             f"target: linear, ≤ 64 B/kept row; 50M at this rate (computed): {per_row * 50:.0f} s", "-",
             f"1 thread, own process; {row['method']}")]


def run(args, work: Path) -> list[tuple]:
    from img2prompt.index.layout import CLIP_VECTORS

    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--prepare", str(work), "--rows", str(args.rows), "--commands",
                    *args.commands], check=True)
    folder = work / f"idx-{args.rows}"
    size, seconds = folder_bytes(folder), time.perf_counter() - started
    log(f"# wrote {folder} ({size / 1e9:.1f} GB, {args.rows:,} prompts, 704-d fp16 keys + int8 MiniLM) and the "
        f"rest in {seconds:.0f} s ({size / seconds / 1e6:.0f} MB/s)")
    out = [(f"index folder written directly, {args.rows:,} prompts", f"{size / 1e9:.1f} GB in {seconds:.0f} s",
            "-", "-", f"{size / args.rows:.0f} B/prompt on disk; stand-in models of the recipe's widths")]
    dim = scale_memory.RECIPE["key_dims"]
    rows, dd = at_scale.cold_search(folder / CLIP_VECTORS, args.rows, dim, args)
    out += rows
    out += memory_part(args, work, folder, args.rows, dd)
    if args.near_dup_rows:
        out += near_dup_part(args, folder)
    return out


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000, help="prompts in the folder (default 20,000,000)")
    parser.add_argument("--dir", type=Path, default=Path("/work/at-scale-tmp"),
                        help="a fresh folder is made (and removed) under this one (default /work/at-scale-tmp)")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 64, 1024, 16384])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=90.0,
                        help="a query count whose compute limit exceeds this searches the key file's first rows")
    parser.add_argument("--compute-flop", type=float, default=5e10, help="work per compute-rate measurement")
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=scale_memory.COMMANDS,
                        help="item 4's commands (default: %(default)s)")
    parser.add_argument("--add-neardup", action="store_true",
                        help="also `add --near-dup 0.95` (one pass over every old MiniLM row: minutes at 20M)")
    parser.add_argument("--near-dup-rows", type=int, default=0,
                        help="item 3: the near-dup filter over the folder's first N MiniLM rows (0: skip)")
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--near-dup-child", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.prepare:
        prepare(args.prepare, args.rows, args.commands)
        return
    if args.near_dup_child:
        near_dup_child(Path(args.near_dup_child[0]), int(args.near_dup_child[1]))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    free, need = shutil.disk_usage(args.dir).free, needed_bytes(args.rows)
    if free < need:
        sys.exit(f"{args.rows:,} prompts need ≈ {need / GiB:.0f} GiB free under {args.dir} (with a {MARGIN // GiB} GiB "
                 f"margin); {free / GiB:.0f} GiB are: at most --rows {int((free - MARGIN) // (row_bytes() + 28)):,}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # the finally block removes the folder
    log(f"# at_scale_folder: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M:%S')}; "
        f"{free / GiB:.0f} GiB free, ≈ {need / GiB:.0f} GiB needed; RAM {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GiB:.0f} GiB")
    work = Path(tempfile.mkdtemp(prefix="at-scale-folder-", dir=args.dir))
    started = time.perf_counter()
    try:
        table = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        log(f"# removed {work}")
    log(f"# whole run {time.perf_counter() - started:.0f} s, load at the end {os.getloadavg()[0]:.1f}")
    at_scale.print_table(table)


if __name__ == "__main__":
    main()
