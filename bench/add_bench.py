"""`img2prompt add` against a full build, in one run (issue #22): build N prompts, build 0.9·N and add the
other 0.1·N, and report each phase's seconds (encode, copy of the old rows, structure) beside the full build's.

    python bench/add_bench.py --prompts 10000 --clip-model out/tiny-clip

Stand-in CLIP (random weights) + real MiniLM on CPU: MiniLM dominates the encode time here. Prints figures;
asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import real_prompts

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
    args = parser.parse_args()
    prompts = real_prompts(args.prompts)
    cut = int(len(prompts) * 0.9)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "all.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        (tmp / "first.txt").write_text("\n".join(prompts[:cut]) + "\n", encoding="utf-8")
        (tmp / "rest.txt").write_text("\n".join(prompts[cut:]) + "\n", encoding="utf-8")

        def build(corpus: str, out: str):
            return timed(lambda: run_build(BuildOptions(corpus=[str(tmp / corpus)], out=str(tmp / out),
                                                        clip_model=args.clip_model, device="cpu", index=args.index,
                                                        progress=False)))

        full_s, full = build("all.txt", "full")
        base_s, _ = build("first.txt", "grown")
        add_s, added = timed(lambda: run_add(AddOptions(index=str(tmp / "grown"), corpus=[str(tmp / "rest.txt")],
                                                        device="cpu", progress=False)))
        full_t, add_t = full.manifest["timings_s"], added.manifest["timings_s"]
        encode = lambda t: t.get("encode_clip", 0) + t.get("encode_minilm", 0)  # noqa: E731
        print(f"prompts: {len(prompts):,} (first {cut:,}, added {len(prompts) - cut:,}); index {args.index}; CPU")
        print(f"full build: {full_s:.1f} s wall, encode {encode(full_t):.1f} s")
        print(f"build of the first 90%: {base_s:.1f} s wall")
        print(f"add of 10%: {add_s:.1f} s wall, encode {encode(add_t):.1f} s "
              f"({encode(add_t) / max(encode(full_t), 1e-9):.1%} of the full build's encode); "
              f"add ÷ full build wall = {add_s / full_s:.2f}")
        print("add phases (s): " + ", ".join(f"{name} {value:.1f}" for name, value in add_t.items()))


if __name__ == "__main__":
    main()
