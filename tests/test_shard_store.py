"""build_index/shard_store.py without a cluster: a shard sent from one folder arrives in another through a
file:// store, checked; a stale, damaged or missing object is refused in one line naming its URL."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from img2prompt.build_index.shard_store import ShardStore, ShardStoreError, SharedFolder, shard_store_url
from img2prompt.errors import UserError
from img2prompt.index.layout import file_record, shard_path
from img2prompt.index.writer import ShardTask, save_shard

pytest.importorskip("fsspec")


def sent_shard(store: ShardStore, number: int = 4) -> tuple[dict, dict]:
    """Encode-like: a shard saved in a worker's temp folder, sent; (record, the files' bytes by kind)."""
    task = ShardTask(number=number, first_id=number * 3, prompts=["a red fox", "blue sky", "a castle"])
    rng = np.random.default_rng(number)
    with store.worker_folder() as folder:
        record = save_shard(folder, task, rng.standard_normal((3, 8)), rng.standard_normal((3, 6)))
        sent = {kind: shard_path(Path(folder), number, kind).read_bytes() for kind in record["files"]}
        seconds = store.send(folder, record, "test-host")
    assert not Path(folder).exists() and set(seconds) == {"send_shard"}
    return record, sent


def test_a_sent_shard_is_received_checked_then_discarded(tmp_path):
    store = ShardStore(shard_store_url(f"file://{tmp_path}/out"))
    assert store.url == f"file://{tmp_path}/out/.shards"
    record, sent = sent_shard(store)
    assert sorted(p.name for p in (tmp_path / "out" / ".shards").iterdir()) == ["00004.clip.npy", "00004.minilm.npy",
                                                                               "00004.parquet"]
    root = tmp_path / "staging"
    assert set(store.receive(record, root)) == {"receive_shard"}
    for kind, data in sent.items():
        assert shard_path(root, 4, kind).read_bytes() == data
        assert file_record(shard_path(root, 4, kind)) == record["files"][kind]
    store.discard(record)
    assert list((tmp_path / "out" / ".shards").iterdir()) == []
    store.clear()
    assert not (tmp_path / "out" / ".shards").exists()


def test_a_damaged_or_missing_object_is_refused_and_leaves_no_file(tmp_path):
    store = ShardStore(f"file://{tmp_path}/store")
    record, _ = sent_shard(store)
    victim = tmp_path / "store" / "00004.minilm.npy"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")  # same size, other bytes: only the sha256 tells
    root = tmp_path / "staging"
    with pytest.raises(UserError, match=r"^file://.*/store/00004.minilm.npy: not the bytes the Ray worker reported"):
        store.receive(record, root)
    assert not shard_path(root, 4, "minilm").exists()
    victim.unlink()
    with pytest.raises(UserError, match=r"00004.minilm.npy: fetching shard 4 from the store failed .*--resume$") \
            as error:
        store.receive(record, root)
    assert "\n" not in str(error.value)


def test_an_upload_that_fails_names_the_object(tmp_path, monkeypatch):
    from img2prompt import storage

    def refused(local, url):
        raise ConnectionResetError("Connection reset by peer")

    monkeypatch.setattr(storage, "put_file", refused)
    store = ShardStore(f"file://{tmp_path}/store")
    with pytest.raises(ShardStoreError, match=r"^file://.*/store/00004\.\w+.*: upload from the Ray worker on test-host "
                                              r"failed \(ConnectionResetError: Connection reset by peer\)$"):
        sent_shard(store)


def test_the_worker_probe_writes_and_leaves_nothing(tmp_path):
    store = ShardStore(shard_store_url(f"file://{tmp_path}/fresh"))
    store.check_worker("node-1")  # the prefix does not exist yet: made, probed, probe deleted
    assert list((tmp_path / "fresh" / ".shards").iterdir()) == []


def test_the_shared_folder_refuses_a_node_that_does_not_see_it(tmp_path):
    with pytest.raises(UserError, match="does not see the index folder"):
        SharedFolder(str(tmp_path / "nowhere")).check_worker("node-7")
    with pytest.raises(UserError, match="memory:// lives inside one process"):
        ShardStore("memory://x/.shards").check_driver()


@pytest.mark.parametrize("bad", [{"number": "../../x", "files": {}}, {"number": 4, "files": {"../../x": {}}},
                                 {"number": -1, "files": {"clip": {"bytes": 1, "sha256": "0" * 64}}},
                                 {"number": 4, "files": {"clip": {"bytes": "1", "sha256": "0" * 64}}}, "junk"])
def test_a_malformed_shard_record_is_refused_before_anything_is_written(tmp_path, bad):
    """A record from a worker decides which files the driver writes: only known shard kinds, a real number."""
    store = ShardStore(f"file://{tmp_path}/store")
    with pytest.raises(UserError, match=r"malformed shard record .*--resume$") as error:
        store.receive(bad, tmp_path / "staging")
    assert "\n" not in str(error.value) and not (tmp_path / "staging").exists()
