"""CLIP text encoding: naive loop (every prompt padded to 77 tokens, input order) vs the length-bucketed
encoder (sorted by token length, each batch cut to its longest prompt). Same outputs, measured speed-up.

    python bench/text_encoding.py [--arch ViT-B-32] [--prompts 2000] [--batch-size 128]
    python bench/text_encoding.py --device cuda --prompts 20000 --batch-size 512
Random weights of the real architecture (speed does not depend on the weights); CPU unless --device cuda
(fp16 autocast there, as the build runs it; each timing waits for the GPU).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import add_device_flag, check_device, random_clip, real_prompts, synchronize
from img2prompt.encoders.text import clip_text_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    add_device_flag(parser)
    args = parser.parse_args()
    check_device(args.device)
    rng = np.random.default_rng(0)
    pool = real_prompts()
    prompts = [pool[i] for i in rng.choice(len(pool), size=args.prompts, replace=False)]
    clip = random_clip(args.arch, args.device)
    lengths = (clip.tokenizer(prompts) != 0).sum(1).float()
    print(f"{args.arch} on {args.device}, {len(prompts)} real prompts, {torch.get_num_threads()} threads; token length "
          f"median {lengths.median():.0f}, mean {lengths.mean():.1f}, at 77: {(lengths >= 77).float().mean():.1%}")
    results = {}
    if args.device != "cpu":  # first CUDA calls (context, cuBLAS handles) are not the encoder's cost
        clip_text_embeddings(clip, prompts[:args.batch_size], args.batch_size)
        synchronize(args.device)
    for name, bucketed in (("naive padded", False), ("bucketed", True)):
        started = time.perf_counter()
        result = clip_text_embeddings(clip, prompts, args.batch_size, bucketed=bucketed)
        synchronize(args.device)
        seconds = time.perf_counter() - started
        results[name] = (result.vectors, seconds)
        print(f"{name:>13}: {len(prompts) / seconds:7.1f} prompts/s ({seconds:.1f} s)")
    naive, bucketed = results["naive padded"], results["bucketed"]
    print(f"speed-up {naive[1] / bucketed[1]:.2f}x; max |difference| {np.abs(naive[0] - bucketed[0]).max():.2e}; "
          f"truncated prompts {result.truncated}")


if __name__ == "__main__":
    main()
