"""RetrievalSettings: one validation for every front end, errors that name the setting, the score floor by hand."""
from __future__ import annotations

import numpy as np
import pytest

from img2prompt.errors import UserError
from img2prompt.query.predict import floor_scores
from img2prompt.query.settings import RetrievalSettings, SettingError, cli_flag, parse_model_weights


@pytest.mark.parametrize("values, message", [
    ({"k": 0}, "k must be at least 1 (got 0)"), ({"k": 2.5}, "k must be an integer"),
    ({"temperature": 0.0}, "temperature must be > 0"), ({"temperature": float("inf")}, "temperature must be finite"),
    ({"alpha": 1.5}, "alpha must be between 0 and 1"), ({"consensus": -1.0}, "consensus must be 0 or more"),
    ({"consensus": float("inf")}, "consensus must be 0 or more, and finite"),
    ({"beta": 1.5}, "beta must be between 0 and 1"), ({"beta": float("nan")}, "beta must be between 0 and 1"),
    ({"min_score": 2.0}, "min_score must be a cosine between -1 and 1"), ({"k": "5"}, "k must be an integer"),
    ({"model_weights": "1e308,1e308x"}, "model_weights '1e308,1e308x': give numbers"),
    ({"power": 0.0}, "power must be > 0 and finite (got 0.0)"), ({"power": -6}, "power must be > 0"),
    ({"epsilon": 0.0}, "epsilon must be > 0 and finite (got 0.0)"), ({"epsilon": -1e-4}, "epsilon must be > 0"),
    ({"epsilon": float("nan")}, "epsilon must be > 0"), ({"power": float("inf")}, "power must be > 0 and finite"),
    ({"weighting": "cosine"}, "weighting must be one of softmax, inverse-distance (got 'cosine')")])
def test_each_setting_is_checked_once_and_named(values, message):
    with pytest.raises(SettingError) as caught:
        RetrievalSettings(**values)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert isinstance(caught.value, UserError) and caught.value.setting == next(iter(values))
    # a front end names it its own way, with the same reason
    assert str(caught.value.relabel(cli_flag)).startswith("--" + message.replace("min_score", "min-score")
                                                          .replace("model_weights", "model-weights"))


def test_weighting_defaults_are_the_notebook_anchor():
    settings = RetrievalSettings()
    assert (settings.weighting, settings.power, settings.epsilon) == ("softmax", 6.0, 1e-4)
    chosen = RetrievalSettings(weighting="inverse-distance", power=4, epsilon=1e-3)
    assert chosen.weighing() == {"weighting": "inverse-distance", "temperature": settings.temperature,
                                 "power": 4.0, "epsilon": 1e-3}
    assert chosen.as_dict()["weighting"] == "inverse-distance" and isinstance(chosen.power, float)


def test_model_weights_are_normalised_and_never_overflow():
    assert parse_model_weights("0.7,0.3") == pytest.approx((0.7, 0.3))
    assert parse_model_weights(" 3 , 1 ") == pytest.approx((0.75, 0.25))
    assert parse_model_weights([0, 2]) == pytest.approx((0.0, 1.0))
    assert parse_model_weights("1e308,1e308") == pytest.approx((0.5, 0.5))  # summed naively: inf → [0, 0]
    for text, match in [("-1,2", "≥ 0"), ("0,0", "sum > 0"), ("a,b", "numbers separated by commas"),
                        ("1,nan", "finite"), ("1,inf", "finite")]:
        with pytest.raises(SettingError, match=match):
            parse_model_weights(text)
    assert RetrievalSettings(model_weights="1,3").model_weights == pytest.approx((0.25, 0.75))


class FakeIndex:
    """What check_for reads of a PromptIndex: count, CLIP identity, regression head, root."""

    def __init__(self, count=100, members=None, head=None) -> None:
        self.count, self.regression_head, self.root = count, head, "idx"
        self.clip_identity = {"name": "m", "members": members} if members else {"name": "m"}


def test_settings_are_checked_against_the_index_before_any_model():
    with pytest.raises(SettingError, match=r"^k 500 is larger than the index \(100 prompts\)"):
        RetrievalSettings(k=500).check_for(FakeIndex())
    with pytest.raises(SettingError, match="the index holds one CLIP model"):
        RetrievalSettings(model_weights="1,1").check_for(FakeIndex())
    with pytest.raises(SettingError, match="gives 3 weights but the index holds 2 CLIP models"):
        RetrievalSettings(model_weights="1,1,1").check_for(FakeIndex(members=[{}, {}]))
    with pytest.raises(SettingError, match="^beta needs the index's regression head"):
        RetrievalSettings(beta=0.5).check_for(FakeIndex())
    ok = RetrievalSettings(k=100, beta=0.5, model_weights="1,1")
    assert ok.check_for(FakeIndex(members=[{}, {}], head=object())) is ok


def test_keyword_form_changes_fields_and_refuses_unknown_ones():
    base = RetrievalSettings(k=7)
    assert RetrievalSettings.of(base, temperature=0.1) == RetrievalSettings(k=7, temperature=0.1)
    assert RetrievalSettings.of() == RetrievalSettings()
    with pytest.raises(TypeError, match="unknown retrieval setting"):
        RetrievalSettings.of(kk=3)


def test_score_floor_drops_neighbours_under_it_but_keeps_the_best():
    scores = np.array([[0.5, 0.3, 0.1], [0.2, 0.1, 0.05]], dtype=np.float32)
    floored = floor_scores(scores, 0.25)
    np.testing.assert_array_equal(floored, np.array([[0.5, 0.3, -np.inf], [0.2, -np.inf, -np.inf]], np.float32))  # row 2: the best alone
    # several models: a neighbour must reach the floor under every model (4th place's filter)
    per_model = np.array([[[0.9, 0.9], [0.9, 0.2], [0.9, 0.9]]])
    np.testing.assert_array_equal(floor_scores(scores[:1], 0.25, per_model), np.array([[0.5, -np.inf, 0.1]], np.float32))
