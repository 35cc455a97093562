"""Reading an index folder: open_index checks the manifest's schema, every file's size (and sha256 with
verify=True) and the side files, then maps the vectors; PromptIndex serves prompts and vectors by id.

Prompts are fetched by id from the parquet row groups that hold them, never the whole column: what a command
holds does not grow with the index (PROMPT_GROUP_ROWS rows a group in indexes written since; older indexes'
larger groups read the same way). Decoded groups stay in a small LRU cache (PROMPT_CACHE_BYTES). Within a
group, lookups work in bounded pieces (TAKE_IDS ids, TAKE_BYTES bytes of text at a time): Arrow cannot gather
more than 2 GiB of strings into one array, and a submission asks for k × images ids.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Collection, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from img2prompt.errors import UserError, short_reason
from img2prompt.index import manifest as schema
from img2prompt.index.layout import (CLIP_VECTORS, KEY_PCA, MANIFEST, MINILM_MEAN, PHRASE_VECTORS, PHRASES, PROMPTS,
                                     READABLE_VERSIONS, REGRESSION, SHARDS, STATE_COMPLETE, VECTOR_BYTES,
                                     VECTOR_DTYPE, file_sha256)
from img2prompt.index.manifest import KeyRange, read_manifest
from img2prompt.index.key_pca import load_pca
from img2prompt.index.minilm_store import minilm_dtype, minilm_file_bytes, minilm_rows
from img2prompt.index.segments import Segment, concat_rows, segments_of

log = logging.getLogger(__name__)

TAKE_IDS = 1 << 20  # ids gathered in one Arrow take
TAKE_BYTES = 1 << 30  # text gathered in one take, well under Arrow's 2 GiB limit of one string array
PROMPT_CACHE_BYTES = 64 << 20  # decoded prompt row groups kept for the next lookups (a bound, not per prompt)


def _take(column: pa.ChunkedArray, ids: np.ndarray) -> list[str]:
    """One bounded Arrow gather (the callers cut the ids so that it stays under TAKE_BYTES)."""
    return column.take(pa.array(ids)).to_pylist()


def _pieces(ids: np.ndarray, sizes: np.ndarray, max_ids: int, max_bytes: int) -> Iterator[np.ndarray]:
    """Cut `ids` (in order) into runs of at most max_ids ids and max_bytes bytes of text (a single row longer
    than max_bytes is a run of its own)."""
    for start in range(0, len(ids), max_ids):
        chunk = ids[start:start + max_ids]
        total = np.cumsum(sizes[chunk], dtype=np.int64)
        low, before = 0, 0
        while low < len(chunk):
            high = max(low + 1, int(np.searchsorted(total, before + max_bytes, side="right")))
            yield chunk[low:high]
            before = int(total[high - 1])
            low = high


def _damaged(path: Path, exc: BaseException) -> UserError:
    return UserError(f"{path}: not readable ({short_reason(exc)}): the index is damaged, rebuild it")

class PromptGroups:
    """The prompts of every segment's prompts.parquet as row groups: an id → its group (a table of group
    starts, 8 bytes a group), a group read and decoded only when one of its ids is asked for, the last ones
    kept within PROMPT_CACHE_BYTES. `reads` counts the groups and rows decoded (what tests check)."""

    def __init__(self, paths: list[Path], sources: list, firsts: list[int]) -> None:
        self.paths, self.files = paths, []
        starts, owners = [], []
        for number, (path, source, first) in enumerate(zip(paths, sources, firsts)):
            try:
                parquet = pq.ParquetFile(source)
            except (OSError, pa.ArrowException) as exc:
                raise _damaged(path, exc) from exc
            self.files.append(parquet)
            sizes = [parquet.metadata.row_group(group).num_rows for group in range(parquet.num_row_groups)]
            starts += (first + np.concatenate([[0], np.cumsum(sizes)[:-1]])).astype(np.int64).tolist() if sizes else []
            owners += [(number, group) for group in range(len(sizes))]
        self.starts, self.owners = np.asarray(starts, np.int64), owners
        self.cache: OrderedDict[int, pa.Array] = OrderedDict()
        self.cached_bytes = 0
        self.lock = threading.Lock()
        self.reads = {"row_groups": 0, "rows": 0}

    def group_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, ids, side="right") - 1

    def column(self, group: int) -> pa.Array:
        """The prompt column of one row group (decoded, or from the cache)."""
        with self.lock:
            if group in self.cache:
                self.cache.move_to_end(group)
                return self.cache[group]
            number, within = self.owners[group]
            try:
                column = self.files[number].read_row_group(within, columns=["prompt"]).column("prompt")
            except (OSError, KeyError, pa.ArrowException) as exc:
                raise _damaged(self.paths[number], exc) from exc
            if not _is_text(column.type):
                raise UserError(f"{self.paths[number]}: the prompt column holds {column.type}, not text: the index "
                                "is damaged, rebuild it")
            column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
            self.reads["row_groups"] += 1
            self.reads["rows"] += len(column)
            self.cache[group] = column
            self.cached_bytes += column.nbytes
            while self.cached_bytes > PROMPT_CACHE_BYTES and len(self.cache) > 1:
                _, dropped = self.cache.popitem(last=False)
                self.cached_bytes -= dropped.nbytes
            return column


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

    @property
    def segments(self) -> list[Segment]:
        """Where the rows lie: the build's base files, then each add's segment folder (index/segments.py)."""
        return segments_of(self.manifest)

    @cached_property
    def minilm(self):
        """float16 memmap, or int8 rows dequantised on access (index/minilm_store.py: the one way in), across
        the segments."""
        return concat_rows([minilm_rows(self.root / part.folder, self.manifest, part.count, self.text_dim)
                            for part in self.segments])

    @cached_property
    def clip_vectors(self) -> np.memmap:
        return concat_rows([np.memmap(self.root / part.name(CLIP_VECTORS), dtype=VECTOR_DTYPE, mode="r",
                                      shape=(part.count, self.key_dim)) for part in self.segments])

    @property
    def key_dim(self) -> int:
        """The stored keys' width: clip_dim, or the PCA's dims for an index built with --key-dims."""
        return int((self.manifest.get("key_pca") or {}).get("dims", self.clip_dim))

    @cached_property
    def key_pca(self):
        """The PCA queries go through before search (index/key_pca.py), or None for full-width keys."""
        if "key_pca" not in self.manifest:
            return None
        return load_pca(self.root / KEY_PCA, self.clip_dim, self.key_dim)

    @cached_property
    def minilm_mean(self) -> np.ndarray:
        try:
            mean = np.load(self.root / MINILM_MEAN, allow_pickle=False)
        except Exception as exc:  # a damaged .npy header fails in numpy's parser, with any of several types
            raise _damaged(self.root / MINILM_MEAN, exc) from exc
        if not isinstance(mean, np.ndarray) or mean.shape != (self.text_dim,):
            raise UserError(f"{self.root / MINILM_MEAN}: shape {getattr(mean, 'shape', None)}, expected ({self.text_dim},): the index "
                            "is damaged, rebuild it")
        return mean

    def preload(self) -> None:
        """Map the vectors and open the prompt files now: a reader keeps the files it opened even when a
        rebuild swaps a new index into this folder meanwhile (a long-running server, say)."""
        self.prompt_groups  # noqa: B018 (opens the files)
        for name in ("minilm", "clip_vectors", "minilm_mean", "phrases", "regression_head", "key_pca",
                     "stored_prompt_keys"):
            getattr(self, name)

    @cached_property
    def stored_prompt_keys(self) -> list[np.ndarray | None]:
        """Each segment's sorted dedup keys (index/prompt_keys.py), memory-mapped (nothing read until a lookup),
        None for a segment whose manifest lists no key file (an index written before them)."""
        from img2prompt.index.prompt_keys import stored_keys

        try:
            return [stored_keys(self.root, self.manifest, part) for part in self.segments]
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.root}: a prompt_keys.npy is not readable ({short_reason(exc)}): the index is "
                            "damaged, rebuild it") from exc

    @cached_property
    def prompt_groups(self) -> PromptGroups:
        # a native Arrow file (not a Python file object: Arrow's reader threads must not call back into Python)
        paths = [self.root / part.name(PROMPTS) for part in self.segments]
        try:
            sources = [pa.memory_map(str(path), "r") for path in paths]
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"{self.root}: a prompts file is not readable ({short_reason(exc)}): the index is "
                            "damaged, rebuild it") from exc
        return PromptGroups(paths, sources, [part.first_id for part in self.segments])

    @property
    def prompts(self) -> list[str]:
        """Every prompt as a Python list (small indexes, tests); prefer prompt_rows / iter_prompt_batches."""
        return [prompt for _, batch in self.iter_prompt_batches() for prompt in batch]

    def prompt_rows(self, ids, *, chunk_ids: int | None = None, chunk_bytes: int | None = None) -> list[str]:
        """The prompts with these ids, any number of them (an id < 0, i.e. no neighbour, gives "").

        Only the row groups holding them are read; within a group they are gathered TAKE_IDS ids /
        TAKE_BYTES bytes of text at a time (or `chunk_ids` / `chunk_bytes`)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if len(ids) and int(ids.max()) >= self.count:
            raise IndexError(f"prompt id {int(ids.max())} is past the index's {self.count} prompts")
        found = np.full(len(ids), "", dtype=object)
        wanted = np.flatnonzero(ids >= 0)
        groups = self.prompt_groups
        owner = groups.group_of(ids[wanted])
        order = np.argsort(owner, kind="stable")
        bounds = np.flatnonzero(np.diff(owner[order])) + 1
        for positions in np.split(wanted[order], bounds) if len(order) else []:
            group = int(groups.group_of(ids[positions[:1]])[0])
            column = groups.column(group)
            local = ids[positions] - int(groups.starts[group])
            sizes = pc.binary_length(column).to_numpy(zero_copy_only=False)
            done = 0
            for piece in _pieces(local, sizes, chunk_ids or TAKE_IDS, chunk_bytes or TAKE_BYTES):
                found[positions[done:done + len(piece)]] = _take(column, piece)
                done += len(piece)
        return found.tolist()

    def stream_prompt_batches(self, size: int = 100_000) -> Iterator[list[str]]:
        """The prompts in id order, a batch at a time (add's dedup keys, merge); see iter_prompt_batches."""
        for _, batch in self.iter_prompt_batches(size):
            yield batch

    def iter_prompt_batches(self, size: int = 100_000,
                            parts: Collection[int] | None = None) -> Iterator[tuple[int, list[str]]]:
        """(first id, prompts) in id order, a batch at a time, never the whole column (a batch never spans two
        segments); streamed from the files open_index opened (preload), so a rebuild swapped into the folder
        meanwhile never pairs its prompts with the vectors mapped before it. `parts`: only these segments
        (positions in `segments`)."""
        groups = self.prompt_groups
        for number, (path, parquet, part) in enumerate(zip(groups.paths, groups.files, self.segments)):
            if parts is not None and number not in parts:
                continue
            first = part.first_id
            try:
                for batch in parquet.iter_batches(columns=["prompt"], batch_size=size):
                    yield first, batch.column(0).to_pylist()
                    first += batch.num_rows
            except (OSError, pa.ArrowException) as exc:
                raise _damaged(path, exc) from exc

    def phrase_counts(self) -> list[int]:
        """How many corpus prompts use each vocabulary phrase (phrases.parquet's count column, in its order)."""
        try:
            return pq.read_table(self.root / PHRASES, columns=["count"]).column("count").to_pylist()
        except (OSError, KeyError, pa.ArrowException) as exc:
            raise _damaged(self.root / PHRASES, exc) from exc

    @cached_property
    def phrases(self) -> tuple[list[str], np.ndarray] | None:
        """(phrases, float16 CLIP vectors [n, clip_dim]) of the modifier vocabulary, or None for an index
        built without one."""
        if PHRASES not in self.manifest.get("files", {}):
            return None
        try:
            phrases = pq.read_table(self.root / PHRASES, columns=["phrase"]).column("phrase").to_pylist()
        except (OSError, KeyError, pa.ArrowException) as exc:
            raise _damaged(self.root / PHRASES, exc) from exc
        expected = self.manifest["phrases"]["count"]
        if len(phrases) != expected or not all(isinstance(phrase, str) for phrase in phrases):
            raise UserError(f"{self.root / PHRASES}: {len(phrases)} phrases, the manifest says {expected}: the index "
                            "is damaged, rebuild it")
        vectors = np.memmap(self.root / PHRASE_VECTORS, dtype=VECTOR_DTYPE, mode="r",
                            shape=(len(phrases), self.clip_dim)) if phrases else np.zeros((0, self.clip_dim))
        return phrases, vectors

    @property
    def search_plan(self) -> dict:
        """{"kind", "params", "recall_at_10", ...} of the first key range's backend (format 1: "faiss")."""
        return schema.search_plan(self.manifest)

    @property
    def key_ranges(self) -> list[KeyRange]:
        """The key kinds and where they lie; indexes before format 3 are one text range."""
        return schema.key_ranges(self.manifest)

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
        """The ridge head CLIP → MiniLM (index/ridge.py), or None for an index built without one."""
        if REGRESSION not in self.manifest.get("files", {}):
            return None
        from img2prompt.index.ridge import RidgeHead

        try:
            return RidgeHead.load(self.root / REGRESSION, self.manifest["regression"])
        except Exception as exc:  # a damaged .npz fails in zipfile or numpy's parser, with any of several types
            raise _damaged(self.root / REGRESSION, exc) from exc

    def open_backend(self, device: str = "cpu", key_range: KeyRange | None = None):
        """The search backend of one key range (default: the first) on `device`; its ids are relative to the
        range's first row. A flat range on CUDA searches with torch."""
        from img2prompt.index.backend import backend_class

        key_range = key_range or self.key_ranges[0]
        plan = key_range.plan
        return backend_class(plan["kind"]).load(self.root / key_range.folder,
                                                self.clip_vectors[key_range.start:key_range.stop],
                                                plan.get("params", {}), device)


def check_manifest(root: str | Path, manifest: dict) -> None:
    """Everything a reader needs of a complete index's manifest (version, state, every field's type, file names
    inside the folder): one UserError naming `root` (a folder, or the URL of a remote index, checked before
    any of its files is fetched)."""
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{root}/{MANIFEST}: no format_version: not an img2prompt index")
    if version not in READABLE_VERSIONS:
        raise UserError(f"{root} has index format {version}; this img2prompt reads formats "
                        f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade img2prompt")
    if manifest.get("state") != STATE_COMPLETE:
        shards = manifest.get("shards")
        raise UserError(f"{root} holds an unfinished build ({len(shards) if isinstance(shards, list) else 0} shards "
                        "done): finish it with `img2prompt build ... --resume`")
    schema.validate_complete(f"{root}/{MANIFEST}", manifest)


def open_index(root: str | Path, *, verify: bool = False) -> PromptIndex:
    """Open a complete index; the manifest's schema and file sizes are always checked, sha256 checksums too
    with verify=True, and the side files are read now (a damaged one is one line here, not a traceback later)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"index folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"{root} is not an index folder")
    manifest = read_manifest(root)
    if manifest is None:
        raise UserError(f"{root} is not an index: no {MANIFEST}")
    check_manifest(root, manifest)
    index = PromptIndex(root=root, manifest=manifest)
    _check_files(index, verify)
    if (root / SHARDS).is_dir():
        log.warning("%s: shards/ is left over from a build killed while cleaning up; it is not part of the index "
                    "and can be deleted", root)
    for part in index.segments:
        _check_prompt_file(root / part.name(PROMPTS), part.count)
    index.preload()
    return index


def _is_text(kind) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _check_prompt_file(path: Path, count: int) -> None:
    try:
        prompt_file = pq.ParquetFile(path)
        prompt_rows, prompt_schema = prompt_file.metadata.num_rows, prompt_file.schema_arrow
    except (OSError, pa.ArrowException) as exc:
        raise _damaged(path, exc) from exc
    kind = prompt_schema.field("prompt").type if "prompt" in prompt_schema.names else None
    if kind is None or not _is_text(kind):
        raise UserError(f"{path}: " + (f"the prompt column holds {kind}, not text" if kind else
                                       "no prompt column") + ": the index is damaged, rebuild it")
    if prompt_rows != count:
        raise UserError(f"{path}: {prompt_rows} prompts, the manifest says {count}: rebuild the index")


def _check_files(index: PromptIndex, verify: bool) -> None:
    """Every listed file exists with the recorded size (the vectors' sizes also follow from count × dim)."""
    root, manifest = index.root, index.manifest
    expected_bytes, rows = {}, {}
    for part in index.segments:
        sizes = {**minilm_file_bytes(minilm_dtype(manifest), part.count, index.text_dim),
                 CLIP_VECTORS: part.count * index.key_dim * VECTOR_BYTES}
        expected_bytes.update({part.name(name): size for name, size in sizes.items()})
        rows.update({part.name(name): part.count for name in sizes})
    if PHRASES in manifest["files"]:
        expected_bytes[PHRASE_VECTORS] = manifest["phrases"]["count"] * index.clip_dim * VECTOR_BYTES
    for name, record in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise UserError(f"{path}: index file {name} is missing: the index is damaged, rebuild it")
        size = path.stat().st_size
        if size != record["bytes"] or size != expected_bytes.get(name, size):
            expected = expected_bytes.get(name, record["bytes"])
            raise UserError(f"{path}: {size} bytes, expected {expected}"
                            + (f" ({rows[name]} rows)" if name in rows else "")
                            + (f" (the manifest records {record['bytes']})" if record["bytes"] != expected else "")
                            + ": the index is damaged, rebuild it")
        if verify and file_sha256(path) != record["sha256"]:
            raise UserError(f"{path}: sha256 differs from the manifest: the file is damaged, rebuild the index")
