"""`Img2PromptIndex`: an opened index with its CLIP model and search backend, reused across calls.

This is what `img2prompt.open_index` returns and what every front end (CLI, notebook, server) calls:
models and the backend load once in `open`, and each method only encodes, searches and blends.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from img2prompt.query.results import ImageInput, SearchResult
from img2prompt.errors import UserError
from img2prompt.encoders.image_embed import ImageEmbeddings, embed_images, image_label
from img2prompt.query.interrogate import DEFAULT_MODIFIERS, Interrogation, compose_all
from img2prompt.query.eval_options import eval_options
from img2prompt.query.evaluate import run_eval
from img2prompt.query.folder_job import FolderJob, FolderReport, run_folder_job
from img2prompt.query.lookup import run_search
from img2prompt.query.predict import blended_scores, predict_rows, retrieve
from img2prompt.query.search import Neighbours
from img2prompt.query.session import ModelOverrides, QuerySession, open_session
from img2prompt.encoders import DEFAULT_DEVICE
from img2prompt.query.settings import DEFAULT_SEARCH_K, DEFAULT_SUBMISSION, ImageLoading, RetrievalSettings
from img2prompt.query.submit import SubmitOptions, SubmitReport, run_submit

log = logging.getLogger(__name__)


class Img2PromptIndex:
    """A built index opened for queries. Use as a context manager, or call close()."""

    def __init__(self, session: QuerySession) -> None:
        self.session = session

    @classmethod
    def open(cls, path: str | Path, *, device: str = DEFAULT_DEVICE, clip_model: str | None = None,
             clip_pretrained: str | None = None, text_model: str | None = None,
             verify: bool = False, lazy: bool = False, precision: str | None = None) -> "Img2PromptIndex":
        overrides = ModelOverrides(clip_model, clip_pretrained, text_model, precision)
        session = open_session(str(path), overrides, device, verify, lazy=lazy)
        if not lazy:
            session.retriever  # load the search backend now, not inside the first query
        return cls(session)

    # -- what it holds ----------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.session.index.count

    @property
    def manifest(self) -> dict:
        return self.session.index.manifest

    @property
    def device(self) -> str:
        return str(self.session.device)

    def prompts(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """The prompt texts with these ids ("" for -1, i.e. no neighbour)."""
        return self.session.index.prompt_rows(ids)

    # -- queries ----------------------------------------------------------------------------------------
    def settings(self, settings: RetrievalSettings | None = None, **values) -> RetrievalSettings:
        """`settings` (default: the defaults) with `values` changed, checked against this index: the one
        check every query method makes before any image is decoded."""
        return RetrievalSettings.of(settings, **values).check_for(self.session.index)

    def predict(self, images: Sequence[ImageInput], settings: RetrievalSettings | None = None, *,
                batch_size: int | None = None, workers: int | None = None, progress: bool = False,
                **values) -> np.ndarray:
        """float32 [n, 384] unit-norm predictions, one per image (paths or PIL images), in input order.

        `settings`: a RetrievalSettings (k, temperature, weighting, power, epsilon, alpha, consensus, beta,
        model_weights, min_score; see query/settings.py), or its fields as keywords (`predict(images, k=5)`). An image that cannot be decoded
        gets the corpus-mean prediction and a warning.
        """
        return self.predict_with_neighbours(images, settings, batch_size=batch_size, workers=workers,
                                            progress=progress, **values)[0]

    def predict_with_neighbours(self, images: Sequence[ImageInput], settings: RetrievalSettings | None = None, *,
                                batch_size: int | None = None, workers: int | None = None, progress: bool = False,
                                embedded: ImageEmbeddings | None = None,
                                **values) -> tuple[np.ndarray, list[SearchResult]]:
        """`predict` plus, per image, the neighbours blended into it (from the same single encoding).
        `embedded`: `embed_images(images)` done already (a server merging requests into one encoder call)."""
        settings = self.settings(settings, **values)
        images = list(images)
        found = retrieve(self.session, images, settings, loading=ImageLoading(batch_size, workers, progress),
                         embedded=embedded)
        for position, reason in found.failed.items():
            log.warning("%s: %s; it gets the corpus-mean prediction", image_label(images[position], position), reason)
        predictions = predict_rows(self.session.index, found.neighbours, found.query_vectors, settings)
        return predictions, self._results([image_label(image, i) for i, image in enumerate(images)],
                                          found.neighbours, found.failed)

    def search_images(self, images: Sequence[ImageInput], k: int = DEFAULT_SEARCH_K, *, batch_size: int = 16,
                      workers: int | None = 0, model_weights: str | Sequence[float] | None = None,
                      min_score: float | None = None, embedded: ImageEmbeddings | None = None) -> list[SearchResult]:
        """Ranked prompts per image, in input order; an undecodable image gets a result with `error`.
        min_score: hits scoring under it are left out (the best hit always stays); `embedded` as for predict."""
        settings = self.settings(k=k, model_weights=model_weights, min_score=min_score)
        images = list(images)
        found = retrieve(self.session, images, settings, loading=ImageLoading(batch_size, workers),
                         embedded=embedded)
        return self._results([image_label(image, i) for i, image in enumerate(images)], found.neighbours,
                             found.failed, settings, found.query_vectors)

    def search(self, images: Sequence[str] = (), texts: Sequence[str] = (), k: int = DEFAULT_SEARCH_K, *,
               model_weights: str | Sequence[float] | None = None, min_score: float | None = None,
               recursive: bool = False) -> list[SearchResult]:
        """Image results first, then text results (`img2prompt search`); image paths are checked first; a
        folder stands for its images (subfolders too with `recursive`)."""
        return run_search(self, images, texts, k, model_weights, min_score, recursive)

    def evaluate(self, labels: str | Path, settings: RetrievalSettings | None = None, **options) -> dict:
        """`img2prompt eval`'s report on a labelled set (imgId,prompt); options: images, sweep, plot, out,
        exclude_exact, text_model, captions, the sweep axes, batch_size, workers, progress, and the settings'
        fields as keywords."""
        return run_eval(self.session, eval_options(labels, settings, **options))

    def interrogate(self, images: Sequence[ImageInput], modifiers: int = DEFAULT_MODIFIERS, *,
                    batch_size: int | None = None, workers: int | None = 0,
                    embedded: ImageEmbeddings | None = None) -> list[Interrogation]:
        """A readable prompt per image: the best neighbour's prompt plus the corpus's modifier phrases that
        CLIP ranks highest for the image (not already in that prompt); `embedded` as for predict."""
        self.check_vocabulary()
        vocabulary = self.session.index.phrases
        if embedded is None:
            embedded = embed_images(self.session.clip, list(images), batch_size, workers)
        results = self._neighbours_for(embedded, len(images), 1)
        return compose_all([image_label(image, i) for i, image in enumerate(images)], embedded, results,
                           self.prompts(results.ids[:, 0]), vocabulary, modifiers)

    def interrogate_folder(self, inputs: str | Path | Sequence[str | Path], *, recursive: bool = False,
                           out: str | Path | None = None, txt: bool = False, overwrite_txt: bool = False,
                           resume: bool = False, modifiers: int = DEFAULT_MODIFIERS, batch_size: int | None = None,
                           workers: int | None = 0, progress: bool = False, echo=None) -> FolderReport:
        """`interrogate` over image files and folders alike (recursive: subfolders too), streamed in bounded
        chunks. out: a .csv or .jsonl of image, prompt, best_neighbour, best_neighbour_id, score (written
        atomically; with resume, the old rows plus the new); txt: the prompt in IMAGE.txt beside each image (an
        existing one kept unless overwrite_txt); resume: skip the images already done; echo: called with each
        Interrogation as it comes. Returns a FolderReport (counts, failed images with their reason)."""
        inputs = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(path) for path in inputs]
        job = FolderJob(inputs, recursive=recursive, out=None if out is None else str(out), txt=txt,
                        overwrite_txt=overwrite_txt, resume=resume, modifiers=modifiers, progress=progress)
        job.check()
        self.check_vocabulary()
        return run_folder_job(job, lambda paths: self.interrogate(paths, modifiers, batch_size=batch_size,
                                                                   workers=workers), echo,
                              prepare=lambda: (self.session.clip, self.session.retriever))

    def check_vocabulary(self) -> None:
        if self.session.index.phrases is None:
            raise UserError(f"{self.session.index.root} has no phrase vocabulary (built before it existed): "
                            "rebuild it with this img2prompt to interrogate")

    def search_texts(self, texts: Sequence[str], k: int = DEFAULT_SEARCH_K, *, model_weights: str | Sequence[float] | None = None,
                     min_score: float | None = None, vectors: np.ndarray | None = None) -> list[SearchResult]:
        """Ranked prompts per query text (CLIP text → CLIP text), in input order; `vectors`: `embed_texts(texts)`
        done already (a server merging requests into one encoder call)."""
        settings = self.settings(k=k, model_weights=model_weights, min_score=min_score)
        texts = list(texts)
        vectors = self.embed_texts(texts) if vectors is None else vectors
        return self._results(texts, self.session.retriever.search(vectors, settings.k, query_kind="text",
                                                                  model_weights=settings.model_weights),
                             settings=settings, query_vectors=vectors)

    def submission(self, images_dir: str | Path, out: str | Path = DEFAULT_SUBMISSION,
                   sample_submission: str | Path | None = None, settings: RetrievalSettings | None = None, *,
                   explain: str | Path | None = None, save_npy: str | Path | None = None, strict: bool = False,
                   batch_size: int | None = None, workers: int | None = None, progress: bool = False,
                   **values) -> SubmitReport:
        """Predict every image in `images_dir` and write Kaggle's submission.csv; returns a SubmitReport.

        `settings` as for `predict` (or its fields as keywords); explain: a CSV of each image's neighbours;
        save_npy: the predictions as float32 [n, 384] (+ NAME.ids.txt); strict: an undecodable image fails.
        """
        return run_submit(self.session, SubmitOptions(
            images=str(images_dir), out=str(out),
            sample_submission=str(sample_submission) if sample_submission is not None else None,
            explain=None if explain is None else str(explain), save_npy=None if save_npy is None else str(save_npy),
            strict=strict, settings=self.settings(settings, **values),
            loading=ImageLoading(batch_size, workers, progress)))

    # -- encoders alone (a caller that merges several requests into one model call) ----------------------
    def embed_images(self, images: Sequence[ImageInput], *, batch_size: int | None = None,
                     workers: int | None = 0) -> ImageEmbeddings:
        """CLIP image vectors of `images` (undecodable ones listed in `failed`), for the `embedded=` argument."""
        return embed_images(self.session.clip, list(images), batch_size, workers)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """CLIP text vectors (float32, unit norm) of `texts`, for search_texts' `vectors=` argument."""
        return self.session.clip.text_embeddings(list(texts)).vectors

    # -- plumbing ---------------------------------------------------------------------------------------
    def _neighbours_for(self, embedded, total: int, k: int, model_weights=None) -> Neighbours:
        """Search the decoded images; rows of images that failed stay empty (ids -1)."""
        return self.session.retriever.search(embedded.vectors, k, model_weights=model_weights).spread(embedded.ok,
                                                                                                       total)

    def _results(self, queries: list[str], neighbours: Neighbours, failed: dict[int, str] | None = None,
                 settings: RetrievalSettings | None = None, query_vectors: np.ndarray | None = None) -> list[SearchResult]:
        """One SearchResult per query; a failed one (position → reason) has no results and its error. With a
        score floor, hits under it are left out (as the blend leaves them out)."""
        flat = self.prompts(neighbours.ids.ravel())
        kinds = self.session.index.key_kinds(neighbours.ids)
        k = neighbours.ids.shape[1]
        kept = np.ones(neighbours.ids.shape, dtype=bool)
        if settings is not None and settings.min_score is not None and len(queries):
            ok = neighbours.ids[:, 0] >= 0
            kept[ok] = np.isfinite(blended_scores(self.session.index, neighbours.scores[ok], neighbours.ids[ok],
                                                  settings, query_vectors[ok]))
        failed = failed or {}
        return [SearchResult(query, np.zeros(0, np.int64), np.zeros(0, np.float32), [], error=failed[row])
                if row in failed else
                SearchResult(query, neighbours.ids[row][kept[row]], neighbours.scores[row][kept[row]],
                             [prompt for prompt, keep in zip(flat[row * k:(row + 1) * k], kept[row]) if keep],
                             keys=[kind for kind, keep in zip(kinds[row], kept[row]) if keep])
                for row, query in enumerate(queries)]

    def close(self) -> None:
        """Release the search backend and models (GPU memory included)."""
        retriever = self.session.__dict__.pop("retriever", None)
        if retriever is not None:
            retriever.close()
        if self.session.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def __enter__(self) -> "Img2PromptIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Img2PromptIndex({str(self.session.index.root)!r}, {self.count} prompts, "
                f"{self.session.index.search_plan['kind']} search, device {self.device})")
