"""Shared fixtures: a tiny random open_clip model written to a local folder (loaded through the same
`local-dir:` path as a real checkpoint folder), the real all-MiniLM-L6-v2 scorer, and a small built index."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the model-identity cache of this test run, not the user's ~/.cache
os.environ.setdefault("IMG2PROMPT_CACHE_DIR", tempfile.mkdtemp(prefix="img2prompt-cache-"))

REPO = Path(__file__).resolve().parent.parent
# ../shared: real corpora and the Kaggle sample kept beside the clone, never in it (a fresh clone has none).
# IMG2PROMPT_TEST_SHARED points elsewhere: tests/test_shared_skips.py runs the suite as a fresh clone sees it.
SHARED = Path(os.environ.get("IMG2PROMPT_TEST_SHARED") or REPO.parent / "shared")
KAGGLE_SAMPLE = SHARED / "kaggle-sample"


def shared_absent(what: str) -> str:
    """The skip reason of a test that reads ../shared/<what>."""
    return f"../shared/{what} is absent (real data kept beside the clone, not in it: see README, Tests)"


def shared_marks(what: str) -> list:
    """Marks of a test (or, as `pytestmark`, a module) that reads ../shared/<what>: marked `shared`, and
    skipped, naming the missing folder, where it is absent."""
    return [pytest.mark.shared, pytest.mark.skipif(not (SHARED / what).exists(), reason=shared_absent(what))]


def needs_shared(what: str):
    """Decorator form of `shared_marks`."""
    def mark(test):
        for marker in shared_marks(what):
            test = marker(test)
        return test
    return mark
DATA = REPO / "data"


def read_data_prompts(count: int | None = None) -> list[str]:
    prompts = (DATA / "prompts.txt").read_text(encoding="utf-8").splitlines()
    return prompts[:count] if count else prompts


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from img2prompt.stand_in import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def other_clip_dir(tmp_path_factory) -> Path:
    """Same architecture, different random weights: a different model."""
    from img2prompt.stand_in import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("models") / "other-clip", seed=1)


@pytest.fixture(scope="session")
def clip(tiny_clip_dir):
    from img2prompt.encoders.models import load_clip

    return load_clip(str(tiny_clip_dir), device="cpu")


@pytest.fixture(scope="session")
def text_model():
    from img2prompt.encoders.models import load_text_model

    return load_text_model(None, device="cpu")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """160 real-looking prompts plus duplicates in other case/spacing and blank lines."""
    prompts = read_data_prompts(160)
    lines = prompts + ["", "   ", prompts[0].upper(), "  " + prompts[1].replace(" ", "   ") + "  "]
    path = tmp_path_factory.mktemp("corpus") / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, tiny_clip_dir, corpus_file, text_model) -> Path:
    from img2prompt.build_index.runner import BuildOptions, run_build

    out = tmp_path_factory.mktemp("index") / "idx"
    run_build(BuildOptions(corpus=[str(corpus_file)], out=str(out), clip_model=str(tiny_clip_dir),
                           shard_size=64, batch_size=32, device="cpu", progress=False))
    return out


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    """Four small generated PNGs (ids img0..img3)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for number in range(4):
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(folder / f"img{number}.png")
    return folder


def run_cli(*args: str, cwd: Path | None = None):
    """Run the installed console entry point in a subprocess, as a user would."""
    import subprocess

    script = Path(sys.executable).parent / "img2prompt"  # the console script pip installed
    return subprocess.run([str(script), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)


def pytest_collection_modifyitems(items) -> None:
    """A Kaggle-kit test (a fresh venv, wheels from PyPI) is slow too: `-m "not slow"` leaves it out."""
    for item in items:
        if item.get_closest_marker("kit") is not None:
            item.add_marker(pytest.mark.slow)
