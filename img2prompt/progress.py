"""Progress bars for long work: rates and ETA on a terminal, sparse single lines in logs."""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # in a log file, one line every 30 s rather than a redraw per update


def progress_bar(*, enabled: bool = True, **options) -> tqdm:
    """A tqdm bar on stderr; outside a terminal it writes a plain line at most every LOG_INTERVAL_S."""
    interactive = sys.stderr.isatty()
    return tqdm(disable=not enabled, file=sys.stderr, dynamic_ncols=interactive,
                mininterval=0.1 if interactive else LOG_INTERVAL_S, ascii=None if interactive else True,
                **options)
