"""Near-duplicate removal on the real corpora: how many prompts fall at T = 0.95 / 0.9 / 0.8, and how well the
sharded filter (build_index/near_dup.py: coarse cells, exact within them) agrees with an independent exact reference.

Prompts are normalised and deduplicated the way build does (img2prompt.encoders.prompts), then MiniLM-embedded
once and cached under /tmp (never in the repo); --vectors reuses a cache made elsewhere (rows in corpus order).
Usage: python bench/near_dup.py [--vectors /tmp/ndfig/minilm-64k.npy] [--limit N] [--forced-small 5000]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

CORPORA = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpora"
FILES = ("sd-prompts-dedup-43k.txt", "openprompts-dedup-21k.txt")
THRESHOLDS = (0.95, 0.9, 0.8)


def load_prompts() -> list[str]:
    """Corpus order, normalised, exact duplicates (case/whitespace-insensitive) dropped — as build does."""
    from img2prompt.encoders.prompts import dedup_key, normalise_prompt
    prompts: list[str] = []
    seen: set[int] = set()
    for name in FILES:
        for line in (CORPORA / name).read_text(encoding="utf-8").splitlines():
            prompt = normalise_prompt(line)
            key = dedup_key(prompt) if prompt else None
            if prompt and key not in seen:
                seen.add(key)
                prompts.append(prompt)
    return prompts


def embed(prompts: list[str], cache: Path) -> np.ndarray:
    if cache.exists():
        return np.load(cache)
    import torch
    from img2prompt.encoders.models import load_text_model
    from img2prompt.encoders.text import minilm_embeddings
    torch.set_num_threads(2)
    model = load_text_model()
    start = time.perf_counter()
    vectors = minilm_embeddings(model, prompts).astype(np.float32)
    print(f"embedded {len(prompts)} prompts in {time.perf_counter() - start:.0f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


def reference_masks(vectors: np.ndarray, thresholds: tuple[float, ...], chunk: int = 512) -> dict[float, np.ndarray]:
    """Exact greedy reference, independent of build_index/near_dup.py: row i is kept iff its cosine to every EARLIER KEPT
    row is < T (first kept wins). One chunked matmul against all earlier rows serves every threshold."""
    keep = {t: np.ones(len(vectors), dtype=bool) for t in thresholds}
    for start in range(0, len(vectors), chunk):
        stop = min(start + chunk, len(vectors))
        sims = vectors[start:stop] @ vectors[:stop].T
        for t in thresholds:
            hits = sims >= t
            mask = keep[t]
            for i in range(start, stop):
                row = hits[i - start, :i]
                if row.any() and (row & mask[:i]).any():
                    mask[i] = False
    return keep


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", "--cache", dest="vectors", type=Path, default=Path("/tmp/ndfig/minilm-64k.npy"))
    parser.add_argument("--limit", type=int, default=0, help="only the first N rows (0 = all)")
    parser.add_argument("--forced-small", type=int, default=5_000, help="exact (one cell) only up to N rows")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--embed-only", action="store_true")
    args = parser.parse_args()
    vectors = embed(load_prompts(), args.vectors) if not args.vectors.exists() else np.load(args.vectors)
    if args.embed_only:
        return
    if args.limit:
        vectors = vectors[:args.limit]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    from img2prompt.build_index.near_dup import NearDupParams, near_dup_mask
    print(f"{len(vectors)} rows, dim {vectors.shape[1]}")
    start = time.perf_counter()
    ref = reference_masks(vectors, tuple(args.thresholds))
    ref_s = time.perf_counter() - start
    print(f"reference (every T in one pass): {ref_s:.1f} s")
    print("| T | dropped (reference) | filter run | dropped (filter) | decisions agreeing | filter s | method |")
    print("|---|---|---|---|---|---|---|")
    for t in args.thresholds:
        for label, params in (("default", NearDupParams()),
                              (f"cells above {args.forced_small}", NearDupParams(small_rows=args.forced_small))):
            start = time.perf_counter()
            mask, stats = near_dup_mask(vectors, t, params=params)
            secs = time.perf_counter() - start
            agree = float((mask == ref[t]).mean())
            print(f"| {t} | {int((~ref[t]).sum())} | {label} | {stats.dropped} | "
                  f"{agree:.5f} | {secs:.1f} | {stats.method} |", flush=True)


if __name__ == "__main__":
    main()
