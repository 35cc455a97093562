"""The torch exact backend split over several devices and streamed through bounded buffers, on the CPU:
two `cpu` devices stand in for cuda:0,cuda:1 (the same split, threads and merge; the CUDA copy stream and
pinned buffers are not run here: GPU not measured)."""
from __future__ import annotations

import numpy as np
import pytest

from img2prompt.index import torch_exact
from img2prompt.index.flat import exact_search
from img2prompt.index.torch_exact import TorchExactBackend
from row_sources import CountingRows, unit_rows


@pytest.fixture(scope="module")
def keys() -> np.ndarray:
    return unit_rows(5_000, 32, seed=1).astype(np.float16)


@pytest.mark.parametrize("queries", [1, 16, 256])
@pytest.mark.parametrize("devices", ["cpu", "cpu,cpu", ["cpu", "cpu", "cpu"]])
def test_shares_streamed_equal_flat(keys, devices, queries, monkeypatch):
    monkeypatch.setattr(torch_exact, "STREAM_BYTES", 200 * 32 * 2)  # 200-row streamed chunks
    query = unit_rows(queries, 32, seed=2)
    backend = TorchExactBackend(keys, {}, device=devices, chunk_rows=700, memory_budget=1_000 * 32 * 4)
    shares = backend.shares
    assert len(shares) == (1 if devices == "cpu" else len(devices.split(",")) if isinstance(devices, str) else 3)
    assert [share.low for share in shares] == sorted(share.low for share in shares) and shares[-1].high == len(keys)
    assert backend.resident_rows * 32 * 4 <= 1_000 * 32 * 4  # the budget, over every share
    assert all(share.resident_rows < len(share) for share in shares)  # every share streams some rows
    scores, ids = backend.search(query, 10)
    flat_scores, flat_ids = exact_search(keys, query, 10)
    np.testing.assert_array_equal(ids, flat_ids)
    np.testing.assert_allclose(scores, flat_scores, rtol=0, atol=1e-6)


def test_each_share_reads_its_rows_once(keys, monkeypatch):
    monkeypatch.setattr(torch_exact, "STREAM_BYTES", 128 * 32 * 2)
    source = CountingRows(keys)
    backend = TorchExactBackend(source, {}, device="cpu,cpu", chunk_rows=500, memory_budget=0)
    assert backend.resident_rows == 0 and source.rows_read == 0
    monkeypatch.setattr(backend, "query_batch", lambda: 64)  # eight query batches
    query = unit_rows(512, 32, seed=3)
    scores, ids = backend.search(query, 5)
    assert len(keys) <= source.rows_read <= len(keys) + 2 * len(query) * 5  # one pass + the re-scored rows
    np.testing.assert_array_equal(ids, exact_search(keys, query, 5)[1])


def test_cpu_resident_rows_obey_the_default_budget(keys, monkeypatch):
    monkeypatch.setattr(torch_exact, "CPU_RESIDENT_BYTES", 1_500 * 32 * 4)
    backend = TorchExactBackend(keys, {}, device="cpu", chunk_rows=1_000)
    assert backend.resident_rows == 1_000  # a second 1,000-row chunk would pass 1,500 rows' worth
    query = unit_rows(4, 32, seed=4)
    np.testing.assert_array_equal(backend.search(query, 7)[1], exact_search(keys, query, 7)[1])


def test_duplicate_rows_rank_in_row_order_across_shares():
    row = unit_rows(1, 16, seed=5).astype(np.float16)
    keys = np.repeat(row, 40, axis=0)
    backend = TorchExactBackend(keys, {}, device="cpu,cpu", chunk_rows=8, memory_budget=0)
    scores, ids = backend.search(row.astype(np.float32), 40)
    assert ids[0].tolist() == list(range(40))


def test_a_device_list_names_each_device():
    from img2prompt.errors import UserError

    with pytest.raises(UserError, match="mixes CPU and CUDA|no CUDA device"):
        TorchExactBackend(np.zeros((4, 8), np.float16), {}, device="cpu,cuda:0")
