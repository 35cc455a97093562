"""Open an index together with the CLIP model it was built with, refusing any other model.

Models default to what the manifest names; --clip-model / --clip-pretrained / --text-model re-point them
to where the same weights live on this machine. Identity is the weights' sha256, so a path change is
fine and a different model is an error.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

from img2prompt.encoders import DEFAULT_DEVICE
from img2prompt.encoders.clip_ensemble import ClipEnsemble, load_clip_ensemble
from img2prompt.errors import UserError
from img2prompt.index.reader import PromptIndex, open_index
from img2prompt.encoders.models import ClipModel, canonical_preprocess, load_text_model, resolve_device
from img2prompt.encoders.devices import parse_devices
from img2prompt.encoders.parallel import load_replicas
from img2prompt.encoders.precision import announce_models, check_precision
from img2prompt.query.search import Retriever

log = logging.getLogger(__name__)


def _mismatch(kind: str, built: dict, asked: dict) -> str:
    return (f"the index was built with {kind} {built['name']!r} (sha256 {built['sha256'][:12]}…, dim {built['dim']}) "
            f"but the {kind} model given here is {asked['name']!r} (sha256 {asked['sha256'][:12]}…, dim {asked['dim']}): "
            f"refusing to mix models; pass the same weights, or rebuild the index")


@dataclass
class ModelOverrides:
    # For an index built with several CLIP models: lists aligned with the manifest's members.
    clip_model: str | list[str] | None = None
    clip_pretrained: str | list[str] | None = None
    text_model: str | None = None
    precision: str | None = None  # the CLIP towers' fp32 / fp16 / bf16 (None: the device's default)

    def __post_init__(self) -> None:
        check_precision(self.precision)  # a one-line error before the index or any model is opened


def _check_one_clip(built: dict, clip: ClipModel, member: str = "") -> None:
    """The single-model checks; `member` ("CLIP member 2 of 3 ('name'): ") prefixes each message."""
    if clip.sha256 != built["sha256"] or clip.dim != built["dim"]:
        raise UserError(member + _mismatch("CLIP", built, clip.identity()))
    # Indexes written before format 2 recorded no architecture: only their weights can be compared.
    if built.get("architecture_sha256", clip.architecture_sha256) != clip.architecture_sha256:
        raise UserError(member + f"the CLIP weights match the index's but the architecture differs ({built['name']!r} "
                        f"at build time, {clip.name!r} here): e.g. ViT-L-14 vs ViT-L-14-quickgelu (another activation "
                        "gives other embeddings), or another open_clip version; load it as the index was built")
    # canonical on both sides: indexes built before the fingerprint was canonical hold either spelling
    if canonical_preprocess(built.get("preprocess", clip.preprocess_config)) != canonical_preprocess(
            clip.preprocess_config):
        raise UserError(member + f"the CLIP image preprocessing differs from the index's (built: "
                        f"{built['preprocess']!r}; here: {clip.preprocess_config!r}): load the model with the index's "
                        "config")


def _model_count(count: int) -> str:
    return "one CLIP model" if count == 1 else f"an ensemble of {count} CLIP models"


def check_clip(index: PromptIndex, clip: ClipEnsemble) -> None:
    built = index.clip_identity
    built_members = built.get("members")
    members = clip.members
    if built_members is None and len(members) == 1:
        return _check_one_clip(built, members[0])
    # An ensemble's vectors are its members' parts in order: same members, same order, or other vectors.
    built_members = built_members or [built]
    if len(members) != len(built_members):
        raise UserError(f"the index was built with {_model_count(len(built_members))} "
                        f"({' + '.join(repr(m['name']) for m in built_members)}) but {_model_count(len(members))} "
                        f"was given here ({' + '.join(repr(m.name) for m in members)}): pass the index's CLIP models, "
                        "in the order they were built")
    for position, (member_built, member) in enumerate(zip(built_members, members)):
        _check_one_clip(member_built, member,
                        f"CLIP member {position + 1} of {len(members)} ({member_built['name']!r}): ")


def _as_list(value: str | list[str] | None, count: int, what: str) -> list | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if len(values) != count:
        raise UserError(f"the index holds {_model_count(count)}, but {len(values)} {what} values were given: "
                        f"give one per model, in the order they were built")
    return values


def load_index_clip(index: PromptIndex, overrides: ModelOverrides, device,
                    verify: bool = False) -> ClipEnsemble:
    built = index.clip_identity
    members = built.get("members") or [built]
    # Per member, as for one model: a given name drops the manifest's pretrained; a given pretrained wins.
    given_names = _as_list(overrides.clip_model or None, len(members), "--clip-model") or [None] * len(members)
    given_pretrained = _as_list(overrides.clip_pretrained, len(members), "--clip-pretrained") or [None] * len(members)
    names = [given or member["name"] for given, member in zip(given_names, members)]
    pretrained = [weights if weights is not None else (None if given else member.get("pretrained"))
                  for given, weights, member in zip(given_names, given_pretrained, members)]
    try:
        clip = load_clip_ensemble(names, pretrained, device, verify=verify, precision=overrides.precision)
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


class QuerySession:
    """An opened index and its CLIP model(s). The models load on first use (`clip`), so that everything the
    arguments, the manifest and the file system can refuse is refused before seconds of model loading."""

    def __init__(self, index: PromptIndex, device, load_clip: Callable[[], ClipEnsemble],
                 search_device: str | None = None) -> None:
        self.index, self.device, self._load_clip = index, device, load_clip
        self.search_device = search_device or str(device)  # a device list: exact search splits its rows over it

    @cached_property
    def clip(self) -> ClipEnsemble:
        return self._load_clip()

    @cached_property
    def retriever(self) -> Retriever:
        # A weak reference: a closure over `self`, stored in `self`, is a reference cycle that keeps the whole
        # session (models, memmaps, backends) alive until a full gc pass, which a big heap rarely runs, so
        # every /admin/reload of a server grew it by a model's worth (issue 30 item 9)
        session = weakref.ref(self)
        return Retriever(self.index, device=self.search_device,
                         encode_texts=lambda texts: session().clip.text_embeddings(texts).vectors)


def _with_replicas(clip: ClipEnsemble, device: str, load: Callable) -> ClipEnsemble:
    """--device cuda:0,cuda:1: a copy of the CLIP model(s) on each further device, for image encoding
    (img2prompt/encoders/image_embed.py); text queries stay on the first device, an exact search splits its
    rows over the list (index/torch_exact.py)."""
    clip.replicas = load_replicas(device, clip, load)
    return clip


def open_session(index_dir: str, overrides: ModelOverrides | None = None, device: str = DEFAULT_DEVICE,
                 verify: bool = False, lazy: bool = False) -> QuerySession:
    """The index (its manifest checked) and, unless `lazy`, its CLIP model(s) loaded and identity-checked."""
    overrides = overrides or ModelOverrides()
    devices = parse_devices(device)  # --device cuda without a GPU: refused before the index is read
    index = open_index(index_dir, verify=verify)
    torch_device = resolve_device(device)
    if overrides.text_model:
        check_text_model(index, overrides.text_model, torch_device, verify)

    def load() -> ClipEnsemble:
        clip = _with_replicas(load_index_clip(index, overrides, torch_device, verify), device,
                              lambda other: load_index_clip(index, overrides, other, verify))
        announce_models(devices, overrides.precision)  # the command's one line: where the models run
        return clip

    session = QuerySession(index, torch_device, load,
                           search_device=device if "," in device or device == "cuda:all" else None)
    if not lazy:
        session.clip
    return session
