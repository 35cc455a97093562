"""interrogate: the modifier vocabulary mined at build time, readable prompts, and their score in eval."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import img2prompt
from conftest import KAGGLE_SAMPLE, needs_shared, read_data_prompts
from img2prompt.build_index.phrases import mine_phrases, prompt_modifiers
from img2prompt.errors import UserError
from img2prompt.query.interrogate import compose, rank_modifiers


def test_phrase_mining_gives_exactly_the_frequent_modifiers():
    corpus = ["a cat, Octane Render, by Greg Rutkowski", "a dog,octane  render, 4k",
              "octane render, a subject segment is not a modifier", "a fox, by greg rutkowski, 4k, 4k",
              "a cow, x, by greg rutkowski, octane render", "a hen, " + "y" * 80]
    assert prompt_modifiers("a fox, by greg rutkowski, 4k, 4k") == ["by greg rutkowski"]  # "4k": too short
    assert mine_phrases(corpus, min_count=2) == [("by greg rutkowski", 3), ("octane render", 3)]
    assert mine_phrases(corpus, min_count=3, max_phrases=1) == [("by greg rutkowski", 3)]


def test_ranking_skips_what_the_base_prompt_holds():
    vectors = np.eye(3, dtype=np.float32)
    phrases = ["octane render", "by greg rutkowski", "4k uhd"]
    query = np.array([0.9, 0.5, 0.1], dtype=np.float32)
    ranked = rank_modifiers(query, vectors, phrases, "a castle, Octane Render", count=2)
    assert [m["phrase"] for m in ranked] == ["by greg rutkowski", "4k uhd"]
    assert compose("a castle,", ranked) == "a castle, by greg rutkowski, 4k uhd"


@pytest.fixture(scope="module")
def copied(built_index, tmp_path_factory):
    return shutil.copytree(built_index, tmp_path_factory.mktemp("interrogate") / "idx")


def test_the_build_stores_the_vocabulary(copied, clip):
    from img2prompt.encoders.text import clip_text_embeddings
    from img2prompt.index.reader import open_index

    index = open_index(copied)
    phrases, vectors = index.phrases
    assert phrases == [phrase for phrase, _ in mine_phrases(read_data_prompts(160))] and phrases
    np.testing.assert_allclose(np.asarray(vectors, np.float32), clip_text_embeddings(clip, phrases).vectors, atol=2e-3)
    assert index.manifest["phrases"]["count"] == len(phrases)


def test_a_planted_phrase_is_returned_first(copied, sample_images, clip):
    from img2prompt.encoders.clip_ensemble import ClipEnsemble
    from img2prompt.encoders.image_embed import embed_images

    image = sorted(sample_images.iterdir())[0]
    with img2prompt.open_index(copied, device="cpu") as index:
        phrases, _ = index.session.index.phrases
        base = index.interrogate([image])[0].base
    planted = next(row for row, phrase in enumerate(phrases) if phrase not in base.casefold())
    vectors = np.fromfile(copied / "phrases.f16", dtype=np.float16).reshape(len(phrases), -1)
    vectors[planted] = embed_images(ClipEnsemble([clip]), [image]).vectors[0]  # this phrase now "is" the image for CLIP
    vectors.tofile(copied / "phrases.f16")
    with img2prompt.open_index(copied, device="cpu") as index:
        result = index.interrogate([image, sample_images / "missing.png"], modifiers=3)[0]
    assert result.modifiers[0]["phrase"] == phrases[planted]
    assert result.modifiers[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert result.prompt == compose(result.base, result.modifiers) and len(result.modifiers) == 3


def test_an_index_without_vocabulary_says_so(copied, tmp_path, sample_images):
    old = shutil.copytree(copied, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    for name in ("phrases.parquet", "phrases.f16"):
        manifest["files"].pop(name)
    (old / "manifest.json").write_text(json.dumps(manifest))
    with img2prompt.open_index(old, device="cpu") as index:
        with pytest.raises(UserError, match="has no phrase vocabulary .*rebuild it with this img2prompt"):
            index.interrogate(sorted(sample_images.iterdir()))


@needs_shared("kaggle-sample")
def test_eval_scores_the_readable_prompt(built_index, text_model):
    import pandas as pd

    from img2prompt.query.eval_options import eval_options
    from img2prompt.query.evaluate import run_eval

    labels = pd.read_csv(KAGGLE_SAMPLE / "prompts.csv")
    images = [KAGGLE_SAMPLE / "images" / f"{image_id}.png" for image_id in labels["imgId"]]
    with img2prompt.open_index(built_index, device="cpu") as index:
        report = run_eval(index.session, eval_options(labels=str(KAGGLE_SAMPLE / "prompts.csv"), k=3,
                                                     images=str(KAGGLE_SAMPLE / "images"), progress=False))
        texts = [result.prompt for result in index.interrogate(images)]
    predicted = text_model.model.encode(texts, normalize_embeddings=True)
    truth = text_model.model.encode(labels["prompt"].tolist(), normalize_embeddings=True)
    assert report["interrogate"]["score"] == pytest.approx(float((predicted * truth).sum(1).mean()), abs=1e-5)
