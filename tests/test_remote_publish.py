"""A publish killed at any point leaves a readable index (issue #30 item 2), on moto's S3 server on loopback:
the new files go under a fresh generation prefix and the manifest is switched last, so a reader with a cold
cache gets the complete old index or the complete new one, byte for byte, after a kill following any single
upload; `build --resume` then just publishes the finished staging folder. An index published by the earlier
code (plain names at the top of the prefix) still opens, and is cleaned away once replaced."""
from __future__ import annotations

import json
import shutil
import socket
import uuid
from pathlib import Path

import pytest

from img2prompt import storage
from img2prompt.errors import UserError

pytestmark = pytest.mark.slow  # an S3 server, two index builds
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")



class Killed(BaseException):
    """The process dying mid-publish (not an Exception: nothing may catch it)."""


@pytest.fixture
def s3(tmp_path, monkeypatch):
    import boto3
    import fsspec
    import fsspec.config

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "IMG2PROMPT_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    bucket = f"bucket-{uuid.uuid4().hex[:12]}"  # moto keeps its buckets across servers in one process
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    try:
        yield fsspec.filesystem("s3", skip_instance_cache=True), f"s3://{bucket}/idx"
    finally:
        server.stop()


def publish_legacy(fs, folder: Path, url: str) -> None:
    """What the earlier publish left: every listed file at the top of the prefix, then the manifest."""
    root = url.removeprefix("s3://")
    for name in json.loads((folder / "manifest.json").read_text())["files"]:
        fs.put_file(str(folder / name), f"{root}/{name}")
    fs.put_file(str(folder / "manifest.json"), f"{root}/manifest.json")


def cold_read(url: str, tmp_path: Path, monkeypatch, label: str) -> Path:
    """fetch + open with an empty cache of its own (what a reader on another machine does)."""
    from img2prompt.index.reader import open_index
    from img2prompt.index.remote import fetch

    with monkeypatch.context() as patch:
        patch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "readers" / label))
        local = fetch(url)
        open_index(local)
    return local


def same_index(local: Path, built: Path) -> bool:
    listed = json.loads((built / "manifest.json").read_text())
    if json.loads((local / "manifest.json").read_text()) != listed:
        return False
    return all((local / name).read_bytes() == (built / name).read_bytes() for name in listed["files"])


def small_corpus(corpus_file: Path, tmp_path: Path) -> Path:
    path = tmp_path / "small.txt"
    path.write_text("\n".join(corpus_file.read_text(encoding="utf-8").splitlines()[:90]) + "\n", encoding="utf-8")
    return path


def test_a_publish_killed_after_any_upload_leaves_the_old_or_the_new_index(s3, built_index, corpus_file,
                                                                             tiny_clip_dir, tmp_path, monkeypatch):
    s3, url = s3
    from img2prompt.build_index.remote_out import staging_folder
    from img2prompt.build_index.runner import BuildOptions, run_build

    from img2prompt.index import remote

    monkeypatch.setattr(remote, "STALE_AFTER_S", -1)  # the killed publishes' leftovers count as old at once
    publish_legacy(s3, built_index, url)  # the old index, as the previous code published it
    assert same_index(cold_read(url, tmp_path, monkeypatch, "legacy"), built_index)
    options = BuildOptions(corpus=[str(small_corpus(corpus_file, tmp_path))], out=url, overwrite=True,
                           clip_model=str(tiny_clip_dir), shard_size=64, batch_size=32, device="cpu", progress=False)
    publishing = storage.filesystem(url)[0]  # fsspec's cached instance: the one publish uploads through
    real_put, calls = publishing.put_file, []

    def put_then_die(after: int):
        def put(local, remote, *args, **kwargs):
            if len(calls) == after:
                raise Killed(remote)
            calls.append(remote)
            return real_put(local, remote, *args, **kwargs)
        return put

    seen = []
    for after in range(0, 40):
        calls.clear()
        with monkeypatch.context() as patch:
            patch.setattr(publishing, "put_file", put_then_die(after))
            try:
                run_build(options if after == 0 else BuildOptions(**{**vars(options), "resume": True,
                                                                     "overwrite": False}))
            except Killed:
                pass
            else:
                break  # every upload of this publish went through
        new = staging_folder(url) / "index"
        local = cold_read(url, tmp_path, monkeypatch, f"after-{after}")
        seen.append("old" if same_index(local, built_index) else "new" if same_index(local, new) else "mixed")
    listed = json.loads((new / "manifest.json").read_text())["files"]
    # killed after 0..N of the N file uploads (the manifest not switched yet): the complete old index each time
    assert seen == ["old"] * (len(listed) + 1)
    assert same_index(cold_read(url, tmp_path, monkeypatch, "done"), new)  # the switch: the complete new one
    s3.invalidate_cache()
    top = sorted(entry.rsplit("/", 1)[-1] for entry in s3.ls(url.removeprefix("s3://")))
    assert top[-1] == "manifest.json" and len(top) == 2 and top[0].startswith("gen-")  # legacy and killed files gone


def test_resume_refuses_a_finished_staging_folder_built_from_other_settings(s3, corpus_file, tiny_clip_dir,
                                                                            tmp_path, monkeypatch):
    s3, url = s3
    from img2prompt.build_index.runner import BuildOptions, run_build

    small = small_corpus(corpus_file, tmp_path)
    options = BuildOptions(corpus=[str(small)], out=url, clip_model=str(tiny_clip_dir), shard_size=64,
                           batch_size=32, device="cpu", progress=False)
    run_build(options)
    first = cold_read(url, tmp_path, monkeypatch, "first")
    run_build(BuildOptions(**{**vars(options), "resume": True}))  # finished: published again, nothing rebuilt
    assert same_index(cold_read(url, tmp_path, monkeypatch, "again"), first)
    other = tmp_path / "other.txt"
    shutil.copy(corpus_file, other)
    with pytest.raises(UserError, match=r"^s3://bucket-\w+/idx: cannot resume, the build settings differ .*\(corpus\)"):
        run_build(BuildOptions(**{**vars(options), "corpus": [str(other)], "resume": True}))


def test_a_publish_killed_while_deleting_the_old_generation_leaves_the_new_index(s3, built_index, tmp_path,
                                                                                 monkeypatch):
    s3, url = s3
    from img2prompt.index import remote

    remote.publish(built_index, url)
    with monkeypatch.context() as patch:
        def die(*args, **kwargs):
            raise Killed()

        patch.setattr(storage.filesystem(url)[0], "rm", die)
        with pytest.raises(Killed):
            remote.publish(built_index, url)
    s3.invalidate_cache()
    assert len([e for e in s3.ls(url.removeprefix("s3://")) if e.rsplit("/", 1)[-1].startswith("gen-")]) == 2
    assert same_index(cold_read(url, tmp_path, monkeypatch, "new"), built_index)
    remote.publish(built_index, url)  # deletes the generation it replaces; the orphan is young: kept
    s3.invalidate_cache()
    assert len([e for e in s3.ls(url.removeprefix("s3://")) if e.rsplit("/", 1)[-1].startswith("gen-")]) == 2
    monkeypatch.setattr(remote, "STALE_AFTER_S", -1)
    remote.publish(built_index, url)  # a day later: the killed publish's leftover goes too
    s3.invalidate_cache()
    assert len([e for e in s3.ls(url.removeprefix("s3://")) if e.rsplit("/", 1)[-1].startswith("gen-")]) == 1
    assert same_index(cold_read(url, tmp_path, monkeypatch, "last"), built_index)
