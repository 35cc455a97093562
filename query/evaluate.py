"""`img2prompt eval`: the competition metric on a labelled set, baselines, a sweep over k × weights (softmax ×
temperature, and inverse distance × power × epsilon: the best of each family is reported) × alpha × consensus ×
beta (the regression head's share).

Metric = mean over images of cos(prediction, scorer embedding of the true prompt), exactly Kaggle's.
Queries are images (IMAGES_DIR/<imgId>.<ext>) or, without images, the CLIP text embedding of each true
prompt (text-only mode, meant to be used with --exclude-exact). One search at the largest k feeds every
setting of the sweep: images are never re-encoded per setting. The report's "switches" say which of the
quality switches were in play (image-keyed entries and their calibration, the regression head, consensus).

The sweep's maximum over its grid is optimistic (chosen and scored on the same images), so the report
recommends the setting chosen on all images but scores that *choice* by k-fold cross-validation: each fold
is scored with the setting that wins on the other folds.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from img2prompt.atomic import atomic_path, write_json_atomic
from img2prompt.encoders.prompts import dedup_key
from img2prompt.encoders.text import minilm_embeddings
from img2prompt.errors import UserError
from img2prompt.index.flat import exact_search
from img2prompt.index.layout import MANIFEST, file_sha256
from img2prompt.index.recall import recall_at_k
from img2prompt.encoders.models import load_text_model
from img2prompt.query.preflight import check_eval_paths
from img2prompt.query.blend import corpus_mean_prediction
from img2prompt.encoders.images import list_images
from img2prompt.query.interrogate import DEFAULT_MODIFIERS, compose, rank_modifiers
from img2prompt.query.predict import Retrieved, blend_neighbours, head_predictions, mix_rows, retrieve_images
from img2prompt.query.score import (BOOTSTRAP_MIN_N, align, caption_vectors, check_labelled_images, cosine_rows,
                                    read_prompt_table, summarise)
from img2prompt.query.search import Neighbours
from img2prompt.query.session import QuerySession
from img2prompt.query.settings import WEIGHTINGS, ImageLoading, RetrievalSettings

SWEEP_K = (1, 2, 3, 5, 10, 20, 30, 50, 100, 150)  # 100-150: the public CLIP kNN notebook's k
SWEEP_TEMPERATURE = (0.01, 0.02, 0.05, 0.1, 0.2, 1.0)
SWEEP_WEIGHTING = WEIGHTINGS  # both families: softmax over T, inverse distance over power × epsilon
SWEEP_POWER = (2.0, 4.0, 6.0, 8.0, 12.0)
SWEEP_EPSILON = (1e-4,)
SWEEP_ALPHA = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # alpha = 1 is the corpus-mean prediction
SWEEP_CONSENSUS = (0.0, 3.0, 10.0)
SWEEP_BETA = (0.0, 0.25, 0.5, 1.0)  # beta = 1 is the regression head alone (swept only where the index has one)
SETTING_NAMES = ("k", "weighting", "temperature", "power", "epsilon", "alpha", "consensus", "beta",
                 "model_weights")  # what a sweep row varies
FAMILY_FIELDS = {"softmax": ("temperature",), "inverse-distance": ("power", "epsilon")}  # each family's own
DEFAULT_SHRINK = 0.2  # alpha of the knn_shrunk baseline when --alpha is 0
CV_FOLDS = 5
CV_SEED = 0
RELIABLE_N = 50  # fewer labelled images than this: the sweep's choice is mostly noise
NOT_BEATEN_TOLERANCE = 1e-9  # equal up to rounding (e.g. the grid's alpha = 1 vs corpus_mean) does not beat


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


def compare_captions(label_ids: list[str], truth: np.ndarray, retrieval: np.ndarray, captions: pd.DataFrame,
                     vectors: np.ndarray, source: str) -> dict:
    """A caption set scored beside retrieval on the images both cover, with the paired per-image
    difference (retrieval − captions): pairing removes the images' own difficulty from the comparison,
    so its interval is much tighter than the two scores' intervals suggest."""
    label_rows, caption_rows, missing, extra = align(label_ids, captions["imgId"].tolist())
    if not label_rows:
        raise UserError(f"{source}: none of its {len(captions)} image ids is in the labels")
    cosines = cosine_rows(vectors[caption_rows], truth[label_rows])
    difference = retrieval[label_rows] - cosines
    paired = summarise(difference)
    return {"path": source, "n": len(label_rows), **summarise(cosines),
            "retrieval_score": float(retrieval[label_rows].mean()),
            "difference": {"mean": paired["score"], "median": paired["median"],
                           **({"ci95": paired["ci95"]} if "ci95" in paired else {})},
            "missing": missing, "extra": extra,
            "per_image": {label_ids[row]: float(cosine) for row, cosine in zip(label_rows, cosines)}}


def caption_warnings(name: str, entry: dict) -> list[str]:
    warnings = []
    if entry["missing"]:
        warnings.append(f"captions {name}: {len(entry['missing'])} labelled image(s) have no caption and are left "
                        f"out of its comparison: {', '.join(entry['missing'][:5])}")
    if entry["extra"]:
        warnings.append(f"captions {name}: {len(entry['extra'])} captioned image(s) are not labelled (ignored): "
                        f"{', '.join(entry['extra'][:5])}")
    return warnings


def competition_score(predictions: np.ndarray, truth: np.ndarray) -> float:
    """Kaggle's metric: the mean over images of the cosine similarity of prediction and truth."""
    return float(cosine_rows(predictions, truth).mean())


def eval_options(labels: str | Path, settings: RetrievalSettings | None = None, *, batch_size: int | None = None,
                 workers: int | None = None, progress: bool = True, **fields) -> EvalOptions:
    """EvalOptions from the API's keyword form: retrieval settings' fields go into `settings`, the rest are
    EvalOptions fields (sweep, images, captions, …)."""
    names = {item.name for item in dataclasses.fields(RetrievalSettings)}
    changes = {name: fields.pop(name) for name in list(fields) if name in names}
    return EvalOptions(labels=str(labels), settings=RetrievalSettings.of(settings, **changes),
                       loading=ImageLoading(batch_size, workers, progress), **fields)


def read_labels(path: str | Path) -> pd.DataFrame:
    return read_prompt_table(path, "labels")


def exact_matches(session: QuerySession, true_prompts: list[str]) -> list[set[int]]:
    """For each true prompt, the corpus ids holding the same prompt after normalisation (case, spaces)."""
    keys = [dedup_key(prompt) for prompt in true_prompts]
    wanted = set(keys)
    by_key: dict[int, set[int]] = {}
    for first_id, prompts in session.index.iter_prompt_batches():
        for offset, prompt in enumerate(prompts):
            key = dedup_key(prompt)
            if key in wanted:
                by_key.setdefault(key, set()).add(first_id + offset)
    return [by_key.get(key, set()) for key in keys]


def _text_queries(session: QuerySession, labels: pd.DataFrame, k: int, exclude, model_weights=None) -> Retrieved:
    started = time.perf_counter()
    vectors = session.clip.text_embeddings(labels["prompt"].tolist()).vectors
    found = session.retriever.search(vectors, k, exclude, query_kind="text", model_weights=model_weights)
    return Retrieved(found, {}, vectors, {"encode_search": time.perf_counter() - started})


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


def run_eval(session: QuerySession, options: EvalOptions) -> dict:
    """The report for a labelled set, on an opened session (the index and its CLIP model)."""
    chosen = options.settings.check_for(session.index)
    sets = caption_sets(options.captions)
    check_eval_paths(session.index.root, options.labels, options.images, options.out, options.plot, options.sweep,
                     sets)
    labels = read_labels(options.labels)
    if options.images:  # refuse labels that (almost) match no image, before any model
        check_labelled_images(options.labels, labels["imgId"].tolist(), options.images,
                              list(list_images(options.images).paths))
    # read every caption file before the models and the search: a malformed one fails at once
    captions = {name: read_prompt_table(path, f"captions {name}") for name, path in sets.items()}
    index = session.index
    text_model = load_text_model(options.text_model or index.text_identity["name"], session.clip.device)
    if text_model.sha256 != index.text_identity["sha256"]:
        raise UserError("the scorer loaded for the ground truth differs from the index's text model "
                        f"({text_model.name}): pass --text-model with the index's scorer")
    truth = minilm_embeddings(text_model, labels["prompt"].tolist())

    matches = exact_matches(session, labels["prompt"].tolist())
    in_corpus = sum(1 for ids in matches if ids)
    exclude = matches if options.exclude_exact else None
    kmax = min(index.count - max((len(ids) for ids in matches), default=0) if exclude else index.count,
               max([chosen.k, *(options.sweep_k if options.sweep else ())]))
    if kmax < chosen.k:
        raise UserError(f"--k {chosen.k} is larger than the corpus left after --exclude-exact ({kmax})")
    chosen_weights = list(chosen.model_weights) if chosen.model_weights is not None else None
    if options.images:
        listing = list_images(options.images)
        retrieved, failed = retrieve_images(session, labels["imgId"].tolist(), listing.paths, chosen, fetch=kmax,
                                            exclude=exclude, loading=options.loading)
    else:
        retrieved, failed = _text_queries(session, labels, kmax, exclude, chosen_weights), {}
    neighbours = retrieved.neighbours
    query_kind = "image" if options.images else "text"
    members = len(index.clip_identity.get("members") or [])
    weightings = model_weightings(members, options.sweep_model_weights, chosen_weights) if members else None
    searched = {tuple(round(w, 6) for w in chosen_weights or [1 / members] * members): neighbours} if members else {}

    def neighbours_for(weights: tuple | None) -> Neighbours:
        """The same encoded queries searched again with other model weights (one search each, no encoding)."""
        if weights not in searched:
            ok_rows = np.flatnonzero(neighbours.ids[:, 0] >= 0)
            found = session.retriever.search(retrieved.query_vectors[ok_rows], kmax,
                                             [exclude[row] for row in ok_rows] if exclude else None,
                                             query_kind=query_kind, model_weights=list(weights))
            searched[weights] = found.spread(ok_rows, len(neighbours.ids))
        return searched[weights]
    head, head_source, head_skipped = None, None, None
    if index.regression_head is not None and (chosen.beta > 0 or options.sweep):
        try:
            head, head_source = head_predictions(index, retrieved.query_vectors, neighbours.ids[:, 0] >= 0,
                                                 query_kind)
        except UserError as exc:
            if chosen.beta > 0:
                raise
            head_skipped = f"the regression head is not swept: {exc}"  # a sweep without beta still runs

    ok = neighbours.ids[:, 0] >= 0

    def score_of(settings: RetrievalSettings, cosines: bool = True) -> np.ndarray:
        """Per-image cosines of a setting (or, cosines=False, its predictions)."""
        weights = settings.model_weights
        found = neighbours if weights is None else neighbours_for(tuple(round(w, 6) for w in weights))
        view = Neighbours(found.scores[:, :settings.k], found.ids[:, :settings.k])
        predictions = blend_neighbours(index, view, settings, head, retrieved.query_vectors)
        return cosine_rows(predictions, truth) if cosines else predictions

    shrink = chosen.alpha if chosen.alpha > 0 else DEFAULT_SHRINK
    plain = RetrievalSettings(k=chosen.k, model_weights=chosen.model_weights, min_score=chosen.min_score,
                              **chosen.weighing())
    product = score_of(chosen)
    report = {
        "n": len(labels),
        **summarise(product),
        "baselines": {
            "corpus_mean": float(cosine_rows(corpus_mean_prediction(index.minilm_mean, len(labels)), truth).mean()),
            "top1": float(score_of(plain.replace(k=1)).mean()),
            "knn": float(score_of(plain).mean()),
            "knn_shrunk": float(score_of(dataclasses.replace(plain, alpha=shrink)).mean()),
            # beta = 1: the regression head alone (the k-NN part does not count)
            **({"regression_head": float(score_of(dataclasses.replace(plain, beta=1.0)).mean())}
               if head is not None else {}),
        },
        "settings": {**chosen.as_dict(), "knn_shrunk_alpha": shrink,
                     "mode": "images" if options.images else "text",
                     "exclude_exact": options.exclude_exact, "labels": str(options.labels),
                     "images": options.images},
        "leakage": {"true_prompts_in_corpus": in_corpus,
                    "excluded_corpus_rows": sum(len(ids) for ids in matches) if options.exclude_exact else 0},
        "failed": failed,
        "index": {"path": str(index.root), "created_at": index.manifest.get("created_at"), "count": index.count,
                  "faiss": index.search_plan["kind"], "manifest_sha256": _manifest_sha(index.root)},
        "models": {"clip": index.clip_identity, "text": index.text_identity},
    }
    if index.search_plan["kind"] != "flat":
        report["query_recall_at_10"] = recall_on_queries(session, retrieved)
    if index.phrases is not None:
        report["interrogate"] = score_interrogation(index, retrieved, text_model, truth)
    report["warnings"] = [head_skipped] if head_skipped else []
    if head is not None and in_corpus and (chosen.beta > 0 or options.sweep):
        report["warnings"].append(f"{in_corpus} of the true prompts are in the index, and the regression head was "
                                  "fitted on the index's rows (--exclude-exact only removes neighbours): its scores "
                                  "here are optimistic; judge beta on labels whose prompts are not in the corpus")
    if captions:
        report["captions"] = {}
        for name, frame in captions.items():
            entry = compare_captions(labels["imgId"].tolist(), truth, product, frame,
                                     caption_vectors(text_model, frame), sets[name])
            report["captions"][name] = entry
            report["warnings"] += caption_warnings(name, entry)
    if options.sweep:
        grid = sweep_grid(options, kmax, has_head=head is not None, weightings=weightings)
        cosines = sweep_cosines(grid, lambda settings: score_of(settings, cosines=False),
                                lambda blended, beta: cosine_rows(mix_rows(blended, head, beta, ok), truth))
        report.update(sweep_summary(grid, cosines, report["baselines"], baseline_flags(options, shrink)))
        if options.plot:
            plot_sweep(report, options.plot)
    report["switches"] = switches_report(index, options, grid if options.sweep else None, head_source,
                                         chosen_weights)
    if options.out:
        write_json_atomic(options.out, report)
    return report


def score_interrogation(index, retrieved: Retrieved, text_model, truth: np.ndarray) -> dict:
    """The readable prompt as a prediction: the scorer's embedding of `interrogate`'s composed text (top
    neighbour + ranked modifier phrases); a query without neighbours falls back to the corpus mean."""
    phrases, phrase_vectors = index.phrases
    top = retrieved.neighbours.ids[:, 0]
    bases = index.prompt_rows(top)
    texts = [compose(base, rank_modifiers(vector, phrase_vectors, phrases, base)) if prompt_id >= 0 else ""
             for base, vector, prompt_id in zip(bases, retrieved.query_vectors, top)]
    predictions = corpus_mean_prediction(index.minilm_mean, len(texts))
    ok = [row for row, text in enumerate(texts) if text]
    if ok:
        predictions[ok] = minilm_embeddings(text_model, [texts[row] for row in ok])
    return {**summarise(cosine_rows(predictions, truth)), "modifiers": DEFAULT_MODIFIERS,
            "examples": texts[:3]}


def _manifest_sha(root: Path) -> str:
    return file_sha256(Path(root) / MANIFEST)


def recall_on_queries(session: QuerySession, retrieved: Retrieved) -> float | None:
    """recall@10 of the (approximate) index on these real queries (images or texts), against exact search."""
    ok = retrieved.neighbours.ids[:, 0] >= 0
    if not ok.any():
        return None
    vectors = session.retriever.to_keys(retrieved.query_vectors[ok])
    key_range, backend = session.retriever.ranges[0]  # the first key range's backend (text keys, when there are)
    k = min(10, key_range.count)
    _, truth = exact_search(session.index.clip_vectors[key_range.start:key_range.stop], vectors, k)
    _, found = backend.search(vectors, k)
    return recall_at_k(found, truth)


def plot_sweep(report: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    figure = draw_sweep(report["sweep"], report["recommended"], report["baselines"],
                        (report["cross_validation"] or {}).get("score"),
                        {name: entry["score"] for name, entry in report.get("captions", {}).items()})
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)


def draw_sweep(rows: list[dict], recommended: dict, baselines: dict, cv_score: float | None,
               captions: dict[str, float] | None = None):
    """In-sample score vs k per weighting (each temperature, each power and epsilon) at the recommended alpha, the baselines and caption sets as
    horizontal lines, and the recommended setting marked: a curve under a line is visibly not worth choosing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    alpha = recommended["alpha"]
    fixed = [name for name in ("alpha", "consensus", "beta", "model_weights") if name in recommended]
    for label in dict.fromkeys(weighing_label(row) for row in rows):  # one curve per T, per power and epsilon
        points = sorted((row["k"], row["score"]) for row in rows
                        if weighing_label(row) == label and same_setting(row, recommended, fixed))
        axes.plot([k for k, _ in points], [s for _, s in points], marker="o", label=label)
    styles = ("--", ":", "-.", (0, (5, 1)))
    for (name, value), style in zip(baselines.items(), itertools.cycle(styles)):
        axes.axhline(value, color="grey", linestyle=style, linewidth=1, label=f"{name} {value:.4f}")
    colours = itertools.cycle(("tab:green", "tab:purple", "tab:brown"))
    for (name, value), colour in zip((captions or {}).items(), colours):
        axes.axhline(value, color=colour, linestyle="-", linewidth=1.2, label=f"captions {name} {value:.4f}")
    if cv_score is not None:  # what the choice scores out of sample, against the baseline lines
        axes.axhline(cv_score, color="red", linestyle=":", linewidth=1.2,
                     label=f"cross-validated choice {cv_score:.4f}")
    in_sample = next(row["score"] for row in rows if same_setting(row, recommended))
    axes.plot([recommended["k"]], [in_sample], marker="*", markersize=16, color="red", linestyle="none",
              label=f"recommended k={recommended['k']} {weighing_label(recommended)} (in-sample)")
    axes.set_xscale("log")
    axes.set_xlabel("k (neighbours blended)")
    axes.set_ylabel("mean cosine, in-sample (competition score)")
    switches = "".join(f", {name}={recommended[name]:g}" for name in ("consensus", "beta") if recommended.get(name))
    axes.set_title(f"in-sample score vs k per weighting (alpha={alpha:g}{switches}); lines: baselines")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    return figure


def format_report(report: dict) -> str:
    lines = [f"n = {report['n']} ({report['settings']['mode']} queries)",
             f"score {report['score']:.4f}  median {report['median']:.4f}"
             + (f"  95% CI [{report['ci95'][0]:.4f}, {report['ci95'][1]:.4f}]" if "ci95" in report else "")
             + f"  ({setting_flags(report['settings'])})",
             "switches: " + format_switches(report["switches"]),
             "baselines: " + ", ".join(f"{name} {value:.4f}" for name, value in report["baselines"].items()),
             f"true prompts found in the corpus: {report['leakage']['true_prompts_in_corpus']}"
             + (f" (excluded {report['leakage']['excluded_corpus_rows']} corpus rows)"
                if report["settings"]["exclude_exact"] else "")]
    if report["failed"]:
        lines.append(f"failed images (corpus-mean prediction): {len(report['failed'])}")
    if report.get("captions"):
        lines += [""] + format_captions(report["captions"])
    if report.get("query_recall_at_10") is not None:
        lines.append(f"index recall@10 on these queries: {report['query_recall_at_10']:.3f}")
    if report.get("interrogate"):
        lines.append(f"readable prompt (interrogate: top neighbour + {report['interrogate']['modifiers']} "
                     f"modifiers) scored as a prediction: {report['interrogate']['score']:.4f}")
    if "sweep" in report:
        lines += [""] + format_sweep(report)
    if report.get("warnings"):
        lines += ["", "warnings:"] + [f"  ! {warning}" for warning in report["warnings"]]
    return "\n".join(lines)


def format_captions(captions: dict) -> list[str]:
    """One row per caption set: its score, retrieval's on the same images, and the paired difference."""
    lines = ["caption sets vs retrieval on the same images (diff = retrieval − captions, paired per image):",
             f"  {'name':<16} {'n':>5} {'captions':>9} {'retrieval':>9} {'diff':>8}  95% CI of diff"]
    for name, entry in captions.items():
        difference = entry["difference"]
        ci = (f"[{difference['ci95'][0]:+.4f}, {difference['ci95'][1]:+.4f}]" if "ci95" in difference
              else f"(n < {BOOTSTRAP_MIN_N}: none)")
        lines.append(f"  {name:<16} {entry['n']:>5} {entry['score']:>9.4f} {entry['retrieval_score']:>9.4f} "
                     f"{difference['mean']:>+8.4f}  {ci}")
    return lines


def format_switches(switches: dict) -> str:
    image_keys, head = switches["image_keys"], switches["regression_head"]
    return ", ".join([
        f"image-keyed entries {image_keys['rows']}" + (f" (calibrated: {image_keys['calibration']})"
                                                       if image_keys["rows"] else ""),
        "regression head " + (f"in the index (beta {head['beta']:g}"
                              + (f", swept {head['swept']}" if head["swept"] else "") + ")"
                              if head["in_index"] else "absent"),
        f"consensus {switches['consensus']['gamma']:g}"
        + (f" (swept {switches['consensus']['swept']})" if switches["consensus"]["swept"] else ""),
        f"CLIP models {len(switches['models']['clip'])}"
        + (f" (weights {switches['models']['model_weights'] or 'equal'}"
           + (f", swept {len(switches['models']['swept'])} weightings" if switches["models"]["swept"] else "") + ")"
           if len(switches["models"]["clip"]) > 1 else "")])


def switches_report(index, options: EvalOptions, grid: list[RetrievalSettings] | None, head_source: str | None,
                    model_weights: list[float] | None = None) -> dict:
    """Which quality switches were in play: what the index holds, what this run used, what it swept."""
    rows: dict[str, int] = {}
    for key_range in index.key_ranges:  # a grown index may hold several ranges of a kind
        rows[key_range.keys] = rows.get(key_range.keys, 0) + key_range.count
    fits = index.manifest.get("calibration", {}).get("fits", {})
    swept = (lambda name: sorted({getattr(row, name) for row in grid})) if grid else (lambda name: None)
    chosen = options.settings
    return {"image_keys": {"rows": rows.get("image", 0),
                           "calibration": {kind: fit.get("method") for kind, fit in fits.items()} or None},
            "regression_head": {"in_index": index.regression_head is not None, "beta": chosen.beta,
                                "swept": swept("beta"), "query_mean": head_source},
            "consensus": {"gamma": chosen.consensus, "swept": swept("consensus")},
            "models": {"clip": [member["name"] for member in index.clip_identity.get("members", [index.clip_identity])],
                       "model_weights": model_weights,
                       "swept": [list(weights) for weights in dict.fromkeys(row.model_weights for row in grid)]
                       if grid and grid[0].model_weights is not None else None}}


def weighing_label(row: dict) -> str:
    """A row's weights, short: T=0.05 (softmax) or 1/(d^6+0.0001) (inverse distance)."""
    if row.get("weighting", "softmax") == "softmax":
        return f"T={row['temperature']:g}"
    return f"1/(d^{row['power']:g}+{row['epsilon']:g})"


def format_sweep(report: dict) -> list[str]:
    weighted = any(row.get("model_weights") for row in report["sweep"])
    lines = [f"{'k':>5} {'weights':>16} {'alpha':>6} {'consens':>7} {'beta':>5} {'in-sample':>9}"
             + ("  model weights" if weighted else "")]
    for row in sorted(report["sweep"], key=lambda row: -row["score"])[:15]:
        lines.append(f"{row['k']:>5} {weighing_label(row):>16} {row['alpha']:>6g} {row.get('consensus', 0):>7g} "
                     f"{row.get('beta', 0):>5g} {row['score']:>9.4f}"
                     + (f"  {','.join(f'{w:g}' for w in row['model_weights'])}" if weighted else ""))
    best, recommended, cv = report["best_in_sample"], report["recommended"], report["cross_validation"]
    flags = setting_flags(recommended)
    lines.append(f"best in-sample {best['score']:.4f} (optimistic: chosen and scored on the same images)")
    for family, row in report.get("best_per_weighting", {}).items():
        lines.append(f"best {family} in-sample {row['score']:.4f}: {row['flags']}")
    if cv is not None:
        lines.append(f"cross-validated score of the sweep's choice: {cv['score']:.4f} "
                     f"({cv['folds']} folds, seed {cv['seed']})")
    lines.append("baselines: " + ", ".join(f"{name} {value:.4f}" for name, value in report["baselines"].items()))
    sweep_choice = (f"{flags} (chosen on all {report['n']} images"
                    + (f"; in {recommended['chosen_in_folds']} of {cv['folds']} folds" if cv else "") + ")")
    use = report.get("use", {})
    if use.get("baseline"):  # one coherent recommendation, not a choice followed by "prefer the baseline"
        lines.append(f"recommended: the {use['baseline']} baseline"
                     + (f" (submit {use['flags']})" if use.get("flags") else "")
                     + f"; the sweep's choice {sweep_choice} does not beat it cross-validated")
    else:
        lines.append(f"recommended: {sweep_choice}")
    return lines
