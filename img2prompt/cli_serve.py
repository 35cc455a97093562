"""`img2prompt serve`: arguments only; the work is in img2prompt.serve (imported only when the command runs,
so the other commands never import FastAPI)."""
from __future__ import annotations

import argparse
import os

from img2prompt.cli import _add_model_flags, parse_bytes

API_KEY_ENV = "IMG2PROMPT_API_KEY"
# img2prompt.serve's defaults, restated so that building the parser never imports FastAPI (a test keeps them equal)
DEFAULT_MAX_UPLOAD = "20M"
DEFAULT_QUEUE_SIZE = 64

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
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    serve.add_argument("--api-key", metavar="KEY",
                       help=f"require this key (header X-API-Key or Authorization: Bearer) on every API request; "
                            f"the page asks for it (default: ${API_KEY_ENV}, else no key). The environment "
                            "variable keeps the key out of the process list")
    serve.add_argument("--max-upload", type=parse_bytes, default=parse_bytes(DEFAULT_MAX_UPLOAD), metavar="SIZE",
                       help=f"largest request body, e.g. 50M (default {DEFAULT_MAX_UPLOAD}); larger "
                            "uploads get 413 as soon as they pass it")
    serve.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, metavar="N",
                       help=f"requests that may wait for the model; more get 503 (default {DEFAULT_QUEUE_SIZE})")
    _add_model_flags(serve, for_build=False)
    return serve


def run(args) -> None:
    """Serve until interrupted."""
    from img2prompt.errors import UserError

    try:
        from img2prompt.serve import serve
    except ImportError as exc:  # fastapi, uvicorn or python-multipart missing: one line, not a traceback
        raise UserError(f"serve needs {exc.name or 'FastAPI'}, which is not installed: install the serve extra: "
                        "pip install 'img2prompt[serve]'") from exc
    if args.queue_size < 1:
        raise UserError(f"--queue-size must be at least 1 (got {args.queue_size})")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0 … 65535 (got {args.port})")
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    serve(args.index, host=args.host, port=args.port, device=args.device,
          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, max_upload=args.max_upload,
          queue_size=args.queue_size, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
          text_model=args.text_model, verify=args.verify,
          log_level="debug" if verbose else "warning" if quiet else "info")  # uvicorn's own log (access lines)
