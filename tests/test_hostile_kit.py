"""The kit's start-of-notebook index check (index_problem, cut from the notebook's own source) against an index
damaged after the kit was built: a flipped byte in clip.f16 / minilm.f16, a truncated file, an edited manifest,
a missing file. Each is one line naming the file; an intact index is "". Fast: no kit build, no notebook."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from img2prompt.kit import template as kit_template
from img2prompt.kit.files import index_file_records
from img2prompt.index.layout import CLIP_VECTORS, MANIFEST, MINILM


def check_function():
    """index_problem exactly as the notebook defines it (the cell holding it, run alone)."""
    cell = next(code for kind, code in kit_template.split_cells() if kind == "code" and "def index_problem" in code)
    namespace: dict = {}
    exec(compile(cell.split("\nINDEX_FILES =")[0], "kit-check", "exec"), namespace)
    return namespace["index_problem"]


@pytest.fixture()
def kit_index(built_index, tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "index"
    shutil.copytree(built_index, root)
    manifest = json.loads((root / MANIFEST).read_text())
    return root, index_file_records(root, manifest)


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_intact_index_passes(kit_index):
    assert check_function()(*kit_index) == ""


@pytest.mark.parametrize("name", [CLIP_VECTORS, MINILM])
@pytest.mark.parametrize("where", [0, -1])
def test_a_flipped_byte_is_told(kit_index, name, where):
    root, records = kit_index
    flip(root / name, where if where >= 0 else (root / name).stat().st_size - 1)
    problem = check_function()(root, records)
    assert str(root / name) in problem and "sha256" in problem and "\n" not in problem


def test_a_truncated_file_is_told_by_size(kit_index):
    root, records = kit_index
    (root / MINILM).write_bytes((root / MINILM).read_bytes()[:-1])
    problem = check_function()(root, records)
    assert str(root / MINILM) in problem and "kit.json says" in problem


def test_an_edited_manifest_is_told(kit_index):
    root, records = kit_index
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["count"] = manifest["count"]  # same content, re-serialised: any edit changes bytes or hash
    text = json.dumps(manifest).replace('"count": ', '"count":  ')
    (root / MANIFEST).write_text(text)
    problem = check_function()(root, records)
    assert str(root / MANIFEST) in problem and "\n" not in problem


def test_a_missing_file_is_told(kit_index):
    root, records = kit_index
    (root / CLIP_VECTORS).unlink()
    assert check_function()(root, records) == f"{root / CLIP_VECTORS} is missing"


def test_the_notebook_stops_on_a_problem_before_it_installs_or_predicts():
    """The refusal comes before the install cell and the prediction cell in the one source."""
    source = kit_template.SUBMIT_SOURCE
    refusal = source.index("index is damaged, nothing was predicted")
    assert refusal < source.index("pip\", \"install\"") < source.index("import img2prompt\n")
