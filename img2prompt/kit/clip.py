"""The kit's clip/ folder(s): the index's CLIP model(s) in open_clip's local-dir layout (config + weights),
checked to open the kit's index before the kit is written."""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path

from img2prompt.errors import UserError

log = logging.getLogger(__name__)

CLIP_CONFIG = "open_clip_config.json"


def _local_dir_folder(name: str) -> Path | None:
    from img2prompt.encoders.models import LOCAL_DIR_PREFIX

    return Path(name[len(LOCAL_DIR_PREFIX):]) if name.startswith(LOCAL_DIR_PREFIX) else None


def _weights_in(folder: Path) -> Path:
    from img2prompt.encoders.models import CHECKPOINT_SUFFIXES  # here: that module imports torch

    found = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES)
    preferred = [path for path in found if path.stem == "open_clip_pytorch_model"]
    if not (preferred or found):
        raise UserError(f"{folder} holds no CLIP weights file ({', '.join(CHECKPOINT_SUFFIXES)})")
    return (preferred or found)[0]


def clip_config_for(name: str, pretrained: str | None) -> dict:
    """open_clip_config.json content for a built-in architecture + pretrained tag/file, as open_clip's factory
    builds it: the built-in model config; the tag's preprocessing (mean, std, interpolation, resize mode);
    QuickGELU only where the installed open_clip applies it for the tag (open_clip < 3 built `openai` weights
    with QuickGELU; 3.x only warns and keeps the config's activation)."""
    import open_clip

    from img2prompt.encoders.models import CHECKPOINT_SUFFIXES

    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise UserError(f"the index's CLIP {name!r} is not an open_clip architecture this open_clip knows")
    model_cfg = copy.deepcopy(model_cfg)
    preprocess: dict = {}
    is_file = bool(pretrained) and (os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES))
    if pretrained and not is_file:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
        try:
            from dataclasses import fields

            from open_clip.transform import PreprocessCfg

            keys = {item.name for item in fields(PreprocessCfg)}
        except ImportError:
            keys = {"mean", "std", "interpolation", "resize_mode", "fill_color"}
        preprocess = {key: list(value) if isinstance(value, tuple) else value
                      for key, value in tag_cfg.items() if key in keys and value is not None}
        major = int(str(getattr(open_clip, "__version__", "3")).split(".")[0])
        if tag_cfg.get("quick_gelu") and pretrained.lower() == "openai" and major < 3:
            model_cfg["quick_gelu"] = True
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def copy_member_clip(clip_identity: dict, clip_weights: str | None, dest: Path) -> str:
    """Write dest/open_clip_config.json + the weights for the index's CLIP; returns where they came from."""
    name, pretrained = clip_identity["name"], clip_identity.get("pretrained")
    weights_arg = Path(clip_weights) if clip_weights else None
    config_text: str | None = None
    if weights_arg is not None and weights_arg.is_dir():  # a local-dir folder: its config and weights
        if not (weights_arg / CLIP_CONFIG).is_file():
            raise UserError(f"--clip-weights {weights_arg}: the folder has no {CLIP_CONFIG}")
        config_text = (weights_arg / CLIP_CONFIG).read_text("utf-8")
        weights, source = _weights_in(weights_arg), f"folder {weights_arg}"
    elif (folder := _local_dir_folder(name)) is not None:
        if not (folder / CLIP_CONFIG).is_file():
            raise UserError(f"the index's CLIP folder {folder} (or its {CLIP_CONFIG}) is gone: pass --clip-weights "
                            "with a folder holding the same config and weights")
        config_text = (folder / CLIP_CONFIG).read_text("utf-8")
        weights = weights_arg or _weights_in(folder)
        source = f"folder {folder}" + (f", weights {weights_arg}" if weights_arg else "")
    elif name.startswith("hf-hub:"):
        raise UserError(f"the index's CLIP is {name}: pass --clip-weights with a local folder holding its "
                        f"{CLIP_CONFIG} and weights (e.g. the downloaded hub snapshot)")
    else:
        config_text = json.dumps(clip_config_for(name, pretrained), indent=2)
        if weights_arg is not None:
            weights = weights_arg
        elif pretrained and os.path.isabs(pretrained):
            weights = Path(pretrained)
            if not weights.is_file():
                raise UserError(f"the index's CLIP checkpoint {pretrained} is gone: pass --clip-weights PATH "
                                "with the same weights")
        else:
            raise UserError(f"the index's CLIP is {name} with pretrained tag {pretrained!r}, which names no local "
                            "file: pass --clip-weights PATH (the checkpoint file of those weights)")
        source = f"{name} ({pretrained}), weights {weights}"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / CLIP_CONFIG).write_text(config_text, encoding="utf-8")
    target = dest / ("open_clip_pytorch_model.safetensors" if weights.suffix == ".safetensors"
                     else "open_clip_pytorch_model.bin")
    # A copy, not a hard link: checkpoint writers (torch.save) overwrite files in place, which would change
    # a linked kit behind its back. (The index is linked: its writer always replaces files by renaming.)
    shutil.copyfile(weights, target)
    return source


def write_clip_folders(clip_identity: dict, clip_weights: str | list | None, dest: Path) -> tuple[list[str], str]:
    """The index's CLIP model(s) as local-dir folders in dest: clip/, or clip-1/, clip-2/, … for an index of
    several models; returns (folder names, where the weights came from)."""
    members = clip_identity.get("members") or [clip_identity]
    weights = clip_weights if isinstance(clip_weights, list) else [clip_weights] * (1 if clip_weights else len(members))
    if len(weights) != len(members):
        raise UserError(f"the index holds {len(members)} CLIP models but {len(weights)} --clip-weights were given: "
                        "give one per model, in the order they were built")
    names = ["clip"] if len(members) == 1 else [f"clip-{number}" for number in range(1, len(members) + 1)]
    sources = [copy_member_clip(member, member_weights, dest / name)
               for member, member_weights, name in zip(members, weights, names)]
    return names, "; ".join(sources)


def verify_kit_clip(index_dir: Path, clip_dirs: Path | list[Path]) -> None:
    """Open the kit's index with the kit's CLIP folder(s), as the notebook will: the identity check must pass."""
    import img2prompt.api as api

    clip_dirs = [clip_dirs] if isinstance(clip_dirs, Path) else clip_dirs
    log.info("checking that %s opens with the CLIP in %s", index_dir, ", ".join(map(str, clip_dirs)))
    try:
        handle = api.open_index(index_dir, device="cpu", clip_model=[str(folder) for folder in clip_dirs])
    except UserError as exc:
        raise UserError(f"what the kit's CLIP folder(s) hold does not give the index's CLIP model(s), so the kit "
                        f"could not open its index; nothing was written. {exc}") from exc
    close = getattr(handle, "close", None)
    if close is not None:
        close()
