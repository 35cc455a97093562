"""`img2prompt merge` killed (SIGKILL, no cleanup) at each commit point: what is left at --out is absent, the
old index, or a complete index -- never a half index that opens -- and `merge --resume` finishes to the
files of an uninterrupted merge.

The kill is exact rather than timed: the merge runs in a child process whose IndexWriter commit points
(commit_shard, consolidate, complete, and the swap of a rebuild into place) SIGKILL the process just before
or just after the Nth call. Two inputs of 60 rows, shards of 30: four shards."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import img2prompt
from conftest import read_data_prompts
from img2prompt.errors import UserError
from img2prompt.index.layout import MANIFEST
from img2prompt.index.reader import open_index

KILL_AT = r"""
import os, signal, sys
import img2prompt.index.lock as lock_module
import img2prompt.index.writer as writer_module
from img2prompt.cli import main

owner, name, nth, when = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
holder = {"IndexWriter": writer_module.IndexWriter, "writer": writer_module, "lock": lock_module}[owner]
original, calls = getattr(holder, name), [0]

def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if calls[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(holder, name, dying)
sys.exit(main(sys.argv[5:]))
"""


def merge_args(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return ["-q", "merge", *map(str, inputs), "--out", str(out), "--device", "cpu", "--shard-size", "30", *extra]


def killed_merge(point: tuple[str, str, int, str], args: list[str]) -> None:
    owner, name, nth, when = point
    done = subprocess.run([sys.executable, "-c", KILL_AT, owner, name, str(nth), when, *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, f"the merge was not killed at {point}: {done.stderr[-2000:]}"


def snapshot(root: Path) -> dict:
    """What a complete index holds: its prompts, both vector sets and every listed file's checksum."""
    index = open_index(root, verify=True)
    return {"prompts": index.prompts, "clip": np.asarray(index.clip_vectors).copy(),
            "minilm": np.asarray(index.minilm).copy(), "search": index.manifest["search"]["kind"],
            "files": {name: record["sha256"] for name, record in index.manifest["files"].items()}}


def assert_same(got: dict, want: dict) -> None:
    assert got["prompts"] == want["prompts"] and got["search"] == want["search"]
    np.testing.assert_array_equal(got["clip"], want["clip"])
    np.testing.assert_array_equal(got["minilm"], want["minilm"])
    assert got["files"] == want["files"]  # every file byte for byte, whatever the manifest lists


def opens(root: Path) -> bool:
    """Whether the folder loads as an index (one that does not is refused with a one-line UserError)."""
    try:
        open_index(root)
    except UserError:
        return False
    return True


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_clip_dir) -> dict:
    """Two inputs, the uninterrupted merge of them, and an older index that an --overwrite merge replaces."""
    root = tmp_path_factory.mktemp("merge-kill")
    prompts = read_data_prompts(150)
    built = {}
    for name, rows in (("a", prompts[:60]), ("b", prompts[60:120]), ("old", prompts[120:150])):
        (root / f"{name}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
        img2prompt.build(root / f"{name}.txt", root / name, clip_model=str(tiny_clip_dir), index="flat",
                         device="cpu", shard_size=30, batch_size=30, progress=False)
        built[name] = root / name
    img2prompt.merge([built["a"], built["b"]], root / "reference", device="cpu", shard_size=30, progress=False)
    built["reference"] = snapshot(root / "reference")
    built["old_snapshot"] = snapshot(built["old"])
    return built


FRESH_POINTS = [("IndexWriter", "commit_shard", 1, "before"),  # nothing committed yet
                ("IndexWriter", "commit_shard", 2, "after"),  # two of four shards committed
                ("IndexWriter", "consolidate", 1, "after"),  # final files written, manifest still "building"
                ("IndexWriter", "complete", 1, "before")]


@pytest.mark.slow
@pytest.mark.parametrize("point", FRESH_POINTS, ids=lambda point: f"{point[3]}-{point[1]}-{point[2]}")
def test_a_killed_merge_into_a_new_folder_never_opens_and_resumes(tmp_path, inputs, point):
    out = tmp_path / "merged"
    args = merge_args([inputs["a"], inputs["b"]], out)
    killed_merge(point, args)
    assert not opens(out)  # absent, or a build in progress that every reader refuses
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["state"] == "building"
    with pytest.raises(UserError, match="unfinished build"):
        img2prompt.open_index(out, device="cpu", lazy=True)  # the public API refuses it too
    from img2prompt.cli import main

    assert main(merge_args([inputs["a"], inputs["b"]], out)) == 2  # a plain rerun refuses (no --resume)
    assert main(merge_args([inputs["a"], inputs["b"]], out, "--resume")) == 0
    assert_same(snapshot(out), inputs["reference"])


OVERWRITE_POINTS = [("IndexWriter", "commit_shard", 2, "after"),
                    ("IndexWriter", "complete", 1, "before"),
                    ("writer", "swap_into_place", 1, "before"),  # the merged index complete beside the old one
                    ("lock", "fsync_dir", 1, "before")]  # mid-swap: the folders exchanged, the old not yet deleted


@pytest.mark.slow
@pytest.mark.parametrize("point", OVERWRITE_POINTS, ids=lambda point: f"{point[3]}-{point[1]}-{point[2]}")
def test_a_killed_overwrite_leaves_the_old_or_the_new_index_and_resumes(tmp_path, inputs, point):
    import shutil

    out = tmp_path / "merged"
    shutil.copytree(inputs["old"], out)
    killed_merge(point, merge_args([inputs["a"], inputs["b"]], out, "--overwrite"))
    assert opens(out)  # never a gap: the old index until the swap, the merged one after it
    left = snapshot(out)
    if point[1] == "fsync_dir":
        assert_same(left, inputs["reference"])
    else:
        assert_same(left, inputs["old_snapshot"])
    from img2prompt.cli import main

    assert main(merge_args([inputs["a"], inputs["b"]], out, "--overwrite", "--resume")) == 0
    assert_same(snapshot(out), inputs["reference"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]  # no staging or retired folder left


DONE_POINTS = [("IndexWriter", "complete", 1, "after"),  # everything done: the resume has nothing to do
               ("writer", "write_json_atomic", 6, "after")]  # the complete manifest written, shards/ not yet removed


@pytest.mark.slow
@pytest.mark.parametrize("point", DONE_POINTS, ids=lambda point: f"{point[3]}-{point[1]}-{point[2]}")
def test_a_resume_after_the_final_commit_has_nothing_to_do(tmp_path, inputs, point, capsys):
    """Issue 30 item 8: a kill after the final manifest leaves a complete index; `--resume` says "nothing to do"
    (exit 0, no new merge) and removes the leftovers (shards/: a second copy of every row)."""
    from img2prompt.cli import main
    from img2prompt.index.layout import LOCK, SHARDS

    out = tmp_path / "merged"
    killed_merge(point, merge_args([inputs["a"], inputs["b"]], out))
    assert opens(out)
    if point[1] == "write_json_atomic":
        assert (out / SHARDS).is_dir()  # the point is the one meant: shards still there
    before = (out / MANIFEST).read_bytes()
    capsys.readouterr()
    assert main(merge_args([inputs["a"], inputs["b"]], out, "--resume")) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / MANIFEST).read_bytes() == before  # the index the killed merge finished, not a redo
    assert not (out / SHARDS).exists() and not (out / LOCK).exists()
    assert_same(snapshot(out), inputs["reference"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


def test_a_refused_merge_or_build_leaves_no_lock_in_the_index(tmp_path, inputs, tiny_clip_dir, capsys):
    """Issue 30 item 8: "pass --overwrite" refusals leave the user's complete index exactly as it was."""
    import shutil

    from img2prompt.cli import main
    from img2prompt.index.layout import LOCK

    out = tmp_path / "index"
    shutil.copytree(inputs["old"], out)
    listing = sorted(path.name for path in out.iterdir())
    assert main(merge_args([inputs["a"], inputs["b"]], out)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == listing and not (out / LOCK).exists()
    assert main(["-q", "build", str(inputs["a"].parent / "a.txt"), "--out", str(out), "--clip-model",
                 str(tiny_clip_dir), "--device", "cpu"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == listing and not (out / LOCK).exists()
    assert_same(snapshot(out), inputs["old_snapshot"])
