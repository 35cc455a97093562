"""An open_clip model with random weights, written as a `local-dir:` folder (config + weights).

For offline smoke runs, tests and benches only: it goes through exactly the loading path of a real checkpoint
folder, but its retrievals are meaningless. Never judge quality or tune defaults with it.

    python -m img2prompt.stand_in out/tiny-clip                          # tiny (64-d), seconds
    python -m img2prompt.stand_in out/vit-h --architecture ViT-H-14      # a real architecture, real size
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def write_tiny_clip(folder: str | Path, seed: int = 0, config: dict | None = None) -> Path:
    """Write open_clip_config.json + open_clip_pytorch_model.bin (random weights from `seed`) to `folder`."""
    return write_clip_folder(folder, config or TINY_CLIP_CONFIG, {}, seed)


def write_clip_folder(folder: str | Path, config: dict, preprocess_cfg: dict, seed: int = 0) -> Path:
    """open_clip_config.json (`config` as model_cfg) + open_clip_pytorch_model.bin with random weights from
    `seed`: the layout of open_clip's own releases, which `--clip-model local-dir:FOLDER` loads."""
    import open_clip
    import torch

    # marked in its config (open_clip ignores the key): an index built with it records models.clip.stand_in
    from img2prompt.encoders.models import STAND_IN_KEY

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_cfg = {key: value for key, value in config.items() if key != "custom_text"}
    # as open_clip's create_model: `custom_text` picks the tower layout, the rest are the model's arguments
    model = (open_clip.model.CustomTextCLIP if config.get("custom_text") else open_clip.model.CLIP)(**model_cfg)
    marker = {"random_weights": True, "seed": seed}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": preprocess_cfg, STAND_IN_KEY: marker}, indent=2))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def architecture_config(architecture: str, text_layers: int | None = None,
                        vision_layers: int | None = None) -> tuple[dict, dict]:
    """open_clip's model config for `architecture` (optionally with fewer transformer layers: same widths,
    heads and activations) and the preprocessing its pretrained weights use (image size, mean/std, resize).

    The preprocessing is what open_clip sets on a model created by name, so a folder written here loads with
    the transforms a user of the real weights gets.
    """
    import copy

    import open_clip

    config = open_clip.get_model_config(architecture)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {architecture!r}")
    config = copy.deepcopy(config)
    if text_layers is not None:
        config["text_cfg"]["layers"] = text_layers
    if vision_layers is not None and "layers" in config["vision_cfg"]:
        config["vision_cfg"]["layers"] = vision_layers
    preprocess = open_clip.get_pretrained_cfg(architecture, _first_pretrained_tag(architecture))
    preprocess_cfg = {key: preprocess[key] for key in ("mean", "std", "interpolation", "resize_mode")
                      if key in preprocess}
    return config, preprocess_cfg


def _first_pretrained_tag(architecture: str) -> str:
    import open_clip

    tags = [tag for name, tag in open_clip.list_pretrained() if name == architecture]
    return tags[0] if tags else ""


def write_random_clip(folder: str | Path, architecture: str, seed: int = 0, text_layers: int | None = None,
                      vision_layers: int | None = None) -> Path:
    """Write `architecture` (an open_clip name such as ViT-H-14) with random weights as a local-dir folder.

    At real size unless `text_layers` / `vision_layers` cut the depth (tests keep the widths, heads and
    activations of the real towers at a fraction of the cost). Weights are a torch checkpoint, as open_clip's
    own releases are.
    """
    config, preprocess_cfg = architecture_config(architecture, text_layers, vision_layers)
    return write_clip_folder(folder, config, preprocess_cfg, seed)


def write_tiny_text_model(folder: str | Path, dim: int = 32, seed: int = 0) -> Path:
    """A sentence-transformers folder with MiniLM's tokenizer and a 1-layer random BERT of width `dim`.

    A stand-in for speed and memory benches of the build only (it is not the scorer: its vectors mean
    nothing and a submission needs the real 384-d all-MiniLM-L6-v2).
    """
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from img2prompt.encoders.models import default_text_model_path

    source, folder = Path(default_text_model_path()), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=dim, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=dim * 2, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    for sub in ("1_Pooling", "2_Normalize"):
        if (source / sub).is_dir():
            shutil.copytree(source / sub, folder / sub, dirs_exist_ok=True)
    pooling = folder / "1_Pooling" / "config.json"
    settings = json.loads(pooling.read_text())
    settings["word_embedding_dimension"] = dim
    pooling.write_text(json.dumps(settings, indent=2))
    return folder


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m img2prompt.stand_in",
        description="Write an open_clip model with RANDOM weights as a local-dir folder (config + weights), "
                    "for offline smoke runs, tests and benches. Its retrievals are meaningless.",
        epilog="examples:\n  python -m img2prompt.stand_in out/tiny-clip\n"
               "  python -m img2prompt.stand_in out/vit-l --architecture ViT-L-14-quickgelu",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", metavar="OUT_FOLDER", help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--architecture", metavar="NAME",
                        help="an open_clip architecture at its real size instead of the tiny model, e.g. ViT-L-14, "
                             "ViT-H-14, ViT-bigG-14, convnext_xxlarge (gigabytes of random weights)")
    args = parser.parse_args(argv)
    if args.architecture:
        try:
            print(write_random_clip(args.out, args.architecture, seed=args.seed))
        except ValueError as exc:
            parser.error(str(exc))
    else:
        print(write_tiny_clip(args.out, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
