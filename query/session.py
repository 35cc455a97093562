"""Open an index together with the CLIP model it was built with, refusing any other model.

Models default to what the manifest names; --clip-model / --clip-pretrained / --text-model re-point them
to where the same weights live on this machine. Identity is the weights' sha256, so a path change is
fine and a different model is an error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

from img2prompt.errors import UserError
from img2prompt.index.format import PromptIndex, open_index
from img2prompt.models import ClipModel, load_clip, load_text_model, resolve_device
from img2prompt.query.search import Retriever

log = logging.getLogger(__name__)


def _mismatch(kind: str, built: dict, asked: dict) -> str:
    return (f"the index was built with {kind} {built['name']!r} (sha256 {built['sha256'][:12]}…, dim {built['dim']}) "
            f"but the {kind} model given here is {asked['name']!r} (sha256 {asked['sha256'][:12]}…, dim {asked['dim']}): "
            f"refusing to mix models; pass the same weights, or rebuild the index")


@dataclass
class ModelOverrides:
    clip_model: str | None = None
    clip_pretrained: str | None = None
    text_model: str | None = None


def check_clip(index: PromptIndex, clip: ClipModel) -> None:
    built = index.clip_identity
    if clip.sha256 != built["sha256"] or clip.dim != built["dim"]:
        raise UserError(_mismatch("CLIP", built, clip.identity()))
    # Indexes written before format 2 recorded no architecture: only their weights can be compared.
    if built.get("architecture_sha256", clip.architecture_sha256) != clip.architecture_sha256:
        raise UserError(f"the CLIP weights match the index's but the architecture differs ({built['name']!r} at build "
                        f"time, {clip.name!r} here): e.g. ViT-L-14 vs ViT-L-14-quickgelu (another activation gives "
                        "other embeddings), or another open_clip version; load it as the index was built")
    if built.get("preprocess", clip.preprocess_config) != clip.preprocess_config:
        raise UserError(f"the CLIP image preprocessing differs from the index's (built: {built['preprocess']!r}; "
                        f"here: {clip.preprocess_config!r}): load the model with the index's config")


def load_index_clip(index: PromptIndex, overrides: ModelOverrides, device, verify: bool = False) -> ClipModel:
    built = index.clip_identity
    name = overrides.clip_model or built["name"]
    pretrained = overrides.clip_pretrained if overrides.clip_pretrained is not None else (
        None if overrides.clip_model else built.get("pretrained"))
    try:
        clip = load_clip(name, pretrained, device, verify=verify)
    except UserError as exc:
        if overrides.clip_model or overrides.clip_pretrained:
            raise
        raise UserError(f"cannot load the CLIP model named in the index manifest ({exc}); point to the same "
                        "weights on this machine with --clip-model/--clip-pretrained") from exc
    check_clip(index, clip)
    return clip


def check_text_model(index: PromptIndex, name: str, device, verify: bool = False) -> None:
    """Load the given scorer only to compare its identity with the one the index was built with."""
    text = load_text_model(name, device, verify=verify)
    if text.sha256 != index.text_identity["sha256"] or text.dim != index.text_dim:
        raise UserError(_mismatch("text", index.text_identity, text.identity()))


@dataclass
class QuerySession:
    index: PromptIndex
    clip: ClipModel

    @cached_property
    def retriever(self) -> Retriever:
        return Retriever(self.index, device=str(self.clip.device))


def open_session(index_dir: str, overrides: ModelOverrides | None = None, device: str = "auto",
                 verify: bool = False) -> QuerySession:
    overrides = overrides or ModelOverrides()
    index = open_index(index_dir, verify=verify)
    torch_device = resolve_device(device)
    if overrides.text_model:
        check_text_model(index, overrides.text_model, torch_device, verify)
    clip = load_index_clip(index, overrides, torch_device, verify)
    return QuerySession(index=index, clip=clip)
