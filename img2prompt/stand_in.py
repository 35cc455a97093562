"""A tiny open_clip model with random weights, written as a `local-dir:` folder (config + weights).

For offline smoke runs and the tests only: it goes through exactly the loading path of a real checkpoint
folder, but its retrievals are meaningless. Never judge quality or tune defaults with it.

    python -m img2prompt.stand_in out/tiny-clip
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
    import open_clip
    import torch

    # marked in its config (open_clip ignores the key): an index built with it records models.clip.stand_in
    from img2prompt.encoders.models import STAND_IN_KEY

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config or TINY_CLIP_CONFIG
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**config)
    marker = {"random_weights": True, "seed": seed}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {},
                                                              STAND_IN_KEY: marker}, indent=2))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


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
        description="Write a tiny open_clip model with RANDOM weights as a local-dir folder (config + weights), "
                    "for offline smoke runs and tests. Its retrievals are meaningless.")
    parser.add_argument("out", metavar="OUT_FOLDER", help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    args = parser.parse_args(argv)
    print(write_tiny_clip(args.out, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
