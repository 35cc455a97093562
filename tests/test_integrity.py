"""Integrity: damaged, truncated, foreign or half-written index folders are refused with a clear error."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from img2prompt.errors import UserError
from img2prompt.index.format import FORMAT_VERSION, IndexWriter, open_index
from img2prompt.query.session import ModelOverrides, open_session


def copy_index(built_index, tmp_path):
    return shutil.copytree(built_index, tmp_path / "copy")


def test_truncated_file_is_refused(built_index, tmp_path):
    root = copy_index(built_index, tmp_path)
    with open(root / "minilm.f16", "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(UserError, match=r"minilm\.f16: 1000 bytes, the manifest expects 122880"):
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


def test_faiss_rows_must_agree(built_index, tmp_path):
    import faiss

    root = copy_index(built_index, tmp_path)
    small = faiss.IndexFlatIP(64)
    small.add(np.eye(64, dtype=np.float32)[:10])
    faiss.write_index(small, str(root / "clip.faiss"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["clip.faiss"]["bytes"] = (root / "clip.faiss").stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="FAISS holds 10 vectors, the index has 160 prompts"):
        open_session(str(root), ModelOverrides(), "cpu").retriever


def test_newer_format_and_not_an_index(built_index, tmp_path):
    root = copy_index(built_index, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"has index format {FORMAT_VERSION + 1}, newer than this img2prompt reads"):
        open_index(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not an index: no manifest.json"):
        open_index(tmp_path / "empty")
    with pytest.raises(UserError, match="index folder not found"):
        open_index(tmp_path / "missing")


def test_half_written_build_never_loads(tmp_path):
    """A build that dies after its shards, even after consolidating, is not an index until the manifest says so."""
    writer = IndexWriter(tmp_path / "idx", {"models": "x"})
    vectors = np.eye(4, 8, dtype=np.float32)
    writer.write_shard(["a", "b", "c", "d"], vectors, vectors)
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
    vectors = np.eye(2, 4, dtype=np.float32)
    writer.write_shard(["a", "b"], vectors, vectors)
    with pytest.raises(UserError, match=r"holds an unfinished build \(1 shards done\): pass --resume"):
        IndexWriter(tmp_path / "idx", {"models": "x"})
    assert IndexWriter(tmp_path / "idx", {"models": "x"}, resume=True).rows_written == 2
    assert IndexWriter(tmp_path / "idx", {"models": "x"}, overwrite=True).rows_written == 0


def test_verify_flag_reaches_the_checksums(built_index, tmp_path):
    from conftest import run_cli

    root = copy_index(built_index, tmp_path)
    data = bytearray((root / "minilm.f16").read_bytes())
    data[0] ^= 0xFF
    (root / "minilm.f16").write_bytes(bytes(data))
    result = run_cli("search", root, "--text", "a castle", "--verify")
    assert result.returncode == 2
    assert "minilm.f16: sha256 differs from the manifest" in result.stderr.splitlines()[-1]
