"""Writing an index folder: shards (any process, any order), the manifest as commit point, consolidation
into the final files, and completion (with the swap of a rebuild into place).

A shard exists only once the manifest lists it (with each file's sha256), and the index loads only when
the manifest says state == "complete": a crashed build never loads.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from img2prompt.atomic import atomic_path, write_atomic, write_json_atomic
from img2prompt.errors import UserError
from img2prompt.index.layout import (CLIP_VECTORS, FORMAT_VERSION, IMAGE_KEYS, IMAGE_KEYS_FOLDER, INDEX_FILES,
                                     INT8_FORMAT_VERSION, KEY_PCA, LOCK, MANIFEST, MINILM, MINILM_I8, MINILM_MEAN,
                                     MINILM_SCALE, OPTIONAL_FILES, PHRASE_VECTORS, PHRASES, PROMPT_GROUP_ROWS,
                                     PROMPT_KEYS, PROMPTS, SEGMENT_FORMAT_VERSION, SEGMENTS, SHARD_INT8_SUFFIXES,
                                     SHARD_SUFFIXES, SHARDS,
                                     STATE_BUILDING, STATE_COMPLETE, TEXT_KEYS, VECTOR_DTYPE, file_record, file_sha256,
                                     prompts_sha256, shard_path, staging_folder)
from img2prompt.index.folder_decision import (DONE, REFUSE, RESUME, FolderDecision, FolderState, decide_folder,
                                              is_foreign)
from img2prompt.index.lock import clean_retired, clean_temp_files, lock_folder, swap_into_place
from img2prompt.index.manifest import read_manifest
from img2prompt.index.minilm_store import (INT8, minilm_dtype, minilm_file_names, minilm_rows, prediction_change,
                                           write_int8)

log = logging.getLogger(__name__)


def _save_array(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda handle: np.save(handle, array, allow_pickle=False))


def _save_prompts(path: Path, first_id: int, prompts: list[str]) -> None:
    table = pa.table({"id": pa.array(np.arange(first_id, first_id + len(prompts), dtype=np.int64)),
                      "prompt": pa.array(prompts, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


@dataclass
class ShardTask:
    """One unit of build work, fully described by the plan: rows [first_id, first_id + len(prompts))."""
    number: int
    first_id: int
    prompts: list[str]
    source_rows: list[int] | None = None  # each prompt's raw corpus row (locates precomputed vectors)
    images: list[str] | None = None  # image-keyed entries (build --pairs): each prompt's image file

    @property
    def keys(self) -> str:
        return IMAGE_KEYS if self.images is not None else TEXT_KEYS

    @property
    def prompts_sha256(self) -> str:
        return prompts_sha256(self.prompts + (self.images or []))



def save_shard(root: str | Path, task: ShardTask, clip: np.ndarray, minilm: np.ndarray,
               clip_truncated: int = 0, kept: list[int] | None = None) -> dict:
    """Write one shard's files atomically (any process, any order); returns the record to commit.

    `kept`: the task's rows that were encoded (an image-keyed task drops the images it cannot decode);
    None = all. The record carries each file's sha256, so a resume can tell a committed shard from a
    damaged one.
    """
    prompts = task.prompts if kept is None else [task.prompts[row] for row in kept]
    if not (len(prompts) == len(clip) == len(minilm)):
        raise ValueError(f"shard rows disagree: {len(prompts)} prompts, {len(clip)} clip, {len(minilm)} minilm")
    root = Path(root)
    (root / SHARDS).mkdir(parents=True, exist_ok=True)
    _save_prompts(shard_path(root, task.number, "prompts"), task.first_id, prompts)
    _save_array(shard_path(root, task.number, "clip"), np.asarray(clip, dtype=VECTOR_DTYPE))
    _save_array(shard_path(root, task.number, "minilm"), np.asarray(minilm, dtype=VECTOR_DTYPE))
    files = {kind: file_record(shard_path(root, task.number, kind)) for kind in SHARD_SUFFIXES}
    return {"number": task.number, "first_id": task.first_id, "count": len(prompts), "keys": task.keys,
            "planned": len(task.prompts), "prompts_sha256": task.prompts_sha256, "clip_truncated": clip_truncated,
            "files": files}


def save_shard_int8(root: str | Path, number: int, quantised: np.ndarray, scale: np.ndarray) -> dict:
    """A merge's int8 MiniLM rows of one shard as its inputs stored them (or quantised per row from float16,
    as a build does), beside the shard's files; returns their records for the shard's "files"."""
    _save_array(shard_path(Path(root), number, "minilm_i8"), np.asarray(quantised, dtype=np.int8))
    _save_array(shard_path(Path(root), number, "minilm_scale"), np.asarray(scale, dtype=np.float32))
    return {kind: file_record(shard_path(Path(root), number, kind)) for kind in SHARD_INT8_SUFFIXES}


class IndexWriter:
    """Writes an index directory shard by shard; `resume=True` continues a crashed build.

    `build` is the part of the manifest that must not change across a resume (models, precision, corpus
    files, shard size, batch size, column): resuming with anything different is refused rather than
    mixing two builds. Shards are committed by number in any order; the manifest is the commit point.
    """

    # the finished index when `resume` finds this very job already complete (the caller has nothing to do)
    done: dict | None = None

    def __init__(self, root: str | Path, build: dict, *, resume: bool = False, overwrite: bool = False):
        # Resolved once: a rebuild is staged beside the real folder and swapped with it, so a symlinked --out
        # stays a symlink to the grown index (swapping the link itself would replace it by a folder).
        self.final = Path(os.path.realpath(root))
        self._keep_lock_file = True
        if self.final.exists() and not self.final.is_dir():
            raise UserError(f"--out {self.final} is a file, not a folder")
        had_lock_file = (self.final / LOCK).exists()
        # Lock first, then look: a second build racing this one must see the lock, not our half-made files.
        self._lock = lock_folder(self.final)
        try:
            existing = read_manifest(self.final)
            foreign = is_foreign(self.final, existing)
            if not foreign:
                clean_retired(self.final)
            folder = FolderState.read(self.final, existing, foreign, had_lock_file)
            decision = decide_folder(folder, build, resume=resume, overwrite=overwrite)
            self._keep_lock_file = decision.keep_lock_file  # leave the user's folder as it was
            self._carry_out(decision, folder, build)
        except BaseException:
            self.close()  # a refusal must not keep the lock (a notebook keeps the exception alive)
            raise

    def _carry_out(self, decision: FolderDecision, folder: FolderState, build: dict) -> None:
        """Do what `decide_folder` decided: finish, refuse, resume or start over (in the staging folder for a
        rebuild of a complete index)."""
        staging = staging_folder(self.final)
        if decision.action == DONE:
            self._finished(folder.manifest, staging, decision.swap_staged)
            return
        if decision.drop_staging:
            self._drop_staging(staging, decision.drop_staging)
        if decision.action == REFUSE:
            raise UserError(decision.message)
        self.root = staging if decision.rebuild else self.final
        if decision.action == RESUME:
            self.manifest = folder.staged if decision.rebuild else folder.manifest
            clean_temp_files(self.root, self.root / SHARDS, self.root / IMAGE_KEYS_FOLDER,
                             *sorted((self.root / SEGMENTS).glob("*")))
        else:
            self._clear()
            self.manifest = {"format_version": FORMAT_VERSION, "state": STATE_BUILDING, "build": build,
                             "shards": [], "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self._save_manifest()

    def _finished(self, existing: dict, staging: Path, swap_staged: bool) -> None:
        """`resume` of a job that was killed after its final manifest: the complete index at `final` is this
        very job's (or, `swap_staged`, its staged rebuild is complete and only the swap is missing: it is
        swapped in now). Its leftovers go (shards/, the staging or retired folder); sets `done`."""
        if swap_staged:
            shutil.rmtree(staging / SHARDS, ignore_errors=True)
            (staging / LOCK).unlink(missing_ok=True)
            swap_into_place(staging, self.final)  # what the killed job's complete() had left to do
            existing = read_manifest(self.final)
        if staging.is_dir():
            self._drop_staging(staging, "left by the job that completed this index")
        shutil.rmtree(self.final / SHARDS, ignore_errors=True)  # a kill between the manifest and the cleanup
        self.root, self.manifest, self.done = self.final, existing, existing
        log.info("%s: already complete, nothing to do", self.final)

    def close(self) -> None:
        """Release the folder lock (also released when the process ends, however it ends). A complete index
        (or a folder that had none) keeps no .lock file: a refused or finished job leaves the folder as it was."""
        if self._lock is not None:
            if not self._keep_lock_file or self.done is not None:
                (self.final / LOCK).unlink(missing_ok=True)  # still ours: we hold the lock while unlinking
            self._lock.close()
            self._lock = None

    @staticmethod
    def _drop_staging(staging: Path, what: str) -> None:
        log.warning("removing %s: %s", staging, what)
        shutil.rmtree(staging, ignore_errors=True)

    def _clear(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / MANIFEST
        if manifest.exists():
            manifest.unlink()  # first, so a half-cleared folder never looks complete
        for name in INDEX_FILES + OPTIONAL_FILES + (MINILM_I8, MINILM_SCALE, KEY_PCA, PROMPT_KEYS):
            (self.root / name).unlink(missing_ok=True)
        for folder in (SHARDS, IMAGE_KEYS_FOLDER, SEGMENTS):
            shutil.rmtree(self.root / folder, ignore_errors=True)
        clean_temp_files(self.root)

    def _save_manifest(self) -> None:
        write_json_atomic(self.root / MANIFEST, self.manifest)

    @property
    def records(self) -> dict[int, dict]:
        return {record["number"]: record for record in self.manifest["shards"]}

    def rows_committed(self) -> int:
        return sum(self._count(record) for record in self.manifest["shards"])

    # build --near-dup: {shard number: keep mask}, set before consolidate(); rows outside a mask are dropped
    # from every consolidated file alike (ids stay dense 0..n-1). Not persisted: a resumed build recomputes it.
    keep: dict[int, np.ndarray] | None = None

    def _count(self, record: dict) -> int:
        mask = (self.keep or {}).get(record["number"])
        return record["count"] if mask is None else int(mask.sum())

    def is_committed(self, task: ShardTask) -> bool:
        """Whether `task` has a committed record whose prompts and files are intact (checked by sha256).

        A record that fails the check is dropped, so the shard is encoded again: a damaged or deleted
        shard file never reaches the index.
        """
        record = self.records.get(task.number)
        if record is None:
            return False
        if record["prompts_sha256"] != task.prompts_sha256 or record["first_id"] != task.first_id:
            raise UserError(f"{self.root}: cannot resume, the corpus no longer gives the same prompts for "
                            f"shard {task.number}; rerun with --overwrite to start over")
        for kind, expected in record.get("files", {}).items():
            path = shard_path(self.root, task.number, kind)
            if not path.is_file() or path.stat().st_size != expected["bytes"] or file_sha256(path) != expected["sha256"]:
                log.warning("shard %d: %s is missing or damaged; encoding the shard again", task.number, path.name)
                self.manifest["shards"] = [r for r in self.manifest["shards"] if r["number"] != task.number]
                self._save_manifest()
                return False
        return "files" in record

    def commit_shard(self, record: dict) -> None:
        """Record a saved shard in the manifest (the commit point), replacing any record of that number."""
        shards = [r for r in self.manifest["shards"] if r["number"] != record["number"]]
        self.manifest["shards"] = sorted(shards + [record], key=lambda r: r["number"])
        self._save_manifest()

    def _ordered_records(self) -> list[dict]:
        records = self.manifest["shards"]
        if [r["number"] for r in records] != list(range(len(records))):
            raise UserError(f"{self.root}: shards {[r['number'] for r in records]} are not contiguous: "
                            "finish the build with --resume")
        return records

    def iter_shard_arrays(self, kind: str) -> Iterator[np.ndarray]:
        for record in self._ordered_records():
            block = np.load(shard_path(self.root, record["number"], kind), mmap_mode="r")
            mask = (self.keep or {}).get(record["number"])
            yield block if mask is None else block[mask]

    def consolidate(self, into: str = "", first_id: int = 0) -> tuple[int, int, int]:
        """Concatenate shards into prompts.parquet, minilm.f16, clip.f16 (streamed) in the folder `into` (the
        index folder, or an add's segment folder, ids from `first_id`); the index folder also gets
        minilm_mean.npy."""
        count = self.rows_committed()
        if count == 0:
            raise UserError("the corpus holds no usable prompt (nor --pairs a decodable image): nothing to index")
        folder = self.root / into
        folder.mkdir(parents=True, exist_ok=True)
        clip_dim = self._concat_vectors("clip", folder / CLIP_VECTORS)
        text_dim = self._concat_vectors("minilm", folder / MINILM)
        if not into:
            total = np.zeros(text_dim, dtype=np.float64)
            for block in self.iter_shard_arrays("minilm"):
                total += block.astype(np.float64).sum(axis=0)
            _save_array(self.root / MINILM_MEAN, (total / count).astype(np.float32))
        from img2prompt.index.prompt_keys import fill_keys, save_keys, squeeze_sorted  # add's dedup reads them

        keys, filled = np.empty(count, np.uint64), 0  # the prompts' dedup keys, filled as they are written
        with atomic_path(folder / PROMPTS) as tmp:
            writer = None
            for record in self._ordered_records():
                prompts = pq.read_table(shard_path(self.root, record["number"], "prompts")).column("prompt")
                mask = (self.keep or {}).get(record["number"])
                prompts = prompts if mask is None else prompts.filter(pa.array(mask))
                filled = fill_keys(keys, filled, prompts.to_pylist())
                table = pa.table({"id": pa.array(np.arange(first_id, first_id + len(prompts), dtype=np.int64)),
                                  "prompt": prompts,
                                  "key": pa.array([record.get("keys", TEXT_KEYS)] * len(prompts), type=pa.string())})
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table, row_group_size=PROMPT_GROUP_ROWS)  # lookups read one group
                first_id += len(prompts)
            writer.close()
        save_keys(folder / PROMPT_KEYS, squeeze_sorted(keys[:filled]))  # sorted in place: 9 bytes a prompt at most
        return count, clip_dim, text_dim

    def key_rows(self) -> dict[str, tuple[int, int]]:
        """{key kind: (first row, end row)} of the consolidated index: text keys first, then image keys."""
        ranges, start = {}, 0
        for record in self._ordered_records():
            kind = record.get("keys", TEXT_KEYS)
            first, _ = ranges.get(kind, (start, start))
            if kind in ranges and ranges[kind][1] != start:
                raise ValueError("key kinds are interleaved: image-keyed shards must come after the text ones")
            ranges[kind] = (first, start + self._count(record))
            start += self._count(record)
        return {kind: rows for kind, rows in ranges.items() if rows[1] > rows[0]}

    def _concat_vectors(self, kind: str, path: Path) -> int:
        dim = None
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                for block in self.iter_shard_arrays(kind):
                    dim = dim or block.shape[1]
                    handle.write(np.ascontiguousarray(block, dtype=VECTOR_DTYPE).tobytes())
        return int(dim)

    def vectors(self, kind: str) -> np.memmap:
        """The consolidated vectors (after consolidate(), before compact_minilm()) as a read-only memmap."""
        name = {"clip": CLIP_VECTORS, "minilm": MINILM}[kind]
        dim = (self.root / name).stat().st_size // (self.rows_committed() * np.dtype(VECTOR_DTYPE).itemsize)  # --key-dims
        return np.memmap(self.root / name, dtype=VECTOR_DTYPE, mode="r", shape=(self.rows_committed(), dim))

    def compact_minilm(self, seed: int = 0, from_shards: bool = False) -> dict:
        """Replace the consolidated minilm.f16 by minilm.i8 + minilm_scale.f32 (index/minilm_store.py) and
        return the manifest's "minilm" section with the measured cost; the float16 file goes only once both
        int8 files are in place. `from_shards`: the shards' own int8 rows (save_shard_int8, a merge) are
        concatenated instead of quantising minilm.f16 again."""
        full = self.vectors("minilm")
        if from_shards:
            with atomic_path(self.root / MINILM_I8) as tmp:
                with open(tmp, "wb") as handle:
                    for block in self.iter_shard_arrays("minilm_i8"):
                        handle.write(np.ascontiguousarray(block, dtype=np.int8).tobytes())
            scale = np.concatenate(list(self.iter_shard_arrays("minilm_scale"))).astype(np.float32).tobytes()
            write_atomic(self.root / MINILM_SCALE, lambda handle: handle.write(scale))
        else:
            write_int8(self.root, (full[start:start + 65_536] for start in range(0, len(full), 65_536)))
        compact = minilm_rows(self.root, {"minilm": {"dtype": INT8}}, *full.shape)
        cost = prediction_change(self.vectors("clip"), full, compact, seed=seed)
        del full, compact
        (self.root / MINILM).unlink()
        return {"dtype": INT8, "prediction_change_vs_fp16": cost}

    def iter_prompt_batches(self, size: int = 100_000) -> Iterator[list[str]]:
        """The consolidated prompts in id order, a batch at a time (after consolidate())."""
        for batch in pq.ParquetFile(self.root / PROMPTS).iter_batches(columns=["prompt"], batch_size=size):
            yield batch.column(0).to_pylist()

    def prompt_rows(self, ids) -> list[str]:
        """The consolidated prompts with these ids (streamed: memory does not grow with the corpus)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        order = np.argsort(ids, kind="stable")
        ordered = ids[order]
        found: list[str | None] = [None] * len(ids)
        first = 0
        for batch in self.iter_prompt_batches():
            low, high = np.searchsorted(ordered, [first, first + len(batch)])
            for position in order[low:high]:
                found[position] = batch[ids[position] - first]
            first += len(batch)
        return found

    def save_phrases(self, phrases: list[str], counts: list[int], vectors: np.ndarray) -> tuple[str, ...]:
        """Write the modifier vocabulary and its CLIP vectors; returns the file names for complete()."""
        table = pa.table({"phrase": pa.array(phrases, type=pa.string()), "count": pa.array(counts, type=pa.int64())})
        with atomic_path(self.root / PHRASES) as tmp:
            pq.write_table(table, tmp)
        data = np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE).tobytes()
        write_atomic(self.root / PHRASE_VECTORS, lambda handle: handle.write(data))
        return PHRASES, PHRASE_VECTORS

    def abandon(self) -> None:
        """Give up a rebuild that turned out to change nothing: its staging folder goes, the index stays."""
        if self.root != self.final:
            self._drop_staging(self.root, "nothing to change")
        (self.final / LOCK).unlink(missing_ok=True)

    def complete(self, info: dict, extra_files: tuple[str, ...] = (), linked: dict | None = None) -> dict:
        """Write the final manifest (the commit point of the whole build), then drop the shards.
        `extra_files`: the search backend's and the phrase vocabulary's files, recorded like the rest;
        `linked`: {name: record} of files an add linked in unchanged from the index it grows (not re-hashed)."""
        dtype = minilm_dtype(info)  # int8 MiniLM: its own files and format 4 (older readers refuse it)
        linked = linked or {}
        names = tuple(n for n in INDEX_FILES if n != MINILM) + minilm_file_names(dtype)
        names += (PROMPT_KEYS,) if (self.root / PROMPT_KEYS).is_file() else ()  # absent in a pre-keys index's add
        files = {name: linked.get(name) or file_record(self.root / name)
                 for name in dict.fromkeys(names + tuple(extra_files) + tuple(linked))}
        # format 4 for every compacted index (int8 MiniLM or PCA keys): a reader before 4 refuses it by version;
        # format 5 for rows in segments (an add): a reader before 5 would see only the base rows
        version = INT8_FORMAT_VERSION if dtype == INT8 or "key_pca" in info else FORMAT_VERSION
        version = SEGMENT_FORMAT_VERSION if info.get("segments") else version
        manifest = {"format_version": version, "state": STATE_COMPLETE,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info,
                    "build": self.manifest["build"], "files": files}
        write_json_atomic(self.root / MANIFEST, manifest)
        shutil.rmtree(self.root / SHARDS, ignore_errors=True)
        if self.root != self.final:
            swap_into_place(self.root, self.final)
            self.root = self.final
        (self.final / LOCK).unlink(missing_ok=True)  # a finished index carries no lock file (we still hold it)
        self.manifest = manifest
        return manifest
