"""The modifier vocabulary for readable prompts: frequent comma-separated phrases of the corpus (styles,
artists, render engines: "octane render", "by greg rutkowski", "trending on artstation"), mined at build
time, counted, thresholded and deduplicated. The first comma segment of a prompt is its subject, not a
modifier, and is not counted.

Counting keeps one entry per distinct phrase; past MAX_TRACKED distinct phrases the ones seen once are
dropped (a phrase first seen late can then be undercounted by the few sightings before the prune: it only
matters near the threshold, and only for corpora with millions of distinct modifiers).
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from img2prompt.encoders.prompts import normalise_prompt

MIN_COUNT = 5  # a phrase must appear in at least this many prompts
MAX_PHRASES = 20_000
MAX_TRACKED = 2_000_000
MIN_CHARS, MAX_CHARS = 3, 60


def prompt_modifiers(prompt: str) -> list[str]:
    """The prompt's modifier phrases: comma segments after the first, normalised (lower case, single
    spaces), each once; too short or too long segments are not phrases."""
    seen: list[str] = []
    for segment in prompt.split(",")[1:]:
        phrase = normalise_prompt(segment).casefold()
        if MIN_CHARS <= len(phrase) <= MAX_CHARS and phrase not in seen:
            seen.append(phrase)
    return seen


def mine_phrases(prompts: Iterable[str], min_count: int = MIN_COUNT,
                 max_phrases: int = MAX_PHRASES) -> list[tuple[str, int]]:
    """(phrase, number of prompts using it) for the phrases used at least `min_count` times, most used first
    (ties by phrase), at most `max_phrases`."""
    counts: Counter[str] = Counter()
    for prompt in prompts:
        counts.update(prompt_modifiers(prompt))
        if len(counts) > MAX_TRACKED:
            counts = Counter({phrase: n for phrase, n in counts.items() if n > 1})
    return _most_used(counts, min_count, max_phrases)


def _most_used(counts: Counter[str], min_count: int, max_phrases: int) -> list[tuple[str, int]]:
    frequent = [(phrase, n) for phrase, n in counts.items() if n >= min_count]
    frequent.sort(key=lambda item: (-item[1], item[0]))
    return frequent[:max_phrases]


def merge_phrases(vocabulary: Iterable[tuple[str, int]], new_prompts: Iterable[str], min_count: int = MIN_COUNT,
                  max_phrases: int = MAX_PHRASES) -> list[tuple[str, int]]:
    """`add`: an index's vocabulary (phrase, count) with the new prompts' phrases counted in, thresholded
    again. A phrase the index's corpus used fewer than min_count times was never stored, so its count here
    starts from the new prompts: it enters once the new prompts alone use it often enough, or later adds
    push it over (a lower bound, never an overcount)."""
    counts: Counter[str] = Counter(dict(vocabulary))
    counts.update(Counter(phrase for prompt in new_prompts for phrase in prompt_modifiers(prompt)))
    return _most_used(counts, min_count, max_phrases)
