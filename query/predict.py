"""Images → neighbours → predictions: the one prediction path that predict, submission and eval share.

`retrieve` decodes, encodes and searches once (one search call for the whole image set) at the largest k
needed; `predict_rows` blends (cheap numpy) for any settings without touching the images again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from img2prompt.encoders.clip_ensemble import split_parts
from img2prompt.encoders.image_embed import ImageEmbeddings, embed_images
from img2prompt.errors import UserError
from img2prompt.index.reader import PromptIndex
from img2prompt.query.blend import blend, corpus_mean_prediction, mix_head
from img2prompt.query.search import Neighbours
from img2prompt.query.session import QuerySession
from img2prompt.query.settings import ImageLoading, RetrievalSettings, require_head

log = logging.getLogger(__name__)

MISSING_FILE = "not found in the images folder"


@dataclass
class Retrieved:
    neighbours: Neighbours  # a row per query; a query that failed has ids -1 (and -inf scores)
    failed: dict[int, str]  # row → reason
    query_vectors: np.ndarray  # float32 [n, clip_dim]; zero rows for failed queries
    timings_s: dict


def retrieve(session: QuerySession, images: Sequence, settings: RetrievalSettings, *, fetch: int | None = None,
             exclude: list[set[int]] | None = None, loading: ImageLoading | None = None,
             embedded: ImageEmbeddings | None = None) -> Retrieved:
    """Top-`fetch` (default settings.k) neighbours of every image, in one search call; images that cannot be
    decoded are reported by row, not fatal. `exclude[row]`: ids that row must not return (eval's guard).
    `embedded`: these images' vectors, already encoded (a server's merged encoder call)."""
    loading = loading or ImageLoading()
    timings = {}
    started = time.perf_counter()
    if embedded is None:
        embedded = embed_images(session.clip, list(images), loading.batch_size, loading.workers,
                                progress=loading.progress)
    timings["decode_encode"] = time.perf_counter() - started
    timings["decode"], timings["encode"] = embedded.decode_s, embedded.encode_s
    started = time.perf_counter()
    found = session.retriever.search(embedded.vectors, fetch or settings.k,
                                     [exclude[row] for row in embedded.ok] if exclude else None,
                                     model_weights=settings.model_weights)
    timings["search"] = time.perf_counter() - started
    vectors = np.zeros((len(images), session.index.clip_dim), dtype=np.float32)
    vectors[embedded.ok] = embedded.vectors
    return Retrieved(found.spread(embedded.ok, len(images)), dict(embedded.failed), vectors, timings)


def retrieve_images(session: QuerySession, image_ids: list[str], paths: dict[str, Path],
                    settings: RetrievalSettings, *, fetch: int | None = None, exclude: list[set[int]] | None = None,
                    loading: ImageLoading | None = None) -> tuple[Retrieved, dict[str, str]]:
    """`retrieve` for image ids of a folder (submission, eval): ids without a usable file get an empty row.
    Returns the rows in `image_ids` order and the failures by imgId."""
    present = [row for row, image_id in enumerate(image_ids) if image_id in paths]
    found = retrieve(session, [paths[image_ids[row]] for row in present], settings, fetch=fetch,
                     exclude=[exclude[row] for row in present] if exclude else None, loading=loading)
    failed = {image_id: MISSING_FILE for image_id in image_ids if image_id not in paths}
    failed.update({image_ids[present[position]]: reason for position, reason in found.failed.items()})
    ok_rows = [present[position] for position in range(len(present)) if position not in found.failed]
    ok_positions = [position for position in range(len(present)) if position not in found.failed]
    neighbours = Neighbours(found.neighbours.scores[ok_positions], found.neighbours.ids[ok_positions])
    vectors = np.zeros((len(image_ids), session.index.clip_dim), dtype=np.float32)
    vectors[ok_rows] = found.query_vectors[ok_positions]
    rows_failed = {row: failed[image_id] for row, image_id in enumerate(image_ids) if image_id in failed}
    return Retrieved(neighbours.spread(ok_rows, len(image_ids)), rows_failed, vectors, found.timings_s), failed


MIN_BATCH_FOR_MEAN = 16  # images needed to estimate the image-key mean from the queries themselves


def head_predictions(index: PromptIndex, query_vectors: np.ndarray, ok: np.ndarray,
                     query_kind: str = "image") -> tuple[np.ndarray, str]:
    """The regression head's unit predictions for the `ok` rows (other rows: zeros) and where the query mean
    came from: the index's own keys of that kind, or, for an index without keys of the queries' kind (image
    queries, no `--pairs`), the mean of these queries — so each prediction then depends on the batch it came
    in (the head is centred per modality; see index/ridge.py)."""
    require_head(index)
    head = index.regression_head
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


def blend_neighbours(index: PromptIndex, neighbours: Neighbours, settings: RetrievalSettings,
                     head: np.ndarray | None = None, query_vectors: np.ndarray | None = None) -> np.ndarray:
    """Predictions for every row; rows without neighbours (failed images) get the corpus mean.
    `head`: the regression head's predictions for the rows (needed when settings.beta > 0); `query_vectors`:
    the queries (needed for a score floor on an index of several CLIP models: the floor is per model)."""
    predictions = corpus_mean_prediction(index.minilm_mean, len(neighbours.ids))
    ok = neighbours.ids[:, 0] >= 0
    if ok.any():
        scores = blended_scores(index, neighbours.scores[ok], neighbours.ids[ok], settings,
                                None if query_vectors is None else query_vectors[ok])
        predictions[ok] = blend(scores, neighbours.ids[ok], index.minilm, k=settings.k, alpha=settings.alpha,
                                corpus_mean=index.minilm_mean, consensus=settings.consensus, **settings.weighing())
    return mix_rows(predictions, head, settings.beta, ok)


def blended_scores(index: PromptIndex, scores: np.ndarray, ids: np.ndarray, settings: RetrievalSettings,
                   query_vectors: np.ndarray | None) -> np.ndarray:
    """The first k scores as the blend weighs them: under the score floor (if any) they are -inf."""
    scores = scores[:, :settings.k]
    if settings.min_score is None:
        return scores
    per_model = member_cosines(index, query_vectors, ids[:, :settings.k]) if _members(index) else None
    return floor_scores(scores, settings.min_score, per_model)


def _members(index: PromptIndex) -> list[dict]:
    return index.clip_identity.get("members") or []


def member_cosines(index: PromptIndex, query_vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each CLIP model's own cosine between a query and each of its neighbours' keys: [n, k, models].
    Ensemble vectors hold each model's unit part scaled by sqrt(1/M), so a part's inner product × M is the
    model's cosine."""
    dims = [member["dim"] for member in _members(index)]
    flat = np.asarray(ids).ravel()
    keys = np.zeros((len(flat), sum(dims)), dtype=np.float32)
    found = flat >= 0
    keys[found] = index.clip_vectors[flat[found]]
    keys = keys.reshape(*np.shape(ids), -1)
    query_parts, key_parts = split_parts(np.asarray(query_vectors, np.float32), dims), split_parts(keys, dims)
    return np.stack([np.einsum("nd,nkd->nk", q, k) * len(dims) for q, k in zip(query_parts, key_parts)], axis=-1)


def floor_scores(scores: np.ndarray, min_score: float, per_model: np.ndarray | None = None) -> np.ndarray:
    """Scores with neighbours under the floor set to -inf (weight 0 in the softmax); the best neighbour of a
    row always stays, so a row never blends nothing. With `per_model` cosines [n, k, models] a neighbour must
    reach the floor under every model (the filter the strongest retrieval entry used)."""
    below = np.asarray(scores) < min_score if per_model is None else (per_model < min_score).any(axis=-1)
    below[:, 0] = False
    return np.where(below, -np.inf, scores).astype(np.float32)


def mix_rows(predictions: np.ndarray, head: np.ndarray | None, beta: float, ok: np.ndarray) -> np.ndarray:
    """The regression head mixed into the rows that have neighbours (failed images keep the corpus mean)."""
    if beta == 0:
        return predictions
    mixed = predictions.copy()
    mixed[ok] = mix_head(predictions[ok], None if head is None else head[ok], beta)
    return mixed


def predict_rows(index: PromptIndex, neighbours: Neighbours, query_vectors: np.ndarray, settings: RetrievalSettings,
                 query_kind: str = "image") -> np.ndarray:
    """Predictions from searched neighbours and the query vectors (used by the head only when beta > 0)."""
    head = None
    if settings.beta > 0:
        ok = neighbours.ids[:, 0] >= 0
        head, source = head_predictions(index, query_vectors, ok, query_kind)
        if source == "queries":
            log.info("regression head: %s-key mean estimated from these %d queries", query_kind, int(ok.sum()))
    return blend_neighbours(index, neighbours, settings, head, query_vectors)
