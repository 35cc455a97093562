"""The FastAPI app over an opened index: its state, error answers, routes, OpenAPI document and host guard.

    app = create_app(img2prompt.open_index("out/index"))       # run it with runner.serve / background_server
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from img2prompt.errors import UserError
from img2prompt.serve.guard import LOOPBACK_NAMES, HostGuard, HostPolicy, host_name
from img2prompt.serve.limits import DEFAULT_HOST, DEFAULT_LIMITS, ServeLimits
from img2prompt.serve.openapi import install_openapi
from img2prompt.serve.routes import ServeState, add_routes, read_page, state_of
from img2prompt.serve.worker import ModelWorker, QueueFull

log = logging.getLogger(__name__)


async def user_error(_request: Request, exc: UserError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


async def queue_full(request: Request, _exc: QueueFull) -> JSONResponse:
    waiting = state_of(request).limits.queue_size
    return JSONResponse({"detail": f"busy: {waiting} requests are already waiting; retry shortly"},
                        status_code=503, headers={"Retry-After": "1"})


async def client_gone(request: Request, _exc: ClientDisconnect) -> Response:
    # not an error: nobody is left to read an answer (a closed tab, a cancelled upload)
    log.debug("client %s disconnected before its request arrived", request.client.host if request.client else "?")
    return Response(status_code=400)


async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error", exc_info=exc)  # the traceback goes to the server log, never to the client
    return JSONResponse({"detail": "internal server error"}, status_code=500)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    worker = app.state.serve.worker
    worker.start()
    try:
        yield
    finally:
        await asyncio.to_thread(worker.stop)


def create_app(index, *, api_key: str | None = None, limits: ServeLimits | None = None,
               host: str | None = DEFAULT_HOST, allowed_hosts: Sequence[str] = (),
               max_upload: int | None = None, queue_size: int | None = None, reopen=None) -> FastAPI:
    """A FastAPI app over an opened `Img2PromptIndex` (not closed here: the caller owns it).

    host: the address the server is bound to (allowed as Host, with 127.0.0.1/localhost/::1 and
    `allowed_hosts`; "*" allows any). max_upload / queue_size override those fields of `limits`.
    reopen: a callable opening the index afresh, for POST /admin/reload (reload.py).
    The model worker runs during the app's lifespan (uvicorn, or `with TestClient(app)`).
    """
    from img2prompt import __version__

    if api_key is not None and not api_key:
        raise ValueError("the API key is empty (an unset variable?): give a key, or none to serve without one")
    limits = limits or DEFAULT_LIMITS
    overrides = {name: value for name, value in (("max_upload", max_upload), ("queue_size", queue_size))
                 if value is not None}
    limits = dataclasses.replace(limits, **overrides).check()
    app = FastAPI(title="img2prompt", version=__version__, lifespan=_lifespan,
                  description="Which prompts made images like this? Ranked prompts for an image or a text, and "
                              "the predicted all-MiniLM-L6-v2 prompt embedding (384-d) of an image.")
    worker = ModelWorker(index, limits.queue_size, limits.merge_items, limits.merge_wait)
    app.state.serve = ServeState(index=index, limits=limits, worker=worker,
                                 api_key=api_key.encode() if api_key else None,
                                 page=read_page(),  # read once: a missing page fails at start-up, not on a visit
                                 max_k=min(index.count, limits.max_k), reopen=reopen,
                                 loopback=host is not None and host_name(host) in LOOPBACK_NAMES)
    app.state.worker = app.state.serve.worker
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(HostGuard, policy=HostPolicy(host, allowed_hosts))
    add_routes(app)
    install_openapi(app, keyed=api_key is not None)  # /openapi.json says what the server answers (openapi.py)
    return app
