"""`img2prompt build`, `add` and `merge`: the commands that write an index. Arguments only: the work is the API's
(`img2prompt.api.build/add/merge`). A flag whose default is an options field (BuildOptions, AddOptions,
MergeOptions) is left out of the call unless given, so that field's default is the one in force; --help reads it
from there (cli/shared.py: default_from)."""
from __future__ import annotations

import argparse
import json

from img2prompt.cli.shared import RawHelpWithDefaults, add_model_flags, default_from, given, parse_bytes

EPILOG_BUILD = """examples:
  img2prompt build data/prompts.txt --out out/index --clip-model ViT-L-14 \\
      --clip-pretrained /models/open_clip_pytorch_model.bin
  img2prompt build 'corpora/*.parquet' --column prompt --out idx --clip-model local-dir:/models/clip-vit-l14
  img2prompt build big.txt --out idx --clip-model ViT-L-14 --clip-pretrained openai --resume   # after a crash
  img2prompt build big.txt --out idx --clip-model ViT-L-14 --clip-pretrained openai --device cuda:0 --precision bf16
"""

EPILOG_ADD = """examples:
  img2prompt add out/index more.txt                # encoded with the models the index's manifest names
  img2prompt add out/index 'new/*.parquet' --column prompt --near-dup 0.9
  img2prompt add out/index --pairs new_pairs.csv   # image-keyed entries only
  img2prompt add out/index more.txt --clip-model /models/clip-vit-l14   # the index's weights live here
  img2prompt add out/index more.txt --resume       # after a crash
  img2prompt add out/index more.txt --retrain      # when add warned that recall dropped
"""

EPILOG_MERGE = """examples:
  img2prompt merge idx_a idx_b --out idx_ab                # a prompt in both keeps idx_a's row
  img2prompt merge idx_a idx_b --out idx_ab --key-dims 512 # refit a PCA of the merged keys (full-width inputs)
  img2prompt merge idx_a idx_b --out idx_ab --resume       # after a crash
"""


def add_parsers(commands, common: argparse.ArgumentParser) -> None:
    """The build, add and merge subcommands; `common`: the flags every command takes after its name (-v, -q)."""
    _add_build_parser(commands, common)
    _add_add_parser(commands, common)
    _add_merge_parser(commands, common)


def _add_build_parser(commands, common: argparse.ArgumentParser) -> None:
    build = commands.add_parser("build", parents=[common], help="embed a prompt corpus and write an index folder",
                                epilog=EPILOG_BUILD, formatter_class=RawHelpWithDefaults,
                                description="Read, normalise and deduplicate prompts; embed them with CLIP "
                                            "(text) and MiniLM; write a resumable, atomically committed index.")
    build.add_argument("corpus", nargs="*", metavar="CORPUS",
                       help=".txt (a prompt a line), .csv, .tsv or .parquet files; globs allowed (may be left out "
                            "when --pairs is given)")
    build.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder to write")
    default_from("build", build.add_argument("--column",
                                             help="prompt column in csv/tsv/parquet (default: %(default)s)"))
    add_model_flags(build, for_build=True)
    group = build.add_argument_group("build")
    default_from("build", group.add_argument("--batch-size", type=int, help="encoder batch size (default %(default)s)"))
    group.add_argument("--workers", type=int, help="local engine: tokenizing processes that run ahead of the "
                                                   "encoders (default: cores − 1 on CUDA, 0 = in-process on CPU); "
                                                   "ray engine: encoding actors (default: one per GPU or CPU)")
    default_from("build", group.add_argument("--shard-size", type=int,
                                             help="prompts per shard, the unit of resume (default %(default)s)"))
    from img2prompt.api import build_choices

    choices = build_choices()
    default_from("build", group.add_argument("--index", choices=choices["index"],
                                             help="FAISS index type (default %(default)s: by corpus size and "
                                                  "--max-memory)"))
    group.add_argument("--max-memory", type=parse_bytes, help="memory budget for the FAISS index, e.g. 8G")
    default_from("build", group.add_argument("--max-chars", type=int,
                                             help="skip (and count) prompts longer than this (default %(default)s)"))
    group.add_argument("--embeddings", nargs="+", metavar="NPY",
                       help="precomputed CLIP text vectors (.npy files or a folder of them, sorted by name), "
                            "row-aligned with CORPUS (clip-retrieval/autofaiss layout); --clip-model names the model "
                            "that made them, checked on the first prompts")
    default_from("build", group.add_argument("--engine", choices=list(choices["engines"]),
                                             help="who runs the shard tasks: local or ray (a Ray cluster; pip install "
                                                  "'img2prompt[ray]'; --out must be a folder every node sees; "
                                                  "default %(default)s)"))
    group.add_argument("--pairs", action="append", metavar="TABLE",
                       help="image-keyed entries: a .csv/.tsv/.parquet with columns image (path, absolute or relative "
                            "to the table) and prompt; the key is the CLIP image vector (repeatable; globs allowed)")
    group.add_argument("--no-regression-head", dest="regression", action="store_false",
                       help="do not fit the ridge head CLIP → MiniLM (it is only used by --beta > 0)")
    default_from("build", group.add_argument("--minilm-dtype", choices=["fp16", "int8"],
                                             help="MiniLM storage: fp16 or int8 with a per-row scale (half the bytes; "
                                                  "index format 4, which older img2prompt refuses; default "
                                                  "%(default)s)"))
    group.add_argument("--key-dims", type=int, metavar="D",
                       help="store the CLIP keys reduced to D dims by a PCA fitted at build (queries are projected "
                            "the same way); its held-out recall@10 against full-width search is reported")
    default_from("build", group.add_argument(
        "--near-dup", type=float, metavar="T",
        help="drop a prompt whose MiniLM cosine to an already kept one is ≥ T, 0 < T ≤ 1 (first in corpus order "
             "wins; counted as skipped near_duplicate; default off)"))
    group.add_argument("--resume", action="store_true", help="continue an interrupted build in --out")
    group.add_argument("--overwrite", action="store_true", help="replace a complete index in --out")
    group.add_argument("--json", action="store_true", help="print the build summary as JSON")
    for entry in choices["engines"].values():  # each engine's own flags, in a group of its own
        if entry.flags:
            engine_group = build.add_argument_group(entry.title)
            for flag in entry.flags:
                engine_group.add_argument(flag.flag, dest=f"engine_{flag.key}", type=flag.type, default=flag.default,
                                          metavar=flag.key.upper(), help=flag.help)


def _add_add_parser(commands, common: argparse.ArgumentParser) -> None:
    add = commands.add_parser("add", parents=[common], help="add new prompts to a complete index (same models)",
                              epilog=EPILOG_ADD, formatter_class=RawHelpWithDefaults,
                              description="Grow INDEX_DIR with the prompts of CORPUS files: deduplicated against "
                                          "the index,\nencoded with the index's own models, swapped in when whole.")
    add.add_argument("index", metavar="INDEX_DIR", help="a complete index folder")
    add.add_argument("corpus", nargs="*", metavar="CORPUS", help="new prompt files (txt/csv/tsv/parquet)")
    add.add_argument("--pairs", nargs="+", metavar="TABLE",
                     help="new (image, prompt) tables (csv/tsv/parquet with columns image, prompt): image-keyed "
                          "entries, as `build --pairs`")
    default_from("add", add.add_argument("--column", help="prompt column in csv/tsv/parquet (default: %(default)s)"))
    add_model_flags(add, for_build=True, clip_required=False)
    default_from("add", add.add_argument("--batch-size", type=int, help="encoder batch size (default %(default)s)"))
    default_from("add", add.add_argument("--shard-size", type=int,
                                         help="new prompts per shard, the unit of resume (default %(default)s)"))
    add.add_argument("--resume", action="store_true", help="finish an interrupted add")
    default_from("add", add.add_argument(
        "--near-dup", type=float, metavar="T",
        help="also drop a new prompt whose MiniLM cosine to a kept new prompt or to one of the index's is >= T (as "
             "build --near-dup; the index side is one exact pass over its MiniLM rows)"))
    add.add_argument("--retrain", action="store_true",
                     help="rebuild the search structure (hnsw, ivfpq: retrain) over every row instead of adding the "
                          "new keys to it, and refit a --key-dims index's PCA over every row (re-encodes every "
                          "prompt's CLIP key); use it when add warns that recall dropped below the build's target")


def _add_merge_parser(commands, common: argparse.ArgumentParser) -> None:
    merge = commands.add_parser("merge", parents=[common], help="merge complete indexes (same models) into one",
                                epilog=EPILOG_MERGE, formatter_class=RawHelpWithDefaults,
                                description="Copy the rows of INDEX_DIR... (no re-encoding) into --out, prompts "
                                            "deduplicated across them\n(first index wins), search rebuilt. Compact "
                                            "inputs merge too: any int8 input makes an int8 index\n(rows kept as "
                                            "stored); inputs sharing one --key-dims PCA keep their keys, full-width "
                                            "inputs\nbeside them are projected through it (recall@10 re-measured).")
    merge.add_argument("indexes", nargs="+", metavar="INDEX_DIR", help="complete index folders, in priority order")
    merge.add_argument("--out", required=True, metavar="INDEX_DIR", help="new index folder to write")
    add_model_flags(merge, for_build=True, clip_required=False)
    default_from("merge", merge.add_argument("--shard-size", type=int,
                                             help="rows per shard written, the unit of resume (default %(default)s)"))
    merge.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    merge.add_argument("--resume", action="store_true", help="finish an interrupted merge")
    merge.add_argument("--key-dims", type=int, metavar="D",
                       help="refit a PCA of the merged keys to D dims, as build --key-dims (full-width inputs only)")


def cmd_add(args) -> None:
    from img2prompt.api import add

    result = add(args.index, args.corpus, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                 text_model=args.text_model, device=args.device, resume=args.resume, retrain=args.retrain,
                 pairs=args.pairs, progress=not args.quiet,
                 **given(args, "column", "batch_size", "shard_size", "near_dup"))
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
                   text_model=args.text_model, device=args.device, overwrite=args.overwrite, resume=args.resume,
                   key_dims=args.key_dims, progress=not args.quiet, **given(args, "shard_size"))
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
        text_model=args.text_model, device=args.device, precision=args.precision, max_memory=args.max_memory,
        resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, workers=args.workers,
        embeddings=args.embeddings, pairs=args.pairs, regression=args.regression, key_dims=args.key_dims,
        **given(args, "column", "batch_size", "shard_size", "index", "max_chars", "engine", "minilm_dtype", "near_dup"),
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


COMMANDS = {"build": cmd_build, "add": cmd_add, "merge": cmd_merge}
