"""`img2prompt serve`: a small HTTP front end (FastAPI) over an opened `Img2PromptIndex`, plus a web page.

    app = create_app(img2prompt.open_index("out/index"))       # or: img2prompt serve out/index

The server holds no retrieval logic: every request is one call of the public API (`search_images`,
`search_texts`, `predict_with_neighbours`, `interrogate`) on one worker thread that owns the index, so CPU/GPU
work is serialised. Requests waiting together share one encoder call (`embed_images` / `embed_texts`, bounded
by `merge_items` and `merge_wait`), then each is searched and blended on its own rows: a prediction's
statistics (the image-key mean of `beta`, consensus) come from its own request only, so each answer is the
answer it gets alone (vectors to float32 rounding). The queue in front of the worker is bounded (503 when
full) and holds only requests that have fully arrived.

Every request is bounded (img2prompt.serve_limits): body bytes (413 while reading), queries per request, k,
form parts, decoded image bytes (from the headers, before any pixel is decoded; images are then decoded by
the API one at a time as it encodes them), body arrival time (408), and time waiting for the model (503).
Connections are bounded per client and in all, and a connection must send its request headers within a few
seconds (GuardedH11Protocol), so idle or slow clients cannot hold the server. Host and Origin are checked
(DNS rebinding, cross-site posts). Uploads are decoded from memory: nothing is written to disk.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import logging
import queue
import secrets
import socket
import threading
import time
from concurrent.futures import Future
from importlib import resources
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np
import uvicorn  # the serve extra, imported here so that a missing piece is named before any model loads
from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from img2prompt.errors import UserError, short_reason
from img2prompt.index.manifest import built_with_stand_in
from img2prompt.query.interrogate import DEFAULT_MODIFIERS
from img2prompt.serve_limits import ServeLimits
from img2prompt.serve_openapi import install_openapi
from img2prompt.serve_reload import add_reload_route

log = logging.getLogger(__name__)

DEFAULT_LIMITS = ServeLimits()
DEFAULT_MAX_UPLOAD = DEFAULT_LIMITS.max_upload
DEFAULT_QUEUE_SIZE = DEFAULT_LIMITS.queue_size
MAX_K = DEFAULT_LIMITS.max_k
DEFAULT_SEARCH_K = 10  # as `img2prompt search`
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# A favicon (the page's magnifier), so that browsers' /favicon.ico is not a 404 in every log
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" '
           'fill="#1f5fa8"/><circle cx="14" cy="14" r="7" fill="none" stroke="#fff" stroke-width="3"/>'
           '<path d="M19 19l7 7" stroke="#fff" stroke-width="3" stroke-linecap="round"/></svg>')


class QueueFull(Exception):
    """The worker's queue is full: the request is refused (503) rather than held in memory."""


@dataclasses.dataclass
class _Job:
    kind: str  # "images" | "texts" | "predict" | "interrogate"
    items: list  # image bytes or texts
    options: dict
    future: Future
    index: Any = None  # the index when it was queued: a job in flight finishes on it across a reload


# Which encoder a job's items go through: jobs of one encoder (and one index) can share one model call.
ENCODER_OF = {"images": "image", "predict": "image", "interrogate": "image", "texts": "text"}


class ModelWorker:
    """The one thread that calls the index; each job (= one request) is one API call.

    Jobs waiting together for the same encoder share ONE encoder call (bounded by `merge_items`, waiting at
    most `merge_wait` seconds for more to arrive), and the vectors are then split back: each job is searched
    and blended from its own rows only, so every statistic of a prediction (beta's image-key mean from the
    queries, consensus) comes from its own request, as if it had been served alone."""

    def __init__(self, index, queue_size: int = DEFAULT_QUEUE_SIZE, merge_items: int = DEFAULT_LIMITS.merge_items,
                 merge_wait: float = DEFAULT_LIMITS.merge_wait) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1 (got {queue_size})")
        self.index = index
        self.queue_size = queue_size
        self.merge_items, self.merge_wait = merge_items, merge_wait
        # calls: API calls (one per request); encoder_calls: model calls that served several requests at once
        self.stats = {"requests": 0, "calls": 0, "encoder_calls": 0, "merged_requests": 0}
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._held: collections.deque[_Job | None] = collections.deque()  # taken, for the next round
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._held)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="img2prompt-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs queued so far, end the thread, and cancel any job that came in after."""
        if self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=timeout)
            self._thread.join(timeout)
        self._thread = None
        left = list(self._held)
        self._held.clear()
        with contextlib.suppress(queue.Empty):
            while True:
                left.append(self._queue.get_nowait())
        for job in left:
            if job is not None:
                job.future.cancel()

    def submit(self, kind: str, items: list, **options: Any) -> Future:
        """Queue a job; raises QueueFull at once when the queue is full."""
        if self._thread is None:
            raise RuntimeError("the model worker is not running (use the app inside its lifespan)")
        job = _Job(kind, list(items), options, Future(), self.index)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        self.stats["requests"] += 1
        return job.future

    def _loop(self) -> None:
        while (first := self._held.popleft() if self._held else self._queue.get()) is not None:
            self._run_batch(first)
            del first  # not held while waiting for the next one: it pins the index it was queued on (reload)

    def _run_batch(self, first: _Job) -> None:
        """`first` and the jobs that join it: one encoder call, then one API call each (its own answer)."""
        # a job whose client gave up while it was queued (its time budget) is skipped
        jobs = [job for job in self._gather(first) if job.future.set_running_or_notify_cancel()]
        for job, encoded in zip(jobs, self._encode_together(jobs)):
            try:
                job.future.set_result(self._call(job.kind, job.items, job.options, job.index, encoded))
            except Exception as exc:
                job.future.set_exception(exc)

    def _gather(self, first: _Job) -> list[_Job]:
        """`first` and the jobs queued behind it that can share its encoder call, in queue order; the first
        that cannot (another encoder or index, too many items, the stop sentinel) waits for the next round."""
        jobs, items = [first], len(first.items)
        deadline = time.monotonic() + self.merge_wait
        while items < self.merge_items:
            try:
                left = deadline - time.monotonic()
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None or ENCODER_OF.get(job.kind) != ENCODER_OF.get(first.kind) or job.index is not first.index \
                    or items + len(job.items) > self.merge_items:
                self._held.append(job)
                break
            jobs.append(job)
            items += len(job.items)
        return jobs

    def _encode_together(self, jobs: list[_Job]) -> list:
        """Per job, its part of one encoder call over every job's items; None where a job encodes alone
        (a job on its own, or when the merged call fails: each job then meets its own error alone)."""
        if len(jobs) < 2:
            return [None] * len(jobs)
        index = jobs[0].index if jobs[0].index is not None else self.index
        sizes = [len(job.items) for job in jobs]
        items = [item for job in jobs for item in job.items]
        try:
            if ENCODER_OF[jobs[0].kind] == "text":
                parts = np.split(index.embed_texts(items), np.cumsum(sizes)[:-1])
            else:
                parts = index.embed_images(items, workers=0).split(sizes)
        except Exception as exc:  # noqa: BLE001 — each job retries alone and reports its own error
            log.debug("merged encoder call failed (%s): each request encodes alone", short_reason(exc))
            return [None] * len(jobs)
        self.stats["encoder_calls"] += 1
        self.stats["merged_requests"] += len(jobs)
        return parts

    def _call(self, kind: str, items: list, options: dict, index: Any = None, encoded: Any = None) -> list:
        """One public-API call for one request: a list of results aligned with `items`; `encoded`: its
        vectors from a merged encoder call (None: the call encodes them)."""
        self.stats["calls"] += 1
        index = index if index is not None else self.index
        hits = {"model_weights": options.get("model_weights"), "min_score": options.get("min_score")}
        if kind == "texts":
            return index.search_texts(items, options["k"], vectors=encoded, **hits)
        if kind == "images":  # no decoding processes per call
            return index.search_images(items, options["k"], workers=0, embedded=encoded, **hits)
        if kind == "predict":
            vectors, neighbours = index.predict_with_neighbours(items, workers=0, embedded=encoded, **options)
            return list(zip(vectors, neighbours))
        if kind == "interrogate":
            return index.interrogate(items, options["modifiers"], workers=0, embedded=encoded)
        raise ValueError(f"unknown job kind {kind!r}")


# -- Host and Origin ---------------------------------------------------------------------------------------

def host_name(value: str) -> str:
    """A Host header or address → its lower-case name without port or brackets ("[::1]:80" → "::1")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class HostPolicy:
    """Which Host names the server answers to (DNS rebinding: a page of evil.example whose name now points
    at 127.0.0.1 sends Host: evil.example) and which Origins may POST (a cross-site form or fetch)."""

    def __init__(self, bound: str | None = "127.0.0.1", allowed: Sequence[str] = ()) -> None:
        self.any = "*" in allowed
        self.extra = {host_name(name) for name in allowed if name != "*"}
        self.names = set(LOOPBACK_NAMES) | self.extra
        if bound is not None and host_name(bound) not in WILDCARD_HOSTS:
            self.names.add(host_name(bound))
        elif bound is not None:  # all interfaces: this machine's own names and addresses too
            self.names |= _machine_names()

    def refusal(self, method: str, host: str | None, origin: str | None) -> str | None:
        """Why a request is refused (403), or None."""
        if not self.any and (host is None or host_name(host) not in self.names):
            return (f"Host {host!r} is not a name this server answers to (start it with --allowed-host "
                    f"{host_name(host or '') or 'NAME'} to allow it)")
        if origin is None or method in SAFE_METHODS:
            return None
        parts = urlsplit(origin)
        same_origin = host is not None and parts.netloc.lower() == host.strip().lower()
        if same_origin or (parts.hostname and (self.any or host_name(parts.hostname) in self.extra)):
            return None
        return f"cross-origin request from {origin!r} refused"


def _machine_names() -> set[str]:
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    with contextlib.suppress(OSError):
        names |= {info[4][0].lower() for info in socket.getaddrinfo(socket.gethostname(), None)}
    return {host_name(name) for name in names if name}


class HostGuard:
    """ASGI middleware: every HTTP request passes HostPolicy before any route (the page included) runs."""

    def __init__(self, app, policy: HostPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {name.decode(): value.decode("latin-1") for name, value in scope["headers"]
                       if name in (b"host", b"origin")}
            reason = self.policy.refusal(scope["method"], headers.get("host"), headers.get("origin"))
            if reason:
                await JSONResponse({"detail": reason}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- request parsing ---------------------------------------------------------------------------------------

class TextQuery(BaseModel):
    """JSON body of POST /search for a text query."""
    text: str | list[str] = Field(description="one query text, or several (at most the server's max batch)",
                                  examples=["a castle on a hill, matte painting"])
    k: int = Field(DEFAULT_SEARCH_K, description="results per query (1 … min(index size, the server's max k))")
    model_weights: str | None = Field(None, description="an index of several CLIP models: W1,W2,... (default equal)")
    min_score: float | None = Field(None, description="leave out hits scoring under it (the best one stays)")


async def read_body(request: Request, limit: int, timeout: float = DEFAULT_LIMITS.body_timeout) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (before it is all read), and
    with 408 when it has not all arrived within `timeout` seconds (a slow upload holds no slot for long)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {int(declared):,} bytes is over the limit of {limit:,} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"request body is over the limit of {limit:,} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPException(408, f"the request body did not arrive within {timeout:g} s") from None
    return b"".join(chunks)


def parse_form(body: bytes, content_type: str, max_fields: int = DEFAULT_LIMITS.max_fields
               ) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """multipart/form-data in memory → ([(file name, bytes)] in order, {field: value}); at most `max_fields`
    parts (413). CPU work on a whole body: the server runs it in a thread, never on the event loop."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart body without a boundary")
    parts: list[dict] = []
    header: dict[str, bytes] = {}

    def on_part_begin() -> None:
        if len(parts) >= max_fields:
            raise HTTPException(413, f"the form has over {max_fields} parts (files and fields), this server's limit")
        parts.append({"headers": {}, "data": []})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] = header.get("value", b"") + data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header.pop("field", b"").lower()] = header.pop("value", b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(data[start:end])

    try:  # the constructor too: it refuses a boundary over 256 characters (FormParserError)
        parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                            "on_header_value": on_header_value, "on_header_end": on_header_end,
                                            "on_part_data": on_part_data})
        parser.write(body)
        parser.finalize()
    except HTTPException:
        raise
    except Exception as exc:  # python-multipart's parse errors
        raise HTTPException(400, f"malformed multipart body ({short_reason(exc, 120)})") from None
    files, fields = [], {}
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        data = b"".join(part["data"])
        if b"filename" in disposition:
            if name != "image":  # a misnamed field is the client's mistake, not an image to guess at
                raise HTTPException(422, f"a file in the form field {name[:60]!r}: send images in a field named image")
            files.append((disposition[b"filename"].decode("utf-8", "replace") or name or "upload", data))
        elif name in fields:  # the document says one value (k, min_score, …): a second one is not guessed at
            raise HTTPException(422, f"the form field {name[:60]!r} is given twice: send it once")
        else:
            fields[name] = data.decode("utf-8", "replace")
    return files, fields


def check_uploads(files: list[tuple[str, bytes]], limits: ServeLimits) -> None:
    """Each upload's header (format, size, decoded bytes) checked without decoding pixels, and the decoded
    bytes summed over the request; 400 / 413 naming the file."""
    from img2prompt.encoders.images import ImageDecodeError, check_image, decoded_bytes

    total = 0
    for name, data in files:
        try:
            width, height = check_image(data, limits.max_decoded_image)
        except ImageDecodeError as exc:
            raise HTTPException(400, f"{name}: {exc}") from None
        total += decoded_bytes(width, height)
        if total > limits.max_decoded_request:
            raise HTTPException(413, f"{name}: the request's images would decode to over "
                                     f"{limits.max_decoded_request / 2**20:,.0f} MiB, this server's limit")


# -- the app state and its handlers ------------------------------------------------------------------------

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


def _state(request: Request) -> ServeState:
    return request.app.state.serve


def _page() -> str:
    return resources.files("img2prompt").joinpath("web", "index.html").read_text(encoding="utf-8")


async def require_key(request: Request,
                      key: str | None = Security(APIKeyHeader(name="X-API-Key", auto_error=False)),
                      bearer: HTTPAuthorizationCredentials | None = Security(HTTPBearer(auto_error=False))) -> None:
    """Lets a request through only with the key (X-API-Key, or Authorization: Bearer), when one is set."""
    expected = _state(request).api_key
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
    state = _state(request)
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
    return HTMLResponse(_state(request).page)  # public even with --api-key: the page is where the key is entered


async def favicon() -> Response:
    return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


async def health(request: Request) -> dict:
    from img2prompt import __version__

    state = _state(request)
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
    state, started = _state(request), time.monotonic()
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
    state, started = _state(request), time.monotonic()
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
    state, started = _state(request), time.monotonic()
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


async def user_error(_request: Request, exc: UserError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


async def queue_full(request: Request, _exc: QueueFull) -> JSONResponse:
    waiting = _state(request).limits.queue_size
    return JSONResponse({"detail": f"busy: {waiting} requests are already waiting; retry shortly"},
                        status_code=503, headers={"Retry-After": "1"})


async def client_gone(request: Request, _exc: ClientDisconnect) -> Response:
    # not an error: nobody is left to read an answer (a closed tab, a cancelled upload)
    log.debug("client %s disconnected before its request arrived", request.client.host if request.client else "?")
    return Response(status_code=400)


async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error", exc_info=exc)  # the traceback goes to the server log, never to the client
    return JSONResponse({"detail": "internal server error"}, status_code=500)


# -- the app -----------------------------------------------------------------------------------------------

def _blend_defaults() -> dict[str, float]:
    from img2prompt.api import RetrievalSettings

    default = RetrievalSettings()
    return {"k": default.k, "temperature": default.temperature, "alpha": default.alpha,
            "consensus": default.consensus, "beta": default.beta, "power": default.power,
            "epsilon": default.epsilon}


def _body_doc(fields: dict, json_schema: dict | None = None) -> dict:
    """OpenAPI for a body read by hand (so that /docs offers the upload form): multipart image(s) + fields."""
    image = {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "image file(s): "
             "PNG, JPEG or WebP"}
    content = {"multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                                  "properties": {"image": image, **fields}}}}
    if json_schema:
        content["application/json"] = {"schema": json_schema}
    return {"requestBody": {"required": True, "content": content}}


def _routes(app: FastAPI) -> None:
    from img2prompt.api import WEIGHTINGS

    weights = {"type": "string", "description": "an index of several CLIP models: W1,W2,..."}
    min_score = {"type": "number", "description": "leave out hits scoring under it (the best one stays)"}
    defaults = _blend_defaults()
    app.add_api_route("/", home, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/favicon.ico", favicon, methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"], dependencies=PROTECTED,
                      summary="ready: index size, models, device, limits, queue")
    app.add_api_route("/search", search, methods=["POST"], dependencies=PROTECTED, openapi_extra=_body_doc(
        {"k": {"type": "integer", "default": DEFAULT_SEARCH_K}, "model_weights": weights, "min_score": min_score},
        TextQuery.model_json_schema()),
        summary="ranked prompts for uploaded image(s) or JSON {text, k}: the `img2prompt search --json` list")
    app.add_api_route("/predict", predict, methods=["POST"], dependencies=PROTECTED, openapi_extra=_body_doc(
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
                      openapi_extra=_body_doc({"modifiers": {"type": "integer", "default": DEFAULT_MODIFIERS}}),
                      summary="a readable prompt per uploaded image: the best neighbour's prompt + ranked modifiers")
    add_reload_route(app, PROTECTED)  # POST /admin/reload (serve_reload.py)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    worker = app.state.serve.worker
    worker.start()
    try:
        yield
    finally:
        await asyncio.to_thread(worker.stop)


def create_app(index, *, api_key: str | None = None, limits: ServeLimits | None = None,
               host: str | None = "127.0.0.1", allowed_hosts: Sequence[str] = (),
               max_upload: int | None = None, queue_size: int | None = None, reopen=None) -> FastAPI:
    """A FastAPI app over an opened `Img2PromptIndex` (not closed here: the caller owns it).

    host: the address the server is bound to (allowed as Host, with 127.0.0.1/localhost/::1 and
    `allowed_hosts`; "*" allows any). max_upload / queue_size override those fields of `limits`.
    reopen: a callable opening the index afresh, for POST /admin/reload (serve_reload.py).
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
                                 page=_page(),  # read once: a missing page fails at start-up, not on a visit
                                 max_k=min(index.count, limits.max_k), reopen=reopen,
                                 loopback=host is not None and host_name(host) in LOOPBACK_NAMES)
    app.state.worker = app.state.serve.worker
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(HostGuard, policy=HostPolicy(host, allowed_hosts))
    _routes(app)
    install_openapi(app, keyed=api_key is not None)  # /openapi.json says what the server answers (serve_openapi.py)
    return app


# -- connections -------------------------------------------------------------------------------------------

class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with connection bounds: at most `limits.max_connections_per_client` open
    connections per client address and `limits.max_connections` in all (more are closed at once), and each
    request's headers due within `limits.header_timeout` of connecting or of the previous response (an idle
    or slowloris connection is closed). Subclassed per server by `guarded_protocol`."""

    limits: ServeLimits = DEFAULT_LIMITS
    open_by_client: dict[str, int] = {}
    header_timer: asyncio.TimerHandle | None = None
    _counted: str | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = self.client[0] if self.client else "?"
        opened = self.open_by_client.get(peer, 0)
        if opened >= self.limits.max_connections_per_client or len(self.connections) > self.limits.max_connections:
            log.debug("refusing a connection from %s (%d open)", peer, opened)
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"connection: close\r\ncontent-length: 40\r\n\r\n"
                            b'{"detail": "too many open connections"}\n')
            transport.close()
            return
        self.open_by_client[peer] = opened + 1
        self._counted = peer
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        if self._counted is not None:
            left = self.open_by_client.get(self._counted, 1) - 1
            if left > 0:
                self.open_by_client[self._counted] = left
            else:
                self.open_by_client.pop(self._counted, None)
            self._counted = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:  # a request's headers have arrived
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()  # the next request's headers are due as the first one's were

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            log.debug("closing a connection from %s: no request headers within %g s",
                      self._counted, self.limits.header_timeout)
            self.transport.close()


def guarded_protocol(limits: ServeLimits) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class with its own limits and per-client counts (one per server)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "open_by_client": {}})


# -- running it --------------------------------------------------------------------------------------------

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
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *,
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


def serve(index_path: str, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
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
