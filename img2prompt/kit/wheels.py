"""The kit's wheels: img2prompt's own wheel and the dependency closure a Kaggle image lacks, for a target.

The closure is computed here, not by pip: each wheel is fetched alone (`pip download --no-deps
--only-binary=:all:` for the target Python and platform), its METADATA's Requires-Dist are evaluated for that
target, and packages a Kaggle image already ships (torch, numpy, ...) are neither fetched nor followed, so the
kit never carries gigabytes of torch. Where the running environment has a package installed, that version is
preferred (the kit runs what was built and tested here).
"""
from __future__ import annotations

import email.parser
import logging
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from img2prompt.encoders.stack import installed_version
from img2prompt.errors import UserError

log = logging.getLogger(__name__)

PROJECT = "img2prompt"
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                     "manylinux1_x86_64", "linux_x86_64")
# What a Kaggle Python image ships (their own requirements are Kaggle's business: not followed).
DEFAULT_PREINSTALLED = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "pillow")


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


def check_python_version(text: str) -> str:
    """--python-version as given, when it is a CPython X.Y."""
    if not re.fullmatch(r"3\.\d{1,2}", text or ""):
        raise UserError(f"--python-version {text!r}: give a CPython version as X.Y, e.g. 3.11")
    return text


def parse_names(names: Iterable[str]) -> list[str]:
    """Canonical package names (for --preinstalled); a name that is not one is refused."""
    result = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise UserError(f"--preinstalled: {name!r} is not a package name")
        result.append(canonicalize_name(name))
    return sorted(set(result))


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
    closure = _Closure(roots, root_extras, target, preinstalled, fetch, dest, installed_version)
    steps = 0
    while closure.pending:
        steps += 1
        if steps > max_steps:
            raise UserError(f"the dependency closure did not settle after {max_steps} steps: "
                            f"last packages {', '.join(list(closure.pending)[:5])}")
        name = closure.pending.popleft()
        closure.queued.discard(name)
        closure.follow(name, closure.settle(name))
    return Resolution(wheels=closure.chosen, preinstalled_skipped=closure.skipped, required_by=closure.required_by)


class _Closure:
    """resolve_closure's state: the wheel chosen per package, the specifiers and extras asked of each, and the
    queue of packages to (re)visit."""

    def __init__(self, roots: list[WheelInfo], root_extras: dict[str, set[str]], target: Target,
                 preinstalled: Iterable[str], fetch: Fetch, dest: Path,
                 installed_version: Callable[[str], "str | None"]) -> None:
        self.environment = target.marker_environment()
        self.preinstalled = {canonicalize_name(name) for name in preinstalled}
        self.fetch, self.dest, self.installed_version = fetch, dest, installed_version
        self.chosen: dict[str, WheelInfo] = {root.name: root for root in roots}
        self.extras: dict[str, set[str]] = {root.name: set(root_extras.get(root.name, ())) for root in roots}
        self.specifiers: dict[str, set[str]] = {}
        self.required_by: dict[str, set[str]] = {}
        self.skipped: set[str] = set()
        self.pending: deque[str] = deque(root.name for root in roots)
        self.queued = set(self.pending)

    def combined(self, name: str) -> SpecifierSet:
        return SpecifierSet(",".join(sorted(spec for spec in self.specifiers.get(name, ()) if spec)))

    def need(self, name: str) -> None:
        if name not in self.queued:
            self.queued.add(name)
            self.pending.append(name)

    def settle(self, name: str) -> WheelInfo:
        """The wheel of `name` that meets every specifier so far: the chosen one, or a fresh fetch (the
        version installed here preferred) that replaces it."""
        wheel = self.chosen.get(name)
        wanted = self.combined(name)
        if wheel is not None and wanted.contains(Version(wheel.version), prereleases=True):
            return wheel
        prefer = self.installed_version(name)
        if prefer is not None and not wanted.contains(Version(prefer), prereleases=True):
            prefer = None
        path = self.fetch(name, wanted, prefer, self.dest)
        fetched = read_wheel_metadata(path)
        if fetched.name != name:
            raise UserError(f"asked for {name}, the index gave {path.name} ({fetched.name})")
        if wheel is not None and wheel.path != fetched.path:
            log.info("  %s %s → %s (a later requirement asks for %s)", name, wheel.version, fetched.version, wanted)
            wheel.path.unlink(missing_ok=True)
        self.chosen[name] = fetched
        return fetched

    def follow(self, name: str, wheel: WheelInfo) -> None:
        """Queue each dependency of `wheel` that applies on the target and is new or asks for more."""
        for line in wheel.requires:
            try:
                requirement = Requirement(line)
            except InvalidRequirement as exc:
                raise UserError(f"{wheel.path.name}: bad Requires-Dist {line!r} ({exc})") from exc
            if not requirement_applies(requirement, self.environment, self.extras.get(name, ())):
                continue
            dependency = canonicalize_name(requirement.name)
            self.required_by.setdefault(dependency, set()).add(name)
            if dependency in self.preinstalled:
                self.skipped.add(dependency)
            elif self.ask(dependency, requirement) or dependency not in self.chosen:
                self.need(dependency)

    def ask(self, dependency: str, requirement: Requirement) -> bool:
        """Record the requirement's specifier and extras for `dependency`; whether either is new."""
        changed = False
        spec = str(requirement.specifier)
        if spec not in self.specifiers.setdefault(dependency, set()):
            self.specifiers[dependency].add(spec)
            changed = True
        new_extras = {canonicalize_name(extra) for extra in requirement.extras} - self.extras.get(dependency, set())
        if new_extras:
            self.extras.setdefault(dependency, set()).update(new_extras)
            changed = True
        return changed


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
        setuptools = installed_version("setuptools")
        if setuptools and Version(setuptools) >= Version("68"):  # build offline with this environment's own
            command.insert(4, "--no-build-isolation")
        log.info("building the img2prompt wheel from %s", root)
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted((Path(scratch) / "dist").glob("img2prompt-*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise UserError(f"building the img2prompt wheel from {root} failed: {tail[:400]}")
        placed = dest / wheels[0].name
        shutil.move(str(wheels[0]), placed)
        return placed
