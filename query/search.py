"""Query vectors → top-k prompt ids and scores over an opened index, through its search backend (index/backend.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from img2prompt.errors import UserError
from img2prompt.index.format import PromptIndex


@dataclass
class Neighbours:
    scores: np.ndarray  # float32 [n, k], best first
    ids: np.ndarray  # int64 [n, k] prompt ids

    def spread(self, rows, total: int) -> "Neighbours":
        """These rows (one per query that could be searched) placed at `rows` of `total`; the other rows stay
        empty (scores -inf, ids -1): an image that could not be decoded keeps its place."""
        k = self.ids.shape[1]
        out = Neighbours(np.full((total, k), -np.inf, np.float32), np.full((total, k), -1, np.int64))
        out.scores[rows], out.ids[rows] = self.scores, self.ids
        return out


class Retriever:
    def __init__(self, index: PromptIndex, device: str = "cpu") -> None:
        self.index = index
        self.backend = index.open_backend(device)

    def check_k(self, k: int) -> None:
        if k <= 0:
            raise UserError(f"--k must be at least 1 (got {k})")
        if k > self.index.count:
            raise UserError(f"--k {k} is larger than the index ({self.index.count} prompts)")

    def search(self, queries: np.ndarray, k: int, exclude: list[set[int]] | None = None) -> Neighbours:
        """Top-k per query; `exclude[i]` lists prompt ids query i must not return (the eval leakage guard)."""
        self.check_k(k)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.clip_dim:
            raise UserError(f"query vectors have shape {queries.shape}, the index expects dim {self.index.clip_dim}")
        if len(queries) == 0:
            return Neighbours(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
        extra = max((len(ids) for ids in exclude), default=0) if exclude else 0
        fetch = min(self.index.count, k + extra)
        scores, ids = self.backend.search(queries, fetch)
        if extra:
            kept_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
            kept_ids = np.full((len(ids), k), -1, dtype=np.int64)
            for row, banned in enumerate(exclude):
                keep = [j for j, prompt_id in enumerate(ids[row]) if prompt_id not in banned][:k]
                kept_scores[row, :len(keep)] = scores[row, keep]
                kept_ids[row, :len(keep)] = ids[row, keep]
            scores, ids = kept_scores, kept_ids
        return Neighbours(np.asarray(scores[:, :k], np.float32), np.asarray(ids[:, :k], np.int64))
