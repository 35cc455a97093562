"""Exact flat search (index/flat.py over index/chunks.py and index/topk.py) against a numpy brute force.

Keys and queries hold small integers, so every inner product is exact in float32 whatever the summation
order of the kernel: the answers must then equal the brute force bit for bit, ties included (many rows
share a score; equal scores rank in row order)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from img2prompt.index import flat, topk
from img2prompt.index.chunks import ChunkReader, convert_into, file_span, float32_chunks, map_position
from img2prompt.index.flat import FlatBackend, exact_search
from img2prompt.index.segments import ConcatRows
from row_sources import CountingRows


def integer_rows(count: int, dim: int, seed: int, dtype=np.float16) -> np.ndarray:
    return np.random.default_rng(seed).integers(-3, 4, size=(count, dim)).astype(dtype)


def brute(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ np.asarray(vectors, dtype=np.float64).T  # exact for these integers
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1).astype(np.float32), order


def write_keys(path, rows: np.ndarray) -> np.memmap:
    rows.tofile(path)
    return np.memmap(path, dtype=np.float16, mode="r", shape=rows.shape)


@pytest.mark.parametrize("kernel", ["blas", "blas_rows", "faiss"])
@pytest.mark.parametrize("queries", [1, 16, 256])
@pytest.mark.parametrize("chunk", [7, 64, None])
def test_equals_brute_force_with_ties(kernel, queries, chunk):
    vectors = integer_rows(1_000, 16, seed=1)
    query = integer_rows(queries, 16, seed=2, dtype=np.float32)
    scores, ids = exact_search(vectors, query, 10, chunk=chunk, query_batch=100, kernel=kernel)
    want_scores, want_ids = brute(vectors, query, 10)
    assert len(np.unique(want_scores)) < want_scores.size  # ties are there to be ranked
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)


def test_duplicate_rows_rank_in_row_order():
    row = integer_rows(1, 8, seed=3)
    vectors = np.repeat(row, 50, axis=0)
    vectors[::7] = 0  # some rows score 0
    scores, ids = exact_search(vectors, row.astype(np.float32), 12, chunk=5)
    expected = [i for i in range(50) if i % 7][:12]
    assert ids[0].tolist() == expected and len(set(scores[0].tolist())) == 1


def test_k_beyond_the_rows_gives_every_row():
    vectors = integer_rows(9, 8, seed=4)
    query = integer_rows(3, 8, seed=5, dtype=np.float32)
    scores, ids = exact_search(vectors, query, 50, chunk=2)
    want_scores, want_ids = brute(vectors, query, 9)
    assert ids.shape == (3, 9)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)
    assert FlatBackend(vectors, {}).search(query, 50)[1].shape == (3, 9)


@pytest.mark.parametrize("queries", [1, 16, 256])
def test_several_segment_files_read_ahead(tmp_path, queries):
    """Three memory-mapped segment files (a ConcatRows, as an index with adds has), chunks straddling them,
    and a key range that starts inside the first: each advised and read ahead, equal to the brute force."""
    parts = [integer_rows(count, 24, seed=10 + i) for i, count in enumerate((301, 5, 250))]
    maps = [write_keys(tmp_path / f"clip{i}.f16", part) for i, part in enumerate(parts)]
    rows = ConcatRows(maps)
    whole = np.concatenate(parts)
    query = integer_rows(queries, 24, seed=20, dtype=np.float32)
    for source, reference in ((rows, whole), (rows[40:500], whole[40:500])):
        scores, ids = exact_search(source, query, 8, chunk=64)
        want_scores, want_ids = brute(reference, query, 8)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)


def test_file_span_finds_the_bytes_of_a_memmap_view(tmp_path):
    rows = integer_rows(100, 4, seed=6)
    path = tmp_path / "keys.npy"
    np.save(path, rows)
    mapped = np.load(path, mmap_mode="r")  # a header before the rows: offset 128
    name, offset = file_span(mapped[30:60])
    with open(name, "rb") as handle:
        handle.seek(offset)
        read = np.frombuffer(handle.read(30 * 4 * 2), dtype=np.float16).reshape(30, 4)
    np.testing.assert_array_equal(read, rows[30:60])
    assert file_span(rows) is None and file_span(mapped[:, :2]) is None  # not a map; not contiguous
    chunks = [(start, block.copy()) for start, block in float32_chunks(mapped[30:60], 7)]
    assert [start for start, _ in chunks] == [0, 7, 14, 21, 28]
    np.testing.assert_array_equal(np.concatenate([block for _, block in chunks]), rows[30:60].astype(np.float32))


def test_converted_rows_of_a_map_are_released_but_a_copy_on_write_map_keeps_its_changes(tmp_path):
    """Rows of a read-only map are unmapped once converted (a scan larger than RAM must not leave them mapped),
    each byte of them once; the answers are unchanged. A copy-on-write map is never released: its changed
    rows live only in this process, and the scan must see them."""
    rows = integer_rows(3_000, 32, seed=30)
    path = tmp_path / "clip.f16"
    mapped = write_keys(path, rows)
    reader = ChunkReader(mapped)
    out = np.empty((3_000, 32), np.float32)
    for start in range(0, 3_000, 700):  # chunk boundaries inside pages: a shared page is released twice
        reader.fill(out[:min(700, 3_000 - start)], start, min(start + 700, 3_000))
        np.testing.assert_array_equal(out[:min(700, 3_000 - start)], rows[start:start + 700].astype(np.float32))
    reader.close()
    assert rows.nbytes <= reader.released < rows.nbytes + 5 * 4096
    query = integer_rows(4, 32, seed=31, dtype=np.float32)
    np.testing.assert_array_equal(exact_search(mapped, query, 5, chunk=333)[1], brute(rows, query, 5)[1])

    private = np.memmap(path, dtype=np.float16, mode="c", shape=rows.shape)
    private[2_999] = query[0].astype(np.float16) * 3  # only in this process: the best row for query 0
    reader = ChunkReader(private)
    reader.fill(out, 0, 3_000)
    assert out[2_999].tolist() == (query[0] * 3).tolist() and reader.released == 0
    assert map_position(private) is None and map_position(mapped[10:20])[1] == 10 * 32 * 2
    assert exact_search(private, query, 1, chunk=128)[1][0, 0] == 2_999


@pytest.mark.parametrize("count", [1, 42, 43, 100])
def test_the_cast_in_serial_pieces_covers_every_row(count):
    """768-d rows are cast 42 at a time (under torch's parallel grain): every piece, the last short one too."""
    rows = np.random.default_rng(count).standard_normal((count, 768)).astype(np.float16)
    out = np.full((count, 768), np.nan, np.float32)
    convert_into(out, rows)
    np.testing.assert_array_equal(out, rows.astype(np.float32))


def test_a_scan_advises_every_byte_of_its_files_in_pieces_the_kernel_reads_whole(tmp_path, monkeypatch):
    """Linux reads only the first max(read_ahead_kb, max_sectors_kb) of one WILLNEED advice: a range is
    advised whole, in pieces of at most ADVICE_BYTES; a scan's advice thread stops before the files close."""
    from img2prompt.index import chunks

    calls, closed = [], []
    monkeypatch.setattr(chunks.os, "posix_fadvise", lambda fd, offset, length, advice: calls.append(
        (fd, offset, length, advice, fd in closed)))
    real_close = chunks.os.close
    monkeypatch.setattr(chunks.os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    monkeypatch.setattr(chunks, "ADVICE_BYTES", 1_000)
    parts = [integer_rows(count, 24, seed=40 + i) for i, count in enumerate((700, 333))]
    maps = [write_keys(tmp_path / f"clip{i}.f16", part) for i, part in enumerate(parts)]
    query = integer_rows(3, 24, seed=42, dtype=np.float32)
    ids = exact_search(ConcatRows(maps), query, 4, chunk=100)[1]
    np.testing.assert_array_equal(ids, brute(np.concatenate(parts), query, 4)[1])
    assert all(length <= 1_000 and advice == chunks.os.POSIX_FADV_WILLNEED and not after_close
               for _, _, length, advice, after_close in calls)  # how far it got before the scan ended varies

    calls.clear()
    reader = ChunkReader(ConcatRows(maps))
    reader.advise(0, 1_033)
    reader.close()
    assert reader.advised == sum(part.nbytes for part in parts) and all(call[2] <= 1_000 for call in calls)
    for fd, part in zip(reader_fds := sorted({call[0] for call in calls}), parts):
        covered = np.zeros(part.nbytes, bool)
        for _, offset, length, _, _ in (call for call in calls if call[0] == fd):
            covered[offset:offset + length] = True
        assert covered.all()
    assert len(reader_fds) == 2


def test_each_row_is_read_once_for_many_query_batches():
    vectors = integer_rows(3_000, 16, seed=7)
    source = CountingRows(vectors)
    query = integer_rows(600, 16, seed=8, dtype=np.float32)
    scores, ids = exact_search(source, query, 5, chunk=256, query_batch=64)  # ten query batches, 12 chunks
    assert source.rows_read == len(vectors)
    np.testing.assert_array_equal(ids, brute(vectors, query, 5)[1])
    parts = [CountingRows(vectors[:1_000]), CountingRows(vectors[1_000:])]
    exact_search(ConcatRows(parts), query, 5, chunk=256)
    assert [part.rows_read for part in parts] == [1_000, 2_000]


def test_memory_does_not_grow_with_the_rows(tmp_path, monkeypatch):
    """One chunk buffer, one score tile: the same peak for 4× the rows (no chunk-sized array per chunk)."""
    monkeypatch.setattr(flat, "SCAN_BYTES", 64 * 1024)
    monkeypatch.setattr(flat, "SCORE_BYTES", 32 * 1024)
    query = integer_rows(4, 32, seed=9, dtype=np.float32)

    def peak(count: int) -> int:
        keys = write_keys(tmp_path / f"k{count}.f16", integer_rows(count, 32, seed=count))
        tracemalloc.start()
        exact_search(keys, query, 10)
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return used

    small, large = peak(20_000), peak(80_000)
    assert large < small + 64 * 1024, (small, large)  # 60,000 more rows = 3.8 MB of keys, none of it held


def test_kernel_choice_is_measured(monkeypatch):
    monkeypatch.setattr(topk, "KERNEL_TIMINGS", {})
    chosen = topk.choose_kernel(16, 8, 10, 512, work=1e12)
    timings = topk.KERNEL_TIMINGS[(16, 8, 10, 512)]
    assert set(timings) == set(topk.KERNELS) and chosen == min(timings, key=timings.get)
    assert topk.choose_kernel(3, 8, 10, 512, work=1e12) in topk.KERNELS and (4, 8, 10, 512) in topk.KERNEL_TIMINGS
    assert topk.choose_kernel(1, 8, 10, 512, work=1e3) == "blas"  # too small a search to pay for a measurement
    assert (1, 8, 10, 512) not in topk.KERNEL_TIMINGS


def test_long_tiles_are_calibrated_on_a_bounded_block(monkeypatch):
    """A 100,000-row tile is timed on CALIBRATION_ROWS rows: a search 10× that measurement's work pays for it."""
    monkeypatch.setattr(topk, "KERNEL_TIMINGS", {})
    measured = topk.CALIBRATION_PAYBACK * topk.CALIBRATION_PASSES * len(topk.KERNELS) * 16 * topk.CALIBRATION_ROWS * 8
    topk.choose_kernel(16, 8, 10, 100_000, work=2 * measured)
    assert (16, 8, 10, topk.CALIBRATION_ROWS) in topk.KERNEL_TIMINGS
