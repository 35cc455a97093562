"""The kit's files besides wheels and CLIP: the verified index, kit.json, README.md, dataset-metadata.json."""
from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from img2prompt.kit.clip import CLIP_CONFIG
from img2prompt.kit.wheels import PROJECT

log = logging.getLogger(__name__)

KIT_MARKER = "kit.json"
# 2: kit.json's index.files lists every index file's bytes + sha256 (the notebook checks them at start)
KIT_FORMAT = 2
MB = 1e6


@dataclass
class KitWheel:
    name: str  # canonical project name
    version: str
    file: str
    bytes: int


def link_or_copy_tree(source: Path, dest: Path, names: Iterable[str]) -> str:
    """Hard-link each file when source and dest share a filesystem, else copy; returns how."""
    dest.mkdir(parents=True, exist_ok=True)
    how = "hard-linked"
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)  # a backend's files may sit in a subfolder
        try:
            os.link(source / name, dest / name)
        except OSError:
            shutil.copy2(source / name, dest / name)
            how = "copied"
    return how


def copy_index(index_dir: Path, dest: Path) -> tuple[dict, str]:
    """Verify the index (sizes + sha256) and place its files (manifest + the files it lists) in dest."""
    from img2prompt.index.layout import MANIFEST
    from img2prompt.index.reader import open_index

    log.info("verifying %s (sha256 of every file)", index_dir)
    index = open_index(index_dir, verify=True)
    how = link_or_copy_tree(index_dir, dest, [MANIFEST, *index.manifest["files"]])
    return index.manifest, how


def index_file_records(index_dir: Path, manifest: dict) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file of the kit's index, manifest.json included (the
    manifest's own records cover the rest, just verified): what the notebook checks before it predicts."""
    from img2prompt.index.layout import MANIFEST, file_record

    records = {MANIFEST: file_record(index_dir / MANIFEST)}
    records.update({name: {"bytes": record["bytes"], "sha256": record["sha256"]}
                    for name, record in manifest["files"].items()})
    return records


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def dataset_metadata(kit_name: str) -> dict:
    """Kaggle's dataset-metadata.json (`kaggle datasets create -p KIT`): fill in USERNAME first."""
    slug = _slug(kit_name)
    if PROJECT not in slug:
        slug = f"{PROJECT}-{slug}".strip("-")
    slug = slug[:50].strip("-")
    return {"title": slug.replace("-", " "), "id": f"USERNAME/{slug}",
            "subtitle": "Offline wheels, prompt index and CLIP weights for img2prompt",
            "licenses": [{"name": "other"}]}


def readme_text(kit_info: dict, wheels: list[KitWheel], sizes: dict[str, float]) -> str:
    """The kit's README.md: what it holds, how to upload and run it."""
    wheel_lines = "\n".join(f"  - `{wheel.file}` ({wheel.bytes / MB:.1f} MB)" for wheel in wheels)
    preinstalled = ", ".join(kit_info["preinstalled"]) or "(none)"
    return f"""# img2prompt Kaggle kit

Everything an offline Kaggle notebook needs to submit to "Stable Diffusion - Image to Prompts" with
img2prompt {kit_info['img2prompt_version']}: no internet and no package index are used.

| part | MB | what |
|---|---:|---|
| `wheels/` | {sizes['wheels']:.1f} | img2prompt + the packages a Kaggle image lacks (CPython {kit_info['python_version']}, {', '.join(kit_info['platforms'])}) |
| `index/` | {sizes['index']:.1f} | the prompt index ({kit_info['index']['count']} prompts) |
| `clip/` | {sizes['clip']:.1f} | its CLIP model in open_clip's local-dir layout (`{CLIP_CONFIG}` + weights) |
| `img2prompt-submit.ipynb`, `submit.py` | | the submission code (the same code twice) |
| `{KIT_MARKER}` | | how the notebook finds the kit; what it holds |

Taken as already installed on Kaggle (not in the kit): {preinstalled}.

## Upload

1. Edit `dataset-metadata.json`: replace `USERNAME` with your Kaggle user name (and the slug if you like).
2. `kaggle datasets create -p <this folder> --dir-mode zip` (folders travel as archives that Kaggle
   unpacks), or upload the folder on kaggle.com → Datasets → New dataset.

## Run

1. New notebook in the competition (its data is attached at `/kaggle/input/stable-diffusion-image-to-prompts`),
   **Internet off**, GPU optional.
2. Add this dataset as an input; File → Import notebook → `img2prompt-submit.ipynb` (or paste `submit.py`).
3. Run all: it checks `index/` against the sizes and sha256s in `{KIT_MARKER}` (a damaged index stops the
   notebook with one line, before anything is predicted), installs img2prompt from `wheels/`
   (`pip install --no-index --find-links .../wheels img2prompt`), opens `index/` with `clip/`, and writes
   `/kaggle/working/submission.csv` in `sample_submission.csv`'s order.
   It predicts with the settings `img2prompt kaggle-kit` was given (`settings` in `{KIT_MARKER}`); a field set
   in `SETTINGS` in its first code cell (k, temperature, weighting, power, epsilon, alpha, consensus, beta)
   takes precedence.

The same notebook runs anywhere: `IMG2PROMPT_KIT`, `IMG2PROMPT_IMAGES`, `IMG2PROMPT_SAMPLE` and
`IMG2PROMPT_OUT` override the Kaggle paths.

## Wheels

{wheel_lines}
"""


