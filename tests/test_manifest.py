"""The manifest's schema, checked when an index opens: every damaged field is one line naming it and
"rebuild the index" (never a KeyError, a numpy ufunc error or a silently wrong search); damaged side files
likewise. Formats 1 and 2 still open."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from img2prompt.errors import UserError
from img2prompt.index.reader import open_index


@pytest.fixture
def copy(built_index, tmp_path):
    return shutil.copytree(built_index, tmp_path / "copy")


def edit(root, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def refused(root, field: str, verify: bool = False) -> str:
    with pytest.raises(UserError) as caught:
        open_index(root, verify=verify)
    message = str(caught.value)
    assert "\n" not in message and message.endswith("rebuild the index"), message
    assert field in message, message
    return message


def set_path(manifest: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = manifest
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


# ---------------------------------------------------------------------------------------------- kind

@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("path, field", [("search.kind", "search.kind 'bogus'"),
                                         ("key_ranges.0.search.kind", "key_ranges[0].search.kind 'bogus'")])
def test_unknown_search_kind(copy, path, field, verify):
    edit(copy, lambda m: set_path(m, path, "bogus"))
    refused(copy, field, verify)


def test_unknown_search_kind_is_one_line_in_the_cli(copy):
    from conftest import run_cli

    edit(copy, lambda m: set_path(m, "search.kind", "bogus"))
    result = run_cli("search", copy, "--text", "a castle", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "manifest is damaged (missing or invalid: search.kind 'bogus'): rebuild the index" in \
        result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("path, value, field", [
    ("key_ranges.0.keys", "video", "key_ranges[0].keys 'video'"),
    ("search.params", [1, 2], "search.params list"),
    ("search", "flat", "search"),
])
def test_other_kinds_and_sections(copy, path, value, field):
    edit(copy, lambda m: set_path(m, path, value))
    refused(copy, field)


# ---------------------------------------------------------------------------------------------- numbers

CALIBRATION = {"seed": 0, "maps": {"text": {"image": {"scale": 1.0, "offset": 0.0}},
                                   "image": {"image": {"scale": 0.5, "offset": -0.1}}}}


def test_a_valid_calibration_opens(copy):
    edit(copy, lambda m: m.update(calibration=CALIBRATION))
    assert open_index(copy).calibration["image"]["image"] == {"scale": 0.5, "offset": -0.1}


@pytest.mark.parametrize("path, value, field", [
    ("calibration.maps.text.image.scale", "1.0", "calibration.maps.text.image.scale '1.0'"),
    ("calibration.maps.image.image.offset", None, "calibration.maps.image.image.offset None"),
    ("calibration.maps.text.image.scale", True, "calibration.maps.text.image.scale True"),
    ("count", -1, "count -1"),
    ("count", True, "count True"),
    ("count", 160.0, "count 160.0"),
    ("models.clip.dim", 0, "models.clip"),
    ("models.text.sha256", "", "models.text"),
    ("regression.lam", "x", "regression.lam 'x'"),
    ("regression.key_dim", -64, "regression.key_dim -64"),
    ("phrases.count", "10", "phrases.count '10'"),
    ("files.clip.f16.bytes", -2, "files.clip.f16.bytes -2"),
    ("files.clip.f16.sha256", "abc", "files.clip.f16.sha256 'abc'"),
])
def test_numbers(copy, path, value, field):
    def change(manifest):
        manifest["calibration"] = json.loads(json.dumps(CALIBRATION))
        if path.startswith("files."):  # file names hold dots
            name, _, key = path[len("files."):].rpartition(".")
            manifest["files"][name][key] = value
        else:
            set_path(manifest, path, value)

    edit(copy, change)
    refused(copy, field)


def test_calibration_strings_never_reach_numpy_in_a_search(copy, tiny_clip_dir):
    """The hostile tester's case: the manifest opened, and the first search died in a numpy ufunc."""
    from img2prompt.query.session import ModelOverrides, open_session

    edit(copy, lambda m: m.update(calibration={"maps": {"text": {"image": {"scale": "big", "offset": "0"}}}}))
    with pytest.raises(UserError, match=r"calibration\.maps\.text\.image\.scale 'big'.*offset '0'"):
        open_session(str(copy), ModelOverrides(), "cpu")


# ---------------------------------------------------------------------------------------------- ranges

@pytest.mark.parametrize("ranges, field", [
    ([[0, 170]], r"key_ranges\[0\]\.rows \[0, 170\] \(expected rows from 0 to at most the 160 prompts\)"),
    ([[0, 150]], r"key_ranges \(cover rows 0–150, the index has 160 prompts\)"),
    ([[10, 160]], r"key_ranges\[0\]\.rows \[10, 160\]"),
    ([[0, 100], [90, 160]], r"key_ranges\[1\]\.rows \[90, 160\]"),  # overlapping
    ([[0, 100], [110, 160]], r"key_ranges\[1\]\.rows \[110, 160\]"),  # a gap
    ([[0, 0], [0, 160]], r"key_ranges\[0\]\.rows \[0, 0\]"),  # empty
    ([[0, "160"]], r"key_ranges\[0\]\.rows \[0, '160'\]"),
    ([[0]], r"key_ranges\[0\]\.rows \[0\]"),
])
def test_key_ranges_cover_the_rows_exactly(copy, ranges, field):
    def change(manifest):
        first = manifest["key_ranges"][0]
        kinds = ["text", "image"]
        manifest["key_ranges"] = [{**first, "keys": kinds[n], "rows": rows} for n, rows in enumerate(ranges)]

    edit(copy, change)
    with pytest.raises(UserError, match=field + r".*rebuild the index"):
        open_index(copy)


def test_two_ranges_that_cover_the_rows_open(copy):
    def change(manifest):
        first = manifest["key_ranges"][0]
        manifest["key_ranges"] = [{**first, "rows": [0, 100]}, {**first, "keys": "image", "rows": [100, 160]}]

    edit(copy, change)
    assert [(r.keys, r.start, r.stop) for r in open_index(copy).key_ranges] == [("text", 0, 100), ("image", 100, 160)]


@pytest.mark.parametrize("value, field", [([], "key_ranges list"), ({}, "key_ranges dict"),
                                          (["x"], "key_ranges[0] 'x'")])
def test_key_ranges_shape(copy, value, field):
    edit(copy, lambda m: m.update(key_ranges=value))
    refused(copy, field)


def test_a_kind_may_come_back_in_a_later_range(copy):
    """An index with image keys grown by add: text, image, then the add's text rows."""
    def change(manifest):
        first = manifest["key_ranges"][0]
        manifest["key_ranges"] = [{**first, "rows": [0, 80]}, {**first, "keys": "image", "rows": [80, 100]},
                                  {**first, "rows": [100, 160]}]

    edit(copy, change)
    assert [r.keys for r in open_index(copy).key_ranges] == ["text", "image", "text"]


def test_an_unknown_key_kind(copy):
    edit(copy, lambda m: m.update(key_ranges=[{**m["key_ranges"][0], "keys": "audio"}]))
    refused(copy, "key_ranges[0].keys 'audio'")


# ---------------------------------------------------------------------------------------------- maps

@pytest.mark.parametrize("change, field", [
    (lambda m: m.update(calibration={"maps": {"audio": {}}}), "calibration.maps.audio"),
    (lambda m: m.update(calibration={"maps": {"text": {"video": {"scale": 1, "offset": 0}}}}),
     "calibration.maps.text.video"),
    (lambda m: m.update(calibration={"maps": ["text"]}), "calibration.maps list"),
    (lambda m: m.update(calibration=[]), "calibration list"),
    (lambda m: m["files"].pop("minilm.f16"), "files.minilm.f16 (not listed)"),
    (lambda m: m["files"].pop("phrases.f16"), "files.phrases.f16 (not listed beside phrases.parquet)"),
    (lambda m: m["files"].update({"../elsewhere.f16": {"bytes": 1, "sha256": "0" * 64}}),
     "files name '../elsewhere.f16' (not a path inside the index)"),
    (lambda m: m["files"].update({"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}}),
     "files name '/etc/passwd'"),
    (lambda m: m["key_ranges"][0].update(folder="../other"), "key_ranges[0].folder '../other'"),
    (lambda m: m["regression"].update(rows={"text": "all"}), "regression.rows dict"),
    (lambda m: m.update(regression=None), "regression None"),
    (lambda m: m["models"]["clip"].update(members=[{"name": "a", "dim": 32}]),
     "models.clip.members (dims add up to 32, not 64)"),
    (lambda m: m["models"]["clip"].update(members=[{"dim": 64}]), "models.clip.members"),
])
def test_maps_and_lists(copy, change, field):
    edit(copy, change)
    refused(copy, field)


def test_several_problems_are_named_together(copy):
    edit(copy, lambda m: (m.update(count="many"), set_path(m, "search.kind", "bogus")))
    message = refused(copy, "count 'many'")
    assert "search.kind 'bogus'" in message


# ---------------------------------------------------------------------------------------------- side files

def flip(path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_header_byte_of_minilm_mean(built_index, tmp_path):
    """A flipped header byte fails in numpy's header parser (TokenError, SyntaxError, ValueError …): one line."""
    header = 128  # a float32 [384] .npy: magic, version, length, the header dict padded to 128 bytes
    outcomes = set()
    root = shutil.copytree(built_index, tmp_path / "copy")
    original = (root / "minilm_mean.npy").read_bytes()
    for position in range(header):
        (root / "minilm_mean.npy").write_bytes(original)
        flip(root / "minilm_mean.npy", position)
        try:
            open_index(root)
            outcomes.add("opened")
        except UserError as exc:
            assert str(exc).startswith(str(root / "minilm_mean.npy")) and "rebuild it" in str(exc), exc
            outcomes.add("refused")
    assert "refused" in outcomes


def test_token_error_in_the_npy_header(copy):
    data = bytearray((copy / "minilm_mean.npy").read_bytes())
    data[data.index(b"{")] ^= 0xFF  # the header dict's brace: tokenize.TokenError inside numpy's parser
    (copy / "minilm_mean.npy").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"minilm_mean\.npy: not readable .*the index is damaged, rebuild it"):
        open_index(copy)


def test_damaged_regression_head(built_index, tmp_path):
    """Bytes flipped in the zip's headers, the central directory and the data: BadZipFile, CRC errors … as
    one line when the index opens (no --verify)."""
    root = shutil.copytree(built_index, tmp_path / "copy")
    original = (root / "regression.npz").read_bytes()
    positions = [0, 2, 10, 30, 60, len(original) // 2, len(original) - 22, len(original) - 10, len(original) - 60]
    refusals = 0
    for position in positions:
        (root / "regression.npz").write_bytes(original)
        flip(root / "regression.npz", position)
        try:
            open_index(root)
        except UserError as exc:
            assert str(exc).startswith(str(root / "regression.npz")) and "rebuild it" in str(exc), exc
            refusals += 1
    assert refusals >= len(positions) // 2
    (root / "regression.npz").write_bytes(original)
    flip(root / "regression.npz", len(original) - 22)  # the end-of-central-directory signature: BadZipFile
    with pytest.raises(UserError, match=r"regression\.npz: not readable \(File is not a zip file\)"):
        open_index(root)


def test_damaged_phrases(copy):
    data = bytearray((copy / "phrases.parquet").read_bytes())
    data[-12:-4] = bytes(8)
    (copy / "phrases.parquet").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"phrases\.parquet: not readable .*rebuild it"):
        open_index(copy)


def test_phrase_count_disagrees(copy):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(copy / "phrases.parquet")
    pq.write_table(pa.table({"phrase": table.column("phrase").slice(1), "count": table.column("count").slice(1)}),
                   copy / "phrases.parquet")
    edit(copy, lambda m: m["files"]["phrases.parquet"].update(bytes=(copy / "phrases.parquet").stat().st_size))
    with pytest.raises(UserError, match=rf"phrases\.parquet: {len(table) - 1} phrases, the manifest says {len(table)}"):
        open_index(copy)


def test_prompt_column_of_the_wrong_type(copy):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": np.arange(160), "prompt": np.arange(160)}), copy / "prompts.parquet")
    edit(copy, lambda m: m["files"]["prompts.parquet"].update(bytes=(copy / "prompts.parquet").stat().st_size))
    with pytest.raises(UserError, match=r"prompts\.parquet: the prompt column holds int64, not text"):
        open_index(copy)


# ---------------------------------------------------------------------------------------------- old formats

def as_format_2(manifest: dict) -> None:
    manifest["format_version"] = 2
    manifest.pop("key_ranges")


def test_format_2_opens_as_one_text_range(copy):
    edit(copy, as_format_2)
    index = open_index(copy, verify=True)
    assert [(r.keys, r.start, r.stop, r.plan["kind"]) for r in index.key_ranges] == [("text", 0, 160, "flat")]
    assert index.prompt_rows([3, -1])[1] == ""


def test_format_1_opens_with_its_faiss_section_and_float32_copy(copy, tiny_clip_dir):
    """Format 1 named the backend section "faiss" and flat indexes kept a float32 clip.faiss (ignored)."""
    import faiss

    from img2prompt.index.layout import file_record
    from img2prompt.query.session import ModelOverrides, open_session

    index = open_index(copy)
    flat = faiss.IndexFlatIP(index.clip_dim)
    flat.add(np.asarray(index.clip_vectors, dtype=np.float32))
    faiss.write_index(flat, str(copy / "clip.faiss"))

    def change(manifest):
        as_format_2(manifest)
        manifest["format_version"] = 1
        manifest["faiss"] = manifest.pop("search")
        manifest["files"]["clip.faiss"] = file_record(copy / "clip.faiss")

    edit(copy, change)
    assert open_index(copy, verify=True).search_plan["kind"] == "flat"
    session = open_session(str(copy), ModelOverrides(), "cpu")
    found = session.retriever.search(np.asarray(session.index.clip_vectors[[5, 42]], dtype=np.float32), 3)
    assert found.ids[:, 0].tolist() == [5, 42]
    edit(copy, lambda m: set_path(m, "faiss.kind", "bogus"))
    refused(copy, "faiss.kind 'bogus'")


# ---------------------------------------------------------------------------------------------- what add/merge read

# Every manifest field a command reads beyond the reader's own (issue #30: add and merge read history,
# build_options, phrases.min_count, the models' names, the search's recall, …): each corrupted is the one-line
# schema error, when the index opens and when add or merge is asked to grow it, before any model loads.
READ_FIELDS = [
    ("history", 5, "history 5"),
    ("history", "abc", "history 'abc'"),  # was list("abc"): a history of three characters
    ("history", [1, 2], "history list"),
    ("build_options", [], "build_options list"),
    ("build_options.seed", "x", "build_options.seed 'x'"),
    ("build_options.seed", -1, "build_options.seed -1"),
    ("build_options.seed", 1.5, "build_options.seed 1.5"),
    ("build_options.max_memory", "lots", "build_options.max_memory 'lots'"),
    ("build_options.max_memory", 0, "build_options.max_memory 0"),
    ("phrases.min_count", "x", "phrases.min_count 'x'"),
    ("phrases.min_count", 0, "phrases.min_count 0"),
    ("models.clip.name", 5, "models.clip.name 5"),
    ("models.clip.name", None, "models.clip.name None"),
    ("models.clip.pretrained", 7, "models.clip.pretrained 7"),
    ("models.text.name", ["x"], "models.text.name list"),
    ("search.recall_at_10", "high", "search.recall_at_10 'high'"),
    ("search.recall_at_10.recall", "0.9", "search.recall_at_10.recall '0.9'"),
    ("key_ranges.0.search.recall_at_10.recall", 2.0, "key_ranges[0].search.recall_at_10.recall 2.0"),
    ("calibration", {"seed": "x", "maps": {}}, "calibration.seed 'x'"),
    ("calibration", {"fits": [], "maps": {}}, "calibration.fits list"),
    ("calibration", {"fits": {"image": 3}, "maps": {}}, "calibration.fits dict"),
    ("corpus", "x", "corpus 'x'"),
    ("near_dup", 5, "near_dup 5"),
    ("created_at", 5, "created_at 5"),
    ("metric", 5, "metric 5"),
    ("key_pca", "x", "key_pca 'x'"),
    ("key_pca", {"dims": 8, "key_dim": 32}, "key_pca.key_dim 32"),
    ("key_pca", {"dims": 8, "seed": "x"}, "key_pca.seed 'x'"),
    ("key_pca", {"dims": 8, "fit_rows": -1}, "key_pca.fit_rows -1"),
    ("key_pca", {"dims": 8, "recall_at_10": "1.0"}, "key_pca.recall_at_10 '1.0'"),
    ("key_pca", {"dims": 8, "recall_at_10": 1.5}, "key_pca.recall_at_10 1.5"),
]


@pytest.mark.parametrize("path, value, field", READ_FIELDS, ids=[f"{p}={v!r}" for p, v, _ in READ_FIELDS])
def test_every_field_a_command_reads_is_in_the_schema(copy, tmp_path, path, value, field):
    from img2prompt.build_index.add import AddOptions, run_add
    from img2prompt.build_index.merge import MergeOptions, run_merge

    edit(copy, lambda m: set_path(m, path, value))
    message = refused(copy, field)
    corpus = tmp_path / "new.txt"
    corpus.write_text("a new castle\n")
    for grow in (lambda: run_add(AddOptions(index=str(copy), corpus=[str(corpus)], device="cpu", progress=False)),
                 lambda: run_merge(MergeOptions(indexes=[str(copy), str(copy)], out=str(tmp_path / "merged"),
                                                device="cpu", progress=False))):
        with pytest.raises(UserError) as caught:
            grow()
        assert str(caught.value) == message


def test_a_corrupted_field_add_reads_is_one_line_from_the_cli(copy, tmp_path, capsys):
    from img2prompt.cli import main

    edit(copy, lambda m: m.update(history="abc"))
    corpus = tmp_path / "new.txt"
    corpus.write_text("a new castle\n")
    assert main(["add", str(copy), str(corpus), "-q", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "history 'abc'" in err and err.endswith("rebuild the index"), err


def test_the_fields_add_reads_still_open_when_valid(copy):
    edit(copy, lambda m: (m.update(history=[{"count": 1}]), set_path(m, "build_options.max_memory", 2 ** 30),
                          set_path(m, "phrases.min_count", 1), set_path(m, "models.clip.pretrained", "openai")))
    assert open_index(copy).count == 160
