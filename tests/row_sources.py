"""Row sources the search tests share: a float16 array that counts the rows handed out, and unit vectors."""
from __future__ import annotations

import threading

import numpy as np


class CountingRows:
    """A read-only [count, dim] float16 source that counts every row handed out (slices and fancy indexes)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.rows_read = array, 0
        self.lock = threading.Lock()  # scan lanes read it from several threads

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, key):
        part = self.array[key]
        with self.lock:
            self.rows_read += len(part)
        return part


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)
