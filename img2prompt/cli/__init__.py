"""`img2prompt` command line: parses arguments and calls the API; no logic of its own.

One module per command family, each adding its subcommands and holding their `cmd_*` functions: build (build,
add, merge), query (search, interrogate), score (submit, eval, score), serve, kit (kaggle-kit); shared holds the
flag groups they share. This module assembles the parser and runs a command with the CLI's error handling.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import img2prompt.cli.build as build
import img2prompt.cli.kit as kit
import img2prompt.cli.query as query
import img2prompt.cli.score as score
import img2prompt.cli.serve as serve
from img2prompt.cli.shared import add_verbosity_flags, show_models_line
from img2prompt.errors import UserError
from img2prompt.memory import fix_mmap_threshold

COMMANDS = {**build.COMMANDS, **score.COMMANDS, **query.COMMANDS, "kaggle-kit": kit.run, "serve": serve.run}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="img2prompt",
        description="Recover Stable-Diffusion prompts by retrieval: build a CLIP index over a prompt corpus, "
                    "then predict the all-MiniLM-L6-v2 embedding of each image's prompt.")
    from img2prompt import __version__

    parser.add_argument("--version", action="version", version=f"img2prompt {__version__}")
    add_verbosity_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = add_verbosity_flags(argparse.ArgumentParser(add_help=False), default=argparse.SUPPRESS)  # -v/-q
    # also after the command name; the commands in the order --help lists them
    build.add_parsers(commands, common)
    score.add_submit_parser(commands, common)
    query.add_parsers(commands, common)
    score.add_eval_parser(commands, common)
    for add_parser in (kit.add_parser, score.add_parser, serve.add_parser):
        add_verbosity_flags(add_parser(commands), default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    fix_mmap_threshold()  # flat build memory under glibc; see img2prompt/memory.py
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # Our own INFO lines (device, models, index choice) show; other libraries' (open_clip logs on the root
    # logger, faiss its loader) only with -v.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("img2prompt").setLevel(level)
    show_models_line()  # "models on cpu (float32)": one bare line per command that loads models
    # FAISS's loader tries its AVX-512/AVX2 builds in turn and logs each miss as a ModuleNotFoundError at debug
    # level: not an error (the next build loads), so it stays out of -v.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        try:
            from img2prompt.api import check_environment

            check_environment()  # a torch/torchvision mismatch: one line, not open_clip's traceback
            try:
                COMMANDS[args.command](args)
            except (RuntimeError, ImportError) as exc:
                # same versions, different builds (CPU torch, CUDA torchvision) only fail when imported:
                # `operator torchvision::nms does not exist` deep in open_clip. Named here, for every command.
                from img2prompt.api import environment_problem

                problem = environment_problem()
                if problem is None:
                    raise
                raise UserError(problem) from exc
        except UserError as exc:
            from img2prompt.api import SettingError

            if isinstance(exc, SettingError):  # a retrieval setting: named by its flag here
                raise exc.relabel(lambda setting: "--" + setting.replace("_", "-")) from exc
            raise
    except UserError as exc:
        print(f"img2prompt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only folder, permissions: the OS's reason and the path, one line
        where = f": {exc.filename}" if exc.filename else ""
        print(f"img2prompt {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"img2prompt {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
