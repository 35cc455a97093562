"""Closed-form ridge "head": CLIP key vectors → MiniLM scorer vectors, fitted in one streamed pass.

prediction(q) = normalise((q − μ_m) W + ȳ),   W = (Σ_m X_cmᵀX_cm + λI)⁻¹ Σ_m X_cmᵀY_cm,

X_cm = the keys of modality m centred by their own mean μ_m (this removes CLIP's text/image modality gap, so
a map fitted on text keys applies to image queries centred by the image mean); Y_c = targets centred by the
global mean ȳ. Only float64 sums are kept (n, Σx, Σy, XᵀX, XᵀY per modality), so memory is O(d² + d·t)
whatever the corpus size. λ = r · tr(XcᵀXc)/d, r chosen on a held-out slice (rows with id % stride == 0)
by mean cosine, then the map is refitted on all rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from img2prompt.atomic import write_atomic
from img2prompt.errors import UserError, short_reason

RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_RATIO = 1e-2  # used when nothing is held out to choose with (tiny corpora); the result says so
MODALITIES = ("text", "image")


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


class _Moments:
    """float64 running sums of one key modality."""

    def __init__(self, key_dim: int, target_dim: int) -> None:
        self.n = 0
        self.sx, self.sy = np.zeros(key_dim), np.zeros(target_dim)
        self.sxx, self.sxy = np.zeros((key_dim, key_dim)), np.zeros((key_dim, target_dim))

    def add(self, keys: np.ndarray, targets: np.ndarray) -> None:
        x, y = np.asarray(keys, dtype=np.float64), np.asarray(targets, dtype=np.float64)
        self.n += len(x)
        self.sx, self.sy = self.sx + x.sum(axis=0), self.sy + y.sum(axis=0)
        self.sxx, self.sxy = self.sxx + x.T @ x, self.sxy + x.T @ y

    def merge(self, other: _Moments) -> None:
        self.n += other.n
        self.sx, self.sy = self.sx + other.sx, self.sy + other.sy
        self.sxx, self.sxy = self.sxx + other.sxx, self.sxy + other.sxy


def _centred(stats: dict[str, _Moments]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(XcᵀXc, XcᵀYc, {modality: μ_m}, ȳ) from the sums, over the modalities that have rows."""
    live = {m: s for m, s in stats.items() if s.n}
    y_mean = sum(s.sy for s in live.values()) / sum(s.n for s in live.values())
    means = {m: s.sx / s.n for m, s in live.items()}
    # XcᵀXc = S_xx − n μμᵀ and XcᵀYc = S_xy − μ s_yᵀ: the ȳ term vanishes because Σ(x − μ_m) = 0
    xtx = sum(s.sxx - s.n * np.outer(means[m], means[m]) for m, s in live.items())
    xty = sum(s.sxy - np.outer(means[m], s.sy) for m, s in live.items())
    return xtx, xty, means, y_mean


def solve_ridge(xtx: np.ndarray, xty: np.ndarray, lam: float) -> np.ndarray:
    """float64 W = (XcᵀXc + λI)⁻¹ XcᵀYc, by a linear solve rather than an explicit inverse."""
    return np.linalg.solve(xtx + lam * np.eye(len(xtx)), xty)


def _scale(xtx: np.ndarray) -> float:
    # λ = r · (mean eigenvalue of XcᵀXc): r is then comparable across corpus sizes and key spreads
    return float(np.trace(xtx)) / len(xtx) or 1.0  # 1 when the keys do not vary at all


class RidgeAccumulator:
    """Streams (keys, targets) chunks into float64 sums; `fit` picks λ on the held-out rows and solves.

    Rows with global id % stride == 0 are held out (kept in memory, in their input dtype) until
    `max_heldout` of them are held; after that no more rows are held out: later rows with id % stride == 0
    simply train, so memory stays bounded and no row is wasted.
    """

    def __init__(self, key_dim: int, target_dim: int, *, stride: int, max_heldout: int = 10_000) -> None:
        if stride < 1 or max_heldout < 0:
            raise ValueError(f"stride must be >= 1 and max_heldout >= 0 (got {stride}, {max_heldout})")
        self.key_dim, self.target_dim, self.stride, self.max_heldout = key_dim, target_dim, stride, max_heldout
        self._train = {m: _Moments(key_dim, target_dim) for m in MODALITIES}
        self._held: list[tuple[str, np.ndarray, np.ndarray]] = []
        self._held_ids: list[np.ndarray] = []  # the held rows' ids (what the saved state keeps of them)
        self._held_rows = 0

    def add(self, keys: np.ndarray, targets: np.ndarray, first_row: int, modality: str = "text") -> None:
        """keys [n, d], targets [n, t] (any float dtype, e.g. float16 memmap slices); first_row = id of keys[0]."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES} (got {modality!r})")
        keys, targets = np.asarray(keys), np.asarray(targets)
        if keys.ndim != 2 or keys.shape[1] != self.key_dim or targets.shape != (len(keys), self.target_dim):
            raise ValueError(f"keys {keys.shape}, targets {targets.shape}: "
                             f"expected [n, {self.key_dim}], [n, {self.target_dim}]")
        held = (first_row + np.arange(len(keys))) % self.stride == 0
        held[np.flatnonzero(held)[self.max_heldout - self._held_rows:]] = False  # past the cap: train on them
        if held.any():
            self._held.append((modality, keys[held], targets[held]))  # boolean indexing copies (even a memmap)
            self._held_ids.append(first_row + np.flatnonzero(held))
            self._held_rows += int(held.sum())
        self._train[modality].add(keys[~held], targets[~held])

    # the sufficient statistics, kept beside the head so that an add refits from them and its new rows only
    def save_state(self, path: str | Path) -> None:
        """The float64 sums per modality and the held-out rows' ids (their vectors stay in the index)."""
        arrays = {"stride": np.int64(self.stride), "max_heldout": np.int64(self.max_heldout),
                  "dims": np.asarray([self.key_dim, self.target_dim], np.int64)}
        for m, moments in self._train.items():
            arrays.update({f"{m}_n": np.int64(moments.n), f"{m}_sx": moments.sx, f"{m}_sy": moments.sy,
                           f"{m}_sxx": moments.sxx, f"{m}_sxy": moments.sxy})
        for m in MODALITIES:
            ids = [ids for (modality, _, _), ids in zip(self._held, self._held_ids) if modality == m]
            arrays[f"{m}_held_ids"] = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        write_atomic(path, lambda handle: np.savez(handle, **arrays))

    @classmethod
    def load_state(cls, path: str | Path, keys, targets) -> RidgeAccumulator:
        """The accumulator `save_state` wrote, checked against the index (read_state); the held-out rows are
        read back by id from `keys` / `targets` (the index's CLIP and MiniLM rows)."""
        data = read_state(path, len(keys), keys.shape[1], targets.shape[1])
        key_dim, target_dim = (int(d) for d in data["dims"])
        state = cls(key_dim, target_dim, stride=int(data["stride"]), max_heldout=int(data["max_heldout"]))
        for m, moments in state._train.items():
            moments.n = int(data[f"{m}_n"])
            moments.sx, moments.sy = data[f"{m}_sx"], data[f"{m}_sy"]
            moments.sxx, moments.sxy = data[f"{m}_sxx"], data[f"{m}_sxy"]
            ids = data[f"{m}_held_ids"].astype(np.int64)
            if len(ids):
                state._held.append((m, np.asarray(keys[ids]), np.asarray(targets[ids])))
                state._held_ids.append(ids)
                state._held_rows += len(ids)
        return state

    def _all_rows(self) -> dict[str, _Moments]:  # training sums + the held-out rows
        full = {m: _Moments(self.key_dim, self.target_dim) for m in MODALITIES}
        for m, moments in self._train.items():
            full[m].merge(moments)
        for m, keys, targets in self._held:
            full[m].add(keys, targets)
        return full

    def solve(self, lam: float) -> np.ndarray:
        """float64 W of all rows (training + held out) for a given absolute λ."""
        xtx, xty, _, _ = _centred(self._all_rows())
        return solve_ridge(xtx, xty, lam)

    def _choose_ratio(self) -> tuple[float, dict]:
        training_rows = sum(s.n for s in self._train.values())
        scored = [(m, k, y) for m, k, y in self._held if self._train[m].n]  # a modality needs a training mean
        base = {"rows": self._held_rows, "training_rows": training_rows,
                "scored_rows": sum(len(k) for _, k, _ in scored)}
        if not scored:
            return DEFAULT_RATIO, {**base, "cosine_by_ratio": {}, "chosen_cosine": None,
                                   "note": f"no held-out rows to score: default ratio {DEFAULT_RATIO}"}
        xtx, xty, means, y_mean = _centred(self._train)  # held-out rows are centred by the training means
        queries = np.concatenate([np.asarray(k, dtype=np.float64) - means[m] for m, k, _ in scored])
        truth = _unit(np.concatenate([np.asarray(y, dtype=np.float64) for _, _, y in scored]))
        cosine = {}
        for ratio in RIDGE_GRID:
            predicted = _unit(queries @ solve_ridge(xtx, xty, ratio * _scale(xtx)) + y_mean)
            cosine[ratio] = float(np.mean(np.sum(predicted * truth, axis=1)))
        best = max(RIDGE_GRID, key=lambda r: (cosine[r], r))  # ties → the larger λ (the safer map)
        return best, {**base, "cosine_by_ratio": {str(r): c for r, c in cosine.items()}, "chosen_cosine": cosine[best]}

    def fit(self) -> RidgeHead:
        full = self._all_rows()
        if not any(s.n for s in full.values()):
            raise ValueError("no rows were added: nothing to fit")
        ratio, heldout = self._choose_ratio()
        xtx, xty, means, y_mean = _centred(full)
        # the ratio is what was chosen; λ is re-scaled to all rows, since XcᵀXc grows with the row count
        lam = ratio * _scale(xtx)
        return RidgeHead(weights=solve_ridge(xtx, xty, lam).astype(np.float32),
                         key_means={m: mu.astype(np.float32) for m, mu in means.items()},
                         target_mean=y_mean.astype(np.float32), lam=float(lam), ratio=float(ratio),
                         heldout=heldout, rows={m: s.n for m, s in full.items() if s.n})


def _state_shapes(key_dim: int, target_dim: int) -> dict[str, tuple | None]:
    """Every array save_state writes and its shape (None: any length, 1-D)."""
    shapes: dict[str, tuple | None] = {"stride": (), "max_heldout": (), "dims": (2,)}
    for m in MODALITIES:
        shapes.update({f"{m}_n": (), f"{m}_sx": (key_dim,), f"{m}_sy": (target_dim,),
                       f"{m}_sxx": (key_dim, key_dim), f"{m}_sxy": (key_dim, target_dim), f"{m}_held_ids": None})
    return shapes


def _array_problem(arrays: dict[str, np.ndarray], name: str, shape: tuple | None) -> str | None:
    """What is wrong with one saved array (present, integer or float as written, its shape, finite), or None."""
    if name not in arrays:
        return f"no {name!r} array"
    array, integer = arrays[name], name in ("stride", "max_heldout", "dims") or name.endswith(("_n", "_ids"))
    if array.dtype.kind not in ("iu" if integer else "f"):
        return f"{name!r} holds {array.dtype}, expected {'integers' if integer else 'floats'}"
    if (array.ndim != 1) if shape is None else (array.shape != shape):
        return f"{name!r} has shape {array.shape}, expected " + ("one dimension" if shape is None else str(shape))
    if not integer and not np.isfinite(array).all():
        return f"{name!r} holds NaN or infinite sums"
    return None


def _state_problem(arrays: dict[str, np.ndarray], rows: int, key_dim: int, target_dim: int) -> str | None:
    """What is wrong with the saved statistics of an index of `rows` rows and these dims, or None."""
    for name, shape in _state_shapes(key_dim, target_dim).items():
        problem = _array_problem(arrays, name, shape)
        if problem:
            return problem
    if tuple(int(d) for d in arrays["dims"]) != (key_dim, target_dim):
        return f"dims {arrays['dims'].tolist()}, the index's keys and MiniLM rows are ({key_dim}, {target_dim})"
    if int(arrays["stride"]) < 1 or int(arrays["max_heldout"]) < 0:
        return f"stride {int(arrays['stride'])}, max_heldout {int(arrays['max_heldout'])}: expected ≥ 1 and ≥ 0"
    ids = np.concatenate([arrays[f"{m}_held_ids"].astype(np.int64) for m in MODALITIES])
    counts = [int(arrays[f"{m}_n"]) for m in MODALITIES]
    if len(ids) and (ids.min() < 0 or ids.max() >= rows or len(np.unique(ids)) != len(ids)):
        return f"held-out row ids from {ids.min()} to {ids.max()} (or repeated), for an index of {rows} rows"
    if min(counts) < 0 or sum(counts) + len(ids) > rows:
        return f"row counts {counts} and {len(ids)} held out, for an index of {rows} rows"
    return None


def read_state(path: str | Path, rows: int, key_dim: int, target_dim: int) -> dict[str, np.ndarray]:
    """The arrays of a regression_stats.npz, checked against the index it sits in (`rows` rows, these key
    and MiniLM dims): a damaged or lying file (unreadable zip, object arrays, a missing array, wrong shapes,
    NaN sums, held-out ids outside the index, stride 0) is one line naming it, never a traceback or a NaN head."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except Exception as exc:  # numpy's zip / npy parsers fail with several types (BadZipFile, ValueError, …)
        raise UserError(f"{path}: not readable ({short_reason(exc)}): the index is damaged, rebuild it") from exc
    problem = _state_problem(arrays, rows, key_dim, target_dim)
    if problem:
        raise UserError(f"{path}: {problem}: the index is damaged, rebuild it")
    return arrays


@dataclass
class RidgeHead:
    weights: np.ndarray  # float32 [d, t]
    key_means: dict[str, np.ndarray]  # modality -> float32 [d]
    target_mean: np.ndarray  # float32 [t]
    lam: float  # the chosen λ (absolute, for the final all-rows fit)
    ratio: float  # the chosen r
    heldout: dict  # {"rows", "training_rows", "scored_rows", "cosine_by_ratio": {str(r): cos}, "chosen_cosine"}
    rows: dict[str, int]  # rows per modality used in the final fit

    def predict(self, queries: np.ndarray, query_mean: np.ndarray) -> np.ndarray:
        """float32 [n, t] unit rows: normalise((q − query_mean) W + ȳ)."""
        centred = np.asarray(queries, dtype=np.float64) - np.asarray(query_mean, dtype=np.float64)
        return _unit(centred @ self.weights.astype(np.float64) + self.target_mean).astype(np.float32)

    def info(self) -> dict:
        return {"lam": self.lam, "ratio": self.ratio, "heldout": self.heldout, "rows": dict(self.rows),
                "key_dim": int(self.weights.shape[0]), "target_dim": int(self.weights.shape[1])}

    def save(self, path: str | Path) -> None:
        arrays = {"weights": self.weights, "target_mean": self.target_mean,
                  **{f"key_mean_{m}": mean for m, mean in self.key_means.items()}}
        write_atomic(path, lambda handle: np.savez(handle, **arrays))  # a handle: no ".npz" appended

    @classmethod
    def load(cls, path: str | Path, info: dict) -> RidgeHead:
        with np.load(path, allow_pickle=False) as data:
            weights, target_mean = data["weights"], data["target_mean"]
            means = {m: data[f"key_mean_{m}"] for m in MODALITIES if f"key_mean_{m}" in data.files}
        if weights.shape != (info["key_dim"], info["target_dim"]):
            raise ValueError(f"{path}: weights {weights.shape} do not match the manifest's dims")
        return cls(weights=weights, key_means=means, target_mean=target_mean, lam=float(info["lam"]),
                   ratio=float(info["ratio"]), heldout=info["heldout"],
                   rows={m: int(n) for m, n in info["rows"].items()})
