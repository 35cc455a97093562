"""`img2prompt merge A B ... --out C`: several complete indexes (same models) into one, as a build stage.

Why it is add's machinery: every input's rows are already encoded, so merge copies them in as shards --
deduplicated across inputs by build's dedup key, first index wins -- with ids renumbered from 0 in input
order, then runs build's own steps after consolidate (search structure of the first index's kind, head,
phrases). Nothing is re-encoded; the CLIP model is loaded only for the phrase vocabulary and is checked
against the manifests first. The output is written through IndexWriter (staging folder, manifest last).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from img2prompt.build_index.add import check_index, describe, load_index_models, manifest_clip_models
from img2prompt.build_index.corpus import CorpusReport
from img2prompt.build_index.engine import engine_class
from img2prompt.build_index.runner import BuildJob, BuildOptions, BuildResult, PhaseTimer, encode_shards, peak_rss_mib
from img2prompt.build_index.shard_encoder import EncoderSpec, ShardEncoder
from img2prompt.encoders.models import resolve_device
from img2prompt.encoders.prompts import KeySet, dedup_keys
from img2prompt.errors import UserError
from img2prompt.index.manifest import content_sha256
from img2prompt.index.minilm_store import FP16, minilm_dtype
from img2prompt.index.reader import open_index
from img2prompt.index.writer import IndexWriter, ShardTask, save_shard

SKIP_IN_EARLIER = "duplicate_of_earlier_index"  # a row an earlier input already holds


@dataclass
class MergeOptions:
    indexes: list[str]
    out: str
    clip_model: str | list[str] | None = None  # where the inputs' CLIP weights are here (phrases; None: as the
    # first input's manifest names them); the identity must match
    clip_pretrained: str | list[str | None] | None = None
    text_model: str | None = None
    device: str = "auto"
    shard_size: int = 100_000
    overwrite: bool = False
    resume: bool = False
    progress: bool = True


def check_merge_inputs(options: MergeOptions) -> list[dict]:
    """Refuse in one line, before any work: too few inputs, out among them, an incomplete or unsupported
    input (add's own checks), inputs built with different models. Returns the manifests in order."""
    if len(options.indexes) < 2:
        raise UserError("merge needs at least two indexes")
    out = Path(options.out).resolve()
    for index in options.indexes:
        if Path(index).resolve() == out:
            raise UserError(f"{index}: --out must not be one of the merged indexes (write a new folder)")
    manifests = [check_index(Path(index), "merge of", image_keys=False) for index in options.indexes]
    for index, manifest in zip(options.indexes, manifests):
        if "key_pca" in manifest or minilm_dtype(manifest) != FP16:  # merge copies full-width fp16 rows
            raise UserError(f"{index}: merge of an index built with --key-dims or --minilm-dtype int8 is not "
                            "supported yet: build one index from the corpora")
    first = manifests[0]["models"]
    for index, manifest in zip(options.indexes[1:], manifests[1:]):
        for kind in ("clip", "text"):
            if manifest["models"][kind] != first[kind]:
                raise UserError(f"{index}: built with {kind} model {describe(manifest['models'][kind])}, but "
                                f"{options.indexes[0]} with {describe(first[kind])}: merge needs the same models")
    return manifests


def iter_rows(root: Path, batch: int) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """An index's prompts in batches with their vectors (memory-mapped slices, across its segments)."""
    index = open_index(root)
    start = 0
    for prompts in index.stream_prompt_batches(batch):
        yield prompts, index.clip_vectors[start:start + len(prompts)], index.minilm[start:start + len(prompts)]
        start += len(prompts)


class MergeJob(BuildJob):
    """A BuildJob whose encode step copies the inputs' rows (deduplicated) in as shards; nothing is encoded."""

    def __init__(self, *args, roots: list[Path], manifests: list[dict], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.roots, self.manifests = roots, manifests

    def steps(self):
        steps = super().steps()
        if "regression" not in self.manifests[0]:
            steps = [step for step in steps if step[0] != "regression"]
        return steps

    def encode(self) -> None:
        corpus = CorpusReport(files=[str(root) for root in self.roots])
        per_input: list[dict] = []

        def tasks() -> Iterator[ShardTask]:
            seen = KeySet()  # sorted 8-byte keys: 8 bytes a kept prompt
            size = self.options.shard_size
            prompts: list[str] = []
            clips: list[np.ndarray] = []
            minilms: list[np.ndarray] = []
            number = first_id = 0

            def flush(rows: int) -> ShardTask:
                nonlocal prompts, clips, minilms, number, first_id
                clip, minilm = np.concatenate(clips), np.concatenate(minilms)
                task = ShardTask(number=number, first_id=first_id, prompts=prompts[:rows])
                if not self.writer.is_committed(task):
                    self.writer.commit_shard(save_shard(self.writer.root, task, clip[:rows], minilm[:rows]))
                prompts, clips, minilms = prompts[rows:], [clip[rows:]], [minilm[rows:]]
                number, first_id = number + 1, first_id + rows
                return task

            for root, manifest in zip(self.roots, self.manifests):
                entry = {"index": str(root), "count": int(manifest["count"]), "duplicates": 0}
                for batch, clip, minilm in iter_rows(root, size):
                    keep = np.flatnonzero(seen.add_new(dedup_keys(batch))).tolist()
                    corpus.kept += len(keep)
                    if len(batch) > len(keep):
                        corpus.skipped[SKIP_IN_EARLIER] += len(batch) - len(keep)
                    corpus.read += len(batch)
                    entry["duplicates"] += len(batch) - len(keep)
                    prompts += [batch[row] for row in keep]
                    clips.append(np.asarray(clip)[keep])
                    minilms.append(np.asarray(minilm)[keep])
                    while len(prompts) >= size:
                        yield flush(size)
                per_input.append(entry)
            if prompts:
                yield flush(len(prompts))

        self.report, self.encoded_rows = encode_shards(self.writer, self.engine, self.encoder, self.spec, tasks(),
                                                       corpus, self.options, self.timer)
        self.report["merged"] = per_input
        self.extra["merged_from"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "indexes": per_input}
        self.memory["peak_rss_mib_after_encode"] = peak_rss_mib()


def run_merge(options: MergeOptions) -> BuildResult:
    """Check every input, load the models (identity-checked against the inputs), then merge into options.out."""
    if options.shard_size <= 0:
        raise UserError("--shard-size must be positive")
    manifests = check_merge_inputs(options)
    if options.clip_model is None:
        options = dataclasses.replace(options, **manifest_clip_models(manifests[0]))
    roots = [Path(index) for index in options.indexes]
    device = resolve_device(options.device)
    timer = PhaseTimer()
    clip, text_model, models = load_index_models(options, roots[0], manifests[0], device, timer)
    first = manifests[0]
    build = BuildOptions(corpus=[], out=options.out, clip_model=options.clip_model,
                         clip_pretrained=options.clip_pretrained, text_model=options.text_model,
                         device=options.device, shard_size=options.shard_size,
                         index=first.get("search", {}).get("kind", "auto"),
                         max_memory=first.get("build_options", {}).get("max_memory"), resume=options.resume,
                         overwrite=options.overwrite, progress=options.progress,
                         seed=first.get("build_options", {}).get("seed", 0), regression="regression" in first)
    # The resume key: the very inputs (their prompts' checksums) in order, the models, the shard size.
    build_key = {"merge_of": [content_sha256(manifest) for manifest in manifests], "models": models,
                 "shard_size": options.shard_size}
    engine = engine_class("local").from_options(build)
    writer = IndexWriter(options.out, build_key, resume=options.resume, overwrite=options.overwrite)
    encoder = ShardEncoder(clip, text_model, 1, None)
    spec = EncoderSpec(options.clip_model, options.clip_pretrained, options.text_model, str(device), 1, None, models)
    try:
        return MergeJob(writer, engine, encoder, spec, [], [], models, device, 0, build, timer,
                        roots=roots, manifests=manifests).run()
    finally:
        writer.close()
