"""`score`: the metric offline on Kaggle's own files (the sample submission holds the scorer's embeddings of
the true prompts, so it must score 1), a hand-computed shuffle, caption texts, id mismatches, bad input."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from conftest import KAGGLE_SAMPLE, needs_shared
from img2prompt.errors import UserError
from img2prompt.query.score import ScoreOptions, check_labelled_images, read_prompt_table, read_submission, run_score

needs_sample = needs_shared("kaggle-sample")
LABELS = KAGGLE_SAMPLE / "prompts.csv"
SAMPLE = KAGGLE_SAMPLE / "sample_submission.csv"


def score(text_model, **options) -> dict:
    return run_score(ScoreOptions(labels=str(options.pop("labels", LABELS)), **options), text_model=text_model)


def sample_frame() -> pd.DataFrame:
    return pd.read_csv(SAMPLE, dtype={"imgId_eId": str})


def sample_vectors() -> dict[str, np.ndarray]:
    frame = sample_frame()
    images = frame["imgId_eId"].str.rpartition("_")[0]
    return {image: frame["val"][images == image].to_numpy(np.float64) for image in dict.fromkeys(images)}


@needs_sample
def test_the_sample_submission_scores_one(text_model):
    report = score(text_model, submission=str(SAMPLE))
    assert report["n"] == report["n_labels"] == 7 and report["missing"] == [] and report["extra"] == []
    assert report["score"] == pytest.approx(1.0, abs=1e-6) and report["median"] == pytest.approx(1.0, abs=1e-6)
    assert list(report["per_image"]) == pd.read_csv(LABELS, dtype=str)["imgId"].tolist()  # label order
    assert all(value == pytest.approx(1.0, abs=1e-6) for value in report["per_image"].values())
    assert "ci95" not in report and report["warnings"] == []  # n < 30: no bootstrap interval


@needs_sample
def test_swapping_two_images_scores_what_a_hand_computation_gives(text_model, tmp_path):
    vectors = sample_vectors()
    first, second = list(vectors)[1], list(vectors)[4]
    frame = sample_frame()
    rows_first = frame.index[frame["imgId_eId"].str.startswith(first + "_")]
    rows_second = frame.index[frame["imgId_eId"].str.startswith(second + "_")]
    frame.loc[rows_first, "val"], frame.loc[rows_second, "val"] = (frame.loc[rows_second, "val"].to_numpy(),
                                                                   frame.loc[rows_first, "val"].to_numpy())
    frame = frame.sample(frac=1.0, random_state=0)  # row order must not matter: values go by their own id
    shuffled = tmp_path / "shuffled.csv"
    frame.to_csv(shuffled, index=False)

    a, b = vectors[first], vectors[second]
    cross = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # the truths are the sample's vectors
    report = score(text_model, submission=str(shuffled))
    assert report["per_image"][first] == pytest.approx(cross, abs=1e-6)
    assert report["per_image"][second] == pytest.approx(cross, abs=1e-6)
    assert report["score"] == pytest.approx((5 + 2 * cross) / 7, abs=1e-6) and cross < 0.9
    assert report["median"] == pytest.approx(1.0, abs=1e-6)  # 5 of 7 still perfect


@needs_sample
def test_captions_of_the_true_prompts_score_one_and_others_score_less(text_model, tmp_path):
    labels = pd.read_csv(LABELS, dtype=str)
    exact = tmp_path / "exact.csv"
    labels.to_csv(exact, index=False)
    assert score(text_model, captions=str(exact))["score"] == pytest.approx(1.0, abs=1e-6)

    rotated = labels.assign(prompt=np.roll(labels["prompt"].to_numpy(), 1))  # each image: another's prompt
    path = tmp_path / "rotated.csv"
    rotated.to_csv(path, index=False)
    report = score(text_model, captions=str(path))
    truth = np.stack(list(sample_vectors().values()))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    expected = (truth * np.roll(truth, 1, axis=0)).sum(axis=1)
    np.testing.assert_allclose(list(report["per_image"].values()), expected, atol=1e-5)
    assert report["kind"] == "captions" and report["score"] == pytest.approx(float(expected.mean()), abs=1e-5)


@needs_sample
def test_missing_and_extra_ids_are_reported_not_dropped(text_model, tmp_path):
    frame = sample_frame()
    dropped = frame["imgId_eId"].iloc[0].rpartition("_")[0]
    frame = frame[~frame["imgId_eId"].str.startswith(dropped + "_")]
    extra = pd.DataFrame({"imgId_eId": [f"stranger_{i}" for i in range(384)], "val": np.full(384, 384 ** -0.5)})
    path = tmp_path / "partial.csv"
    pd.concat([frame, extra]).to_csv(path, index=False)
    out = tmp_path / "report.json"
    report = score(text_model, submission=str(path), out=str(out))
    assert report["n"] == 6 and report["n_labels"] == 7
    assert report["missing"] == [dropped] and report["extra"] == ["stranger"]
    assert report["score"] == pytest.approx(1.0, abs=1e-6)
    assert report["score_missing_as_zero"] == pytest.approx(6 / 7, abs=1e-6)
    assert report["warnings"][0].startswith("1 image(s) labelled but not predicted")
    assert dropped in report["warnings"][0]
    assert "stranger" in report["warnings"][1]
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def valid_rows(image: str = "a", values=None) -> str:
    values = values if values is not None else [1.0] + [0.0] * 383
    return "".join(f"{image}_{i},{value}\n" for i, value in enumerate(values))


@pytest.mark.parametrize("body, message", [
    ("imgId,val\na_0,1\n", "columns are imgId, val; expected imgId_eId,val"),
    ("imgId_eId,val\n", "a header but no rows"),
    ("imgId_eId,val\n" + valid_rows()[:-1] + "\nb_x,0.5\n", r"line 386: 'b_x' is not of the form <imgId>_<0..383>"),
    ("imgId_eId,val\na_384,1\n", r"line 2: 'a_384' is not of the form"),
    ("imgId_eId,val\n" + valid_rows() + "a_7,0.1\n", r"line 386: row 'a_7' appears twice"),
    ("imgId_eId,val\n" + valid_rows().replace("a_5,0.0", "a_5,oops"), r"line 7: value 'oops' is not a finite number"),
    ("imgId_eId,val\n" + valid_rows().replace("a_9,0.0", "a_9,"), r"line 11: value '' is not a finite number"),
    ("imgId_eId,val\n" + valid_rows() + "b_0,1\n", r"image 'b' has 1 rows, expected 384"),
    # Kaggle matches f"{imgId}_{i}" exactly: a leading zero or a non-ASCII digit is another id, not element 7
    ("imgId_eId,val\n" + valid_rows().replace("a_7,", "a_007,"), r"line 9: 'a_007' is not of the form .*ASCII"),
    ("imgId_eId,val\n" + valid_rows().replace("a_7,", "a_\u0667,"), r"line 9: 'a_\u0667' is not of the form"),
    ("imgId_eId,val\n" + valid_rows().replace("a_0,", "a_00,"), r"line 2: 'a_00' is not of the form"),
    ("imgId_eId,val\n" + valid_rows().replace("a_7,", "a_+7,"), r"line 9: 'a_\+7' is not of the form"),
])
def test_malformed_submissions_get_one_line_errors(tmp_path, body, message):
    path = write(tmp_path, "bad.csv", body)
    with pytest.raises(UserError, match=message) as caught:
        read_submission(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_submission_vectors_are_placed_by_id(tmp_path):
    values = np.arange(384, dtype=np.float64)
    lines = [f"b_{i},{values[i]}" for i in range(384)][::-1] + [f"a_{i},{-values[i]}" for i in range(384)]
    parsed = read_submission(write(tmp_path, "s.csv", "imgId_eId,val\n" + "\n".join(lines) + "\n"))
    assert parsed.image_ids == ["b", "a"]
    np.testing.assert_array_equal(parsed.vectors, np.stack([values, -values]))


def test_bad_labels_captions_and_arguments_fail_before_the_scorer_loads(tmp_path):
    # text_model=None here: each error must come before load_text_model is reached
    labels = write(tmp_path, "labels.csv", "imgId,prompt\na,a cat\n")
    with pytest.raises(UserError, match="exactly one of --submission and --captions"):
        run_score(ScoreOptions(labels=str(labels)))
    with pytest.raises(UserError, match=r"captions\.csv, line 3: imgId 'a' appears twice"):
        run_score(ScoreOptions(labels=str(labels), captions=str(write(tmp_path, "captions.csv",
                                                                          "imgId,prompt\na,x\na,y\n"))))
    with pytest.raises(UserError, match="no column prompt; its columns are imgId, text"):
        run_score(ScoreOptions(labels=str(labels), captions=str(write(tmp_path, "c2.csv", "imgId,text\na,x\n"))))
    with pytest.raises(UserError, match="labels file not found"):
        run_score(ScoreOptions(labels=str(tmp_path / "nope.csv"), captions=str(labels)))
    with pytest.raises(UserError, match="would overwrite the --labels input"):
        run_score(ScoreOptions(labels=str(labels), captions=str(labels), out=str(labels)))


def test_no_common_ids_is_an_error(text_model, tmp_path):
    labels = write(tmp_path, "labels.csv", "imgId,prompt\na,a cat\n")
    captions = write(tmp_path, "captions.csv", "imgId,prompt\nz,a dog\n")
    with pytest.raises(UserError, match="none of its 1 image ids is in the labels"):
        run_score(ScoreOptions(labels=str(labels), captions=str(captions)), text_model=text_model)


@needs_sample
def test_the_command_prints_the_table_and_json(tmp_path, capsys, monkeypatch):
    from img2prompt.cli import score as cli_score

    parser = argparse.ArgumentParser()
    cli_score.add_parser(parser.add_subparsers(dest="command"))
    cli_score.run(parser.parse_args(["score", "--labels", str(LABELS), "--submission", str(SAMPLE)]))
    text = capsys.readouterr().out
    assert "score 1.0000  median 1.0000  (n = 7 of 7 labelled images)" in text and "20057f34d" in text
    cli_score.run(parser.parse_args(["score", "--labels", str(LABELS), "--submission", str(SAMPLE), "--json"]))
    assert json.loads(capsys.readouterr().out)["score"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(SystemExit):  # argparse: the two predictions exclude each other
        parser.parse_args(["score", "--labels", "l.csv", "--submission", "s.csv", "--captions", "c.csv"])
    assert cli_score.parse_named_path("blip=out/blip.csv") == ("blip", "out/blip.csv")
    with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=captions.csv"):
        cli_score.parse_named_path("out/blip.csv")


@pytest.mark.parametrize("table, message", [
    (pd.DataFrame({"imgId": ["a", "b"], "prompt": [7, 8]}),
     r"labels.parquet, row 1: prompt holds int64 \(7\), not text"),
    (pd.DataFrame({"imgId": ["a", "b"], "prompt": [0.5, 8.0]}), r"row 1: prompt holds float64 \(0.5\), not text"),
    (pd.DataFrame({"imgId": ["a", "b"], "prompt": ["a cat", None]}),
     r"labels.parquet, row 2: prompt is empty \(null\)"),
    (pd.DataFrame({"imgId": ["a", "b"], "prompt": ["a cat", float("nan")]}), r"row 2: prompt is empty \(null\)"),
    (pd.DataFrame({"imgId": ["a", None], "prompt": ["a cat", "a dog"]}), r"row 2: imgId is empty \(null\)"),
    (pd.DataFrame({"imgId": ["a", "b"], "prompt": pd.Categorical(["a cat", None])}), r"row 2: prompt is empty"),
    (pd.DataFrame({"imgId": ["a", "b"], "prompt": ["a cat", " ... "]}), r"row 2: prompt ' ... ' has no word"),
])
def test_labels_parquet_must_hold_text_prompts(tmp_path, table, message):
    """Nulls and numbers in a labels parquet: one line naming file and row, never the scorer's traceback."""
    path = tmp_path / "labels.parquet"
    table.to_parquet(path)
    with pytest.raises(UserError, match=message) as caught:
        read_prompt_table(path)
    assert "\n" not in str(caught.value)


def test_dictionary_encoded_and_integer_columns_are_read_as_text(tmp_path):
    path = tmp_path / "labels.parquet"
    pd.DataFrame({"imgId": [10, 11], "prompt": pd.Categorical(["a cat", "a dog"])}).to_parquet(path)
    frame = read_prompt_table(path)
    assert frame["imgId"].tolist() == ["10", "11"] and frame["prompt"].tolist() == ["a cat", "a dog"]


@pytest.mark.parametrize("body, message", [
    ("imgId,prompt\na,a cat\nb,\n", r"labels.csv, line 3: prompt '' has no word"),
    ("imgId,prompt\na,a cat\nb,  \n", r"line 3: prompt '  ' has no word"),
    ("imgId,prompt\na,a cat\n,a dog\n", r"line 3: the imgId is empty"),
])
def test_labels_csv_rows_need_an_id_and_a_word(tmp_path, body, message):
    with pytest.raises(UserError, match=message):
        read_prompt_table(write(tmp_path, "labels.csv", body))


def test_null_captions_are_named_before_the_scorer_loads(tmp_path):
    labels = write(tmp_path, "labels.csv", "imgId,prompt\na,a cat\nb,a dog\n")
    captions = tmp_path / "blip.parquet"
    pd.DataFrame({"imgId": ["a", "b"], "prompt": ["a cat", None]}).to_parquet(captions)
    with pytest.raises(UserError, match=r"blip.parquet, row 2: prompt is empty \(null\)"):
        run_score(ScoreOptions(labels=str(labels), captions=str(captions)))  # no scorer: fails before loading


def test_labels_that_match_too_few_images_are_refused():
    check_labelled_images("l.csv", ["a", "b", "c", "d"], "imgs", ["a", "b", "x"])  # half found: scored
    with pytest.raises(UserError, match=r"l.csv: only 1 of 4 labelled images are in imgs \(at least 50% must be\): "
                                        r"labels name a, b, c, d; the folder holds a, x, y$"):
        check_labelled_images("l.csv", ["a", "b", "c", "d"], "imgs", ["y", "x", "a"])
    with pytest.raises(UserError, match=r"only 0 of 2 .*the folder holds none$"):
        check_labelled_images("l.csv", ["a", "b"], "imgs", [])
    with pytest.raises(UserError, match=r"labels name A, B; the folder holds a, b; the ids differ .* in case only"):
        check_labelled_images("l.csv", ["A", "B"], "imgs", ["a", "b"])
    with pytest.raises(UserError, match=r"only 0 of 2 .*carry a file suffix: give the file stem"):
        check_labelled_images("l.csv", ["a.png", "b.png"], "imgs", ["a", "b"])
