"""Build engines: who runs the shard tasks. Each engine is one file behind this interface.

    local   build_index/engine_local.py   this process encodes; spawned workers tokenize ahead
    (ray)   build_index/engine_ray.py     one task per shard on a Ray cluster (the optional `ray` extra)

An engine takes the shard tasks that still need encoding and yields (record, phase seconds) for each as it
finishes, in any order; the driver commits each record to the manifest. Tasks are pure: a task's files
depend only on the task and the models, so any engine gives the same index.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from typing import TYPE_CHECKING

from img2prompt.errors import UserError

if TYPE_CHECKING:  # the registry is read by `build --help`: no torch for that
    from img2prompt.build_index.shard_encoder import EncoderSpec, ShardEncoder
    from img2prompt.index.writer import ShardTask

@dataclass(frozen=True)
class EngineFlag:
    """One of an engine's own `build` flags: the CLI shows it in the engine's group and passes its value
    as `engine_options[key]` (declared here, beside the engine's name, so --help needs no engine import)."""
    flag: str
    key: str
    type: type
    default: Any
    help: str


@dataclass(frozen=True)
class EngineEntry:
    target: str  # "module:Class", imported only when the engine runs (Ray is an optional extra)
    title: str = ""
    flags: tuple[EngineFlag, ...] = ()


ENGINES = {
    "local": EngineEntry("img2prompt.build_index.engine_local:LocalEngine"),
    "ray": EngineEntry("img2prompt.build_index.engine_ray:RayEngine", "Ray engine (--engine ray)", (
        EngineFlag("--ray-address", "address", str, None,
                   "auto (a running cluster) or ADDRESS; default: start a local one"),
        EngineFlag("--gpus-per-worker", "gpus_per_worker", float, 0.0,
                   "GPUs per encoding actor (default 0: CPU actors)"))),
}


class BuildEngine(ABC):
    @classmethod
    @abstractmethod
    def from_options(cls, options) -> "BuildEngine":
        """The engine for a BuildOptions (workers, engine_options: its own settings, e.g. a cluster address)."""

    @abstractmethod
    def run(self, tasks: Iterator[ShardTask], encoder: ShardEncoder, spec: EncoderSpec, root: Path,
            progress: Callable[[int], None] | None = None) -> Iterator[tuple[dict, dict]]:
        """Encode every task; yield (shard record, phase seconds) as each finishes.

        `encoder` is the driver's loaded one (an in-process engine uses it); `spec` rebuilds it elsewhere.
        `progress(rows)`: called in the driver as rows are encoded, between commits (the bar moves per batch)."""


def engine_class(name: str) -> type[BuildEngine]:
    if name not in ENGINES:
        raise UserError(f"unknown --engine {name!r}: choose from {', '.join(ENGINES)}")
    module, _, attribute = ENGINES[name].target.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        raise UserError(f"--engine {name} needs an optional package ({exc.name}): "
                        f"pip install 'img2prompt[{name}]'") from exc
