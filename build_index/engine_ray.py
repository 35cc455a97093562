"""The Ray engine: one actor call per shard task on a Ray cluster (the optional `ray` extra).

Each actor loads the models once (`EncoderSpec.load()`, which checks they are the driver's), tokenizes a shard
with the local pipeline's `tokenize_prompts` and encodes it with the same `ShardEncoder.encode`, so its files are
those the local engine writes. Where they go is the sink's business (build_index/shard_store.py): with a local
--out, straight into the index folder, which must be on a filesystem every node mounts at the same path; with
--out URL, through a prefix on the store, from which the driver fetches and checks them. The driver commits the
returned records, in any order.

Scheduling: tasks go only to actors that have loaded their models, at most IN_FLIGHT_PER_WORKER each (a task
carries its prompts, so the driver's memory stays flat); an actor tokenizes one shard while it encodes
another. A dead actor is replaced by a fresh one and its shards are submitted again: its oldest call counts
a try, the ones behind it do not (a worker's death is not their fault). A shard
that fails MAX_TRIES times stops the build with one line naming it; a UserError raised on a worker (other
model files, an index folder or store the node cannot reach) stops it at once. Everything committed stays
committed: `--resume` continues. With a store, the driver fetches up to RECEIVE_THREADS shards at once and hands
them to the runner in the order their results came.

Thread counts: every encoder of a CPU build runs torch with the driver's intra-op thread count (recorded in
the EncoderSpec, applied by ShardEncoder.encode in the actor's encoding thread): a float32 sum split over
another number of threads can round differently, and one flipped float16 step in minilm.f16 was seen on a
fresh machine when the driver ran all its cores and the actors one thread each.
So by default each actor reserves that many CPUs (one actor per that many CPUs of a node, at least one per
node); an explicit --workers that does not fit shares the CPUs, with the same thread count. To run one actor
per CPU, start the driver with OMP_NUM_THREADS=1 (then a local build with the same setting is the reference).
Nodes with another CPU instruction set, GPU model or torch build may still differ in the last bits.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import ray
from ray.exceptions import RayError, RayTaskError

from img2prompt.build_index.engine import BuildEngine
from img2prompt.build_index.pipeline import TokenizedShard, tokenize_prompts
from img2prompt.build_index.shard_encoder import EncoderSpec, ShardEncoder
from img2prompt.build_index.shard_store import SharedFolder, ShardStore
from img2prompt.errors import UserError, short_reason
from img2prompt.index.writer import ShardTask
from img2prompt.encoders.models import resolve_device, usable_cores

log = logging.getLogger(__name__)

MAX_TRIES = 3  # attempts per shard (and model loads per worker slot) before the build stops
IN_FLIGHT_PER_WORKER = 2  # one encoding, one tokenizing: the actor never waits for the driver
PROGRESS_LOG_S = 30.0  # a progress line at most this often (and at the end)
WAITING_LOG_S = 60.0  # how long without any result before saying what the build is waiting for
PROGRESS_POLL_S = 1.0  # how often the driver asks the workers how many rows they have encoded (the bar)
# Shards the driver fetches from a store at once (--out URL): one stream per shard, so several GPU workers'
# shards (~230 MB each at 100,000 ViT-L-14 prompts) do not queue behind one download.
RECEIVE_THREADS = 4
# Test-only fault injection: "N:MARKER" makes the worker that encodes shard N die (os._exit) halfway through
# writing the shard's MiniLM file, unless MARKER exists (it creates MARKER first, so the retry succeeds).
CRASH_ENV = "IMG2PROMPT_RAY_TEST_CRASH"


class _ShardWorker:
    """A Ray actor: the models, loaded once; `encode(task, seq)` per shard, its files handed to `sink`.

    Two calls run at once (a threaded actor): one tokenizes the next shard while the other encodes, so
    tokenization stays off the encoder's critical path as in the local engine. Each stage takes the calls
    one at a time in the driver's order (`seq`): one shard's tensors on the device, the tokenizers used by
    one thread, and the driver knows that the oldest unfinished call is the one the worker was encoding."""

    def __init__(self, spec: EncoderSpec, threads: int, cwd: str, sink: SharedFolder | ShardStore,
                 crash: str | None = None) -> None:
        from img2prompt.memory import fix_mmap_threshold

        fix_mmap_threshold()
        self.threads = threads
        self._set_threads()
        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative paths (--text-model, --embeddings) mean what they mean to the driver
        self.host = f"{socket.gethostname()} pid {os.getpid()}"
        self.crash, self.sink = crash, sink
        self.turn = threading.Condition()
        self.stage_next = {"tokenize": 0, "encode": 0}  # the seq each stage serves next
        self.load_error: BaseException | None = None
        self.rows_encoded = 0  # rows through the encoders so far (read by the driver's progress bar)
        try:
            self.encoder = spec.load()
            self.tokenizers = self.encoder.tokenizers
            self.minilm = self.tokenizers.minilm()
            sink.check_worker(self.host)  # a node that cannot reach the index folder or store: at its start
        except Exception as exc:  # raised by ready() / encode(), so the driver sees the cause, not a dead actor
            self.load_error = exc

    def _set_threads(self) -> None:
        """torch's intra-op thread count, set in the calling thread (OpenMP's setting is per thread)."""
        import torch

        torch.set_num_threads(self.threads)

    def encoded(self) -> int:
        """Rows this actor has encoded so far (a third thread answers while the two calls run)."""
        return self.rows_encoded

    def _count(self, rows: int) -> None:
        self.rows_encoded += rows  # one writer (the encoding stage runs one call at a time)

    def ready(self) -> str:
        if self.load_error is not None:
            raise self.load_error
        return self.host

    @contextlib.contextmanager
    def _stage(self, name: str, seq: int):
        """Run the block when it is call `seq`'s turn at this stage; the turn passes on however it ends."""
        with self.turn:
            self.turn.wait_for(lambda: self.stage_next[name] == seq)
        try:
            yield
        finally:
            with self.turn:
                self.stage_next[name] = seq + 1
                self.turn.notify_all()

    def encode(self, task: ShardTask, seq: int) -> tuple[dict, dict]:
        try:
            with self._stage("tokenize", seq):
                self.ready()
                started = time.perf_counter()
                tokens, ids = tokenize_prompts(self.tokenizers, self.minilm, task.prompts, task.images is None)
                tokenize_s = time.perf_counter() - started
        except BaseException:
            with self._stage("encode", seq):
                pass  # give up this call's encoding turn, or the calls behind it would wait for ever
            raise
        with self._stage("encode", seq):
            self._set_threads()
            if self.crash:
                _die_mid_write_if_asked(self.crash, task.number)
            with self.sink.worker_folder() as folder:
                record, seconds = self.encoder.encode(TokenizedShard(task, tokens, ids), folder, self._count)
                seconds.update(self.sink.send(folder, record, self.host))
        return record, {"tokenize": tokenize_s, **seconds}


def _die_mid_write_if_asked(crash: str, number: int) -> None:
    """The CRASH_ENV hook: die like a killed worker, leaving a half-written temp file behind."""
    wanted, _, marker = crash.partition(":")
    if int(wanted) != number or os.path.exists(marker):
        return
    Path(marker).write_text(f"{os.getpid()}\n")
    from img2prompt.index import writer as index_format
    from img2prompt.index.layout import SHARD_SUFFIXES

    real = index_format.write_atomic

    def dying_write_atomic(target, write):
        if not str(target).endswith(SHARD_SUFFIXES["minilm"]):
            return real(target, write)

        def half_then_die(handle):
            import io

            buffer = io.BytesIO()
            write(buffer)
            handle.write(buffer.getvalue()[:buffer.tell() // 2])
            handle.flush()
            os._exit(1)

        return real(target, half_then_die)

    index_format.write_atomic = dying_write_atomic


_Actor = ray.remote(max_restarts=0, max_task_retries=0)(_ShardWorker)


@dataclass
class _Attempt:
    task: ShardTask
    ref: ray.ObjectRef  # the task in the object store, put once
    tries: int = 0


@dataclass
class _Slot:
    """One worker place: its current actor (replaced when it dies) and what it is running."""
    index: int
    actor: object = None
    generation: int = 0
    ready: bool = False
    host: str = "starting"
    loads_failed: int = 0
    failures: int = 0
    running: deque = field(default_factory=deque)  # (ObjectRef, _Attempt) in submission order
    calls: int = 0  # calls made to its current actor (their `seq`)
    reported: int = 0  # its actor's encoded rows already given to the progress bar


def _reason(exc: BaseException) -> str:
    """One line for a Ray error: the worker's own exception when there is one."""
    if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        cause = exc.cause
        return f"{type(cause).__name__}: {short_reason(cause)}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b: ", line)]
    if raised:
        return short_reason(raised[-1])
    detail = re.search(r"Worker exit detail: ([^.]*\.)", str(exc))
    first = lines[0] if lines else type(exc).__name__
    return short_reason(f"{first} {detail.group(1)}" if detail else first)


def _cpu_share(node_cpus: list[float], workers: int) -> float:
    """CPUs per actor: the most whole CPUs (= its torch threads) with which all `workers` fit on the nodes;
    a fraction when there are more workers than CPUs."""
    for share in range(max(1, int(sum(node_cpus) // workers)), 0, -1):
        if sum(int(cpus // share) for cpus in node_cpus) >= workers:
            return float(share)
    return sum(node_cpus) / workers


def _default_cpu_workers(node_cpus: list[float], threads: int) -> int:
    """CPU actors when --workers is not given: one per `threads` CPUs of each node (each encodes with the
    driver's `threads`), at least one on every node with a CPU."""
    return max(1, sum(max(1, int(cpus // threads)) for cpus in node_cpus if cpus >= 1))


def _check_device(device: str, gpus_per_worker: float) -> None:
    """The driver's device fixes the build's precision (fp16 autocast on CUDA): the workers must match it."""
    cuda = device.startswith("cuda")
    if cuda and not gpus_per_worker:
        raise UserError("this build encodes on CUDA (the driver's device, fp16): give the Ray workers GPUs with "
                        "--gpus-per-worker 1, or pass --device cpu")
    if gpus_per_worker and not cuda:
        raise UserError("--gpus-per-worker needs a CUDA build, but the driver resolved --device to cpu: run the "
                        "build on a node with a GPU (the driver fixes the precision for every worker)")


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail in seconds on a HOST:PORT where nothing listens (ray.init would retry for minutes)."""
    match = re.fullmatch(r"\[?([^\]/]+?)\]?:(\d+)", address)
    if match is None:  # auto, ray://..., anything else: Ray's own checks
        return
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}); start "
                        "one with `ray start --head` and pass the address it prints, or auto on a node of it") \
            from None


def _user_error(exc: BaseException) -> UserError | None:
    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    return UserError(str(cause)) if isinstance(cause, UserError) else None


class RayEngine(BuildEngine):
    def __init__(self, address: str | None = None, workers: int | None = None, gpus_per_worker: float = 0.0,
                 max_tries: int = MAX_TRIES, store: ShardStore | None = None) -> None:
        self.address, self.workers, self.gpus_per_worker, self.max_tries = address, workers, gpus_per_worker, max_tries
        self.store = store  # None: the workers write into the index folder (a filesystem every node mounts)

    @classmethod
    def from_options(cls, options) -> "RayEngine":
        settings = options.engine_options or {}
        if options.workers is not None and options.workers < 1:
            raise UserError("--workers must be at least 1 with --engine ray (the encoding actors; default: one per "
                            "GPU with --gpus-per-worker 1, else one per N CPUs, N = the driver's torch threads)")
        gpus = float(settings.get("gpus_per_worker") or 0)
        if gpus < 0:
            raise UserError(f"--gpus-per-worker must be 0 or more (got {gpus:g})")
        _check_device(str(resolve_device(options.device)), gpus)  # before the build creates its folder
        address = settings.get("address")
        if address is not None and not ray.is_initialized():
            _check_reachable(address)  # before the build creates its folder
        store = ShardStore(options.shard_store) if getattr(options, "shard_store", None) else None
        if store is not None:
            store.check_driver()
        for table in options.pairs or []:  # the workers read the images: a process-local store has none for them
            if str(table).startswith("memory://"):
                raise UserError(f"--pairs {table}: memory:// lives inside one process, so the Ray workers cannot "
                                "read its images: use an object store (s3://, gs://, ...) or local files")
        return cls(address, options.workers, gpus, store=store)

    # ------------------------------------------------------------------------------------------ cluster

    def _connect(self) -> bool:
        """Join the cluster (or this process's Ray, when it already runs one); True when we started Ray."""
        if ray.is_initialized():
            return False
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if self.address is None:
            ray.init(address="local", num_cpus=usable_cores(), **quiet)
        else:
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(f"--ray-address {self.address}: cannot join a Ray cluster there "
                                f"({short_reason(exc)}); start one with `ray start --head`") from exc
        return True

    def _plan(self, spec: EncoderSpec) -> tuple[int, dict]:
        """(workers, each actor's resources) for this cluster."""
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        _check_device(spec.device, self.gpus_per_worker)
        if self.gpus_per_worker:
            if gpus < self.gpus_per_worker:
                raise UserError(f"--gpus-per-worker {self.gpus_per_worker:g}: the Ray cluster has {gpus:g} GPUs")
            workers = self.workers or max(1, int(gpus // self.gpus_per_worker))
            return workers, {"num_cpus": 1, "num_gpus": self.gpus_per_worker}
        if cpus < 1:
            raise UserError("the Ray cluster has no CPU to run workers on")
        nodes = [float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")] or [cpus]
        workers = self.workers or _default_cpu_workers(nodes, spec.threads or 1)
        return workers, {"num_cpus": _cpu_share(nodes, workers)}

    # ------------------------------------------------------------------------------------------ running

    def run(self, tasks: Iterator[ShardTask], encoder: ShardEncoder, spec: EncoderSpec, root: Path,
            progress: Callable[[int], None] | None = None) -> Iterator[tuple[dict, dict]]:
        started_ray = self._connect()
        slots: list[_Slot] = []
        fetching = ThreadPoolExecutor(RECEIVE_THREADS, thread_name_prefix="receive-shard")
        try:
            workers, resources = self._plan(spec)
            actor_spec = replace(spec, device="cuda") if spec.device.startswith("cuda") else spec
            # the actor's own threads (tokenizing, the GPU build's CPU side); encoding uses spec.threads on CPU
            threads = spec.threads or max(1, int(resources["num_cpus"]))
            options = {**resources, "max_concurrency": IN_FLIGHT_PER_WORKER + 1}  # + the progress query
            log.info("ray: %d workers (%s each, %d torch threads) on a cluster of %s", workers,
                     ", ".join(f"{key} {value:g}" for key, value in resources.items()), threads,
                     {key: value for key, value in ray.cluster_resources().items() if key in ("CPU", "GPU")})
            spec_ref = ray.put(actor_spec)
            crash, cwd = os.environ.get(CRASH_ENV), os.getcwd()
            sink = self.store or SharedFolder(str(Path(root).resolve()))

            def start(slot: _Slot) -> None:
                slot.actor = _Actor.options(**options).remote(spec_ref, threads, cwd, sink, crash)
                slot.generation += 1
                slot.ready, slot.host, slot.calls, slot.reported = False, "starting", 0, 0
                pending[slot.actor.ready.remote()] = ("ready", slot, slot.generation, None)

            pending: dict = {}
            slots = [_Slot(index) for index in range(workers)]
            for slot in slots:
                start(slot)
            yield from self._schedule(tasks, slots, pending, start, sink, root, fetching, progress)
        finally:
            fetching.shutdown(wait=True, cancel_futures=True)
            for slot in slots:
                if slot.actor is not None:
                    with contextlib.suppress(Exception):  # never hide the error that brought us here
                        ray.kill(slot.actor, no_restart=True)
            if started_ray:
                ray.shutdown()

    def _schedule(self, tasks: Iterator[ShardTask], slots: list[_Slot], pending: dict, start,
                  sink: SharedFolder | ShardStore, root: Path, fetching: ThreadPoolExecutor,
                  progress: Callable[[int], None] | None = None) -> Iterator[tuple[dict, dict]]:
        retry: deque[_Attempt] = deque()
        tasks = iter(tasks)
        exhausted = False
        submitted = done = rows = 0
        began = last_log = last_result = last_warning = time.monotonic()
        receiving: deque = deque()  # futures of (record, seconds), given to the runner in the order they came

        def receive(record: dict, seconds: dict) -> tuple[dict, dict]:
            """The shard's files into the index folder, checked (from a store; a shared folder has them)."""
            return record, {**seconds, **sink.receive(record, root)}

        def received(wait: bool) -> Iterator[tuple[dict, dict]]:
            """The fetched shards, oldest first, to the runner (which commits each); with `wait`, all of them."""
            while receiving and (wait or receiving[0].done()):
                record, seconds = receiving.popleft().result()  # a failed fetch raises its UserError here
                yield record, seconds
                sink.discard(record)  # committed now: the store's copy is no longer needed

        def next_attempt() -> _Attempt | None:
            nonlocal exhausted, submitted
            if retry:
                return retry.popleft()
            if exhausted:
                return None
            task = next(tasks, None)
            if task is None:
                exhausted = True
                return None
            submitted += 1
            return _Attempt(task, ray.put(task))

        def pending_calls() -> int:
            return sum(len(slot.running) for slot in slots)

        def fill() -> None:
            while True:
                free = [slot for slot in slots if slot.ready and len(slot.running) < IN_FLIGHT_PER_WORKER]
                if not free:
                    return
                slot = min(free, key=lambda s: (len(s.running), s.index))
                attempt = next_attempt()
                if attempt is None:
                    return
                ref = slot.actor.encode.remote(attempt.ref, slot.calls)
                slot.calls += 1
                slot.running.append((ref, attempt))
                pending[ref] = ("shard", slot, slot.generation, attempt)

        def failed(attempt: _Attempt, slot: _Slot, reason: str, counts: bool) -> None:
            if counts:
                attempt.tries += 1
                slot.failures += 1
                log.warning("ray: shard %d failed on worker %d (%s; %d failures on it) — try %d of %d: %s",
                            attempt.task.number, slot.index, slot.host, slot.failures, attempt.tries,
                            self.max_tries, reason)
                if attempt.tries >= self.max_tries:
                    raise UserError(f"shard {attempt.task.number} failed after {attempt.tries} tries: {reason}")
            retry.append(attempt)

        def outcome(ref, attempt: _Attempt, slot: _Slot) -> tuple[str, object]:
            """("done", (record, seconds)), ("failed", None): the worker raised, the shard is retried or the
            build stops; or ("died", reason): the actor is gone, for died() to handle."""
            try:
                return "done", ray.get(ref, timeout=WAITING_LOG_S)
            except RayTaskError as exc:  # the worker raised: it is alive, only this shard failed
                if (error := _user_error(exc)) is not None:
                    raise error from None
                failed(attempt, slot, _reason(exc), counts=True)
                return "failed", None
            except RayError as exc:  # the actor (its process or node) died
                return "died", _reason(exc)

        def settle(slot: _Slot, ref) -> list[tuple[dict, dict]]:
            """One of the slot's calls finished: its result, if it has one."""
            attempt = next(item[1] for item in slot.running if item[0] == ref)
            kind, value = outcome(ref, attempt, slot)
            if kind == "died":
                return died(slot)
            slot.running = deque(item for item in slot.running if item[0] != ref)
            return [value] if kind == "done" else []

        def died(slot: _Slot) -> list[tuple[dict, dict]]:
            """The slot's actor is gone: keep what its calls finished before (Ray may report them after the
            death), count a try against its oldest unfinished call (the one it was encoding), resubmit the
            others for free, and start a new actor."""
            results, blamed, why = [], False, "unknown"
            for ref, attempt in list(slot.running):
                pending.pop(ref, None)
                kind, value = outcome(ref, attempt, slot)
                if kind == "done":
                    results.append(value)
                elif kind == "died":
                    why = value if not blamed else why
                    failed(attempt, slot, value, counts=not blamed)
                    blamed = True
            slot.running.clear()
            log.warning("ray: worker %d (%s) died (%s); starting a new one", slot.index, slot.host, why)
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)
            start(slot)
            return results

        def poll_progress() -> None:
            """Driver-side aggregation: each live actor's encoded rows since the last poll go to `progress`."""
            live = [slot for slot in slots if slot.ready and slot.running]
            try:
                counts = ray.get([slot.actor.encoded.remote() for slot in live], timeout=PROGRESS_POLL_S)
            except (RayError, TimeoutError):
                return  # a dying actor: its rows are reported when its shard is retried
            for slot, count in zip(live, counts):
                if count > slot.reported:
                    progress(count - slot.reported)
                    slot.reported = count

        while True:
            fill()
            yield from received(wait=False)
            if exhausted and not retry and not any(slot.running for slot in slots):
                break
            timeout = PROGRESS_POLL_S if progress else WAITING_LOG_S
            finished, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if progress:
                poll_progress()
            if not finished and time.monotonic() - max(last_result, last_warning) < WAITING_LOG_S:
                continue
            if not finished:
                last_warning = time.monotonic()
                waiting = [slot.index for slot in slots if not slot.ready]
                log.warning("ray: no result for %.0f s; %d shards running, workers %s still starting (placement "
                            "needs free %s)", time.monotonic() - last_result,
                            sum(len(slot.running) for slot in slots), waiting or "none", ray.available_resources())
                continue
            ref = finished[0]
            kind, slot, generation, _ = pending.pop(ref)
            last_result = time.monotonic()
            if generation != slot.generation:
                continue  # a call to an actor already replaced
            if kind == "ready":
                try:
                    slot.host = ray.get(ref)
                    slot.ready = True
                except RayError as exc:
                    if (error := _user_error(exc)) is not None:
                        raise error from None
                    slot.loads_failed += 1
                    reason = _reason(exc)
                    log.warning("ray: worker %d could not start (%d of %d): %s", slot.index, slot.loads_failed,
                                self.max_tries, reason)
                    if slot.loads_failed >= self.max_tries:
                        raise UserError(f"Ray worker {slot.index} could not load the models after "
                                        f"{slot.loads_failed} tries: {reason}") from None
                    with contextlib.suppress(Exception):
                        ray.kill(slot.actor, no_restart=True)
                    start(slot)
                continue
            for record, seconds in settle(slot, ref):
                done += 1
                rows += record["count"]
                now = time.monotonic()
                if now - last_log >= PROGRESS_LOG_S or (exhausted and not retry and not pending_calls()):
                    last_log = now
                    log.info("ray: %d/%s shards, %d prompts, %.0f prompts/s over %d workers; failures per worker: "
                             "%s", done, f"{submitted}" if exhausted else f"{submitted}+", rows,
                             rows / max(now - began, 1e-9), len(slots),
                             {slot.index: slot.failures for slot in slots if slot.failures} or "none")
                receiving.append(fetching.submit(receive, record, seconds))
            yield from received(wait=False)
        yield from received(wait=True)
        elapsed = time.monotonic() - began
        log.info("ray: encoded %d shards, %d prompts in %.1f s (%.0f prompts/s over %d workers)", done, rows,
                 elapsed, rows / max(elapsed, 1e-9), len(slots))

