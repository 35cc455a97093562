"""Images → neighbours → predictions: the part that submit and eval share.

Retrieval (decode, encode, search) runs once at the largest k needed; blending is cheap numpy and can be
repeated for any (k ≤ that, temperature, alpha) without touching the images again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from img2prompt.index.format import PromptIndex
from img2prompt.query.blend import DEFAULT_ALPHA, DEFAULT_K, DEFAULT_TEMPERATURE, blend, corpus_mean_prediction
from img2prompt.query.embed_images import embed_images
from img2prompt.query.search import Neighbours
from img2prompt.query.session import QuerySession

MISSING_FILE = "not found in the images folder"


@dataclass(kw_only=True)
class RetrievalSettings:
    """What submit and eval share: blending and image loading (models and device come with the session)."""
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA
    batch_size: int | None = None
    workers: int | None = None
    progress: bool = True


@dataclass
class Retrieved:
    image_ids: list[str]
    neighbours: Neighbours  # a row per image; an image that failed has ids -1 (and -inf scores)
    failed: dict[str, str]  # imgId → reason
    timings_s: dict
    query_vectors: np.ndarray  # float32 [n, clip_dim]; zero rows for failed images


def retrieve_images(session: QuerySession, image_ids: list[str], paths: dict[str, Path], k: int, *,
                    batch_size: int | None = None, workers: int | None = None, progress: bool = True,
                    exclude: list[set[int]] | None = None) -> Retrieved:
    """Top-k neighbours of every id in `image_ids`; ids without a usable file are reported, not fatal."""
    session.retriever.check_k(k)
    timings = {}
    present = [image_id for image_id in image_ids if image_id in paths]
    failed = {image_id: MISSING_FILE for image_id in image_ids if image_id not in paths}
    started = time.perf_counter()
    embedded = embed_images(session.clip, [paths[i] for i in present], batch_size, workers, progress=progress)
    timings["decode_encode"] = time.perf_counter() - started
    timings["decode"], timings["encode"] = embedded.decode_s, embedded.encode_s
    failed.update({present[position]: reason for position, reason in embedded.failed.items()})
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    ok_rows = [row_of[present[position]] for position in embedded.ok]
    started = time.perf_counter()
    found = session.retriever.search(embedded.vectors, k, [exclude[row] for row in ok_rows] if exclude else None)
    timings["search"] = time.perf_counter() - started
    vectors = np.zeros((len(image_ids), session.index.clip_dim), dtype=np.float32)
    vectors[ok_rows] = embedded.vectors
    return Retrieved(image_ids, found.spread(ok_rows, len(image_ids)), failed, timings, vectors)


def blend_neighbours(index: PromptIndex, neighbours: Neighbours, *, k: int, temperature: float,
                     alpha: float) -> np.ndarray:
    """Predictions for every row; rows without neighbours (failed images) get the corpus mean."""
    predictions = corpus_mean_prediction(index.minilm_mean, len(neighbours.ids))
    ok = neighbours.ids[:, 0] >= 0
    if ok.any():
        predictions[ok] = blend(neighbours.scores[ok], neighbours.ids[ok], index.minilm, k=k,
                                temperature=temperature, alpha=alpha, corpus_mean=index.minilm_mean)
    return predictions
