"""Where `submit` spends its time: decode / encode / search / blend / write, for N generated 512×512 PNGs
(the competition's image size) against an index of the shipped sample corpus, through the public API
(`img2prompt.build`, then `img2prompt.open_index(...).submission(...)`).

    python bench/submit_split.py --images 200 [--arch ViT-B-32] [--device cuda] [--workers N]
--arch: a real open_clip architecture with random weights (real encode cost); default the tiny stand-in.
"decode" is summed over the decoding workers (CPU seconds); with workers it overlaps "encode", so the
phases then add up to more than the wall time.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import REPO, add_device_flag, check_device


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((512, 512), Image.BICUBIC).save(folder / f"{number:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--arch", help="e.g. ViT-B-32 (random weights); default: the tiny stand-in CLIP")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: submit's own, 256 on GPU, 64 on CPU)")
    parser.add_argument("--workers", type=int, help="decoding workers (default: submit's own, 0 on CPU)")
    add_device_flag(parser)
    args = parser.parse_args()
    check_device(args.device)
    import open_clip
    import torch

    import img2prompt
    from img2prompt.stand_in import write_tiny_clip

    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        config = open_clip.get_model_config(args.arch) if args.arch else None
        clip_dir = write_tiny_clip(temp / "clip", config=config)
        img2prompt.build(str(REPO / "data" / "prompts.txt"), temp / "index", clip_model=str(clip_dir),
                         device=args.device, progress=False)
        write_images(temp / "images", args.images)
        started = time.perf_counter()
        with img2prompt.open_index(temp / "index", device=args.device) as index:
            opened = time.perf_counter() - started
            report = index.submission(temp / "images", temp / "submission.csv", batch_size=args.batch_size,
                                      workers=args.workers, progress=False)
        total = time.perf_counter() - started
    t = report.timings_s
    print(f"{args.images} images, CLIP {args.arch or 'tiny stand-in'} on {args.device}, {torch.get_num_threads()} "
          f"threads, workers {'default' if args.workers is None else args.workers}, batch {args.batch_size or 'default'}; "
          f"total {total:.1f} s (open_index {opened:.1f} s); decode+encode {report.images_per_s} images/s")
    for name in ("decode", "encode", "search", "blend", "write"):
        if name in t:
            print(f"  {name:>7}: {t[name]:7.2f} s  ({args.images / max(t[name], 1e-9):8.1f} images/s)")


if __name__ == "__main__":
    main()
