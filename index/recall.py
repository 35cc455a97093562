"""recall@k of an approximate backend against exact search, and tuning its search settings to a target.

Queries are held out: each is an indexed vector pushed off the text manifold (cosine 0.5 to its source,
random orthogonal direction), since real queries are images that sit away from every text vector (the
CLIP modality gap) and a query equal to an indexed vector flatters approximate indexes. Tuning and the
reported figure use two disjoint query sets, so the stored recall is not measured on what it was tuned on.
"""
from __future__ import annotations

import math

import numpy as np

from img2prompt.index.backend import SearchBackend
from img2prompt.index.flat import exact_search

RECALL_TARGET = 0.95


def recall_queries(vectors: np.ndarray, queries: int = 1000, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Two disjoint sets ("tune", "report"), each with "held_out" and "in_index" queries."""
    rng = np.random.default_rng(seed)
    per_set = min(queries, len(vectors) // 2 or 1)
    sources = rng.choice(len(vectors), size=min(2 * per_set, len(vectors)), replace=False)
    sets = {}
    for name, chosen in (("tune", sources[:per_set]), ("report", sources[per_set:] if len(sources) > per_set else sources)):
        base = np.asarray(vectors[np.sort(chosen)], dtype=np.float32)
        noise = rng.standard_normal(base.shape).astype(np.float32)
        noise -= (noise * base).sum(1, keepdims=True) * base
        noise /= np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
        sets[name] = {"held_out": base * 0.5 + noise * math.sqrt(1 - 0.25), "in_index": base}
    return sets


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-k ids (rows of `truth`) that the search found (rows of `found`)."""
    return sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist())) / truth.size


def measure_recall(backend: SearchBackend, *, queries: int = 1000, k: int = 10, seed: int = 0,
                   target: float | None = None) -> dict:
    """recall@k on held-out and in-index queries; with `target`, tune the backend's search settings first.

    Tuning raises the settings along `backend.tune_steps` on the "tune" set until both recalls reach the
    target (or the steps run out) and stores the chosen step in `backend.params`; the recall reported is
    then measured with those settings on the disjoint "report" set.
    """
    vectors = backend.vectors
    k = min(k, len(vectors))
    sets = recall_queries(vectors, queries, seed)
    result = {"k": k, "queries": len(sets["report"]["held_out"]), "seed": seed}
    if not backend.tune_steps:
        return {**result, "held_out": 1.0, "in_index": 1.0, "recall": 1.0}  # exact by construction
    truths = {name: {kind: exact_search(vectors, query, k)[1] for kind, query in query_set.items()}
              for name, query_set in sets.items()}

    def measure(set_name: str, settings: dict) -> dict:
        found = {kind: recall_at_k(backend.search(query, k, settings)[1], truths[set_name][kind])
                 for kind, query in sets[set_name].items()}
        return {**found, "recall": min(found.values())}

    if target is not None:
        limit = backend.params.get("nlist", math.inf)
        steps = [step for step in backend.tune_steps if step.get("nprobe", 0) <= limit] or backend.tune_steps[:1]
        for step in steps:
            tuned = measure("tune", step)
            if tuned["recall"] >= target:
                break
        backend.params.update(step)
        result["tuned"] = {**step, "tune_recall": tuned["recall"]}
    return {**result, **measure("report", {})}
