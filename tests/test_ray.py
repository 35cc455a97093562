"""`build --engine ray` on a local Ray cluster (2 CPUs): the index is byte-identical to `--engine local`, a
worker killed mid-shard is replaced and its shard retried, a killed driver resumes, a shard that keeps failing
stops the build with one line. One Ray session serves the module; the subprocess driver joins it by address."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the optional `ray` extra is not installed (pip install 'img2prompt[ray]')")

from img2prompt.build_index.engine_ray import (CRASH_ENV, _check_reachable, _cpu_share,  # noqa: E402
                                              _default_cpu_workers)
from img2prompt.build_index.runner import BuildOptions, run_build  # noqa: E402
from img2prompt.errors import UserError  # noqa: E402
from img2prompt.index.layout import CLIP_VECTORS, MANIFEST, MINILM, MINILM_MEAN, PROMPTS  # noqa: E402
from img2prompt.index.reader import open_index  # noqa: E402

SHARD_SIZE, BATCH_SIZE = 16, 8  # the 160-prompt corpus → 10 shards
COMPARED = (CLIP_VECTORS, MINILM, PROMPTS, MINILM_MEAN)

pytestmark = pytest.mark.slow  # a local Ray cluster per test module: tens of seconds


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster limited to this machine's 2 cores, for every test here; yields its address."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def options(corpus: Path, out: Path, clip_dir: Path, **extra) -> BuildOptions:
    return BuildOptions(corpus=[str(corpus)], out=str(out), clip_model=str(clip_dir), shard_size=SHARD_SIZE,
                        batch_size=BATCH_SIZE, device="cpu", progress=False, **extra)


@pytest.fixture(scope="module")
def local_index(tmp_path_factory, corpus_file, tiny_clip_dir) -> Path:
    out = tmp_path_factory.mktemp("local") / "idx"
    run_build(options(corpus_file, out, tiny_clip_dir))
    return out


def assert_identical(ours: Path, reference: Path) -> None:
    """Same bytes in every index file and the same per-file sha256 in the manifests."""
    for name in COMPARED:
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name
    mine, theirs = (json.loads((folder / MANIFEST).read_text()) for folder in (ours, reference))
    assert mine["files"] == theirs["files"]
    assert mine["count"] == theirs["count"] == 160
    assert mine["corpus"] == theirs["corpus"]
    assert mine["build"] == theirs["build"]
    open_index(ours, verify=True)
    assert not list(ours.rglob("*.tmp")), "a temp file was left behind"


def test_the_local_engine_never_imports_ray():
    code = ("import sys; from img2prompt.build_index.engine import engine_class; import img2prompt.cli; "
            "engine_class('local'); print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "False", result.stderr


def test_actor_cpus_fit_the_nodes():
    assert _cpu_share([2], 2) == 1 and _cpu_share([2], 1) == 2  # whole CPUs per actor
    assert _cpu_share([8, 32], 4) == 8  # 10 each would not fit: the 8-CPU node holds none
    assert _cpu_share([2], 3) == pytest.approx(2 / 3)  # more workers than CPUs: fractions


def test_a_worker_encodes_with_the_drivers_thread_count(tmp_path, tiny_clip_dir, monkeypatch):
    """The driver runs 3 torch threads; the worker reserves 1 CPU and encodes in a thread of its own (as a
    threaded Ray actor does): both the CLIP and the MiniLM pass still run with the driver's 3 threads, since
    float32 sums can round differently with another count (the index must equal a local build's)."""
    import threading

    import torch

    from img2prompt.build_index import shard_encoder
    from img2prompt.build_index.engine_ray import _ShardWorker
    from img2prompt.build_index.shard_encoder import EncoderSpec, encode_threads
    from img2prompt.build_index.shard_store import SharedFolder
    from img2prompt.index.writer import ShardTask

    seen = []
    for name in ("embed_tokens_parallel", "minilm_ids_parallel"):
        real = getattr(shard_encoder, name)

        def spy(*args, _real=real, **kwargs):
            seen.append(torch.get_num_threads())
            return _real(*args, **kwargs)

        monkeypatch.setattr(shard_encoder, name, spy)
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        spec = EncoderSpec(str(tiny_clip_dir), None, None, "cpu", BATCH_SIZE, threads=encode_threads("cpu"))
    finally:
        torch.set_num_threads(saved)
    (tmp_path / MANIFEST).write_text("{}")  # SharedFolder.check_worker: the index folder is visible
    worker = _ShardWorker(spec, 1, str(tmp_path), SharedFolder(str(tmp_path)))
    task = ShardTask(0, 0, ["a castle on a hill", "a portrait of a cat, oil painting", "a red car"])
    results = []
    thread = threading.Thread(target=lambda: results.append(worker.encode(task, 0)))
    thread.start()
    thread.join()
    assert results and results[0][0]["count"] == 3
    assert seen == [3, 3]


def test_default_workers_run_the_drivers_thread_count_each():
    assert _default_cpu_workers([2], 2) == 1 and _default_cpu_workers([2], 1) == 2
    assert _default_cpu_workers([16, 16], 8) == 4
    assert _default_cpu_workers([4, 32], 16) == 3  # a node smaller than the count still runs one
    assert _default_cpu_workers([0.5], 4) == 1


def test_settings_that_cannot_work_fail_before_the_folder_is_made(tmp_path, corpus_file, tiny_clip_dir):
    out = tmp_path / "idx"
    with pytest.raises(UserError, match="--gpus-per-worker needs a CUDA build"):
        run_build(options(corpus_file, out, tiny_clip_dir, engine="ray",
                          engine_options={"address": None, "gpus_per_worker": 1}))
    with pytest.raises(UserError, match="at least 1 with --engine ray"):
        run_build(options(corpus_file, out, tiny_clip_dir, engine="ray", workers=0))
    assert not out.exists()
    with pytest.raises(UserError, match="no Ray cluster answers there"):
        _check_reachable("127.0.0.1:1")


def test_ray_build_is_byte_identical_to_local(ray_cluster, tmp_path, corpus_file, tiny_clip_dir, local_index):
    out = tmp_path / "ray"
    result = run_build(options(corpus_file, out, tiny_clip_dir, engine="ray", workers=2,
                               engine_options={"address": None, "gpus_per_worker": 0}))
    assert result.manifest["rates"]["encoded_now"] == 160
    assert "tokenize" in result.timings  # tokenized inside the actors
    assert_identical(out, local_index)


def test_a_worker_killed_mid_shard_is_retried(ray_cluster, tmp_path, corpus_file, tiny_clip_dir, local_index,
                                              monkeypatch, caplog):
    """The worker encoding shard 3 dies (os._exit) halfway through writing its MiniLM file, once."""
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, f"3:{marker}")
    out = tmp_path / "ray"
    with caplog.at_level(logging.WARNING, logger="img2prompt.build_index.engine_ray"):
        run_build(options(corpus_file, out, tiny_clip_dir, engine="ray", workers=2))
    assert marker.is_file(), "the worker never crashed"
    failures = [record.getMessage() for record in caplog.records if "failed on worker" in record.getMessage()]
    # only the shard being encoded counts a try; the one queued behind it on that worker is resubmitted freely
    assert len(failures) == 1 and "shard 3 failed on worker" in failures[0] and "try 1 of 3" in failures[0], failures
    assert any("died" in record.getMessage() for record in caplog.records), caplog.text
    assert_identical(out, local_index)


def test_a_shard_that_keeps_failing_stops_the_build(ray_cluster, tmp_path, corpus_file, tiny_clip_dir,
                                                    monkeypatch):
    """The hook cannot write its marker (no such folder): shard 2 raises on every try (one worker suffices)."""
    monkeypatch.setenv(CRASH_ENV, f"2:{tmp_path / 'missing' / 'marker'}")
    out = tmp_path / "ray"
    with pytest.raises(UserError, match=r"^shard 2 failed after 3 tries: FileNotFoundError: .*marker") as error:
        run_build(options(corpus_file, out, tiny_clip_dir, engine="ray", workers=1))
    assert "\n" not in str(error.value)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["state"] == "building"
    assert 2 not in [record["number"] for record in manifest["shards"]]


def shards_done(out: Path) -> int:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return len(manifest.get("shards", [])) if manifest.get("state") == "building" else -1


def test_a_killed_driver_resumes_to_the_same_index(ray_cluster, tmp_path, corpus_file, tiny_clip_dir,
                                                   local_index):
    """SIGKILL `img2prompt build --engine ray` (joined to the running cluster by address, one worker with both
    CPUs: 2 torch threads) once a shard is committed; `--resume` with the local engine finishes it."""
    out = tmp_path / "ray"
    args = [str(Path(sys.executable).parent / "img2prompt"), "-q", "build", str(corpus_file), "--out", str(out),
            "--clip-model", str(tiny_clip_dir), "--shard-size", str(SHARD_SIZE), "--batch-size", str(BATCH_SIZE),
            "--device", "cpu", "--engine", "ray", "--ray-address", ray_cluster, "--workers", "1"]
    env = {key: value for key, value in os.environ.items() if key != CRASH_ENV}
    committed = kill_after_first_shard(args, env, out, tmp_path / "driver.log")
    with pytest.raises(UserError, match="unfinished build"):
        open_index(out)
    result = run_build(options(corpus_file, out, tiny_clip_dir, resume=True))
    assert result.manifest["rates"]["encoded_now"] == 160 - committed * SHARD_SIZE
    assert_identical(out, local_index)


def kill_after_first_shard(args: list[str], env: dict, staging, log_file) -> int:
    """Run the build command `args`, SIGKILL it once `staging` has a committed shard; returns how many it has."""
    with open(log_file, "wb") as stderr:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if shards_done(staging) >= 1:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        process.wait()
    assert process.returncode == -signal.SIGKILL, \
        f"the build ended before it was killed: {log_file.read_text(errors='replace')[-2000:]}"
    committed = shards_done(staging)
    assert 1 <= committed < 10
    return committed
