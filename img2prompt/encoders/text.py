"""Prompt → vectors: CLIP text embeddings (length-bucketed) and MiniLM scorer embeddings.

CLIP: prompts are tokenized, sorted by token length and batched so that each batch runs the text tower
on only as many positions as its longest prompt (exact for causal CLIP towers, see
models.supports_short_context); results go back to the input order. The median real prompt is ~16 of
77 tokens, so this is several times faster than padding every prompt to 77.
MiniLM: sentence-transformers' own encode (it sorts by length and pads per batch already), which is the
competition's ground truth by definition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from img2prompt.encoders.models import (ClipModel, TextModel, clip_encode_text, clip_prompt_truncated,
                                        clip_token_lengths)
from img2prompt.encoders.low_memory import batch_limit
from img2prompt.encoders.precision import autocast_for
from img2prompt.encoders.tokenization import minilm_encode_features, pad_minilm_batch


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass
class ClipTextResult:
    vectors: np.ndarray  # float32 [n, dim], L2-normalised, in input order
    truncated: int  # prompts longer than CLIP's context (cut for CLIP only)


def count_truncated(clip: ClipModel, prompts: list[str], tokens: torch.Tensor) -> int:
    """Prompts longer than CLIP's context; only rows that fill the context need a closer look."""
    full = (clip_token_lengths(clip, tokens) >= clip.context_length).nonzero().flatten().tolist()
    return sum(clip_prompt_truncated(clip, prompts[i]) for i in full)


def clip_text_embeddings(clip: ClipModel, prompts: list[str], batch_size: int = 256, *,
                         bucketed: bool = True, progress: Callable[[int], None] | None = None) -> ClipTextResult:
    """One model's text vectors, tokenized and encoded in this process (ClipEnsemble.text_embeddings calls it)."""
    if not prompts:
        return ClipTextResult(np.zeros((0, clip.dim), dtype=np.float32), 0)
    tokens = clip.tokenizer(prompts)
    return ClipTextResult(clip_embed_tokens(clip, tokens, batch_size, bucketed=bucketed, progress=progress),
                          count_truncated(clip, prompts, tokens))


def clip_embed_tokens(clip: ClipModel, tokens: torch.Tensor, batch_size: int = 256, *,
                      bucketed: bool = True, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """L2-normalised CLIP text vectors (float32, input order) for token rows [n, context_length]."""
    if len(tokens) == 0:
        return np.zeros((0, clip.dim), dtype=np.float32)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    lengths = clip_token_lengths(clip, tokens)
    order = torch.argsort(lengths, stable=True) if bucketed else torch.arange(len(tokens))
    out = np.empty((len(tokens), clip.dim), dtype=np.float32)
    limit = batch_limit(clip)  # out of CUDA memory: fewer rows per tower call (encoders/low_memory.py)
    with torch.inference_mode(), autocast_for(clip.device, clip.precision):
        for start in range(0, len(tokens), batch_size):
            rows = order[start:start + batch_size]
            batch = tokens[rows]
            if bucketed:
                batch = batch[:, :int(lengths[rows].max())]
            batch = batch.to(clip.device, non_blocking=True)
            parts = limit.run(len(rows), lambda first, stop: clip_encode_text(
                clip, batch[first:stop], short_context=bucketed).float().cpu().numpy())
            out[rows.numpy()] = np.concatenate(parts)
            if progress:
                progress(len(rows))
    return l2_normalise(out)


def minilm_embeddings(text_model: TextModel, prompts: list[str], batch_size: int = 256) -> np.ndarray:
    """The scorer's embedding of each prompt, exactly as SentenceTransformer.encode gives it, normalised."""
    if not prompts:
        return np.zeros((0, text_model.dim), dtype=np.float32)
    vectors = text_model.model.encode(prompts, batch_size=batch_size, convert_to_numpy=True,
                                      normalize_embeddings=True, show_progress_bar=False)
    return l2_normalise(vectors)


def minilm_batch_order(prompts: list[str]) -> np.ndarray:
    """SentenceTransformer.encode's own batch order (longest text first): same batches, same numbers."""
    return np.argsort([-len(prompt) for prompt in prompts])


def minilm_embed_ids(text_model: TextModel, ids: list[np.ndarray], order: np.ndarray,
                     batch_size: int = 256, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """minilm_embeddings for prompts tokenized elsewhere (build workers): the same batches as encode."""
    if not ids:
        return np.zeros((0, text_model.dim), dtype=np.float32)
    out = np.empty((len(ids), text_model.dim), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        out[rows] = minilm_encode_features(text_model.model, pad_minilm_batch([ids[i] for i in rows]))
        if progress:
            progress(len(rows))
    return l2_normalise(out)
