"""`img2prompt eval`: the competition metric on a labelled set, baselines, and (with --sweep) the grid of
settings, run as an eval job of named steps (`EvalJob.steps()`).

Metric = mean over images of cos(prediction, scorer embedding of the true prompt), exactly Kaggle's.
Queries are images (IMAGES_DIR/<imgId>.<ext>) or, without images, the CLIP text embedding of each true
prompt (text-only mode, meant to be used with --exclude-exact). One search at the largest k feeds every
setting of the sweep: images are never re-encoded per setting. The report's "switches" say which of the
quality switches were in play (image-keyed entries and their calibration, the regression head, consensus).

The options live in eval_options.py, the sweep and its cross-validation in eval_sweep.py, the report's
comparisons, text and plot in eval_report.py.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from img2prompt.atomic import write_json_atomic
from img2prompt.encoders.images import list_images
from img2prompt.encoders.models import load_text_model
from img2prompt.encoders.prompts import dedup_key
from img2prompt.encoders.text import minilm_embeddings
from img2prompt.errors import UserError
from img2prompt.index.flat import exact_search
from img2prompt.index.layout import MANIFEST, file_sha256
from img2prompt.index.prompt_keys import runs_contain
from img2prompt.index.recall import recall_at_k
from img2prompt.query.blend import corpus_mean_prediction
from img2prompt.query.eval_options import EvalOptions, caption_sets
from img2prompt.query.eval_report import caption_warnings, compare_captions, plot_sweep, switches_report
from img2prompt.query.eval_sweep import baseline_flags, model_weightings, sweep_cosines, sweep_grid, sweep_summary
from img2prompt.query.interrogate import DEFAULT_MODIFIERS, compose, rank_modifiers
from img2prompt.query.predict import Retrieved, blend_neighbours, head_predictions, mix_rows, retrieve_images
from img2prompt.query.preflight import check_eval_paths
from img2prompt.query.score import caption_vectors, check_labelled_images, cosine_rows, read_prompt_table, summarise
from img2prompt.query.search import Neighbours
from img2prompt.query.session import QuerySession
from img2prompt.query.settings import RetrievalSettings

DEFAULT_SHRINK = 0.2  # alpha of the knn_shrunk baseline when --alpha is 0


def competition_score(predictions: np.ndarray, truth: np.ndarray) -> float:
    """Kaggle's metric: the mean over images of the cosine similarity of prediction and truth."""
    return float(cosine_rows(predictions, truth).mean())


def read_labels(path: str | Path) -> pd.DataFrame:
    return read_prompt_table(path, "labels")


def exact_matches(session: QuerySession, true_prompts: list[str]) -> list[set[int]]:
    """For each true prompt, the corpus ids holding the same prompt after normalisation (case, spaces).
    Only the segments whose stored sorted keys (index/prompt_keys.py) hold a label's key are streamed (and
    those without a key file): a label set absent from the index costs a binary search per label, not a pass
    over every prompt (issue 31: eval's time grew 11 µs a prompt with that pass)."""
    keys = [dedup_key(prompt) for prompt in true_prompts]
    wanted = set(keys)
    by_key: dict[int, set[int]] = {}
    wanted_keys = np.fromiter(wanted, dtype=np.uint64, count=len(wanted))
    parts = {number for number, run in enumerate(session.index.stored_prompt_keys)
             if run is None or runs_contain([run], wanted_keys).any()}
    if not parts:
        return [set() for _ in keys]
    for first_id, prompts in session.index.iter_prompt_batches(parts=parts):
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


class EvalJob:
    """One eval run read as its phases: `steps()` names them in order (the optional ones only when asked for),
    each a method that reads and writes the job's state; `run()` runs them and returns the report. Every check
    that needs no model runs in the first step, before a model loads or an image is read."""

    def __init__(self, session: QuerySession, options: EvalOptions) -> None:
        self.session, self.options, self.index = session, options, session.index
        self.report: dict = {}
        self.searched: dict[tuple, Neighbours] = {}  # model weights → neighbours (an index of several models)
        self.head, self.head_source, self.head_skipped = None, None, None
        self.grid: list[RetrievalSettings] | None = None

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        steps = [("check", self.check), ("truth", self.embed_truth), ("leakage", self.find_leakage),
                 ("retrieve", self.retrieve), ("head", self.predict_head), ("score", self.score),
                 ("index_quality", self.measure_index)]
        if self.options.captions:
            steps.append(("captions", self.compare_captions))
        if self.options.sweep:
            steps.append(("sweep", self.sweep))
        steps.append(("switches", self.switches))
        if self.options.out:
            steps.append(("write", self.write))
        return steps

    def run(self) -> dict:
        for _, step in self.steps():
            step()
        return self.report

    def check(self) -> None:
        """Settings against the index, the paths, the labels (and that they name images), every caption file."""
        options = self.options
        self.chosen = options.settings.check_for(self.index)
        self.sets = caption_sets(options.captions)
        check_eval_paths(self.index.root, options.labels, options.images, options.out, options.plot, options.sweep,
                         self.sets)
        self.labels = read_labels(options.labels)
        if options.images:  # refuse labels that (almost) match no image, before any model
            check_labelled_images(options.labels, self.labels["imgId"].tolist(), options.images,
                                  list(list_images(options.images).paths))
        # read every caption file before the models and the search: a malformed one fails at once
        self.captions = {name: read_prompt_table(path, f"captions {name}") for name, path in self.sets.items()}

    def embed_truth(self) -> None:
        """The scorer (the index's text model, refusing any other) and its embedding of every true prompt."""
        index = self.index
        self.text_model = load_text_model(self.options.text_model or index.text_identity["name"],
                                          self.session.clip.device)
        if self.text_model.sha256 != index.text_identity["sha256"]:
            raise UserError("the scorer loaded for the ground truth differs from the index's text model "
                            f"({self.text_model.name}): pass --text-model with the index's scorer")
        self.truth = minilm_embeddings(self.text_model, self.labels["prompt"].tolist())

    def find_leakage(self) -> None:
        """The true prompts held by the corpus (excluded with --exclude-exact) and the largest k to fetch."""
        options, chosen = self.options, self.chosen
        self.matches = exact_matches(self.session, self.labels["prompt"].tolist())
        self.in_corpus = sum(1 for ids in self.matches if ids)
        self.exclude = self.matches if options.exclude_exact else None
        left = self.index.count - max((len(ids) for ids in self.matches), default=0) if self.exclude \
            else self.index.count
        self.kmax = min(left, max([chosen.k, *(options.sweep_k if options.sweep else ())]))
        if self.kmax < chosen.k:
            raise UserError(f"--k {chosen.k} is larger than the corpus left after --exclude-exact ({self.kmax})")

    def retrieve(self) -> None:
        """One encoding and one search at kmax (images, or the true prompts' CLIP text vectors)."""
        options, chosen = self.options, self.chosen
        self.chosen_weights = list(chosen.model_weights) if chosen.model_weights is not None else None
        if options.images:
            listing = list_images(options.images)
            self.retrieved, self.failed = retrieve_images(self.session, self.labels["imgId"].tolist(), listing.paths,
                                                          chosen, fetch=self.kmax, exclude=self.exclude,
                                                          loading=options.loading)
        else:
            self.retrieved, self.failed = _text_queries(self.session, self.labels, self.kmax, self.exclude,
                                                        self.chosen_weights), {}
        self.neighbours = self.retrieved.neighbours
        self.ok = self.neighbours.ids[:, 0] >= 0
        self.query_kind = "image" if options.images else "text"
        members = len(self.index.clip_identity.get("members") or [])
        self.weightings = model_weightings(members, options.sweep_model_weights, self.chosen_weights) \
            if members else None
        if members:
            weights = tuple(round(w, 6) for w in self.chosen_weights or [1 / members] * members)
            self.searched[weights] = self.neighbours

    def predict_head(self) -> None:
        """The regression head's predictions, where beta > 0 or the sweep asks (a sweep without beta runs on
        when the head cannot serve these queries, saying why)."""
        chosen = self.chosen
        if self.index.regression_head is None or not (chosen.beta > 0 or self.options.sweep):
            return
        try:
            self.head, self.head_source = head_predictions(self.index, self.retrieved.query_vectors, self.ok,
                                                           self.query_kind)
        except UserError as exc:
            if chosen.beta > 0:
                raise
            self.head_skipped = f"the regression head is not swept: {exc}"

    def neighbours_for(self, weights: tuple | None) -> Neighbours:
        """The same encoded queries searched again with other model weights (one search each, no encoding)."""
        if weights not in self.searched:
            ok_rows = np.flatnonzero(self.ok)
            found = self.session.retriever.search(self.retrieved.query_vectors[ok_rows], self.kmax,
                                                  [self.exclude[row] for row in ok_rows] if self.exclude else None,
                                                  query_kind=self.query_kind, model_weights=list(weights))
            self.searched[weights] = found.spread(ok_rows, len(self.neighbours.ids))
        return self.searched[weights]

    def score_of(self, settings: RetrievalSettings, cosines: bool = True) -> np.ndarray:
        """Per-image cosines of a setting (or, cosines=False, its predictions)."""
        weights = settings.model_weights
        found = self.neighbours if weights is None else self.neighbours_for(tuple(round(w, 6) for w in weights))
        view = Neighbours(found.scores[:, :settings.k], found.ids[:, :settings.k])
        predictions = blend_neighbours(self.index, view, settings, self.head, self.retrieved.query_vectors)
        return cosine_rows(predictions, self.truth) if cosines else predictions

    def score(self) -> None:
        """The chosen setting's score and the baselines', and what the run was."""
        options, chosen, index, labels = self.options, self.chosen, self.index, self.labels
        self.shrink = chosen.alpha if chosen.alpha > 0 else DEFAULT_SHRINK
        plain = RetrievalSettings(k=chosen.k, model_weights=chosen.model_weights, min_score=chosen.min_score,
                                  **chosen.weighing())
        self.product = self.score_of(chosen)
        corpus_mean = corpus_mean_prediction(index.minilm_mean, len(labels))
        self.report.update({
            "n": len(labels),
            **summarise(self.product),
            "baselines": {
                "corpus_mean": float(cosine_rows(corpus_mean, self.truth).mean()),
                "top1": float(self.score_of(plain.replace(k=1)).mean()),
                "knn": float(self.score_of(plain).mean()),
                "knn_shrunk": float(self.score_of(dataclasses.replace(plain, alpha=self.shrink)).mean()),
                # beta = 1: the regression head alone (the k-NN part does not count)
                **({"regression_head": float(self.score_of(dataclasses.replace(plain, beta=1.0)).mean())}
                   if self.head is not None else {}),
            },
            "settings": {**chosen.as_dict(), "knn_shrunk_alpha": self.shrink,
                         "mode": "images" if options.images else "text",
                         "exclude_exact": options.exclude_exact, "labels": str(options.labels),
                         "images": options.images},
            "leakage": {"true_prompts_in_corpus": self.in_corpus,
                        "excluded_corpus_rows": sum(len(ids) for ids in self.matches) if options.exclude_exact
                        else 0},
            "failed": self.failed,
            "index": {"path": str(index.root), "created_at": index.manifest.get("created_at"), "count": index.count,
                      "faiss": index.search_plan["kind"], "manifest_sha256": _manifest_sha(index.root)},
            "models": {"clip": index.clip_identity, "text": index.text_identity},
        })

    def measure_index(self) -> None:
        """Recall of an approximate index on these queries, the readable prompt's score, the head's warnings."""
        index, report = self.index, self.report
        if index.search_plan["kind"] != "flat":
            report["query_recall_at_10"] = recall_on_queries(self.session, self.retrieved)
        if index.phrases is not None:
            report["interrogate"] = score_interrogation(index, self.retrieved, self.text_model, self.truth)
        report["warnings"] = [self.head_skipped] if self.head_skipped else []
        if self.head is not None and self.in_corpus and (self.chosen.beta > 0 or self.options.sweep):
            report["warnings"].append(f"{self.in_corpus} of the true prompts are in the index, and the regression "
                                      "head was fitted on the index's rows (--exclude-exact only removes "
                                      "neighbours): its scores here are optimistic; judge beta on labels whose "
                                      "prompts are not in the corpus")

    def compare_captions(self) -> None:
        """Each caption set scored beside retrieval on the images both cover."""
        self.report["captions"] = {}
        for name, frame in self.captions.items():
            entry = compare_captions(self.labels["imgId"].tolist(), self.truth, self.product, frame,
                                     caption_vectors(self.text_model, frame), self.sets[name])
            self.report["captions"][name] = entry
            self.report["warnings"] += caption_warnings(name, entry)

    def sweep(self) -> None:
        """Every grid setting's per-image cosines from the one search, summarised and cross-validated."""
        self.grid = sweep_grid(self.options, self.kmax, has_head=self.head is not None, weightings=self.weightings)
        cosines = sweep_cosines(self.grid, lambda settings: self.score_of(settings, cosines=False),
                                lambda blended, beta: cosine_rows(mix_rows(blended, self.head, beta, self.ok),
                                                                  self.truth))
        summary = sweep_summary(self.grid, cosines, self.report["baselines"], baseline_flags(self.options, self.shrink))
        # the sweep's warnings join the head's and the captions' (an update alone would drop those)
        summary["warnings"] = self.report.get("warnings", []) + summary["warnings"]
        self.report.update(summary)
        if self.options.plot:
            plot_sweep(self.report, self.options.plot)

    def switches(self) -> None:
        self.report["switches"] = switches_report(self.index, self.options, self.grid, self.head_source,
                                                  self.chosen_weights)

    def write(self) -> None:
        write_json_atomic(self.options.out, self.report)


def run_eval(session: QuerySession, options: EvalOptions) -> dict:
    """The report for a labelled set, on an opened session (the index and its CLIP model)."""
    return EvalJob(session, options).run()


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
