"""Boundaries of index/minilm_store.py (issue 35's mutation pass, docs/mutation.md): the dtype a manifest
names (none: fp16), each file's exact size, the per-row scale max|x| / 127 (so the peak element is exactly
±127 and 0-rows keep scale 1), and the int8 files written block by block reading back as the same rows."""
from __future__ import annotations

import numpy as np
import pytest

from img2prompt.index import minilm_store
from img2prompt.index.layout import MINILM as MINILM_F16, MINILM_I8, MINILM_SCALE
from img2prompt.index.minilm_store import (FP16, INT8, Int8Rows, dequantise, minilm_dtype, minilm_file_bytes, minilm_file_names, minilm_rows,
                                           quantise, write_int8)


def test_dtype_names_and_exact_file_sizes():
    assert minilm_dtype({}) == FP16 and minilm_dtype({"minilm": None}) == FP16
    assert minilm_dtype({"minilm": {}}) == FP16 and minilm_dtype({"minilm": {"dtype": INT8}}) == INT8
    assert minilm_file_names(INT8) == (MINILM_I8, MINILM_SCALE) and minilm_file_names(FP16) == (MINILM_F16,)
    assert minilm_file_bytes(INT8, 7, 384) == {MINILM_I8: 7 * 384, MINILM_SCALE: 7 * 4}
    assert minilm_file_bytes(FP16, 7, 384) == {MINILM_F16: 7 * 384 * 2}


def test_the_scale_is_the_row_peak_over_127_and_the_peak_quantises_to_127():
    rows = np.array([[0.5, -0.25, 0.1], [-0.8, 0.4, 0.0], [0.0, 0.0, 0.0], [1e-30, 0.0, -1e-30]], np.float32)
    quantised, scale = quantise(rows)
    np.testing.assert_array_equal(scale, np.float32([0.5 / 127, 0.8 / 127, 1.0, 1e-30 / 127]))
    np.testing.assert_array_equal(quantised[:, 0], [127, -127, 0, 127])
    np.testing.assert_array_equal(quantised[0], [127, -64, 25])  # -0.25·254 = -63.5 → -64, 0.1·254 = 25.4 → 25
    np.testing.assert_array_equal(quantised[2], [0, 0, 0])
    back = dequantise(quantised, scale)
    assert back.dtype == np.float32 and np.all(np.abs(back - rows) <= np.abs(rows).max(axis=1, keepdims=True) / 254)
    empty_q, empty_s = quantise(np.zeros((0, 3), np.float32))
    assert empty_q.shape == (0, 3) and empty_s.shape == (0,)


def test_int8_rows_read_like_an_array_of_rows():
    quantised, scale = quantise(np.array([[0.5, -0.5], [0.1, 0.3], [-1.0, 0.2]], np.float32))
    rows = Int8Rows(quantised, scale)
    assert len(rows) == 3 and rows.shape == (3, 2) and rows.dtype == np.float32 and rows.ndim == 2
    np.testing.assert_array_equal(rows[1], dequantise(quantised[1], scale[1]))
    np.testing.assert_array_equal(rows[[2, 0]], dequantise(quantised[[2, 0]], scale[[2, 0]]))
    np.testing.assert_array_equal(np.asarray(rows), dequantise(quantised, scale))
    assert np.asarray(rows).dtype == np.float32  # no dtype asked: the rows as they are, float32
    assert np.asarray(rows, dtype=np.float64).dtype == np.float64
    with pytest.raises(TypeError, match="row indices only"):
        rows[0, 1]


def test_int8_files_written_in_blocks_read_back_as_the_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(minilm_store, "_BLOCK", 3)  # blocks of 3 rows inside each given block
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((n, 5)).astype(np.float32) for n in (7, 0, 2)]
    write_int8(tmp_path, iter(blocks))
    rows = np.concatenate(blocks)
    assert (tmp_path / MINILM_I8).stat().st_size == 9 * 5 and (tmp_path / MINILM_SCALE).stat().st_size == 9 * 4
    read = minilm_rows(tmp_path, {"minilm": {"dtype": INT8}}, 9, 5)
    assert isinstance(read, Int8Rows)
    np.testing.assert_array_equal(read[np.arange(9)], dequantise(*quantise(rows)))
    assert not list(tmp_path.glob("*.tmp*"))
    write_int8(tmp_path / "", iter([]))  # nothing: two empty files, not a crash
    assert (tmp_path / MINILM_I8).stat().st_size == 0 and (tmp_path / MINILM_SCALE).stat().st_size == 0


def test_fp16_rows_are_the_memmap(tmp_path):
    rows = np.arange(12, dtype=np.float16).reshape(4, 3)
    rows.tofile(tmp_path / MINILM_F16)
    read = minilm_rows(tmp_path, {}, 4, 3)
    assert isinstance(read, np.memmap) and read.dtype == np.float16
    np.testing.assert_array_equal(read, rows)
