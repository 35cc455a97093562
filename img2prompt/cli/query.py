"""`img2prompt search` and `interrogate`: ranked prompts and a readable prompt per image. Arguments only: the work
is the opened index's (the public API)."""
from __future__ import annotations

import argparse
import json
import sys

from img2prompt.cli.shared import add_min_score_flag, add_model_flags, add_model_weights_flag, open_index_of

EPILOG_SEARCH = """examples:
  img2prompt search out/index --image a.png --image b.jpg --k 5
  img2prompt search out/index --image photos/ --recursive --json     # every image under photos/
  img2prompt search out/index --text "a castle on a hill, matte painting" --json
"""
EPILOG_INTERROGATE = """examples:
  img2prompt interrogate out/index a.png b.png
  img2prompt interrogate out/index a.png --modifiers 6 --json
  img2prompt interrogate out/index photos/ --recursive --out prompts.csv     # a folder, one row an image
  img2prompt interrogate out/index photos/ --txt                             # photos/x.png → photos/x.txt
  img2prompt interrogate out/index photos/ --out prompts.jsonl --resume      # after a kill: only the rest
"""


def add_parsers(commands, common: argparse.ArgumentParser) -> None:
    """The search and interrogate subcommands; `common`: the flags every command takes after its name."""
    _add_search_parser(commands, common)
    _add_interrogate_parser(commands, common)


def _add_search_parser(commands, common: argparse.ArgumentParser) -> None:
    from img2prompt.api import DEFAULT_SEARCH_K

    search = commands.add_parser("search", parents=[common], help="rank the index's prompts for images or a text",
                                 epilog=EPILOG_SEARCH, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Find the prompts nearest to each query image (CLIP image → CLIP "
                                             "text) or query text (CLIP text → CLIP text), best first.")
    search.add_argument("index", metavar="INDEX_DIR", help="an index folder written by `img2prompt build`")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", action="append", metavar="PATH", help="query image (repeatable)")
    query.add_argument("--text", action="append", metavar="TEXT", help="query text (repeatable)")
    search.add_argument("--recursive", action="store_true", help="an --image folder: its subfolders' images too")
    search.add_argument("--k", type=int, default=DEFAULT_SEARCH_K,
                        help=f"results per query (default {DEFAULT_SEARCH_K})")
    search.add_argument("--json", action="store_true",
                        help="JSON: [{query, results: [{rank, score, prompt, id, key}]}] (key: text or image)")
    add_model_weights_flag(search)
    add_min_score_flag(search, "leave out hits scoring under S (the best hit always stays)")
    add_model_flags(search, for_build=False)


def _add_interrogate_parser(commands, common: argparse.ArgumentParser) -> None:
    from img2prompt.api import DEFAULT_MODIFIERS

    interrogate = commands.add_parser(
        "interrogate", parents=[common], help="a readable prompt for each image (best neighbour + modifiers)",
        epilog=EPILOG_INTERROGATE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The best neighbour's prompt plus the corpus's modifier phrases (styles, artists, render "
                    "engines mined at build time) that CLIP ranks highest for the image.")
    interrogate.add_argument("index", metavar="INDEX_DIR", help="an index folder written by `img2prompt build`")
    interrogate.add_argument("images", nargs="+", metavar="IMAGE",
                             help="image files and folders (a folder: its .png/.jpg/.jpeg/.webp files)")
    interrogate.add_argument("--recursive", "-r", action="store_true", help="walk the folders' subfolders too")
    interrogate.add_argument("--modifiers", type=int, default=DEFAULT_MODIFIERS,
                             help=f"modifier phrases added (default {DEFAULT_MODIFIERS})")
    interrogate.add_argument("--json", action="store_true",
                             help="JSON: [{query, prompt, base, base_id, base_score, modifiers: [{phrase, score}]}]")
    group = interrogate.add_argument_group("outputs for a folder")
    group.add_argument("--out", metavar="FILE", help="write image, prompt, best_neighbour, best_neighbour_id, score "
                                                     "to a .csv or .jsonl (the format from the suffix; atomically)")
    group.add_argument("--txt", action="store_true",
                       help="write each prompt to IMAGE.txt beside its image (an existing .txt is kept and counted)")
    group.add_argument("--overwrite-txt", action="store_true", help="with --txt: replace existing .txt files")
    group.add_argument("--resume", action="store_true",
                       help="skip images already in --out (and, with --txt, those with a .txt); keep their rows")
    interrogate.add_argument("--batch-size", type=int, help="images per batch (default: 256 on GPU, 64 on CPU)")
    add_model_flags(interrogate, for_build=False)


def cmd_search(args) -> None:
    from img2prompt.api import RetrievalSettings, check_query, format_search

    settings = RetrievalSettings(k=args.k, model_weights=args.model_weights, min_score=args.min_score)
    check_query("search", args.index, settings, images=args.image or [], recursive=args.recursive)
    with open_index_of(args) as index:
        results = index.search(args.image or [], args.text or [], args.k, model_weights=args.model_weights,
                               min_score=args.min_score, recursive=args.recursive)
    sys.stdout.write(format_search(results, as_json=args.json))


def cmd_interrogate(args) -> None:
    from img2prompt.api import interrogation_echo

    # Without a file output the results print as they come; with one, stdout only gets the summary.
    echo = None if args.out or args.txt else interrogation_echo(sys.stdout, as_json=args.json)
    with open_index_of(args) as index:
        report = index.interrogate_folder(args.images, recursive=args.recursive, out=args.out, txt=args.txt,
                                          overwrite_txt=args.overwrite_txt, resume=args.resume,
                                          modifiers=args.modifiers, batch_size=args.batch_size,
                                          progress=not args.quiet, echo=echo)
    if echo is not None:
        echo.close()
        _print_skipped(report, sys.stderr, each=False)  # each failure is already in the printed results
        return
    if args.json:
        print(json.dumps({**report.__dict__, "images_per_s": report.images_per_s}, indent=2, ensure_ascii=False))
        return
    print(f"interrogated {report.interrogated} of {report.images} images"
          + (f" ({report.resumed} done before, skipped)" if report.resumed else "")
          + (f"; {report.images_per_s} images/s" if report.images_per_s else ""))
    if args.out:
        print(f"  wrote {args.out}: {report.rows} rows")
    if args.txt:
        print(f"  .txt written {report.txt_written}, existing kept {report.txt_kept}"
              + ("" if not report.txt_kept else " (--overwrite-txt replaces them)"))
    _print_skipped(report, sys.stdout)


def _print_skipped(report, handle, each: bool = True) -> None:
    for image, reason in report.failed.items() if each else ():
        print(f"  failed {image}: {reason}", file=handle)
    if report.failed:
        print(f"  {len(report.failed)} image(s) failed; the others went on", file=handle)
    left = ([f"{report.not_images} non-image file(s)"] if report.not_images else []) + (
        [f"{report.subfolders} subfolder(s) (--recursive enters them)"] if report.subfolders else [])
    if left:
        print("  left out: " + ", ".join(left), file=handle)


COMMANDS = {"search": cmd_search, "interrogate": cmd_interrogate}
