"""Boundaries of build_index/shard_store.py (issue 35's mutation pass, docs/mutation.md): shard number 0 is a
valid record and -1 is not, a store error at a worker's probe is one line naming its type (a UserError passes
as itself), the quoted reasons are cut at their stated lengths (200, record 120), and the phase seconds are
durations (not clock readings)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from img2prompt import storage
from img2prompt.build_index.shard_store import ShardStore, ShardStoreError, check_record
from img2prompt.errors import UserError
from img2prompt.index.layout import shard_path
from img2prompt.index.writer import ShardTask, save_shard

LISTED = {"bytes": 3, "sha256": "ab" * 32}


def test_shard_number_zero_is_valid_and_negative_is_not():
    check_record("u", {"number": 0, "files": {"clip": LISTED}})
    for bad in (-1, True, 1.0, None):
        with pytest.raises(UserError, match="a Ray worker returned a malformed shard record"):
            check_record("u", {"number": bad, "files": {"clip": LISTED}})


def test_the_record_is_quoted_up_to_120_characters():
    record = {"number": -1, "files": {}, "pad": "x" * 200}
    with pytest.raises(UserError) as caught:
        check_record("u", record)
    assert f"record ({repr(record)[:120]}…);" in str(caught.value)


def _sent(store: ShardStore, number: int = 0) -> tuple[dict, dict]:
    task = ShardTask(number=number, first_id=0, prompts=["a red fox", "blue sky"])
    rng = np.random.default_rng(number)
    with store.worker_folder() as folder:
        record = save_shard(folder, task, rng.standard_normal((2, 8)), rng.standard_normal((2, 6)))
        seconds = store.send(folder, record, "host")
    return record, seconds


def test_shard_zero_round_trips_and_the_phase_seconds_are_durations(tmp_path):
    store = ShardStore(f"file://{tmp_path}/store")
    record, sent = _sent(store)
    received = store.receive(record, tmp_path / "staging")
    for seconds in (sent["send_shard"], received["receive_shard"]):
        assert 0 <= seconds < 600  # a duration of this one step, not the perf_counter clock itself
    assert shard_path(tmp_path / "staging", 0, "minilm").is_file()


@pytest.mark.parametrize("error, expected", [
    (UserError("fsspec is missing: pip install img2prompt[remote]"), "^fsspec is missing: pip install"),
    (PermissionError("x" * 201), r"cannot write there \(PermissionError: " + "x" * 200 + "…\\): give every node"),
])
def test_a_worker_probe_failure_is_one_line(tmp_path, monkeypatch, error, expected):
    def refused(local, url):
        raise error

    monkeypatch.setattr(storage, "put_file", refused)
    with pytest.raises(UserError, match=expected):
        ShardStore(f"file://{tmp_path}/store").check_worker("host")


def test_upload_and_fetch_reasons_are_cut_at_200_characters(tmp_path, monkeypatch):
    store = ShardStore(f"file://{tmp_path}/store")
    record, _ = _sent(store)

    def broken(*args):
        raise ConnectionResetError("y" * 201)

    monkeypatch.setattr(storage, "get_file", broken)
    with pytest.raises(UserError, match=r"\(ConnectionResetError: " + "y" * 200 + "…\\); run again with --resume"):
        store.receive(record, tmp_path / "staging")
    monkeypatch.setattr(storage, "put_file", broken)
    with pytest.raises(ShardStoreError, match=r"failed \(ConnectionResetError: " + "y" * 200 + "…\\)$"):
        _sent(store)
