"""The Kaggle retrieval submission: images → CLIP → top-k prompts → blended MiniLM vectors → submission.csv.

Images that cannot be decoded get the corpus-mean prediction (reported by name and counted), so the
submission is always complete; with strict=True they are an error instead.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from img2prompt.errors import UserError
from img2prompt.query.blend import (DEFAULT_ALPHA, DEFAULT_K, DEFAULT_TEMPERATURE, blend, check_blend_args,
                                    corpus_mean_prediction, softmax_weights)
from img2prompt.query.embed_images import embed_images
from img2prompt.query.images import list_images
from img2prompt.query.search import Neighbours
from img2prompt.query.session import ModelOverrides, QuerySession, open_session
from img2prompt.query.submission import EMBED_DIM, read_sample_submission, write_explain, write_submission

log = logging.getLogger(__name__)


@dataclass
class SubmitOptions:
    index: str
    images: str
    out: str = "submission.csv"
    sample_submission: str | None = None
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA
    explain: str | None = None
    models: ModelOverrides = field(default_factory=ModelOverrides)
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    strict: bool = False
    verify: bool = False
    progress: bool = True


@dataclass
class SubmitReport:
    out: str
    images: int
    predicted: int
    failed: dict[str, str] = field(default_factory=dict)  # imgId → reason; these got the corpus mean
    duplicate_files: list[str] = field(default_factory=list)
    not_in_sample: int = 0
    settings: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)


@dataclass
class ImagePredictions:
    image_ids: list[str]
    predictions: np.ndarray  # float32 [n, 384]
    neighbours: Neighbours  # rows for every image; failed images have id -1
    failed: dict[str, str]
    timings_s: dict


def predict_images(session: QuerySession, image_ids: list[str], paths: dict[str, Path], *, k: int,
                   temperature: float, alpha: float, batch_size: int = 64, workers: int | None = None,
                   progress: bool = True, missing_reason: str = "not found in the images folder",
                   exclude: list[set[int]] | None = None) -> ImagePredictions:
    """Predict every id in `image_ids`; ids without a usable file get the corpus mean and a reason."""
    check_blend_args(k, temperature, alpha)
    session.retriever.check_k(k)
    timings = {}
    present = [image_id for image_id in image_ids if image_id in paths]
    failed = {image_id: missing_reason for image_id in image_ids if image_id not in paths}
    started = time.perf_counter()
    with tqdm(total=len(present), unit="img", desc="encode images", disable=not progress) as bar:
        embedded = embed_images(session.clip, [paths[i] for i in present], batch_size, workers, bar.update)
    timings["decode_encode"] = time.perf_counter() - started
    failed.update({present[position]: reason for position, reason in embedded.failed.items()})
    ok_ids = [present[position] for position in embedded.ok]
    started = time.perf_counter()
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    ok_rows = [row_of[image_id] for image_id in ok_ids]
    banned = [exclude[row] for row in ok_rows] if exclude else None
    found = session.retriever.search(embedded.vectors, k, banned)
    timings["search"] = time.perf_counter() - started
    started = time.perf_counter()
    index = session.index
    predictions = corpus_mean_prediction(index.minilm_mean, len(image_ids))
    scores = np.full((len(image_ids), k), -np.inf, dtype=np.float32)
    ids = np.full((len(image_ids), k), -1, dtype=np.int64)
    if ok_rows:
        predictions[ok_rows] = blend(found.scores, found.ids, index.minilm, k=k, temperature=temperature,
                                     alpha=alpha, corpus_mean=index.minilm_mean)
        scores[ok_rows], ids[ok_rows] = found.scores, found.ids
    timings["blend"] = time.perf_counter() - started
    return ImagePredictions(image_ids, predictions, Neighbours(scores, ids), failed, timings)


def run_submit(options: SubmitOptions) -> SubmitReport:
    check_blend_args(options.k, options.temperature, options.alpha)
    listing = list_images(options.images)
    order = None
    not_in_sample = 0
    if options.sample_submission:
        image_ids, order = read_sample_submission(options.sample_submission)
        not_in_sample = len(set(listing.paths) - set(image_ids))
    else:
        image_ids = list(listing.paths)
    if not image_ids:
        raise UserError(f"no images (.png/.jpg/.jpeg/.webp) in {options.images}")
    session = open_session(options.index, options.models, options.device, options.verify)
    if session.index.text_dim != EMBED_DIM:
        raise UserError(f"the index's text model gives {session.index.text_dim}-d vectors; a submission needs "
                        f"the {EMBED_DIM}-d all-MiniLM-L6-v2 scorer")
    session.retriever.check_k(options.k)
    result = predict_images(session, image_ids, listing.paths, k=options.k, temperature=options.temperature,
                            alpha=options.alpha, batch_size=options.batch_size, workers=options.workers,
                            progress=options.progress)
    if result.failed and options.strict:
        listed = "; ".join(f"{image_id}: {reason}" for image_id, reason in list(result.failed.items())[:5])
        raise UserError(f"{len(result.failed)} image(s) could not be predicted (--strict): {listed}")
    for image_id, reason in result.failed.items():
        log.warning("image %s: %s; it gets the corpus-mean prediction", image_id, reason)
    started = time.perf_counter()
    write_submission(options.out, image_ids, result.predictions, order)
    result.timings_s["write"] = time.perf_counter() - started
    if options.explain:
        weights = np.zeros_like(result.neighbours.scores)
        ok = (result.neighbours.ids >= 0).all(axis=1)
        weights[ok] = softmax_weights(result.neighbours.scores[ok], options.temperature)
        prompts = [[session.index.prompts[i] if i >= 0 else "" for i in row] for row in result.neighbours.ids]
        write_explain(options.explain, image_ids, result.neighbours.scores, result.neighbours.ids, weights, prompts)
    return SubmitReport(
        out=str(options.out), images=len(image_ids), predicted=len(image_ids) - len(result.failed),
        failed=result.failed, duplicate_files=[str(p) for paths in listing.duplicates.values() for p in paths],
        not_in_sample=not_in_sample,
        settings={"k": options.k, "temperature": options.temperature, "alpha": options.alpha},
        timings_s={name: round(seconds, 3) for name, seconds in result.timings_s.items()})
