"""The public Python API: three lines to predictions, one trunk with the CLI, models loaded once."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import img2prompt
from conftest import DATA, read_data_prompts, run_cli


@pytest.fixture(scope="module")
def opened(built_index):
    with img2prompt.open_index(built_index, device="cpu") as index:
        yield index


def test_three_lines_to_predictions(built_index, sample_images):
    with img2prompt.open_index(built_index, device="cpu") as index:
        vectors = index.predict(sorted(sample_images.iterdir()))
    assert vectors.dtype == np.float32 and vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert img2prompt.__version__ and "open_index" in img2prompt.__all__


def test_predict_equals_the_cli_submission(built_index, sample_images, opened, tmp_path):
    out = tmp_path / "s.csv"
    result = run_cli("submit", built_index, sample_images, "--out", out, "--k", "3", "--temperature", "0.1",
                     "--alpha", "0.2", "--device", "cpu", "-q")
    assert result.returncode == 0, result.stderr
    from_cli = pd.read_csv(out)["val"].to_numpy().reshape(4, 384)
    from_api = opened.predict(sorted(sample_images.iterdir()), k=3, temperature=0.1, alpha=0.2)
    np.testing.assert_allclose(from_api, from_cli, atol=1e-7)


@pytest.mark.slow
def test_search_equals_the_cli_json(built_index, opened):
    texts = read_data_prompts(12)[5:7]
    image = DATA / "images" / "sample01.png"
    result = run_cli("search", built_index, "--text", texts[0], "--text", texts[1], "--k", "4", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [r.to_dict() for r in opened.search_texts(texts, k=4)]
    assert [r.ids[0] for r in opened.search_texts(texts, k=4)] == [5, 6]
    result = run_cli("search", built_index, "--image", image, "--k", "3", "--json")
    assert json.loads(result.stdout) == [r.to_dict() for r in opened.search_images([str(image)], k=3)]
    assert opened.prompts([5, -1]) == [texts[0], ""]


def test_pil_images_and_paths_give_the_same_predictions(opened, sample_images):
    from PIL import Image

    paths = sorted(sample_images.iterdir())
    with Image.open(paths[1]) as image:
        pil = image.copy()
    np.testing.assert_array_equal(opened.predict([pil], k=5), opened.predict([paths[1]], k=5))
    assert opened.search_images([pil], k=2)[0].query == "<image 0>"


def test_models_and_backend_load_once_per_open(built_index, sample_images, tmp_path, monkeypatch):
    import img2prompt.index.reader as index_format
    import img2prompt.encoders.clip_ensemble as session_module  # where the index's CLIP models are loaded

    loads = {"clip": 0, "backend": 0}
    load_clip, open_backend = session_module.load_clip, index_format.PromptIndex.open_backend

    def counting_load_clip(*args, **kwargs):
        loads["clip"] += 1
        return load_clip(*args, **kwargs)

    def counting_open_backend(self, *args, **kwargs):
        loads["backend"] += 1
        return open_backend(self, *args, **kwargs)

    monkeypatch.setattr(session_module, "load_clip", counting_load_clip)
    monkeypatch.setattr(index_format.PromptIndex, "open_backend", counting_open_backend)
    with img2prompt.open_index(built_index, device="cpu") as index:
        for round_number in range(3):
            index.predict(sorted(sample_images.iterdir()), k=2)
            index.search_texts(["a castle"], k=2)
            index.submission(sample_images, tmp_path / f"s{round_number}.csv", progress=False, k=2)
    assert loads == {"clip": 1, "backend": 1}


def test_submission_rows_follow_image_ids_not_positions(opened, sample_images, tmp_path):
    """With the missing image in the middle of the sample, every present image keeps its own vector."""
    ids = ["img2", "ghost", "img0", "img3"]
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"imgId_eId": [f"{i}_{d}" for i in ids for d in range(384)], "val": 0.0}).to_csv(sample, index=False)
    opened.submission(sample_images, tmp_path / "s.csv", sample, progress=False, k=3)
    values = pd.read_csv(tmp_path / "s.csv")["val"].to_numpy().reshape(4, 384)
    for row, image_id in enumerate(ids):
        if image_id != "ghost":
            np.testing.assert_allclose(values[row], opened.predict([sample_images / f"{image_id}.png"], k=3)[0],
                                       atol=1e-7, err_msg=image_id)


@pytest.mark.slow
def test_approximate_index_through_build_and_submit_with_workers(tmp_path, tiny_clip_dir, corpus_file,
                                                                 sample_images, opened):
    """build --index hnsw → submit with DataLoader workers: the same predictions as the flat index."""
    result = img2prompt.build(corpus_file, tmp_path / "hnsw", clip_model=str(tiny_clip_dir), index="hnsw",
                              shard_size=64, batch_size=32, device="cpu", progress=False)
    assert result.manifest["search"]["kind"] == "hnsw" and (tmp_path / "hnsw" / "clip.faiss").is_file()
    with img2prompt.open_index(tmp_path / "hnsw", device="cpu") as approximate:
        report = approximate.submission(sample_images, tmp_path / "s.csv", progress=False, k=5, workers=2,
                                        batch_size=2)
        assert report.predicted == 4
    values = pd.read_csv(tmp_path / "s.csv")["val"].to_numpy().reshape(4, 384)
    np.testing.assert_allclose(values, opened.predict(sorted(sample_images.iterdir()), k=5), atol=1e-6)


def test_errors_are_exceptions_not_exits(tmp_path):
    with pytest.raises(img2prompt.UserError, match="index folder not found"):
        img2prompt.open_index(tmp_path / "nowhere")


@pytest.mark.slow
def test_an_open_index_keeps_its_files_when_a_rebuild_is_swapped_in(tmp_path, tiny_clip_dir):
    """A long-running reader (the server) opened the old index; --overwrite swaps a new one into the folder:
    the reader keeps answering from the files it opened, never a mix of old and new."""
    prompts = read_data_prompts(200)
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("\n".join(prompts[:80]) + "\n")
    second.write_text("\n".join(prompts[100:200]) + "\n")
    out = tmp_path / "index"
    options = {"clip_model": str(tiny_clip_dir), "device": "cpu", "progress": False, "shard_size": 40}
    img2prompt.build(first, out, **options)
    with img2prompt.open_index(out, device="cpu") as reader:
        before = [r.to_dict() for r in reader.search_texts(prompts[:3], k=4)]
        mean = reader.predict([DATA / "images" / "sample00.png"], alpha=1.0)
        img2prompt.build(second, out, overwrite=True, **options)
        assert [r.to_dict() for r in reader.search_texts(prompts[:3], k=4)] == before
        np.testing.assert_array_equal(reader.predict([DATA / "images" / "sample00.png"], alpha=1.0), mean)
    with img2prompt.open_index(out, device="cpu") as fresh:
        assert fresh.count == 100 and fresh.prompts([0]) == [prompts[100]]
