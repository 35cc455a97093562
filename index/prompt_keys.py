"""Each segment's dedup keys on disk, so that `add` checks a corpus against an index of N prompts without
streaming its prompts or holding a key per prompt.

    <segment folder>/prompt_keys.npy   uint64, sorted, unique: dedup_key (encoders/prompts.py) of every prompt
                                       of the segment's prompts.parquet (written beside it by consolidate)

A lookup is a binary search in the memory-mapped file (≈ log2 N pages touched per key, the page cache's, not
the process's): add's cost follows the new rows. A segment whose manifest does not list the file (an index
written before it existed) gets its keys computed on the fly from its prompts, as every add did before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from img2prompt.atomic import write_atomic
from img2prompt.encoders.prompts import KeySet, dedup_keys
from img2prompt.index.layout import PROMPT_KEYS
from img2prompt.index.segments import segments_of


def write_prompt_keys(folder: Path, batches: Iterable[list[str]]) -> Path:
    """The sorted unique keys of the prompts in `batches`, written atomically to folder/PROMPT_KEYS (at most
    16 bytes a prompt held, while two sorted runs merge)."""
    keys = KeySet()
    for batch in batches:
        keys.add_new(dedup_keys(batch))
    merged = np.concatenate(keys.runs) if keys.runs else np.zeros(0, np.uint64)
    keys.runs = []
    merged.sort()
    path = Path(folder) / PROMPT_KEYS
    write_atomic(path, lambda handle: np.save(handle, merged, allow_pickle=False))
    return path


class IndexKeys:
    """The dedup keys of an index's prompts: the memory-mapped sorted key file of each segment that has one,
    a KeySet computed from the prompts of those that have none. `contains` is KeySet's."""

    def __init__(self, runs: list[np.ndarray], computed_rows: int = 0) -> None:
        self.runs = runs
        self.computed_rows = computed_rows  # prompts streamed and hashed because their segment had no key file

    @classmethod
    def of_index(cls, index) -> "IndexKeys":
        """Keys of an open index (reader.PromptIndex): stored files where the manifest lists them."""
        files = index.manifest.get("files", {})
        runs, missing = [], []
        for part in segments_of(index.manifest):
            name = part.name(PROMPT_KEYS)
            if name in files and (Path(index.root) / name).is_file():
                runs.append(np.load(Path(index.root) / name, mmap_mode="r"))
            else:
                missing.append((part.first_id, part.first_id + part.count))
        computed, rows = KeySet(), 0
        if missing:
            for first, batch in index.iter_prompt_batches():
                if any(low <= first < high for low, high in missing):
                    computed.add_new(dedup_keys(batch))
                    rows += len(batch)
        return cls(runs + computed.runs, rows)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.uint64)  # the runs' dtype: searchsorted never converts a mapped run
        found = np.zeros(len(keys), dtype=bool)
        for run in self.runs:
            if len(run):
                at = np.minimum(np.searchsorted(run, keys), len(run) - 1)
                found |= run[at] == keys
        return found


def segment_key_names(manifest: dict) -> list[str]:
    """The key files the manifest lists (relative names), segment by segment."""
    files = manifest.get("files", {})
    return [name for name in (part.name(PROMPT_KEYS) for part in segments_of(manifest)) if name in files]
