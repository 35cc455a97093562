"""Encoders: the length-bucketed CLIP text path equals open_clip's own encode_text; the MiniLM path equals
SentenceTransformer.encode, i.e. the competition's ground truth."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import KAGGLE_SAMPLE, needs_shared, read_data_prompts
from img2prompt.encoders.text import (clip_embed_tokens, clip_text_embeddings, minilm_batch_order, minilm_embed_ids,
                                          minilm_embeddings)
from img2prompt.build_index.pipeline import tokenized_shards, tokenizers_for
from img2prompt.build_index.shards import plan_shards

LONG = "a very long prompt " + ", ".join(f"detail number {i}" for i in range(60))


def test_bucketed_clip_text_equals_open_clip_encode_text(clip):
    prompts = read_data_prompts(40) + ["cat", "", LONG, "a red fox in the snow"]
    ours = clip_text_embeddings(clip, prompts, batch_size=7)
    with torch.inference_mode():
        reference = clip.model.encode_text(clip.tokenizer(prompts)).float().numpy()
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    assert ours.vectors.shape == (len(prompts), clip.dim)
    np.testing.assert_allclose(ours.vectors, reference, atol=1e-5)
    assert ours.truncated == 1  # only LONG exceeds 77 tokens


def test_unbucketed_path_gives_the_same_vectors(clip):
    prompts = read_data_prompts(20)
    bucketed = clip_text_embeddings(clip, prompts, batch_size=4).vectors
    padded = clip_text_embeddings(clip, prompts, batch_size=4, bucketed=False).vectors
    np.testing.assert_allclose(bucketed, padded, atol=1e-5)


def test_minilm_equals_sentence_transformers_encode(text_model):
    prompts = read_data_prompts(10) + [LONG]
    ours = minilm_embeddings(text_model, prompts, batch_size=3)
    reference = text_model.model.encode(prompts)
    assert ours.shape == (11, 384)
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


@needs_shared("kaggle-sample")
def test_minilm_reproduces_the_kaggle_sample_submission(text_model):
    """sample_submission.csv holds all-MiniLM-L6-v2 embeddings of the 7 true prompts."""
    prompts = pd.read_csv(KAGGLE_SAMPLE / "prompts.csv")
    sample = pd.read_csv(KAGGLE_SAMPLE / "sample_submission.csv")
    ours = minilm_embeddings(text_model, prompts["prompt"].tolist())
    np.testing.assert_allclose(ours.reshape(-1), sample["val"].to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_tokenizing_workers_give_the_in_process_and_the_reference_vectors(clip, text_model, corpus_file, tmp_path):
    """Tokenization in spawned workers (ahead of the encoders) changes nothing: the index built with
    workers is byte-identical to the in-process one, and both equal open_clip's own tokenizer +
    SentenceTransformer.encode (the reference path) to 1e-6, order preserved."""
    import open_clip

    import img2prompt
    from img2prompt.index.reader import open_index

    assert type(clip.tokenizer).__name__ == "FastClipTokenizer"  # the Rust-backed tokenizer is in use
    built = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        img2prompt.build(corpus_file, out, clip_model=clip.name, device="cpu", workers=workers, shard_size=50,
                         batch_size=16, progress=False)
        built[workers] = open_index(out)
    for name in ("clip.f16", "minilm.f16", "prompts.parquet"):
        assert (tmp_path / "w0" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    prompts = built[0].prompts
    tasks = list(plan_shards(iter(prompts), 50))
    shards = list(tokenized_shards(iter(tasks), tokenizers_for(clip, text_model), workers=2))
    assert [shard.task.number for shard in shards] == [0, 1, 2, 3]  # order preserved
    tokens = torch.from_numpy(np.concatenate([shard.clip_tokens for shard in shards]))
    assert torch.equal(tokens, open_clip.tokenizer.SimpleTokenizer()(prompts))
    with torch.inference_mode():
        reference = clip.model.encode_text(open_clip.tokenizer.SimpleTokenizer()(prompts)).float().numpy()
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    ours = np.concatenate([clip_embed_tokens(clip, torch.from_numpy(s.clip_tokens), 16) for s in shards])
    assert np.abs(ours - reference).max() <= 1e-6
    expected = text_model.model.encode(prompts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    minilm = np.concatenate([minilm_embed_ids(text_model, s.minilm_ids, minilm_batch_order(s.task.prompts), 16)
                             for s in shards])
    per_shard = np.concatenate([minilm_embeddings(text_model, s.task.prompts, 16) for s in shards])
    assert np.abs(minilm - per_shard).max() == 0.0  # the same batches as encode() itself
    assert np.abs(minilm - expected).max() <= 1e-6
