"""Several CLIP models in one index, end to end: build --clip-model A --clip-model B (members that tokenize
and preprocess differently), the manifest's identity per model, --model-weights in search / submit / eval,
and eval sweeping the weights; checked against each member's own vectors."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import img2prompt
from conftest import DATA, read_data_prompts, run_cli
from img2prompt.encoders.text import clip_text_embeddings
from img2prompt.errors import UserError
from img2prompt.encoders.models import load_clip
from img2prompt.stand_in import TINY_CLIP_CONFIG, write_tiny_clip

IMAGES = sorted((DATA / "images").glob("*.png"))
PROMPTS = read_data_prompts(60)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """Another architecture: 48-pixel images, 32-d vectors, an 8-token context (so another tokenization)."""
    config = {**TINY_CLIP_CONFIG, "embed_dim": 32, "vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "image_size": 48},
              "text_cfg": {**TINY_CLIP_CONFIG["text_cfg"], "context_length": 8}}
    return write_tiny_clip(tmp_path_factory.mktemp("models") / "wide-clip", seed=3, config=config)


@pytest.fixture(scope="module")
def fused_index(tmp_path_factory, tiny_clip_dir, wide_dir, text_model):
    folder = tmp_path_factory.mktemp("fused")
    corpus = folder / "prompts.txt"
    corpus.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    pairs = folder / "pairs.csv"
    pd.DataFrame({"image": [str(path) for path in IMAGES], "prompt": read_data_prompts(106)[100:106]}).to_csv(
        pairs, index=False)
    result = run_cli("build", corpus, "--pairs", pairs, "--out", folder / "idx", "--clip-model", tiny_clip_dir,
                     "--clip-model", wide_dir, "--device", "cpu", "--shard-size", "25", "-q")
    assert result.returncode == 0, result.stderr
    return folder / "idx"


@pytest.fixture(scope="module")
def fused(fused_index):
    with img2prompt.open_index(fused_index, device="cpu") as index:
        yield index


def test_keys_are_each_members_vectors_side_by_side(fused, tiny_clip_dir, wide_dir):
    from img2prompt.encoders.clip_ensemble import ClipEnsemble
    from img2prompt.encoders.image_embed import embed_images

    identity = fused.manifest["models"]["clip"]
    small, wide = load_clip(str(tiny_clip_dir), device="cpu"), load_clip(str(wide_dir), device="cpu")
    assert [member["sha256"] for member in identity["members"]] == [small.sha256, wide.sha256]
    assert identity["dim"] == small.dim + wide.dim == 96
    index = fused.session.index
    half = np.sqrt(0.5)
    text_keys = np.hstack([half * clip_text_embeddings(small, PROMPTS).vectors,
                           half * clip_text_embeddings(wide, PROMPTS).vectors])
    np.testing.assert_allclose(index.clip_vectors[:60].astype(np.float32), text_keys, atol=2e-3)
    image_keys = np.hstack([half * embed_images(ClipEnsemble([small]), IMAGES).vectors, half * embed_images(ClipEnsemble([wide]), IMAGES).vectors])
    np.testing.assert_allclose(index.clip_vectors[60:].astype(np.float32), image_keys, atol=2e-3)
    assert fused.manifest["corpus"]["clip_truncated"] > 0  # the 8-token member cuts most prompts


def test_model_weights_score_by_the_weighted_cosines(fused, tiny_clip_dir):
    small = load_clip(str(tiny_clip_dir), device="cpu")
    query = "a castle on a hill"
    index = fused.session.index
    alone = clip_text_embeddings(small, [query]).vectors[0]
    # weights (1, 0): the first model's cosine alone, i.e. its part of each key (scaled by √½) times √2
    by_hand = index.clip_vectors[:60, :64].astype(np.float32) @ alone * np.sqrt(2)
    found = fused.search_texts([query], k=5, model_weights="1,0")[0]
    np.testing.assert_array_equal(found.ids, np.argsort(-by_hand, kind="stable")[:5])
    np.testing.assert_allclose(found.scores, np.sort(by_hand)[::-1][:5], atol=1e-4)
    assert not np.array_equal(fused.search_texts([query], k=5)[0].ids, found.ids)  # equal weights rank otherwise
    with pytest.raises(UserError, match="gives 3 weights but the index holds 2 CLIP models"):
        fused.search_texts([query], model_weights="1,1,1")
    assert not np.allclose(fused.predict(IMAGES[:2], k=4, model_weights=[0.9, 0.1]),
                           fused.predict(IMAGES[:2], k=4), atol=1e-4)


def test_model_weights_refit_the_image_key_calibration(fused):
    from img2prompt.index.calibration import fit_calibration
    from img2prompt.encoders.clip_ensemble import weighted_query

    index, retriever = fused.session.index, fused.session.retriever
    assert retriever.calibration_for([0.5, 0.5]) == index.calibration  # the build's own, for equal weights
    refit = retriever.calibration_for([0.8, 0.2])
    by_hand = fit_calibration(index.clip_vectors, index.minilm, (0, 60), (60, 66), index.prompt_rows,
                              lambda texts: fused.session.clip.text_embeddings(texts).vectors,
                              weigh=lambda queries: weighted_query(queries, [64, 32], [0.8, 0.2]))["maps"]
    assert refit == by_hand and refit != index.calibration
    query = index.clip_vectors[60:61].astype(np.float32)
    raw = weighted_query(query, [64, 32], [0.8, 0.2]) @ index.clip_vectors.astype(np.float32).T
    fit = refit["image"]["image"]
    expected = np.concatenate([raw[0, :60], fit["scale"] * raw[0, 60:] + fit["offset"]])
    found = retriever.search(query, 8, model_weights=[0.8, 0.2])
    np.testing.assert_allclose(found.scores[0], np.sort(expected)[::-1][:8], atol=1e-4)


@pytest.mark.slow
def test_cli_takes_one_value_per_model(fused_index, tiny_clip_dir, tmp_path):
    listed = run_cli("search", fused_index, "--text", "a castle", "--k", "3", "--model-weights", "1,0", "--json", "-q")
    assert listed.returncode == 0, listed.stderr
    one = run_cli("search", fused_index, "--text", "a castle", "--clip-model", tiny_clip_dir, "-q")
    assert one.returncode == 2 and "ensemble of 2 CLIP models" in one.stderr
    submitted = run_cli("submit", fused_index, DATA / "images", "--out", tmp_path / "s.csv", "--model-weights",
                        "0.25,0.75", "--json", "-q")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["settings"]["model_weights"] == [0.25, 0.75]


def test_eval_sweeps_model_weights_from_one_encoding(fused, tmp_path):
    from img2prompt.query.eval_options import eval_options
    from img2prompt.query.evaluate import run_eval

    labels = tmp_path / "labels.csv"
    pd.DataFrame({"imgId": [path.stem for path in IMAGES],
                  "prompt": read_data_prompts(200)[150:156]}).to_csv(labels, index=False)
    options = dict(labels=str(labels), images=str(DATA / "images"), progress=False, k=3, temperature=0.1)
    report = run_eval(fused.session, eval_options(**options, sweep=True, sweep_k=(3,), sweep_temperature=(0.1,),
                                                 sweep_alpha=(0.0,), sweep_consensus=(0.0,), sweep_beta=(0.0,),
                                                 sweep_weighting=("softmax",)))
    rows = {tuple(row["model_weights"]): row["score"] for row in report["sweep"]}
    assert set(rows) == {(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.75, 0.25), (0.25, 0.75)}
    for weights, score in rows.items():  # each weighting's row equals a separate run with those weights
        single = run_eval(fused.session, eval_options(**options, model_weights=list(weights)))
        assert single["score"] == pytest.approx(score, abs=1e-6)
    assert report["switches"]["models"]["swept"] == [list(w) for w in rows]
    assert len(report["switches"]["models"]["clip"]) == 2


def test_kit_carries_one_clip_folder_per_model(fused_index, tmp_path, tiny_clip_dir):
    from img2prompt.kit.clip import verify_kit_clip, write_clip_folders
    from img2prompt.kit.files import copy_index

    manifest, _ = copy_index(fused_index, tmp_path / "kit" / "index")
    names, _ = write_clip_folders(manifest["models"]["clip"], None, tmp_path / "kit")
    assert names == ["clip-1", "clip-2"] and all((tmp_path / "kit" / name / "open_clip_config.json").is_file()
                                                 for name in names)
    verify_kit_clip(tmp_path / "kit" / "index", [tmp_path / "kit" / name for name in names])
    with pytest.raises(UserError, match="CLIP member 1 of 2"):  # the folders swapped: refused, member named
        verify_kit_clip(tmp_path / "kit" / "index", [tmp_path / "kit" / name for name in reversed(names)])
    with pytest.raises(UserError, match="holds 2 CLIP models but 1 --clip-weights"):
        write_clip_folders(manifest["models"]["clip"], [str(tiny_clip_dir)], tmp_path / "other")
