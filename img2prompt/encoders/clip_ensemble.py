"""The CLIP model(s) behind one index: an ensemble of one or more members; every caller speaks to this class.

A single model is an ensemble of one: its vectors, identity and manifest entry are exactly the member's own,
so callers never branch on how many models an index holds.

An ensemble vector is the concatenation over the M members of sqrt(1/M) · unit(member vector). It has
unit norm and dim = Σ member dims, and the inner product of two such vectors is the MEAN of the members'
cosines, so a flat inner-product index over ensemble keys ranks by the mean cosine with no change to the
search code. `weighted_query` turns an ensemble query into one whose inner product with the same keys is
Σ w_m · cos_m instead (the keys never change, only the query).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from img2prompt.encoders.models import (ClipModel, clip_encode_image, clip_prompt_truncated, clip_token_lengths,
                                        load_clip, resolve_device)
from img2prompt.encoders.text import (ClipTextResult, clip_embed_tokens, clip_text_embeddings, count_truncated,
                                      l2_normalise)
from img2prompt.errors import UserError
from img2prompt.progress import RowProgress

# Strings on which two tokenizers must agree to be taken as one: plain and non-ASCII text, HTML entities,
# special-token text and one prompt longer than any context (truncation).
TOKENIZER_PROBES = ("a photo of a cat", "Ünïcödé — «quotes» 日本語 😀", "a &amp; b,  spaced\tout\n",
                    "<start_of_text> x <end_of_text>", " ".join(["word"] * 120), "")


def _combined_sha256(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _shared_tokenizer(members: Sequence[ClipModel]) -> Any:
    """Member 0's tokenizer when every member tokenizes like it (then one token matrix serves all), else None."""
    first = members[0].tokenizer
    probe = first(list(TOKENIZER_PROBES))
    for member in members[1:]:
        tokenizer = member.tokenizer
        if type(tokenizer) is not type(first) or member.context_length != members[0].context_length \
                or getattr(tokenizer, "bpe_path", None) != getattr(first, "bpe_path", None):
            return None
        other = tokenizer(list(TOKENIZER_PROBES))
        if other.shape != probe.shape or not torch.equal(other, probe):
            return None
    return first


class EnsemblePreprocess:
    """PIL image → one tensor per member (a module-level class: DataLoader workers must pickle it)."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image) -> tuple[torch.Tensor, ...]:
        return tuple(transform(image) for transform in self.transforms)


class ClipEnsemble:
    """M ≥ 1 CLIP models on one device; see the module docstring for the vector layout."""

    def __init__(self, members: Sequence[ClipModel]) -> None:
        if not members:
            raise ValueError("a CLIP ensemble needs at least one member")
        if len({str(member.device) for member in members}) != 1:
            raise ValueError("the members of a CLIP ensemble must be on one device")
        self.members = list(members)
        self.dims = [member.dim for member in self.members]
        self.dim = sum(self.dims)
        self.scale = math.sqrt(1.0 / len(self.members))
        self.device = self.members[0].device
        self.precision = self.members[0].precision  # one --precision for every member
        self.name = " + ".join(member.name for member in self.members)
        self.pretrained = self.members[0].pretrained if self.single else None
        self.context_length = min(member.context_length for member in self.members)
        configs = [member.preprocess_config for member in self.members]
        if self.single:  # the member's own identity: an index of one model reads as it always did
            self.sha256 = self.members[0].sha256
            self.architecture_sha256 = self.members[0].architecture_sha256
            self.preprocess_config = configs[0]
        else:
            self.sha256 = _combined_sha256([member.sha256 for member in self.members])
            self.architecture_sha256 = _combined_sha256([member.architecture_sha256 for member in self.members])
            self.preprocess_config = _combined_sha256(configs)
        self.tokenizer = _shared_tokenizer(self.members)
        # Equal transforms: preprocess once and feed the one tensor to every member (half the decode work).
        self.shared_preprocess = len(set(configs)) == 1
        self.preprocess = self.members[0].preprocess if self.shared_preprocess \
            else EnsemblePreprocess([member.preprocess for member in self.members])
        self._further_replicas: list[ClipEnsemble] = []

    @property
    def replicas(self) -> list[ClipEnsemble]:
        """This ensemble first, then its copies on the further devices of a multi-device --device
        (img2prompt/encoders/parallel.py); one device: just itself. Built on each read: a stored [self] is a
        reference cycle that keeps the models alive until a full gc pass (a server's /admin/reload grew)."""
        return [self, *self._further_replicas]

    @replicas.setter
    def replicas(self, replicas: list[ClipEnsemble]) -> None:
        if not replicas or replicas[0] is not self:
            raise ValueError("a CLIP ensemble's replicas start with the ensemble itself")
        self._further_replicas = list(replicas[1:])

    @property
    def single(self) -> bool:
        return len(self.members) == 1

    def __repr__(self) -> str:
        return f"ClipEnsemble({self.name!r}, dim={self.dim})"

    def identity(self) -> dict:
        if self.single:
            return self.members[0].identity()
        return {"name": self.name, "members": [member.identity() for member in self.members],
                "sha256": self.sha256, "dim": self.dim, "context_length": self.context_length,
                "architecture_sha256": self.architecture_sha256, "preprocess": self.preprocess_config}

    def combine(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Per-member vectors [n, dim_m] → ensemble layout [n, Σ dim_m] (each part normalised, scaled)."""
        if self.single:  # already unit-norm member vectors: returned as they are (bit for bit)
            return np.asarray(parts[0], dtype=np.float32)
        return np.concatenate([l2_normalise(part) * np.float32(self.scale) for part in parts], axis=1)

    def embed_tokens(self, tokens: torch.Tensor, batch_size: int = 256, *, bucketed: bool = True,
                     progress: Callable[[int], None] | None = None) -> np.ndarray:
        """L2-normalised key vectors (float32, input order) for token rows: one token matrix fed to every member."""
        if self.single:
            return clip_embed_tokens(self.members[0], tokens, batch_size, bucketed=bucketed, progress=progress)
        if self.tokenizer is None:
            raise ValueError(f"the CLIP members {self.name} tokenize differently: one token matrix cannot serve "
                             "them all; tokenize per member (clip_text_embeddings does)")
        member_progress = RowProgress(progress, len(self.members)) if progress else None
        return self.combine([clip_embed_tokens(member, tokens, batch_size, bucketed=bucketed,
                                               progress=member_progress) for member in self.members])

    def text_embeddings(self, prompts: list[str], batch_size: int = 256, *, bucketed: bool = True,
                        progress: Callable[[int], None] | None = None):
        """Tokenize and encode in this process (queries, small sets; the build tokenizes in workers)."""
        if self.single:
            return clip_text_embeddings(self.members[0], prompts, batch_size, bucketed=bucketed, progress=progress)
        if not prompts:
            return ClipTextResult(np.zeros((0, self.dim), dtype=np.float32), 0)
        if self.tokenizer is not None:
            tokens = self.tokenizer(prompts)
            return ClipTextResult(self.embed_tokens(tokens, batch_size, bucketed=bucketed, progress=progress),
                                  self.count_truncated(prompts, tokens))
        member_progress = RowProgress(progress, len(self.members)) if progress else None
        results = [clip_text_embeddings(member, prompts, batch_size, bucketed=bucketed, progress=member_progress)
                   for member in self.members]
        return ClipTextResult(self.combine([result.vectors for result in results]),
                              self.count_truncated(prompts))

    def count_truncated(self, prompts: list[str], tokens: torch.Tensor | None = None) -> int:
        """Prompts cut by at least one member (with a shared tokenizer: by the shortest context)."""
        if self.tokenizer is not None:  # one tokenizer and one context (checked): member 0 speaks for all
            return count_truncated(self.members[0], prompts, self.tokenizer(prompts) if tokens is None else tokens)
        cut: set[int] = set()
        for member in self.members:
            member_tokens = member.tokenizer(prompts)
            full = clip_token_lengths(member, member_tokens) >= member.context_length
            cut.update(i for i in full.nonzero().flatten().tolist() if i not in cut
                       and clip_prompt_truncated(member, prompts[i]))
        return len(cut)

    def encode_image(self, pixels: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Ensemble-layout image vectors (float32, on the device) for one batch from `preprocess`."""
        if self.single:  # the member's raw output, normalised by the caller as for every query
            return clip_encode_image(self.members[0], pixels.to(self.device, non_blocking=True)).float()
        if isinstance(pixels, torch.Tensor):  # a shared preprocess: one copy to the device serves every member
            parts = [pixels.to(self.device, non_blocking=True)] * len(self.members)
        else:
            parts = [part.to(self.device, non_blocking=True) for part in pixels]
        if len(parts) != len(self.members):
            raise ValueError(f"{len(parts)} pixel tensors for {len(self.members)} CLIP members")
        features = []
        for member, part in zip(self.members, parts):
            vectors = clip_encode_image(member, part).float()
            features.append(torch.nn.functional.normalize(vectors, dim=-1) * self.scale)
        return torch.cat(features, dim=-1)


def split_parts(vectors: np.ndarray, dims: list[int]) -> list[np.ndarray]:
    """Ensemble-layout vectors ([..., Σ dims]) → one view per member ([..., dim_m])."""
    vectors = np.asarray(vectors)
    if vectors.shape[-1] != sum(dims):
        raise ValueError(f"vectors of dim {vectors.shape[-1]} do not split into member dims {dims}")
    return np.split(vectors, np.cumsum(dims)[:-1], axis=-1)


def weighted_query(vectors: np.ndarray, dims: list[int], weights: list[float]) -> np.ndarray:
    """Ensemble-layout queries whose inner product with ensemble-layout keys is Σ_m w_m · cos_m.

    Each part already carries sqrt(1/M) and each key part too, so <q_m, k_m> = cos_m / M: multiplying
    query part m by w_m · M gives w_m · cos_m. Weights are normalised to sum 1; the result is not unit-norm
    (equal weights give the input back).
    """
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} weights for {len(dims)} CLIP members")
    total = float(sum(weights))
    if any(weight < 0 for weight in weights) or total <= 0:
        raise ValueError(f"model weights must be ≥ 0 with a positive sum (got {list(weights)})")
    factors = [weight / total * len(dims) for weight in weights]
    parts = split_parts(np.asarray(vectors, dtype=np.float32), dims)
    return np.concatenate([part * np.float32(factor) for part, factor in zip(parts, factors)], axis=-1)


def load_clip_ensemble(names: list[str], pretrained: list[str | None] | None, device: str | torch.device = "cpu",
                       verify: bool = False, precision: str | None = None) -> ClipEnsemble:
    """CLIP models by name (in order) → one ClipEnsemble (of one, for one name)."""
    if not names:
        raise UserError("no CLIP model given")
    pretrained = [None] * len(names) if pretrained is None else list(pretrained)
    if len(pretrained) != len(names):
        raise UserError(f"{len(names)} CLIP models but {len(pretrained)} --clip-pretrained values: give one per "
                        "--clip-model, in the same order (an empty value for a local-dir:/hf-hub: model)")
    device = resolve_device(device) if isinstance(device, str) else device
    if len(names) == 1:  # its errors read as they always did, with no "member 1 of 1"
        return ClipEnsemble([load_clip(names[0], pretrained[0], device, verify=verify, precision=precision)])
    members: list[ClipModel] = []
    for position, (name, weights) in enumerate(zip(names, pretrained)):
        try:
            member = load_clip(name, weights, device, verify=verify, precision=precision)
        except UserError as exc:
            raise UserError(f"CLIP member {position + 1} of {len(names)}: {exc}") from exc
        twin = next((other for other in members if other.sha256 == member.sha256), None)
        if twin is not None:
            raise UserError(f"CLIP model {name!r} is given twice (same weights as {twin.name!r}, sha256 "
                            f"{member.sha256[:12]}…): an ensemble needs different models")
        members.append(member)
    return ClipEnsemble(members)


def load_named_clips(names: str | list[str], pretrained: str | list | None, device, verify: bool = False,
                     precision: str | None = None):
    """load_clip_ensemble for CLI/API values: a name or a list of them; --clip-pretrained once per model
    ('' for a folder or hub model)."""
    names = [names] if isinstance(names, str) else list(names)
    if pretrained is not None:
        pretrained = [value or None for value in ([pretrained] if isinstance(pretrained, str) else pretrained)]
    return load_clip_ensemble(names, pretrained, device, verify=verify, precision=precision)
