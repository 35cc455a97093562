"""Prompt dedup in sorted 8-byte keys (KeySet): the same answers as a set of dedup_key ints, 8 bytes a key."""
from __future__ import annotations

import numpy as np

from img2prompt.build_index.corpus import CorpusReport, iter_prompt_rows
from img2prompt.encoders.prompts import KeySet, dedup_key, dedup_keys


def test_keyset_answers_as_a_python_set():
    rng = np.random.default_rng(0)
    keys, reference = KeySet(), set()
    for size in rng.integers(1, 3000, 60):
        batch = rng.integers(0, 40_000, size).astype(np.uint64)  # many repeats, within and across batches
        expected = []
        for key in batch.tolist():
            expected.append(key not in reference)
            reference.add(key)
        assert keys.add_new(batch).tolist() == expected
    assert len(keys) == len(reference)
    probe = rng.integers(0, 50_000, 5000).astype(np.uint64)
    assert keys.contains(probe).tolist() == [int(k) in reference for k in probe]
    # structural bound: only uint64 arrays, 8 bytes a key, in O(log n) sorted runs
    assert all(run.dtype == np.uint64 and np.all(run[1:] > run[:-1])
               for run in keys.runs)
    assert keys.nbytes == 8 * len(keys) and len(keys.runs) <= 2 * np.log2(len(keys))


def test_full_64_bit_keys():
    keys = KeySet()
    big = np.array([2**64 - 1, 0, 2**63, 2**64 - 1], dtype=np.uint64)
    assert keys.add_new(big).tolist() == [True, True, True, False]
    assert keys.contains(np.array([2**63, 1], dtype=np.uint64)).tolist() == [True, False]


def test_corpus_dedup_equals_the_set_rule(tmp_path, monkeypatch):
    """Case, whitespace runs and NBSP are one prompt (normalise + casefold); kept rows, their raw row numbers
    and the counts equal a per-prompt set of dedup_key, across batch borders."""
    from img2prompt.build_index import corpus as module

    monkeypatch.setattr(module, "DEDUP_BATCH", 3)
    lines = ["A cat", "a  cat", "A\u00a0CAT", "", "dog", "Dog ", "bird", "a cat", "fish", "DOG", "ﬁsh", "Fish"]
    path = tmp_path / "c.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = CorpusReport()
    got = list(iter_prompt_rows([path], report=report))
    seen, expected = set(), []
    for row, line in enumerate(lines):
        prompt = " ".join(line.split())
        if prompt and dedup_key(prompt) not in seen:
            seen.add(dedup_key(prompt))
            expected.append((row, prompt))
    assert got == expected
    assert report.kept == len(expected) and report.skipped["duplicate"] == 12 - 1 - len(expected)


def test_known_keys_are_left_out_and_counted(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("old one\nnew one\nOLD ONE\nnew one\nnewer\n", encoding="utf-8")
    known = KeySet()
    known.add_new(dedup_keys(["old one"]))
    report = CorpusReport()
    assert [p for _, p in iter_prompt_rows([path], report=report, known=(known, "in_index"))] == ["new one", "newer"]
    assert report.kept == 2 and dict(report.skipped) == {"duplicate": 2, "in_index": 1}
