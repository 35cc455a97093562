"""Where a folder's prompts go: one CSV or JSON Lines file (format from the suffix) written through a temp file
beside it (rows as they come, renamed into place at the end), and a `.txt` beside each image as Stable-Diffusion
training tools expect."""
from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import IO, Iterator

from img2prompt.atomic import atomic_path, write_atomic
from img2prompt.errors import UserError
from img2prompt.query.image_walk import CAPTION_SUFFIX
from img2prompt.query.interrogate import Interrogation

COLUMNS = ("image", "prompt", "best_neighbour", "best_neighbour_id", "score")
FORMATS = {".csv": "csv", ".jsonl": "jsonl"}


def output_format(out: str | Path) -> str:
    """"csv" or "jsonl" from the file name; anything else is refused before any work."""
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise UserError(f"--out {out}: name a .csv or .jsonl file (the format follows the suffix)")
    return fmt


def row_of(result: Interrogation) -> dict:
    return {"image": result.query, "prompt": result.prompt, "best_neighbour": result.base,
            "best_neighbour_id": result.base_id, "score": round(result.base_score, 6)}


def read_rows(out: str | Path) -> Iterator[dict]:
    """The rows of an earlier output file (none when it does not exist); a row without an image is skipped."""
    path = Path(out)
    if not path.is_file():
        return
    with open(path, encoding="utf-8", newline="") as handle:
        if output_format(path) == "csv":
            rows = csv.DictReader(handle)
        else:
            rows = (_json_line(line, path, number) for number, line in enumerate(handle, 1) if line.strip())
        for row in rows:
            if row.get("image"):
                yield row


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {number}: not JSON ({exc.msg}); --resume needs a file this command wrote") from exc
    return row if isinstance(row, dict) else {}


class RowWriter:
    """Rows into the temp file of `out`; `commit()` by leaving the `open_rows` block without an error."""

    def __init__(self, handle: IO[str], fmt: str) -> None:
        self.handle, self.fmt, self.rows = handle, fmt, 0
        self.csv = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore") if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.csv is not None:
            self.csv.writerow(row)
        else:
            self.handle.write(json.dumps({name: row.get(name) for name in COLUMNS}, ensure_ascii=False) + "\n")
        self.rows += 1


@contextlib.contextmanager
def open_rows(out: str | Path, keep: list[dict] | None = None) -> Iterator[RowWriter]:
    """A RowWriter on a temp file beside `out`, holding `keep` (the old rows of a resumed run) first; on a clean
    exit it is fsynced and renamed over `out`, on any error (or a kill) `out` stays as it was."""
    fmt = output_format(out)
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = RowWriter(handle, fmt)
            for row in keep or ():
                writer.write(row)
            yield writer


def txt_path(image: str | Path) -> Path:
    return Path(image).with_suffix(CAPTION_SUFFIX)


def write_txt(image: str | Path, prompt: str, overwrite: bool = False) -> bool:
    """The prompt into IMAGE.txt (atomically); False, untouched, when that file exists and overwrite is off."""
    path = txt_path(image)
    if path.exists() and not overwrite:
        return False
    data = (prompt + "\n").encode("utf-8")
    write_atomic(path, lambda handle: handle.write(data))
    return True


class Echo:
    """Results printed as they come: `IMAGE: prompt` lines, or one JSON array (valid however many chunks it
    spans, since it is one run's single array); call close() at the end."""

    def __init__(self, handle: IO[str], as_json: bool = False) -> None:
        self.handle, self.as_json, self.count = handle, as_json, 0

    def __call__(self, result: Interrogation) -> None:
        if self.as_json:
            text = json.dumps(result.to_dict(), ensure_ascii=False, indent=2)
            self.handle.write(("[\n" if self.count == 0 else ",\n") + "  " + text.replace("\n", "\n  "))
        else:
            self.handle.write(f"{result.query}: " + (f"error: {result.error}" if result.error else result.prompt)
                              + "\n")
        self.count += 1
        self.handle.flush()

    def close(self) -> None:
        if self.as_json:
            self.handle.write("\n]\n" if self.count else "[]\n")
            self.handle.flush()
