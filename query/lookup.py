"""Similarity search output: ranked prompts per query (images or texts) as a table or JSON."""
from __future__ import annotations

import json
from typing import Sequence

from img2prompt.query.preflight import check_search_images
from img2prompt.query.results import SearchResult
from img2prompt.query.settings import DEFAULT_SEARCH_K
from img2prompt.errors import UserError


def run_search(index, images: Sequence[str] = (), texts: Sequence[str] = (), k: int = DEFAULT_SEARCH_K,
               model_weights: str | Sequence[float] | None = None, min_score: float | None = None,
               recursive: bool = False) -> list[SearchResult]:
    """Image results first, then text results, each in the order given; `index` is an Img2PromptIndex. Image
    folders stand for their images (subfolders too with `recursive`). Everything is checked (settings, image
    paths) before a model loads."""
    if not images and not texts:
        raise UserError("give --image PATH (repeatable) or --text TEXT")
    index.settings(k=k, model_weights=model_weights, min_score=min_score)
    images = check_search_images(images, recursive)
    options = {"model_weights": model_weights, "min_score": min_score}
    results = index.search_images(list(images), k, **options) if images else []
    return results + (index.search_texts(list(texts), k, **options) if texts else [])


def format_json(results: list[SearchResult]) -> str:
    return json.dumps([result.to_dict() for result in results], ensure_ascii=False, indent=2)


def format_table(results: list[SearchResult], width: int = 100) -> str:
    lines = []
    for entry in (result.to_dict() for result in results):
        lines.append(f"query: {entry['query']}")
        if "error" in entry:
            lines.append(f"  error: {entry['error']}")
        for result in entry["results"]:
            prompt = result["prompt"] if len(result["prompt"]) <= width else result["prompt"][:width - 1] + "…"
            kind = "  [image key]" if result["key"] == "image" else ""  # a `build --pairs` entry
            lines.append(f"  {result['rank']:>3}  {result['score']:.4f}  #{result['id']:<8} {prompt}{kind}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
