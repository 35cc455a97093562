"""How the MiniLM scorer vectors are stored: float16 (minilm.f16) or int8 with a per-row scale.

int8 layout (`build --minilm-dtype int8`, index format 4):
    minilm.i8         int8 [count, text_dim], q = round(x / scale), |q| ≤ 127
    minilm_scale.f32  float32 [count], scale = max|x_row| / 127 (0-rows get scale 1: they stay 0)

Symmetric per-row scaling, because the rows are L2-normalised and their largest component varies a lot
from prompt to prompt: one scale per row keeps every element's error ≤ scale / 2 ≤ max|x| / 254.
Each row costs text_dim + 4 bytes instead of 2 · text_dim (384 → 388 bytes instead of 768).

Every reader goes through `minilm_rows` (PromptIndex.minilm): fancy indexing returns float32 rows,
dequantised on the fly, so blend / predict / submit / calibration never see the storage dtype.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from img2prompt.atomic import atomic_path, write_atomic
from img2prompt.index.layout import MINILM, MINILM_I8, MINILM_SCALE

FP16, INT8 = "fp16", "int8"
MINILM_DTYPES = (FP16, INT8)
_BLOCK = 65_536


def minilm_dtype(manifest: dict) -> str:
    """The manifest's MiniLM storage dtype (indexes before format 4 are fp16)."""
    return (manifest.get("minilm") or {}).get("dtype", FP16)


def minilm_file_names(dtype: str) -> tuple[str, ...]:
    return (MINILM_I8, MINILM_SCALE) if dtype == INT8 else (MINILM,)


def minilm_file_bytes(dtype: str, count: int, dim: int) -> dict[str, int]:
    """The exact size of each MiniLM file (checked when an index opens)."""
    if dtype == INT8:
        return {MINILM_I8: count * dim, MINILM_SCALE: count * 4}
    return {MINILM: count * dim * 2}


def quantise(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float rows → (int8 rows, float32 per-row scale)."""
    rows = np.asarray(rows, dtype=np.float32)
    peak = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows), np.float32)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    quantised = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
    return quantised, scale


def dequantise(quantised: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The one way back from int8 rows to float32 vectors."""
    return np.asarray(quantised, dtype=np.float32) * np.asarray(scale, dtype=np.float32)[..., None]


class Int8Rows:
    """Row access over minilm.i8 + minilm_scale.f32 that looks like the float16 memmap to its readers."""

    def __init__(self, quantised: np.ndarray, scale: np.ndarray) -> None:
        self.quantised, self.scale = quantised, scale
        self.shape = quantised.shape
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):  # row selection only (all the readers need)
            raise TypeError("Int8Rows takes row indices only")
        return dequantise(self.quantised[key], self.scale[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)


def minilm_rows(root: Path, manifest: dict, count: int, dim: int):
    """The index's MiniLM rows, memory-mapped: the float16 memmap, or Int8Rows for an int8 index."""
    if minilm_dtype(manifest) == INT8:
        return Int8Rows(np.memmap(root / MINILM_I8, dtype=np.int8, mode="r", shape=(count, dim)),
                        np.memmap(root / MINILM_SCALE, dtype=np.float32, mode="r", shape=(count,)))
    return np.memmap(root / MINILM, dtype=np.float16, mode="r", shape=(count, dim))


def write_int8(root: Path, blocks: Iterable[np.ndarray]) -> None:
    """Quantise float rows (streamed, block by block) into minilm.i8 + minilm_scale.f32, each atomically."""
    scales = []
    with atomic_path(root / MINILM_I8) as tmp:
        with open(tmp, "wb") as handle:
            for block in blocks:
                for start in range(0, len(block), _BLOCK):
                    quantised, scale = quantise(block[start:start + _BLOCK])
                    handle.write(quantised.tobytes())
                    scales.append(scale)
    data = np.concatenate(scales or [np.zeros(0, np.float32)]).astype(np.float32).tobytes()
    write_atomic(root / MINILM_SCALE, lambda handle: handle.write(data))


def prediction_change(keys: np.ndarray, full: np.ndarray, compact, *, queries: int = 500, k: int = 10,
                      temperature: float = 0.05, seed: int = 0) -> dict:
    """The cost of compact storage, measured: mean |Δ cos(prediction, truth)| between predictions blended
    from `full` and from `compact` MiniLM rows, for a seeded sample of rows queried by their own CLIP key
    (the row itself left out; its fp16 MiniLM vector is the truth). The blend is query/blend.py's knn
    softmax (this module sits below query/, so it repeats the three lines)."""
    count = len(keys)
    if count < 2:
        return {"queries": 0, "mean_abs_delta_cos": 0.0, "max_abs_delta_cos": 0.0}
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(count, size=min(queries, count), replace=False))
    query_vectors = np.asarray(keys[sample], np.float32)
    scores = np.full((len(sample), min(k, count - 1)), -np.inf, np.float32)
    ids = np.zeros(scores.shape, np.int64)
    for start in range(0, count, _BLOCK):  # streamed exact top-k over the keys
        block = np.asarray(keys[start:start + _BLOCK], np.float32) @ query_vectors.T
        block = block.T
        own = (sample >= start) & (sample < start + block.shape[1])
        block[np.nonzero(own)[0], sample[own] - start] = -np.inf
        both = np.concatenate([scores, block], axis=1)
        both_ids = np.concatenate([ids, np.broadcast_to(np.arange(start, start + block.shape[1]), block.shape)], 1)
        top = np.argpartition(-both, scores.shape[1] - 1, axis=1)[:, :scores.shape[1]]
        scores, ids = np.take_along_axis(both, top, 1), np.take_along_axis(both_ids, top, 1)
    weights = np.exp((scores - scores.max(axis=1, keepdims=True)) / temperature)
    weights /= weights.sum(axis=1, keepdims=True)
    truth = np.asarray(full[sample], np.float64)

    def cos(rows) -> np.ndarray:
        vectors = np.asarray(rows[ids.ravel()], np.float64).reshape(*ids.shape, -1)
        prediction = np.einsum("qk,qkd->qd", weights, vectors)
        prediction /= np.maximum(np.linalg.norm(prediction, axis=1, keepdims=True), 1e-12)
        return np.einsum("qd,qd->q", prediction, truth / np.maximum(np.linalg.norm(truth, axis=1, keepdims=True), 1e-12))

    delta = np.abs(cos(full) - cos(compact))
    return {"queries": int(len(sample)), "k": int(scores.shape[1]), "mean_abs_delta_cos": float(delta.mean()),
            "max_abs_delta_cos": float(delta.max())}
