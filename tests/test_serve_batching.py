"""The server's model worker merges requests that wait together into one encoder call, and each answer is still
the answer its request gets alone: ids equal, vectors to float32 rounding, every per-request statistic (beta's
image-key mean from the queries) from that request's own rows. The worker is driven directly: a text search held
at a gate lets the other requests pile up behind it, so the merge is certain, not a matter of timing."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from img2prompt.errors import UserError  # noqa: E402
from img2prompt.serve import ModelWorker  # noqa: E402
from img2prompt.serve.limits import ServeLimits  # noqa: E402
from serve_fixtures import GatedIndex, images, index  # noqa: E402,F401


def piled_up(index, jobs: list[tuple], merge_items: int = 64):
    """Run `jobs` ((kind, items, options) each) on a worker after they all queued behind a held text search;
    returns (the worker, their futures' outcomes: a result or the exception)."""
    gated = GatedIndex(index)
    worker = ModelWorker(gated, queue_size=len(jobs) + 1, merge_items=merge_items, merge_wait=0)
    worker.start()
    try:
        held = worker.submit("texts", ["a held search"], k=3)
        assert gated.entered.wait(30)
        futures = [worker.submit(kind, items, **options) for kind, items, options in jobs]
        gated.gate.set()
        held.result(60)
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(120))
            except Exception as exc:  # noqa: BLE001 — the test compares errors too
                outcomes.append(exc)
    finally:
        worker.stop()
    return worker, outcomes


def read(paths) -> list[bytes]:
    return [path.read_bytes() for path in paths]


def assert_same_hits(merged, alone) -> None:
    assert [list(result.ids) for result in merged] == [list(result.ids) for result in alone]
    for one, other in zip(merged, alone):
        np.testing.assert_allclose(one.scores, other.scores, atol=1e-5)
        assert one.prompts == other.prompts and one.error == other.error


def test_waiting_requests_share_one_encoder_call_and_get_their_alone_answers(index, images):
    jobs = [("predict", read(images[:1]), {"k": 5}),
            ("images", read(images[1:3]), {"k": 4}),
            ("predict", read([images[2], images[0], images[3]]), {"k": 7, "temperature": 0.1}),
            ("interrogate", read(images[3:4]), {"modifiers": 2}),
            ("images", read(images[:1]), {"k": 3, "min_score": 0.0})]
    worker, outcomes = piled_up(index, jobs)
    assert worker.stats["encoder_calls"] == 1 and worker.stats["merged_requests"] == len(jobs)
    assert worker.stats["calls"] == len(jobs) + 1  # still one API call per request (+ the held one)
    for (kind, items, options), merged in zip(jobs, outcomes):
        if kind == "predict":
            vectors, neighbours = index.predict_with_neighbours(items, workers=0, **options)
            np.testing.assert_allclose(np.stack([vector for vector, _ in merged]), vectors, atol=1e-5)
            assert_same_hits([hits for _, hits in merged], neighbours)
        elif kind == "images":
            assert_same_hits(merged, index.search_images(items, options.pop("k"), workers=0, **options))
        else:
            alone = index.interrogate(items, options["modifiers"], workers=0)
            assert [result.prompt for result in merged] == [result.prompt for result in alone]


def test_texts_share_one_encoder_call_and_images_do_not_join_them(index, images):
    jobs = [("texts", ["a red fox in the snow"], {"k": 3}), ("texts", ["a blue whale", "a green forest"], {"k": 4}),
            ("images", read(images[:1]), {"k": 3}), ("texts", ["a yellow desert"], {"k": 2})]
    worker, outcomes = piled_up(index, jobs)
    # the two texts merge; the image request starts the next round, the last text waits behind it (queue order)
    assert worker.stats["encoder_calls"] == 1 and worker.stats["merged_requests"] == 2
    for (kind, items, options), merged in zip(jobs, outcomes):
        alone = (index.search_texts(items, options["k"]) if kind == "texts"
                 else index.search_images(items, options["k"], workers=0))
        assert_same_hits(merged, alone)


def test_beta_mean_comes_from_each_requests_own_images(index, images):
    """Two requests of 10 images with beta (no image keys in the index) are 20 images in one encoder call, but
    each has too few of its own (16) for the image-key mean: each is refused, as alone; 16 of one's own suffice."""
    ten = read(images) * 2 + read(images[:2])
    sixteen = read(images) * 4
    jobs = [("predict", ten, {"k": 5, "beta": 0.5}), ("predict", ten, {"k": 5, "beta": 0.5}),
            ("predict", sixteen, {"k": 5, "beta": 0.5})]
    worker, outcomes = piled_up(index, jobs)
    assert worker.stats["encoder_calls"] == 1 and worker.stats["merged_requests"] == 3
    for outcome in outcomes[:2]:
        assert isinstance(outcome, UserError) and "image-key mean" in str(outcome)
    alone, _ = index.predict_with_neighbours(sixteen, workers=0, k=5, beta=0.5)
    np.testing.assert_allclose(np.stack([vector for vector, _ in outcomes[2]]), alone, atol=1e-5)


def test_a_broken_image_fails_only_its_own_request(index, images):
    jobs = [("images", [b"\x89PNG\r\n\x1a\n not an image"] + read(images[:1]), {"k": 3}),
            ("images", read(images[1:3]), {"k": 3})]
    worker, outcomes = piled_up(index, jobs)
    assert worker.stats["encoder_calls"] == 1
    assert outcomes[0][0].error and not outcomes[0][1].error
    assert_same_hits(outcomes[0][1:], index.search_images(read(images[:1]), 3, workers=0))
    assert_same_hits(outcomes[1], index.search_images(read(images[1:3]), 3, workers=0))


def test_merge_items_bounds_the_merged_call(index, images):
    jobs = [("images", read(images[:2]), {"k": 3}) for _ in range(3)]
    worker, outcomes = piled_up(index, jobs, merge_items=4)  # 2 + 2 fit, the third waits for the next round
    assert worker.stats["encoder_calls"] == 1 and worker.stats["merged_requests"] == 2
    worker, _ = piled_up(index, jobs, merge_items=1)  # 1: every request encodes alone
    assert worker.stats["encoder_calls"] == 0


def test_merge_settings_are_checked():
    with pytest.raises(ValueError, match="merge_wait must be 0 or more"):
        ServeLimits(merge_wait=-0.1).check()
    with pytest.raises(ValueError, match="merge_items must be positive"):
        ServeLimits(merge_items=0).check()
    assert ServeLimits(merge_wait=0).check().merge_wait == 0


def test_merge_flags_reach_the_limits():
    import argparse

    from img2prompt.cli import serve as cli_serve

    parser = argparse.ArgumentParser(prog="img2prompt")
    cli_serve.add_parser(parser.add_subparsers(dest="command"))
    defaults = cli_serve.limits_of(parser.parse_args(["serve", "idx"]))
    assert (defaults.merge_items, defaults.merge_wait) == (ServeLimits().merge_items, ServeLimits().merge_wait)
    given = cli_serve.limits_of(parser.parse_args(["serve", "idx", "--merge-items", "1", "--merge-wait-ms", "0"]))
    assert (given.merge_items, given.merge_wait) == (1, 0)
    with pytest.raises(UserError, match="--merge-wait-ms must be 0 or more"):
        cli_serve.limits_of(parser.parse_args(["serve", "idx", "--merge-wait-ms", "-1"]))
    with pytest.raises(UserError, match="--merge-items must be 1 or more"):
        cli_serve.limits_of(parser.parse_args(["serve", "idx", "--merge-items", "0"]))
