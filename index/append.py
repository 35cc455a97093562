"""The on-disk half of `add`: the grown index is the old one's row files, linked, plus one new segment.

An add writes its grown index in the writer's staging folder (.NAME.rebuild) and swaps it in like a rebuild
(old or new, never a mix). What makes it cost the new rows, not the index: the old index's row files
(prompts, CLIP keys, MiniLM rows of every segment) and its key PCA are hard links into the staging folder
(same filesystem, since the staging folder sits beside the index; no bytes copied, their manifest records
reused, not re-hashed), and the new rows become the next segment (index/segments.py). Files are never
changed in place (every write is temp + rename), so a link shared by the old and the new index stays valid
for both; readers that still hold the old index keep reading it.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from img2prompt.atomic import atomic_path, fsync_dir
from img2prompt.index.key_pca import write_projected
from img2prompt.index.layout import (CLIP_VECTORS, KEY_PCA, MINILM, MINILM_MEAN, PROMPT_KEYS, PROMPTS,
                                     VECTOR_DTYPE)
from img2prompt.index.prompt_keys import save_keys, segment_key_names
from img2prompt.index.minilm_store import INT8, minilm_dtype, minilm_file_names, write_int8
from img2prompt.index.reader import PromptIndex
from img2prompt.index.segments import segment_folder, segments_of
from img2prompt.index.writer import IndexWriter, _save_array

log = logging.getLogger(__name__)

_BLOCK = 65_536


@dataclass
class AppendedRows:
    grown: PromptIndex  # the staging folder read as the grown index (every row, old then new)
    segments: list[dict]  # the manifest's "segments"
    linked: dict[str, dict]  # {name: record} of the old index's files linked in unchanged
    new_files: tuple[str, ...]  # the new segment's files
    first_id: int  # the first new row's id
    keys_written: tuple[str, ...] = ()  # key files written for old segments that had none (prompt_keys.py)


def row_file_names(manifest: dict) -> list[str]:
    """Every row file of an index (each segment's prompts, keys and MiniLM rows), and its key PCA."""
    names = [part.name(name) for part in segments_of(manifest)
             for name in (PROMPTS, CLIP_VECTORS) + minilm_file_names(minilm_dtype(manifest))]
    return names + segment_key_names(manifest) + ([KEY_PCA] if KEY_PCA in manifest.get("files", {}) else [])


def link_file(source: Path, target: Path) -> bool:
    """`target` becomes a hard link to `source` (atomically replacing what is there); where the filesystem
    has no hard links, a copy. Returns whether it linked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and os.path.samefile(source, target):
        return True
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
            return True
        except OSError as exc:
            log.warning("cannot hard-link %s (%s): copying it", source, exc.strerror)
            shutil.copyfile(source, tmp)
            return False


def append_segment(writer: IndexWriter, old: PromptIndex,
                   computed_keys: dict[str, np.ndarray] | None = None) -> AppendedRows:
    """Link `old`'s row files into the writer's folder, write the writer's committed shards as the next
    segment (keys through the index's PCA, MiniLM rows in its dtype) and the updated MiniLM mean.
    `computed_keys`: {key file name: sorted unique keys} of old segments that had no key file (an index
    written before them; IndexKeys.computed): written beside their linked rows, so the next add reads them."""
    root, manifest = writer.root, old.manifest
    linked = {}
    for name in row_file_names(manifest):
        link_file(old.root / name, root / name)
        linked[name] = manifest["files"][name]
    keys_written = _write_missing_keys(root, manifest, computed_keys or {})
    previous = manifest.get("segments") or []
    if writer.rows_committed() == 0:  # nothing new (an add that only retrains): the old rows and mean as they are
        link_file(old.root / MINILM_MEAN, root / MINILM_MEAN)
        linked[MINILM_MEAN] = manifest["files"][MINILM_MEAN]
        return AppendedRows(PromptIndex(root=root, manifest=manifest), previous, linked, (), old.count, keys_written)
    number = (previous[-1]["number"] + 1) if previous else 1
    folder = segment_folder(number)
    count, _, _ = writer.consolidate(into=folder, first_id=old.count)
    new_root = root / folder
    if old.key_pca is not None:
        _project_keys(new_root, old.key_pca, count, old.clip_dim)
    if minilm_dtype(manifest) == INT8:
        full = np.memmap(new_root / MINILM, dtype=VECTOR_DTYPE, mode="r", shape=(count, old.text_dim))
        write_int8(new_root, (full[start:start + _BLOCK] for start in range(0, count, _BLOCK)))
        del full
        (new_root / MINILM).unlink()
    segments = previous + [{"number": number, "first_id": old.count, "count": count}]
    grown_manifest = {**manifest, "count": old.count + count, "segments": segments}
    grown = PromptIndex(root=root, manifest=grown_manifest)
    total = old.minilm_mean.astype(np.float64) * old.count
    for block in writer.iter_shard_arrays("minilm"):  # the fp16 rows, as a build sums them (before any int8)
        total += block.astype(np.float64).sum(axis=0)
    _save_array(root / MINILM_MEAN, (total / grown.count).astype(np.float32))
    fsync_dir(new_root)
    names = (PROMPTS, CLIP_VECTORS) + minilm_file_names(minilm_dtype(manifest))
    new_files = tuple(f"{folder}/{name}" for name in names + ((PROMPT_KEYS,) if (new_root / PROMPT_KEYS).is_file() else ()))
    return AppendedRows(grown, segments, linked, new_files, old.count, keys_written)


def _write_missing_keys(root: Path, manifest: dict, computed: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The computed keys of the old segments whose key file the manifest lacks, written (atomically) into the
    staging folder: new files there, none shared with the old index, listed by the new manifest only."""
    names = [name for name in computed if name not in manifest.get("files", {})]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        save_keys(root / name, computed[name])
    return tuple(names)


def _project_keys(folder: Path, pca, count: int, clip_dim: int) -> None:
    """An index built with --key-dims stores projected keys: the new full-width keys go through its PCA."""
    full = np.memmap(folder / CLIP_VECTORS, dtype=VECTOR_DTYPE, mode="r", shape=(count, clip_dim))
    write_projected(folder / CLIP_VECTORS, pca, full)
    del full
