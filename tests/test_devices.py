"""Several devices without Ray: --device specs (parsed and refused before any model loads) and the
data-parallel path, run on the CPU as `cpu,cpu`, giving byte-identical index vectors and submission."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from img2prompt.encoders.devices import ReplicaRunner, contiguous_runs, parse_devices
from img2prompt.errors import UserError

CPU = torch.device("cpu")


def test_plain_specs_are_one_device():
    assert parse_devices("cpu", cuda_count=0) == [CPU]
    assert parse_devices("auto", cuda_count=0) == [CPU]
    assert parse_devices("auto", cuda_count=2) == [torch.device("cuda")]
    assert parse_devices("cuda", cuda_count=1) == [torch.device("cuda")]  # unchanged: torch's current GPU
    assert parse_devices("cuda:1", cuda_count=2) == [torch.device("cuda", 1)]


def test_lists_and_all():
    assert parse_devices("cuda:0,cuda:1", cuda_count=2) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert parse_devices(" cuda:1 , cuda:0 ", cuda_count=2) == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert parse_devices("cuda:all", cuda_count=3) == [torch.device("cuda", n) for n in range(3)]
    assert parse_devices("cpu,cpu", cuda_count=0) == [CPU, CPU]  # two CPU replicas: the tests' multi-device path


@pytest.mark.parametrize("spec, count, message", [
    ("gpu", 0, "unknown --device 'gpu'"),
    ("cuda:0,tpu", 1, "unknown --device 'cuda:0,tpu' ('tpu')"),
    ("cuda:x", 1, "'cuda:x' is not a device"),
    ("cuda:all", 0, "torch sees no CUDA device"),
    ("cuda:0,cuda:1", 0, "torch sees no CUDA device"),
    ("cuda:0,cuda:0", 2, "cuda:0 is listed twice"),
    ("cuda,cuda:0", 2, "cuda:0 is listed twice"),
    ("cuda:2", 2, "cuda:2 is out of range, torch sees 2 CUDA device(s)"),
    ("cuda:0,cuda:5", 2, "cuda:5 is out of range"),
    ("cpu,cuda:0", 1, "mixes CPU and CUDA"),
    ("cuda:0,", 1, "an empty name"),
    ("auto,cpu", 0, "stand alone"),
])
def test_bad_specs_are_one_line_errors(spec, count, message):
    with pytest.raises(UserError) as caught:
        parse_devices(spec, cuda_count=count)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_runs_are_contiguous_whole_batches():
    order = np.arange(10)[::-1]
    runs = contiguous_runs(order, batch_size=3, parts=2)
    assert [run.tolist() for run in runs] == [[9, 8, 7, 6, 5, 4], [3, 2, 1, 0]]
    assert [len(run) for run in contiguous_runs(np.arange(2), 3, 4)] == [2]  # fewer batches than devices
    assert contiguous_runs(np.arange(0), 3, 2) == []


def test_runner_keeps_input_order_and_replica_per_thread():
    seen: dict[str, set] = {"a": set(), "b": set()}

    def work(replica, item):
        import threading

        seen[replica].add(threading.get_ident())
        return replica, item * 2

    with ReplicaRunner(["a", "b"], [CPU, CPU]) as runner:
        results = list(runner.map_batches(work, range(9)))
        assert runner.map_runs(work, [1, 2]) == [("a", 2), ("b", 4)]
    assert results == [("ab"[i % 2], i * 2) for i in range(9)]
    assert all(len(threads) == 1 for threads in seen.values())


def test_build_path_refuses_bad_device_before_loading(tmp_path, corpus_file):
    from img2prompt.build_index.runner import BuildOptions, run_build

    with pytest.raises(UserError, match="listed twice|no CUDA device"):
        run_build(BuildOptions(corpus=[str(corpus_file)], out=str(tmp_path / "x"), clip_model="never-loaded",
                               device="cuda:0,cuda:0", progress=False))
    assert not (tmp_path / "x").exists()


def _build(out, corpus, clip_dir, device):
    from img2prompt.build_index.runner import BuildOptions, run_build

    run_build(BuildOptions(corpus=[str(corpus)], out=str(out), clip_model=str(clip_dir), shard_size=96,
                           batch_size=16, device=device, progress=False))
    return out


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, tiny_clip_dir, corpus_file):
    root = tmp_path_factory.mktemp("devices")
    return (_build(root / "one", corpus_file, tiny_clip_dir, "cpu"),
            _build(root / "two", corpus_file, tiny_clip_dir, "cpu,cpu"))


def test_two_replicas_build_byte_identical_vectors(two_builds):
    one, two = two_builds
    for name in ("clip.f16", "minilm.f16"):
        first, second = (one / name).read_bytes(), (two / name).read_bytes()
        assert len(first) > 0 and first == second, name


def test_the_shard_encoder_really_uses_both_replicas(tiny_clip_dir, corpus_file, monkeypatch):
    """Guard: the multi-device path is taken (each replica gets a run), not silently the first device."""
    import img2prompt.encoders.parallel as parallel
    from img2prompt.encoders.clip_ensemble import load_named_clips
    from img2prompt.encoders.models import load_text_model

    clips = [load_named_clips(str(tiny_clip_dir), None, CPU) for _ in range(2)]
    clips[0].replicas = clips
    texts = [load_text_model(None, CPU) for _ in range(2)]
    calls = []
    original = ReplicaRunner.map_runs

    def spy(self, fn, runs):
        calls.append([len(run) for run in runs])
        return original(self, fn, runs)

    monkeypatch.setattr(ReplicaRunner, "map_runs", spy)
    prompts = corpus_file.read_text(encoding="utf-8").split("\n")[:50]
    tokens = clips[0].tokenizer(prompts)
    both = parallel.embed_tokens_parallel(clips, tokens, 8)
    alone = parallel.embed_tokens_parallel(clips[:1], tokens, 8)
    assert calls == [[32, 18]] and np.array_equal(both, alone)
    ids = [np.array([101, 2000 + i, 102]) for i in range(20)]
    order = np.arange(20)
    assert np.array_equal(parallel.minilm_ids_parallel(texts, ids, order, 4),
                          parallel.minilm_ids_parallel(texts[:1], ids, order, 4))
    assert calls[-1] == [12, 8]


def test_two_replicas_submit_identical_csv(two_builds, sample_images, tmp_path):
    import img2prompt

    one, _ = two_builds
    outputs = []
    for device in ("cpu", "cpu,cpu"):
        out = tmp_path / f"{device.replace(',', '_')}.csv"
        with img2prompt.open_index(one, device=device) as index:
            assert len(index.session.clip.replicas) == len(device.split(","))
            index.submission(sample_images, out, batch_size=1, progress=False)  # 4 batches over 2 replicas
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].startswith(b"imgId_eId,val")


@pytest.mark.parametrize("command", ["build", "submit"])
def test_cli_refuses_a_bad_device_list_in_one_line(command, tmp_path, corpus_file, built_index, sample_images,
                                                   capsys):
    from img2prompt.cli import main

    args = {"build": ["build", str(corpus_file), "--out", str(tmp_path / "x"), "--clip-model", "never-loaded"],
            "submit": ["submit", str(built_index), str(sample_images), "--out", str(tmp_path / "s.csv")]}[command]
    assert main([*args, "--device", "cpu,gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown --device 'cpu,gpu' ('gpu')" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "s.csv").exists()


def test_ray_engine_with_several_devices_is_refused():
    from types import SimpleNamespace

    from img2prompt.build_index.replicas import check_build_devices

    check_build_devices(SimpleNamespace(device="cpu,cpu", engine="local"))
    check_build_devices(SimpleNamespace(device="cpu", engine="ray"))
    with pytest.raises(UserError, match="runs with the local engine"):
        check_build_devices(SimpleNamespace(device="cpu,cpu", engine="ray"))


def test_two_replicas_build_identical_image_keyed_pairs(tmp_path, tiny_clip_dir):
    """--pairs: image batches round robin over the replicas (one undecodable image among them)."""
    import pandas as pd

    import img2prompt
    from conftest import DATA, read_data_prompts

    images = sorted((DATA / "images").glob("*.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [(str(path), prompt) for path, prompt in zip(images, read_data_prompts(6))]
    rows.insert(3, (str(tmp_path / "broken.png"), "an undecodable image"))
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame(rows, columns=["image", "prompt"]).to_csv(pairs, index=False)
    built = []
    for device in ("cpu", "cpu,cpu"):
        out = tmp_path / device.replace(",", "_")
        img2prompt.build([], out, clip_model=str(tiny_clip_dir), pairs=[str(pairs)], batch_size=2, device=device,
                         progress=False)
        built.append([(out / name).read_bytes() for name in ("clip.f16", "minilm.f16")])
    assert built[0] == built[1] and len(built[0][0]) > 0


@pytest.mark.slow
def test_two_replicas_build_identical_ensemble_keys(tmp_path, tiny_clip_dir, other_clip_dir, corpus_file):
    """An index of two CLIP models: each replica is the whole ensemble on its device."""
    from img2prompt.build_index.runner import BuildOptions, run_build

    keys = []
    for device in ("cpu", "cpu,cpu"):
        out = tmp_path / device.replace(",", "_")
        run_build(BuildOptions(corpus=[str(corpus_file)], out=str(out), clip_model=[str(tiny_clip_dir),
                               str(other_clip_dir)], batch_size=16, device=device, progress=False))
        keys.append((out / "clip.f16").read_bytes())
    assert keys[0] == keys[1] and len(keys[0]) > 0


def _command_args(command: str, tmp_path, corpus_file, built_index, sample_images) -> list[str]:
    labels = tmp_path / "labels.csv"
    labels.write_text("imgId,prompt\nimg0,a cat\n")
    image = str(sample_images / "img0.png")
    return {"build": ["build", str(corpus_file), "--out", str(tmp_path / "x"), "--clip-model", "never-loaded"],
            "submit": ["submit", str(built_index), str(sample_images), "--out", str(tmp_path / "s.csv")],
            "search": ["search", str(built_index), "--text", "a cat"],
            "eval": ["eval", str(built_index), "--labels", str(labels), "--out", str(tmp_path / "r.json")],
            "interrogate": ["interrogate", str(built_index), image],
            "serve": ["serve", str(built_index), "--port", "0"],
            "score": ["score", "--labels", str(labels), "--captions", str(labels), "--out", str(tmp_path / "r.json")],
            }[command]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error path needs a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
@pytest.mark.parametrize("command", ["build", "submit", "search", "eval", "interrogate", "serve", "score"])
def test_every_command_refuses_cuda_without_a_gpu_before_any_work(command, spec, tmp_path, corpus_file, built_index,
                                                                 sample_images, capsys, monkeypatch):
    from img2prompt.cli import main
    from img2prompt.encoders import clip_ensemble, models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before --device was refused")

    monkeypatch.setattr(clip_ensemble, "load_clip", no_model)
    monkeypatch.setattr(models, "load_text_model", no_model)
    assert main([*_command_args(command, tmp_path, corpus_file, built_index, sample_images), "--device", spec]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"img2prompt {command}: error: --device {spec} was asked for, but torch sees no CUDA "
                            "device on this machine\n")
    assert captured.out == "" and sorted(path.name for path in tmp_path.iterdir()) == ["labels.csv"]


@pytest.mark.parametrize("precision, dtype", [(None, "float32"), ("bf16", "bfloat16")])
def test_a_query_says_where_its_models_run_in_one_line(precision, dtype, built_index, capsys):
    from img2prompt.cli import main

    extra = ["--precision", precision] if precision else []
    assert main(["search", str(built_index), "--text", "a cat", "--k", "2", "--device", "cpu", *extra]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"models on cpu ({dtype})"]  # not the old "INFO …models: CLIP … sha256=…" line
    assert main(["-q", "search", str(built_index), "--text", "a cat", "--k", "2", "--device", "cpu"]) == 0
    assert "models on" not in capsys.readouterr().err  # quiet: warnings only


def test_build_and_score_say_where_their_models_run(tmp_path, corpus_file, tiny_clip_dir, capsys):
    from img2prompt.cli import main

    assert main(["build", str(corpus_file), "--out", str(tmp_path / "idx"), "--clip-model", str(tiny_clip_dir),
                 "--device", "cpu,cpu", "--shard-size", "96"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "models" in line and "on" in line] == ["models on cpu,cpu (float32)"]
    assert not [line for line in lines if "sha256" in line]
    labels = tmp_path / "labels.csv"
    labels.write_text("imgId,prompt\nimg0,a cat\n")
    assert main(["score", "--labels", str(labels), "--captions", str(labels), "--device", "cpu"]) == 0
    assert capsys.readouterr().err.splitlines() == ["models on cpu (float32)"]
