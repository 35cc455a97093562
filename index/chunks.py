"""Row chunks of stored vectors as float32, read and converted ahead of the scoring that consumes them.

Exact search is bound by the slower of reading the keys and scoring them; this module makes the reading side
run beside the scoring instead of before it. A prefetch thread fills one of two reused float32 buffers while
the caller scores the other, so no chunk-sized array is allocated per chunk:

- a C-contiguous memory map (clip.f16, or a segment's part of a ConcatRows) first gets a
  posix_fadvise(WILLNEED) over this chunk and the next, so the disk reads ahead asynchronously while the
  mapped rows convert straight into the buffer (measured here: pread into a staging buffer, then convert,
  cost 1.5-4× the CPU of converting from the map directly);
- anything else (an ndarray, Int8Rows, a row counter in the tests) is sliced once per chunk and converted.

float16 → float32 goes through torch's vectorised copy when torch is importable (measured 5× numpy's
astype on this machine), else numpy's. A float32 C-contiguous array is handed out as views, uncopied.
"""
from __future__ import annotations

import mmap
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

# torch only reads the (read-only) memory map it is given here; its warning about writes does not apply
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _torch():
    try:
        import torch
    except ImportError:  # numpy's cast is slower, and the same values
        return None
    return torch


def convert_into(out: np.ndarray, rows: np.ndarray) -> None:
    """out[:] = rows as float32, with no temporary (torch's vectorised cast for writable float16)."""
    torch = _torch() if rows.dtype == np.float16 and out.dtype == np.float32 else None
    if torch is not None and out.flags.c_contiguous and rows.flags.c_contiguous:
        torch.from_numpy(out).copy_(torch.from_numpy(rows))
    else:
        np.copyto(out, rows, casting="unsafe")


def file_span(array) -> tuple[str, int] | None:
    """(path, byte offset) of a C-contiguous memory map or a view of one (for read-ahead advice); else None."""
    if not isinstance(array, np.memmap) or not array.flags.c_contiguous or not getattr(array, "filename", None):
        return None
    mapped = getattr(array, "_mmap", None)
    if mapped is None:
        return None
    try:  # numpy maps from the allocation-granularity boundary below the memmap's offset
        base = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
        start = int(array.offset) - int(array.offset) % mmap.ALLOCATIONGRANULARITY
        offset = start + array.ctypes.data - base
        if offset < 0 or offset + array.nbytes > os.path.getsize(array.filename):
            return None
    except (TypeError, ValueError, OSError, BufferError):
        return None
    return str(array.filename), offset


def map_position(array) -> tuple[mmap.mmap, int] | None:
    """(the mmap, byte position of array's first row in it) of a read-only or shared memory map; else None.
    Copy-on-write maps ("c") are left out: unmapping their pages would drop the private changes."""
    mapped = getattr(array, "_mmap", None)
    if mapped is None or getattr(array, "mode", "c") not in ("r", "r+", "readonly", "readwrite"):
        return None
    try:
        return mapped, array.ctypes.data - np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError, BufferError):
        return None


def _pieces(vectors) -> list[tuple[int, object]]:
    """(first row, part) of each stored part: a ConcatRows' parts (one file per segment), else the array."""
    parts = getattr(vectors, "parts", None)
    if parts is None or not hasattr(vectors, "starts"):
        return [(0, vectors)]
    return [(int(first), part) for first, part in zip(vectors.starts[:-1], parts)]


class ChunkReader:
    """Fills a float32 (or float16) buffer with rows [start, stop) of the vectors."""

    def __init__(self, vectors) -> None:
        self.vectors = vectors
        self.dim = int(vectors.shape[1])
        self.pieces = []  # (first row, part, (fd, byte offset) or None)
        self.maps: dict[int, tuple[mmap.mmap, int]] = {}  # piece number → its map, for releasing read rows
        self.fds: list[int] = []
        self.released = 0  # bytes of mapped rows handed back after conversion (tests read it)
        for first, part in _pieces(vectors):
            span = file_span(part) if np.dtype(part.dtype) == np.float16 else None
            handle = None
            if span is not None:
                fd = os.open(span[0], os.O_RDONLY)
                self.fds.append(fd)
                handle = (fd, span[1])
                position = map_position(part)
                if position is not None:
                    self.maps[len(self.pieces)] = position
            self.pieces.append((first, part, handle))

    def fill(self, out: np.ndarray, start: int, stop: int, ahead: int = 0) -> None:
        """out[:stop - start] = rows [start, stop) as float32; `ahead` more rows are advised to the kernel."""
        for number, (first, part, handle) in enumerate(self.pieces):
            low, high = max(start - first, 0), min(stop - first, len(part))
            if low >= high:
                continue
            if handle is not None:
                self._advise(handle, low, min(len(part), high + ahead))
            convert_into(out[first + low - start:first + high - start], np.asarray(part[low:high]))
            if number in self.maps:
                self._release(self.maps[number], low, high)

    def _advise(self, handle: tuple[int, int], low: int, high: int) -> None:
        """Ask the kernel to read rows [low, high) now (asynchronously): the disk keeps reading while the
        rows before them convert."""
        fd, offset = handle
        if hasattr(os, "posix_fadvise") and high > low:
            row_bytes = self.dim * 2
            os.posix_fadvise(fd, offset + low * row_bytes, (high - low) * row_bytes, os.POSIX_FADV_WILLNEED)

    def _release(self, position: tuple[mmap.mmap, int], low: int, high: int) -> None:
        """Unmap rows [low, high) once converted (madvise DONTNEED): they stay in the page cache, but a scan
        of a file larger than RAM no longer makes the kernel reclaim pages this process still maps (a 28 GB
        file, one query, cold: 0.92× of `dd` without, 1.01× with; bench/RESULTS.md)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        mapped, position_of_row0 = position
        begin = position_of_row0 + low * self.dim * 2
        end = position_of_row0 + high * self.dim * 2
        begin -= begin % mmap.PAGESIZE
        try:
            mapped.madvise(mmap.MADV_DONTNEED, begin, end - begin)
            self.released += end - begin
        except (OSError, ValueError):  # advice only: the rows are already converted
            pass

    def vectors_name(self) -> str:
        names = [getattr(part, "filename", None) for _, part, _ in self.pieces]
        return ", ".join(str(name) for name in names if name) or "vectors"

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def float32_chunks(vectors, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 [rows, dim] view) for consecutive chunks; the next chunk is read while the caller
    works on this one. A view is valid until the next one is asked for (its buffer is then refilled)."""
    count = len(vectors)
    if isinstance(vectors, np.ndarray) and vectors.dtype == np.float32 and vectors.flags.c_contiguous \
            and not isinstance(vectors, np.memmap):
        for start in range(0, count, chunk_rows):
            yield start, vectors[start:start + chunk_rows]
        return
    starts = list(range(0, count, chunk_rows))
    if not starts:
        return
    reader = ChunkReader(vectors)
    buffers = [np.empty((min(chunk_rows, count), reader.dim), dtype=np.float32) for _ in range(min(2, len(starts)))]

    def fill(i: int) -> None:
        stop = min(starts[i] + chunk_rows, count)
        reader.fill(buffers[i % len(buffers)], starts[i], stop, ahead=chunk_rows)

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
            pending = pool.submit(fill, 0)
            for i, start in enumerate(starts):
                pending.result()
                if i + 1 < len(starts):  # the buffer handed out last time is free again
                    pending = pool.submit(fill, i + 1)
                yield start, buffers[i % len(buffers)][:min(chunk_rows, count - start)]
            pending.result()
    finally:
        reader.close()
