"""Work spread over the machine's cores by Python threads, for code that releases the GIL
(numpy's BLAS calls, ctypes calls, ``nogil`` Numba functions): the kernel backend's Grams and
generated stages, the step engine's replicas.  One pool for all of them, and one switch that
keeps BLAS single-threaded while they run (its own threads would compete with ours).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

_state: dict = {}


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _pool(size: int) -> ThreadPoolExecutor:
    """A pool of at least ``size`` threads.  A forked child (multiprocessing, Dask workers)
    inherits the pool object but not its threads, so it makes its own."""
    pid = os.getpid()
    if _state.get("pid") != pid or _state["size"] < size:
        _state.update(pid=pid, size=max(size, cores()))
        _state["pool"] = ThreadPoolExecutor(_state["size"], thread_name_prefix="tpc")
    return _state["pool"]


def run(jobs: Iterable[Callable[[], None]]) -> None:
    """Run the jobs at the same time (one thread each) and wait for all; a job's exception is
    raised here."""
    jobs = list(jobs)
    pool = _pool(len(jobs))
    for future in [pool.submit(job) for job in jobs]:
        future.result()


def one_blas_thread():
    """Context in which BLAS (every loaded library) runs single-threaded."""
    if "blas" not in _state:
        from threadpoolctl import ThreadpoolController

        _state["blas"] = ThreadpoolController()
    return _state["blas"].limit(limits=1, user_api="blas")
