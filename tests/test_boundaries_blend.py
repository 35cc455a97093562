"""Boundaries of query/blend.py that its mutation pass (issue 35, docs/mutation.md) found unguarded: the
defaults are the settings' defaults, consensus weights sum to 1 (they are the --explain weights), a
neighbour whose others cancel has agreement 0, zero-weight neighbours neither raise `best` nor overflow,
zero vectors stay zero, and chunked blending equals one chunk."""
from __future__ import annotations

import numpy as np
import pytest

from img2prompt.query import blend as blend_module
from img2prompt.query.blend import (blend, consensus_weights, neighbour_weights, normalise_rows, softmax_weights,
                                    similarity_weights)
from img2prompt.query.settings import (DEFAULT_CONSENSUS, DEFAULT_EPSILON, DEFAULT_POWER, DEFAULT_TEMPERATURE,
                                       DEFAULT_WEIGHTING)

MINILM = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 0.0]])
SCORES = np.array([[0.9, 0.7, 0.4], [0.8, 0.75, 0.1]])
IDS = np.array([[0, 3, 1], [3, 1, 0]])


def test_defaults_are_the_settings_defaults():
    """Every default of the blend functions equals query/settings.py's (a changed literal changes answers)."""
    assert (DEFAULT_TEMPERATURE, DEFAULT_POWER, DEFAULT_EPSILON, DEFAULT_CONSENSUS) == (0.05, 6.0, 1e-4, 0.0)
    explicit = dict(weighting="inverse-distance", power=DEFAULT_POWER, epsilon=DEFAULT_EPSILON)
    np.testing.assert_array_equal(similarity_weights(SCORES), similarity_weights(
        SCORES, weighting=DEFAULT_WEIGHTING, temperature=DEFAULT_TEMPERATURE))
    np.testing.assert_array_equal(similarity_weights(SCORES, weighting="inverse-distance"),
                                  similarity_weights(SCORES, **explicit))
    for weighting in ("softmax", "inverse-distance"):
        got, _ = neighbour_weights(SCORES, IDS, MINILM, temperature=0.1, weighting=weighting)
        want, _ = neighbour_weights(SCORES, IDS, MINILM, temperature=0.1, consensus=DEFAULT_CONSENSUS,
                                    weighting=weighting, power=DEFAULT_POWER, epsilon=DEFAULT_EPSILON)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(blend(SCORES, IDS, MINILM, k=3, temperature=0.1, weighting="inverse-distance"),
                                  blend(SCORES, IDS, MINILM, k=3, temperature=0.1, **explicit))
    # and the hand value of the inverse-distance default: w ∝ 1 / ((1 - s)^6 + 1e-4)
    raw = 1.0 / ((1.0 - SCORES[0]) ** 6 + 1e-4)
    np.testing.assert_allclose(similarity_weights(SCORES[:1], weighting="inverse-distance")[0], raw / raw.sum())


def test_consensus_weights_sum_to_one_and_match_the_formula():
    """--explain writes these weights: normalised, w'_j ∝ w_j · exp(γ · a_j), for γ = 1 too."""
    weights, neighbours = neighbour_weights(SCORES, IDS, MINILM, temperature=0.1)
    for gamma in (1.0, 3.0):
        got = consensus_weights(weights, neighbours, gamma)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)
        total = np.einsum("nk,nkd->nd", weights, neighbours)
        others = total[:, None, :] - weights[:, :, None] * neighbours
        agreement = np.einsum("nkd,nkd->nk", neighbours, others) / np.linalg.norm(others, axis=2)
        want = weights * np.exp(gamma * agreement)
        np.testing.assert_allclose(got, want / want.sum(axis=1, keepdims=True), atol=1e-12)
        assert not np.allclose(got, weights)  # γ > 0 (γ = 1 included) reweights


def test_a_neighbour_whose_others_cancel_has_agreement_zero():
    """Neighbours e1, e2, -e2 at equal scores: e1's others sum to 0 (agreement 0, the documented value),
    e2's and -e2's agreement is cos(±e2, e1 ∓ e2) = -1/√2."""
    weights = np.full((1, 3), 1 / 3)
    neighbours = MINILM[[0, 1, 2]][None]
    gamma = 2.0
    got = consensus_weights(weights, neighbours, gamma)
    want = np.exp(gamma * np.array([0.0, -1 / np.sqrt(2), -1 / np.sqrt(2)]))
    np.testing.assert_allclose(got[0], want / want.sum(), atol=1e-12)


def test_a_zero_weight_neighbour_never_sets_best_nor_overflows():
    """A missing neighbour (-inf score, weight 0) that agrees with the rest more than any kept one: with a
    huge γ the weights stay finite, sum to 1 and equal the kept neighbours' own reweighting."""
    scores = np.array([[0.5, 0.5, -np.inf]])
    ids = np.array([[1, 2, 3]])  # e2, -e2 (they disagree), and (0.6, 0.8, 0) missing
    gamma = 1000.0
    weights, neighbours = neighbour_weights(scores, ids, MINILM, temperature=0.1, consensus=gamma)
    assert np.isfinite(weights).all()
    np.testing.assert_allclose(weights[0], [0.5, 0.5, 0.0], atol=1e-12)
    got = blend(np.array([[0.6, 0.5, -np.inf]]), np.array([[0, 3, 1]]), MINILM, k=3, temperature=0.1,
                consensus=gamma)
    assert np.isfinite(got).all()


def test_zero_vectors_stay_zero_not_nan():
    """An all-zero MiniLM row (int8 stores 0-rows as 0) is a zero neighbour, never NaN."""
    np.testing.assert_array_equal(normalise_rows(np.zeros((2, 3))), np.zeros((2, 3)))
    _, neighbours = neighbour_weights(np.array([[0.9, 0.8]]), np.array([[4, 0]]), MINILM, temperature=0.1)
    np.testing.assert_array_equal(neighbours[0, 0], [0.0, 0.0, 0.0])
    got = blend(np.array([[0.9, 0.8]]), np.array([[4, 0]]), MINILM, k=2, temperature=0.1)
    np.testing.assert_allclose(got[0], [1.0, 0.0, 0.0], atol=1e-6)


def test_chunked_blend_equals_one_chunk(monkeypatch):
    """Queries blended a row at a time (the chunk smaller than one row's values) give the same rows."""
    rng = np.random.default_rng(0)
    minilm = rng.normal(size=(20, 3))
    scores = np.sort(rng.uniform(0, 1, size=(7, 4)), axis=1)[:, ::-1]
    ids = rng.integers(0, 20, size=(7, 4))
    whole = blend(scores, ids, minilm, k=4, temperature=0.1, consensus=1.0)
    monkeypatch.setattr(blend_module, "BLEND_CHUNK_VALUES", 1)
    np.testing.assert_array_equal(blend(scores, ids, minilm, k=4, temperature=0.1, consensus=1.0), whole)


def test_alpha_needs_the_mean_and_beta_needs_the_head():
    with pytest.raises(ValueError, match="alpha > 0 needs the corpus mean"):
        blend(SCORES, IDS, MINILM, k=3, temperature=0.1, alpha=0.1)
    from img2prompt.query.blend import mix_head
    with pytest.raises(ValueError, match="beta > 0 needs"):
        mix_head(np.ones((1, 3), np.float32), None, 0.5)


def test_softmax_at_a_tiny_temperature_stays_finite():
    """The row's best logit is subtracted before exp: similarity 0.9 at temperature 0.001 is logit 900, whose
    exp overflows; the weights are still e^0 : e^-100 and the blend is the best neighbour's vector."""
    weights = softmax_weights(np.array([[0.9, 0.8]]), 0.001)
    np.testing.assert_allclose(weights[0], [1.0, np.exp(-100.0)], rtol=1e-12, atol=0)
    got = blend(np.array([[0.9, 0.8]]), np.array([[0, 1]]), MINILM, k=2, temperature=0.001)
    np.testing.assert_allclose(got[0], [1.0, 0.0, 0.0], atol=1e-7)
