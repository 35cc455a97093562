"""Boundaries of index/append.py (issue 35, the mutation pass), without a CLIP model: the old index's row
files linked (a copy where the filesystem has no hard links, said in a warning), the new rows written as
the next segment with ids continuing, keys through the index's PCA, MiniLM rows in its dtype, and the
MiniLM mean updated by count. The old indexes are built with tests/fake_jobs.py's fake models."""
from __future__ import annotations

import errno
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from img2prompt.index import append as append_module
from img2prompt.index.append import append_segment, link_file, row_file_names
from img2prompt.index.layout import (CLIP_VECTORS, KEY_PCA, MINILM, MINILM_I8, MINILM_MEAN, MINILM_SCALE,
                                     PROMPT_KEYS, PROMPTS)
from img2prompt.index.minilm_store import quantise
from img2prompt.index.reader import PromptIndex, open_index
from img2prompt.index.writer import IndexWriter, ShardTask, save_shard
from tests.fake_jobs import CLIP_DIM, TEXT_DIM, clip_keys, fake_add, fake_build, minilm_rows, write_lines
from tests.fake_jobs import no_fsync  # noqa: F401 (autouse: the files are renamed into place, not flushed)

OLD = [f"old prompt {n}, oil painting" for n in range(12)]
NEW = [f"new prompt {n}" for n in range(7)]


def staged(tmp_path, prompts=NEW, shard: int = 4) -> IndexWriter:
    """A writer holding the new rows as committed shards (as an add's encode step leaves it)."""
    writer = IndexWriter(tmp_path / "stage", {"add": 1})
    for number, start in enumerate(range(0, len(prompts), shard)):
        part = prompts[start:start + shard]
        writer.commit_shard(save_shard(writer.root, ShardTask(number, start, part), clip_keys(part),
                                       minilm_rows(part)))
    return writer


def old_index(tmp_path, **options) -> PromptIndex:
    fake_build(tmp_path / "old", [write_lines(tmp_path / "old.txt", OLD)], **options)
    return open_index(tmp_path / "old")


# -- row_file_names -----------------------------------------------------------------------------------------

def test_row_file_names_of_a_base_index():
    manifest = {"count": 3, "files": {PROMPT_KEYS: {}}}
    assert row_file_names(manifest) == [PROMPTS, CLIP_VECTORS, MINILM, PROMPT_KEYS]
    assert row_file_names({"count": 3, "files": {}}) == [PROMPTS, CLIP_VECTORS, MINILM]  # keys not listed: none


def test_row_file_names_of_a_grown_int8_pca_index():
    manifest = {"count": 9, "minilm": {"dtype": "int8"}, "segments": [
        {"number": 1, "first_id": 4, "count": 3}, {"number": 2, "first_id": 7, "count": 2}],
        "files": {PROMPT_KEYS: {}, f"segments/00002/{PROMPT_KEYS}": {}, KEY_PCA: {}}}
    rows = [PROMPTS, CLIP_VECTORS, MINILM_I8, MINILM_SCALE]
    assert row_file_names(manifest) == rows + [f"segments/00001/{name}" for name in rows] + \
        [f"segments/00002/{name}" for name in rows] + [PROMPT_KEYS, f"segments/00002/{PROMPT_KEYS}", KEY_PCA]


# -- link_file ------------------------------------------------------------------------------------------

def test_link_file_links_into_a_new_folder(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(b"rows")
    target = tmp_path / "deep" / "er" / "a.bin"
    assert link_file(source, target) is True
    assert os.path.samefile(source, target) and os.stat(source).st_nlink == 2
    assert link_file(source, target) is True  # already the same file: left as it is
    assert os.stat(source).st_nlink == 2 and sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]


def test_link_file_replaces_another_file_at_the_target(tmp_path):
    source, target = tmp_path / "a.bin", tmp_path / "b.bin"
    source.write_bytes(b"new rows")
    target.write_bytes(b"stale")
    assert link_file(source, target) is True
    assert os.path.samefile(source, target) and target.read_bytes() == b"new rows"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # no temp file left


def test_link_file_copies_where_there_are_no_hard_links(tmp_path, monkeypatch, caplog):
    def no_links(source, target):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    source, target = tmp_path / "a.bin", tmp_path / "out" / "a.bin"
    source.write_bytes(b"rows")
    monkeypatch.setattr(append_module.os, "link", no_links)
    with caplog.at_level(logging.WARNING, logger="img2prompt.index.append"):
        assert link_file(source, target) is False
    assert target.read_bytes() == b"rows" and not os.path.samefile(source, target)
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot hard-link {source} ({os.strerror(errno.EXDEV)}): copying it"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]


# -- append_segment ----------------------------------------------------------------------------------------

def test_nothing_committed_links_the_old_rows_and_mean_as_they_are(tmp_path):
    old = old_index(tmp_path)
    writer = IndexWriter(tmp_path / "stage", {"add": 1})
    appended = append_segment(writer, old)
    names = row_file_names(old.manifest)
    assert appended.linked == {name: old.manifest["files"][name] for name in names + [MINILM_MEAN]}
    assert appended.segments == [] and appended.new_files == () and appended.first_id == 12
    assert appended.grown.manifest == old.manifest and appended.grown.root == writer.root
    for name in names + [MINILM_MEAN]:
        assert os.path.samefile(old.root / name, writer.root / name), name


def test_the_new_rows_become_the_next_segment(tmp_path):
    old = old_index(tmp_path)
    writer = staged(tmp_path)
    appended = append_segment(writer, old)
    assert appended.first_id == 12 and appended.segments == [{"number": 1, "first_id": 12, "count": 7}]
    assert appended.new_files == tuple(f"segments/00001/{name}" for name in (PROMPTS, CLIP_VECTORS, MINILM,
                                                                               PROMPT_KEYS))
    assert appended.linked == {name: old.manifest["files"][name] for name in row_file_names(old.manifest)}
    assert MINILM_MEAN not in appended.linked
    for name in row_file_names(old.manifest):
        assert os.path.samefile(old.root / name, writer.root / name), name
    grown = appended.grown
    assert grown.count == 19 and grown.manifest["count"] == 19 and grown.manifest["segments"] == appended.segments
    assert grown.manifest["files"] == old.manifest["files"]
    table = pq.read_table(writer.root / "segments/00001" / PROMPTS).to_pydict()
    assert table["id"] == list(range(12, 19)) and table["prompt"] == NEW
    assert np.array_equal(np.asarray(grown.clip_vectors[12:]), clip_keys(NEW).astype(np.float16))
    assert np.array_equal(np.asarray(grown.clip_vectors[:12]), np.asarray(old.clip_vectors))
    assert np.array_equal(np.asarray(grown.minilm[12:]), minilm_rows(NEW).astype(np.float16))
    # the mean by count: the old mean × 12 plus the new fp16 rows, over 19
    every = np.concatenate([np.asarray(old.minilm, np.float64),
                            minilm_rows(NEW).astype(np.float16).astype(np.float64)])
    mean = np.load(writer.root / MINILM_MEAN)
    assert mean.dtype == np.float32 and np.allclose(mean, every.mean(axis=0), atol=1e-6)
    assert not os.path.samefile(old.root / MINILM_MEAN, writer.root / MINILM_MEAN)


def test_a_second_add_numbers_the_next_segment(tmp_path):
    old_index(tmp_path)
    fake_add(tmp_path / "old", [write_lines(tmp_path / "first.txt", ["first added prompt"])])
    old = open_index(tmp_path / "old")
    appended = append_segment(staged(tmp_path), old)
    assert appended.first_id == 13
    assert appended.segments == [{"number": 1, "first_id": 12, "count": 1}, {"number": 2, "first_id": 13, "count": 7}]
    assert appended.new_files[0] == f"segments/00002/{PROMPTS}"
    assert f"segments/00001/{PROMPTS}" in appended.linked
    assert appended.grown.prompt_rows([19, 12, 13]) == ["new prompt 6", "first added prompt", "new prompt 0"]


def test_new_keys_go_through_the_index_s_pca(tmp_path):
    old = old_index(tmp_path, key_dims=4)
    appended = append_segment(staged(tmp_path), old)
    stored = np.fromfile(appended.grown.root / "segments/00001" / CLIP_VECTORS,
                         dtype=np.float16).reshape(7, 4)
    expected = old.key_pca.project(clip_keys(NEW).astype(np.float16)).astype(np.float16)
    assert np.array_equal(stored, expected)
    assert KEY_PCA in appended.linked and os.path.samefile(old.root / KEY_PCA, appended.grown.root / KEY_PCA)
    assert appended.grown.key_dim == 4 and appended.grown.clip_dim == CLIP_DIM


@pytest.mark.parametrize("block", [65_536, 3])
def test_int8_rows_are_quantised_per_row_in_blocks(tmp_path, monkeypatch, block):
    old = old_index(tmp_path, minilm_dtype="int8")
    monkeypatch.setattr(append_module, "_BLOCK", block)
    writer = staged(tmp_path)
    appended = append_segment(writer, old)
    folder = writer.root / "segments/00001"
    assert not (folder / MINILM).exists()
    assert appended.new_files == tuple(f"segments/00001/{name}" for name in (PROMPTS, CLIP_VECTORS, MINILM_I8,
                                                                               MINILM_SCALE, PROMPT_KEYS))
    quantised, scale = quantise(minilm_rows(NEW).astype(np.float16))
    assert np.array_equal(np.fromfile(folder / MINILM_I8, np.int8).reshape(7, TEXT_DIM), quantised)
    assert np.array_equal(np.fromfile(folder / MINILM_SCALE, np.float32), scale.astype(np.float32))
    # the mean is of the fp16 rows, as a build sums them before any int8
    every = np.concatenate([minilm_rows(OLD).astype(np.float16).astype(np.float64),
                            minilm_rows(NEW).astype(np.float16).astype(np.float64)])
    assert np.allclose(np.load(writer.root / MINILM_MEAN), every.mean(axis=0), atol=1e-6)


def test_the_next_segment_follows_the_last_one_not_the_first(tmp_path):
    old_index(tmp_path)
    for number in range(2):
        fake_add(tmp_path / "old", [write_lines(tmp_path / f"add{number}.txt", [f"added prompt {number}"])])
    old = open_index(tmp_path / "old")
    assert [entry["number"] for entry in old.manifest["segments"]] == [1, 2]
    appended = append_segment(staged(tmp_path), old)
    assert appended.first_id == 14 and appended.segments[-1] == {"number": 3, "first_id": 14, "count": 7}
    assert appended.new_files[0] == f"segments/00003/{PROMPTS}"
