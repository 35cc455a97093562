"""What a build returns (the runner's, and build --out URL's when a --resume only publishes a finished build)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BuildResult:
    manifest: dict
    report: dict
    timings: dict = field(default_factory=dict)
