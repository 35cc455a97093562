"""What a build returns (the runner's, and build --out URL's when a --resume only publishes a finished build)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BuildResult:
    manifest: dict
    report: dict
    timings: dict = field(default_factory=dict)


def finished_result(manifest: dict) -> BuildResult:
    """What a --resume of a job that had already completed returns: its index, "nothing_to_do" in the report."""
    report = dict(manifest.get("corpus") or {})
    report["nothing_to_do"] = True
    return BuildResult(manifest=manifest, report=report)
