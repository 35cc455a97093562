"""`img2prompt add`: grow a complete index with new prompts, as a build stage.

Why a rebuild beside the index: a complete index is consolidated (its shards are gone) and its search
structure, head, calibration and phrases all summarise every row. So add writes the grown index in the
writer's staging folder (.NAME.rebuild): the old rows are copied in as the first shards (ids unchanged), the
new prompts -- normalised, deduplicated against the index and each other -- are encoded with the index's OWN
models as the shards after them (ids continue), then the usual build steps run and the finished folder is
swapped in. The old index stays whole and readable until that swap: a kill loses nothing committed, and
`resume=True` finishes an interrupted add to the identical result (the shards are the resume key).
"""
from __future__ import annotations

import dataclasses

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from img2prompt.build_index.corpus import (DEFAULT_MAX_CHARS, CorpusReport, check_corpus_files, count_rows,
                                           expand_corpus_paths, file_fingerprint, iter_prompts)
from img2prompt.build_index.engine import engine_class
from img2prompt.build_index.runner import (BuildJob, BuildOptions, BuildResult, PhaseTimer, encode_shards,
                                           peak_rss_mib, precision_of)
from img2prompt.build_index.shard_encoder import EncoderSpec, ShardEncoder
from img2prompt.build_index.shards import plan_shards
from img2prompt.encoders.clip_ensemble import load_named_clips
from img2prompt.encoders.models import load_text_model, resolve_device
from img2prompt.encoders.prompts import dedup_key
from img2prompt.errors import UserError
from img2prompt.index.layout import CLIP_VECTORS, MINILM, PROMPTS, STATE_COMPLETE, TEXT_KEYS, VECTOR_DTYPE
from img2prompt.index.manifest import read_manifest
from img2prompt.index.minilm_store import FP16, minilm_dtype
from img2prompt.index.writer import IndexWriter, ShardTask, save_shard

log = logging.getLogger(__name__)

SKIP_IN_INDEX = "duplicate_of_index"  # a new prompt the index already holds


@dataclass
class AddOptions:
    index: str
    corpus: list[str]
    clip_model: str | list[str] | None = None  # where the index's CLIP weights are here (None: as the manifest
    # names them); the identity must match the manifest
    clip_pretrained: str | list[str | None] | None = None
    text_model: str | None = None
    column: str = "prompt"
    batch_size: int = 256
    device: str = "auto"
    shard_size: int = 100_000
    max_chars: int = DEFAULT_MAX_CHARS
    resume: bool = False
    progress: bool = True


def check_add_options(options: AddOptions) -> dict:
    """Refuse in one line what the arguments and the index can refuse; returns the index's manifest."""
    if options.shard_size <= 0 or options.batch_size <= 0:
        raise UserError("--shard-size and --batch-size must be positive")
    root = Path(options.index)
    manifest = read_manifest(root) if root.is_dir() else None
    if not manifest or manifest.get("state") != STATE_COMPLETE:
        raise UserError(f"{root}: not a complete index (build it first with `img2prompt build`)")
    if any(entry.get("keys") != TEXT_KEYS for entry in manifest.get("key_ranges", [])):
        raise UserError(f"{root}: add to an index with image-keyed entries (--pairs) is not supported yet: rebuild")
    if "key_pca" in manifest or minilm_dtype(manifest) != FP16:  # add copies full-width fp16 rows
        raise UserError(f"{root}: add to an index built with --key-dims or --minilm-dtype int8 is not supported yet: "
                        "rebuild it with the new prompts")
    return manifest


def check_models(root: Path, manifest: dict, models: dict) -> None:
    """The index's own models, or a one-line refusal naming both identities (before any encoding)."""
    for kind in ("clip", "text"):
        have, want = models[kind], manifest["models"][kind]
        if have != want:
            raise UserError(f"{root}: the index was built with {kind} model {describe(want)}, but "
                            f"{describe(have)} was given: add needs the index's own models")


def load_index_models(options, root: Path, manifest: dict, device, timer: PhaseTimer) -> tuple:
    """(clip, text_model, identities) an add or a merge encodes with, checked against the index's `manifest`."""
    with timer.phase("load_models"):
        clip = load_named_clips(options.clip_model, options.clip_pretrained, device)
        text_model = load_text_model(options.text_model, device)
    models = {"clip": clip.identity(), "text": text_model.identity()}
    check_models(root, manifest, models)
    return clip, text_model, models


def manifest_clip_models(manifest: dict) -> dict:
    """clip_model / clip_pretrained as the index's manifest names them (one entry per ensemble member)."""
    built = manifest["models"]["clip"]
    members = built.get("members") or [built]
    return {"clip_model": [member["name"] for member in members],
            "clip_pretrained": [member.get("pretrained") for member in members]}


def describe(identity) -> str:
    if isinstance(identity, dict):
        sha = identity.get("sha256") or identity.get("weights_sha256") or ""
        return f"{identity.get('name', '?')}" + (f" (sha256 {str(sha)[:12]})" if sha else "")
    return str(identity)


def iter_old_tasks(root: Path, count: int, shard_size: int) -> Iterator[tuple[ShardTask, np.ndarray, np.ndarray]]:
    """The index's rows cut into shard tasks (with their vectors, memory-mapped): the first shards of the add."""
    clip_dim = (root / CLIP_VECTORS).stat().st_size // (count * np.dtype(VECTOR_DTYPE).itemsize)
    text_dim = (root / MINILM).stat().st_size // (count * np.dtype(VECTOR_DTYPE).itemsize)
    clip = np.memmap(root / CLIP_VECTORS, dtype=VECTOR_DTYPE, mode="r", shape=(count, clip_dim))
    minilm = np.memmap(root / MINILM, dtype=VECTOR_DTYPE, mode="r", shape=(count, text_dim))
    number, start = 0, 0
    for batch in pq.ParquetFile(root / PROMPTS).iter_batches(columns=["prompt"], batch_size=shard_size):
        prompts = batch.column(0).to_pylist()
        stop = start + len(prompts)
        yield ShardTask(number=number, first_id=start, prompts=prompts), clip[start:stop], minilm[start:stop]
        number, start = number + 1, stop


class AddJob(BuildJob):
    """A BuildJob whose encode step first copies the index's rows in, then encodes only the new prompts."""

    def __init__(self, *args, old_root: Path, old_manifest: dict, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.old_root, self.old_manifest = old_root, old_manifest

    def steps(self):
        steps = super().steps()
        if "regression" not in self.old_manifest:
            steps = [step for step in steps if step[0] != "regression"]
        return steps

    def encode(self) -> None:
        count = int(self.old_manifest["count"])
        seen: set[int] = set()
        corpus = CorpusReport()

        def old_then_new() -> Iterator[ShardTask]:
            # The index's rows first, committed as they are copied (a resume finds them committed and checked),
            # then the new prompts numbered after them; encode_shards skips every committed shard.
            old_shards = 0
            for task, clip, minilm in iter_old_tasks(self.old_root, count, self.options.shard_size):
                seen.update(dedup_key(prompt) for prompt in task.prompts)
                if not self.writer.is_committed(task):
                    self.writer.commit_shard(save_shard(self.writer.root, task, np.asarray(clip),
                                                        np.asarray(minilm)))
                old_shards = task.number + 1
                yield task
            yield from plan_shards(new_prompts(), self.options.shard_size, first_number=old_shards)

        def new_prompts() -> Iterator[str]:
            for prompt in iter_prompts(self.paths, self.options.column, corpus, self.options.max_chars):
                if dedup_key(prompt) in seen:
                    corpus.kept -= 1
                    corpus.skipped[SKIP_IN_INDEX] += 1
                else:
                    yield prompt

        self.report, self.encoded_rows = encode_shards(self.writer, self.engine, self.encoder, self.spec,
                                                       old_then_new(), corpus, self.options, self.timer)
        self.report["added"] = self.writer.rows_committed() - count
        self.extra["history"] = list(self.old_manifest.get("history", [])) + [{
            "added_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "count": self.report["added"],
            "duplicates_of_index": corpus.skipped.get(SKIP_IN_INDEX, 0),
            "files": [str(path) for path in self.paths], "count_before": count}]
        self.memory["peak_rss_mib_after_encode"] = peak_rss_mib()


def run_add(options: AddOptions) -> BuildResult:
    """Check, load the index's models (identity-checked), then grow the index; returns the new manifest."""
    old_manifest = check_add_options(options)
    if options.clip_model is None:
        options = dataclasses.replace(options, **manifest_clip_models(old_manifest))
    root = Path(options.index)
    paths = expand_corpus_paths(options.corpus)
    check_corpus_files(paths, options.column)
    device = resolve_device(options.device)
    timer = PhaseTimer()
    clip, text_model, models = load_index_models(options, root, old_manifest, device, timer)
    plan = old_manifest.get("search", {})
    build = BuildOptions(corpus=[str(path) for path in paths], out=str(root), clip_model=options.clip_model,
                         clip_pretrained=options.clip_pretrained, text_model=options.text_model,
                         column=options.column, batch_size=options.batch_size, device=options.device,
                         shard_size=options.shard_size, index=plan.get("kind", "auto"),
                         max_memory=old_manifest.get("build_options", {}).get("max_memory"),
                         resume=options.resume, max_chars=options.max_chars, progress=options.progress,
                         seed=old_manifest.get("build_options", {}).get("seed", 0),
                         regression="regression" in old_manifest)
    # The resume key: the very index being grown (its prompts' checksum), the new files, the encode settings.
    build_key = {"add_to": old_manifest["files"][PROMPTS]["sha256"], "models": models,
                 "precision": precision_of(device), "batch_size": options.batch_size,
                 "corpus": [file_fingerprint(path) for path in paths], "column": options.column,
                 "shard_size": options.shard_size, "max_chars": options.max_chars}
    engine = engine_class("local").from_options(build)
    writer = IndexWriter(root, build_key, resume=options.resume, overwrite=True)
    encoder = ShardEncoder(clip, text_model, options.batch_size, None)
    spec = EncoderSpec(options.clip_model, options.clip_pretrained, options.text_model, str(device),
                       options.batch_size, None, models)
    try:
        return AddJob(writer, engine, encoder, spec, paths, [], models, device, count_rows(paths), build, timer,
                      old_root=root, old_manifest=old_manifest).run()
    finally:
        writer.close()
