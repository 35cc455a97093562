"""One shard task → its files: the pure unit of build work that every engine runs (in-process, or on a
cluster node that sees the index folder). Models load once per encoder, never per shard."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from img2prompt.encoders.parallel import embed_tokens_parallel, minilm_ids_parallel, replicas_of
from img2prompt.encoders.text import minilm_batch_order, minilm_embeddings
from img2prompt.build_index.pairs import SKIP_UNREADABLE_IMAGE
from img2prompt.build_index.pipeline import TokenizedShard, Tokenizers, tokenizers_for
from img2prompt.build_index.precomputed import (AGREEMENT_SAMPLE, PrecomputedVectors, check_agreement,
                                                open_precomputed)
from img2prompt.errors import UserError
from img2prompt.index.writer import save_shard
from img2prompt.memory import release_free_memory
from img2prompt.progress import RowProgress
from img2prompt.encoders.clip_ensemble import ClipEnsemble, load_named_clips
from img2prompt.encoders.models import TextModel, load_text_model, resolve_device

log = logging.getLogger(__name__)


@dataclass
class EncoderSpec:
    """How to make a ShardEncoder anywhere (picklable): model names, device, batch size, precomputed files,
    the identities the driver loaded, which a remote encoder must reproduce, and the torch intra-op thread
    count every encoder of the build runs with on CPU (`encode_threads`: the driver's)."""
    clip_model: str | list[str]
    clip_pretrained: str | list | None
    text_model: str | None
    device: str
    batch_size: int
    embeddings: list[str] | None = None
    identities: dict = field(default_factory=dict)
    threads: int | None = None
    precision: str | None = None  # the CLIP towers' --precision (None: the device's default)

    def load(self) -> "ShardEncoder":
        device = resolve_device(self.device)
        clip = load_named_clips(self.clip_model, self.clip_pretrained, device, precision=self.precision)
        text_model = load_text_model(self.text_model, device)
        loaded = {"clip": clip.identity(), "text": text_model.identity()}
        if self.identities and loaded != self.identities:
            raise UserError("a build worker loaded other models than the driver: the model files differ between "
                            "machines; give every node the same weights")
        precomputed = open_precomputed(self.embeddings) if self.embeddings else None
        return ShardEncoder(clip, text_model, self.batch_size, precomputed, threads=self.threads)


def encode_threads(device: str | torch.device) -> int | None:
    """The intra-op thread count a build encodes with: this (the driver's) thread's torch count on CPU, where
    a float32 sum split over another number of threads may round differently; None on a GPU, whose numbers do
    not depend on the CPU threads."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else None


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """torch's intra-op threads set to `threads` in the calling thread for the block (OpenMP's setting is per
    thread: a worker thread starts with the process default, not the count its creator set)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ShardEncoder:
    def __init__(self, clip: ClipEnsemble, text_model: TextModel, batch_size: int,
                 precomputed: PrecomputedVectors | None = None, text_replicas: list[TextModel] | None = None,
                 threads: int | None = None) -> None:
        self.clip, self.text_model, self.batch_size, self.precomputed = clip, text_model, batch_size, precomputed
        self.text_replicas = text_replicas or [text_model]  # MiniLM on each device of a multi-device --device
        # One thread count wherever the build's shards are encoded (driver, Ray actor), so their vectors agree
        # bit for bit; None: the calling thread's count.
        self.threads = threads

    @property
    def tokenizers(self) -> Tokenizers:
        return tokenizers_for(self.clip, self.text_model)

    def encode(self, shard: TokenizedShard, root: str | Path,
               progress: Callable[[int], None] | None = None) -> tuple[dict, dict]:
        """Encode the shard, write its files atomically into `root`; (record to commit, phase seconds).
        `progress(rows)` is called as batches finish (each row once, over the CLIP and the MiniLM pass)."""
        with intra_op_threads(self.threads):
            return self._encode(shard, root, progress)

    def _encode(self, shard: TokenizedShard, root: str | Path,
                progress: Callable[[int], None] | None = None) -> tuple[dict, dict]:
        rows = RowProgress(progress, passes=2)
        if shard.task.images is not None:
            return self._encode_images(shard, root, rows)
        task, seconds = shard.task, {}
        started = time.perf_counter()
        if self.precomputed is not None:
            vectors, truncated = self._precomputed_vectors(shard), 0
            rows(len(task.prompts))
        elif shard.clip_tokens is None:  # an ensemble whose members tokenize differently: each its own way
            result = self.clip.text_embeddings(task.prompts, self.batch_size, progress=rows)
            vectors, truncated = result.vectors, result.truncated
        else:
            tokens = torch.from_numpy(shard.clip_tokens)
            vectors = embed_tokens_parallel(replicas_of(self.clip), tokens, self.batch_size, rows)
            truncated = self.clip.count_truncated(task.prompts, tokens)
        seconds["encode_clip"] = time.perf_counter() - started
        started = time.perf_counter()
        minilm = self._minilm_vectors(shard, range(len(task.prompts)), rows)
        rows.finish(len(task.prompts))
        seconds["encode_minilm"] = time.perf_counter() - started
        started = time.perf_counter()
        record = save_shard(root, task, vectors, minilm, truncated)
        seconds["write_shards"] = time.perf_counter() - started
        release_free_memory()
        return record, seconds

    def _encode_images(self, shard: TokenizedShard, root: str | Path, rows: RowProgress) -> tuple[dict, dict]:
        """An image-keyed task: CLIP image vectors as keys; rows whose image cannot be decoded are dropped
        (counted in the record, the first few named in the log)."""
        from img2prompt.encoders.image_embed import embed_images

        task, seconds = shard.task, {}
        started = time.perf_counter()
        embedded = embed_images(self.clip, task.images, self.batch_size, progress=rows)
        seconds["encode_images"] = time.perf_counter() - started
        kept = embedded.ok
        for position, reason in list(embedded.failed.items())[:3]:
            log.warning("pairs: skipping %s (%s)", task.images[position], reason)
        started = time.perf_counter()
        minilm = self._minilm_vectors(shard, kept, rows)
        rows.finish(len(task.prompts))
        seconds["encode_minilm"] = time.perf_counter() - started
        record = save_shard(root, task, embedded.vectors, minilm, kept=kept)
        record["skipped"] = {SKIP_UNREADABLE_IMAGE: len(embedded.failed)}
        release_free_memory()
        return record, seconds

    def _minilm_vectors(self, shard: TokenizedShard, rows, progress: RowProgress | None = None) -> np.ndarray:
        """The scorer's vectors of these rows of the task, from the pre-tokenized ids when there are."""
        prompts = [shard.task.prompts[row] for row in rows]
        if shard.minilm_ids is None:
            return minilm_embeddings(self.text_model, prompts, self.batch_size)
        return minilm_ids_parallel(self.text_replicas, [shard.minilm_ids[row] for row in rows],
                                   minilm_batch_order(prompts), self.batch_size, progress)

    def _precomputed_vectors(self, shard: TokenizedShard):
        """The task's given CLIP vectors, the first prompts checked against the model's own."""
        vectors = self.precomputed.take(shard.task.source_rows)
        sample = shard.task.prompts[:AGREEMENT_SAMPLE]
        check_agreement(vectors[:len(sample)], self.clip.text_embeddings(sample).vectors, self.clip.name)
        return vectors
