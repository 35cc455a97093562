"""Corpus reading: formats, normalisation, dedup, and hostile input skipped and counted per reason."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from img2prompt.build_index.corpus import CorpusReport, expand_corpus_paths, iter_prompts
from img2prompt.errors import UserError


def read(paths, column="prompt", max_chars=4000):
    report = CorpusReport()
    prompts = list(iter_prompts([*paths], column, report, max_chars))
    return prompts, report


def test_normalise_and_dedup_across_files(tmp_path):
    (tmp_path / "a.txt").write_text("a  red\tfox\n\nA Red Fox\nblue bird\n", encoding="utf-8")
    pd.DataFrame({"prompt": ["blue   bird", "green frog", ""], "other": [1, 2, 3]}).to_csv(tmp_path / "b.csv", index=False)
    prompts, report = read([tmp_path / "a.txt", tmp_path / "b.csv"])
    assert prompts == ["a red fox", "blue bird", "green frog"]
    assert (report.read, report.kept) == (7, 3)
    assert dict(report.skipped) == {"empty": 2, "duplicate": 2}


def test_tsv_and_parquet_with_nulls(tmp_path):
    pd.DataFrame({"text": ["one", "two"]}).to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    pq.write_table(pa.table({"text": pa.array(["three", None, "one"])}), tmp_path / "b.parquet")
    prompts, report = read([tmp_path / "a.tsv", tmp_path / "b.parquet"], column="text")
    assert prompts == ["one", "two", "three"]
    assert dict(report.skipped) == {"null": 1, "duplicate": 1}


def test_missing_column_names_file_and_columns(tmp_path):
    pd.DataFrame({"caption": ["x"], "id": [1]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(UserError, match=r"c\.csv: no column 'prompt'; its columns are 'caption', 'id'"):
        read([tmp_path / "c.csv"])
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match=r"d\.parquet: no column 'prompt'; its columns are 'caption'"):
        read([tmp_path / "d.parquet"])


def test_hostile_text_file(tmp_path):
    data = (b"\xef\xbb\xbffirst prompt\r\n"      # BOM + CRLF
            b"bad \xff\xfe bytes\n"               # not UTF-8
            b"nul\x00inside\n"                    # NUL byte
            + b"x" * 100_000 + b"\n"              # very long line
            b"caf\xc3\xa9 au lait\r\n"            # valid UTF-8, CRLF
            b"first prompt\n")                    # duplicate after BOM removal
    (tmp_path / "h.txt").write_bytes(data)
    (tmp_path / "empty.txt").write_bytes(b"")
    prompts, report = read([tmp_path / "h.txt", tmp_path / "empty.txt"])
    assert prompts == ["first prompt", "café au lait"]
    assert report.read == 6
    assert dict(report.skipped) == {"invalid_utf8": 1, "nul_byte": 1, "too_long": 1, "duplicate": 1}


def test_invalid_utf8_in_csv_is_counted(tmp_path):
    (tmp_path / "x.csv").write_bytes(b"prompt\ngood one\nbad \xff one\n")
    prompts, report = read([tmp_path / "x.csv"])
    assert prompts == ["good one"] and report.skipped["invalid_utf8"] == 1


def test_millions_of_duplicates_keep_one(tmp_path):
    (tmp_path / "d.txt").write_text("same prompt\n" * 200_000 + "other\n", encoding="utf-8")
    prompts, report = read([tmp_path / "d.txt"])
    assert prompts == ["same prompt", "other"]
    assert report.skipped["duplicate"] == 199_999


def test_globs_sorted_and_bad_paths(tmp_path):
    for name in ("b.txt", "a.txt"):
        (tmp_path / name).write_text(name + "\n")
    assert [p.name for p in expand_corpus_paths([str(tmp_path / "*.txt")])] == ["a.txt", "b.txt"]
    with pytest.raises(UserError, match="matched no file"):
        expand_corpus_paths([str(tmp_path / "*.csv")])
    with pytest.raises(UserError, match="corpus file not found"):
        expand_corpus_paths([str(tmp_path / "missing.txt")])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(UserError, match="unsupported corpus format '.json'"):
        expand_corpus_paths([str(tmp_path / "x.json")])


def test_row_count_for_the_progress_total(tmp_path):
    """The build's bar has a total (and so an ETA): rows counted cheaply before reading."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from img2prompt.build_index.corpus import count_rows

    text = tmp_path / "a.txt"
    text.write_text("one\ntwo\n\nthree")  # last line without newline; a blank line is a row too
    table = tmp_path / "b.csv"
    table.write_text("prompt\nx\ny\n")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"prompt": ["p", "q", None]}), parquet)
    assert count_rows([text]) == 4 and count_rows([table]) == 2 and count_rows([parquet]) == 3
    assert count_rows([text, table, parquet]) == 9


def test_error_reasons_are_cut_at_a_word_boundary():
    from img2prompt.errors import short_reason

    reason = short_reason(ValueError("alpha beta gamma delta epsilon\nsecond line"), limit=20)
    assert reason == "alpha beta gamma…"
    assert short_reason(ValueError("short")) == "short"


def test_tsv_fields_starting_with_a_quote_are_text(tmp_path):
    """PartiPrompts-style TSV: a leading '"' is part of the prompt, and the rows after it survive."""
    path = tmp_path / "p.tsv"
    path.write_text('Prompt\tCategory\n"G I G G L E" painted in thick paint\tArt\nsecond\tA\nthird "q\tB\n'
                    'fourth\tC\nfifth\tD\n', encoding="utf-8")
    prompts, report = read([path], column="Prompt")
    assert prompts == ['"G I G G L E" painted in thick paint', "second", 'third "q', "fourth", "fifth"]
    assert (report.read, report.kept) == (5, 5)


def test_parquet_column_types(tmp_path):
    binary = tmp_path / "b.parquet"
    pq.write_table(pa.table({"prompt": pa.array([b"valid bytes", b"\xff\xfe bad", None], pa.binary())}), binary)
    prompts, report = read([binary])
    assert prompts == ["valid bytes"] and dict(report.skipped) == {"invalid_utf8": 1, "null": 1}
    for values, kind in (([1, 2], "int64"), ([["a", "b"]], "list<element: string>")):
        path = tmp_path / f"{kind[:4]}.parquet"
        pq.write_table(pa.table({"prompt": values}), path)
        with pytest.raises(UserError, match=rf"column 'prompt' holds {kind}, not text"):
            read([path])


def test_text_encodings_that_would_silently_garble(tmp_path):
    utf16 = tmp_path / "u16.txt"
    utf16.write_text("a red fox\nblue bird\n", encoding="utf-16")
    with pytest.raises(UserError, match="looks like UTF-16 or UTF-32 text; save it as UTF-8"):
        read([utf16])
    cr_only = tmp_path / "mac.txt"
    cr_only.write_bytes(b"a red fox\rblue bird\rgreen frog\r")
    with pytest.raises(UserError, match="lines end in CR only"):
        read([cr_only])
    crlf = tmp_path / "dos.txt"
    crlf.write_bytes(b"a red fox\r\nblue bird\r\n")
    assert read([crlf])[0] == ["a red fox", "blue bird"]


def test_blank_csv_and_damaged_parquet(tmp_path):
    blank = tmp_path / "blank.csv"
    blank.write_text("\n\n\n")
    assert read([blank])[0] == []
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": [f"prompt number {i}" for i in range(2000)]}), good)
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"bad\.parquet: (parquet data is damaged|not a readable parquet file)"):
        read([tmp_path / "bad.parquet"])


def test_progress_in_a_log_is_sparse(monkeypatch):
    """Outside a terminal the bar writes a plain line at most every 30 s, not a redraw per update."""
    import io

    from img2prompt import progress

    stream = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    with progress.progress_bar(total=1000, desc="encode") as bar:
        for _ in range(100):
            bar.update(10)
    assert bar.mininterval == progress.LOG_INTERVAL_S == 30.0
    assert stream.getvalue().count("encode") <= 3  # start, (at most one timed update), end


def test_dictionary_encoded_strings_are_text(tmp_path):
    """A pandas category column is written as dictionary<string>: read its values, nulls counted."""
    path = tmp_path / "cat.parquet"
    pd.DataFrame({"prompt": pd.Categorical(["a red fox", "blue bird", None, "a red fox"])}).to_parquet(path)
    assert pa.types.is_dictionary(pq.ParquetFile(path).schema_arrow.field("prompt").type)
    prompts, report = read([path])
    assert prompts == ["a red fox", "blue bird"]
    assert dict(report.skipped) == {"null": 1, "duplicate": 1}
    binary = tmp_path / "dictbin.parquet"
    pq.write_table(pa.table({"prompt": pa.array([b"green frog"], pa.binary()).dictionary_encode()}), binary)
    assert read([binary])[0] == ["green frog"]
    numbers = tmp_path / "dictint.parquet"
    pq.write_table(pa.table({"prompt": pa.array([1, 2]).dictionary_encode()}), numbers)
    with pytest.raises(UserError, match=r"holds int64, not text: choose the prompt column with --column"):
        read([numbers])
