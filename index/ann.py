"""FAISS over the CLIP text vectors: choosing the index type, building it, measuring recall, searching.

Selection is an explicit table over (count, dim, memory budget). autofaiss was considered and not used:
it pulls a large dependency tree for one decision, optimises recall on in-index queries (which flatters
approximate indexes against our cross-modal image queries) and returns nothing on an impossible budget;
our table is a few lines, refuses impossible budgets loudly and always re-ranks approximate hits exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from img2prompt.atomic import atomic_path
from img2prompt.errors import UserError

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "hnsw", "ivfpq")
FLAT_AUTO_LIMIT = 2_000_000  # exact search stays affordable (GPU or batched CPU) up to about here
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
RERANK_FACTOR = 8  # approximate indexes fetch k * this many candidates, then re-rank them exactly
ADD_CHUNK = 65_536
RECALL_WARN = 0.95
# Search settings that trade speed for recall, tried in order when tuning to a recall target. For IVF-PQ
# the re-rank depth matters as much as nprobe: PQ distances blur near neighbours in tight clusters.
SEARCH_STEPS = {
    "hnsw": [{"ef_search": ef} for ef in (128, 256, 512, 1024, 2048, 4096)],
    "ivfpq": [{"nprobe": nprobe, "rerank": rerank}
              for nprobe, rerank in ((32, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256))],
}


@dataclass
class IndexPlan:
    kind: str
    params: dict = field(default_factory=dict)
    estimated_bytes: int = 0
    reason: str = ""


def estimate_bytes(kind: str, count: int, dim: int, params: dict) -> int:
    if kind == "flat":
        return count * dim * 4
    if kind == "hnsw":
        return count * (dim * 4 + params.get("M", HNSW_M) * 2 * 4 + 16)
    if kind == "ivfpq":
        return count * (params["m"] + 8) + params["nlist"] * dim * 4
    raise ValueError(kind)


def _ivfpq_params(count: int, dim: int, budget: int | None) -> dict:
    nlist = int(min(65_536, max(16, 4 * math.sqrt(count))))
    nlist = min(nlist, max(1, count // 39))  # FAISS wants ≥39 training points per centroid
    choices = [m for m in (96, 64, 48, 32, 24, 16, 12, 8, 4) if dim % m == 0]
    for m in choices:
        params = {"nlist": nlist, "m": m, "nbits": 8, "nprobe": min(nlist, 64)}
        if budget is None or estimate_bytes("ivfpq", count, dim, params) <= budget:
            return params
    return {"nlist": nlist, "m": choices[-1], "nbits": 8, "nprobe": min(nlist, 64)}


def plan_index(count: int, dim: int, kind: str = "auto", max_memory: int | None = None) -> IndexPlan:
    """Pick the index from an explicit table; an impossible budget is an error, never an empty answer."""
    if kind not in INDEX_KINDS:
        raise UserError(f"unknown --index {kind!r}: choose from {', '.join(INDEX_KINDS)}")
    candidates = {
        "flat": {},
        "hnsw": {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH},
        "ivfpq": _ivfpq_params(count, dim, max_memory),
    }
    if count < 10_000:
        candidates["ivfpq"] = None  # too few points to train a useful quantiser
    table = {name: estimate_bytes(name, count, dim, params) for name, params in candidates.items()
             if params is not None}
    if kind != "auto":
        if candidates.get(kind) is None:
            raise UserError(f"--index {kind} needs at least 10,000 prompts to train; this corpus has {count:,}")
        if max_memory is not None and table[kind] > max_memory:
            raise UserError(f"--index {kind} needs about {table[kind] / 2**30:.2f} GiB for {count:,}×{dim} "
                            f"vectors, over --max-memory {max_memory / 2**30:.2f} GiB")
        return IndexPlan(kind, candidates[kind], table[kind], "asked for")
    for name in ("flat", "hnsw", "ivfpq"):
        if name not in table or (name == "flat" and count > FLAT_AUTO_LIMIT):
            continue
        if max_memory is None or table[name] <= max_memory:
            reason = "exact search fits" if name == "flat" else "smallest exact-enough index within the budget"
            return IndexPlan(name, candidates[name], table[name], reason)
    sizes = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in table.items())
    raise UserError(f"no index type fits --max-memory {max_memory / 2**30:.2f} GiB for {count:,}×{dim} vectors "
                    f"(needs: {sizes}); raise --max-memory")


def _chunks(vectors: np.ndarray, size: int = ADD_CHUNK):
    for start in range(0, len(vectors), size):
        yield np.ascontiguousarray(vectors[start:start + size], dtype=np.float32)


def build_faiss(plan: IndexPlan, vectors: np.ndarray, *, seed: int = 0,
                progress: Callable[[int], None] | None = None):
    """Build the planned FAISS index over (memory-mapped) float16 vectors, added in chunks."""
    import faiss

    count, dim = vectors.shape
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, plan.params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = plan.params["ef_construction"]
    elif plan.kind == "ivfpq":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, plan.params["nlist"], plan.params["m"], plan.params["nbits"],
                                 faiss.METRIC_INNER_PRODUCT)
        # Train on a seeded random sample, not the first rows (corpora are often sorted by source).
        sample_size = min(count, max(50_000, 64 * plan.params["nlist"]))  # FAISS wants 39–256 per list
        sample_ids = np.sort(np.random.default_rng(seed).choice(count, size=sample_size, replace=False))
        index.train(np.ascontiguousarray(vectors[sample_ids], dtype=np.float32))
    else:
        raise ValueError(plan.kind)
    for chunk in _chunks(vectors):
        index.add(chunk)
        if progress:
            progress(len(chunk))
    return index


def write_faiss(index, path: Path) -> None:
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_faiss(path: Path, expected_count: int, *, use_gpu: bool = False):
    """Read the index; rows must agree with the prompts. On GPU it moves there when faiss-gpu is installed."""
    import faiss

    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise UserError(f"{path}: not a readable FAISS index ({str(exc).splitlines()[0][:200]})") from exc
    if index.ntotal != expected_count:
        raise UserError(f"{path}: FAISS holds {index.ntotal} vectors, the index has {expected_count} prompts")
    if use_gpu and hasattr(faiss, "StandardGpuResources") and not isinstance(index, faiss.IndexHNSWFlat):
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index._gpu_resources = resources  # keep the resources alive as long as the index
        log.info("FAISS index moved to the GPU")
    elif use_gpu:
        log.info("FAISS searches on the CPU (faiss-gpu not installed, or HNSW which has no GPU version)")
    return index


def _configure(index, plan: dict) -> None:
    import faiss

    params = plan.get("params", {})
    base = faiss.extract_index_ivf(index) if plan.get("kind") == "ivfpq" else None
    if base is not None:
        base.nprobe = params.get("nprobe", 64)
    if plan.get("kind") == "hnsw":
        index.hnsw.efSearch = params.get("ef_search", HNSW_EF_SEARCH)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 262_144):
    """Exact inner-product top-k over (memory-mapped) vectors, streamed in chunks: the ground truth."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        block = np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32)
        scores, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, ids + start], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_ids = np.take_along_axis(merged_ids, order, axis=1)
    return best_scores, best_ids


def search(index, plan: dict, queries: np.ndarray, k: int, vectors: np.ndarray):
    """Top-k (scores, ids) by inner product; approximate indexes are re-ranked with exact products."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, index.ntotal)
    if plan.get("kind", "flat") == "flat":
        scores, ids = index.search(queries, k)
        return scores, ids
    _configure(index, plan)
    candidates = min(index.ntotal, k * plan.get("params", {}).get("rerank", RERANK_FACTOR))
    _, candidate_ids = index.search(queries, candidates)
    safe_ids = np.where(candidate_ids < 0, 0, candidate_ids)
    exact = np.einsum("qd,qcd->qc", queries, vectors[safe_ids.ravel()].astype(np.float32).reshape(
        *safe_ids.shape, -1))
    exact[candidate_ids < 0] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(candidate_ids, order, axis=1)


def recall_queries(vectors: np.ndarray, queries: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Query sets for recall: "held_out" (not in the index) and "in_index" (indexed vectors themselves).

    Real queries are images, which sit away from every text vector (the CLIP modality gap); a query equal
    to an indexed vector flatters approximate indexes. So each held-out query is an indexed vector pushed
    off the text manifold (cosine 0.5 to its source, random orthogonal direction).
    """
    rng = np.random.default_rng(seed)
    source = np.sort(rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False))
    base = np.asarray(vectors[source], dtype=np.float32)
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise -= (noise * base).sum(1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return {"held_out": base * 0.5 + noise * math.sqrt(1 - 0.25), "in_index": base}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-k ids (rows of `truth`) that the search found (rows of `found`)."""
    return sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist())) / truth.size


def measure_recall(index, plan: dict, vectors: np.ndarray, *, queries: int = 1000, k: int = 10,
                   seed: int = 0, target: float | None = None) -> dict:
    """recall@k of the index (with its re-rank) against exact search, held-out and in-index queries.

    With `target`, the search settings (SEARCH_STEPS: HNSW efSearch; IVF nprobe and re-rank depth) are
    raised step by step until both recalls reach it (or the last step); the chosen ones go into plan["params"].
    """
    count = len(vectors)
    k = min(k, count)
    query_sets = recall_queries(vectors, queries, seed)
    result = {"k": k, "queries": len(query_sets["held_out"]), "seed": seed}
    if plan.get("kind") == "flat":
        return {**result, "held_out": 1.0, "in_index": 1.0, "recall": 1.0}  # exact by construction
    truths = {name: exact_search(vectors, query, k)[1] for name, query in query_sets.items()}

    def measure() -> dict:
        found = {name: recall_at_k(search(index, plan, query, k, vectors)[1], truths[name])
                 for name, query in query_sets.items()}
        return {**found, "recall": min(found.values())}

    if target is None:
        return {**result, **measure()}
    limit = plan["params"].get("nlist", math.inf)
    steps = [step for step in SEARCH_STEPS[plan["kind"]] if step.get("nprobe", 0) <= limit]
    for step in steps or SEARCH_STEPS[plan["kind"]][:1]:
        plan["params"].update(step)
        measured = measure()
        if measured["recall"] >= target:
            break
    return {**result, **measured, "tuned": dict(step)}


def plan_dict(plan: IndexPlan) -> dict:
    return asdict(plan)
