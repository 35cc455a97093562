"""Images → CLIP image vectors. Decoding and open_clip preprocessing run in DataLoader workers, so the
GPU never waits on PIL; undecodable images come back as named failures instead of stopping the run."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from img2prompt.build_index.embed import autocast_for, l2_normalise
from img2prompt.models import ClipModel, clip_encode_image
from img2prompt.query.images import ImageDecodeError, load_image


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path], preprocess: Callable) -> None:
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        started = time.perf_counter()
        try:
            pixels, reason = self.preprocess(load_image(self.paths[i])), None
        except ImageDecodeError as exc:
            pixels, reason = None, str(exc)
        except Exception as exc:  # a preprocessing failure must not kill the other 16k images
            pixels, reason = None, f"preprocessing failed ({type(exc).__name__}: {str(exc)[:120]})"
        return i, pixels, reason, time.perf_counter() - started


def _collate(items):
    ok = [(i, pixels) for i, pixels, _, _ in items if pixels is not None]
    failed = [(i, reason) for i, pixels, reason, _ in items if pixels is None]
    pixels = torch.stack([p for _, p in ok]) if ok else None
    return [i for i, _ in ok], pixels, failed, sum(seconds for *_, seconds in items)


def default_workers(device: torch.device) -> int:
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


@dataclass
class ImageEmbeddings:
    vectors: np.ndarray  # float32 [n_ok, dim], L2-normalised
    ok: list[int]  # positions (in the input list) of the rows of `vectors`
    failed: dict[int, str]  # position → reason
    decode_s: float = 0.0  # summed over workers (CPU seconds spent decoding + preprocessing)
    encode_s: float = 0.0  # wall seconds in the image tower


def embed_images(clip: ClipModel, paths: list[Path], batch_size: int = 64, workers: int | None = None,
                 progress: Callable[[int], None] | None = None) -> ImageEmbeddings:
    workers = default_workers(clip.device) if workers is None else workers
    loader = DataLoader(_ImageFiles(paths, clip.preprocess), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=clip.device.type == "cuda")
    vectors, ok, failed = [], [], {}
    decode_s = encode_s = 0.0
    with torch.inference_mode(), autocast_for(clip.device):
        for positions, pixels, failures, seconds in loader:
            failed.update(failures)
            decode_s += seconds
            if pixels is not None:
                started = time.perf_counter()
                features = clip_encode_image(clip, pixels.to(clip.device, non_blocking=True))
                vectors.append(features.float().cpu().numpy())
                encode_s += time.perf_counter() - started
                ok.extend(positions)
            if progress:
                progress(len(positions) + len(failures))
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, clip.dim), dtype=np.float32)
    return ImageEmbeddings(vectors=l2_normalise(matrix), ok=ok, failed=failed, decode_s=decode_s, encode_s=encode_s)
