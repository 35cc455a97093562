"""The on-disk index format. The only module that knows file names, dtypes and the manifest schema.

    INDEX_DIR/
      manifest.json        format version, state, models (+ weight sha256), dims, count, files + checksums
      prompts.parquet      id (int64), prompt (string), key (string: "text" or "image"); row i is prompt id i
      minilm.f16           float16 [count, text_dim], L2-normalised scorer embeddings, row i ↔ prompt id i
      clip.f16             float16 [count, clip_dim], L2-normalised CLIP embeddings: the searchable keys, CLIP
                           *text* vectors of the corpus prompts, then CLIP *image* vectors of `build --pairs`
                           images (rows in that order; the manifest's "key_ranges" say where each kind lies)
                           (flat/torch search them directly; approximate kinds re-rank from them)
      minilm_mean.npy      float32 [text_dim], mean of the MiniLM rows (the corpus-mean prediction)
      clip.faiss           only for approximate kinds (hnsw, ivfpq): the FAISS index, inner product, ids = prompt ids
      image_keys/          the image-keyed range's own backend files (same names), when it has an approximate kind
      regression.npz       the ridge head CLIP → MiniLM (build_index/regression.py), when the build fitted one
      phrases.parquet      modifier vocabulary mined from the corpus (phrase, count); phrases.f16 its CLIP
                           vectors (both optional: indexes built before they existed open without them)
      shards/NNNNN.*       row-aligned shards while a build runs (deleted once the index is complete)

Every file is written to a temp name, fsynced and renamed. A shard exists only once the manifest lists it
(with each file's sha256), and the index loads only when the manifest says state == "complete": a crashed
build never loads. Format 1 (flat indexes also held a float32 clip.faiss) still opens; its extra file is
ignored. The manifest's "search" section (format 1: "faiss") names the backend kind and its settings;
format 3 adds "key_ranges" (a backend per key kind: image→image scores run higher than image→text, so each
kind is searched on its own and the scores are calibrated before they are merged) and "calibration".
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from img2prompt.atomic import atomic_path, fsync_dir, write_atomic, write_json_atomic
from img2prompt.errors import UserError, short_reason

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: flat indexes keep one copy of the vectors; 3: key ranges (image-keyed entries)
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
PROMPTS = "prompts.parquet"
MINILM = "minilm.f16"
CLIP_VECTORS = "clip.f16"
MINILM_MEAN = "minilm_mean.npy"
FAISS = "clip.faiss"
SHARDS = "shards"
LOCK = ".lock"  # held (flock) by the build writing the folder
PHRASES = "phrases.parquet"  # the modifier vocabulary (phrase, count) for readable prompts
PHRASE_VECTORS = "phrases.f16"  # float16 [phrases, clip_dim], L2-normalised CLIP text vectors of the phrases
STATE_BUILDING = "building"
STATE_COMPLETE = "complete"
VECTOR_DTYPE = np.float16
INDEX_FILES = (PROMPTS, MINILM, CLIP_VECTORS, MINILM_MEAN)  # every kind has these; backends add their own
SHARD_SUFFIXES = {"prompts": ".parquet", "clip": ".clip.npy", "minilm": ".minilm.npy"}
TEXT_KEYS, IMAGE_KEYS = "text", "image"
IMAGE_KEYS_FOLDER = "image_keys"  # the image range's backend files
REGRESSION = "regression.npz"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def prompts_sha256(prompts: list[str]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def read_manifest(root: Path) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: manifest holds a JSON {type(manifest).__name__}, not an object: the index is "
                        "damaged, rebuild it")
    return manifest


def _check_complete_manifest(path: Path, manifest: dict) -> None:
    """The keys a reader relies on, with the right types: a damaged manifest is one line, not a KeyError."""
    problems = []
    if not isinstance(manifest.get("count"), int) or isinstance(manifest.get("count"), bool) or manifest["count"] < 0:
        problems.append(f"count {manifest.get('count')!r}")
    models = manifest.get("models")
    for kind in ("clip", "text"):
        entry = models.get(kind) if isinstance(models, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("dim"), int) or not entry.get("sha256"):
            problems.append(f"models.{kind}")
    if not isinstance(manifest.get("files"), dict) or not all(
            isinstance(record, dict) and isinstance(record.get("bytes"), int) for record in manifest["files"].values()):
        problems.append("files")
    plan = manifest.get("search") or manifest.get("faiss")
    if not isinstance(plan, dict) or "kind" not in plan:
        problems.append("search")
    if problems:
        raise UserError(f"{path}: manifest is damaged (missing or invalid: {', '.join(problems)}): rebuild the index")


def _save_array(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda handle: np.save(handle, array, allow_pickle=False))


def _save_prompts(path: Path, first_id: int, prompts: list[str]) -> None:
    table = pa.table({"id": pa.array(np.arange(first_id, first_id + len(prompts), dtype=np.int64)),
                      "prompt": pa.array(prompts, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# ---------------------------------------------------------------------------------------------- writing

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


def plan_shards(prompts: Iterator[str] | Iterator[tuple[int, str]], shard_size: int,
                first_number: int = 0) -> Iterator[ShardTask]:
    """Cut the (deduplicated) prompt stream into shard tasks; shard n starts at row n × shard_size.

    Items are prompts, or (raw corpus row, prompt) pairs when the rows are needed later, or (image path,
    prompt) pairs for image-keyed entries. The planned first ids are the resume key; the index's ids are
    positions (consolidate), since an image that cannot be decoded leaves its shard short."""
    number = first_number
    while batch := list(itertools.islice(prompts, shard_size)):
        rows = images = None
        if isinstance(batch[0], tuple):
            firsts, batch = [first for first, _ in batch], [prompt for _, prompt in batch]
            rows, images = (None, firsts) if isinstance(firsts[0], str) else (firsts, None)
        yield ShardTask(number=number, first_id=number * shard_size, prompts=batch, source_rows=rows, images=images)
        number += 1


def _exchange_paths(first: Path, second: Path) -> bool:
    """Atomically swap two paths (renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def _lock_folder(folder: Path):
    """An exclusive lock on the output folder for the whole build; a second build gets a one-line error."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"{folder} is being written by another img2prompt build (pid {holder}): wait for it "
                        "or stop it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def shard_path(root: Path, number: int, kind: str) -> Path:
    return Path(root) / SHARDS / f"{number:05d}{SHARD_SUFFIXES[kind]}"


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


class IndexWriter:
    """Writes an index directory shard by shard; `resume=True` continues a crashed build.

    `build` is the part of the manifest that must not change across a resume (models, precision, corpus
    files, shard size, batch size, column): resuming with anything different is refused rather than
    mixing two builds. Shards are committed by number in any order; the manifest is the commit point.
    """

    def __init__(self, root: str | Path, build: dict, *, resume: bool = False, overwrite: bool = False):
        self.final = Path(root)
        if self.final.exists() and not self.final.is_dir():
            raise UserError(f"--out {self.final} is a file, not a folder")
        had_lock_file = (self.final / LOCK).exists()
        # Lock first, then look: a second build racing this one must see the lock, not our half-made files.
        self._lock = _lock_folder(self.final)
        try:
            existing = read_manifest(self.final)
            if existing is None and any(p.name != LOCK for p in self.final.iterdir()):
                self.close()
                if not had_lock_file:
                    (self.final / LOCK).unlink(missing_ok=True)  # leave the user's folder as it was
                raise UserError(f"{self.final} exists, is not empty and is not an index: choose another --out"
                                + (" (--overwrite only replaces an index, never other files)" if overwrite else ""))
            state = existing.get("state") if existing else None
            if state == STATE_COMPLETE:
                # Rebuild beside the complete index and swap at the very end: a failed or interrupted rebuild
                # never costs the index it was meant to replace.
                self.root = self.final.parent / f".{self.final.name}.rebuild"
                if os.stat(self.final).st_dev != os.stat(self.final.parent).st_dev:
                    raise UserError(f"--out {self.final} is a mount point: a rebuild is written beside it and "
                                    "swapped in, which cannot cross filesystems; move the old index away first, or "
                                    "build into a folder inside the mount")
                staged = read_manifest(self.root) if self.root.is_dir() else None
                if not overwrite and not (resume and staged and staged.get("state") == STATE_BUILDING):
                    raise UserError(f"{self.final} already holds a complete index: pass --overwrite to replace it")
                existing, state = staged, staged.get("state") if staged else None
                if not resume:
                    state = None  # --overwrite: a fresh rebuild
            else:
                self.root = self.final
            if state == STATE_BUILDING and not (resume or overwrite):
                raise UserError(f"{self.final} holds an unfinished build ({len(existing.get('shards', []))} shards done): "
                                "pass --resume to continue it or --overwrite to start over")
            if resume and state == STATE_BUILDING:
                if existing.get("build") != build:
                    changed = sorted(key for key in set(build) | set(existing.get("build", {}))
                                     if build.get(key) != existing.get("build", {}).get(key))
                    raise UserError(f"{self.final}: cannot resume, the build settings differ from the interrupted "
                                    f"build ({', '.join(changed)}); rerun with --overwrite to start over")
                if existing.get("format_version") != FORMAT_VERSION:
                    raise UserError(f"{self.final}: the unfinished build was started by another img2prompt version "
                                    f"(format {existing.get('format_version')}); rerun with --overwrite")
                self.manifest = existing
                self._remove_stray_temp_files()
            else:
                self._clear()
                self.manifest = {"format_version": FORMAT_VERSION, "state": STATE_BUILDING, "build": build,
                                 "shards": [], "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                self._save_manifest()
        except BaseException:
            self.close()  # a refusal must not keep the lock (a notebook keeps the exception alive)
            raise

    def close(self) -> None:
        """Release the folder lock (also released when the process ends, however it ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _remove_stray_temp_files(self) -> None:
        """Temp files of writes a killed build never renamed (atomic.py names them .NAME.PID.RANDOM.tmp)."""
        for folder in (self.root, self.root / SHARDS):
            if folder.is_dir():
                for stray in folder.glob(".*.tmp"):
                    stray.unlink(missing_ok=True)

    def _clear(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / MANIFEST
        if manifest.exists():
            manifest.unlink()  # first, so a half-cleared folder never looks complete
        for name in INDEX_FILES + (FAISS, REGRESSION, PHRASES, PHRASE_VECTORS):
            (self.root / name).unlink(missing_ok=True)
        shutil.rmtree(self.root / SHARDS, ignore_errors=True)
        shutil.rmtree(self.root / IMAGE_KEYS_FOLDER, ignore_errors=True)
        self._remove_stray_temp_files()

    def _save_manifest(self) -> None:
        write_json_atomic(self.root / MANIFEST, self.manifest)

    @property
    def records(self) -> dict[int, dict]:
        return {record["number"]: record for record in self.manifest["shards"]}

    def rows_committed(self) -> int:
        return sum(record["count"] for record in self.manifest["shards"])

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
            yield np.load(shard_path(self.root, record["number"], kind), mmap_mode="r")

    def consolidate(self) -> tuple[int, int, int]:
        """Concatenate shards into prompts.parquet, minilm.f16, clip.f16 and minilm_mean.npy (streamed)."""
        count = self.rows_committed()
        if count == 0:
            raise UserError("the corpus holds no usable prompt (nor --pairs a decodable image): nothing to index")
        clip_dim = self._concat_vectors("clip", CLIP_VECTORS)
        text_dim = self._concat_vectors("minilm", MINILM)
        total = np.zeros(text_dim, dtype=np.float64)
        for block in self.iter_shard_arrays("minilm"):
            total += block.astype(np.float64).sum(axis=0)
        _save_array(self.root / MINILM_MEAN, (total / count).astype(np.float32))
        with atomic_path(self.root / PROMPTS) as tmp:
            writer, first_id = None, 0
            for record in self._ordered_records():
                prompts = pq.read_table(shard_path(self.root, record["number"], "prompts")).column("prompt")
                table = pa.table({"id": pa.array(np.arange(first_id, first_id + len(prompts), dtype=np.int64)),
                                  "prompt": prompts,
                                  "key": pa.array([record.get("keys", TEXT_KEYS)] * len(prompts), type=pa.string())})
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                first_id += len(prompts)
            writer.close()
        return count, clip_dim, text_dim

    def key_rows(self) -> dict[str, tuple[int, int]]:
        """{key kind: (first row, end row)} of the consolidated index: text keys first, then image keys."""
        ranges, start = {}, 0
        for record in self._ordered_records():
            kind = record.get("keys", TEXT_KEYS)
            first, _ = ranges.get(kind, (start, start))
            if kind in ranges and ranges[kind][1] != start:
                raise ValueError("key kinds are interleaved: image-keyed shards must come after the text ones")
            ranges[kind] = (first, start + record["count"])
            start += record["count"]
        return {kind: rows for kind, rows in ranges.items() if rows[1] > rows[0]}

    def _concat_vectors(self, kind: str, name: str) -> int:
        dim = None
        with atomic_path(self.root / name) as tmp:
            with open(tmp, "wb") as handle:
                for block in self.iter_shard_arrays(kind):
                    dim = dim or block.shape[1]
                    handle.write(np.ascontiguousarray(block, dtype=VECTOR_DTYPE).tobytes())
        return int(dim)

    def vectors(self, kind: str) -> np.memmap:
        """The consolidated vectors (after consolidate()) as a read-only memmap."""
        name = {"clip": CLIP_VECTORS, "minilm": MINILM}[kind]
        dim = next(self.iter_shard_arrays(kind)).shape[1]
        return np.memmap(self.root / name, dtype=VECTOR_DTYPE, mode="r", shape=(self.rows_committed(), dim))

    def iter_prompt_batches(self, size: int = 100_000) -> Iterator[list[str]]:
        """The consolidated prompts in id order, a batch at a time (after consolidate())."""
        for batch in pq.ParquetFile(self.root / PROMPTS).iter_batches(columns=["prompt"], batch_size=size):
            yield batch.column(0).to_pylist()

    def prompt_rows(self, ids) -> list[str]:
        """The consolidated prompts with these ids (streamed: memory does not grow with the corpus)."""
        wanted = {int(i): None for i in ids}
        first = 0
        for batch in self.iter_prompt_batches():
            for i in [i for i in wanted if first <= i < first + len(batch)]:
                wanted[i] = batch[i - first]
            first += len(batch)
        return [wanted[int(i)] for i in ids]

    def save_phrases(self, phrases: list[str], counts: list[int], vectors: np.ndarray) -> tuple[str, ...]:
        """Write the modifier vocabulary and its CLIP vectors; returns the file names for complete()."""
        table = pa.table({"phrase": pa.array(phrases, type=pa.string()), "count": pa.array(counts, type=pa.int64())})
        with atomic_path(self.root / PHRASES) as tmp:
            pq.write_table(table, tmp)
        data = np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE).tobytes()
        write_atomic(self.root / PHRASE_VECTORS, lambda handle: handle.write(data))
        return PHRASES, PHRASE_VECTORS

    def complete(self, info: dict, extra_files: tuple[str, ...] = ()) -> dict:
        """Write the final manifest (the commit point of the whole build), then drop the shards.
        `extra_files`: the search backend's and the phrase vocabulary's files, recorded like the rest."""
        files = {name: file_record(self.root / name) for name in INDEX_FILES + tuple(extra_files)}
        manifest = {"format_version": FORMAT_VERSION, "state": STATE_COMPLETE,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info,
                    "build": self.manifest["build"], "files": files}
        write_json_atomic(self.root / MANIFEST, manifest)
        shutil.rmtree(self.root / SHARDS, ignore_errors=True)
        if self.root != self.final:
            self._swap_into_place()
        (self.final / LOCK).unlink(missing_ok=True)  # a finished index carries no lock file (we still hold it)
        self.manifest = manifest
        return manifest

    def _swap_into_place(self) -> None:
        """Replace the old complete index with the rebuilt one in one atomic exchange of the two folders
        (Linux renameat2); where that is unavailable, two renames, then the old index is deleted."""
        retired = self.root
        if not _exchange_paths(self.root, self.final):
            retired = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.rename(self.final, retired)
            os.rename(self.root, self.final)
        fsync_dir(self.final.parent)
        shutil.rmtree(retired, ignore_errors=True)
        self.root = self.final


# ---------------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class KeyRange:
    """Rows [start, stop) of one key kind, with the search backend that covers them."""
    keys: str  # TEXT_KEYS or IMAGE_KEYS
    start: int
    stop: int
    plan: dict  # {"kind", "params", "recall_at_10", ...}
    folder: str = ""  # where the backend's own files live, relative to the index folder

    @property
    def count(self) -> int:
        return self.stop - self.start

    def as_dict(self) -> dict:
        return {"keys": self.keys, "rows": [self.start, self.stop], "folder": self.folder, "search": self.plan}

    @classmethod
    def from_dict(cls, entry: dict) -> "KeyRange":
        start, stop = entry["rows"]
        return cls(entry["keys"], int(start), int(stop), entry["search"], entry.get("folder", ""))


@dataclass
class PromptIndex:
    """A complete index opened for reading; vectors are memory-mapped, the rest loads on first use."""
    root: Path
    manifest: dict
    _faiss: Any = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def clip_dim(self) -> int:
        return int(self.manifest["models"]["clip"]["dim"])

    @property
    def text_dim(self) -> int:
        return int(self.manifest["models"]["text"]["dim"])

    @property
    def clip_identity(self) -> dict:
        return self.manifest["models"]["clip"]

    @property
    def text_identity(self) -> dict:
        return self.manifest["models"]["text"]

    @cached_property
    def minilm(self) -> np.memmap:
        return np.memmap(self.root / MINILM, dtype=VECTOR_DTYPE, mode="r", shape=(self.count, self.text_dim))

    @cached_property
    def clip_vectors(self) -> np.memmap:
        return np.memmap(self.root / CLIP_VECTORS, dtype=VECTOR_DTYPE, mode="r", shape=(self.count, self.clip_dim))

    @cached_property
    def minilm_mean(self) -> np.ndarray:
        try:
            mean = np.load(self.root / MINILM_MEAN, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.root / MINILM_MEAN}: not readable ({short_reason(exc)}): the index is damaged, "
                            "rebuild it") from exc
        if mean.shape != (self.text_dim,):
            raise UserError(f"{self.root / MINILM_MEAN}: shape {mean.shape}, expected ({self.text_dim},): the index "
                            "is damaged, rebuild it")
        return mean

    def preload(self) -> None:
        """Map the vectors and open the prompt file now: a reader keeps the files it opened even when a
        rebuild swaps a new index into this folder meanwhile (a long-running server, say)."""
        # a native Arrow file (not a Python file object: Arrow's reader threads must not call back into Python)
        self._prompt_file = pa.memory_map(str(self.root / PROMPTS), "r")
        for name in ("minilm", "clip_vectors", "minilm_mean", "phrases", "regression_head"):
            getattr(self, name)

    @cached_property
    def _prompt_column(self) -> pa.ChunkedArray:
        # Arrow strings: ~1 byte a character, not a Python object per prompt (10M prompts stay cheap).
        source = getattr(self, "_prompt_file", None) or self.root / PROMPTS
        column = pq.read_table(source, columns=["prompt"]).column("prompt")
        if len(column) != self.count:
            raise UserError(f"{self.root / PROMPTS}: {len(column)} prompts, manifest says {self.count}")
        return column

    @property
    def prompts(self) -> list[str]:
        """Every prompt as a Python list (small indexes, tests); prefer prompt_rows / iter_prompt_batches."""
        return self._prompt_column.to_pylist()

    def prompt_rows(self, ids) -> list[str]:
        """The prompts with these ids (an id < 0, i.e. no neighbour, gives "")."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        found = self._prompt_column.take(pa.array(np.where(ids < 0, 0, ids))).to_pylist()
        return [prompt if i >= 0 else "" for prompt, i in zip(found, ids)]

    def iter_prompt_batches(self, size: int = 100_000) -> Iterator[tuple[int, list[str]]]:
        """(first id, prompts) in id order, a batch at a time."""
        column = self._prompt_column
        for start in range(0, len(column), size):
            yield start, column.slice(start, size).to_pylist()

    @cached_property
    def phrases(self) -> tuple[list[str], np.ndarray] | None:
        """(phrases, float16 CLIP vectors [n, clip_dim]) of the modifier vocabulary, or None for an index
        built without one."""
        if PHRASES not in self.manifest.get("files", {}):
            return None
        phrases = pq.read_table(self.root / PHRASES, columns=["phrase"]).column("phrase").to_pylist()
        vectors = np.memmap(self.root / PHRASE_VECTORS, dtype=VECTOR_DTYPE, mode="r",
                            shape=(len(phrases), self.clip_dim)) if phrases else np.zeros((0, self.clip_dim))
        return phrases, vectors

    @property
    def search_plan(self) -> dict:
        """{"kind", "params", "recall_at_10", ...} of the first key range's backend (format 1: "faiss")."""
        return self.manifest.get("search") or self.manifest["faiss"]

    @property
    def key_ranges(self) -> list[KeyRange]:
        """The key kinds and where they lie; indexes before format 3 are one text range."""
        if "key_ranges" in self.manifest:
            return [KeyRange.from_dict(entry) for entry in self.manifest["key_ranges"]]
        return [KeyRange(TEXT_KEYS, 0, self.count, self.search_plan)]

    def key_kinds(self, ids: np.ndarray) -> np.ndarray:
        """The key kind ("text"/"image"; "" for -1) of each prompt id."""
        ids = np.asarray(ids, dtype=np.int64)
        kinds = np.full(ids.shape, "", dtype=object)
        for key_range in self.key_ranges:
            kinds[(ids >= key_range.start) & (ids < key_range.stop)] = key_range.keys
        return kinds

    @property
    def calibration(self) -> dict:
        """{query kind: {key kind: {"scale", "offset"}}}: maps each key kind's raw cosine onto the text keys'
        scale before the ranges' hits meet in one top-k (absent: identity)."""
        return self.manifest.get("calibration", {}).get("maps", {})

    @cached_property
    def regression_head(self):
        """The ridge head CLIP → MiniLM (build_index/regression.py), or None for an index built without one."""
        if REGRESSION not in self.manifest.get("files", {}):
            return None
        from img2prompt.index.ridge import RidgeHead

        try:
            return RidgeHead.load(self.root / REGRESSION, self.manifest["regression"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{self.root / REGRESSION}: not readable ({short_reason(exc)}): the index is damaged, "
                            "rebuild it") from exc

    def open_backend(self, device: str = "cpu", key_range: KeyRange | None = None):
        """The search backend of one key range (default: the first) on `device`; its ids are relative to the
        range's first row. A flat range on CUDA searches with torch."""
        from img2prompt.index.backend import backend_class

        key_range = key_range or self.key_ranges[0]
        plan = key_range.plan
        return backend_class(plan["kind"]).load(self.root / key_range.folder,
                                                self.clip_vectors[key_range.start:key_range.stop],
                                                plan.get("params", {}), device)


def open_index(root: str | Path, *, verify: bool = False) -> PromptIndex:
    """Open a complete index; sizes are always checked, sha256 checksums too with verify=True."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"index folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"{root} is not an index folder")
    manifest = read_manifest(root)
    if manifest is None:
        raise UserError(f"{root} is not an index: no {MANIFEST}")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise UserError(f"{root / MANIFEST}: no format_version: not an img2prompt index")
    if version not in READABLE_VERSIONS:
        raise UserError(f"{root} has index format {version}; this img2prompt reads formats "
                        f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade img2prompt")
    if manifest.get("state") != STATE_COMPLETE:
        raise UserError(f"{root} holds an unfinished build ({len(manifest.get('shards', []))} shards done): "
                        "finish it with `img2prompt build ... --resume`")
    _check_complete_manifest(root / MANIFEST, manifest)
    index = PromptIndex(root=root, manifest=manifest)
    expected_bytes = {MINILM: index.count * index.text_dim * 2, CLIP_VECTORS: index.count * index.clip_dim * 2}
    if PHRASES in manifest["files"]:
        expected_bytes[PHRASE_VECTORS] = manifest.get("phrases", {}).get("count", 0) * index.clip_dim * 2
    for name, record in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise UserError(f"{root}: index file {name} is missing")
        size = path.stat().st_size
        if size != record["bytes"] or size != expected_bytes.get(name, size):
            expected = expected_bytes.get(name, record["bytes"])
            raise UserError(f"{path}: {size} bytes, expected {expected}"
                            + (f" ({index.count} rows)" if name in expected_bytes else "")
                            + (f" (the manifest records {record['bytes']})" if record["bytes"] != expected else "")
                            + ": the index is damaged, rebuild it")
        if verify and file_sha256(path) != record["sha256"]:
            raise UserError(f"{path}: sha256 differs from the manifest: the file is damaged, rebuild the index")
    if (root / SHARDS).is_dir():
        log.warning("%s: shards/ is left over from a build killed while cleaning up; it is not part of the index "
                    "and can be deleted", root)
    try:
        prompt_rows = pq.ParquetFile(root / PROMPTS).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{root / PROMPTS}: not readable ({short_reason(exc)}): the index is damaged, rebuild it") from exc
    if prompt_rows != index.count:
        raise UserError(f"{root / PROMPTS}: {prompt_rows} prompts, the manifest says {index.count}: rebuild the index")
    index.preload()
    return index
