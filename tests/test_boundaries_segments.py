"""Boundaries of index/segments.py (issue 35's mutation pass, docs/mutation.md): the segment table of a
manifest (base rows end where the first appended segment starts; no list: one segment of `count` rows), and
ConcatRows reading exactly like np.concatenate at every part border, with negative ids, boolean masks,
empty parts and out-of-range ids (an error naming the row)."""
from __future__ import annotations

import numpy as np
import pytest

from img2prompt.index.segments import ConcatRows, Segment, concat_rows, segment_folder, segments_of


def test_segments_of_a_manifest():
    assert segments_of({"count": 7}) == [Segment("", 0, 7)]
    assert segments_of({"count": 9, "segments": []}) == [Segment("", 0, 9)]
    manifest = {"count": 12, "segments": [{"number": 1, "first_id": 5, "count": 4},
                                          {"number": 2, "first_id": 9, "count": 3}]}
    assert segments_of(manifest) == [Segment("", 0, 5), Segment("segments/00001", 5, 4),
                                     Segment("segments/00002", 9, 3)]
    assert segment_folder(12) == "segments/00012"
    assert Segment("", 0, 5).name("clip.f16") == "clip.f16"
    assert Segment("segments/00001", 5, 4).name("clip.f16") == "segments/00001/clip.f16"


PARTS = [np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 100 * i for i, n in enumerate((3, 0, 1, 4))]
WHOLE = np.concatenate(PARTS)


def test_every_slice_and_single_row_at_the_borders_reads_like_one_array():
    rows = ConcatRows(PARTS)
    assert rows.shape == WHOLE.shape and len(rows.parts) == 3  # the empty part is dropped
    for start in range(-1, len(WHOLE) + 2):
        for stop in range(-1, len(WHOLE) + 2):
            np.testing.assert_array_equal(np.asarray(rows[start:stop]), WHOLE[start:stop], err_msg=f"{start}:{stop}")
    for row in range(-len(WHOLE), len(WHOLE)):
        np.testing.assert_array_equal(rows[row], WHOLE[row], err_msg=str(row))
    np.testing.assert_array_equal(np.asarray(rows[::-1]), WHOLE[::-1])
    np.testing.assert_array_equal(np.asarray(rows), WHOLE)
    assert np.asarray(rows, dtype=np.float64).dtype == np.float64
    assert rows[3:4].base is not None or rows[3:4].shape == (1, 2)  # inside one part: that part's own rows


def test_gathers_masks_and_tuples():
    rows = ConcatRows(PARTS)
    ids = np.array([7, 0, 3, 4, -1, -8, 2])
    np.testing.assert_array_equal(rows[ids], WHOLE[ids])
    np.testing.assert_array_equal(rows[ids.reshape(7, 1)], WHOLE[ids.reshape(7, 1)])
    mask = np.array([True, False, True, True, False, False, True, True])
    np.testing.assert_array_equal(rows[mask], WHOLE[mask])
    np.testing.assert_array_equal(rows[ids, 1], WHOLE[ids, 1])
    np.testing.assert_array_equal(rows[2:6, 0], WHOLE[2:6, 0])
    assert rows[np.zeros(0, np.int64)].shape == (0, 2)


@pytest.mark.parametrize("bad", [8, -9, 100])
def test_an_id_outside_the_rows_is_an_error_naming_it(bad):
    named = bad if bad >= 0 else bad + 8  # a negative id is named as counted from the end
    with pytest.raises(IndexError, match=f"^row {named} is outside 8 rows$"):
        ConcatRows(PARTS)[np.array([0, bad])]


def test_one_part_is_itself_and_all_empty_parts_read_as_empty():
    assert concat_rows([PARTS[0]]) is PARTS[0]
    assert isinstance(concat_rows(PARTS), ConcatRows)
    empty = ConcatRows([np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)])
    assert len(empty) == 0 and empty.shape == (0, 2) and empty[0:5].shape == (0, 2)
    assert empty[np.zeros(0, np.int64)].shape == (0, 2)


def test_concat_rows_type_facts():
    rows = ConcatRows(PARTS)
    assert rows.ndim == 2 and np.asarray(rows).dtype == np.float32  # no dtype asked: the parts' own
    one = ConcatRows([np.zeros((0, 2), np.float32), PARTS[0]])  # the empty part dropped: one part left
    assert one.shape == (3, 2) and one.dtype == np.float32
    np.testing.assert_array_equal(one[np.array([2, 0])], PARTS[0][[2, 0]])
    mixed = ConcatRows([PARTS[0].astype(np.float16), PARTS[2]])
    assert mixed.dtype == np.float16  # the first part's dtype names the rows'
    segment = Segment("segments/00001", 5, 4)
    assert hash(segment) == hash(Segment("segments/00001", 5, 4))  # frozen: hashable, a value
    with pytest.raises(AttributeError):
        segment.count = 5


def test_the_segment_format_is_version_5():
    from img2prompt.index.layout import SEGMENT_FORMAT_VERSION

    assert SEGMENT_FORMAT_VERSION == 5  # docs/index-format.md: readers before 5 refuse an index with segments


def test_a_slice_inside_one_part_is_a_view_and_steps_are_honoured():
    rows = ConcatRows(PARTS)
    assert np.shares_memory(rows[3:4], PARTS[2]) and np.shares_memory(rows[4:8], PARTS[3])  # no copy
    for key in (slice(1, 8, 2), slice(0, 8, 3), slice(7, 0, -2)):
        np.testing.assert_array_equal(np.asarray(rows[key]), WHOLE[key])
    mixed = ConcatRows([PARTS[0].astype(np.float16), PARTS[2]])
    assert mixed[np.zeros(0, np.int64)].dtype == np.float16  # no rows: still the rows' dtype
