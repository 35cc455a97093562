"""The Kaggle retrieval submission: images → CLIP → top-k prompts → blended MiniLM vectors → submission.csv.

Images that cannot be decoded get the corpus-mean prediction (reported by name and counted), so the
submission is always complete; with strict=True they are an error instead. Images the sample submission
names but the folder lacks are loud: all of them missing is an error (the wrong folder, most likely).
Output paths are checked before any image is encoded. Failures are returned in the report (the CLI and
the notebook print it), not logged one by one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from img2prompt.atomic import write_atomic
from img2prompt.errors import UserError
from img2prompt.query.blend import neighbour_weights
from img2prompt.encoders.images import list_images
from img2prompt.query.predict import MISSING_FILE, blended_scores, predict_rows, retrieve_images
from img2prompt.query.preflight import check_submit_paths, npy_ids_path
from img2prompt.query.session import QuerySession
from img2prompt.query.settings import DEFAULT_SUBMISSION, ImageLoading, RetrievalSettings
from img2prompt.query.submission import EMBED_DIM, read_sample_submission, write_explain, write_submission

SHOWN_IDS = 5  # ids quoted in messages about missing images


@dataclass
class SubmitOptions:
    images: str
    out: str = DEFAULT_SUBMISSION
    sample_submission: str | None = None
    explain: str | None = None
    save_npy: str | None = None  # float32 [n, 384] predictions + NAME.ids.txt (imgId order), for ensembling
    strict: bool = False
    settings: RetrievalSettings = field(default_factory=RetrievalSettings)
    loading: ImageLoading = field(default_factory=ImageLoading)


@dataclass
class SubmitReport:
    out: str
    images: int
    predicted: int
    failed: dict[str, str] = field(default_factory=dict)  # imgId → reason; these got the corpus mean
    missing: list[str] = field(default_factory=list)  # sample ids without an image file (also in failed)
    duplicate_files: list[str] = field(default_factory=list)
    ignored_files: dict[str, str] = field(default_factory=dict)  # name → why (not a file, dangling link, …)
    not_in_sample: int = 0
    settings: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    images_per_s: float | None = None  # decode + encode, steady state over the whole folder


def check_submit_outputs(options: SubmitOptions, index_root: str | Path | None = None) -> None:
    """Refuse unusable or colliding outputs before any work (no image is encoded for nothing)."""
    check_submit_paths(index_root, options.images, options.out, options.explain, options.save_npy,
                       options.sample_submission)


def select_image_ids(options: SubmitOptions, listing) -> tuple[list[str], list[str] | None, int]:
    """(image ids to predict, row order or None, folder images not in the sample)."""
    if not options.sample_submission:
        if not listing.paths:
            subfolders = sum(1 for path in Path(options.images).iterdir() if path.is_dir())
            raise UserError(f"no images (.png/.jpg/.jpeg/.webp) in {options.images}" + (
                f" (its {subfolders} subfolder(s) are not read: submit takes one flat folder, imgId = file stem)"
                if subfolders else ""))
        return list(listing.paths), None, 0
    image_ids, order = read_sample_submission(options.sample_submission)
    present = [image_id for image_id in image_ids if image_id in listing.paths]
    if not present:
        expected = ", ".join(f"{image_id}.png" for image_id in image_ids[:SHOWN_IDS])
        raise UserError(f"none of the {len(image_ids)} images named in {options.sample_submission} is in "
                        f"{options.images} (expected e.g. {expected}): is it the right folder?")
    return image_ids, order, len(set(listing.paths) - set(image_ids))


def run_submit(session: QuerySession, options: SubmitOptions) -> SubmitReport:
    """Everything is checked (settings, outputs, images, the sample) before the models load or an image is
    decoded; then one retrieval over all the images and one blend."""
    settings = options.settings.check_for(session.index)
    check_submit_outputs(options, session.index.root)  # the index is an input too
    if session.index.text_dim != EMBED_DIM:
        raise UserError(f"the index's text model gives {session.index.text_dim}-d vectors; a submission needs "
                        f"the {EMBED_DIM}-d all-MiniLM-L6-v2 scorer")
    listing = list_images(options.images)
    image_ids, order, not_in_sample = select_image_ids(options, listing)
    missing = [image_id for image_id in image_ids if image_id not in listing.paths]
    if missing:
        shown = ", ".join(missing[:SHOWN_IDS]) + (" …" if len(missing) > SHOWN_IDS else "")
        if options.strict:
            raise UserError(f"{len(missing)} of {len(image_ids)} images are not in {options.images} (--strict): {shown}")
    result, failed = retrieve_images(session, image_ids, listing.paths, settings, loading=options.loading)
    started = time.perf_counter()
    predictions = predict_rows(session.index, result.neighbours, result.query_vectors, settings)
    result.timings_s["blend"] = time.perf_counter() - started
    undecodable = {image_id: reason for image_id, reason in failed.items() if reason != MISSING_FILE}
    if undecodable and options.strict:
        listed = "; ".join(f"{image_id}: {reason}" for image_id, reason in list(undecodable.items())[:SHOWN_IDS])
        raise UserError(f"{len(undecodable)} image(s) could not be predicted (--strict): {listed}")
    started = time.perf_counter()
    write_submission(options.out, image_ids, predictions, order)
    if options.save_npy:
        write_atomic(options.save_npy, lambda handle: np.save(handle, predictions, allow_pickle=False))
        ids_text = "".join(f"{image_id}\n" for image_id in image_ids).encode("utf-8")
        write_atomic(npy_ids_path(options.save_npy), lambda handle: handle.write(ids_text))
    result.timings_s["write"] = time.perf_counter() - started
    if options.explain:
        write_explain_for(session, options, image_ids, result.neighbours, result.query_vectors)
    decoded = len(image_ids) - len(missing)
    encode_seconds = result.timings_s.get("decode_encode", 0.0)
    return SubmitReport(
        out=str(options.out), images=len(image_ids), predicted=len(image_ids) - len(failed),
        failed=failed, missing=missing,
        duplicate_files=[str(p) for paths in listing.duplicates.values() for p in paths],
        ignored_files=listing.ignored,
        not_in_sample=not_in_sample,
        settings=settings.as_dict(),
        timings_s={name: round(seconds, 3) for name, seconds in result.timings_s.items()},
        images_per_s=round(decoded / encode_seconds, 1) if decoded and encode_seconds else None)


def write_explain_for(session: QuerySession, options: SubmitOptions, image_ids: list[str], neighbours,
                      query_vectors: np.ndarray) -> None:
    weights = np.zeros_like(neighbours.scores)
    ok = neighbours.ids[:, 0] >= 0  # as blend_neighbours: a row with a first neighbour is blended
    if ok.any():  # the weights the k-NN part used (score floor, softmax or inverse distance, then consensus)
        settings = options.settings
        scores = blended_scores(session.index, neighbours.scores[ok], neighbours.ids[ok], settings, query_vectors[ok])
        weights[ok] = neighbour_weights(scores, neighbours.ids[ok], session.index.minilm,
                                        consensus=settings.consensus, **settings.weighing())[0]
    ids = neighbours.ids
    flat = session.index.prompt_rows(ids.ravel())
    prompts = [flat[row * ids.shape[1]:(row + 1) * ids.shape[1]] for row in range(len(ids))]
    write_explain(options.explain, image_ids, neighbours.scores, ids, weights, prompts, session.index.key_kinds(ids))
