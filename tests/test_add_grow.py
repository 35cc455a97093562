"""`add` appends a segment instead of rewriting the index: ConcatRows, the backends' grow, the ridge head from
its kept statistics, merged phrases, an add that finds nothing new, and the old row files left untouched."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from img2prompt.build_index.add import AddOptions, run_add
from img2prompt.build_index.runner import BuildOptions, run_build
from img2prompt.index.backend import backend_class
from img2prompt.index.faiss_file import read_faiss
from img2prompt.index.flat import exact_search
from img2prompt.index.plan import plan_index
from img2prompt.index.reader import open_index
from img2prompt.index.recall import recall_at_k
from img2prompt.index.segments import ConcatRows
from tests.conftest import read_data_prompts
from tests.test_backends import clustered


def _build(corpus, out, clip_dir, **extra):
    return run_build(BuildOptions(corpus=[str(path) for path in corpus], out=str(out), clip_model=str(clip_dir),
                                  shard_size=30, batch_size=30, device="cpu", progress=False, **extra))


def _add(index, corpus, **extra):
    return run_add(AddOptions(index=str(index), corpus=[str(path) for path in corpus],
                              **{"shard_size": 30, "batch_size": 30, "device": "cpu", "progress": False, **extra}))


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    prompts = read_data_prompts(120)
    folder = tmp_path_factory.mktemp("grow-corpus")
    (folder / "a.txt").write_text("\n".join(prompts[:60]) + "\n", encoding="utf-8")
    (folder / "b.txt").write_text("\n".join(prompts[60:]) + "\n", encoding="utf-8")
    return folder / "a.txt", folder / "b.txt"


def test_concat_rows_reads_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 3)).astype(np.float16) for n in (5, 1, 4)]
    whole = np.concatenate(parts)
    rows = ConcatRows(parts)
    assert rows.shape == (10, 3) and len(rows) == 10 and rows.dtype == np.float16
    for key in (slice(None), slice(2, 7), slice(5, 6), slice(6, 10), slice(8, 3), slice(0, 10, 3)):
        assert np.array_equal(np.asarray(rows[key]), whole[key]), key
    assert isinstance(rows[6:9], np.ndarray)  # inside one part: that part's own slice, no join
    ids = np.array([[9, 0], [5, -1]])
    assert np.array_equal(rows[ids], whole[ids])
    assert np.array_equal(rows[7], whole[7]) and np.array_equal(rows[-1], whole[-1])
    assert np.array_equal(rows[-10], whole[0]) and np.array_equal(rows[-5], whole[5])
    assert np.array_equal(rows[np.zeros(0, np.int64)], whole[:0])
    assert np.array_equal(rows[2:8][:, 1:], whole[2:8][:, 1:])
    with pytest.raises(IndexError):
        rows[np.array([10])]


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_a_faiss_backend_grows_through_its_trained_structure(tmp_path, kind):
    vectors = clustered(14_000, 32)
    old, new = vectors[:12_000], vectors[12_000:]
    params = plan_index(len(old), 32, kind).params
    if kind == "ivfpq":
        params = {**params, "nlist": 64, "m": 8}
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    built = backend_class(kind).build(old, params, tmp_path / "old", seed=0)
    trained = read_faiss(tmp_path / "old" / "clip.faiss", len(old))
    grown = built.grow(ConcatRows([old, new]), tmp_path / "new")
    assert grown.count == len(vectors)
    reloaded = backend_class(kind).load(tmp_path / "new", ConcatRows([old, new]), grown.params)
    assert reloaded.index.ntotal == len(vectors)
    if kind == "ivfpq":  # the trained quantiser and codebooks are the build's (not retrained)
        import faiss

        def centroids(index):
            ivf = faiss.extract_index_ivf(index)
            return ivf.quantizer.reconstruct_n(0, ivf.nlist)

        assert np.array_equal(centroids(reloaded.index), centroids(trained))
    queries = np.asarray(new[:200], np.float32)  # the new rows themselves must be findable
    _, truth = exact_search(vectors, queries, 10)
    _, found = reloaded.search(queries, 10, {"nprobe": 32, "rerank": 16} if kind == "ivfpq" else None)
    assert recall_at_k(found, truth) >= 0.9
    assert (found[:, 0] == np.arange(12_000, 12_200)).mean() >= 0.95


def test_flat_grows_by_taking_the_longer_rows(tmp_path):
    vectors = clustered(300, 16)
    flat = backend_class("flat").build(vectors[:200], {}, tmp_path)
    grown = flat.grow(ConcatRows([vectors[:200], vectors[200:]]), tmp_path)
    _, ids = grown.search(np.asarray(vectors[250:251], np.float32), 1)
    assert ids.tolist() == [[250]] and not list(tmp_path.iterdir())  # nothing written


def test_add_keeps_the_old_row_files_and_appends_a_segment(tmp_path, halves, tiny_clip_dir):
    first, second = halves
    _build([first], tmp_path / "idx", tiny_clip_dir, index="flat")
    before = {name: os.stat(tmp_path / "idx" / name).st_ino for name in ("clip.f16", "minilm.f16", "prompts.parquet")}
    result = _add(tmp_path / "idx", [second])
    after = {name: os.stat(tmp_path / "idx" / name).st_ino for name in before}
    assert after == before  # the same files (linked), never rewritten
    manifest = result.manifest
    assert manifest["format_version"] == 5 and manifest["count"] == 120
    assert manifest["segments"] == [{"number": 1, "first_id": 60, "count": 60}]
    assert "segments/00001/clip.f16" in manifest["files"]
    (tmp_path / "more.txt").write_text("a lighthouse in a storm, oil painting\na red fox in snow, photo\n")
    _add(tmp_path / "idx", [tmp_path / "more.txt"])
    grown = open_index(tmp_path / "idx", verify=True)
    assert grown.count == 122 and [part.count for part in grown.segments] == [60, 60, 2]
    assert grown.prompt_rows([121, 60, 0])[0] == "a red fox in snow, photo"


def test_an_add_with_nothing_new_leaves_the_index_as_it_was(tmp_path, halves, tiny_clip_dir):
    first, _ = halves
    _build([first], tmp_path / "idx", tiny_clip_dir, index="flat")
    before = (tmp_path / "idx" / "manifest.json").read_bytes()
    result = _add(tmp_path / "idx", [first])
    assert result.report["added"] == 0 and result.report["skipped"]["duplicate_of_index"] == 60
    assert (tmp_path / "idx" / "manifest.json").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["idx"]  # no staging folder left


def test_the_head_refitted_from_kept_statistics_equals_a_fit_on_every_row(tmp_path, halves, tiny_clip_dir):
    first, second = halves
    _build([first, second], tmp_path / "all", tiny_clip_dir, index="flat")
    _build([first], tmp_path / "grown", tiny_clip_dir, index="flat")
    _add(tmp_path / "grown", [second])
    full, grown = open_index(tmp_path / "all").regression_head, open_index(tmp_path / "grown").regression_head
    assert grown.rows == full.rows and grown.ratio == full.ratio
    assert np.allclose(grown.weights, full.weights, atol=1e-5)
    assert np.allclose(grown.key_means["text"], full.key_means["text"], atol=1e-6)


def test_an_index_without_kept_statistics_is_refitted_over_every_row(tmp_path, halves, tiny_clip_dir):
    first, second = halves
    _build([first, second], tmp_path / "all", tiny_clip_dir, index="flat")
    _build([first], tmp_path / "old", tiny_clip_dir, index="flat")
    manifest_path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"]["regression_stats.npz"]  # as an index built before the statistics were kept
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "old" / "regression_stats.npz").unlink()
    _add(tmp_path / "old", [second])
    full, grown = open_index(tmp_path / "all").regression_head, open_index(tmp_path / "old").regression_head
    assert np.allclose(grown.weights, full.weights, atol=1e-5)
    assert "regression_stats.npz" in open_index(tmp_path / "old").manifest["files"]  # kept from now on


def test_phrases_are_merged_with_the_new_prompts_counts(tmp_path, tiny_clip_dir):
    old = tmp_path / "old.txt"
    old.write_text("".join(f"castle {n}, oil painting, by anna\n" for n in range(3)) + "tree, sketch\n")
    new = tmp_path / "new.txt"
    new.write_text("".join(f"river {n}, oil painting, sketch\n" for n in range(2)))
    _build([old], tmp_path / "idx", tiny_clip_dir, index="flat", phrase_min_count=2)
    before = open_index(tmp_path / "idx").phrases
    assert before[0] == ["by anna", "oil painting"]  # "sketch" (1 prompt) is below the threshold
    _add(tmp_path / "idx", [new])
    phrases, vectors = open_index(tmp_path / "idx").phrases
    counts = dict(zip(phrases, pq.read_table(tmp_path / "idx" / "phrases.parquet").column("count").to_pylist()))
    assert counts == {"oil painting": 5, "by anna": 3, "sketch": 2}  # "sketch": the new prompts' 2 (a lower bound)
    assert np.array_equal(vectors[phrases.index("by anna")], before[1][before[0].index("by anna")])


def test_a_recall_drop_warns_and_retrain_rebuilds_the_structure(tmp_path, halves, tiny_clip_dir, monkeypatch,
                                                                caplog):
    import img2prompt.build_index.add as add_module

    first, second = halves
    _build([first], tmp_path / "idx", tiny_clip_dir, index="hnsw")
    monkeypatch.setattr(add_module, "RECALL_TARGET", 1.01)  # no recall reaches it: the warning must come
    with caplog.at_level(logging.WARNING, logger="img2prompt.build_index.add"):
        result = _add(tmp_path / "idx", [second])
    assert any("--retrain" in record.getMessage() and "grown hnsw" in record.getMessage()
               for record in caplog.records)
    recall = result.manifest["search"]["recall_at_10"]
    assert "before_add" in recall and recall["recall"] <= 1.0
    assert read_faiss(tmp_path / "idx" / "clip.faiss", 120).ntotal == 120
    retrained = _add(tmp_path / "idx", [second], retrain=True)  # nothing new: only the structure is rebuilt
    assert retrained.manifest["history"][-1]["retrained"] is True and retrained.manifest["count"] == 120
    assert "before_add" not in retrained.manifest["search"]["recall_at_10"]
    hit = open_index(tmp_path / "idx").open_backend("cpu").search(
        np.asarray(open_index(tmp_path / "idx").clip_vectors[[100]], np.float32), 1)[1]
    assert hit.tolist() == [[100]]


def test_add_near_dup_drops_new_prompts_near_the_index_or_each_other(tmp_path, halves, tiny_clip_dir, text_model):
    first, _ = halves
    _build([first], tmp_path / "idx", tiny_clip_dir, index="flat")
    indexed = read_data_prompts(60)[3]
    fresh = "a quiet harbour at dawn with fishing boats, watercolor"
    new = [indexed + ", highly detailed", fresh, fresh + ", highly detailed", "a robot playing chess in a park"]
    vectors = text_model.model.encode([indexed] + new, normalize_embeddings=True)
    threshold = float(min(vectors[0] @ vectors[1], vectors[2] @ vectors[3])) - 1e-3
    assert max(float(vectors[4] @ vectors[j]) for j in range(4)) < threshold  # the robot is nobody's near-dup
    (tmp_path / "new.txt").write_text("\n".join(new) + "\n", encoding="utf-8")
    # two new prompts a shard: the index-side check runs once for both shards and is split back per shard
    result = _add(tmp_path / "idx", [tmp_path / "new.txt"], near_dup=threshold, shard_size=2)
    assert result.report["added"] == 2 and result.report["skipped"]["near_duplicate"] == 2
    grown = open_index(tmp_path / "idx")
    assert grown.prompt_rows([60, 61]) == [fresh, "a robot playing chess in a park"]
    assert grown.manifest["history"][-1]["near_dup"]["dropped"] == 2
