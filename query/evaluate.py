"""`img2prompt eval`: the competition metric on a labelled set, baselines, a k × temperature × alpha sweep.

Metric = mean over images of cos(prediction, scorer embedding of the true prompt), exactly Kaggle's.
Queries are images (IMAGES_DIR/<imgId>.<ext>) or, without images, the CLIP text embedding of each true
prompt (text-only mode, meant to be used with --exclude-exact). One search at the largest k feeds every
setting of the sweep: images are never re-encoded per setting.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from img2prompt.atomic import atomic_path, write_json_atomic
from img2prompt.build_index.corpus import dedup_key
from img2prompt.build_index.embed import clip_text_embeddings, minilm_embeddings
from img2prompt.errors import UserError
from img2prompt.index.flat import exact_search
from img2prompt.index.recall import recall_at_k
from img2prompt.index.format import MANIFEST, file_sha256
from img2prompt.models import load_text_model
from img2prompt.query.blend import check_blend_args, corpus_mean_prediction
from img2prompt.query.images import list_images
from img2prompt.query.predict import RetrievalSettings, Retrieved, blend_neighbours, retrieve_images
from img2prompt.query.search import Neighbours
from img2prompt.query.session import QuerySession

SWEEP_K = (1, 2, 3, 5, 10, 20, 30, 50, 100)
SWEEP_TEMPERATURE = (0.01, 0.02, 0.05, 0.1, 0.2, 1.0)
SWEEP_ALPHA = (0.0, 0.1, 0.2, 0.3)
DEFAULT_SHRINK = 0.2  # alpha of the knn_shrunk baseline when --alpha is 0
BOOTSTRAP_MIN_N = 30
BOOTSTRAP_SAMPLES = 1000


@dataclass
class EvalOptions(RetrievalSettings):
    labels: str
    text_model: str | None = None  # the scorer for the ground truth (default: as the index names it)
    images: str | None = None
    sweep: bool = False
    plot: str | None = None
    out: str | None = None
    exclude_exact: bool = False
    sweep_k: tuple = SWEEP_K
    sweep_temperature: tuple = SWEEP_TEMPERATURE
    sweep_alpha: tuple = SWEEP_ALPHA


def cosine_rows(predictions: np.ndarray, truth: np.ndarray) -> np.ndarray:
    predictions = np.asarray(predictions, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    dot = (predictions * truth).sum(axis=1)
    return dot / np.maximum(np.linalg.norm(predictions, axis=1) * np.linalg.norm(truth, axis=1), 1e-12)


def competition_score(predictions: np.ndarray, truth: np.ndarray) -> float:
    """Kaggle's metric: the mean over images of the cosine similarity of prediction and truth."""
    return float(cosine_rows(predictions, truth).mean())


def summarise(cosines: np.ndarray, seed: int = 0) -> dict:
    summary = {"score": float(cosines.mean()), "median": float(np.median(cosines))}
    if len(cosines) >= BOOTSTRAP_MIN_N:
        rng = np.random.default_rng(seed)
        means = cosines[rng.integers(0, len(cosines), size=(BOOTSTRAP_SAMPLES, len(cosines)))].mean(axis=1)
        summary["ci95"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return summary


def read_labels(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labels file not found: {path}")
    try:
        frame = (pd.read_parquet(path) if path.suffix.lower() == ".parquet"
                 else pd.read_csv(path, dtype=str, keep_default_na=False, sep=None, engine="python"))
    except Exception as exc:
        raise UserError(f"{path}: cannot read labels ({str(exc).splitlines()[0][:200]})") from exc
    missing = [column for column in ("imgId", "prompt") if column not in frame.columns]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)}; its columns are {', '.join(map(str, frame.columns))}")
    frame = frame[["imgId", "prompt"]].astype(str)
    if frame["imgId"].duplicated().any():
        raise UserError(f"{path}: imgId {frame['imgId'][frame['imgId'].duplicated()].iloc[0]!r} appears twice")
    if len(frame) == 0:
        raise UserError(f"{path}: no labelled rows")
    return frame.reset_index(drop=True)


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


def _text_queries(session: QuerySession, labels: pd.DataFrame, k: int, exclude) -> Retrieved:
    started = time.perf_counter()
    vectors = clip_text_embeddings(session.clip, labels["prompt"].tolist()).vectors
    found = session.retriever.search(vectors, k, exclude)
    return Retrieved(labels["imgId"].tolist(), found, {}, {"encode_search": time.perf_counter() - started},
                     vectors)


def sweep_grid(options: EvalOptions, kmax: int) -> list[tuple[int, float, float]]:
    ks = sorted({k for k in options.sweep_k if k <= kmax} | {options.k})
    return list(itertools.product(ks, options.sweep_temperature, options.sweep_alpha))


def run_eval(session: QuerySession, options: EvalOptions) -> dict:
    """The report for a labelled set, on an opened session (the index and its CLIP model)."""
    check_blend_args(options.k, options.temperature, options.alpha)
    if options.plot and not options.sweep:
        raise UserError("--plot draws the sweep: add --sweep")
    labels = read_labels(options.labels)
    index = session.index
    session.retriever.check_k(options.k)
    text_model = load_text_model(options.text_model or index.text_identity["name"], session.clip.device)
    if text_model.sha256 != index.text_identity["sha256"]:
        raise UserError("the scorer loaded for the ground truth differs from the index's text model "
                        f"({text_model.name}): pass --text-model with the index's scorer")
    truth = minilm_embeddings(text_model, labels["prompt"].tolist())

    matches = exact_matches(session, labels["prompt"].tolist())
    in_corpus = sum(1 for ids in matches if ids)
    exclude = matches if options.exclude_exact else None
    kmax = min(index.count - max((len(ids) for ids in matches), default=0) if exclude else index.count,
               max([options.k, *(options.sweep_k if options.sweep else ())]))
    if kmax < options.k:
        raise UserError(f"--k {options.k} is larger than the corpus left after --exclude-exact ({kmax})")
    if options.images:
        listing = list_images(options.images)
        retrieved = retrieve_images(session, labels["imgId"].tolist(), listing.paths, kmax,
                                    batch_size=options.batch_size, workers=options.workers,
                                    progress=options.progress, exclude=exclude)
    else:
        retrieved = _text_queries(session, labels, kmax, exclude)
    neighbours = retrieved.neighbours

    def score_of(k: int, temperature: float, alpha: float) -> np.ndarray:
        view = Neighbours(neighbours.scores[:, :k], neighbours.ids[:, :k])
        return cosine_rows(blend_neighbours(index, view, k=k, temperature=temperature, alpha=alpha), truth)

    shrink = options.alpha if options.alpha > 0 else DEFAULT_SHRINK
    product = score_of(options.k, options.temperature, options.alpha)
    report = {
        "n": len(labels),
        **summarise(product),
        "baselines": {
            "corpus_mean": float(cosine_rows(corpus_mean_prediction(index.minilm_mean, len(labels)), truth).mean()),
            "top1": float(score_of(1, options.temperature, 0.0).mean()),
            "knn": float(score_of(options.k, options.temperature, 0.0).mean()),
            "knn_shrunk": float(score_of(options.k, options.temperature, shrink).mean()),
        },
        "settings": {"k": options.k, "temperature": options.temperature, "alpha": options.alpha,
                     "knn_shrunk_alpha": shrink, "mode": "images" if options.images else "text",
                     "exclude_exact": options.exclude_exact, "labels": str(options.labels),
                     "images": options.images},
        "leakage": {"true_prompts_in_corpus": in_corpus,
                    "excluded_corpus_rows": sum(len(ids) for ids in matches) if options.exclude_exact else 0},
        "failed": retrieved.failed,
        "index": {"path": str(index.root), "created_at": index.manifest.get("created_at"), "count": index.count,
                  "faiss": index.search_plan["kind"], "manifest_sha256": _manifest_sha(index.root)},
        "models": {"clip": index.clip_identity, "text": index.text_identity},
    }
    if index.search_plan["kind"] != "flat":
        report["query_recall_at_10"] = recall_on_queries(session, retrieved)
    if options.sweep:
        rows = [{"k": k, "temperature": t, "alpha": a, "score": float(score_of(k, t, a).mean())}
                for k, t, a in sweep_grid(options, kmax)]
        report["sweep"] = rows
        report["best"] = max(rows, key=lambda row: row["score"])
        if options.plot:
            plot_sweep(rows, options.plot, report["best"]["alpha"])
    if options.out:
        write_json_atomic(options.out, report)
    return report


def _manifest_sha(root: Path) -> str:
    return file_sha256(Path(root) / MANIFEST)


def recall_on_queries(session: QuerySession, retrieved: Retrieved) -> float | None:
    """recall@10 of the (approximate) index on these real queries (images or texts), against exact search."""
    ok = retrieved.neighbours.ids[:, 0] >= 0
    if not ok.any():
        return None
    vectors = retrieved.query_vectors[ok]
    k = min(10, session.index.count)
    _, truth = exact_search(session.index.clip_vectors, vectors, k)
    found = session.retriever.search(vectors, k)
    return recall_at_k(found.ids, truth)


def plot_sweep(rows: list[dict], path: str, alpha: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for temperature in sorted({row["temperature"] for row in rows}):
        points = sorted((row["k"], row["score"]) for row in rows
                        if row["temperature"] == temperature and row["alpha"] == alpha)
        axes.plot([k for k, _ in points], [s for _, s in points], marker="o", label=f"T={temperature:g}")
    axes.set_xscale("log")
    axes.set_xlabel("k (neighbours blended)")
    axes.set_ylabel("mean cosine (competition score)")
    axes.set_title(f"score vs k per temperature (alpha={alpha:g})")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)


def format_report(report: dict) -> str:
    lines = [f"n = {report['n']} ({report['settings']['mode']} queries)",
             f"score {report['score']:.4f}  median {report['median']:.4f}"
             + (f"  95% CI [{report['ci95'][0]:.4f}, {report['ci95'][1]:.4f}]" if "ci95" in report else "")
             + f"  (k={report['settings']['k']}, T={report['settings']['temperature']}, "
               f"alpha={report['settings']['alpha']})",
             "baselines: " + ", ".join(f"{name} {value:.4f}" for name, value in report["baselines"].items()),
             f"true prompts found in the corpus: {report['leakage']['true_prompts_in_corpus']}"
             + (f" (excluded {report['leakage']['excluded_corpus_rows']} corpus rows)"
                if report["settings"]["exclude_exact"] else "")]
    if report["failed"]:
        lines.append(f"failed images (corpus-mean prediction): {len(report['failed'])}")
    if report.get("query_recall_at_10") is not None:
        lines.append(f"index recall@10 on these queries: {report['query_recall_at_10']:.3f}")
    if "sweep" in report:
        lines.append("")
        lines.append(f"{'k':>5} {'T':>6} {'alpha':>6} {'score':>8}")
        for row in sorted(report["sweep"], key=lambda row: -row["score"])[:15]:
            lines.append(f"{row['k']:>5} {row['temperature']:>6g} {row['alpha']:>6g} {row['score']:>8.4f}")
        best = report["best"]
        lines.append(f"best: --k {best['k']} --temperature {best['temperature']:g} --alpha {best['alpha']:g} "
                     f"→ {best['score']:.4f}")
    return "\n".join(lines)
