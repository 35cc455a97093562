"""Memory of each command against the index's size N: peak memory and whole-command time at 0.5M / 1M / 2M / 4M
prompts, with the fitted bytes per prompt (target ≈ 0 outside the stored vectors' page cache; dedup ≤ 16 B).

Index folders are written directly (in a child process, so that the measuring processes do not inherit its
memory high-water mark): a small real build with the stand-in models (img2prompt.stand_in: tiny CLIP, tiny text
model), then its row files replaced by N synthetic rows (prompts.parquet in PROMPT_GROUP_ROWS row groups, random
unit clip.f16 / minilm.f16, prompt_keys.npy written by index/prompt_keys.py as consolidate writes it) and the
manifest's count, key range and file sizes updated (sha256 left as built: the commands open without --verify).
Each measurement runs in its own process: peak anonymous memory (RssAnon sampled every 20 ms: what the command
holds, not the page cache of the mapped vectors and key files) and VmHWM (the process's peak RSS, which also
counts the mapped pages it touched).

Commands:
  search        first answer of `search --text` (= serve's path)
  explain       64 queries × k 20 prompts fetched (= `submit --explain`'s lookup)
  interrogate   one image
  eval          `eval` in text mode on 64 labels (half of them in the index): the leakage pass (every prompt
                hashed, streamed) and the prompts fetched
  add           the real `add` (api.add): a 10,000-prompt corpus (5,000 already in the index) into a hard-linked
                copy of the index (the add swaps its grown folder in; the copy is dropped after)
  add-prekeys   the same on a copy whose manifest lists no prompt_keys.npy (an index written before them): its
                keys are computed once and stored by this add
  add-neardup   `add --near-dup 0.95` on such a copy: one pass over every old MiniLM row (build_index/near_dup.py)
  add-dedup     add's dedup alone: the index's stored keys (IndexKeys) + the corpus checked against them
  merge-dedup   merge's dedup alone (FirstSeen) over the prompts of two inputs, N/2 then N prompts (N/2 shared)
  merge         the real `merge` (api.merge) of the same two inputs into a new folder (dropped after)
  build-dedup   a corpus of 1.1 N lines (10% case-changed repeats) deduplicated as build reads it

Usage: python bench/scale_memory.py [--sizes 500000 1000000 2000000 4000000] [--commands ...]
                                    [--work /tmp/scale-memory-keys]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import anon_peak_sampler

COMMANDS = ("search", "explain", "interrogate", "eval", "add", "add-prekeys", "add-neardup", "add-dedup",
            "merge-dedup", "merge", "build-dedup")
WORDS = "red car castle portrait forest city night neon oil painting detailed river dragon robot ship".split()
ADD_PROMPTS = 10_000


def synthetic_prompts(low: int, high: int) -> list[str]:
    return [f"{WORDS[i % 15]} {WORDS[(i // 15) % 15]} {WORDS[(i // 225) % 15]} number {i}, trending on artstation"
            for i in range(low, high)]


# the 50M recipe's layout (README "A 50M-prompt index on Kaggle"): 768-d CLIP keys PCA-projected to 704, 384-d
# MiniLM stored int8; stand-in models of those widths (random weights: only sizes and code paths are real)
RECIPE = {"clip_dim": 768, "text_dim": 384, "key_dims": 704, "minilm_dtype": "int8"}


def base_index(work: Path, recipe: bool = False) -> Path:
    """A real index of 400 prompts built with the stand-in models (tiny widths, fp16; `recipe`: RECIPE's layout)."""
    from img2prompt.index.layout import MANIFEST

    out = work / "base"
    if (out / MANIFEST).exists():
        return out
    from img2prompt.build_index.runner import BuildOptions, run_build
    from img2prompt.stand_in import TINY_CLIP_CONFIG, write_tiny_clip, write_tiny_text_model

    layout = {"key_dims": RECIPE["key_dims"], "minilm_dtype": RECIPE["minilm_dtype"]} if recipe else {}
    clip = write_tiny_clip(work / "clip", config=dict(TINY_CLIP_CONFIG, embed_dim=RECIPE["clip_dim"]) if recipe else None)
    text = write_tiny_text_model(work / "text", **({"dim": RECIPE["text_dim"]} if recipe else {}))
    corpus = work / "base.txt"
    corpus.write_text("\n".join(synthetic_prompts(0, 400)) + "\n", encoding="utf-8")
    run_build(BuildOptions(corpus=[str(corpus)], out=str(out), clip_model=str(clip), text_model=str(text),
                           device="cpu", progress=False, index="flat", **layout))
    return out


def random_unit_blocks(rng: np.random.Generator, count: int, dim: int, block: int = 262_144):
    """float16 blocks of random unit rows (count rows in all)."""
    for low in range(0, count, block):
        rows = rng.normal(size=(min(block, count - low), dim)).astype(np.float32)
        yield (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def write_vectors(folder: Path, manifest: dict, count: int, blocks, sparse: bool = False) -> list[str]:
    """clip.f16 (at the key dim: the PCA's when the index has one) and the MiniLM file(s) in the manifest's dtype,
    each from `blocks(kind, count, dim)` (float16 blocks; for an int8 index, MiniLM blocks may come quantised
    already as (int8 rows, scale) pairs); `sparse`: files of the right size holding no data
    (zeros, no disk: for inputs whose vectors a measurement never reads). Returns the names written."""
    from img2prompt.index.layout import CLIP_VECTORS, MINILM, MINILM_I8, MINILM_SCALE
    from img2prompt.index.minilm_store import INT8, minilm_dtype, minilm_file_bytes, quantise

    key_dim = (manifest.get("key_pca") or {}).get("dims") or manifest["models"]["clip"]["dim"]
    text_dim, dtype = manifest["models"]["text"]["dim"], minilm_dtype(manifest)
    sizes = {CLIP_VECTORS: count * key_dim * 2, **minilm_file_bytes(dtype, count, text_dim)}
    if sparse:
        for name, size in sizes.items():
            with open(folder / name, "wb") as handle:
                handle.truncate(size)
        return list(sizes)
    with open(folder / CLIP_VECTORS, "wb") as clip:
        for rows in blocks("clip", count, key_dim):
            clip.write(rows.tobytes())
    if dtype == INT8:
        with open(folder / MINILM_I8, "wb") as quantised_file, open(folder / MINILM_SCALE, "wb") as scale_file:
            for rows in blocks("minilm", count, text_dim):
                quantised, scale = rows if isinstance(rows, tuple) else quantise(rows)
                quantised_file.write(quantised.tobytes())
                scale_file.write(scale.tobytes())
    else:
        with open(folder / MINILM, "wb") as handle:
            for rows in blocks("minilm", count, text_dim):
                handle.write(rows.tobytes())
    return list(sizes)


def scaled_index(base: Path, work: Path, count: int, blocks=None, sparse: bool = False) -> Path:
    """`base` with its rows replaced by `count` synthetic ones (in the on-disk format, index/ writer's layout):
    vectors from `blocks(kind, count, dim)` (default: random unit rows), see write_vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from img2prompt.index.layout import MANIFEST, PROMPT_GROUP_ROWS, PROMPT_KEYS, PROMPTS
    from img2prompt.index.prompt_keys import write_prompt_keys

    out = work / f"idx-{count}"
    if (out / MANIFEST).exists():
        return out
    tmp = work / f".idx-{count}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    manifest = json.loads((tmp / MANIFEST).read_text())
    rng = np.random.default_rng(count)
    blocks = blocks or (lambda kind, rows, dim: random_unit_blocks(rng, rows, dim))
    block = 262_144
    with pq.ParquetWriter(tmp / PROMPTS, pa.schema([("id", pa.int64()), ("prompt", pa.string()),
                                                     ("key", pa.string())])) as writer:
        for low in range(0, count, block):
            high = min(low + block, count)
            writer.write_table(pa.table({"id": np.arange(low, high, dtype=np.int64),
                                         "prompt": synthetic_prompts(low, high),
                                         "key": ["text"] * (high - low)}), row_group_size=PROMPT_GROUP_ROWS)
    vectors = write_vectors(tmp, manifest, count, blocks, sparse)
    write_prompt_keys(tmp, (synthetic_prompts(low, min(low + block, count)) for low in range(0, count, block)),
                      count)
    manifest["count"] = count
    for entry in manifest.get("key_ranges", []):
        entry["rows"] = [0, count]
    for name in (PROMPTS, PROMPT_KEYS, *vectors):
        manifest["files"].setdefault(name, {})["bytes"] = (tmp / name).stat().st_size
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


def add_corpus(work: Path, count: int) -> Path:
    """ADD_PROMPTS prompts: the index's last ADD_PROMPTS / 2, then as many new ones."""
    path = work / f"add-{count}.txt"
    path.write_text("\n".join(synthetic_prompts(count - ADD_PROMPTS // 2, count + ADD_PROMPTS // 2)) + "\n",
                    encoding="utf-8")
    return path


def linked_copy(folder: Path, out: Path, strip_keys: bool = False) -> Path:
    """A copy of the index folder whose files are hard links (an add never changes a file in place);
    `strip_keys`: its manifest lists no prompt_keys.npy (an index written before them)."""
    from img2prompt.index.layout import MANIFEST, PROMPT_KEYS

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out, copy_function=os.link)
    manifest = json.loads((folder / MANIFEST).read_text())
    if strip_keys:
        for name in [name for name in manifest["files"] if name.endswith(PROMPT_KEYS)]:
            del manifest["files"][name]
            (out / name).unlink()
    (out / MANIFEST).unlink()  # a file of its own, not a link to the original's
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def models(work: Path) -> dict:
    # resolved: a model's identity is its path as the index's manifest records it (a symlinked --work differs)
    return {"clip_model": str((work / "clip").resolve()), "text_model": str((work / "text").resolve()),
            "device": "cpu", "progress": False}


def run_query(command: str, folder: Path, work: Path) -> None:
    from img2prompt.api import open_index

    with open_index(folder, device="cpu") as index:
        if command == "search":
            index.search(texts=["a red car at night"], k=10)
        elif command == "explain":
            found = index.session.retriever.search(
                index.session.clip.text_embeddings(synthetic_prompts(0, 64)).vectors, 20, query_kind="text")
            index.prompts(found.ids.ravel())
        elif command == "eval":
            count = index.session.index.count
            labels = work / f"labels-{count}.csv"
            prompts = synthetic_prompts(count - 32, count + 32)  # 32 in the index, 32 not
            labels.write_text("imgId,prompt\n" + "".join(f"q{i},\"{p}\"\n" for i, p in enumerate(prompts)))
            report = index.evaluate(labels, text_model=str(work / "text"), progress=False)
            assert report["leakage"]["true_prompts_in_corpus"] == 32, report["leakage"]
        else:
            from PIL import Image
            image = work / "image.png"
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(image)
            index.interrogate([str(image)], workers=0)


def run_command(command: str, folder: Path, work: Path, count: int) -> dict:
    """One command in this process; returns what it checked besides the time."""
    import img2prompt

    if command in ("search", "explain", "interrogate", "eval"):
        run_query(command, folder, work)
    elif command in ("add", "add-prekeys", "add-neardup"):
        near_dup = {"near_dup": 0.95} if command == "add-neardup" else {}
        result = img2prompt.add(folder, add_corpus(work, count), **models(work), **near_dup)
        assert near_dup or result.report["added"] == ADD_PROMPTS // 2, result.report
        return {"added": result.report["added"], "keys_files": sorted(
            name for name in result.manifest["files"] if name.endswith("prompt_keys.npy"))}
    elif command == "add-dedup":
        from img2prompt.build_index.corpus import iter_prompts
        from img2prompt.index.prompt_keys import IndexKeys
        from img2prompt.index.reader import open_index as open_reader

        seen = IndexKeys.of_index(open_reader(folder))
        kept = sum(1 for _ in iter_prompts([add_corpus(work, count)], known=(seen, "in_index")))
        assert kept == ADD_PROMPTS // 2 and seen.computed_rows == 0
    elif command in ("merge-dedup", "merge"):
        inputs = [work / f"idx-{count // 2}", folder]
        if command == "merge":
            result = img2prompt.merge(inputs, work / f"merged-{count}", **models(work))
            assert result.report["kept"] == count, result.report
            return {"kept": result.report["kept"]}
        from img2prompt.encoders.prompts import dedup_keys
        from img2prompt.index.prompt_keys import FirstSeen
        from img2prompt.index.reader import open_index as open_reader

        seen, kept = FirstSeen(), 0
        for path in inputs:
            opened = open_reader(path)
            seen.start(opened)
            for batch in opened.stream_prompt_batches():
                kept += int(seen.add_new(dedup_keys(batch)).sum())
        assert kept == count and seen.computed_rows == 0, kept
    elif command == "build-dedup":
        from img2prompt.build_index.corpus import iter_prompts
        assert sum(1 for _ in iter_prompts([corpus_file(work, count)])) == count
    return {}


def vm_hwm() -> int:
    """This process's peak resident set (VmHWM: reset at exec, unlike ru_maxrss, which a child inherits)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def child(command: str, folder: Path, work: Path, count: int) -> None:
    from img2prompt.memory import fix_mmap_threshold
    fix_mmap_threshold()  # as the CLI does for every command
    import torch
    torch.set_num_threads(2)
    stop, anon = anon_peak_sampler(0.02)
    start = time.perf_counter()
    result = run_command(command, folder, work, count)
    result["seconds"] = time.perf_counter() - start
    stop.set()
    result.update(anon_peak=anon[0], peak_rss=vm_hwm())
    print(json.dumps(result))


def prepare(work: Path, count: int, commands: list[str]) -> None:
    """The index folders (and corpus) the commands need at this size; run in a child of its own."""
    base = base_index(work)
    scaled_index(base, work, count)
    if {"merge", "merge-dedup"} & set(commands):
        scaled_index(base, work, count // 2)
    if "build-dedup" in commands:
        corpus_file(work, count)


def measure(command: str, folder: Path, work: Path, count: int) -> dict | None:
    target = folder
    if command in ("add", "add-prekeys", "add-neardup"):
        target = linked_copy(folder, work / f"add-copy-{count}", strip_keys=command == "add-prekeys")
    try:
        out = subprocess.run([sys.executable, __file__, "--work", str(work), "--child", command, str(target),
                              str(count)], capture_output=True, text=True)
    finally:
        for pattern in (f"add-copy-{count}", f".add-copy-{count}.*", f"merged-{count}", f".merged-{count}.*"):
            for leftover in work.glob(pattern):  # the folders and any staging / retired one beside them
                shutil.rmtree(leftover, ignore_errors=True)
    if out.returncode:
        print(f"{command} at {count:,}: failed: {out.stderr.strip().splitlines()[-3:]}", flush=True)
        return None
    return {"count": count, **json.loads(out.stdout.strip().splitlines()[-1])}


def print_table(table: dict[str, list[dict]], sizes: list[int]) -> None:
    print("\n| command | " + " | ".join(f"{n / 1e6:g}M: s / anon MiB / VmHWM MiB" for n in sizes)
          + " | fitted anon B/prompt | fitted VmHWM B/prompt | fitted µs/prompt (time) |")
    print("|---" * (len(sizes) + 4) + "|")
    for command, rows in table.items():
        cells = {row["count"]: f"{row['seconds']:.2f} / {row['anon_peak'] / 2**20:.0f} / {row['peak_rss'] / 2**20:.0f}"
                 for row in rows}
        fits = []
        for key, scale in (("anon_peak", 1), ("peak_rss", 1), ("seconds", 1e6)):
            fits.append(f"{np.polyfit([r['count'] for r in rows], [r[key] for r in rows], 1)[0] * scale:.3g}"
                        if len(rows) >= 2 else "–")
        print(f"| {command} | " + " | ".join(cells.get(n, "–") for n in sizes) + " | " + " | ".join(fits) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000, 4_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale-memory-keys"))
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=COMMANDS)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        command, folder, count = args.child
        child(command, Path(folder), args.work, int(count))
        return
    if args.prepare:
        prepare(args.work, args.prepare, args.commands)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    table: dict[str, list[dict]] = {command: [] for command in args.commands}
    for count in args.sizes:
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--work", str(args.work), "--prepare", str(count), "--commands",
                        *args.commands], check=True)
        print(f"{count:,} prompts written in {time.perf_counter() - start:.0f} s (load {os.getloadavg()[0]:.1f})",
              flush=True)
        for command in args.commands:
            row = measure(command, args.work / f"idx-{count}", args.work, count)
            if row is None:
                continue
            table[command].append(row)
            extra = {key: value for key, value in row.items()
                     if key not in ("count", "seconds", "anon_peak", "peak_rss")}
            print(f"  {command}: {row['seconds']:.2f} s, peak anon {row['anon_peak'] / 2**20:.0f} MiB, "
                  f"VmHWM {row['peak_rss'] / 2**20:.0f} MiB, load {os.getloadavg()[0]:.1f}"
                  + (f" {extra}" if extra else ""), flush=True)
    print_table(table, args.sizes)


if __name__ == "__main__":
    main()
