"""output_paths.check_outputs: each class of output that would destroy an input, a side file or an index."""
from __future__ import annotations

import json
import os
from functools import partial

import pytest

from img2prompt import output_paths
from img2prompt.errors import UserError
from img2prompt.index.manifest import is_index_folder
from img2prompt.output_paths import Output

check_outputs = partial(output_paths.check_outputs, is_index=is_index_folder)  # as the query commands call it


@pytest.fixture
def index_dir(tmp_path):
    root = tmp_path / "idx"
    (root / "shards").mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"format_version": 3}), encoding="utf-8")
    return root


def npy(path) -> Output:
    """--save-npy as submit declares it: the array and its id list."""
    path = str(path)
    return Output("--save-npy", path, (("id list", path.removesuffix(".npy") + ".ids.txt"),))


def test_distinct_outputs_beside_the_inputs_pass(tmp_path, index_dir):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "sample.csv").write_text("imgId_eId,val\n", encoding="utf-8")
    check_outputs([Output("--out", tmp_path / "s.csv"), Output("--explain", None), npy(tmp_path / "p.npy")],
                  {"--sample-submission": tmp_path / "sample.csv", "IMAGES_DIR": tmp_path / "imgs",
                   "INDEX_DIR": index_dir, "--captions": None})


def test_an_output_that_is_a_side_file_of_another(tmp_path):
    with pytest.raises(UserError, match=r"--save-npy's id list and --out name the same file .*p.ids.txt"):
        check_outputs([Output("--out", tmp_path / "p.ids.txt"), npy(tmp_path / "p.npy")], {})
    with pytest.raises(UserError, match=r"--save-npy's id list and --explain name the same file"):
        check_outputs([Output("--explain", tmp_path / "q.ids.txt"), npy(tmp_path / "q.npy")], {})


def test_an_output_that_is_an_input(tmp_path):
    sample = tmp_path / "sample.ids.txt"
    sample.write_text("x\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"--save-npy's id list .*sample.ids.txt would overwrite the "
                                        r"--sample-submission input"):
        check_outputs([npy(tmp_path / "sample.npy")], {"--sample-submission": sample})
    # the same file under another spelling: `..`, a symlink, a hard link
    (tmp_path / "sub").mkdir()
    os.symlink(sample, tmp_path / "link.txt")
    os.link(sample, tmp_path / "hard.txt")
    for other in (tmp_path / "sub" / ".." / "sample.ids.txt", tmp_path / "link.txt", tmp_path / "hard.txt"):
        with pytest.raises(UserError, match="would overwrite the --labels input"):
            check_outputs([Output("--out", other)], {"--labels": sample})


def test_two_outputs_that_are_one_file(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match=r"--plot and --out name the same file"):
        check_outputs([Output("--out", tmp_path / "r.json"), Output("--plot", tmp_path / "x" / ".." / "r.json")],
                      {})


def test_outputs_inside_an_index_folder(tmp_path, index_dir):
    for target in (index_dir / "manifest.json", index_dir / "minilm_mean.npy", index_dir / "shards" / "s.csv"):
        with pytest.raises(UserError, match=r"lies inside the (INDEX_DIR .* input|index) folder"):
            check_outputs([Output("--out", target)], {"INDEX_DIR": index_dir})
        # not named as an input: still an index (it holds an img2prompt manifest)
        with pytest.raises(UserError, match=rf"--out {target} lies inside the index folder {index_dir}"):
            check_outputs([Output("--out", target)], {})


def test_a_foreign_manifest_is_not_an_index(tmp_path):
    (tmp_path / "manifest.json").write_text('{"name": "a web app"}', encoding="utf-8")
    assert not is_index_folder(tmp_path)
    check_outputs([Output("--out", tmp_path / "s.csv")], {})
    (tmp_path / "manifest.json").write_text("{damaged", encoding="utf-8")
    assert is_index_folder(tmp_path)  # a damaged index is still protected


def test_outputs_inside_an_input_image_folder(tmp_path):
    images = tmp_path / "imgs"
    (images / "deeper").mkdir(parents=True)
    (images / "a.png").write_bytes(b"png")
    for target in (images / "a.png", images / "new.csv", images / "deeper" / "s.csv"):
        with pytest.raises(UserError, match=rf"--out {target} lies inside the IMAGES_DIR {images} input folder"):
            check_outputs([Output("--out", target)], {"IMAGES_DIR": images})
    os.symlink(images, tmp_path / "alias")  # the same folder by another name
    with pytest.raises(UserError, match="lies inside the IMAGES_DIR"):
        check_outputs([Output("--out", tmp_path / "alias" / "s.csv")], {"IMAGES_DIR": images})


def test_unusable_output_paths(tmp_path):
    with pytest.raises(UserError, match=r"--out .* is a folder: give a file path"):
        check_outputs([Output("--out", tmp_path)], {})
    with pytest.raises(UserError, match=r"--save-npy's id list .*: the folder .*missing does not exist"):
        check_outputs([Output("--save-npy", tmp_path / "p.npy", (("id list", tmp_path / "missing" / "p.ids.txt"),))],
                      {})


def test_case_follows_the_file_system(tmp_path, monkeypatch):
    """On a case-insensitive folder `Out.csv` and `out.csv` are one file; on this (case-sensitive) one two."""
    import img2prompt.output_paths as output_paths

    outputs = [Output("--out", tmp_path / "Out.csv"), Output("--explain", tmp_path / "out.csv")]
    check_outputs(outputs, {})
    monkeypatch.setattr(output_paths, "_case_insensitive", lambda folder: True)
    with pytest.raises(UserError, match="--explain and --out name the same file"):
        check_outputs(outputs, {})
