"""Reading and writing a FAISS index file atomically, shared by the FAISS-backed kinds."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from img2prompt.atomic import atomic_path
from img2prompt.errors import UserError, short_reason
from img2prompt.index.layout import FAISS

ADD_CHUNK = 65_536


def write_faiss(index, path: Path) -> None:
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_faiss(path: Path, expected_count: int):
    import faiss

    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise UserError(f"{path}: not a readable FAISS index ({short_reason(exc, 200)})") from exc
    if index.ntotal != expected_count:
        raise UserError(f"{path}: FAISS holds {index.ntotal} vectors, the index has {expected_count} prompts")
    return index


def add_in_chunks(index, vectors: np.ndarray, progress: Callable[[int], None] | None = None) -> None:
    """Fill from (memory-mapped) float16 vectors, converting a chunk at a time."""
    for start in range(0, len(vectors), ADD_CHUNK):
        chunk = np.ascontiguousarray(vectors[start:start + ADD_CHUNK], dtype=np.float32)
        index.add(chunk)
        if progress:
            progress(len(chunk))


class GrowsFaissIndex:
    """grow() for the FAISS kinds (a mixin before SearchBackend): the new rows go through the trained
    structure (HNSW links them in, IVF-PQ assigns them to the trained lists with the trained codebooks)."""

    def grow(self, vectors: np.ndarray, root: Path, progress: Callable[[int], None] | None = None):
        add_in_chunks(self.index, vectors[self.count:], progress)
        write_faiss(self.index, Path(root) / FAISS)
        return type(self)(vectors, self.params, self.index)
