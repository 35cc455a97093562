"""Tokenization off the critical path: worker processes tokenize the shards ahead while the main process
(the GPU) encodes the current one.

Workers are started with the 'spawn' method (never fork after CUDA is initialised) and receive the
tokenizers once; each job is a chunk of a shard's prompts, and at most `workers × AHEAD` chunks are in
flight, so memory stays bounded whatever the corpus size. The results are exactly what the in-process
path computes (same token rows, same MiniLM batches), so the number of workers never changes the index.
"""
from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from img2prompt.index.writer import ShardTask
from img2prompt.encoders.models import usable_cores
from img2prompt.encoders.tokenization import FastClipTokenizer, load_minilm_tokenizer, minilm_token_ids

log = logging.getLogger(__name__)

CHUNK_PROMPTS = 8192  # prompts per worker job
AHEAD = 3  # jobs in flight per worker


@dataclass
class Tokenizers:
    """What a worker needs to tokenize prompts (picklable: the fast CLIP tokenizer pickles as a path)."""
    clip: Any
    minilm_folder: str | None  # None: the scorer has no tokenizer.json, it tokenizes inside encode()
    minilm_max_length: int

    def minilm(self):
        return load_minilm_tokenizer(self.minilm_folder) if self.minilm_folder else None


@dataclass
class TokenizedShard:
    task: ShardTask
    clip_tokens: np.ndarray | None  # int64 [n, context_length], open_clip's layout (None: the encoder tokenizes)
    minilm_ids: list[np.ndarray] | None  # per prompt, unpadded; None → encode from the texts


def tokenizers_for(clip, text_model) -> Tokenizers:
    folder = text_model.folder if text_model.folder and (Path(text_model.folder) / "tokenizer.json").is_file() \
        else None
    return Tokenizers(clip=clip.tokenizer, minilm_folder=folder, minilm_max_length=text_model.max_seq_length)


def can_use_workers(tokenizers: Tokenizers) -> bool:
    """Only tokenizers known to pickle cheaply and exactly go to workers; others run in-process."""
    return isinstance(tokenizers.clip, FastClipTokenizer)


def tokenize_prompts(tokenizers: Tokenizers, minilm, prompts: list[str],
                     with_clip: bool = True) -> tuple[np.ndarray | None, list[np.ndarray] | None]:
    """CLIP token rows and MiniLM ids for prompts: the one tokenizing step of every engine.

    No CLIP tokens for image-keyed tasks (with_clip=False: their keys are image vectors), nor without a shared
    CLIP tokenizer (an ensemble of differently tokenizing models: the encoder tokenizes)."""
    with_clip = with_clip and tokenizers.clip is not None
    clip_tokens = np.asarray(tokenizers.clip(prompts), dtype=np.int64) if with_clip else None
    ids = minilm_token_ids(minilm, prompts, tokenizers.minilm_max_length) if minilm is not None else None
    return clip_tokens, ids


_WORKER: dict = {}


def _init_worker(tokenizers: Tokenizers) -> None:
    import torch

    torch.set_num_threads(1)  # a tokenizing worker needs no intra-op threads
    _WORKER["tokenizers"], _WORKER["minilm"] = tokenizers, tokenizers.minilm()


def _tokenize_in_worker(prompts: list[str], with_clip: bool = True):
    return tokenize_prompts(_WORKER["tokenizers"], _WORKER["minilm"], prompts, with_clip)


def tokenized_shards(tasks: Iterator[ShardTask], tokenizers: Tokenizers, workers: int = 0) -> Iterator[TokenizedShard]:
    """Each task with its tokens, in task order; with workers > 0, tokenized ahead in spawned processes."""
    if workers <= 0 or not can_use_workers(tokenizers):
        if workers > 0:
            log.info("this CLIP tokenizer has no fast picklable form: tokenizing in the main process")
        minilm = tokenizers.minilm()
        for task in tasks:
            tokens, ids = tokenize_prompts(tokenizers, minilm, task.prompts, with_clip=task.images is None)
            yield TokenizedShard(task, tokens, ids)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(tokenizers,)) as pool:
        pending: deque[tuple[ShardTask, list[Future]]] = deque()
        in_flight = 0
        tasks = iter(tasks)
        exhausted = False
        while True:
            while not exhausted and in_flight < workers * AHEAD:
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                    break
                futures = [pool.submit(_tokenize_in_worker, task.prompts[start:start + CHUNK_PROMPTS],
                                       task.images is None) for start in range(0, len(task.prompts), CHUNK_PROMPTS)]
                pending.append((task, futures))
                in_flight += len(futures)
            if not pending:
                return
            task, futures = pending.popleft()
            parts = [future.result() for future in futures]
            in_flight -= len(futures)
            tokens = None if parts[0][0] is None else np.concatenate([part[0] for part in parts])
            ids = None if parts[0][1] is None else [row for part in parts for row in part[1]]
            yield TokenizedShard(task, tokens, ids)


def default_workers(device) -> int:
    """On a GPU every core but one tokenizes; on CPU the encoders need the cores, so tokenize inline."""
    return max(1, usable_cores() - 1) if device.type == "cuda" else 0
