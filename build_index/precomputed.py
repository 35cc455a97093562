"""Precomputed CLIP text vectors (`build --embeddings`): the layout clip-retrieval and autofaiss exchange,
a folder of `.npy` arrays row-aligned with the prompt files (e.g. parquet with a caption column).

The vectors replace the CLIP text encoder; the MiniLM scorer vectors are still computed here from the
prompts (they are the ground truth). Checked before use: total rows = corpus rows, dim = the CLIP model's,
every row unit-norm (error names the file and row), and the vectors must be what the given CLIP model
gives for the first prompts (cosine), so a file from another model is refused rather than indexed.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from img2prompt import storage
from img2prompt.errors import UserError

NORM_TOLERANCE = 1e-2  # float16 storage keeps norms within ~1e-3
AGREEMENT_SAMPLE = 64  # prompts re-encoded to check the vectors came from this CLIP model
AGREEMENT_MIN_COSINE = 0.99


@dataclass
class PrecomputedVectors:
    files: list[Path]  # local files (a URL's cached copy)
    arrays: list[np.ndarray]  # memory-mapped, one per file
    offsets: np.ndarray  # global row where each file starts; last entry = total rows
    names: list[str] | None = None  # what the user gave for each file (a URL, not its cache copy): for errors

    def name(self, index: int) -> str:
        return self.names[index] if self.names else str(self.files[index])

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.arrays[0].shape[1])

    def locate(self, row: int) -> tuple[str, int]:
        """(the file's name as the user gave it, the row inside it) of a global row."""
        index = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return self.name(index), row - int(self.offsets[index])

    def take(self, rows: list[int]) -> np.ndarray:
        """float32 vectors of these global rows, each checked to be unit-norm."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and rows.max() >= self.rows:  # a CSV corpus (estimated count) longer than the vectors
            raise misaligned(self.rows)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for index in np.unique(which):
            mask = which == index
            out[mask] = self.arrays[index][rows[mask] - self.offsets[index]]
        norms = np.linalg.norm(out, axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1) <= NORM_TOLERANCE))
        if len(bad):
            path, local = self.locate(int(rows[bad[0]]))
            raise UserError(f"{path}, row {local}: vector norm {norms[bad[0]]:.4f}, expected 1 (L2-normalised "
                            f"CLIP vectors); {len(bad)} such row(s) in this shard")
        return out


def misaligned(vector_rows: int, corpus_rows: int | None = None) -> UserError:
    """The one message for vectors and corpus of different lengths (known up front, or only while reading)."""
    corpus = f"{corpus_rows:,}" if corpus_rows is not None else "more"
    return UserError(f"--embeddings hold {vector_rows:,} rows but the corpus has {corpus}: they must be "
                     "row-aligned (same files, same order)")


def open_precomputed(patterns: list[str]) -> PrecomputedVectors:
    files: list[Path] = []
    names: dict[Path, str] = {}  # a URL's cached copy → the URL, which errors name
    for pattern in patterns:
        if storage.is_url(pattern):  # memmaps need local files: each .npy is copied into the cache first
            path_matches = []
            for url in storage.expand_url(pattern):
                path_matches.append(storage.local_copy(url))
                names[path_matches[-1]] = url
        else:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            path_matches = [Path(match) for match in matches]
        if len(path_matches) == 1 and path_matches[0].is_dir():
            path_matches = sorted(path_matches[0].glob("*.npy"))
        if not path_matches:
            raise UserError(f"--embeddings {pattern}: no .npy file found")
        for path in path_matches:
            if not path.is_file():
                raise UserError(f"--embeddings: file not found: {path}")
            if path not in files:
                files.append(path)
    shown = [names.get(path, str(path)) for path in files]
    arrays = []
    for path, name in zip(files, shown):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            reason = str(exc).replace(str(path), name)  # numpy may quote the file it opened: the cache copy
            raise UserError(f"{name}: not a readable .npy array ({reason})") from exc
        if array.ndim != 2 or array.dtype not in (np.float16, np.float32):
            raise UserError(f"{name}: expected a float16/float32 [rows, dim] array, found {array.dtype} {array.shape}")
        if arrays and array.shape[1] != arrays[0].shape[1]:
            raise UserError(f"{name}: dim {array.shape[1]}, but {shown[0]} has dim {arrays[0].shape[1]}")
        arrays.append(array)
    offsets = np.concatenate([[0], np.cumsum([len(array) for array in arrays])]).astype(np.int64)
    return PrecomputedVectors(files, arrays, offsets, shown)


def check_against_model(vectors: PrecomputedVectors, clip_dim: int, corpus_rows: int | None) -> None:
    """Shape checks that need no encoding: dim and (where the corpus count is exact) the row count."""
    if vectors.dim != clip_dim:
        raise UserError(f"--embeddings have dim {vectors.dim}, the CLIP model gives {clip_dim}: pass the model "
                        "that made them")
    if corpus_rows is not None and corpus_rows != vectors.rows:
        raise misaligned(vectors.rows, corpus_rows)


def check_agreement(vectors: np.ndarray, reference: np.ndarray, model_name: str) -> None:
    """The first prompts' given vectors must be what the CLIP model gives them."""
    cosine = float((vectors * reference).sum(axis=1).mean())
    if cosine < AGREEMENT_MIN_COSINE:
        raise UserError(f"the --embeddings do not match CLIP {model_name!r} (mean cosine {cosine:.3f} to its own "
                        f"vectors on the first {len(vectors)} prompts): pass the model that made them")
