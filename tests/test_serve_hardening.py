"""`img2prompt serve` under hostile or heavy use: bounded requests (B), answers independent of other clients
(C), idle and slow connections (D), decoded-size bounds (E), form and text bounds (F), key/Host/Origin (G),
client errors (I), the page's routes (J). Servers bind 127.0.0.1; every loop is bounded in count and time."""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from img2prompt import serve as serve_module  # noqa: E402
from img2prompt.serve import routes as serve_routes  # noqa: E402
from serve_fixtures import GatedIndex, client, create_app, images, index, upload  # noqa: E402,F401
from img2prompt.serve.limits import ServeLimits  # noqa: E402


def read_reply(connection: socket.socket, deadline_s: float = 10) -> bytes:
    """Everything the server sends until it closes or a JSON body has ended (bounded in time)."""
    connection.settimeout(deadline_s)
    reply = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while b"}" not in reply and (chunk := connection.recv(4096)):
            reply += chunk
    return reply


def closed_by_server(connection: socket.socket, deadline_s: float = 10) -> bool:
    """Whether the server closes this connection (recv gives b"") within deadline_s."""
    connection.settimeout(deadline_s)
    try:
        while connection.recv(4096):
            pass
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True
    return True


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def get_health(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return response.status


# -- B: bounded work per request ---------------------------------------------------------------------------

def test_queries_per_request_k_and_json_size_are_bounded(index, images):
    limits = ServeLimits(max_batch=2, max_k=5, max_json=2000)
    with TestClient(create_app(index, limits=limits)) as small:
        texts = small.post("/search", json={"text": ["a fox", "a cat", "a dog"]})
        assert texts.status_code == 413 and "3 texts in one request" in texts.json()["detail"]
        assert small.post("/search", json={"text": ["a fox", "a cat"], "k": 5}).status_code == 200
        three = small.post("/search", files=[upload(images[0]), upload(images[1]), upload(images[2])])
        assert three.status_code == 413 and "at most 2" in three.json()["detail"]
        assert small.post("/predict", files=[upload(images[0])] * 3).status_code == 413
        over_k = small.post("/search", json={"text": "a fox", "k": 6})
        assert over_k.status_code == 422 and "limit of 5" in over_k.json()["detail"]
        assert small.get("/health").json()["k"]["max"] == 5
        big = small.post("/search", json={"text": "a fox " * 400})
        assert big.status_code == 413 and "2,000 bytes" in big.json()["detail"]


def test_the_background_request_is_refused_cheaply(client, index):
    """The 1.3 MB {"text": [100k strings], "k": 300} that once ran 20 s: refused before any model work."""
    calls = client.app.state.worker.stats["calls"]
    body = {"text": [f"p{i}" for i in range(100_000)], "k": 300}
    response = client.post("/search", json=body)
    assert response.status_code == 413 and "100,000 texts in one request" in response.json()["detail"]
    bigger = client.post("/search", json={"text": [f"prompt number {i}" for i in range(100_000)], "k": 300})
    assert bigger.status_code == 413 and "over the limit of 1,048,576 bytes" in bigger.json()["detail"]
    assert client.app.state.worker.stats["calls"] == calls


def test_request_time_budget_is_503_and_a_queued_job_is_dropped(index):
    held = GatedIndex(index)
    app = create_app(held, limits=ServeLimits(request_timeout=0.5))
    with TestClient(app) as test_client:
        answers = []
        first = threading.Thread(target=lambda: answers.append(test_client.post("/search", json={"text": "a"})))
        first.start()
        assert held.entered.wait(30)
        late = test_client.post("/search", json={"text": "waits behind the first"})  # queued, then over budget
        assert late.status_code == 503 and "did not finish within 0.5 s" in late.json()["detail"]
        held.gate.set()
        first.join(60)
        assert answers[0].status_code == 503  # its own budget ran out while held
        deadline = time.monotonic() + 30
        while app.state.worker.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.worker.stats["calls"] == 1  # the queued one never ran


# -- C: batching invisible ---------------------------------------------------------------------------------

def test_beta_mean_never_comes_from_other_clients(client, images):
    """Alone, one image with beta needs the image-key mean (422); with 19 others at once it still does."""
    def send(position: int):
        return client.post("/predict", files=[upload(images[position % 4], f"c{position}.png")],
                           data={"beta": "0.5", "k": "5"})

    alone = send(0)
    assert alone.status_code == 422 and "image-key mean" in alone.json()["detail"]
    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(send, range(20)))
    assert [answer.status_code for answer in together] == [422] * 20


def test_identical_requests_get_identical_vectors_under_concurrency(client, images):
    def predict(position: int):
        if position % 3 == 2:  # other clients' work beside it: texts and other images
            return client.post("/search", json={"text": f"a lighthouse {position}", "k": 3})
        files = [upload(images[0])] if position % 3 == 0 else [upload(images[1]), upload(images[2])]
        return client.post("/predict", files=files, data={"k": "4"})

    want = client.post("/predict", files=[upload(images[0])], data={"k": "4"}).json()
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(predict, range(24)))
    assert all(answer.status_code == 200 for answer in answers)
    for position in range(0, 24, 3):
        got = answers[position].json()
        # requests waiting together share one encoder call: the same neighbours and scores' ranks, vectors equal
        # to float32 rounding (a CPU kernel's sums depend on the batch it runs in; tests/test_serve_batching.py)
        assert [[(hit["id"], hit["prompt"]) for hit in p["neighbours"]] for p in got["predictions"]] == \
            [[(hit["id"], hit["prompt"]) for hit in p["neighbours"]] for p in want["predictions"]]
        np.testing.assert_allclose([p["vector"] for p in got["predictions"]],
                                   [p["vector"] for p in want["predictions"]], rtol=0, atol=1e-6)


# -- D: slots and slowloris (real sockets) -----------------------------------------------------------------

def test_idle_connections_are_bounded_per_client_and_closed(index):
    limits = ServeLimits(max_connections_per_client=4, header_timeout=0.5, queue_size=2)
    with serve_module.background_server(create_app(index, limits=limits)) as url:
        idle = [socket.create_connection(address(url), timeout=10) for _ in range(4)]
        try:
            with socket.create_connection(address(url), timeout=10) as fifth:
                fifth.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                reply = read_reply(fifth)
            assert reply.startswith(b"HTTP/1.1 503") and b"too many open connections" in reply
            # an idle connection (or one dribbling its headers) is closed after header_timeout
            idle[0].sendall(b"GET /health HTTP/1.1\r\nHo")
            assert all(closed_by_server(connection) for connection in idle)
        finally:
            for connection in idle:
                connection.close()
        assert get_health(url) == 200  # the slots came back


def test_slow_uploads_take_no_queue_slot_and_time_out(index, images):
    limits = ServeLimits(queue_size=1, body_timeout=1.0, max_connections_per_client=16)
    with serve_module.background_server(create_app(index, limits=limits)) as url:
        slow = []
        for _ in range(6):  # more slow uploads than queue slots
            connection = socket.create_connection(address(url), timeout=10)
            connection.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b")
            slow.append(connection)
        try:
            import urllib.request

            body = b"".join([b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n",
                             b"Content-Type: image/png\r\n\r\n", images[0].read_bytes(), b"\r\n--b--\r\n"])
            request = urllib.request.Request(url + "/search", data=body, method="POST",
                                             headers={"Content-Type": "multipart/form-data; boundary=b"})
            with urllib.request.urlopen(request, timeout=30) as response:  # served while the slow ones wait
                assert response.status == 200
            replies = [read_reply(connection, 15) for connection in slow]
            assert all(reply.startswith(b"HTTP/1.1 408") for reply in replies), replies[:1]
        finally:
            for connection in slow:
                connection.close()


# -- E: decompression amplification ------------------------------------------------------------------------

def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_amplified_png_is_refused_before_decoding(client, index, monkeypatch):
    from PIL import ImageFile

    bomb = _png(Image.new("1", (13_000, 13_000)))
    assert len(bomb) < 100_000
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    response = client.post("/search", files={"image": ("bomb.png", bomb, "image/png")})
    assert response.status_code == 400 and response.json()["detail"].startswith("bomb.png: too large to decode")


def test_decoded_bytes_per_request_are_bounded(index):
    image = _png(Image.new("RGB", (600, 600), (10, 200, 30)))  # 1.4 MB decoded each
    with TestClient(create_app(index, limits=ServeLimits(max_decoded_request=3 * 2**20))) as small:
        assert small.post("/search", files=[("image", ("a.png", image, "image/png"))] * 2).status_code == 200
        refused = small.post("/search", files=[("image", (f"{i}.png", image, "image/png")) for i in range(3)])
        assert refused.status_code == 413 and refused.json()["detail"].startswith("2.png: the request's images")


def test_upload_formats_other_than_png_jpeg_webp_are_refused(client):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="TIFF")
    response = client.post("/search", files={"image": ("scan.tif", buffer.getvalue(), "image/tiff")})
    assert response.status_code == 400
    assert response.json()["detail"] == "scan.tif: TIFF images are not accepted (only PNG, JPEG and WebP)"


# -- F: forms and long texts -------------------------------------------------------------------------------

def test_form_parts_are_bounded_and_parsed_off_the_event_loop(index, images, monkeypatch):
    threads = []
    original = serve_routes.parse_form

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            threads.append("the event loop")
        except RuntimeError:  # no loop running in this thread: a worker thread
            threads.append("a worker thread")
        return original(*args, **kwargs)

    monkeypatch.setattr(serve_routes, "parse_form", recording)  # where the routes look it up
    with TestClient(create_app(index, limits=ServeLimits(max_fields=8))) as small:
        many = [("image", ("a.png", images[0].read_bytes(), "image/png"))] + [(f"f{i}", (None, "x")) for i in range(8)]
        response = small.post("/search", files=many)
        assert response.status_code == 413 and "over 8 parts" in response.json()["detail"]
        assert small.post("/search", files=[upload(images[0])], data={"k": "2"}).status_code == 200
    assert threads == ["a worker thread"] * 2


def test_a_long_text_is_cut_before_tokenizing(client, index, monkeypatch):
    from img2prompt.encoders.tokenization import FastClipTokenizer

    seen = []
    original = FastClipTokenizer._flat_ids

    def recording(self, texts):
        seen.extend(len(text) for text in texts)
        return original(self, texts)

    monkeypatch.setattr(FastClipTokenizer, "_flat_ids", recording)
    long = "a castle on a hill, matte painting, " * 30_000  # 1 MB
    with TestClient(create_app(index, limits=ServeLimits(max_json=2 * 2**20))) as roomy:
        response = roomy.post("/search", json={"text": long, "k": 3})
    assert response.status_code == 200
    assert seen and max(seen) <= 4096  # never the whole megabyte
    expected = index.search_texts([long[:4096]], 3)[0]
    assert [r["id"] for r in response.json()[0]["results"]] == expected.ids.tolist()


def test_tokens_of_a_long_text_equal_its_cut_versions():
    """The shared text path (CLI/API): a long text is cut before the tokenizer, to the same 77 tokens."""
    from open_clip.tokenizer import SimpleTokenizer

    from img2prompt.encoders.tokenization import FastClipTokenizer

    from conftest import read_data_prompts

    fast, slow = FastClipTokenizer(), SimpleTokenizer()
    prompts = read_data_prompts(400)
    texts = [", ".join(prompts[start:start + 40]) for start in range(0, 400, 40)]  # ~ 5-20k characters each
    texts += ["word " * 50_000, "  \n ".join(prompts[:60]) + " " * 200_000 + "tail"]
    assert all(len(text) > 77 * 32 for text in texts[:-2])
    for text in texts:
        cut = fast._cut(text, 77)
        assert len(cut) < len(text) or len(text) < 77 * 32 * 4**6
        assert fast([text]).tolist() == fast([cut]).tolist() == slow([text]).tolist()


# -- G: key, Host, Origin ----------------------------------------------------------------------------------

def test_an_empty_api_key_is_an_error(index, monkeypatch):
    import argparse

    from img2prompt.cli import serve as cli_serve
    from img2prompt.errors import UserError

    with pytest.raises(ValueError, match="empty"):
        create_app(index, api_key="")
    parser = argparse.ArgumentParser(prog="img2prompt")
    cli_serve.add_parser(parser.add_subparsers(dest="command"))
    monkeypatch.delenv(cli_serve.API_KEY_ENV, raising=False)
    with pytest.raises(UserError, match="--api-key is empty"):
        cli_serve.api_key_of(parser.parse_args(["serve", "idx", "--api-key", ""]))
    assert cli_serve.api_key_of(parser.parse_args(["serve", "idx"])) is None
    monkeypatch.setenv(cli_serve.API_KEY_ENV, "")
    with pytest.raises(UserError, match="set but empty"):
        cli_serve.api_key_of(parser.parse_args(["serve", "idx"]))
    monkeypatch.setenv(cli_serve.API_KEY_ENV, "s3cret")
    assert cli_serve.api_key_of(parser.parse_args(["serve", "idx"])) == "s3cret"


def test_host_header_is_checked(index):
    with TestClient(serve_module.create_app(index), base_url="http://127.0.0.1:8000") as local:
        assert local.get("/health").status_code == 200
        assert local.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
        assert local.get("/health", headers={"Host": "[::1]:8000"}).status_code == 200
        rebound = local.get("/", headers={"Host": "evil.example:8000"})
        assert rebound.status_code == 403 and "--allowed-host evil.example" in rebound.json()["detail"]
    with TestClient(serve_module.create_app(index, host="10.1.2.3", allowed_hosts=["img.lan"]),
                    base_url="http://img.lan") as named:
        assert named.get("/health").status_code == 200
        assert named.get("/health", headers={"Host": "10.1.2.3:8000"}).status_code == 200
        assert named.get("/health", headers={"Host": "other.lan"}).status_code == 403


def test_cross_origin_writes_are_refused(index):
    with TestClient(serve_module.create_app(index), base_url="http://127.0.0.1:8000") as local:
        same = local.post("/search", json={"text": "a fox", "k": 2}, headers={"Origin": "http://127.0.0.1:8000"})
        assert same.status_code == 200  # the page itself
        for origin in ("http://evil.example", "null", "http://127.0.0.1:9999"):
            refused = local.post("/search", json={"text": "a fox"}, headers={"Origin": origin})
            assert refused.status_code == 403 and "cross-origin" in refused.json()["detail"]
        assert local.get("/health", headers={"Origin": "http://evil.example"}).status_code == 200  # reads: Host only


# -- I: client errors are not server errors ----------------------------------------------------------------

def test_long_multipart_boundary_is_400(client, caplog):
    boundary = "b" * 300
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n3\r\n--{boundary}--\r\n".encode()
    with caplog.at_level(logging.DEBUG, logger="img2prompt.serve"):
        response = client.post("/search", content=body,
                               headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 400 and "malformed multipart body" in response.json()["detail"]
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_a_client_leaving_mid_upload_is_no_error(index, caplog):
    app = create_app(index)
    with caplog.at_level(logging.DEBUG, logger="img2prompt.serve"):
        with serve_module.background_server(app) as url:
            with socket.create_connection(address(url), timeout=10) as connection:
                connection.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data;"
                                   b" boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\npartial")
            deadline = time.monotonic() + 10
            while not any("disconnected" in record.getMessage() for record in caplog.records):
                assert time.monotonic() < deadline, "the server never noticed the client leave"
                time.sleep(0.02)
            assert get_health(url) == 200
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert not any(record.exc_info for record in caplog.records)


# -- J: the page's routes ----------------------------------------------------------------------------------

def test_favicon_and_predict_with_text(client):
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.text.startswith("<svg")
    text = client.post("/predict", json={"text": "a fox"})
    assert text.status_code == 415 and "use POST /search" in text.json()["detail"]
    page = client.get("/").text
    assert 'id="results-hint"' in page  # the empty Prompts panel says what to do


def test_limit_flags_become_serve_limits():
    import argparse

    from img2prompt.cli import serve as cli_serve
    from img2prompt.errors import UserError

    parser = argparse.ArgumentParser(prog="img2prompt")
    cli_serve.add_parser(parser.add_subparsers(dest="command"))
    defaults = cli_serve.limits_of(parser.parse_args(["serve", "idx"]))
    assert defaults == ServeLimits() == serve_module.DEFAULT_LIMITS
    chosen = cli_serve.limits_of(parser.parse_args(["serve", "idx", "--max-batch", "4", "--max-k", "50",
                                                    "--max-json", "64K", "--request-timeout", "5",
                                                    "--max-connections-per-client", "2", "--allowed-host", "a.lan"]))
    assert (chosen.max_batch, chosen.max_k, chosen.max_json, chosen.request_timeout,
            chosen.max_connections_per_client) == (4, 50, 64 * 2**10, 5.0, 2)
    with pytest.raises(UserError, match="--max-batch must be positive"):
        cli_serve.limits_of(parser.parse_args(["serve", "idx", "--max-batch", "0"]))
    assert parser.parse_args(["serve", "idx", "--allowed-host", "a", "--allowed-host", "b"]).allowed_host == ["a", "b"]
    with pytest.raises(ValueError, match="max_k must be positive"):
        ServeLimits(max_k=0).check()


def test_a_long_text_is_cut_in_the_shared_tokenizer(monkeypatch):
    """CLI/API path: a 12 MB text reaches the BPE as a few thousand characters, with the tokens unchanged."""
    from img2prompt.encoders.tokenization import FastClipTokenizer

    fast = FastClipTokenizer()
    long = "a castle on a hill, matte painting, " * 350_000  # 12.6 MB
    want = fast(["a castle on a hill, matte painting, " * 60]).tolist()
    seen = []
    original = FastClipTokenizer._flat_ids

    def recording(self, texts):
        seen.extend(len(text) for text in texts)
        return original(self, texts)

    monkeypatch.setattr(FastClipTokenizer, "_flat_ids", recording)
    assert fast([long]).tolist() == want
    assert seen and max(seen) <= 77 * 32
    assert fast.cut(long) == long[:len(fast.cut(long))] and len(fast.cut(long)) <= 77 * 32
    assert fast.cut("a short prompt") == "a short prompt"
