"""The retrieval settings: one validated dataclass from every front end (CLI, server, notebook, API) to the one
prediction path.

A setting is checked twice, in one place each: its own range when the dataclass is made (`__post_init__`),
and against an opened index's manifest (`check_for`: k against the prompt count, model weights against the
CLIP models, beta against the regression head) before any model loads or image is decoded. Errors are
`SettingError`s naming the setting's field; front ends re-label them with their own flag or field names.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

from img2prompt.errors import UserError
from img2prompt.memory import max_workers

# Provisional: chosen without real CLIP weights (none are available where this was written); tune them
# on real weights with `img2prompt eval INDEX --labels ... --sweep` and pass the winners to submit.
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.05
DEFAULT_ALPHA = 0.0
DEFAULT_CONSENSUS = 0.0  # off until eval on real weights shows it helps
DEFAULT_BETA = 0.0  # off until eval on real weights shows it helps
DEFAULT_MIN_SCORE = None  # off: every one of the k neighbours is blended
WEIGHTINGS = ("softmax", "inverse-distance")  # how the k neighbours' similarities become blend weights
DEFAULT_WEIGHTING = "softmax"
# The public CLIP-H kNN notebook's weights: 1 / (d^6 + 1e-4), d = 1 - cosine (used with k = 100-150).
DEFAULT_POWER = 6.0
DEFAULT_EPSILON = 1e-4
# Search (ranked prompts, no blend): results per query, for `img2prompt search`, the server's /search and the API.
DEFAULT_SEARCH_K = 10
DEFAULT_SUBMISSION = "submission.csv"  # where `submit` writes unless told


class SettingError(UserError):
    """A retrieval setting out of range; `setting` is the field name, the message starts with its label."""

    def __init__(self, setting: str, reason: str, label: str | None = None) -> None:
        self.setting, self.reason = setting, reason
        super().__init__(f"{label or setting} {reason}")

    def relabel(self, label_of: Callable[[str], str]) -> "SettingError":
        """The same error under a front end's name for the setting (e.g. `--k` for the CLI)."""
        return SettingError(self.setting, self.reason, label_of(self.setting))


def cli_flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def _number(setting: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise SettingError(setting, f"must be {'an integer' if kind is int else 'a number'} (got {value!r})")
    return kind(value)


def parse_model_weights(value: str | Sequence[float]) -> tuple[float, ...]:
    """"0.7,0.3" or numbers → finite weights ≥ 0 with a positive finite sum, normalised to sum 1."""
    text = value if isinstance(value, str) else ",".join(str(weight) for weight in value)
    try:
        weights = [float(piece.strip()) for piece in text.split(",")] if isinstance(value, str) \
            else [float(weight) for weight in value]
    except (TypeError, ValueError):
        raise SettingError("model_weights", f"{text!r}: give numbers separated by commas, e.g. 0.7,0.3") from None
    if not weights or not all(math.isfinite(weight) and weight >= 0 for weight in weights) or max(weights) <= 0:
        raise SettingError("model_weights", f"{text!r}: every weight must be a finite number ≥ 0 and their sum > 0 "
                                            "(and finite)")
    # Scaled before dividing: weights near the float limit (1e308,1e308) do not overflow to [0, 0].
    largest = max(weights)
    scaled = [weight / largest for weight in weights]
    return tuple(weight / math.fsum(scaled) for weight in scaled)


@dataclass(frozen=True, kw_only=True)
class RetrievalSettings:
    """Everything that turns a query's neighbours into a prediction; valid once made."""
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA
    consensus: float = DEFAULT_CONSENSUS
    beta: float = DEFAULT_BETA
    model_weights: tuple[float, ...] | None = None  # an index of several CLIP models: Σ w_m · cos_m (None: equal)
    min_score: float | None = DEFAULT_MIN_SCORE  # neighbours scoring under it leave the blend (the best one stays)
    weighting: str = DEFAULT_WEIGHTING  # softmax(similarity / temperature), or inverse-distance (power, epsilon)
    power: float = DEFAULT_POWER  # inverse-distance: w ∝ 1 / (d^power + epsilon), d = 1 - cosine
    epsilon: float = DEFAULT_EPSILON

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised values are written once, here
        set_(self, "k", _number("k", self.k, int))
        for name in ("temperature", "alpha", "consensus", "beta", "power", "epsilon"):
            set_(self, name, _number(name, getattr(self, name), float))
        self._check_weighting()
        if self.k < 1:
            raise SettingError("k", f"must be at least 1 (got {self.k})")
        if not self.temperature > 0:
            raise SettingError("temperature", f"must be > 0 (got {self.temperature})")
        if not math.isfinite(self.temperature):
            raise SettingError("temperature", f"must be finite (got {self.temperature})")
        if not 0.0 <= self.alpha <= 1.0:
            raise SettingError("alpha", f"must be between 0 and 1 (got {self.alpha})")
        if not 0.0 <= self.consensus < math.inf:
            raise SettingError("consensus", f"must be 0 or more, and finite (got {self.consensus})")
        if not 0.0 <= self.beta <= 1.0:
            raise SettingError("beta", f"must be between 0 and 1 (got {self.beta})")
        if self.model_weights is not None:
            set_(self, "model_weights", parse_model_weights(self.model_weights))
        if self.min_score is not None:
            set_(self, "min_score", _number("min_score", self.min_score, float))
            if not -1.0 <= self.min_score <= 1.0:
                raise SettingError("min_score", f"must be a cosine between -1 and 1 (got {self.min_score})")

    def _check_weighting(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise SettingError("weighting", f"must be one of {', '.join(WEIGHTINGS)} (got {self.weighting!r})")
        for name in ("power", "epsilon"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise SettingError(name, f"must be > 0 and finite (got {value})")

    def weighing(self) -> dict:
        """The fields that turn similarities into k-NN weights (query/blend.py similarity_weights' keywords)."""
        return {"weighting": self.weighting, "temperature": self.temperature, "power": self.power,
                "epsilon": self.epsilon}

    def replace(self, **changes: Any) -> "RetrievalSettings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, settings: "RetrievalSettings | None" = None, **changes: Any) -> "RetrievalSettings":
        """`settings` (default: the defaults) with these fields changed: the API's keyword form."""
        unknown = set(changes) - {item.name for item in fields(cls)}
        if unknown:
            raise TypeError(f"unknown retrieval setting(s): {', '.join(sorted(unknown))}")
        base = settings or cls()
        return base.replace(**changes) if changes else base

    def as_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["model_weights"] = list(self.model_weights) if self.model_weights is not None else None
        return values

    def check_for(self, index) -> "RetrievalSettings":
        """Checked against an opened index (a PromptIndex: its manifest, no model needed)."""
        if self.k > index.count:
            raise SettingError("k", f"{self.k} is larger than the index ({index.count} prompts)")
        members = index.clip_identity.get("members")
        if self.model_weights is not None:
            shown = ",".join(f"{weight:g}" for weight in self.model_weights)
            if not members:
                raise SettingError("model_weights", f"{shown}: the index holds one CLIP model (build with several "
                                                    "--clip-model to weigh them)")
            if len(self.model_weights) != len(members):
                raise SettingError("model_weights", f"{shown} gives {len(self.model_weights)} weights but the index "
                                                    f"holds {len(members)} CLIP models: give one per model, in the "
                                                    "order they were built")
        if self.beta > 0:
            require_head(index)
        return self


def require_head(index) -> None:
    """The regression head that a beta > 0 mixes in must be in the index."""
    if index.regression_head is None:
        raise SettingError("beta", f"needs the index's regression head, and {index.root} has none (built "
                                   "with --no-regression-head, or by an older img2prompt): rebuild it")


@dataclass(frozen=True)
class ImageLoading:
    """How images are decoded and encoded (not part of what a prediction is): batch size, decoding workers,
    a progress bar. Checked when made, like the retrieval settings."""
    batch_size: int | None = None
    workers: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or self.batch_size < 1):
            raise SettingError("batch_size", f"must be at least 1 (got {self.batch_size})")
        if self.workers is not None and self.workers < 0:
            raise SettingError("workers", f"must be 0 or more (got {self.workers})")
        if self.workers is not None and self.workers > max_workers():
            raise SettingError("workers", f"must be at most {max_workers()}, the cores here (got {self.workers})")
