"""Similarity search from the CLI: images or text → ranked prompts, as a table or JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from img2prompt.build_index.embed import clip_text_embeddings
from img2prompt.errors import UserError
from img2prompt.query.embed_images import embed_images
from img2prompt.query.session import ModelOverrides, open_session


@dataclass
class SearchOptions:
    index: str
    images: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    k: int = 10
    models: ModelOverrides = field(default_factory=ModelOverrides)
    device: str = "auto"
    verify: bool = False


def run_search(options: SearchOptions) -> list[dict]:
    """[{"query", "results": [{"rank", "score", "prompt", "id"}, ...]}, ...] in query order.

    An image that cannot be decoded gives an entry with "error" and no results, never a crash.
    """
    if not options.images and not options.texts:
        raise UserError("give --image PATH (repeatable) or --text TEXT")
    for image in options.images:
        if not Path(image).is_file():
            raise UserError(f"image not found: {image}")
    session = open_session(options.index, options.models, options.device, options.verify)
    session.retriever.check_k(options.k)
    entries = [{"query": str(path), "results": []} for path in options.images]
    if options.images:
        embedded = embed_images(session.clip, [Path(p) for p in options.images], batch_size=16, workers=0)
        for position, reason in embedded.failed.items():
            entries[position]["error"] = reason
        vectors, rows = embedded.vectors, [entries[position] for position in embedded.ok]
        _fill(session, vectors, rows, options.k)
    if options.texts:
        text_entries = [{"query": text, "results": []} for text in options.texts]
        _fill(session, clip_text_embeddings(session.clip, options.texts).vectors, text_entries, options.k)
        entries.extend(text_entries)
    return entries


def _fill(session, vectors, entries: list[dict], k: int) -> None:
    if not entries:
        return
    found = session.retriever.search(vectors, k)
    for entry, scores, ids in zip(entries, found.scores, found.ids):
        prompts = session.index.prompt_rows(ids)
        entry["results"] = [{"rank": rank + 1, "score": round(float(score), 6), "prompt": prompt, "id": int(i)}
                            for rank, (score, prompt, i) in enumerate(zip(scores, prompts, ids))]


def format_json(entries: list[dict]) -> str:
    return json.dumps(entries, ensure_ascii=False, indent=2)


def format_table(entries: list[dict], width: int = 100) -> str:
    lines = []
    for entry in entries:
        lines.append(f"query: {entry['query']}")
        if "error" in entry:
            lines.append(f"  error: {entry['error']}")
        for result in entry["results"]:
            prompt = result["prompt"] if len(result["prompt"]) <= width else result["prompt"][:width - 1] + "…"
            lines.append(f"  {result['rank']:>3}  {result['score']:.4f}  #{result['id']:<8} {prompt}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
