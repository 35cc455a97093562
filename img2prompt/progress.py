"""Progress bars for long work: rates and ETA on a terminal, sparse single lines in logs."""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # in a log file, one line every 30 s rather than a redraw per update


class RowProgress:
    """One progress callback for `passes` runs over the same rows (e.g. the CLIP and the MiniLM pass of a
    shard): whole rows, each reported once in total, as the passes advance."""

    def __init__(self, report, passes: int) -> None:
        self.report, self.passes, self.seen, self.reported = report, passes, 0, 0

    def __call__(self, rows: int) -> None:
        self.seen += rows
        step = self.seen // self.passes - self.reported
        if step > 0 and self.report is not None:
            self.reported += step
            self.report(step)

    def finish(self, rows: int) -> None:
        """Report whatever of `rows` is not reported yet (a pass that gave no callbacks)."""
        if self.report is not None and rows > self.reported:
            self.report(rows - self.reported)
            self.reported = rows


def progress_bar(*, enabled: bool = True, **options) -> tqdm:
    """A tqdm bar on stderr; outside a terminal it writes a plain line at most every LOG_INTERVAL_S."""
    interactive = sys.stderr.isatty()
    return tqdm(disable=not enabled, file=sys.stderr, dynamic_ncols=interactive,
                mininterval=0.1 if interactive else LOG_INTERVAL_S, ascii=None if interactive else True,
                **options)
