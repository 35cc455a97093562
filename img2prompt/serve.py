"""`img2prompt serve`: a small HTTP front end (FastAPI) over an opened `Img2PromptIndex`, plus a web page.

    app = create_app(img2prompt.open_index("out/index"))       # or: img2prompt serve out/index

The server holds no retrieval logic: every query is one call of the public API (`search_images`,
`search_texts`, `predict`). Those calls run on one worker thread that owns the index, so CPU/GPU work is
serialised and requests waiting at the same time with the same settings run as one batch; the queue in
front of it is bounded (503 when full). Uploads are read into memory with the size limit enforced while
reading, and decoded from memory: nothing is written to disk.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import secrets
import socket
import threading
import time
from concurrent.futures import Future
from importlib import resources
from typing import Any, Iterator

import uvicorn  # the serve extra, imported here so that a missing piece is named before any model loads
from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header

from img2prompt.errors import UserError, short_reason
from img2prompt.query.interrogate import DEFAULT_MODIFIERS

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = 20 * 2**20  # bytes of request body (the image(s) plus a few hundred bytes of form)
DEFAULT_QUEUE_SIZE = 64  # requests waiting for the model; more get 503 instead of piling up in memory
MAX_BATCH = 32  # images or texts per model call when requests are batched together
MAX_K = 1000  # results per query: k ≤ min(index size, MAX_K) keeps one response from being the whole corpus
DEFAULT_SEARCH_K = 10  # as `img2prompt search`


class QueueFull(Exception):
    """The worker's queue is full: the request is refused (503) rather than held in memory."""


@dataclasses.dataclass
class _Job:
    kind: str  # "images" | "texts" | "predict" | "interrogate"
    items: list  # PIL images or texts
    options: tuple  # sorted (name, value) pairs: jobs with the same kind and options share a model call
    future: Future


class ModelWorker:
    """The one thread that calls the index. Jobs queued while it works are taken together (up to MAX_BATCH
    items) and jobs with the same kind and options run as one API call, whose results are split back."""

    def __init__(self, index, queue_size: int = DEFAULT_QUEUE_SIZE, max_batch: int = MAX_BATCH) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1 (got {queue_size})")
        self.index = index
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.stats = {"requests": 0, "calls": 0}  # calls < requests means requests were batched
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._queue.qsize()

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
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._queue.get_nowait()
                if job is not None:
                    job.future.cancel()

    def submit(self, kind: str, items: list, **options: Any) -> Future:
        """Queue a job; raises QueueFull at once when the queue is full."""
        if self._thread is None:
            raise RuntimeError("the model worker is not running (use the app inside its lifespan)")
        job = _Job(kind, list(items), tuple(sorted(options.items())), Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        self.stats["requests"] += 1
        return job.future

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is None:
                return
            jobs, size = [job], len(job.items)
            while size < self.max_batch:  # take what else is waiting now, without waiting for more
                try:
                    extra = self._queue.get_nowait()
                except queue.Empty:
                    break
                if extra is None:  # stop after this batch
                    stopping = True
                    break
                jobs.append(extra)
                size += len(extra.items)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.kind, job.options), []).append(job)
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        kind, options = (jobs[0].kind, dict(jobs[0].options)) if jobs else (None, {})
        if len(jobs) > 1:
            try:
                results = self._call(kind, [item for job in jobs for item in job.items], options)
            except Exception:  # one bad job must not fail the others batched with it: each runs alone below
                log.debug("a batch of %d requests failed; retrying them one by one", len(jobs), exc_info=True)
            else:
                start = 0
                for job in jobs:
                    job.future.set_result(results[start:start + len(job.items)])
                    start += len(job.items)
                return
        for job in jobs:
            try:
                job.future.set_result(self._call(kind, job.items, options))
            except Exception as exc:
                job.future.set_exception(exc)

    def _call(self, kind: str, items: list, options: dict) -> list:
        """One public-API call for a batch: a list of results aligned with `items`."""
        self.stats["calls"] += 1
        if kind == "texts":
            return self.index.search_texts(items, options["k"], model_weights=options.get("model_weights"))
        if kind == "images":  # no decoding processes per call
            return self.index.search_images(items, options["k"], workers=0, model_weights=options.get("model_weights"))
        if kind == "predict":
            vectors, neighbours = self.index.predict_with_neighbours(items, workers=0, **options)
            return list(zip(vectors, neighbours))
        if kind == "interrogate":
            return self.index.interrogate(items, options["modifiers"], workers=0)
        raise ValueError(f"unknown job kind {kind!r}")


# -- request parsing ---------------------------------------------------------------------------------------

class TextQuery(BaseModel):
    """JSON body of POST /search for a text query."""
    text: str | list[str] = Field(description="one query text, or several",
                                  examples=["a castle on a hill, matte painting"])
    k: int = Field(DEFAULT_SEARCH_K, description="results per query (1 … min(index size, 1000))")
    model_weights: str | None = Field(None, description="an index of several CLIP models: W1,W2,... (default equal)")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (before it is all read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {int(declared):,} bytes is over the limit of {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_form(body: bytes, content_type: str) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """multipart/form-data in memory → ([(file name, bytes)] in order, {field: value})."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart body without a boundary")
    parts: list[dict] = []
    header: dict[str, bytes] = {}

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": []})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] = header.get("value", b"") + data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header.pop("field", b"").lower()] = header.pop("value", b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(data[start:end])

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart's parse errors
        raise HTTPException(400, f"malformed multipart body ({short_reason(exc, 120)})") from None
    files, fields = [], {}
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        data = b"".join(part["data"])
        if b"filename" in disposition:
            files.append((disposition[b"filename"].decode("utf-8", "replace") or name or "upload", data))
        else:
            fields[name] = data.decode("utf-8", "replace")
    return files, fields


def decode_upload(data: bytes):
    """Uploaded bytes → RGB PIL image, with exactly the checks `img2prompt search` applies to an image file;
    raises ImageDecodeError with the reason."""
    from img2prompt.encoders.images import load_image

    return load_image(data)


# -- the app -----------------------------------------------------------------------------------------------

def _body_doc(fields: dict, json_schema: dict | None = None) -> dict:
    """OpenAPI for a body read by hand (so that /docs offers the upload form): multipart image(s) + fields."""
    image = {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "image file(s)"}
    content = {"multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                                  "properties": {"image": image, **fields}}}}
    if json_schema:
        content["application/json"] = {"schema": json_schema}
    return {"requestBody": {"required": True, "content": content}}


def _page() -> str:
    return resources.files("img2prompt").joinpath("web", "index.html").read_text(encoding="utf-8")


def _auth(api_key: str) -> Any:
    """A dependency that lets a request through only with the key (X-API-Key, or Authorization: Bearer)."""
    expected = api_key.encode()

    async def check(key: str | None = Security(APIKeyHeader(name="X-API-Key", auto_error=False)),
                    bearer: HTTPAuthorizationCredentials | None = Security(HTTPBearer(auto_error=False))) -> None:
        given = key or (bearer.credentials if bearer else None)
        if not given or not secrets.compare_digest(given.encode(), expected):  # constant time: no key guessing
            raise HTTPException(401, "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)",
                                headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(index, *, api_key: str | None = None, max_upload: int = DEFAULT_MAX_UPLOAD,
               queue_size: int = DEFAULT_QUEUE_SIZE):
    """A FastAPI app over an opened `Img2PromptIndex` (not closed here: the caller owns it).

    The model worker runs during the app's lifespan (uvicorn, or `with TestClient(app)`).
    """
    from img2prompt import __version__
    from img2prompt.query.blend import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_CONSENSUS, DEFAULT_K, DEFAULT_TEMPERATURE
    from img2prompt.encoders.images import ImageDecodeError

    worker = ModelWorker(index, queue_size)
    max_k = min(index.count, MAX_K)
    page = _page()  # read once: a missing page fails at start-up, not on the first visit

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="img2prompt", version=__version__, lifespan=lifespan,
                  description="Which prompts made images like this? Ranked prompts for an image or a text, and "
                              "the predicted all-MiniLM-L6-v2 prompt embedding (384-d) of an image.")
    app.state.worker = worker
    protected = [Depends(_auth(api_key))] if api_key else []

    @app.exception_handler(UserError)
    async def user_error(_request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(_request: Request, _exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": f"busy: {queue_size} requests are already waiting; retry shortly"},
                            status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)  # the traceback goes to the server log, never to the client
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    def check_k(value: Any, default: int) -> int:
        try:
            k = int(value) if value not in (None, "") else default
        except (TypeError, ValueError):
            raise HTTPException(422, f"k must be an integer (got {value!r})") from None
        try:
            index.session.retriever.check_k(k)
        except UserError as exc:  # the API's message names the CLI flag; here it is a field
            raise HTTPException(422, str(exc).replace("--k", "k")) from None
        if k > MAX_K:
            raise HTTPException(422, f"k {k} is over this server's limit of {MAX_K}")
        return k

    def number(fields: dict[str, str], name: str) -> dict[str, float]:
        if fields.get(name) in (None, ""):
            return {}
        try:
            return {name: float(fields[name])}
        except ValueError:
            raise HTTPException(422, f"{name} must be a number (got {fields[name]!r})") from None

    async def read_images(request: Request) -> tuple[list[str], list, dict[str, str]]:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise HTTPException(415, "send the image(s) as multipart/form-data (a file field named image)")
        files, fields = parse_form(await read_body(request, max_upload), content_type)
        if not files:
            raise HTTPException(422, "no image in the form: send a file field named image")
        images = []
        for name, data in files:
            try:  # decode in a thread: the event loop keeps serving while Pillow works
                images.append(await asyncio.to_thread(decode_upload, data))
            except ImageDecodeError as exc:
                raise HTTPException(400, f"{name}: {exc}") from None
        return [name for name, _ in files], images, fields

    async def run(kind: str, items: list, **options: Any) -> list:
        return await asyncio.wrap_future(worker.submit(kind, items, **options))

    def refuse_when_full() -> None:
        if worker.pending >= queue_size:  # before reading a body that could not be queued anyway
            raise QueueFull()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page)  # public even with --api-key: the page is where the key is entered

    @app.get("/health", dependencies=protected, summary="ready: index size, models, device, queue")
    async def health() -> dict:
        models = index.manifest["models"]
        return {"status": "ready", "version": __version__, "count": index.count, "device": index.device,
                "search": (index.manifest.get("search") or {}).get("kind"),
                "models": {name: {"name": record.get("name"), "sha256": record.get("sha256"), "dim": record.get("dim")}
                           for name, record in models.items()},
                "k": {"default": min(DEFAULT_SEARCH_K, max_k), "max": max_k}, "max_upload": max_upload,
                "queue": {"pending": worker.pending, "max": queue_size, **worker.stats}}

    @app.post("/search", dependencies=protected, openapi_extra=_body_doc(
        {"k": {"type": "integer", "default": DEFAULT_SEARCH_K},
         "model_weights": {"type": "string", "description": "an index of several CLIP models: W1,W2,..."}},
        TextQuery.model_json_schema()),
              summary="ranked prompts for uploaded image(s) or JSON {text, k}: the `img2prompt search --json` list")
    async def search(request: Request) -> list[dict]:
        refuse_when_full()
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                query = TextQuery.model_validate_json(await read_body(request, max_upload))
            except ValidationError as exc:
                raise HTTPException(422, "; ".join(f"{'.'.join(map(str, error['loc'])) or 'body'}: {error['msg']}"
                                                   for error in exc.errors())) from None
            texts = [query.text] if isinstance(query.text, str) else query.text
            if not texts or not all(text.strip() for text in texts):
                raise HTTPException(422, "text must not be empty")
            k = check_k(query.k, DEFAULT_SEARCH_K)
            weights = {"model_weights": query.model_weights} if query.model_weights else {}
            return [result.to_dict() for result in await run("texts", texts, k=k, **weights)]
        names, images, fields = await read_images(request)
        k = check_k(fields.get("k"), DEFAULT_SEARCH_K)
        weights = {"model_weights": fields["model_weights"]} if fields.get("model_weights") else {}
        results = await run("images", images, k=k, **weights)
        # the API names a PIL image by its position in the batch; here it is the uploaded file's name
        return [dataclasses.replace(result, query=name).to_dict() for name, result in zip(names, results)]

    @app.post("/predict", dependencies=protected, openapi_extra=_body_doc(
        {"k": {"type": "integer", "default": DEFAULT_K},
         "temperature": {"type": "number", "default": DEFAULT_TEMPERATURE},
         "alpha": {"type": "number", "default": DEFAULT_ALPHA},
         "consensus": {"type": "number", "default": DEFAULT_CONSENSUS},
         "beta": {"type": "number", "default": DEFAULT_BETA},
         "model_weights": {"type": "string", "description": "an index of several CLIP models: W1,W2,..."}}),
              summary="the predicted 384-d prompt embedding of each uploaded image, with the neighbours blended")
    async def predict(request: Request) -> dict:
        refuse_when_full()
        names, images, fields = await read_images(request)
        options = {"k": check_k(fields.get("k"), DEFAULT_K)}
        for name in ("temperature", "alpha", "consensus", "beta"):
            options.update(number(fields, name))
        if fields.get("model_weights"):
            options["model_weights"] = fields["model_weights"]
        results = await run("predict", images, **options)
        return {"k": options["k"], "predictions": [
            {"query": name, "vector": vector.tolist(), "neighbours": hits.to_dict()["results"]}
            for name, (vector, hits) in zip(names, results)]}

    @app.post("/interrogate", dependencies=protected, openapi_extra=_body_doc(
        {"modifiers": {"type": "integer", "default": DEFAULT_MODIFIERS}}),
              summary="a readable prompt per uploaded image: the best neighbour's prompt + ranked modifier phrases")
    async def interrogate(request: Request) -> list[dict]:
        refuse_when_full()
        names, images, fields = await read_images(request)
        try:
            modifiers = int(fields.get("modifiers") or DEFAULT_MODIFIERS)
        except ValueError:
            raise HTTPException(422, f"modifiers must be an integer (got {fields['modifiers']!r})") from None
        if not 0 <= modifiers <= 50:
            raise HTTPException(422, f"modifiers must be between 0 and 50 (got {modifiers})")
        results = await run("interrogate", images, modifiers=modifiers)
        return [{**result.to_dict(), "query": name} for name, result in zip(names, results)]

    return app


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
    except OSError:
        sock.close()
        raise
    return sock


def _uvicorn_server(app, sock: socket.socket, queue_size: int, log_level: str) -> uvicorn.Server:
    # Connections beyond the queue plus what the worker holds get uvicorn's 503 before their uploads are read,
    # so memory stays bounded however many clients connect.
    config = uvicorn.Config(app, log_level=log_level, limit_concurrency=2 * queue_size + 16,
                            timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, *, queue_size: int = DEFAULT_QUEUE_SIZE,
                      log_level: str = "warning") -> Iterator[str]:
    """Run `app` with uvicorn in a thread (port 0: a free one); yields the base URL. For tests and benches."""
    sock = bind(host, port)
    server = _uvicorn_server(app, sock, queue_size, log_level)
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
          api_key: str | None = None, max_upload: int = DEFAULT_MAX_UPLOAD, queue_size: int = DEFAULT_QUEUE_SIZE,
          clip_model: str | None = None, clip_pretrained: str | None = None, text_model: str | None = None,
          verify: bool = False, log_level: str = "info") -> None:
    """Open the index once, then serve it until interrupted (Ctrl+C)."""
    from img2prompt.api import open_index

    sock = bind(host, port)
    try:
        if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("serving on %s without --api-key: anyone who can reach this address can query it", host)
        with open_index(index_path, device=device, clip_model=clip_model, clip_pretrained=clip_pretrained,
                        text_model=text_model, verify=verify) as index:
            app = create_app(index, api_key=api_key, max_upload=max_upload, queue_size=queue_size)
            url = url_of(sock)  # printed, not logged: where to point the browser is this command's output
            print(f"serving {index.count:,} prompts on {index.device} at {url}/ (API docs: {url}/docs); Ctrl+C stops",
                  flush=True)
            _uvicorn_server(app, sock, queue_size, log_level).run(sockets=[sock])
    finally:
        sock.close()
