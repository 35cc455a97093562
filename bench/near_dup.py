"""Near-duplicate removal on the real corpora: how many prompts fall at T = 0.95 / 0.9 / 0.8, and how well the
streaming filter (brute force, then IVF-Flat over kept vectors) agrees with an exact brute-force reference.

MiniLM-embeds the 64k prompts of ../shared/corpora once and caches the vectors under /tmp (never in the repo).
Usage: python bench/near_dup.py [--cache /tmp/neardup/minilm-64k.npy] [--exact-until 50000]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

CORPORA = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpora"
FILES = ("sd-prompts-dedup-43k.txt", "openprompts-dedup-21k.txt")


def load_prompts() -> list[str]:
    prompts: list[str] = []
    for name in FILES:
        lines = (CORPORA / name).read_text(encoding="utf-8").splitlines()
        prompts.extend(line.strip() for line in lines if line.strip())
    return prompts


def embed(prompts: list[str], cache: Path) -> np.ndarray:
    if cache.exists():
        return np.load(cache)
    from img2prompt.encoders.models import load_text_model
    from img2prompt.encoders.text import minilm_embeddings
    model = load_text_model()
    start = time.perf_counter()
    vectors = minilm_embeddings(model, prompts).astype(np.float32)
    print(f"embedded {len(prompts)} prompts in {time.perf_counter() - start:.0f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=Path("/tmp/neardup/minilm-64k.npy"))
    parser.add_argument("--exact-until", type=int, default=50_000)
    parser.add_argument("--embed-only", action="store_true")
    args = parser.parse_args()
    prompts = load_prompts()
    vectors = embed(prompts, args.cache)
    if args.embed_only:
        return
    from build_index.near_dup import near_dup_mask
    print(f"{len(prompts)} prompts, dim {vectors.shape[1]}")
    print("| T | dropped (exact) | dropped (streaming) | decisions agreeing | streaming s | exact s |")
    print("|---|---|---|---|---|---|")
    for threshold in (0.95, 0.9, 0.8):
        start = time.perf_counter()
        exact, _ = near_dup_mask(vectors, threshold, exact_until=len(vectors) + 1)
        exact_s = time.perf_counter() - start
        start = time.perf_counter()
        mask, stats = near_dup_mask(vectors, threshold, exact_until=args.exact_until)
        stream_s = time.perf_counter() - start
        agree = float((mask == exact).mean())
        print(f"| {threshold} | {int((~exact).sum())} | {stats.dropped} | {agree:.5f} | {stream_s:.1f} | {exact_s:.1f} |")


if __name__ == "__main__":
    main()
