"""The local engine: shard tasks in order, in this process (which owns the GPU); tokenization runs ahead
in `workers` spawned processes (build_index/pipeline.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from img2prompt.build_index.engine import BuildEngine
from img2prompt.build_index.pipeline import default_workers, tokenized_shards
from img2prompt.build_index.shard_encoder import EncoderSpec, ShardEncoder
from img2prompt.index.writer import ShardTask


class LocalEngine(BuildEngine):
    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers

    @classmethod
    def from_options(cls, options) -> "LocalEngine":
        return cls(options.workers)

    def run(self, tasks: Iterator[ShardTask], encoder: ShardEncoder, spec: EncoderSpec, root: Path,
            progress: Callable[[int], None] | None = None) -> Iterator[tuple[dict, dict]]:
        workers = default_workers(encoder.clip.device) if self.workers is None else self.workers
        for shard in tokenized_shards(tasks, encoder.tokenizers, workers):
            yield encoder.encode(shard, root, progress)
