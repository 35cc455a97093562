"""The architectures top Kaggle solutions used, at their REAL size with random weights, through the real checkpoint
path (a local-dir folder loaded as a user's would be): build of 16 prompts, submit of 2 images, search --text,
short-context text equality with open_clip's own encode_text, manifest dims/preprocessing against open_clip's,
and a 2-model ensemble (bigG + H). Prints one table (peak RSS, seconds per prompt / image); asserts nothing about
speed. Each command runs in its own process under /usr/bin/time, so peak RSS is that command's own.

    python bench/arch_matrix.py                                  # the whole matrix (tens of minutes, ~22 GB peak)
    python bench/arch_matrix.py --architectures ViT-B-32 ViT-L-14 --no-ensemble

Random weights: the retrievals mean nothing; the figures are cost and correctness, never quality.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHITECTURES = ["ViT-B-32", "ViT-L-14", "ViT-L-14-quickgelu", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14",
                 "convnext_xxlarge", "EVA02-L-14"]
ENSEMBLE = ("ViT-bigG-14", "ViT-H-14")
BIN = Path(sys.executable).parent

CHECK = r"""
import json, sys, torch, open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2
from img2prompt.encoders.models import clip_encode_text, load_clip, preprocess_fingerprint, supports_short_context
from img2prompt.stand_in import architecture_config
folder, architecture = sys.argv[1], sys.argv[2]
prompts = ["a castle on a hill, matte painting", "portrait of an old fisherman, oil on canvas, dramatic lighting, "
           "highly detailed, by greg rutkowski", "cat"]
clip = load_clip(folder, device="cpu")
tokens = clip.tokenizer(prompts)
length = int((tokens != 0).sum(dim=1).max())
with torch.inference_mode():
    full = clip.model.encode_text(tokens).float()
    short = clip_encode_text(clip, tokens[:, :length]).float()
config, preprocess = architecture_config(architecture)
size = config["vision_cfg"].get("image_size", 224)
reference = image_transform_v2(PreprocessCfg(size=size, **preprocess), is_train=False)
print(json.dumps({"short_context": supports_short_context(clip),
                  "max_abs_diff": float((short - full).abs().max()), "scale": float(full.abs().max()),
                  "dim_ok": clip.dim == config["embed_dim"],
                  "preprocess_ok": clip.preprocess_config == preprocess_fingerprint(reference),
                  "image_size": size}))
"""


def timed(argv: list[str], env: dict | None = None) -> tuple[dict | None, float, float]:
    """Run argv under /usr/bin/time: (its JSON stdout or None, peak RSS in GiB, wall seconds)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        done = subprocess.run(["/usr/bin/time", "-o", stats.name, "-f", "%M %e", *argv], capture_output=True,
                              text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])}… exit {done.returncode}: {done.stderr.strip()[-600:]}")
        kib, seconds = stats.read().split()[-2:]
    try:
        payload = json.loads(done.stdout)
    except ValueError:
        payload = None
    return payload, int(kib) / 2**20, float(seconds)


def write_folder(architecture: str, dest: Path) -> tuple[float, float]:
    code = ("import sys; from img2prompt.stand_in import write_random_clip; "
            "write_random_clip(sys.argv[1], sys.argv[2], seed=0)")
    _, rss, seconds = timed([sys.executable, "-c", code, str(dest), architecture])
    return rss, seconds


def run_jobs(clips: list[Path], work: Path, corpus: Path, images: Path) -> dict:
    """build → submit → search --text with the CLI, as a user runs them; per command peak RSS and rates."""
    from img2prompt.index.layout import MANIFEST

    index = work / "index"
    models = [arg for clip in clips for arg in ("--clip-model", str(clip))]
    build, build_rss, build_s = timed([str(BIN / "img2prompt"), "-q", "build", str(corpus), "--out", str(index),
                                       *models, "--overwrite", "--json", "--device", "cpu"])
    submit, submit_rss, submit_s = timed([str(BIN / "img2prompt"), "-q", "submit", str(index), str(images),
                                          "--out", str(work / "submission.csv"), "--k", "5", "--json",
                                          "--device", "cpu"])
    search, search_rss, _ = timed([str(BIN / "img2prompt"), "-q", "search", str(index), "--text",
                                   "a castle on a hill, matte painting", "--k", "3", "--json", "--device", "cpu"])
    prompts = build["count"] if isinstance(build.get("count"), int) else 16
    manifest = json.loads((index / MANIFEST).read_text())
    return {"build_rss_gib": build_rss, "build_s": build_s, "submit_rss_gib": submit_rss, "submit_s": submit_s,
            "search_rss_gib": search_rss, "s_per_prompt": build["timings_s"]["encode_clip"] / max(prompts, 1),
            "s_per_image": submit["timings_s"]["encode"] / max(submit["predicted"], 1),
            "predicted": submit["predicted"], "search_hits": len(search[0]["results"]) if search else 0,
            "manifest_dim": manifest["models"]["clip"]["dim"]}


def parameter_count(architecture: str) -> int:
    """Parameters of `architecture`, counted on torch's meta device (no memory, no init)."""
    import open_clip
    import torch

    from img2prompt.stand_in import architecture_config

    config, _ = architecture_config(architecture)
    model_cfg = {key: value for key, value in config.items() if key != "custom_text"}
    with torch.device("meta"):
        model = (open_clip.model.CustomTextCLIP if config.get("custom_text") else open_clip.model.CLIP)(**model_cfg)
    return sum(parameter.numel() for parameter in model.parameters())


def fits(architecture: str, work: Path) -> str | None:
    """Why this machine cannot hold `architecture` now: open_clip's load holds the model and its state dict
    (2 × fp32 weights) at once; the folder holds one fp32 copy on disk."""
    need = 2 * 4 * parameter_count(architecture) / 2**30
    with open("/proc/meminfo") as handle:
        available = next(int(line.split()[1]) for line in handle if line.startswith("MemAvailable")) / 2**20
    free = shutil.disk_usage(work).free / 2**30
    if free < need / 2 + 5:
        return f"only {free:.0f} GiB free on {work} (weights {need / 2:.1f} GiB)"
    if available < need + 1:
        return f"only {available:.1f} GiB of RAM available, about {need + 1:.0f} GiB needed"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="+", default=ARCHITECTURES, metavar="NAME")
    parser.add_argument("--no-ensemble", action="store_true", help=f"skip the {' + '.join(ENSEMBLE)} ensemble")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary folder, removed)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    from img2prompt.stand_in import write_tiny_clip  # noqa: F401  (fails early without the package)

    work = Path(args.work or tempfile.mkdtemp(prefix="arch-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join((REPO / "data" / "prompts.txt").read_text().splitlines()[:16]) + "\n")
    images = work / "images"
    images.mkdir(exist_ok=True)
    for path in sorted((REPO / "data" / "images").glob("*.png"))[:2]:
        shutil.copy(path, images / path.name)
    rows: list[dict] = []
    folders: dict[str, Path] = {}
    keep = set(ENSEMBLE) if not args.no_ensemble else set()
    try:
        for architecture in args.architectures:
            row: dict = {"model": architecture}
            rows.append(row)
            reason = fits(architecture, work)
            if reason:
                row["error"] = f"not run: {reason}"
                continue
            started = time.time()
            folder = work / "models" / architecture
            try:
                row["write_rss_gib"], row["write_s"] = write_folder(architecture, folder)
                row["weights_gib"] = sum(p.stat().st_size for p in folder.iterdir()) / 2**30
                check, row["check_rss_gib"], _ = timed([sys.executable, "-c", CHECK, str(folder), architecture])
                row.update(check or {})
                row.update(run_jobs([folder], work / architecture, corpus, images))
            except RuntimeError as exc:
                row["error"] = str(exc)
            row["total_s"] = round(time.time() - started, 1)
            print(json.dumps(row), flush=True)
            if architecture in keep:
                folders[architecture] = folder
            else:
                shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(work / architecture, ignore_errors=True)
        if keep and all(name in folders for name in ENSEMBLE):
            row = {"model": " + ".join(ENSEMBLE)}
            rows.append(row)
            try:
                row.update(run_jobs([folders[name] for name in ENSEMBLE], work / "ensemble", corpus, images))
            except RuntimeError as exc:
                row["error"] = str(exc)
            print(json.dumps(row), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


def print_table(rows: list[dict]) -> None:
    print("\n| model | weights GiB | short ctx = encode_text (max |Δ| / max |x|) | dims, preprocess = open_clip's "
          "| build peak RSS GiB | s/prompt (CLIP text) | submit peak RSS GiB | s/image | search RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['error'][:160]} |||||||")
            continue
        equal = (f"{row['max_abs_diff']:.1e} / {row['scale']:.1e}" if "max_abs_diff" in row else "–")
        shape = ("yes" if row.get("dim_ok") and row.get("preprocess_ok") else
                 f"dim {row.get('dim_ok')}, preprocess {row.get('preprocess_ok')}") if "dim_ok" in row else "–"
        print(f"| {row['model']} | {row.get('weights_gib', float('nan')):.2f} | {equal} | {shape} "
              f"| {row['build_rss_gib']:.2f} | {row['s_per_prompt']:.3f} | {row['submit_rss_gib']:.2f} "
              f"| {row['s_per_image']:.2f} | {row['search_rss_gib']:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
