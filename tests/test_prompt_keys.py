"""add's dedup against the index reads each segment's stored sorted keys (index/prompt_keys.py), memory-mapped,
instead of streaming and hashing every prompt of the index; an index without the key files still dedups."""
from __future__ import annotations

import json

import numpy as np

from img2prompt.encoders.prompts import dedup_keys
from img2prompt.index.layout import PROMPT_KEYS
from img2prompt.index.prompt_keys import IndexKeys
from img2prompt.index.reader import PromptIndex, open_index
from tests.test_add_grow import _add, _build, halves  # noqa: F401 (fixture)


def _stored(folder) -> np.ndarray:
    return np.load(folder / PROMPT_KEYS)


def _count_prompt_streams(monkeypatch) -> list[int]:
    calls = []
    original = PromptIndex.iter_prompt_batches

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PromptIndex, "iter_prompt_batches", counting)
    return calls


def test_each_segment_stores_its_sorted_keys_and_add_reads_them_not_the_prompts(tmp_path, halves, tiny_clip_dir,
                                                                                monkeypatch):
    first, second = halves
    root = tmp_path / "idx"
    _build([first], root, tiny_clip_dir, index="flat")
    manifest = json.loads((root / "manifest.json").read_text())
    assert PROMPT_KEYS in manifest["files"]
    prompts = open_index(root).prompt_rows(list(range(60)))
    assert np.array_equal(_stored(root), np.unique(dedup_keys(prompts)))
    streams = _count_prompt_streams(monkeypatch)
    again = tmp_path / "again.txt"  # the second half, and two of the index's prompts (case and spaces changed)
    again.write_text("\n".join(second.read_text().splitlines() + [prompts[3].upper(), "  " + prompts[7]]) + "\n")
    result = _add(root, [again])
    assert streams == []  # the index's prompts were never streamed for the dedup
    assert result.report["skipped"]["duplicate_of_index"] == 2 and result.report["added"] == 60
    assert f"segments/00001/{PROMPT_KEYS}" in result.manifest["files"] and PROMPT_KEYS in result.manifest["files"]
    added = open_index(root, verify=True).prompt_rows(list(range(60, 120)))
    assert np.array_equal(_stored(root / "segments" / "00001"), np.unique(dedup_keys(added)))
    third = tmp_path / "third.txt"  # a prompt of the appended segment, one of the base, one new
    third.write_text(f"{added[5]}\n{prompts[0]}\na lighthouse in a storm, oil painting\n")
    result = _add(root, [third])
    assert streams == [] and result.report["skipped"]["duplicate_of_index"] == 2 and result.report["added"] == 1
    assert open_index(root, verify=True).count == 121


def test_an_index_without_key_files_computes_them_from_its_prompts(tmp_path, halves, tiny_clip_dir):
    first, second = halves
    root = tmp_path / "idx"
    _build([first], root, tiny_clip_dir, index="flat")
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["files"][PROMPT_KEYS]  # as an index written before the key files existed
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / PROMPT_KEYS).unlink()
    old = open_index(root)
    keys = IndexKeys.of_index(old)
    assert keys.computed_rows == 60
    prompts = old.prompt_rows(list(range(60)))
    probe = np.concatenate([dedup_keys(prompts[:5]), dedup_keys(["not in the index at all"])])
    assert keys.contains(probe).tolist() == [True] * 5 + [False]
    again = tmp_path / "again.txt"
    again.write_text("\n".join(second.read_text().splitlines() + [prompts[3].title()]) + "\n")
    result = _add(root, [again])
    assert result.report["skipped"]["duplicate_of_index"] == 1 and result.report["added"] == 60
    grown = open_index(root, verify=True)
    assert PROMPT_KEYS not in grown.manifest["files"]  # the base stays as it was; the new segment has its keys
    assert f"segments/00001/{PROMPT_KEYS}" in grown.manifest["files"]
    assert IndexKeys.of_index(grown).computed_rows == 60


def test_stored_keys_answer_as_a_set():
    rng = np.random.default_rng(0)
    stored = np.unique(rng.integers(0, 2 ** 63, 5000, dtype=np.uint64))
    keys = IndexKeys([stored[:2000], stored[2000:]])
    probe = np.concatenate([stored[rng.integers(0, 5000, 300)], rng.integers(0, 2 ** 63, 300, dtype=np.uint64)])
    assert keys.contains(probe).tolist() == [int(k) in set(stored.tolist()) for k in probe]
    assert not IndexKeys([np.zeros(0, np.uint64)]).contains(probe).any()
