"""The kit's submission code (submit.py = the notebook's cells) on a kit built with its wheels stubbed: it
checks the index before it predicts, and its cells show no stray values.

The kit's img2prompt wheel is a stub of the installed version, so the code finds img2prompt already installed
and runs against this environment; no wheel is fetched or installed (the fresh-venv run is in
test_kaggle_kit.py, marked slow)."""
from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from img2prompt import kit_template
from img2prompt.index.format import CLIP_VECTORS, MANIFEST, MINILM
from img2prompt.kaggle_kit import KitOptions, build_kit
from kit_helpers import stub_wheels


@pytest.fixture(scope="module")
def stub_kit(built_index, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stub-kit") / "kit"
    with pytest.MonkeyPatch.context() as monkeypatch:
        stub_wheels(monkeypatch)
        build_kit(KitOptions(index=str(built_index), out=str(out)))
    return out


@pytest.fixture
def kit_copy(stub_kit, tmp_path) -> Path:
    """A private copy of the stub kit (real copies, not hard links: a test may damage its files)."""
    import shutil

    return Path(shutil.copytree(stub_kit, tmp_path / "kit", copy_function=shutil.copyfile))


def kit_env(kit: Path, images: Path, out: Path) -> dict[str, str]:
    return {"IMG2PROMPT_KIT": str(kit), "IMG2PROMPT_IMAGES": str(images), "IMG2PROMPT_SAMPLE": "",
            "IMG2PROMPT_OUT": str(out)}


def run_submit_script(kit: Path, images: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **kit_env(kit, images, out)}
    return subprocess.run([sys.executable, str(kit / kit_template.SCRIPT_NAME)], capture_output=True, text=True,
                          env=env, cwd=kit.parent, timeout=300)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.unlink()  # a new file: never write through a link shared with another index
    path.write_bytes(bytes(data))


def test_kit_json_lists_every_index_file_with_its_checksum(stub_kit):
    from img2prompt.index.format import file_record

    records = json.loads((stub_kit / "kit.json").read_text())["index"]["files"]
    manifest = json.loads((stub_kit / "index" / MANIFEST).read_text())
    assert set(records) == {MANIFEST, *manifest["files"]}
    for name, record in records.items():
        assert record == file_record(stub_kit / "index" / name), name


@pytest.mark.parametrize("name", [CLIP_VECTORS, MINILM, MANIFEST])
def test_a_damaged_index_stops_the_script_before_it_predicts(kit_copy, sample_images, tmp_path, name):
    target = kit_copy / "index" / name
    flip_byte(target, target.stat().st_size // 2)  # same size: only the sha256 tells
    submission = tmp_path / "submission.csv"
    done = run_submit_script(kit_copy, sample_images, submission)
    assert done.returncode == 1
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert "damaged" in message and str(target) in message and "sha256" in message
    assert "index verified" not in done.stdout and not submission.exists()


def test_a_truncated_index_file_is_told_by_its_size(kit_copy, sample_images, tmp_path):
    target = kit_copy / "index" / CLIP_VECTORS
    target.write_bytes(target.read_bytes()[:-2])
    done = run_submit_script(kit_copy, sample_images, tmp_path / "submission.csv")
    assert done.returncode == 1 and "bytes, kit.json says" in done.stderr and str(target) in done.stderr
    assert not (tmp_path / "submission.csv").exists()


def run_submit_in_process(kit: Path, images: Path, out: Path, monkeypatch) -> str:
    """Run the kit's submit.py in this process (img2prompt already imported: fast); returns what it printed."""
    for key, value in kit_env(kit, images, out).items():
        monkeypatch.setenv(key, value)
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile((kit / kit_template.SCRIPT_NAME).read_text("utf-8"), "submit.py", "exec"), {"__name__": "__main__"})
    return printed.getvalue()


def test_an_intact_kit_is_verified_and_submits(stub_kit, sample_images, tmp_path, monkeypatch):
    submission = tmp_path / "submission.csv"
    printed = run_submit_in_process(stub_kit, sample_images, submission, monkeypatch)
    assert "index verified: " in printed and "is already installed" in printed
    rows = pd.read_csv(submission)
    assert len(rows) == 4 * 384
    values = rows["val"].to_numpy(dtype=np.float64).reshape(4, 384)
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)


def test_the_in_process_run_also_refuses_a_damaged_index(kit_copy, sample_images, tmp_path, monkeypatch):
    flip_byte(kit_copy / "index" / CLIP_VECTORS, 0)
    with pytest.raises(SystemExit, match="index is damaged, nothing was predicted"):
        run_submit_in_process(kit_copy, sample_images, tmp_path / "submission.csv", monkeypatch)
    assert not (tmp_path / "submission.csv").exists()


def shown_expressions(code: str) -> list[str]:
    """A cell's last statement when Jupyter would display its value: a bare expression other than print()."""
    body = ast.parse(code).body
    last = body[-1] if body else None
    if isinstance(last, ast.Expr) and not (isinstance(last.value, ast.Call)
                                           and getattr(last.value.func, "id", None) == "print"):
        return [ast.unparse(last)[:60]]
    return []


def test_no_cell_displays_a_stray_value():
    cells = [text for kind, text in kit_template.split_cells() if kind == "code"]
    assert len(cells) >= 4
    assert [shown for code in cells for shown in shown_expressions(code)] == []
    assert shown_expressions("import subprocess\nsubprocess.check_call(['true'])") != []  # what the pip cell did


def test_the_submission_path_uses_the_plain_tqdm_bar():
    """Without ipywidgets a notebook-style bar warns "IProgress not found": the kit's code path must create
    only tqdm.std bars (img2prompt.progress), and its own code imports no tqdm.auto / tqdm.notebook."""
    import tqdm.std

    from img2prompt import progress

    assert progress.tqdm is tqdm.std.tqdm
    bar = progress.progress_bar(total=1, enabled=False)
    assert type(bar) is tqdm.std.tqdm
    bar.close()
    assert "tqdm" not in kit_template.SUBMIT_SOURCE
