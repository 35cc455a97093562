"""A build and an add without any model (issue 35: fast tests of build_index/add.py, index/append.py and
build_index/add_key_pca.py): a fake CLIP and MiniLM whose vectors follow from each text alone (sha256-seeded),
and an engine that writes each shard task with them through index/writer.save_shard. Everything else is the
real job (run_build / run_add, the writer, the reader, the backends), so the indexes are the real on-disk
format, built in a fraction of a second with no torch model loaded.

A prompt "TEXT ~ N" gets a MiniLM row near TEXT's (cosine ≈ 0.99): the near-duplicates of the near-dup tests.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

CLIP_DIM, TEXT_DIM = 16, 8
CLIP_NAME = "fake-clip"
CLIP_IDENTITY = {"name": CLIP_NAME, "pretrained": None, "dim": CLIP_DIM, "sha256": "c" * 64}
TEXT_IDENTITY = {"name": "fake-minilm", "pretrained": None, "dim": TEXT_DIM, "sha256": "d" * 64}


@pytest.fixture(autouse=True, scope="module")
def no_fsync():
    """os.fsync a no-op for a module of these tests (import it there): every file is still written to a temp
    name and renamed, but not flushed to the disk, which is a crash's concern (the kill tests' of test_add.py,
    test_interruption.py), not these tests'; on a busy shared disk the fsyncs took 4/5 of their time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        yield


def unit_rows(texts, dim: int, salt: str) -> np.ndarray:
    """One unit float32 row per text, fixed by the text (and `salt`) alone."""
    out = np.empty((len(texts), dim), np.float32)
    for row, text in enumerate(texts):
        seed = int.from_bytes(hashlib.sha256(f"{salt}\0{text}".encode()).digest()[:8], "little")
        out[row] = np.random.default_rng(seed).standard_normal(dim)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def clip_keys(prompts) -> np.ndarray:
    return unit_rows(prompts, CLIP_DIM, "clip")


def image_keys(images) -> np.ndarray:
    return unit_rows([Path(image).name for image in images], CLIP_DIM, "image")


def minilm_rows(prompts) -> np.ndarray:
    rows = []
    for prompt in prompts:
        base, near, _ = prompt.partition(" ~ ")
        row = unit_rows([base], TEXT_DIM, "minilm")[0]
        if near:
            row = row + 0.1 * unit_rows([prompt], TEXT_DIM, "near")[0]
        rows.append(row / np.linalg.norm(row))
    return np.asarray(rows, np.float32).reshape(len(rows), TEXT_DIM)


class FakeClip:
    """What the jobs call on a CLIP ensemble: text_embeddings, dim, identity (the name picks the weights)."""
    dim = CLIP_DIM

    def __init__(self, name: str = CLIP_NAME) -> None:
        self.name = name
        self.encoded: list[str] = []  # every text encoded, in order

    def text_embeddings(self, prompts, batch_size: int = 256, progress=None):
        prompts = list(prompts)
        self.encoded += prompts
        return SimpleNamespace(vectors=clip_keys(prompts), truncated=0)

    def identity(self) -> dict:
        return dict(CLIP_IDENTITY) if self.name == CLIP_NAME else {**CLIP_IDENTITY, "name": self.name,
                                                                  "sha256": "e" * 64}


class FakeText:
    folder = None
    max_seq_length = 128

    def identity(self) -> dict:
        return dict(TEXT_IDENTITY)


class FakeEngine:
    """Runs each shard task in this process with the fake vectors (text keys, or image keys for pairs)."""

    def __init__(self) -> None:
        self.tasks: list = []

    @classmethod
    def from_options(cls, options) -> "FakeEngine":
        return cls()

    def run(self, tasks, encoder, spec, root, progress):
        from img2prompt.index.writer import save_shard

        for task in tasks:
            self.tasks.append(task)
            keys = image_keys(task.images) if task.images is not None else clip_keys(task.prompts)
            record = save_shard(root, task, keys, minilm_rows(task.prompts))
            progress(len(task.prompts))
            yield record, {"encode_clip": 0.0}


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def write_pairs(path: Path, rows) -> Path:
    """An (image, prompt) CSV; the images need not exist (the fake engine keys them by file name)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        table = csv.writer(handle)
        table.writerow(["image", "prompt"])
        table.writerows(rows)
    return path


def fake_build(out: Path, corpus, *, pairs=None, shard_size: int = 16, **options):
    """run_build with the fake models and engine (flat unless `index=` says otherwise)."""
    from img2prompt.build_index import runner
    from img2prompt.build_index.job import LoadedModels
    from img2prompt.build_index.options import BuildOptions

    options.setdefault("index", "flat")
    build = BuildOptions(corpus=[str(path) for path in corpus], out=str(out), clip_model=CLIP_NAME,
                         pairs=[str(path) for path in pairs] if pairs else None, shard_size=shard_size,
                         batch_size=8, device="cpu", progress=False, **options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "engine_class", lambda name: FakeEngine)
        patch.setattr(runner, "load_build_models",
                      lambda options, devices, device, timer: LoadedModels(
                          FakeClip(), FakeText(), {"clip": CLIP_IDENTITY, "text": TEXT_IDENTITY}))
        return runner.run_build(build)


class AddRun:
    """One fake add's observations: the models asked for (names, pretrained, precision), the engine's tasks."""

    def __init__(self) -> None:
        self.clip: FakeClip | None = None
        self.loaded: list[tuple] = []
        self.engine = FakeEngine()


def fake_add(index: Path, corpus=(), *, pairs=None, run: AddRun | None = None, shard_size: int = 16,
             text_identity: dict | None = None, **options):
    """run_add with the fake models and engine: the real checks, model identity check included."""
    from img2prompt.build_index import add
    from img2prompt.build_index.options import AddOptions

    run = run if run is not None else AddRun()
    add_options = AddOptions(index=str(index), corpus=[str(path) for path in corpus],
                             pairs=[str(path) for path in pairs] if pairs else None, shard_size=shard_size,
                             batch_size=8, device="cpu", **{"progress": False, **options})

    def load_clips(names, pretrained, device, precision=None):
        run.loaded.append((names, pretrained, precision))
        run.clip = FakeClip(names if isinstance(names, str) else names[0])
        return run.clip

    text = FakeText()
    if text_identity is not None:
        text.identity = lambda: dict(text_identity)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(add, "load_named_clips", load_clips)
        patch.setattr(add, "load_text_model", lambda name, device: text)
        patch.setattr(add, "prepare_job", functools.partial(add.prepare_job, engine=run.engine))
        return add.run_add(add_options)
