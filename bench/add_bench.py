"""`img2prompt add` against a full build, in one run (issue #22): build N prompts, build 0.9·N and add the
other 0.1·N, and report each phase's seconds (encode, append of the new segment, structure) beside the full
build's, and how many bytes of the old index the add wrote again (0: its row files are linked).

    python bench/add_bench.py --prompts 10000 --clip-model out/tiny-clip
    python bench/add_bench.py --prompts 1000000 --clip-model out/tiny-clip --stand-in-text --index hnsw

Stand-in CLIP (random weights) + real MiniLM on CPU, or with --stand-in-text a 1-layer random text model
(img2prompt.stand_in.write_tiny_text_model: tokenizer-bound like a GPU build, so 1M prompts fit in minutes).
Beyond the real corpora's prompts, prompts are made distinct by a numbered suffix (bench/common.py).
Prints figures; asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import synthetic_prompts

from img2prompt.build_index.add import AddOptions, run_add
from img2prompt.build_index.runner import BuildOptions, run_build


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--clip-model", required=True, help="e.g. out/tiny-clip (python -m img2prompt.stand_in)")
    parser.add_argument("--index", default="flat")
    parser.add_argument("--stand-in-text", action="store_true",
                        help="a 1-layer random text model instead of the real MiniLM (speed only: its vectors "
                             "mean nothing)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    prompts = synthetic_prompts(args.prompts)
    cut = int(len(prompts) * 0.9)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text_model = None
        if args.stand_in_text:
            from img2prompt.stand_in import write_tiny_text_model

            text_model = str(write_tiny_text_model(tmp / "tiny-text"))
        (tmp / "all.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        (tmp / "first.txt").write_text("\n".join(prompts[:cut]) + "\n", encoding="utf-8")
        (tmp / "rest.txt").write_text("\n".join(prompts[cut:]) + "\n", encoding="utf-8")

        def build(corpus: str, out: str):
            return timed(lambda: run_build(BuildOptions(corpus=[str(tmp / corpus)], out=str(tmp / out),
                                                        clip_model=args.clip_model, text_model=text_model,
                                                        device="cpu", index=args.index, progress=False,
                                                        batch_size=args.batch_size)))

        full_s, full = build("all.txt", "full")
        base_s, _ = build("first.txt", "grown")
        old_files = {path: path.stat().st_ino for path in (tmp / "grown").rglob("*") if path.is_file()}
        add_s, added = timed(lambda: run_add(AddOptions(index=str(tmp / "grown"), corpus=[str(tmp / "rest.txt")],
                                                        text_model=text_model, device="cpu", progress=False,
                                                        batch_size=args.batch_size)))
        rewritten = sum(path.stat().st_size for path in (tmp / "grown").rglob("*") if path.is_file()
                        and path in old_files and path.stat().st_ino != old_files[path])
        kept = sum(path.stat().st_size for path in (tmp / "grown").rglob("*") if path.is_file()
                   and path in old_files and path.stat().st_ino == old_files[path])
        full_t, add_t = full.manifest["timings_s"], added.manifest["timings_s"]
        encode = lambda t: t.get("encode_clip", 0) + t.get("encode_minilm", 0)  # noqa: E731
        print(f"prompts: {len(prompts):,} (first {cut:,}, added {len(prompts) - cut:,}); index {args.index}; CPU; "
              f"text model {'stand-in' if text_model else 'MiniLM'}")
        print(f"full build: {full_s:.1f} s wall, encode {encode(full_t):.1f} s")
        print(f"build of the first 90%: {base_s:.1f} s wall")
        print(f"add of 10%: {add_s:.1f} s wall, encode {encode(add_t):.1f} s "
              f"({encode(add_t) / max(encode(full_t), 1e-9):.1%} of the full build's encode); "
              f"add ÷ full build wall = {add_s / full_s:.2f}")
        print("add phases (s): " + ", ".join(f"{name} {value:.1f}" for name, value in add_t.items()))
        print("full build phases (s): " + ", ".join(f"{name} {value:.1f}" for name, value in full_t.items()))
        print(f"old index files kept as they were (linked): {kept / 2**20:.1f} MiB; written again: "
              f"{rewritten / 2**20:.1f} MiB (the derived files: search structure, head, phrases, mean)")


if __name__ == "__main__":
    main()
