"""Helpers for the bench scripts (run by hand; they print figures, they assert nothing about speed)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPORA = REPO.parent / "shared" / "corpora"
REAL_CORPORA = ("sd-prompts-dedup-43k.txt", "openprompts-dedup-21k.txt")


def real_prompts(limit: int | None = None) -> list[str]:
    """Real user prompts from ../shared/corpora (exits with a reason when absent)."""
    prompts: list[str] = []
    for name in REAL_CORPORA:
        path = CORPORA / name
        if not path.is_file():
            sys.exit(f"skip: {path} is not present (the real corpora live in ../shared/corpora)")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


def synthetic_corpus(path: Path, count: int) -> Path:
    """`count` distinct prompts: real prompts, cycled, each made unique by a numbered suffix after the first pass."""
    base = real_prompts()
    with open(path, "w", encoding="utf-8") as handle:
        for number in range(count):
            prompt = base[number % len(base)]
            lap = number // len(base)
            handle.write(f"{prompt}, variation {lap}\n" if lap else f"{prompt}\n")
    return path


def random_clip(arch: str = "ViT-B-32"):
    """A ClipModel of the real architecture with random weights: the right compute for speed figures."""
    import open_clip
    import torch

    from img2prompt.models import ClipModel, _clip_embed_dim

    model, _, preprocess = open_clip.create_model_and_transforms(arch)
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    return ClipModel(model=model, preprocess=preprocess, tokenizer=tokenizer, name=arch, pretrained=None,
                     sha256="random", dim=_clip_embed_dim(model), context_length=model.context_length,
                     device=torch.device("cpu"))
