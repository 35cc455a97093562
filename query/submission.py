"""The Kaggle submission CSV (and the explain CSV): build, validate, write atomically.

Format: header `imgId_eId,val`; for each image, rows f"{imgId}_{i}" for i in 0..383; row order from
sample_submission.csv when given. Validated (ids, 384 per image, finite, unit norm) in memory and again as
read back from the temp file before the rename, so an existing submission.csv is never replaced by a bad
or half-written one, and concurrent writers (each with its own temp file) each leave a complete file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from img2prompt.atomic import atomic_path
from img2prompt.errors import UserError

EMBED_DIM = 384
ID_COLUMN = "imgId_eId"
VALUE_COLUMN = "val"
NORM_TOLERANCE = 1e-3


def row_ids(image_ids: list[str], dim: int = EMBED_DIM) -> list[str]:
    return [f"{image_id}_{i}" for image_id in image_ids for i in range(dim)]


def read_sample_submission(path: str | Path, dim: int = EMBED_DIM) -> tuple[list[str], list[str]]:
    """(image ids in first-appearance order, every row id in file order) from a sample submission."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sample submission not found: {path}")
    try:
        frame = pd.read_csv(path, usecols=[ID_COLUMN], dtype=str, keep_default_na=False)
    except ValueError as exc:
        raise UserError(f"{path}: expected a column {ID_COLUMN!r} ({exc})") from exc
    ids = frame[ID_COLUMN].tolist()
    if not ids:
        raise UserError(f"{path}: the sample submission has a header but no rows")
    image_ids: dict[str, int] = {}
    for number, row_id in enumerate(ids, start=2):
        image_id, _, suffix = row_id.rpartition("_")
        if not image_id or not suffix.isdigit() or not 0 <= int(suffix) < dim:
            raise UserError(f"{path}, line {number}: {row_id!r} is not of the form <imgId>_<0..{dim - 1}>")
        image_ids[image_id] = image_ids.get(image_id, 0) + 1
    short = [image_id for image_id, rows in image_ids.items() if rows != dim]
    if short or len(set(ids)) != len(ids):
        raise UserError(f"{path}: every image needs exactly {dim} distinct rows "
                        f"({', '.join(short[:3]) or 'duplicate row ids'})")
    return list(image_ids), ids


def submission_frame(image_ids: list[str], predictions: np.ndarray, order: list[str] | None = None) -> pd.DataFrame:
    predictions = np.asarray(predictions, dtype=np.float32)
    if predictions.shape != (len(image_ids), EMBED_DIM):
        raise UserError(f"predictions have shape {predictions.shape}, expected ({len(image_ids)}, {EMBED_DIM}): "
                        "the index's text model must be the 384-d all-MiniLM-L6-v2 scorer")
    frame = pd.DataFrame({ID_COLUMN: row_ids(image_ids), VALUE_COLUMN: predictions.reshape(-1)})
    if order is not None:
        frame = frame.set_index(ID_COLUMN).reindex(order).reset_index()
    return frame


def validate_submission(frame: pd.DataFrame, expected_ids: list[str]) -> None:
    """Raise UserError unless the frame is exactly a valid submission for `expected_ids` (in order)."""
    if list(frame.columns) != [ID_COLUMN, VALUE_COLUMN]:
        raise UserError(f"submission columns are {list(frame.columns)}, expected [{ID_COLUMN!r}, {VALUE_COLUMN!r}]")
    if len(frame) != len(expected_ids) or frame[ID_COLUMN].tolist() != expected_ids:
        raise UserError(f"submission rows do not match the expected ids ({len(frame)} rows, "
                        f"{len(expected_ids)} expected)")
    values = frame[VALUE_COLUMN].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        bad = frame[ID_COLUMN][~np.isfinite(values)].tolist()[:3]
        raise UserError(f"submission has missing or non-finite values (first: {', '.join(bad)})")
    image_of_row = frame[ID_COLUMN].str.rpartition("_")[0]
    norms = np.sqrt(pd.Series(values * values).groupby(image_of_row.to_numpy(), sort=False).sum().to_numpy())
    if np.abs(norms - 1).max() > NORM_TOLERANCE:
        raise UserError(f"submission vectors are not unit norm (norms {norms.min():.4f}…{norms.max():.4f})")


def write_submission(path: str | Path, image_ids: list[str], predictions: np.ndarray,
                     order: list[str] | None = None) -> pd.DataFrame:
    frame = submission_frame(image_ids, predictions, order)
    expected = order if order is not None else row_ids(image_ids)
    validate_submission(frame, expected)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.9g")
        # What gets renamed into place is what was checked: the file on disk, read back.
        validate_submission(pd.read_csv(tmp, dtype={ID_COLUMN: str}, keep_default_na=False), expected)
    return frame


def write_explain(path: str | Path, image_ids: list[str], scores: np.ndarray, ids: np.ndarray,
                  weights: np.ndarray, prompts: list[list[str]], kinds: np.ndarray | None = None) -> None:
    """One row per (image, rank): the prompts behind each prediction with their similarity, weight and key
    kind (text, or image for `build --pairs` entries)."""
    rows = []
    for row, image_id in enumerate(image_ids):
        for rank in range(ids.shape[1]):
            if ids[row, rank] < 0:
                continue
            rows.append({"imgId": image_id, "rank": rank + 1, "score": float(scores[row, rank]),
                         "weight": float(weights[row, rank]), "prompt_id": int(ids[row, rank]),
                         "key": kinds[row, rank] if kinds is not None else "text", "prompt": prompts[row][rank]})
    frame = pd.DataFrame(rows, columns=["imgId", "rank", "score", "weight", "prompt_id", "key", "prompt"])
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
