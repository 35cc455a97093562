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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_refuses_a_changed_corpus(tmp_path, corpus_file, tiny_clip_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(corpus_file.read_bytes())
    out = tmp_path / "idx"
    kill_after(build_args(corpus, out, tiny_clip_dir), out, 1)
    corpus.write_text("something else entirely\n" + corpus.read_text())
    result = run_cli(*build_args(corpus, out, tiny_clip_dir, "--resume")[1:])
    assert result.returncode == 2
    assert "cannot resume, the build settings differ from the interrupted build (corpus)" in result.stderr


# ---------------------------------------------------------------------------------------------- a full disk

@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),  # a write() on a full disk: errno, no file named
    OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),  # pyarrow's: no errno
])
def test_no_space_left_names_the_file(tmp_path, error):
    import errno

    from img2prompt.atomic import write_atomic

    def full(handle):
        handle.write(b"partial")
        raise error

    target = tmp_path / "clip.f16"
    with pytest.raises(OSError) as caught:
        write_atomic(target, full)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert caught.value.strerror == "No space left on device"
    assert list(tmp_path.iterdir()) == []  # the temp file removed, nothing renamed into place


def test_a_short_numpy_write_says_no_space_left(tmp_path, monkeypatch):
    """numpy's tofile on a full disk raises "38400 requested and 32704 written", no errno, no file name."""
    import errno

    from img2prompt.index.writer import ShardTask, save_shard

    def short_write(handle, array, **kwargs):
        handle.write(b"\x93NUMPY")
        raise OSError(f"{array.nbytes} requested and 32704 written")

    monkeypatch.setattr(np.lib.format, "write_array", short_write)
    vectors = np.ones((300, 64), dtype=np.float32)
    with pytest.raises(OSError) as caught:
        save_shard(tmp_path, ShardTask(0, 0, ["a"] * 300), vectors, vectors)
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.strerror == "No space left on device (38400 requested and 32704 written)"
    assert caught.value.filename == str(tmp_path / "shards" / "00000.clip.npy")
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["00000.parquet"]  # no temp file left


def test_a_full_disk_during_build_is_one_cli_line(tmp_path, corpus_file, tiny_clip_dir, monkeypatch, capsys):
    from img2prompt.cli import main

    def short_write(handle, array, **kwargs):
        raise OSError(f"{array.nbytes} requested and 32704 written")

    monkeypatch.setattr(np.lib.format, "write_array", short_write)
    out = tmp_path / "idx"
    code = main(["-q", "build", str(corpus_file), "--out", str(out), "--clip-model", str(tiny_clip_dir),
                 "--shard-size", "64", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("img2prompt build: error: No space left on device (") and "requested and 32704 written" in last
    assert last.endswith(".npy") and str(out / "shards") in last


def test_other_write_errors_name_the_target_not_the_temp_file(tmp_path, monkeypatch):
    import errno

    from img2prompt import atomic

    def refuse(source, target):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(source))  # names the temp file

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(PermissionError) as caught:
        atomic.write_atomic(tmp_path / "manifest.json", lambda handle: handle.write(b"{}"))
    assert caught.value.filename == str(tmp_path / "manifest.json") and caught.value.strerror == "Permission denied"


def test_an_error_about_another_file_is_left_alone(tmp_path):
    from img2prompt.atomic import atomic_path

    with pytest.raises(FileNotFoundError) as caught:
        with atomic_path(tmp_path / "prompts.parquet") as tmp:
            tmp.write_bytes(b"x")
            open(tmp_path / "missing-shard.parquet", "rb")  # a source read while writing
    assert caught.value.filename == str(tmp_path / "missing-shard.parquet")
    assert list(tmp_path.iterdir()) == []
