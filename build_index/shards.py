"""Planning the build: the deduplicated prompt stream cut into shard tasks (the index writer saves them)."""
from __future__ import annotations

import itertools
from typing import Iterator

from img2prompt.index.writer import ShardTask


def plan_shards(prompts: Iterator[str] | Iterator[tuple[int, str]], shard_size: int,
                first_number: int = 0) -> Iterator[ShardTask]:
    """Cut the (deduplicated) prompt stream into shard tasks; shard n starts at row n × shard_size.

    Items are prompts, or (raw corpus row, prompt) pairs when the rows are needed later, or (image path,
    prompt) pairs for image-keyed entries. The planned first ids are the resume key; the index's ids are
    positions (consolidate), since an image that cannot be decoded leaves its shard short."""
    number = first_number
    while batch := list(itertools.islice(prompts, shard_size)):
        rows = images = None
        if isinstance(batch[0], tuple):
            firsts, batch = [first for first, _ in batch], [prompt for _, prompt in batch]
            rows, images = (None, firsts) if isinstance(firsts[0], str) else (firsts, None)
        yield ShardTask(number=number, first_id=number * shard_size, prompts=batch, source_rows=rows, images=images)
        number += 1
