"""A Kaggle kit of a grown index: build, `add`, `kaggle-kit` (wheels stubbed), then the kit's own submit.py.

Public behaviour only (the add's internals are being reworked): the kit must carry every file the grown
index's manifest lists, whatever their names; its submission must equal the one `img2prompt submit` writes
from the grown index itself; and the added prompts must be found through the kit."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import img2prompt
from conftest import KAGGLE_SAMPLE, read_data_prompts, run_cli, shared_marks
from img2prompt.index.layout import MANIFEST, file_record
from kit_helpers import build_stub_kit
from test_kit_submit import run_submit_in_process

pytestmark = shared_marks("kaggle-sample/images")

FIRST, ADDED = 60, 40  # data prompts 0..59 built, 60..99 added


@pytest.fixture(scope="module")
def grown(tmp_path_factory, tiny_clip_dir) -> Path:
    """An hnsw index (so the kit also carries a search file) of 60 prompts grown by 40 through `add`."""
    folder = tmp_path_factory.mktemp("grown-kit")
    prompts = read_data_prompts(FIRST + ADDED)
    (folder / "a.txt").write_text("\n".join(prompts[:FIRST]) + "\n", encoding="utf-8")
    (folder / "b.txt").write_text("\n".join(prompts[FIRST:]) + "\n", encoding="utf-8")
    index = folder / "idx"
    img2prompt.build(folder / "a.txt", index, clip_model=str(tiny_clip_dir), index="hnsw", device="cpu",
                     shard_size=30, batch_size=30, progress=False)
    result = img2prompt.add(index, folder / "b.txt", device="cpu", shard_size=30, batch_size=30, progress=False)
    assert result.manifest["count"] == FIRST + ADDED and result.manifest["search"]["kind"] == "hnsw"
    return index


@pytest.fixture(scope="module")
def kit(grown, tmp_path_factory) -> Path:
    return build_stub_kit(grown, tmp_path_factory.mktemp("grown-kit-out") / "kit")


def test_the_kit_carries_every_file_the_grown_manifest_lists(grown, kit):
    manifest = json.loads((grown / MANIFEST).read_text())
    listed = {MANIFEST, *manifest["files"]}
    carried = {str(path.relative_to(kit / "index")) for path in (kit / "index").rglob("*") if path.is_file()}
    assert carried == listed
    for name in listed:  # byte for byte the grown index's files
        assert file_record(kit / "index" / name) == file_record(grown / name), name
    records = json.loads((kit / "kit.json").read_text())["index"]
    assert set(records["files"]) == listed and records["count"] == FIRST + ADDED


@pytest.mark.slow  # a CLI subprocess
def test_the_kit_submission_equals_submit_on_the_grown_index(grown, kit, tiny_clip_dir, tmp_path, monkeypatch):
    images, sample = KAGGLE_SAMPLE / "images", KAGGLE_SAMPLE / "sample_submission.csv"
    direct = tmp_path / "direct.csv"
    done = run_cli("-q", "submit", grown, images, "--out", direct, "--sample-submission", sample,
                   "--clip-model", tiny_clip_dir)  # device auto, as the kit's notebook opens it
    assert done.returncode == 0, done.stderr
    through_kit = tmp_path / "kit.csv"
    printed = run_submit_in_process(kit, images, through_kit, monkeypatch)
    assert "index verified: " in printed
    ours, theirs = pd.read_csv(through_kit), pd.read_csv(direct)
    assert len(theirs) == 7 * 384
    assert ours["imgId_eId"].tolist() == theirs["imgId_eId"].tolist() == pd.read_csv(sample)["imgId_eId"].tolist()
    np.testing.assert_allclose(ours["val"].to_numpy(), theirs["val"].to_numpy(), rtol=0, atol=1e-6)


def test_added_prompts_are_found_through_the_kit(kit):
    """Each prompt's own CLIP text vector as the query: the kit's index ranks that prompt (its id) first, the
    added ones (ids 60..99, after the first build's) as well as the built ones."""
    prompts = read_data_prompts(FIRST + ADDED)
    chosen = [0, 7, FIRST - 1, FIRST, FIRST + 13, FIRST + ADDED - 1]
    with img2prompt.open_index(kit / "index", device="cpu", clip_model=str(kit / "clip"), verify=True) as index:
        assert index.count == FIRST + ADDED
        hits = index.search_texts([prompts[number] for number in chosen], k=3)
    assert [hit.ids[0] for hit in hits] == chosen
    assert [hit.prompts[0] for hit in hits] == [prompts[number] for number in chosen]
    np.testing.assert_allclose([hit.scores[0] for hit in hits], 1.0, atol=2e-3)  # the vector itself (fp16)
