"""`img2prompt serve`: the HTTP API over the Python API, in-process (fastapi.testclient) except where the real
socket matters (the upload limit before the body is sent)."""
from __future__ import annotations

import io
import re
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from serve_fixtures import GatedIndex, client, create_app, images, index, upload  # noqa: E402,F401


def expected_search(index, path: Path, k: int) -> dict:
    """What `img2prompt search --json --image PATH` prints for this image, named as the upload is."""
    entry = index.search_images([str(path)], k)[0].to_dict()
    return {**entry, "query": path.name}


def assert_same_results(got: list[dict], want: list[dict]) -> None:
    """Same prompts in the same order; scores equal up to float noise (a batch may add rows beside a query)."""
    assert [entry["query"] for entry in got] == [entry["query"] for entry in want]
    for got_entry, want_entry in zip(got, want):
        assert [(r["rank"], r["id"], r["prompt"]) for r in got_entry["results"]] == \
               [(r["rank"], r["id"], r["prompt"]) for r in want_entry["results"]]
        assert [r["score"] for r in got_entry["results"]] == pytest.approx(
            [r["score"] for r in want_entry["results"]], abs=1e-5)


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# -- valid requests ----------------------------------------------------------------------------------------

def test_health_says_ready_with_index_and_models(client, index):
    health = client.get("/health").json()
    assert health["status"] == "ready"
    assert health["count"] == index.count and health["device"] == "cpu"
    assert health["models"]["clip"]["sha256"] == index.manifest["models"]["clip"]["sha256"]
    assert health["models"]["text"]["dim"] == 384
    assert health["k"]["max"] == min(index.count, 1000)


def test_health_and_manifest_say_the_clip_is_a_stand_in(client, index, tiny_clip_dir, tmp_path):
    """The tests' CLIP is img2prompt.stand_in's (random weights): the build records it, /health says it, the page
    has the notice; a folder without the stand-in marker is a real model (no flag, identity as before)."""
    import json
    import shutil

    from img2prompt.encoders.models import STAND_IN_KEY, load_clip
    from img2prompt.index.manifest import built_with_stand_in

    assert index.manifest["models"]["clip"]["stand_in"] is True
    assert client.get("/health").json()["stand_in"] is True
    assert 'id="stand-in"' in client.get("/").text
    real = shutil.copytree(tiny_clip_dir, tmp_path / "real-clip")
    config = json.loads((real / "open_clip_config.json").read_text())
    assert config.pop(STAND_IN_KEY)["random_weights"] is True
    (real / "open_clip_config.json").write_text(json.dumps(config))
    identity = load_clip(str(real), device="cpu").identity()
    assert "stand_in" not in identity and identity["sha256"] == index.manifest["models"]["clip"]["sha256"]
    assert not built_with_stand_in({"models": {"clip": identity}})
    assert built_with_stand_in({"models": {"clip": {"members": [identity, {"stand_in": True}]}}})
    assert not built_with_stand_in({"models": {"clip": "garbage"}})


def test_page_is_self_contained_and_accessible(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    # nothing fetched from elsewhere: no external scripts, styles, fonts or images
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "@import" not in page and "url(" not in page and "@font-face" not in page
    for control in ("file", "text", "k", "key"):  # every control has a label
        assert f'id="{control}"' in page and f'for="{control}"' in page
    assert ":focus-visible" in page and "@media (max-width" in page and 'name="viewport"' in page


def test_search_image_is_the_search_json_entry(client, index, images):
    response = client.post("/search", files=[upload(images[0])], data={"k": "5"})
    assert response.status_code == 200
    assert_same_results(response.json(), [expected_search(index, images[0], 5)])


def test_search_several_images_in_order(client, index, images):
    response = client.post("/search", files=[upload(images[2]), upload(images[1])])
    assert response.status_code == 200
    assert_same_results(response.json(), [expected_search(index, images[2], 10), expected_search(index, images[1], 10)])


def test_search_text_json(client, index):
    response = client.post("/search", json={"text": "a castle on a hill, matte painting", "k": 3})
    assert response.status_code == 200
    expected = index.search_texts(["a castle on a hill, matte painting"], 3)
    assert response.json() == [result.to_dict() for result in expected]
    several = client.post("/search", json={"text": ["a red fox", "a blue whale"]}).json()
    assert [entry["query"] for entry in several] == ["a red fox", "a blue whale"]
    assert all(len(entry["results"]) == 10 for entry in several)


def test_predict_returns_the_api_vector_and_its_neighbours(client, index, images):
    response = client.post("/predict", files=[upload(images[0]), upload(images[3])], data={"k": "4"})
    assert response.status_code == 200
    body = response.json()
    assert body["k"] == 4 and [p["query"] for p in body["predictions"]] == [images[0].name, images[3].name]
    vectors = np.array([p["vector"] for p in body["predictions"]], dtype=np.float32)
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(vectors, index.predict([str(images[0]), str(images[3])], k=4), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert [(r["id"], r["rank"]) for r in body["predictions"][0]["neighbours"]] == \
           [(r["id"], r["rank"]) for r in expected_search(index, images[0], 4)["results"]]


def test_predict_takes_the_inverse_distance_weighting(client, index, images):
    data = {"k": "4", "weighting": "inverse-distance", "power": "4", "epsilon": "0.001"}
    response = client.post("/predict", files=[upload(images[1])], data=data)
    vector = np.array(response.json()["predictions"][0]["vector"], dtype=np.float32)
    expected = index.predict([str(images[1])], k=4, weighting="inverse-distance", power=4.0, epsilon=1e-3)[0]
    np.testing.assert_allclose(vector, expected, atol=1e-5)
    assert not np.allclose(vector, index.predict([str(images[1])], k=4)[0], atol=1e-4)
    for field, value, message in (("power", "0", "power must be > 0"), ("epsilon", "-1", "epsilon must be > 0"),
                                  ("weighting", "cosine", "weighting must be one of")):
        refused = client.post("/predict", files=[upload(images[1])], data={field: value})
        assert refused.status_code == 422 and refused.json()["detail"].startswith(message)
    fields = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]
    assert fields["weighting"]["enum"] == ["softmax", "inverse-distance"] and fields["power"]["default"] == 6


def test_predict_takes_the_quality_switches(client, index, images):
    response = client.post("/predict", files=[upload(images[1])], data={"k": "4", "consensus": "3"})
    vector = np.array(response.json()["predictions"][0]["vector"], dtype=np.float32)
    np.testing.assert_allclose(vector, index.predict([str(images[1])], k=4, consensus=3.0)[0], atol=1e-5)
    assert not np.allclose(vector, index.predict([str(images[1])], k=4)[0], atol=1e-4)
    refused = client.post("/predict", files=[upload(images[1])], data={"beta": "0.5"})  # 1 image, no image keys
    assert refused.status_code == 422 and "image-key mean" in refused.json()["detail"]
    weighed = client.post("/predict", files=[upload(images[1])], data={"model_weights": "1,1"})
    assert weighed.status_code == 422 and "the index holds one CLIP model" in weighed.json()["detail"]
    searched = client.post("/search", json={"text": "a fox", "model_weights": "1,1"})
    assert searched.status_code == 422 and "the index holds one CLIP model" in searched.json()["detail"]


def test_upload_never_touches_disk(client, index, monkeypatch):
    """A 2 MB upload is read, parsed and decoded in memory: every way to make a temporary file is broken here."""
    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")

    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    data = png_bytes(900, 800)
    assert len(data) > 2 * 10**6
    response = client.post("/search", files={"image": ("big.png", data, "image/png")}, data={"k": "2"})
    assert response.status_code == 200, response.text
    assert response.json()[0]["results"][0]["id"] == index.search_images([Image.open(io.BytesIO(data))], 2)[0].ids[0]


# -- invalid requests: JSON errors with the right status, never a traceback ------------------------------

@pytest.mark.parametrize("case, status", [
    ("not an image", 400), ("truncated", 400), ("empty file", 400), ("no file", 422), ("k zero", 422),
    ("k too large", 422), ("k not a number", 422), ("text k too large", 422), ("text missing", 422),
    ("text empty", 422), ("invalid json", 422), ("plain text body", 415), ("bad temperature", 422),
])
def test_bad_input_is_a_json_error(client, index, images, case, status):
    png = images[0].read_bytes()
    request = {
        "not an image": dict(files={"image": ("a.png", b"definitely not a png", "image/png")}),
        "truncated": dict(files={"image": ("a.png", png[: len(png) // 2], "image/png")}),
        "empty file": dict(files={"image": ("a.png", b"", "image/png")}),
        "no file": dict(files={"k": (None, "3")}),
        "k zero": dict(files=[upload(images[0])], data={"k": "0"}),
        "k too large": dict(files=[upload(images[0])], data={"k": str(index.count + 1)}),
        "k not a number": dict(files=[upload(images[0])], data={"k": "ten"}),
        "text k too large": dict(json={"text": "a fox", "k": index.count + 1}),
        "text missing": dict(json={"k": 3}),
        "text empty": dict(json={"text": "  "}),
        "invalid json": dict(content=b'{"text": ', headers={"content-type": "application/json"}),
        "plain text body": dict(content=b"a fox", headers={"content-type": "text/plain"}),
        "bad temperature": dict(files=[upload(images[0])], data={"temperature": "-1"}),
    }[case]
    response = client.post("/predict" if case == "bad temperature" else "/search", **request)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in response.text


def test_unknown_route_and_method(client):
    assert client.get("/nope").status_code == 404 and client.get("/nope").json() == {"detail": "Not Found"}
    assert client.get("/search").status_code == 405


def test_upload_over_the_limit_is_413(index, images):
    with TestClient(create_app(index, max_upload=10_000)) as small:
        big = png_bytes(200, 200)
        assert len(big) > 10_000
        assert small.post("/search", files={"image": ("big.png", big, "image/png")}).status_code == 413
        # no Content-Length (chunked): the limit is counted while reading
        chunks = iter([b"x" * 4096] * 5)
        response = small.post("/search", content=chunks, headers={"content-type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413 and "limit" in response.json()["detail"]
        assert small.post("/search", files=[upload(images[0])]).status_code == 200  # small ones still pass


def test_real_server_refuses_a_large_upload_before_its_body(index):
    """On a real socket: a declared 1 GB body is refused at once, without the client sending any of it."""
    from img2prompt.serve import background_server

    with background_server(create_app(index, max_upload=1000)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                               b"Content-Length: 1000000000\r\n\r\n")
            reply = b""
            while b"}" not in reply and (chunk := connection.recv(4096)):  # headers and body may come apart
                reply += chunk
            reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "over the limit" in reply


# -- API key --------------------------------------------------------------------------------------------

def test_api_key_required_except_for_the_page(index):
    with TestClient(create_app(index, api_key="s3cret")) as keyed:
        assert keyed.get("/").status_code == 200  # the page is where the key is entered
        assert keyed.get("/health").status_code == 401
        assert keyed.get("/health", headers={"X-API-Key": "wrong"}).status_code == 401
        refused = keyed.post("/search", json={"text": "a fox"})
        assert refused.status_code == 401 and "API key" in refused.json()["detail"]
        assert keyed.get("/health", headers={"X-API-Key": "s3cret"}).json()["status"] == "ready"
        assert keyed.post("/search", json={"text": "a fox", "k": 2},
                          headers={"Authorization": "Bearer s3cret"}).status_code == 200


# -- concurrency --------------------------------------------------------------------------------------------

def test_32_parallel_requests_match_sequential(client, images):
    requests = []
    for number in range(32):
        if number % 4 == 3:
            requests.append(("/search", dict(json={"text": f"a painting of a lighthouse, number {number}", "k": 5})))
        elif number % 8 == 2:
            requests.append(("/predict", dict(files=[upload(images[number % 4])], data={"k": "3"})))
        else:
            requests.append(("/search", dict(files=[upload(images[number % 4])], data={"k": str(3 + number % 3)})))

    def send(request):
        path, options = request
        response = client.post(path, **options)
        assert response.status_code == 200, response.text
        return response.json()

    sequential = [send(request) for request in requests]
    with ThreadPoolExecutor(32) as pool:
        parallel = list(pool.map(send, requests))
    for (path, _), alone, together in zip(requests, sequential, parallel):
        if path == "/search":
            assert_same_results(together, alone)
        else:
            for one, other in zip(together["predictions"], alone["predictions"]):
                np.testing.assert_allclose(one["vector"], other["vector"], atol=1e-5)
                assert [r["id"] for r in one["neighbours"]] == [r["id"] for r in other["neighbours"]]


def _pile_up(client, worker, texts: list[str], queued: int) -> tuple[list, list[threading.Thread]]:
    """Send texts[0] (held by the gate in the worker), then the rest; return once `queued` are waiting."""
    answers: list = [None] * len(texts)

    def send(position: int) -> None:
        answers[position] = client.post("/search", json={"text": texts[position], "k": 3})

    threads = [threading.Thread(target=send, args=(0,))]
    threads[0].start()
    assert worker.index.entered.wait(30)
    for position in range(1, len(texts)):
        threads.append(threading.Thread(target=send, args=(position,)))
        threads[-1].start()
    deadline = time.monotonic() + 30
    while worker.pending < queued:
        assert time.monotonic() < deadline, "the requests never reached the queue"
        time.sleep(0.01)
    return answers, threads


def test_full_queue_is_503_and_waiting_requests_each_run_alone(index):
    gated = GatedIndex(index)
    app = create_app(gated, queue_size=3)
    texts = ["a red fox", "a blue whale", "a green forest", "a yellow desert"]
    with TestClient(app) as test_client:
        answers, threads = _pile_up(test_client, app.state.worker, texts, queued=3)
        refused = test_client.post("/search", json={"text": "one too many"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["detail"]
        gated.gate.set()
        for thread in threads:
            thread.join(60)
        for text, answer in zip(texts, answers):
            assert answer.status_code == 200
            assert_same_results(answer.json(), [r.to_dict() for r in index.search_texts([text], 3)])
        # each request is its own API call (its statistics and vectors are its own); the three that waited
        # together shared one encoder call (tests/test_serve_batching.py)
        assert app.state.worker.stats == {"requests": 4, "calls": 4, "encoder_calls": 1, "merged_requests": 3}


def test_a_failing_request_does_not_fail_its_batch(index):
    gated = GatedIndex(index)
    app = create_app(gated)
    texts = ["a red fox", "a blue whale", "boom", "a yellow desert"]
    with TestClient(app, raise_server_exceptions=False) as test_client:
        answers, threads = _pile_up(test_client, app.state.worker, texts, queued=3)
        gated.gate.set()
        for thread in threads:
            thread.join(60)
    assert [answer.status_code for answer in answers] == [200, 200, 500, 200]
    assert answers[2].json() == {"detail": "internal server error"}
    assert_same_results(answers[3].json(), [r.to_dict() for r in index.search_texts([texts[3]], 3)])


# -- the command -------------------------------------------------------------------------------------------

def test_serve_arguments():
    import argparse

    from img2prompt.cli import serve as cli_serve
    from img2prompt.serve.limits import DEFAULT_LIMITS

    parser = argparse.ArgumentParser(prog="img2prompt")
    cli_serve.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "idx"])
    assert (args.host, args.port, args.device, args.api_key) == ("127.0.0.1", 8000, "auto", None)
    assert args.max_upload == DEFAULT_LIMITS.max_upload and args.queue_size == DEFAULT_LIMITS.queue_size
    assert parser.parse_args(["serve", "idx", "--max-upload", "5M"]).max_upload == 5 * 2**20
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "idx", "--max-upload", "lots"])


def test_missing_serve_extra_is_one_line(monkeypatch):
    import argparse
    import sys

    from img2prompt.cli import serve as cli_serve
    from img2prompt.errors import UserError

    parser = argparse.ArgumentParser(prog="img2prompt")
    cli_serve.add_parser(parser.add_subparsers(dest="command"))
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "img2prompt.serve.runner", raising=False)  # what `serve` imports first
    with pytest.raises(UserError, match=r"serve needs fastapi.*img2prompt\[serve\]"):
        cli_serve.run(parser.parse_args(["serve", "idx"]))


def test_interrogate_returns_the_api_readable_prompt(client, index, images):
    response = client.post("/interrogate", files=[upload(images[1])], data={"modifiers": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = index.interrogate([images[1]], modifiers=2)[0].to_dict()
    assert body == [{**expected, "query": images[1].name}] and len(body[0]["modifiers"]) == 2
    bad = client.post("/interrogate", files=[upload(images[1])], data={"modifiers": "99"})
    assert bad.status_code == 422 and "between 0 and 50" in bad.json()["detail"]
