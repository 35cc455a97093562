"""Issue 15's switches end to end: image-keyed entries (build --pairs) with calibrated scores, the regression
head (--beta), consensus (--consensus), and eval sweeping them; each checked against a hand computation."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

import img2prompt
from conftest import DATA, read_data_prompts, run_cli
from img2prompt.errors import UserError
from img2prompt.query.blend import blend, normalise_rows

IMAGES = sorted((DATA / "images").glob("*.png"))  # six small generated images


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """The six images with prompts, plus a missing file, an undecodable one and a repeated image."""
    folder = tmp_path_factory.mktemp("pairs")
    (folder / "broken.png").write_bytes(b"not an image")
    prompts = read_data_prompts(200)[100:106]
    rows = [(str(path), prompt) for path, prompt in zip(IMAGES, prompts)]
    rows += [("nowhere.png", "an image that is not there"), ("broken.png", "an undecodable image"),
             (str(IMAGES[0]), "the first image listed again")]
    path = folder / "pairs.csv"
    pd.DataFrame(rows, columns=["image", "prompt"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def pairs_index(tmp_path_factory, tiny_clip_dir, pairs_file, text_model):
    corpus = tmp_path_factory.mktemp("corpus") / "prompts.txt"
    corpus.write_text("\n".join(read_data_prompts(80)) + "\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("index") / "idx"
    img2prompt.build([str(corpus)], out, clip_model=str(tiny_clip_dir), pairs=[str(pairs_file)], shard_size=32,
                     batch_size=16, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def opened_pairs(pairs_index):
    with img2prompt.open_index(pairs_index, device="cpu") as index:
        yield index


def test_pairs_become_image_keyed_rows_after_the_text_rows(pairs_index, opened_pairs, clip):
    from img2prompt.encoders.clip_ensemble import ClipEnsemble
    from img2prompt.encoders.image_embed import embed_images

    manifest = opened_pairs.manifest
    assert [(entry["keys"], entry["rows"]) for entry in manifest["key_ranges"]] == [("text", [0, 80]),
                                                                                   ("image", [80, 86])]
    assert manifest["corpus"]["pairs"]["read"] == 9 and manifest["corpus"]["pairs"]["kept"] == 6
    assert manifest["corpus"]["pairs"]["skipped"] == {"duplicate_image": 1, "unreadable_image": 2}
    index = opened_pairs.session.index
    assert index.prompt_rows(range(80, 86)) == read_data_prompts(200)[100:106]
    keys = pd.read_parquet(pairs_index / "prompts.parquet")
    assert keys["id"].tolist() == list(range(86))  # ids are positions, whatever the shard plan
    assert keys["key"].tolist() == ["text"] * 80 + ["image"] * 6
    # the keys are the CLIP image vectors of the images (fp16 on disk)
    np.testing.assert_allclose(index.clip_vectors[80:86].astype(np.float32), embed_images(ClipEnsemble([clip]), IMAGES).vectors,
                               atol=2e-3)


def test_search_merges_key_kinds_on_calibrated_scores(opened_pairs):
    index = opened_pairs.session.index
    fit = index.calibration["image"]["image"]
    query = index.clip_vectors[80:81].astype(np.float32)  # the first pair image as a query
    raw = query @ index.clip_vectors.astype(np.float32).T
    by_hand = raw[0].copy()
    by_hand[80:] = fit["scale"] * raw[0, 80:] + fit["offset"]  # image keys onto the text keys' scale
    order = np.argsort(-by_hand, kind="stable")[:10]
    found = opened_pairs.session.retriever.search(query, 10)
    np.testing.assert_array_equal(found.ids[0], order)
    np.testing.assert_allclose(found.scores[0], by_hand[order], atol=1e-5)
    assert fit["scale"] != 1.0 and (order >= 80).any() and (order < 80).any()  # both kinds in one list
    text_found = opened_pairs.session.retriever.search(query, 10, query_kind="text")  # another map for text
    text_fit = index.calibration["text"]["image"]
    assert text_fit != fit and np.isin(80, text_found.ids[0])


@pytest.mark.slow
def test_search_results_say_which_kind_each_hit_is(opened_pairs, pairs_index):
    result = opened_pairs.search_images([IMAGES[0]], k=86)[0]
    assert sorted(set(result.keys)) == ["image", "text"]
    assert [key for key, i in zip(result.keys, result.ids) if i >= 80] == ["image"] * 6
    listed = json.loads(run_cli("search", pairs_index, "--image", IMAGES[0], "--k", "86", "--json",
                                "--device", "cpu", "-q").stdout)
    assert [hit["key"] for hit in listed[0]["results"]] == result.keys
    table = run_cli("search", pairs_index, "--image", IMAGES[0], "--k", "86", "--device", "cpu", "-q").stdout
    assert table.count("[image key]") == 6


def test_beta_mixes_the_ridge_head_by_hand(opened_pairs):
    from img2prompt.encoders.image_embed import embed_images

    index = opened_pairs.session.index
    head = index.regression_head
    assert set(head.key_means) == {"text", "image"}  # the image mean comes from the image-keyed rows
    predictions, results = opened_pairs.predict_with_neighbours(IMAGES[:2], k=5, temperature=0.1, beta=0.3)
    queries = embed_images(opened_pairs.session.clip, IMAGES[:2]).vectors.astype(np.float64)
    ridge = normalise_rows((queries - head.key_means["image"]) @ head.weights.astype(np.float64) + head.target_mean)
    scores, ids = np.stack([r.scores for r in results]), np.stack([r.ids for r in results])
    knn = blend(scores, ids, index.minilm, k=5, temperature=0.1).astype(np.float64)
    np.testing.assert_allclose(predictions, normalise_rows(0.7 * knn + 0.3 * ridge), atol=1e-5)
    np.testing.assert_allclose(opened_pairs.predict(IMAGES[:2], k=5, temperature=0.1, beta=1.0), ridge, atol=1e-5)


def test_consensus_reaches_the_prediction(opened_pairs):
    index = opened_pairs.session.index
    predictions, results = opened_pairs.predict_with_neighbours(IMAGES[:1], k=6, temperature=0.5, consensus=4.0)
    expected = blend(results[0].scores[None], results[0].ids[None], index.minilm, k=6, temperature=0.5, consensus=4.0)
    np.testing.assert_allclose(predictions, expected, atol=1e-6)
    assert not np.allclose(predictions, opened_pairs.predict(IMAGES[:1], k=6, temperature=0.5), atol=1e-4)


def test_head_without_image_keys_needs_a_batch_or_an_image_mean(built_index, sample_images):
    with img2prompt.open_index(built_index, device="cpu") as index:
        with pytest.raises(UserError, match="image-key mean: this index has no image-keyed entries"):
            index.predict(sorted(sample_images.iterdir()), beta=0.5)  # 4 images: too few to estimate it
        from img2prompt.query.predict import head_predictions

        vectors = np.random.default_rng(0).normal(size=(20, index.session.index.clip_dim)).astype(np.float32)
        ok = np.ones(20, bool)
        ok[3] = False  # a failed image is not part of the mean, and gets no head vector
        got, source = head_predictions(index.session.index, vectors, ok, "image")
        head = index.session.index.regression_head
        expected = normalise_rows((vectors[ok] - vectors[ok].mean(axis=0)) @ head.weights + head.target_mean)
        assert source == "queries" and not got[3].any()
        np.testing.assert_allclose(got[ok], expected, atol=1e-5)


@pytest.mark.slow
def test_no_head_is_a_one_line_error(tmp_path, tiny_clip_dir, corpus_file, sample_images):
    out = tmp_path / "idx"
    result = run_cli("build", corpus_file, "--out", out, "--clip-model", tiny_clip_dir, "--device", "cpu",
                     "--no-regression-head", "-q")
    assert result.returncode == 0, result.stderr
    assert "regression" not in json.loads((out / "manifest.json").read_text())
    assert not (out / "regression.npz").exists()
    failed = run_cli("submit", out, sample_images, "--out", tmp_path / "s.csv", "--beta", "0.5", "--device", "cpu")
    assert failed.returncode == 2 and "--beta needs the index's regression head" in failed.stderr
    assert not (tmp_path / "s.csv").exists()
    bad = run_cli("submit", out, sample_images, "--out", tmp_path / "s.csv", "--consensus", "-1", "--device", "cpu")
    assert bad.returncode == 2 and "--consensus must be 0 or more" in bad.stderr


def test_eval_sweeps_the_switches_and_reports_them(opened_pairs, tmp_path):
    from img2prompt.query.eval_options import eval_options
    from img2prompt.query.evaluate import run_eval

    labels = tmp_path / "labels.csv"
    pd.DataFrame({"imgId": [path.stem for path in IMAGES],
                  "prompt": read_data_prompts(200)[100:106]}).to_csv(labels, index=False)
    options = dict(labels=str(labels), images=str(DATA / "images"), progress=False, exclude_exact=True)
    report = run_eval(opened_pairs.session, eval_options(**options, sweep=True, sweep_k=(3,), sweep_temperature=(0.1,),
                                                        sweep_alpha=(0.0,), sweep_consensus=(0.0, 2.0),
                                                        sweep_beta=(0.0, 0.5), k=3, temperature=0.1,
                                                        sweep_weighting=("softmax",)))
    settings = {(row["consensus"], row["beta"]): row["score"] for row in report["sweep"]}
    assert set(settings) == {(0.0, 0.0), (0.0, 0.5), (2.0, 0.0), (2.0, 0.5)}
    for (consensus, beta), score in settings.items():  # each grid row equals a separate run with that setting
        single = run_eval(opened_pairs.session, eval_options(**options, k=3, temperature=0.1, consensus=consensus,
                                                            beta=beta))
        assert single["score"] == pytest.approx(score, abs=1e-6)
    switches = report["switches"]
    assert switches["image_keys"]["rows"] == 6 and set(switches["image_keys"]["calibration"]) == {"image", "text"}
    assert switches["regression_head"] == {"in_index": True, "beta": 0.0, "swept": [0.0, 0.5], "query_mean": "index"}
    assert switches["consensus"] == {"gamma": 0.0, "swept": [0.0, 2.0]}
    assert "regression_head" in report["baselines"]
    text = run_eval(opened_pairs.session, eval_options(str(labels), progress=False, sweep=True, sweep_k=(3,),
                                                      sweep_temperature=(0.1,), sweep_alpha=(0.0,), k=3, beta=0.5))
    assert text["settings"]["mode"] == "text" and text["switches"]["regression_head"]["query_mean"] == "index"


def test_pairs_alone_with_an_approximate_index_in_its_own_folder(tmp_path, tiny_clip_dir, pairs_file):
    from img2prompt.kit.files import copy_index

    result = img2prompt.build([], tmp_path / "idx", clip_model=str(tiny_clip_dir), pairs=str(pairs_file),
                              index="hnsw", device="cpu", progress=False)  # one table may be a plain string
    manifest = result.manifest
    assert [(entry["keys"], entry["folder"], entry["search"]["kind"]) for entry in manifest["key_ranges"]] == \
        [("image", "image_keys", "hnsw")] and "calibration" not in manifest
    assert "image_keys/clip.faiss" in manifest["files"] and (tmp_path / "idx" / "image_keys" / "clip.faiss").is_file()
    copied, _ = copy_index(tmp_path / "idx", tmp_path / "kit-index")  # a kit carries the subfolder's files
    with img2prompt.open_index(tmp_path / "kit-index", device="cpu") as index:
        found = index.search_images(IMAGES[:2], k=3)
        assert [result.ids[0] for result in found] == [0, 1] and found[0].keys == ["image"] * 3
        from img2prompt.query.predict import head_predictions

        with pytest.raises(UserError, match="--beta with text queries needs the text-key mean: this index has no "
                                            "text-keyed entries"):
            head_predictions(index.session.index, index.session.index.clip_vectors[:3].astype(np.float32),
                             np.ones(3, bool), "text")


@pytest.mark.slow
def test_build_refuses_nothing_and_embeddings_with_pairs(tmp_path, tiny_clip_dir, pairs_file, corpus_file):
    empty = run_cli("build", "--out", tmp_path / "a", "--clip-model", tiny_clip_dir, "--device", "cpu")
    assert empty.returncode == 2 and "nothing to index" in empty.stderr
    mixed = run_cli("build", corpus_file, "--pairs", pairs_file, "--embeddings", corpus_file, "--out", tmp_path / "b",
                    "--clip-model", tiny_clip_dir, "--device", "cpu")
    assert mixed.returncode == 2 and "cannot be combined with --pairs" in mixed.stderr
    no_column = tmp_path / "p.csv"
    no_column.write_text("path,prompt\nx.png,a cat\n")
    wrong = run_cli("build", corpus_file, "--pairs", no_column, "--out", tmp_path / "c", "--clip-model",
                    tiny_clip_dir, "--device", "cpu")
    assert wrong.returncode == 2 and "no column 'image'" in wrong.stderr and not (tmp_path / "c").exists()
    assert "a --pairs table needs columns 'image' and 'prompt'" in wrong.stderr and "--column" not in wrong.stderr
    missing = run_cli("build", corpus_file, "--pairs", tmp_path / "none.csv", "--out", tmp_path / "d", "--clip-model",
                      tiny_clip_dir, "--device", "cpu")
    assert missing.returncode == 2 and "--pairs file not found" in missing.stderr


def test_pairs_of_one_prompt_cannot_calibrate_and_say_so(tmp_path, tiny_clip_dir, corpus_file):
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"image": [str(path) for path in IMAGES[:3]], "prompt": ["one prompt"] * 3}).to_csv(pairs,
                                                                                                   index=False)
    out = tmp_path / "idx"
    img2prompt.build(str(corpus_file), out, clip_model=str(tiny_clip_dir), pairs=str(pairs), device="cpu",
                     progress=False)
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the manifest"))
    assert {fit["method"] for fit in manifest["calibration"]["fits"].values()} == {"none"}
    with img2prompt.open_index(out, device="cpu") as index:
        found = index.search_images([IMAGES[1]], k=5)[0]
        assert found.ids[0] == 161 and np.isfinite(found.scores).all()  # its own image key, raw cosine ~1
        assert np.isfinite(index.predict([IMAGES[1]], k=index.count)).all()


def test_a_build_with_pairs_resumes_to_the_uninterrupted_result(tmp_path, tiny_clip_dir, pairs_file, monkeypatch):
    from img2prompt.build_index.shard_encoder import ShardEncoder
    from img2prompt.index.reader import open_index

    corpus = tmp_path / "prompts.txt"
    corpus.write_text("\n".join(read_data_prompts(10)) + "\n", encoding="utf-8")
    # shards of 3: four text shards, then pair shards [img0-2], [img3-5], [missing, broken] (empty once encoded)
    options = dict(clip_model=str(tiny_clip_dir), pairs=[str(pairs_file)], shard_size=3, batch_size=8, device="cpu",
                   progress=False)
    reference = img2prompt.build([str(corpus)], tmp_path / "reference", **options).manifest
    encode, calls = ShardEncoder._encode_images, []

    def fail_on_the_second_image_shard(self, shard, root, progress=None):
        calls.append(shard.task.number)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return encode(self, shard, root, progress)

    monkeypatch.setattr(ShardEncoder, "_encode_images", fail_on_the_second_image_shard)
    with pytest.raises(RuntimeError, match="killed"):
        img2prompt.build([str(corpus)], tmp_path / "idx", **options)
    monkeypatch.setattr(ShardEncoder, "_encode_images", encode)
    assert calls == [4, 5]  # pair shards are numbered after the four text shards
    resumed = img2prompt.build([str(corpus)], tmp_path / "idx", resume=True, **options).manifest
    assert resumed["rates"]["encoded_now"] == 3  # only the last two pair shards were encoded again
    assert [record for record in resumed["key_ranges"]] == reference["key_ranges"]
    assert resumed["corpus"] == reference["corpus"] and resumed["corpus"]["pairs"]["kept"] == 6
    ours, theirs = open_index(tmp_path / "idx"), open_index(tmp_path / "reference")
    assert ours.prompts == theirs.prompts and ours.count == 16
    np.testing.assert_array_equal(np.asarray(ours.clip_vectors), np.asarray(theirs.clip_vectors))
    np.testing.assert_array_equal(np.asarray(ours.minilm), np.asarray(theirs.minilm))


def test_image_keyed_tasks_are_not_clip_tokenized(clip, text_model):
    """Their keys are image vectors: CLIP tokens would be work thrown away (tokenizing bounds GPU builds)."""
    from img2prompt.build_index.pipeline import tokenized_shards, tokenizers_for
    from img2prompt.index.writer import ShardTask

    tasks = [ShardTask(0, 0, read_data_prompts(3)), ShardTask(1, 3, read_data_prompts(2), images=["a.png", "b.png"])]
    for workers in (0, 1):  # in-process, and in a spawned tokenizing worker
        text, image = tokenized_shards(iter(tasks), tokenizers_for(clip, text_model), workers)
        assert text.clip_tokens.shape == (3, clip.context_length) and image.clip_tokens is None
        assert len(image.minilm_ids) == 2  # the prompts' MiniLM ids are still made ahead


def test_pairs_dedup_by_the_file_a_path_names(tmp_path):
    """`A.png`, `a.png`, `b  c.png`, `b c.png` are four files (kept); `imgs/../imgs/x.png`, `./imgs/x.png`
    and a symlink to it are `imgs/x.png` again (skipped as duplicates)."""
    from img2prompt.build_index.corpus import CorpusReport
    from img2prompt.build_index.pairs import iter_pairs

    (tmp_path / "imgs").mkdir()
    os.symlink(tmp_path / "imgs" / "x.png", tmp_path / "link.png")
    names = ["A.png", "a.png", "b  c.png", "b c.png", "imgs/x.png", "imgs/../imgs/x.png", "./imgs/x.png",
             str(tmp_path / "imgs" / "x.png"), "link.png"]
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"image": names, "prompt": [f"prompt {n}" for n in range(len(names))]}).to_csv(path, index=False)
    report = CorpusReport()
    kept = list(iter_pairs([path], report))
    assert [image for image, _ in kept] == [str(tmp_path / name) for name in names[:5]]
    assert [prompt for _, prompt in kept] == [f"prompt {n}" for n in range(5)]
    assert (report.read, report.kept, dict(report.skipped)) == (9, 5, {"duplicate_image": 4})


def test_pairs_columns_may_be_dictionary_encoded_and_a_wrong_type_names_the_pairs_columns(tmp_path):
    from img2prompt.build_index.pairs import check_pair_files, iter_pairs

    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"image": pd.Categorical(["a.png", "b.png"]), "prompt": pd.Categorical(["a cat", "a cat"])}
                 ).to_parquet(path)
    check_pair_files([path])
    assert list(iter_pairs([path])) == [(str(tmp_path / "a.png"), "a cat"), (str(tmp_path / "b.png"), "a cat")]
    numbers = tmp_path / "numbers.parquet"
    pd.DataFrame({"image": [1, 2], "prompt": ["a cat", "a dog"]}).to_parquet(numbers)
    with pytest.raises(UserError, match=r"numbers.parquet: column 'image' holds int64, not text: a --pairs table "
                                        r"needs text columns 'image' \(image paths\) and 'prompt'") as caught:
        check_pair_files([numbers])
    assert "--column" not in str(caught.value)  # --column chooses the corpus's prompt column, not these
