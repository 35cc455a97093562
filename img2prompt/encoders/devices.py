"""--device specs with several devices, and the data-parallel runner that uses them (no Ray, one process).

Spec grammar: `auto`, `cpu`, `cuda`, `cuda:N`, a comma list of those (`cuda:0,cuda:1`) or `cuda:all`. A list
must be all CUDA or all CPU (fp16 autocast on CUDA vs fp32 on CPU would give other vectors). `cpu,cpu`
(two replicas on the CPU) is accepted so that the multi-device code path runs, and is tested, without a
GPU; it is no faster than `cpu`. Everything is checked before any model loads.

The runner holds one model replica per device and runs work in threads: torch releases the GIL inside its
kernels, and threads keep CUDA in one process (never fork after CUDA init). Work is split in whole
batches, each computed exactly as one device would compute it, so the results are identical to one
device's (bit for bit on identical devices)."""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from img2prompt.errors import UserError



T = TypeVar("T")
R = TypeVar("R")


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _one(part: str, spec: str, cuda_count: int, listed: bool) -> torch.device:
    if part == "cpu":
        return torch.device("cpu")
    if part == "cuda" or part.startswith("cuda:"):
        if cuda_count == 0:
            raise UserError(f"--device {spec} was asked for, but torch sees no CUDA device on this machine")
        if part == "cuda":  # alone: torch's current device, as always; in a list: GPU 0
            return torch.device("cuda:0") if listed else torch.device("cuda")
        number = part[len("cuda:"):]
        if not number.isdigit():
            raise UserError(f"--device {spec}: {part!r} is not a device (use cuda:N with N a GPU number)")
        if int(number) >= cuda_count:
            raise UserError(f"--device {spec}: {part} is out of range, torch sees {cuda_count} CUDA device(s) "
                            f"(cuda:0 to cuda:{cuda_count - 1})")
        return torch.device("cuda", int(number))
    raise UserError(f"unknown --device {spec!r}" + (f" ({part!r})" if listed else "")
                    + ": use auto, cpu, cuda, cuda:N, a comma list of them, or cuda:all")


def parse_devices(spec: str, cuda_count: int | None = None) -> list[torch.device]:
    """The devices a --device spec names, in order (one for a plain spec); a one-line UserError otherwise."""
    cuda_count = _cuda_count() if cuda_count is None else cuda_count
    spec = (spec or "").strip()
    if spec == "auto":
        return [torch.device("cuda" if cuda_count else "cpu")]
    if spec == "cuda:all":
        if cuda_count == 0:
            raise UserError("--device cuda:all was asked for, but torch sees no CUDA device on this machine")
        return [torch.device("cuda", number) for number in range(cuda_count)]
    parts = [part.strip() for part in spec.split(",")]
    if any(not part for part in parts):
        raise UserError(f"--device {spec!r}: an empty name in the list (write cuda:0,cuda:1)")
    if len(parts) > 1 and ("auto" in parts or "cuda:all" in parts):
        raise UserError(f"--device {spec}: auto and cuda:all stand alone, not in a list")
    devices = [_one(part, spec, cuda_count, len(parts) > 1) for part in parts]
    if len({device.type for device in devices}) > 1:
        raise UserError(f"--device {spec}: mixes CPU and CUDA (other precision, other vectors); list one kind")
    cuda = [str(device) for device in devices if device.type == "cuda"]
    duplicates = sorted({name for name in cuda if cuda.count(name) > 1})
    if duplicates:
        raise UserError(f"--device {spec}: {', '.join(duplicates)} is listed twice; list each GPU once")
    return devices


def primary_device(spec: str) -> torch.device:
    """The first device of the spec: the one that loads the models first, searches and names the build."""
    return parse_devices(spec)[0]


def contiguous_runs(order: np.ndarray, batch_size: int, parts: int) -> list[np.ndarray]:
    """`order` cut into at most `parts` contiguous runs, each a whole number of `batch_size` batches (the last
    run may end with a short batch): every device then sees the very batches one device would."""
    order = np.asarray(order)
    batches = -(-len(order) // batch_size)
    per_run = max(1, -(-batches // max(1, parts))) * batch_size
    return [order[start:start + per_run] for start in range(0, len(order), per_run)]


def locked(progress: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """A progress callback safe to call from the replicas' threads."""
    if progress is None:
        return None
    lock = threading.Lock()

    def report(rows: int) -> None:
        with lock:
            progress(rows)
    return report


class ReplicaRunner(Generic[T]):
    """One thread per replica; a replica only ever runs in its own thread (a model is never shared)."""

    def __init__(self, replicas: Sequence[T], devices: Sequence[torch.device]) -> None:
        self.replicas = list(replicas)
        self.executors = [ThreadPoolExecutor(1, thread_name_prefix=f"replica-{device}",
                                             initializer=_bind, initargs=(device,)) for device in devices]

    def __enter__(self) -> "ReplicaRunner[T]":
        return self

    def __exit__(self, *exc) -> None:
        for executor in self.executors:
            executor.shutdown(wait=True, cancel_futures=True)

    def map_runs(self, fn: Callable[[T, R], object], runs: Sequence[R]) -> list:
        """fn(replica i, run i) for each run (at most one per replica), all at once; results in run order."""
        futures = [self.executors[i].submit(fn, self.replicas[i], run) for i, run in enumerate(runs)]
        return [future.result() for future in futures]

    def map_batches(self, fn: Callable[[T, R], object], items: Iterable[R]) -> Iterator:
        """fn(replica, item) for a stream of items, round robin over the replicas, results in input order;
        at most two items per replica in flight, so a long stream never piles up in memory."""
        pending: deque[Future] = deque()
        for count, item in enumerate(items):
            slot = count % len(self.replicas)
            pending.append(self.executors[slot].submit(fn, self.replicas[slot], item))
            while len(pending) > 2 * len(self.replicas):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _bind(device: torch.device) -> None:
    """Each replica thread works on its own GPU (kernels and the caching allocator use the current one)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
