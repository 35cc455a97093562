"""Bad arguments and unusable paths: one line on stderr naming the problem, exit code 2, never a traceback,
and refused before the long work (no image encoded, no output folder touched)."""
from __future__ import annotations

import errno

import pytest

from conftest import run_cli
from img2prompt.cli import main

CASES = [
    (["submit", "{index}", "{images}", "--k", "0"], "--k must be at least 1 (got 0)"),
    (["submit", "{index}", "{images}", "--temperature", "-1"], "--temperature must be > 0 (got -1.0)"),
    (["submit", "{index}", "{images}", "--k", "100000"], "--k 100000 is larger than the index (160 prompts)"),
    (["submit", "{tmp}/nowhere", "{images}"], "index folder not found: {tmp}/nowhere"),
    (["submit", "{tmp}", "{images}"], "{tmp} is not an index: no manifest.json"),
    (["submit", "{index}", "{tmp}/no-images"], "images folder not found: {tmp}/no-images"),
    (["submit", "{index}", "{images}", "--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
    (["submit", "{index}", "{images}", "--workers", "-1"], "--workers must be 0 or more (got -1)"),
    (["submit", "{index}", "{images}", "--out", "{tmp}/missing/s.csv"], "the folder {tmp}/missing does not exist"),
    (["submit", "{index}", "{images}", "--out", "{tmp}"], "--out {tmp} is a folder: give a file path"),
    (["submit", "{index}", "{images}", "--out", "{tmp}/s.csv", "--explain", "{tmp}/missing/e.csv"],
     "--explain {tmp}/missing/e.csv: the folder {tmp}/missing does not exist"),
    (["submit", "{index}", "{images}", "--out", "{tmp}/s.csv", "--explain", "{tmp}/s.csv"],
     "--explain and --out name the same file"),
    (["eval", "{index}", "--labels", "{labels}", "--out", "{tmp}/missing/r.json"], "the folder {tmp}/missing does not exist"),
    (["build", "{tmp}/none.txt", "--out", "{tmp}/x", "--clip-model", "ViT-B-32"], "corpus file not found"),
    (["build", "{corpus}", "--out", "{tmp}/x", "--clip-model", "{clip}", "--max-memory", "inf"], "not a size: 'inf'"),
    (["build", "{corpus}", "--out", "{corpus}", "--clip-model", "{clip}"], "is a file, not a folder"),
    (["build", "{blank}", "--out", "{tmp}/x", "--clip-model", "{clip}", "--column", "prompt"],
     "the corpus holds no usable prompt"),
    (["search", "{index}", "--image", "{tmp}/none.png"], "image not found: {tmp}/none.png"),
]


@pytest.fixture
def values(built_index, sample_images, corpus_file, tiny_clip_dir, tmp_path):
    (tmp_path / "blank.csv").write_text("\n\n\n")
    (tmp_path / "labels.csv").write_text("imgId,prompt\na,b\n")
    return {"index": built_index, "images": sample_images, "tmp": tmp_path, "corpus": corpus_file,
            "clip": tiny_clip_dir, "blank": tmp_path / "blank.csv", "labels": tmp_path / "labels.csv"}


@pytest.mark.parametrize("args, message", CASES)
def test_argument_errors_are_one_line_exit_2(args, message, values, capsys):
    try:
        code = main([arg.format(**values) for arg in args] + ["-q", "--device", "cpu"] * (args[0] != "build"))
    except SystemExit as stop:  # argparse's own errors: usage + one error line, exit 2
        code = stop.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in captured.err
    assert lines[-1].startswith(f"img2prompt {args[0]}: ") and message.format(**values) in lines[-1], lines[-1]
    assert not (values["tmp"] / "s.csv").exists() and not (values["tmp"] / "x" / "clip.f16").exists()


def test_the_console_script_gives_the_same_one_line(values):
    result = run_cli("submit", values["index"], values["images"], "--k", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "img2prompt submit: error: --k must be at least 1 (got 0)"


def test_disk_full_is_one_line(values, capsys, monkeypatch):
    import os

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(values["tmp"] / "s.csv"))

    monkeypatch.setattr(os, "replace", full)
    code = main(["submit", str(values["index"]), str(values["images"]), "--out", str(values["tmp"] / "s.csv"),
                 "-q", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"img2prompt submit: error: No space left on device: {values['tmp']}/s.csv"
    assert [p.name for p in values["tmp"].iterdir() if p.name.endswith(".tmp")] == []  # temp file removed


@pytest.mark.parametrize("argv, message", [
    (["search", "{index}", "--text", "x", "--k", "0"], "--k must be at least 1 (got 0)"),
    (["search", "{index}", "--text", "x", "--k", "100000"], "--k 100000 is larger than the index"),
    (["search", "{index}", "--image", "nope.png"], "image not found: nope.png"),
    (["submit", "{index}", "{images}", "--out", "/nonexistent-dir/s.csv"], "/nonexistent-dir"),
    (["submit", "{index}", "{images}", "--beta", "2"], "--beta must be between 0 and 1"),
    (["submit", "{index}", "{images}", "--workers", "-1"], "--workers must be 0 or more"),
    (["eval", "{index}", "--labels", "missing.csv"], "labels file not found: missing.csv")])
def test_bad_arguments_are_refused_before_torch_or_a_model_loads(built_index, sample_images, argv, message):
    """Checked from the arguments, the manifest and the file system alone: torch is never imported."""
    import subprocess
    import sys

    argv = [arg.format(index=built_index, images=sample_images) for arg in argv]
    code = ("import sys; from img2prompt import cli; rc = cli.main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, 'open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["2", "False", "False"], out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
