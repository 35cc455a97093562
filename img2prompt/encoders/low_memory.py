"""Low memory instead of out-of-memory: a tower call that runs out of CUDA memory is retried on half the rows,
down to one row, and the smaller size is kept for the rest of the run (no second failure per batch).

Every row is still encoded once, by the same tower in the same precision: only how many rows share a call
changes, so the vectors equal an uninterrupted run's up to float rounding. Said once per process, as a
warning: the run goes on, slower.
"""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
OUT_OF_MEMORY = torch.cuda.OutOfMemoryError  # what a CUDA allocation failure raises (a RuntimeError)
_warned: list[bool] = []


class BatchLimit:
    """The most rows one tower call may take now (None: as many as the caller batches); halved on OOM."""

    def __init__(self) -> None:
        self.rows: int | None = None

    def run(self, rows: int, encode: Callable[[int, int], T]) -> list[T]:
        """encode(start, stop) over [0, rows) in chunks of at most `self.rows`, in order; a chunk that runs
        out of CUDA memory is tried again at half its size (the size then stays down)."""
        results, start = [], 0
        while start < rows:
            stop = rows if self.rows is None else min(rows, start + self.rows)
            try:
                results.append(encode(start, stop))
            except OUT_OF_MEMORY:
                if stop - start == 1:
                    raise  # one row does not fit: nothing left to halve
                self._halve(stop - start)
                continue
            start = stop
        return results

    def _halve(self, tried: int) -> None:
        self.rows = max(1, tried // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand back what the failed call held before the retry
        if not _warned:
            _warned.append(True)
            log.warning("out of GPU memory with %d rows per batch: retrying with %d (and halving again if "
                        "needed); the vectors are the same, the run slower (a smaller --batch-size avoids the "
                        "retries)", tried, self.rows)


def batch_limit(owner) -> BatchLimit:
    """The BatchLimit an encoder object (a CLIP model or ensemble) carries, made on first use."""
    limit = getattr(owner, "_batch_limit", None)
    if limit is None:
        limit = BatchLimit()
        setattr(owner, "_batch_limit", limit)
    return limit
