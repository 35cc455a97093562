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
from tests.fake_jobs import no_fsync  # noqa: F401 (autouse: the files are renamed into place, not flushed)

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


# -- refit_key_pca (add --retrain) on a synthetic segmented index (tests/fake_jobs.py: no CLIP model) ----------

OLD_PROMPTS = [f"old prompt {n}, oil painting" for n in range(30)]
NEW_PROMPTS = [f"new prompt {n}, sketch" for n in range(11)]


def _grown_pca_index(tmp_path, new_prompts=NEW_PROMPTS):
    """An index built with --key-dims 4 and an add's staging folder: the old rows linked, the new rows
    appended as segment 1 (through the old PCA), their full-width keys still in the add's shards."""
    from img2prompt.index.append import append_segment
    from img2prompt.index.reader import open_index
    from img2prompt.index.writer import IndexWriter, ShardTask, save_shard
    from tests.fake_jobs import clip_keys, fake_build, minilm_rows, write_lines

    fake_build(tmp_path / "old", [write_lines(tmp_path / "old.txt", OLD_PROMPTS)], key_dims=4)
    old = open_index(tmp_path / "old")
    writer = IndexWriter(tmp_path / "stage", {"add": 1})
    for number, start in enumerate(range(0, len(new_prompts), 4)):  # several shards: several blocks of keys
        part = new_prompts[start:start + 4]
        writer.commit_shard(save_shard(writer.root, ShardTask(number, start, part), clip_keys(part),
                                       minilm_rows(part)))
    appended = append_segment(writer, old)
    return writer, old, appended, list(writer.iter_shard_arrays("clip"))


def _fake_encode(prompts):
    from tests.fake_jobs import clip_keys

    return clip_keys(prompts)


def test_refit_fits_every_row_old_and_new_and_rewrites_each_segment(tmp_path):
    from img2prompt.build_index.add_key_pca import FULL_KEYS, refit_key_pca
    from img2prompt.index.key_pca import fit_keys, load_pca, reduced_recall
    from img2prompt.index.layout import CLIP_VECTORS, KEY_PCA
    from tests.fake_jobs import clip_keys

    writer, old, appended, new_keys = _grown_pca_index(tmp_path)
    assert len(new_keys) == 3  # the new rows' full-width keys come in three blocks
    old_bytes = (tmp_path / "old" / CLIP_VECTORS).read_bytes()
    section = dict(old.manifest["key_pca"])
    result, names, regrown = refit_key_pca(writer.root, appended.grown, old, new_keys, _fake_encode, section,
                                           progress=False)
    full = np.concatenate([clip_keys(OLD_PROMPTS), clip_keys(NEW_PROMPTS)]).astype(np.float16)
    pca, query_rows, fitted = fit_keys(full, 4, 0)
    assert names == [CLIP_VECTORS, f"segments/00001/{CLIP_VECTORS}", KEY_PCA]
    stored = np.asarray(regrown.clip_vectors)
    assert np.array_equal(stored, pca.project(full).astype(np.float16))  # old AND new rows through the new fit
    assert np.array_equal(load_pca(writer.root / KEY_PCA, 16, 4).components, pca.components)
    recall = reduced_recall(full, np.asarray(full[query_rows], np.float32), pca, reduced=stored)
    assert result == {**fitted, "recall_at_10": recall, "refit_at_add": True, "before_add": section["recall_at_10"]}
    assert result["fit_rows"] == 41 and result["seed"] == 0
    assert (tmp_path / "old" / CLIP_VECTORS).read_bytes() == old_bytes  # the linked old file is untouched
    assert not (writer.root / FULL_KEYS).exists()
    assert regrown.manifest == appended.grown.manifest and regrown.root == writer.root


def test_refit_without_new_rows_refits_the_old_ones(tmp_path):
    from img2prompt.build_index.add_key_pca import refit_key_pca
    from img2prompt.index.key_pca import fit_keys
    from img2prompt.index.layout import CLIP_VECTORS, KEY_PCA
    from tests.fake_jobs import clip_keys

    writer, old, appended, new_keys = _grown_pca_index(tmp_path, new_prompts=[])
    assert new_keys == [] and appended.grown.count == 30
    result, names, regrown = refit_key_pca(writer.root, appended.grown, old, new_keys, _fake_encode,
                                           dict(old.manifest["key_pca"]), progress=False)
    pca, _, _ = fit_keys(clip_keys(OLD_PROMPTS).astype(np.float16), 4, 0)
    assert names == [CLIP_VECTORS, KEY_PCA] and result["fit_rows"] == 30
    assert np.array_equal(np.asarray(regrown.clip_vectors),
                          pca.project(clip_keys(OLD_PROMPTS).astype(np.float16)).astype(np.float16))


def test_refit_defaults_a_bar_and_seed_0_and_logs_the_previous_recall(tmp_path, monkeypatch, caplog):
    import img2prompt.build_index.add_key_pca as add_key_pca

    writer, old, appended, new_keys = _grown_pca_index(tmp_path)
    bars = []

    class Bar:
        def __init__(self, **kwargs):
            self.kwargs, self.n = kwargs, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.n += n

    monkeypatch.setattr(add_key_pca, "progress_bar", Bar)
    section = {"dims": 4, "recall_at_10": 0.5}  # no seed recorded: the build's default, 0
    with caplog.at_level(logging.INFO, logger="img2prompt.build_index.add_key_pca"):
        result, _, _ = add_key_pca.refit_key_pca(writer.root, appended.grown, old, new_keys, _fake_encode, section)
    (bar,) = bars
    assert bar.kwargs["enabled"] is True and bar.kwargs["total"] == 30 and bar.n == 30  # the old prompts
    assert result["seed"] == 0 and result["before_add"] == 0.5
    (message,) = [r.getMessage() for r in caplog.records if "refitted" in r.getMessage()]
    assert message == f"key PCA refitted over 41 rows: recall@10 vs full width {result['recall_at_10']:.3f} (it was 0.500)"


def test_refit_logs_nan_without_a_previous_recall(tmp_path, caplog):
    from img2prompt.build_index.add_key_pca import refit_key_pca

    writer, old, appended, new_keys = _grown_pca_index(tmp_path)
    with caplog.at_level(logging.INFO, logger="img2prompt.build_index.add_key_pca"):
        result, _, _ = refit_key_pca(writer.root, appended.grown, old, new_keys, _fake_encode, {"dims": 4, "seed": 0},
                                     progress=False)
    assert result["before_add"] is None
    assert any(r.getMessage().endswith("(it was nan)") for r in caplog.records)


def test_a_failed_refit_removes_its_temp_file_and_raises_the_encoder_s_error(tmp_path):
    """The encoder's error reaches the user, even when the temp file is already gone: the cleanup never masks
    it (and never leaves the full-width keys beside the index)."""
    from img2prompt.build_index.add_key_pca import FULL_KEYS, refit_key_pca

    writer, old, appended, new_keys = _grown_pca_index(tmp_path)
    before = sorted(path.name for path in writer.root.iterdir())

    def failing(prompts):
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        refit_key_pca(writer.root, appended.grown, old, new_keys, failing, {"dims": 4}, progress=False)
    assert not (writer.root / FULL_KEYS).exists()
    assert sorted(path.name for path in writer.root.iterdir()) == before

    def gone_then_failing(prompts):
        (writer.root / FULL_KEYS).unlink()
        raise RuntimeError("encoder failed after the temp file went")

    with pytest.raises(RuntimeError, match="after the temp file went"):
        refit_key_pca(writer.root, appended.grown, old, new_keys, gone_then_failing, {"dims": 4}, progress=False)
