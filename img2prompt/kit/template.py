"""The Kaggle kit's submission code: one source text, written as `submit.py` and as the notebook's cells.

SUBMIT_SOURCE is a Python script in the "percent" cell format (`# %%` starts a code cell, `# %% [markdown]`
a markdown cell whose lines are `# ` comments). `submit.py` is that text verbatim; the notebook's cells are
cut from it, so the two can never drift apart. The code reads everything kit-specific from the kit's
`kit.json`, so the text itself is the same for every kit.
"""
from __future__ import annotations

import json
from pathlib import Path

from img2prompt.atomic import write_atomic

CELL_MARKER = "# %%"
MARKDOWN_MARKER = "# %% [markdown]"
NOTEBOOK_NAME = "img2prompt-submit.ipynb"
SCRIPT_NAME = "submit.py"

SUBMIT_SOURCE = '''\
# %% [markdown]
# # img2prompt: Kaggle submission
#
# Written by `img2prompt kaggle-kit`; the kit's `submit.py` holds the same code.
# Attach the kit dataset and the competition data, keep internet off, and run all cells.
# Paths follow the Kaggle layout; the environment variables IMG2PROMPT_KIT, IMG2PROMPT_IMAGES,
# IMG2PROMPT_SAMPLE and IMG2PROMPT_OUT override them (IMG2PROMPT_SAMPLE="" ignores the sample submission).

# %%
import csv
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

COMPETITION = Path("/kaggle/input/stable-diffusion-image-to-prompts")
# Prediction settings passed to submission(): the ones `img2prompt kaggle-kit` was given (kit.json's "settings",
# e.g. --k 120 --weighting inverse-distance), with any field set here taking precedence, e.g.
# {"k": 20, "temperature": 0.05} or {"k": 120, "weighting": "inverse-distance", "power": 6, "epsilon": 1e-4}
# (take them from `img2prompt eval --sweep` on real weights).
SETTINGS = {}


def prediction_settings(kit_info: dict, overrides: dict) -> dict:
    """kit.json's settings with this notebook's SETTINGS on top (a kit without any: img2prompt's defaults)."""
    return {**kit_info.get("settings", {}), **overrides}


def find_kit() -> Path:
    """IMG2PROMPT_KIT, else the first attached dataset holding the kit's marker file kit.json."""
    if os.environ.get("IMG2PROMPT_KIT"):
        kit = Path(os.environ["IMG2PROMPT_KIT"])
        if not (kit / "kit.json").is_file():
            raise SystemExit(f"IMG2PROMPT_KIT={kit} holds no kit.json: point it at the kit folder")
        return kit
    for pattern in ("/kaggle/input/*/kit.json", "/kaggle/input/*/*/kit.json", "/kaggle/input/*/*/*/kit.json"):
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[0]).parent
    raise SystemExit("no img2prompt kit under /kaggle/input: attach the kit dataset to this notebook "
                     "(or set IMG2PROMPT_KIT to the kit folder)")


KIT = find_kit()
IMAGES = Path(os.environ.get("IMG2PROMPT_IMAGES") or COMPETITION / "images")
SAMPLE = os.environ.get("IMG2PROMPT_SAMPLE", str(COMPETITION / "sample_submission.csv"))
OUT = Path(os.environ.get("IMG2PROMPT_OUT") or "/kaggle/working/submission.csv")
KIT_INFO = json.loads((KIT / "kit.json").read_text(encoding="utf-8"))
print(f"kit: {KIT} (img2prompt {KIT_INFO['img2prompt_version']}, index of {KIT_INFO['index']['count']} prompts)")
print(f"images: {IMAGES}\\nsample submission: {SAMPLE or '(none)'}\\nout: {OUT}")
print(f"settings: {prediction_settings(KIT_INFO, SETTINGS) or 'img2prompt defaults'}")

# %% [markdown]
# Check the kit's index against the sizes and sha256s that kit.json lists: a damaged index (a bad upload, a
# changed file) stops the notebook here with one line, before anything is installed or predicted, rather
# than writing a submission from wrong vectors.

# %%
import hashlib
import time


def index_problem(index: Path, records: dict) -> str:
    """What is wrong with the index files (one line), or "" when each has its recorded size and sha256."""
    for name, record in records.items():  # sizes first: a truncated file is told without reading anything
        path = index / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, kit.json says {record['bytes']}"
    for name, record in records.items():
        digest = hashlib.sha256()
        with open(index / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        if digest.hexdigest() != record["sha256"]:
            return f"{index / name}: its sha256 differs from the one kit.json lists"
    return ""


INDEX_FILES = KIT_INFO["index"].get("files")
if not INDEX_FILES:
    raise SystemExit(f"{KIT / 'kit.json'} lists no index checksums (an older kit): rebuild it with "
                     "`img2prompt kaggle-kit`")
started = time.perf_counter()
problem = index_problem(KIT / "index", INDEX_FILES)
if problem:
    raise SystemExit(f"the kit's index is damaged, nothing was predicted: {problem}; rebuild or re-upload the kit")
print(f"index verified: {len(INDEX_FILES)} files, {sum(r['bytes'] for r in INDEX_FILES.values()) / 1e6:.1f} MB, "
      f"{time.perf_counter() - started:.1f} s")

# %% [markdown]
# Install img2prompt and everything it needs from the kit's wheels (no internet, no package index).

# %%
from importlib import metadata

VERSION = KIT_INFO["img2prompt_version"]
try:
    installed = metadata.version("img2prompt")
except metadata.PackageNotFoundError:
    installed = None
if installed == VERSION:  # a second run of the notebook in the same session
    print(f"img2prompt {VERSION} is already installed")
else:
    # pip's output is captured: a notebook cell does not show what a child process writes
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                          "--find-links", str(KIT / "wheels"), f"img2prompt=={VERSION}"], capture_output=True, text=True)
    if pip.returncode != 0:
        print(pip.stdout + pip.stderr)
        errors = [line for line in pip.stderr.splitlines() if line.startswith("ERROR")] or ["(no message)"]
        raise SystemExit(f"pip could not install img2prompt {VERSION} from {KIT / 'wheels'}: {errors[-1]}")
    print(f"installed img2prompt {VERSION} from {KIT / 'wheels'}")

# %% [markdown]
# Predict every image's prompt embedding and write the submission, in the sample submission's order when
# that file lists every image (a hidden test set with other images is written in file-name order).

# %%
import warnings

# open_clip's dependencies import tqdm.auto, which in a notebook without ipywidgets warns "IProgress not
# found" and then uses the plain text bar anyway (img2prompt's own bars are that plain bar, tqdm.std):
# import it once here with that warning silenced.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto

import img2prompt

# torch and torchvision of different builds (a CPU torch beside a CUDA torchvision) fail deep inside the first
# model load with `operator torchvision::nms does not exist`: checked here, one line naming the fix
problem = img2prompt.environment_problem()
if problem:
    raise SystemExit(f"img2prompt cannot run here: {problem}")

# %%
def image_ids(folder: Path) -> set:
    return {path.stem for path in folder.iterdir() if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}}


def sample_for(images: Path, sample: str):
    """The sample submission to order the rows by, or None when there is none or it misses images."""
    if not sample or not os.path.isfile(sample):
        return None
    with open(sample, newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        next(rows, None)
        listed = {row[0].rsplit("_", 1)[0] for row in rows if row}
    missing = image_ids(images) - listed
    if missing:
        print(f"{len(missing)} image(s) are not in {sample}: ignoring it, rows follow the file names")
        return None
    return sample


OUT.parent.mkdir(parents=True, exist_ok=True)
# the CLIP folder(s) the kit holds: clip/, or clip-1/, clip-2/, … for an index of several CLIP models
CLIP_FOLDERS = [str(KIT / name) for name in KIT_INFO.get("clip_folders", ["clip"])]
with img2prompt.open_index(KIT / "index", clip_model=CLIP_FOLDERS) as index:
    report = index.submission(IMAGES, OUT, sample_submission=sample_for(IMAGES, SAMPLE),
                              **prediction_settings(KIT_INFO, SETTINGS))
print(f"wrote {report.out}: {report.images} images, predicted {report.predicted}, "
      f"corpus-mean fallback {len(report.failed)}")
for image_id, reason in report.failed.items():
    print(f"  {image_id}: {reason}")
'''


def split_cells(source: str = SUBMIT_SOURCE) -> list[tuple[str, str]]:
    """[(cell_type, text)] cut from the percent-format source; markdown cells lose their `# ` prefixes."""
    cells: list[tuple[str, list[str]]] = []
    for line in source.splitlines():
        if line.startswith(CELL_MARKER):
            cells.append(("markdown" if line.strip() == MARKDOWN_MARKER else "code", []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"text before the first cell marker: {line!r}")
    result = []
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        if kind == "markdown":
            lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
        result.append((kind, "\n".join(lines)))
    return result


def code_of_notebook(notebook: dict) -> str:
    """The code cells of a notebook, joined with blank lines (to compare with the script's code)."""
    return "\n\n".join("".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                       for cell in notebook["cells"] if cell["cell_type"] == "code")


def code_of_script(source: str = SUBMIT_SOURCE) -> str:
    return "\n\n".join(text for kind, text in split_cells(source) if kind == "code")


def notebook_json(source: str = SUBMIT_SOURCE) -> dict:
    """An nbformat v4 notebook whose cells are the percent-format source's cells."""
    cells = []
    for number, (kind, text) in enumerate(split_cells(source)):
        lines = text.splitlines(keepends=True)
        cell = {"cell_type": kind, "id": f"img2prompt-{number}", "metadata": {}, "source": lines}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def write_submit_files(folder: str | Path) -> tuple[Path, Path]:
    """Write submit.py and img2prompt-submit.ipynb into `folder`; returns their paths."""
    folder = Path(folder)
    script, notebook = folder / SCRIPT_NAME, folder / NOTEBOOK_NAME
    write_atomic(script, lambda handle: handle.write(SUBMIT_SOURCE.encode("utf-8")))
    payload = (json.dumps(notebook_json(), indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomic(notebook, lambda handle: handle.write(payload))
    return script, notebook
