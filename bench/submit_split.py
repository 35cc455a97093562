"""Where `submit` spends its time: decode / encode / search / blend / write, for N generated 512×512 PNGs
(the competition's image size) against an index of the shipped sample corpus.

    python bench/submit_split.py --images 200 [--arch ViT-B-32]
--arch: a real open_clip architecture with random weights (real encode cost); default the tiny stand-in.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import REPO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--arch", help="e.g. ViT-B-32 (random weights); default: the tiny stand-in CLIP")
    args = parser.parse_args()
    import open_clip
    import torch

    from img2prompt.build_index.runner import BuildOptions, run_build
    from img2prompt.query.submit import SubmitOptions, run_submit
    from img2prompt.stand_in import write_tiny_clip

    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        if args.arch:
            clip_dir = temp / "clip"
            clip_dir.mkdir()
            config = open_clip.get_model_config(args.arch)
            write_tiny_clip(clip_dir, config=config)
        else:
            clip_dir = write_tiny_clip(temp / "clip")
        run_build(BuildOptions(corpus=[str(REPO / "data" / "prompts.txt")], out=str(temp / "index"),
                               clip_model=str(clip_dir), device="cpu", progress=False))
        images = temp / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for number in range(args.images):
            base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(base).resize((512, 512), Image.BICUBIC).save(images / f"{number:05d}.png")
        started = time.perf_counter()
        report = run_submit(SubmitOptions(index=str(temp / "index"), images=str(images), out=str(temp / "s.csv"),
                                          device="cpu", progress=False))
        total = time.perf_counter() - started
    t = report.timings_s
    print(f"{args.images} images, CLIP {args.arch or 'tiny stand-in'}, {torch.get_num_threads()} threads, total {total:.1f} s "
          f"(model loading included)")
    for name in ("decode", "encode", "search", "blend", "write"):
        print(f"  {name:>7}: {t[name]:7.2f} s  ({args.images / max(t[name], 1e-9):8.1f} images/s)")


if __name__ == "__main__":
    main()
