"""build --embeddings: precomputed CLIP vectors (clip-retrieval / autofaiss layout) replace the encoder,
checked for count, dim, norm and for coming from the given model."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import img2prompt
from conftest import read_data_prompts
from img2prompt.encoders.text import clip_text_embeddings
from img2prompt.errors import UserError
from img2prompt.index.reader import open_index


@pytest.fixture(scope="module")
def exchange(tmp_path_factory, clip):
    """Two parquet files (caption column) and two .npy files cut at other places, row-aligned overall.
    Rows 3 (a duplicate of row 0) and 7 (empty) are skipped by the build, so vectors must follow ids."""
    folder = tmp_path_factory.mktemp("exchange")
    captions = read_data_prompts(40)
    captions[3], captions[7] = captions[0], "   "
    pq.write_table(pa.table({"caption": captions[:25]}), folder / "meta_0.parquet")
    pq.write_table(pa.table({"caption": captions[25:]}), folder / "meta_1.parquet")
    vectors = clip_text_embeddings(clip, [c if c.strip() else "x" for c in captions]).vectors
    (folder / "emb").mkdir()
    np.save(folder / "emb" / "text_emb_0.npy", vectors[:30].astype(np.float16))
    np.save(folder / "emb" / "text_emb_1.npy", vectors[30:].astype(np.float16))
    return folder, captions, vectors


def build(folder, out, clip, **options):
    return img2prompt.build([str(folder / "meta_*.parquet")], out, clip_model=clip.name, column="caption",
                            device="cpu", progress=False, shard_size=16, **options)


def test_precomputed_vectors_are_indexed_by_prompt_id(exchange, clip, tmp_path):
    folder, captions, vectors = exchange
    result = build(folder, tmp_path / "idx", clip, embeddings=[str(folder / "emb")])
    index = open_index(tmp_path / "idx")
    kept = [row for row in range(40) if row not in (3, 7)]
    assert index.prompts == [captions[row] for row in kept] and result.report["skipped"] == {"duplicate": 1, "empty": 1}
    np.testing.assert_array_equal(np.asarray(index.clip_vectors), vectors[kept].astype(np.float16))
    assert result.manifest["build"]["embeddings"][0]["path"].endswith("text_emb_0.npy")


@pytest.mark.parametrize("case, message", [
    ("dim", r"--embeddings have dim 32, the CLIP model gives 64"),
    ("rows", r"--embeddings hold 39 rows but the corpus has 40"),
    ("norm", r"text_emb_1.npy, row 2: vector norm 2.0000, expected 1"),
    ("model", r"the --embeddings do not match CLIP .* \(mean cosine"),
])
def test_bad_precomputed_vectors_are_refused(exchange, clip, other_clip_dir, tmp_path, case, message):
    from img2prompt.encoders.models import load_clip

    folder, _, vectors = exchange
    vectors = vectors.copy()
    if case == "dim":
        vectors = vectors[:, :32]
    elif case == "rows":
        vectors = vectors[:39]
    elif case == "norm":
        vectors[32] *= 2
    elif case == "model":
        vectors = clip_text_embeddings(load_clip(str(other_clip_dir)), read_data_prompts(40)).vectors
    np.save(tmp_path / "a.npy", vectors[:30])
    np.save(tmp_path / "b.npy", vectors[30:])
    np.save(tmp_path / "text_emb_1.npy", vectors[30:])
    files = [str(tmp_path / "a.npy"), str(tmp_path / ("text_emb_1.npy" if case == "norm" else "b.npy"))]
    with pytest.raises(UserError, match=message):
        build(folder, tmp_path / "idx", clip, embeddings=files)
    assert not (tmp_path / "idx" / "clip.f16").exists()
