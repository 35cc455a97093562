"""Blending neighbours into a prediction: checked against hand computations."""
from __future__ import annotations

import numpy as np
import pytest

from img2prompt.errors import UserError
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


@pytest.mark.parametrize("k, temperature, alpha, message", [
    (0, 0.1, 0.0, "--k must be at least 1"), (2, 0.0, 0.0, "--temperature must be > 0"),
    (2, 0.1, 1.5, "--alpha must be between 0 and 1")])
def test_bad_settings(k, temperature, alpha, message):
    with pytest.raises(UserError, match=message):
        blend(np.ones((1, 2)), np.zeros((1, 2), int), MINILM, k=k, temperature=temperature, alpha=alpha)
