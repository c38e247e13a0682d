"""Replica-parallel BLAS for the step engine's large products (docs/DESIGN.md 2.9).

The particle and exact algebras hold stacks of members (R, F, D) and multiply them by a few
vectors per step: (F x D) by (D x N) with N = a batch of about 8.  For such skinny products
OpenBLAS's own threading is slower than one thread (measured on the 2-core machine: 6.2 GFLOP/s
with 2 threads, 10.5 with 1, F = 1600, D = 10^4, N = 8) -- its split does not suit them.  The
replicas are independent, so they are split over the cores instead: each worker thread runs
whole replicas with single-threaded BLAS (numpy and ctypes release the GIL in BLAS).

Every replica's numbers are computed by the same single-threaded BLAS call whatever the number
of workers, so a run gives the same result on any number of cores.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from tpcompiler import threads

#: below this many multiply-adds, one batched call (threads cost ~50 us to hand work to)
PARALLEL_WORK = 4_000_000


def parallel(R: int, work: float) -> bool:
    """Whether ``for_each_replica`` would use threads for R replicas and ``work`` multiply-adds."""
    return R >= 2 and work >= PARALLEL_WORK and threads.cores() >= 2


def for_each_replica(job: Callable[[int], None], R: int, work: float | None = None) -> None:
    """job(r) for r = 0 .. R-1: replicas dealt round-robin to one thread per core, BLAS limited
    to one thread meanwhile; in this thread, one after another, when ``work`` (multiply-adds)
    is given and too small for threads (``parallel``).  ``job`` writes its replica's slice of a
    preallocated output."""
    if work is not None and not parallel(R, work):
        for r in range(R):
            job(r)
        return
    workers = min(R, threads.cores())

    def deal(first: int) -> None:
        for r in range(first, R, workers):
            job(r)

    with threads.one_blas_thread():
        threads.run(functools.partial(deal, first) for first in range(workers))


def matmul(a, b):
    """np.matmul(a, b) for stacks a (R, p, q), b (R, q, s) (views allowed), by replica on the
    cores when the product is large."""
    R, p, q = a.shape
    s = b.shape[2]
    if not parallel(R, R * p * q * s):
        return np.matmul(a, b)
    out = np.empty((R, p, s), dtype=np.result_type(a, b))
    for_each_replica(lambda r: np.matmul(a[r], b[r], out=out[r]), R)
    return out
