"""`img2prompt kaggle-kit`: one folder to upload as a Kaggle dataset, from which an offline notebook submits.

    KIT/
      kit.json                  marker + what the kit holds (the notebook finds the kit by this file and checks
                                the index against the sizes and sha256s it lists)
      wheels/                   img2prompt (built from this checkout) + every dependency Kaggle lacks
      index/                    the index (verified, hard-linked when possible)
      clip/                     the index's CLIP weights in open_clip's local-dir layout (an index of several
                                CLIP models: clip-1/, clip-2/, … one per model, named in kit.json)
      img2prompt-submit.ipynb   the submission notebook; submit.py holds the same code
      README.md, dataset-metadata.json

This module checks the options and runs the build; the parts are wheels.py (the dependency closure),
clip.py (clip folders), files.py (index, kit.json, README) and folder.py (which --out may be replaced, the
swap, leftovers of killed runs). Everything is built in KIT.tmp-<pid> and swapped into place at the end; bad
arguments are refused before anything is fetched.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from img2prompt.api import RetrievalSettings, check_query
from img2prompt.errors import UserError
from img2prompt.kit.clip import verify_kit_clip, write_clip_folders
from img2prompt.kit.files import (KIT_FORMAT, KIT_MARKER, MB, KitWheel, copy_index, dataset_metadata, folder_bytes,
                                  index_file_records, readme_text)
from img2prompt.kit.folder import check_out_folder, clean_leftovers, swap_into_place, temp_folder
from img2prompt.kit.wheels import (DEFAULT_PLATFORMS, DEFAULT_PREINSTALLED, PROJECT, Target, build_project_wheel,
                                   check_python_version, installed_version, parse_names, pip_download,
                                   read_wheel_metadata, resolve_closure, source_checkout)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- options

@dataclass
class KitOptions:
    index: str
    out: str
    # a checkpoint file, or an open_clip local-dir folder (config + weights); a list: one per model of an index
    # of several CLIP models (None entries: where the manifest says)
    clip_weights: str | list[str | None] | None = None
    python_version: str | None = None  # X.Y; default: the running interpreter's
    platforms: list[str] | None = None  # default: DEFAULT_PLATFORMS (+ pure-Python wheels, always)
    preinstalled: list[str] | None = None  # default: DEFAULT_PREINSTALLED
    with_scorer: bool = False  # also ship img2prompt's `scorer` extra (sentence-transformers + MiniLM)
    overwrite: bool = False
    prefer_installed: bool = True  # fetch the version installed here when it satisfies the requirements
    settings: RetrievalSettings = field(default_factory=RetrievalSettings)  # what the kit's notebook submits with


@dataclass
class KitReport:
    out: str
    python_version: str
    platforms: list[str]
    wheels: list[KitWheel]
    sizes_mb: dict[str, float]  # wheels, index, clip, other, total
    index_transfer: str  # "hard-linked" or "copied"
    clip_source: str
    preinstalled_skipped: list[str]  # required by the kit, left to the Kaggle image
    timings_s: dict[str, float] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)  # what killed runs had left beside the kit, and what was done


# ---------------------------------------------------------------------------------------------- build

def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _check_options(options: KitOptions) -> tuple[Path, Path, Target, list[str], list[str]]:
    """Every check that needs no download; returns index dir, out dir, target, preinstalled, leftover notes."""
    index_dir = _check_index(options)
    out, leftovers = _check_out(options, index_dir)
    check_query("kaggle-kit", index_dir, options.settings)  # k against the index, weights against its models
    given = options.clip_weights if isinstance(options.clip_weights, list) else [options.clip_weights]
    for weights in given:
        if weights is not None and not Path(weights).exists():
            raise UserError(f"--clip-weights {weights}: no such file or folder")
    target = _check_target(options)
    preinstalled = parse_names(DEFAULT_PREINSTALLED if options.preinstalled is None else options.preinstalled)
    if PROJECT in preinstalled:
        raise UserError("--preinstalled cannot name img2prompt itself")
    try:
        subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise UserError(f"the kit is fetched with pip, which this Python ({sys.executable}) lacks") from exc
    source_checkout()
    return index_dir, out, target, preinstalled, leftovers


def _check_index(options: KitOptions) -> Path:
    """The index folder, resolved; one line when it is missing or holds no index."""
    from img2prompt.index.manifest import read_manifest

    index_dir = Path(options.index).expanduser().resolve()
    if not index_dir.is_dir():
        raise UserError(f"index folder not found: {options.index}")
    manifest = read_manifest(index_dir)
    if manifest is None or "models" not in manifest:
        raise UserError(f"{options.index} is not an img2prompt index (no manifest.json with models)")
    return index_dir


def _check_out(options: KitOptions, index_dir: Path) -> tuple[Path, list[str]]:
    """--out resolved, after killed runs' leftovers beside it are dealt with (their notes returned)."""
    out = Path(options.out).expanduser().resolve()
    leftovers = clean_leftovers(out)  # first: it may restore a kit that a killed swap had moved aside
    check_out_folder(out, options.out, options.overwrite)
    if not out.parent.is_dir():
        raise UserError(f"--out {options.out}: its parent folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {options.out}: cannot write in {out.parent}")
    if _inside(index_dir, out) or _inside(out, index_dir):
        raise UserError(f"--out {options.out} and the index {options.index} must not contain each other")
    return out, leftovers


def _check_target(options: KitOptions) -> Target:
    """The Kaggle image's Python version and wheel platform tags."""
    python_version = check_python_version(options.python_version or "%d.%d" % sys.version_info[:2])
    platforms = tuple(dict.fromkeys(tag.strip() for tag in (options.platforms or DEFAULT_PLATFORMS) if tag.strip()))
    if not platforms:
        raise UserError("--platform: give at least one platform tag, e.g. manylinux_2_28_x86_64")
    for tag in platforms:
        if not re.fullmatch(r"[a-z0-9_]+", tag):
            raise UserError(f"--platform {tag!r} is not a wheel platform tag (e.g. manylinux_2_28_x86_64)")
    return Target(python_version, platforms)


def build_kit(options: KitOptions) -> KitReport:
    """Build the kit in OUT.tmp-<pid>, check that it opens, then swap it in as OUT."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    index_dir, out, target, preinstalled, leftovers = _check_options(options)
    tmp = temp_folder(out, "tmp")
    tmp.mkdir()
    try:
        mark = time.perf_counter()
        index_manifest, index_transfer = copy_index(index_dir, tmp / "index")
        timings["index"] = time.perf_counter() - mark

        mark = time.perf_counter()
        clip_folders, clip_source = write_clip_folders(index_manifest["models"]["clip"], options.clip_weights, tmp)
        verify_kit_clip(tmp / "index", [tmp / name for name in clip_folders])
        timings["clip"] = time.perf_counter() - mark

        mark = time.perf_counter()
        wheels_dir = tmp / "wheels"
        wheels_dir.mkdir()
        own = read_wheel_metadata(build_project_wheel(wheels_dir))
        timings["img2prompt_wheel"] = time.perf_counter() - mark

        mark = time.perf_counter()
        log.info("fetching dependencies for CPython %s on %s", target.python_version, ", ".join(target.platforms))
        resolution = resolve_closure(
            [own], {own.name: {"scorer"} if options.with_scorer else set()}, target=target,
            preinstalled=preinstalled, dest=wheels_dir,
            fetch=lambda name, spec, prefer, dest: pip_download(name, spec, prefer, dest, target=target),
            installed_version=installed_version if options.prefer_installed else (lambda name: None))
        timings["dependencies"] = time.perf_counter() - mark

        wheels = sorted((KitWheel(name=wheel.name, version=wheel.version, file=wheel.path.name,
                                  bytes=wheel.path.stat().st_size) for wheel in resolution.wheels.values()),
                        key=lambda wheel: wheel.name)
        stray = {path.name for path in wheels_dir.iterdir()} - {wheel.file for wheel in wheels}
        for name in stray:  # nothing but the chosen wheels, one per package
            (wheels_dir / name).unlink()
        sizes = {"wheels": folder_bytes(wheels_dir) / MB, "index": folder_bytes(tmp / "index") / MB,
                 "clip": sum(folder_bytes(tmp / name) for name in clip_folders) / MB}
        kit_info = {
            "format": KIT_FORMAT, "img2prompt_version": own.version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python_version": target.python_version, "platforms": list(target.platforms),
            "preinstalled": preinstalled, "with_scorer": options.with_scorer,
            "index": {"count": index_manifest.get("count"), "clip": index_manifest["models"]["clip"],
                      "text": index_manifest["models"].get("text"),
                      "files": index_file_records(tmp / "index", index_manifest)},
            "wheels": [wheel.__dict__ for wheel in wheels],
            "clip_folders": clip_folders,
            "settings": options.settings.as_dict(),  # what the notebook submits with (template.py)
        }
        (tmp / KIT_MARKER).write_text(json.dumps(kit_info, indent=2) + "\n", encoding="utf-8")
        from img2prompt.kit.template import write_submit_files

        write_submit_files(tmp)
        (tmp / "dataset-metadata.json").write_text(json.dumps(dataset_metadata(out.name), indent=2) + "\n",
                                                   encoding="utf-8")
        (tmp / "README.md").write_text(readme_text(kit_info, wheels, sizes), encoding="utf-8")
        sizes["other"] = sum(path.stat().st_size for path in tmp.iterdir() if path.is_file()) / MB
        sizes["total"] = sum(sizes.values())
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["total"] = time.perf_counter() - started
    return KitReport(out=str(out), python_version=target.python_version, platforms=list(target.platforms),
                     wheels=wheels, sizes_mb={key: round(value, 3) for key, value in sizes.items()},
                     index_transfer=index_transfer, clip_source=clip_source,
                     preinstalled_skipped=sorted(resolution.preinstalled_skipped),
                     timings_s={key: round(value, 2) for key, value in timings.items()}, leftovers=leftovers)


def format_kit_report(report: KitReport) -> str:
    """The size report `img2prompt kaggle-kit` prints."""
    sizes = report.sizes_mb
    lines = [f"kit {report.out} (CPython {report.python_version}; {', '.join(report.platforms)})",
             f"  wheels {sizes['wheels']:9.1f} MB  ({len(report.wheels)} wheels)",
             f"  index  {sizes['index']:9.1f} MB  ({report.index_transfer})",
             f"  clip   {sizes['clip']:9.1f} MB  (from {report.clip_source})",
             f"  total  {sizes['total']:9.1f} MB",
             "wheels:"]
    lines += [f"  {wheel.file}  {wheel.bytes / MB:.1f} MB" for wheel in report.wheels]
    if report.preinstalled_skipped:
        lines.append("left to the Kaggle image (not in the kit): " + ", ".join(report.preinstalled_skipped))
    lines += [f"note: {note}" for note in report.leftovers]
    lines.append(f"next: fill in USERNAME in {Path(report.out) / 'dataset-metadata.json'}, upload the folder as a "
                 "Kaggle dataset and run img2prompt-submit.ipynb with it attached (see its README.md)")
    return "\n".join(lines)

