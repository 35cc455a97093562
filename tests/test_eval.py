"""`eval`: the metric by hand, baselines, sweep == separate runs, cross-validated choice, leakage guard,
bootstrap CI, JSON report, plot."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from conftest import DATA, KAGGLE_SAMPLE, needs_shared, read_data_prompts
from img2prompt.encoders.prompts import dedup_keys
from img2prompt.encoders.text import minilm_embeddings
from img2prompt.errors import UserError
from img2prompt.index.reader import open_index
from img2prompt.query.eval_options import eval_options
from img2prompt.query.evaluate import competition_score, cosine_rows, exact_matches, run_eval


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
    # these tests are about the k × temperature × alpha grid: the switches' axes (test_quality_switches.py) and
    # the inverse-distance family (test_sweep_reports_the_best_of_each_weighting) stay off
    kwargs = {"sweep_consensus": (0.0,), "sweep_beta": (0.0,), "sweep_weighting": ("softmax",), **kwargs}
    return run_eval(_OPENED[built_index].session, eval_options(str(labels), progress=False, **kwargs))


class _SegmentedPrompts:
    """An index's prompts in three segments; the first and last with their sorted key files, the middle
    without (an index written before them). Records which segments a pass streams."""

    def __init__(self) -> None:
        self.segments = [["a red car", "blue sky", "A Red Car"], ["old prompt", "blue sky"], ["night city", "sun"]]
        stored = [np.unique(dedup_keys(prompts)) for prompts in self.segments]
        self.stored_prompt_keys = [stored[0], None, stored[2]]
        self.streamed: list[set[int]] = []

    def iter_prompt_batches(self, size: int = 100_000, parts=None):
        self.streamed.append(set(parts))
        first = 0
        for number, prompts in enumerate(self.segments):
            if number in parts:
                yield first, prompts
            first += len(prompts)


def test_leakage_streams_only_the_segments_whose_keys_hold_a_label():
    """exact_matches: the ids of each label's normalised copies, found by streaming only the segments whose
    stored keys hold a label (and those with no key file); none when no segment can hold one."""
    index = _SegmentedPrompts()
    session = type("Session", (), {"index": index})()
    assert exact_matches(session, ["a red  car", "night CITY", "unseen"]) == [{0, 2}, {5}, set()]
    assert index.streamed == [{0, 1, 2}]
    assert exact_matches(session, ["sun"]) == [{6}] and index.streamed[-1] == {1, 2}
    assert exact_matches(session, ["blue sky"]) == [{1, 4}] and index.streamed[-1] == {0, 1}
    index.stored_prompt_keys[1] = np.unique(dedup_keys(index.segments[1]))
    before = len(index.streamed)
    assert exact_matches(session, ["unseen", "never"]) == [set(), set()] and len(index.streamed) == before


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
    best = max(report["sweep"], key=lambda row: row["score"])
    assert "best" not in report and report["best_in_sample"] == {**best, "optimistic": True}
    assert {key: report["recommended"][key] for key in ("k", "temperature", "alpha")} == {
        key: best[key] for key in ("k", "temperature", "alpha")}  # chosen on all images
    cv = report["cross_validation"]
    assert cv["folds"] == 5 and sorted(fold["n"] for fold in cv["per_fold"]) == [4] * 5
    assert cv["score"] == pytest.approx(sum(fold["n"] * fold["score"] for fold in cv["per_fold"]) / 20, abs=1e-12)
    assert sum(entry["folds"] for entry in cv["chosen"]) == 5
    assert report["recommended"]["cross_validated_score"] == cv["score"]
    assert any(w.startswith("too few labelled images for a reliable choice") for w in report["warnings"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def unit(vectors) -> np.ndarray:
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_perfect_and_shrunk_baselines_ordering(built_index, labels, text_model):
    # Leakage on purpose: each prompt finds itself. T=1 so that a second neighbour would visibly count, and
    # a sweep up to k=3 so that three neighbours are retrieved (with k=1 alone, a top1 or knn that blended
    # more than one neighbour could not be told apart).
    top = evaluate(built_index, labels, k=1, temperature=1.0, alpha=0.0, sweep=True, sweep_k=(1, 3),
                   sweep_temperature=(1.0,), sweep_alpha=(0.0,))
    baselines = top["baselines"]
    assert top["score"] == baselines["top1"] == baselines["knn"]  # k=1: knn is top1
    assert [row["score"] for row in top["sweep"] if row["k"] == 1] == [baselines["top1"]]
    assert [row["score"] for row in top["sweep"] if row["k"] == 3][0] < baselines["top1"] - 1e-3
    assert top["settings"]["knn_shrunk_alpha"] == 0.2
    # shrinking a (near-)perfect prediction towards the mean lands strictly between it and the mean
    assert baselines["top1"] > baselines["knn_shrunk"] > baselines["corpus_mean"]

    mean = evaluate(built_index, labels, k=5, alpha=1.0)  # alpha = 1 is the corpus-mean prediction
    assert mean["settings"]["knn_shrunk_alpha"] == 1.0
    assert mean["baselines"]["knn_shrunk"] == pytest.approx(mean["baselines"]["corpus_mean"], abs=1e-7)
    assert mean["score"] == pytest.approx(mean["baselines"]["corpus_mean"], abs=1e-7)
    mean_unit = unit(open_index(built_index).minilm_mean)[0]
    cosines = unit(minilm_embeddings(text_model, read_data_prompts(20))) @ mean_unit
    assert mean["median"] == pytest.approx(float(np.median(cosines)), abs=1e-6)
    assert mean["median"] != pytest.approx(float(cosines.mean()), abs=1e-6)  # the median is not the mean here
    assert "ci95" not in mean  # n < 30: no bootstrap interval


def test_alpha_weights_the_mean_not_the_neighbours(built_index, labels, text_model):
    """alpha = 0.2 (asymmetric, so swapped weights show): 0.8 · top neighbour + 0.2 · corpus mean."""
    report = evaluate(built_index, labels, k=1, temperature=0.05, alpha=0.2)
    index = _OPENED[built_index]
    top_ids = [int(result.ids[0]) for result in index.search_texts(read_data_prompts(20), k=1)]
    neighbour = unit(np.asarray(index.session.index.minilm[top_ids], dtype=np.float64))
    prediction = unit(0.8 * neighbour + 0.2 * unit(index.session.index.minilm_mean))
    truth = unit(minilm_embeddings(text_model, read_data_prompts(20)))
    expected = float((prediction * truth).sum(axis=1).mean())
    assert report["score"] == pytest.approx(expected, abs=1e-6)
    assert report["baselines"]["knn_shrunk"] == pytest.approx(expected, abs=1e-6)


@needs_shared("kaggle-sample")
def test_image_mode_on_the_kaggle_sample(built_index, text_model):
    import img2prompt

    report = evaluate(built_index, KAGGLE_SAMPLE / "prompts.csv", images=str(KAGGLE_SAMPLE / "images"), k=3,
                      sweep=True, sweep_k=(1, 3), sweep_temperature=(0.05,), sweep_alpha=(0.0, 1.0))
    assert report["n"] == 7 and report["settings"]["mode"] == "images" and report["failed"] == {}
    labels = pd.read_csv(KAGGLE_SAMPLE / "prompts.csv", dtype=str)
    paths = [next((KAGGLE_SAMPLE / "images").glob(f"{image_id}.*")) for image_id in labels["imgId"]]
    with img2prompt.open_index(built_index, device="cpu") as index:  # independent of eval's plumbing
        predictions = index.predict(paths, k=3)
    cosines = (unit(predictions) * unit(minilm_embeddings(text_model, labels["prompt"].tolist()))).sum(axis=1)
    assert report["score"] == pytest.approx(float(cosines.mean()), abs=1e-6)
    assert report["median"] == pytest.approx(float(np.median(cosines)), abs=1e-6)
    # the reported defect: 7 images cannot choose a setting; it says so, and scores the choice out of sample
    cv = report["cross_validation"]
    assert cv["folds"] == 5 and sorted(fold["n"] for fold in cv["per_fold"]) == [1, 1, 1, 2, 2]
    assert any(w.startswith("too few labelled images") for w in report["warnings"])
    beaten = cv["score"] > max(report["baselines"].values()) + 1e-9
    assert beaten != any(w.startswith("the sweep's choice does not beat baseline") for w in report["warnings"])


def test_labels_errors(built_index, tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"id": ["a"], "text": ["b"]}).to_csv(bad, index=False)
    with pytest.raises(UserError, match="no column imgId, prompt; its columns are id, text"):
        evaluate(built_index, bad)
    with pytest.raises(UserError, match="--plot draws the sweep: add --sweep"):
        evaluate(built_index, bad, plot=str(tmp_path / "p.png"))


# -- the sweep's choice, scored out of sample ---------------------------------------------------------------
# New names are imported inside the tests so that each test fails on its own when its feature is missing.

def test_alpha_grid_reaches_the_corpus_mean():
    from img2prompt.query.eval_options import SWEEP_ALPHA

    assert min(SWEEP_ALPHA) == 0.0 and max(SWEEP_ALPHA) == 1.0 and list(SWEEP_ALPHA) == sorted(SWEEP_ALPHA)


def test_folds_are_seeded_balanced_and_leave_one_out_when_small():
    from img2prompt.query.eval_sweep import fold_ids

    folds = fold_ids(12, 5, seed=0)
    assert sorted(np.bincount(folds)) == [2, 2, 2, 3, 3]
    np.testing.assert_array_equal(folds, fold_ids(12, 5, seed=0))  # deterministic
    assert not np.array_equal(folds, fold_ids(12, 5, seed=1))  # ... and seeded
    by_hand = np.empty(12, dtype=int)
    by_hand[np.random.default_rng(0).permutation(12)] = np.arange(12) % 5  # shuffle, deal round-robin
    np.testing.assert_array_equal(folds, by_hand)
    assert sorted(fold_ids(3, 5, seed=0)) == [0, 1, 2]  # n < folds: each image is its own fold


# Two settings on four images, leave-one-out. A is best in sample (mean 0.5 vs 0.425) only thanks to image 0.
COSINES = np.array([[0.9, 0.1, 0.5, 0.5],     # A
                    [0.4, 0.4, 0.45, 0.45]])  # B
# fold 0 (image 0 out): A 1.1/3 < B 1.3/3 -> B scores 0.4; folds 1-3: A wins (1.9/3, 1.5/3, 1.5/3) -> 0.1, 0.5, 0.5
CV_BY_HAND = (0.4 + 0.1 + 0.5 + 0.5) / 4


def test_cross_validation_by_hand():
    from img2prompt.query.eval_sweep import cross_validate

    held_out, chosen = cross_validate(COSINES, np.array([0, 1, 2, 3]))
    np.testing.assert_array_equal(chosen, [1, 0, 0, 0])
    np.testing.assert_allclose(held_out, [0.4, 0.1, 0.5, 0.5])
    assert held_out.mean() == pytest.approx(CV_BY_HAND) and CV_BY_HAND < COSINES.mean(axis=1).max()


def test_sweep_summary_recommends_the_all_data_choice_and_warns():
    from img2prompt.query.eval_sweep import sweep_summary
    from img2prompt.query.settings import RetrievalSettings

    grid = [RetrievalSettings(k=1, temperature=0.05, alpha=0.0), RetrievalSettings(k=5, temperature=0.05, alpha=0.0)]
    part = sweep_summary(grid, COSINES, {"corpus_mean": 0.38, "top1": 0.2})
    off = {"weighting": "softmax", "consensus": 0.0, "beta": 0.0}  # the switches' axes, off in this grid
    assert part["best_in_sample"] == {"k": 1, "temperature": 0.05, "alpha": 0.0, **off, "score": 0.5,
                                      "optimistic": True}
    assert part["recommended"] == {"k": 1, "temperature": 0.05, "alpha": 0.0, **off,
                                   "cross_validated_score": pytest.approx(CV_BY_HAND), "chosen_in_folds": 3}
    cv = part["cross_validation"]
    assert cv["folds"] == 4 and cv["score"] == pytest.approx(CV_BY_HAND)  # n = 4 < 5 folds: leave-one-out
    assert [(entry["k"], entry["folds"]) for entry in cv["chosen"]] == [(1, 3), (5, 1)]
    assert len(part["warnings"]) == 2 and part["warnings"][0].startswith("too few labelled images")
    assert part["warnings"][1].startswith("the sweep's choice does not beat baseline corpus_mean")  # 0.375 <= 0.38

    assert len(sweep_summary(grid, COSINES, {"corpus_mean": 0.3})["warnings"]) == 1  # beats it: no such warning
    tie = sweep_summary(grid, COSINES, {"knn": part["cross_validation"]["score"]})["warnings"]
    assert tie[1].startswith("the sweep's choice does not beat baseline knn")  # equal does not beat
    many = np.tile(COSINES, (1, 13))  # n = 52: enough images, and the choice beats the baseline
    assert sweep_summary(grid, many, {"corpus_mean": 0.3})["warnings"] == []

    one = sweep_summary(grid, COSINES[:, :1], {"corpus_mean": 0.3})  # a single image: nothing to hold out
    assert one["cross_validation"] is None and one["recommended"]["cross_validated_score"] is None
    assert one["warnings"][1].startswith("cannot cross-validate")

    # the recommendation is the choice on all images even where a fold (here the one holding image 3) disagrees
    split = sweep_summary(grid, np.array([[0.5, 0.5, 0.5, 0.5], [0.6, 0.6, 0.6, 0.1]]), {"corpus_mean": 0.0})
    assert split["recommended"]["k"] == 1 and split["recommended"]["chosen_in_folds"] == 3
    assert sorted(fold["k"] for fold in split["cross_validation"]["per_fold"]) == [1, 1, 1, 5]


@pytest.fixture(scope="module")
def heldout_report(built_index):
    """100 held-out prompts (none in the corpus) at alpha = 1, with a small sweep."""
    return evaluate(built_index, DATA / "heldout.csv", k=20, temperature=0.05, alpha=1.0, sweep=True,
                    sweep_k=(1, 5), sweep_temperature=(0.05, 0.5))


@pytest.fixture(scope="module")
def heldout_truth(text_model):
    return unit(minilm_embeddings(text_model, pd.read_csv(DATA / "heldout.csv", dtype=str)["prompt"].tolist()))


def test_bootstrap_ci_by_hand(built_index, heldout_report, heldout_truth):
    report = heldout_report
    assert report["n"] == 100 and report["leakage"]["true_prompts_in_corpus"] == 0
    cosines = heldout_truth @ unit(open_index(built_index).minilm_mean)[0]  # alpha = 1: the corpus mean
    assert report["score"] == pytest.approx(float(cosines.mean()), abs=1e-6)
    rng = np.random.default_rng(0)  # the report's seed
    means = cosines[rng.integers(0, 100, size=(1000, 100))].mean(axis=1)
    low, high = report["ci95"]
    assert low == pytest.approx(float(np.percentile(means, 2.5)), abs=1e-6)
    assert high == pytest.approx(float(np.percentile(means, 97.5)), abs=1e-6)
    assert cosines.min() < low < report["score"] < high < cosines.max()


def test_cross_validated_sweep_by_hand(built_index, heldout_report, heldout_truth):
    """Every grid setting recomputed through the public API, then 5-fold CV done here by hand."""
    from img2prompt.query.blend import blend

    report, index = heldout_report, _OPENED[built_index]
    assert "too few labelled images" not in " ".join(report["warnings"])  # n = 100
    found = index.search_texts(pd.read_csv(DATA / "heldout.csv", dtype=str)["prompt"].tolist(), k=20)
    scores, ids = np.stack([r.scores for r in found]), np.stack([r.ids for r in found])
    grid = [(row["k"], row["temperature"], row["alpha"]) for row in report["sweep"]]
    assert sorted({a for _, _, a in grid}) == [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0] and len(grid) == 3 * 2 * 7
    cosines = np.stack([(unit(blend(scores, ids, index.session.index.minilm, k=k, temperature=t, alpha=a,
                                    corpus_mean=index.session.index.minilm_mean)) * heldout_truth).sum(axis=1)
                        for k, t, a in grid])
    np.testing.assert_allclose([row["score"] for row in report["sweep"]], cosines.mean(axis=1), atol=1e-6)
    alpha_one = [row["score"] for row in report["sweep"] if row["alpha"] == 1.0]
    np.testing.assert_allclose(alpha_one, report["baselines"]["corpus_mean"], atol=1e-7)

    folds = np.empty(100, dtype=int)
    folds[np.random.default_rng(0).permutation(100)] = np.arange(100) % 5
    held_out, picks = np.empty(100), []
    for fold in range(5):
        pick = int(np.argmax(cosines[:, folds != fold].mean(axis=1)))
        held_out[folds == fold] = cosines[pick, folds == fold]
        picks.append(grid[pick])
    cv = report["cross_validation"]
    assert cv["score"] == pytest.approx(held_out.mean(), abs=1e-6)
    assert [(f["k"], f["temperature"], f["alpha"]) for f in cv["per_fold"]] == picks
    recommended = grid[int(np.argmax(cosines.mean(axis=1)))]
    assert (report["recommended"]["k"], report["recommended"]["temperature"],
            report["recommended"]["alpha"]) == recommended
    assert report["recommended"]["chosen_in_folds"] == picks.count(recommended)


def test_a_sweep_that_cannot_beat_the_corpus_mean_says_so(built_index, labels):
    report = evaluate(built_index, labels, exclude_exact=True, sweep=True, sweep_k=(1, 3),
                      sweep_temperature=(0.05,), sweep_alpha=(1.0,))  # every setting is the corpus mean
    assert report["cross_validation"]["score"] == pytest.approx(report["baselines"]["corpus_mean"], abs=1e-7)
    assert any(w.startswith("the sweep's choice does not beat baseline") for w in report["warnings"])
    from img2prompt.query.eval_report import format_report

    text = format_report(report)
    for needle in ("cross-validated score of the sweep's choice", "(chosen on all 20 images",
                   "optimistic", "baselines: corpus_mean", "warnings:", "does not beat baseline"):
        assert needle in text, needle
    # one coherent recommendation: the baseline the sweep does not beat, with its flags, on one line
    recommended = [line for line in text.splitlines() if line.startswith("recommended")]
    assert len(recommended) == 1 and re.match(r"recommended: the (\w+) baseline \(submit --[a-z]+ 1\); "
                                              r"the sweep's choice --k .* does not beat it", recommended[0])


def test_plot_draws_baselines_and_marks_the_recommended_setting():
    import matplotlib.pyplot as plt

    from img2prompt.query.eval_report import draw_sweep

    rows = [{"k": k, "temperature": t, "alpha": a, "score": 0.1 * k + t + a}
            for k in (1, 3) for t in (0.05, 0.5) for a in (0.0, 1.0)]
    baselines = {"corpus_mean": 0.3, "top1": 0.45, "knn": 0.5}
    recommended = {"k": 1, "temperature": 0.05, "alpha": 1.0}  # not the grid's maximum (k=3, T=0.5)
    figure = draw_sweep(rows, recommended, baselines, cv_score=0.42)
    try:
        lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
        for name, value in baselines.items():
            line = lines[f"{name} {value:.4f}"]
            assert list(line.get_ydata()) == [value, value]  # a horizontal line at the baseline
        marked = [line for label, line in lines.items() if label.startswith("recommended")]
        assert len(marked) == 1 and list(lines["cross-validated choice 0.4200"].get_ydata()) == [0.42, 0.42]
        assert list(marked[0].get_xdata()) == [1] and list(marked[0].get_ydata()) == [pytest.approx(1.15)]
        np.testing.assert_allclose(lines["T=0.05"].get_ydata(), [1.15, 1.35])  # curves at the recommended alpha
    finally:
        plt.close(figure)


# -- caption sets scored beside retrieval ------------------------------------------------------------------

def test_caption_sets_beside_retrieval_with_the_paired_difference(built_index, text_model, heldout_truth, tmp_path):
    """alpha = 1 makes retrieval the corpus mean, so every per-image number can be computed by hand."""
    from img2prompt.query.eval_report import format_report

    heldout = pd.read_csv(DATA / "heldout.csv", dtype=str)
    exact, rotated = tmp_path / "exact.csv", tmp_path / "rotated.csv"
    heldout.to_csv(exact, index=False)
    # each image captioned with the next image's prompt; the last 10 uncaptioned, one stranger added
    shifted = heldout.assign(prompt=np.roll(heldout["prompt"].to_numpy(), -1))[:90]
    pd.concat([shifted, pd.DataFrame({"imgId": ["stranger"], "prompt": ["a dog"]})]).to_csv(rotated, index=False)
    report = evaluate(built_index, DATA / "heldout.csv", k=20, alpha=1.0, captions={"exact": str(exact),
                                                                                    "next": str(rotated)})
    retrieval = heldout_truth @ unit(open_index(built_index).minilm_mean)[0]
    assert report["score"] == pytest.approx(float(retrieval.mean()), abs=1e-6)

    same = report["captions"]["exact"]
    assert same["n"] == 100 and same["score"] == pytest.approx(1.0, abs=1e-6) and same["missing"] == []
    assert same["retrieval_score"] == pytest.approx(report["score"], abs=1e-12)
    assert same["difference"]["mean"] == pytest.approx(float(retrieval.mean()) - 1.0, abs=1e-6)
    difference = retrieval - 1.0
    means = difference[np.random.default_rng(0).integers(0, 100, size=(1000, 100))].mean(axis=1)
    np.testing.assert_allclose(same["difference"]["ci95"], np.percentile(means, [2.5, 97.5]), atol=1e-6)

    other = report["captions"]["next"]
    captioned = (heldout_truth * np.roll(heldout_truth, -1, axis=0)).sum(axis=1)[:90]
    assert other["n"] == 90 and other["missing"] == heldout["imgId"].tolist()[90:] and other["extra"] == ["stranger"]
    assert other["score"] == pytest.approx(float(captioned.mean()), abs=1e-5)
    assert other["retrieval_score"] == pytest.approx(float(retrieval[:90].mean()), abs=1e-6)  # the same 90 images
    assert other["difference"]["mean"] == pytest.approx(float((retrieval[:90] - captioned).mean()), abs=1e-5)
    assert other["difference"]["median"] == pytest.approx(float(np.median(retrieval[:90] - captioned)), abs=1e-5)
    assert sum(w.startswith("captions next: 10 labelled image(s) have no caption") for w in report["warnings"]) == 1
    assert sum(w.startswith("captions next: 1 captioned image(s) are not labelled") for w in report["warnings"]) == 1

    text = format_report(report)
    assert "caption sets vs retrieval on the same images" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("exact"))
    assert row.split()[:5] == ["exact", "100", "1.0000", f"{retrieval.mean():.4f}", f"{retrieval.mean() - 1:+.4f}"]


def test_a_sweep_keeps_the_caption_warnings_beside_its_own(built_index, tmp_path):
    """--sweep adds its warnings to the report's; it used to replace the captions' (and the head's) warnings."""
    heldout = pd.read_csv(DATA / "heldout.csv", dtype=str)
    partial = tmp_path / "partial.csv"
    heldout[:90].to_csv(partial, index=False)
    report = evaluate(built_index, DATA / "heldout.csv", k=20, sweep=True, captions={"part": str(partial)})
    assert sum(w.startswith("captions part: 10 labelled image(s) have no caption") for w in report["warnings"]) == 1
    assert report["sweep"] and report["cross_validation"]  # the sweep ran and reported


def test_caption_set_errors(built_index, labels, tmp_path):
    with pytest.raises(UserError, match="--captions: the name 'a' is given twice"):
        evaluate(built_index, labels, captions=[("a", str(labels)), ("a", str(labels))])
    bad = tmp_path / "bad.csv"
    bad.write_text("imgId,caption\nq0,x\n")
    with pytest.raises(UserError, match=r"bad\.csv: no column prompt; its columns are imgId, caption"):
        evaluate(built_index, labels, captions={"blip": str(bad)})
    with pytest.raises(UserError, match="captions blip file not found"):
        evaluate(built_index, labels, captions={"blip": str(tmp_path / "none.csv")})


def test_plot_draws_caption_sets_as_lines():
    import matplotlib.pyplot as plt

    from img2prompt.query.eval_report import draw_sweep

    rows = [{"k": k, "temperature": 0.05, "alpha": 0.0, "score": 0.1 * k} for k in (1, 3)]
    figure = draw_sweep(rows, {"k": 1, "temperature": 0.05, "alpha": 0.0}, {"knn": 0.5}, None,
                        {"blip": 0.61, "coca": 0.47})
    try:
        lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
        assert list(lines["captions blip 0.6100"].get_ydata()) == [0.61, 0.61]
        assert list(lines["captions coca 0.4700"].get_ydata()) == [0.47, 0.47]
    finally:
        plt.close(figure)


def test_plot_without_matplotlib_names_the_extra(built_index, labels, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(UserError, match=r"--plot needs matplotlib.*pip install 'img2prompt\[eval\]'"):
        evaluate(built_index, labels, sweep=True, plot=str(tmp_path / "p.png"))


def test_sweep_reports_the_best_of_each_weighting(built_index, labels):
    from img2prompt.query.eval_report import format_report

    report = evaluate(built_index, labels, exclude_exact=True, sweep=True, sweep_k=(3, 10), sweep_temperature=(0.05,),
                      sweep_alpha=(0.0,), sweep_weighting=("softmax", "inverse-distance"), sweep_power=(2.0, 6.0))
    rows = report["sweep"]
    by_family = {family: [row for row in rows if row["weighting"] == family]
                 for family in ("softmax", "inverse-distance")}
    assert len(by_family["softmax"]) == 3 and len(by_family["inverse-distance"]) == 3 * 2  # k 3, 10, 20 (chosen)
    assert all("power" not in row and row["temperature"] == 0.05 for row in by_family["softmax"])
    assert all("temperature" not in row and row["epsilon"] == 1e-4 for row in by_family["inverse-distance"])
    best = report["best_per_weighting"]
    for family, family_rows in by_family.items():
        assert best[family]["score"] == max(row["score"] for row in family_rows)
        # the family's best is what a separate run with its setting scores
        fields = {name: best[family][name] for name in ("k", "weighting", "temperature", "power", "epsilon")
                  if name in best[family]}
        assert evaluate(built_index, labels, exclude_exact=True, **fields)["score"] == \
            pytest.approx(best[family]["score"], abs=1e-6)
    assert best["inverse-distance"]["flags"].startswith(f"--k {best['inverse-distance']['k']} --weighting "
                                                        "inverse-distance --power ")
    assert best["softmax"]["flags"].startswith(f"--k {best['softmax']['k']} --temperature 0.05")
    # the two families give other scores (the weights differ), and the report prints both bests
    assert {row["score"] for row in by_family["softmax"]} != {row["score"] for row in by_family["inverse-distance"]}
    text = format_report(report)
    assert "best softmax in-sample" in text and "best inverse-distance in-sample" in text and "1/(d^6+0.0001)" in text
