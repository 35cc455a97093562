"""`eval --sweep`: the grid over k × weights (softmax × temperature, and inverse distance × power × epsilon: the
best of each family is reported) × alpha × consensus × beta (the regression head's share) × model weights, the
per-image cosines of every grid row, and the sweep's part of the report.

The sweep's maximum over its grid is optimistic (chosen and scored on the same images), so the report
recommends the setting chosen on all images but scores that *choice* by k-fold cross-validation: each fold
is scored with the setting that wins on the other folds.
"""
from __future__ import annotations

import itertools

import numpy as np

from img2prompt.query.eval_options import EvalOptions
from img2prompt.query.settings import WEIGHTINGS, RetrievalSettings

SETTING_NAMES = ("k", "weighting", "temperature", "power", "epsilon", "alpha", "consensus", "beta",
                 "model_weights")  # what a sweep row varies
FAMILY_FIELDS = {"softmax": ("temperature",), "inverse-distance": ("power", "epsilon")}  # each family's own
CV_FOLDS = 5
CV_SEED = 0
RELIABLE_N = 50  # fewer labelled images than this: the sweep's choice is mostly noise
NOT_BEATEN_TOLERANCE = 1e-9  # equal up to rounding (e.g. the grid's alpha = 1 vs corpus_mean) does not beat


def model_weightings(members: int, asked: tuple | None = None, chosen: list[float] | None = None) -> list[tuple]:
    """The model weightings an index of several CLIP models is swept over: equal, each model alone and, for
    two, 3:1 both ways (plus the one asked for); normalised to sum 1."""
    if asked is None:
        asked = [tuple([1.0] * members)] + [tuple(float(i == m) for i in range(members)) for m in range(members)]
        asked += [(0.75, 0.25), (0.25, 0.75)] if members == 2 else []
    weightings = [tuple(w / sum(row) for w in row) for row in asked] + ([tuple(chosen)] if chosen else [])
    return list(dict.fromkeys(tuple(round(w, 6) for w in row) for row in weightings))


def sweep_grid(options: EvalOptions, kmax: int, has_head: bool = True,
               weightings: list[tuple] | None = None) -> list[RetrievalSettings]:
    """The sweep's settings: model weights outermost and beta fastest; beta only where the index has a
    regression head, model weights only for several CLIP models. Every row keeps the chosen score floor."""
    chosen = options.settings
    ks = sorted({k for k in options.sweep_k if k <= kmax} | {chosen.k})
    betas = sorted(set(options.sweep_beta) | {chosen.beta}) if has_head else [0.0]
    rows = list(itertools.product(ks, weighing_grid(options), options.sweep_alpha,
                                  sorted(set(options.sweep_consensus) | {chosen.consensus}), betas))
    return [RetrievalSettings(k=k, alpha=a, consensus=c, beta=b, model_weights=weights, min_score=chosen.min_score,
                              **weighing)
            for weights in (weightings or [None]) for k, weighing, a, c, b in rows]


def weighing_grid(options: EvalOptions) -> list[dict]:
    """The weight families' settings a sweep tries: softmax × temperatures, inverse distance × powers ×
    epsilons (with the chosen power and epsilon); the chosen family is always among them."""
    chosen = options.settings
    families = [family for family in WEIGHTINGS if family in set(options.sweep_weighting) | {chosen.weighting}]
    grid = []
    for family in families:
        if family == "softmax":
            grid += [{"weighting": family, "temperature": t} for t in options.sweep_temperature]
        else:
            grid += [{"weighting": family, "power": p, "epsilon": e}
                     for p in sorted(set(options.sweep_power) | {chosen.power})
                     for e in sorted(set(options.sweep_epsilon) | {chosen.epsilon})]
    return grid


def sweep_cosines(grid: list[RetrievalSettings], blended_of, cosines_of) -> np.ndarray:
    """Per-image cosines [settings, images] of every grid row. Rows that differ only in beta share one k-NN
    blend (beta varies fastest in the grid): `blended_of(the setting at beta 0)`, then `cosines_of(blend, beta)`."""
    rows, last, blended = [], None, None
    for settings in grid:
        at_zero = settings.replace(beta=0.0)
        if at_zero != last:
            last, blended = at_zero, blended_of(at_zero)
        rows.append(cosines_of(blended, settings.beta))
    return np.stack(rows)


def fold_ids(n: int, folds: int = CV_FOLDS, seed: int = CV_SEED) -> np.ndarray:
    """The fold of each image: a seeded shuffle dealt round-robin (sizes differ by at most one).
    With n < folds the deal gives every image its own fold (leave-one-out)."""
    order = np.random.default_rng(seed).permutation(n)
    assignment = np.empty(n, dtype=np.int64)
    assignment[order] = np.arange(n) % folds
    return assignment


def cross_validate(cosines: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(held-out cosine per image, grid row chosen per fold) for cosines [settings, images].

    Each fold is scored with the setting whose mean is best on the *other* folds, so the mean of the
    held-out cosines estimates what the selection procedure scores on images it has not seen."""
    held_out = np.empty(cosines.shape[1])
    chosen = np.empty(int(folds.max()) + 1, dtype=np.int64)
    for fold in range(len(chosen)):
        test = folds == fold
        chosen[fold] = int(np.argmax(cosines[:, ~test].mean(axis=1)))  # ties: the first grid row
        held_out[test] = cosines[chosen[fold], test]
    return held_out, chosen


def _setting(settings: RetrievalSettings) -> dict:
    """A sweep row's report fields: its weight family's own fields only (a softmax row has no power), model
    weights only where the sweep weighs models."""
    values = settings.as_dict()
    other = {name for family, names in FAMILY_FIELDS.items() if family != settings.weighting for name in names}
    return {name: values[name] for name in SETTING_NAMES
            if name not in other and (name != "model_weights" or values[name] is not None)}


def best_per_weighting(rows: list[dict]) -> dict[str, dict]:
    """The best in-sample row of each weight family the sweep tried (first on ties, as the overall best)."""
    best: dict[str, dict] = {}
    for row in rows:
        family = row.get("weighting", "softmax")
        if family not in best or row["score"] > best[family]["score"]:
            best[family] = row
    return {family: {**row, "flags": setting_flags(row)} for family, row in best.items()}


def cross_validation_report(grid: list[RetrievalSettings], cosines: np.ndarray, folds: int = CV_FOLDS,
                            seed: int = CV_SEED) -> dict | None:
    """The cross-validated score of "pick the grid's best", how often each setting won, per-fold detail."""
    n = cosines.shape[1]
    if n < 2:
        return None  # nothing to hold out
    assignment = fold_ids(n, folds, seed)
    held_out, chosen = cross_validate(cosines, assignment)
    rows, counts = np.unique(chosen, return_counts=True)
    order = sorted(range(len(rows)), key=lambda i: (-counts[i], rows[i]))
    return {"score": float(held_out.mean()), "folds": len(chosen), "seed": seed,
            "chosen": [{**_setting(grid[rows[i]]), "folds": int(counts[i])} for i in order],
            "per_fold": [{"fold": fold, "n": int((assignment == fold).sum()), **_setting(grid[row]),
                          "score": float(held_out[assignment == fold].mean())} for fold, row in enumerate(chosen)]}


def unbeaten_baseline(cv_score: float | None, baselines: dict) -> tuple[str, float] | None:
    """The best baseline when the sweep's cross-validated choice does not beat it (then it is what to use)."""
    if cv_score is None or not baselines:
        return None
    name, value = max(baselines.items(), key=lambda item: item[1])
    return (name, value) if cv_score <= value + NOT_BEATEN_TOLERANCE else None


def sweep_warnings(n: int, cv_score: float | None, baselines: dict, flags: dict | None = None) -> list[str]:
    """Why the recommended setting should not be trusted blindly."""
    warnings = []
    if n < RELIABLE_N:
        warnings.append(f"too few labelled images for a reliable choice (n = {n} < {RELIABLE_N}): "
                        "treat the recommended setting as a guess")
    if cv_score is None:
        warnings.append("cannot cross-validate the sweep's choice with a single labelled image")
        return warnings
    unbeaten = unbeaten_baseline(cv_score, baselines)
    if unbeaten:
        name, value = unbeaten
        hint = f" (submit {flags[name]})" if flags and name in flags else ""
        warnings.append(f"the sweep's choice does not beat baseline {name}: cross-validated {cv_score:.4f} "
                        f"<= {name} {value:.4f}; prefer the baseline{hint}")
    return warnings


def sweep_summary(grid: list[RetrievalSettings], cosines: np.ndarray, baselines: dict, flags: dict | None = None) -> dict:
    """The sweep's part of the report from per-image cosines [settings, images] of every grid setting."""
    means = cosines.mean(axis=1)
    rows = [{**_setting(setting), "score": float(score)} for setting, score in zip(grid, means)]
    best = int(np.argmax(means))  # the choice on all images: what a user should pass to submit
    cv = cross_validation_report(grid, cosines)
    cv_score = cv["score"] if cv else None
    chosen = sum(1 for fold in cv["per_fold"] if same_setting(fold, rows[best])) if cv else 0
    unbeaten = unbeaten_baseline(cv_score, baselines)
    use = ({"baseline": unbeaten[0], "flags": (flags or {}).get(unbeaten[0])} if unbeaten
           else {"flags": setting_flags(_setting(grid[best]))})
    return {"sweep": rows,
            "best_in_sample": {**rows[best], "optimistic": True},  # chosen and scored on the same images
            "best_per_weighting": best_per_weighting(rows),  # in-sample too: softmax vs inverse distance
            "use": use,  # the one recommendation: the sweep's choice, or the baseline it does not beat
            "recommended": {**_setting(grid[best]), "cross_validated_score": cv_score, "chosen_in_folds": chosen},
            "cross_validation": cv,
            "warnings": sweep_warnings(cosines.shape[1], cv_score, baselines, flags)}


def same_setting(a: dict, b: dict, names=SETTING_NAMES) -> bool:
    return all(a.get(key) == b.get(key) for key in names)


def setting_flags(setting: dict) -> str:
    """The submit flags of a setting (the switches only when on)."""
    if setting.get("weighting", "softmax") == "softmax":
        flags = f"--k {setting['k']} --temperature {setting['temperature']:g}"
    else:
        flags = (f"--k {setting['k']} --weighting {setting['weighting']} --power {setting['power']:g} "
                 f"--epsilon {setting['epsilon']:g}")
    flags += f" --alpha {setting['alpha']:g}"
    flags += "".join(f" --{name.replace('_', '-')} {setting[name]:g}" for name in ("consensus", "beta", "min_score")
                     if setting.get(name))
    weights = setting.get("model_weights")
    return flags + (f" --model-weights {','.join(f'{w:g}' for w in weights)}" if weights else "")


def baseline_flags(options: EvalOptions, shrink: float) -> dict[str, str]:
    """The submit flags that reproduce each baseline, for the "does not beat" warning."""
    knn = {**options.settings.weighing(), "k": options.settings.k, "alpha": 0.0}
    return {"corpus_mean": "--alpha 1", "top1": "--k 1 --alpha 0", "knn": setting_flags(knn),
            "knn_shrunk": setting_flags({**knn, "alpha": shrink}), "regression_head": "--beta 1"}
