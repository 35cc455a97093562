"""--pairs tables on a store (issue #23): relative `image` paths resolve against the table's URL, absolute URLs
are taken as given, images are read through fsspec, and skips count exactly as for a local table."""
from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import uuid
from pathlib import Path

import pytest

from conftest import DATA, read_data_prompts
from img2prompt import storage
from img2prompt.build_index.corpus import CorpusReport
from img2prompt.build_index.pairs import SKIP_UNREADABLE_IMAGE, image_location, iter_pairs, path_key
from img2prompt.index.layout import CLIP_VECTORS, MANIFEST, MINILM, PROMPTS

fsspec = pytest.importorskip("fsspec")

IMAGES = sorted((DATA / "images").glob("*.png"))
PROMPTS_OF = read_data_prompts(120)[100:107]
SKIPS = {"duplicate_image": 1, SKIP_UNREADABLE_IMAGE: 2}


def rows(absolute: str) -> list[tuple[str, str]]:
    """Seven rows: four usable images (one named by an absolute path or URL), one repeat spelled with `..`,
    one missing, one undecodable."""
    images = ["img/0.png", "img/1.png", "img/../img/0.png", "img/missing.png", "img/broken.png", absolute,
              "img/3.png"]
    return list(zip(images, PROMPTS_OF))


def write_tree(put, absolute: str) -> None:
    """The table and its images through `put(relative name, bytes)`; image 2 lives elsewhere (`absolute`)."""
    import pandas as pd

    for number in (0, 1, 3):
        put(f"img/{number}.png", IMAGES[number].read_bytes())
    put("img/broken.png", b"not an image")
    put("pairs.csv", pd.DataFrame(rows(absolute), columns=["image", "prompt"]).to_csv(index=False).encode())


def local_tree(folder: Path) -> Path:
    other = folder / "elsewhere"
    other.mkdir(parents=True)
    shutil.copy(IMAGES[2], other / "2.png")

    def put(name: str, data: bytes) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)

    write_tree(put, str(other / "2.png"))
    return folder / "pairs.csv"


def build(pairs: str, out: Path, clip_dir: Path):
    from img2prompt.build_index.runner import BuildOptions, run_build

    return run_build(BuildOptions(corpus=[], pairs=[pairs], out=str(out), clip_model=str(clip_dir), shard_size=64,
                                  batch_size=8, device="cpu", progress=False))


@pytest.fixture(scope="module")
def local_pairs_index(tmp_path_factory, tiny_clip_dir) -> Path:
    folder = tmp_path_factory.mktemp("pairs-local")
    out = folder / "idx"
    build(str(local_tree(folder / "tree")), out, tiny_clip_dir)
    return out


def assert_same_index(ours: Path, reference: Path) -> None:
    for name in (CLIP_VECTORS, MINILM, PROMPTS):
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name
    mine, theirs = (json.loads((folder / MANIFEST).read_text())["corpus"]["pairs"] for folder in (ours, reference))
    assert {**mine, "files": None} == {**theirs, "files": None}
    assert (mine["read"], mine["kept"], mine["skipped"]) == (7, 4, SKIPS)


def test_join_folds_dots_and_keeps_the_host():
    assert storage.join("memory://a/b", "../c.png") == "memory://a/c.png"
    assert storage.join("s3://bucket/x/y", "img/./1.png") == "s3://bucket/x/y/img/1.png"
    assert storage.join("s3://bucket/x/y", "/top.png") == "s3://bucket/top.png"  # the store's root, same bucket
    assert storage.join("http://127.0.0.1:8/p/q?sig=1", "i.png") == "http://127.0.0.1:8/p/q/i.png"
    assert storage.join("file:///tmp/x", "y.png") == "file:///tmp/x/y.png"
    assert storage.parent("https://h/a/pairs.csv?sig=1") == "https://h/a"


def test_image_locations_and_keys_for_url_tables(tmp_path):
    assert image_location("memory://t/data", "img/../img/a.png") == "memory://t/data/img/a.png"
    assert image_location("memory://t/data", "s3://other/b.png") == "s3://other/b.png"  # an absolute URL as given
    assert image_location(tmp_path, "s3://other/b.png") == "s3://other/b.png"  # in a local table too
    assert image_location(tmp_path, "a.png") == str(tmp_path / "a.png")
    assert path_key("memory://t/data/img/a.png") == path_key(image_location("memory://t/data", "img/./a.png"))
    assert path_key("memory://t/data/img/a.png") != path_key("memory://t/data/img/A.png")


def test_pairs_table_on_memory_url_builds_the_local_index(tmp_path, tiny_clip_dir, local_pairs_index):
    root = f"memory://pairs-{uuid.uuid4().hex}"

    def put(name: str, data: bytes) -> None:
        with fsspec.open(f"{root}/tree/{name}", "wb") as handle:
            handle.write(data)

    with fsspec.open(f"{root}/elsewhere/2.png", "wb") as handle:
        handle.write(IMAGES[2].read_bytes())
    write_tree(put, f"{root}/elsewhere/2.png")
    report = CorpusReport()
    found = list(iter_pairs([storage.as_path(f"{root}/tree/pairs.csv")], report))
    assert [image for image, _ in found] == [f"{root}/tree/img/0.png", f"{root}/tree/img/1.png",
                                            f"{root}/tree/img/missing.png", f"{root}/tree/img/broken.png",
                                            f"{root}/elsewhere/2.png", f"{root}/tree/img/3.png"]
    assert dict(report.skipped) == {"duplicate_image": 1}
    out = tmp_path / "idx"
    result = build(f"{root}/tree/pairs.csv", out, tiny_clip_dir)
    assert result.report["pairs"]["skipped"] == SKIPS  # the missing object is unreadable, not a crash
    assert_same_index(out, local_pairs_index)


def test_pairs_table_over_http_from_a_loopback_server(tmp_path, tiny_clip_dir, local_pairs_index):
    """http:// on 127.0.0.1: the table and its images by GET, a missing image a 404."""
    pytest.importorskip("aiohttp")
    tree = tmp_path / "served"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tree))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        tree.mkdir()
        (tree / "elsewhere").mkdir()
        shutil.copy(IMAGES[2], tree / "elsewhere" / "2.png")

        def put(name: str, data: bytes) -> None:
            (tree / "t" / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / "t" / name).write_bytes(data)

        write_tree(put, f"{base}/elsewhere/2.png")
        out = tmp_path / "idx"
        build(f"{base}/t/pairs.csv", out, tiny_clip_dir)
        assert_same_index(out, local_pairs_index)
    finally:
        server.shutdown()
        server.server_close()


def test_a_url_image_in_a_local_table_without_its_backend_is_one_line(tmp_path):
    import pandas as pd

    from img2prompt.errors import UserError

    table = tmp_path / "pairs.csv"
    pd.DataFrame([("nosuchproto://x/a.png", "a prompt")], columns=["image", "prompt"]).to_csv(table, index=False)
    with pytest.raises(UserError, match="no usable fsspec backend for nosuchproto://"):
        list(iter_pairs([table]))
