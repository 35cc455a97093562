"""Helpers for the kit tests: fake wheels, and a kit built with its wheels stubbed (no pip, no network)."""
from __future__ import annotations

import zipfile
from importlib import metadata
from pathlib import Path


def make_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A minimal wheel: just NAME-VERSION.dist-info/METADATA with the Requires-Dist lines."""
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    body = "".join(f"Requires-Dist: {line}\n" for line in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{body}")
    return path


def stub_wheels(monkeypatch, *, fail: Exception | None = None) -> None:
    """build_kit's wheels without pip: img2prompt's own wheel is a fake one of the installed version with no
    requirements (so nothing is fetched, and the kit's notebook finds that version already installed);
    `fail`: building the wheel raises it instead (a build that fails after the index and CLIP are written)."""
    from img2prompt.kit import build as kaggle_kit

    def own_wheel(dest: Path) -> Path:
        if fail is not None:
            raise fail
        return make_wheel(dest, "img2prompt", metadata.version("img2prompt"), [])

    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched a dependency: the stubbed img2prompt wheel requires nothing")

    monkeypatch.setattr(kaggle_kit, "build_project_wheel", own_wheel)
    monkeypatch.setattr(kaggle_kit, "pip_download", no_fetch)


def build_stub_kit(index: Path, out: Path) -> Path:
    """A kit of `index` at `out`, its wheels stubbed (no pip download), outside any test's monkeypatch."""
    import pytest

    from img2prompt.kit.build import KitOptions, build_kit

    with pytest.MonkeyPatch.context() as monkeypatch:
        stub_wheels(monkeypatch)
        build_kit(KitOptions(index=str(index), out=str(out)))
    return out
