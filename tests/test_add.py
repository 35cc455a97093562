"""`img2prompt add`: build half + add half == build all (flat), history, dedup, refusals, kill → old or new.

Shards of 30 rows and the 60-row first half keep every encode batch the same in both builds: MiniLM
vectors depend (in the last bits) on which prompts share a padded batch."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from img2prompt.build_index.add import AddOptions, run_add
from img2prompt.build_index.runner import BuildOptions, run_build
from img2prompt.errors import UserError
from img2prompt.index.reader import open_index
from tests.conftest import read_data_prompts


def _write(path, prompts):
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def _build(corpus, out, clip_dir, **extra):
    return run_build(BuildOptions(corpus=[str(path) for path in corpus], out=str(out), clip_model=str(clip_dir),
                                  shard_size=30, batch_size=30, device="cpu", progress=False, **extra))


def _add(index, corpus, clip_dir, **extra):
    return run_add(AddOptions(index=str(index), corpus=[str(path) for path in corpus],
                              clip_model=str(clip_dir) if clip_dir else None,
                              shard_size=30, batch_size=30, device="cpu", progress=False, **extra))


def _rows(index):
    """(ids as stored, prompts, CLIP rows, MiniLM rows) across the index's segments (a grown index has several)."""
    opened = open_index(index)
    ids = [i for part in opened.segments for i in pq.read_table(index / part.name("prompts.parquet")).column("id").to_pylist()]
    return ids, opened.prompts, np.asarray(opened.clip_vectors), np.asarray(opened.minilm)


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    prompts = read_data_prompts(120)
    folder = tmp_path_factory.mktemp("add-corpus")
    # the second half repeats two prompts of the first (in other case/spacing): dedup against the index
    second = prompts[60:] + [prompts[3].upper(), "  " + prompts[5] + " "]
    return _write(folder / "a.txt", prompts[:60]), _write(folder / "b.txt", second)


def test_build_half_add_half_equals_build_all(tmp_path, halves, tiny_clip_dir):
    first, second = halves
    _build([first, second], tmp_path / "all", tiny_clip_dir, index="flat")
    _build([first], tmp_path / "grown", tiny_clip_dir, index="flat")
    result = _add(tmp_path / "grown", [second], None)  # the CLIP model as the index's manifest names it
    ids_all, prompts_all, clip_all, minilm_all = _rows(tmp_path / "all")
    ids, prompts, clip, minilm = _rows(tmp_path / "grown")
    assert ids == ids_all and prompts == prompts_all
    assert np.array_equal(clip, clip_all) and np.array_equal(minilm, minilm_all)
    query = clip_all[7].astype(np.float32)
    assert np.array_equal(np.argsort(-(clip_all.astype(np.float32) @ query), kind="stable")[:10],
                          np.argsort(-(clip.astype(np.float32) @ query), kind="stable")[:10])
    full, grown = open_index(tmp_path / "all"), open_index(tmp_path / "grown")
    queries = np.asarray(clip_all[[3, 61, 119]], np.float32)  # through the backend, across the segments
    scores_all, found_all = full.open_backend("cpu").search(queries, 10)
    scores, found = grown.open_backend("cpu").search(queries, 10)
    assert np.array_equal(found, found_all) and np.array_equal(scores, scores_all)
    assert np.allclose(grown.minilm_mean, full.minilm_mean, atol=1e-6)
    manifest = json.loads((tmp_path / "grown" / "manifest.json").read_text())
    assert manifest["count"] == 120
    (entry,) = manifest["history"]
    assert entry["count"] == 60 and entry["count_before"] == 60 and entry["duplicates_of_index"] == 2
    assert result.report["skipped"]["duplicate_of_index"] == 2


@pytest.mark.slow
def test_search_through_the_api_matches(tmp_path, halves, tiny_clip_dir, sample_images):
    import img2prompt

    first, second = halves
    _build([first, second], tmp_path / "all", tiny_clip_dir, index="flat")
    _build([first], tmp_path / "grown", tiny_clip_dir, index="flat")
    _add(tmp_path / "grown", [second], tiny_clip_dir)
    images = sorted(str(path) for path in sample_images.iterdir())[:2]
    found = []
    for name in ("all", "grown"):
        with img2prompt.open_index(tmp_path / name, device="cpu", clip_model=str(tiny_clip_dir)) as index:
            found.append([(result.ids.tolist(), np.round(result.scores, 5).tolist(), result.prompts)
                          for result in index.search(images, k=5)])
    assert found[0] == found[1]


def test_another_model_refused_before_encoding(tmp_path, halves, tiny_clip_dir, other_clip_dir):
    first, second = halves
    _build([first], tmp_path / "idx", tiny_clip_dir, index="flat")
    before = (tmp_path / "idx" / "manifest.json").read_bytes()
    with pytest.raises(UserError, match="add needs the index's own models"):
        _add(tmp_path / "idx", [second], other_clip_dir)
    assert (tmp_path / "idx" / "manifest.json").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("step", ["commit_shard", "consolidate", "complete"])
def test_kill_at_each_commit_point_then_resume(tmp_path, halves, tiny_clip_dir, monkeypatch, step):
    from img2prompt.index import writer as writer_module

    first, second = halves
    _build([first], tmp_path / "idx", tiny_clip_dir, index="flat")
    before = _rows(tmp_path / "idx")
    original = getattr(writer_module.IndexWriter, step)
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 or step != "commit_shard":  # the add encodes two shards of new prompts
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(writer_module.IndexWriter, step, dying)
    with pytest.raises(KeyboardInterrupt):
        _add(tmp_path / "idx", [second], tiny_clip_dir)
    monkeypatch.setattr(writer_module.IndexWriter, step, original)
    after_kill = _rows(tmp_path / "idx")  # the old index, whole
    assert after_kill[1] == before[1] and np.array_equal(after_kill[2], before[2])
    _add(tmp_path / "idx", [second], tiny_clip_dir, resume=True)
    _build([first, second], tmp_path / "all", tiny_clip_dir, index="flat")
    grown, full = _rows(tmp_path / "idx"), _rows(tmp_path / "all")
    assert grown[1] == full[1] and np.array_equal(grown[2], full[2])


def test_not_an_index_refused(tmp_path, halves, tiny_clip_dir):
    with pytest.raises(UserError, match="not a complete index"):
        _add(tmp_path / "nothing", [halves[1]], tiny_clip_dir)


def test_cli_add_refuses_in_one_line(tmp_path, halves, tiny_clip_dir, capsys):
    from img2prompt.cli import main

    code = main(["add", str(tmp_path / "nothing"), str(halves[1]), "--clip-model", str(tiny_clip_dir), "-q"])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert "not a complete index" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_add_to_hnsw_rebuilds_its_search_file(tmp_path, halves, tiny_clip_dir):
    import img2prompt

    first, second = halves
    _build([first], tmp_path / "idx", tiny_clip_dir, index="hnsw")
    result = _add(tmp_path / "idx", [second], tiny_clip_dir)
    assert result.manifest["search"]["kind"] == "hnsw" and result.manifest["count"] == 120
    assert "clip.faiss" in result.manifest["files"]
    with img2prompt.open_index(tmp_path / "idx", device="cpu", clip_model=str(tiny_clip_dir), verify=True) as index:
        (hit,) = index.search(texts=[read_data_prompts(120)[100]], k=1)
    assert hit.ids.tolist() == [100]  # data prompt 100: ids continue after the first half's 60


def test_add_to_an_int8_index_equals_building_it_all_in_int8(tmp_path, halves, tiny_clip_dir):
    """int8 MiniLM rows are quantised per row: the appended segment stores exactly what a full build stores."""
    first, second = halves
    _build([first, second], tmp_path / "all", tiny_clip_dir, index="flat", minilm_dtype="int8")
    _build([first], tmp_path / "grown", tiny_clip_dir, index="flat", minilm_dtype="int8")
    _add(tmp_path / "grown", [second], None)
    grown, full = _rows(tmp_path / "grown"), _rows(tmp_path / "all")
    assert grown[0] == full[0] and grown[1] == full[1]
    assert np.array_equal(grown[2], full[2]) and np.array_equal(grown[3], full[3])
    manifest = json.loads((tmp_path / "grown" / "manifest.json").read_text())
    assert manifest["minilm"]["dtype"] == "int8" and "segments/00001/minilm.i8" in manifest["files"]
    # the mean of the fp16 rows, as the full build sums them before quantising
    assert np.allclose(open_index(tmp_path / "grown").minilm_mean, open_index(tmp_path / "all").minilm_mean, atol=1e-6)


def test_add_to_a_pca_index_projects_the_new_keys_through_its_pca(tmp_path, halves, tiny_clip_dir):
    first, second = halves
    _build([first, second], tmp_path / "all", tiny_clip_dir, index="flat")  # full-width keys of every prompt
    _build([first], tmp_path / "grown", tiny_clip_dir, index="flat", key_dims=8)
    _add(tmp_path / "grown", [second], None)
    grown, full = open_index(tmp_path / "grown"), open_index(tmp_path / "all")
    assert grown.prompts == full.prompts and grown.key_dim == 8
    new = slice(60, grown.count)
    expected = grown.key_pca.project(np.asarray(full.clip_vectors[new], np.float32))
    assert np.allclose(np.asarray(grown.clip_vectors[new], np.float32), expected, atol=2e-3)


def test_a_second_add_while_one_runs_is_refused_and_the_index_is_untouched(tmp_path, built_index, halves,
                                                                           tiny_clip_dir):
    import shutil

    from img2prompt.index.lock import lock_folder

    index = tmp_path / "idx"
    shutil.copytree(built_index, index)
    before = (index / "manifest.json").read_bytes()
    held = lock_folder(index)  # as a first add (or build) holds it while it runs
    try:
        with pytest.raises(UserError, match="is being written by another img2prompt build"):
            _add(index, [halves[1]], tiny_clip_dir)
    finally:
        held.close()
    assert (index / "manifest.json").read_bytes() == before


def test_an_index_open_while_add_swaps_keeps_answering_then_reopens_grown(tmp_path, halves, tiny_clip_dir):
    """What a running `serve` sees: its opened (memory-mapped) index answers as before through the swap; a
    reopen (POST /admin/reload) sees the grown one."""
    import img2prompt

    first, second = halves
    _build([first], tmp_path / "idx", tiny_clip_dir, index="flat")
    with img2prompt.open_index(tmp_path / "idx", device="cpu") as opened:
        before = opened.search_texts(["a castle on a hill"], k=5)[0]
        _add(tmp_path / "idx", [second], None)
        during = opened.search_texts(["a castle on a hill"], k=5)[0]
        assert list(during.ids) == list(before.ids) and list(during.prompts) == list(before.prompts)
        assert opened.count == 60
    with img2prompt.open_index(tmp_path / "idx", device="cpu") as grown:
        assert grown.count == 120
