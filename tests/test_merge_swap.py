"""Issue 30 item 3: an input folder swapped while merge runs (`build --overwrite --out A` stages the new index
beside A and exchanges the folders) never pairs A's new prompts with A's old vectors. The swap is made at a
known point by a hook: after A's vectors are mapped but before its prompts are read (merge must read the
old index, whole), and in the middle of opening A (merge must notice and open the new index, whole)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from img2prompt.index import reader
from img2prompt.index.lock import exchange_paths
from tests.conftest import read_data_prompts
from tests.test_add import _build, _rows, _write
from tests.test_merge import _merge


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_clip_dir):
    """A (old), A's rebuild (other prompts, another count), B, and each prompt's own vectors."""
    prompts = read_data_prompts(130)
    root = tmp_path_factory.mktemp("merge-swap")
    for name, rows in (("a_old", prompts[:60]), ("a_new", prompts[60:100]), ("b", prompts[100:130])):
        _build([_write(root / f"{name}.txt", rows)], root / name, tiny_clip_dir, index="flat")
    own = {}
    for name in ("a_old", "a_new", "b"):
        _, texts, clip, minilm = _rows(root / name)
        own.update({text: (clip[row], minilm[row]) for row, text in enumerate(texts)})
    return root, own


def _swap(first: Path, second: Path) -> None:
    """What a rebuild's final step does to the folder: exchange it with the staged one."""
    if not exchange_paths(first, second):
        os.rename(first, first.with_name("swap-tmp"))
        os.rename(second, first)
        os.rename(first.with_name("swap-tmp"), second)


def _workdir(tmp_path: Path, parts) -> tuple[Path, Path, Path]:
    import shutil

    root, _ = parts
    for name in ("a_old", "a_new", "b"):
        shutil.copytree(root / name, tmp_path / name)
    return tmp_path / "a_old", tmp_path / "a_new", tmp_path / "b"


def _assert_paired(out: Path, own: dict, expected: list[str]) -> None:
    _, prompts, clip, minilm = _rows(out)
    assert prompts == expected
    wrong = [row for row, text in enumerate(prompts)
             if not (np.array_equal(clip[row], own[text][0]) and np.array_equal(minilm[row], own[text][1]))]
    assert wrong == [], f"{len(wrong)} of {len(prompts)} rows carry another prompt's vectors"


def test_a_swap_after_the_vectors_are_mapped_reads_the_old_index(tmp_path, parts, tiny_clip_dir, monkeypatch):
    a, rebuilt, b = _workdir(tmp_path, parts)
    old_prompts, b_prompts = _rows(a)[1], _rows(b)[1]
    original, swapped = reader.PromptIndex.stream_prompt_batches, []

    def swap_then_stream(self, *args, **kwargs):
        if self.root == a and not swapped:  # A's vectors are mapped; its prompts not read yet
            _swap(a, rebuilt)
            swapped.append(True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(reader.PromptIndex, "stream_prompt_batches", swap_then_stream)
    _merge([a, b], tmp_path / "m", tiny_clip_dir)
    assert swapped
    _assert_paired(tmp_path / "m", parts[1], old_prompts + b_prompts)


def test_a_swap_while_an_input_opens_reads_the_new_index(tmp_path, parts, tiny_clip_dir, monkeypatch):
    a, rebuilt, b = _workdir(tmp_path, parts)
    new_prompts, b_prompts = _rows(rebuilt)[1], _rows(b)[1]
    original, swapped = reader.PromptIndex.preload, []

    def swap_then_preload(self):
        if self.root == a and not swapped:  # A's manifest is read and checked; its files not opened yet
            _swap(a, rebuilt)
            swapped.append(True)
        return original(self)

    monkeypatch.setattr(reader.PromptIndex, "preload", swap_then_preload)
    _merge([a, b], tmp_path / "m", tiny_clip_dir)
    assert swapped
    _assert_paired(tmp_path / "m", parts[1], new_prompts + b_prompts)
