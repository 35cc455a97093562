"""Each segment's dedup keys on disk, so that `add` and `merge` check prompts against an index of N prompts
without streaming its prompts or holding a key per prompt.

    <segment folder>/prompt_keys.npy   uint64, sorted, unique: dedup_key (encoders/prompts.py) of every prompt
                                       of the segment's prompts.parquet (written beside it by consolidate)

A lookup is a binary search in the memory-mapped file (≈ log2 N pages touched per key, the page cache's, not
the process's): add's cost follows the new rows. A segment whose manifest does not list the file (an index
written before it existed) gets its keys computed from its prompts (8 bytes a prompt, one array a segment);
the next add writes them as that segment's file (index/append.py), so it is computed once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from img2prompt.atomic import write_atomic
from img2prompt.encoders.prompts import KeySet, dedup_keys
from img2prompt.index.layout import PROMPT_KEYS
from img2prompt.index.segments import Segment, segments_of

_COMPACT = 1 << 20  # keys moved at a time when duplicates are squeezed out in place


def sorted_unique_keys(batches: Iterable[list[str]], count: int | None = None) -> np.ndarray:
    """The sorted unique dedup keys of the prompts in `batches`. With `count` (the prompts' number) the keys go
    into one preallocated array, then squeeze_sorted: 9 bytes a prompt at the peak; without it, per-batch
    arrays joined once (16 bytes a prompt for a moment)."""
    if count is None:
        parts = [dedup_keys(batch) for batch in batches]
        keys = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        del parts
        return squeeze_sorted(keys)
    keys = np.empty(count, np.uint64)
    filled = 0
    for batch in batches:
        filled = fill_keys(keys, filled, batch)
    return squeeze_sorted(keys[:filled])


def fill_keys(keys: np.ndarray, filled: int, batch: list[str]) -> int:
    """The batch's dedup keys written into keys[filled:]; returns the new fill."""
    if filled + len(batch) > len(keys):
        raise ValueError(f"more than the {len(keys)} prompts announced")
    keys[filled:filled + len(batch)] = dedup_keys(batch)
    return filled + len(batch)


def squeeze_sorted(keys: np.ndarray) -> np.ndarray:
    """`keys` sorted and deduplicated in place (introsort; duplicates squeezed out forward in blocks): a 1-byte
    mask a key beside the array, never a second array. Returns the unique prefix (a view)."""
    keys.sort()
    if len(keys) < 2:
        return keys
    first = np.empty(len(keys), bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    if first.all():
        return keys
    written = 0
    for start in range(0, len(keys), _COMPACT):  # forward: the write position never passes the read position
        kept = keys[start:start + _COMPACT][first[start:start + _COMPACT]]
        keys[written:written + len(kept)] = kept
        written += len(kept)
    return keys[:written]


def save_keys(path: Path, keys: np.ndarray) -> Path:
    """`keys` (sorted, unique uint64) written atomically as a key file."""
    keys = np.asarray(keys, dtype=np.uint64)
    write_atomic(Path(path), lambda handle: np.save(handle, keys, allow_pickle=False))
    return Path(path)


def write_prompt_keys(folder: Path, batches: Iterable[list[str]], count: int | None = None) -> Path:
    """The sorted unique keys of the prompts in `batches` (`count` of them, when known: see
    sorted_unique_keys), written atomically to folder/PROMPT_KEYS."""
    return save_keys(Path(folder) / PROMPT_KEYS, sorted_unique_keys(batches, count))


class IndexKeys:
    """The dedup keys of an index's prompts, one sorted unique run per segment: the memory-mapped key file of
    each segment that has one, keys computed from the prompts of those that have none (`computed`: {the key
    file's relative name: keys}, for add to store). `contains` is KeySet's."""

    def __init__(self, runs: list[np.ndarray], computed_rows: int = 0,
                 computed: dict[str, np.ndarray] | None = None) -> None:
        self.runs = runs
        self.computed_rows = computed_rows  # prompts streamed and hashed because their segment had no key file
        self.computed = computed or {}

    @classmethod
    def of_index(cls, index) -> "IndexKeys":
        """Keys of an open index (reader.PromptIndex), in segment order: stored files where the manifest
        lists them; the others' computed in one pass over those segments' prompts only."""
        parts = segments_of(index.manifest)
        runs = list(index.stored_prompt_keys)  # mapped when the index was opened (with its prompt files)
        missing = {number: np.empty(part.count, np.uint64) for number, (part, run) in enumerate(zip(parts, runs))
                   if run is None}
        filled = dict.fromkeys(missing, 0)
        if missing:
            starts = np.asarray([part.first_id for part in parts])
            for first, batch in index.iter_prompt_batches(parts=set(missing)):
                number = int(np.searchsorted(starts, first, side="right")) - 1
                filled[number] = fill_keys(missing[number], filled[number], batch)
        computed = {}
        for number, keys in missing.items():
            runs[number] = computed[parts[number].name(PROMPT_KEYS)] = squeeze_sorted(keys[:filled[number]])
        return cls(runs, sum(filled.values()), computed)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return runs_contain(self.runs, keys)


def stored_keys(root: Path, manifest: dict, part: Segment) -> np.ndarray | None:
    """The segment's key file, memory-mapped, or None when the manifest does not list it."""
    name = part.name(PROMPT_KEYS)
    if name in manifest.get("files", {}) and (Path(root) / name).is_file():
        return np.load(Path(root) / name, mmap_mode="r")
    return None


def runs_contain(runs: list[np.ndarray], keys: np.ndarray) -> np.ndarray:
    """Mask of the keys found in any of the sorted `runs` (memory maps or arrays)."""
    keys = np.asarray(keys, dtype=np.uint64)  # the runs' dtype: searchsorted never converts a mapped run
    found = np.zeros(len(keys), dtype=bool)
    for run in runs:
        if len(run):
            at = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            found |= run[at] == keys
    return found


class FirstSeen:
    """merge's dedup over indexes read one after another, each in id order (`start(index)`, then its rows'
    keys through `add_new` in order): a row is kept unless an earlier index, an earlier segment of its own
    index or an earlier row of its segment holds its key -- what one growing KeySet of every kept key answers,
    without holding it: earlier segments answer from their sorted key runs (memory-mapped files: nothing held
    a prompt). Only a segment with fewer keys than rows (duplicates inside it; none that build, add or merge
    write) keeps a KeySet of its rows while it is read; a segment without a key file holds its computed keys
    (8 bytes a prompt)."""

    def __init__(self) -> None:
        self.earlier: list[np.ndarray] = []  # sorted runs of every segment read to the end
        self.parts: list[tuple[Segment, np.ndarray]] = []
        self.position = 0
        self.part = -1
        self.inner: KeySet | None = None
        self.computed_rows = 0

    def start(self, index) -> None:
        """The next index (reader.PromptIndex): its rows follow, from id 0."""
        self._finish_part()  # the last index's last segment
        keys = IndexKeys.of_index(index)
        self.computed_rows += keys.computed_rows
        self.parts = [(part, run) for part, run in zip(segments_of(index.manifest), keys.runs) if part.count]
        self.position, self.part = 0, -1

    def add_new(self, keys: np.ndarray) -> np.ndarray:
        """Mask of the rows (the next len(keys) rows of the current index) seen for the first time."""
        keys = np.asarray(keys, dtype=np.uint64)
        keep, done = np.zeros(len(keys), bool), 0
        while done < len(keys):
            segment = self._enter(self.position)
            take = min(len(keys) - done, segment.first_id + segment.count - self.position)
            chunk = keys[done:done + take]
            fresh = ~runs_contain(self.earlier, chunk)
            if self.inner is not None:
                fresh &= self.inner.add_new(chunk)
            keep[done:done + take] = fresh
            done += take
            self.position += take
        return keep

    def _enter(self, row: int) -> Segment:
        """The segment holding `row`; entering the next one moves the last one's keys to the earlier runs."""
        while self.part < 0 or row >= self.parts[self.part][0].first_id + self.parts[self.part][0].count:
            self._finish_part()
            self.part += 1
            if self.part >= len(self.parts):
                raise ValueError(f"row {row} is past the index's rows")
            segment, run = self.parts[self.part]
            self.inner = KeySet() if len(run) < segment.count else None
        return self.parts[self.part][0]

    def _finish_part(self) -> None:
        """The current segment's keys join the earlier runs (once)."""
        if 0 <= self.part < len(self.parts):
            self.earlier.append(self.parts[self.part][1])
        self.inner = None


def segment_key_names(manifest: dict) -> list[str]:
    """The key files the manifest lists (relative names), segment by segment."""
    files = manifest.get("files", {})
    return [name for name in (part.name(PROMPT_KEYS) for part in segments_of(manifest)) if name in files]
