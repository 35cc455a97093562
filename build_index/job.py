"""The one job assembler of build, add and merge: each checks its own arguments and loads its models, then
`prepare_job` makes the parts every job runs with (engine, encoder and its picklable spec, the index writer)
into one JobContext, and `run_job` runs the job's named steps on it, the writer's lock released however it
ends. A job is a class whose `steps()` names its phases in order (runner.BuildJob and its subclasses)."""
from __future__ import annotations

import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from img2prompt.build_index.engine import BuildEngine, engine_class
from img2prompt.build_index.options import BuildOptions
from img2prompt.build_index.result import BuildResult, finished_result
from img2prompt.build_index.shard_encoder import EncoderSpec, ShardEncoder, encode_threads
from img2prompt.index.writer import IndexWriter


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] += time.perf_counter() - self.start

        return _Phase()

    def rounded(self) -> dict[str, float]:
        """Seconds per phase, to the millisecond (the manifest's timings_s)."""
        return {name: round(seconds, 3) for name, seconds in self.seconds.items()}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@dataclass
class LoadedModels:
    """The models a job encodes with, loaded and identity-checked by the job's own loader."""
    clip: Any  # a ClipEnsemble
    text_model: Any  # a TextModel
    identities: dict  # {"clip": ..., "text": ...}: the manifest's "models"
    text_replicas: list | None = None  # MiniLM on each device of a multi-device --device (build only)


@dataclass
class JobContext:
    """What the steps of a build, an add or a merge read; made once, by prepare_job."""
    options: BuildOptions  # an add's and a merge's own options turned into build's (options.as_build)
    writer: IndexWriter
    engine: BuildEngine
    encoder: ShardEncoder
    spec: EncoderSpec
    models: dict  # the loaded models' identities
    device: Any
    timer: PhaseTimer
    paths: list[Path] = field(default_factory=list)  # corpus files
    pair_paths: list[Path] = field(default_factory=list)  # (image, prompt) tables
    total_rows: int = 0  # the rows the files hold (the progress bar's total)


def prepare_job(options: BuildOptions, build_key: dict, models: LoadedModels, device, timer: PhaseTimer, *,
                engine: BuildEngine | None = None, paths: list[Path] | None = None,
                pair_paths: list[Path] | None = None, total_rows: int = 0, precomputed=None) -> JobContext:
    """The engine (options.engine's, unless the caller made it earlier to fail early), the encoder every
    engine runs with the driver's thread count, its spec, and last the writer: it locks options.out and stages
    the job (resumed when options.resume and `build_key` match the interrupted job's)."""
    engine = engine if engine is not None else engine_class(options.engine).from_options(options)
    threads = encode_threads(device)  # the driver's: a Ray worker encodes with it too (same bits)
    encoder = ShardEncoder(models.clip, models.text_model, options.batch_size, precomputed, models.text_replicas,
                           threads)
    spec = EncoderSpec(options.clip_model, options.clip_pretrained, options.text_model, str(device),
                       options.batch_size, options.embeddings, models.identities, threads, options.precision)
    writer = IndexWriter(options.out, build_key, resume=options.resume, overwrite=options.overwrite)
    return JobContext(options, writer, engine, encoder, spec, models.identities, device, timer,
                      list(paths or []), list(pair_paths or []), total_rows)


def run_job(job_type: type, context: JobContext, **job_options) -> BuildResult:
    """`job_type(context, **job_options).run()`, or, when a resume finds this very job already complete, its
    index as it is; the writer's lock is released however it ends."""
    try:
        if context.writer.done is not None:
            return finished_result(context.writer.done)
        return job_type(context, **job_options).run()
    finally:
        context.writer.close()
