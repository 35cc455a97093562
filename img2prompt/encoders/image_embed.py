"""Images → CLIP image vectors. Decoding and open_clip preprocessing run in DataLoader workers, so the
GPU never waits on PIL; undecodable images come back as named failures instead of stopping the run.
Inputs are file paths or PIL images (the Python API takes both)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from img2prompt.encoders.low_memory import batch_limit
from img2prompt.encoders.precision import autocast_for
from img2prompt.encoders.text import l2_normalise
from img2prompt.encoders.clip_ensemble import ClipEnsemble
from img2prompt.errors import UserError
from img2prompt.encoders.models import usable_cores
from img2prompt.progress import progress_bar
from img2prompt.encoders.images import ImageDecodeError, load_image, to_rgb


def image_label(image, position: int) -> str:
    """How an input image is named in results and messages: its path, or its position for a PIL image."""
    return str(image) if isinstance(image, (str, os.PathLike)) else f"<image {position}>"


class _Images(Dataset):
    def __init__(self, images: list, preprocess: Callable) -> None:
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def _decode(self, item):
        from PIL import Image

        if isinstance(item, Image.Image):
            return to_rgb(item)
        return load_image(item)

    def __getitem__(self, i: int):
        started = time.perf_counter()
        try:
            pixels, reason = self.preprocess(self._decode(self.images[i])), None
        except ImageDecodeError as exc:
            pixels, reason = None, str(exc)
        except Exception as exc:  # a preprocessing failure must not kill the other 16k images
            pixels, reason = None, f"preprocessing failed ({type(exc).__name__}: {str(exc)[:120]})"
        return i, pixels, reason, time.perf_counter() - started


def _collate(items):
    ok = [(i, pixels) for i, pixels, _, _ in items if pixels is not None]
    failed = [(i, reason) for i, pixels, reason, _ in items if pixels is None]
    if ok and isinstance(ok[0][1], tuple):  # an ensemble's preprocess: one tensor per member, stacked per part
        pixels = tuple(torch.stack(part) for part in zip(*(p for _, p in ok)))
    else:
        pixels = torch.stack([p for _, p in ok]) if ok else None
    return [i for i, _ in ok], pixels, failed, sum(seconds for *_, seconds in items)


def default_workers(device: torch.device) -> int:
    """On a GPU, decode with every core the process may use (decode + resize is ~20 ms of CPU an image);
    on CPU the tower itself needs the cores, so decode inline."""
    return max(1, usable_cores() - 1) if device.type == "cuda" else 0


@dataclass
class ImageEmbeddings:
    vectors: np.ndarray  # float32 [n_ok, dim], L2-normalised
    ok: list[int]  # positions (in the input list) of the rows of `vectors`
    failed: dict[int, str]  # position → reason
    decode_s: float = 0.0  # summed over workers (CPU seconds spent decoding + preprocessing)
    encode_s: float = 0.0  # wall seconds in the image tower

    def split(self, sizes: list[int]) -> list["ImageEmbeddings"]:
        """The embeddings of consecutive input lists of these sizes (one encoder call for several requests,
        handed back per request: positions count from each part's start; timings stay with the first)."""
        parts, start, row = [], 0, 0
        for number, size in enumerate(sizes):
            end = start + size
            ok = [position - start for position in self.ok if start <= position < end]
            parts.append(ImageEmbeddings(self.vectors[row:row + len(ok)], ok,
                                         {position - start: reason for position, reason in self.failed.items()
                                          if start <= position < end},
                                         self.decode_s if number == 0 else 0.0, self.encode_s if number == 0 else 0.0))
            start, row = end, row + len(ok)
        return parts


def check_image_loading_args(batch_size: int | None, workers: int | None) -> None:
    if batch_size is not None and batch_size <= 0:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be 0 or more (got {workers})")


def default_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 64


def embed_images(clip: ClipEnsemble, images: list, batch_size: int | None = None,
                 workers: int | None = None, progress: Callable[[int], None] | bool | None = None) -> ImageEmbeddings:
    """CLIP image vectors for paths or PIL images; `progress` is a callback, or True for a bar."""
    check_image_loading_args(batch_size, workers)
    batch_size = default_batch_size(clip.device) if batch_size is None else batch_size
    if progress is True:
        with progress_bar(total=len(images), unit="img", desc="encode images") as bar:
            return embed_images(clip, images, batch_size, workers, bar.update)
    workers = default_workers(clip.device) if workers is None else workers
    workers = min(workers, max(1, len(images) // batch_size)) if workers else 0  # no idle processes for few images
    loader = DataLoader(_Images(images, clip.preprocess), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=clip.device.type == "cuda",
                        prefetch_factor=4 if workers else None, persistent_workers=False,
                        multiprocessing_context="spawn" if workers and clip.device.type == "cuda" else None)
    vectors, ok, failed = [], [], {}
    decode_s = encode_s = 0.0
    for (positions, pixels, failures, seconds), features, spent in _encoded_batches(clip, loader):
        failed.update(failures)
        decode_s += seconds
        if features is not None:
            vectors.append(features)
            encode_s += spent
            ok.extend(positions)
        if progress:
            progress(len(positions) + len(failures))
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, clip.dim), dtype=np.float32)
    return ImageEmbeddings(vectors=l2_normalise(matrix), ok=ok, failed=failed, decode_s=decode_s, encode_s=encode_s)


def _encode_batch(clip: ClipEnsemble, batch) -> tuple:
    """(the loader's batch, its float32 vectors or None, tower seconds); grad and autocast modes are
    per thread, so they are entered here, in whichever thread runs the batch."""
    pixels = batch[1]
    if pixels is None:
        return batch, None, 0.0
    started = time.perf_counter()
    rows = len(pixels[0]) if isinstance(pixels, tuple) else len(pixels)
    with torch.inference_mode(), autocast_for(clip.device, getattr(clip, "precision", None)):
        # out of CUDA memory: fewer images per tower call (encoders/low_memory.py)
        parts = batch_limit(clip).run(rows, lambda first, stop: clip.encode_image(
            tuple(part[first:stop] for part in pixels) if isinstance(pixels, tuple) else pixels[first:stop]
        ).float().cpu().numpy())
    return batch, np.concatenate(parts), time.perf_counter() - started


def _encoded_batches(clip: ClipEnsemble, loader):
    """The loader's batches encoded in order: here, or round robin over the replicas of a multi-device
    --device (whole batches, so each vector is what one device gives)."""
    from img2prompt.encoders.parallel import replicas_of

    replicas = replicas_of(clip)
    if len(replicas) == 1:
        for batch in loader:
            yield _encode_batch(clip, batch)
        return
    from img2prompt.encoders.devices import ReplicaRunner

    with ReplicaRunner(replicas, [replica.device for replica in replicas]) as runner:
        yield from runner.map_batches(_encode_batch, loader)
