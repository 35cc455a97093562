"""Bad arguments: one line on stderr naming the problem, exit code 2, never a traceback."""
from __future__ import annotations

import pytest

from conftest import run_cli


@pytest.mark.parametrize("args, message", [
    (["submit", "{index}", "{images}", "--k", "0"], "--k must be at least 1 (got 0)"),
    (["submit", "{index}", "{images}", "--temperature", "-1"], "--temperature must be > 0 (got -1.0)"),
    (["submit", "{index}", "{images}", "--k", "100000"], "--k 100000 is larger than the index (160 prompts)"),
    (["submit", "{tmp}/nowhere", "{images}"], "index folder not found: {tmp}/nowhere"),
    (["submit", "{tmp}", "{images}"], "{tmp} is not an index: no manifest.json"),
    (["submit", "{index}", "{tmp}/no-images"], "images folder not found: {tmp}/no-images"),
    (["build", "{tmp}/none.txt", "--out", "{tmp}/x", "--clip-model", "ViT-B-32"], "corpus file not found"),
    (["search", "{index}", "--image", "{tmp}/none.png"], "image not found: {tmp}/none.png"),
])
def test_argument_errors_are_one_line_exit_2(args, message, built_index, sample_images, tmp_path):
    values = {"index": built_index, "images": sample_images, "tmp": tmp_path}
    result = run_cli(*[arg.format(**values) for arg in args])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith(f"img2prompt {args[0]}: error: ")
    assert message.format(**values) in lines[-1]
