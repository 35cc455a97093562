"""What `add` checks in the index it grows (issue #30): a damaged or lying regression_stats.npz is one line
naming the file and "rebuild" (never a traceback, never a NaN head), and a --key-dims index's PCA is measured
again on add (and refitted with --retrain)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile

import numpy as np
import pytest

from img2prompt.build_index.add import AddOptions, run_add
from img2prompt.cli import main
from img2prompt.errors import UserError
from tests.conftest import read_data_prompts
from tests.test_add_grow import _add, _build

STATS = "regression_stats.npz"


@pytest.fixture(scope="module")
def stats_index(tmp_path_factory, tiny_clip_dir):
    """A 40-prompt flat index with a ridge head (and its kept statistics), and 10 new prompts to add."""
    prompts = read_data_prompts(50)
    folder = tmp_path_factory.mktemp("stats")
    (folder / "old.txt").write_text("\n".join(prompts[:40]) + "\n", encoding="utf-8")
    (folder / "new.txt").write_text("\n".join(prompts[40:]) + "\n", encoding="utf-8")
    _build([folder / "old.txt"], folder / "idx", tiny_clip_dir, index="flat")
    return folder


def _arrays(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _save(path, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


def _rerecord(index, name: str) -> None:
    """The manifest's size and checksum follow the tampered file: only its content lies."""
    manifest_path = index / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = (index / name).read_bytes()
    manifest["files"][name].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest_path.write_text(json.dumps(manifest))


def _flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:  # a byte in the middle of the first member's data
        info = archive.infolist()[0]
    data[info.header_offset + 30 + len(info.filename) + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _object_header(path) -> None:
    """One array's npy header says object dtype (a flipped header): loading it would need pickle."""
    arrays = _arrays(path)
    _save(path, {**arrays, "stride": np.array([int(arrays["stride"])], dtype=object)})


def _edit(**changes):
    def change(path):
        arrays = _arrays(path)
        for name, value in changes.items():
            if value is None:
                del arrays[name]
            else:
                arrays[name] = value(arrays[name]) if callable(value) else value
        _save(path, arrays)
    return change


def _nan(values):
    values = values.copy()
    values.flat[0] = np.nan
    return values


TAMPERINGS = {
    "flipped byte": (_flip_byte, "not readable"),
    "object header": (_object_header, "not readable"),
    "held-out id out of range": (_edit(text_held_ids=lambda ids: np.append(ids, 10_000)), "held-out row ids"),
    "negative held-out id": (_edit(text_held_ids=lambda ids: np.append(ids, -1)), "held-out row ids"),
    "wrong dims": (_edit(dims=np.array([32, 384])), "dims"),
    "wrong sum shape": (_edit(text_sxx=lambda sxx: sxx[:-1]), "'text_sxx' has shape"),
    "missing key": (_edit(text_sxy=None), "no 'text_sxy' array"),
    "stride 0": (_edit(stride=np.int64(0)), "stride 0"),
    "NaN sums": (_edit(text_sxy=_nan), "NaN or infinite"),
    "inf sums": (_edit(text_sx=lambda sx: sx + np.inf), "NaN or infinite"),
    "negative row count": (_edit(text_n=np.int64(-5)), "row counts"),
    "float ids": (_edit(text_held_ids=lambda ids: ids.astype(np.float64)), "expected integers"),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_a_damaged_or_lying_regression_stats_is_one_line_naming_it(case, stats_index, tmp_path):
    index = tmp_path / "idx"
    shutil.copytree(stats_index / "idx", index)
    tamper, says = TAMPERINGS[case]
    tamper(index / STATS)
    _rerecord(index, STATS)
    before = (index / "manifest.json").read_bytes()
    with pytest.raises(UserError) as caught:
        _add(index, [stats_index / "new.txt"])
    message = str(caught.value)
    assert "\n" not in message and str(index / STATS) in message and "rebuild" in message, message
    assert says in message, message
    assert (index / "manifest.json").read_bytes() == before  # nothing changed


def test_the_cli_refuses_a_lying_regression_stats_with_exit_2(stats_index, tmp_path, tiny_clip_dir, capsys):
    index = tmp_path / "idx"
    shutil.copytree(stats_index / "idx", index)
    _edit(text_sxy=_nan)(index / STATS)
    _rerecord(index, STATS)
    code = main(["add", str(index), str(stats_index / "new.txt"), "--clip-model", str(tiny_clip_dir), "-q",
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(index / STATS) in err and "rebuild" in err and "NaN" in err


def test_intact_regression_stats_still_grow_the_head(stats_index, tmp_path):
    index = tmp_path / "idx"
    shutil.copytree(stats_index / "idx", index)
    manifest = _add(index, [stats_index / "new.txt"]).manifest
    assert manifest["count"] == 50 and manifest["regression"]["rows"] == {"text": 50}


# ---------------------------------------------------------------------------------------------- --key-dims

@pytest.fixture(scope="module")
def pca_corpus(tmp_path_factory):
    """The issue's numbers: one prompt to build on, 100 to add."""
    prompts = read_data_prompts(101)
    folder = tmp_path_factory.mktemp("pca")
    (folder / "one.txt").write_text(prompts[0] + "\n", encoding="utf-8")
    (folder / "hundred.txt").write_text("\n".join(prompts[1:]) + "\n", encoding="utf-8")
    (folder / "all.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return folder


def _full_width_truth(index, clip, prompts, k=10):
    """The grown index's top-10 by exact full-width search vs by its stored projected keys, per prompt."""
    from img2prompt.index.flat import exact_search
    from img2prompt.index.reader import open_index

    opened = open_index(index)
    full = clip.text_embeddings(prompts, 64).vectors
    _, truth = exact_search(full, full, k)
    _, found = exact_search(np.asarray(opened.clip_vectors, np.float32), opened.key_pca.project(full), k)
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found)])


def test_add_to_a_key_dims_index_measures_the_pca_again_and_retrain_refits_it(pca_corpus, tmp_path, tiny_clip_dir,
                                                                               caplog):
    from img2prompt.encoders.clip_ensemble import load_named_clips
    from img2prompt.encoders.models import resolve_device
    from img2prompt.index.reader import open_index

    clip = load_named_clips(str(tiny_clip_dir), None, resolve_device("cpu"))

    index, fresh = tmp_path / "grown", tmp_path / "fresh"
    built = _build([pca_corpus / "one.txt"], index, tiny_clip_dir, index="flat", key_dims=32).manifest["key_pca"]
    assert built["fit_rows"] == 1 and built["recall_at_10"] == 1.0
    with caplog.at_level("WARNING", logger="img2prompt"):
        grown = _add(index, [pca_corpus / "hundred.txt"]).manifest
    pca = grown["key_pca"]
    prompts = read_data_prompts(101)
    stale = _full_width_truth(index, clip, prompts)
    # measured over the whole grown index (101 rows ≤ ADD_SAMPLE), on the 100 new rows: the figure an exact
    # check of the stored keys against full width gives, not the build's 1.0
    assert pca["rows"] == 101 and pca["queries"] == 100 and pca["held_out"] is True
    assert pca["before_add"] == 1.0 and pca["fit_rows"] == 1
    assert pca["recall_at_10"] < 0.95 and abs(pca["recall_at_10"] - stale) < 0.05, (pca, stale)
    assert any("--retrain" in record.getMessage() and "key PCA" in record.getMessage() for record in caplog.records)

    retrained = run_add(AddOptions(index=str(index), corpus=[], retrain=True, shard_size=30, batch_size=30,
                                   device="cpu", progress=False)).manifest["key_pca"]
    assert retrained["fit_rows"] == 101 and retrained["refit_at_add"] is True
    assert retrained["before_add"] == pca["recall_at_10"]
    refitted = _full_width_truth(index, clip, prompts)
    assert refitted > stale + 0.1 and retrained["recall_at_10"] > pca["recall_at_10"] + 0.1, (refitted, stale)

    # the refit is the PCA a fresh build of the same 101 prompts fits: the same keys, the same searches
    reference = _build([pca_corpus / "all.txt"], fresh, tiny_clip_dir, index="flat", key_dims=32).manifest
    assert abs(reference["key_pca"]["recall_at_10"] - retrained["recall_at_10"]) < 0.02
    ours, theirs = open_index(index), open_index(fresh)
    assert np.abs(np.asarray(ours.clip_vectors, np.float32) - np.asarray(theirs.clip_vectors, np.float32)).max() < 0.02
    assert open_index(index, verify=True).count == 101  # every rewritten file re-hashed in the manifest


def test_add_pairs_to_a_key_dims_index_is_refused(pca_corpus, tmp_path, tiny_clip_dir):
    index = tmp_path / "idx"
    _build([pca_corpus / "one.txt"], index, tiny_clip_dir, index="flat", key_dims=32)
    table = tmp_path / "pairs.csv"
    table.write_text("image,prompt\nx.png,a castle\n")
    with pytest.raises(UserError, match="--pairs on an index built with --key-dims"):
        _add(index, [], pairs=[str(table)])
