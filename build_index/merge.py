"""`img2prompt merge A B ... --out C`: several complete indexes (same models) into one, as a build stage.

Why it is add's machinery: every input's rows are already encoded, so merge copies them in as shards --
deduplicated across inputs by build's dedup key, first index wins -- with ids renumbered from 0 in input
order, then runs build's own steps after consolidate (search structure of the first index's kind, head,
phrases). Nothing is re-encoded; the CLIP model is loaded only for the phrase vocabulary and is checked
against the manifests first. The output is written through IndexWriter (staging folder, manifest last).

Each input is opened once, up front: its manifest, vectors and prompt files are opened together (open_index
maps and opens them all; the manifest is read again after, and a folder swapped in meanwhile is opened
again), and every row is read from those open files. A rebuild swapped into an input's folder during the
merge (`build --overwrite`) cannot pair its prompts with the old vectors: the merge reads the old index.

The compact layout (issue 31):
    int8 MiniLM   any int8 input makes the output int8; rows are carried per row as their input stored them
                  (int8 + scale), float16 rows quantised per row as a build does, so a merged int8 index equals
                  an int8 build of the same prompts byte for byte (the mean from the inputs' means).
    --key-dims    inputs with one projection keep their projected keys; full-width inputs beside them are
                  projected through it, with its recall@10 re-measured on their full-width keys (recorded in
                  the manifest's key_pca and the report). Different projections cannot be re-projected (no
                  full-width keys are kept): refused. `key_dims=` refits a PCA over full-width inputs' merged keys.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from img2prompt.atomic import write_atomic
from img2prompt.build_index.add import describe, load_index_models, manifest_clip_models
from img2prompt.build_index.corpus import CorpusReport
from img2prompt.build_index.job import JobContext, PhaseTimer, peak_rss_mib, prepare_job, run_job
from img2prompt.build_index.options import MergeOptions, as_build, index_settings  # MergeOptions: imported from here
from img2prompt.build_index.runner import BuildJob, BuildResult, encode_shards
from img2prompt.encoders.models import resolve_device
from img2prompt.encoders.prompts import dedup_keys
from img2prompt.errors import UserError
from img2prompt.index.key_pca import KeyPCA, check_key_dims, reduced_recall, save_pca
from img2prompt.index.layout import KEY_PCA, MINILM_MEAN, TEXT_KEYS
from img2prompt.index.manifest import content_sha256, read_manifest
from img2prompt.index.minilm_store import INT8, Int8Rows, dequantise, minilm_dtype, quantise
from img2prompt.index.prompt_keys import FirstSeen
from img2prompt.index.reader import PromptIndex, open_index
from img2prompt.index.recall import RECALL_TARGET
from img2prompt.index.segments import ConcatRows
from img2prompt.index.writer import IndexWriter, ShardTask, save_shard, save_shard_int8

log = logging.getLogger(__name__)

SKIP_IN_EARLIER = "duplicate_of_earlier_index"  # a row an earlier input already holds
OPEN_TRIES = 3  # an input whose folder keeps being swapped while it is opened is refused after this many


def open_input(index: str) -> PromptIndex:
    """The input opened once, every file at the same time (open_index maps the vectors and opens the prompt
    files); the manifest read again afterwards tells whether a rebuild was swapped in meanwhile (then the
    folder is opened again: its files could be half old, half new)."""
    root = Path(index)
    for _ in range(OPEN_TRIES):
        before = read_manifest(root) if root.is_dir() else None
        try:
            opened = open_index(root)
        except (UserError, OSError, ValueError) as exc:  # e.g. the old manifest's rows mapped onto new files
            if before is not None and read_manifest(root) != before:
                log.warning("%s changed while it was opened (a rebuild swapped in?): opening it again", index)
                continue
            if isinstance(exc, UserError):
                raise
            raise UserError(f"{index}: not readable ({exc}): the index is damaged, rebuild it") from exc
        if read_manifest(root) == opened.manifest:
            return opened
        log.warning("%s changed while it was opened (a rebuild swapped in?): opening it again", index)
    raise UserError(f"{index}: the index keeps changing while merge opens it (a rebuild swapping it?): "
                    "retry when that is done")


def check_merge_inputs(options: MergeOptions) -> list[PromptIndex]:
    """Refuse in one line, before any work: too few inputs, out among them, an incomplete or unsupported
    input, inputs built with different models. Returns the inputs, opened (open_input)."""
    if len(options.indexes) < 2:
        raise UserError("merge needs at least two indexes")
    out = Path(options.out).resolve()
    for index in options.indexes:
        if Path(index).resolve() == out:
            raise UserError(f"{index}: --out must not be one of the merged indexes (write a new folder)")
    inputs = [open_input(index) for index in options.indexes]
    for index, opened in zip(options.indexes, inputs):
        if any(entry.get("keys") != TEXT_KEYS for entry in opened.manifest.get("key_ranges", [])):
            raise UserError(f"{index}: merge of an index with image-keyed entries (--pairs) is not supported yet: "
                            "rebuild")
    first = inputs[0].manifest["models"]
    for index, opened in zip(options.indexes[1:], inputs[1:]):
        for kind in ("clip", "text"):
            if opened.manifest["models"][kind] != first[kind]:
                raise UserError(f"{index}: built with {kind} model {describe(opened.manifest['models'][kind])}, "
                                f"but {options.indexes[0]} with {describe(first[kind])}: merge needs the same models")
    return inputs


@dataclass
class KeyPlan:
    """How the inputs' keys meet: `pca` is the output's projection when inputs hold projected keys (None:
    full-width keys, or a PCA refitted by build's own step); `project[i]`: input i's keys go through it."""
    pca: KeyPCA | None = None
    project: list[bool] = field(default_factory=list)


def plan_keys(names: list[str], inputs: list[PromptIndex], key_dims: int | None) -> KeyPlan:
    """One projection for the merged keys, or a one-line refusal naming why there cannot be one."""
    pcas = [opened.key_pca for opened in inputs]
    projected = [(name, pca) for name, pca in zip(names, pcas) if pca is not None]
    if key_dims is not None:
        check_key_dims(key_dims, inputs[0].clip_dim)
        if projected:
            raise UserError(f"{projected[0][0]}: holds only PCA-projected keys (built with --key-dims): a refit "
                            "of the PCA (--key-dims) needs every input's full-width keys; merge without --key-dims")
        return KeyPlan(None, [False] * len(inputs))
    if not projected:
        return KeyPlan(None, [False] * len(inputs))
    first_name, first = projected[0]
    for name, pca in projected[1:]:
        if pca.components.shape != first.components.shape or not np.array_equal(pca.components, first.components):
            raise UserError(f"{name}: built with another --key-dims projection than {first_name}, and neither keeps "
                            "its full-width keys, so they cannot be re-projected onto one: rebuild the parts with "
                            "one projection (or merge full-width parts with --key-dims)")
    return KeyPlan(first, [pca is None for pca in pcas])


def int8_slice(rows, start: int, stop: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows [start, stop) of an int8 MiniLM store as stored (int8, scale), across segments; None for fp16."""
    parts = rows.parts if isinstance(rows, ConcatRows) else [rows]
    if not isinstance(parts[0], Int8Rows):
        return None
    quantised, scales, first = [], [], 0
    for part in parts:
        low, high = max(start - first, 0), min(stop - first, len(part))
        if low < high:
            quantised.append(np.asarray(part.quantised[low:high]))
            scales.append(np.asarray(part.scale[low:high]))
        first += len(part)
    return np.concatenate(quantised), np.concatenate(scales)


@dataclass
class InputRows:
    """One batch of an input's rows, in id order: prompts, keys (as stored), MiniLM rows (float16 or dequantised
    int8) and, for an int8 input, the stored (int8, scale)."""
    prompts: list[str]
    clip: np.ndarray
    minilm: np.ndarray
    int8: tuple[np.ndarray, np.ndarray] | None


def iter_rows(index: PromptIndex, batch: int) -> Iterator[InputRows]:
    """An opened input's rows in batches, every piece from the files open_input opened."""
    start = 0
    for prompts in index.stream_prompt_batches(batch):
        stop = start + len(prompts)
        raw = int8_slice(index.minilm, start, stop)
        minilm = np.asarray(index.minilm[start:stop]) if raw is None else dequantise(*raw)
        yield InputRows(prompts, np.asarray(index.clip_vectors[start:stop]), minilm, raw)
        start = stop


class ShardFiller:
    """Kept rows gathered into shards of `size` rows (the last one shorter); each is saved and committed unless
    a resumed merge committed it already (checked by its prompts' and files' checksums)."""

    def __init__(self, writer: IndexWriter, size: int, int8: bool) -> None:
        self.writer, self.size, self.int8 = writer, size, int8
        self.prompts: list[str] = []
        self.blocks: dict[str, list[np.ndarray]] = {"clip": [], "minilm": [], "int8": [], "scale": []}
        self.number = self.first_id = 0

    def add(self, prompts: list[str], arrays: dict[str, np.ndarray]) -> Iterator[ShardTask]:
        self.prompts += prompts
        for name, array in arrays.items():
            self.blocks[name].append(array)
        while len(self.prompts) >= self.size:
            yield self.flush(self.size)

    def finish(self) -> Iterator[ShardTask]:
        if self.prompts:
            yield self.flush(len(self.prompts))

    def flush(self, rows: int) -> ShardTask:
        joined = {name: np.concatenate(blocks) for name, blocks in self.blocks.items() if blocks}
        task = ShardTask(number=self.number, first_id=self.first_id, prompts=self.prompts[:rows])
        if not self.writer.is_committed(task):
            record = save_shard(self.writer.root, task, joined["clip"][:rows], joined["minilm"][:rows])
            if self.int8:
                record["files"].update(save_shard_int8(self.writer.root, task.number, joined["int8"][:rows],
                                                       joined["scale"][:rows]))
            self.writer.commit_shard(record)
        self.prompts = self.prompts[rows:]
        self.blocks = {name: [array[rows:]] if name in joined else [] for name, array in
                       ((name, joined.get(name)) for name in self.blocks)}
        self.number, self.first_id = self.number + 1, self.first_id + rows
        return task


class InputSums:
    """One input's share of the merged MiniLM mean, as close to a build's (a sum of the float16 rows) as its
    storage allows: a float16 input sums its kept rows, as a build; an int8 input has no float16 rows, so its
    stored mean · count (taken over them) less the dropped rows, or the kept rows when fewer are kept -- the
    quantisation error of whichever is fewer is all that remains."""

    def __init__(self) -> None:
        self.kept = self.dropped = None
        self.counts = [0, 0]
        self.int8 = False

    def add(self, rows: InputRows, keep: list[int], kept_rows: np.ndarray) -> None:
        dropped = np.setdiff1d(np.arange(len(rows.prompts)), keep)
        self.int8 = rows.int8 is not None
        kept_sum = kept_rows.astype(np.float64).sum(axis=0)
        dropped_sum = rows.minilm[dropped].astype(np.float64).sum(axis=0)
        self.kept = kept_sum if self.kept is None else self.kept + kept_sum
        self.dropped = dropped_sum if self.dropped is None else self.dropped + dropped_sum
        self.counts = [self.counts[0] + len(keep), self.counts[1] + len(dropped)]

    def total(self, opened: PromptIndex) -> np.ndarray | float:
        if self.kept is None:
            return 0.0
        if not self.int8 or self.counts[0] <= self.counts[1]:
            return self.kept
        return opened.minilm_mean.astype(np.float64) * opened.count - self.dropped


class MergeJob(BuildJob):
    """A BuildJob whose encode step copies the inputs' rows (deduplicated) in as shards; nothing is encoded."""

    def __init__(self, context: JobContext, *, inputs: list[PromptIndex], plan: KeyPlan) -> None:
        super().__init__(context)
        self.inputs, self.plan = inputs, plan
        self.int8 = self.options.minilm_dtype == INT8
        # an int8 input's rows are not its float16 rows: the mean comes from the inputs' means (by count)
        int8_inputs = any(minilm_dtype(opened.manifest) == INT8 for opened in inputs)
        self.mean_sum = np.zeros(inputs[0].text_dim, np.float64) if int8_inputs else None

    def steps(self):
        steps = super().steps()
        if "regression" not in self.inputs[0].manifest or self.plan.pca is not None:  # the head maps full width
            steps = [step for step in steps if step[0] != "regression"]
        if self.plan.pca is not None:  # before every step that reads the keys, as build's own PCA step
            steps.insert([name for name, _ in steps].index("consolidate") + 1, ("key_pca", self.copy_projection))
        return steps

    def kept(self, number: int, rows: InputRows, keep: list[int]) -> dict[str, np.ndarray]:
        """The kept rows' arrays for the shards: keys projected where the plan says, int8 rows as stored (or
        quantised per row from float16, as a build does); the MiniLM mean's sum follows."""
        arrays = {"clip": rows.clip[keep], "minilm": rows.minilm[keep]}
        if self.plan.project[number]:
            arrays["clip"] = self.plan.pca.project(arrays["clip"]).astype(np.float16)
        if self.int8:
            arrays["int8"], arrays["scale"] = ((rows.int8[0][keep], rows.int8[1][keep]) if rows.int8 is not None
                                               else quantise(arrays["minilm"]))
        if self.mean_sum is not None:
            self.input_sums.add(rows, keep, arrays["minilm"])
        return arrays

    def encode(self) -> None:
        corpus = CorpusReport(files=[str(opened.root) for opened in self.inputs])
        per_input: list[dict] = []

        def tasks() -> Iterator[ShardTask]:
            seen = FirstSeen()  # the inputs' stored sorted keys, memory-mapped: nothing held a prompt
            filler = ShardFiller(self.writer, self.options.shard_size, self.int8)
            for number, opened in enumerate(self.inputs):
                entry = {"index": str(opened.root), "count": opened.count, "duplicates": 0}
                self.input_sums = InputSums()
                seen.start(opened)
                for rows in iter_rows(opened, self.options.shard_size):
                    keep = np.flatnonzero(seen.add_new(dedup_keys(rows.prompts))).tolist()
                    corpus.kept += len(keep)
                    if len(rows.prompts) > len(keep):
                        corpus.skipped[SKIP_IN_EARLIER] += len(rows.prompts) - len(keep)
                    corpus.read += len(rows.prompts)
                    entry["duplicates"] += len(rows.prompts) - len(keep)
                    yield from filler.add([rows.prompts[row] for row in keep], self.kept(number, rows, keep))
                if self.mean_sum is not None:
                    self.mean_sum += self.input_sums.total(opened)
                per_input.append(entry)
            yield from filler.finish()

        self.report, self.encoded_rows = encode_shards(self.writer, self.engine, self.encoder, self.spec, tasks(),
                                                       corpus, self.options, self.timer)
        self.report["merged"] = per_input
        self.extra["merged_from"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "indexes": per_input}
        self.memory["peak_rss_mib_after_encode"] = peak_rss_mib()

    def consolidate(self) -> None:
        super().consolidate()
        if self.mean_sum is not None:
            mean = (self.mean_sum / max(self.count, 1)).astype(np.float32)
            write_atomic(self.writer.root / MINILM_MEAN, lambda handle: np.save(handle, mean, allow_pickle=False))

    def copy_projection(self) -> None:
        """The inputs' one projection saved with the merged keys, and its manifest section (key_pca)."""
        with self.timer.phase("key_pca"):
            save_pca(self.writer.root / KEY_PCA, self.plan.pca)
            self.extra["key_pca"] = self.report["key_pca"] = projection_section(self.inputs, self.plan,
                                                                                 self.options.seed)

    def compact_minilm(self) -> None:
        with self.timer.phase("compact"):
            section = self.writer.compact_minilm(seed=self.options.seed, from_shards=True)
        section["int8_inputs"] = [str(opened.root) for opened in self.inputs if minilm_dtype(opened.manifest) == INT8]
        self.extra["minilm"] = section


def projection_section(inputs: list[PromptIndex], plan: KeyPlan, seed: int, queries: int = 500) -> dict:
    """The merged index's key_pca section. Inputs that all hold projected keys: their projection's own figures
    (recall@10 the lowest any input measured). Full-width inputs projected through it: recall@10 re-measured
    on their full-width keys (held-out queries: rows the PCA was not fitted on), a warning below target."""
    sections = [opened.manifest["key_pca"] for opened in inputs if "key_pca" in opened.manifest]
    base = {key: sections[0][key] for key in ("dims", "key_dim", "fit_rows", "seed") if key in sections[0]}
    full = [opened for opened, project in zip(inputs, plan.project) if project]
    if not full:
        return {**base, "recall_at_10": min(float(section["recall_at_10"]) for section in sections),
                "queries": int(sum(section.get("queries", 0) for section in sections)),
                "held_out": all(section.get("held_out", False) for section in sections),
                "merged": "one projection shared by every input: recall@10 as the inputs measured it (the lowest)"}
    rng = np.random.default_rng(seed)
    measured = []
    for opened in full:
        rows = np.sort(rng.choice(opened.count, size=min(queries, opened.count), replace=False))
        recall = reduced_recall(opened.clip_vectors, np.asarray(opened.clip_vectors[rows], np.float32), plan.pca)
        measured.append({"index": str(opened.root), "recall_at_10": recall, "queries": int(len(rows))})
    total = sum(entry["queries"] for entry in measured)
    recall = sum(entry["recall_at_10"] * entry["queries"] for entry in measured) / max(total, 1)
    if recall < RECALL_TARGET:
        log.warning("the merged keys' PCA (%d dims) keeps recall@10 %.3f against full-width search on the "
                    "full-width inputs' keys, below the target %.2f", plan.pca.dims, recall, RECALL_TARGET)
    return {**base, "recall_at_10": recall, "queries": total, "held_out": True,
            "merged": "full-width inputs projected through the inputs' PCA: recall@10 re-measured on their keys",
            "remeasured": measured}


def run_merge(options: MergeOptions) -> BuildResult:
    """Check and open every input, load the models (identity-checked against the inputs), then merge into
    options.out."""
    if options.shard_size <= 0:
        raise UserError("--shard-size must be positive")
    inputs = check_merge_inputs(options)
    plan = plan_keys(options.indexes, inputs, options.key_dims)
    manifests = [opened.manifest for opened in inputs]
    if options.clip_model is None:
        options = dataclasses.replace(options, **manifest_clip_models(manifests[0]))
    device = resolve_device(options.device)
    timer = PhaseTimer()
    models, precision = load_index_models(options, inputs[0].root, manifests[0], device, timer)
    build = as_build(options, corpus=[], out=options.out, clip_model=options.clip_model, precision=precision,
                     minilm_dtype=INT8 if any(minilm_dtype(m) == INT8 for m in manifests) else "fp16",
                     **index_settings(manifests[0]))
    # The resume key: the very inputs (their prompts' checksums) in order, the models, the shard size.
    build_key = {"merge_of": [content_sha256(manifest) for manifest in manifests], "models": models.identities,
                 "shard_size": options.shard_size,
                 **({"key_dims": options.key_dims} if options.key_dims is not None else {})}
    # a resume of a merge killed after its final manifest returns that index (its leftovers cleaned)
    context = prepare_job(build, build_key, models, device, timer)
    return run_job(MergeJob, context, inputs=inputs, plan=plan)
