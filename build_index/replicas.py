"""The build's models on the further devices of a multi-device --device (cuda:0,cuda:1 / cuda:all)."""
from __future__ import annotations

from img2prompt.encoders.clip_ensemble import ClipEnsemble, load_named_clips
from img2prompt.encoders.devices import parse_devices
from img2prompt.encoders.models import TextModel, load_text_model
from img2prompt.encoders.parallel import load_replicas
from img2prompt.errors import UserError


def check_build_devices(options) -> None:
    """Several devices are this process's threads: the Ray engine places its own workers instead."""
    if len(parse_devices(options.device)) > 1 and getattr(options, "engine", "local") not in (None, "local"):
        raise UserError(f"--device {options.device} (several devices) runs with the local engine; with "
                        f"--engine {options.engine} give each worker a GPU with --gpus-per-worker instead")


def load_build_replicas(options, clip: ClipEnsemble, text_model: TextModel) -> list[TextModel]:
    """Attach CLIP replicas to `clip` (clip.replicas) and return the MiniLM replicas, first device first."""
    clip.replicas = load_replicas(options.device, clip,
                                  lambda device: load_named_clips(options.clip_model, options.clip_pretrained, device,
                                                                  precision=options.precision))
    return load_replicas(options.device, text_model, lambda device: load_text_model(options.text_model, device))
