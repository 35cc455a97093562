"""Build memory and resume at scale, with tiny stand-in models (a 2-layer random CLIP of width 64 and a
1-layer random BERT of width 32 with MiniLM's tokenizer): memory and I/O behaviour, not quality.

For each size: peak RSS of a full `img2prompt build` in a child process, and bytes on disk per prompt.
With --kill-resume N: a build of N prompts is SIGKILLed mid-way, resumed, and compared with an
uninterrupted build of the same corpus (prompts and vectors must be identical).

    python bench/build_scale.py --sizes 10000 100000 1000000 --kill-resume 200000
    python bench/build_scale.py --sizes 100000 --device cuda
--device goes to `img2prompt build --device` (the tiny stand-ins make it a memory/I-O figure on any device).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import add_device_flag, check_device, synthetic_corpus

SCRIPT = str(Path(sys.executable).parent / "img2prompt")


SHARD_SIZE = 10_000
DEVICE = ["--device", "cpu"]  # set from --device in main()


def build_command(corpus: Path, out: Path, clip: Path, text: Path, *extra: str) -> list[str]:
    return [SCRIPT, "-q", "build", str(corpus), "--out", str(out), "--clip-model", str(clip), "--text-model",
            str(text), "--shard-size", str(SHARD_SIZE), "--batch-size", "512", "--json", *DEVICE, *extra]


def run_measured(command: list[str]) -> tuple[dict, float, float]:
    """Run a build in a child; return (summary, seconds, child peak RSS MiB) via wait4's own rusage."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    stdout, stderr = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"build failed: {stderr[-2000:]}")
    return json.loads(stdout), time.perf_counter() - started, usage.ru_maxrss / 1024


def disk_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def kill_resume(workdir: Path, size: int, clip: Path, text: Path) -> None:
    from img2prompt.index.layout import MANIFEST
    from img2prompt.index.reader import open_index

    corpus = synthetic_corpus(workdir / f"corpus-{size}.txt", size)
    reference = workdir / "reference"
    run_measured(build_command(corpus, reference, clip, text))
    out = workdir / "killed"
    process = subprocess.Popen(build_command(corpus, out, clip, text), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while process.poll() is None:
        try:
            manifest = json.loads((out / MANIFEST).read_text())
            if len(manifest.get("shards", [])) >= size // SHARD_SIZE // 2:
                os.kill(process.pid, signal.SIGKILL)
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    process.wait()
    done = len(json.loads((out / MANIFEST).read_text())["shards"])
    summary, seconds, rss = run_measured(build_command(corpus, out, clip, text, "--resume"))
    ours, theirs = open_index(out, verify=True), open_index(reference, verify=True)
    same = (ours.prompts == theirs.prompts and np.array_equal(ours.minilm, theirs.minilm)
            and np.array_equal(ours.clip_vectors, theirs.clip_vectors))
    print(f"kill/resume at {size:,}: killed after {done} of {-(-size // SHARD_SIZE)} shards (exit {process.returncode}); "
          f"resume took {seconds:.0f} s, peak RSS {rss:.0f} MiB; identical to the uninterrupted build: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--kill-resume", type=int, default=0, metavar="N")
    parser.add_argument("--workdir", help="keep files here (default: a temp folder)")
    add_device_flag(parser)
    args = parser.parse_args()
    check_device(args.device)
    DEVICE[1] = args.device
    from img2prompt.index.layout import MANIFEST
    from img2prompt.stand_in import write_tiny_clip, write_tiny_text_model

    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(args.workdir or temp)
        workdir.mkdir(parents=True, exist_ok=True)
        clip, text = write_tiny_clip(workdir / "clip"), write_tiny_text_model(workdir / "text")
        print(f"shard size {SHARD_SIZE:,}, device {args.device}")
        print(f"{'prompts':>10} {'seconds':>8} {'prompts/s':>10} {'peak RSS MiB':>13} {'after encode':>13} "
              f"{'disk B/prompt':>14}")
        for size in args.sizes:
            corpus = synthetic_corpus(workdir / f"corpus-{size}.txt", size)
            out = workdir / f"index-{size}"
            summary, seconds, rss = run_measured(build_command(corpus, out, clip, text, "--overwrite"))
            encode_rss = json.loads((out / MANIFEST).read_text())["memory"]["peak_rss_mib_after_encode"]
            print(f"{summary['count']:>10,} {seconds:>8.1f} {summary['count'] / seconds:>10.0f} {rss:>13.0f} "
                  f"{encode_rss:>13.0f} {disk_bytes(out) / summary['count']:>14.1f}", flush=True)
        if args.kill_resume:
            kill_resume(workdir, args.kill_resume, clip, text)


if __name__ == "__main__":
    main()
