"""`eval`'s report beside the metric: caption sets compared with retrieval, the quality switches in play, the
text report and the sweep's plot."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from img2prompt.atomic import atomic_path
from img2prompt.errors import UserError
from img2prompt.query.eval_options import EvalOptions
from img2prompt.query.eval_sweep import same_setting, setting_flags
from img2prompt.query.score import BOOTSTRAP_MIN_N, align, cosine_rows, summarise
from img2prompt.query.settings import RetrievalSettings


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
