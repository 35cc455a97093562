"""`img2prompt merge`: merge(A, B) of two halves == build of both (flat), duplicates dropped and counted,
refusals (another model, out among the inputs), the CLI's one-line error. Shards of 30 rows as test_add."""
from __future__ import annotations

import json

import numpy as np
import pytest

from img2prompt.build_index.merge import MergeOptions, run_merge
from img2prompt.errors import UserError
from tests.conftest import read_data_prompts
from tests.test_add import _build, _rows, _write


def _merge(indexes, out, clip_dir, **extra):
    return run_merge(MergeOptions(indexes=[str(index) for index in indexes], out=str(out),
                                  clip_model=str(clip_dir) if clip_dir else None,
                                  shard_size=30, device="cpu", progress=False, **extra))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    prompts = read_data_prompts(120)
    folder = tmp_path_factory.mktemp("merge-corpus")
    overlap = prompts[60:] + [prompts[3].upper(), "  " + prompts[5] + " "]
    return (_write(folder / "a.txt", prompts[:60]), _write(folder / "b.txt", prompts[60:]),
            _write(folder / "c.txt", overlap))


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpora, tiny_clip_dir):
    root = tmp_path_factory.mktemp("merge-indexes")
    first, second, overlap = corpora
    _build([first, second], root / "all", tiny_clip_dir, index="flat")
    _build([first], root / "a", tiny_clip_dir, index="flat")
    _build([second], root / "b", tiny_clip_dir, index="flat")
    _build([overlap], root / "c", tiny_clip_dir, index="flat")
    return root


def test_merge_of_halves_equals_build_of_all(tmp_path, built, tiny_clip_dir):
    result = _merge([built / "a", built / "b"], tmp_path / "m", None)  # CLIP as the first manifest names it
    ids_all, prompts_all, clip_all, minilm_all = _rows(built / "all")
    ids, prompts, clip, minilm = _rows(tmp_path / "m")
    assert ids == ids_all and prompts == prompts_all
    assert np.array_equal(clip, clip_all) and np.array_equal(minilm, minilm_all)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["count"] == 120 and manifest["search"]["kind"] == "flat"
    assert [entry["duplicates"] for entry in result.report["merged"]] == [0, 0]
    query = clip_all[7].astype(np.float32)
    assert np.array_equal(np.argsort(-(clip_all.astype(np.float32) @ query), kind="stable")[:10],
                          np.argsort(-(clip.astype(np.float32) @ query), kind="stable")[:10])


@pytest.mark.slow
def test_search_through_the_api_matches(tmp_path, built, tiny_clip_dir, sample_images):
    import img2prompt
    from img2prompt import merge  # the package-level API name

    merge([built / "a", built / "b"], tmp_path / "m", clip_model=str(tiny_clip_dir), device="cpu",
                     shard_size=30, progress=False)
    images = sorted(str(path) for path in sample_images.iterdir())[:2]
    found = []
    for path in (built / "all", tmp_path / "m"):
        with img2prompt.open_index(path, device="cpu", clip_model=str(tiny_clip_dir)) as index:
            found.append([(result.ids.tolist(), np.round(result.scores, 5).tolist(), result.prompts)
                          for result in index.search(images, k=5)])
    assert found[0] == found[1]


def test_overlap_dropped_and_counted(tmp_path, built, tiny_clip_dir):
    result = _merge([built / "a", built / "c"], tmp_path / "m", tiny_clip_dir)
    ids, prompts, clip, _ = _rows(tmp_path / "m")
    assert len(prompts) == 120 and ids == list(range(120))
    assert [entry["duplicates"] for entry in result.report["merged"]] == [0, 2]
    assert result.report["skipped"]["duplicate_of_earlier_index"] == 2
    _, prompts_all, clip_all, _ = _rows(built / "all")
    assert prompts == prompts_all and np.array_equal(clip, clip_all)  # the first index's copy won


def test_another_model_refused(tmp_path, built, corpora, tiny_clip_dir, other_clip_dir):
    _build([corpora[1]], tmp_path / "other", other_clip_dir, index="flat")
    with pytest.raises(UserError, match=r"other.*merge needs the same models"):
        _merge([built / "a", tmp_path / "other"], tmp_path / "m", tiny_clip_dir)
    assert not (tmp_path / "m").exists()
    with pytest.raises(UserError, match="own models"):  # the given model must be the inputs' one too
        _merge([built / "a", built / "b"], tmp_path / "m", other_clip_dir)


def test_out_among_inputs_refused(built, tiny_clip_dir):
    before = (built / "a" / "manifest.json").read_bytes()
    with pytest.raises(UserError, match="must not be one of the merged"):
        _merge([built / "a", built / "b"], built / "a", tiny_clip_dir, overwrite=True)
    assert (built / "a" / "manifest.json").read_bytes() == before


def test_cli_one_line_error(tmp_path, built, tiny_clip_dir, capsys):
    from img2prompt.cli import main

    code = main(["merge", str(built / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "m"),
                 "--clip-model", str(tiny_clip_dir), "--device", "cpu", "-q"])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and "Traceback" not in err
