"""`img2prompt` command line: parses arguments and calls the stage functions; no logic of its own."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from img2prompt.cli_common import (add_blend_flags, add_min_score_flag, add_model_flags, add_model_weights_flag,
                                   parse_bytes, settings_of, show_models_line)
from img2prompt.errors import UserError
from img2prompt.memory import fix_mmap_threshold

EPILOG_BUILD = """examples:
  img2prompt build data/prompts.txt --out out/index --clip-model ViT-L-14 \\
      --clip-pretrained /models/open_clip_pytorch_model.bin
  img2prompt build 'corpora/*.parquet' --column prompt --out idx --clip-model local-dir:/models/clip-vit-l14
  img2prompt build big.txt --out idx --clip-model ViT-L-14 --clip-pretrained openai --resume   # after a crash
  img2prompt build big.txt --out idx --clip-model ViT-L-14 --clip-pretrained openai --device cuda:0 --precision bf16
"""
EPILOG_SUBMIT = """examples:
  img2prompt submit out/index /kaggle/input/stable-diffusion-image-to-prompts/images \\
      --sample-submission /kaggle/input/stable-diffusion-image-to-prompts/sample_submission.csv \\
      --clip-model ViT-L-14 --clip-pretrained /kaggle/input/clip-vit-l14/open_clip_pytorch_model.bin
  img2prompt submit out/index images/ --k 30 --temperature 0.03 --explain explain.csv
  img2prompt submit out/index images/ --k 120 --weighting inverse-distance   # the public CLIP kNN notebook's
  img2prompt submit out/index images/ --k 120 --weighting inverse-distance --power 8 --epsilon 1e-3
  img2prompt submit out/index images/ --device cpu --precision bf16    # CLIP towers in bf16 on the CPU
"""
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
EPILOG_EVAL = """examples:
  img2prompt eval out/index --labels prompts.csv --images images/ --sweep --plot sweep.png --out report.json
  img2prompt eval out/index --labels heldout.csv --exclude-exact --sweep      # text-only mode
  img2prompt eval out/index --labels prompts.csv --images images/ --k 120 --weighting inverse-distance --power 6
"""


def _add_image_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, help="images per batch (default: 256 on GPU, 64 on CPU)")
    parser.add_argument("--workers", type=int, help="image decoding processes (default: cores − 1 on GPU, "
                                                    "0 = in-process on CPU)")


def _add_verbosity_flags(parser: argparse.ArgumentParser, default=False) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bars, warnings only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="img2prompt",
        description="Recover Stable-Diffusion prompts by retrieval: build a CLIP index over a prompt corpus, "
                    "then predict the all-MiniLM-L6-v2 embedding of each image's prompt.")
    from img2prompt import __version__

    parser.add_argument("--version", action="version", version=f"img2prompt {__version__}")
    _add_verbosity_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _add_verbosity_flags(common, default=argparse.SUPPRESS)  # -v/-q also after the command name

    build = commands.add_parser("build", parents=[common], help="embed a prompt corpus and write an index folder",
                                epilog=EPILOG_BUILD, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Read, normalise and deduplicate prompts; embed them with CLIP "
                                            "(text) and MiniLM; write a resumable, atomically committed index.")
    build.add_argument("corpus", nargs="*", metavar="CORPUS",
                       help=".txt (a prompt a line), .csv, .tsv or .parquet files; globs allowed (may be left out "
                            "when --pairs is given)")
    build.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder to write")
    build.add_argument("--column", default="prompt", help="prompt column in csv/tsv/parquet (default: prompt)")
    add_model_flags(build, for_build=True)
    group = build.add_argument_group("build")
    group.add_argument("--batch-size", type=int, default=256, help="encoder batch size (default 256)")
    group.add_argument("--workers", type=int, help="local engine: tokenizing processes that run ahead of the "
                                                   "encoders (default: cores − 1 on CUDA, 0 = in-process on CPU); "
                                                   "ray engine: encoding actors (default: one per GPU or CPU)")
    group.add_argument("--shard-size", type=int, default=100_000,
                       help="prompts per shard, the unit of resume (default 100000)")
    from img2prompt.api import build_choices

    choices = build_choices()
    group.add_argument("--index", default="auto", choices=choices["index"],
                       help="FAISS index type (default auto: by corpus size and --max-memory)")
    group.add_argument("--max-memory", type=parse_bytes, help="memory budget for the FAISS index, e.g. 8G")
    group.add_argument("--max-chars", type=int, default=4000,
                       help="skip (and count) prompts longer than this (default 4000)")
    group.add_argument("--embeddings", nargs="+", metavar="NPY",
                       help="precomputed CLIP text vectors (.npy files or a folder of them, sorted by name), "
                            "row-aligned with CORPUS (clip-retrieval/autofaiss layout); --clip-model names the model "
                            "that made them, checked on the first prompts")
    group.add_argument("--engine", default="local", choices=list(choices["engines"]),
                       help="who runs the shard tasks: local (default) or ray (a Ray cluster; pip install "
                            "'img2prompt[ray]'; --out must be a folder every node sees)")
    group.add_argument("--pairs", action="append", metavar="TABLE",
                       help="image-keyed entries: a .csv/.tsv/.parquet with columns image (path, absolute or relative "
                            "to the table) and prompt; the key is the CLIP image vector (repeatable; globs allowed)")
    group.add_argument("--no-regression-head", dest="regression", action="store_false",
                       help="do not fit the ridge head CLIP → MiniLM (it is only used by --beta > 0)")
    group.add_argument("--minilm-dtype", default="fp16", choices=["fp16", "int8"],
                       help="MiniLM storage: fp16 (default) or int8 with a per-row scale (half the bytes; index "
                            "format 4, which older img2prompt refuses)")
    group.add_argument("--key-dims", type=int, metavar="D",
                       help="store the CLIP keys reduced to D dims by a PCA fitted at build (queries are projected "
                            "the same way); its held-out recall@10 against full-width search is reported")
    group.add_argument("--near-dup", type=float, metavar="T", default=None,
                       help="drop a prompt whose MiniLM cosine to an already kept one is ≥ T, 0 < T ≤ 1 (first in "
                            "corpus order wins; counted as skipped near_duplicate; default off)")
    group.add_argument("--resume", action="store_true", help="continue an interrupted build in --out")
    group.add_argument("--overwrite", action="store_true", help="replace a complete index in --out")
    group.add_argument("--json", action="store_true", help="print the build summary as JSON")
    for entry in choices["engines"].values():  # each engine's own flags, in a group of its own
        if entry.flags:
            engine_group = build.add_argument_group(entry.title)
            for flag in entry.flags:
                engine_group.add_argument(flag.flag, dest=f"engine_{flag.key}", type=flag.type, default=flag.default,
                                          metavar=flag.key.upper(), help=flag.help)

    add = commands.add_parser("add", parents=[common], help="add new prompts to a complete index (same models)",
                              description="Grow INDEX_DIR with the prompts of CORPUS files: deduplicated against "
                                          "the index, encoded with the index's own models, swapped in when whole.")
    add.add_argument("index", metavar="INDEX_DIR", help="a complete index folder")
    add.add_argument("corpus", nargs="*", metavar="CORPUS", help="new prompt files (txt/csv/tsv/parquet)")
    add.add_argument("--pairs", nargs="+", metavar="TABLE",
                     help="new (image, prompt) tables (csv/tsv/parquet with columns image, prompt): image-keyed "
                          "entries, as `build --pairs`")
    add.add_argument("--column", default="prompt", help="prompt column in csv/tsv/parquet (default: prompt)")
    add_model_flags(add, for_build=True, clip_required=False)
    add.add_argument("--batch-size", type=int, default=256)
    add.add_argument("--shard-size", type=int, default=100_000)
    add.add_argument("--resume", action="store_true", help="finish an interrupted add")
    add.add_argument("--near-dup", type=float, metavar="T",
                     help="also drop a new prompt whose MiniLM cosine to a kept new prompt or to one of the index's "
                          "is >= T (as build --near-dup; the index side is one exact pass over its MiniLM rows)")
    add.add_argument("--retrain", action="store_true",
                     help="rebuild the search structure (hnsw, ivfpq: retrain) over every row instead of adding the "
                          "new keys to it, and refit a --key-dims index's PCA over every row (re-encodes every "
                          "prompt's CLIP key); use it when add warns that recall dropped below the build's target")
    merge = commands.add_parser("merge", parents=[common], help="merge complete indexes (same models) into one",
                                description="Copy the rows of INDEX_DIR... (no re-encoding) into --out, prompts "
                                            "deduplicated across them (first index wins), search rebuilt. Compact "
                                            "inputs merge too: any int8 input makes an int8 index (rows kept as "
                                            "stored); inputs sharing one --key-dims PCA keep their keys, full-width "
                                            "inputs beside them are projected through it (recall@10 re-measured).")
    merge.add_argument("indexes", nargs="+", metavar="INDEX_DIR", help="complete index folders, in priority order")
    merge.add_argument("--out", required=True, metavar="INDEX_DIR", help="new index folder to write")
    add_model_flags(merge, for_build=True, clip_required=False)
    merge.add_argument("--shard-size", type=int, default=100_000)
    merge.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    merge.add_argument("--resume", action="store_true", help="finish an interrupted merge")
    merge.add_argument("--key-dims", type=int, metavar="D",
                       help="refit a PCA of the merged keys to D dims, as build --key-dims (full-width inputs only)")
    submit = commands.add_parser("submit", parents=[common], help="write a Kaggle submission.csv for a folder of images",
                                 epilog=EPILOG_SUBMIT, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Predict each image's prompt embedding (384-d) by similarity-"
                                             "weighted top-k retrieval and write imgId_eId,val rows.")
    submit.add_argument("index", metavar="INDEX_DIR", help="an index folder written by `img2prompt build`")
    submit.add_argument("images", metavar="IMAGES_DIR", help="folder of .png/.jpg/.jpeg/.webp; imgId = file stem")
    submit.add_argument("--out", default="submission.csv", help="output CSV (default submission.csv)")
    submit.add_argument("--sample-submission", metavar="CSV", help="take image ids and row order from this file")
    submit.add_argument("--explain", metavar="CSV", help="also write each image's top prompts, scores, weights")
    submit.add_argument("--save-npy", metavar="NPY", help="also save the predictions as float32 [n, 384] (for "
                                                          "ensembling), with the imgId order in NAME.ids.txt")
    submit.add_argument("--strict", action="store_true",
                        help="fail on an undecodable image instead of giving it the corpus-mean prediction")
    _add_image_flags(submit)
    submit.add_argument("--json", action="store_true", help="print the report as JSON")
    add_blend_flags(submit)
    add_model_flags(submit, for_build=False)

    search = commands.add_parser("search", parents=[common], help="rank the index's prompts for images or a text",
                                 epilog=EPILOG_SEARCH, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Find the prompts nearest to each query image (CLIP image → CLIP "
                                             "text) or query text (CLIP text → CLIP text), best first.")
    search.add_argument("index", metavar="INDEX_DIR", help="an index folder written by `img2prompt build`")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", action="append", metavar="PATH", help="query image (repeatable)")
    query.add_argument("--text", action="append", metavar="TEXT", help="query text (repeatable)")
    search.add_argument("--recursive", action="store_true", help="an --image folder: its subfolders' images too")
    search.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    search.add_argument("--json", action="store_true",
                        help="JSON: [{query, results: [{rank, score, prompt, id, key}]}] (key: text or image)")
    add_model_weights_flag(search)
    add_min_score_flag(search, "leave out hits scoring under S (the best hit always stays)")
    add_model_flags(search, for_build=False)

    interrogate = commands.add_parser(
        "interrogate", parents=[common], help="a readable prompt for each image (best neighbour + modifiers)",
        epilog=EPILOG_INTERROGATE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The best neighbour's prompt plus the corpus's modifier phrases (styles, artists, render "
                    "engines mined at build time) that CLIP ranks highest for the image.")
    interrogate.add_argument("index", metavar="INDEX_DIR", help="an index folder written by `img2prompt build`")
    interrogate.add_argument("images", nargs="+", metavar="IMAGE",
                             help="image files and folders (a folder: its .png/.jpg/.jpeg/.webp files)")
    interrogate.add_argument("--recursive", "-r", action="store_true", help="walk the folders' subfolders too")
    interrogate.add_argument("--modifiers", type=int, default=4, help="modifier phrases added (default 4)")
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
    from img2prompt.cli_score import parse_named_path

    evaluate.add_argument("--captions", action="append", type=parse_named_path, metavar="NAME=CSV",
                          help="score a captioner's imgId,prompt texts beside retrieval on the same images, with "
                               "the paired difference and its CI (repeatable)")
    _add_image_flags(evaluate)
    add_blend_flags(evaluate)
    add_model_flags(evaluate, for_build=False)

    from img2prompt.cli_kit import add_parser as add_kaggle_kit_parser

    _add_verbosity_flags(add_kaggle_kit_parser(commands), default=argparse.SUPPRESS)

    from img2prompt.cli_score import add_parser as add_score_parser
    from img2prompt.cli_serve import add_parser as add_serve_parser

    _add_verbosity_flags(add_score_parser(commands), default=argparse.SUPPRESS)
    _add_verbosity_flags(add_serve_parser(commands), default=argparse.SUPPRESS)
    return parser


def _open(args):
    """The one way every query command opens an index: the public API. The manifest is read and checked now,
    the models load on first use, so argument errors come before seconds of model loading."""
    from img2prompt.api import open_index

    return open_index(args.index, device=args.device, precision=args.precision, clip_model=args.clip_model,
                      clip_pretrained=args.clip_pretrained, text_model=args.text_model, verify=args.verify, lazy=True)


def _loading(args) -> dict:
    from img2prompt.api import ImageLoading

    ImageLoading(args.batch_size, args.workers)  # checked with the other settings, before any work
    return {"batch_size": args.batch_size, "workers": args.workers, "progress": not args.quiet}


def cmd_add(args) -> None:
    from img2prompt.api import add

    result = add(args.index, args.corpus, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                 text_model=args.text_model, column=args.column, batch_size=args.batch_size, device=args.device,
                 shard_size=args.shard_size, resume=args.resume, retrain=args.retrain, pairs=args.pairs,
                 near_dup=args.near_dup,
                 progress=not args.quiet)
    print(f"index {args.index}: {result.manifest['count']} prompts (+{result.report['added']}, "
          f"{result.report['skipped'].get('duplicate_of_index', 0)} already in the index)")
    pca = result.manifest.get("key_pca")
    if pca and "before_add" in pca and (result.report["added"] or args.retrain):  # measured by this add
        before = f", {pca['before_add']:.3f} before" if pca["before_add"] is not None else ""
        print(f"keys: PCA {pca['key_dim']} → {pca['dims']} dims, recall@10 vs full width {pca['recall_at_10']:.3f}"
              f"{before}" + (" (refitted)" if pca.get("refit_at_add") else ""))


def cmd_merge(args) -> None:
    from img2prompt.api import merge

    result = merge(args.indexes, args.out, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                   text_model=args.text_model, device=args.device, shard_size=args.shard_size,
                   overwrite=args.overwrite, resume=args.resume, key_dims=args.key_dims, progress=not args.quiet)
    if result.report.get("nothing_to_do"):
        print(f"index {args.out}: already complete ({result.manifest['count']} prompts), nothing to do")
        return
    duplicates = ", ".join(f"{entry['index']} {entry['duplicates']}" for entry in result.report["merged"])
    print(f"index {args.out}: {result.manifest['count']} prompts (duplicates dropped: {duplicates})")
    if "key_pca" in result.manifest:
        pca = result.manifest["key_pca"]
        print(f"keys: PCA {pca['key_dim']} → {pca['dims']} dims, recall@10 vs full width {pca['recall_at_10']:.3f} "
              f"({pca.get('merged') or 'refitted over the merged keys'})")


def cmd_build(args) -> None:
    from img2prompt.api import build

    result = build(
        args.corpus, args.out, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
        text_model=args.text_model, column=args.column, batch_size=args.batch_size, device=args.device,
        precision=args.precision, shard_size=args.shard_size, index=args.index, max_memory=args.max_memory,
        resume=args.resume, overwrite=args.overwrite, max_chars=args.max_chars, progress=not args.quiet, workers=args.workers,
        embeddings=args.embeddings, engine=args.engine, pairs=args.pairs, regression=args.regression,
        minilm_dtype=args.minilm_dtype, key_dims=args.key_dims, near_dup=args.near_dup,
        engine_options={name.removeprefix("engine_"): value for name, value in vars(args).items()
                        if name.startswith("engine_")})
    manifest = result.manifest
    summary = {"index": args.out, "count": manifest["count"], "corpus": result.report,
               "search": {"kind": manifest["search"]["kind"], "recall_at_10": manifest["search"]["recall_at_10"]},
               "timings_s": result.timings, "rates": manifest["rates"],
               **{name: manifest[name] for name in ("key_pca", "minilm") if name in manifest}}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    report = result.report
    if report.get("nothing_to_do"):
        print(f"index {args.out}: already complete ({manifest['count']} prompts), nothing to do")
        return
    skipped = ", ".join(f"{reason} {count}" for reason, count in report["skipped"].items()) or "none"
    print(f"index {args.out}: {manifest['count']} prompts ({manifest['search']['kind']} search, "
          f"recall@10 {manifest['search']['recall_at_10']['recall']:.3f})")
    print(f"corpus: read {report['read']}, kept {report['kept']}, skipped: {skipped}; "
          f"cut to CLIP's context: {report['clip_truncated']}")
    if "key_pca" in manifest:
        pca = manifest["key_pca"]
        print(f"keys: PCA {pca['key_dim']} → {pca['dims']} dims, recall@10 vs full width {pca['recall_at_10']:.3f} "
              f"({pca['queries']} {'held-out ' if pca['held_out'] else ''}queries)")
    if "minilm" in manifest:
        change = manifest["minilm"]["prediction_change_vs_fp16"]
        print(f"minilm: {manifest['minilm']['dtype']}, prediction change vs fp16: mean |Δcos| "
              f"{change['mean_abs_delta_cos']:.5f} over {change['queries']} queries")
    rate = manifest["rates"]["prompts_per_s"]
    print("timings (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in result.timings.items())
          + (f"; {rate} prompts/s" if rate else "; no prompt needed encoding (all shards were done)"))


def cmd_submit(args) -> None:
    from img2prompt.api import check_query

    settings, loading = settings_of(args), _loading(args)
    check_query("submit", args.index, settings, images=args.images, out=args.out, explain=args.explain,
                save_npy=args.save_npy, sample_submission=args.sample_submission)
    with _open(args) as index:
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


def cmd_search(args) -> None:
    from img2prompt.api import RetrievalSettings, check_query, format_search

    settings = RetrievalSettings(k=args.k, model_weights=args.model_weights, min_score=args.min_score)
    check_query("search", args.index, settings, images=args.image or [], recursive=args.recursive)
    with _open(args) as index:
        results = index.search(args.image or [], args.text or [], args.k, model_weights=args.model_weights,
                               min_score=args.min_score, recursive=args.recursive)
    sys.stdout.write(format_search(results, as_json=args.json))


def cmd_interrogate(args) -> None:
    from img2prompt.api import interrogation_echo

    # Without a file output the results print as they come; with one, stdout only gets the summary.
    echo = None if args.out or args.txt else interrogation_echo(sys.stdout, as_json=args.json)
    with _open(args) as index:
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


def cmd_eval(args) -> None:
    from img2prompt.api import check_query, format_eval_report

    settings, loading = settings_of(args), _loading(args)
    check_query("eval", args.index, settings, labels=args.labels, images=args.images, out=args.out, plot=args.plot,
                sweep=args.sweep, captions=args.captions)
    with _open(args) as index:
        report = index.evaluate(args.labels, settings, images=args.images, sweep=args.sweep, plot=args.plot,
                                out=args.out, exclude_exact=args.exclude_exact, text_model=args.text_model,
                                captions=args.captions, **loading)
    print(json.dumps(report, indent=2) if args.json else format_eval_report(report))


def cmd_serve(args) -> None:
    from img2prompt.cli_serve import run

    run(args)


def cmd_score(args) -> None:
    from img2prompt.cli_score import run

    run(args)


def cmd_kaggle_kit(args) -> None:
    from img2prompt.cli_kit import run

    run(args)


COMMANDS = {"add": cmd_add, "build": cmd_build, "merge": cmd_merge, "submit": cmd_submit, "search": cmd_search, "eval": cmd_eval,
            "interrogate": cmd_interrogate,
            "kaggle-kit": cmd_kaggle_kit, "score": cmd_score, "serve": cmd_serve}


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
