"""The built index: counts, manifest, stored vectors, self-retrieval."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from conftest import read_data_prompts
from img2prompt.encoders.text import clip_text_embeddings, minilm_embeddings
from img2prompt.index.layout import FORMAT_VERSION
from img2prompt.index.reader import open_index
from img2prompt.query.session import ModelOverrides, open_session


def test_build_counts_and_manifest(built_index, clip, text_model):
    index = open_index(built_index, verify=True)
    manifest = index.manifest
    assert manifest["format_version"] == FORMAT_VERSION and manifest["state"] == "complete"
    assert index.count == 160
    corpus = manifest["corpus"]
    assert (corpus["read"], corpus["kept"]) == (164, 160)
    assert corpus["skipped"] == {"duplicate": 2, "empty": 2}
    assert manifest["models"]["clip"]["sha256"] == clip.sha256 and manifest["models"]["clip"]["dim"] == 64
    assert manifest["models"]["text"]["sha256"] == text_model.sha256 and manifest["models"]["text"]["dim"] == 384
    assert manifest["metric"] == "inner_product" and manifest["search"]["kind"] == "flat"
    assert manifest["search"]["recall_at_10"]["recall"] == 1.0
    # one copy of the vectors: a flat index searches clip.f16 itself, no float32 clip.faiss beside it
    assert set(manifest["files"]) == {"prompts.parquet", "prompt_keys.npy", "minilm.f16", "clip.f16",
                                      "minilm_mean.npy", "phrases.parquet", "phrases.f16", "regression.npz", "regression_stats.npz"}
    assert [entry["keys"] for entry in manifest["key_ranges"]] == ["text"] and "calibration" not in manifest
    assert manifest["regression"]["rows"] == {"text": 160}
    assert not (built_index / "clip.faiss").exists()
    assert manifest["build"]["precision"] == "fp32" and manifest["build"]["batch_size"] == 32
    assert not (built_index / "shards").exists() and not (built_index / ".lock").exists()


def test_stored_vectors_are_the_encoders_outputs(built_index, clip, text_model):
    index = open_index(built_index)
    prompts = read_data_prompts(160)
    assert index.prompts == prompts
    assert pq.read_table(built_index / "prompts.parquet").column("id").to_pylist() == list(range(160))
    np.testing.assert_allclose(index.minilm.astype(np.float32), minilm_embeddings(text_model, prompts), atol=2e-3)
    np.testing.assert_allclose(index.clip_vectors.astype(np.float32),
                               clip_text_embeddings(clip, prompts).vectors, atol=2e-3)
    np.testing.assert_allclose(index.minilm_mean, index.minilm.astype(np.float64).mean(axis=0), atol=1e-6)


def test_prompt_as_text_query_finds_itself_first(built_index, tiny_clip_dir):
    session = open_session(str(built_index), ModelOverrides(), "cpu")
    prompts = read_data_prompts(160)
    picks = [0, 17, 99, 159]
    vectors = session.clip.text_embeddings([prompts[i] for i in picks]).vectors
    found = session.retriever.search(vectors, 5)
    assert found.ids[:, 0].tolist() == picks
    assert np.all(np.diff(found.scores, axis=1) <= 1e-6)  # best first
    np.testing.assert_allclose(found.scores[:, 0], 1.0, atol=2e-3)


def test_prompt_rows_in_bounded_pieces_equal_one_gather(built_index, monkeypatch):
    """Any number of ids (a submission asks k × images): gathered in pieces, each under the byte limit of
    one Arrow take (Arrow cannot build a string array past 2 GiB), with the same result as one gather."""
    from img2prompt.index import reader

    index = open_index(built_index)
    prompts = read_data_prompts(160)
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 160, size=300_000)  # ids repeated many times over, -1 = no neighbour
    expected = [prompts[i] if i >= 0 else "" for i in ids]
    assert index.prompt_rows(ids) == expected  # the default pieces
    gathered = []
    real_take = reader._take

    def recording_take(column, piece):
        # piece: row numbers within one row group (the column is that group's)
        gathered.append((len(piece), sum(len(text.encode()) for text in column.take(piece).to_pylist())))
        return real_take(column, piece)

    monkeypatch.setattr(reader, "_take", recording_take)
    limit = 10_000  # bytes of text per take, standing in for Arrow's 2 GiB
    assert index.prompt_rows(ids[:20_000], chunk_ids=5_000, chunk_bytes=limit) == expected[:20_000]
    assert sum(count for count, _ in gathered) == int((ids[:20_000] >= 0).sum()) and len(gathered) > 20
    assert max(count for count, _ in gathered) <= 5_000
    assert all(size <= limit or count == 1 for count, size in gathered)
    gathered.clear()
    monkeypatch.setattr(reader, "TAKE_BYTES", limit)  # the module's limit is the default
    assert index.prompt_rows(ids[:5_000]) == expected[:5_000]
    assert all(size <= limit for _, size in gathered) and len(gathered) > 1
    gathered.clear()
    longest = max(range(160), key=lambda i: len(prompts[i]))
    assert index.prompt_rows([longest, 0], chunk_bytes=1) == [prompts[longest], prompts[0]]  # one row a piece
    assert [count for count, _ in gathered] == [1, 1]


def test_prompt_rows_refuses_an_id_past_the_index(built_index):
    import pytest

    with pytest.raises(IndexError, match="prompt id 160 is past the index's 160 prompts"):
        open_index(built_index).prompt_rows([0, 160])
    assert open_index(built_index).prompt_rows([]) == []
