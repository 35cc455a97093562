"""The index build job: corpus (+ pairs) → shard tasks (CLIP + MiniLM vectors, run by an engine) →
consolidated arrays → a search backend per key kind → recall → calibration → regression head → phrases.

Memory stays flat in the corpus size: prompts stream through one shard at a time (only the 8-byte dedup
hashes accumulate), and the search backend is filled from the memory-mapped vectors in chunks. Each shard is
committed to the manifest once written, so `resume=True` skips the finished shards after checking that the
corpus still yields exactly the same prompts for them and that their files are intact.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

from img2prompt.build_index.corpus import (CorpusReport, check_corpus_files, count_rows,
                                           expand_corpus_paths, file_fingerprint, iter_prompt_rows, iter_prompts)
from img2prompt.index.calibration import fit_calibration
from img2prompt.build_index.engine import BuildEngine, engine_class
from img2prompt.build_index.job import JobContext, LoadedModels, PhaseTimer, peak_rss_mib, prepare_job, run_job
from img2prompt.build_index.options import DEFAULT_SHARD_SIZE, BuildOptions  # noqa: F401 (their old home)
from img2prompt.build_index.pairs import SKIP_UNREADABLE_IMAGE, check_pair_files, expand_pair_paths, iter_pairs
from img2prompt.build_index.phrases import mine_phrases
from img2prompt.build_index.precomputed import check_against_model, misaligned, open_precomputed
from img2prompt.build_index.result import BuildResult
from img2prompt.index.ridge import RidgeAccumulator
from img2prompt.build_index.shard_encoder import EncoderSpec, ShardEncoder
from img2prompt import storage
from img2prompt.errors import UserError
from img2prompt.memory import max_workers
from img2prompt.index.backend import backend_class
from img2prompt.build_index.shards import plan_shards
from img2prompt.index.layout import IMAGE_KEYS, IMAGE_KEYS_FOLDER, KEY_PCA, REGRESSION, REGRESSION_STATS, TEXT_KEYS
from img2prompt.index.manifest import KeyRange
from img2prompt.index.writer import IndexWriter, ShardTask
from img2prompt.index.plan import plan_index
from img2prompt.index.recall import RECALL_TARGET, measure_recall
from img2prompt.encoders.clip_ensemble import load_named_clips
from img2prompt.encoders.devices import parse_devices
from img2prompt.encoders.models import load_text_model, resolve_device
from img2prompt.encoders.precision import announce_models, build_key_precision, check_precision
from img2prompt.build_index.replicas import check_build_devices, load_build_replicas
from img2prompt.progress import progress_bar

from img2prompt.index.key_pca import check_key_dims, reduce_keys

log = logging.getLogger(__name__)


def precision_of(device, precision: str | None = None) -> str:
    """What the CLIP vectors are computed in: part of the resume key (and so of the manifest's build record),
    so a build never mixes precisions; the defaults keep the names older builds wrote."""
    return build_key_precision(device, precision)


def run_build(options: BuildOptions) -> BuildResult:
    """Check everything the arguments and the files can refuse, load the models, then run the BuildJob."""
    if storage.is_url(options.out):  # build in a local staging folder, then upload, manifest last
        from img2prompt.build_index.remote_out import build_to_url

        return build_to_url(options, run_build)
    check_build_options(options)
    engine = engine_class(options.engine).from_options(options)  # an engine's missing extra fails here, early
    paths, pair_paths = build_inputs(options)
    timer = PhaseTimer()
    devices = parse_devices(options.device)
    device = resolve_device(options.device)
    check_build_devices(options)  # several devices run in this process: not with --engine ray
    models = load_build_models(options, devices, device, timer)
    total_rows = count_rows(paths + pair_paths)
    precomputed = None
    if options.embeddings:
        precomputed = open_precomputed(options.embeddings)
        exact = all(path.suffix.lower() in (".txt", ".parquet") for path in paths)  # CSV counts are estimates
        check_against_model(precomputed, models.clip.dim, total_rows if exact else None)
    build_key = {"models": models.identities, "precision": precision_of(device, options.precision),
                 "batch_size": options.batch_size,
                 "corpus": [file_fingerprint(path) for path in paths],
                 "embeddings": [file_fingerprint(path) for path in precomputed.files] if precomputed else None,
                 "column": options.column, "shard_size": options.shard_size, "max_chars": options.max_chars,
                 **({"pairs": [file_fingerprint(path) for path in pair_paths]} if pair_paths else {})}
    context = prepare_job(options, build_key, models, device, timer, engine=engine, paths=paths,
                          pair_paths=pair_paths, total_rows=total_rows, precomputed=precomputed)
    return run_job(BuildJob, context)


def build_inputs(options: BuildOptions) -> tuple[list[Path], list[Path]]:
    """(corpus files, pair tables), each readable with the columns it needs, or a one-line refusal."""
    paths = expand_corpus_paths(options.corpus) if options.corpus else []
    pair_paths = expand_pair_paths(options.pairs) if options.pairs else []
    if not paths and not pair_paths:
        raise UserError("nothing to index: give corpus files, --pairs files, or both")
    if options.embeddings and pair_paths:
        raise UserError("--embeddings gives CLIP text vectors for the corpus; it cannot be combined with --pairs")
    check_corpus_files(paths, options.column)
    check_pair_files(pair_paths)
    return paths, pair_paths


def load_build_models(options: BuildOptions, devices, device, timer: PhaseTimer) -> LoadedModels:
    """The models a build encodes with (one MiniLM per device of a multi-device --device), announced in one
    line; a --key-dims the CLIP width cannot take is refused before any corpus row is encoded."""
    with timer.phase("load_models"):
        clip = load_named_clips(options.clip_model, options.clip_pretrained, device, precision=options.precision)
        text_model = load_text_model(options.text_model, device)
        text_replicas = load_build_replicas(options, clip, text_model)  # --device cuda:0,cuda:1: one per GPU
    announce_models(devices, options.precision)  # the one line saying where the models run
    if options.key_dims is not None:
        check_key_dims(options.key_dims, clip.dim)
    return LoadedModels(clip, text_model, {"clip": clip.identity(), "text": text_model.identity()}, text_replicas)


def check_build_options(options: BuildOptions) -> None:
    """The numbers in the options, refused in one line before any file is read or model loaded."""
    if options.shard_size <= 0 or options.batch_size <= 0:
        raise UserError("--shard-size and --batch-size must be positive")
    # tokenizing processes hold both tokenizers each (~250 MiB): more than cores only cost memory
    if options.workers is not None and options.workers < 0:
        raise UserError(f"--workers must be 0 or more (got {options.workers})")
    if options.workers is not None and options.workers > max_workers():
        raise UserError(f"--workers must be at most {max_workers()}, the cores here (got {options.workers})")
    if options.max_chars <= 0:
        raise UserError(f"--max-chars must be at least 1 (got {options.max_chars})")
    if options.key_dims is not None and options.key_dims < 1:
        raise UserError(f"--key-dims must be at least 1 (got {options.key_dims})")
    if options.key_dims is not None and (options.pairs or (not isinstance(options.clip_model, str)
                                                            and len(options.clip_model) != 1)):
        raise UserError("--key-dims works with one CLIP model and text keys only (not --pairs nor several models) "
                        "for now")
    check_precision(options.precision)
    if options.minilm_dtype not in ("fp16", "int8"):
        raise UserError(f"--minilm-dtype must be fp16 or int8 (got {options.minilm_dtype!r})")
    if options.near_dup is not None and not 0 < options.near_dup <= 1:
        raise UserError(f"--near-dup must be in (0, 1] (got {options.near_dup})")


def plan_tasks(paths, pair_paths, corpus: CorpusReport, pairs: CorpusReport, options: BuildOptions,
               precomputed: bool, known: tuple | None = None) -> Iterator[ShardTask]:
    """Text-keyed shard tasks, then the image-keyed ones numbered after them (all text keys come first).
    `known`: (dedup keys, skip reason) of prompts not to index again (an add: the index's own)."""
    prompts = (iter_prompt_rows if precomputed else iter_prompts)(paths, options.column, corpus, options.max_chars,
                                                                   known)
    after = 0
    for task in plan_shards(prompts, options.shard_size):
        after = task.number + 1
        yield task
    yield from plan_shards(iter_pairs(pair_paths, pairs, options.max_chars), options.shard_size, first_number=after)


class BuildJob:
    """One build, read as its phases: `steps()` names them in order (optional ones only when asked for), each
    step a method that reads and writes the job's state; `run()` runs them and commits the manifest last,
    unless a step set `outcome` (the job's result without a commit)."""

    def __init__(self, context: JobContext) -> None:
        self.context = context  # the parts every step reads, by their names (build_index/job.py)
        self.options, self.writer, self.engine, self.timer = context.options, context.writer, context.engine, \
            context.timer
        self.encoder, self.spec, self.models, self.device = context.encoder, context.spec, context.models, \
            context.device
        self.paths, self.pair_paths, self.total_rows = context.paths, context.pair_paths, context.total_rows
        self.report: dict = {}
        self.encoded_rows = self.count = 0
        self.key_ranges: list[KeyRange] = []
        self.files: tuple[str, ...] = ()
        self.extra: dict = {}
        self.memory: dict = {}
        self.outcome: BuildResult | None = None  # set by a step that ends the job early (add: nothing new)

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        steps = [("encode", self.encode)] + ([("near_dup", self.near_dup)] if self.options.near_dup else [])
        steps.append(("consolidate", self.consolidate))
        if self.options.key_dims is not None:  # before every step that reads the keys
            steps.append(("key_pca", self.reduce_keys))
        steps += [("search", self.search_backends),
                 ("calibration", self.calibrate)]  # calibration only acts with image-keyed entries
        if self.options.regression and self.options.key_dims is None:  # the head maps full-width keys
            steps.append(("regression", self.regression_head))
        steps.append(("phrases", self.phrases))
        if self.options.minilm_dtype == "int8":  # last: the steps before read minilm.f16
            steps.append(("compact", self.compact_minilm))
        return steps

    def run(self) -> BuildResult:
        for name, step in self.steps():
            log.debug("%s step: %s", type(self).__name__, name)
            step()
            if self.outcome is not None:
                return self.outcome
        return self.commit()

    # -- the phases -------------------------------------------------------------------------------------
    def encode(self) -> None:
        corpus, pairs = CorpusReport(), CorpusReport()
        precomputed = self.encoder.precomputed
        tasks = plan_tasks(self.paths, self.pair_paths, corpus, pairs, self.options, bool(precomputed))
        self.report, self.encoded_rows = encode_shards(self.writer, self.engine, self.encoder, self.spec, tasks,
                                                       corpus, self.options, self.timer,
                                                       total_rows=self.total_rows, pairs=pairs)
        if precomputed and corpus.read != precomputed.rows:
            raise misaligned(precomputed.rows, corpus.read)
        self.memory["peak_rss_mib_after_encode"] = peak_rss_mib()

    def near_dup(self) -> None:
        from img2prompt.build_index.near_dup import shard_keep_masks
        with self.timer.phase("near_dup"):
            self.writer.keep, stats = shard_keep_masks(self.writer, self.options.near_dup)
        self.report["skipped"]["near_duplicate"] = stats.dropped
        self.report["kept"] -= stats.dropped
        self.extra["near_dup"] = stats.manifest()

    def consolidate(self) -> None:
        with self.timer.phase("consolidate"):
            self.count, _, _ = self.writer.consolidate()

    def search_backends(self) -> None:
        self.key_ranges, self.files = build_search_backends(self.writer, self.options, self.timer)

    def calibrate(self) -> None:
        if len(self.key_ranges) > 1:
            with self.timer.phase("calibration"):
                self.extra["calibration"] = calibrate_key_kinds(self.writer, self.key_ranges, self.encoder.clip,
                                                                self.options)

    def regression_head(self) -> None:
        with self.timer.phase("regression"):
            self.extra["regression"] = fit_regression_head(self.writer, self.key_ranges, self.options)
        self.files += (REGRESSION, REGRESSION_STATS)

    def phrases(self) -> None:
        with self.timer.phase("phrases"):
            self.extra["phrases"], phrase_files = build_phrases(self.writer, self.encoder.clip, self.options)
        self.files += phrase_files

    def reduce_keys(self) -> None:
        with self.timer.phase("key_pca"):
            self.extra["key_pca"] = reduce_keys(self.writer, self.options.key_dims, self.options.seed)

    def compact_minilm(self) -> None:
        with self.timer.phase("compact"):
            self.extra["minilm"] = self.writer.compact_minilm(seed=self.options.seed)

    def commit(self) -> BuildResult:
        """The manifest, written last: the index exists from this moment, whole."""
        self.memory["peak_rss_mib_at_end"] = peak_rss_mib()
        timings = self.timer.rounded()
        encode_seconds = timings.get("encode_clip", 0) + timings.get("encode_minilm", 0)
        options = self.options
        manifest = self.writer.complete({
            "count": self.count,
            "metric": "inner_product",
            "models": self.models,
            "search": self.key_ranges[0].plan,
            "key_ranges": [key_range.as_dict() for key_range in self.key_ranges],
            **self.extra,
            "corpus": self.report,
            "build_options": {"batch_size": options.batch_size, "device": str(self.device), "index": options.index,
                              "max_memory": options.max_memory, "seed": options.seed},
            "timings_s": timings,
            "rates": {"prompts_per_s": round(self.encoded_rows / encode_seconds, 1)
                      if self.encoded_rows and encode_seconds else None, "encoded_now": self.encoded_rows},
            "memory": self.memory,
        }, self.files + ((KEY_PCA,) if "key_pca" in self.extra else ()))
        log.debug("built %s: %d prompts", Path(options.out), self.count)  # the summary is the caller's to print
        return BuildResult(manifest=manifest, report=self.report, timings=timings)


def encode_shards(writer: IndexWriter, engine: BuildEngine, encoder: ShardEncoder, spec: EncoderSpec,
                  tasks: Iterator[ShardTask], corpus: CorpusReport, options: BuildOptions, timer: PhaseTimer,
                  total_rows: int | None = None, pairs: CorpusReport | None = None) -> tuple[dict, int]:
    """Have the engine encode every shard task without a valid committed record, committing each record as
    it finishes (any order); returns (corpus report, rows encoded). The bar moves per encoded batch (the
    engine reports rows as they go) and by a whole shard for one already committed (a resume).

    Committed shards (a resume) are re-read from the corpus only to check they are unchanged, and their
    files are checked against the recorded sha256: a damaged one is encoded again.
    """
    truncated_total = encoded = planned = 0
    pairs = pairs if pairs is not None else CorpusReport()
    # A context manager, so that an error is printed below a closed bar, not onto its line.
    with progress_bar(enabled=options.progress, total=total_rows, unit="row", desc="encode") as bar:

        def to_encode() -> Iterator[ShardTask]:
            nonlocal truncated_total, planned
            for task in tasks:
                planned = task.number + 1
                if writer.is_committed(task):
                    truncated_total += writer.records[task.number]["clip_truncated"]
                    bar.update(len(task.prompts))
                else:
                    yield task

        for record, seconds in engine.run(to_encode(), encoder, spec, writer.root, bar.update):
            writer.commit_shard(record)
            for phase, value in seconds.items():
                timer.seconds[phase] += value
            truncated_total += record["clip_truncated"]
            encoded += record["count"]
        bar.update(max(0, (total_rows or 0) - bar.n))  # rows skipped (duplicates, empty, …) were never encoded
    if any(number >= planned for number in writer.records):
        raise UserError(f"{options.out}: cannot resume, the corpus (or --pairs) now gives fewer entries than were "
                        "indexed; rerun with --overwrite")
    report = {**corpus.as_dict(), "clip_truncated": truncated_total}
    if pairs.files:
        unreadable = sum(record.get("skipped", {}).get(SKIP_UNREADABLE_IMAGE, 0)
                         for record in writer.records.values())
        pairs.skipped[SKIP_UNREADABLE_IMAGE] += unreadable
        pairs.kept -= unreadable
        report["pairs"] = pairs.as_dict()
    return report, encoded


def build_phrases(writer: IndexWriter, clip, options: BuildOptions) -> tuple[dict, tuple[str, ...]]:
    """Mine the modifier vocabulary from the consolidated prompts and store it with its CLIP vectors."""
    mined = mine_phrases((prompt for batch in writer.iter_prompt_batches() for prompt in batch),
                         min_count=options.phrase_min_count)
    phrases = [phrase for phrase, _ in mined]
    vectors = clip.text_embeddings(phrases, options.batch_size).vectors
    files = writer.save_phrases(phrases, [count for _, count in mined], vectors)
    return {"count": len(phrases), "min_count": options.phrase_min_count}, files


def build_search_backends(writer: IndexWriter, options: BuildOptions,
                          timer: PhaseTimer) -> tuple[list[KeyRange], tuple[str, ...]]:
    """A search backend per key kind (text keys in the folder itself, image keys in image_keys/), each
    planned for its own size; returns the key ranges and the backend files (relative paths)."""
    vectors = writer.vectors("clip")
    key_ranges, files = [], ()
    for kind, (start, stop) in writer.key_rows().items():
        folder = "" if kind == TEXT_KEYS else IMAGE_KEYS_FOLDER
        (writer.root / folder).mkdir(exist_ok=True)
        plan, names = build_search_backend(vectors[start:stop], writer.root / folder, options, timer, kind)
        key_ranges.append(KeyRange(kind, start, stop, plan, folder))
        files += tuple(f"{folder}/{name}" if folder else name for name in names)
    return key_ranges, files


def build_search_backend(vectors, folder: Path, options: BuildOptions, timer: PhaseTimer,
                         kind: str = TEXT_KEYS) -> tuple[dict, tuple]:
    """Build the planned search backend over `vectors` into `folder`, tune and measure its recall."""
    count, clip_dim = vectors.shape
    asked = options.index
    if kind != TEXT_KEYS and asked != "auto" and count < backend_class(asked).min_count:
        asked = "auto"  # --index is for the corpus; a small image-keyed range cannot train that kind
    try:
        plan = plan_index(count, clip_dim, asked, options.max_memory)
    except UserError as exc:  # known only now that the corpus is counted: the encoding is not lost
        raise UserError(f"{exc}. The encoded shards are kept: rerun the same build with --resume and another "
                        "--index or --max-memory") from exc
    log.info("%s keys: index %s (%s), about %.1f MiB", kind, plan.kind, plan.reason, plan.estimated_bytes / 2**20)
    backend_cls = backend_class(plan.kind)
    with timer.phase("build_index"):
        # A kind without files of its own (flat) builds nothing: a bar would show an instant, meaningless rate.
        shown = options.progress and bool(backend_cls.files())
        with progress_bar(enabled=shown, total=count, unit="vec", desc=f"index {plan.kind}") as bar:
            backend = backend_cls.build(vectors, plan.params, folder, seed=options.seed, progress=bar.update)
    with timer.phase("recall"):
        # Tunes the search settings (efSearch; nprobe + re-rank depth) on one query set, reports on another.
        recall = measure_recall(backend, queries=options.recall_queries, seed=options.seed, target=RECALL_TARGET)
    if recall["recall"] < RECALL_TARGET:
        log.warning("recall@%d of the %s index is %.3f (< %.2f): consider --index flat or a larger "
                    "--max-memory", recall["k"], plan.kind, recall["recall"], RECALL_TARGET)
    info = {**plan.as_dict(), "params": dict(backend.params), "recall_at_10": recall}
    return info, backend_cls.files()


def calibrate_key_kinds(writer: IndexWriter, key_ranges: list[KeyRange], clip, options: BuildOptions) -> dict:
    """Fit the image keys' score map (index/calibration.py) on sample image-keyed rows."""
    rows = {key_range.keys: (key_range.start, key_range.stop) for key_range in key_ranges}
    calibration = fit_calibration(
        writer.vectors("clip"), writer.vectors("minilm"), rows[TEXT_KEYS], rows[IMAGE_KEYS],
        prompts_of=writer.prompt_rows, seed=options.seed,
        encode_texts=lambda texts: clip.text_embeddings(texts, options.batch_size).vectors)
    for query_kind, fit in calibration["fits"].items():
        if fit["method"] == "none":
            log.warning("too few image-keyed rows with distinct prompts to calibrate their scores for %s queries "
                        "(%s points): image keys keep raw cosines, which outrank text keys; add more pairs",
                        query_kind, fit["points"])
    return calibration


REGRESSION_CHUNK = 65_536  # rows read from the memory maps at a time
HELDOUT_ROWS = 10_000  # about this many rows choose the ridge penalty


def ridge_accumulator(key_dim: int, target_dim: int, count: int) -> RidgeAccumulator:
    """The head's accumulator for an index of `count` rows: about HELDOUT_ROWS of them held out (every stride-th)."""
    return RidgeAccumulator(key_dim, target_dim, stride=max(20, -(-count // HELDOUT_ROWS)), max_heldout=HELDOUT_ROWS)


def fit_regression_head(writer: IndexWriter, key_ranges: list[KeyRange], options: BuildOptions) -> dict:
    """Fit the ridge head on every key (streamed), save it, and return its manifest entry."""
    clip, minilm = writer.vectors("clip"), writer.vectors("minilm")
    accumulator = ridge_accumulator(clip.shape[1], minilm.shape[1], len(clip))
    for key_range in key_ranges:
        for start in range(key_range.start, key_range.stop, REGRESSION_CHUNK):
            stop = min(start + REGRESSION_CHUNK, key_range.stop)
            accumulator.add(clip[start:stop], minilm[start:stop], first_row=start, modality=key_range.keys)
    head = accumulator.fit()
    head.save(writer.root / REGRESSION)
    accumulator.save_state(writer.root / REGRESSION_STATS)
    return head.info()
