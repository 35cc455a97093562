"""`eval`: the metric by hand, baselines, sweep == separate runs, leakage guard, JSON report, plot."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import KAGGLE_SAMPLE, read_data_prompts
from img2prompt.build_index.embed import minilm_embeddings
from img2prompt.errors import UserError
from img2prompt.index.format import open_index
from img2prompt.query.evaluate import EvalOptions, competition_score, cosine_rows, run_eval


def test_metric_by_hand():
    predictions = np.array([[1.0, 0.0], [3.0, 4.0]])
    truth = np.array([[1.0, 0.0], [0.0, 2.0]])
    # cosines: 1.0 and 4/5
    assert competition_score(predictions, truth) == pytest.approx((1.0 + 0.8) / 2)
    assert competition_score(truth, truth) == pytest.approx(1.0)
    np.testing.assert_allclose(cosine_rows(predictions, truth), [1.0, 0.8])


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    """20 prompts that are in the index (text-mode leakage on purpose) under made-up image ids."""
    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    pd.DataFrame({"imgId": [f"q{i}" for i in range(20)], "prompt": read_data_prompts(20)}).to_csv(path, index=False)
    return path


_OPENED: dict = {}  # index path → Img2PromptIndex: opened once, as an API user would


def evaluate(built_index, labels, **kwargs):
    import img2prompt

    if built_index not in _OPENED:
        _OPENED[built_index] = img2prompt.open_index(built_index, device="cpu")
    return run_eval(_OPENED[built_index].session, EvalOptions(labels=str(labels), progress=False, **kwargs))


def test_text_mode_baselines_and_leakage_guard(built_index, labels, text_model):
    leaky = evaluate(built_index, labels, k=5, temperature=0.05)
    assert leaky["n"] == 20 and leaky["settings"]["mode"] == "text"
    assert leaky["leakage"]["true_prompts_in_corpus"] == 20
    assert leaky["baselines"]["top1"] == pytest.approx(1.0, abs=1e-3)  # each prompt finds itself
    index = open_index(built_index)
    truth = minilm_embeddings(text_model, read_data_prompts(20))
    mean = index.minilm_mean / np.linalg.norm(index.minilm_mean)
    assert leaky["baselines"]["corpus_mean"] == pytest.approx(float((truth @ mean).mean()), abs=1e-6)

    guarded = evaluate(built_index, labels, k=5, temperature=0.05, exclude_exact=True)
    assert guarded["leakage"]["excluded_corpus_rows"] == 20
    assert guarded["baselines"]["top1"] < 0.99
    assert guarded["score"] < leaky["score"]


def test_sweep_from_one_search_equals_separate_runs(built_index, labels, tmp_path):
    out, plot = tmp_path / "report.json", tmp_path / "sweep.png"
    report = evaluate(built_index, labels, sweep=True, exclude_exact=True, out=str(out), plot=str(plot),
                      sweep_k=(1, 3, 10), sweep_temperature=(0.02, 0.5), sweep_alpha=(0.0, 0.3))
    assert len(report["sweep"]) == 4 * 2 * 2  # the k grid plus the default k=20
    for row in (report["sweep"][0], report["sweep"][5], report["sweep"][-1]):
        single = evaluate(built_index, labels, exclude_exact=True, k=row["k"], temperature=row["temperature"],
                          alpha=row["alpha"])
        assert single["score"] == pytest.approx(row["score"], abs=1e-9)
    assert report["best"] == max(report["sweep"], key=lambda row: row["score"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perfect_and_shrunk_baselines_ordering(built_index, labels):
    report = evaluate(built_index, labels, k=1, alpha=0.0)
    assert report["score"] == pytest.approx(report["baselines"]["top1"])
    assert report["settings"]["knn_shrunk_alpha"] == 0.2
    assert report["median"] <= 1.0 and "ci95" not in report  # n < 30: no bootstrap interval


@pytest.mark.skipif(not KAGGLE_SAMPLE.is_dir(), reason="../shared/kaggle-sample is not present")
def test_image_mode_on_the_kaggle_sample(built_index):
    report = evaluate(built_index, KAGGLE_SAMPLE / "prompts.csv", images=str(KAGGLE_SAMPLE / "images"), k=3)
    assert report["n"] == 7 and report["settings"]["mode"] == "images" and report["failed"] == {}
    assert -1.0 <= report["score"] <= 1.0


def test_labels_errors(built_index, tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"id": ["a"], "text": ["b"]}).to_csv(bad, index=False)
    with pytest.raises(UserError, match="no column imgId, prompt; its columns are id, text"):
        evaluate(built_index, bad)
    with pytest.raises(UserError, match="--plot draws the sweep: add --sweep"):
        evaluate(built_index, bad, plot=str(tmp_path / "p.png"))
