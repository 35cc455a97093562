"""`img2prompt serve` against hostile clients: a body trickled byte by byte (408 within body_timeout while
others are served), malformed multipart of every kind, and 30 concurrent clients mixing good and bad requests.
Every answer is JSON 4xx or 200, never 500 or a hang; every loop is bounded in count and time."""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from img2prompt import serve as serve_module  # noqa: E402
from img2prompt.serve.limits import ServeLimits  # noqa: E402
from serve_fixtures import client, create_app, images, index, upload  # noqa: E402,F401
from test_serve_hardening import address, get_health, read_reply  # noqa: E402


def multipart(boundary: str, *parts: bytes, close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + boundary.encode() + b"--\r\n" if close else b"")


def file_part(name: str, filename: str, data: bytes, kind: str = "image/png") -> bytes:
    return (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {kind}\r\n\r\n").encode() + data


def malformed_bodies(png: bytes) -> dict[str, tuple[str, bytes]]:
    """name: (content-type header, body)."""
    ct = "multipart/form-data; boundary=b"
    return {
        "boundary not in body": (ct, multipart("other", file_part("image", "a.png", png))),
        "no boundary parameter": ("multipart/form-data", multipart("b", file_part("image", "a.png", png))),
        "truncated part": (ct, multipart("b", file_part("image", "a.png", png[: len(png) // 2]), close=False)[:-7]),
        "truncated png": (ct, multipart("b", file_part("image", "a.png", png[: len(png) // 2]))),
        "wrong field name": (ct, multipart("b", file_part("picture", "a.png", png))),
        "zero-byte file": (ct, multipart("b", file_part("image", "a.png", b""))),
        "text file as image": (ct, multipart("b", file_part("image", "a.txt", b"hello, not an image\n", "text/plain"))),
        "garbage as png": (ct, multipart("b", file_part("image", "a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 200))),
        "no parts": (ct, b"--b--\r\n"),
        "headers only": (ct, b"--b\r\nContent-Disposition: form-data\r\n\r\n"),
        "k not a number": (ct, multipart("b", file_part("image", "a.png", png),
                                         b'Content-Disposition: form-data; name="k"\r\n\r\nmany')),
        "binary noise": (ct, bytes(range(256)) * 8),
    }


@pytest.mark.parametrize("route", ["/search", "/predict"])
def test_malformed_multipart_is_a_json_4xx(client, images, route):
    for name, (content_type, body) in malformed_bodies(images[0].read_bytes()).items():
        response = client.post(route, content=body, headers={"content-type": content_type})
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:200])
        assert isinstance(response.json().get("detail"), (str, list)), name


def test_a_body_trickled_byte_by_byte_gets_408_within_the_limit(index, images):
    """Bytes keep arriving (no read ever idles long), yet the whole body must arrive within body_timeout."""
    limits = ServeLimits(body_timeout=1.5)
    body = multipart("b", file_part("image", "a.png", images[0].read_bytes()))
    with serve_module.background_server(create_app(index, limits=limits)) as url:
        stop = threading.Event()
        with socket.create_connection(address(url), timeout=10) as slow:
            slow.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b"
                         b"\r\nContent-Length: %d\r\n\r\n" % len(body))

            def trickle():
                for byte in body[:200]:  # bounded: 200 bytes, 20 s at most
                    if stop.is_set():
                        return
                    try:
                        slow.send(bytes([byte]))
                    except OSError:
                        return
                    time.sleep(0.1)

            sender = threading.Thread(target=trickle, daemon=True)
            started = time.monotonic()
            sender.start()
            assert get_health(url) == 200  # others are answered meanwhile
            reply = read_reply(slow, 15)
            took = time.monotonic() - started
            stop.set()
            sender.join(5)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert took < 10, took
        assert get_health(url) == 200


def test_thirty_concurrent_clients_mixing_good_and_bad_requests(client, images):
    png = images[0].read_bytes()
    bad = list(malformed_bodies(png).values())
    want = client.post("/predict", files=[upload(images[0])], data={"k": "3"}).json()

    def one(position: int):
        kind = position % 3
        if kind == 0:
            return "good", client.post("/predict", files=[upload(images[0])], data={"k": "3"})
        if kind == 1:
            return "text", client.post("/search", json={"text": f"a fox {position}", "k": 2})
        content_type, body = bad[position % len(bad)]
        return "bad", client.post("/predict", content=body, headers={"content-type": content_type})

    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(one, range(60)))
    for kind, response in answers:
        assert response.status_code != 500 and response.headers["content-type"].startswith("application/json")
        if kind == "bad":
            assert 400 <= response.status_code < 500, response.text[:200]
        else:
            assert response.status_code == 200, response.text[:200]
        if kind == "good":
            assert response.json() == want  # identical requests, identical vectors, under concurrency
