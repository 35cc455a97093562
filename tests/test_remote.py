"""The fsspec storage seam (issue #23): URLs for corpus files read streaming, identity for resume keys."""
from __future__ import annotations

import builtins
import json
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from img2prompt import storage
from img2prompt.build_index.corpus import (CorpusReport, count_rows, expand_corpus_paths, file_fingerprint,
                                           iter_prompts)
from img2prompt.errors import UserError

fsspec = pytest.importorskip("fsspec")


@pytest.fixture
def mem() -> str:
    """A fresh memory:// folder for one test."""
    return f"memory://remote-test-{uuid.uuid4().hex}"


def put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as handle:
        handle.write(data)


def test_is_url_tells_urls_from_local_names():
    assert storage.is_url("s3://bucket/key") and storage.is_url("memory://x") and storage.is_url("hf://datasets/a/b")
    assert not storage.is_url("prompts.txt") and not storage.is_url("C://windows") and not storage.is_url("/a/b")


def test_text_corpus_from_memory_url_same_dedup_and_skips_as_local(mem, tmp_path):
    data = b"\xef\xbb\xbfa red fox\r\nA  RED fox\n\nbad \xff byte\nblue sky\n"
    put(f"{mem}/p.txt", data)
    (tmp_path / "p.txt").write_bytes(data)
    remote, local = CorpusReport(), CorpusReport()
    paths = expand_corpus_paths([f"{mem}/p.txt"])
    assert [str(p) for p in paths] == [f"{mem}/p.txt"]
    got = list(iter_prompts(paths, report=remote))
    assert got == list(iter_prompts(expand_corpus_paths([str(tmp_path / "p.txt")]), report=local))
    assert got == ["a red fox", "blue sky"]
    assert (remote.read, remote.kept, dict(remote.skipped)) == (local.read, local.kept, dict(local.skipped))
    assert count_rows(paths) == 5


def test_parquet_and_csv_corpus_from_url_and_glob(mem):
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(50)]}), buffer, row_group_size=7)
    put(f"{mem}/a.parquet", buffer.getvalue().to_pybytes())
    put(f"{mem}/b.csv", b"prompt,other\nfrom csv,1\nprompt 3,2\n")
    paths = expand_corpus_paths([f"{mem}/*"])
    assert [p.name for p in paths] == ["a.parquet", "b.csv"]
    report = CorpusReport()
    got = list(iter_prompts(paths, report=report))
    assert got[:2] == ["prompt 0", "prompt 1"] and got[-1] == "from csv" and len(got) == 51
    assert report.skipped["duplicate"] == 1 and count_rows(paths[:1]) == 50


def test_missing_url_and_unsupported_suffix_are_one_line_errors(mem):
    with pytest.raises(UserError, match="corpus file not found: memory://"):
        expand_corpus_paths([f"{mem}/nope.txt"])
    put(f"{mem}/x.json", b"{}")
    with pytest.raises(UserError, match="unsupported corpus format '.json'"):
        expand_corpus_paths([f"{mem}/x.json"])


def test_identity_changes_with_content_and_resume_check_refuses(mem):
    url = f"{mem}/p.txt"
    put(url, b"one\n")
    recorded = file_fingerprint(storage.UrlPath(url))
    assert recorded["url"] == url and recorded["size"] == "4"
    storage.check_identity(recorded)  # unchanged: accepted
    put(url, b"one\ntwo\n")
    assert file_fingerprint(storage.UrlPath(url)) != recorded  # the build key differs → resume refused
    with pytest.raises(UserError, match="changed since the build began"):
        storage.check_identity(recorded)


def test_url_without_fsspec_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_fsspec(name, *args, **kwargs):
        if name == "fsspec" or name.startswith("fsspec."):
            raise ImportError("No module named 'fsspec'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fsspec)
    with pytest.raises(UserError, match=r'pip install "img2prompt\[remote\]"'):
        storage.open_read("s3://bucket/p.txt")


def test_unknown_protocol_is_one_line_error():
    with pytest.raises(UserError, match="no usable fsspec backend for nosuchproto://"):
        storage.open_read("nosuchproto://x/p.txt")


def test_embeddings_url_copied_to_cache_once(mem, tmp_path, monkeypatch):
    import numpy as np

    from img2prompt.build_index.precomputed import open_precomputed

    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))
    vectors = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    import io

    buffer = io.BytesIO()
    np.save(buffer, vectors)
    put(f"{mem}/v.npy", buffer.getvalue())
    opened = open_precomputed([f"{mem}/*.npy"])
    assert opened.rows == 3 and opened.dim == 4 and np.array_equal(opened.take([2, 0]), vectors[[2, 0]])
    first = opened.files[0]
    assert first.is_relative_to(tmp_path / "cache")
    assert open_precomputed([f"{mem}/v.npy"]).files[0] == first  # unchanged object: the cached copy
    np.save(buffer := io.BytesIO(), np.concatenate([vectors, vectors]))
    put(f"{mem}/v.npy", buffer.getvalue())  # changed object (new size): a new copy, a new build key
    changed = open_precomputed([f"{mem}/v.npy"])
    assert changed.rows == 6 and changed.files[0] != first
    with pytest.raises(UserError, match="not found"):
        open_precomputed([f"{mem}/gone.npy"])


@pytest.mark.slow
def test_build_from_memory_corpus_then_changed_file_refuses_resume(mem, tmp_path, tiny_clip_dir, corpus_file,
                                                                   monkeypatch):
    from img2prompt.build_index import runner
    from img2prompt.build_index.runner import BuildOptions, run_build

    url = f"{mem}/prompts.txt"
    put(url, corpus_file.read_bytes())
    out = tmp_path / "idx"

    def options(**extra) -> BuildOptions:
        return BuildOptions(**{"corpus": [url], "out": str(out), **extra}, clip_model=str(tiny_clip_dir),
                            shard_size=64, batch_size=32, device="cpu", progress=False)

    result = run_build(options())
    assert (out / "manifest.json").is_file() and result is not None
    assert pq.ParquetFile(out / "prompts.parquet").metadata.num_rows == 160  # same dedup as a local file
    interrupted = tmp_path / "interrupted"

    def killed(self):
        raise KeyboardInterrupt  # a build stopped after its build key was recorded

    with monkeypatch.context() as patch:
        patch.setattr(runner.BuildJob, "run", killed)
        with pytest.raises(KeyboardInterrupt):
            run_build(options(out=str(interrupted)))
    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))
    run_build(options(out=f"{mem}/built"))  # --out URL: staged locally, uploaded, manifest last
    listed = json.loads(fsspec.open(f"{mem}/built/manifest.json").open().read())
    fs = fsspec.filesystem("memory")
    assert listed["generation"].startswith("gen-")  # the files live under the publish's generation prefix
    assert all(fs.info(f"{mem}/built/{listed['generation']}/{name}")["size"] == entry["bytes"]
               for name, entry in listed["files"].items())
    put(url, b"something else entirely\n" + corpus_file.read_bytes())
    with pytest.raises(UserError, match=r"cannot resume, the build settings differ .*\(corpus\)"):
        run_build(options(out=str(interrupted), resume=True))


def test_published_index_opens_from_url_and_searches_like_local(mem, built_index, sample_images, tmp_path,
                                                                monkeypatch):
    import numpy as np

    import img2prompt
    from img2prompt.index.remote import fetch, publish

    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{mem}/idx"
    publish(built_index, url)
    images = sorted(sample_images.iterdir())
    with img2prompt.open_index(url, device="cpu") as remote, img2prompt.open_index(built_index, device="cpu") as local:
        assert remote.count == local.count
        np.testing.assert_array_equal(remote.predict(images), local.predict(images))
    cached = fetch(url)
    assert cached.is_relative_to(tmp_path / "cache") and fetch(url) == cached  # reused while valid
    (cached / "prompts.parquet").write_bytes(b"damaged")  # a damaged cached copy is fetched again
    assert fetch(url) == cached and (cached / "prompts.parquet").read_bytes() == (built_index / "prompts.parquet").read_bytes()


def test_upload_without_manifest_is_not_an_index(mem, built_index, tmp_path, monkeypatch):
    from img2prompt.index.remote import fetch

    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{mem}/partial"
    put(f"{url}/prompts.parquet", (built_index / "prompts.parquet").read_bytes())  # killed before the manifest
    with pytest.raises(UserError, match="not an index \\(no manifest.json"):
        fetch(url)
    put(f"{url}/manifest.json", (built_index / "manifest.json").read_bytes())  # manifest, files missing
    with pytest.raises(UserError, match="listed in manifest.json but missing from the store"):
        fetch(url)


def test_parquet_corpus_over_http_from_a_loopback_server(tmp_path):
    """An https-style URL (plain http:// on 127.0.0.1): the footer, then row groups, by range requests."""
    pytest.importorskip("aiohttp")
    import functools
    import http.server
    import threading

    pq.write_table(pa.table({"prompt": [f"http prompt {i}" for i in range(30)] + ["http prompt 0"]}),
                   tmp_path / "c.parquet", row_group_size=8)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/c.parquet"
        report = CorpusReport()
        got = list(iter_prompts(expand_corpus_paths([url]), report=report))
        assert got == [f"http prompt {i}" for i in range(30)] and report.skipped["duplicate"] == 1
        assert file_fingerprint(storage.UrlPath(url))["url"] == url
    finally:
        server.shutdown()
        server.server_close()


def test_hf_dataset_url_is_a_url_with_the_hf_backend():
    assert storage.is_url("hf://datasets/owner/name/data/train.parquet")
    assert storage.suffix("hf://datasets/owner/name/data/train.parquet") == ".parquet"
    pytest.importorskip("huggingface_hub")
    fs, inner = storage.filesystem("hf://datasets/owner/name/data/train.parquet")  # parsing only, no request
    assert fs.protocol[0] == "hf" or "hf" in fs.protocol
    assert inner.startswith("datasets/owner/name")


@pytest.mark.slow
def test_s3_on_moto_publish_killed_midway_then_complete(built_index, tmp_path, monkeypatch):
    """A real S3 API (moto's server on loopback): an upload killed before the manifest is no index; a full
    publish opens; the corpus reader streams from s3:// too."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import socket

    import boto3
    import fsspec.config

    from img2prompt.index.remote import fetch, publish

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "IMG2PROMPT_CACHE_DIR": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bucket")
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        real_put, calls = type(fs).put_file, []

        def dying_put(self, local, remote, *args, **kwargs):
            calls.append(remote)
            if len(calls) == 3:
                raise KeyboardInterrupt  # killed during the upload
            return real_put(self, local, remote, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(type(fs), "put_file", dying_put)
            with pytest.raises(KeyboardInterrupt):
                publish(built_index, "s3://bucket/idx")
        fsspec.filesystem("s3").invalidate_cache()
        with pytest.raises(UserError, match="not an index"):
            fetch("s3://bucket/idx")
        publish(built_index, "s3://bucket/idx")
        fsspec.filesystem("s3").invalidate_cache()
        cached = fetch("s3://bucket/idx")
        assert (cached / "prompts.parquet").read_bytes() == (built_index / "prompts.parquet").read_bytes()
        with fsspec.open("s3://bucket/p.txt", "wb") as handle:
            handle.write(b"a fox\nA FOX\nblue sky\n")
        fsspec.filesystem("s3").invalidate_cache()
        assert list(iter_prompts(expand_corpus_paths(["s3://bucket/*.txt"]))) == ["a fox", "blue sky"]
        assert "ETag" in file_fingerprint(storage.UrlPath("s3://bucket/p.txt"))
    finally:
        server.stop()


def test_cli_search_on_a_url_and_build_refuses_an_existing_remote_index(mem, built_index, tmp_path, monkeypatch,
                                                                         capsys):
    from img2prompt.build_index.remote_out import build_to_url
    from img2prompt.build_index.runner import BuildOptions
    from img2prompt.cli import main
    from img2prompt.index.remote import publish

    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{mem}/served"
    publish(built_index, url)
    assert main(["search", url, "--text", "a castle on a hill", "--k", "2", "--device", "cpu", "-q"]) == 0
    assert "#" in capsys.readouterr().out  # ranked prompts, through preflight and open on the URL
    with pytest.raises(UserError, match="already holds an index: pass --overwrite"):
        build_to_url(BuildOptions(corpus=["unused.txt"], out=url, clip_model="unused"), run_build=None)


def test_a_connection_dropped_mid_file_is_one_line_and_caches_nothing_half(built_index, tmp_path, monkeypatch):
    """An HTTP server that sends the full Content-Length of clip.f16 but only half its bytes, then hangs up."""
    pytest.importorskip("aiohttp")
    import functools
    import http.server
    import threading

    from img2prompt.index.remote import fetch

    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))

    class Dropping(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if not self.path.endswith("clip.f16"):
                return super().do_GET()
            data = (built_index / "clip.f16").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Dropping, directory=str(built_index)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(UserError) as caught:
            fetch(url)
        assert "clip.f16" in str(caught.value) and "\n" not in str(caught.value)
        cached = list((tmp_path / "cache").rglob("clip.f16")) + list((tmp_path / "cache").rglob("manifest.json"))
        assert cached == []  # neither a half file nor a manifest that would make the cache look like an index
    finally:
        server.shutdown()
        server.server_close()


def test_embeddings_url_errors_name_the_url_not_the_cache_copy(mem, tmp_path, monkeypatch):
    """Issue #30 item 10: every --embeddings error names what the user gave (the URL)."""
    import io

    import numpy as np

    from img2prompt.build_index.precomputed import open_precomputed

    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))

    def npy(array) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    unit = np.eye(3, 4, dtype=np.float32)
    put(f"{mem}/a.npy", npy(unit))
    put(f"{mem}/b.npy", npy(np.full((2, 4), 3, dtype=np.float32)))  # not unit-norm
    put(f"{mem}/c.npy", npy(np.eye(2, 5, dtype=np.float32)))  # another dim
    put(f"{mem}/d.npy", npy(np.arange(4, dtype=np.int64)))  # not a float matrix
    put(f"{mem}/e.npy", b"\x93NUMPY garbage")
    cases = {f"{mem}/b.npy": rf"^{mem}/b\.npy, row 0: vector norm 6\.0000",
             f"{mem}/c.npy": rf"^{mem}/c\.npy: dim 5, but {mem}/a\.npy has dim 4",
             f"{mem}/d.npy": rf"^{mem}/d\.npy: expected a float16/float32",
             f"{mem}/e.npy": rf"^{mem}/e\.npy: not a readable \.npy array"}
    for url, pattern in cases.items():
        with pytest.raises(UserError, match=pattern) as caught:
            open_precomputed([f"{mem}/a.npy", url]).take([3])
        assert str(tmp_path / "cache") not in str(caught.value), str(caught.value)


def test_a_fetch_overtaken_by_a_new_publish_reads_the_new_index(mem, built_index, tmp_path, monkeypatch):
    """A reader that read the old manifest and finds its files deleted by a newer publish starts again."""
    from img2prompt.index import remote

    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{mem}/moving"
    remote.publish(built_index, url)
    real, calls = remote._download, []

    def overtaken(*args, **kwargs):
        if not calls:
            remote.publish(built_index, url)  # lands between this reader's manifest read and its first file
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(remote, "_download", overtaken)
    local = remote.fetch(url)
    assert json.loads((local / "manifest.json").read_text()) == json.loads((built_index / "manifest.json").read_text())
    assert all((local / name).read_bytes() == (built_index / name).read_bytes()
               for name in json.loads((built_index / "manifest.json").read_text())["files"])
    fs = fsspec.filesystem("memory")
    assert len([entry for entry in fs.ls(url.removeprefix("memory://"), detail=False) if "gen-" in entry]) == 1


def test_two_publishes_in_flight_never_delete_each_others_files(mem, built_index, tmp_path, monkeypatch):
    """Publish B uploads while publish A runs whole: A must not delete B's young generation, so B's manifest
    (switched last) points at complete files."""
    from img2prompt.index import remote

    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{mem}/racing"
    remote.publish(built_index, url)
    real, calls = remote._put, []

    def slow_put(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # B has uploaded one file: A runs from start to end
            monkeypatch.setattr(remote, "_put", real)
            remote.publish(built_index, url)
            monkeypatch.setattr(remote, "_put", slow_put)
        return real(*args, **kwargs)

    monkeypatch.setattr(remote, "_put", slow_put)
    remote.publish(built_index, url)  # B
    local = remote.fetch(url)
    assert all((local / name).read_bytes() == (built_index / name).read_bytes()
               for name in json.loads((built_index / "manifest.json").read_text())["files"])
