"""Encoders: the length-bucketed CLIP text path equals open_clip's own encode_text; the MiniLM path equals
SentenceTransformer.encode, i.e. the competition's ground truth."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import KAGGLE_SAMPLE, read_data_prompts
from img2prompt.build_index.embed import clip_text_embeddings, minilm_embeddings

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


@pytest.mark.skipif(not KAGGLE_SAMPLE.is_dir(), reason="../shared/kaggle-sample is not present")
def test_minilm_reproduces_the_kaggle_sample_submission(text_model):
    """sample_submission.csv holds all-MiniLM-L6-v2 embeddings of the 7 true prompts."""
    prompts = pd.read_csv(KAGGLE_SAMPLE / "prompts.csv")
    sample = pd.read_csv(KAGGLE_SAMPLE / "sample_submission.csv")
    ours = minilm_embeddings(text_model, prompts["prompt"].tolist())
    np.testing.assert_allclose(ours.reshape(-1), sample["val"].to_numpy(), atol=1e-6)
