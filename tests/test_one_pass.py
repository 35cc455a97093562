"""One search call = one pass over the stored vectors, for any number of queries (issue #21 part 1).

A vector source that counts the rows read stands in for the memory map; the reference is the loop the
backends ran before (query batches outer, the whole corpus re-read per batch), kept here only to compare."""
from __future__ import annotations

import numpy as np
import pytest

from img2prompt.index.backend import QUERY_BATCH, merge_top_k, rerank_exact
from img2prompt.index.flat import FlatBackend, exact_search
from img2prompt.index.torch_exact import TorchExactBackend
from row_sources import CountingRows, unit_rows


def reference_flat(vectors, queries, k, chunk=65_536):
    """Before: each batch of QUERY_BATCH queries streamed the whole corpus."""
    import faiss

    out_scores, out_ids = [], []
    for first in range(0, len(queries), QUERY_BATCH):
        batch = queries[first:first + QUERY_BATCH]
        best_scores = np.full((len(batch), k), -np.inf, np.float32)
        best_ids = np.full((len(batch), k), -1, np.int64)
        for start in range(0, len(vectors), chunk):
            block = np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32)
            scores, ids = faiss.knn(batch, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            best_scores, best_ids = merge_top_k(best_scores, best_ids, scores, ids + start, k)
        out_scores.append(best_scores)
        out_ids.append(best_ids)
    return np.concatenate(out_scores), np.concatenate(out_ids)


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    return unit_rows(20_000, 32, seed=1).astype(np.float16)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return unit_rows(10_000, 32, seed=2)


def test_flat_reads_the_corpus_once_for_10k_queries(corpus, queries, monkeypatch):
    import img2prompt.index.flat as flat

    monkeypatch.setattr(flat, "SCAN_CHUNK", 4_096)  # several chunks: the corpus is not resident
    source = CountingRows(corpus)
    backend = FlatBackend(source, {})
    scores, ids = exact_search(source, queries, 10, chunk=4_096)
    assert source.rows_read == len(corpus)  # ten query batches, one pass
    ref_scores, ref_ids = reference_flat(corpus, queries, 10, chunk=4_096)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)  # BLAS vs FAISS: float32 rounding
    source.rows_read = 0
    backend_scores, backend_ids = backend.search(queries, 10)
    assert source.rows_read == len(corpus)
    np.testing.assert_array_equal(backend_ids, exact_search(corpus, queries, 10)[1])


def test_torch_streaming_reads_each_chunk_once(corpus, queries, monkeypatch):
    source = CountingRows(corpus)
    backend = TorchExactBackend(source, {}, device="cpu", chunk_rows=3_000, memory_budget=0)  # all streamed
    assert backend.resident_rows == 0
    monkeypatch.setattr(backend, "query_batch", lambda: 512)  # 20 query batches
    source.rows_read = 0
    scores, ids = backend.search(queries, 10)
    streamed = source.rows_read
    assert len(corpus) <= streamed <= len(corpus) + len(queries) * 10  # one pass + the final re-score rows
    resident = TorchExactBackend(corpus, {}, device="cpu", chunk_rows=3_000)  # the same chunks, batch by batch
    for first in range(0, len(queries), 512):
        ref_scores, ref_ids = resident.search(queries[first:first + 512], 10)
        np.testing.assert_array_equal(ids[first:first + 512], ref_ids)
        np.testing.assert_array_equal(scores[first:first + 512], ref_scores)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, reference_flat(corpus, queries, 10)[1])])
    assert overlap > 0.999  # and FAISS's exact answer, up to float ties


def test_torch_one_pass_equals_the_per_batch_loop(corpus, queries):
    """The same chunks merged in the same order per batch: identical to searching batch by batch."""
    backend = TorchExactBackend(corpus, {}, device="cpu", chunk_rows=3_000)
    scores, ids = backend.search(queries[:1_500], 7)
    for first in range(0, 1_500, 500):
        batch_scores, batch_ids = backend.search(queries[first:first + 500], 7)
        np.testing.assert_array_equal(ids[first:first + 500], batch_ids)
        np.testing.assert_array_equal(scores[first:first + 500], batch_scores)


def test_rerank_reads_each_needed_row_once_in_file_order(corpus, queries):
    rng = np.random.default_rng(3)
    candidates = rng.integers(0, len(corpus), size=(len(queries), 40))
    candidates[::7, -3:] = -1  # fewer candidates found for some queries
    source = CountingRows(corpus)
    scores, ids = rerank_exact(queries, candidates, source, 10, chunk_bytes=2**20)
    chunks = -(-int((candidates >= 0).sum()) // (2**20 // (32 * 4 * 2)))
    assert source.rows_read <= len(np.unique(candidates[candidates >= 0])) + chunks  # once, + a chunk-edge row
    exact = np.einsum("qd,qcd->qc", queries, corpus[np.where(candidates < 0, 0, candidates)].astype(np.float32))
    exact[candidates < 0] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, np.take_along_axis(candidates, order, axis=1))
    np.testing.assert_allclose(scores, np.take_along_axis(exact, order, axis=1), rtol=0, atol=1e-6)


def test_k_beyond_the_corpus_and_no_queries():
    small = unit_rows(5, 8, seed=4).astype(np.float16)
    backend = FlatBackend(small, {})
    scores, ids = backend.search(unit_rows(3, 8, seed=5), 50)
    assert ids.shape == (3, 5) and sorted(ids[0]) == [0, 1, 2, 3, 4]
    empty_scores, empty_ids = backend.search(np.zeros((0, 8), np.float32), 4)
    assert empty_scores.shape == (0, 4) and empty_ids.shape == (0, 4)
    torch_scores, torch_ids = TorchExactBackend(small, {}, device="cpu", chunk_rows=2).search(unit_rows(3, 8, 5), 50)
    np.testing.assert_array_equal(torch_ids, ids)
