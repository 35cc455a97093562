"""The settings of the three index jobs (build, add, merge), each default written once.

A setting two jobs share lives in one group below (a keyword-only dataclass base); BuildOptions, AddOptions and
MergeOptions inherit the groups they take, so `dataclasses.fields(AddOptions)` lists the same fields with the
same defaults as before, read from the one definition. An add or a merge runs build's own steps: `as_build`
turns its options into the BuildOptions its job reads (shared groups copied, the rest from the index).
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from img2prompt.encoders import DEFAULT_DEVICE
from img2prompt.build_index.corpus import DEFAULT_MAX_CHARS
from img2prompt.build_index.phrases import MIN_COUNT

DEFAULT_SHARD_SIZE = 100_000


@dataclass(kw_only=True)
class ModelSettings:
    """Build, add, merge: where the models come from and run."""
    clip_pretrained: str | list[str | None] | None = None
    text_model: str | None = None
    device: str = DEFAULT_DEVICE


@dataclass(kw_only=True)
class ShardSettings:
    """Build, add, merge: how the rows are cut into shards (the unit of resume) and shown."""
    shard_size: int = DEFAULT_SHARD_SIZE
    resume: bool = False
    progress: bool = True


@dataclass(kw_only=True)
class CorpusSettings:
    """Build, add: reading and encoding prompt files."""
    column: str = "prompt"
    batch_size: int = 256
    max_chars: int = DEFAULT_MAX_CHARS
    pairs: list[str] | None = None  # (image, prompt) tables: image-keyed entries (build_index/pairs.py)
    # drop a prompt whose MiniLM cosine to a kept one (add: or to an indexed one) is ≥ this (build_index/near_dup.py)
    near_dup: float | None = None


@dataclass(kw_only=True)
class OutputSettings:
    """Build, merge: a new index folder."""
    overwrite: bool = False
    key_dims: int | None = None  # PCA of the CLIP keys to this many dims (index/key_pca.py); None: full width


@dataclass(kw_only=True)
class IndexModels:
    """Add, merge: the models an existing index was built with."""
    # where the index's CLIP weights are here (None: as its manifest names them); the identity must match
    clip_model: str | list[str] | None = None


SHARED_GROUPS = (ModelSettings, ShardSettings, CorpusSettings, OutputSettings)


@dataclass
class BuildOptions(ModelSettings, ShardSettings, CorpusSettings, OutputSettings):
    corpus: list[str]
    out: str
    clip_model: str | list[str]  # several: one index holding each model's keys (img2prompt/clip_ensemble.py)
    precision: str | None = None  # the CLIP towers: fp32 / fp16 / bf16 (None: fp16 autocast on CUDA, fp32 on CPU)
    index: str = "auto"
    max_memory: int | None = None
    recall_queries: int = 1000
    seed: int = 0
    workers: int | None = None  # tokenizing processes (None: cores − 1 on CUDA, in-process on CPU)
    embeddings: list[str] | None = None  # precomputed CLIP text vectors (.npy), row-aligned with the corpus
    phrase_min_count: int = MIN_COUNT  # a modifier phrase needs this many prompts to enter the vocabulary
    engine: str = "local"  # who runs the shard tasks (build_index/engine.py)
    engine_options: dict = field(default_factory=dict)  # the engine's own settings (e.g. a cluster address)
    regression: bool = True  # fit the ridge head CLIP → MiniLM (used only when a query asks for --beta > 0)
    minilm_dtype: str = "fp16"  # "int8": MiniLM rows int8 + per-row scale (index/minilm_store.py, format 4)
    shard_store: str | None = None  # set by `--out URL`: where remote workers send shards (build_index/shard_store.py)


@dataclass
class AddOptions(IndexModels, ModelSettings, ShardSettings, CorpusSettings):
    index: str  # the index folder to grow (not BuildOptions.index, the search kind: that is the index's own)
    corpus: list[str]
    retrain: bool = False  # rebuild the search structure over every row instead of adding to it


@dataclass
class MergeOptions(IndexModels, ModelSettings, ShardSettings, OutputSettings):
    indexes: list[str]
    out: str


def default_of(options_type: type, name: str):
    """A field's default as its dataclass defines it (the one place it is written)."""
    for item in fields(options_type):
        if item.name == name:
            if item.default is not MISSING:
                return item.default
            if item.default_factory is not MISSING:
                return item.default_factory()
    raise KeyError(f"{options_type.__name__} has no default for {name!r}")


def as_build(options, **job) -> BuildOptions:
    """The BuildOptions an add or a merge runs build's steps with: every shared group's values of `options`
    (key_dims only where the job takes it), `job` for the rest (corpus, out, clip_model, ... and
    `index_settings`)."""
    shared = {item.name: getattr(options, item.name)
              for group in SHARED_GROUPS if isinstance(options, group) for item in fields(group)}
    return BuildOptions(**{**shared, **job})


def index_settings(manifest: dict) -> dict:
    """The BuildOptions an add or a merge keeps from the index it grows (or its first input): the search kind,
    the memory bound, the seed, whether it has a regression head."""
    built = manifest.get("build_options", {})
    return {"index": manifest.get("search", {}).get("kind", default_of(BuildOptions, "index")),
            "max_memory": built.get("max_memory"), "seed": built.get("seed", default_of(BuildOptions, "seed")),
            "regression": "regression" in manifest}
