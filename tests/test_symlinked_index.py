"""Issue 30 item 4: every command that swaps a folder into place (build --overwrite, add, merge --overwrite,
kaggle-kit --overwrite) resolves its folder once, so a symlinked folder stays a symlink to the real folder,
which holds the new index; nothing is left beside either (no `.link.rebuild`, no retired folder)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from img2prompt.index.reader import open_index
from tests.conftest import read_data_prompts
from tests.test_add import _add, _build, _write
from tests.test_merge import _merge


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    prompts = read_data_prompts(90)
    folder = tmp_path_factory.mktemp("link-corpus")
    return (_write(folder / "a.txt", prompts[:30]), _write(folder / "b.txt", prompts[30:60]),
            _write(folder / "c.txt", prompts[60:90]))


def _linked(tmp_path: Path, corpus: Path, clip_dir: Path, relative: bool = False) -> tuple[Path, Path]:
    real, link = tmp_path / "real", tmp_path / "link"
    _build([corpus], real, clip_dir, index="flat")
    os.symlink("real" if relative else str(real), link)
    return real, link


def _assert_still_linked(tmp_path: Path, real: Path, link: Path, prompts: list[str]) -> None:
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert real.is_dir() and not real.is_symlink()
    assert open_index(real).prompts == prompts
    assert open_index(link).prompts == prompts
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link", "real"]  # no .link.rebuild, no retired


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_build_overwrite_through_a_symlink(tmp_path, corpora, tiny_clip_dir, relative):
    real, link = _linked(tmp_path, corpora[0], tiny_clip_dir, relative)
    _build([corpora[1]], link, tiny_clip_dir, index="flat", overwrite=True)
    _assert_still_linked(tmp_path, real, link, _lines(corpora[1]))


def test_add_through_a_symlink_twice(tmp_path, corpora, tiny_clip_dir):
    real, link = _linked(tmp_path, corpora[0], tiny_clip_dir)
    _add(link, [corpora[1]], tiny_clip_dir)
    _assert_still_linked(tmp_path, real, link, _lines(corpora[0]) + _lines(corpora[1]))
    _add(link, [corpora[2]], tiny_clip_dir)  # the second add used to clear `real` through the leftover link
    _assert_still_linked(tmp_path, real, link, _lines(corpora[0]) + _lines(corpora[1]) + _lines(corpora[2]))


def test_merge_overwrite_through_a_symlink(tmp_path, corpora, tiny_clip_dir):
    parts = tmp_path.parent / f"{tmp_path.name}-parts"
    _build([corpora[1]], parts / "b", tiny_clip_dir, index="flat")
    _build([corpora[2]], parts / "c", tiny_clip_dir, index="flat")
    real, link = _linked(tmp_path, corpora[0], tiny_clip_dir)
    _merge([parts / "b", parts / "c"], link, tiny_clip_dir, overwrite=True)
    _assert_still_linked(tmp_path, real, link, _lines(corpora[1]) + _lines(corpora[2]))


def test_kaggle_kit_overwrite_through_a_symlink(tmp_path, built_index, monkeypatch):
    from img2prompt.kit.build import KitOptions, build_kit
    from kit_helpers import stub_wheels

    stub_wheels(monkeypatch)
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    (real / "kit.json").write_text(json.dumps({"format": 2, "label": "old"}))
    link.symlink_to(real)
    build_kit(KitOptions(index=str(built_index), out=str(link), overwrite=True))
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "submit.py").is_file() and "label" not in json.loads((real / "kit.json").read_text())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link", "real"]
