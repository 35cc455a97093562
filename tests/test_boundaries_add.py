"""Boundaries of build_index/add.py (issue 35, the mutation pass), without a CLIP model: the real build and add
jobs run with fake models (tests/fake_jobs.py: vectors fixed by each prompt's text), so an add can be compared
row for row with a build of everything, and each promise is checked at its edge: the refusals (one line,
naming the file or both models), dedup against the index's stored keys (first wins, counted), nothing new
(the index left as it was), near-dup against the index's text rows, the grown search range and the ranges of
new rows, the recall warning below the target only, calibration, the regression head, phrases and the commit."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from img2prompt.build_index import add
from img2prompt.build_index.add import (SKIP_IN_INDEX, AddJob, check_add_options, check_index, check_models,
                                        describe, manifest_clip_models)
from img2prompt.build_index.corpus import file_fingerprint
from img2prompt.build_index.options import AddOptions
from img2prompt.errors import UserError
from img2prompt.index.layout import MANIFEST, REGRESSION_STATS
from img2prompt.index.reader import open_index
from tests.fake_jobs import (CLIP_IDENTITY, CLIP_NAME, TEXT_IDENTITY, AddRun, clip_keys, fake_add, fake_build,
                             image_keys, minilm_rows, write_lines, write_pairs)
from tests.fake_jobs import no_fsync  # noqa: F401 (autouse: the files are renamed into place, not flushed)

SUBJECTS = "castle river dragon robot forest harbour lighthouse city portrait".split()
STYLES = ["oil painting", "sketch", "by anna", "trending on artstation"]


def prompts(low: int, high: int) -> list[str]:
    """Prompts whose four styles each reach the phrase threshold (5) within 40 rows; from row 40 on, every
    5th also says "watercolor" (a phrase only the new rows hold)."""
    return [f"{SUBJECTS[i % 9]} number {i}, {STYLES[i % 4]}" + (", watercolor" if i >= 40 and i % 5 == 0 else "")
            for i in range(low, high)]


OLD, NEW = prompts(0, 40), prompts(40, 70)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("add-corpus")
    # the new file: 30 new prompts, two of the index's again (other case / spacing: duplicates of the index),
    # one of its own again (a duplicate within the file: first wins) and a blank line
    new = NEW[:10] + [OLD[3].upper(), "", "  " + OLD[5] + "  ", NEW[2]] + NEW[10:]
    return SimpleNamespace(old=write_lines(folder / "old.txt", OLD), new=write_lines(folder / "new.txt", new),
                           all=write_lines(folder / "all.txt", OLD + NEW), folder=folder)


def rows(index) -> tuple:
    opened = open_index(index, verify=True)
    return opened.prompts, np.asarray(opened.clip_vectors), np.asarray(opened.minilm), opened


# -- the refusals ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory, files):
    """A text index (read only here) and one with image keys."""
    folder = tmp_path_factory.mktemp("built")
    fake_build(folder / "text", [files.old])
    pairs = write_pairs(folder / "pairs.csv", [("a.png", "a castle at dawn"), ("b.png", "a ship at night")])
    fake_build(folder / "pairs", [files.old], pairs=[pairs])
    return folder


@pytest.mark.parametrize("shard_size, batch_size, near_dup, refused", [
    (0, 8, None, "--shard-size and --batch-size must be positive"),
    (8, 0, None, "--shard-size and --batch-size must be positive"),
    (-1, 8, None, "--shard-size and --batch-size must be positive"),
    (1, 1, None, None),
    (8, 8, 0.0, r"--near-dup must be in \(0, 1\] \(got 0.0\)"),
    (8, 8, -0.5, r"--near-dup must be in \(0, 1\] \(got -0.5\)"),
    (8, 8, 1.0000001, r"--near-dup must be in \(0, 1\] \(got 1.0000001\)"),
    (8, 8, 1.5, r"--near-dup must be in \(0, 1\]"),
    (8, 8, 1.0, None),  # inclusive at 1
    (8, 8, 1e-9, None),
    (8, 8, 0.5, None),
])
def test_the_numbers_are_refused_at_their_boundaries(built, shard_size, batch_size, near_dup, refused):
    options = AddOptions(index=str(built / "text"), corpus=[], shard_size=shard_size, batch_size=batch_size,
                         near_dup=near_dup)
    if refused:
        with pytest.raises(UserError, match=refused):
            check_add_options(options)
    else:
        assert check_add_options(options) == json.loads((built / "text" / MANIFEST).read_text())


def test_check_index_refuses_what_is_not_a_complete_index(built, tmp_path):
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'none'))}: not a complete index"):
        check_index(tmp_path / "none")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a complete index"):
        check_index(tmp_path / "file")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(built / "text", unfinished)
    manifest = json.loads((unfinished / MANIFEST).read_text())
    (unfinished / MANIFEST).write_text(json.dumps({**manifest, "state": "building"}))
    with pytest.raises(UserError, match=f"^{re.escape(str(unfinished))}: not a complete index"):
        check_index(unfinished)
    del manifest["count"]
    (unfinished / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"manifest is damaged \(missing or invalid: count"):
        check_index(unfinished)


def test_check_index_image_keys(built):
    text = json.loads((built / "text" / MANIFEST).read_text())
    with_images = json.loads((built / "pairs" / MANIFEST).read_text())
    assert check_index(built / "text") == text
    assert check_index(built / "text", "merge", image_keys=False) == text
    assert check_index(built / "pairs") == with_images  # an add takes image keys
    with pytest.raises(UserError, match=f"^{re.escape(str(built / 'pairs'))}: merge an index with image-keyed entries"):
        check_index(built / "pairs", "merge", image_keys=False)
    with pytest.raises(UserError, match="add to an index with image-keyed entries .* not supported yet: rebuild"):
        check_index(built / "pairs", image_keys=False)


def test_describe_names_a_model_and_its_short_sha256():
    assert describe({"name": "ViT-B-32", "sha256": "0123456789abcdef"}) == "ViT-B-32 (sha256 0123456789ab)"
    assert describe({"name": "m", "weights_sha256": "fedcba9876543210"}) == "m (sha256 fedcba987654)"
    assert describe({"name": "m", "sha256": "", "weights_sha256": "aa"}) == "m (sha256 aa)"
    assert describe({"sha256": "12"}) == "? (sha256 12)"
    assert describe({"name": "m"}) == "m"
    assert describe("plain") == "plain"


def test_check_models_names_both_identities_for_either_model(tmp_path):
    manifest = {"models": {"clip": CLIP_IDENTITY, "text": TEXT_IDENTITY}}
    check_models(tmp_path, manifest, {"clip": dict(CLIP_IDENTITY), "text": dict(TEXT_IDENTITY)})  # the same
    other = {**TEXT_IDENTITY, "sha256": "9" * 64}
    with pytest.raises(UserError) as refused:
        check_models(tmp_path, manifest, {"clip": CLIP_IDENTITY, "text": other})
    assert str(refused.value) == (f"{tmp_path}: the index was built with text model fake-minilm (sha256 dddddddddddd), "
                                  "but fake-minilm (sha256 999999999999) was given: add needs the index's own models")
    with pytest.raises(UserError, match="built with clip model fake-clip .* but x was given"):
        check_models(tmp_path, manifest, {"clip": "x", "text": TEXT_IDENTITY})


def test_manifest_clip_models_one_model_or_each_member():
    assert manifest_clip_models({"models": {"clip": {"name": "a", "pretrained": "openai"}}}) == \
        {"clip_model": ["a"], "clip_pretrained": ["openai"]}
    assert manifest_clip_models({"models": {"clip": {"name": "e", "members": [{"name": "a"}, {
        "name": "b", "pretrained": "laion"}]}}}) == {"clip_model": ["a", "b"], "clip_pretrained": [None, "laion"]}


def test_the_index_s_own_models_in_its_precision_are_loaded(tmp_path, files):
    fake_build(tmp_path / "idx", [files.old])
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    assert manifest["build"]["precision"] == "fp32"
    run = AddRun()
    fake_add(tmp_path / "idx", [files.new], run=run)
    assert run.loaded == [([CLIP_NAME], [None], "fp32")]  # as the manifest names it, in the build's precision


@pytest.mark.parametrize("model", ["clip", "text"])
def test_another_model_is_refused_before_anything_is_encoded(tmp_path, files, model):
    fake_build(tmp_path / "idx", [files.old])
    before = sorted((path.name, path.read_bytes()) for path in (tmp_path / "idx").iterdir() if path.is_file())
    run = AddRun()
    with pytest.raises(UserError, match=f"built with {model} model .* add needs the index's own models"):
        if model == "clip":
            fake_add(tmp_path / "idx", [files.new], run=run, clip_model="other-clip")
        else:
            fake_add(tmp_path / "idx", [files.new], run=run, text_identity={**TEXT_IDENTITY, "sha256": "9" * 64})
    assert run.engine.tasks == []
    assert sorted((path.name, path.read_bytes()) for path in (tmp_path / "idx").iterdir() if path.is_file()) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["idx"]


def test_nothing_to_add_unless_a_retrain(tmp_path, files):
    fake_build(tmp_path / "idx", [files.old])
    with pytest.raises(UserError, match="^nothing to add: give corpus files, --pairs files, or both$"):
        fake_add(tmp_path / "idx", [])
    assert fake_add(tmp_path / "idx", [], retrain=True).manifest["count"] == 40
    pairs = write_pairs(tmp_path / "p.csv", [("x.png", "a new ship")])
    assert fake_add(tmp_path / "idx", [], pairs=[pairs]).manifest["count"] == 41


def test_pairs_on_a_key_dims_index_are_refused_before_loading(tmp_path, files):
    fake_build(tmp_path / "idx", [files.old], key_dims=4)
    pairs = write_pairs(tmp_path / "p.csv", [("x.png", "a new ship")])
    run = AddRun()
    with pytest.raises(UserError, match=f"^{re.escape(os.path.realpath(tmp_path / 'idx'))}: --pairs on an index "
                                        "built with --key-dims"):
        fake_add(tmp_path / "idx", [files.new], pairs=[pairs], run=run)
    assert run.loaded == []
    assert fake_add(tmp_path / "idx", [files.new]).manifest["count"] == 70  # text to it is fine


def test_a_corpus_without_its_column_is_refused_before_loading(tmp_path, files):
    fake_build(tmp_path / "idx", [files.old])
    table = tmp_path / "new.csv"
    table.write_text("text\na prompt\n")
    run = AddRun()
    with pytest.raises(UserError, match="new.csv"):
        fake_add(tmp_path / "idx", [table], run=run)
    assert run.loaded == []


def test_a_damaged_regression_stats_is_refused_before_loading(tmp_path, files):
    fake_build(tmp_path / "idx", [files.old])
    stats = tmp_path / "idx" / REGRESSION_STATS
    stats.write_bytes(b"x" * stats.stat().st_size)  # the recorded size, not a zip
    run = AddRun()
    with pytest.raises(UserError, match=f"^{re.escape(os.path.realpath(stats))}: not readable"):
        fake_add(tmp_path / "idx", [files.new], run=run)
    assert run.loaded == []


# -- what an add writes -----------------------------------------------------------------------------------

def test_build_then_add_equals_building_it_all(tmp_path, files, caplog):
    fake_build(tmp_path / "all", [files.all])
    fake_build(tmp_path / "grown", [files.old])
    old_manifest = json.loads((tmp_path / "grown" / MANIFEST).read_text())
    run = AddRun()
    result = fake_add(tmp_path / "grown", [files.new], run=run)
    prompts_all, clip_all, minilm_all, full = rows(tmp_path / "all")
    prompts_grown, clip_grown, minilm_grown, grown = rows(tmp_path / "grown")
    assert prompts_grown == prompts_all == OLD + NEW
    assert np.array_equal(clip_grown, clip_all) and np.array_equal(minilm_grown, minilm_all)
    ids = [i for part in grown.segments for i in pq.read_table(tmp_path / "grown" / part.name("prompts.parquet"))
           .column("id").to_pylist()]
    assert ids == list(range(70))
    assert np.allclose(grown.minilm_mean, full.minilm_mean, atol=1e-6)
    # the report: 30 added, the index's 2 prompts skipped as its duplicates, the file's own repeat and blank
    assert result.report["added"] == 30 and result.report["kept"] == 30 and result.report["read"] == 34
    assert result.report["skipped"] == {SKIP_IN_INDEX: 2, "duplicate": 1, "empty": 1}
    manifest = result.manifest
    (entry,) = manifest["history"]
    assert {key: value for key, value in entry.items() if key != "added_at"} == {
        "count": 30, "duplicates_of_index": 2, "files": [str(files.new)], "count_before": 40}
    assert manifest["count"] == 70 and manifest["segments"] == [{"number": 1, "first_id": 40, "count": 30}]
    assert [(r["keys"], r["rows"]) for r in manifest["key_ranges"]] == [("text", [0, 70])]
    assert manifest["search"] == manifest["key_ranges"][0]["search"] and manifest["search"]["kind"] == "flat"
    assert "before_add" not in manifest["search"]["recall_at_10"]  # a flat range is not measured again
    # carried from the index: models, metric, the build options, the corpus report of the build
    for key in ("models", "metric", "build_options", "corpus"):
        assert manifest[key] == old_manifest[key], key
    assert manifest["rates"]["encoded_now"] == 30 and manifest["memory"]["peak_rss_mib_at_end"] > 0
    assert json.loads((tmp_path / "grown" / MANIFEST).read_text()) == manifest  # what was committed
    assert manifest["build"]["corpus"] == [file_fingerprint(files.new)] and "pairs" not in manifest["build"]
    # the regression head from the kept sums + the new rows is the one fitted on every row
    assert grown.regression_head.rows == full.regression_head.rows == {"text": 70}
    assert np.allclose(grown.regression_head.weights, full.regression_head.weights, atol=1e-5)
    assert manifest["regression"]["rows"] == {"text": 70}
    # the phrase vocabulary: the same counts as mined from every prompt; only the new phrase encoded
    assert pq.read_table(tmp_path / "grown" / "phrases.parquet").to_pydict() == \
        pq.read_table(tmp_path / "all" / "phrases.parquet").to_pydict()
    assert np.array_equal(grown.phrases[1], full.phrases[1])
    assert run.clip.encoded == ["watercolor"]
    assert manifest["phrases"] == {"count": 5, "min_count": 5, "merged": True}

    more = write_lines(tmp_path / "more.txt", ["a red fox in snow, photo", "a lighthouse in a storm"])
    result = fake_add(tmp_path / "grown", [more])
    assert result.manifest["segments"] == [{"number": 1, "first_id": 40, "count": 30},
                                           {"number": 2, "first_id": 70, "count": 2}]
    assert [entry["count_before"] for entry in result.manifest["history"]] == [40, 70]
    assert open_index(tmp_path / "grown", verify=True).prompt_rows([71, 40, 0]) == \
        ["a lighthouse in a storm", NEW[0], OLD[0]]


def test_one_new_prompt_is_added(tmp_path, files):
    fake_build(tmp_path / "idx", [files.old])
    result = fake_add(tmp_path / "idx", [write_lines(tmp_path / "one.txt", [OLD[1], "the one new prompt"])])
    assert result.report["added"] == 1 and result.manifest["count"] == 41
    assert open_index(tmp_path / "idx").prompt_rows([40]) == ["the one new prompt"]


def _snapshot(folder) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("lines, already", [(OLD, 40), (["", "   "], 0)])
def test_nothing_new_leaves_the_index_as_it_was(tmp_path, files, caplog, lines, already):
    fake_build(tmp_path / "idx", [files.old])
    before = _snapshot(tmp_path / "idx")
    corpus = write_lines(tmp_path / "corpus.txt", lines)
    with caplog.at_level(logging.INFO, logger="img2prompt.build_index.add"):
        result = fake_add(tmp_path / "idx", [corpus])
    assert result.report["added"] == 0 and result.report["skipped"].get(SKIP_IN_INDEX, 0) == already
    assert result.manifest == json.loads(before[MANIFEST])
    assert _snapshot(tmp_path / "idx") == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.txt", "idx"]  # no staging folder left
    assert [r.getMessage() for r in caplog.records if "nothing new" in r.getMessage()] == [
        f"{os.path.realpath(tmp_path / 'idx')}: nothing new to add ({already} prompts already in the index)"]


def test_a_retrain_with_nothing_new_still_runs(tmp_path, files):
    fake_build(tmp_path / "idx", [files.old], index="hnsw")
    result = fake_add(tmp_path / "idx", [files.old], retrain=True)
    assert result.report["added"] == 0
    (entry,) = result.manifest["history"]
    assert entry["retrained"] is True and entry["count"] == 0 and entry["duplicates_of_index"] == 40
    assert result.manifest["count"] == 40 and result.manifest.get("segments", []) == []
    assert [(r["keys"], r["rows"]) for r in result.manifest["key_ranges"]] == [("text", [0, 40])]
    assert "before_add" not in result.manifest["search"]["recall_at_10"]  # rebuilt, measured as a build
    index = open_index(tmp_path / "idx", verify=True)
    hit = index.open_backend("cpu").search(np.asarray(index.clip_vectors[[17]], np.float32), 1)[1]
    assert hit.tolist() == [[17]]


def test_an_add_without_retrain_records_no_retrain(tmp_path, files):
    fake_build(tmp_path / "idx", [files.old])
    (entry,) = fake_add(tmp_path / "idx", [files.new]).manifest["history"]
    assert "retrained" not in entry


def test_the_index_is_grown_through_a_symlink_which_stays_one(tmp_path, files):
    fake_build(tmp_path / "real", [files.old])
    (tmp_path / "link").symlink_to(tmp_path / "real")
    fake_add(tmp_path / "link", [files.new])
    assert (tmp_path / "link").is_symlink() and open_index(tmp_path / "real").count == 70


# -- near-dup against the index ------------------------------------------------------------------------------

def test_near_dup_drops_new_prompts_near_the_index_s_text_rows_or_each_other(tmp_path, files):
    pairs = write_pairs(tmp_path / "pairs.csv", [("a.png", "a castle at dawn")])
    fake_build(tmp_path / "idx", [files.old], pairs=[pairs])
    cosine = float(minilm_rows([OLD[3]])[0] @ minilm_rows([OLD[3] + " ~ 1"])[0])
    assert 0.99 < cosine < 1
    new = [OLD[3] + " ~ 1", "a fresh harbour", "a fresh harbour ~ 2", "a robot playing chess",
           "a castle at dawn ~ 3"]  # the last is near an image-keyed row only: those are not compared
    result = fake_add(tmp_path / "idx", [write_lines(tmp_path / "new.txt", new)], near_dup=0.97, shard_size=2)
    assert result.report["added"] == 3 and result.report["kept"] == 3
    assert result.report["skipped"]["near_duplicate"] == 2
    (entry,) = result.manifest["history"]
    assert entry["count"] == 3 and entry["near_dup"]["dropped"] == 2 and entry["near_dup"]["threshold"] == 0.97
    assert entry["duplicates_of_index"] == 0  # none: counted as 0
    index = open_index(tmp_path / "idx", verify=True)
    assert index.prompt_rows(range(41, 44)) == ["a fresh harbour", "a robot playing chess", "a castle at dawn ~ 3"]
    assert [(r.keys, r.start, r.stop) for r in index.key_ranges] == [("text", 0, 40), ("image", 40, 41),
                                                                      ("text", 41, 44)]


# -- the search ranges ----------------------------------------------------------------------------------

class Bars:
    """add.progress_bar stand-in: records each bar's arguments and its updates."""

    def __init__(self):
        self.made = []

    def __call__(self, **kwargs):
        bars = self

        class Bar:
            def __init__(self):
                self.n = 0
                bars.made.append((kwargs, self))

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                self.n += n

        return Bar()


@pytest.mark.parametrize("progress", [False, True])
def test_an_hnsw_range_grows_through_its_structure_and_is_measured_again(tmp_path, files, monkeypatch, progress):
    import faiss

    fake_build(tmp_path / "idx", [files.old], index="hnsw")
    built = json.loads((tmp_path / "idx" / MANIFEST).read_text())["search"]
    bars = Bars()
    monkeypatch.setattr(add, "progress_bar", bars)
    manifest = fake_add(tmp_path / "idx", [files.new], progress=progress).manifest
    ((kwargs, bar),) = bars.made
    assert kwargs == {"enabled": progress, "total": 30, "unit": "vec", "desc": "add to hnsw"} and bar.n == 30
    plan = manifest["search"]
    assert plan["kind"] == "hnsw" and plan["recall_at_10"]["before_add"] == built["recall_at_10"]["recall"]
    assert plan["recall_at_10"]["recall"] == 1.0 and plan["params"] == built["params"]
    assert faiss.read_index(str(tmp_path / "idx" / "clip.faiss")).ntotal == 70
    assert "clip.faiss" in manifest["files"]
    index = open_index(tmp_path / "idx", verify=True)
    hit = index.open_backend("cpu").search(clip_keys([NEW[5]]), 1)[1]
    assert hit.tolist() == [[45]]


def test_a_flat_range_shows_no_bar(tmp_path, files, monkeypatch):
    fake_build(tmp_path / "idx", [files.old])
    bars = Bars()
    monkeypatch.setattr(add, "progress_bar", bars)
    fake_add(tmp_path / "idx", [files.new], progress=True)
    ((kwargs, bar),) = bars.made
    assert kwargs["enabled"] is False and kwargs["total"] == 30


def test_the_grown_recall_warns_only_below_the_target(tmp_path, files, monkeypatch, caplog):
    fake_build(tmp_path / "idx", [files.old], index="hnsw", seed=3)
    built = json.loads((tmp_path / "idx" / MANIFEST).read_text())["search"]["recall_at_10"]["recall"]
    calls = []

    def measure(backend, *, queries, seed, target):
        calls.append((backend.count, queries, seed, target))
        return {"recall": 0.9, "k": 10, "queries": queries}

    monkeypatch.setattr(add, "measure_recall", measure)
    monkeypatch.setattr(add, "RECALL_TARGET", 0.9)
    with caplog.at_level(logging.WARNING, logger="img2prompt.build_index.add"):
        manifest = fake_add(tmp_path / "idx", [files.new]).manifest
    assert calls == [(70, 1000, 3, 0.9)]  # the build's seed, the default query count, over the grown rows
    assert manifest["search"]["recall_at_10"] == {"recall": 0.9, "k": 10, "queries": 1000, "before_add": built}
    assert not [r for r in caplog.records if "grown" in r.getMessage()]  # at the target: quiet
    monkeypatch.setattr(add, "RECALL_TARGET", np.nextafter(0.9, 1.0))
    with caplog.at_level(logging.WARNING, logger="img2prompt.build_index.add"):
        fake_add(tmp_path / "idx", [write_lines(tmp_path / "more.txt", ["another new prompt"])])
    (warning,) = [r.getMessage() for r in caplog.records if "grown" in r.getMessage()]
    assert warning == (f"recall@10 of the grown hnsw index is 0.900 (< 0.90; it was 0.900 when built): add again "
                       "with --retrain to rebuild the structure over every row")


def test_the_warning_without_a_previous_figure(tmp_path, files, monkeypatch, caplog):
    fake_build(tmp_path / "idx", [files.old], index="hnsw")
    manifest_path = tmp_path / "idx" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for section in (manifest["search"], manifest["key_ranges"][0]["search"]):
        del section["recall_at_10"]
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.setattr(add, "RECALL_TARGET", 1.01)
    with caplog.at_level(logging.WARNING, logger="img2prompt.build_index.add"):
        result = fake_add(tmp_path / "idx", [files.new]).manifest
    assert result["search"]["recall_at_10"]["before_add"] is None
    (warning,) = [r.getMessage() for r in caplog.records if "grown" in r.getMessage()]
    assert "when built" not in warning and "(< 1.01)" in warning


def test_pairs_added_to_a_text_index_get_a_range_and_the_calibration_a_build_fits(tmp_path, files):
    table = [(f"img{n}.png", f"a new image prompt {n}, photo") for n in range(5)]
    pairs = write_pairs(tmp_path / "pairs.csv", table)
    fake_build(tmp_path / "all", [files.all], pairs=[pairs])
    fake_build(tmp_path / "idx", [files.old])
    result = fake_add(tmp_path / "idx", [files.new], pairs=[pairs])
    index, full = open_index(tmp_path / "idx", verify=True), open_index(tmp_path / "all")
    assert [(r.keys, r.start, r.stop, r.folder) for r in index.key_ranges] == [
        ("text", 0, 70, ""), ("image", 70, 75, "segments/00001/image_keys")]
    assert index.prompts == full.prompts and np.array_equal(np.asarray(index.clip_vectors),
                                                            np.asarray(full.clip_vectors))
    assert np.array_equal(np.asarray(index.clip_vectors[70:]), image_keys([image for image, _ in table])
                          .astype(np.float16))
    assert result.manifest["calibration"] == full.manifest["calibration"]
    # the resume key (the manifest's "build") holds the pairs tables' fingerprints, as a build's does
    assert result.manifest["build"]["pairs"] == [file_fingerprint(pairs)] == full.manifest["build"]["pairs"]
    ranges = result.manifest["key_ranges"]
    assert result.manifest["search"] == ranges[0]["search"] != ranges[-1]["search"]  # the text range's
    assert index.regression_head.rows == full.regression_head.rows == {"text": 70, "image": 5}
    assert np.allclose(index.regression_head.weights, full.regression_head.weights, atol=1e-5)
    assert result.manifest["history"][-1]["count"] == 35


def test_a_text_add_fits_no_calibration(tmp_path, files):
    fake_build(tmp_path / "idx", [files.old])
    assert "calibration" not in fake_add(tmp_path / "idx", [files.new]).manifest


def test_an_index_with_image_keys_keeps_its_ranges_files_and_calibration(tmp_path, files):
    first = write_pairs(tmp_path / "first.csv", [(f"a{n}.png", f"old image prompt {n}") for n in range(4)])
    later = write_pairs(tmp_path / "later.csv", [(f"b{n}.png", f"new image prompt {n}") for n in range(3)])
    fake_build(tmp_path / "idx", [files.old], pairs=[first], index="hnsw")
    before = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    result = fake_add(tmp_path / "idx", [files.new], pairs=[later])
    manifest = result.manifest
    assert [(r["keys"], r["rows"], r["folder"]) for r in manifest["key_ranges"]] == [
        ("text", [0, 40], ""), ("image", [40, 44], "image_keys"), ("text", [44, 74], "segments/00001"),
        ("image", [74, 77], "segments/00001/image_keys")]
    assert manifest["search"] == manifest["key_ranges"][0]["search"] != manifest["key_ranges"][-1]["search"]
    assert manifest["key_ranges"][:2] == before["key_ranges"]
    assert manifest["calibration"] == before["calibration"]
    for name in ("clip.faiss", "image_keys/clip.faiss"):  # the old ranges' structures, linked in unchanged
        assert manifest["files"][name] == before["files"][name]
    assert "segments/00001/clip.faiss" in manifest["files"]
    index = open_index(tmp_path / "idx", verify=True)
    assert index.regression_head.rows == {"text": 70, "image": 7}
    for row, key in ((41, image_keys(["a1.png"])), (60, clip_keys([NEW[16]])), (76, image_keys(["b2.png"]))):
        (key_range,) = [r for r in index.key_ranges if r.start <= row < r.stop]
        found = index.open_backend("cpu", key_range).search(key, 1)[1]
        assert int(found[0, 0]) + key_range.start == row


@pytest.mark.parametrize("keys", ["text", "image"])
@pytest.mark.parametrize("new_rows, kind", [(2, "flat"), (3, "hnsw")])
def test_new_ranges_too_small_for_the_index_kind_are_planned_by_size(tmp_path, files, monkeypatch, new_rows, kind,
                                                                     keys):
    from img2prompt.index.hnsw import HnswBackend

    first = write_pairs(tmp_path / "first.csv", [(f"a{n}.png", f"old image prompt {n}") for n in range(4)])
    fake_build(tmp_path / "idx", [files.old], pairs=[first], index="hnsw")
    monkeypatch.setattr(HnswBackend, "min_count", 3)  # at least 3 rows: exactly 3 is enough
    if keys == "image":
        later = write_pairs(tmp_path / "later.csv", [(f"b{n}.png", f"new image prompt {n}") for n in range(new_rows)])
        manifest = fake_add(tmp_path / "idx", [], pairs=[later]).manifest
    else:  # new text rows of an index with image keys: a range of their own, planned here (not by the build step)
        manifest = fake_add(tmp_path / "idx", [write_lines(tmp_path / "new.txt", NEW[:new_rows])]).manifest
    assert [(r["keys"], r["rows"], r["search"]["kind"]) for r in manifest["key_ranges"]] == [
        ("text", [0, 40], "hnsw"), ("image", [40, 44], "hnsw"), (keys, [44, 44 + new_rows], kind)]


# -- regression head, phrases ------------------------------------------------------------------------------

def test_the_head_is_refitted_in_chunks_from_the_kept_sums(tmp_path, files, monkeypatch):
    fake_build(tmp_path / "all", [files.all])
    fake_build(tmp_path / "idx", [files.old])
    monkeypatch.setattr(add, "CHUNK", 7)  # the new rows read 7 at a time: 30 = 4 × 7 + 2
    fake_add(tmp_path / "idx", [files.new])
    grown, full = open_index(tmp_path / "idx").regression_head, open_index(tmp_path / "all").regression_head
    assert grown.rows == full.rows == {"text": 70}
    assert np.allclose(grown.weights, full.weights, atol=1e-5)
    assert np.allclose(grown.key_means["text"], full.key_means["text"], atol=1e-6)


def test_an_index_without_kept_sums_is_refitted_over_every_row(tmp_path, files, caplog):
    fake_build(tmp_path / "all", [files.all])
    fake_build(tmp_path / "idx", [files.old])
    manifest_path = tmp_path / "idx" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"][REGRESSION_STATS]  # as an index built before the sums were kept
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "idx" / REGRESSION_STATS).unlink()
    with caplog.at_level(logging.INFO, logger="img2prompt.build_index.add"):
        fake_add(tmp_path / "idx", [files.new])
    assert any("predates kept regression statistics" in r.getMessage() for r in caplog.records)
    grown, full = open_index(tmp_path / "idx"), open_index(tmp_path / "all")
    assert grown.regression_head.rows == full.regression_head.rows == {"text": 70}
    assert np.allclose(grown.regression_head.weights, full.regression_head.weights, atol=1e-5)
    assert REGRESSION_STATS in grown.manifest["files"]  # kept from now on


def test_phrases_use_the_index_s_threshold_and_encode_only_new_ones(tmp_path):
    old = write_lines(tmp_path / "old.txt", [f"castle {n}, oil painting, by anna" for n in range(3)] + ["tree, sketch"])
    new = write_lines(tmp_path / "new.txt", [f"river {n}, oil painting, sketch" for n in range(2)] + ["hill, moss"])
    fake_build(tmp_path / "idx", [old], phrase_min_count=2)
    before = open_index(tmp_path / "idx").phrases
    assert before[0] == ["by anna", "oil painting"]  # "sketch" (1 prompt) is below the threshold
    run = AddRun()
    manifest = fake_add(tmp_path / "idx", [new], run=run).manifest
    phrases, vectors = open_index(tmp_path / "idx", verify=True).phrases
    counts = dict(zip(phrases, pq.read_table(tmp_path / "idx" / "phrases.parquet").column("count").to_pylist()))
    assert counts == {"oil painting": 5, "by anna": 3, "sketch": 2}  # at the threshold 2: in; "moss" (1): out
    assert run.clip.encoded == ["sketch"]
    assert np.array_equal(vectors[phrases.index("by anna")], before[1][before[0].index("by anna")])
    assert np.array_equal(vectors[phrases.index("sketch")], clip_keys(["sketch"])[0].astype(np.float16))
    assert manifest["phrases"] == {"count": 3, "min_count": 2, "merged": True}


def test_phrases_default_threshold_and_an_empty_vocabulary(tmp_path):
    old = write_lines(tmp_path / "old.txt", [f"castle {n}" for n in range(4)])
    fake_build(tmp_path / "idx", [old])
    manifest_path = tmp_path / "idx" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert manifest["phrases"]["count"] == 0
    del manifest["phrases"]["min_count"]  # an older index: the default threshold (5)
    manifest_path.write_text(json.dumps(manifest))
    new = [f"river {n}, moss" for n in range(4)]
    run = AddRun()
    result = fake_add(tmp_path / "idx", [write_lines(tmp_path / "new.txt", new)], run=run)
    assert result.manifest["phrases"] == {"count": 0, "min_count": 5, "merged": True} and run.clip.encoded == []
    assert open_index(tmp_path / "idx", verify=True).phrases[0] == []
    # moss's 4 uses were never stored (below the threshold): the count starts again from the new prompts
    result = fake_add(tmp_path / "idx", [write_lines(tmp_path / "more.txt", ["hill, moss"])], run=run)
    assert result.manifest["phrases"]["count"] == 0 and run.clip.encoded == []
    more = [f"hill {n}, moss" for n in range(1, 6)]
    result = fake_add(tmp_path / "idx", [write_lines(tmp_path / "five.txt", more)], run=run)
    assert result.manifest["phrases"]["count"] == 1 and run.clip.encoded == ["moss"]


# -- the steps ------------------------------------------------------------------------------------------------

def _steps(manifest: dict, **options) -> list[str]:
    from img2prompt.build_index.job import JobContext
    from img2prompt.build_index.options import BuildOptions

    build = BuildOptions(corpus=[], out="out", clip_model="clip", **options)
    old = SimpleNamespace(manifest=manifest)
    job = AddJob(JobContext(build, *(None,) * 4, models={}, device="cpu", timer=None), old=old)
    assert job.retrain is False and job.appended is None  # unless asked
    return [name for name, _ in job.steps()]


def test_the_steps_follow_the_index_and_the_options():
    bare = {"files": {}}
    assert _steps(bare) == ["encode", "nothing_new", "append", "search", "calibration"]
    assert _steps(bare, near_dup=0.9) == ["encode", "near_dup", "nothing_new", "append", "search", "calibration"]
    full = {"files": {"regression.npz": {}, "phrases.parquet": {}}, "key_pca": {}}
    assert _steps(full) == ["encode", "nothing_new", "append", "key_pca", "search", "calibration", "regression",
                            "phrases"]


# -- an index built with --key-dims ------------------------------------------------------------------------

def test_an_add_to_a_key_dims_index_measures_its_pca_again(tmp_path, files):
    from img2prompt.index.key_pca import grown_recall

    fake_build(tmp_path / "idx", [files.old], key_dims=4)
    built_manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    built = built_manifest["key_pca"]
    run = AddRun()
    manifest = fake_add(tmp_path / "idx", [files.new], run=run).manifest
    index = open_index(tmp_path / "idx", verify=True)
    every = clip_keys(OLD + NEW)
    expected = grown_recall(index.key_pca, lambda ids: every[ids], 70, np.arange(40, 70), seed=0)
    assert manifest["key_pca"] == {**built, **expected, "held_out": True, "before_add": built["recall_at_10"]}
    assert sorted(set(run.clip.encoded) - {"watercolor"}) == sorted(OLD)  # the old rows' prompts, re-encoded
    assert np.array_equal(np.asarray(index.clip_vectors[40:]),
                          index.key_pca.project(every[40:].astype(np.float16)).astype(np.float16))
    for name in ("key_pca.npz", "clip.f16"):  # not refitted: the old files, linked with their records
        assert manifest["files"][name] == built_manifest["files"][name]


def test_a_retrain_of_a_key_dims_index_with_new_rows_equals_building_it_all(tmp_path, files):
    fake_build(tmp_path / "all", [files.all], key_dims=4)
    fake_build(tmp_path / "idx", [files.old], key_dims=4)
    built = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    manifest = fake_add(tmp_path / "idx", [files.new], retrain=True).manifest
    full = json.loads((tmp_path / "all" / MANIFEST).read_text())
    assert manifest["key_pca"] == {**full["key_pca"], "refit_at_add": True,
                                   "before_add": built["key_pca"]["recall_at_10"]}
    index, every = open_index(tmp_path / "idx", verify=True), open_index(tmp_path / "all")  # rewritten: re-hashed
    assert np.array_equal(np.asarray(index.clip_vectors), np.asarray(every.clip_vectors))
    assert np.array_equal(index.key_pca.components, every.key_pca.components)
    for name in ("clip.f16", "key_pca.npz"):  # rewritten, recorded anew (not the old index's links)
        assert manifest["files"][name] != built["files"][name]
    assert list(manifest["files"]).count("segments/00001/clip.f16") == 1


def test_near_dup_is_recorded_in_this_add_s_history_entry(tmp_path, files):
    fake_build(tmp_path / "idx", [files.old])
    fake_add(tmp_path / "idx", [write_lines(tmp_path / "first.txt", ["an earlier add"])])
    new = ["a fresh harbour", "a fresh harbour ~ 2", "a robot playing chess"]
    history = fake_add(tmp_path / "idx", [write_lines(tmp_path / "new.txt", new)], near_dup=0.97).manifest["history"]
    assert [entry["count"] for entry in history] == [1, 2] and "near_dup" not in history[0]
    assert history[1]["near_dup"]["dropped"] == 1 and history[1]["count_before"] == 41
