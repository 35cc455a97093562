"""The Kaggle retrieval submission: images → CLIP → top-k prompts → blended MiniLM vectors → submission.csv.

Images that cannot be decoded get the corpus-mean prediction (reported by name and counted), so the
submission is always complete; with strict=True they are an error instead.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from img2prompt.errors import UserError
from img2prompt.query.blend import check_blend_args, softmax_weights
from img2prompt.query.images import list_images
from img2prompt.query.predict import RetrievalSettings, blend_neighbours, retrieve_images
from img2prompt.query.session import open_session
from img2prompt.query.submission import EMBED_DIM, read_sample_submission, write_explain, write_submission

log = logging.getLogger(__name__)


@dataclass
class SubmitOptions(RetrievalSettings):
    index: str
    images: str
    out: str = "submission.csv"
    sample_submission: str | None = None
    explain: str | None = None
    strict: bool = False


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
    result = retrieve_images(session, image_ids, listing.paths, options.k, batch_size=options.batch_size,
                             workers=options.workers, progress=options.progress)
    started = time.perf_counter()
    predictions = blend_neighbours(session.index, result.neighbours, k=options.k,
                                   temperature=options.temperature, alpha=options.alpha)
    result.timings_s["blend"] = time.perf_counter() - started
    if result.failed and options.strict:
        listed = "; ".join(f"{image_id}: {reason}" for image_id, reason in list(result.failed.items())[:5])
        raise UserError(f"{len(result.failed)} image(s) could not be predicted (--strict): {listed}")
    for image_id, reason in result.failed.items():
        log.warning("image %s: %s; it gets the corpus-mean prediction", image_id, reason)
    started = time.perf_counter()
    write_submission(options.out, image_ids, predictions, order)
    result.timings_s["write"] = time.perf_counter() - started
    if options.explain:
        weights = np.zeros_like(result.neighbours.scores)
        ok = (result.neighbours.ids >= 0).all(axis=1)
        weights[ok] = softmax_weights(result.neighbours.scores[ok], options.temperature)
        ids = result.neighbours.ids
        flat = session.index.prompt_rows(ids.ravel())
        prompts = [flat[row * ids.shape[1]:(row + 1) * ids.shape[1]] for row in range(len(ids))]
        write_explain(options.explain, image_ids, result.neighbours.scores, result.neighbours.ids, weights, prompts)
    return SubmitReport(
        out=str(options.out), images=len(image_ids), predicted=len(image_ids) - len(result.failed),
        failed=result.failed, duplicate_files=[str(p) for paths in listing.duplicates.values() for p in paths],
        not_in_sample=not_in_sample,
        settings={"k": options.k, "temperature": options.temperature, "alpha": options.alpha},
        timings_s={name: round(seconds, 3) for name, seconds in result.timings_s.items()})
