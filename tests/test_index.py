"""The built index: counts, manifest, stored vectors, self-retrieval."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from conftest import read_data_prompts
from img2prompt.build_index.embed import clip_text_embeddings, minilm_embeddings
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
    assert set(manifest["files"]) == {"prompts.parquet", "minilm.f16", "clip.f16", "minilm_mean.npy",
                                      "phrases.parquet", "phrases.f16", "regression.npz"}
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
    vectors = clip_text_embeddings(session.clip, [prompts[i] for i in picks]).vectors
    found = session.retriever.search(vectors, 5)
    assert found.ids[:, 0].tolist() == picks
    assert np.all(np.diff(found.scores, axis=1) <= 1e-6)  # best first
    np.testing.assert_allclose(found.scores[:, 0], 1.0, atol=2e-3)
