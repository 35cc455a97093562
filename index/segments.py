"""An index's rows in segments: the base files of the build, then one folder per `add` (format 5).

    INDEX_DIR/prompts.parquet, clip.f16, minilm.*       segment 0: rows [0, base count) (the build's rows)
    INDEX_DIR/segments/00001/prompts.parquet, clip.f16, minilm.*   rows an add appended (ids continue)

A segment folder holds the same data files under the same names as the index folder itself, so every
per-folder reader (minilm_rows, the memmaps) reads a segment as it reads the base. The manifest's
"segments" list ({"number", "first_id", "count"}) says where each appended segment lies; an index without
the list is one segment (every index before format 5). Readers see the rows through ConcatRows, which
reads only the parts a slice or an id gather touches, so an add never rewrites the rows it keeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from img2prompt.index.layout import SEGMENTS


@dataclass(frozen=True)
class Segment:
    folder: str  # "" for the base rows, else "segments/NNNNN"
    first_id: int
    count: int

    def name(self, file: str) -> str:
        """The manifest's (relative) name of one of this segment's data files."""
        return f"{self.folder}/{file}" if self.folder else file


def segment_folder(number: int) -> str:
    return f"{SEGMENTS}/{number:05d}"


def segments_of(manifest: dict) -> list[Segment]:
    """The base segment then the appended ones, in id order (a manifest without "segments": the base only)."""
    appended = manifest.get("segments") or []
    base = int(appended[0]["first_id"]) if appended else int(manifest["count"])
    return [Segment("", 0, base)] + [Segment(segment_folder(int(entry["number"])), int(entry["first_id"]),
                                             int(entry["count"])) for entry in appended]


class ConcatRows:
    """Several [n_i, dim] row arrays (memmaps, Int8Rows) seen as one [Σ n_i, dim] array.

    A slice inside one part returns that part's own slice (a memmap view); one across parts returns a lazy
    ConcatRows of the pieces (np.asarray joins them); an id gather reads each part's rows from that part."""

    def __init__(self, parts: list) -> None:
        self.parts = [part for part in parts if len(part)] or parts[:1]
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])
        self.shape = (int(self.starts[-1]), int(self.parts[0].shape[1]))
        self.dtype = np.dtype(self.parts[0].dtype)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows = self[key[0]]
            return np.asarray(rows)[(slice(None),) + key[1:]]
        if isinstance(key, slice):
            return self._slice(key)
        ids = np.asarray(key)
        if ids.dtype == bool:
            ids = np.flatnonzero(ids)
        if ids.ndim == 0:  # one row: negative counts from the end, as numpy's
            row = int(ids) + (len(self) if ids < 0 else 0)
            part = int(self._part_of(np.asarray([row]))[0])
            return self.parts[part][row - int(self.starts[part])]
        flat = ids.astype(np.int64).ravel()
        flat = np.where(flat < 0, flat + len(self), flat)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"row {int(flat.max() if flat.max() >= len(self) else flat.min())} is outside "
                             f"{len(self)} rows")
        parts = self._part_of(flat)
        out = None
        for part in np.unique(parts):
            where = np.flatnonzero(parts == part)
            rows = np.asarray(self.parts[part][flat[where] - int(self.starts[part])])
            if out is None:
                out = np.empty((len(flat), self.shape[1]), dtype=rows.dtype)
            out[where] = rows
        if out is None:
            out = np.empty((0, self.shape[1]), dtype=np.asarray(self.parts[0][:0]).dtype)
        return out.reshape(ids.shape + (self.shape[1],))

    def _part_of(self, flat: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, flat, side="right") - 1

    def _slice(self, key: slice):
        start, stop, step = key.indices(len(self))
        if step != 1:
            return self[np.arange(start, stop, step)]
        pieces = []
        for part, first in zip(self.parts, self.starts[:-1]):
            low, high = max(start - int(first), 0), min(stop - int(first), len(part))
            if low < high:
                pieces.append(part[low:high])
        if not pieces:
            return self.parts[0][0:0]
        return pieces[0] if len(pieces) == 1 else ConcatRows(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        joined = np.concatenate([np.asarray(part) for part in self.parts])
        return joined if dtype is None else joined.astype(dtype)


def concat_rows(parts: list):
    """One part as itself (the plain memmap every index before format 5 gives), several as ConcatRows."""
    return parts[0] if len(parts) == 1 else ConcatRows(parts)
