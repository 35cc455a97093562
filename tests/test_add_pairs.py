"""`add --pairs` and adds to an index with image keys: new rows become key ranges of their own (text keys no
longer contiguous), backends per new range, the calibration fitted when the first image keys arrive."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import img2prompt
from img2prompt.build_index.add import AddOptions, run_add
from img2prompt.encoders.clip_ensemble import ClipEnsemble
from img2prompt.encoders.image_embed import embed_images
from img2prompt.errors import UserError
from img2prompt.index.reader import open_index
from tests.conftest import DATA, read_data_prompts

IMAGES = sorted((DATA / "images").glob("*.png"))  # six small generated images


def _pairs(path, rows):
    pd.DataFrame(rows, columns=["image", "prompt"]).to_csv(path, index=False)
    return path


def _add(index, corpus=(), pairs=None, **extra):
    return run_add(AddOptions(index=str(index), corpus=[str(path) for path in corpus],
                              pairs=[str(path) for path in pairs] if pairs else None, shard_size=32, batch_size=16,
                              device="cpu", progress=False, **extra))


def _build(out, clip_dir, corpus, pairs=None):
    img2prompt.build([str(corpus)], out, clip_model=str(clip_dir), pairs=[str(pairs)] if pairs else None,
                     shard_size=32, batch_size=16, device="cpu", progress=False)


def _own_image_finds_itself(index, clip, image_ids: dict[int, str]) -> None:
    """Each image's own CLIP image vector, searched in the range that holds it, returns its row first."""
    vectors = embed_images(ClipEnsemble([clip]), list(image_ids.values()), batch_size=4).vectors
    for (row, _), vector in zip(image_ids.items(), vectors):
        (key_range,) = [r for r in index.key_ranges if r.start <= row < r.stop]
        assert key_range.keys == "image"
        _, found = index.open_backend("cpu", key_range).search(np.asarray([vector], np.float32), 1)
        assert int(found[0, 0]) + key_range.start == row


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs-add")
    prompts = read_data_prompts(140)
    (folder / "old.txt").write_text("\n".join(prompts[:80]) + "\n", encoding="utf-8")
    (folder / "new.txt").write_text("\n".join(prompts[80:100]) + "\n", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"not an image")
    first = _pairs(folder / "first.csv", [(str(path), prompt) for path, prompt in zip(IMAGES[:4], prompts[100:104])])
    later = _pairs(folder / "later.csv", [(str(IMAGES[4]), prompts[104]), (str(IMAGES[5]), prompts[105]),
                                          ("broken.png", "an undecodable image"), (str(IMAGES[4]), "listed again")])
    return folder, first, later


def test_pairs_added_to_a_text_index_grow_its_text_range_and_get_an_image_range(tmp_path, corpora, tiny_clip_dir,
                                                                                clip):
    folder, first, _ = corpora
    _build(tmp_path / "idx", tiny_clip_dir, folder / "old.txt")
    result = _add(tmp_path / "idx", [folder / "new.txt"], [first])
    index = open_index(tmp_path / "idx", verify=True)
    assert [(r.keys, r.start, r.stop, r.folder) for r in index.key_ranges] == [
        ("text", 0, 100, ""), ("image", 100, 104, "segments/00001/image_keys")]
    assert "calibration" in index.manifest and set(index.calibration) == {"image", "text"}
    assert index.prompt_rows(range(100, 104)) == read_data_prompts(104)[100:104]
    assert result.manifest["history"][-1]["count"] == 24
    _own_image_finds_itself(index, clip, {100 + n: str(path) for n, path in enumerate(IMAGES[:4])})
    assert index.regression_head.rows == {"text": 100, "image": 4}


def test_an_index_with_image_keys_grows_by_ranges_of_its_own(tmp_path, corpora, tiny_clip_dir, clip):
    folder, first, later = corpora
    _build(tmp_path / "idx", tiny_clip_dir, folder / "old.txt", first)
    before = open_index(tmp_path / "idx")
    calibration = before.manifest["calibration"]
    result = _add(tmp_path / "idx", [folder / "new.txt"], [later])
    index = open_index(tmp_path / "idx", verify=True)
    assert [(r.keys, r.start, r.stop) for r in index.key_ranges] == [
        ("text", 0, 80), ("image", 80, 84), ("text", 84, 104), ("image", 104, 106)]
    assert index.manifest["calibration"] == calibration  # fitted on the first ranges, which did not change
    assert result.report["pairs"]["skipped"] == {"duplicate_image": 1, "unreadable_image": 1}
    _own_image_finds_itself(index, clip, {81: str(IMAGES[1]), 104: str(IMAGES[4]), 105: str(IMAGES[5])})
    with img2prompt.open_index(tmp_path / "idx", device="cpu") as opened:  # a new text prompt, through the API
        (hit,) = opened.search_texts([read_data_prompts(100)[90]], k=1)
    assert hit.ids.tolist() == [94]  # prompt 90 of the corpus: row 84 + 10
    assert index.regression_head.rows == {"text": 100, "image": 6}


def test_add_needs_something_to_add(tmp_path, corpora, tiny_clip_dir):
    folder, _, _ = corpora
    _build(tmp_path / "idx", tiny_clip_dir, folder / "old.txt")
    with pytest.raises(UserError, match="nothing to add"):
        _add(tmp_path / "idx")


def test_new_ranges_too_small_for_the_index_kind_are_planned_by_size(tmp_path, corpora, tiny_clip_dir, monkeypatch):
    from img2prompt.index.hnsw import HnswBackend

    folder, first, later = corpora
    img2prompt.build([str(folder / "old.txt")], tmp_path / "idx", clip_model=str(tiny_clip_dir), pairs=[str(first)],
                     index="hnsw", shard_size=32, batch_size=16, device="cpu", progress=False)
    monkeypatch.setattr(HnswBackend, "min_count", 1_000)  # as IVF-PQ's 10,000: 20 new text rows cannot train it
    _add(tmp_path / "idx", [folder / "new.txt"], [later])
    index = open_index(tmp_path / "idx", verify=True)
    assert [(r.keys, r.plan["kind"]) for r in index.key_ranges] == [
        ("text", "hnsw"), ("image", "hnsw"), ("text", "flat"), ("image", "flat")]
    # the build's ranges keep their structures, linked in unchanged
    assert {"clip.faiss", "image_keys/clip.faiss"} <= set(index.manifest["files"])
