"""Boundaries of build_index/add_key_pca.py's re-measure (issue 35, the mutation pass), without a CLIP model: an
add's recall@10 of the stored PCA over the grown index takes the old rows' full-width keys from re-encoding their
prompts (ids < first) and the new rows' from the add's shards (ids ≥ first), and warns below RECALL_TARGET."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from img2prompt.build_index.add_key_pca import remeasure_key_pca
from img2prompt.index.key_pca import fit_pca, grown_recall
from img2prompt.index.recall import RECALL_TARGET

FIRST, NEW, DIM = 40, 24, 16
_rng = np.random.default_rng(3)  # rank-6 keys: 1 dim loses most neighbours
KEYS = (_rng.standard_normal((FIRST + NEW, 6)) @ _rng.standard_normal((6, DIM))).astype(np.float32)


class OldIndex:
    """The index before the add: it holds ids 0..FIRST-1 only (a real index refuses other ids too)."""

    def __init__(self):
        self.asked = []

    def prompt_rows(self, ids):
        ids = [int(i) for i in ids]
        self.asked += ids
        if any(i < 0 or i >= FIRST for i in ids):
            raise IndexError(f"ids {ids} outside the old index's {FIRST} rows")
        return [f"p{i}" for i in ids]


def encode(prompts):
    return KEYS[[int(p[1:]) for p in prompts]] * 1.0


@pytest.mark.parametrize("dims", [1, 8])
def test_remeasure_uses_the_old_prompts_and_the_new_keys(dims, caplog):
    pca = fit_pca(KEYS[:FIRST], dims, seed=0)
    old = OldIndex()
    section = {"dims": dims, "recall_at_10": 0.912, "fit_rows": FIRST}
    new_keys = [KEYS[FIRST:FIRST + 10], KEYS[FIRST + 10:]]  # two segments' shards
    with caplog.at_level(logging.WARNING):
        result = remeasure_key_pca(section, pca, old, new_keys, FIRST, encode, seed=5)
    expected = grown_recall(pca, lambda ids: KEYS[ids], FIRST + NEW, np.arange(FIRST, FIRST + NEW), seed=5)
    assert result == {**section, **expected, "held_out": True, "before_add": 0.912}
    assert expected["rows"] == FIRST + NEW and expected["queries"] == NEW
    assert sorted(set(old.asked)) == list(range(FIRST))  # every old row re-encoded (≤ ADD_SAMPLE rows)
    warned = [r.getMessage() for r in caplog.records if "recall@10 of the key PCA" in r.getMessage()]
    assert len(warned) == int(expected["recall_at_10"] < RECALL_TARGET)  # one warning, only below the target
    if dims == 1:
        assert len(warned) == 1 and "(fitted on 40 rows)" in warned[0] and "--retrain" in warned[0]
        assert "it was 0.912 before this add" in warned[0]


def test_remeasure_without_a_previous_figure():
    pca = fit_pca(KEYS[:FIRST], 1, seed=0)
    result = remeasure_key_pca({"dims": 1}, pca, OldIndex(), [KEYS[FIRST:]], FIRST, encode)
    assert result["before_add"] is None and result["held_out"] is True and result["queries"] == NEW


def test_a_recall_exactly_at_the_target_is_not_warned_about(monkeypatch, caplog):
    """The warning is for recall *below* RECALL_TARGET: at the target itself the add stays quiet."""
    import img2prompt.build_index.add_key_pca as add_key_pca

    pca = fit_pca(KEYS[:FIRST], 1, seed=0)
    measured = grown_recall(pca, lambda ids: KEYS[ids], FIRST + NEW, np.arange(FIRST, FIRST + NEW))
    monkeypatch.setattr(add_key_pca, "RECALL_TARGET", measured["recall_at_10"])
    with caplog.at_level(logging.WARNING):
        result = remeasure_key_pca({"dims": 1}, pca, OldIndex(), [KEYS[FIRST:]], FIRST, encode)
    assert result["recall_at_10"] == measured["recall_at_10"]
    assert not [r for r in caplog.records if "recall@10 of the key PCA" in r.getMessage()]
    monkeypatch.setattr(add_key_pca, "RECALL_TARGET", np.nextafter(measured["recall_at_10"], 2.0))
    with caplog.at_level(logging.WARNING):
        remeasure_key_pca({"dims": 1}, pca, OldIndex(), [KEYS[FIRST:]], FIRST, encode)
    assert [r for r in caplog.records if "recall@10 of the key PCA" in r.getMessage()]


def test_the_default_seed_is_the_builds(tmp_path):
    """Seed 0 unless given, as a build measures: with more new rows than queries the sample depends on it."""
    rng = np.random.default_rng(4)
    keys = (rng.standard_normal((FIRST + 640, 6)) @ rng.standard_normal((6, DIM))).astype(np.float32)
    pca = fit_pca(keys[:FIRST], 1, seed=0)

    class Old(OldIndex):
        def prompt_rows(self, ids):
            return [f"p{int(i)}" for i in ids]

    result = remeasure_key_pca({"dims": 1}, pca, Old(), [keys[FIRST:]], FIRST,
                               lambda prompts: keys[[int(p[1:]) for p in prompts]])
    count = FIRST + 640
    seeded = [grown_recall(pca, lambda ids: keys[ids], count, np.arange(FIRST, count), seed=seed)["recall_at_10"]
              for seed in (0, 1)]
    assert seeded[0] != seeded[1] and result["recall_at_10"] == seeded[0] and result["queries"] == 500
