"""Top-k neighbours → one 384-d prediction per query. Pure numpy, no models.

prediction = normalise((1 - beta) · shrunk + beta · head),
shrunk     = normalise((1 - alpha) · knn + alpha · normalise(corpus_mean)),
knn        = normalise(Σ_j w_j · minilm[id_j]),  w = softmax(similarity / temperature) over the k neighbours,
             or (weighting "inverse-distance", the public CLIP kNN notebook's) w_j ∝ 1 / (d_j^power + epsilon),
             d_j = 1 - similarity_j,
head       = the index's regression head applied to the query (index/ridge.py), only when beta > 0.

With consensus γ > 0 the softmax weights are re-weighted by each neighbour's agreement with the others,
w'_j ∝ w_j · exp(γ · a_j), a_j = cos(minilm_j, Σ_{i≠j} w_i · minilm_i): a neighbour whose prompt says what
the rest say gains weight, a lone outlier loses it. γ = 0 is plain k-NN. A score floor (min_score, see
query/predict.py floor_scores) arrives here as -inf scores.
"""
from __future__ import annotations

import numpy as np


def softmax_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of similarity / temperature; -inf scores (missing neighbours) get weight 0."""
    logits = np.asarray(scores, dtype=np.float64) / temperature
    logits = logits - np.max(logits, axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def inverse_distance_weights(scores: np.ndarray, power: float, epsilon: float) -> np.ndarray:
    """Row-normalised 1 / (d^power + epsilon), d = 1 - similarity (clipped at 0: a cosine a rounding over 1
    is distance 0, not a negative number under a fractional power); -inf scores get weight 0."""
    scores = np.asarray(scores, dtype=np.float64)
    present = np.isfinite(scores)
    distance = np.maximum(1.0 - np.where(present, scores, 0.0), 0.0)
    with np.errstate(over="ignore"):  # d^power overflowing to inf is a weight of 0, as it should be
        weights = np.where(present, 1.0 / (distance ** power + epsilon), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)


def similarity_weights(scores: np.ndarray, *, weighting: str = "softmax", temperature: float = 0.05,
                       power: float = 6.0, epsilon: float = 1e-4) -> np.ndarray:
    """The k-NN weights [n, k] of the neighbours' similarities under one weighting family."""
    if weighting == "softmax":
        return softmax_weights(scores, temperature)
    if weighting == "inverse-distance":
        return inverse_distance_weights(scores, power, epsilon)
    raise ValueError(f"unknown weighting {weighting!r}")


def consensus_weights(weights: np.ndarray, neighbours: np.ndarray, gamma: float) -> np.ndarray:
    """w'_j ∝ w_j · exp(γ · cos(n_j, Σ_{i≠j} w_i n_i)) for weights [n, k] and unit vectors [n, k, d].
    A neighbour with no others (k = 1, or all other weights 0) has agreement 0."""
    if gamma == 0:
        return weights
    total = np.einsum("nk,nkd->nd", weights, neighbours)
    others = total[:, None, :] - weights[:, :, None] * neighbours  # the weighted sum without neighbour j
    norms = np.linalg.norm(others, axis=2)
    agreement = np.where(norms > 1e-12, np.einsum("nkd,nkd->nk", neighbours, others) / np.maximum(norms, 1e-12), 0.0)
    # minus the row's best agreement: the same ratios, and exp never overflows nor underflows to all zeros
    best = np.max(np.where(weights > 0, agreement, -np.inf), axis=1, keepdims=True)
    reweighted = weights * np.exp(gamma * np.minimum(agreement - best, 0.0))
    return reweighted / reweighted.sum(axis=1, keepdims=True)


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def neighbour_weights(scores: np.ndarray, ids: np.ndarray, minilm: np.ndarray, *, temperature: float,
                      consensus: float = 0.0, weighting: str = "softmax", power: float = 6.0,
                      epsilon: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(weights [n, k], unit neighbour vectors [n, k, d]): what the k-NN part averages."""
    neighbours = np.asarray(minilm[np.asarray(ids).ravel()], dtype=np.float64).reshape(*np.shape(ids), -1)
    neighbours = neighbours / np.maximum(np.linalg.norm(neighbours, axis=2, keepdims=True), 1e-12)
    weights = similarity_weights(scores, weighting=weighting, temperature=temperature, power=power, epsilon=epsilon)
    return consensus_weights(weights, neighbours, consensus), neighbours


# The k-NN part holds [rows, k, dim] float64 neighbour vectors (and, with consensus, two more of that size):
# queries are blended in chunks of at most this many values, so k in the hundreds over 16k images stays
# ~128 MiB per array instead of growing with the number of images.
BLEND_CHUNK_VALUES = 1 << 24


def blend(scores: np.ndarray, ids: np.ndarray, minilm: np.ndarray, *, k: int, temperature: float,
          alpha: float = 0.0, corpus_mean: np.ndarray | None = None, consensus: float = 0.0,
          weighting: str = "softmax", power: float = 6.0, epsilon: float = 1e-4) -> np.ndarray:
    """float32 [n, dim] unit-norm predictions from the first k of each row's neighbours (sorted best first).
    The settings are valid here (query/settings.py checked them); -inf scores get weight 0."""
    scores, ids = np.asarray(scores)[:, :k], np.asarray(ids)[:, :k]
    if alpha > 0 and corpus_mean is None:
        raise ValueError("alpha > 0 needs the corpus mean")
    out = np.empty((len(ids), minilm.shape[1]), dtype=np.float32)
    step = max(1, BLEND_CHUNK_VALUES // max(1, ids.shape[1] * minilm.shape[1]))
    for start in range(0, len(ids), step):  # whole chunks of queries; each row is blended on its own
        rows = slice(start, start + step)
        weights, neighbours = neighbour_weights(scores[rows], ids[rows], minilm, temperature=temperature,
                                                consensus=consensus, weighting=weighting, power=power,
                                                epsilon=epsilon)
        knn = normalise_rows(np.einsum("nk,nkd->nd", weights, neighbours))
        if alpha > 0:
            knn = (1 - alpha) * knn + alpha * normalise_rows(np.asarray(corpus_mean, dtype=np.float64)[None, :])
        out[rows] = normalise_rows(knn)
    return out


def mix_head(predictions: np.ndarray, head: np.ndarray | None, beta: float) -> np.ndarray:
    """normalise((1 - beta) · predictions + beta · head) for unit rows; beta = 0 leaves them as they are."""
    if beta == 0:
        return np.asarray(predictions, dtype=np.float32)
    if head is None:
        raise ValueError("beta > 0 needs the regression head's predictions")
    return normalise_rows((1 - beta) * np.asarray(predictions, np.float64) + beta * np.asarray(head, np.float64)
                          ).astype(np.float32)


def corpus_mean_prediction(corpus_mean: np.ndarray, rows: int) -> np.ndarray:
    """The corpus-mean prediction (unit norm), e.g. for images that could not be decoded."""
    mean = normalise_rows(np.asarray(corpus_mean, dtype=np.float64)[None, :])
    return np.repeat(mean, rows, axis=0).astype(np.float32)
