"""Prompt text normalisation and dedup keys: what the build (corpus, pairs) and the query side (eval labels,
interrogation) must agree on, so it lives below both."""
from __future__ import annotations

import hashlib


def normalise_prompt(text: str) -> str:
    """Collapse all whitespace runs (CR, LF, tabs, NBSP…) into single spaces and strip the ends."""
    return " ".join(text.split())


def dedup_key(prompt: str) -> int:
    """8-byte hash of the case- and whitespace-insensitive form: compact enough for tens of millions."""
    return int.from_bytes(hashlib.blake2b(normalise_prompt(prompt).casefold().encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")
