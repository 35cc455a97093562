"""The console script end to end in subprocesses, as a user runs it."""
from __future__ import annotations

import pytest

import json

import pandas as pd
from conftest import DATA, run_cli


@pytest.mark.slow
def test_end_to_end_build_submit_search_eval(tmp_path, tiny_clip_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join((DATA / "prompts.txt").read_text().splitlines()[:120]) + "\n")
    index = tmp_path / "index"
    built = run_cli("build", corpus, "--out", index, "--clip-model", tiny_clip_dir, "--shard-size", "50", "--json")
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout)
    assert summary["count"] == 120 and summary["corpus"]["kept"] == 120

    out = tmp_path / "submission.csv"
    submitted = run_cli("submit", index, DATA / "images", "--out", out, "--k", "4", "--json", "--verify")
    assert submitted.returncode == 0, submitted.stderr
    report = json.loads(submitted.stdout)
    assert report["images"] == 6 and report["predicted"] == 6
    frame = pd.read_csv(out)
    assert len(frame) == 6 * 384 and frame["imgId_eId"].iloc[0] == "sample00_0"

    query = corpus.read_text().splitlines()[7]
    searched = run_cli("search", index, "--text", query, "--k", "3", "--json")
    assert searched.returncode == 0, searched.stderr
    entries = json.loads(searched.stdout)
    assert entries[0]["query"] == query
    assert [sorted(r) for r in entries[0]["results"]] == [["id", "key", "prompt", "rank", "score"]] * 3
    assert {r["key"] for r in entries[0]["results"]} == {"text"}
    assert entries[0]["results"][0]["prompt"] == query and entries[0]["results"][0]["id"] == 7

    table = run_cli("search", index, "--image", DATA / "images" / "sample00.png", "--k", "2")
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"query: {DATA / 'images' / 'sample00.png'}") and "    1  " in table.stdout


def test_help_lists_commands_and_examples():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("build", "submit", "search", "eval"):
        assert command in result.stdout
    submit_help = run_cli("submit", "--help").stdout
    assert "--sample-submission" in submit_help and "examples:" in submit_help and "provisional" in submit_help


def test_version_module_entry_and_flags_after_the_command(tmp_path):
    import subprocess
    import sys

    import img2prompt

    assert run_cli("--version").stdout.strip() == f"img2prompt {img2prompt.__version__}"
    as_module = subprocess.run([sys.executable, "-m", "img2prompt", "--help"], capture_output=True, text=True)
    assert as_module.returncode == 0 and "kaggle-kit" in as_module.stdout
    late = run_cli("search", tmp_path / "none", "--text", "x", "-q")  # -q after the command is accepted
    assert late.returncode == 2 and "index folder not found" in late.stderr
    search_help = run_cli("search", "--help").stdout
    assert "Find the prompts nearest" in search_help and "an index folder written by" in search_help
    helped = subprocess.run([sys.executable, "-m", "img2prompt.stand_in", "--help"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert helped.returncode == 0 and "RANDOM weights" in helped.stdout and list(tmp_path.iterdir()) == []


def test_weighting_flags_give_the_api_vectors(built_index, sample_images, tmp_path, capsys):
    import numpy as np

    import img2prompt
    from img2prompt.cli import main

    npy = tmp_path / "preds.npy"
    flags = ["--k", "6", "--weighting", "inverse-distance", "--power", "4", "--epsilon", "0.001"]
    assert main(["-q", "submit", str(built_index), str(sample_images), "--out", str(tmp_path / "s.csv"),
                 "--save-npy", str(npy), "--device", "cpu", *flags]) == 0
    images = [str(sample_images / f"{line}.png") for line in (tmp_path / "preds.ids.txt").read_text().splitlines()]
    with img2prompt.open_index(built_index, device="cpu") as index:
        api = index.predict(images, k=6, weighting="inverse-distance", power=4.0, epsilon=1e-3)
        softmax = index.predict(images, k=6)
    np.testing.assert_allclose(np.load(npy), api, atol=1e-6)
    assert not np.allclose(api, softmax, atol=1e-4)  # the flags changed the weights
    for flag, value, message in (("--power", "0", "--power must be > 0 and finite (got 0.0)"),
                                 ("--epsilon", "-1", "--epsilon must be > 0 and finite (got -1.0)")):
        capsys.readouterr()
        assert main(["submit", str(built_index), str(sample_images), "--out", str(tmp_path / "t.csv"),
                     flag, value]) == 2
        error = capsys.readouterr().err
        assert error == f"img2prompt submit: error: {message}\n"
        assert not (tmp_path / "t.csv").exists()
    assert "--weighting inverse-distance" in run_cli("submit", "--help").stdout
