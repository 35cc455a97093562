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
        scheduler: _Scheduler | None = None
        fetching = ThreadPoolExecutor(RECEIVE_THREADS, thread_name_prefix="receive-shard")
        try:
            workers, resources = self._plan(spec)
            sink = self.store or SharedFolder(str(Path(root).resolve()))
            scheduler = _Scheduler(tasks, workers, self._actor_factory(spec, resources, workers, sink), sink, root,
                                   fetching, progress, self.max_tries)
            scheduler.start_all()
            yield from scheduler.run()
        finally:
            fetching.shutdown(wait=True, cancel_futures=True)
            for slot in scheduler.slots if scheduler is not None else []:
                if slot.actor is not None:
                    with contextlib.suppress(Exception):  # never hide the error that brought us here
                        ray.kill(slot.actor, no_restart=True)
            if started_ray:
                ray.shutdown()

    def _actor_factory(self, spec: EncoderSpec, resources: dict, workers: int,
                       sink: SharedFolder | ShardStore) -> "_ActorFactory":
        """How each worker slot's actor is made (the driver's spec put in the object store once)."""
        actor_spec = replace(spec, device="cuda") if spec.device.startswith("cuda") else spec
        # the actor's own threads (tokenizing, the GPU build's CPU side); encoding uses spec.threads on CPU
        threads = spec.threads or max(1, int(resources["num_cpus"]))
        options = {**resources, "max_concurrency": IN_FLIGHT_PER_WORKER + 1}  # + the progress query
        log.info("ray: %d workers (%s each, %d torch threads) on a cluster of %s", workers,
                 ", ".join(f"{key} {value:g}" for key, value in resources.items()), threads,
                 {key: value for key, value in ray.cluster_resources().items() if key in ("CPU", "GPU")})
        return _ActorFactory(options, ray.put(actor_spec), threads, os.getcwd(), sink, os.environ.get(CRASH_ENV))


@dataclass
class _ActorFactory:
    """Makes a worker slot's actor, at the start and again after a death, always with the same arguments."""
    options: dict  # the actor's resources and concurrency
    spec_ref: object  # the EncoderSpec in the object store
    threads: int
    cwd: str
    sink: SharedFolder | ShardStore
    crash: str | None = None  # CRASH_ENV

    def __call__(self) -> object:
        return _Actor.options(**self.options).remote(self.spec_ref, self.threads, self.cwd, self.sink, self.crash)


@dataclass
class _Tally:
    """The scheduler's counts and clocks, behind its progress lines and its waiting warning."""
    began: float
    submitted: int = 0
    done: int = 0
    rows: int = 0
    last_log: float = 0.0
    last_result: float = 0.0
    last_warning: float = 0.0

    def __post_init__(self) -> None:
        self.last_log = self.last_result = self.last_warning = self.began

    def quiet_for(self, now: float) -> float:
        """Seconds since the last result or the last waiting warning, whichever came later."""
        return now - max(self.last_result, self.last_warning)

    def progress_line(self, now: float, exhausted: bool, slots: list[_Slot]) -> str:
        failures = {slot.index: slot.failures for slot in slots if slot.failures} or "none"
        return (f"ray: {self.done}/{self.submitted}{'' if exhausted else '+'} shards, {self.rows} prompts, "
                f"{self.rows / max(now - self.began, 1e-9):.0f} prompts/s over {len(slots)} workers; "
                f"failures per worker: {failures}")

    def end_line(self, now: float, slots: list[_Slot]) -> str:
        elapsed = now - self.began
        return (f"ray: encoded {self.done} shards, {self.rows} prompts in {elapsed:.1f} s "
                f"({self.rows / max(elapsed, 1e-9):.0f} prompts/s over {len(slots)} workers)")


class _Scheduler:
    """The driver's side of a Ray build: shard tasks to the slots whose actors have loaded their models (at most
    IN_FLIGHT_PER_WORKER each), results to the runner in the order they come (fetched from the store first),
    failed shards retried up to `max_tries` and dead actors replaced (the module docstring tells the rules).

    `pending` maps each outstanding Ray call to (kind, slot, the slot's actor generation, attempt): "ready" for
    an actor's model load, "shard" for an encode call; a call to an actor since replaced is ignored."""

    def __init__(self, tasks: Iterator[ShardTask], workers: int, make_actor: Callable[[], object],
                 sink: SharedFolder | ShardStore, root: Path, fetching: ThreadPoolExecutor,
                 progress: Callable[[int], None] | None = None, max_tries: int = MAX_TRIES) -> None:
        self.tasks, self.make_actor, self.sink, self.root = iter(tasks), make_actor, sink, root
        self.fetching, self.progress, self.max_tries = fetching, progress, max_tries
        self.slots = [_Slot(index) for index in range(workers)]
        self.pending: dict = {}
        self.retry: deque[_Attempt] = deque()
        self.exhausted = False  # every task has been taken from `tasks`
        self.receiving: deque = deque()  # futures of (record, seconds), given to the runner in the order they came
        self.tally = _Tally(time.monotonic())

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self) -> Iterator[tuple[dict, dict]]:
        while True:
            self.fill()
            yield from self.received(wait=False)
            if self.all_done():
                break
            ref = self.next_finished()
            if ref is None:
                continue
            kind, slot, generation, _ = self.pending.pop(ref)
            self.tally.last_result = time.monotonic()
            if generation != slot.generation:
                continue  # a call to an actor already replaced
            if kind == "ready":
                self.on_ready(slot, ref)
                continue
            self.on_shard(slot, ref)
            yield from self.received(wait=False)
        yield from self.received(wait=True)
        log.info("%s", self.tally.end_line(time.monotonic(), self.slots))

    def all_done(self) -> bool:
        return self.exhausted and not self.retry and not any(slot.running for slot in self.slots)

    def next_finished(self):
        """The next finished call, or None after a wait without one (polling the progress bar meanwhile, and
        warning what the build waits for when nothing has come for WAITING_LOG_S)."""
        timeout = PROGRESS_POLL_S if self.progress else WAITING_LOG_S
        finished, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if self.progress:
            self.poll_progress()
        if finished:
            return finished[0]
        if self.tally.quiet_for(time.monotonic()) >= WAITING_LOG_S:
            self.warn_waiting()
        return None

    def warn_waiting(self) -> None:
        self.tally.last_warning = time.monotonic()
        waiting = [slot.index for slot in self.slots if not slot.ready]
        log.warning("ray: no result for %.0f s; %d shards running, workers %s still starting (placement "
                    "needs free %s)", time.monotonic() - self.tally.last_result, self.running_calls(),
                    waiting or "none", ray.available_resources())

    # -- actors ------------------------------------------------------------------------------------------

    def start_all(self) -> None:
        for slot in self.slots:
            self.start(slot)

    def start(self, slot: _Slot) -> None:
        """A new actor in the slot; its model load (ready()) is awaited like any call."""
        slot.actor = self.make_actor()
        slot.generation += 1
        slot.ready, slot.host, slot.calls, slot.reported = False, "starting", 0, 0
        self.pending[slot.actor.ready.remote()] = ("ready", slot, slot.generation, None)

    def restart(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            ray.kill(slot.actor, no_restart=True)
        self.start(slot)

    def on_ready(self, slot: _Slot, ref) -> None:
        """An actor's model load ended: it takes tasks now, or it is started again (MAX_TRIES loads a slot)."""
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
            self.restart(slot)

    # -- handing out tasks -------------------------------------------------------------------------------

    def next_attempt(self) -> _Attempt | None:
        """A shard to retry, else the next task (put in the object store once), else None."""
        if self.retry:
            return self.retry.popleft()
        if self.exhausted:
            return None
        task = next(self.tasks, None)
        if task is None:
            self.exhausted = True
            return None
        self.tally.submitted += 1
        return _Attempt(task, ray.put(task))

    def fill(self) -> None:
        """Every ready slot with room gets a call, the least busy first (then the lowest index)."""
        while True:
            free = [slot for slot in self.slots if slot.ready and len(slot.running) < IN_FLIGHT_PER_WORKER]
            if not free:
                return
            slot = min(free, key=lambda s: (len(s.running), s.index))
            attempt = self.next_attempt()
            if attempt is None:
                return
            ref = slot.actor.encode.remote(attempt.ref, slot.calls)
            slot.calls += 1
            slot.running.append((ref, attempt))
            self.pending[ref] = ("shard", slot, slot.generation, attempt)

    def running_calls(self) -> int:
        return sum(len(slot.running) for slot in self.slots)

    # -- results -----------------------------------------------------------------------------------------

    def on_shard(self, slot: _Slot, ref) -> None:
        """One of the slot's encode calls finished: its result (if any) counted and its files fetched."""
        for record, seconds in self.settle(slot, ref):
            self.tally.done += 1
            self.tally.rows += record["count"]
            now = time.monotonic()
            if now - self.tally.last_log >= PROGRESS_LOG_S or \
                    (self.exhausted and not self.retry and not self.running_calls()):
                self.tally.last_log = now
                log.info("%s", self.tally.progress_line(now, self.exhausted, self.slots))
            self.receiving.append(self.fetching.submit(self.receive, record, seconds))

    def settle(self, slot: _Slot, ref) -> list[tuple[dict, dict]]:
        """One of the slot's calls finished: its result, if it has one."""
        attempt = next(item[1] for item in slot.running if item[0] == ref)
        kind, value = self.outcome(ref, attempt, slot)
        if kind == "died":
            return self.died(slot)
        slot.running = deque(item for item in slot.running if item[0] != ref)
        return [value] if kind == "done" else []

    def outcome(self, ref, attempt: _Attempt, slot: _Slot) -> tuple[str, object]:
        """("done", (record, seconds)), ("failed", None): the worker raised, the shard is retried or the
        build stops; or ("died", reason): the actor is gone, for died() to handle."""
        try:
            return "done", ray.get(ref, timeout=WAITING_LOG_S)
        except RayTaskError as exc:  # the worker raised: it is alive, only this shard failed
            if (error := _user_error(exc)) is not None:
                raise error from None
            self.failed(attempt, slot, _reason(exc), counts=True)
            return "failed", None
        except RayError as exc:  # the actor (its process or node) died
            return "died", _reason(exc)

    def failed(self, attempt: _Attempt, slot: _Slot, reason: str, counts: bool) -> None:
        """The attempt goes back for a retry; one that `counts` is a try against the shard (and a failure of the
        slot), and the build stops at the shard's max_tries-th."""
        if counts:
            attempt.tries += 1
            slot.failures += 1
            log.warning("ray: shard %d failed on worker %d (%s; %d failures on it) — try %d of %d: %s",
                        attempt.task.number, slot.index, slot.host, slot.failures, attempt.tries,
                        self.max_tries, reason)
            if attempt.tries >= self.max_tries:
                raise UserError(f"shard {attempt.task.number} failed after {attempt.tries} tries: {reason}")
        self.retry.append(attempt)

    def died(self, slot: _Slot) -> list[tuple[dict, dict]]:
        """The slot's actor is gone: keep what its calls finished before (Ray may report them after the
        death), count a try against its oldest unfinished call (the one it was encoding), resubmit the
        others for free, and start a new actor."""
        results, blamed, why = [], False, "unknown"
        for ref, attempt in list(slot.running):
            self.pending.pop(ref, None)
            kind, value = self.outcome(ref, attempt, slot)
            if kind == "done":
                results.append(value)
            elif kind == "died":
                why = value if not blamed else why
                self.failed(attempt, slot, value, counts=not blamed)
                blamed = True
        slot.running.clear()
        log.warning("ray: worker %d (%s) died (%s); starting a new one", slot.index, slot.host, why)
        self.restart(slot)
        return results

    def poll_progress(self) -> None:
        """Driver-side aggregation: each live actor's encoded rows since the last poll go to `progress`."""
        live = [slot for slot in self.slots if slot.ready and slot.running]
        try:
            counts = ray.get([slot.actor.encoded.remote() for slot in live], timeout=PROGRESS_POLL_S)
        except (RayError, TimeoutError):
            return  # a dying actor: its rows are reported when its shard is retried
        for slot, count in zip(live, counts):
            if count > slot.reported:
                self.progress(count - slot.reported)
                slot.reported = count

    def receive(self, record: dict, seconds: dict) -> tuple[dict, dict]:
        """The shard's files into the index folder, checked (from a store; a shared folder has them)."""
        return record, {**seconds, **self.sink.receive(record, self.root)}

    def received(self, wait: bool) -> Iterator[tuple[dict, dict]]:
        """The fetched shards, oldest first, to the runner (which commits each); with `wait`, all of them."""
        while self.receiving and (wait or self.receiving[0].done()):
            record, seconds = self.receiving.popleft().result()  # a failed fetch raises its UserError here
            yield record, seconds
            self.sink.discard(record)  # committed now: the store's copy is no longer needed
