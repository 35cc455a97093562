"""Concurrent runs as users start them: two submits to one file, two builds into one folder."""
from __future__ import annotations

import pytest

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from conftest import DATA
from img2prompt.index.reader import open_index
from img2prompt.query.submission import validate_submission


def start(*args) -> subprocess.Popen:
    script = Path(sys.executable).parent / "img2prompt"
    return subprocess.Popen([str(script), *map(str, args), "-q", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_two_submits_to_one_file_leave_a_complete_valid_file(built_index, tmp_path):
    out = tmp_path / "submission.csv"
    runs = [start("submit", built_index, DATA / "images", "--out", out, "--k", str(k)) for k in (3, 5)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert [code for code, _ in results] == [0, 0], results
    validate_submission(pd.read_csv(out), [f"sample0{n}_{i}" for n in range(6) for i in range(384)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


@pytest.mark.slow
def test_two_builds_into_one_folder_never_mix(tmp_path, tiny_clip_dir):
    corpora = []
    for number, prompts in enumerate(((DATA / "prompts.txt").read_text().splitlines()[:300],
                                      (DATA / "prompts.txt").read_text().splitlines()[300:500])):
        corpora.append(tmp_path / f"corpus{number}.txt")
        corpora[-1].write_text("\n".join(prompts) + "\n")
    out = tmp_path / "index"
    runs = [start("build", corpus, "--out", out, "--clip-model", tiny_clip_dir, "--overwrite", "--shard-size", "50")
            for corpus in corpora]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    if codes == [0, 2]:  # they overlapped: the second was refused by the lock, in one line
        refused = next(err for code, err in results if code == 2)
        assert "is being written by another img2prompt build (pid" in refused.strip().splitlines()[-1]
    index = open_index(out, verify=True)
    assert index.count in (300, 200)
    expected = {300: corpora[0], 200: corpora[1]}[index.count].read_text().splitlines()
    assert index.prompts == expected  # one corpus, never prompts from both
