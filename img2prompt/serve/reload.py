"""POST /admin/reload: re-open the served index from its path and swap it in (after `img2prompt add`).

`add` rebuilds the index beside the old folder and swaps it in, manifest last; a running server still holds
the old opened index until this endpoint re-opens it with the options the server was started with.

- Who may call it: with an API key, only requests carrying it (401 otherwise). Without a key, only a server
  bound to a loopback address (127.0.0.1, localhost, ::1); a keyless server on another address answers 403,
  since anyone who can reach it could otherwise make it reload (and load models) at will.
- The new index is opened in a thread (models load there, not on the event loop, not on the model worker, so
  searches keep being answered meanwhile); one reload at a time (409 while one runs).
- The swap is two assignments on the event loop with no await between, so a handler sees the old index or the
  new one, never a mix. A job already queued keeps a reference to the index it was queued on (`worker._Job.index`)
  and finishes on it. The old index is not closed here: it is freed by reference counting the moment the last
  job holding it is done (closing it could pull its search backend from under a job still running). Nothing
  may hold it in a reference cycle (a session's closures, a model's replica list, the worker's last job):
  a cycle waits for a full gc pass, which a big heap rarely runs, so each reload grew the server by a
  model's worth (tests/test_serve_reload.py reloads 230 times and checks each old index is gone).
- An index that fails to open (damaged, half-written, wrong models) → 409 {"detail": ...}; the old index
  keeps serving.
"""
from __future__ import annotations

import asyncio
from typing import Any, Sequence

from fastapi import FastAPI, HTTPException, Request

from img2prompt.errors import short_reason

_LOCK_KEY = "reload_lock"


def swap_index(state: Any, index) -> int:
    """Make `index` the one new requests use (state: routes.ServeState); returns the previous index's count."""
    previous = state.index.count
    state.index = state.worker.index = index  # no await between: handlers never see half a swap
    state.max_k = min(index.count, state.limits.max_k)
    return previous


async def reload_index(request: Request) -> dict:
    state = request.app.state.serve  # routes.ServeState (not imported: routes imports this module)
    if state.api_key is None and not state.loopback:
        raise HTTPException(403, "/admin/reload needs an API key on a server bound to a non-loopback address "
                                 "(start it with --api-key)")
    if state.reopen is None:
        raise HTTPException(409, "this server was not given a way to re-open its index")
    lock: asyncio.Lock = getattr(request.app.state, _LOCK_KEY)
    if lock.locked():
        raise HTTPException(409, "a reload is already running")
    async with lock:
        try:
            index = await asyncio.to_thread(state.reopen)
            count = index.count
        except Exception as exc:  # a damaged or half-written index: one line, the old one keeps serving
            raise HTTPException(409, f"reload failed, still serving the previous index: "
                                     f"{short_reason(exc, 300)}") from None
        previous = swap_index(state, index)
    return {"count": count, "previous": previous}


def add_reload_route(app: FastAPI, dependencies: Sequence) -> None:
    """Register the route; `dependencies`: serve's key check (PROTECTED)."""
    setattr(app.state, _LOCK_KEY, asyncio.Lock())
    app.add_api_route("/admin/reload", reload_index, methods=["POST"], dependencies=list(dependencies),
                      summary="re-open the index from its path (after `img2prompt add`) and serve the new one",
                      description="Answers {count, previous}. 409 when the index fails to open (the old one "
                                  "keeps serving) or a reload is running; without an API key, only on loopback.")
