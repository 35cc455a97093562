"""Prompt text normalisation and dedup keys: what the build (corpus, pairs) and the query side (eval labels,
interrogation) must agree on, so it lives below both."""
from __future__ import annotations

import hashlib

import numpy as np


def normalise_prompt(text: str) -> str:
    """Collapse all whitespace runs (CR, LF, tabs, NBSP…) into single spaces and strip the ends."""
    return " ".join(text.split())


def dedup_key(prompt: str) -> int:
    """8-byte hash of the case- and whitespace-insensitive form: compact enough for tens of millions."""
    return int.from_bytes(hashlib.blake2b(normalise_prompt(prompt).casefold().encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def dedup_keys(prompts: list[str]) -> np.ndarray:
    """dedup_key of each prompt as uint64."""
    return np.fromiter((dedup_key(prompt) for prompt in prompts), dtype=np.uint64, count=len(prompts))


class KeySet:
    """A set of 8-byte dedup keys for tens of millions of prompts: sorted uint64 runs, 8 bytes a key held
    (a Python set of ints costs ~70), merged LSM-style so that a lookup searches O(log n) runs. A merge
    holds the two runs and their join at once: at most 16 bytes a key, for a moment."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self.runs)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.uint64)
        found = np.zeros(len(keys), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            found |= run[at] == keys
        return found

    def add_new(self, keys: np.ndarray) -> np.ndarray:
        """Mask of the keys seen for the first time (not in the set, nor earlier in `keys`); adds them."""
        keys = np.asarray(keys, dtype=np.uint64)
        unique, first = np.unique(keys, return_index=True)
        fresh = ~self.contains(unique)
        keep = np.zeros(len(keys), dtype=bool)
        keep[first[fresh]] = True
        self.add_sorted(unique[fresh])
        return keep

    def add_sorted(self, run: np.ndarray) -> None:
        """Add sorted keys none of which is in the set yet."""
        if not len(run):
            return
        self.runs.append(np.asarray(run, dtype=np.uint64))
        while len(self.runs) >= 2 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            newer, older = self.runs.pop(), self.runs.pop()
            joined = np.concatenate([older, newer])
            del newer, older
            joined.sort(kind="stable")  # timsort: one linear merge of the two sorted runs
            self.runs.append(joined)
