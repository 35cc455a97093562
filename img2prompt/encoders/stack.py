"""Whether the installed torch / torchvision pair works together, read from package metadata, without
importing either (a mismatched pair fails deep inside `import open_clip` with a 40-line traceback:
`RuntimeError: operator torchvision::nms does not exist`). Versions that match can still be different builds
(torch 2.13.0+cpu beside PyPI's CUDA torchvision 0.28.0): the metadata cannot tell, so `import_problem`
imports the pair and names the fix when that fails (the CLI asks it when a command fails that way)."""
from __future__ import annotations

import re
from importlib import metadata

from img2prompt.errors import UserError, short_reason

TORCH_INDEX = "https://download.pytorch.org/whl"
# torchvision 0.(N+15) is built against torch 2.N (0.15 ↔ 2.0 … 0.29 ↔ 2.14): one rule since torch 2.0.
TORCHVISION_OFFSET = 15


def _minor(version: str) -> tuple[int, int] | None:
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def torch_stack_problem(torch_version: str | None, torchvision_version: str | None) -> str | None:
    """One line saying what to install, or None when the pair matches (or cannot be judged)."""
    if torch_version is None:
        return "torch is not installed: pip install torch torchvision (the CPU build: add --index-url " \
               "https://download.pytorch.org/whl/cpu)"
    if torchvision_version is None:
        return f"torchvision is not installed (torch {torch_version} is): pip install torchvision"
    torch_minor, vision_minor = _minor(torch_version), _minor(torchvision_version)
    if torch_minor is None or vision_minor is None or torch_minor[0] != 2 or vision_minor[0] != 0:
        return None  # a layout this rule does not know: let the import speak
    wanted = torch_minor[1] + TORCHVISION_OFFSET
    if vision_minor[1] == wanted:
        return None
    local = torch_version.partition("+")[2]
    suffix = f" (the same build as torch: +{local})" if local else ""
    return (f"torch {torch_version} and torchvision {torchvision_version} do not work together (torch "
            f"2.{torch_minor[1]} needs torchvision 0.{wanted}): pip install 'torchvision==0.{wanted}.*'{suffix}, "
            "or install both again from one index")


def installed_version(name: str) -> str | None:
    """The version of `name` installed here, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_torch_stack() -> None:
    """Refuse, in one line, a torch/torchvision pair that cannot import open_clip."""
    problem = torch_stack_problem(installed_version("torch"), installed_version("torchvision"))
    if problem:
        raise UserError(problem)


def build_fix(torch_version: str, torchvision_version: str | None) -> str:
    """The pip command that installs the torchvision build that goes with the installed torch."""
    minor = _minor(torch_version)
    wanted = f"0.{minor[1] + TORCHVISION_OFFSET}.*" if minor and minor[0] == 2 else torchvision_version or ""
    local = torch_version.partition("+")[2]  # cpu, cu128, rocm6.2 … ; none: PyPI's build
    spec = f"'torchvision=={wanted}'" if wanted else "torchvision"
    if local:
        return f"pip install --force-reinstall --no-deps {spec} --index-url {TORCH_INDEX}/{local}"
    return f"pip install --force-reinstall --no-deps {spec}  (PyPI's build, as torch's)"


def import_problem() -> str | None:
    """Import torch and torchvision; one line naming the fix when that fails (a CPU torch beside a CUDA
    torchvision of the same version: `operator torchvision::nms does not exist`), else None."""
    torch_version, vision_version = installed_version("torch"), installed_version("torchvision")
    problem = torch_stack_problem(torch_version, vision_version)
    if problem:
        return problem
    try:
        import torch  # noqa: F401
    except Exception as exc:  # a broken install: torch's own first line, and where it came from
        return f"torch {torch_version} is installed but cannot be imported ({short_reason(exc, 160)}): " \
               "install it again (pip install --force-reinstall torch torchvision, from one index)"
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        return (f"torch {torch_version} and torchvision {vision_version} are different builds (CPU / CUDA): "
                f"import torchvision fails ({short_reason(exc, 120)}); install the torchvision built for this "
                f"torch: {build_fix(torch_version, vision_version)}")
    return None
