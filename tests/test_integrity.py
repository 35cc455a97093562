"""Integrity: damaged, truncated, foreign or half-written index folders are refused with a clear error."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from img2prompt.errors import UserError
from img2prompt.index.layout import READABLE_VERSIONS, shard_path
from img2prompt.index.reader import open_index
from img2prompt.index.writer import IndexWriter, ShardTask, save_shard


def copy_index(built_index, tmp_path):
    return shutil.copytree(built_index, tmp_path / "copy")


def test_truncated_file_is_refused(built_index, tmp_path):
    root = copy_index(built_index, tmp_path)
    with open(root / "minilm.f16", "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(UserError, match=r"minilm\.f16: 1000 bytes, expected 122880 \(160 rows\): the index is damaged"):
        open_index(root)


def test_changed_bytes_caught_by_verify(built_index, tmp_path):
    root = copy_index(built_index, tmp_path)
    data = bytearray((root / "clip.f16").read_bytes())
    data[10] ^= 0xFF
    (root / "clip.f16").write_bytes(bytes(data))
    open_index(root)  # sizes agree: loads without --verify
    with pytest.raises(UserError, match=r"clip\.f16: sha256 differs from the manifest"):
        open_index(root, verify=True)


def test_row_counts_must_agree(built_index, tmp_path):
    root = copy_index(built_index, tmp_path)
    table = pq.read_table(root / "prompts.parquet").slice(0, 150)
    pq.write_table(table, root / "prompts.parquet")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["prompts.parquet"]["bytes"] = (root / "prompts.parquet").stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="150 prompts, the manifest says 160"):
        open_index(root)


def test_faiss_rows_must_agree(tmp_path):
    import faiss

    from img2prompt.index.faiss_file import read_faiss

    small = faiss.IndexFlatIP(64)
    small.add(np.eye(64, dtype=np.float32)[:10])
    faiss.write_index(small, str(tmp_path / "clip.faiss"))
    with pytest.raises(UserError, match="FAISS holds 10 vectors, the index has 160 prompts"):
        read_faiss(tmp_path / "clip.faiss", 160)
    (tmp_path / "junk.faiss").write_bytes(b"not faiss")
    with pytest.raises(UserError, match="junk.faiss: not a readable FAISS index"):
        read_faiss(tmp_path / "junk.faiss", 160)


def test_newer_format_and_not_an_index(built_index, tmp_path):
    root = copy_index(built_index, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    newer = max(READABLE_VERSIONS) + 1  # FORMAT_VERSION + 1 is readable: int8 MiniLM indexes are format 4
    manifest["format_version"] = newer
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"has index format {newer}; this img2prompt reads formats 1, 2"):
        open_index(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not an index: no manifest.json"):
        open_index(tmp_path / "empty")
    with pytest.raises(UserError, match="index folder not found"):
        open_index(tmp_path / "missing")


def test_half_written_build_never_loads(tmp_path):
    """A build that dies after its shards, even after consolidating, is not an index until the manifest says so."""
    writer = IndexWriter(tmp_path / "idx", {"models": "x"})
    commit(writer, 0, ["a", "b", "c", "d"])
    writer.consolidate()
    with pytest.raises(UserError, match=r"unfinished build \(1 shards done\).*--resume"):
        open_index(tmp_path / "idx")


def test_existing_index_is_not_overwritten_silently(built_index, tmp_path):
    root = copy_index(built_index, tmp_path)
    with pytest.raises(UserError, match="already holds a complete index: pass --overwrite"):
        IndexWriter(root, {"models": "x"})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and is not an index"):
        IndexWriter(tmp_path / "junk", {"models": "x"})
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


def test_unfinished_build_is_kept_unless_asked(tmp_path):
    writer = IndexWriter(tmp_path / "idx", {"models": "x"})
    commit(writer, 0, ["a", "b"])
    writer.close()  # as when the build process died
    with pytest.raises(UserError, match=r"holds an unfinished build \(1 shards done\): pass --resume"):
        IndexWriter(tmp_path / "idx", {"models": "x"})
    assert IndexWriter(tmp_path / "idx", {"models": "x"}, resume=True).rows_committed() == 2
    assert IndexWriter(tmp_path / "idx", {"models": "x"}, overwrite=True).rows_committed() == 0


def test_shards_commit_in_any_order_and_damage_is_caught(tmp_path):
    """Shards are independent tasks: committed out of order they consolidate in id order; a committed
    shard whose file was changed or deleted is not trusted (its record is dropped, so it is re-encoded)."""
    writer = IndexWriter(tmp_path / "idx", {"models": "x"})
    tasks = [ShardTask(1, 2, ["c", "d"]), ShardTask(0, 0, ["a", "b"])]
    for task in tasks:
        commit(writer, task.number, task.prompts, first_id=task.first_id)
    assert all(writer.is_committed(task) for task in tasks)
    writer.consolidate()
    assert pq.read_table(tmp_path / "idx" / "prompts.parquet").column("prompt").to_pylist() == ["a", "b", "c", "d"]
    clip_file = shard_path(tmp_path / "idx", 1, "clip")
    data = bytearray(clip_file.read_bytes())
    data[-1] ^= 0x01
    clip_file.write_bytes(bytes(data))
    assert not writer.is_committed(tasks[0]) and sorted(writer.records) == [0]
    shard_path(tmp_path / "idx", 0, "minilm").unlink()
    writer.close()
    resumed = IndexWriter(tmp_path / "idx", {"models": "x"}, resume=True)
    assert not resumed.is_committed(tasks[1]) and resumed.records == {}
    with pytest.raises(UserError, match="no longer gives the same prompts for shard 0"):
        commit(resumed, 0, ["a", "b"])
        resumed.is_committed(ShardTask(0, 0, ["a", "x"]))


def commit(writer, number, prompts, first_id=None):
    vectors = np.eye(len(prompts), 8, k=number, dtype=np.float32)
    task = ShardTask(number, number * len(prompts) if first_id is None else first_id, prompts)
    writer.commit_shard(save_shard(writer.root, task, vectors, vectors))


def test_verify_flag_reaches_the_checksums(built_index, tmp_path):
    from conftest import run_cli

    root = copy_index(built_index, tmp_path)
    data = bytearray((root / "minilm.f16").read_bytes())
    data[0] ^= 0xFF
    (root / "minilm.f16").write_bytes(bytes(data))
    result = run_cli("search", root, "--text", "a castle", "--verify")
    assert result.returncode == 2
    assert "minilm.f16: sha256 differs from the manifest" in result.stderr.splitlines()[-1]


def test_failed_overwrite_keeps_the_existing_index(built_index, tmp_path, tiny_clip_dir):
    """A rebuild with --overwrite is built beside the index and swapped in only when complete."""
    import img2prompt
    from conftest import read_data_prompts

    root = copy_index(built_index, tmp_path)
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    bad = tmp_path / "bad.csv"
    bad.write_text("caption\nx\n")
    with pytest.raises(UserError, match="no column 'prompt'"):
        img2prompt.build(bad, root, clip_model=str(tiny_clip_dir), device="cpu", overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
    # the index's own prompts.parquet as the corpus of its rebuild: read in full before anything is replaced
    result = img2prompt.build(root / "prompts.parquet", root, clip_model=str(tiny_clip_dir), device="cpu",
                              overwrite=True, progress=False, shard_size=64)
    assert result.manifest["count"] == 160 and open_index(root).prompts == read_data_prompts(160)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "copy"]  # no staging or retired folder left


def test_overwrite_never_deletes_what_is_not_an_index(tmp_path):
    folder = tmp_path / "mine"
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not an index: choose another --out .*only replaces an index"):
        IndexWriter(folder, {"models": "x"}, overwrite=True)
    assert (folder / "shards" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["shards"]  # not even a lock file left behind


def test_a_second_build_into_the_same_folder_is_refused(tmp_path):
    import os

    first = IndexWriter(tmp_path / "idx", {"models": "x"})
    with pytest.raises(UserError, match=rf"idx is being written by another img2prompt build \(pid {os.getpid()}\)"):
        IndexWriter(tmp_path / "idx", {"models": "x"}, overwrite=True)
    first.close()
    assert IndexWriter(tmp_path / "idx", {"models": "x"}, overwrite=True).rows_committed() == 0


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.update(count="many"), r"manifest is damaged \(missing or invalid: count 'many'\)"),
    (lambda m: m.pop("models"), r"manifest is damaged \(missing or invalid: models.clip, models.text\)"),
    (lambda m: m.pop("files"), r"manifest is damaged \(missing or invalid: files\)"),
])
def test_damaged_manifest_is_one_line(built_index, tmp_path, damage, message):
    root = copy_index(built_index, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    damage(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message):
        open_index(root)


@pytest.mark.parametrize("payload, message", [("[1, 2]", "manifest holds a JSON list, not an object"),
                                              ("null", "manifest holds a JSON NoneType, not an object")])
def test_manifest_that_is_not_an_object(built_index, tmp_path, payload, message):
    root = copy_index(built_index, tmp_path)
    (root / "manifest.json").write_text(payload)
    with pytest.raises(UserError, match=message):
        open_index(root)


def test_damaged_files_without_verify_are_one_line(built_index, tmp_path):
    root = copy_index(built_index, tmp_path)
    data = bytearray((root / "prompts.parquet").read_bytes())
    data[-12:-4] = bytes(8)  # the footer length and magic
    (root / "prompts.parquet").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"prompts\.parquet: not readable .*the index is damaged"):
        open_index(root)
    root = copy_index(built_index, tmp_path / "again")
    data = bytearray((root / "minilm_mean.npy").read_bytes())
    data[:6] = b"XXXXXX"  # the .npy magic
    (root / "minilm_mean.npy").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"minilm_mean\.npy: not readable"):
        open_index(root).minilm_mean


def test_resume_refuses_another_precision_and_cleans_stray_temp_files(tmp_path):
    """A shard encoded in fp16 on a GPU never joins shards encoded in fp32 (or the reverse)."""
    key = {"models": "x", "precision": "fp32", "batch_size": 32}
    writer = IndexWriter(tmp_path / "idx", key)
    commit(writer, 0, ["a", "b"])
    writer.close()
    stray = tmp_path / "idx" / f".manifest.json.{dead_pid()}.deadbeef.tmp"  # a write killed before its rename
    stray.write_text("{")
    with pytest.raises(UserError, match=r"cannot resume, the build settings differ .*\(precision\)"):
        IndexWriter(tmp_path / "idx", {**key, "precision": "fp16-autocast"}, resume=True)
    resumed = IndexWriter(tmp_path / "idx", key, resume=True)
    assert resumed.rows_committed() == 2 and not stray.exists()


def test_leftover_shards_beside_a_complete_index_are_explained(built_index, tmp_path, caplog):
    root = copy_index(built_index, tmp_path)
    (root / "shards").mkdir()
    with caplog.at_level("WARNING"):
        open_index(root)
    assert "shards/ is left over from a build killed while cleaning up" in caplog.text


def test_a_refused_writer_does_not_keep_the_lock(tmp_path):
    """In a notebook the exception (and everything it references) stays alive: the retry must not be locked out."""
    writer = IndexWriter(tmp_path / "idx", {"models": "x"})
    commit(writer, 0, ["a", "b"])
    writer.close()
    try:
        IndexWriter(tmp_path / "idx", {"models": "x"})
    except UserError as kept:
        error = kept  # held, as sys.last_traceback would hold it
    assert "pass --resume" in str(error)
    assert IndexWriter(tmp_path / "idx", {"models": "x"}, resume=True).rows_committed() == 2


# ---------------------------------------------------------------------------------------------- our own leftovers

def dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def crash_in_first_manifest_write(folder) -> None:
    """A build killed while its very first manifest is being renamed into place (a real process, a real kill)."""
    import subprocess
    import sys

    code = ("import os, sys; from img2prompt import atomic; from img2prompt.index.writer import IndexWriter\n"
            "atomic.os.replace = lambda *a: os._exit(9)\n"
            "IndexWriter(sys.argv[1], {'models': 'x'})\n")
    assert subprocess.run([sys.executable, "-c", code, str(folder)], timeout=120).returncode == 9


@pytest.mark.parametrize("flags", [{}, {"resume": True}, {"overwrite": True}])
def test_a_build_killed_in_its_first_manifest_write_is_an_empty_folder(tmp_path, flags):
    folder = tmp_path / "idx"
    crash_in_first_manifest_write(folder)
    left = sorted(p.name for p in folder.iterdir())
    assert left[0] == ".lock" and len(left) == 2 and left[1].startswith(".manifest.json.") and left[1].endswith(".tmp")
    writer = IndexWriter(folder, {"models": "x"}, **flags)
    assert writer.rows_committed() == 0 and writer.manifest["state"] == "building"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "manifest.json"]  # the dead writer's temp file gone


def test_temp_files_of_live_writers_are_kept_and_named(tmp_path, caplog):
    import subprocess

    writer = IndexWriter(tmp_path / "idx", {"models": "x"})
    commit(writer, 0, ["a", "b"])
    writer.close()
    dead = tmp_path / "idx" / "shards" / f".00001.clip.npy.{dead_pid()}.0badcafe.tmp"
    dead.write_bytes(b"half")
    alive = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / "idx" / "shards" / f".00002.clip.npy.{alive.pid}.0badcafe.tmp"
        live.write_bytes(b"being written")
        with caplog.at_level("WARNING"):
            resumed = IndexWriter(tmp_path / "idx", {"models": "x"}, resume=True)
        assert resumed.rows_committed() == 2 and not dead.exists() and live.exists()
        assert f"belong to processes still running (pid {alive.pid})" in caplog.text
    finally:
        alive.kill()
        alive.wait()


def test_a_leftover_beside_a_complete_index_is_removed(built_index, tmp_path, caplog):
    """Killed after the swap but before deleting the old index: .NAME.rebuild holds a complete index."""
    root = copy_index(built_index, tmp_path)
    retired = shutil.copytree(built_index, tmp_path / ".copy.rebuild")
    with caplog.at_level("WARNING"), pytest.raises(UserError, match="already holds a complete index"):
        IndexWriter(root, {"models": "x"})
    assert not retired.exists() and "a complete index a killed rebuild left beside" in caplog.text
    assert open_index(root).count == 160


def test_an_unfinished_rebuild_beside_a_complete_index_still_resumes(built_index, tmp_path):
    root = copy_index(built_index, tmp_path)
    staged = IndexWriter(tmp_path / ".copy.rebuild", {"models": "x"})  # as a rebuild writes it
    commit(staged, 0, ["a", "b"])
    staged.close()
    resumed = IndexWriter(root, {"models": "x"}, resume=True)
    assert resumed.root == tmp_path / ".copy.rebuild" and resumed.rows_committed() == 2


def test_an_orphaned_rebuild_is_removed(tmp_path, caplog):
    """The index it was rebuilding is gone: nothing can resume the staging folder."""
    staged = IndexWriter(tmp_path / ".idx.rebuild", {"models": "x"})
    commit(staged, 0, ["a", "b"])
    staged.close()
    (tmp_path / "notes.rebuild").mkdir()  # not ours: untouched
    with caplog.at_level("WARNING"):
        IndexWriter(tmp_path / "idx", {"models": "x"}).close()
    assert not (tmp_path / ".idx.rebuild").exists() and (tmp_path / "notes.rebuild").is_dir()
    assert "a rebuild whose index is gone" in caplog.text


def test_a_folder_that_only_looks_like_a_rebuild_is_kept(tmp_path):
    (tmp_path / ".idx.rebuild").mkdir()
    (tmp_path / ".idx.rebuild" / "notes.txt").write_text("mine")
    IndexWriter(tmp_path / "idx", {"models": "x"}).close()
    assert (tmp_path / ".idx.rebuild" / "notes.txt").read_text() == "mine"


def test_retired_indexes_of_dead_swaps_are_removed(built_index, tmp_path, caplog):
    """Where the swap is two renames, a kill between them and the delete leaves .NAME.old-PID."""
    import subprocess

    root = copy_index(built_index, tmp_path)
    dead = shutil.copytree(built_index, tmp_path / f".copy.old-{dead_pid()}")
    alive = subprocess.Popen(["sleep", "60"])
    try:
        live = shutil.copytree(built_index, tmp_path / f".copy.old-{alive.pid}")
        with caplog.at_level("WARNING"):
            IndexWriter(root, {"models": "x"}, overwrite=True).close()
        assert not dead.exists() and live.exists()
        assert f"the build swapping it out (pid {alive.pid}) still runs" in caplog.text
    finally:
        alive.kill()
        alive.wait()
