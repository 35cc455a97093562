"""Boundaries of build_index/merge.py (issue 35, the mutation pass), without a CLIP model: the inputs are complete
indexes written by build's own steps (consolidate, --key-dims PCA, flat search, ridge head, phrases, int8
compaction) from synthetic rows (a job whose encode step saves given vectors as shards), and the merge loads
stand-in models (load_index_models replaced: the phrase vocabulary's vectors come from a hash of each phrase).

Held here: the one-line refusals naming the input (too few, --out among them, image keys, other models, a
damaged or ever-changing folder), the key plan (one projection kept, full-width inputs projected, different
projections refused, --key-dims refit), int8 rows as stored across segments, batches and shards at their
boundaries, first input wins with its counts, the MiniLM mean of int8 inputs, the projection's recall
re-measured, the resume of a killed merge."""
from __future__ import annotations

import json
import logging
import os
import re
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import img2prompt.build_index.merge as merge_module
from img2prompt.build_index.corpus import CorpusReport
from img2prompt.build_index.job import LoadedModels, PhaseTimer, prepare_job, run_job
from img2prompt.build_index.merge import (OPEN_TRIES, SKIP_IN_EARLIER, InputRows, InputSums, KeyPlan, MergeOptions,
                                          ShardFiller, check_merge_inputs, int8_slice, iter_rows, open_input,
                                          plan_keys, projection_section, run_merge)
from img2prompt.build_index.options import BuildOptions
from img2prompt.build_index.runner import BuildJob
from img2prompt.errors import UserError
from img2prompt.index.key_pca import KeyPCA, fit_pca, reduced_recall
from img2prompt.index.layout import KEY_PCA, MINILM_I8, MINILM_MEAN, MINILM_SCALE, shard_path
from img2prompt.index.manifest import content_sha256
from img2prompt.index.minilm_store import Int8Rows, dequantise, quantise
from img2prompt.index.reader import open_index
from img2prompt.index.segments import ConcatRows
from img2prompt.index.writer import IndexWriter, ShardTask, save_shard

CLIP_DIM, TEXT_DIM, SHARD = 16, 8, 16
CLIP_ID = {"name": "fake-clip", "pretrained": None, "sha256": "c" * 64, "dim": CLIP_DIM}
TEXT_ID = {"name": "fake-minilm", "sha256": "d" * 64, "dim": TEXT_DIM, "max_seq_length": 128}
IDS = {"clip": CLIP_ID, "text": TEXT_ID}
WORDS = "red castle portrait forest city neon oil river dragon".split()
PROMPTS = [f"{WORDS[i % 9]} {WORDS[(i // 9) % 9]} study number {i}" for i in range(100)]
B_PROMPTS = PROMPTS[40:70] + [PROMPTS[3].upper(), "  " + PROMPTS[5] + " "]  # the last two: a's rows again


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class FakeClip:
    """What a merge asks of the CLIP model: the phrase vocabulary's vectors (a hash of each phrase)."""
    device = SimpleNamespace(type="cpu")
    tokenizer = None
    dim, name = CLIP_DIM, "fake-clip"

    def identity(self) -> dict:
        return CLIP_ID

    def text_embeddings(self, texts, batch_size=256, progress=None):
        rows = [np.random.default_rng(zlib.crc32(text.encode())).standard_normal(CLIP_DIM) for text in texts]
        return SimpleNamespace(vectors=unit(np.array(rows).reshape(len(texts), CLIP_DIM)), truncated=0)


class FakeText:
    folder, max_seq_length, dim, name = None, 128, TEXT_DIM, "fake-minilm"

    def identity(self) -> dict:
        return TEXT_ID


class RowsJob(BuildJob):
    """A build whose encode step saves given rows as shards; build's own later steps follow."""

    def __init__(self, context, *, prompts, clip, minilm):
        super().__init__(context)
        self.rows = prompts, clip, minilm

    def encode(self) -> None:
        prompts, clip, minilm = self.rows
        size = self.options.shard_size
        for number, start in enumerate(range(0, len(prompts), size)):
            task = ShardTask(number, start, prompts[start:start + size])
            self.writer.commit_shard(save_shard(self.writer.root, task, clip[start:start + size],
                                                minilm[start:start + size]))
        self.report = {**CorpusReport(files=["synthetic"], read=len(prompts), kept=len(prompts)).as_dict(),
                       "clip_truncated": 0}


def build_input(out: Path, prompts: list[str], rows_seed: int, identities: dict = IDS, **settings) -> Path:
    rng = np.random.default_rng(rows_seed)
    clip = unit(rng.standard_normal((len(prompts), CLIP_DIM)))
    minilm = unit(rng.standard_normal((len(prompts), TEXT_DIM)))
    options = BuildOptions(corpus=[], out=str(out), clip_model="fake-clip", index="flat", device="cpu",
                           progress=False, shard_size=25, recall_queries=50, **settings)
    models = LoadedModels(FakeClip(), FakeText(), identities)
    context = prepare_job(options, {"models": identities, "synthetic": rows_seed}, models, "cpu", PhaseTimer())
    run_job(RowsJob, context, prompts=prompts, clip=clip, minilm=minilm)
    return out


@pytest.fixture(scope="module", autouse=True)
def no_fsync():
    """Every write here is still atomic (temp file, rename), but not flushed to the disk: durability is the
    writer's (tests/test_integrity.py, test_boundaries_writer.py); these tests read values back, and a flush
    on a shared disk costs seconds a run, i.e. the mutation pass's hours."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory, no_fsync) -> Path:
    root = tmp_path_factory.mktemp("merge-boundaries")
    other = {"clip": {**CLIP_ID, "sha256": "e" * 64}, "text": TEXT_ID}
    for name, prompts, seed, extra in (
            ("a", PROMPTS[:40], 1, {}), ("b", B_PROMPTS, 2, {}), ("plain", PROMPTS[70:90], 3, {"regression": False, "seed": 3}),
            ("a_i8", PROMPTS[:40], 1, {"minilm_dtype": "int8"}), ("b_i8", B_PROMPTS, 2, {"minilm_dtype": "int8"}),
            ("a_pca", PROMPTS[:40], 1, {"key_dims": 4}), ("b_pca", B_PROMPTS, 2, {"key_dims": 4}),
            ("one_i8", PROMPTS[95:96], 4, {"minilm_dtype": "int8", "regression": False}),
            ("one_again_i8", [PROMPTS[95].upper()], 5, {"minilm_dtype": "int8", "regression": False})):
        build_input(root / name, prompts, seed, **extra)
    build_input(root / "other", PROMPTS[70:80], 6, identities=other)
    return root


@pytest.fixture
def merged(monkeypatch, tmp_path, built):
    """merged(names, out="m", **options): run_merge over the built inputs with the stand-in models; the options
    load_index_models was given are in merged.loaded."""
    loaded, roots = [], []

    def load_index_models(options, root, manifest, device, timer):
        loaded.append(options), roots.append((Path(root), manifest["build"]))
        return LoadedModels(FakeClip(), FakeText(), IDS), "fp32"

    monkeypatch.setattr(merge_module, "load_index_models", load_index_models)

    def run(names, out="m", **extra):
        options = {"device": "cpu", "progress": False, "shard_size": SHARD, **extra}
        return run_merge(MergeOptions(indexes=[str(built / name) for name in names], out=str(tmp_path / out),
                                      **options))

    run.loaded, run.roots = loaded, roots
    return run


def rows_of(folder: Path):
    index = open_index(folder, verify=True)
    return index, index.prompts, np.asarray(index.clip_vectors), np.asarray(index.minilm)


# -- whole merges ---------------------------------------------------------------------------------------------

def test_first_input_wins_rows_copied_counts_and_report(merged, built, tmp_path):
    result = merged(["a", "b"])
    index, prompts, clip, minilm = rows_of(tmp_path / "m")
    _, a_prompts, a_clip, a_minilm = rows_of(built / "a")
    _, b_prompts, b_clip, b_minilm = rows_of(built / "b")
    assert prompts == PROMPTS[:70] and index.count == 70 and result.manifest["count"] == 70
    assert np.array_equal(clip, np.concatenate([a_clip, b_clip[:30]]))
    assert np.array_equal(minilm, np.concatenate([a_minilm, b_minilm[:30]]))
    np.testing.assert_allclose(np.load(tmp_path / "m" / MINILM_MEAN), minilm.astype(np.float64).mean(axis=0),
                               atol=1e-6)
    per_input = [{"index": str(built / "a"), "count": 40, "duplicates": 0},
                 {"index": str(built / "b"), "count": 32, "duplicates": 2}]
    assert result.report["merged"] == per_input and result.manifest["merged_from"]["indexes"] == per_input
    assert {key: result.report[key] for key in ("files", "read", "kept", "skipped")} == {
        "files": [str(built / "a"), str(built / "b")], "read": 72, "kept": 70, "skipped": {SKIP_IN_EARLIER: 2}}
    assert result.manifest["models"] == IDS and "regression" in result.manifest  # a's head kind: refitted
    assert result.manifest["build"] == {"merge_of": [content_sha256(index.manifest) for index in
                                                     (open_index(built / "a"), open_index(built / "b"))],
                                        "models": IDS, "shard_size": SHARD}
    assert "key_pca" not in result.manifest and "key_pca" not in result.report


def test_the_first_input_wins_the_other_way_round_too(merged, built, tmp_path):
    result = merged(["b", "a"])
    _, prompts, clip, _ = rows_of(tmp_path / "m")
    _, _, a_clip, _ = rows_of(built / "a")
    _, _, b_clip, _ = rows_of(built / "b")
    kept_a = [row for row in range(40) if row not in (3, 5)]
    assert prompts == B_PROMPTS + [PROMPTS[row] for row in kept_a]
    assert np.array_equal(clip, np.concatenate([b_clip, a_clip[kept_a]]))
    assert [entry["duplicates"] for entry in result.report["merged"]] == [0, 2]


def test_no_duplicates_no_skip_entry_and_no_regression_after_an_input_without_one(merged, built, tmp_path):
    result = merged(["plain", "a"])
    assert result.report["skipped"] == {} and result.report["kept"] == result.report["read"] == 60
    assert "regression" not in result.manifest and "regression.npz" not in result.manifest["files"]
    assert result.manifest["build_options"]["seed"] == 3  # the first input's settings
    _, prompts, _, _ = rows_of(tmp_path / "m")
    assert prompts == PROMPTS[70:90] + PROMPTS[:40]
    result = merged(["a", "plain"], out="m2")  # the first input's head: refitted over the merged rows
    assert "regression" in result.manifest and result.manifest["build_options"]["seed"] == 0


def test_clip_model_defaults_to_the_first_manifests_and_a_given_one_is_kept(merged, built, tmp_path):
    merged(["a", "b"])
    merged(["a", "b"], out="m2", clip_model="here/fake-clip")
    assert merged.loaded[0].clip_model == ["fake-clip"] and merged.loaded[0].clip_pretrained == [None]
    assert merged.loaded[1].clip_model == "here/fake-clip"
    first = json.loads((built / "a" / "manifest.json").read_text())["build"]
    assert merged.roots == [(built / "a", first)] * 2  # checked against the first input, named by its folder


@pytest.mark.parametrize("size", [0, -1])
def test_a_shard_size_below_one_is_refused_first(merged, monkeypatch, size):
    def not_reached(options):
        raise AssertionError("inputs opened")

    monkeypatch.setattr(merge_module, "check_merge_inputs", not_reached)
    with pytest.raises(UserError, match="^--shard-size must be positive$"):
        merged(["a", "b"], shard_size=size)


@pytest.mark.parametrize("parts", [("a_i8", "b_i8"), ("a", "b_i8"), ("a_i8", "b")])
def test_int8_rows_as_stored_and_the_mean_from_the_inputs(merged, built, tmp_path, parts):
    result = merged(list(parts))
    folder = tmp_path / "m"
    first, second = (open_index(built / part) for part in parts)
    expected_q, expected_s, total = [], [], np.zeros(TEXT_DIM)
    for opened, keep in ((first, np.arange(40)), (second, np.arange(30))):
        if opened.manifest.get("minilm", {}).get("dtype") == "int8":
            q, s = np.asarray(opened.minilm.quantised), np.asarray(opened.minilm.scale)
            dropped = np.setdiff1d(np.arange(opened.count), keep)
            total += opened.minilm_mean.astype(np.float64) * opened.count - dequantise(q[dropped], s[dropped]).astype(
                np.float64).sum(axis=0)
            expected_q.append(q[keep]), expected_s.append(s[keep])
        else:
            rows = np.asarray(opened.minilm)[keep]
            q, s = quantise(rows)
            total += rows.astype(np.float64).sum(axis=0)
            expected_q.append(q), expected_s.append(s)
    assert np.array_equal(np.fromfile(folder / MINILM_I8, np.int8).reshape(70, TEXT_DIM), np.concatenate(expected_q))
    assert np.array_equal(np.fromfile(folder / MINILM_SCALE, np.float32), np.concatenate(expected_s))
    np.testing.assert_allclose(np.load(folder / MINILM_MEAN), (total / 70).astype(np.float32), rtol=0, atol=1e-7)
    assert result.manifest["minilm"]["dtype"] == "int8" and not (folder / "minilm.f16").exists()
    assert result.manifest["minilm"]["int8_inputs"] == [str(built / part) for part in parts if part.endswith("i8")]
    index, prompts, clip, _ = rows_of(folder)
    assert prompts == PROMPTS[:70] and index.count == 70


def test_int8_rows_and_scales_are_carried_exactly_as_stored(merged, built, tmp_path):
    """An int8 input whose scales are not those of float16 rows (any other quantiser): its rows are copied, not
    quantised again from the merged float16 file."""
    import shutil

    shutil.copytree(built / "a_i8", tmp_path / "odd_i8")
    path = tmp_path / "odd_i8" / MINILM_SCALE
    odd = np.fromfile(path, np.float32) * np.float32(1.0013)
    odd.tofile(path)  # same size: opened without --verify, as a merge opens its inputs
    result = run_merge(MergeOptions(indexes=[str(tmp_path / "odd_i8"), str(built / "b_i8")], out=str(tmp_path / "m"),
                                    device="cpu", progress=False, shard_size=SHARD))
    assert result.manifest["count"] == 70
    assert np.array_equal(np.fromfile(tmp_path / "m" / MINILM_SCALE, np.float32)[:40], odd)
    stored = np.fromfile(tmp_path / "odd_i8" / MINILM_I8, np.int8)
    assert np.array_equal(np.fromfile(tmp_path / "m" / MINILM_I8, np.int8)[:stored.size], stored)


def test_a_one_row_merge_in_shards_of_one_row(merged, built, tmp_path):
    """Shards of 1 row are allowed; one row kept (its duplicate dropped): the int8 mean is that row's own."""
    result = merged(["one_i8", "one_again_i8"], shard_size=1)
    one = open_index(built / "one_i8")
    assert open_index(tmp_path / "m").prompts == PROMPTS[95:96] and result.report["merged"][1]["duplicates"] == 1
    np.testing.assert_allclose(np.load(tmp_path / "m" / MINILM_MEAN), one.minilm_mean, rtol=0, atol=1e-7)


def test_a_full_width_input_is_projected_through_the_inputs_pca(merged, built, tmp_path):
    result = merged(["a_pca", "b"])
    index, prompts, clip, _ = rows_of(tmp_path / "m")
    a_pca, b = open_index(built / "a_pca"), open_index(built / "b")
    assert prompts == PROMPTS[:70] and index.key_dim == 4
    assert np.array_equal(index.key_pca.components, a_pca.key_pca.components)
    with np.load(tmp_path / "m" / KEY_PCA) as saved:
        assert np.array_equal(saved["components"], a_pca.key_pca.components)
    projected = a_pca.key_pca.project(np.asarray(b.clip_vectors)[:30]).astype(np.float16)
    assert np.array_equal(clip, np.concatenate([np.asarray(a_pca.clip_vectors), projected]))
    section = result.manifest["key_pca"]
    expected = reduced_recall(b.clip_vectors, np.asarray(b.clip_vectors, np.float32), a_pca.key_pca)
    assert section["recall_at_10"] == pytest.approx(expected) and section["queries"] == 32
    assert section["held_out"] is True and section["remeasured"][0]["index"] == str(built / "b")
    assert {key: section[key] for key in ("dims", "key_dim", "fit_rows", "seed")} == {
        key: a_pca.manifest["key_pca"][key] for key in ("dims", "key_dim", "fit_rows", "seed")}
    assert result.report["key_pca"] == section and "regression" not in result.manifest
    assert [name for name in result.timings if name in ("consolidate", "key_pca")] == ["consolidate", "key_pca"]


def test_a_full_width_first_input_is_projected_and_loses_its_head(merged, built, tmp_path):
    """The head maps full-width keys: the first input's regression head is not refitted over projected keys."""
    result = merged(["a", "b_pca"])
    index, prompts, clip, _ = rows_of(tmp_path / "m")
    a, b_pca = open_index(built / "a"), open_index(built / "b_pca")
    assert "regression" in a.manifest and "regression" not in result.manifest
    assert np.array_equal(index.key_pca.components, b_pca.key_pca.components)
    projected = b_pca.key_pca.project(np.asarray(a.clip_vectors)).astype(np.float16)
    assert np.array_equal(clip, np.concatenate([projected, np.asarray(b_pca.clip_vectors)[:30]]))
    assert result.manifest["key_pca"]["remeasured"][0]["index"] == str(built / "a")
    assert result.manifest["key_pca"]["queries"] == 40


def test_different_projections_are_refused_naming_both(merged, built, tmp_path):
    with pytest.raises(UserError, match=r"b_pca: built with another --key-dims projection than .*a_pca") as caught:
        merged(["a_pca", "b_pca"])
    assert "\n" not in str(caught.value) and not (tmp_path / "m").exists()


def test_merge_key_dims_refits_over_the_full_width_inputs(merged, built, tmp_path):
    result = merged(["a", "b"], key_dims=4)
    section = result.manifest["key_pca"]
    assert section["dims"] == 4 and section["fit_rows"] == 70 and "merged" not in section
    assert result.manifest["build"]["key_dims"] == 4 and open_index(tmp_path / "m").key_dim == 4
    with pytest.raises(UserError, match=r"a_pca: holds only PCA-projected keys"):
        merged(["a_pca", "b"], out="m2", key_dims=4)
    with pytest.raises(UserError, match="--key-dims must be from 1 to 15"):
        merged(["a", "b"], out="m3", key_dims=16)


def test_a_killed_merge_resumes_without_rewriting_its_committed_shards(merged, monkeypatch, tmp_path):
    saved = []
    real = merge_module.save_shard

    def save_then_die(root, task, *args):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(task.number)
        return real(root, task, *args)

    monkeypatch.setattr(merge_module, "save_shard", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        merged(["a", "b"])
    assert saved == [0, 1]
    monkeypatch.setattr(merge_module, "save_shard", lambda root, task, *args: saved.append(task.number) or
                        real(root, task, *args))
    merged(["a", "b"], resume=True)
    assert saved == [0, 1, 2, 3, 4]  # 70 rows in shards of 16: 0 and 1 kept from the killed run
    merged(["a", "b"], out="fresh")
    for name in ("clip.f16", "minilm.f16", "prompts.parquet"):
        assert (tmp_path / "m" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


# -- opening and checking the inputs --------------------------------------------------------------------------

def test_too_few_inputs_and_out_among_them(built, tmp_path):
    with pytest.raises(UserError, match="^merge needs at least two indexes$"):
        check_merge_inputs(MergeOptions(indexes=[str(built / "a")], out=str(tmp_path / "m")))
    assert len(check_merge_inputs(MergeOptions(indexes=[str(built / "a"), str(built / "b")],
                                               out=str(tmp_path / "m")))) == 2
    for position in (0, 1):
        names = [str(built / "a"), str(built / "b")]
        names[position] += "/."
        with pytest.raises(UserError, match=f"^{re.escape(names[position])}: --out must not be one of the merged"):
            check_merge_inputs(MergeOptions(indexes=names, out=str(built / ("a", "b")[position])))


def test_another_model_is_refused_naming_the_input(built, tmp_path):
    with pytest.raises(UserError) as caught:
        check_merge_inputs(MergeOptions(indexes=[str(built / "a"), str(built / "b"), str(built / "other")],
                                        out=str(tmp_path / "m")))
    assert str(caught.value) == (f"{built / 'other'}: built with clip model fake-clip (sha256 eeeeeeeeeeee), but "
                                 f"{built / 'a'} with fake-clip (sha256 cccccccccccc): merge needs the same models")


def _fake_inputs(monkeypatch, manifests: dict):
    monkeypatch.setattr(merge_module, "open_input", lambda index: SimpleNamespace(manifest=manifests[index]))


def test_another_text_model_and_image_keys_are_refused(monkeypatch):
    text_b = {**TEXT_ID, "name": "other-minilm", "sha256": "f" * 64}
    _fake_inputs(monkeypatch, {"a": {"models": IDS}, "b": {"models": {"clip": CLIP_ID, "text": text_b}}})
    with pytest.raises(UserError, match=r"^b: built with text model other-minilm \(sha256 ffffffffffff\), but a "
                                        r"with fake-minilm \(sha256 dddddddddddd\): merge needs the same models$"):
        check_merge_inputs(MergeOptions(indexes=["a", "b"], out="m"))
    text_keys = [{"keys": "text", "rows": [0, 3]}]
    image_keys = text_keys + [{"keys": "image", "rows": [3, 5]}]
    _fake_inputs(monkeypatch, {"a": {"models": IDS, "key_ranges": text_keys}, "b": {"models": IDS},
                               "c": {"models": IDS, "key_ranges": image_keys}})
    assert len(check_merge_inputs(MergeOptions(indexes=["a", "b"], out="m"))) == 2
    with pytest.raises(UserError, match=r"^c: merge of an index with image-keyed entries \(--pairs\) is not "):
        check_merge_inputs(MergeOptions(indexes=["a", "b", "c"], out="m"))


def test_a_missing_input_is_one_line_naming_it(tmp_path):
    with pytest.raises(UserError, match=f"^index folder not found: {re.escape(str(tmp_path / 'missing'))}$"):
        open_input(str(tmp_path / "missing"))


class Opener:
    """open_index replaced: raises `errors` in turn (None: opens), counting the calls."""

    def __init__(self, errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self, root):
        self.calls += 1
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        return open_index(root)


@pytest.mark.parametrize("error", [OSError("disk said no"), ValueError("mmap length is greater than file size")])
def test_an_unreadable_input_is_named_as_damaged(built, monkeypatch, error):
    opener = Opener([error])
    monkeypatch.setattr(merge_module, "open_index", opener)
    with pytest.raises(UserError, match=f"^{re.escape(str(built / 'a'))}: not readable \\({error}\\): the index is "
                                        "damaged, rebuild it$"):
        open_input(str(built / "a"))
    assert opener.calls == 1


def test_a_user_error_of_the_reader_is_passed_on_as_it_is(built, monkeypatch):
    error = UserError("x: 3 bytes, expected 5")
    monkeypatch.setattr(merge_module, "open_index", Opener([error]))
    with pytest.raises(UserError) as caught:
        open_input(str(built / "a"))
    assert caught.value is error


def _scripted_manifests(monkeypatch, changed_calls):
    """read_manifest replaced: the real manifest, except a changed one at the given (1-based) calls."""
    real, calls = merge_module.read_manifest, []

    def read(root):
        calls.append(root)
        return {"changed": len(calls)} if len(calls) in changed_calls else real(root)

    monkeypatch.setattr(merge_module, "read_manifest", read)
    return calls


@pytest.mark.parametrize("error", [None, OSError("half swapped"), UserError("half swapped")])
def test_an_input_swapped_while_opening_is_opened_again(built, monkeypatch, caplog, error):
    """A rebuild swapped in meanwhile (the manifest after the open differs): opened again, with a warning."""
    opener = Opener([error])
    monkeypatch.setattr(merge_module, "open_index", opener)
    _scripted_manifests(monkeypatch, {2})
    with caplog.at_level(logging.WARNING):
        opened = open_input(str(built / "a"))
    assert opener.calls == 2 and opened.count == 40
    assert [r.getMessage() for r in caplog.records] == [
        f"{built / 'a'} changed while it was opened (a rebuild swapped in?): opening it again"]


def test_an_input_that_keeps_changing_is_refused_after_three_tries(built, monkeypatch):
    opener = Opener([])
    monkeypatch.setattr(merge_module, "open_index", opener)
    _scripted_manifests(monkeypatch, set(range(2, 20, 2)))  # every read after an open differs
    with pytest.raises(UserError, match=f"^{re.escape(str(built / 'a'))}: the index keeps changing while merge "):
        open_input(str(built / "a"))
    assert opener.calls == OPEN_TRIES == 3


# -- the key plan ------------------------------------------------------------------------------------------

def _pca(seed: int, dims: int = 4) -> KeyPCA:
    return fit_pca(np.random.default_rng(seed).standard_normal((40, CLIP_DIM)).astype(np.float32), dims, seed=0)


def _keyed(*pcas):
    return [SimpleNamespace(key_pca=pca, clip_dim=CLIP_DIM) for pca in pcas]


def test_plan_keys():
    p, q = _pca(1), _pca(2)
    assert plan_keys(["a", "b"], _keyed(None, None), None) == KeyPlan(None, [False, False])
    assert plan_keys(["a", "b"], _keyed(None, None), 4) == KeyPlan(None, [False, False])
    plan = plan_keys(["a", "b", "c"], _keyed(None, p, KeyPCA(p.components.copy())), None)
    assert plan.pca is p and plan.project == [True, False, False]
    plan = plan_keys(["a", "b"], _keyed(p, None), None)
    assert plan.pca is p and plan.project == [False, True]
    with pytest.raises(UserError, match=r"^b: holds only PCA-projected keys .*merge without --key-dims$"):
        plan_keys(["a", "b", "c"], _keyed(None, p, q), 4)
    with pytest.raises(UserError, match="--key-dims must be from 1 to 15"):
        plan_keys(["a", "b"], _keyed(None, None), CLIP_DIM)
    assert plan_keys(["a", "b"], _keyed(None, None), CLIP_DIM - 1).pca is None
    with pytest.raises(UserError, match="^c: built with another --key-dims projection than a, "):
        plan_keys(["a", "b", "c"], _keyed(p, p, q), None)  # the third differs: every one is compared
    with pytest.raises(UserError, match="^b: built with another --key-dims projection than a, "):
        plan_keys(["a", "b"], _keyed(p, _pca(1, dims=3)), None)  # another shape


# -- rows, batches, shards ----------------------------------------------------------------------------------

Q = np.arange(-18, 18, dtype=np.int8).reshape(6, 6)
S = np.array([0.5, 0.25, 1.0, 2.0, 0.125, 4.0], np.float32)


def _int8_parts(sizes):
    bounds = np.cumsum([0] + list(sizes))
    return [Int8Rows(Q[low:high], S[low:high]) for low, high in zip(bounds[:-1], bounds[1:])]


def test_int8_slice_across_segments_at_every_border():
    rows = ConcatRows(_int8_parts([2, 3, 1]))
    for start in range(6):
        for stop in range(start + 1, 7):
            quantised, scale = int8_slice(rows, start, stop)
            assert np.array_equal(quantised, Q[start:stop]) and np.array_equal(scale, S[start:stop]), (start, stop)
    quantised, scale = int8_slice(Int8Rows(Q, S), 1, 4)  # one segment: not a ConcatRows
    assert np.array_equal(quantised, Q[1:4]) and np.array_equal(scale, S[1:4])
    fp16 = np.ones((6, 6), np.float16)
    assert int8_slice(fp16, 0, 3) is None and int8_slice(ConcatRows([fp16[:2], fp16[2:]]), 1, 4) is None


class FakeIndex:
    def __init__(self, minilm):
        self.prompts = [f"p{row}" for row in range(6)]
        self.clip_vectors = np.arange(36, dtype=np.float16).reshape(6, 6)
        self.minilm = minilm

    def stream_prompt_batches(self, size):
        for start in range(0, len(self.prompts), size):
            yield self.prompts[start:start + size]


@pytest.mark.parametrize("batch", [1, 2, 4, 6, 7])
def test_iter_rows_batches_int8_across_segments(batch):
    index = FakeIndex(ConcatRows(_int8_parts([3, 3])))
    batches = list(iter_rows(index, batch))
    starts = list(range(0, 6, batch))
    assert len(batches) == len(starts)
    for rows, start in zip(batches, starts):
        stop = min(start + batch, 6)
        assert rows.prompts == index.prompts[start:stop]
        assert np.array_equal(rows.clip, index.clip_vectors[start:stop])
        assert np.array_equal(rows.int8[0], Q[start:stop]) and np.array_equal(rows.int8[1], S[start:stop])
        assert np.array_equal(rows.minilm, dequantise(Q[start:stop], S[start:stop]))


def test_iter_rows_of_a_float16_input():
    minilm = (np.arange(36, dtype=np.float16).reshape(6, 6) / 7).astype(np.float16)
    batches = list(iter_rows(FakeIndex(minilm), 4))
    assert [rows.prompts for rows in batches] == [["p0", "p1", "p2", "p3"], ["p4", "p5"]]
    assert all(rows.int8 is None for rows in batches)
    assert np.array_equal(np.concatenate([rows.minilm for rows in batches]), minilm)


def _arrays(first, count, int8=True):
    rows = np.arange(first, first + count, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    arrays = {"clip": rows.astype(np.float16), "minilm": (rows / 100).astype(np.float16)}
    if int8:
        arrays["int8"], arrays["scale"] = rows.astype(np.int8), rows[:, 0] / 2
    return arrays


@pytest.mark.parametrize("int8", [True, False])
def test_shard_filler_cuts_full_shards_at_the_size_and_the_rest_at_finish(tmp_path, int8):
    writer = IndexWriter(tmp_path / "out", {"build": 1})
    filler = ShardFiller(writer, 3, int8)
    prompts = [f"p{row}" for row in range(10)]
    assert list(filler.add(prompts[:2], _arrays(0, 2, int8))) == []  # 2 < 3: nothing yet
    (task,) = filler.add(prompts[2:3], _arrays(2, 1, int8))  # exactly 3: one shard
    assert (task.number, task.first_id, task.prompts) == (0, 0, prompts[:3])
    tasks = list(filler.add(prompts[3:10], _arrays(3, 7, int8)))
    assert [(t.number, t.first_id, t.prompts) for t in tasks] == [(1, 3, prompts[3:6]), (2, 6, prompts[6:9])]
    (last,) = filler.finish()
    assert (last.number, last.first_id, last.prompts) == (3, 9, prompts[9:])
    assert list(filler.finish()) == []
    assert sorted(writer.records) == [0, 1, 2, 3]
    for number, (low, high) in enumerate([(0, 3), (3, 6), (6, 9), (9, 10)]):
        expected = _arrays(low, high - low, int8)
        assert np.array_equal(np.load(shard_path(writer.root, number, "clip")), expected["clip"])
        assert np.array_equal(np.load(shard_path(writer.root, number, "minilm")), expected["minilm"])
        assert ("minilm_i8" in writer.records[number]["files"]) is int8
        assert shard_path(writer.root, number, "minilm_i8").exists() is int8
        if int8:
            assert np.array_equal(np.load(shard_path(writer.root, number, "minilm_i8")), expected["int8"])
            assert np.array_equal(np.load(shard_path(writer.root, number, "minilm_scale")), expected["scale"])
    writer.close()


def test_shard_filler_keeps_a_committed_shard_and_rewrites_a_damaged_one(tmp_path, monkeypatch):
    writer = IndexWriter(tmp_path / "out", {"build": 1})
    prompts = [f"p{row}" for row in range(6)]
    list(ShardFiller(writer, 3, False).add(prompts, _arrays(0, 6, False)))
    path = shard_path(writer.root, 1, "clip")
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    saved = []
    real = merge_module.save_shard
    monkeypatch.setattr(merge_module, "save_shard", lambda root, task, *a: saved.append(task.number) or
                        real(root, task, *a))
    tasks = list(ShardFiller(writer, 3, False).add(prompts, _arrays(0, 6, False)))
    assert [task.number for task in tasks] == [0, 1] and saved == [1]
    assert np.array_equal(np.load(path), _arrays(3, 3, False)["clip"])
    writer.close()


# -- the MiniLM mean's sums ---------------------------------------------------------------------------------

def _rows(minilm, int8=True):
    minilm = np.asarray(minilm, np.float32)
    return InputRows([f"p{row}" for row in range(len(minilm))], np.zeros((len(minilm), 2)), minilm,
                     (np.zeros_like(minilm, np.int8), np.ones(len(minilm))) if int8 else None)


def test_input_sums_use_the_fewer_of_kept_and_dropped_rows():
    minilm = np.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0], [1000.0, 2000.0]])
    opened = SimpleNamespace(minilm_mean=np.array([0.5, 0.25], np.float32), count=8)
    assert InputSums().total(opened) == 0.0
    sums = InputSums()  # int8, 3 kept > 1 dropped: the stored mean · count less the dropped row
    sums.add(_rows(minilm), [0, 1, 3], minilm[[0, 1, 3]])
    assert sums.counts == [3, 1] and sums.int8 is True
    assert np.array_equal(sums.total(opened), np.array([4.0, 2.0]) - [100.0, 200.0])
    sums = InputSums()  # 2 kept = 2 dropped: the kept rows' sum
    sums.add(_rows(minilm), [1, 2], minilm[[1, 2]])
    assert np.array_equal(sums.total(opened), [110.0, 220.0])
    sums = InputSums()  # over two batches: 1 + 2 kept, 1 + 0 dropped
    sums.add(_rows(minilm[:2]), [0], minilm[[0]])
    sums.add(_rows(minilm[2:]), [0, 1], minilm[2:])
    assert sums.counts == [3, 1]
    assert np.array_equal(sums.kept, [1101.0, 2202.0]) and np.array_equal(sums.dropped, [10.0, 20.0])
    assert np.array_equal(sums.total(opened), np.array([4.0, 2.0]) - [10.0, 20.0])
    sums = InputSums()  # 1 + 1 kept, 2 + 0 dropped: each count adds up its own rows
    sums.add(_rows(minilm[:3]), [0], minilm[[0]])
    sums.add(_rows(minilm[3:]), [0], minilm[[3]])
    assert sums.counts == [2, 2] and np.array_equal(sums.total(opened), [1001.0, 2002.0])
    sums = InputSums()  # float16 input: always its kept rows
    sums.add(_rows(minilm, int8=False), [0, 1, 3], minilm[[0, 1, 3]])
    assert sums.int8 is False and np.array_equal(sums.total(opened), [1011.0, 2022.0])


# -- the projection's section -------------------------------------------------------------------------------

def test_projection_section_of_inputs_sharing_one_projection():
    sections = [{"dims": 4, "key_dim": 16, "fit_rows": 40, "seed": 0, "recall_at_10": 0.9, "queries": 10,
                 "held_out": True, "extra": 1},
                {"dims": 4, "key_dim": 16, "fit_rows": 30, "seed": 3, "recall_at_10": 0.8, "queries": 7,
                 "held_out": True}]
    inputs = [SimpleNamespace(manifest={"key_pca": section}) for section in sections]
    plan = KeyPlan(_pca(1), [False, False])
    section = projection_section(inputs, plan, seed=0)
    assert section == {"dims": 4, "key_dim": 16, "fit_rows": 40, "seed": 0, "recall_at_10": 0.8, "queries": 17,
                       "held_out": True, "merged": "one projection shared by every input: recall@10 as the inputs "
                                                   "measured it (the lowest)"}
    sections[1] = {"dims": 4, "recall_at_10": 0.95}  # no queries, not held out
    section = projection_section([SimpleNamespace(manifest={"key_pca": s}) for s in sections], plan, seed=0)
    assert (section["recall_at_10"], section["queries"], section["held_out"]) == (0.9, 10, False)
    assert {key: section[key] for key in ("dims", "key_dim", "fit_rows", "seed")} == {
        "dims": 4, "key_dim": 16, "fit_rows": 40, "seed": 0}  # the first input's, though the second lacks some


def _full(name, count, seed):
    keys = unit(np.random.default_rng(seed).standard_normal((count, CLIP_DIM))).astype(np.float16)
    return SimpleNamespace(root=Path(name), count=count, clip_vectors=keys, manifest={})


def test_projection_section_remeasures_full_width_inputs(caplog):
    pca = _pca(1, dims=2)
    projected = SimpleNamespace(root=Path("p"), manifest={"key_pca": {"dims": 2, "key_dim": 16, "fit_rows": 40,
                                                                      "seed": 0, "recall_at_10": 0.99}})
    full = [_full("f1", 30, 7), _full("f2", 4, 8)]
    plan = KeyPlan(pca, [False, True, True])
    with caplog.at_level(logging.WARNING):
        section = projection_section([projected] + full, plan, seed=3, queries=12)
    rng = np.random.default_rng(3)
    measured = []
    for opened, size in zip(full, (12, 4)):
        rows = np.sort(rng.choice(opened.count, size=size, replace=False))
        measured.append({"index": str(opened.root), "queries": size, "recall_at_10": reduced_recall(
            opened.clip_vectors, np.asarray(opened.clip_vectors[rows], np.float32), pca)})
    assert section["remeasured"] == [{key: entry[key] for key in ("index", "recall_at_10", "queries")}
                                     for entry in measured]
    recall = (measured[0]["recall_at_10"] * 12 + measured[1]["recall_at_10"] * 4) / 16
    assert section["recall_at_10"] == pytest.approx(recall) and section["queries"] == 16
    assert section["held_out"] is True and section["dims"] == 2 and section["fit_rows"] == 40
    assert section["merged"].startswith("full-width inputs projected")
    assert recall < merge_module.RECALL_TARGET
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("the merged keys' PCA (2 dims) keeps recall@10 ") and "below the target" in warning
    other = projection_section([projected] + full, plan, seed=4, queries=12)
    assert other["remeasured"][0]["recall_at_10"] != section["remeasured"][0]["recall_at_10"]
    big = projection_section([projected, _full("big", 600, 5)], KeyPlan(pca, [False, True]), seed=0)
    assert big["queries"] == 500  # the default: 500 held-out rows of a larger input


def test_projection_section_of_one_full_width_row_and_the_target_boundary(monkeypatch, caplog):
    pca = _pca(1, dims=2)
    projected = SimpleNamespace(root=Path("p"), manifest={"key_pca": {"dims": 2, "recall_at_10": 0.99}})
    one = _full("one", 1, 9)
    section = projection_section([projected, one], KeyPlan(pca, [False, True]), seed=0)
    assert section["queries"] == 1 and section["recall_at_10"] == pytest.approx(1.0)
    full = _full("f", 20, 7)
    measured = projection_section([projected, full], KeyPlan(pca, [False, True]), seed=0)["recall_at_10"]
    monkeypatch.setattr(merge_module, "RECALL_TARGET", measured)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        projection_section([projected, full], KeyPlan(pca, [False, True]), seed=0)
    assert not caplog.records  # at the target: no warning
    monkeypatch.setattr(merge_module, "RECALL_TARGET", np.nextafter(measured, 2.0))
    with caplog.at_level(logging.WARNING):
        projection_section([projected, full], KeyPlan(pca, [False, True]), seed=0)
    assert len(caplog.records) == 1
