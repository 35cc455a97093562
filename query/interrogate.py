"""A readable prompt for an image: its best neighbour's prompt plus the modifier phrases of the corpus
vocabulary that CLIP ranks highest for the image (what CLIP Interrogator does, on our own vocabulary).

Pure numpy over the stored vectors; the text it composes is also a prediction (its MiniLM embedding),
which `eval` scores beside the k-NN blend.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from img2prompt.encoders.prompts import normalise_prompt

DEFAULT_MODIFIERS = 4


@dataclass
class Interrogation:
    query: str
    prompt: str  # the composed, readable prompt ("" when the image failed)
    base: str = ""  # the best neighbour's prompt
    base_id: int = -1
    base_score: float = float("nan")
    modifiers: list[dict] = field(default_factory=list)  # [{"phrase", "score"}], best first
    error: str | None = None

    def to_dict(self) -> dict:
        entry = {"query": self.query, "prompt": self.prompt, "base": self.base, "base_id": self.base_id,
                 "base_score": None if np.isnan(self.base_score) else round(self.base_score, 6),
                 "modifiers": self.modifiers}
        if self.error is not None:
            entry["error"] = self.error
        return entry


def rank_modifiers(query: np.ndarray, phrase_vectors: np.ndarray, phrases: list[str], base: str,
                   count: int = DEFAULT_MODIFIERS) -> list[dict]:
    """The `count` phrases most similar to the query vector that the base prompt does not already hold."""
    if count <= 0 or not phrases:
        return []
    scores = np.asarray(phrase_vectors, dtype=np.float32) @ np.asarray(query, dtype=np.float32)
    held = normalise_prompt(base).casefold()
    chosen = []
    for row in np.argsort(-scores, kind="stable"):
        if phrases[row] not in held:
            chosen.append({"phrase": phrases[row], "score": round(float(scores[row]), 6)})
            if len(chosen) == count:
                break
    return chosen


def compose(base: str, modifiers: list[dict]) -> str:
    return ", ".join([base.rstrip(", ")] + [modifier["phrase"] for modifier in modifiers]) if base else ""


def compose_all(queries: list[str], embedded, neighbours, base_prompts: list[str],
                vocabulary: tuple[list[str], np.ndarray], count: int) -> list[Interrogation]:
    """One Interrogation per query from its top-1 neighbour and its image vector (failed ones get the error)."""
    phrases, phrase_vectors = vocabulary
    vector_of = dict(zip(embedded.ok, embedded.vectors))
    out = []
    for row, query in enumerate(queries):
        if row in embedded.failed:
            out.append(Interrogation(query, "", error=embedded.failed[row]))
            continue
        base = base_prompts[row]
        modifiers = rank_modifiers(vector_of[row], phrase_vectors, phrases, base, count)
        out.append(Interrogation(query, compose(base, modifiers), base, int(neighbours.ids[row, 0]),
                                 float(neighbours.scores[row, 0]), modifiers))
    return out
