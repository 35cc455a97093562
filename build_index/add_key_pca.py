"""`add` to an index built with `--key-dims`: the PCA's recall measured again over the grown index (`--retrain` refits it).

Its PCA was fitted on the build's rows, and the new rows may not fit it. The index keeps only the projected keys, so what needs full-width keys re-encodes the
old rows' prompts with the index's own CLIP model (identity-checked by add); the new rows' full-width keys are
still in the add's shards.

    every add       recall@10 measured again over the grown index (index/key_pca.grown_recall: the new rows as
                    queries, among themselves and a sample of ≤ ADD_SAMPLE rows, so only that many old prompts
                    are re-encoded), recorded with the previous figure as before_add; a warning below
                    RECALL_TARGET names --retrain
    add --retrain   the PCA refitted over the grown index as a build fits it (a seeded sample of ≤ FIT_SAMPLE
                    rows): every old prompt is re-encoded (the CLIP half of a rebuild; MiniLM rows, phrases
                    and the rest are kept), every segment's clip.f16 rewritten through the new PCA
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from img2prompt.index.key_pca import KeyPCA, fit_keys, grown_recall, reduced_recall, save_pca, \
    write_projected
from img2prompt.index.layout import CLIP_VECTORS, KEY_PCA, VECTOR_DTYPE
from img2prompt.index.reader import PromptIndex
from img2prompt.index.recall import RECALL_TARGET
from img2prompt.index.segments import ConcatRows, segments_of
from img2prompt.progress import progress_bar

log = logging.getLogger(__name__)

FULL_KEYS = ".full_width_keys.f16"  # the grown index's re-encoded keys while --retrain refits (then removed)
ENCODE_BATCH = 8_192  # old prompts read and re-encoded at a time

Encode = Callable[[list[str]], np.ndarray]  # prompts → their full-width CLIP keys (float32)


def remeasure_key_pca(section: dict, pca: KeyPCA, old: PromptIndex, new_keys: Sequence[np.ndarray], first: int,
                      encode: Encode, seed: int = 0) -> dict:
    """The manifest's key_pca section after an add without --retrain: the same fit, its recall@10 measured
    again over the grown index (`old`'s rows, then the `new_keys` rows from id `first`)."""
    new = ConcatRows(list(new_keys))
    count = first + len(new)

    def full_keys_of(ids: np.ndarray) -> np.ndarray:  # sorted ids: the old ones first
        old_ids, new_ids = ids[ids < first], ids[ids >= first]
        parts = [np.asarray(encode(old.prompt_rows(old_ids)), np.float32)] if len(old_ids) else []
        return np.concatenate(parts + [np.asarray(new[new_ids - first], np.float32)])

    measured = grown_recall(pca, full_keys_of, count, np.arange(first, count), seed=seed)
    before = section.get("recall_at_10")
    if measured["recall_at_10"] < RECALL_TARGET:
        log.warning("recall@10 of the key PCA (fitted on %s rows) over the grown index is %.3f (< %.2f%s): add "
                    "again with --retrain to refit it over every row (re-encodes every prompt's CLIP key)",
                    section.get("fit_rows", "?"), measured["recall_at_10"], RECALL_TARGET,
                    f"; it was {before:.3f} before this add" if before is not None else "")
    return {**section, **measured, "held_out": True, "before_add": before}


def refit_key_pca(root: Path, grown: PromptIndex, old: PromptIndex, new_keys: Sequence[np.ndarray],
                  encode: Encode, section: dict, progress: bool = True) -> tuple[dict, list[str], PromptIndex]:
    """add --retrain: the PCA fitted again over every row of the grown index in `root` (the add's staging
    folder), as a build fits it; every segment's clip.f16 rewritten through it (by rename: the old index's
    hard-linked files are untouched). Returns (the key_pca section, the rewritten files, the grown index
    re-read)."""
    dims, seed = int(section["dims"]), int(section.get("seed", 0))
    tmp = root / FULL_KEYS
    try:
        with open(tmp, "wb") as handle, progress_bar(enabled=progress, total=old.count, unit="prompt",
                                                     desc="re-encode CLIP keys") as bar:
            for batch in old.stream_prompt_batches(size=ENCODE_BATCH):
                handle.write(np.asarray(encode(batch), np.float32).astype(VECTOR_DTYPE).tobytes())
                bar.update(len(batch))
            for block in new_keys:
                handle.write(np.asarray(block, VECTOR_DTYPE).tobytes())
        full = np.memmap(tmp, dtype=VECTOR_DTYPE, mode="r", shape=(grown.count, old.clip_dim))
        pca, query_rows, fitted = fit_keys(full, dims, seed)
        names = []
        for part in segments_of(grown.manifest):
            names.append(part.name(CLIP_VECTORS))
            write_projected(root / names[-1], pca, full[part.first_id:part.first_id + part.count])
        save_pca(root / KEY_PCA, pca)
        regrown = PromptIndex(root=root, manifest=grown.manifest)
        fitted["recall_at_10"] = reduced_recall(full, np.asarray(full[query_rows], np.float32), pca,
                                                reduced=regrown.clip_vectors)
        del full
    finally:
        tmp.unlink(missing_ok=True)
    log.info("key PCA refitted over %d rows: recall@10 vs full width %.3f (it was %.3f)", fitted["fit_rows"],
             fitted["recall_at_10"], section.get("recall_at_10") or float("nan"))
    return {**fitted, "refit_at_add": True, "before_add": section.get("recall_at_10")}, names + [KEY_PCA], regrown
