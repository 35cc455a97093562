"""What a query returns: the ranked prompts per image or text (`SearchResult`), and what a query may take."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

ImageInput = Any  # a path (str / os.PathLike) or a PIL.Image.Image


@dataclass
class SearchResult:
    """The ranked prompts for one query (an image or a text); `error` is set for an undecodable image."""
    query: str
    ids: np.ndarray  # int64 [k], best first
    scores: np.ndarray  # float32 [k], cosine similarity in CLIP space (image keys: calibrated, see query/search.py)
    prompts: list[str] = field(default_factory=list)
    error: str | None = None
    keys: list[str] = field(default_factory=list)  # per hit: "text", or "image" for a `build --pairs` entry

    def to_dict(self) -> dict:
        """The `img2prompt search --json` entry: {"query", "results": [{"rank", "score", "prompt", "id", "key"}]}."""
        keys = self.keys or ["text"] * len(self.ids)
        entry: dict = {"query": self.query, "results": [
            {"rank": rank + 1, "score": round(float(score), 6), "prompt": prompt, "id": int(prompt_id), "key": key}
            for rank, (score, prompt, prompt_id, key) in enumerate(zip(self.scores, self.prompts, self.ids, keys))]}
        if self.error is not None:
            entry["error"] = self.error
        return entry
