"""A damaged index opened by open_index, `search` and `submit`: truncated vectors, a missing file, a side file
replaced by garbage of the same size, manifest fields out of range. Each is one line naming the file and
"rebuild" (a UserError in process; exit 1 and no traceback from the CLI)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from img2prompt.errors import UserError
from img2prompt.index.reader import open_index


def damaged_copy(built_index: Path, tmp_path: Path) -> Path:
    root = tmp_path / "idx"
    shutil.copytree(built_index, root)
    return root


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-2])


def garbage_same_size(path: Path) -> None:
    path.write_bytes(b"\x07" * path.stat().st_size)


def opened_and_read(root: Path):
    index = open_index(root)
    index.minilm_mean  # the side file is read when first used
    return index


CASES = {
    "truncated clip.f16": (lambda r: truncate(r / "clip.f16"), "clip.f16"),
    "truncated minilm.f16": (lambda r: truncate(r / "minilm.f16"), "minilm.f16"),
    "missing minilm.f16": (lambda r: (r / "minilm.f16").unlink(), "minilm.f16"),
    "missing prompts": (lambda r: (r / "prompts.parquet").unlink(), "prompts.parquet"),
    "garbage prompts": (lambda r: garbage_same_size(r / "prompts.parquet"), "prompts.parquet"),
    "garbage mean": (lambda r: garbage_same_size(r / "minilm_mean.npy"), "minilm_mean.npy"),
    "count negative": (lambda r: edit_manifest(r, lambda m: m.update(count=-3)), "manifest"),
    "count too big": (lambda r: edit_manifest(r, lambda m: m.update(count=m["count"] + 1)), "idx"),
    "file bytes wrong": (lambda r: edit_manifest(r, lambda m: m["files"]["clip.f16"].update(bytes=1)), "clip.f16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_index_is_one_line_naming_the_file_and_rebuild(built_index, tmp_path, case):
    damage, named = CASES[case]
    root = damaged_copy(built_index, tmp_path)
    damage(root)
    with pytest.raises(UserError) as raised:
        opened_and_read(root)
    message = str(raised.value)
    assert "\n" not in message and named in message and "rebuild" in message, message


def test_garbage_vectors_of_the_right_size_are_caught_by_verify(built_index, tmp_path):
    root = damaged_copy(built_index, tmp_path)
    garbage_same_size(root / "clip.f16")
    with pytest.raises(UserError, match=r"clip\.f16: sha256 differs .*rebuild"):
        open_index(root, verify=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated clip.f16", "missing minilm.f16", "count negative"])
def test_search_and_submit_on_a_damaged_index_exit_1_with_one_line(built_index, sample_images, tmp_path, case):
    damage, named = CASES[case]
    root = damaged_copy(built_index, tmp_path)
    damage(root)
    for args in (["search", root, "--text", "a fox"],
                 ["submit", root, sample_images, "--out", tmp_path / "submission.csv"]):
        done = run_cli(*args)
        assert done.returncode != 0, (args, done.stdout)
        assert "Traceback" not in done.stderr, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert any(named in line and "rebuild" in line for line in lines), done.stderr
    assert not (tmp_path / "submission.csv").exists()
