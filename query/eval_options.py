"""`eval`'s options: the one options type of the eval job, its API keyword form, and the sweep grid's defaults."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from img2prompt.errors import UserError
from img2prompt.query.settings import WEIGHTINGS, ImageLoading, RetrievalSettings

SWEEP_K = (1, 2, 3, 5, 10, 20, 30, 50, 100, 150)  # 100-150: the public CLIP kNN notebook's k
SWEEP_TEMPERATURE = (0.01, 0.02, 0.05, 0.1, 0.2, 1.0)
SWEEP_WEIGHTING = WEIGHTINGS  # both families: softmax over T, inverse distance over power × epsilon
SWEEP_POWER = (2.0, 4.0, 6.0, 8.0, 12.0)
SWEEP_EPSILON = (1e-4,)
SWEEP_ALPHA = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # alpha = 1 is the corpus-mean prediction
SWEEP_CONSENSUS = (0.0, 3.0, 10.0)
SWEEP_BETA = (0.0, 0.25, 0.5, 1.0)  # beta = 1 is the regression head alone (swept only where the index has one)


@dataclass
class EvalOptions:
    labels: str
    settings: RetrievalSettings = dataclasses.field(default_factory=RetrievalSettings)  # the chosen setting
    loading: ImageLoading = dataclasses.field(default_factory=lambda: ImageLoading(progress=True))
    text_model: str | None = None  # the scorer for the ground truth (default: as the index names it)
    images: str | None = None
    sweep: bool = False
    plot: str | None = None
    out: str | None = None
    exclude_exact: bool = False
    sweep_k: tuple = SWEEP_K
    sweep_temperature: tuple = SWEEP_TEMPERATURE
    sweep_weighting: tuple = SWEEP_WEIGHTING  # the families swept (the best of each is reported)
    sweep_power: tuple = SWEEP_POWER
    sweep_epsilon: tuple = SWEEP_EPSILON
    sweep_alpha: tuple = SWEEP_ALPHA
    sweep_consensus: tuple = SWEEP_CONSENSUS
    sweep_beta: tuple = SWEEP_BETA
    sweep_model_weights: tuple | None = None  # an index of several CLIP models (default: see model_weightings)
    captions: dict[str, str] | list[tuple[str, str]] | None = None  # NAME -> imgId,prompt CSV of a captioner


def eval_options(labels: str | Path, settings: RetrievalSettings | None = None, *, batch_size: int | None = None,
                 workers: int | None = None, progress: bool = True, **fields) -> EvalOptions:
    """EvalOptions from the API's keyword form: retrieval settings' fields go into `settings`, the rest are
    EvalOptions fields (sweep, images, captions, …)."""
    names = {item.name for item in dataclasses.fields(RetrievalSettings)}
    changes = {name: fields.pop(name) for name in list(fields) if name in names}
    return EvalOptions(labels=str(labels), settings=RetrievalSettings.of(settings, **changes),
                       loading=ImageLoading(batch_size, workers, progress), **fields)


def caption_sets(captions: dict[str, str] | list[tuple[str, str]] | None) -> dict[str, str]:
    """NAME -> path, refusing a name given twice (each set is one row of the report)."""
    pairs = list(captions.items()) if isinstance(captions, dict) else list(captions or [])
    sets: dict[str, str] = {}
    for name, path in pairs:
        if not name:
            raise UserError(f"--captions {path}: give it a name, as NAME=captions.csv")
        if name in sets:
            raise UserError(f"--captions: the name {name!r} is given twice")
        sets[name] = str(path)
    return sets
