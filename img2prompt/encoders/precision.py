"""Where and in what precision the CLIP towers run: --precision, its default per device, the autocast that
applies it, and the one line every command says about it (`models on cuda:0 (float16)`).

fp32 runs the towers as loaded (float32 weights and activations); fp16 / bf16 run them under torch's
autocast in that dtype (matmuls and convolutions in half precision, reductions in float32). The default is
what img2prompt always did: fp16 autocast on CUDA (tensor cores), plain fp32 on CPU. The precision changes the
stored vectors, so a build records it (the manifest's build key, `precision`) and a resume never mixes two.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import torch

from img2prompt.errors import UserError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The CLI prints this logger's INFO line bare (no level, no module): the one line saying where models run.
announcer = logging.getLogger("img2prompt.models")


def check_precision(value: str | None, label: str = "--precision") -> str | None:
    """None (the device's default) or one of fp32, fp16, bf16; a one-line UserError otherwise."""
    if value is None or value in PRECISIONS:
        return value
    raise UserError(f"{label} must be one of {', '.join(PRECISIONS)} (got {value!r})")


def default_precision(device: torch.device) -> str:
    return "fp16" if device.type == "cuda" else "fp32"


def resolve_precision(precision: str | None, device: torch.device) -> str:
    return check_precision(precision) or default_precision(device)


def autocast_for(device: torch.device, precision: str | None = None):
    """The context the towers run in: torch's autocast in the precision's dtype, nothing for fp32."""
    dtype = PRECISIONS[resolve_precision(precision, device)]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_key_precision(device: torch.device, precision: str | None) -> str:
    """The build key's name for the vectors' precision; the defaults keep the names of older builds (a resume
    of an index built before --precision existed still matches)."""
    chosen = resolve_precision(precision, device)
    return "fp32" if chosen == "fp32" else f"{chosen}-autocast"


def index_precision(recorded: str | None) -> str | None:
    """The --precision that encodes like an index whose build key says `recorded` (build_key_precision's names):
    bf16 and fp32 as recorded; fp16 autocast, the CUDA default, as the device's default (fp32 on a CPU, where
    fp16 autocast would be slow), None for an index older than the record."""
    if recorded == "fp32":
        return "fp32"
    if recorded == "bf16-autocast":
        return "bf16"
    return None


def models_line(devices: Sequence[torch.device], precision: str | None) -> str:
    """`models on cpu (float32)` / `models on cuda:0,cuda:1 (float16)`."""
    names = ",".join(str(device) for device in devices)
    dtype = str(PRECISIONS[resolve_precision(precision, devices[0])]).removeprefix("torch.")
    return f"models on {names} ({dtype})"


def announce_models(devices: Sequence[torch.device], precision: str | None) -> None:
    """Say where the models run: called once per command, where its models have loaded (a query session's
    CLIP models, a build's CLIP and MiniLM, score's MiniLM); the per-model lines with their sha256 are debug."""
    announcer.info(models_line(devices, precision))
