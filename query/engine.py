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
from img2prompt.query.blend import (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_CONSENSUS, DEFAULT_K, DEFAULT_TEMPERATURE,
                                    BlendSettings)
from img2prompt.encoders.image_embed import embed_images, image_label
from img2prompt.query.interrogate import DEFAULT_MODIFIERS, Interrogation, compose_all
from img2prompt.query.predict import predict_rows, require_head
from img2prompt.query.search import Neighbours
from img2prompt.query.session import ModelOverrides, QuerySession, open_session

log = logging.getLogger(__name__)


class Img2PromptIndex:
    """A built index opened for queries. Use as a context manager, or call close()."""

    def __init__(self, session: QuerySession) -> None:
        self.session = session

    @classmethod
    def open(cls, path: str | Path, *, device: str = "auto", clip_model: str | None = None,
             clip_pretrained: str | None = None, text_model: str | None = None,
             verify: bool = False) -> "Img2PromptIndex":
        overrides = ModelOverrides(clip_model, clip_pretrained, text_model)
        session = open_session(str(path), overrides, device, verify)
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
        return str(self.session.clip.device)

    def prompts(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """The prompt texts with these ids ("" for -1, i.e. no neighbour)."""
        return self.session.index.prompt_rows(ids)

    # -- queries ----------------------------------------------------------------------------------------
    def predict(self, images: Sequence[ImageInput], *, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                alpha: float = DEFAULT_ALPHA, consensus: float = DEFAULT_CONSENSUS, beta: float = DEFAULT_BETA,
                model_weights: str | Sequence[float] | None = None, batch_size: int | None = None,
                workers: int | None = None, progress: bool = False) -> np.ndarray:
        """float32 [n, 384] unit-norm predictions, one per image (paths or PIL images), in input order.

        consensus: re-weight neighbours by their agreement with the others; beta: share of the regression
        head (query/blend.py); model_weights: an index of several CLIP models scores Σ w_m · cos_m (default:
        equal). An image that cannot be decoded gets the corpus-mean prediction and a warning.
        """
        return self.predict_with_neighbours(images, k=k, temperature=temperature, alpha=alpha, consensus=consensus,
                                            beta=beta, model_weights=model_weights, batch_size=batch_size,
                                            workers=workers, progress=progress)[0]

    def predict_with_neighbours(self, images: Sequence[ImageInput], *, k: int = DEFAULT_K,
                                temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                                consensus: float = DEFAULT_CONSENSUS, beta: float = DEFAULT_BETA,
                                model_weights: str | Sequence[float] | None = None, batch_size: int | None = None,
                                workers: int | None = None,
                                progress: bool = False) -> tuple[np.ndarray, list[SearchResult]]:
        """`predict` plus, per image, the neighbours blended into it (from the same single encoding)."""
        settings = BlendSettings(k=k, temperature=temperature, alpha=alpha, consensus=consensus,
                                 beta=beta).check()
        self.session.retriever.check_k(k)
        require_head(self.session.index, beta)  # before any image is encoded
        self.session.retriever.model_weights(model_weights)
        embedded = embed_images(self.session.clip, list(images), batch_size, workers, progress=progress)
        neighbours = self._neighbours_for(embedded, len(images), k, model_weights)
        for position, reason in embedded.failed.items():
            log.warning("%s: %s; it gets the corpus-mean prediction", image_label(images[position], position), reason)
        vectors = np.zeros((len(images), self.session.index.clip_dim), dtype=np.float32)
        vectors[embedded.ok] = embedded.vectors
        predictions = predict_rows(self.session.index, neighbours, vectors, settings)
        return predictions, self._results([image_label(image, i) for i, image in enumerate(images)], neighbours,
                                          embedded.failed)

    def search_images(self, images: Sequence[ImageInput], k: int = 10, *, batch_size: int = 16,
                      workers: int | None = 0,
                      model_weights: str | Sequence[float] | None = None) -> list[SearchResult]:
        """Ranked prompts per image, in input order; an undecodable image gets a result with `error`."""
        self.session.retriever.check_k(k)
        self.session.retriever.model_weights(model_weights)
        embedded = embed_images(self.session.clip, list(images), batch_size, workers)
        neighbours = self._neighbours_for(embedded, len(images), k, model_weights)
        return self._results([image_label(image, i) for i, image in enumerate(images)], neighbours, embedded.failed)

    def interrogate(self, images: Sequence[ImageInput], modifiers: int = DEFAULT_MODIFIERS, *,
                    batch_size: int | None = None, workers: int | None = 0) -> list[Interrogation]:
        """A readable prompt per image: the best neighbour's prompt plus the corpus's modifier phrases that
        CLIP ranks highest for the image (not already in that prompt)."""
        vocabulary = self.session.index.phrases
        if vocabulary is None:
            raise UserError(f"{self.session.index.root} has no phrase vocabulary (built before it existed): "
                            "rebuild it with this img2prompt to interrogate")
        embedded = embed_images(self.session.clip, list(images), batch_size, workers)
        results = self._neighbours_for(embedded, len(images), 1)
        return compose_all([image_label(image, i) for i, image in enumerate(images)], embedded, results,
                           self.prompts(results.ids[:, 0]), vocabulary, modifiers)

    def search_texts(self, texts: Sequence[str], k: int = 10, *,
                     model_weights: str | Sequence[float] | None = None) -> list[SearchResult]:
        """Ranked prompts per query text (CLIP text → CLIP text), in input order."""
        self.session.retriever.check_k(k)
        self.session.retriever.model_weights(model_weights)
        texts = list(texts)
        vectors = self.session.clip.text_embeddings(texts).vectors
        return self._results(texts, self.session.retriever.search(vectors, k, query_kind="text",
                                                                  model_weights=model_weights))

    def submission(self, images_dir: str | Path, out: str | Path = "submission.csv",
                   sample_submission: str | Path | None = None, **options):
        """Predict every image in `images_dir` and write Kaggle's submission.csv; returns a SubmitReport.

        Options: k, temperature, alpha, consensus, beta, model_weights, explain (CSV path), save_npy (path), strict,
        batch_size, workers, progress.
        """
        from img2prompt.query.submit import SubmitOptions, run_submit

        return run_submit(self.session, SubmitOptions(
            images=str(images_dir), out=str(out),
            sample_submission=str(sample_submission) if sample_submission is not None else None, **options))

    # -- plumbing ---------------------------------------------------------------------------------------
    def _neighbours_for(self, embedded, total: int, k: int, model_weights=None) -> Neighbours:
        """Search the decoded images; rows of images that failed stay empty (ids -1)."""
        return self.session.retriever.search(embedded.vectors, k, model_weights=model_weights).spread(embedded.ok,
                                                                                                       total)

    def _results(self, queries: list[str], neighbours: Neighbours,
                 failed: dict[int, str] | None = None) -> list[SearchResult]:
        """One SearchResult per query; a failed one (position → reason) has no results and its error."""
        flat = self.prompts(neighbours.ids.ravel())
        kinds = self.session.index.key_kinds(neighbours.ids)
        k = neighbours.ids.shape[1]
        failed = failed or {}
        return [SearchResult(query, np.zeros(0, np.int64), np.zeros(0, np.float32), [], error=failed[row])
                if row in failed else
                SearchResult(query, neighbours.ids[row], neighbours.scores[row], flat[row * k:(row + 1) * k],
                             keys=list(kinds[row]))
                for row, query in enumerate(queries)]

    def close(self) -> None:
        """Release the search backend and models (GPU memory included)."""
        retriever = self.session.__dict__.pop("retriever", None)
        if retriever is not None:
            retriever.close()
        if self.session.clip.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def __enter__(self) -> "Img2PromptIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Img2PromptIndex({str(self.session.index.root)!r}, {self.count} prompts, "
                f"{self.session.index.search_plan['kind']} search, device {self.device})")
