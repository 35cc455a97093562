"""Top-k neighbours → one 384-d prediction per query. Pure numpy, no models.

prediction = normalise((1 - alpha) · normalise(Σ_j w_j · minilm[id_j]) + alpha · normalise(corpus_mean)),
w = softmax(similarity / temperature) over the k neighbours.
"""
from __future__ import annotations

import numpy as np

from img2prompt.errors import UserError

# Provisional: chosen without real CLIP weights (none are available where this was written); tune them
# on real weights with `img2prompt eval INDEX --labels ... --sweep` and pass the winners to submit.
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.05
DEFAULT_ALPHA = 0.0


def check_blend_args(k: int, temperature: float, alpha: float) -> None:
    if k <= 0:
        raise UserError(f"--k must be at least 1 (got {k})")
    if not temperature > 0:
        raise UserError(f"--temperature must be > 0 (got {temperature})")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha must be between 0 and 1 (got {alpha})")


def softmax_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of similarity / temperature; -inf scores (missing neighbours) get weight 0."""
    logits = np.asarray(scores, dtype=np.float64) / temperature
    logits = logits - np.max(logits, axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def blend(scores: np.ndarray, ids: np.ndarray, minilm: np.ndarray, *, k: int, temperature: float,
          alpha: float = 0.0, corpus_mean: np.ndarray | None = None) -> np.ndarray:
    """float32 [n, dim] unit-norm predictions from the first k of each row's neighbours (sorted best first)."""
    check_blend_args(k, temperature, alpha)
    scores, ids = np.asarray(scores)[:, :k], np.asarray(ids)[:, :k]
    weights = softmax_weights(scores, temperature)
    neighbours = np.asarray(minilm[ids.ravel()], dtype=np.float64).reshape(*ids.shape, -1)
    neighbours = neighbours / np.maximum(np.linalg.norm(neighbours, axis=2, keepdims=True), 1e-12)
    knn = normalise_rows(np.einsum("nk,nkd->nd", weights, neighbours))
    if alpha > 0:
        if corpus_mean is None:
            raise ValueError("alpha > 0 needs the corpus mean")
        knn = (1 - alpha) * knn + alpha * normalise_rows(np.asarray(corpus_mean, dtype=np.float64)[None, :])
    return normalise_rows(knn).astype(np.float32)


def corpus_mean_prediction(corpus_mean: np.ndarray, rows: int) -> np.ndarray:
    """The corpus-mean prediction (unit norm), e.g. for images that could not be decoded."""
    mean = normalise_rows(np.asarray(corpus_mean, dtype=np.float64)[None, :])
    return np.repeat(mean, rows, axis=0).astype(np.float32)
