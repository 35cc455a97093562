"""Boundaries of index/remote.py that its mutation pass (issue 35, docs/mutation.md) found unguarded: the size
AND the sha256 of EVERY fetched file are checked (a damaged file is refused and never left in the cache), a
file listed without sha256 is checked by size, a cached copy is re-fetched when its size or hash is off, the
manifest's size limit is inclusive, a fetch overtaken by publishes retries three times, and the stale
generations a publish deletes are those older than STALE_AFTER_S (strictly), never the kept or the replaced one.

Fast: a synthetic index (two small files) on memory://, with the manifest schema check (index/reader.py,
tested in test_manifest.py) stubbed out so no CLIP index is built."""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path

import fsspec
import pytest

from img2prompt.errors import UserError
from img2prompt.index import reader, remote
from img2prompt.index.layout import MANIFEST

FILES = {"clip.f16": b"\x01\x02" * 50, "prompts.txt": b"a castle\nthe sea at night\n"}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(reader, "check_manifest", lambda root, manifest: None)  # schema: test_manifest.py
    monkeypatch.setattr(remote, "_checked", set())


def _listed(data: bytes, sha: bool = True) -> dict:
    return {"bytes": len(data), **({"sha256": hashlib.sha256(data).hexdigest()} if sha else {})}


def _folder(tmp_path: Path, files=FILES, sha: bool = True) -> Path:
    folder = tmp_path / f"index-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    manifest = {"format_version": 4, "state": "complete", "files": {n: _listed(d, sha) for n, d in files.items()}}
    (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def _published(tmp_path: Path, **kwargs) -> tuple[str, dict]:
    url = f"memory://boundaries-{uuid.uuid4().hex}/idx"
    remote.publish(_folder(tmp_path, **kwargs), url)
    fs, root = remote.storage.filesystem(url)
    return url, json.loads(fs.cat_file(f"{root}/{MANIFEST}"))


def _overwrite(url: str, manifest: dict, name: str, data: bytes) -> None:
    fs, root = remote.storage.filesystem(url)
    fs.pipe_file(f"{root}/{manifest['generation']}/{name}", data)


def test_a_clean_fetch_copies_every_file_and_drops_the_generation(tmp_path):
    url, manifest = _published(tmp_path)
    local = remote.fetch(url)
    for name, data in FILES.items():
        assert (local / name).read_bytes() == data
    cached = json.loads((local / MANIFEST).read_text(encoding="utf-8"))
    assert "generation" not in cached and cached["files"] == manifest["files"]


@pytest.mark.parametrize("name", sorted(FILES))  # the first and the last listed file alike
@pytest.mark.parametrize("delta", [-1, 1])
def test_a_file_one_byte_off_in_size_is_refused_by_name(tmp_path, name, delta):
    url, manifest = _published(tmp_path)
    data = FILES[name]
    _overwrite(url, manifest, name, data[:-1] if delta < 0 else data + b"x")
    with pytest.raises(UserError) as caught:
        remote.fetch(url)
    assert str(caught.value) == f"{url}: {name} holds {len(data) + delta} bytes, {MANIFEST} lists {len(data)}"


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_file_of_the_right_size_with_one_byte_changed_is_refused_and_not_cached(tmp_path, name):
    url, manifest = _published(tmp_path)
    data = bytearray(FILES[name])
    data[-1] ^= 0xFF
    _overwrite(url, manifest, name, bytes(data))
    with pytest.raises(UserError, match=f"{name} does not match the size/sha256 in {MANIFEST}"):
        remote.fetch(url)
    caches = list((tmp_path / "cache" / "remote" / "index").iterdir())
    assert len(caches) == 1 and not (caches[0] / name).exists() and not (caches[0] / MANIFEST).exists()


def test_a_file_listed_without_sha256_is_checked_by_size_only(tmp_path):
    url, manifest = _published(tmp_path, sha=False)
    data = bytearray(FILES["clip.f16"])
    data[0] ^= 0xFF  # same size: nothing to compare the bytes with
    _overwrite(url, manifest, "clip.f16", bytes(data))
    assert (remote.fetch(url) / "clip.f16").read_bytes() == bytes(data)


def test_a_cached_copy_is_reused_only_while_its_size_and_hash_match(tmp_path, monkeypatch):
    url, _ = _published(tmp_path)
    local = remote.fetch(url)
    downloads = []
    real = remote._download
    monkeypatch.setattr(remote, "_download", lambda *a: (downloads.append(a[5]), real(*a)))
    assert remote.fetch(url) == local and downloads == []  # valid cached copy: nothing fetched
    # a new process (nothing checked yet): a same-size damaged copy is hashed, found off, fetched again
    monkeypatch.setattr(remote, "_checked", set())
    damaged = bytearray(FILES["prompts.txt"])
    damaged[0] ^= 0xFF
    (local / "prompts.txt").write_bytes(bytes(damaged))
    assert remote.fetch(url) == local and downloads == ["prompts.txt"]
    assert (local / "prompts.txt").read_bytes() == FILES["prompts.txt"]
    # hashed in this process already: sizes suffice, but a wrong size is fetched again
    (local / "clip.f16").write_bytes(FILES["clip.f16"][:-1])
    assert remote.fetch(url) == local and downloads == ["prompts.txt", "clip.f16"]
    assert (local / "clip.f16").read_bytes() == FILES["clip.f16"]
    # a cache without its manifest is not a complete copy: every invalid file is checked again
    (local / MANIFEST).unlink()
    assert remote.fetch(url) == local and (local / MANIFEST).is_file() and downloads == ["prompts.txt", "clip.f16"]


def test_valid_needs_the_listed_size_and_hash(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert remote._valid(path, _listed(b"abc"))
    assert remote._valid(path, _listed(b"abc", sha=False))
    assert not remote._valid(path, {"bytes": 3, "sha256": hashlib.sha256(b"abd").hexdigest()})
    assert not remote._valid(path, {"bytes": 4, "sha256": hashlib.sha256(b"abc").hexdigest()})
    assert not remote._valid(tmp_path / "missing", _listed(b"abc"))


def test_the_manifest_size_limit_is_inclusive(tmp_path, monkeypatch):
    url, manifest = _published(tmp_path)
    fs, root = remote.storage.filesystem(url)
    body = fs.cat_file(f"{root}/{MANIFEST}")
    monkeypatch.setattr(remote, "MANIFEST_LIMIT", len(body))
    assert remote.fetch(url).is_dir()  # exactly the limit: read
    monkeypatch.setattr(remote, "MANIFEST_LIMIT", len(body) - 1)
    with pytest.raises(UserError, match=f"larger than {len(body) - 1:,} bytes"):
        remote.fetch(url)


def test_a_missing_listed_file_is_one_line_naming_it(tmp_path):
    url, manifest = _published(tmp_path)
    fs, root = remote.storage.filesystem(url)
    fs.rm_file(f"{root}/{manifest['generation']}/prompts.txt")
    with pytest.raises(UserError, match=f"{url}: prompts.txt is listed in {MANIFEST} but missing from the store"):
        remote.fetch(url)


def test_a_fetch_overtaken_three_times_gives_up(monkeypatch):
    calls = []

    def overtaken(url):
        calls.append(url)
        raise remote._Republished

    monkeypatch.setattr(remote, "_fetch_once", overtaken)
    with pytest.raises(UserError, match="republished while it was being fetched, three times"):
        remote.fetch("memory://x")
    assert len(calls) == 3
    calls.clear()
    answers = iter([remote._Republished(), remote._Republished(), Path("/third")])

    def twice_then_done(url):
        calls.append(url)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(remote, "_fetch_once", twice_then_done)
    assert remote.fetch("memory://x") == Path("/third") and len(calls) == 3


def test_a_bad_generation_name_is_refused():
    fs = fsspec.filesystem("memory")
    root = f"/badgen-{uuid.uuid4().hex}"
    fs.pipe_file(f"{root}/{MANIFEST}", json.dumps({"files": {}, "generation": "../x"}).encode())
    with pytest.raises(UserError, match="invalid: generation '../x'"):
        remote.fetch(f"memory://{root}")


def test_stale_generations_are_those_strictly_older_than_a_day(monkeypatch):
    """Publish deletes the replaced generation and unreferenced ones older than STALE_AFTER_S; one exactly
    that old, a younger one (another publish in flight) and the new one stay."""
    fs = fsspec.filesystem("memory")
    root = f"/stale-{uuid.uuid4().hex}"
    now = 1_800_000_000.0
    monkeypatch.setattr(remote.time, "time", lambda: now)

    def name(age_s: float) -> str:
        return "gen-" + remote.time.strftime("%Y%m%dT%H%M%SZ", remote.time.gmtime(now - age_s)) + "-ab12"

    old_enough, exactly, young, keep, replaced = (name(remote.STALE_AFTER_S + 1), name(remote.STALE_AFTER_S),
                                                  name(60), name(0).replace("ab12", "cd34"), name(5))
    for gen in (old_enough, exactly, young, keep, replaced):
        fs.pipe_file(f"{root}/{gen}/clip.f16", b"x")
    assert remote._generation_age_s(exactly) == remote.STALE_AFTER_S
    remote._drop_stale(fs, root, keep, {"generation": replaced, "files": {"clip.f16": {}}})
    left = sorted(entry.rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False))
    assert left == sorted([exactly, young, keep])


def test_the_plain_files_of_an_index_published_before_generations_are_deleted_after_the_switch(tmp_path):
    fs = fsspec.filesystem("memory")
    root = f"/plain-{uuid.uuid4().hex}"
    for name, data in FILES.items():
        fs.pipe_file(f"{root}/{name}", data)
    old = {"files": {name: _listed(data) for name, data in FILES.items()}}
    fs.pipe_file(f"{root}/{MANIFEST}", json.dumps(old).encode())
    remote.publish(_folder(tmp_path), f"memory://{root}")
    manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    left = sorted(entry.rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False))
    assert left == sorted([MANIFEST, manifest["generation"]])
    assert remote.fetch(f"memory://{root}").joinpath("prompts.txt").read_bytes() == FILES["prompts.txt"]


def test_publish_to_a_file_url_twice_then_fetch(tmp_path):
    """A file:// target has folders: the generation's folder is made on the first PUT into it, an existing
    target folder is published over, the replaced generation is deleted, and the fetch reads the new files."""
    target = tmp_path / "store" / "idx"
    url = f"file://{target}"
    nested = {**FILES, "segments/00001/clip.f16": b"\x03" * 8}
    remote.publish(_folder(tmp_path, files=nested), url)
    first = json.loads((target / MANIFEST).read_text(encoding="utf-8"))["generation"]
    assert (target / first / "segments/00001/clip.f16").read_bytes() == b"\x03" * 8
    changed = {**nested, "prompts.txt": b"another prompt\n"}
    remote.publish(_folder(tmp_path, files=changed), url)
    second = json.loads((target / MANIFEST).read_text(encoding="utf-8"))["generation"]
    assert second != first and sorted(p.name for p in target.iterdir()) == sorted([MANIFEST, second])
    local = remote.fetch(url)
    assert {name: (local / name).read_bytes() for name in changed} == changed
    assert not list(tmp_path.glob("**/clip.f16/*"))  # no folder made from a file's name


def test_a_download_that_fails_midway_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    url, _ = _published(tmp_path)

    def dropped(fs, remote_path, handle):
        handle.write(b"\x01")
        raise ConnectionResetError("peer went away")

    monkeypatch.setattr(remote, "_copy_from", dropped)
    with pytest.raises(UserError) as caught:
        remote.fetch(url)
    message = str(caught.value)
    assert message.startswith(f"{url}: downloading clip.f16 failed (") and "peer went away" in message
    assert message.endswith("run again to retry (the files already fetched are kept)") and "\n" not in message
    cache = next((tmp_path / "cache" / "remote" / "index").iterdir())
    assert [p.name for p in cache.iterdir()] == []  # no partial file, no manifest


def test_a_generation_is_stale_after_exactly_one_day(monkeypatch):
    """The rule in words: a generation left a day ago (86 400 s) by a killed publish is deleted; younger
    ones may be a publish in flight."""
    assert remote.STALE_AFTER_S == 24 * 3600
    fs = fsspec.filesystem("memory")
    root = f"/day-{uuid.uuid4().hex}"
    now = 1_800_000_000.0
    monkeypatch.setattr(remote.time, "time", lambda: now)

    def name(age_s: float) -> str:
        return "gen-" + remote.time.strftime("%Y%m%dT%H%M%SZ", remote.time.gmtime(now - age_s)) + "-ab12"

    day_and_a_second, day_less_a_minute = name(86_401), name(86_340)
    for gen in (day_and_a_second, day_less_a_minute):
        fs.pipe_file(f"{root}/{gen}/clip.f16", b"x")
    remote._drop_stale(fs, root, "gen-keep", None)
    assert [entry.rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)] == [day_less_a_minute]


def test_files_of_the_wrong_size_are_fetched_again_even_all_at_once_in_the_same_process(tmp_path):
    url, _ = _published(tmp_path)
    local = remote.fetch(url)  # checked in this process: later fetches compare sizes only
    for name, data in FILES.items():
        (local / name).write_bytes(data + b"!")
    assert remote.fetch(url) == local
    assert {name: (local / name).read_bytes() for name in FILES} == FILES


def test_a_local_target_commits_the_manifest_by_rename(tmp_path, monkeypatch):
    renames = []
    real = remote.os.replace
    monkeypatch.setattr(remote.os, "replace", lambda src, dst: (renames.append((src, dst)), real(src, dst)))
    target = tmp_path / "store"
    remote.publish(_folder(tmp_path), f"file://{target}")
    assert len(renames) == 1 and renames[0][1] == str(target / MANIFEST) and renames[0][0].endswith(".tmp")
    assert not list(target.glob(".*.tmp"))
    renames.clear()
    remote.publish(_folder(tmp_path), f"memory://rename-{uuid.uuid4().hex}")  # an object store: one PUT
    assert renames == []


def test_a_file_deleted_by_a_republish_mid_download_is_fetched_from_the_new_index(tmp_path, monkeypatch):
    url, _ = _published(tmp_path)
    newer = {name: data[::-1] for name, data in FILES.items()}
    real = remote._copy_from
    calls = []

    def republished_meanwhile(fs, remote_path, handle):
        calls.append(remote_path)
        if len(calls) == 1:  # the first file vanishes: a newer publish replaced the index and dropped it
            remote.publish(_folder(tmp_path, files=newer), url)
            raise FileNotFoundError(remote_path)
        real(fs, remote_path, handle)

    monkeypatch.setattr(remote, "_copy_from", republished_meanwhile)
    local = remote.fetch(url)
    assert {name: (local / name).read_bytes() for name in FILES} == newer


def test_a_file_gone_mid_download_without_a_republish_is_one_line(tmp_path, monkeypatch):
    url, _ = _published(tmp_path)
    attempts = []

    def gone(fs, remote_path, handle):
        attempts.append(remote_path)
        raise FileNotFoundError(remote_path)

    monkeypatch.setattr(remote, "_copy_from", gone)
    with pytest.raises(UserError, match=r"downloading clip.f16 failed \(.*run again to retry"):
        remote.fetch(url)
    assert len(attempts) == 1  # not taken for a republish: no retry


def test_an_index_deleted_mid_fetch_is_not_an_index(tmp_path, monkeypatch):
    url, manifest = _published(tmp_path)
    fs, root = remote.storage.filesystem(url)
    real = remote._read_manifest

    def then_deleted(*args):
        answer = real(*args)
        if fs.exists(f"{root}/{MANIFEST}"):
            fs.rm(root, recursive=True)  # the whole index removed after its manifest was read
        return answer

    monkeypatch.setattr(remote, "_read_manifest", then_deleted)
    with pytest.raises(UserError, match=r"not an index \(no manifest.json; an upload that did not finish\?\)"):
        remote.fetch(url)


@pytest.mark.parametrize("name", ["../escape.bin", ".", "sub/../../escape.bin"])
def test_a_listed_name_outside_the_cache_is_refused_before_any_fetch(tmp_path, name):
    url, manifest = _published(tmp_path)
    fs, root = remote.storage.filesystem(url)
    manifest["files"][name] = _listed(b"evil")
    fs.pipe_file(f"{root}/{manifest['generation']}/{name}", b"evil")
    fs.pipe_file(f"{root}/{MANIFEST}", json.dumps(manifest).encode())
    with pytest.raises(UserError, match=f"file name '{re.escape(name)}' resolves outside the cache folder"):
        remote.fetch(url)
    assert not list(tmp_path.glob("**/escape.bin"))
    assert not list((tmp_path / "cache").glob("**/clip.f16"))  # nothing fetched at all


@pytest.mark.parametrize("body, message", [
    (None, r"not an index \(no manifest.json"),
    (b"{not json", "manifest.json: not valid JSON"),
    (b"[1, 2]", "manifest.json: holds a JSON list, not an object: not an index"),
])
def test_a_missing_or_unreadable_manifest_is_one_line(body, message):
    url = f"memory://manifest-{uuid.uuid4().hex}/idx"
    fs, root = remote.storage.filesystem(url)
    fs.pipe_file(f"{root}/other", b"x")
    if body is not None:
        fs.pipe_file(f"{root}/{MANIFEST}", body)
    with pytest.raises(UserError, match=message):
        remote.fetch(url)


@pytest.mark.slow  # two 64 MiB manifests parsed and hashed: 6.8 s on the loaded shared machine
def test_the_manifest_limit_is_64_mib_inclusive(tmp_path):
    url, manifest = _published(tmp_path)
    fs, root = remote.storage.filesystem(url)
    body = json.dumps(manifest).encode()
    fs.pipe_file(f"{root}/{MANIFEST}", body + b" " * ((64 << 20) - len(body)))  # exactly 64 MiB: JSON whitespace
    assert remote.fetch(url).is_dir()
    fs.pipe_file(f"{root}/{MANIFEST}", body + b" " * ((64 << 20) + 1 - len(body)))
    with pytest.raises(UserError, match="larger than 67,108,864 bytes: not an index manifest"):
        remote.fetch(url)


class _Listless:
    """A memory store whose listing fails as a store without listing does (or finds nothing)."""

    def __init__(self, fs, error) -> None:
        self.fs, self.error = fs, error

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def ls(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize("error", [NotImplementedError("no listing"), FileNotFoundError("gone")])
def test_publish_cleanup_survives_a_store_without_listing(error):
    fs = fsspec.filesystem("memory")
    root = f"/listless-{uuid.uuid4().hex}"
    fs.pipe_file(f"{root}/clip.f16", b"x")
    fs.pipe_file(f"{root}/gen-20200101T000000Z-ab/clip.f16", b"x")
    remote._drop_stale(_Listless(fs, error), root, "gen-new", {"files": {"clip.f16": {}}})
    assert not fs.exists(f"{root}/clip.f16")  # the replaced plain index's file: still deleted
    assert fs.exists(f"{root}/gen-20200101T000000Z-ab/clip.f16")  # unlisted: left for the next publish


def test_a_failed_delete_is_a_warning_not_an_error(caplog):
    fs = fsspec.filesystem("memory")
    root = f"/undeletable-{uuid.uuid4().hex}"
    fs.pipe_file(f"{root}/gen-20200101T000000Z-ab/clip.f16", b"x")

    class Stubborn(_Listless):
        def ls(self, *args, **kwargs):
            return self.fs.ls(*args, **kwargs)

        def rm(self, *args, **kwargs):
            raise PermissionError("read-only")

    with caplog.at_level("WARNING", logger="img2prompt.index.remote"):
        remote._drop_stale(Stubborn(fs, None), root, "gen-new", {"generation": "gen-20200101T000000Z-ab"})
    assert "could not delete the replaced index's file (read-only)" in caplog.text
