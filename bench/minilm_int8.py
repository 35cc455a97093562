"""int8 MiniLM storage: its cost in prediction quality on real prompts, and bytes per prompt.

    python bench/minilm_int8.py [--corpus-size 4000] [--k 10]

Real MiniLM (all-MiniLM-L6-v2) vectors of real prompts: a seeded sample of ../shared/corpora is the index,
the queries are /work/shared/kaggle-sample prompts.csv + data/heldout.csv + a seeded sample of corpus rows
queried leave-one-out (index/minilm_store.prediction_change). CPU only, so the neighbours are found by MiniLM
similarity (a stand-in for CLIP keys: the blend weights and neighbour sets are of the same kind). The
figure is mean |cos(pred_fp16, truth) − cos(pred_int8, truth)| with pred = softmax(s / 0.05)-weighted mean
of the k neighbours' stored MiniLM rows.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from common import REPO, real_prompts
from img2prompt.index.minilm_store import Int8Rows, prediction_change, quantise

KAGGLE = REPO.parent / "shared" / "kaggle-sample" / "prompts.csv"
HELDOUT = REPO / "data" / "heldout.csv"


def csv_prompts(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["prompt"] for row in csv.DictReader(handle) if row.get("prompt")]


def external_change(corpus: np.ndarray, compact: Int8Rows, queries: np.ndarray, k: int) -> np.ndarray:
    """|Δcos| for queries outside the index (their truth is their own MiniLM vector, fp32)."""
    scores = queries @ np.asarray(corpus, np.float32).T
    ids = np.argsort(-scores, axis=1)[:, :k]
    top = np.take_along_axis(scores, ids, 1)
    weights = np.exp((top - top[:, :1]) / 0.05)
    weights /= weights.sum(axis=1, keepdims=True)

    def cos(rows) -> np.ndarray:
        prediction = np.einsum("qk,qkd->qd", weights, np.asarray(rows[ids.ravel()], np.float64).reshape(*ids.shape, -1))
        prediction /= np.linalg.norm(prediction, axis=1, keepdims=True)
        return np.einsum("qd,qd->q", prediction, queries)

    return np.abs(cos(corpus) - cos(compact))


def bytes_table() -> list[tuple[str, int]]:
    rows = [("bigG 1280 + ViT-H 1024 keys fp16, MiniLM 384 fp16", (1280 + 1024) * 2 + 384 * 2),
            ("bigG 1280 + ViT-H 1024 keys fp16, MiniLM 384 int8", (1280 + 1024) * 2 + 384 + 4),
            ("keys 768 fp16 (ViT-L, or PCA), MiniLM 384 fp16", 768 * 2 + 384 * 2),
            ("keys 768 fp16 (ViT-L, or PCA), MiniLM 384 int8", 768 * 2 + 384 + 4),
            ("keys 704 fp16 (PCA), MiniLM 384 int8", 704 * 2 + 384 + 4)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus-size", type=int, default=4000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    from img2prompt.encoders.models import load_text_model
    from img2prompt.encoders.text import minilm_embeddings

    rng = np.random.default_rng(0)
    pool = real_prompts()
    corpus_prompts = [pool[i] for i in np.sort(rng.choice(len(pool), args.corpus_size, replace=False))]
    query_prompts = csv_prompts(KAGGLE) + csv_prompts(HELDOUT)
    model = load_text_model(None, device="cpu")
    corpus = minilm_embeddings(model, corpus_prompts).astype(np.float16)  # what minilm.f16 holds
    queries = minilm_embeddings(model, query_prompts).astype(np.float32)
    compact = Int8Rows(*quantise(corpus))
    inside = prediction_change(corpus, corpus, compact, queries=1000, k=args.k)
    outside = external_change(corpus, compact, queries, args.k)
    error = np.abs(compact[np.arange(len(corpus))] - corpus.astype(np.float32)).max(axis=1)
    print(f"corpus {len(corpus)} real prompts, k {args.k}")
    print(f"external queries ({len(queries)}: kaggle-sample + heldout): mean |Δcos| {outside.mean():.6f}, "
          f"max {outside.max():.6f}")
    print(f"corpus rows leave-one-out ({inside['queries']}): mean |Δcos| {inside['mean_abs_delta_cos']:.6f}, "
          f"max {inside['max_abs_delta_cos']:.6f}")
    print(f"per-element error: max {error.max():.6f} (bound max|x|/254)")
    from img2prompt.index.key_pca import fit_pca, reduced_recall

    keys = np.asarray(corpus, np.float32)  # stand-in keys: real MiniLM vectors (no CLIP weights on this machine)
    fit, held_out = keys[:3500], np.concatenate([keys[3500:], queries])
    for dims in (48, 96, 192, 288):
        recall = reduced_recall(fit, held_out, fit_pca(fit, dims))
        print(f"PCA {keys.shape[1]} → {dims}: held-out recall@10 vs full width {recall:.3f} "
              f"({len(held_out)} queries over {len(fit)} keys)")
    for name, size in bytes_table():
        print(f"{name}: {size} bytes/prompt (+ prompt text)")


if __name__ == "__main__":
    main()
