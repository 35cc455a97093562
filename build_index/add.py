"""`img2prompt add`: grow a complete index with new prompts; the cost follows the new rows, not the index.

The new prompts -- normalised, deduplicated against the index and each other -- are encoded with the
index's OWN models (identity-checked) into shards in the writer's staging folder (.NAME.rebuild). Then
index/append.py links the index's row files in (hard links: no copy) and writes the new rows as the next
segment (ids continue), and the derived files are updated from what the index keeps:

    search     flat/torch: nothing to build; HNSW / IVF-PQ: the new keys added to the trained structure
               (SearchBackend.grow), recall@10 measured again on held-out queries, a warning below the build's
               target; `retrain=True` rebuilds (and for IVF-PQ retrains) the structure over every row.
               An index with image keys (--pairs) keeps its ranges and gets one range per key kind for the
               new rows (their backend planned for their own count, in the segment's folder): its text rows
               are no longer contiguous. The image-key calibration is fitted when the first image keys arrive
               and otherwise kept (it was fitted on the index's first ranges, which an add does not change)
    head       the ridge head refitted from its sufficient statistics (regression_stats.npz) + the new rows
    phrases    the vocabulary's counts merged with the new prompts' (build_index/phrases.py)
    mean       the MiniLM mean updated by count

New (image, prompt) pairs (`pairs=`) are image-keyed rows after the new text rows, as in a build; their
images are not deduplicated against the index (it keeps no image paths), only within the new tables.

The finished folder is swapped in (old or new, never a mix; readers holding the old index keep it). A kill
loses nothing committed: `resume=True` re-uses the encoded shards and finishes to the identical result.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np

from img2prompt.build_index.corpus import (CorpusReport, check_corpus_files, count_rows, expand_corpus_paths,
                                           file_fingerprint)
from img2prompt.build_index.job import JobContext, LoadedModels, PhaseTimer, peak_rss_mib, prepare_job, run_job
from img2prompt.build_index.options import AddOptions, as_build, index_settings  # AddOptions: also imported from here
from img2prompt.build_index.pairs import check_pair_files, expand_pair_paths
from img2prompt.build_index.phrases import MIN_COUNT, merge_phrases
from img2prompt.build_index.runner import (BuildJob, BuildResult, build_search_backend, encode_shards, plan_tasks,
                                           precision_of, ridge_accumulator)
from img2prompt.encoders.clip_ensemble import load_named_clips
from img2prompt.encoders.models import load_text_model, resolve_device
from img2prompt.encoders.precision import announce_models, index_precision
from img2prompt.errors import UserError
from img2prompt.index.append import AppendedRows, append_segment, link_file
from img2prompt.index.backend import backend_class
from img2prompt.index.calibration import fit_calibration
from img2prompt.index.layout import (IMAGE_KEYS, IMAGE_KEYS_FOLDER, MANIFEST, PHRASES, REGRESSION, REGRESSION_STATS,
                                     STATE_COMPLETE, TEXT_KEYS)
from img2prompt.index.manifest import KeyRange, content_sha256, read_manifest, validate_complete
from img2prompt.index.prompt_keys import IndexKeys
from img2prompt.index.reader import PromptIndex, open_index
from img2prompt.index.recall import RECALL_TARGET, measure_recall
from img2prompt.index.ridge import RidgeAccumulator, read_state
from img2prompt.progress import progress_bar

log = logging.getLogger(__name__)

SKIP_IN_INDEX = "duplicate_of_index"  # a new prompt the index already holds
CHUNK = 65_536  # rows read at a time when the head is refitted


def check_index(root: Path, verb: str = "add to", image_keys: bool = True) -> dict:
    """A complete index this kind of growth supports, or one line saying why not; returns its manifest."""
    manifest = read_manifest(root) if root.is_dir() else None
    if not manifest or manifest.get("state") != STATE_COMPLETE:
        raise UserError(f"{root}: not a complete index (build it first with `img2prompt build`)")
    validate_complete(root / MANIFEST, manifest)  # before any field is read (models, build_options, history)
    if not image_keys and any(entry.get("keys") != TEXT_KEYS for entry in manifest.get("key_ranges", [])):
        raise UserError(f"{root}: {verb} an index with image-keyed entries (--pairs) is not supported yet: rebuild")
    return manifest


def check_add_options(options: AddOptions) -> dict:
    """Refuse in one line what the arguments and the index can refuse; returns the index's manifest."""
    if options.shard_size <= 0 or options.batch_size <= 0:
        raise UserError("--shard-size and --batch-size must be positive")
    if options.near_dup is not None and not 0 < options.near_dup <= 1:
        raise UserError(f"--near-dup must be in (0, 1] (got {options.near_dup})")
    return check_index(Path(options.index))


def check_models(root: Path, manifest: dict, models: dict) -> None:
    """The index's own models, or a one-line refusal naming both identities (before any encoding)."""
    for kind in ("clip", "text"):
        have, want = models[kind], manifest["models"][kind]
        if have != want:
            raise UserError(f"{root}: the index was built with {kind} model {describe(want)}, but "
                            f"{describe(have)} was given: add needs the index's own models")


def load_index_models(options, root: Path, manifest: dict, device, timer: PhaseTimer) -> tuple[LoadedModels, str]:
    """(models, precision) an add or a merge encodes with, checked against the index's `manifest`; the towers
    run in the precision the index was built in (new rows never mix bf16 into fp32)."""
    precision = index_precision((manifest.get("build") or {}).get("precision"))
    with timer.phase("load_models"):
        clip = load_named_clips(options.clip_model, options.clip_pretrained, device, precision=precision)
        text_model = load_text_model(options.text_model, device)
    announce_models([device], precision)  # the command's one line: where the models run
    models = {"clip": clip.identity(), "text": text_model.identity()}
    check_models(root, manifest, models)
    return LoadedModels(clip, text_model, models), precision


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


class AddJob(BuildJob):
    """A BuildJob over the new prompts only, whose later steps extend the index's files instead of rebuilding."""

    def __init__(self, context: JobContext, *, old: PromptIndex, retrain: bool = False) -> None:
        super().__init__(context)
        self.old, self.retrain = old, retrain
        self.appended: AppendedRows | None = None

    def steps(self):
        steps = [("encode", self.encode)] + ([("near_dup", self.near_dup)] if self.options.near_dup else [])
        steps += [("nothing_new", self.stop_if_nothing_new), ("append", self.append)]
        if "key_pca" in self.old.manifest:  # before the search, which indexes the (maybe re-projected) keys
            steps.append(("key_pca", self.key_pca))
        steps += [("search", self.grow_search), ("calibration", self.calibrate)]
        if REGRESSION in self.old.manifest["files"]:
            steps.append(("regression", self.refit_head))
        if PHRASES in self.old.manifest["files"]:
            steps.append(("phrases", self.merge_phrases))
        return steps

    def stop_if_nothing_new(self) -> None:
        """The corpus holds nothing new (and no retrain was asked): the job ends here, the index left exactly
        as it was."""
        if self.report["added"] == 0 and not self.retrain:
            self.writer.abandon()
            log.info("%s: nothing new to add (%d prompts already in the index)", self.old.root,
                     self.report["skipped"].get(SKIP_IN_INDEX, 0))
            self.outcome = BuildResult(manifest=self.old.manifest, report=self.report, timings=self.timer.rounded())

    def encode(self) -> None:
        # each segment's stored sorted keys, memory-mapped (else computed: append stores them)
        seen = self.index_keys = IndexKeys.of_index(self.old)
        corpus, pairs = CorpusReport(), CorpusReport()
        tasks = plan_tasks(self.paths, self.pair_paths, corpus, pairs, self.options, False, known=(seen, SKIP_IN_INDEX))
        self.report, self.encoded_rows = encode_shards(self.writer, self.engine, self.encoder, self.spec, tasks,
                                                       corpus, self.options, self.timer, total_rows=self.total_rows,
                                                       pairs=pairs)
        self.report["added"] = self.writer.rows_committed()
        self.extra["history"] = list(self.old.manifest.get("history", [])) + [{
            "added_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "count": self.report["added"],
            "duplicates_of_index": corpus.skipped.get(SKIP_IN_INDEX, 0),
            "files": [str(path) for path in self.paths + self.pair_paths], "count_before": self.old.count,
            **({"retrained": True} if self.retrain else {})}]
        self.memory["peak_rss_mib_after_encode"] = peak_rss_mib()

    def near_dup(self) -> None:
        """build --near-dup among the new prompts (first kept wins), each also against the index's text rows
        (which all count as kept): one sharded pass over the index's and the new MiniLM rows, read from disk
        (build_index/near_dup.py: time linear in the rows, no per-row state in RAM but the keep mask)."""
        from img2prompt.build_index.near_dup import RowWindow, shard_keep_masks
        from img2prompt.index.segments import concat_rows

        windows = [RowWindow(self.old.minilm, r.start, r.stop) for r in self.old.key_ranges if r.keys == TEXT_KEYS]
        with self.timer.phase("near_dup"):
            masks, stats = shard_keep_masks(self.writer, self.options.near_dup,
                                            before=concat_rows(windows) if windows else None)
            self.writer.keep = masks
        self.report["skipped"]["near_duplicate"] = stats.dropped
        self.report["kept"] -= stats.dropped
        self.report["added"] = self.writer.rows_committed()
        self.extra["history"][-1].update(count=self.report["added"], near_dup=stats.manifest())

    def append(self) -> None:
        with self.timer.phase("append"):
            self.appended = append_segment(self.writer, self.old, self.index_keys.computed)
        self.index_keys = None  # stored now where they were computed; the steps after need no keys
        self.count = self.appended.grown.count
        self.files += self.appended.new_files + self.appended.keys_written

    def key_pca(self) -> None:
        """An index built with --key-dims: its PCA measured again over the grown index, or with --retrain refitted
        over every row (build_index/add_key_pca.py)."""
        from img2prompt.build_index.add_key_pca import refit_key_pca, remeasure_key_pca

        new_keys = list(self.writer.iter_shard_arrays("clip"))
        section = self.old.manifest["key_pca"]

        def encode(prompts: list[str]) -> np.ndarray:
            return self.encoder.clip.text_embeddings(prompts, self.options.batch_size).vectors

        with self.timer.phase("key_pca"):
            if self.retrain:
                self.extra["key_pca"], names, self.appended.grown = refit_key_pca(
                    self.writer.root, self.appended.grown, self.old, new_keys, encode, section, self.options.progress)
                for name in names:  # rewritten here: hashed at commit, no longer the old index's links
                    self.appended.linked.pop(name, None)
                self.files += tuple(name for name in names if name not in self.files)
            else:
                self.extra["key_pca"] = remeasure_key_pca(section, self.old.key_pca, self.old, new_keys,
                                                          self.appended.first_id, encode, self.options.seed)

    def grow_search(self) -> None:
        """Extend the search: a text-only index grows its one range (or rebuilds it with retrain) by the new
        text rows; image-keyed rows, and every new row of an index that already has image keys, become ranges
        of their own with a backend planned for their size."""
        grown, first = self.appended.grown, self.appended.first_id
        old_ranges = self.old.key_ranges
        new_rows = [(kind, first + start, first + stop) for kind, (start, stop) in self.writer.key_rows().items()] \
            if self.report["added"] else []
        if len(old_ranges) == 1 and old_ranges[0].keys == TEXT_KEYS:
            text_stop = max([stop for kind, _, stop in new_rows if kind == TEXT_KEYS], default=self.old.count)
            self.key_ranges = [self._grow_range(old_ranges[0], text_stop)]
            new_rows = [row for row in new_rows if row[0] != TEXT_KEYS]
        else:  # the index's ranges stay as they are: their backend files are linked in with the rows
            self.key_ranges = list(old_ranges)
            for key_range in old_ranges:
                for name in backend_class(key_range.plan["kind"]).files():
                    name = f"{key_range.folder}/{name}" if key_range.folder else name
                    link_file(self.old.root / name, self.writer.root / name)
                    self.appended.linked[name] = self.old.manifest["files"][name]
        folder = self.appended.new_files[0].rsplit("/", 1)[0] if self.appended.new_files else ""
        for kind, start, stop in new_rows:
            sub = folder if kind == TEXT_KEYS else f"{folder}/{IMAGE_KEYS_FOLDER}"
            (self.writer.root / sub).mkdir(parents=True, exist_ok=True)
            asked = self.options.index  # the index's kind, unless the new rows are too few to train it
            options = self.options if asked == "auto" or stop - start >= backend_class(asked).min_count else \
                dataclasses.replace(self.options, index="auto")
            plan, names = build_search_backend(grown.clip_vectors[start:stop], self.writer.root / sub,
                                               options, self.timer, kind)
            self.key_ranges.append(KeyRange(kind, start, stop, plan, sub))
            self.files += tuple(f"{sub}/{name}" for name in names)

    def _grow_range(self, key_range: KeyRange, stop: int) -> KeyRange:
        """The index's one text range extended to `stop` (its structure grown, or rebuilt with retrain)."""
        grown = self.appended.grown
        vectors = grown.clip_vectors[key_range.start:stop]
        folder = self.writer.root / key_range.folder
        plan = dict(key_range.plan)
        kind = backend_class(plan["kind"])
        if self.retrain and kind.files():
            plan, names = build_search_backend(vectors, folder, self.options, self.timer)
        else:
            with self.timer.phase("build_index"):
                old_backend = self.old.open_backend("cpu", key_range)
                shown = self.options.progress and bool(kind.files())
                with progress_bar(enabled=shown, total=len(vectors) - key_range.count, unit="vec",
                                  desc=f"add to {plan['kind']}") as bar:
                    backend = old_backend.grow(vectors, folder, progress=bar.update)
            names = kind.files()
            if names:
                plan = {**plan, "recall_at_10": self._remeasure(backend, plan)}
            plan["params"] = dict(backend.params)
            backend.close()
        self.files += tuple(f"{key_range.folder}/{name}" if key_range.folder else name for name in names)
        return KeyRange(key_range.keys, key_range.start, stop, plan, key_range.folder)

    def calibrate(self) -> None:
        """The first image keys an index receives need the score map a build fits for them."""
        if "calibration" in self.old.manifest or not any(r.keys == IMAGE_KEYS for r in self.key_ranges):
            return
        grown = self.appended.grown
        rows = {}
        for key_range in self.key_ranges:
            rows.setdefault(key_range.keys, (key_range.start, key_range.stop))
        with self.timer.phase("calibration"):
            self.extra["calibration"] = fit_calibration(
                grown.clip_vectors, grown.minilm, rows[TEXT_KEYS], rows[IMAGE_KEYS], prompts_of=grown.prompt_rows,
                seed=self.options.seed,
                encode_texts=lambda texts: self.encoder.clip.text_embeddings(texts, self.options.batch_size).vectors)

    def _remeasure(self, backend, plan: dict) -> dict:
        with self.timer.phase("recall"):
            recall = measure_recall(backend, queries=self.options.recall_queries, seed=self.options.seed,
                                    target=RECALL_TARGET)
        before = (plan.get("recall_at_10") or {}).get("recall")
        if recall["recall"] < RECALL_TARGET:
            log.warning("recall@%d of the grown %s index is %.3f (< %.2f%s): add again with --retrain to rebuild "
                        "the structure over every row", recall["k"], plan["kind"], recall["recall"], RECALL_TARGET,
                        f"; it was {before:.3f} when built" if before is not None else "")
        return {**recall, "before_add": before}

    def refit_head(self) -> None:
        """The ridge head from its saved sums plus the new rows (an index built before the sums were kept:
        every row once)."""
        grown, first = self.appended.grown, self.appended.first_id
        clip, minilm = grown.clip_vectors, grown.minilm
        stats = self.old.root / REGRESSION_STATS
        with self.timer.phase("regression"):
            if REGRESSION_STATS in self.old.manifest["files"]:
                accumulator = RidgeAccumulator.load_state(stats, clip, minilm)
            else:
                log.info("%s predates kept regression statistics: refitting the head over every row once",
                         self.old.root)
                accumulator, first = ridge_accumulator(clip.shape[1], minilm.shape[1], grown.count), 0
            for key_range in self.key_ranges:  # the rows from `first` on, each with its key kind
                for start in range(max(first, key_range.start), key_range.stop, CHUNK):
                    stop = min(start + CHUNK, key_range.stop)
                    accumulator.add(clip[start:stop], minilm[start:stop], first_row=start, modality=key_range.keys)
            head = accumulator.fit()
            head.save(self.writer.root / REGRESSION)
            accumulator.save_state(self.writer.root / REGRESSION_STATS)
        self.extra["regression"] = head.info()
        self.files += (REGRESSION, REGRESSION_STATS)

    def merge_phrases(self) -> None:
        """The vocabulary's counts plus the new prompts'; only phrases it did not hold are encoded."""
        first = self.appended.first_id
        with self.timer.phase("phrases"):
            old_phrases, old_vectors = self.old.phrases
            old_counts = self.old.phrase_counts()
            new_prompts = self.appended.grown.prompt_rows(np.arange(first, self.appended.grown.count))
            min_count = (self.old.manifest.get("phrases") or {}).get("min_count", MIN_COUNT)
            merged = merge_phrases(zip(old_phrases, old_counts), new_prompts, min_count=min_count)
            position = {phrase: row for row, phrase in enumerate(old_phrases)}
            phrases = [phrase for phrase, _ in merged]
            unseen = [phrase for phrase in phrases if phrase not in position]
            encoded = self.encoder.clip.text_embeddings(unseen, self.options.batch_size).vectors if unseen else None
            fresh = {phrase: row for row, phrase in enumerate(unseen)}
            vectors = np.stack([old_vectors[position[p]] if p in position else encoded[fresh[p]] for p in phrases]) \
                if phrases else np.zeros((0, self.old.clip_dim), np.float16)
            self.files += self.writer.save_phrases(phrases, [count for _, count in merged], vectors)
        self.extra["phrases"] = {"count": len(phrases), "min_count": min_count, "merged": True}

    def commit(self) -> BuildResult:
        carried = {key: value for key, value in self.old.manifest.items()
                   if key in ("metric", "models", "calibration", "key_pca", "minilm", "near_dup", "build_options")}
        timings = self.timer.rounded()
        self.memory["peak_rss_mib_at_end"] = peak_rss_mib()
        manifest = self.writer.complete({
            **carried, "count": self.count, "search": self.key_ranges[0].plan,
            "key_ranges": [key_range.as_dict() for key_range in self.key_ranges],
            # none yet (a retrain of a never-grown index adds no rows): no key, as a build writes it; an empty
            # list is refused by the manifest's schema, which would leave the index unreadable
            **({"segments": self.appended.segments} if self.appended.segments else {}), **self.extra,
            "corpus": self.old.manifest.get("corpus", {}), "timings_s": timings,
            "rates": {"encoded_now": self.encoded_rows}, "memory": self.memory,
        }, self.files, linked=self.appended.linked)
        return BuildResult(manifest=manifest, report=self.report, timings=timings)


def run_add(options: AddOptions) -> BuildResult:
    """Check, load the index's models (identity-checked), then grow the index; returns the new manifest."""
    # resolved once: the grown folder is staged beside the real one and swapped with it (a symlink stays one)
    options = dataclasses.replace(options, index=os.path.realpath(options.index))
    old_manifest = check_add_options(options)
    if options.clip_model is None:
        options = dataclasses.replace(options, **manifest_clip_models(old_manifest))
    root = Path(options.index)
    paths = expand_corpus_paths(options.corpus) if options.corpus else []
    pair_paths = expand_pair_paths(options.pairs) if options.pairs else []
    if not paths and not pair_paths and not options.retrain:
        raise UserError("nothing to add: give corpus files, --pairs files, or both")
    if pair_paths and "key_pca" in old_manifest:  # as build refuses --key-dims with --pairs
        raise UserError(f"{root}: --pairs on an index built with --key-dims is not supported (its PCA maps text "
                        "keys): rebuild it without --key-dims to add image-keyed entries")
    check_corpus_files(paths, options.column)
    check_pair_files(pair_paths)
    old = open_index(root)
    if REGRESSION_STATS in old_manifest["files"]:  # a damaged or lying file: one line before any encoding
        read_state(root / REGRESSION_STATS, old.count, old.clip_vectors.shape[1], old.text_dim)
    device = resolve_device(options.device)
    timer = PhaseTimer()
    models, precision = load_index_models(options, root, old_manifest, device, timer)
    # overwrite: the grown index replaces the old one (staged beside it, swapped in)
    build = as_build(options, corpus=[str(path) for path in paths], out=str(root), clip_model=options.clip_model,
                     overwrite=True, precision=precision, **index_settings(old_manifest))
    # The resume key: the very index being grown (its files' checksums), the new files, the encode settings.
    build_key = {"add_to": content_sha256(old_manifest), "models": models.identities, "retrain": options.retrain,
                 "precision": precision_of(device, precision), "batch_size": options.batch_size,
                 "corpus": [file_fingerprint(path) for path in paths], "column": options.column,
                 "shard_size": options.shard_size, "max_chars": options.max_chars, "near_dup": options.near_dup,
                 **({"pairs": [file_fingerprint(path) for path in pair_paths]} if pair_paths else {})}
    context = prepare_job(build, build_key, models, device, timer, paths=paths, pair_paths=pair_paths,
                          total_rows=count_rows(paths + pair_paths))
    return run_job(AddJob, context, old=old, retrain=options.retrain)
