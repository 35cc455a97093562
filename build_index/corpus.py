"""Corpus reading: files → normalised, deduplicated prompts, streamed, with every skipped row counted.

Supported: .txt (one prompt a line), .csv / .tsv / .parquet (a named column). Deterministic order: files
in the order given (each glob sorted), rows in file order, so shard N is the same prompts on every run.
"""
from __future__ import annotations

import csv
import glob
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from img2prompt.encoders.prompts import KeySet, dedup_keys, normalise_prompt
from img2prompt import storage
from img2prompt.errors import UserError, short_reason

TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
DEFAULT_MAX_CHARS = 4000
READ_CHUNK_ROWS = 50_000
DEDUP_BATCH = 8192  # prompts whose dedup keys are checked against the set at once

# Why a row is skipped; the build summary lists each count.
SKIP_EMPTY = "empty"
SKIP_DUPLICATE = "duplicate"
SKIP_INVALID_UTF8 = "invalid_utf8"
SKIP_NUL = "nul_byte"
SKIP_TOO_LONG = "too_long"
SKIP_NULL = "null"


@dataclass
class CorpusReport:
    files: list[str] = field(default_factory=list)
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def keep_once(self, key: int, seen: set[int], duplicate_reason: str) -> bool:
        """Count a row kept the first time its key is seen, else skipped as a duplicate."""
        if key in seen:
            self.skipped[duplicate_reason] += 1
            return False
        seen.add(key)
        self.kept += 1
        return True

    def as_dict(self) -> dict:
        return {"files": self.files, "read": self.read, "kept": self.kept,
                "skipped": {reason: self.skipped[reason] for reason in sorted(self.skipped)}}


def expand_corpus_paths(patterns: Iterable[str], what: str = "corpus",
                        suffixes: tuple[str, ...] = TEXT_SUFFIXES + TABLE_SUFFIXES) -> list[Path]:
    """Files and globs (each sorted) → existing paths in order; `what` names them in errors ("--pairs")."""
    paths: list[Path] = []
    for pattern in patterns:
        if storage.is_url(pattern):  # fsspec URL (or URL glob): read through the storage seam
            matches = storage.expand_url(pattern)
        else:
            matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"{what} pattern matched no file: {pattern}")
        for match in matches:
            path = storage.as_path(match)
            if not path.is_file():
                raise UserError(f"{what} file not found: {match}")
            if path.suffix.lower() not in suffixes:
                raise UserError(f"{match}: unsupported {what} format {path.suffix!r} (use {', '.join(suffixes)})")
            if path not in paths:
                paths.append(path)
    return paths


def file_fingerprint(path: Path) -> dict:
    if isinstance(path, storage.UrlPath):  # the URL plus its ETag/version/size: a changed object → new key
        return storage.identity(path.url)
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


RawRow = tuple[str | None, str | None]  # (text, None) or (None, skip reason)


def _check_text_encoding(path: Path) -> None:
    """UTF-16/32 files decode as NUL-riddled garbage, CR-only files as one giant line: say so instead."""
    with storage.open_read(str(path)) as handle:
        head = handle.read(1 << 16)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) >= 4 and head[1::2].count(0) > len(head) // 4):
        raise UserError(f"{path}: looks like UTF-16 or UTF-32 text; save it as UTF-8 (one prompt a line)")
    if b"\r" in head and b"\n" not in head and len(head) == path.stat().st_size:
        raise UserError(f"{path}: lines end in CR only (old Mac style); convert to LF or CRLF line ends")
    if b"\r" in head and b"\n" not in head:
        raise UserError(f"{path}: no line feed in the first 64 KiB but CR characters: convert CR line ends to LF")


def _raw_text_rows(path: Path) -> Iterator[RawRow]:
    """Lines of a text file, BOM and CRLF handled; a line that is not valid UTF-8 is a skip."""
    _check_text_encoding(path)
    with storage.open_read(str(path)) as handle:
        for number, raw in enumerate(handle):
            if number == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8"), None
            except UnicodeDecodeError:
                yield None, SKIP_INVALID_UTF8


def check_corpus_files(paths: list[Path], column: str) -> None:
    """Every file readable, with the column (right type), before any output folder is touched: reading the
    first rows of each file is enough to fail in one line instead of hours into a build."""
    for path in paths:
        rows = _raw_text_rows(path) if path.suffix.lower() in TEXT_SUFFIXES else _raw_table_rows(path, column)
        next(rows, None)  # runs the header, encoding and column checks of that reader
        rows.close()


def _check_column(path: Path, column: str, columns: list[str], hint: str = " (choose one with --column)") -> None:
    if column not in columns:
        raise UserError(f"{path}: no column {column!r}; its columns are {', '.join(map(repr, columns))}{hint}")


TYPE_HINT = ": choose the prompt column with --column"


def is_text_type(kind: pa.DataType) -> bool:
    """Arrow text: string, binary (decoded as UTF-8), or either dictionary-encoded (a pandas category)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind))


def _raw_table_rows(path: Path, column: str, hint: str = " (choose one with --column)",
                    type_hint: str = TYPE_HINT) -> Iterator[RawRow]:
    """`hint` ends the missing-column error, `type_hint` the not-text one (each names the option to fix it)."""
    if path.suffix.lower() == ".parquet":
        return _raw_parquet_rows(path, column, hint, type_hint)
    return _raw_csv_rows(path, column, hint)


def _raw_parquet_rows(path: Path, column: str, hint: str, type_hint: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        # an fsspec file object is seekable: pyarrow reads the footer, then one row group at a time
        parquet = pq.ParquetFile(storage.open_read(path.url) if isinstance(path, storage.UrlPath) else path)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: not a readable parquet file ({exc})") from exc
    _check_column(path, column, parquet.schema_arrow.names, hint)
    kind = parquet.schema_arrow.field(column).type
    if not is_text_type(kind):
        raise UserError(f"{path}: column {column!r} holds {kind}, not text{type_hint}")
    try:
        for batch in parquet.iter_batches(columns=[column], batch_size=READ_CHUNK_ROWS):
            for value in batch.column(0).to_pylist():
                yield _parquet_value(value)
    except (OSError, pa.ArrowException) as exc:  # a damaged page or footer inside the file
        raise UserError(f"{path}: parquet data is damaged ({short_reason(exc)})") from exc


def _raw_csv_rows(path: Path, column: str, hint: str) -> Iterator[RawRow]:
    """CSV, or TSV by its suffix."""
    import pandas as pd

    if path.stat().st_size == 0:
        return
    _check_text_encoding(path)
    separator = "\t" if path.suffix.lower() == ".tsv" else ","
    # TSV has no quoting: a field that starts with '"' is text (PartiPrompts' '"G I G G L E" painted…'),
    # and quote processing would swallow the rows after it.
    quoting = csv.QUOTE_NONE if separator == "\t" else csv.QUOTE_MINIMAL
    try:
        header = pd.read_csv(str(path), sep=separator, nrows=0, encoding="utf-8-sig", encoding_errors="replace",
                             quoting=quoting)
        _check_column(path, column, [str(name) for name in header.columns], hint)
        # surrogateescape keeps undecodable bytes visible so the row can be skipped and counted.
        reader = pd.read_csv(str(path), sep=separator, usecols=[column], dtype=object, keep_default_na=False,
                             na_values=[], encoding="utf-8-sig", encoding_errors="surrogateescape",
                             chunksize=READ_CHUNK_ROWS, quoting=quoting)
        for chunk in reader:
            for value in chunk[column].tolist():
                yield (None, SKIP_INVALID_UTF8) if _has_surrogates(value) else (value, None)
    except pd.errors.EmptyDataError:
        return  # only blank lines: nothing to read
    except pd.errors.ParserError as exc:
        kind = "TSV" if separator == "\t" else "CSV"
        raise UserError(f"{path}: cannot parse as {kind}: {short_reason(exc)}") from exc


def _parquet_value(value) -> RawRow:
    """A string column's value, or a binary one's as UTF-8 (undecodable bytes are a counted skip)."""
    if value is None:
        return None, SKIP_NULL
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return None, SKIP_INVALID_UTF8
    return value, None


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def clean_prompt(raw: str, max_chars: int = DEFAULT_MAX_CHARS) -> tuple[str | None, str | None]:
    """(normalised prompt, None), or (None, why it is skipped): a NUL byte, nothing left, too long."""
    if "\x00" in raw:
        return None, SKIP_NUL
    prompt = normalise_prompt(raw)
    if not prompt:
        return None, SKIP_EMPTY
    if len(prompt) > max_chars:
        return None, SKIP_TOO_LONG
    return prompt, None


def iter_prompts(paths: list[Path], column: str = "prompt", report: CorpusReport | None = None,
                 max_chars: int = DEFAULT_MAX_CHARS, known: tuple[KeySet, str] | None = None) -> Iterator[str]:
    """Yield each kept prompt once, in order; count every read row and each skip reason in `report`."""
    return (prompt for _, prompt in iter_prompt_rows(paths, column, report, max_chars, known))


def iter_prompt_rows(paths: list[Path], column: str = "prompt", report: CorpusReport | None = None,
                     max_chars: int = DEFAULT_MAX_CHARS, known: tuple[KeySet, str] | None = None
                     ) -> Iterator[tuple[int, str]]:
    """(raw row number across all files, prompt) for each kept prompt: the row number locates a
    precomputed vector that belongs to the prompt (build --embeddings). Duplicates are found a batch at a
    time in sorted 8-byte keys (8 bytes a kept prompt, not a Python set's ~70). known: (keys, reason) of
    prompts to leave out too (an index's, for add), counted under that reason."""
    report = report if report is not None else CorpusReport()
    seen = KeySet()
    batch: list[tuple[int, str]] = []
    for path in paths:
        report.files.append(str(path))
        is_text = path.suffix.lower() in TEXT_SUFFIXES
        rows = _raw_text_rows(path) if is_text else _raw_table_rows(path, column)
        for raw, skip_reason in rows:
            report.read += 1
            prompt, skip_reason = (None, skip_reason) if skip_reason else clean_prompt(raw, max_chars)
            if skip_reason:
                report.skipped[skip_reason] += 1
                continue
            batch.append((report.read - 1, prompt))
            if len(batch) >= DEDUP_BATCH:
                yield from _first_seen(batch, seen, report, known)
                batch = []
    yield from _first_seen(batch, seen, report, known)


def _first_seen(batch: list[tuple[int, str]], seen: KeySet, report: CorpusReport,
                known: tuple[KeySet, str] | None) -> list[tuple[int, str]]:
    """The rows of `batch` whose prompt is seen for the first time (in order) and not known; the rest counted."""
    if not batch:
        return []
    keys = dedup_keys([prompt for _, prompt in batch])
    keep = seen.add_new(keys)
    if len(batch) > int(keep.sum()):
        report.skipped[SKIP_DUPLICATE] += len(batch) - int(keep.sum())
    if known is not None:
        old = keep & known[0].contains(keys)
        if old.any():
            report.skipped[known[1]] += int(old.sum())
        keep &= ~old
    report.kept += int(keep.sum())
    return [row for row, first in zip(batch, keep) if first]


def count_rows(paths: list[Path], block: int = 1 << 22) -> int:
    """Rows the corpus holds, cheaply, for the progress bar's total and ETA: line counts for text files
    (a CSV/TSV header is not a row; a quoted newline inside a field counts once more), parquet metadata."""
    import pyarrow.parquet as pq

    total = 0
    for path in paths:
        if path.suffix.lower() == ".parquet":
            try:
                source = storage.open_read(path.url) if isinstance(path, storage.UrlPath) else path
                total += pq.ParquetFile(source).metadata.num_rows
            except Exception:  # unreadable: the reader names the file with its own error
                continue
            continue
        lines, last = 0, b"\n"
        with storage.open_read(str(path)) as handle:
            while chunk := handle.read(block):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        lines += last != b"\n"  # a last line without its newline
        total += max(0, lines - (path.suffix.lower() in TABLE_SUFFIXES))
    return total
