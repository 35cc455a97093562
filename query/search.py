"""Query vectors → top-k prompt ids and scores over an opened index, through its search backends (index/backend.py).

An index with image-keyed entries has a backend per key kind. Each is searched for the top-k, its raw
cosines are mapped onto the text keys' scale (the calibration fitted at build time, per query kind), and
the lists are merged: the scores a caller sees, and the softmax weighs, are calibrated ones.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from img2prompt.encoders.clip_ensemble import weighted_query
from img2prompt.errors import UserError
from img2prompt.index.backend import merge_top_k
from img2prompt.index.reader import PromptIndex


log = logging.getLogger(__name__)


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


def calibrate(scores: np.ndarray, fit: dict | None) -> np.ndarray:
    """scale · score + offset (identity without a fit); missing neighbours (-inf) stay missing."""
    if not fit:
        return scores
    return np.where(np.isfinite(scores), fit["scale"] * scores + fit["offset"], scores).astype(np.float32)


class Retriever:
    def __init__(self, index: PromptIndex, device: str = "cpu", encode_texts=None) -> None:
        self.index = index
        self.ranges = [(key_range, index.open_backend(device, key_range)) for key_range in index.key_ranges]
        self.backend = self.ranges[0][1]
        self.encode_texts = encode_texts  # CLIP text vectors of prompts: refitting the calibration needs them
        self._refitted: dict[tuple, dict] = {}

    def calibration_for(self, weights: list[float] | None) -> dict:
        """The key kinds' score maps for these model weights. The build fitted them on the models' mean cosine;
        other weights move the score distributions, so the map is fitted again for them (once per weighting,
        the same procedure and sample as the build's, index/calibration.py)."""
        maps = self.index.calibration
        if not maps or weights is None or np.allclose(weights, 1 / len(weights)):
            return maps
        key = tuple(round(weight, 6) for weight in weights)
        if key not in self._refitted:
            from img2prompt.index.calibration import fit_calibration

            if self.encode_texts is None:
                raise UserError("--model-weights on an index with image-keyed entries needs the CLIP model to "
                                "calibrate the key kinds for those weights")
            rows = {}  # the first range of each kind: where the build fitted the map
            for key_range, _ in self.ranges:
                rows.setdefault(key_range.keys, (key_range.start, key_range.stop))
            dims = [member["dim"] for member in self.index.clip_identity["members"]]
            fitted = fit_calibration(self.index.clip_vectors, self.index.minilm, rows["text"], rows["image"],
                                     self.index.prompt_rows, self.encode_texts,
                                     seed=self.index.manifest["calibration"].get("seed", 0),
                                     weigh=lambda queries: weighted_query(queries, dims, weights))
            log.info("image-key calibration fitted for model weights %s (%d queries)", list(key), fitted["queries"])
            self._refitted[key] = fitted["maps"]
        return self._refitted[key]

    def to_keys(self, queries: np.ndarray) -> np.ndarray:
        """Full-width query vectors in the keys' space: the index's PCA (--key-dims) applied, the one place."""
        pca = self.index.key_pca
        return queries if pca is None else pca.project(queries)

    def close(self) -> None:
        for _, backend in self.ranges:
            backend.close()

    def _search_ranges(self, queries: np.ndarray, fetch: int, query_kind: str,
                       weights: list[float] | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-`fetch` over every key range, calibrated scores, global ids, best first."""
        if len(self.ranges) == 1 and not self.index.calibration:
            return self.backend.search(queries, fetch)  # the common case: one text range, raw cosines
        scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        ids = np.zeros((len(queries), 0), dtype=np.int64)
        maps = self.calibration_for(weights).get(query_kind, {})
        for key_range, backend in self.ranges:
            found_scores, found_ids = backend.search(queries, min(fetch, key_range.count))
            scores, ids = merge_top_k(scores, ids, calibrate(found_scores, maps.get(key_range.keys)),
                                      np.where(found_ids >= 0, found_ids + key_range.start, -1), fetch)
        return scores, ids

    def search(self, queries: np.ndarray, k: int, exclude: list[set[int]] | None = None,
               query_kind: str = "image", model_weights: Sequence[float] | None = None) -> Neighbours:
        """Top-k per query, all queries in one backend call; `exclude[i]` lists prompt ids query i must not return
        (the eval leakage guard). `query_kind`: "image" or "text", which picks the calibration of the key kinds'
        scores. `model_weights` (checked: RetrievalSettings): for an index of several CLIP models,
        score = Σ w_m · cos_m (default: the mean)."""
        if not 1 <= k <= self.index.count:
            raise ValueError(f"k = {k} outside 1..{self.index.count} (RetrievalSettings.check_for refuses it)")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.clip_dim:
            raise UserError(f"query vectors have shape {queries.shape}, the index expects dim {self.index.clip_dim}")
        weights = list(model_weights) if model_weights is not None else None
        if len(queries) == 0:
            return Neighbours(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
        if weights is not None:
            queries = weighted_query(queries, [member["dim"] for member in self.index.clip_identity["members"]],
                                     weights).astype(np.float32)
        queries = self.to_keys(queries)
        extra = max((len(ids) for ids in exclude), default=0) if exclude else 0
        fetch = min(self.index.count, k + extra)
        scores, ids = self._search_ranges(queries, fetch, query_kind, weights)
        if extra:
            kept_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
            kept_ids = np.full((len(ids), k), -1, dtype=np.int64)
            for row, banned in enumerate(exclude):
                keep = [j for j, prompt_id in enumerate(ids[row]) if prompt_id not in banned][:k]
                kept_scores[row, :len(keep)] = scores[row, keep]
                kept_ids[row, :len(keep)] = ids[row, keep]
            scores, ids = kept_scores, kept_ids
        return Neighbours(np.asarray(scores[:, :k], np.float32), np.asarray(ids[:, :k], np.int64))
