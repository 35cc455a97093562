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
from pathlib import Path
from typing import Iterator

from img2prompt.build_index.shard_encoder import EncoderSpec, ShardEncoder
from img2prompt.errors import UserError
from img2prompt.index.writer import ShardTask

ENGINES = {
    "local": "img2prompt.build_index.engine_local:LocalEngine",
    "ray": "img2prompt.build_index.engine_ray:RayEngine",
}


class BuildEngine(ABC):
    @classmethod
    @abstractmethod
    def from_options(cls, options) -> "BuildEngine":
        """The engine for a BuildOptions (workers, engine_options: its own settings, e.g. a cluster address)."""

    @abstractmethod
    def run(self, tasks: Iterator[ShardTask], encoder: ShardEncoder, spec: EncoderSpec,
            root: Path) -> Iterator[tuple[dict, dict]]:
        """Encode every task; yield (shard record, phase seconds) as each finishes.

        `encoder` is the driver's loaded one (an in-process engine uses it); `spec` rebuilds it elsewhere."""


def engine_class(name: str) -> type[BuildEngine]:
    if name not in ENGINES:
        raise UserError(f"unknown --engine {name!r}: choose from {', '.join(ENGINES)}")
    module, _, attribute = ENGINES[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        raise UserError(f"--engine {name} needs an optional package ({exc.name}): "
                        f"pip install 'img2prompt[{name}]'") from exc
