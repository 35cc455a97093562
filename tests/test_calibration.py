"""Calibration of image-key scores onto the text keys' scale: checked against hand computations."""
from __future__ import annotations

import numpy as np
import pytest

from img2prompt.index.calibration import fit_map, line_fit, neighbour_points
from img2prompt.query.search import calibrate


def test_line_fit_is_least_squares():
    scores, quality = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.30, 0.32, 0.38, 0.40])
    # by hand: means 0.25 and 0.35; Σ ds·dq = 0.0075 + 0.0015 + 0.0015 + 0.0075 = 0.018, Σ ds² = 0.05
    # → b = 0.36, a = 0.35 − 0.36 · 0.25 = 0.26
    assert line_fit(scores, quality) == pytest.approx((0.26, 0.36))
    assert line_fit(np.array([0.5, 0.5]), np.array([0.1, 0.2])) is None  # scores that do not vary


def test_quality_map_gives_equal_scores_equal_expected_quality():
    # text: quality = 0.1 + 1.0·s ; image: quality = -0.5 + 1.0·s (image scores run 0.6 higher)
    text_scores = np.array([0.2, 0.25, 0.3, 0.35])
    image_scores = np.array([0.8, 0.85, 0.9, 0.95])
    fit = fit_map((text_scores, 0.1 + text_scores), (image_scores, -0.5 + 1.0 * image_scores))
    assert fit["method"] == "quality"
    assert fit["scale"] == pytest.approx(1.0) and fit["offset"] == pytest.approx(-0.6)
    # an asymmetric case: image slope 2 → s' = (a_i + 2 s - a_t) / 1
    fit = fit_map((text_scores, 0.1 + text_scores), (image_scores, -1.2 + 2.0 * image_scores))
    assert fit["scale"] == pytest.approx(2.0) and fit["offset"] == pytest.approx(-1.3)
    mapped = calibrate(np.array([[0.9, -np.inf]], np.float32), fit)
    assert mapped[0, 0] == pytest.approx(0.5, abs=1e-6) and mapped[0, 1] == -np.inf
    # 0.5 on the text scale predicts quality 0.6, as 0.9 on the image scale does: -1.2 + 1.8
    assert 0.1 + mapped[0, 0] == pytest.approx(-1.2 + 2.0 * 0.9, abs=1e-6)


def test_moments_fallback_when_a_slope_is_not_positive():
    text_scores, image_scores = np.array([0.1, 0.3]), np.array([0.7, 0.8, 0.9])
    fit = fit_map((text_scores, np.array([0.5, 0.4])), (image_scores, np.array([0.1, 0.2, 0.3])))
    assert fit["method"] == "moments"
    scale = text_scores.std() / image_scores.std()
    assert fit["scale"] == pytest.approx(scale)
    assert fit["offset"] == pytest.approx(text_scores.mean() - scale * image_scores.mean())
    mapped = fit["scale"] * image_scores + fit["offset"]
    assert mapped.mean() == pytest.approx(text_scores.mean()) and mapped.std() == pytest.approx(text_scores.std())


def test_no_map_from_too_few_points_and_no_line_from_noise():
    assert fit_map((np.array([0.3, 0.2]), np.array([0.5, 0.4])), (np.array([]), np.array([]))) == \
        {"scale": 1.0, "offset": 0.0, "method": "none"}  # e.g. every image-keyed row holds one prompt
    rng = np.random.default_rng(0)
    text_scores = rng.uniform(0.2, 0.3, 200)
    noisy = 0.4 + 0.02 * text_scores + rng.normal(0, 0.1, 200)  # a slope, but buried in noise
    assert line_fit(text_scores, noisy) is None
    image_scores = np.linspace(0.8, 0.95, 50)
    fit = fit_map((text_scores, noisy), (image_scores, -1.0 + 1.5 * image_scores))
    assert fit["method"] == "moments" and 0.1 < fit["scale"] < 10  # no scale blown up by a noise slope


def test_neighbour_points_leave_out_the_queries_own_prompt():
    keys = np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float16)
    minilm = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float16)
    query = np.array([[1.0, 0.0]], np.float32)
    truth = np.array([[1.0, 0.0, 0.0]])  # key 0 holds the query's own prompt: left out
    scores, quality = neighbour_points(keys, minilm, 0, query, truth, k=2)
    np.testing.assert_allclose(scores, [0.8, 0.0], atol=1e-3)
    np.testing.assert_allclose(quality, [0.0, 0.0])
    scores, _ = neighbour_points(keys[1:], minilm, 1, query, truth, k=2)  # ids offset by the range start
    np.testing.assert_allclose(scores, [0.8, 0.0], atol=1e-3)
