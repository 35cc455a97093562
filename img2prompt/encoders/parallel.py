"""Data-parallel encoding over the replicas of a multi-device --device (img2prompt/encoders/devices.py).

A shard's rows are put in the order one device would batch them (CLIP: by token length; MiniLM: the
scorer's longest-first order), that order is cut into contiguous runs of whole batches, one run per
replica, and each replica encodes its run as one device would: the same batches, so the same numbers.
With one replica every function here is the one-device call, unchanged."""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from img2prompt.encoders.devices import ReplicaRunner, contiguous_runs, locked, parse_devices
from img2prompt.encoders.models import TextModel, clip_token_lengths
from img2prompt.encoders.text import minilm_embed_ids

T = TypeVar("T")


def load_replicas(spec: str, first: T, load: Callable[[torch.device], T]) -> list[T]:
    """`first` (already loaded on the spec's first device) and one more replica per further device."""
    return [first] + [load(device) for device in parse_devices(spec)[1:]]


def replicas_of(clip) -> list:
    """A CLIP ensemble's replicas (itself first); any other object (a test's stand-in): itself alone."""
    return getattr(clip, "replicas", None) or [clip]


def _gather(runs: list[np.ndarray], parts: list[np.ndarray], rows: int, dim: int) -> np.ndarray:
    out = np.empty((rows, dim), dtype=np.float32)
    for run, part in zip(runs, parts):
        out[run] = part
    return out


def embed_tokens_parallel(replicas: Sequence, tokens: torch.Tensor, batch_size: int,
                          progress: Callable[[int], None] | None = None) -> np.ndarray:
    """ClipEnsemble.embed_tokens over several replicas: within a run already sorted by length, each
    replica's own stable sort keeps that order, so its batches are the one-device batches."""
    first = replicas[0]
    if len(replicas) == 1 or len(tokens) == 0:
        return first.embed_tokens(tokens, batch_size, progress=progress)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    order = torch.argsort(clip_token_lengths(first.members[0], tokens), stable=True).numpy()
    runs = contiguous_runs(order, batch_size, len(replicas))
    report = locked(progress)
    with ReplicaRunner(replicas, [replica.device for replica in replicas]) as runner:
        parts = runner.map_runs(lambda clip, run: clip.embed_tokens(tokens[torch.from_numpy(run)], batch_size,
                                                                    progress=report), runs)
    return _gather(runs, parts, len(tokens), first.dim)


def minilm_ids_parallel(text_models: Sequence[TextModel], ids: list[np.ndarray], order: np.ndarray,
                        batch_size: int, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """minilm_embed_ids over several replicas: each gets a run of `order` in whole batches."""
    if len(text_models) == 1 or not ids:
        return minilm_embed_ids(text_models[0], ids, order, batch_size, progress)
    runs = contiguous_runs(order, batch_size, len(text_models))
    report = locked(progress)
    with ReplicaRunner(text_models, [model.device for model in text_models]) as runner:
        parts = runner.map_runs(lambda model, run: minilm_embed_ids(model, [ids[i] for i in run],
                                                                    np.arange(len(run)), batch_size, report), runs)
    return _gather(runs, parts, len(ids), text_models[0].dim)
