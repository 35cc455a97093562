"""Exact search in lanes (index/flat.py): one scanning thread per BLAS thread, each with a one-thread matmul
and its own top-k lists, merged at the end. The lists must equal one lane's (and the brute force) bit for bit,
ties included; the OpenBLAS thread count is held at one while any scan runs and restored after the last."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from img2prompt.index import blas_threads, chunks, flat
from img2prompt.index.chunks import ChunkQueue
from img2prompt.index.flat import exact_search
from img2prompt.index.segments import ConcatRows
from row_sources import CountingRows
from test_exact_scan import brute, integer_rows, write_keys


def openblas_threads() -> list[int]:
    return [pool["num_threads"] for pool in blas_threads._pools("openblas").info()]


@pytest.mark.parametrize("lanes", [2, 3, 5])
@pytest.mark.parametrize("queries, batch", [(1, 100), (16, 100), (300, 64)])
@pytest.mark.parametrize("kernel", [None, "blas", "blas_rows"])
def test_lanes_equal_one_lane_and_the_brute_force(monkeypatch, lanes, queries, batch, kernel):
    vectors = integer_rows(2_000, 16, seed=50)
    query = integer_rows(queries, 16, seed=51, dtype=np.float32)
    monkeypatch.setattr(flat, "SCAN_LANES", lanes)
    many = exact_search(vectors, query, 12, chunk=37, query_batch=batch, kernel=kernel)
    monkeypatch.setattr(flat, "SCAN_LANES", 1)
    one = exact_search(vectors, query, 12, chunk=37, query_batch=batch, kernel=kernel)
    want_scores, want_ids = brute(vectors, query, 12)
    assert len(np.unique(want_scores)) < want_scores.size  # ties cross the lanes' chunks
    for scores, ids in (many, one):
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)


def test_lanes_read_each_row_once_from_segment_files(tmp_path, monkeypatch):
    """Memory-mapped segments (advised, released) and a counted source: every row read by exactly one lane."""
    monkeypatch.setattr(flat, "SCAN_LANES", 2)
    parts = [integer_rows(count, 24, seed=60 + i) for i, count in enumerate((401, 3, 350))]
    maps = [write_keys(tmp_path / f"clip{i}.f16", part) for i, part in enumerate(parts)]
    query = integer_rows(20, 24, seed=63, dtype=np.float32)
    whole = np.concatenate(parts)
    np.testing.assert_array_equal(exact_search(ConcatRows(maps), query, 9, chunk=50)[1], brute(whole, query, 9)[1])
    counted = [CountingRows(part) for part in parts]
    exact_search(ConcatRows(counted), query, 9, chunk=50)
    assert [part.rows_read for part in counted] == [401, 3, 350]

    with ChunkQueue(ConcatRows(maps), 50, lanes=2) as queue:  # two lanes draining one queue
        seen: list[tuple[int, np.ndarray]] = []

        def drain():
            for start, block in queue.lane():
                seen.append((start, block.copy()))

        threads = [threading.Thread(target=drain) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        released = queue.reader.released
    assert sorted(start for start, _ in seen) == list(range(0, len(whole), 50))
    for start, block in seen:
        np.testing.assert_array_equal(block, whole[start:start + 50].astype(np.float32))
    assert whole.nbytes <= released < whole.nbytes + 3 * 5 * 4096  # each converted byte unmapped once


def test_an_error_in_a_lane_reaches_the_caller_and_every_lane_stops(monkeypatch):
    """The failing lane cancels the queue: the other lane stops after its current chunk, not at the end."""
    class FailingRows(CountingRows):
        def __getitem__(self, key):
            if isinstance(key, slice) and key.start == 500:  # one chunk, in one lane
                raise OSError("disk read failed at row 500")
            return super().__getitem__(key)

    monkeypatch.setattr(flat, "SCAN_LANES", 2)
    before = threading.active_count()
    rows = FailingRows(integer_rows(100_000, 8, seed=64))
    with pytest.raises(OSError, match="row 500"):
        exact_search(rows, integer_rows(3, 8, seed=65, dtype=np.float32), 5, chunk=100)
    assert threading.active_count() == before and blas_threads._holders == 0
    assert rows.rows_read < 10_000  # cancelled: not the 100,000 rows a lane alone would go on to read


def test_blas_is_held_at_one_thread_while_any_scan_runs_and_restored_after_the_last():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):  # a known count to come back to
        assert set(openblas_threads()) == {2} and blas_threads.blas_threads() == min(2, len(os.sched_getaffinity(0)))
        first, second = blas_threads.one_blas_thread(), blas_threads.one_blas_thread()
        first.__enter__()
        second.__enter__()
        assert set(openblas_threads()) == {1} and blas_threads.blas_threads() >= 1
        first.__exit__(None, None, None)  # another scan still runs: still one thread
        assert set(openblas_threads()) == {1}
        second.__exit__(None, None, None)
        assert set(openblas_threads()) == {2}


def test_one_blas_thread_means_one_lane(monkeypatch):
    """OMP/OPENBLAS_NUM_THREADS=1 (or a limit) gives one lane: the scan runs in the caller's thread."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    names = []
    real = flat._run_lanes
    monkeypatch.setattr(flat, "_run_lanes", lambda work, cancel: (names.append(len(work)), real(work, cancel))[1])
    vectors, query = integer_rows(500, 8, seed=66), integer_rows(2, 8, seed=67, dtype=np.float32)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        assert flat.scan_lanes(100) == 1
        exact_search(vectors, query, 3, chunk=10)
    assert names == []
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        exact_search(vectors, query, 3, chunk=10)
        exact_search(vectors, query, 3, chunk=500)  # one chunk: one lane
    assert names == ([2] if len(os.sched_getaffinity(0)) >= 2 else [])


def test_a_lane_casts_a_chunk_in_one_single_threaded_call():
    """In a lane torch's OpenMP count is one for that thread only, and the cast is one call of the whole chunk."""
    torch = pytest.importorskip("torch")
    rows = np.random.default_rng(68).standard_normal((300, 768)).astype(np.float16)
    seen = {}

    def lane():
        chunks.serial_casts_in_this_thread()
        seen["threads"] = torch.get_num_threads()
        out = np.empty((300, 768), np.float32)
        calls = []
        real = torch.Tensor.copy_
        torch.Tensor.copy_ = lambda self, source: (calls.append(len(source)), real(self, source))[1]
        try:
            chunks.convert_into(out, rows)
        finally:
            torch.Tensor.copy_ = real
        seen["calls"], seen["equal"] = calls, np.array_equal(out, rows.astype(np.float32))

    thread = threading.Thread(target=lane)
    thread.start()
    thread.join()
    assert seen == {"threads": 1, "calls": [300], "equal": True}
    assert not getattr(chunks._lane, "serial", False)  # this thread still casts in pieces under the grain


@pytest.mark.parametrize("lanes, ahead_bytes, window", [(1, 10 * 2_400, 10), (2, 10 * 2_400, 11), (1, 100, 2)])
def test_the_read_ahead_covers_its_bytes_beyond_the_chunks_being_converted(tmp_path, lanes, ahead_bytes, window):
    """READ_AHEAD_BYTES of the file (at least READ_AHEAD_CHUNKS chunks), one more chunk per extra lane, are
    advised before anything is converted; no further until chunks are consumed."""
    import time

    keys = write_keys(tmp_path / "clip.f16", integer_rows(5_000, 24, seed=69))  # 50-row chunks: 2,400 bytes
    with ChunkQueue(keys, 50, lanes=lanes, ahead_bytes=ahead_bytes) as queue:
        want = (window + 1) * 2_400  # the chunks being converted (one) + the window
        deadline = time.monotonic() + 5
        while queue.reader.advised < want and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert queue.reader.advised == want
        lane = queue.lane()
        next(lane)
        deadline = time.monotonic() + 5
        while queue.reader.advised < want + 2_400 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.reader.advised == want + 2_400
