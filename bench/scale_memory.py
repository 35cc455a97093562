"""Memory of each command against the index's size N: peak memory and first-answer time at 0.5M / 1M / 2M / 4M
prompts, with the fitted bytes per prompt (target ≈ 0 outside the stored vectors' page cache).

Index folders are written directly: a small real build with the stand-in models (img2prompt.stand_in: tiny
CLIP, tiny text model), then its row files replaced by N synthetic rows (prompts.parquet in PROMPT_GROUP_ROWS
row groups, random unit clip.f16 / minilm.f16) and the manifest's count, key range and file sizes updated
(sha256 left as built: the commands open without --verify). Each measurement runs in its own process;
peak anonymous memory (RssAnon sampled every 20 ms: what the command holds, not the page cache of the mapped
vectors) and ru_maxrss (which also counts the mapped pages it touched) are its own.

Commands: search (first answer of `search --text`, = serve's path), explain (64 queries × k 20 prompts fetched,
= `submit --explain`'s lookup), interrogate (one image), add-dedup (the index's dedup keys + a 10,000-prompt
corpus checked against them), build-dedup (a corpus of N prompts deduplicated).
Usage: python bench/scale_memory.py [--sizes 500000 1000000 2000000 4000000] [--work /tmp/scale-memory]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import anon_peak_sampler

COMMANDS = ("search", "explain", "interrogate", "add-dedup", "build-dedup")
WORDS = "red car castle portrait forest city night neon oil painting detailed river dragon robot ship".split()


def synthetic_prompts(low: int, high: int) -> list[str]:
    return [f"{WORDS[i % 15]} {WORDS[(i // 15) % 15]} {WORDS[(i // 225) % 15]} number {i}, trending on artstation"
            for i in range(low, high)]


def base_index(work: Path) -> Path:
    """A real index of 400 prompts built with the stand-in models."""
    from img2prompt.index.layout import MANIFEST

    out = work / "base"
    if (out / MANIFEST).exists():
        return out
    from img2prompt.build_index.runner import BuildOptions, run_build
    from img2prompt.stand_in import write_tiny_clip, write_tiny_text_model

    clip, text = write_tiny_clip(work / "clip"), write_tiny_text_model(work / "text")
    corpus = work / "base.txt"
    corpus.write_text("\n".join(synthetic_prompts(0, 400)) + "\n", encoding="utf-8")
    run_build(BuildOptions(corpus=[str(corpus)], out=str(out), clip_model=str(clip), text_model=str(text),
                           device="cpu", progress=False, index="flat"))
    return out


def scaled_index(base: Path, work: Path, count: int) -> Path:
    """`base` with its rows replaced by `count` synthetic ones (in the on-disk format, index/ writer's layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from img2prompt.index.layout import CLIP_VECTORS, MANIFEST, MINILM, PROMPT_GROUP_ROWS, PROMPTS

    out = work / f"idx-{count}"
    if (out / MANIFEST).exists():
        return out
    tmp = work / f".idx-{count}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    manifest = json.loads((tmp / MANIFEST).read_text())
    clip_dim, text_dim = manifest["models"]["clip"]["dim"], manifest["models"]["text"]["dim"]
    rng = np.random.default_rng(count)
    block = 262_144
    with pq.ParquetWriter(tmp / PROMPTS, pa.schema([("id", pa.int64()), ("prompt", pa.string()),
                                                               ("key", pa.string())])) as writer, \
            open(tmp / CLIP_VECTORS, "wb") as clip, open(tmp / MINILM, "wb") as minilm:
        for low in range(0, count, block):
            high = min(low + block, count)
            writer.write_table(pa.table({"id": np.arange(low, high, dtype=np.int64),
                                         "prompt": synthetic_prompts(low, high),
                                         "key": ["text"] * (high - low)}), row_group_size=PROMPT_GROUP_ROWS)
            for handle, dim in ((clip, clip_dim), (minilm, text_dim)):
                rows = rng.normal(size=(high - low, dim)).astype(np.float32)
                handle.write((rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16).tobytes())
    manifest["count"] = count
    for entry in manifest.get("key_ranges", []):
        entry["rows"] = [0, count]
    for name in (PROMPTS, CLIP_VECTORS, MINILM):
        manifest["files"][name]["bytes"] = (tmp / name).stat().st_size
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    tmp.rename(out)
    return out


def corpus_file(work: Path, count: int) -> Path:
    path = work / f"corpus-{count}.txt"
    if not path.exists():
        with open(path, "w", encoding="utf-8") as handle:
            for low in range(0, count, 262_144):  # every 10th prompt twice: duplicates to find
                prompts = synthetic_prompts(low, min(low + 262_144, count))
                handle.writelines(p + "\n" + (p.upper() + "\n" if i % 10 == 0 else "") for i, p in enumerate(prompts))
    return path


def run_command(command: str, folder: Path, work: Path, count: int) -> dict:
    """One command in this process: returns its first-answer seconds (open + first result)."""
    from img2prompt.api import open_index

    start = time.perf_counter()
    if command in ("search", "explain", "interrogate"):
        with open_index(folder, device="cpu") as index:
            if command == "search":
                index.search(texts=["a red car at night"], k=10)
            elif command == "explain":
                found = index.session.retriever.search(
                    index.session.clip.text_embeddings(synthetic_prompts(0, 64)).vectors, 20, query_kind="text")
                index.prompts(found.ids.ravel())
            else:
                from PIL import Image
                image = work / "image.png"
                Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(image)
                index.interrogate([str(image)], workers=0)
    elif command == "add-dedup":
        from img2prompt.build_index.corpus import iter_prompts
        from img2prompt.encoders.prompts import KeySet, dedup_keys
        from img2prompt.index.reader import open_index as open_reader

        index, seen = open_reader(folder), KeySet()
        for batch in index.stream_prompt_batches():
            seen.add_new(dedup_keys(batch))
        new = work / "new.txt"
        new.write_text("\n".join(synthetic_prompts(count - 5000, count + 5000)) + "\n", encoding="utf-8")
        assert sum(1 for _ in iter_prompts([new], known=(seen, "in_index"))) == 5000
    elif command == "build-dedup":
        from img2prompt.build_index.corpus import iter_prompts
        assert sum(1 for _ in iter_prompts([corpus_file(work, count)])) == count
    return {"seconds": time.perf_counter() - start}


def child(command: str, folder: Path, work: Path, count: int) -> None:
    from img2prompt.memory import fix_mmap_threshold
    fix_mmap_threshold()  # as the CLI does for every command
    import torch
    torch.set_num_threads(2)
    stop, anon = anon_peak_sampler(0.02)
    result = run_command(command, folder, work, count)
    stop.set()
    result.update(anon_peak=anon[0], peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000, 4_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale-memory"))
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        command, folder, count = args.child
        child(command, Path(folder), args.work, int(count))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    base = base_index(args.work)
    table: dict[str, list[dict]] = {command: [] for command in args.commands}
    for count in args.sizes:
        start = time.perf_counter()
        folder = scaled_index(base, args.work, count)
        if "build-dedup" in args.commands:
            corpus_file(args.work, count)
        print(f"{count:,} prompts written in {time.perf_counter() - start:.0f} s", flush=True)
        for command in args.commands:
            out = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--child", command, str(folder),
                                  str(count)], capture_output=True, text=True)
            if out.returncode:
                print(f"{command} at {count:,}: failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            row = {"count": count, **json.loads(out.stdout.strip().splitlines()[-1])}
            table[command].append(row)
            print(f"  {command}: {row['seconds']:.2f} s, peak anon {row['anon_peak'] / 2**20:.0f} MiB, "
                  f"ru_maxrss {row['peak_rss'] / 2**20:.0f} MiB", flush=True)
    print("\n| command | " + " | ".join(f"{n / 1e6:g}M: s / anon MiB / maxrss MiB" for n in args.sizes)
          + " | fitted anon B/prompt | fitted maxrss B/prompt | fitted µs/prompt (time) |")
    print("|---" * (len(args.sizes) + 4) + "|")
    for command, rows in table.items():
        cells = {row["count"]: f"{row['seconds']:.2f} / {row['anon_peak'] / 2**20:.0f} / {row['peak_rss'] / 2**20:.0f}"
                 for row in rows}
        fits = []
        for key, scale in (("anon_peak", 1), ("peak_rss", 1), ("seconds", 1e6)):
            fits.append(f"{np.polyfit([r['count'] for r in rows], [r[key] for r in rows], 1)[0] * scale:.3g}"
                        if len(rows) >= 2 else "–")
        print(f"| {command} | " + " | ".join(cells.get(n, "–") for n in args.sizes) + " | " + " | ".join(fits) + " |")


if __name__ == "__main__":
    main()
