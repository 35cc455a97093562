"""Nothing a user points at is destroyed or silently wrong: submit and eval refuse colliding outputs and
labels that match no image, in one line, before any image is encoded or any scorer loaded."""
from __future__ import annotations

import hashlib
import shutil

import pandas as pd
import pytest

import img2prompt
from conftest import run_cli
from img2prompt.errors import UserError
from img2prompt.query.eval_options import eval_options
from img2prompt.query.evaluate import run_eval


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, built_index, sample_images):
    """A private copy of the index and the images (a failed guard must not destroy the shared fixtures)."""
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(built_index, root / "idx")
    shutil.copytree(sample_images, root / "imgs")
    rows = [f"img{number}_{i}" for number in range(4) for i in range(384)]
    pd.DataFrame({"imgId_eId": rows, "val": 0.0}).to_csv(root / "sample.ids.txt", index=False)
    return root


@pytest.fixture(scope="module")
def opened(workspace):
    with img2prompt.open_index(workspace / "idx", device="cpu") as index:
        yield index


@pytest.fixture
def no_work(monkeypatch):
    """Any image encoding or scorer load fails the test: every refusal must come before them."""
    import img2prompt.query.evaluate as evaluate_module
    import img2prompt.query.submit as submit_module

    def never(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    for module in (submit_module, evaluate_module):
        monkeypatch.setattr(module, "retrieve_images", never)
    monkeypatch.setattr(evaluate_module, "load_text_model", never)


def fingerprint(root) -> dict:
    return {path.relative_to(root): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


SUBMIT_CASES = [  # (options, message): each destroyed something, with exit 0, before output_paths
    ({"out": "p.ids.txt", "save_npy": "p.npy"}, r"--save-npy's id list and --out name the same file .*p.ids.txt"),
    ({"out": "s.csv", "explain": "q.ids.txt", "save_npy": "q.npy"},
     r"--save-npy's id list and --explain name the same file .*q.ids.txt"),
    ({"out": "s.csv", "sample_submission": "sample.ids.txt", "save_npy": "sample.npy"},
     r"--save-npy's id list .*sample.ids.txt would overwrite the --sample-submission input"),
    ({"out": "idx/manifest.json"}, r"--out .*idx/manifest.json lies inside the INDEX_DIR .*idx input folder"),
    ({"out": "s.csv", "save_npy": "idx/minilm_mean.npy"}, r"--save-npy .*minilm_mean.npy lies inside the INDEX_DIR"),
    ({"out": "imgs/img0.png"}, r"--out .*imgs/img0.png lies inside the IMAGES_DIR .*imgs input folder"),
    ({"out": "s.csv", "explain": "imgs/explain.csv"}, r"--explain .*explain.csv lies inside the IMAGES_DIR"),
]


@pytest.mark.parametrize("options, message", SUBMIT_CASES)
def test_submit_refuses_outputs_that_destroy_inputs(opened, workspace, no_work, options, message):
    before = fingerprint(workspace)
    paths = {name: str(workspace / value) for name, value in options.items()}
    out = paths.pop("out")
    with pytest.raises(UserError, match=message) as caught:
        opened.submission(str(workspace / "imgs"), out, progress=False, **paths)
    assert "\n" not in str(caught.value)
    assert fingerprint(workspace) == before


@pytest.mark.parametrize("out, message", [
    ("idx/manifest.json", r"--out .*manifest.json lies inside the INDEX_DIR"),
    ("idx/report.json", r"--out .*report.json lies inside the INDEX_DIR"),
    ("imgs/report.json", r"--out .*report.json lies inside the IMAGES_DIR"),
    ("labels.csv", r"--out .*labels.csv would overwrite the --labels input"),
])
def test_eval_refuses_outputs_that_destroy_inputs(opened, workspace, no_work, out, message):
    labels = workspace / "labels.csv"
    labels.write_text("imgId,prompt\nimg0,a cat\nimg1,a dog\n", encoding="utf-8")
    before = fingerprint(workspace)
    with pytest.raises(UserError, match=message):
        run_eval(opened.session, eval_options(labels=str(labels), images=str(workspace / "imgs"),
                                             out=str(workspace / out), progress=False))
    assert fingerprint(workspace) == before


@pytest.mark.parametrize("ids, message", [
    (["IMG0", "IMG1", "IMG2"], r"only 0 of 3 labelled images are in .*imgs \(at least 50% must be\): labels name "
                               r"IMG0, IMG1, IMG2; the folder holds img0, img1, img2, img3; the ids differ"),
    (["img0.png", "img1.png"], r"only 0 of 2 .*carry a file suffix: give the file stem"),
    (["img0", "x1", "x2", "x3", "x4"], r"only 1 of 5 labelled images"),
])
def test_eval_refuses_labels_that_match_too_few_images(opened, workspace, tmp_path, no_work, ids, message):
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"imgId": ids, "prompt": [f"prompt {n}" for n in range(len(ids))]}).to_csv(labels, index=False)
    with pytest.raises(UserError, match=message):
        run_eval(opened.session, eval_options(labels=str(labels), images=str(workspace / "imgs"), progress=False))


def test_eval_labels_in_the_wrong_folder_are_refused(opened, workspace, tmp_path, no_work):
    labels = tmp_path / "labels.csv"
    labels.write_text("imgId,prompt\nimg0,a cat\nimg1,a dog\n", encoding="utf-8")
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match=r"only 0 of 2 labelled images are in .*other .*the folder holds none$"):
        run_eval(opened.session, eval_options(labels=str(labels), images=str(tmp_path / "other"), progress=False))


@pytest.mark.slow
def test_the_cli_prints_one_line_and_exits_2(workspace):
    before = fingerprint(workspace)
    result = run_cli("submit", workspace / "idx", workspace / "imgs", "--out", workspace / "p.ids.txt",
                     "--save-npy", workspace / "p.npy", "--device", "cpu", "-q")
    assert result.returncode == 2, result.stderr
    assert "--save-npy's id list and --out name the same file" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert fingerprint(workspace) == before


def test_eval_names_a_null_label_before_any_model(opened, workspace, tmp_path, no_work):
    labels = tmp_path / "labels.parquet"
    pd.DataFrame({"imgId": ["img0", "img1"], "prompt": ["a cat", None]}).to_parquet(labels)
    with pytest.raises(UserError, match=r"labels.parquet, row 2: prompt is empty \(null\)"):
        run_eval(opened.session, eval_options(labels=str(labels), images=str(workspace / "imgs"), progress=False))
