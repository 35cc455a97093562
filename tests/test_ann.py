"""FAISS index choice, approximate search with exact re-rank, and recall on held-out queries."""
from __future__ import annotations

import numpy as np
import pytest

from img2prompt.errors import UserError
from img2prompt.index import ann


def clustered(count: int, dim: int, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: the structure real embeddings have (uniform data is not)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    vectors = centres[rng.integers(0, clusters, count)] + 0.35 * rng.standard_normal((count, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float16)


def test_plan_table():
    assert ann.plan_index(100_000, 768).kind == "flat"
    assert ann.plan_index(5_000_000, 768).kind == "hnsw"
    budget = 2 * 2**30
    plan = ann.plan_index(5_000_000, 768, max_memory=budget)
    assert plan.kind == "ivfpq" and plan.estimated_bytes <= budget
    assert ann.plan_index(100_000, 768, "hnsw").params["M"] == ann.HNSW_M


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(UserError, match=r"no index type fits --max-memory 0\.00 GiB for 5,000,000×768 vectors"):
        ann.plan_index(5_000_000, 768, max_memory=1000)
    with pytest.raises(UserError, match="--index flat needs about"):
        ann.plan_index(1_000_000, 768, "flat", max_memory=2**20)
    with pytest.raises(UserError, match="needs at least 10,000 prompts"):
        ann.plan_index(500, 64, "ivfpq")


def test_exact_search_matches_numpy():
    vectors = clustered(3000, 32)
    queries = clustered(20, 32, seed=1).astype(np.float32)
    scores, ids = ann.exact_search(vectors, queries, 5, chunk=700)  # several chunks merged
    brute = queries @ vectors.astype(np.float32).T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :5], atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_rerank_and_recall(kind):
    vectors = clustered(20_000, 64)
    plan = ann.plan_index(len(vectors), 64, kind)
    index = ann.build_faiss(plan, vectors, seed=0)
    plan_info = ann.plan_dict(plan)
    recall = ann.measure_recall(index, plan_info, vectors, queries=200)
    assert recall["queries"] == 200 and 0.0 <= recall["held_out"] <= 1.0
    assert recall["recall"] == min(recall["held_out"], recall["in_index"])
    assert recall["in_index"] >= 0.9
    tuned = ann.measure_recall(index, plan_info, vectors, queries=200, target=0.95)
    steps = [step for step in ann.SEARCH_STEPS[kind] if step.get("nprobe", 0) <= plan_info["params"].get("nlist", 1e9)]
    assert tuned["tuned"] in steps and all(plan_info["params"][key] == value for key, value in tuned["tuned"].items())
    assert tuned["recall"] >= 0.95 or tuned["tuned"] == steps[-1]
    queries = clustered(10, 64, seed=3).astype(np.float32)
    scores, ids = ann.search(index, plan_info, queries, 10, vectors)
    exact = np.einsum("qd,qkd->qk", queries, vectors[ids].astype(np.float32))
    np.testing.assert_allclose(scores, exact, atol=1e-5)  # returned scores are exact inner products
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
