"""Row chunks of stored vectors as float32, converted by the scanning threads while the disk reads ahead.

Exact search is bound by the slower of reading the keys and scoring them; this module keeps the disk busy
beside the scoring without a CPU-bound helper thread: for a C-contiguous memory map (clip.f16, or a segment's
part of a ConcatRows) an advice thread gives posix_fadvise(WILLNEED) for READ_AHEAD_BYTES (at least
READ_AHEAD_CHUNKS chunks) past the chunks being converted, in ADVICE_BYTES pieces (Linux reads only the first
read_ahead_kb of one call), so the kernel reads them while the scan converts and scores (the calls block while
the device queue is full, hence their own thread); each converted range is then unmapped (madvise DONTNEED: the
pages stay in the page cache, but a scan of a file larger than RAM no longer leaves the kernel reclaiming pages
this process maps). Anything else (an ndarray, Int8Rows, a row counter in the tests) is sliced once per chunk
and converted. ChunkQueue hands consecutive chunks to one or several scanning threads ("lanes", index/flat.py),
each converting into its own reused float32 buffer: no chunk-sized array per chunk.

Why the conversion runs in the scanning thread (it was a thread of its own until issue 31's idle-machine run):
beside OpenBLAS's two threads on two cores a conversion thread stalled the matmul (a chunk's matmul + cast
25.8 ms interleaved against 17.0 ms with the cast in the scanning thread; bench/RESULTS.md). With one lane
the cast goes in pieces under torch's parallel grain (its thread pool beside BLAS's cost more than the cast);
in a lane, whose thread runs a one-thread matmul, torch's OpenMP count is set to one for that thread and a
chunk is cast in one call (the pieces' call overhead was ≈ 37% of the cast).
A float32 C-contiguous array is handed out as views, uncopied.
"""
from __future__ import annotations

import mmap
import os
import threading
import warnings
from typing import Iterator

import numpy as np

from img2prompt.index.blas_threads import one_openmp_thread_here

READ_AHEAD_CHUNKS = 2  # at least this many chunks are advised beyond those being converted
READ_AHEAD_BYTES = 64 * 2**20  # and at least this much of the file (small chunks: as deep a read-ahead as large ones)
ADVICE_BYTES = 128 * 1024  # one read-ahead advice: Linux's smallest usual cap on what one call reads

# torch only reads the (read-only) memory map it is given here; its warning about writes does not apply
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _torch():
    try:
        import torch
    except ImportError:  # numpy's cast is slower, and the same values
        return None
    return torch


SERIAL_COPY_ELEMENTS = 32_767  # below torch's parallel grain (32,768): each piece's cast stays in this thread
_lane = threading.local()  # .serial: this thread's torch casts already run on one thread (a scan lane)


def serial_casts_in_this_thread() -> None:
    """Make torch's casts in the calling thread single-threaded (its OpenMP thread count is per thread), so a
    lane casts a chunk in one call instead of pieces under torch's parallel grain (the pieces' call overhead
    was ≈ 37% of the cast: 0.32 vs 0.20 s for 1M × 768)."""
    torch = _torch()
    if torch is None:
        return
    torch.get_num_threads()  # torch sets this thread's OpenMP count on first use: before ours, not after
    if one_openmp_thread_here():  # after torch is loaded: its runtime is then among those found
        _lane.serial = True


def convert_into(out: np.ndarray, rows: np.ndarray) -> None:
    """out[:] = rows as float32, with no temporary: torch's vectorised cast (5× numpy's here) for float16,
    in pieces small enough that torch does not wake its thread pool: beside OpenBLAS's threads, a parallel
    cast between two matmuls cost more than the cast (chunk of 21,845 × 768: matmul 14.1 ms + cast 4.4 ms ran
    25.8 ms interleaved; one-thread pieces 9.0 + 8.2 = 17.0 ms; bench/RESULTS.md)."""
    torch = _torch() if rows.dtype == np.float16 and out.dtype == np.float32 else None
    if torch is not None and out.flags.c_contiguous and rows.flags.c_contiguous and len(rows):
        target, source = torch.from_numpy(out), torch.from_numpy(rows)
        step = len(rows) if getattr(_lane, "serial", False) else max(1, SERIAL_COPY_ELEMENTS // max(1, rows[0].size))
        for first in range(0, len(rows), step):
            target[first:first + step].copy_(source[first:first + step])
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
        start = int(array.offset) - int(array.offset) % mmap.ALLOCATIONGRANULARITY
        offset = start + _position_in(mapped, array)
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
        return mapped, _position_in(mapped, array)
    except (TypeError, ValueError, BufferError):
        return None


def _position_in(mapped: mmap.mmap, array: np.ndarray) -> int:
    """Byte position of array's first element in the mmap it views."""
    return array.ctypes.data - np.frombuffer(mapped, dtype=np.uint8).ctypes.data


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
        self.advised = 0  # bytes advised to the kernel for reading (tests read it)
        self.counting = threading.Lock()  # lanes release rows concurrently
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

    @property
    def file_backed(self) -> bool:
        return bool(self.fds)

    def advise(self, start: int, stop: int) -> None:
        """Ask the kernel to read rows [start, stop) of the mapped files now; may block while it queues them."""
        for first, part, handle in self.pieces:
            low, high = max(start - first, 0), min(stop - first, len(part))
            if handle is not None and low < high:
                self._advise(handle, low, high)

    def fill(self, out: np.ndarray, start: int, stop: int, ahead: int | None = 0) -> None:
        """out[:stop - start] = rows [start, stop) as float32; `ahead` more rows are advised to the kernel
        (None: no advice here, another thread gives it)."""
        for number, (first, part, handle) in enumerate(self.pieces):
            low, high = max(start - first, 0), min(stop - first, len(part))
            if low >= high:
                continue
            if handle is not None and ahead is not None:
                self._advise(handle, low, min(len(part), high + ahead))
            convert_into(out[first + low - start:first + high - start], np.asarray(part[low:high]))
            if number in self.maps:
                self._release(self.maps[number], low, high)

    def _advise(self, handle: tuple[int, int], low: int, high: int) -> None:
        """Ask the kernel to read rows [low, high) now (asynchronously): the disk keeps reading while the
        rows before them convert."""
        fd, offset = handle
        if not hasattr(os, "posix_fadvise") or high <= low:
            return
        row_bytes = self.dim * 2
        begin, end = offset + low * row_bytes, offset + high * row_bytes
        # Linux reads at most max(read_ahead_kb, max_sectors_kb) of one WILLNEED call and drops the rest
        # (measured: one call over 1 GiB left it unread), so the range goes in ADVICE_BYTES pieces
        for piece in range(begin, end, ADVICE_BYTES):
            os.posix_fadvise(fd, piece, min(ADVICE_BYTES, end - piece), os.POSIX_FADV_WILLNEED)
        self.advised += end - begin

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
            with self.counting:
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


class _AdviceThread:
    """Advises the chunks of a scan to the kernel, at most `window` chunks beyond those being converted.
    posix_fadvise(WILLNEED) queues the reads and can block while the device's queue is full; on its own
    thread that blocking overlaps the conversion and scoring, and the thread spends no CPU beside BLAS's."""

    def __init__(self, reader: ChunkReader, spans: list[tuple[int, int]], window: int) -> None:
        self.reader, self.spans = reader, spans
        self.free = threading.Semaphore(window + 1)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="read-advice", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for start, stop in self.spans:
            self.free.acquire()
            if self.stopping:
                return
            self.reader.advise(start, stop)

    def consumed(self) -> None:
        self.free.release()

    def stop(self) -> None:
        self.stopping = True
        self.free.release()
        self.thread.join()


class ChunkQueue:
    """Consecutive chunks of the vectors for one or several scanning threads ("lanes"): each lane takes the
    next unclaimed chunk (so a lane meets its rows in increasing order) and converts it into its own reused
    float32 buffer, while an advice thread asks the kernel to read ahead of a mapped file (READ_AHEAD_BYTES
    beyond the chunks being converted; no CPU work). Use as a context manager; `lane()` in each thread."""

    def __init__(self, vectors, chunk_rows: int, lanes: int = 1, ahead_bytes: int = READ_AHEAD_BYTES) -> None:
        self.vectors, self.count, self.lanes = vectors, len(vectors), lanes
        self.chunk_rows = max(1, int(chunk_rows))
        self.spans = [(start, min(start + self.chunk_rows, self.count))
                      for start in range(0, self.count, self.chunk_rows)]
        self.resident = isinstance(vectors, np.ndarray) and vectors.dtype == np.float32 \
            and vectors.flags.c_contiguous and not isinstance(vectors, np.memmap)
        self.reader = None if self.resident or not self.count else ChunkReader(vectors)
        self.advice = None
        if self.reader is not None and self.reader.file_backed:
            chunk_bytes = self.chunk_rows * self.reader.dim * 2
            window = max(READ_AHEAD_CHUNKS, -(-ahead_bytes // chunk_bytes)) + max(1, lanes) - 1
            self.advice = _AdviceThread(self.reader, self.spans, window)
        self.claimed = 0
        self.claim_lock = threading.Lock()

    def _claim(self) -> tuple[int, int] | None:
        with self.claim_lock:
            if self.claimed >= len(self.spans):
                return None
            self.claimed += 1
            return self.spans[self.claimed - 1]

    def lane(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 [rows, dim] view) of each chunk this lane claims; a view is valid until the
        lane's next one is asked for (its buffer is then refilled). A float32 C-contiguous array is handed out
        as views, uncopied."""
        buffer = None
        if self.lanes > 1 and not self.resident:
            serial_casts_in_this_thread()
        while (span := self._claim()) is not None:
            start, stop = span
            if self.resident:
                yield start, self.vectors[start:stop]
                continue
            if buffer is None:
                buffer = np.empty((min(self.chunk_rows, self.count), self.reader.dim), dtype=np.float32)
            self.reader.fill(buffer, start, stop, ahead=None if self.advice else 0)
            if self.advice:
                self.advice.consumed()
            yield start, buffer[:stop - start]

    def cancel(self) -> None:
        """No further chunks for any lane (one lane failed: the others stop after their current chunk)."""
        with self.claim_lock:
            self.claimed = len(self.spans)

    def close(self) -> None:
        if self.advice:
            self.advice.stop()  # before the files close: no advice on a closed descriptor
            self.advice = None
        if self.reader is not None:
            self.reader.close()

    def __enter__(self) -> "ChunkQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def float32_chunks(vectors, chunk_rows: int, ahead_bytes: int = READ_AHEAD_BYTES) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 [rows, dim] view) for consecutive chunks, converted into one reused buffer in the
    calling thread while the kernel reads ahead of a mapped file (ChunkQueue with one lane). A view is valid
    until the next one is asked for."""
    with ChunkQueue(vectors, chunk_rows, 1, ahead_bytes) as queue:
        yield from queue.lane()
