"""Low memory instead of out-of-memory: an OOM injected at the tower seam halves the rows per call (same
vectors, one warning); --precision for the towers, validated and recorded by a build."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from conftest import read_data_prompts
from img2prompt.encoders import low_memory
from img2prompt.encoders.clip_ensemble import load_named_clips
from img2prompt.errors import UserError


def _fail_above(real, rows: int, calls: list):
    """The tower call, refusing (as CUDA would) any batch of more than `rows` rows."""
    def tower(clip, tensor, *args, **kwargs):
        calls.append(int(tensor.shape[0]))
        if tensor.shape[0] > rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(clip, tensor, *args, **kwargs)
    return tower


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(low_memory, "_warned", [])  # "said once" is per process: this test's process


def test_oom_halves_the_batch_with_the_same_vectors_and_one_warning(tiny_clip_dir, sample_images, monkeypatch,
                                                                    caplog, fresh_warning):
    from img2prompt.encoders import clip_ensemble, text
    from img2prompt.encoders.image_embed import embed_images

    prompts = read_data_prompts(40)
    images = sorted(str(path) for path in sample_images.iterdir())
    plain = load_named_clips(str(tiny_clip_dir), None, "cpu")
    texts = plain.text_embeddings(prompts, batch_size=16).vectors
    pictures = embed_images(plain, images, batch_size=4, workers=0).vectors

    text_calls, image_calls = [], []
    monkeypatch.setattr(text, "clip_encode_text", _fail_above(text.clip_encode_text, 3, text_calls))
    monkeypatch.setattr(clip_ensemble, "clip_encode_image", _fail_above(clip_ensemble.clip_encode_image, 1,
                                                                        image_calls))
    squeezed = load_named_clips(str(tiny_clip_dir), None, "cpu")
    with caplog.at_level(logging.WARNING, logger="img2prompt"):
        got_texts = squeezed.text_embeddings(prompts, batch_size=16).vectors
        got_pictures = embed_images(squeezed, images, batch_size=4, workers=0).vectors
    np.testing.assert_allclose(got_texts, texts, atol=1e-6)
    np.testing.assert_allclose(got_pictures, pictures, atol=1e-6)
    assert text_calls[:4] == [16, 8, 4, 2] and max(text_calls[4:]) == 2  # halved, then kept down
    assert image_calls[:3] == [4, 2, 1] and max(image_calls[3:]) == 1
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "out of GPU memory with 16 rows per batch: retrying with 8" in warnings[0].message


def test_oom_on_a_single_row_is_not_swallowed(tiny_clip_dir, monkeypatch, fresh_warning):
    from img2prompt.encoders import text

    monkeypatch.setattr(text, "clip_encode_text", _fail_above(text.clip_encode_text, 0, []))
    clip = load_named_clips(str(tiny_clip_dir), None, "cpu")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        clip.text_embeddings(["a cat", "a dog"], batch_size=2)


def test_bf16_on_cpu_runs_the_towers_in_bf16_and_a_build_records_it(tiny_clip_dir, corpus_file, tmp_path,
                                                                    monkeypatch):
    from img2prompt.build_index.runner import BuildOptions, run_build
    from img2prompt.encoders import text

    dtypes = []
    real = text.clip_encode_text

    def seen(clip, tokens, *args, **kwargs):
        out = real(clip, tokens, *args, **kwargs)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(text, "clip_encode_text", seen)
    prompts = read_data_prompts(20)
    fp32 = load_named_clips(str(tiny_clip_dir), None, "cpu").text_embeddings(prompts).vectors
    bf16 = load_named_clips(str(tiny_clip_dir), None, "cpu", precision="bf16").text_embeddings(prompts).vectors
    assert dtypes == [torch.float32, torch.bfloat16]
    assert not np.array_equal(fp32, bf16) and (fp32 * bf16).sum(axis=1).min() > 0.98  # rounded, same direction

    out = tmp_path / "idx"
    run_build(BuildOptions(corpus=[str(corpus_file)], out=str(out), clip_model=str(tiny_clip_dir), shard_size=96,
                           batch_size=32, device="cpu", precision="bf16", progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["precision"] == "bf16-autocast"
    import img2prompt

    with img2prompt.open_index(out, device="cpu", precision="bf16") as index:  # the same vectors as the keys
        found = index.search_texts(read_data_prompts(3), k=1)
    assert [result.prompts[0] for result in found] == read_data_prompts(3)


@pytest.mark.parametrize("make", ["build", "query"])
def test_a_bad_precision_is_a_one_line_error_before_any_model(make, corpus_file, tmp_path):
    from img2prompt.build_index.runner import BuildOptions, run_build
    from img2prompt.query.session import ModelOverrides

    with pytest.raises(UserError) as caught:
        if make == "build":
            run_build(BuildOptions(corpus=[str(corpus_file)], out=str(tmp_path / "x"), clip_model="never-loaded",
                                   device="cpu", precision="fp8", progress=False))
        else:
            ModelOverrides(precision="fp8")
    assert str(caught.value) == "--precision must be one of fp32, fp16, bf16 (got 'fp8')"
    assert not (tmp_path / "x").exists()


def test_add_encodes_in_the_precision_the_index_was_built_in(tiny_clip_dir, tmp_path):
    """A bf16 index grown by add: the new rows are bf16 vectors (as a bf16 build of all prompts), never fp32."""
    import img2prompt
    from img2prompt.build_index.runner import BuildOptions, run_build
    from img2prompt.index.reader import open_index

    prompts = read_data_prompts(60)
    first, second, everything = (tmp_path / name for name in ("first.txt", "second.txt", "all.txt"))
    first.write_text("\n".join(prompts[:40]) + "\n")
    second.write_text("\n".join(prompts[40:]) + "\n")
    everything.write_text("\n".join(prompts) + "\n")
    grown, whole = tmp_path / "grown", tmp_path / "whole"
    for corpus, out in ((first, grown), (everything, whole)):
        run_build(BuildOptions(corpus=[str(corpus)], out=str(out), clip_model=str(tiny_clip_dir), shard_size=96,
                               batch_size=32, device="cpu", precision="bf16", progress=False))
    img2prompt.add(str(grown), [str(second)], device="cpu", batch_size=32)
    manifest = json.loads((grown / "manifest.json").read_text())
    assert manifest["build"]["precision"] == "bf16-autocast"
    np.testing.assert_allclose(np.asarray(open_index(grown).clip_vectors[40:], dtype=np.float32),
                               np.asarray(open_index(whole).clip_vectors[40:], dtype=np.float32), atol=2e-3)
