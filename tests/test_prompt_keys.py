"""add's dedup against the index reads each segment's stored sorted keys (index/prompt_keys.py), memory-mapped,
instead of streaming and hashing every prompt of the index; an index without the key files still dedups."""
from __future__ import annotations

import json

import numpy as np
import pytest

from img2prompt.encoders.prompts import KeySet, dedup_keys
from img2prompt.index.layout import PROMPT_KEYS, staging_folder
from img2prompt.index.prompt_keys import FirstSeen, IndexKeys, segment_key_names
from img2prompt.index.reader import PromptIndex, open_index
from tests.conftest import read_data_prompts
from tests.test_add import _rows
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


def _strip_keys(root) -> None:
    """The index as one written before the key files existed: no prompt_keys.npy listed or on disk."""
    manifest = json.loads((root / "manifest.json").read_text())
    for name in [name for name in manifest["files"] if name.endswith(PROMPT_KEYS)]:
        del manifest["files"][name]
        (root / name).unlink()
    (root / "manifest.json").write_text(json.dumps(manifest))


def _segment_prompts(root) -> dict[str, list[str]]:
    """{key file name: prompts of its segment} of a complete index."""
    opened = open_index(root)
    return {part.name(PROMPT_KEYS): opened.prompt_rows(list(range(part.first_id, part.first_id + part.count)))
            for part in opened.segments}


def test_an_index_without_key_files_computes_them_once_and_add_stores_them(tmp_path, halves, tiny_clip_dir,
                                                                           monkeypatch):
    first, second = halves
    prompts = read_data_prompts(150)
    roots = {"pre_keys": tmp_path / "old", "keyed": tmp_path / "keyed"}  # the same adds, with and without keys
    extra = tmp_path / "extra.txt"
    extra.write_text("\n".join(prompts[120:135]) + "\n")
    for root in roots.values():
        _build([first], root, tiny_clip_dir, index="flat")
        _add(root, [second])  # a base and one segment
    old = roots["pre_keys"]
    _strip_keys(old)
    keys = IndexKeys.of_index(open_index(old))
    assert keys.computed_rows == 120 and sorted(keys.computed) == [PROMPT_KEYS, f"segments/00001/{PROMPT_KEYS}"]
    base = open_index(old).prompt_rows(list(range(60)))
    probe = np.concatenate([dedup_keys(base[:5]), dedup_keys(["not in the index at all"])])
    assert keys.contains(probe).tolist() == [True] * 5 + [False]
    again = tmp_path / "again.txt"  # new prompts, one of the base (title case), one of the segment
    again.write_text("\n".join(prompts[135:145] + [base[3].title(), open_index(old).prompt_rows([70])[0]]) + "\n")
    results = {name: _add(root, [again]) for name, root in roots.items()}
    for result in results.values():
        assert result.report["skipped"]["duplicate_of_index"] == 2 and result.report["added"] == 10
    grown = open_index(old, verify=True)  # every file the manifest lists matches its checksum
    expected = [PROMPT_KEYS, f"segments/00001/{PROMPT_KEYS}", f"segments/00002/{PROMPT_KEYS}"]
    assert segment_key_names(grown.manifest) == expected
    for name, segment_prompts in _segment_prompts(old).items():  # each file: its own segment's keys
        assert np.array_equal(np.load(old / name), np.unique(dedup_keys(segment_prompts))), name
    assert IndexKeys.of_index(grown).computed_rows == 0
    streams = _count_prompt_streams(monkeypatch)  # the next add reads the stored keys, not the prompts
    results = {name: _add(root, [extra, again]) for name, root in roots.items()}
    assert streams == []
    for result in results.values():
        assert result.report["added"] == 15 and result.report["skipped"]["duplicate_of_index"] == 12
    assert _rows(roots["pre_keys"])[:2] == _rows(roots["keyed"])[:2]  # the answers as with keys from the start
    assert np.array_equal(_rows(roots["pre_keys"])[2], _rows(roots["keyed"])[2])


def test_a_kill_before_the_swap_leaves_the_pre_keys_index_as_it_was(tmp_path, halves, tiny_clip_dir, monkeypatch):
    from img2prompt.build_index.add import AddJob

    first, second = halves
    root = tmp_path / "idx"
    _build([first], root, tiny_clip_dir, index="flat")
    _strip_keys(root)
    before = (root / "manifest.json").read_bytes()

    def killed(self):
        raise KeyboardInterrupt  # after append wrote the keys into the staging folder, before the commit

    monkeypatch.setattr(AddJob, "grow_search", killed)
    with pytest.raises(KeyboardInterrupt):
        _add(root, [second])
    monkeypatch.undo()
    assert (staging_folder(root) / PROMPT_KEYS).is_file()  # written, in the staging folder only
    assert (root / "manifest.json").read_bytes() == before and not (root / PROMPT_KEYS).exists()
    assert open_index(root, verify=True).count == 60  # valid and readable, the old index whole
    result = _add(root, [second], resume=True)
    assert result.report["added"] == 60 and PROMPT_KEYS in result.manifest["files"]
    assert np.array_equal(np.load(root / PROMPT_KEYS), np.unique(dedup_keys(open_index(root).prompt_rows(range(60)))))


def test_stored_keys_answer_as_a_set():
    rng = np.random.default_rng(0)
    stored = np.unique(rng.integers(0, 2 ** 63, 5000, dtype=np.uint64))
    keys = IndexKeys([stored[:2000], stored[2000:]])
    probe = np.concatenate([stored[rng.integers(0, 5000, 300)], rng.integers(0, 2 ** 63, 300, dtype=np.uint64)])
    assert keys.contains(probe).tolist() == [int(k) in set(stored.tolist()) for k in probe]
    assert not IndexKeys([np.zeros(0, np.uint64)]).contains(probe).any()


class _FakeIndex:
    """What FirstSeen reads of an index: its manifest's segments, their stored keys (None: no key file) and
    their prompts in batches of 7 (never across segments, as the reader's)."""

    def __init__(self, segments: list[list[str]], keyed: list[bool]) -> None:
        counts = [len(prompts) for prompts in segments]
        self.firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        self.root, self.segments = None, segments
        self.manifest = {"count": sum(counts), "files": {},
                         "segments": [{"number": number, "first_id": self.firsts[number], "count": counts[number]}
                                      for number in range(1, len(segments))]}
        self.stored_prompt_keys = [np.unique(dedup_keys(prompts)) if has else None
                                   for prompts, has in zip(segments, keyed)]

    def iter_prompt_batches(self, size: int = 7, parts=None):
        for number, (first, prompts) in enumerate(zip(self.firsts, self.segments)):
            if parts is None or number in parts:
                for low in range(0, len(prompts), 7):
                    yield first + low, prompts[low:low + 7]


def test_first_seen_answers_as_one_growing_key_set():
    """merge's dedup (FirstSeen) == a KeySet of every row read: across indexes, across an index's segments,
    inside a segment that holds duplicates, for segments with and without key files, batches across
    segment boundaries."""
    rng = np.random.default_rng(3)
    vocabulary = [f"prompt number {i}" for i in range(120)]

    def segment(size, unique=True, pool=vocabulary):
        chosen = rng.choice(len(pool), size=size, replace=not unique)
        return [pool[i].upper() if rng.random() < 0.3 else pool[i] for i in chosen]

    repeated = segment(30, unique=False, pool=[f"only here {i}" for i in range(12)])  # repeats no earlier key
    indexes = [_FakeIndex([segment(40), segment(25)], [True, True]),
               _FakeIndex([segment(50), repeated, segment(20)], [True, True, False]),
               _FakeIndex([segment(60)], [False])]
    seen, reference = FirstSeen(), KeySet()
    for index in indexes:
        seen.start(index)
        rows = [prompt for prompts in index.segments for prompt in prompts]
        low = 0
        while low < len(rows):
            high = low + int(rng.integers(1, 33))
            keys = dedup_keys(rows[low:high])
            assert seen.add_new(keys).tolist() == reference.add_new(keys).tolist()
            low = high
    assert seen.computed_rows == 80  # the two segments without a key file


@pytest.fixture()
def merge_inputs(tmp_path, tiny_clip_dir):
    """a: prompts 0-49; b: prompts 30-89 and prompt 2 in capitals (21 of a's)."""
    prompts = read_data_prompts(90)
    roots = []
    for name, rows in (("a", prompts[:50]), ("b", prompts[30:90] + [prompts[2].upper()])):
        (tmp_path / f"{name}.txt").write_text("\n".join(rows) + "\n")
        _build([tmp_path / f"{name}.txt"], tmp_path / name, tiny_clip_dir, index="flat")
        roots.append(tmp_path / name)
    return roots, prompts


def test_merge_dedups_from_the_stored_keys_without_a_growing_set(tmp_path, merge_inputs, monkeypatch):
    from tests.test_merge import _merge

    (a, b), _ = merge_inputs
    expected = _rows(a)[1] + _rows(b)[1][20:60]  # a's, then b's not in a (first index wins, input order)
    calls = []
    original = KeySet.add_new
    monkeypatch.setattr(KeySet, "add_new", lambda self, keys: calls.append(len(keys)) or original(self, keys))
    result = _merge([a, b], tmp_path / "m", None)
    assert calls == []  # no set of the merged prompts was grown
    assert [entry["duplicates"] for entry in result.report["merged"]] == [0, 21]
    assert _rows(tmp_path / "m")[1] == expected
    _strip_keys(b)  # an input written before the key files: its keys computed, the same answer
    result = _merge([a, b], tmp_path / "m2", None)
    assert [entry["duplicates"] for entry in result.report["merged"]] == [0, 21]
    assert _rows(tmp_path / "m2")[1] == expected
