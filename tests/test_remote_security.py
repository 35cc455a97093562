"""A remote index is untrusted input (issue #30 item 1): its whole manifest is checked before the first byte of
any other file is fetched, and every download lands inside the cache folder, over memory://, http:// and a
symlink left in the cache. Siblings: a shard record from a Ray worker, a URL-globbed --embeddings file name."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
import uuid
from pathlib import Path

import pytest

from img2prompt.errors import UserError

fsspec = pytest.importorskip("fsspec")

PAYLOAD = b"written by a hostile index\n"


def index_files(built_index: Path) -> list[str]:
    return list(json.loads((built_index / "manifest.json").read_text())["files"])


def hostile_manifest(built_index: Path, names: list[str]) -> bytes:
    """A real index's manifest plus entries whose names climb out of the folder (sizes and hashes honest)."""
    manifest = json.loads((built_index / "manifest.json").read_text())
    for name in names:
        manifest["files"][name] = {"bytes": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest()}
    return json.dumps(manifest).encode()


def assert_refused_and_nothing_written(url: str, outside: list[Path], capsys) -> None:
    from img2prompt.cli import main
    from img2prompt.index.remote import fetch

    with pytest.raises(UserError) as caught:
        fetch(url)
    for path in outside:
        assert not path.exists(), f"{path} was written by a hostile manifest"
    assert "\n" not in str(caught.value) and "not a path inside the index" in str(caught.value)
    assert main(["search", url, "--text", "a castle", "--k", "1", "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and url in err
    for path in outside:
        assert not path.exists(), f"{path} was written by a hostile manifest"


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_hostile_manifest_over_memory_writes_nothing_outside_the_cache(built_index, tmp_path, cache, capsys):
    url = f"memory://hostile-{uuid.uuid4().hex}/idx"
    climbing, absolute = "../../../../climbed.txt", str(tmp_path / "absolute.txt")
    for name in (climbing, absolute):  # the store serves the bytes under whatever key each name makes
        for key in (f"{url}/{name}", f"memory://{name.lstrip('/')}", f"memory://{name}"):
            with fsspec.open(key, "wb") as handle:
                handle.write(PAYLOAD)
    for name in index_files(built_index):
        with fsspec.open(f"{url}/{name}", "wb") as handle:
            handle.write((built_index / name).read_bytes())
    with fsspec.open(f"{url}/manifest.json", "wb") as handle:
        handle.write(hostile_manifest(built_index, [climbing, absolute]))
    assert_refused_and_nothing_written(url, [tmp_path / "climbed.txt", Path(absolute)], capsys)
    assert not [path for path in cache.rglob("*") if path.is_file()]  # validated before any fetch


def test_a_hostile_manifest_over_http_writes_nothing_outside_the_cache(built_index, tmp_path, cache, capsys):
    pytest.importorskip("aiohttp")
    served = tmp_path / "served"
    (served / "idx").mkdir(parents=True)
    for name in index_files(built_index):
        (served / "idx" / name).parent.mkdir(parents=True, exist_ok=True)
        (served / "idx" / name).write_bytes((built_index / name).read_bytes())
    victim = tmp_path / "victim"
    victim.mkdir()
    climbing, absolute = "../../../../victim/climbed.txt", str(victim / "absolute.txt")
    (served / "victim").mkdir()
    for where in (served / "climbed.txt", served / "victim" / "climbed.txt", served / "absolute.txt",
                  served / absolute.lstrip("/")):
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(PAYLOAD)
    (served / "idx" / "manifest.json").write_bytes(hostile_manifest(built_index, [climbing, absolute]))
    handler = functools.partial(Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/idx"
        assert_refused_and_nothing_written(url, [tmp_path.parent / "victim" / "climbed.txt",
                                                 victim / "climbed.txt", Path(absolute)], capsys)
    finally:
        server.shutdown()
        server.server_close()


def test_a_symlink_in_the_cache_pointing_outside_is_never_written_through(built_index, tmp_path, cache):
    from img2prompt.index.remote import fetch, publish

    url = f"memory://symlinked-{uuid.uuid4().hex}/idx"
    publish(built_index, url)
    local = fetch(url)
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"the user's own file")
    (local / "prompts.parquet").unlink()
    (local / "prompts.parquet").symlink_to(outside)
    with pytest.raises(UserError, match=r"'prompts.parquet' resolves outside the cache folder") as caught:
        fetch(url)
    assert "\n" not in str(caught.value) and outside.read_bytes() == b"the user's own file"


@pytest.mark.parametrize("generation", ["../../up", "/abs", "gen-x/../..", 5])
def test_a_manifest_naming_a_bad_generation_prefix_is_refused(built_index, cache, generation):
    from img2prompt.index.remote import fetch

    url = f"memory://badgen-{uuid.uuid4().hex}/idx"
    manifest = json.loads((built_index / "manifest.json").read_text())
    with fsspec.open(f"{url}/manifest.json", "wb") as handle:
        handle.write(json.dumps({**manifest, "generation": generation}).encode())
    with pytest.raises(UserError, match="manifest is damaged .*generation"):
        fetch(url)
    assert not list(cache.rglob("*.parquet"))
