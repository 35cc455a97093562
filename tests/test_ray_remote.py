"""`build --engine ray --out s3://...` (issue #23) on a local 2-CPU Ray cluster and moto's S3 server on loopback:
the workers send their shards through the store (never the driver's staging folder), the driver checks and
commits them, and the published index equals a local build byte for byte, also with a worker killed mid-shard
and with the driver killed and resumed. The workers reach S3 through a TCP proxy the tests can cut, so a dropped
store connection on a worker is tested while the driver's own connection stays up."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the optional `ray` extra is not installed (pip install 'img2prompt[ray]')")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import boto3  # noqa: E402
import requests  # noqa: E402
import fsspec.config  # noqa: E402

from img2prompt.build_index import shard_store  # noqa: E402
from img2prompt.build_index.engine_ray import CRASH_ENV  # noqa: E402
from img2prompt.build_index.remote_out import staging_folder  # noqa: E402
from img2prompt.build_index.runner import run_build  # noqa: E402
from img2prompt.errors import UserError  # noqa: E402
from img2prompt.index.layout import SHARD_SUFFIXES, shard_path  # noqa: E402
from img2prompt.index.remote import fetch  # noqa: E402
from test_ray import BATCH_SIZE, SHARD_SIZE, assert_identical, kill_after_first_shard, options  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster and an S3 server per module: a minute or two

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Proxy:
    """A TCP pipe 127.0.0.1:port → target; `cut()` closes every connection and refuses new ones."""

    def __init__(self, target: int) -> None:
        self.target, self.open, self.sockets = target, True, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        for end in self.sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
                end.close()

    def restore(self) -> None:
        self.sockets, self.open = [], True


@pytest.fixture(scope="module")
def s3_cluster():
    """moto on loopback; a Ray cluster whose workers reach it through the proxy (their environment is fixed
    when Ray starts: FSSPEC_S3 names the proxy, one botocore attempt so a cut fails fast)."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    proxy = Proxy(port)
    saved = {key: os.environ.get(key) for key in [*CREDENTIALS, "FSSPEC_S3"]}
    os.environ.update(CREDENTIALS)
    os.environ["FSSPEC_S3"] = json.dumps({"endpoint_url": f"http://127.0.0.1:{proxy.port}",
                                          "config_kwargs": {"retries": {"max_attempts": 1}}})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="ray-remote")
        yield {"endpoint": f"http://127.0.0.1:{port}", "proxy": proxy, "address": ray.get_runtime_context().gcs_address}
    finally:
        ray.shutdown()
        proxy.server.close()
        # moto's state is per process, not per server: leave no bucket for the next module's S3 server
        requests.post(f"http://127.0.0.1:{port}/moto-api/reset", timeout=30)
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture
def driver(s3_cluster, tmp_path, monkeypatch):
    """This process is the driver: straight to moto (not through the proxy), its own staging cache."""
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_cluster["endpoint"]})
    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))
    return boto3.client("s3", endpoint_url=s3_cluster["endpoint"])


@pytest.fixture(scope="module")
def local_index(tmp_path_factory, corpus_file, tiny_clip_dir) -> Path:
    out = tmp_path_factory.mktemp("local") / "idx"
    run_build(options(corpus_file, out, tiny_clip_dir))
    return out


def keys(client, prefix: str) -> list[str]:
    return [entry["Key"] for entry in client.list_objects_v2(Bucket="ray-remote", Prefix=prefix).get("Contents", [])]


def ray_options(corpus_file, url: str, clip_dir, **extra):
    return options(corpus_file, url, clip_dir, engine="ray", **{"workers": 2, **extra})  # type: ignore[arg-type]


def test_a_ray_build_to_s3_equals_a_local_build(driver, tmp_path, corpus_file, tiny_clip_dir, local_index,
                                                monkeypatch, caplog):
    """Every shard reaches the driver as objects on the store, none through its staging folder (checked as
    each record arrives), and a worker killed halfway through writing shard 3 is retried."""
    url = "s3://ray-remote/idx"
    staging = staging_folder(url) / "index"
    arrived, real_receive = [], shard_store.ShardStore.receive

    def checked_receive(self, record, root):
        assert Path(root) == staging
        names = [shard_path(Path("."), record["number"], kind).name for kind in SHARD_SUFFIXES]
        assert not any((staging / "shards" / name).exists() for name in names), "a worker wrote to the staging folder"
        assert sorted(keys(driver, f"idx/.shards/{record['number']:05d}")) == sorted(f"idx/.shards/{n}" for n in names)
        arrived.append(record["number"])
        return real_receive(self, record, root)

    monkeypatch.setattr(shard_store.ShardStore, "receive", checked_receive)
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, f"3:{marker}")
    with caplog.at_level(logging.WARNING, logger="img2prompt.build_index.engine_ray"):
        result = run_build(ray_options(corpus_file, url, tiny_clip_dir))
    assert marker.is_file(), "the worker never crashed"
    assert "shard 3 failed on worker" in caplog.text
    assert sorted(arrived) == list(range(10)) and result.manifest["rates"]["encoded_now"] == 160
    assert "send_shard" in result.timings and "receive_shard" in result.timings
    assert keys(driver, "idx/.shards") == []  # the shards in flight are gone once published
    assert_identical(fetch(url), local_index)


def test_a_killed_driver_resumes_to_the_same_index(s3_cluster, driver, tmp_path, corpus_file, tiny_clip_dir,
                                                   local_index):
    """SIGKILL the CLI driver once a shard is committed in its staging folder; --resume on the store finishes."""
    url = "s3://ray-remote/killed"
    staging = staging_folder(url) / "index"
    args = [str(Path(sys.executable).parent / "img2prompt"), "-q", "build", str(corpus_file), "--out", url,
            "--clip-model", str(tiny_clip_dir), "--shard-size", str(SHARD_SIZE), "--batch-size", str(BATCH_SIZE),
            "--device", "cpu", "--engine", "ray", "--ray-address", s3_cluster["address"], "--workers", "1"]
    env = {key: value for key, value in os.environ.items() if key != CRASH_ENV}
    env["FSSPEC_S3"] = json.dumps({"endpoint_url": s3_cluster["endpoint"]})
    committed = kill_after_first_shard(args, env, staging, tmp_path / "driver.log")
    with pytest.raises(UserError, match="not an index"):
        fetch(url)  # nothing published: no manifest on the store
    result = run_build(ray_options(corpus_file, url, tiny_clip_dir, resume=True))
    assert result.manifest["rates"]["encoded_now"] == 160 - committed * SHARD_SIZE
    assert keys(driver, "killed/.shards") == []
    assert_identical(fetch(url), local_index)


def test_a_worker_that_loses_the_store_stops_the_build_in_one_line(s3_cluster, driver, corpus_file,
                                                                   tiny_clip_dir):
    url = "s3://ray-remote/dropped"
    s3_cluster["proxy"].cut()
    try:
        with pytest.raises(UserError) as error:
            run_build(ray_options(corpus_file, url, tiny_clip_dir, workers=1))
    finally:
        s3_cluster["proxy"].restore()
    message = str(error.value)
    assert "\n" not in message and message.startswith("s3://ray-remote/dropped/.shards: the Ray worker on ")
    assert "cannot write there" in message
    assert keys(driver, "dropped/manifest.json") == []


def test_memory_out_with_ray_is_refused_before_the_build(tmp_path, corpus_file, tiny_clip_dir, monkeypatch):
    monkeypatch.setenv("IMG2PROMPT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="memory:// lives inside one process"):
        run_build(ray_options(corpus_file, "memory://ray-out/idx", tiny_clip_dir))
    with pytest.raises(UserError, match="--pairs memory://t/pairs.csv: memory:// lives inside one process"):
        run_build(ray_options(corpus_file, str(tmp_path / "idx"), tiny_clip_dir, pairs=["memory://t/pairs.csv"]))
    assert not (tmp_path / "idx").exists()


def test_an_upload_dropped_mid_build_is_retried_and_named(s3_cluster, driver, corpus_file, tiny_clip_dir,
                                                          local_index, monkeypatch, caplog):
    """The workers' connection is cut as the driver receives shard 0 (a later shard's upload fails: at most
    two are in flight, so at least one uploads after the cut) and restored when the failure is logged."""
    url, proxy = "s3://ray-remote/flaky", s3_cluster["proxy"]
    real_receive = shard_store.ShardStore.receive

    def cut_after_first(self, record, root):
        if record["number"] == 0:
            proxy.cut()
        return real_receive(self, record, root)

    class RestoreOnFailure(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "failed on worker" in record.getMessage():
                proxy.restore()

    restorer = RestoreOnFailure(logging.WARNING)
    logging.getLogger("img2prompt.build_index.engine_ray").addHandler(restorer)
    monkeypatch.setattr(shard_store.ShardStore, "receive", cut_after_first)
    try:
        with caplog.at_level(logging.WARNING, logger="img2prompt.build_index.engine_ray"):
            run_build(ray_options(corpus_file, url, tiny_clip_dir, workers=1))
    finally:
        logging.getLogger("img2prompt.build_index.engine_ray").removeHandler(restorer)
        proxy.restore()
    failures = [record.getMessage() for record in caplog.records if "failed on worker" in record.getMessage()]
    assert len(failures) == 1, failures
    assert "try 1 of 3: ShardStoreError: s3://ray-remote/flaky/.shards/000" in failures[0]
    assert "upload from the Ray worker on " in failures[0] and "\n" not in failures[0]
    assert_identical(fetch(url), local_index)


def test_a_ray_build_from_a_pairs_table_on_s3_reads_the_images_on_the_workers(driver, tmp_path, tiny_clip_dir):
    """No disk shared at all: the table and its images on S3, read by the workers; the index published to S3
    equals a local build of a local copy, with the same skip counts (a missing object is unreadable_image)."""
    import fsspec

    from img2prompt.build_index.runner import BuildOptions
    from test_remote_pairs import IMAGES, assert_same_index, build, local_tree, write_tree

    reference = tmp_path / "reference"
    build(str(local_tree(tmp_path / "tree")), reference, tiny_clip_dir)

    def put(name: str, data: bytes) -> None:
        with fsspec.open(f"s3://ray-remote/pairs/{name}", "wb") as handle:
            handle.write(data)

    put("elsewhere/2.png", IMAGES[2].read_bytes())  # named in the table by its absolute URL
    write_tree(put, "s3://ray-remote/pairs/elsewhere/2.png")
    fsspec.filesystem("s3").invalidate_cache()
    url = "s3://ray-remote/pairs-index"
    run_build(BuildOptions(corpus=[], pairs=["s3://ray-remote/pairs/pairs.csv"], out=url, clip_model=str(tiny_clip_dir),
                           shard_size=64, batch_size=8, device="cpu", progress=False, engine="ray", workers=1))
    assert_same_index(fetch(url), reference)
