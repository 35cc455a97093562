"""numpy's BLAS thread count, read and held at one thread while scan lanes run (each lane is one core's work);
a lane's own OpenMP count set to one (its casts then run in one call).

A scan in lanes runs one single-threaded matmul per core instead of one matmul over every core: the cast and
the top-k select of one lane then overlap the others' matmuls instead of leaving BLAS's other threads waiting
(bench/RESULTS.md, "Exact scan in lanes"). The limit is process-wide (OpenBLAS has one thread count), so
concurrent scans share it: the first to start sets one thread, the last to finish restores the count.
Only OpenBLAS pools are touched (numpy's, faiss's), not torch's MKL / OpenMP, which other threads may be using.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

_lock = threading.Lock()
_holders = 0  # scans holding OpenBLAS at one thread now
_restore = None  # the limiter that puts the counts back
_saved_threads = 1  # blas_threads() before the first holder set one
_selections: dict[str, object] = {}  # internal_api → its threadpoolctl selection (or None without threadpoolctl)


def _pools(internal_api: str):
    """The loaded thread pools of one kind ("openblas", "openmp"), looked up once: finding the loaded
    libraries costs ≈ 1.4 ms a time. The first lookup of a kind must come after its libraries are loaded."""
    if internal_api not in _selections:
        import numpy  # noqa: F401  (loads its OpenBLAS, so that the controller sees it)

        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # without it the pools are left as they are: one lane, casts in pieces
            _selections[internal_api] = None
        else:
            _selections[internal_api] = ThreadpoolController().select(internal_api=internal_api)
    return _selections[internal_api]


def one_openmp_thread_here() -> bool:
    """OpenMP runtimes at one thread for the calling thread only (an OpenMP thread count is per thread);
    False when threadpoolctl is missing."""
    pools = _pools("openmp")
    if pools is None:
        return False
    pools.limit(limits=1)
    return True


def blas_threads() -> int:
    """Threads numpy's matmul runs on now (OpenBLAS's count, at most the usable cores); 1 when unknown."""
    if _holders:  # a scan holds it at one: the count a scan may use is the one restored afterwards
        return _saved_threads
    pools = _pools("openblas")
    counts = [pool["num_threads"] for pool in (pools.info() if pools is not None else [])]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(max(counts, default=1), cores))


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """OpenBLAS at one thread inside the block (reference-counted across threads)."""
    global _holders, _restore, _saved_threads
    with _lock:
        if _holders == 0:
            _saved_threads = blas_threads()
            pools = _pools("openblas")
            _restore = pools.limit(limits=1) if pools is not None else None
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _restore is not None:
                _restore.restore_original_limits()
                _restore = None
