"""The routes: the page, /health, POST /search, /predict and /interrogate, each one public-API call on the
model worker, with the state they share (ServeState) and the checks of their fields."""
from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.responses import HTMLResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from img2prompt.api import DEFAULT_MODIFIERS, DEFAULT_SEARCH_K
from img2prompt.index.manifest import built_with_stand_in
from img2prompt.serve.forms import TextQuery, check_uploads, parse_form, read_body
from img2prompt.serve.limits import ServeLimits
from img2prompt.serve.openapi import upload_body
from img2prompt.serve.reload import add_reload_route
from img2prompt.serve.worker import ModelWorker, QueueFull

# A favicon (the page's magnifier), so that browsers' /favicon.ico is not a 404 in every log
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" '
           'fill="#1f5fa8"/><circle cx="14" cy="14" r="7" fill="none" stroke="#fff" stroke-width="3"/>'
           '<path d="M19 19l7 7" stroke="#fff" stroke-width="3" stroke-linecap="round"/></svg>')



@dataclasses.dataclass
class ServeState:
    """What the handlers share, on `app.state.serve`."""
    index: Any  # the public API object (Img2PromptIndex); the server reaches the index only through it
    limits: ServeLimits
    worker: ModelWorker
    api_key: bytes | None
    page: str
    max_k: int
    reopen: Any = None  # () -> a freshly opened index (POST /admin/reload); None: reload is refused
    loopback: bool = True  # bound to a loopback address: /admin/reload works without an API key


def state_of(request: Request) -> ServeState:
    return request.app.state.serve


def read_page() -> str:
    return resources.files("img2prompt.serve").joinpath("web", "index.html").read_text(encoding="utf-8")


async def require_key(request: Request,
                      key: str | None = Security(APIKeyHeader(name="X-API-Key", auto_error=False)),
                      bearer: HTTPAuthorizationCredentials | None = Security(HTTPBearer(auto_error=False))) -> None:
    """Lets a request through only with the key (X-API-Key, or Authorization: Bearer), when one is set."""
    expected = state_of(request).api_key
    if expected is None:
        return
    given = key or (bearer.credentials if bearer else None)
    if not given or not secrets.compare_digest(given.encode(), expected):  # constant time: no key guessing
        raise HTTPException(401, "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)",
                            headers={"WWW-Authenticate": "Bearer"})


PROTECTED = [Depends(require_key)]


def check_k(state: ServeState, value: Any, default: int) -> int:
    try:
        k = int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        raise HTTPException(422, f"k must be an integer (got {value!r})") from None
    # the API checks k too, but its message names the CLI flag; here it is a field (index.count: public API)
    if k < 1:
        raise HTTPException(422, f"k must be at least 1 (got {k})")
    if k > state.index.count:
        raise HTTPException(422, f"k {k} is larger than the index ({state.index.count} prompts)")
    if k > state.limits.max_k:
        raise HTTPException(422, f"k {k} is over this server's limit of {state.limits.max_k}")
    return k


def check_batch(state: ServeState, count: int, what: str) -> None:
    if count > state.limits.max_batch:
        raise HTTPException(413, f"{count:,} {what} in one request; this server takes at most "
                                 f"{state.limits.max_batch} (send several requests)")


def number(fields: dict[str, str], name: str) -> dict[str, float]:
    if fields.get(name) in (None, ""):
        return {}
    try:
        return {name: float(fields[name])}
    except ValueError:
        raise HTTPException(422, f"{name} must be a number (got {fields[name]!r})") from None


def refuse_when_full(state: ServeState) -> None:
    if state.worker.pending >= state.limits.queue_size:  # before reading a body that could not be queued anyway
        raise QueueFull()


async def read_images(request: Request, endpoint: str) -> tuple[list[str], list[bytes], dict[str, str]]:
    state = state_of(request)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        if endpoint == "/predict":
            raise HTTPException(415, "/predict takes image uploads only (multipart/form-data, a file field named "
                                     "image); for a text query use POST /search with JSON {\"text\": ..., \"k\": ...}")
        raise HTTPException(415, "send the image(s) as multipart/form-data (a file field named image)")
    body = await read_body(request, state.limits.max_upload, state.limits.body_timeout)
    files, fields = await asyncio.to_thread(parse_form, body, content_type, state.limits.max_fields)
    del body
    if not files:
        raise HTTPException(422, "no image in the form: send a file field named image")
    check_batch(state, len(files), "images")
    await asyncio.to_thread(check_uploads, files, state.limits)
    return [name for name, _ in files], [data for _, data in files], fields


async def run(state: ServeState, started: float, kind: str, items: list, **options: Any) -> list:
    """The worker's answer, within what is left of the request's time budget (503 past it)."""
    left = state.limits.request_timeout - (time.monotonic() - started)
    future = state.worker.submit(kind, items, **options)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(left, 0.001))
    except TimeoutError:
        future.cancel()  # still queued: the worker skips it
        raise HTTPException(503, f"busy: the request did not finish within {state.limits.request_timeout:g} s; "
                                 "retry shortly", headers={"Retry-After": "5"}) from None


def refuse_failed(names: list[str], errors: list[str | None]) -> None:
    """An image that passed the header check but failed to decode (truncated data): 400 naming it."""
    for name, error in zip(names, errors):
        if error is not None:
            raise HTTPException(400, f"{name}: {error}")


async def home(request: Request) -> HTMLResponse:
    return HTMLResponse(state_of(request).page)  # public even with --api-key: the page is where the key is entered


async def favicon() -> Response:
    return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


async def health(request: Request) -> dict:
    from img2prompt import __version__

    state = state_of(request)
    index, limits = state.index, state.limits
    models = index.manifest["models"]
    return {"status": "ready", "version": __version__, "count": index.count, "device": index.device,
            "search": (index.manifest.get("search") or {}).get("kind"),
            "models": {name: {"name": record.get("name"), "sha256": record.get("sha256"), "dim": record.get("dim")}
                       for name, record in models.items()},
            # a random-weights CLIP (img2prompt.stand_in), as the manifest records it: the page warns
            "stand_in": built_with_stand_in(index.manifest),
            "k": {"default": min(DEFAULT_SEARCH_K, state.max_k), "max": state.max_k},
            "max_upload": limits.max_upload, "max_json": limits.max_json, "max_batch": limits.max_batch,
            "queue": {"pending": state.worker.pending, "max": limits.queue_size, **state.worker.stats}}


async def search(request: Request) -> list[dict]:
    state, started = state_of(request), time.monotonic()
    refuse_when_full(state)
    if request.headers.get("content-type", "").startswith("application/json"):
        body = await read_body(request, state.limits.max_json, state.limits.body_timeout)
        try:
            query = TextQuery.model_validate_json(body)
        except ValidationError as exc:
            raise HTTPException(422, "; ".join(f"{'.'.join(map(str, error['loc'])) or 'body'}: {error['msg']}"
                                               for error in exc.errors()[:5])) from None
        texts = [query.text] if isinstance(query.text, str) else query.text
        check_batch(state, len(texts), "texts")
        if not texts or not all(text.strip() for text in texts):
            raise HTTPException(422, "text must not be empty")
        # CLIP reads 77 tokens: a longer text is cut here (the tokenizer cuts too, see tokenization.py)
        texts = [text[:state.limits.max_text_chars] for text in texts]
        k = check_k(state, query.k, DEFAULT_SEARCH_K)
        weights = {"model_weights": query.model_weights} if query.model_weights else {}
        if query.min_score is not None:
            weights["min_score"] = query.min_score
        return [result.to_dict() for result in await run(state, started, "texts", texts, k=k, **weights)]
    names, images, fields = await read_images(request, "/search")
    k = check_k(state, fields.get("k"), DEFAULT_SEARCH_K)
    weights = {"model_weights": fields["model_weights"]} if fields.get("model_weights") else {}
    weights.update(number(fields, "min_score"))
    results = await run(state, started, "images", images, k=k, **weights)
    refuse_failed(names, [result.error for result in results])
    # the API names an in-memory image by its position in the request; here it is the uploaded file's name
    return [dataclasses.replace(result, query=name).to_dict() for name, result in zip(names, results)]


async def predict(request: Request) -> dict:
    state, started = state_of(request), time.monotonic()
    refuse_when_full(state)
    names, images, fields = await read_images(request, "/predict")
    options: dict[str, Any] = {"k": check_k(state, fields.get("k"), _blend_defaults()["k"])}
    for name in ("temperature", "alpha", "consensus", "beta", "min_score", "power", "epsilon"):
        options.update(number(fields, name))
    for name in ("model_weights", "weighting"):  # strings: the settings dataclass checks them
        if fields.get(name):
            options[name] = fields[name]
    results = await run(state, started, "predict", images, **options)
    refuse_failed(names, [hits.error for _, hits in results])
    return {"k": options["k"], "predictions": [
        {"query": name, "vector": vector.tolist(), "neighbours": hits.to_dict()["results"]}
        for name, (vector, hits) in zip(names, results)]}


async def interrogate(request: Request) -> list[dict]:
    state, started = state_of(request), time.monotonic()
    refuse_when_full(state)
    names, images, fields = await read_images(request, "/interrogate")
    try:
        modifiers = int(fields.get("modifiers") or DEFAULT_MODIFIERS)
    except ValueError:
        raise HTTPException(422, f"modifiers must be an integer (got {fields['modifiers']!r})") from None
    if not 0 <= modifiers <= 50:
        raise HTTPException(422, f"modifiers must be between 0 and 50 (got {modifiers})")
    results = await run(state, started, "interrogate", images, modifiers=modifiers)
    refuse_failed(names, [result.error for result in results])
    return [{**result.to_dict(), "query": name} for name, result in zip(names, results)]


def _blend_defaults() -> dict[str, float]:
    from img2prompt.api import RetrievalSettings

    default = RetrievalSettings()
    return {"k": default.k, "temperature": default.temperature, "alpha": default.alpha,
            "consensus": default.consensus, "beta": default.beta, "power": default.power,
            "epsilon": default.epsilon}


def add_routes(app: FastAPI) -> None:
    """Every route of the server on `app` (the page, /health, the API, /admin/reload)."""
    from img2prompt.api import WEIGHTINGS

    weights = {"type": "string", "description": "an index of several CLIP models: W1,W2,..."}
    min_score = {"type": "number", "description": "leave out hits scoring under it (the best one stays)"}
    defaults = _blend_defaults()
    app.add_api_route("/", home, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/favicon.ico", favicon, methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"], dependencies=PROTECTED,
                      summary="ready: index size, models, device, limits, queue")
    app.add_api_route("/search", search, methods=["POST"], dependencies=PROTECTED, openapi_extra=upload_body(
        {"k": {"type": "integer", "default": DEFAULT_SEARCH_K}, "model_weights": weights, "min_score": min_score},
        TextQuery.model_json_schema()),
        summary="ranked prompts for uploaded image(s) or JSON {text, k}: the `img2prompt search --json` list")
    app.add_api_route("/predict", predict, methods=["POST"], dependencies=PROTECTED, openapi_extra=upload_body(
        {"k": {"type": "integer", "default": defaults["k"]},
         **{name: {"type": "number", "default": defaults[name]}
            for name in ("temperature", "alpha", "consensus", "beta", "power", "epsilon")},
         "weighting": {"type": "string", "enum": list(WEIGHTINGS), "default": WEIGHTINGS[0],
                       "description": "softmax (temperature) or inverse-distance: 1 / (d^power + epsilon), "
                                      "d = 1 - cosine"},
         "model_weights": weights, "min_score": min_score}),
        summary="the predicted 384-d prompt embedding of each uploaded image, with the neighbours blended",
        description="Images only (multipart): the Python API predicts from images; for a text, POST /search "
                    "returns its ranked prompts.")
    app.add_api_route("/interrogate", interrogate, methods=["POST"], dependencies=PROTECTED,
                      openapi_extra=upload_body({"modifiers": {"type": "integer", "default": DEFAULT_MODIFIERS}}),
                      summary="a readable prompt per uploaded image: the best neighbour's prompt + ranked modifiers")
    add_reload_route(app, PROTECTED)  # POST /admin/reload (reload.py)
