"""The one thread that calls the index: a bounded queue of jobs (one per request), jobs waiting together for
the same encoder merged into one encoder call, each then answered from its own rows."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from img2prompt.errors import short_reason
from img2prompt.serve.limits import DEFAULT_LIMITS

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The worker's queue is full: the request is refused (503) rather than held in memory."""


@dataclasses.dataclass
class _Job:
    kind: str  # "images" | "texts" | "predict" | "interrogate"
    items: list  # image bytes or texts
    options: dict
    future: Future
    index: Any = None  # the index when it was queued: a job in flight finishes on it across a reload


# Which encoder a job's items go through: jobs of one encoder (and one index) can share one model call.
ENCODER_OF = {"images": "image", "predict": "image", "interrogate": "image", "texts": "text"}


class ModelWorker:
    """The one thread that calls the index; each job (= one request) is one API call.

    Jobs waiting together for the same encoder share ONE encoder call (bounded by `merge_items`, waiting at
    most `merge_wait` seconds for more to arrive), and the vectors are then split back: each job is searched
    and blended from its own rows only, so every statistic of a prediction (beta's image-key mean from the
    queries, consensus) comes from its own request, as if it had been served alone."""

    def __init__(self, index, queue_size: int = DEFAULT_LIMITS.queue_size,
                 merge_items: int = DEFAULT_LIMITS.merge_items, merge_wait: float = DEFAULT_LIMITS.merge_wait) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1 (got {queue_size})")
        self.index = index
        self.queue_size = queue_size
        self.merge_items, self.merge_wait = merge_items, merge_wait
        # calls: API calls (one per request); encoder_calls: model calls that served several requests at once
        self.stats = {"requests": 0, "calls": 0, "encoder_calls": 0, "merged_requests": 0}
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._held: collections.deque[_Job | None] = collections.deque()  # taken, for the next round
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._held)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="img2prompt-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs queued so far, end the thread, and cancel any job that came in after."""
        if self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=timeout)
            self._thread.join(timeout)
        self._thread = None
        left = list(self._held)
        self._held.clear()
        with contextlib.suppress(queue.Empty):
            while True:
                left.append(self._queue.get_nowait())
        for job in left:
            if job is not None:
                job.future.cancel()

    def submit(self, kind: str, items: list, **options: Any) -> Future:
        """Queue a job; raises QueueFull at once when the queue is full."""
        if self._thread is None:
            raise RuntimeError("the model worker is not running (use the app inside its lifespan)")
        job = _Job(kind, list(items), options, Future(), self.index)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        self.stats["requests"] += 1
        return job.future

    def _loop(self) -> None:
        while (first := self._held.popleft() if self._held else self._queue.get()) is not None:
            self._run_batch(first)
            del first  # not held while waiting for the next one: it pins the index it was queued on (reload)

    def _run_batch(self, first: _Job) -> None:
        """`first` and the jobs that join it: one encoder call, then one API call each (its own answer)."""
        # a job whose client gave up while it was queued (its time budget) is skipped
        jobs = [job for job in self._gather(first) if job.future.set_running_or_notify_cancel()]
        for job, encoded in zip(jobs, self._encode_together(jobs)):
            try:
                job.future.set_result(self._call(job.kind, job.items, job.options, job.index, encoded))
            except Exception as exc:
                job.future.set_exception(exc)

    def _gather(self, first: _Job) -> list[_Job]:
        """`first` and the jobs queued behind it that can share its encoder call, in queue order; the first
        that cannot (another encoder or index, too many items, the stop sentinel) waits for the next round."""
        jobs, items = [first], len(first.items)
        deadline = time.monotonic() + self.merge_wait
        while items < self.merge_items:
            try:
                left = deadline - time.monotonic()
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None or ENCODER_OF.get(job.kind) != ENCODER_OF.get(first.kind) or job.index is not first.index \
                    or items + len(job.items) > self.merge_items:
                self._held.append(job)
                break
            jobs.append(job)
            items += len(job.items)
        return jobs

    def _encode_together(self, jobs: list[_Job]) -> list:
        """Per job, its part of one encoder call over every job's items; None where a job encodes alone
        (a job on its own, or when the merged call fails: each job then meets its own error alone)."""
        if len(jobs) < 2:
            return [None] * len(jobs)
        index = jobs[0].index if jobs[0].index is not None else self.index
        sizes = [len(job.items) for job in jobs]
        items = [item for job in jobs for item in job.items]
        try:
            if ENCODER_OF[jobs[0].kind] == "text":
                parts = np.split(index.embed_texts(items), np.cumsum(sizes)[:-1])
            else:
                parts = index.embed_images(items, workers=0).split(sizes)
        except Exception as exc:  # noqa: BLE001 — each job retries alone and reports its own error
            log.debug("merged encoder call failed (%s): each request encodes alone", short_reason(exc))
            return [None] * len(jobs)
        self.stats["encoder_calls"] += 1
        self.stats["merged_requests"] += len(jobs)
        return parts

    def _call(self, kind: str, items: list, options: dict, index: Any = None, encoded: Any = None) -> list:
        """One public-API call for one request: a list of results aligned with `items`; `encoded`: its
        vectors from a merged encoder call (None: the call encodes them)."""
        self.stats["calls"] += 1
        index = index if index is not None else self.index
        hits = {"model_weights": options.get("model_weights"), "min_score": options.get("min_score")}
        if kind == "texts":
            return index.search_texts(items, options["k"], vectors=encoded, **hits)
        if kind == "images":  # no decoding processes per call
            return index.search_images(items, options["k"], workers=0, embedded=encoded, **hits)
        if kind == "predict":
            vectors, neighbours = index.predict_with_neighbours(items, workers=0, embedded=encoded, **options)
            return list(zip(vectors, neighbours))
        if kind == "interrogate":
            return index.interrogate(items, options["modifiers"], workers=0, embedded=encoded)
        raise ValueError(f"unknown job kind {kind!r}")
