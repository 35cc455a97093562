"""The index build job: corpus → shards (CLIP + MiniLM vectors) → consolidated arrays → FAISS → recall.

Memory stays flat in the corpus size: prompts stream through one shard at a time (only the 8-byte dedup
hashes accumulate), and FAISS is filled from the memory-mapped vectors in chunks. Each shard is committed
to the manifest once written, so `resume=True` skips the finished shards after checking that the corpus
still yields exactly the same prompts for them.
"""
from __future__ import annotations

import itertools
import logging
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from img2prompt.build_index.corpus import (DEFAULT_MAX_CHARS, CorpusReport, expand_corpus_paths,
                                           file_fingerprint, iter_prompts)
from img2prompt.build_index.embed import clip_text_embeddings, minilm_embeddings
from img2prompt.errors import UserError
from img2prompt.index import ann
from img2prompt.index.format import IndexWriter, prompts_sha256
from img2prompt.memory import release_free_memory
from img2prompt.models import ClipModel, TextModel, load_clip, load_text_model, resolve_device

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 100_000


@dataclass
class BuildOptions:
    corpus: list[str]
    out: str
    clip_model: str
    clip_pretrained: str | None = None
    text_model: str | None = None
    column: str = "prompt"
    batch_size: int = 256
    device: str = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE
    index: str = "auto"
    max_memory: int | None = None
    resume: bool = False
    overwrite: bool = False
    max_chars: int = DEFAULT_MAX_CHARS
    recall_queries: int = 1000
    seed: int = 0
    progress: bool = True


@dataclass
class BuildResult:
    manifest: dict
    report: dict
    timings: dict = field(default_factory=dict)


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


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def run_build(options: BuildOptions) -> BuildResult:
    if options.shard_size <= 0 or options.batch_size <= 0:
        raise UserError("--shard-size and --batch-size must be positive")
    timer = PhaseTimer()
    paths = expand_corpus_paths(options.corpus)
    device = resolve_device(options.device)
    log.info("device %s", device)
    with timer.phase("load_models"):
        clip = load_clip(options.clip_model, options.clip_pretrained, device)
        text_model = load_text_model(options.text_model, device)
    models = {"clip": clip.identity(), "text": text_model.identity()}
    build_key = {"models": models, "corpus": [file_fingerprint(path) for path in paths],
                 "column": options.column, "shard_size": options.shard_size, "max_chars": options.max_chars}
    writer = IndexWriter(options.out, build_key, resume=options.resume, overwrite=options.overwrite)
    resumed_rows = writer.rows_written
    if resumed_rows:
        log.info("resuming after %d complete shards (%d prompts)", len(writer.shards), resumed_rows)
    corpus = CorpusReport()
    prompts = iter_prompts(paths, options.column, corpus, options.max_chars)
    report = encode_shards(writer, prompts, corpus, clip, text_model, options, timer)
    memory = {"peak_rss_mib_after_encode": peak_rss_mib()}
    if corpus.kept < writer.rows_written:
        raise UserError(f"{options.out}: cannot resume, the corpus now has fewer prompts than were indexed")
    count, faiss_info = build_and_check_faiss(writer, options, timer)
    memory["peak_rss_mib_at_end"] = peak_rss_mib()
    timings = {name: round(seconds, 3) for name, seconds in timer.seconds.items()}
    encode_seconds = timings.get("encode_clip", 0) + timings.get("encode_minilm", 0)
    manifest = writer.complete({
        "count": count,
        "metric": "inner_product",
        "models": models,
        "faiss": faiss_info,
        "corpus": report,
        "build_options": {"batch_size": options.batch_size, "device": str(device), "index": options.index,
                          "max_memory": options.max_memory, "seed": options.seed},
        "timings_s": timings,
        "rates": {"prompts_per_s": round((count - resumed_rows) / encode_seconds, 1) if encode_seconds else None},
        "memory": memory,
    })
    log.info("built %s: %d prompts in %s", Path(options.out), count, timings)
    return BuildResult(manifest=manifest, report=report, timings=timings)


def encode_shards(writer: IndexWriter, prompts: Iterator[str], corpus: CorpusReport, clip: ClipModel,
                  text_model: TextModel, options: BuildOptions, timer: PhaseTimer) -> dict:
    """Encode and commit every shard the writer does not have yet; returns the corpus report.

    Shards already committed (a resume) are re-read from the corpus only to check they are unchanged.
    """
    finished = writer.shards
    truncated = sum(shard.clip_truncated for shard in finished)
    bar = tqdm(total=None, unit="prompt", desc="encode", disable=not options.progress, dynamic_ncols=True)
    for number, batch in enumerate(_batched(prompts, options.shard_size)):
        if number < len(finished):
            if prompts_sha256(batch) != finished[number].prompts_sha256:
                raise UserError(f"{options.out}: cannot resume, the corpus no longer gives the same prompts for "
                                f"shard {number}; rerun with --overwrite to start over")
            continue
        with timer.phase("encode_clip"):
            clip_result = clip_text_embeddings(clip, batch, options.batch_size)
        with timer.phase("encode_minilm"):
            minilm = minilm_embeddings(text_model, batch, options.batch_size)
        with timer.phase("write_shards"):
            writer.write_shard(batch, clip_result.vectors, minilm, clip_result.truncated)
        truncated += clip_result.truncated
        bar.update(len(batch))
        release_free_memory()
    bar.close()
    return {**corpus.as_dict(), "clip_truncated": truncated}


def build_and_check_faiss(writer: IndexWriter, options: BuildOptions, timer: PhaseTimer) -> tuple[int, dict]:
    """Consolidate the shards, build the planned FAISS index from them, measure its recall."""
    with timer.phase("consolidate"):
        count, clip_dim, _ = writer.consolidate()
    vectors = writer.vectors("clip")
    plan = ann.plan_index(count, clip_dim, options.index, options.max_memory)
    log.info("index %s (%s), about %.1f MiB", plan.kind, plan.reason, plan.estimated_bytes / 2**20)
    with timer.phase("build_faiss"):
        faiss_bar = tqdm(total=count, unit="vec", desc=f"faiss {plan.kind}", disable=not options.progress)
        faiss_index = ann.build_faiss(plan, vectors, seed=options.seed, progress=faiss_bar.update)
        faiss_bar.close()
        ann.write_faiss(faiss_index, writer.faiss_path)
    plan_info = ann.plan_dict(plan)
    with timer.phase("recall"):
        # Tunes the search settings (efSearch; nprobe + re-rank depth) to the recall target, into plan_info.
        recall = ann.measure_recall(faiss_index, plan_info, vectors, queries=options.recall_queries,
                                    seed=options.seed, target=ann.RECALL_WARN)
    if recall["recall"] < ann.RECALL_WARN:
        log.warning("recall@%d of the %s index is %.3f (< %.2f): consider --index flat or a larger "
                    "--max-memory", recall["k"], plan.kind, recall["recall"], ann.RECALL_WARN)
    return count, {**plan_info, "file": writer.faiss_path.name, "recall_at_10": recall}
