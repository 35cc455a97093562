"""`build --key-dims D`: an uncentred PCA of the CLIP keys, fitted on a seeded sample, projecting keys and queries alike.

Build: reduce_keys runs right after consolidate (before the search backends, so they index the reduced
keys), fits on a seeded sample of ≤ FIT_SAMPLE keys, measures held-out recall@10 of exact search over the
reduced keys against exact full-width search, and rewrites clip.f16 at D dims. Query: Retriever.to_keys
(query/search.py) projects every query vector before search, the one place. For now --key-dims is refused
with --pairs (the image-key calibration would need projecting) and with several CLIP models (per-model
cosines for --min-score), and the ridge head is not fitted (it maps full-width keys).

Fitted over the *fused* keys (the ensemble's scaled concatenation, encoders/clip_ensemble.py), not per
member: the search ranks by the fused inner product Σ_m cos_m / M, and the fused PCA keeps the directions
that carry most of that score whichever member they come from; per-member PCA would have to split D between
members by hand. `--model-weights` stays possible: weighted_query is applied to the full-width query first,
then the weighted query is projected like any other.

    key_pca.npz   components float32 [D, key_dim] (orthonormal rows: the top eigenvectors of E[k kᵀ])
    project(v) = normalise(v @ componentsᵀ)   — keys at build, queries at query time, the same call

Uncentred (second moment, not covariance): the search ranks by inner product, and a projection onto the
top directions of E[k kᵀ] keeps the most of it; subtracting the mean would change every cosine even at full
width (measured: 384 → 288 dims of real MiniLM vectors, recall@10 0.70 centred against 0.98 uncentred, bench/minilm_int8.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from img2prompt.atomic import atomic_path, write_atomic
from img2prompt.index.layout import KEY_PCA, VECTOR_DTYPE
from img2prompt.errors import UserError

FIT_SAMPLE = 100_000  # keys the PCA is fitted on (seeded sample; the covariance is key_dim², not rows²)
ADD_SAMPLE = 5_000  # rows an add's re-measure searches (their full-width keys: the old ones are re-encoded)


@dataclass(frozen=True)
class KeyPCA:
    components: np.ndarray  # float32 [dims, key_dim]

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @property
    def key_dim(self) -> int:
        return int(self.components.shape[1])

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """The one projection (keys and queries alike), re-normalised to unit length."""
        projected = np.asarray(vectors, np.float32) @ self.components.T
        return projected / np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)


def check_key_dims(dims: int, key_dim: int) -> None:
    """--key-dims refused in one line before any work."""
    if not 1 <= dims < key_dim:
        raise UserError(f"--key-dims must be from 1 to {key_dim - 1}, below the key dim {key_dim} (got {dims})")


def fit_pca(keys: np.ndarray, dims: int, *, seed: int = 0, sample: int = FIT_SAMPLE) -> KeyPCA:
    """PCA of a seeded sample of the keys (rows read in sorted order: a memmap is read front to back)."""
    check_key_dims(dims, keys.shape[1])
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(keys), size=min(sample, len(keys)), replace=False))
    data = np.asarray(keys[rows], np.float64)
    moment = data.T @ data / max(len(data), 1)
    values, vectors = np.linalg.eigh(moment)  # ascending
    order = np.argsort(values)[::-1][:dims]
    components = vectors[:, order].T
    signs = np.sign(components[np.arange(dims), np.abs(components).argmax(axis=1)])  # deterministic signs
    return KeyPCA((components * signs[:, None]).astype(np.float32))


def save_pca(path: Path, pca: KeyPCA) -> None:
    write_atomic(path, lambda handle: np.savez(handle, components=pca.components))


def load_pca(path: Path, key_dim: int, dims: int) -> KeyPCA:
    """The stored PCA, checked: a damaged or mis-shaped file is one line naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            components = np.asarray(data["components"])
    except Exception as exc:  # numpy's zip/npy parsers fail with several types
        raise UserError(f"{path}: not readable ({type(exc).__name__}): the index is damaged, rebuild it") from exc
    if components.shape != (dims, key_dim) or not np.isfinite(components).all():
        raise UserError(f"{path}: PCA of shape {components.shape}, expected ({dims}, {key_dim}) with finite "
                        "values: the index is damaged, rebuild it")
    return KeyPCA(components.astype(np.float32))


def reduced_recall(keys: np.ndarray, queries: np.ndarray, pca: KeyPCA, k: int = 10,
                   reduced: np.ndarray | None = None) -> float:
    """recall@k of exact search over projected keys (`reduced`, default projected here) against exact
    full-width search, for held-out queries; both searches stream the (memory-mapped) keys in chunks."""
    from img2prompt.index.flat import exact_search
    from img2prompt.index.recall import recall_at_k

    queries = np.asarray(queries, np.float32)
    reduced = pca.project(keys) if reduced is None else reduced
    _, truth = exact_search(keys, queries, k)
    _, found = exact_search(reduced, pca.project(queries), k)
    return recall_at_k(found, truth)


def write_projected(target: Path, pca: KeyPCA, keys: np.ndarray, block: int = 65_536) -> None:
    """`keys` (a memmap, possibly of `target` itself: it is replaced by rename, never overwritten) projected
    through the PCA into `target` as float16, streamed, atomically."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            for start in range(0, len(keys), block):
                handle.write(pca.project(keys[start:start + block]).astype(VECTOR_DTYPE).tobytes())


def plan_fit(count: int, seed: int = 0, queries: int = 500) -> tuple[np.ndarray, np.ndarray, bool]:
    """(fit rows, query rows, held out): a seeded sample of ≤ FIT_SAMPLE rows to fit on, and ≤ `queries` rows
    outside it to measure with (inside it only when the fit took every row)."""
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(count, size=min(FIT_SAMPLE, count), replace=False))
    outside = np.setdiff1d(np.arange(count), fit_rows)
    pool = outside if len(outside) else np.arange(count)
    query_rows = np.sort(rng.choice(pool, size=min(queries, len(pool)), replace=False))
    return fit_rows, query_rows, bool(len(outside))


def fit_keys(keys: np.ndarray, dims: int, seed: int = 0, queries: int = 500) -> tuple[KeyPCA, np.ndarray, dict]:
    """The PCA of `keys` (full width, e.g. a memmap) as a build fits it, the rows to measure it with, and the
    manifest section without its recall."""
    fit_rows, query_rows, held_out = plan_fit(len(keys), seed, queries)
    pca = fit_pca(keys[fit_rows] if len(fit_rows) < len(keys) else keys, dims, seed=seed)
    return pca, query_rows, {"dims": dims, "key_dim": int(keys.shape[1]), "fit_rows": int(len(fit_rows)),
                             "seed": seed, "recall_at_10": None, "queries": int(len(query_rows)),
                             "held_out": held_out}


def reduce_keys(writer, dims: int, seed: int = 0, queries: int = 500) -> dict:
    """Build step (after consolidate, before the search backends): fit the PCA on a seeded sample of clip.f16,
    measure held-out recall@10 (rows outside the fit sample when there are, searched exactly over the reduced
    vs the full keys), then rewrite clip.f16 projected to `dims` (streamed, atomic) and save key_pca.npz.
    Returns the manifest's "key_pca" section."""
    from img2prompt.index.layout import CLIP_VECTORS

    keys = writer.vectors("clip")
    pca, query_rows, section = fit_keys(keys, dims, seed, queries)
    write_projected(writer.root / CLIP_VECTORS, pca, keys)
    # `keys` still maps the full-width file (replaced by rename, not overwritten): measured as stored, fp16
    section["recall_at_10"] = reduced_recall(keys, np.asarray(keys[query_rows], np.float32), pca,
                                             reduced=writer.vectors("clip"))
    save_pca(writer.root / KEY_PCA, pca)
    return section


def nth_not_in(taken: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The ids at `positions` of the ascending ids 0, 1, ... without the sorted, distinct `taken` ones."""
    below = taken - np.arange(len(taken))  # other ids below each taken one
    return positions + np.searchsorted(below, positions, side="right")


def grown_recall(pca: KeyPCA, full_keys_of, count: int, new_rows: np.ndarray, seed: int = 0, queries: int = 500,
                 sample: int = ADD_SAMPLE) -> dict:
    """recall@10 of a stored PCA over an index grown by add, measured as a build measures it: up to `queries`
    of the new rows (which the fit never saw) searched exactly over the projected keys vs the full-width keys,
    among themselves and a seeded sample of the other rows (every row when the index holds ≤ `sample`).
    `full_keys_of(sorted ids)` gives those rows' full-width keys (the index keeps only projected ones: add
    re-encodes the old rows' prompts). Returns {"recall_at_10", "queries", "rows"}."""
    rng = np.random.default_rng(seed)
    query_ids = np.sort(rng.choice(new_rows, size=min(queries, len(new_rows)), replace=False))
    # the sample's positions among the other rows, then their ids: no array of every row (160 MB at 20M rows,
    # 1.2 GB in setdiff1d); the same draw as rng.choice(the other ids), which picks positions the same way
    left = count - len(query_ids)
    picked = rng.choice(left, size=min(max(sample - len(query_ids), 0), left), replace=False)
    others = nth_not_in(query_ids, picked)
    ids = np.union1d(query_ids, others)
    keys = np.asarray(full_keys_of(ids), np.float32).astype(VECTOR_DTYPE)  # as a build stores them
    reduced = pca.project(keys).astype(VECTOR_DTYPE)
    queries_full = keys[np.searchsorted(ids, query_ids)].astype(np.float32)
    return {"recall_at_10": reduced_recall(keys, queries_full, pca, reduced=reduced),
            "queries": int(len(query_ids)), "rows": int(len(ids))}
