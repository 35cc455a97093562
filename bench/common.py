"""Helpers for the bench scripts (run by hand; they print figures, they assert nothing about speed)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPORA = REPO.parent / "shared" / "corpora"
REAL_CORPORA = ("sd-prompts-dedup-43k.txt", "openprompts-dedup-21k.txt")
CORPORA_ENV = "IMG2PROMPT_BENCH_CORPORA"  # another folder holding REAL_CORPORA (e.g. .gpu/corpora on the GPU machine)


def corpora_folder(folder: str | Path | None = None) -> Path:
    """The folder with the real corpora: `folder`, else $IMG2PROMPT_BENCH_CORPORA, else ../shared/corpora."""
    return Path(folder or os.environ.get(CORPORA_ENV) or CORPORA)


def real_prompts(limit: int | None = None, folder: str | Path | None = None) -> list[str]:
    """Real user prompts from ../shared/corpora (exits with a reason when absent)."""
    prompts: list[str] = []
    for name in REAL_CORPORA:
        path = corpora_folder(folder) / name
        if not path.is_file():
            sys.exit(f"skip: {path} is not present (the real corpora live in ../shared/corpora; "
                     f"elsewhere set {CORPORA_ENV} or pass --corpora)")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


def synthetic_prompts(count: int, folder: str | Path | None = None) -> list[str]:
    """`count` distinct prompts: real prompts, cycled, each made unique by a numbered suffix after the first pass."""
    base = real_prompts(folder=folder)
    out = []
    for number in range(count):
        lap = number // len(base)
        prompt = base[number % len(base)]
        out.append(f"{prompt}, variation {lap}" if lap else prompt)
    return out


def synthetic_corpus(path: Path, count: int, folder: str | Path | None = None) -> Path:
    """synthetic_prompts(count) written as a .txt corpus (a prompt a line)."""
    with open(path, "w", encoding="utf-8") as handle:
        for prompt in synthetic_prompts(count, folder):
            handle.write(prompt + "\n")
    return path


def add_device_flag(parser: argparse.ArgumentParser, default: str = "cpu") -> None:
    parser.add_argument("--device", default=default,
                        help=f"cpu or cuda (default {default}): where the measured code runs")


def check_device(device: str) -> None:
    """Exit with a reason when cuda is asked for and torch sees none (never a silent CPU fallback)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {device}: torch sees no CUDA device on this machine")


def synchronize(device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on CPU)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def clustered(count: int, dim: int, clusters: int = 2000, seed: int = 0, chunk: int = 100_000):
    """float16 [count, dim] unit vectors around `clusters` random centres (uniform random data would make every
    ANN index look broken): numpy, on the CPU."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((count, dim), dtype=np.float16)
    for start in range(0, count, chunk):
        rows = min(chunk, count - start)
        block = centres[rng.integers(0, clusters, rows)] + 0.6 * rng.standard_normal((rows, dim)).astype(np.float32)
        out[start:start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def held_out_queries(vectors, count: int, seed: int = 1):
    """float32 queries at cosine 0.5 from randomly chosen indexed vectors (image queries sit off the text
    manifold, see index/recall.py)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(vectors), size=count, replace=count > len(vectors))
    queries = np.asarray(vectors[np.sort(chosen)], dtype=np.float32)
    noise = rng.standard_normal(queries.shape).astype(np.float32)
    noise -= (noise * queries).sum(1, keepdims=True) * queries
    noise /= np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    return 0.5 * queries + np.sqrt(0.75) * noise


def random_clip(arch: str = "ViT-B-32", device: str = "cpu"):
    """A ClipModel of the real architecture with random weights: the right compute for speed figures."""
    import open_clip
    import torch

    from img2prompt.encoders.models import ClipModel, _clip_embed_dim

    model, _, preprocess = open_clip.create_model_and_transforms(arch)
    model.eval()
    model.to(device)
    tokenizer = open_clip.get_tokenizer(arch)
    try:  # the tokenizer load_clip gives (the fast one where it exists); same tokens either way
        from img2prompt.encoders.tokenization import make_clip_tokenizer

        tokenizer = make_clip_tokenizer(tokenizer)
    except ImportError:
        pass
    return ClipModel(model=model, preprocess=preprocess, tokenizer=tokenizer, name=arch, pretrained=None,
                     sha256="random", dim=_clip_embed_dim(model), context_length=model.context_length,
                     device=torch.device(device))


def anon_peak_sampler(interval: float = 0.05):
    """(stop event, [peak bytes]): a thread sampling this process's anonymous RSS (heap, not the page cache of
    mapped files) every `interval` seconds until the event is set."""
    import threading
    import time

    stop, peak = threading.Event(), [0]

    def sample() -> None:
        while not stop.is_set():
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            time.sleep(interval)

    threading.Thread(target=sample, daemon=True).start()
    return stop, peak
