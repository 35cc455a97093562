"""Search backends: the choice table, exact search (FAISS on CPU, torch), approximate kinds with exact
re-rank, recall tuned on one query set and reported on another, bounded memory, per-call settings."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from img2prompt.errors import UserError
from img2prompt.index.backend import backend_class
from img2prompt.index.flat import exact_search
from img2prompt.index.hnsw import HNSW_M
from img2prompt.index.plan import plan_index
from img2prompt.index.recall import measure_recall, recall_at_k, recall_queries
from img2prompt.index.torch_exact import TorchExactBackend


def clustered(count: int, dim: int, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: the structure real embeddings have (uniform data is not)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    vectors = centres[rng.integers(0, clusters, count)] + 0.35 * rng.standard_normal((count, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float16)


@pytest.fixture(scope="module")
def vectors():
    return clustered(20_000, 64)


@pytest.fixture(scope="module")
def built(vectors, tmp_path_factory):
    """hnsw and ivfpq backends over the same vectors, built once for the module."""
    root = tmp_path_factory.mktemp("backends")
    out = {}
    for kind in ("hnsw", "ivfpq"):
        params = plan_index(len(vectors), 64, kind).params
        if kind == "ivfpq":
            params = {**params, "nlist": 128, "m": 16}  # a smaller quantiser: the same code, a fraction of the training
        (root / kind).mkdir()
        out[kind] = backend_class(kind).build(vectors, params, root / kind, seed=0)
    return out


def test_plan_table():
    assert plan_index(100_000, 768).kind == "flat"
    assert plan_index(5_000_000, 768).kind == "hnsw"
    budget = 2 * 2**30
    plan = plan_index(5_000_000, 768, max_memory=budget)
    assert plan.kind == "ivfpq" and plan.estimated_bytes <= budget
    assert plan_index(100_000, 768, "hnsw").params["M"] == HNSW_M


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(UserError, match=r"no index type fits --max-memory 0\.00 GiB for 5,000,000×768 vectors"):
        plan_index(5_000_000, 768, max_memory=1000)
    with pytest.raises(UserError, match="--index hnsw needs about"):
        plan_index(1_000_000, 768, "hnsw", max_memory=2**20)
    with pytest.raises(UserError, match="needs at least 10,000 prompts"):
        plan_index(500, 64, "ivfpq")


def test_exact_search_matches_numpy():
    vectors = clustered(3000, 32)
    queries = clustered(20, 32, seed=1).astype(np.float32)
    scores, ids = exact_search(vectors, queries, 5, chunk=700)  # several chunks merged
    brute = queries @ vectors.astype(np.float32).T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :5], atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1 << 22, 1500])  # one resident chunk; several merged chunks
def test_torch_exact_search_equals_faiss(vectors, chunk_rows):
    """The GPU path (run here on CPU) finds FAISS's exact neighbours with the same scores."""
    queries = recall_queries(vectors, 300, seed=5)["report"]["held_out"]
    torch_backend = TorchExactBackend(vectors, {}, device="cpu", chunk_rows=chunk_rows)
    faiss_backend = backend_class("flat")(vectors, {})
    t_scores, t_ids = torch_backend.search(queries, 10)
    f_scores, f_ids = faiss_backend.search(queries, 10)
    assert recall_at_k(t_ids, f_ids) >= 0.99
    np.testing.assert_allclose(t_scores, f_scores, atol=1e-2)
    exact = np.einsum("qd,qkd->qk", queries, vectors[t_ids].astype(np.float32))
    np.testing.assert_allclose(t_scores, exact, atol=1e-5)  # the returned scores are float32 products
    assert np.all(np.diff(t_scores, axis=1) <= 1e-6)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_rerank_and_recall(built, vectors, kind):
    backend = built[kind]
    before = dict(backend.params)
    recall = measure_recall(backend, queries=200)
    assert recall["queries"] == 200 and recall["recall"] == min(recall["held_out"], recall["in_index"])
    assert recall["in_index"] >= 0.9 and backend.params == before  # measuring alone changes nothing
    tuned = measure_recall(backend, queries=200, target=0.95)
    steps = [s for s in backend.tune_steps if s.get("nprobe", 0) <= backend.params.get("nlist", 1e9)]
    chosen = {key: value for key, value in tuned["tuned"].items() if key != "tune_recall"}
    assert chosen in steps and all(backend.params[key] == value for key, value in chosen.items())
    assert tuned["tuned"]["tune_recall"] >= 0.95 or chosen == steps[-1]
    assert tuned["recall"] >= 0.9
    queries = clustered(10, 64, seed=3).astype(np.float32)
    scores, ids = backend.search(queries, 10)
    exact = np.einsum("qd,qkd->qk", queries, vectors[ids].astype(np.float32))
    np.testing.assert_allclose(scores, exact, atol=1e-5)  # returned scores are exact inner products
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_recall_is_reported_on_queries_it_was_not_tuned_on(vectors):
    sets = recall_queries(vectors, 300, seed=0)
    tune, report = sets["tune"]["in_index"], sets["report"]["in_index"]
    shared = {row.tobytes() for row in tune} & {row.tobytes() for row in report}
    assert len(tune) == len(report) == 300 and not shared
    held_out = sets["report"]["held_out"]
    cosine = (held_out * report).sum(axis=1) / np.linalg.norm(held_out, axis=1) / np.linalg.norm(report, axis=1)
    np.testing.assert_allclose(cosine, 0.5, atol=2e-3)  # pushed off the indexed vectors, not equal to them


def test_search_settings_travel_per_call(built, vectors):
    """A call's settings apply to that call only: the shared backend is never reconfigured."""
    backend = built["ivfpq"]
    stored = dict(backend.params)
    queries = recall_queries(vectors, 100, seed=9)["report"]["held_out"]
    truth = exact_search(vectors, queries, 10)[1]
    low = recall_at_k(backend.search(queries, 10, {"nprobe": 1, "rerank": 1})[1], truth)
    high = recall_at_k(backend.search(queries, 10, {"nprobe": 256, "rerank": 64})[1], truth)
    assert low < high and backend.params == stored
    assert recall_at_k(backend.search(queries, 10)[1], truth) > low


def test_search_memory_is_bounded_in_the_number_of_queries(built, vectors, monkeypatch):
    """Re-ranking keeps a query's candidate ids and scores, never its candidates' vectors (those are gathered
    RERANK_BATCH_BYTES at a time, in file order): memory grows by far less per query than the vectors."""
    import img2prompt.index.backend as backend_module

    monkeypatch.setattr(backend_module, "RERANK_BATCH_BYTES", 4 * 2**20)
    backend = built["ivfpq"]
    settings = {"rerank": 64}  # 10 × 64 candidates × 64-d floats = 160 KiB a query

    def peak(count: int) -> int:
        queries = clustered(count, 64, seed=11).astype(np.float32)
        tracemalloc.start()
        backend.search(queries, 10, settings)
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak_bytes - queries.nbytes

    small, large = peak(50), peak(1000)
    candidate_vectors = 10 * 64 * 64 * 4
    assert (large - small) / 950 < candidate_vectors / 4, (small, large)


def test_torch_search_with_chunks_smaller_than_k():
    vectors = clustered(50, 8, clusters=5)
    queries = clustered(3, 8, clusters=5, seed=2).astype(np.float32)
    scores, ids = TorchExactBackend(vectors, {}, device="cpu", chunk_rows=4).search(queries, 10)
    exact_scores, exact_ids = exact_search(vectors, queries, 10)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)


def test_fp16_candidates_are_rescored_to_the_exact_top_k(vectors):
    """On a GPU the scores are fp16 (good to ~1e-3, the gap between ranks k and k+1): extra candidates,
    re-scored in fp32, give FAISS's exact neighbours. Simulated here by fp16 matmuls on the CPU."""
    import torch

    queries = recall_queries(vectors, 300, seed=7)["report"]["held_out"]
    backend = TorchExactBackend(vectors, {}, device="cpu", chunk_rows=5000, precision=torch.float16)
    scores, ids = backend.search(queries, 10)
    exact_scores, exact_ids = exact_search(vectors, queries, 10)
    assert recall_at_k(ids, exact_ids) == 1.0
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
