"""`build --pairs`: (image, prompt) files → image-keyed entries, streamed, every skipped row counted.

A pairs file is a CSV/TSV/parquet table with an `image` column (a path, absolute or relative to the pairs
file's folder, or a URL) and a `prompt` column: e.g. DiffusionDB's metadata, or images generated for corpus
prompts. The table may itself be a URL (s3://, https://, hf://, ...): its relative paths then name objects
beside it on the store (an absolute path: from the store's root, in the same bucket or host), and the images
are read through fsspec when the shard is encoded.
The entry's key is the CLIP *image* vector of the image, its value the prompt's MiniLM vector. Prompts are
normalised like corpus prompts but not deduplicated (several images of one prompt are several keys); a
row naming an image already listed (the same file once `..` and symlinks are resolved; for a URL, the same URL
once `..` is folded) is skipped. Images that cannot be read or decoded (a missing remote object too) are skipped
when the shard is encoded and counted in the shard's record ("unreadable_image").
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

from img2prompt import storage
from img2prompt.build_index.corpus import (DEFAULT_MAX_CHARS, SKIP_NUL, TABLE_SUFFIXES, CorpusReport, _raw_table_rows,
                                           clean_prompt, expand_corpus_paths)

IMAGE_COLUMN, PROMPT_COLUMN = "image", "prompt"
SKIP_NO_IMAGE = "no_image"
SKIP_DUPLICATE_IMAGE = "duplicate_image"
SKIP_UNREADABLE_IMAGE = "unreadable_image"


COLUMNS_HINT = f" (a --pairs table needs columns {IMAGE_COLUMN!r} and {PROMPT_COLUMN!r})"
TYPE_HINT = (f": a --pairs table needs text columns {IMAGE_COLUMN!r} (image paths) and {PROMPT_COLUMN!r} "
             "(the names are fixed; rename the columns)")


def expand_pair_paths(patterns: list[str]) -> list[Path]:
    """--pairs files and globs → existing table paths (errors name --pairs)."""
    return expand_corpus_paths(patterns, "--pairs", TABLE_SUFFIXES)


def check_pair_files(paths: list[Path]) -> None:
    """Every pairs table has both columns, before any output folder is touched."""
    for path in paths:
        for column in (IMAGE_COLUMN, PROMPT_COLUMN):
            rows = _raw_table_rows(path, column, COLUMNS_HINT, TYPE_HINT)
            next(rows, None)  # runs that reader's header and column checks
            rows.close()


def iter_pairs(paths: list[Path], report: CorpusReport | None = None,
               max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[tuple[str, str]]:
    """(absolute image path or URL, normalised prompt) for each usable row, in file and row order."""
    report = report if report is not None else CorpusReport()
    seen: set[int] = set()  # 8-byte hashes of the resolved image paths (memory: ~2M images fine)
    schemes: set[str] = set()  # URL schemes whose fsspec backend is known to be installed
    for path in paths:
        report.files.append(str(path))
        folder = storage.parent(str(path)) if storage.is_url(str(path)) else path.resolve().parent
        images = _raw_table_rows(path, IMAGE_COLUMN, COLUMNS_HINT, TYPE_HINT)
        prompts = _raw_table_rows(path, PROMPT_COLUMN, COLUMNS_HINT, TYPE_HINT)
        for (image, image_skip), (raw, prompt_skip) in zip(images, prompts):
            report.read += 1
            if prompt_skip or image_skip:
                report.skipped[prompt_skip or SKIP_NO_IMAGE] += 1
                continue
            prompt, skip = clean_prompt(raw, max_chars)
            skip = skip or (SKIP_NUL if "\x00" in image else SKIP_NO_IMAGE if not image.strip() else None)
            if skip:
                report.skipped[skip] += 1
                continue
            image_path = image_location(folder, image.strip())
            if storage.is_url(image_path) and image_path.split("://", 1)[0] not in schemes:
                storage.filesystem(image_path)  # a missing extra is one line now, not a skip per image later
                schemes.add(image_path.split("://", 1)[0])
            if report.keep_once(path_key(image_path), seen, SKIP_DUPLICATE_IMAGE):
                yield image_path, prompt


def image_location(folder: Path | str, image: str) -> str:
    """Where a row's `image` is: a URL as given; else a path under the table's folder (a URL folder: the
    object beside the table, `..` folded; a local one: an absolute `image` replaces the folder)."""
    if storage.is_url(image):
        return image
    if isinstance(folder, str) and storage.is_url(folder):
        return storage.join(folder, image)
    return str(Path(folder) / image)


def path_key(image_path: str) -> int:
    """8-byte hash of the file a path names (symlinks and `..` resolved, case and spaces kept: `A.png`,
    `a.png` and `b  c.png`, `b c.png` are four files), so only true repeats of one image are skipped. A URL
    is its own name (its string: a store has no symlinks to resolve)."""
    resolved = image_path.encode() if storage.is_url(image_path) else os.fsencode(os.path.realpath(image_path))
    return int.from_bytes(hashlib.blake2b(resolved, digest_size=8).digest(), "little")
