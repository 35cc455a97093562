"""Images → neighbours → predictions: the part that submit and eval share.

Retrieval (decode, encode, search) runs once at the largest k needed; blending is cheap numpy and can be
repeated for any (k ≤ that, temperature, alpha, consensus, beta) without touching the images again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from img2prompt.errors import UserError
from img2prompt.index.reader import PromptIndex
from img2prompt.query.blend import BlendSettings, blend, corpus_mean_prediction, mix_head
from img2prompt.query.embed_images import embed_images
from img2prompt.query.search import Neighbours
from img2prompt.query.session import QuerySession

log = logging.getLogger(__name__)

MISSING_FILE = "not found in the images folder"


@dataclass(kw_only=True)
class RetrievalSettings(BlendSettings):
    """What submit and eval share: blending (BlendSettings' fields), model weights and image loading (models
    and device come with the session)."""
    model_weights: str | list[float] | None = None  # several CLIP models: "0.7,0.3" (default: equal)
    batch_size: int | None = None
    workers: int | None = None
    progress: bool = True

    @property
    def blend_settings(self) -> BlendSettings:
        return BlendSettings(**self.as_dict()).check()


@dataclass
class Retrieved:
    image_ids: list[str]
    neighbours: Neighbours  # a row per image; an image that failed has ids -1 (and -inf scores)
    failed: dict[str, str]  # imgId → reason
    timings_s: dict
    query_vectors: np.ndarray  # float32 [n, clip_dim]; zero rows for failed images


def retrieve_images(session: QuerySession, image_ids: list[str], paths: dict[str, Path], k: int, *,
                    batch_size: int | None = None, workers: int | None = None, progress: bool = True,
                    exclude: list[set[int]] | None = None,
                    model_weights: str | list[float] | None = None) -> Retrieved:
    """Top-k neighbours of every id in `image_ids`; ids without a usable file are reported, not fatal."""
    session.retriever.check_k(k)
    session.retriever.model_weights(model_weights)  # a bad value fails before any image is decoded
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
    found = session.retriever.search(embedded.vectors, k, [exclude[row] for row in ok_rows] if exclude else None,
                                     model_weights=model_weights)
    timings["search"] = time.perf_counter() - started
    vectors = np.zeros((len(image_ids), session.index.clip_dim), dtype=np.float32)
    vectors[ok_rows] = embedded.vectors
    return Retrieved(image_ids, found.spread(ok_rows, len(image_ids)), failed, timings, vectors)


MIN_BATCH_FOR_MEAN = 16  # images needed to estimate the image-key mean from the queries themselves


def require_head(index: PromptIndex, beta: float):
    """The index's regression head when beta > 0 asks for it; a one-line error where there is none."""
    if beta > 0 and index.regression_head is None:
        raise UserError(f"--beta needs the index's regression head, and {index.root} has none (built with "
                        "--no-regression-head, or by an older img2prompt): rebuild it")
    return index.regression_head


def head_predictions(index: PromptIndex, query_vectors: np.ndarray, ok: np.ndarray,
                     query_kind: str = "image") -> tuple[np.ndarray, str]:
    """The regression head's unit predictions for the `ok` rows (other rows: zeros) and where the query mean
    came from: the index's own keys of that kind, or, for an index without keys of the queries' kind (image
    queries, no `--pairs`), the mean of these queries — so each prediction then depends on the batch it came
    in (the head is centred per modality; see build_index/regression.py)."""
    head = require_head(index, 1.0)
    out = np.zeros((len(query_vectors), index.text_dim), dtype=np.float32)
    ok = np.asarray(ok, dtype=bool)
    if query_kind in head.key_means:
        mean, source = head.key_means[query_kind], "index"
    elif ok.sum() >= MIN_BATCH_FOR_MEAN:
        mean, source = query_vectors[ok].mean(axis=0), "queries"
    else:
        how = "build --pairs" if query_kind == "image" else "a corpus of prompts"
        raise UserError(f"--beta with {query_kind} queries needs the {query_kind}-key mean: this index has no "
                        f"{query_kind}-keyed entries ({how}) and {int(ok.sum())} {query_kind} queries are too few "
                        f"to estimate it (at least {MIN_BATCH_FOR_MEAN} in one call)")
    if ok.any():
        out[ok] = head.predict(query_vectors[ok], mean)
    return out, source


def blend_neighbours(index: PromptIndex, neighbours: Neighbours, settings: BlendSettings,
                     head: np.ndarray | None = None) -> np.ndarray:
    """Predictions for every row; rows without neighbours (failed images) get the corpus mean.
    `head`: the regression head's predictions for the rows (needed when settings.beta > 0)."""
    predictions = corpus_mean_prediction(index.minilm_mean, len(neighbours.ids))
    ok = neighbours.ids[:, 0] >= 0
    if ok.any():
        predictions[ok] = blend(neighbours.scores[ok], neighbours.ids[ok], index.minilm, k=settings.k,
                                temperature=settings.temperature, alpha=settings.alpha, corpus_mean=index.minilm_mean,
                                consensus=settings.consensus)
    return mix_rows(predictions, head, settings.beta, ok)


def mix_rows(predictions: np.ndarray, head: np.ndarray | None, beta: float, ok: np.ndarray) -> np.ndarray:
    """The regression head mixed into the rows that have neighbours (failed images keep the corpus mean)."""
    if beta == 0:
        return predictions
    mixed = predictions.copy()
    mixed[ok] = mix_head(predictions[ok], None if head is None else head[ok], beta)
    return mixed


def predict_rows(index: PromptIndex, neighbours: Neighbours, query_vectors: np.ndarray, settings: BlendSettings,
                 query_kind: str = "image") -> np.ndarray:
    """Predictions from searched neighbours and the query vectors (used by the head only when beta > 0)."""
    head = None
    if settings.beta > 0:
        ok = neighbours.ids[:, 0] >= 0
        head, source = head_predictions(index, query_vectors, ok, query_kind)
        if source == "queries":
            log.info("regression head: %s-key mean estimated from these %d queries", query_kind, int(ok.sum()))
    return blend_neighbours(index, neighbours, settings, head)
