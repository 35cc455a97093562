"""Property-based tests (hypothesis): the corpus readers and the image loader on arbitrary input never
crash with anything but their own one-line errors, and their counts always add up."""
from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from img2prompt.build_index.corpus import CorpusReport, iter_prompts
from img2prompt.encoders.prompts import dedup_key, normalise_prompt
from img2prompt.errors import UserError
from img2prompt.encoders.images import ImageDecodeError, load_image

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def read_all(path: Path, column: str = "prompt", max_chars: int = 60):
    report = CorpusReport()
    return list(iter_prompts([path], column, report, max_chars)), report


def check_invariants(prompts: list[str], report: CorpusReport, max_chars: int = 60) -> None:
    assert report.read == report.kept + sum(report.skipped.values())
    assert report.kept == len(prompts)
    assert len({dedup_key(p) for p in prompts}) == len(prompts)  # deduplicated
    for prompt in prompts:
        assert prompt and prompt == normalise_prompt(prompt) and len(prompt) <= max_chars and "\x00" not in prompt


@FAST
@given(st.lists(st.text(max_size=80), max_size=30))
def test_text_files_of_any_lines(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "corpus.txt"
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
        try:
            prompts, report = read_all(path)
        except UserError:
            return  # a one-line refusal (e.g. CR-only line ends) is an allowed outcome
        check_invariants(prompts, report)
        wanted = []
        for number, line in enumerate("\n".join(lines).encode("utf-8", "surrogatepass").split(b"\n")):
            if number == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a leading byte-order mark is not part of the first prompt
            try:
                text = normalise_prompt(line.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            if text and len(text) <= 60 and "\x00" not in line.decode("utf-8") and \
                    dedup_key(text) not in {dedup_key(w) for w in wanted}:
                wanted.append(text)
        if b"\r" not in "\n".join(lines).encode("utf-8", "surrogatepass"):
            assert prompts == wanted  # exactly the valid, normalised, first-seen lines, in order


@FAST
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60), min_size=1, max_size=25),
       st.sampled_from([".csv", ".tsv", ".parquet"]))
def test_tables_of_any_strings(values, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"corpus{suffix}"
        frame = pd.DataFrame({"prompt": values, "other": range(len(values))})
        if suffix == ".parquet":
            frame.to_parquet(path)
        else:
            frame.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
        try:
            prompts, report = read_all(path)
        except UserError:
            return
        check_invariants(prompts, report)
        # TSV has no quoting: tabs or newlines inside values split rows by design; pandas writes a bare CR
        # unquoted, which CSV readers (pandas' own) take as a line break: such files are not valid CSV.
        if suffix == ".parquet" or (suffix == ".csv" and not any("\r" in v for v in values)):
            kept = {dedup_key(normalise_prompt(v)) for v in values if normalise_prompt(v) and len(normalise_prompt(v)) <= 60
                    and "\x00" not in v}
            assert {dedup_key(p) for p in prompts} <= kept


@FAST
@given(st.binary(max_size=2048))
def test_image_loader_on_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.png"
        path.write_bytes(data)
        try:
            image = load_image(path)
        except ImageDecodeError as error:
            assert str(error)
            return
        assert image.mode == "RGB"


@FAST
@given(st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F"]),
       st.integers(1, 40), st.integers(1, 40), st.sampled_from(["PNG", "TIFF", "WEBP", "JPEG"]))
def test_image_loader_on_any_mode_and_format(mode, width, height, file_format):
    from PIL import Image

    assume(max(width, height) <= 20 * min(width, height))  # more elongated shapes are refused on purpose

    image = Image.new(mode, (width, height))
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=file_format)
    except (OSError, KeyError, ValueError):
        return  # that format cannot hold that mode: nothing to load
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.png"
        path.write_bytes(buffer.getvalue())
        if file_format == "TIFF":  # not a format we take: refused by name before decoding
            with pytest.raises(ImageDecodeError, match="TIFF"):
                load_image(path)
            return
        loaded = load_image(path)  # a format we take loads whatever its mode: no early return on an error
        assert loaded.mode == "RGB" and loaded.size in {(width, height), (height, width)}


# ---------------------------------------------------------------------------------------------- manifest fuzz

JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10 ** 6) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


def _field_paths(node, prefix=()) -> list[tuple]:
    """Every field of a manifest (files' records and the build's resume key aside), as key paths."""
    paths = []
    if isinstance(node, dict):
        for key, value in node.items():
            if prefix == () and key in ("files", "build"):
                continue
            paths.append(prefix + (key,))
            paths += _field_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for position, value in enumerate(node[:2]):
            paths.append(prefix + (position,))
            paths += _field_paths(value, prefix + (position,))
    return paths


def _set(manifest: dict, path: tuple, value) -> None:
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _read_like_the_commands(root: Path) -> None:
    """What add, merge and the readers take from a manifest, after the schema let it through: the types they
    use it as (a wrong type here is a field the schema misses)."""
    from img2prompt.build_index.add import check_index, manifest_clip_models
    from img2prompt.index.reader import open_index

    manifest = check_index(root)
    clips = manifest_clip_models(manifest)
    assert all(isinstance(name, str) for name in clips["clip_model"])
    assert all(p is None or isinstance(p, str) for p in clips["clip_pretrained"])
    history = manifest.get("history", [])
    assert isinstance(history, list) and all(isinstance(entry, dict) for entry in history)
    options = manifest.get("build_options", {})
    seed, memory = options.get("seed", 0), options.get("max_memory")
    assert isinstance(seed, int) and seed >= 0 and (memory is None or isinstance(memory, int) and memory > 0)
    min_count = (manifest.get("phrases") or {}).get("min_count", 5)
    assert isinstance(min_count, int) and min_count >= 1
    for key_range in (index := open_index(root)).key_ranges:
        before = (key_range.plan.get("recall_at_10") or {}).get("recall")
        assert before is None or 0 <= before <= 1
    assert isinstance(index.calibration, dict) and index.key_dim >= 1
    assert isinstance(manifest.get("calibration", {}).get("seed", 0), int)


@pytest.fixture(scope="module")
def fuzz_index(built_index, tmp_path_factory):
    import shutil

    return Path(shutil.copytree(built_index, tmp_path_factory.mktemp("fuzz") / "idx"))


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_fuzzed_manifest_is_read_right_or_refused_in_one_line(fuzz_index, data):
    import json

    original = (fuzz_index / "manifest.json").read_text()
    manifest = json.loads(original)
    paths = _field_paths(manifest)
    for path in data.draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique=True)):
        try:
            _set(manifest, path, data.draw(JSON))
        except (KeyError, IndexError, TypeError):  # an earlier change removed this field's parent
            pass
    (fuzz_index / "manifest.json").write_text(json.dumps(manifest))
    try:
        _read_like_the_commands(fuzz_index)
    except UserError as exc:
        assert "\n" not in str(exc)
    finally:
        (fuzz_index / "manifest.json").write_text(original)
