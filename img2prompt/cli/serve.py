"""`img2prompt serve`: arguments only; the work is in img2prompt/serve/ (imported only when the command runs,
so the other commands never import FastAPI)."""
from __future__ import annotations

import argparse
import os

from img2prompt.cli.shared import add_model_flags, format_bytes, parse_bytes
# plain dataclasses and constants: building the parser never imports FastAPI
from img2prompt.serve.limits import DEFAULT_HOST, DEFAULT_LIMITS as DEFAULTS, DEFAULT_PORT, ServeLimits

API_KEY_ENV = "IMG2PROMPT_API_KEY"

EPILOG_SERVE = f"""examples:
  img2prompt serve out/index                          # page at http://127.0.0.1:8000/, API docs at /docs
  img2prompt serve out/index --port 9000 --device cuda --max-upload 50M
  {API_KEY_ENV}=s3cret img2prompt serve out/index --host 0.0.0.0   # other machines: always with a key

then:
  curl -F image=@a.png -F k=5 http://127.0.0.1:8000/search
  curl -H 'Content-Type: application/json' -d '{{"text": "a castle at dusk", "k": 5}}' http://127.0.0.1:8000/search
  curl -F image=@a.png http://127.0.0.1:8000/predict            # the 384-d vector and the neighbours blended
  curl -F image=@a.png http://127.0.0.1:8000/interrogate        # a readable prompt
"""


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to the `img2prompt` subparsers."""
    serve = commands.add_parser(
        "serve", help="serve an index over HTTP: a web page and a JSON API (search, predict, interrogate)",
        epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Open the index and its models once, then answer HTTP requests: drop an image (or type a "
                    "text) on the page at / to see which prompts made images like it; POST /search returns "
                    "what `img2prompt search --json` prints, POST /predict the 384-d prediction. Needs the "
                    "serve extra: pip install \"img2prompt[serve]\".")
    serve.add_argument("index", metavar="INDEX_DIR", help="an index folder written by `img2prompt build`")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"TCP port (default {DEFAULT_PORT}; 0 = any free port)")
    serve.add_argument("--api-key", metavar="KEY",
                       help=f"require this key (header X-API-Key or Authorization: Bearer) on every API request; "
                            f"the page asks for it (default: ${API_KEY_ENV}, else no key; an empty key is an "
                            "error). The environment variable keeps the key out of the process list")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="another name clients reach this server by (Host header; repeat it; '*' = any). "
                            "127.0.0.1, localhost, ::1 and --host are always allowed; with --host 0.0.0.0 this "
                            "machine's own names and addresses too. Cross-origin POSTs are refused")
    serve.add_argument("--max-upload", type=parse_bytes, default=DEFAULTS.max_upload, metavar="SIZE",
                       help=f"largest request body, e.g. 50M (default {format_bytes(DEFAULTS.max_upload)}); larger "
                            "uploads get 413 as soon as they pass it")
    serve.add_argument("--queue-size", type=int, default=DEFAULTS.queue_size, metavar="N",
                       help=f"requests that may wait for the model; more get 503 (default {DEFAULTS.queue_size})")
    limits = serve.add_argument_group("limits per request and per client")
    limits.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch, metavar="N",
                        help=f"images or texts in one request; more get 413 (default {DEFAULTS.max_batch})")
    limits.add_argument("--max-k", type=int, default=DEFAULTS.max_k, metavar="K",
                        help=f"results per query; more get 422 (default {DEFAULTS.max_k}, and the index size)")
    limits.add_argument("--max-json", type=parse_bytes, default=DEFAULTS.max_json, metavar="SIZE",
                        help=f"largest JSON body (text queries), e.g. 256K (default {format_bytes(DEFAULTS.max_json)})")
    limits.add_argument("--request-timeout", type=float, default=DEFAULTS.request_timeout, metavar="SECONDS",
                        help="time a request may wait for and use the model; then 503 "
                             f"(default {DEFAULTS.request_timeout:g})")
    limits.add_argument("--max-connections-per-client", type=int, default=DEFAULTS.max_connections_per_client,
                        metavar="N", help="open connections per client address; more are refused "
                                          f"(default {DEFAULTS.max_connections_per_client})")
    merging = serve.add_argument_group("merging requests into one encoder call (answers stay each request's own)")
    merging.add_argument("--merge-items", type=int, default=DEFAULTS.merge_items, metavar="N",
                         help="images or texts of requests waiting together that share one encoder call; each "
                              "request is then searched and blended on its own rows (1 = every request encodes "
                              f"alone; default {DEFAULTS.merge_items})")
    merging.add_argument("--merge-wait-ms", type=float, default=DEFAULTS.merge_wait * 1000, metavar="MS",
                         help="how long a call waits for more requests to join it (0 = only those already "
                              f"waiting; default {DEFAULTS.merge_wait * 1000:g})")
    add_model_flags(serve, for_build=False)
    return serve


def run(args) -> None:
    """Serve until interrupted."""
    from img2prompt.errors import UserError

    try:
        from img2prompt.serve.runner import serve
    except ImportError as exc:  # fastapi, uvicorn or python-multipart missing: one line, not a traceback
        raise UserError(f"serve needs {exc.name or 'FastAPI'}, which is not installed: install the serve extra: "
                        "pip install 'img2prompt[serve]'") from exc
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0 … 65535 (got {args.port})")
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    serve(args.index, host=args.host, port=args.port, device=args.device, precision=args.precision,
          api_key=api_key_of(args),
          limits=limits_of(args), allowed_hosts=args.allowed_host, clip_model=args.clip_model,
          clip_pretrained=args.clip_pretrained, text_model=args.text_model, verify=args.verify,
          log_level="debug" if verbose else "warning" if quiet else "info")  # uvicorn's own log (access lines)


def api_key_of(args) -> str | None:
    """--api-key, else $IMG2PROMPT_API_KEY, else None; an empty one (`--api-key "$UNSET"`) is an error, not
    a server without a key."""
    from img2prompt.errors import UserError

    if args.api_key is not None:
        if not args.api_key.strip():
            raise UserError("--api-key is empty (an unset variable?): give a key, or leave the flag out")
        return args.api_key
    if API_KEY_ENV in os.environ:
        if not os.environ[API_KEY_ENV].strip():
            raise UserError(f"${API_KEY_ENV} is set but empty: give a key, or unset it")
        return os.environ[API_KEY_ENV]
    return None


_FLAGS = {"max_upload": "--max-upload", "queue_size": "--queue-size", "max_batch": "--max-batch",
          "max_k": "--max-k", "max_json": "--max-json", "request_timeout": "--request-timeout",
          "max_connections_per_client": "--max-connections-per-client"}


def limits_of(args) -> ServeLimits:
    """The flags as ServeLimits; a flag out of range is one line naming it."""
    import dataclasses

    from img2prompt.errors import UserError

    values = {field: getattr(args, field) for field in _FLAGS}
    for field, value in values.items():
        if not value > 0:
            raise UserError(f"{_FLAGS[field]} must be positive (got {value})")
    values["max_connections"] = max(DEFAULTS.max_connections, values["max_connections_per_client"])
    if args.merge_items < 1:
        raise UserError(f"--merge-items must be 1 or more (got {args.merge_items})")
    if not args.merge_wait_ms >= 0:
        raise UserError(f"--merge-wait-ms must be 0 or more (got {args.merge_wait_ms})")
    values.update(merge_items=args.merge_items, merge_wait=args.merge_wait_ms / 1000)
    return dataclasses.replace(DEFAULTS, **values).check()
