"""Running the app: a socket bound before the models load, uvicorn with the guarded protocol, the `serve`
command's loop, and a background server for tests and benches."""
from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from typing import Any, Iterator, Sequence

import uvicorn  # the serve extra, imported here so that a missing piece is named before any model loads
from fastapi import FastAPI

from img2prompt.encoders import DEFAULT_DEVICE
from img2prompt.errors import UserError
from img2prompt.serve.app import create_app
from img2prompt.serve.guard import LOOPBACK_NAMES
from img2prompt.serve.limits import DEFAULT_HOST, DEFAULT_LIMITS, DEFAULT_PORT, ServeLimits
from img2prompt.serve.protocol import guarded_protocol

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A bound socket, made before the models load: a port in use fails in a second, as one line (OSError)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(2048)  # listening now, or a second server could bind the same port while this one loads
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:  # the OS's "Address already in use" says neither which nor what to do
            raise UserError(f"port {port} on {host} is already in use (another server?): choose another with "
                            f"--port, e.g. --port {port + 1 if port < 65535 else 8000}, or --port 0 for any free "
                            "port") from None
        raise
    return sock


def _uvicorn_server(app: FastAPI, log_level: str) -> uvicorn.Server:
    # No limit_concurrency: uvicorn counts idle connections against it, so 144 idle sockets once answered
    # everyone 503. The queue holds only requests that have fully arrived; connections are bounded per client
    # and in all, and must send their headers in time (GuardedH11Protocol).
    limits: ServeLimits = app.state.serve.limits
    config = uvicorn.Config(app, log_level=log_level, http=guarded_protocol(limits), limit_concurrency=None,
                            timeout_keep_alive=min(5, limits.header_timeout), timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = DEFAULT_HOST, port: int = 0, *,
                      log_level: str = "warning", **_ignored: Any) -> Iterator[str]:
    """Run `app` with uvicorn in a thread (port 0: a free one); yields the base URL. For tests and benches."""
    sock = bind(host, port)
    server = _uvicorn_server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve(index_path: str, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = DEFAULT_DEVICE,
          api_key: str | None = None, limits: ServeLimits | None = None, allowed_hosts: Sequence[str] = (),
          clip_model: str | None = None, clip_pretrained: str | None = None, text_model: str | None = None,
          verify: bool = False, log_level: str = "info", precision: str | None = None) -> None:
    """Open the index once, then serve it until interrupted (Ctrl+C)."""
    from img2prompt.api import open_index

    if api_key is not None and not api_key:
        raise UserError("--api-key is empty (an unset variable?): give a key, or leave the flag out")
    limits = (limits or DEFAULT_LIMITS).check()
    sock = bind(host, port)
    try:
        if not api_key and host not in LOOPBACK_NAMES:
            log.warning("serving on %s without --api-key: anyone who can reach this address can query it", host)
        opening = dict(device=device, clip_model=clip_model, clip_pretrained=clip_pretrained,
                       text_model=text_model, verify=verify, precision=precision)
        with open_index(index_path, **opening) as index:
            app = create_app(index, api_key=api_key, limits=limits, host=host, allowed_hosts=allowed_hosts,
                             reopen=lambda: open_index(index_path, **opening))  # POST /admin/reload
            url = url_of(sock)  # printed, not logged: where to point the browser is this command's output
            print(f"serving {index.count:,} prompts on {index.device} at {url}/ (API docs: {url}/docs); Ctrl+C stops",
                  flush=True)
            _uvicorn_server(app, log_level).run(sockets=[sock])
    finally:
        sock.close()
