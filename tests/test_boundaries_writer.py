"""Boundaries of index/writer.py (issue 35, the mutation pass), without a CLIP model: tiny shards written with
save_shard, then the checks a commit, a resume, consolidation and completion rely on — each file's size and
sha256, the rows check, contiguous shards, the mean and the ids of the consolidated files, the key ranges, the
final manifest's format version, and the swap of a rebuild into place."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from img2prompt.encoders.prompts import dedup_keys
from img2prompt.errors import UserError
from img2prompt.index.layout import (CLIP_VECTORS, FORMAT_VERSION, IMAGE_KEYS, INT8_FORMAT_VERSION, LOCK, MANIFEST,
                                     MINILM, MINILM_MEAN, PROMPT_KEYS, PROMPTS, SEGMENT_FORMAT_VERSION, SHARDS, TEXT_KEYS,
                                     file_sha256, shard_path, staging_folder)
from img2prompt.index.writer import IndexWriter, ShardTask, save_shard, save_shard_int8

BUILD = {"models": "x"}


def vectors(rows: int, dim: int, start: float) -> np.ndarray:
    return (start + np.arange(rows * dim, dtype=np.float32).reshape(rows, dim)) / 8


def write(writer: IndexWriter, number: int, prompts: list[str], first_id: int, *, images=None, kept=None,
          dim: int = 4) -> dict:
    task = ShardTask(number, first_id, prompts, images=images)
    rows = len(prompts) if kept is None else len(kept)
    record = save_shard(writer.root, task, vectors(rows, dim + 2, number), vectors(rows, dim, 10 * number),
                        clip_truncated=number, kept=kept)
    writer.commit_shard(record)
    return record


def test_a_shard_record_holds_each_files_size_and_sha256(tmp_path):
    writer = IndexWriter(tmp_path / "idx", BUILD)
    record = write(writer, 3, ["a", "b", "c"], 7, kept=[0, 2])
    assert {key: record[key] for key in ("number", "first_id", "count", "planned", "keys", "clip_truncated")} == \
        {"number": 3, "first_id": 7, "count": 2, "planned": 3, "keys": TEXT_KEYS, "clip_truncated": 3}
    for kind in ("prompts", "clip", "minilm"):
        path = shard_path(writer.root, 3, kind)
        assert record["files"][kind] == {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    assert pq.read_table(shard_path(writer.root, 3, "prompts")).to_pydict() == {"id": [7, 8], "prompt": ["a", "c"]}
    assert np.load(shard_path(writer.root, 3, "clip")).dtype == np.float16
    int8 = save_shard_int8(writer.root, 3, np.ones((2, 4), np.int8), np.full(2, 0.5))
    assert int8["minilm_i8"]["bytes"] == shard_path(writer.root, 3, "minilm_i8").stat().st_size
    assert np.load(shard_path(writer.root, 3, "minilm_scale")).dtype == np.float32


@pytest.mark.parametrize("prompts, clip_rows, minilm_rows", [(2, 3, 2), (2, 2, 3), (3, 2, 2)])
def test_a_shard_whose_rows_disagree_is_refused(tmp_path, prompts, clip_rows, minilm_rows):
    task = ShardTask(0, 0, ["p"] * prompts)
    with pytest.raises(ValueError, match=f"{prompts} prompts, {clip_rows} clip, {minilm_rows} minilm"):
        save_shard(tmp_path, task, vectors(clip_rows, 4, 0), vectors(minilm_rows, 4, 0))


def test_a_shard_of_the_same_size_but_other_bytes_is_not_committed(tmp_path):
    """The sha256 check alone catches a same-size change; the size check alone a truncation."""
    writer = IndexWriter(tmp_path / "idx", BUILD)
    write(writer, 0, ["a", "b"], 0)
    write(writer, 1, ["c", "d"], 2)
    task0, task1 = ShardTask(0, 0, ["a", "b"]), ShardTask(1, 2, ["c", "d"])
    assert writer.is_committed(task0) is True and writer.is_committed(task1) is True
    path = shard_path(writer.root, 0, "minilm")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    assert writer.is_committed(task0) is False
    assert sorted(writer.records) == [1]
    assert [r["number"] for r in json.loads((writer.root / MANIFEST).read_text())["shards"]] == [1]  # saved
    path = shard_path(writer.root, 1, "clip")
    path.write_bytes(path.read_bytes()[:-2])
    assert writer.is_committed(task1) is False and writer.records == {}


def test_a_record_without_files_or_with_another_first_id(tmp_path):
    writer = IndexWriter(tmp_path / "idx", BUILD)
    task = ShardTask(0, 0, ["a", "b"])
    assert writer.is_committed(task) is False  # no record
    record = write(writer, 0, ["a", "b"], 0)
    writer.commit_shard({key: value for key, value in record.items() if key != "files"})  # an old record
    assert writer.is_committed(task) is False
    with pytest.raises(UserError, match="no longer gives the same prompts for shard 0"):
        writer.is_committed(ShardTask(0, 5, ["a", "b"]))


def test_commit_replaces_a_record_of_the_same_number_and_keeps_them_ordered(tmp_path):
    writer = IndexWriter(tmp_path / "idx", BUILD)
    write(writer, 2, ["e"], 4)
    write(writer, 0, ["a", "b"], 0)
    write(writer, 0, ["a", "b"], 0)
    assert [r["number"] for r in writer.manifest["shards"]] == [0, 2]
    assert writer.rows_committed() == 3
    with pytest.raises(UserError, match=r"shards \[0, 2\] are not contiguous: finish the build with --resume"):
        writer.consolidate()


def test_consolidation_ids_mean_and_keep_masks(tmp_path):
    writer = IndexWriter(tmp_path / "idx", BUILD)
    write(writer, 0, ["a", "b", "c"], 0)
    write(writer, 1, ["d", "e"], 3)
    clip = np.concatenate([vectors(3, 6, 0), vectors(2, 6, 1)]).astype(np.float16)
    minilm = np.concatenate([vectors(3, 4, 0), vectors(2, 4, 10)]).astype(np.float16)
    assert writer.consolidate() == (5, 6, 4)
    table = pq.read_table(writer.root / PROMPTS).to_pydict()
    assert table == {"id": [0, 1, 2, 3, 4], "prompt": ["a", "b", "c", "d", "e"], "key": [TEXT_KEYS] * 5}
    assert np.load(writer.root / PROMPT_KEYS).tolist() == sorted(dedup_keys(list("abcde")).tolist())
    assert np.array_equal(np.asarray(writer.vectors("clip")), clip)
    assert np.array_equal(np.asarray(writer.vectors("minilm")), minilm)
    assert np.allclose(np.load(writer.root / MINILM_MEAN), minilm.astype(np.float64).mean(axis=0), atol=1e-6)

    writer.keep = {0: np.array([True, False, True]), 1: np.array([False, True])}
    assert writer.rows_committed() == 3
    assert writer.consolidate(into="seg", first_id=10) == (3, 6, 4)
    table = pq.read_table(writer.root / "seg" / PROMPTS).to_pydict()
    assert table["id"] == [10, 11, 12] and table["prompt"] == ["a", "c", "e"]
    assert np.load(writer.root / "seg" / PROMPT_KEYS).tolist() == sorted(dedup_keys(["a", "c", "e"]).tolist())
    raw = np.fromfile(writer.root / "seg" / CLIP_VECTORS, dtype=np.float16).reshape(3, 6)
    assert np.array_equal(raw, clip[[0, 2, 4]])
    assert not (writer.root / "seg" / MINILM_MEAN).exists()


def test_consolidating_nothing_is_refused(tmp_path):
    writer = IndexWriter(tmp_path / "idx", BUILD)
    write(writer, 0, ["a"], 0)
    writer.keep = {0: np.array([False])}
    with pytest.raises(UserError, match="holds no usable prompt"):
        writer.consolidate()


def test_key_ranges_text_first_then_image(tmp_path):
    writer = IndexWriter(tmp_path / "idx", BUILD)
    write(writer, 0, ["a", "b"], 0)
    write(writer, 1, ["c"], 2)
    write(writer, 2, ["d", "e", "f"], 3, images=["1.png", "2.png", "3.png"])
    assert writer.key_rows() == {TEXT_KEYS: (0, 3), IMAGE_KEYS: (3, 6)}
    writer.keep = {2: np.array([False, False, False])}
    assert writer.key_rows() == {TEXT_KEYS: (0, 3)}  # an empty range is left out
    writer.keep = None
    write(writer, 3, ["g"], 6)
    with pytest.raises(ValueError, match="interleaved"):
        writer.key_rows()
    writer.consolidate()
    assert pq.read_table(writer.root / PROMPTS).column("key").to_pylist() == [TEXT_KEYS] * 3 + [IMAGE_KEYS] * 3 + [
        TEXT_KEYS]


@pytest.mark.parametrize("info, version", [({}, FORMAT_VERSION), ({"key_pca": {}}, INT8_FORMAT_VERSION),
                                           ({"segments": [{}]}, SEGMENT_FORMAT_VERSION),
                                           ({"segments": []}, FORMAT_VERSION)])
def test_complete_records_every_file_and_the_format_version(tmp_path, info, version):
    writer = IndexWriter(tmp_path / "idx", BUILD)
    write(writer, 0, ["a", "b"], 0)
    writer.consolidate()
    (writer.root / "extra.bin").write_bytes(b"12345")
    linked = {"linked.bin": {"bytes": 9, "sha256": "not re-hashed"}}
    manifest = writer.complete({"count": 2, **info}, extra_files=("extra.bin",), linked=linked)
    assert manifest["format_version"] == version and manifest["state"] == "complete"
    assert manifest["build"] == BUILD and manifest["count"] == 2
    assert set(manifest["files"]) == {PROMPTS, PROMPT_KEYS, MINILM, CLIP_VECTORS, MINILM_MEAN, "extra.bin", "linked.bin"}
    assert manifest["files"]["extra.bin"] == {"bytes": 5, "sha256": file_sha256(writer.root / "extra.bin")}
    assert manifest["files"]["linked.bin"] == linked["linked.bin"]
    assert json.loads((tmp_path / "idx" / MANIFEST).read_text()) == manifest
    assert not (tmp_path / "idx" / SHARDS).exists() and not (tmp_path / "idx" / LOCK).exists()
    writer.close()


def test_a_rebuild_is_swapped_in_only_at_complete(tmp_path):
    first = IndexWriter(tmp_path / "idx", BUILD)
    write(first, 0, ["old"], 0)
    first.consolidate()
    first.complete({"count": 1})
    first.close()
    rebuild = IndexWriter(tmp_path / "idx", BUILD, overwrite=True)
    assert rebuild.root == staging_folder(tmp_path / "idx") and rebuild.root != rebuild.final
    assert json.loads((tmp_path / "idx" / MANIFEST).read_text())["state"] == "complete"  # the old one stays
    write(rebuild, 0, ["new", "newer"], 0)
    rebuild.consolidate()
    assert pq.read_table(tmp_path / "idx" / PROMPTS).column("prompt").to_pylist() == ["old"]
    rebuild.complete({"count": 2})
    rebuild.close()
    assert rebuild.root == tmp_path / "idx"
    assert pq.read_table(tmp_path / "idx" / PROMPTS).column("prompt").to_pylist() == ["new", "newer"]
    assert not staging_folder(tmp_path / "idx").exists() and not (tmp_path / "idx" / LOCK).exists()


def test_an_abandoned_rebuild_leaves_the_index_as_it_was(tmp_path):
    first = IndexWriter(tmp_path / "idx", BUILD)
    write(first, 0, ["old"], 0)
    first.consolidate()
    before = first.complete({"count": 1})
    first.close()
    rebuild = IndexWriter(tmp_path / "idx", BUILD, overwrite=True)
    write(rebuild, 0, ["new"], 0)
    rebuild.abandon()
    rebuild.close()
    assert not staging_folder(tmp_path / "idx").exists() and not (tmp_path / "idx" / LOCK).exists()
    assert json.loads((tmp_path / "idx" / MANIFEST).read_text()) == before
    assert pq.read_table(tmp_path / "idx" / PROMPTS).column("prompt").to_pylist() == ["old"]


@pytest.mark.parametrize("shards_left", [True, False], ids=["killed before dropping its shards", "after"])
def test_a_resume_of_a_rebuild_killed_before_its_swap_finishes_it(tmp_path, shards_left):
    first = IndexWriter(tmp_path / "idx", {"models": "old"})
    write(first, 0, ["old"], 0)
    first.consolidate()
    first.complete({"count": 1})
    first.close()
    rebuild = IndexWriter(tmp_path / "idx", BUILD, overwrite=True)
    write(rebuild, 0, ["new"], 0)
    rebuild.consolidate()
    # killed in complete() between its final manifest and the swap:
    from img2prompt.atomic import write_json_atomic
    staged = {**rebuild.manifest, "state": "complete", "files": {}}
    write_json_atomic(rebuild.root / MANIFEST, staged)
    if not shards_left:
        shutil.rmtree(rebuild.root / SHARDS)
    rebuild.close()
    done = IndexWriter(tmp_path / "idx", BUILD, resume=True)
    assert done.done is not None and done.done["build"] == BUILD and done.root == tmp_path / "idx"
    done.close()
    assert pq.read_table(tmp_path / "idx" / PROMPTS).column("prompt").to_pylist() == ["new"]
    assert not staging_folder(tmp_path / "idx").exists() and not (tmp_path / "idx" / LOCK).exists()
    assert not (tmp_path / "idx" / SHARDS).exists()


def test_a_user_lock_file_stays_on_a_refusal_and_goes_on_completion(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    (folder / LOCK).write_text("")
    writer = IndexWriter(folder, BUILD)
    writer.close()
    assert (folder / LOCK).exists()  # the folder is left as it was found
    writer = IndexWriter(folder, BUILD, resume=True)
    write(writer, 0, ["a"], 0)
    writer.consolidate()
    writer.complete({"count": 1})
    writer.close()
    assert not (folder / LOCK).exists()
    done = IndexWriter(folder, BUILD, resume=True)
    done.close()
    assert done.done is not None and not (folder / LOCK).exists()


def test_starting_over_clears_what_the_last_build_left(tmp_path):
    writer = IndexWriter(tmp_path / "idx", BUILD)
    write(writer, 0, ["a"], 0)
    writer.consolidate()
    (writer.root / "segments").mkdir()
    writer.close()
    again = IndexWriter(tmp_path / "idx", BUILD, overwrite=True)
    assert again.manifest["shards"] == [] and again.manifest["state"] == "building"
    assert again.manifest["format_version"] == FORMAT_VERSION and again.manifest["build"] == BUILD
    left = sorted(path.name for path in (tmp_path / "idx").iterdir())
    assert left == [LOCK, MANIFEST]
    again.close()


def test_a_resume_of_the_finished_job_drops_a_leftover_staging_folder(tmp_path):
    """Done: the index is this job's; a staging folder beside it (a dead rebuild's) goes, the index stays."""
    first = IndexWriter(tmp_path / "idx", BUILD)
    write(first, 0, ["a"], 0)
    first.consolidate()
    before = first.complete({"count": 1})
    first.close()
    staging = staging_folder(tmp_path / "idx")
    staging.mkdir()
    (staging / "clip.f16").write_bytes(b"old")
    done = IndexWriter(tmp_path / "idx", BUILD, resume=True)
    done.close()
    assert done.done == before and not staging.exists()
    assert json.loads((tmp_path / "idx" / MANIFEST).read_text()) == before


def test_a_shard_and_a_segment_go_into_folders_not_made_yet(tmp_path):
    """save_shard from any process makes the shards folder (and the root); an add consolidates into
    segments/NNNNN/ before segments/ exists."""
    root = tmp_path / "new" / "idx"
    record = save_shard(root, ShardTask(0, 0, ["a"]), vectors(1, 6, 0), vectors(1, 4, 0))
    assert record["files"]["clip"]["bytes"] == shard_path(root, 0, "clip").stat().st_size
    assert record["clip_truncated"] == 0 and record["count"] == record["planned"] == 1  # none truncated by default
    writer = IndexWriter(tmp_path / "idx", BUILD)
    write(writer, 0, ["a", "b"], 0)
    assert writer.consolidate(into="segments/00001", first_id=5) == (2, 6, 4)
    assert pq.read_table(writer.root / "segments" / "00001" / PROMPTS).column("id").to_pylist() == [5, 6]
