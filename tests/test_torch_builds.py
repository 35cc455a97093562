"""A torch / torchvision pair of matching versions but different builds (torch 2.13.0+cpu beside PyPI's CUDA
torchvision 0.28.0) passes the metadata check and fails only on import, deep inside open_clip, with
`RuntimeError: operator torchvision::nms does not exist`. Every command and the Kaggle notebook say so in one
line naming the fix. Simulated with a torchvision on PYTHONPATH that raises that error on import."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from img2prompt.kit import template as kit_template

NMS_ERROR = "operator torchvision::nms does not exist"


@pytest.fixture
def broken_torchvision(tmp_path, monkeypatch) -> Path:
    """PYTHONPATH with a torchvision whose import fails as a CPU torch's does beside a CUDA torchvision."""
    package = tmp_path / "fake" / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"import torch\nraise RuntimeError({NMS_ERROR!r})\n", encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")]))
    return package.parent


def assert_one_line_naming_the_fix(stderr: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("INFO ")]  # build's device line
    assert len(lines) == 1, stderr
    assert "different builds" in lines[0] and "pip install" in lines[0] and "torchvision" in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.slow  # subprocesses importing torch
@pytest.mark.parametrize("command", ["search", "build"])
def test_every_command_names_the_build_mismatch_in_one_line(broken_torchvision, built_index, tiny_clip_dir,
                                                            corpus_file, tmp_path, command):
    if command == "search":
        done = run_cli("search", built_index, "--text", "a castle on a hill")
    else:
        done = run_cli("build", corpus_file, "--out", tmp_path / "idx", "--clip-model", tiny_clip_dir,
                       "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert f"img2prompt {command}: error: torch " in done.stderr
    assert_one_line_naming_the_fix(done.stderr)


@pytest.mark.slow  # a subprocess importing torch
def test_the_notebook_names_the_build_mismatch_in_one_line(broken_torchvision):
    cell = next(code for kind, code in kit_template.split_cells()
                if kind == "code" and "environment_problem" in code)
    done = subprocess.run([sys.executable, "-c", cell], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.startswith("img2prompt cannot run here: torch ")
    assert_one_line_naming_the_fix(done.stderr)


def test_a_working_pair_has_no_problem():
    import img2prompt

    assert img2prompt.environment_problem() is None


@pytest.mark.parametrize("torch_version, expected", [
    ("2.13.0+cpu", "'torchvision==0.28.*' --index-url https://download.pytorch.org/whl/cpu"),
    ("2.13.0+cu128", "--index-url https://download.pytorch.org/whl/cu128"),
    ("2.13.0", "pip install --force-reinstall --no-deps 'torchvision==0.28.*'  (PyPI's build")])
def test_the_fix_installs_torchvision_of_torch_s_build(torch_version, expected):
    from img2prompt.encoders.stack import build_fix

    assert expected in build_fix(torch_version, "0.28.0")
