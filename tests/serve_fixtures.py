"""What the serve tests share: the app as TestClient reaches it, an opened index, a client, the sample images.
Imported by tests/test_serve*.py (pytest takes fixtures from a module's namespace)."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

import img2prompt  # noqa: E402
from img2prompt import serve as serve_module  # noqa: E402


def create_app(index, **options):
    """The app as TestClient reaches it: its requests say Host: testserver."""
    options.setdefault("allowed_hosts", ("testserver",))
    return serve_module.create_app(index, **options)


@pytest.fixture(scope="module")
def index(built_index):
    with img2prompt.open_index(built_index, device="cpu") as opened:
        yield opened


@pytest.fixture(scope="module")
def client(index):
    with TestClient(create_app(index)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def images(sample_images) -> list[Path]:
    return sorted(sample_images.glob("*.png"))


def upload(path: Path, name: str | None = None) -> tuple:
    return ("image", (name or path.name, path.read_bytes(), "image/png"))


class GatedIndex:
    """The index, with text searches held until `gate` opens (so requests pile up in the queue); `entered`
    is set once a search has started, and a text containing "boom" fails."""

    def __init__(self, index) -> None:
        self._index, self.gate, self.entered = index, threading.Event(), threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._index, name)

    def search_texts(self, texts, k=10, **options):
        self.entered.set()
        assert self.gate.wait(60)
        if any("boom" in text for text in texts):
            raise RuntimeError("boom")
        return self._index.search_texts(texts, k, **options)
