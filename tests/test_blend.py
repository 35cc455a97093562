"""Blending neighbours into a prediction: checked against hand computations."""
from __future__ import annotations

import numpy as np
import pytest

from img2prompt.query.blend import blend, corpus_mean_prediction, softmax_weights

MINILM = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]], dtype=np.float16)


def test_weighted_mean_matches_hand_computation():
    scores = np.array([[0.5, 0.3]])
    ids = np.array([[0, 1]])
    # weights: softmax([0.5, 0.3] / 0.1) = [e^5, e^3] / (e^5 + e^3)
    w0 = np.exp(5) / (np.exp(5) + np.exp(3))
    expected = np.array([w0, 1 - w0, 0.0])
    expected /= np.linalg.norm(expected)
    got = blend(scores, ids, MINILM, k=2, temperature=0.1)
    np.testing.assert_allclose(got[0], expected, atol=1e-6)


def test_k1_is_exactly_the_top_prompt_vector():
    got = blend(np.array([[0.9, 0.8, 0.1]]), np.array([[3, 0, 1]]), MINILM, k=1, temperature=0.05)
    np.testing.assert_allclose(got[0], MINILM[3].astype(np.float32) / np.linalg.norm(MINILM[3].astype(np.float32)),
                               atol=1e-7)


def test_alpha_shrinks_towards_the_normalised_mean():
    mean = np.array([0.0, 0.0, 2.0])
    got = blend(np.array([[1.0]]), np.array([[0]]), MINILM, k=1, temperature=1.0, alpha=0.2, corpus_mean=mean)
    # (1 - alpha) · knn + alpha · mean: an asymmetric alpha, so swapped weights cannot pass
    expected = np.array([0.8, 0.0, 0.2]) / np.linalg.norm([0.8, 0.0, 0.2])
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    np.testing.assert_allclose(corpus_mean_prediction(mean, 2), [[0, 0, 1], [0, 0, 1]])


def test_softmax_ignores_missing_neighbours():
    weights = softmax_weights(np.array([[0.2, 0.1, -np.inf]]), 0.1)
    assert weights[0, 2] == 0.0
    np.testing.assert_allclose(weights.sum(), 1.0)


def test_consensus_reweights_by_agreement_with_the_others():
    # neighbours e1, (0.6, 0.8, 0), e3 with softmax weights w; agreement of each with the weighted sum of the others
    scores, ids, gamma, temperature = np.array([[0.5, 0.4, 0.3]]), np.array([[0, 3, 2]]), 2.0, 0.1
    w = np.exp(np.array([5.0, 4.0, 3.0]))
    w /= w.sum()
    e1, e3 = np.array([1.0, 0, 0]), np.array([0, 0, 1.0])
    v = MINILM[3].astype(np.float64) / np.linalg.norm(MINILM[3].astype(np.float64))  # (0.6, 0.8, 0) in float16
    others = [w[1] * v + w[2] * e3, w[0] * e1 + w[2] * e3, w[0] * e1 + w[1] * v]
    agreement = [float(n @ o / np.linalg.norm(o)) for n, o in zip((e1, v, e3), others)]
    assert agreement[2] == 0.0 and agreement[0] > 0 and agreement[1] > 0  # e3 agrees with nobody
    reweighted = w * np.exp(gamma * np.array(agreement))
    reweighted /= reweighted.sum()
    expected = reweighted[0] * e1 + reweighted[1] * v + reweighted[2] * e3
    expected /= np.linalg.norm(expected)
    got = blend(scores, ids, MINILM, k=3, temperature=temperature, consensus=gamma)
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    plain = blend(scores, ids, MINILM, k=3, temperature=temperature)
    assert got[0][2] < plain[0][2]  # the outlier lost weight


def test_consensus_zero_and_single_neighbour_change_nothing():
    scores, ids = np.array([[0.5, 0.4, -np.inf]]), np.array([[0, 3, -1]])
    plain = blend(scores, ids, MINILM, k=3, temperature=0.1)
    np.testing.assert_array_equal(blend(scores, ids, MINILM, k=3, temperature=0.1, consensus=0.0), plain)
    one = blend(scores, ids, MINILM, k=1, temperature=0.1, consensus=50.0)
    np.testing.assert_allclose(one[0], [1.0, 0.0, 0.0], atol=1e-7)
    huge = blend(np.array([[0.5, 0.5]]), np.array([[0, 2]]), MINILM, k=2, temperature=0.1, consensus=1e6)
    assert np.isfinite(huge).all()  # two orthogonal neighbours: agreement 0 for both, equal weights kept
    np.testing.assert_allclose(huge[0], np.array([1.0, 0.0, 1.0]) / np.sqrt(2), atol=1e-6)


def test_beta_mixes_the_head_after_shrinkage():
    from img2prompt.query.blend import mix_head

    knn = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    head = np.array([[0.0, 1.0, 0.0]], dtype=np.float32)
    expected = np.array([0.75, 0.25, 0.0]) / np.linalg.norm([0.75, 0.25, 0.0])  # asymmetric beta = 0.25
    np.testing.assert_allclose(mix_head(knn, head, 0.25)[0], expected, atol=1e-7)
    np.testing.assert_array_equal(mix_head(knn, None, 0.0), knn)


def _notebook_inverse_distance(scores, ids, minilm, k):
    """The public CLIP kNN notebook's blend, transcribed directly: per query, per neighbour,
    w = 1 / (d**6 + 1e-4) with d = 1 - cosine, then the weighted sum of the prompts' vectors, normalised."""
    out = []
    for row_scores, row_ids in zip(scores, ids):
        total, weight_sum = np.zeros(minilm.shape[1]), 0.0
        for cosine, prompt in zip(row_scores[:k], row_ids[:k]):
            d = 1.0 - cosine
            w = 1.0 / (d ** 6 + 1e-4)
            vector = minilm[prompt].astype(np.float64)
            total += w * vector / np.linalg.norm(vector)
            weight_sum += w
        mean = total / weight_sum
        out.append(mean / np.linalg.norm(mean))
    return np.array(out)


def test_inverse_distance_blend_matches_the_notebook_formula():
    rng = np.random.default_rng(0)
    minilm = rng.standard_normal((500, 16)).astype(np.float16)
    k = 300  # a few hundred neighbours, as the notebook's k = 100-150 and more
    scores = -np.sort(-rng.uniform(0.05, 0.95, (4, k)), axis=1)
    ids = rng.integers(0, len(minilm), (4, k))
    got = blend(scores, ids, minilm, k=k, temperature=0.05, weighting="inverse-distance", power=6, epsilon=1e-4)
    np.testing.assert_allclose(got, _notebook_inverse_distance(scores, ids, minilm, k), atol=1e-6)
    # not the softmax: the two families give other vectors
    assert not np.allclose(got, blend(scores, ids, minilm, k=k, temperature=0.05), atol=1e-3)


def test_inverse_distance_power_and_epsilon_and_missing_neighbours():
    from img2prompt.query.blend import inverse_distance_weights

    scores = np.array([[0.9, 0.5, -np.inf]])
    weights = inverse_distance_weights(scores, power=2, epsilon=0.01)
    raw = np.array([1 / (0.1 ** 2 + 0.01), 1 / (0.5 ** 2 + 0.01), 0.0])
    np.testing.assert_allclose(weights[0], raw / raw.sum())
    # a cosine a rounding over 1 is distance 0 (weight 1/epsilon), not NaN under a fractional power
    weights = inverse_distance_weights(np.array([[1.0000001, 0.5]]), power=1.5, epsilon=1e-4)
    assert np.isfinite(weights).all() and weights[0, 0] > 0.99


def test_blending_in_chunks_of_queries_gives_the_same_rows(monkeypatch):
    from img2prompt.query import blend as blend_module

    rng = np.random.default_rng(1)
    minilm = rng.standard_normal((50, 8)).astype(np.float16)
    scores = -np.sort(-rng.uniform(0.0, 1.0, (7, 5)), axis=1)
    ids = rng.integers(0, 50, (7, 5))
    options = dict(k=5, temperature=0.1, consensus=2.0, alpha=0.3, corpus_mean=np.ones(8))
    whole = blend(scores, ids, minilm, **options)
    monkeypatch.setattr(blend_module, "BLEND_CHUNK_VALUES", 2 * 5 * 8)  # two queries per chunk: 4 chunks
    np.testing.assert_array_equal(blend(scores, ids, minilm, **options), whole)
