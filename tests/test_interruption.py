"""Kill `build` (SIGKILL) at several moments; `build --resume` must end with exactly the prompts and
vectors of an uninterrupted build, and nothing half-written may load as an index in between."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from img2prompt.errors import UserError
from img2prompt.index.reader import open_index


def build_args(corpus: Path, out: Path, clip_dir: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "img2prompt"), "-q", "build", str(corpus), "--out", str(out),
            "--clip-model", str(clip_dir), "--shard-size", "16", "--batch-size", "8", *extra]


def shards_done(out: Path) -> int:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return len(manifest.get("shards", [])) if manifest.get("state") == "building" else -1


def kill_after(args: list[str], out: Path, shards: int) -> int:
    """Start a build, SIGKILL it once the manifest lists `shards` complete shards; return how many there were."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if shards_done(out) >= shards:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    return shards_done(out)


def test_kill_and_resume_gives_the_uninterrupted_result(tmp_path, corpus_file, tiny_clip_dir):
    reference = tmp_path / "reference"
    assert run_cli(*build_args(corpus_file, reference, tiny_clip_dir)[1:]).returncode == 0

    out = tmp_path / "interrupted"
    first = kill_after(build_args(corpus_file, out, tiny_clip_dir), out, 1)
    assert first >= 1
    with pytest.raises(UserError, match="unfinished build"):
        open_index(out)
    second = kill_after(build_args(corpus_file, out, tiny_clip_dir, "--resume"), out, first + 3)
    assert second >= first + 3  # the resumed run kept the earlier shards and added more
    with pytest.raises(UserError, match="unfinished build"):
        open_index(out)
    finished = run_cli(*build_args(corpus_file, out, tiny_clip_dir, "--resume")[1:])
    assert finished.returncode == 0, finished.stderr

    ours, theirs = open_index(out, verify=True), open_index(reference, verify=True)
    assert ours.count == theirs.count == 160
    assert ours.prompts == theirs.prompts
    np.testing.assert_array_equal(np.asarray(ours.minilm), np.asarray(theirs.minilm))
    np.testing.assert_array_equal(np.asarray(ours.clip_vectors), np.asarray(theirs.clip_vectors))
    assert ours.manifest["corpus"] == theirs.manifest["corpus"]


def test_resume_refuses_a_changed_corpus(tmp_path, corpus_file, tiny_clip_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(corpus_file.read_bytes())
    out = tmp_path / "idx"
    kill_after(build_args(corpus, out, tiny_clip_dir), out, 1)
    corpus.write_text("something else entirely\n" + corpus.read_text())
    result = run_cli(*build_args(corpus, out, tiny_clip_dir, "--resume")[1:])
    assert result.returncode == 2
    assert "cannot resume, the build settings differ from the interrupted build (corpus)" in result.stderr
