"""`img2prompt serve`: a small HTTP front end (FastAPI) over an opened `Img2PromptIndex`, plus a web page.

    app = create_app(img2prompt.open_index("out/index"))       # or: img2prompt serve out/index

The server holds no retrieval logic: every request is one call of the public API (`search_images`,
`search_texts`, `predict_with_neighbours`, `interrogate`) on one worker thread that owns the index, so CPU/GPU
work is serialised. Requests waiting together share one encoder call (`embed_images` / `embed_texts`, bounded
by `merge_items` and `merge_wait`), then each is searched and blended on its own rows: a prediction's
statistics (the image-key mean of `beta`, consensus) come from its own request only, so each answer is the
answer it gets alone (vectors to float32 rounding). The queue in front of the worker is bounded (503 when
full) and holds only requests that have fully arrived.

Every request is bounded (limits.py): body bytes (413 while reading), queries per request, k,
form parts, decoded image bytes (from the headers, before any pixel is decoded; images are then decoded by
the API one at a time as it encodes them), body arrival time (408), and time waiting for the model (503).
Connections are bounded per client and in all, and a connection must send its request headers within a few
seconds (GuardedH11Protocol), so idle or slow clients cannot hold the server. Host and Origin are checked
(DNS rebinding, cross-site posts). Uploads are decoded from memory: nothing is written to disk.

The modules, one job each: limits (ServeLimits, the bounds), worker (the model thread and merged encoder
calls), guard (Host / Origin), protocol (uvicorn's h11 protocol with connection bounds), forms (bodies and
multipart forms), routes (the handlers), openapi (the /docs document), reload (POST /admin/reload), app
(create_app), runner (bind, serve, background_server); web/ holds the page. Only limits is imported by the
CLI to build its parser: nothing here imports FastAPI until a server is made.
"""
from __future__ import annotations

import importlib
from typing import Any

# The names a program uses to run the server, each from its module, imported on first use (FastAPI with it).
_PUBLIC = {"create_app": "app", "serve": "runner", "background_server": "runner", "ModelWorker": "worker",
           "ServeLimits": "limits", "DEFAULT_LIMITS": "limits"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'img2prompt.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"img2prompt.serve.{_PUBLIC[name]}"), name)
