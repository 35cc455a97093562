"""The index folder's file names, dtype and checksums: the one place that knows what lies where.

    INDEX_DIR/
      manifest.json        format version, state, models (+ weight sha256), dims, count, files + checksums
      prompts.parquet      id (int64), prompt (string), key (string: "text" or "image"); row i is prompt id i;
                           row groups of PROMPT_GROUP_ROWS rows (readers fetch a prompt by its group)
      minilm.f16           float16 [count, text_dim], L2-normalised scorer embeddings, row i ↔ prompt id i
      clip.f16             float16 [count, clip_dim], L2-normalised CLIP embeddings: the searchable keys, CLIP
                           *text* vectors of the corpus prompts, then CLIP *image* vectors of `build --pairs`
                           images (rows in that order; the manifest's "key_ranges" say where each kind lies)
                           (flat/torch search them directly; approximate kinds re-rank from them)
      minilm.i8 + minilm_scale.f32  instead of minilm.f16 with `build --minilm-dtype int8` (format 4)
      minilm_mean.npy      float32 [text_dim], mean of the MiniLM rows (the corpus-mean prediction)
      prompt_keys.npy      uint64, sorted unique dedup keys of prompts.parquet (index/prompt_keys.py; add reads
                           them; also in each segment folder; optional: indexes before it compute them)
      clip.faiss           only for approximate kinds (hnsw, ivfpq): the FAISS index, inner product, ids = prompt ids
      image_keys/          the image-keyed range's own backend files (same names), when it has an approximate kind
      regression.npz       the ridge head CLIP → MiniLM (index/ridge.py), when the build fitted one
      phrases.parquet      modifier vocabulary mined from the corpus (phrase, count); phrases.f16 its CLIP
                           vectors (both optional: indexes built before they existed open without them)
      segments/NNNNN/      rows appended by `add` (prompts.parquet, clip.f16, minilm.* as above; format 5): the
                           manifest's "segments" say where; ids continue after the base files' rows
      regression_stats.npz the ridge head's sufficient statistics (XᵀX, XᵀY, sums, held-out ids): an add
                           refits the head from them and the new rows only
      key_pca.npz          with `build --key-dims`: the PCA that projects keys and queries (index/key_pca.py)
      shards/NNNNN.*       row-aligned shards while a build runs (deleted once the index is complete)
      .lock                held (flock) by the build writing the folder; removed when the build completes

Every file is written to a temp name (.NAME.PID.RANDOM.tmp, img2prompt/atomic.py), fsynced and renamed.
A rebuild of a complete index is written beside it in .NAME.rebuild and swapped in when complete.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

FORMAT_VERSION = 3  # 2: flat indexes keep one copy of the vectors; 3: key ranges (image-keyed entries)
INT8_FORMAT_VERSION = 4  # int8 MiniLM (index/minilm_store.py) or PCA keys: readers before 4 refuse it by version
SEGMENT_FORMAT_VERSION = 5  # rows in segments (index/segments.py), an index grown by `add`: readers before 5
# would read only the base rows, so they refuse it by version
READABLE_VERSIONS = (1, 2, 3, 4, 5)  # fp16 builds without PCA keys still write 3
MANIFEST = "manifest.json"
PROMPTS = "prompts.parquet"
PROMPT_KEYS = "prompt_keys.npy"  # sorted uint64 dedup keys of the folder's prompts (index/prompt_keys.py)
MINILM = "minilm.f16"
MINILM_I8 = "minilm.i8"  # instead of MINILM with int8 storage: int8 [count, text_dim]
MINILM_SCALE = "minilm_scale.f32"  # ... and its float32 [count] per-row scale
CLIP_VECTORS = "clip.f16"
MINILM_MEAN = "minilm_mean.npy"
FAISS = "clip.faiss"
SHARDS = "shards"
LOCK = ".lock"  # held (flock) by the build writing the folder
PHRASES = "phrases.parquet"  # the modifier vocabulary (phrase, count) for readable prompts
PHRASE_VECTORS = "phrases.f16"  # float16 [phrases, clip_dim], L2-normalised CLIP text vectors of the phrases
REGRESSION = "regression.npz"
REGRESSION_STATS = "regression_stats.npz"  # the head's sufficient statistics (index/ridge.py), for add
KEY_PCA = "key_pca.npz"  # build --key-dims: the PCA projecting keys and queries (index/key_pca.py)
SEGMENTS = "segments"  # rows appended by add: segments/NNNNN/ (index/segments.py)
IMAGE_KEYS_FOLDER = "image_keys"  # the image range's backend files
STATE_BUILDING = "building"
STATE_COMPLETE = "complete"
PROMPT_GROUP_ROWS = 16_384  # rows of a prompts.parquet row group: a lookup by id decodes one group, not the file
VECTOR_DTYPE = np.float16
VECTOR_BYTES = np.dtype(VECTOR_DTYPE).itemsize
INDEX_FILES = (PROMPTS, MINILM, CLIP_VECTORS, MINILM_MEAN)  # every kind has these; backends add their own
OPTIONAL_FILES = (FAISS, REGRESSION, REGRESSION_STATS, PHRASES, PHRASE_VECTORS)
SHARD_SUFFIXES = {"prompts": ".parquet", "clip": ".clip.npy", "minilm": ".minilm.npy"}
# a merge into an int8 index also keeps each row's int8 MiniLM bytes as its input stored them (no requantising)
SHARD_INT8_SUFFIXES = {"minilm_i8": ".minilm_i8.npy", "minilm_scale": ".minilm_scale.npy"}
TEXT_KEYS, IMAGE_KEYS = "text", "image"
KEY_KINDS = (TEXT_KEYS, IMAGE_KEYS)
# atomic.py's temp names: .NAME.PID.RANDOM.tmp
TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")


def shard_path(root: Path, number: int, kind: str) -> Path:
    return Path(root) / SHARDS / f"{number:05d}{SHARD_SUFFIXES.get(kind) or SHARD_INT8_SUFFIXES[kind]}"


def staging_folder(final: Path) -> Path:
    """Where a rebuild of the complete index at `final` is written before it is swapped in."""
    return final.parent / f".{final.name}.rebuild"


def retired_folder(final: Path, pid: int) -> Path:
    """Where the old index waits to be deleted when the swap cannot be one atomic exchange."""
    return final.parent / f".{final.name}.old-{pid}"


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
