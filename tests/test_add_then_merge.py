"""`add` then `merge`: an index grown by `img2prompt add`, merged with another index that overlaps both its
built and its added rows: prompts deduplicated (first input wins), counts right, rows copied unchanged, and a
search finds prompts from both inputs. Public behaviour only: the CLI, img2prompt.merge/open_index, and the
index reader (the add's internals are being reworked)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import img2prompt
from conftest import read_data_prompts
from img2prompt.cli import main
from img2prompt.encoders.prompts import dedup_key
from img2prompt.index.reader import open_index

PROMPTS = read_data_prompts(140)


def _write(path: Path, prompts: list[str]) -> Path:
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, tiny_clip_dir) -> dict[str, Path]:
    """grown: data prompts 0..59 built, 60..99 added (plus a re-cased copy of prompt 3, dropped by the add);
    other: prompts 80..139 and a re-spaced copy of prompt 10 -- 21 rows the grown index already holds."""
    root = tmp_path_factory.mktemp("add-merge")
    build = dict(clip_model=str(tiny_clip_dir), index="flat", device="cpu", shard_size=30, batch_size=30,
                 progress=False)
    img2prompt.build(_write(root / "a.txt", PROMPTS[:60]), root / "grown", **build)
    added = _write(root / "b.txt", PROMPTS[60:100] + [PROMPTS[3].upper()])
    assert main(["-q", "add", str(root / "grown"), str(added), "--device", "cpu", "--shard-size", "30",
                 "--batch-size", "30"]) == 0
    other = PROMPTS[80:140] + ["  " + PROMPTS[10].replace(" ", "   ") + " "]
    img2prompt.build(_write(root / "c.txt", other), root / "other", **build)
    return {"grown": root / "grown", "other": root / "other"}


def test_the_grown_index_holds_its_added_prompts(indexes):
    grown = open_index(indexes["grown"], verify=True)
    assert grown.count == 100 and grown.prompts == PROMPTS[:100]
    (entry,) = grown.manifest["history"]
    assert (entry["count_before"], entry["count"], entry["duplicates_of_index"]) == (60, 40, 1)


def test_merge_of_a_grown_index_dedups_counts_and_copies_rows(tmp_path, indexes):
    result = img2prompt.merge([indexes["grown"], indexes["other"]], tmp_path / "m", device="cpu", shard_size=30,
                              progress=False)
    assert [entry["duplicates"] for entry in result.report["merged"]] == [0, 21]
    assert result.report["skipped"]["duplicate_of_earlier_index"] == 21
    merged, grown, other = (open_index(path, verify=True) for path in
                            (tmp_path / "m", indexes["grown"], indexes["other"]))
    assert merged.count == result.manifest["count"] == 140
    assert merged.prompts == PROMPTS[:140]  # the grown index's 100 (its ids kept), then other's 40 new ones
    for kind in ("clip_vectors", "minilm"):  # rows copied, not re-encoded: the inputs' own vectors
        rows = np.asarray(getattr(merged, kind))
        np.testing.assert_array_equal(rows[:100], np.asarray(getattr(grown, kind)))
        np.testing.assert_array_equal(rows[100:], np.asarray(getattr(other, kind))[20:60])


def test_a_search_of_the_merge_finds_prompts_from_both(tmp_path, indexes, tiny_clip_dir):
    img2prompt.merge([indexes["grown"], indexes["other"]], tmp_path / "m", device="cpu", shard_size=30,
                     progress=False)
    # built into the grown index, added to it, in both (the grown copy), only in the other index
    wanted = [5, 70, 90, 120, 139]
    with img2prompt.open_index(tmp_path / "m", device="cpu") as index:
        hits = index.search_texts([PROMPTS[row] for row in wanted], k=1)
    assert [int(hit.ids[0]) for hit in hits] == wanted
    assert [hit.prompts[0] for hit in hits] == [PROMPTS[row] for row in wanted]


def test_the_first_input_wins_either_way(tmp_path, indexes):
    result = img2prompt.merge([indexes["other"], indexes["grown"]], tmp_path / "m", device="cpu", shard_size=30,
                              progress=False)
    assert [entry["duplicates"] for entry in result.report["merged"]] == [0, 21]
    merged, other = open_index(tmp_path / "m"), open_index(indexes["other"])
    assert merged.count == 140
    assert merged.prompts[:61] == other.prompts  # the other index's rows first, its copy of prompt 10 kept
    assert merged.prompts[61:] == [prompt for number, prompt in enumerate(PROMPTS[:80]) if number != 10]
    assert len({dedup_key(prompt) for prompt in merged.prompts}) == 140  # no duplicate left
