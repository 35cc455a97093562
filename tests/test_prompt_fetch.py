"""Prompts are fetched by the parquet row groups that hold the ids asked for, never the whole column: what a
search, --explain, eval or interrogate holds does not grow with the index. Older indexes (one big row group,
written before PROMPT_GROUP_ROWS) read the same way."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import read_data_prompts
from img2prompt.index import reader
from img2prompt.index.reader import open_index

GROUP = 16


def regroup(root, rows: int | None) -> None:
    """Rewrite prompts.parquet with `rows` rows a group (None: pyarrow's default, one group here, as older
    indexes were written) and record its new size in the manifest."""
    table = pq.read_table(root / "prompts.parquet")
    if rows is None:
        pq.write_table(table, root / "prompts.parquet")
    else:
        pq.write_table(table, root / "prompts.parquet", row_group_size=rows)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["prompts.parquet"]["bytes"] = (root / "prompts.parquet").stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def grouped(built_index, tmp_path):
    root = shutil.copytree(built_index, tmp_path / "grouped")
    regroup(root, GROUP)
    return root


def test_new_indexes_write_bounded_row_groups(built_index, monkeypatch):
    from img2prompt.index.layout import PROMPT_GROUP_ROWS

    meta = pq.ParquetFile(built_index / "prompts.parquet").metadata
    assert max(meta.row_group(g).num_rows for g in range(meta.num_row_groups)) <= PROMPT_GROUP_ROWS


def test_lookup_reads_only_the_groups_of_the_ids_asked(grouped):
    index = open_index(grouped)
    prompts = read_data_prompts(160)
    assert index.prompt_groups.reads == {"row_groups": 0, "rows": 0}  # opening reads no prompt
    ids = [5, 100, 101, -1, 5]
    assert index.prompt_rows(ids) == [prompts[5], prompts[100], prompts[101], "", prompts[5]]
    assert index.prompt_groups.reads == {"row_groups": 2, "rows": 2 * GROUP}  # groups 0 and 6 of 10
    assert index.prompt_rows([6]) == [prompts[6]]  # group 0 again: from the cache
    assert index.prompt_groups.reads["row_groups"] == 2


def test_cache_is_bounded_by_bytes(grouped, monkeypatch):
    monkeypatch.setattr(reader, "PROMPT_CACHE_BYTES", 1)  # every group evicts the one before
    index = open_index(grouped)
    prompts = read_data_prompts(160)
    for _ in range(2):
        assert index.prompt_rows([0, 159]) == [prompts[0], prompts[159]]
    assert len(index.prompt_groups.cache) == 1 and index.prompt_groups.reads["row_groups"] == 4


def test_search_reads_only_the_groups_it_shows(grouped):
    from img2prompt.api import open_index as open_api

    prompts = read_data_prompts(160)
    with open_api(grouped, device="cpu") as index:
        [hit] = index.search(texts=[prompts[77]], k=3)
        groups = {int(i) // GROUP for i in hit.ids}
        reads = index.session.index.prompt_groups.reads
        assert hit.prompts[0] == prompts[77]
        assert reads == {"row_groups": len(groups), "rows": GROUP * len(groups)}


def test_an_older_single_group_index_reads_the_same(built_index, tmp_path):
    root = shutil.copytree(built_index, tmp_path / "old")
    regroup(root, None)
    assert pq.ParquetFile(root / "prompts.parquet").metadata.num_row_groups == 1
    index = open_index(root)
    prompts = read_data_prompts(160)
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 160, size=1000)
    assert index.prompt_rows(ids) == [prompts[i] if i >= 0 else "" for i in ids]
    assert index.prompts == prompts
    assert [first for first, _ in index.iter_prompt_batches(size=50)] == [0, 50, 100, 150]


def test_a_damaged_prompt_group_is_one_line(grouped):
    from img2prompt.errors import UserError

    index = open_index(grouped)
    data = bytearray((grouped / "prompts.parquet").read_bytes())
    data[100:400] = b"\xff" * 300  # inside the first groups' pages; the footer (read at open) is intact
    (grouped / "prompts.parquet").write_bytes(bytes(data))
    fresh = open_index(grouped)
    with pytest.raises(UserError, match="prompts.parquet: not readable"):
        fresh.prompt_rows([0, 1, 2])
