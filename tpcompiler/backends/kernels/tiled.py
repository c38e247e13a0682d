"""Kernels of any data size (docs/DESIGN.md 2.3, 5): NNGP and NTK computed in tiles under a
memory budget, written to memory or to memory-mapped .npy files, on this machine or as tasks
on a Dask cluster.

The kernel backend (``kernel.KernelFunction``) evaluates k(xi, xi') for all pairs of two row
sets in two stages: a *row stage*, O(N) (row features and per-input quantities), and a *pair
stage* over the Gram matrices of the two sets.  The pair stage of rows I against rows J needs
only the inputs and row-stage values of I and J, so the N x N2 matrix splits into tiles
(I, J), each computed independently (``KernelFunction.block``) by the same generated code as
the untiled call.  For k(X, X) only tiles I <= J are computed; the tile (I, J) also gives
(J, I) by symmetry, and a diagonal tile is symmetrised like the whole matrix.

Memory: a budget given is for the whole process (without one, ``DEFAULT_HEADROOM`` beyond
what it holds at the call, at most the memory available).  What it holds at the call (interpreter,
libraries, the inputs: its resident set, plus ``RESERVE`` for untracked allocations) is
counted, then every array this module allocates: the row-stage values, the outputs when they
are kept in memory, and one tile's working set (its Gram matrices, the two kernel blocks, a
transposed copy, the scaled input rows).  The tile side is the largest that fits.  Outputs
that do not fit go to .npy files, written tile by tile with positioned writes (so they occupy
the page cache, not this process), and come back as read-only memory maps.  On a Dask cluster
the same tile side is used by each worker (whose own baseline is not known here).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass

import numpy as np

from tpcompiler import progress as progress_mod, validation
from tpcompiler.memory import available_bytes, resident_bytes, size_text
from tpcompiler.backends.kernels.kernel import KERNELS, KernelFunction

#: The default budget (``memory=None``): this much beyond what the process holds at the call,
#: at most the memory available.  A budget given counts the whole process (module docstring);
#: a default that did so refused every call of a process that had grown past it (a notebook
#: with a large data set loaded, a long test run).
DEFAULT_HEADROOM = "4GB"
DEFAULT_MEMORY = None
DTYPES = ("float64", "float32")
#: The smallest tile side the planner accepts (a smaller one would spend its time in Python).
MIN_TILE = 64
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value, name: str | None = "memory") -> int:
    """A memory size in bytes: a positive number of bytes, or a string such as "4GB", "512MB",
    "1.5GiB" (kB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024)."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        size = float(value)
    else:
        match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if unit not in _UNITS:
            _fail(name, f"expected a memory size such as '4GB', '512MB' or '1.5GiB', got {value!r}")
        size = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        _fail(name, f"expected a positive memory size, got {value!r}")
    return int(size)


def _fail(name: str | None, problem: str):
    raise validation.ArgumentError(f"{name}: {problem}" if name else problem)


#: Allowance for what the budget cannot see being allocated: BLAS buffers, Numba's thread
#: stacks, Python objects of a call.
RESERVE = 64 * 2**20


def process_baseline() -> int:
    """Bytes this process holds before a kernel call: its resident set now
    (``memory.resident_bytes``; 0 where it cannot be read) plus ``RESERVE``."""
    return (resident_bytes() or 0) + RESERVE


def default_budget(baseline: int) -> int:
    """The budget of a call given none: ``baseline`` (what the process holds) plus
    ``DEFAULT_HEADROOM``, or plus the memory available if that is less."""
    headroom = parse_memory(DEFAULT_HEADROOM)
    available = available_bytes()
    return baseline + (headroom if available is None else min(headroom, available))


# ---------------------------------------------------------------------------------------
# The plan: tile side and where the outputs go.
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How a kernel call is cut: ``tile`` rows (and columns) per tile; ``blocks`` of X and X2
    as row slices; ``jobs`` (kind, I, J): ("x", I, J) a tile of k(X, X) with I <= J,
    ("x2", I, J) a tile of k(X2, X) (rows of X2 block I, columns of X block J)."""

    tile: int
    blocks: list
    blocks2: list
    jobs: list
    fixed_bytes: int
    tile_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.fixed_bytes + self.tile_bytes


def _slices(n: int, tile: int) -> list[slice]:
    return [slice(s, min(n, s + tile)) for s in range(0, n, tile)]


def tile_bytes(tile: int, kf: KernelFunction, d: int) -> int:
    """Working set of one tile x tile block: its Gram matrices, the kernel blocks, one transposed
    or converted copy, and the scaled input rows BLAS reads (float64)."""
    square = len(kf.features.bases) + len(kf.kernels) + 1
    per_row = 4 * d + 2 * (len(kf.features.row) + len(kf.row_symbols) + len(kf.kernels))
    return 8 * (square * tile * tile + 2 * per_row * tile)


def output_shapes(N: int, N2: int | None, kernels: tuple = KERNELS) -> dict[str, tuple[int, int]]:
    """{name: shape} of the kernel matrices of a call: k(X, X) and, with X2, k(X2, X), of each
    of ``kernels`` (``KernelFunction.kernels``)."""
    shapes = {name: (N, N) for name in kernels}
    if N2 is not None:
        shapes.update({f"{name}_x2": (N2, N) for name in kernels})
    return shapes


def plan(kf: KernelFunction, N: int, N2: int | None, d: int, memory: int, in_memory: bool, dtype,
         tile: int | None = None, min_tasks: int = 1, baseline: int = 0) -> Plan:
    """The largest tile side (at most N, at least ``MIN_TILE`` or N) whose working set fits
    ``memory`` with the ``baseline`` bytes the process already uses, the row-stage values and
    (``in_memory``) the outputs; ``tile`` forces a side; ``min_tasks``: cut k(X, X) into at least
    that many tiles (Dask workers)."""
    itemsize = np.dtype(dtype).itemsize
    rows = (N + (N2 or 0)) * 2 * (len(kf.features.row) + len(kf.row_symbols) + len(kf.kernels))
    outputs = sum(a * b for a, b in output_shapes(N, N2, kf.kernels).values()) * itemsize
    fixed = baseline + 8 * rows + (outputs if in_memory else 0)
    if baseline >= memory:  # not the kernels' size: no output format or tile helps
        smallest = fixed + tile_bytes(min(N, MIN_TILE), kf, d)
        raise validation.ArgumentError(
            f"memory: the budget of {size_text(memory)} is below what this process uses already "
            f"({size_text(baseline)} before any kernel: the interpreter, its libraries, the inputs), "
            f"which the budget counts too; give more than {size_text(smallest)}")
    if in_memory and fixed > memory:
        raise validation.ArgumentError(
            f"memory: the kernels ({len(output_shapes(N, N2, kf.kernels))} matrices of {N} columns, {dtype}: "
            f"{size_text(outputs)}) "
            f"do not fit the budget of {size_text(memory)} (this process uses {size_text(baseline)} already); write them to "
            f"memory-mapped .npy files with out=DIRECTORY (tpc kernels --out DIR/), or use dtype float32 or a "
            f"larger memory budget")
    if tile is None:
        tile = N
        while tile > min(N, MIN_TILE) and fixed + tile_bytes(tile, kf, d) > memory:
            tile = max(min(N, MIN_TILE), int(tile * 0.9) // 8 * 8)
        if min_tasks > 1:
            blocks_needed = math.ceil((math.sqrt(8 * min_tasks + 1) - 1) / 2)  # nb (nb + 1) / 2 >= tasks
            tile = min(tile, max(min(N, MIN_TILE), math.ceil(N / blocks_needed)))
    else:
        tile = validation.count(tile, "tile", minimum=1)
    need = fixed + tile_bytes(min(tile, N), kf, d)
    if need > memory:
        raise validation.ArgumentError(
            f"memory: the budget of {size_text(memory)} is too small: this process uses {size_text(baseline)} already and one "
            f"{min(tile, N)} x {min(tile, N)} tile with the row values{' and the outputs' if in_memory else ''} "
            f"needs {size_text(need - baseline)} more; give at least {size_text(need)}")
    blocks = _slices(N, tile)
    blocks2 = _slices(N2, tile) if N2 is not None else []
    jobs = [("x", i, j) for i in range(len(blocks)) for j in range(i, len(blocks))]
    jobs += [("x2", i, j) for i in range(len(blocks2)) for j in range(len(blocks))]
    return Plan(tile, blocks, blocks2, jobs, fixed, tile_bytes(min(tile, N), kf, d))


# ---------------------------------------------------------------------------------------
# Where tiles go: arrays in memory, or .npy files written by positioned writes.
# ---------------------------------------------------------------------------------------
class NpyFile:
    """A C-ordered .npy file of ``shape`` and ``dtype`` filled block by block with positioned
    writes (the data go to the page cache, not to this process's memory)."""

    def __init__(self, path: str, shape: tuple[int, int], dtype):
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        header = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=shape)
        self.offset = header.offset
        del header
        self.fd = os.open(path, os.O_WRONLY)

    def __setitem__(self, index: tuple[slice, slice], block: np.ndarray) -> None:
        rows, cols = index
        block = np.ascontiguousarray(block, dtype=self.dtype)
        row_bytes = self.shape[1] * self.dtype.itemsize
        start = self.offset + rows.start * row_bytes + cols.start * self.dtype.itemsize
        if cols.start == 0 and cols.stop == self.shape[1]:
            _write_all(self.fd, memoryview(block).cast("B"), start)
            return
        for i in range(block.shape[0]):
            _write_all(self.fd, memoryview(block[i]).cast("B"), start + i * row_bytes)

    def close(self) -> np.memmap:
        os.close(self.fd)
        return np.load(self.path, mmap_mode="r")


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def output_paths(out: str, names) -> dict[str, str]:
    """The .npy file of each kernel: ``out/NAME.npy`` when ``out`` is a directory (an existing
    one, or a path ending in a separator, then created), else the prefix ``out`` + ``_NAME.npy``."""
    is_dir = os.path.isdir(out) or out.endswith(("/", os.sep))
    return {name: os.path.join(out, f"{name}.npy") if is_dir else f"{out}_{name}.npy" for name in names}


def output_folder(out: str) -> str:
    """The directory the files of ``out`` go to (see output_paths), created when ``out`` names
    a new directory; a one-line error when that cannot be done."""
    folder = os.path.dirname(os.path.abspath(output_paths(out, ["nngp"])["nngp"]))
    if out.endswith(("/", os.sep)) and not os.path.isdir(out):
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as exc:
            raise validation.ArgumentError(f"out: cannot create the directory {out!r} ({exc.strerror or exc})") from None
    if not os.path.isdir(folder):
        raise validation.ArgumentError(f"out: cannot write to {folder!r} (not an existing directory)")
    return folder


def first_missing_folder(folder: str) -> str | None:
    """The outermost of ``folder`` and its parents that does not exist (what creating ``folder``
    creates first), None if ``folder`` exists."""
    path, missing = os.path.abspath(folder), None
    while not os.path.isdir(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def remove_created_folders(folder: str, outermost: str | None) -> None:
    """Remove ``folder`` and its parents up to ``outermost`` (the folders a run created,
    ``first_missing_folder``; nothing when None), each only while it is empty."""
    if outermost is None:
        return
    path = os.path.abspath(folder)
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == outermost or os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def _open_files(out: str, shapes: dict, dtype) -> dict[str, NpyFile]:
    """One NpyFile per kernel under ``out`` (see output_paths); one-line errors when the place
    cannot be written or the disk is too small."""
    folder = output_folder(out)
    paths = output_paths(out, shapes)
    need = sum(a * b for a, b in shapes.values()) * np.dtype(dtype).itemsize
    free = shutil.disk_usage(folder).free + sum(os.path.getsize(p) for p in paths.values() if os.path.isfile(p))
    if need > free:
        raise validation.ArgumentError(f"out: the kernels need {size_text(need)} on disk but {folder!r} has {size_text(free)} free; "
                                       f"use dtype float32 or another place")
    files = {}
    try:
        for name, path in paths.items():
            files[name] = NpyFile(path, shapes[name], dtype)
    except BaseException as exc:
        _discard(files)  # (the files opened before the one that failed hold no kernel)
        if isinstance(exc, OSError):
            raise validation.ArgumentError(f"out: cannot write {exc.filename or out!r} ({exc.strerror or exc})") from None
        raise
    return files


# ---------------------------------------------------------------------------------------
# Running the tiles.
# ---------------------------------------------------------------------------------------
def kernels(kf: KernelFunction, X, X2=None, memory=DEFAULT_MEMORY, out: str | None = None, dtype: str = "float64",
            client=None, progress: bool | None = None, tile: int | None = None) -> dict[str, np.ndarray]:
    """{"nngp", "ntk"[, "nngp_x2", "ntk_x2"]} as ``KernelFunction.__call__`` gives them, under
    the memory budget ``memory`` (see module docstring): in memory when ``out`` is None,
    else memory-mapped .npy files named by ``output_paths(out, ...)``; entries of ``dtype``
    (computed in float64); tiles as tasks on the Dask ``client`` when given; a progress bar
    over tiles (``progress`` None: when stderr is a terminal).  When the whole call fits one
    tile in memory on this machine it is the untiled call itself."""
    baseline = process_baseline()
    budget = default_budget(baseline) if memory is None else parse_memory(memory)
    validation.choice(dtype, "dtype", DTYPES)
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise validation.ArgumentError(f"out: expected a directory or path prefix, got {type(out).__name__}")
    X, X2 = kf.check_inputs(X, X2)
    N, N2 = X.shape[0], None if X2 is None else X2.shape[0]
    if client is not None and not all(hasattr(client, m) for m in ("submit", "scatter")):
        raise validation.ArgumentError(f"client: expected a dask.distributed.Client (tiled.connect('local:4') starts "
                                       f"a local cluster), got {client!r}")
    workers = _worker_count(client) if client is not None else 1
    p = plan(kf, N, N2, X.shape[1], budget, out is None, dtype, tile, min_tasks=2 * workers if workers > 1 else 1,
             baseline=baseline)
    kf.last_plan = p
    if out is None and client is None and p.tile >= max(N, N2 or 0):
        result = kf(X, X2)
        return {k: v.astype(dtype, copy=False) for k, v in result.items()}
    shapes = output_shapes(N, N2, kf.kernels)
    created = None  # the folders of ``out`` this call creates, removed again if it fails
    if out is None:
        targets = {name: np.empty(shape, dtype=dtype) for name, shape in shapes.items()}
    else:
        out = os.fspath(out)
        created = first_missing_folder(out) if out.endswith(("/", os.sep)) else None
        try:
            targets = _open_files(out, shapes, dtype)
        except BaseException:
            remove_created_folders(out, created)
            raise
    timing: dict = {}

    def store(job, outs):
        kind, i, j = job
        kf.check_finite({(name if kind == "x" else f"{name}_x2"): o for name, o in zip(kf.kernels, outs)}, (X, X2))
        I = p.blocks[i] if kind == "x" else p.blocks2[i]
        J = p.blocks[j]
        for name, o in zip(kf.kernels, outs):
            target = targets[name if kind == "x" else f"{name}_x2"]
            target[I, J] = o
            if kind == "x" and i != j:
                target[J, I] = o.T

    try:
        t0 = time.perf_counter()
        rows = kf.rows(X)
        rows2 = kf.rows(X2) if X2 is not None else None
        timing["rows"] = time.perf_counter() - t0
        with progress_mod.bar(len(p.jobs), "kernel tiles", unit="tile", enabled=progress) as bar:
            if client is None:
                for job in p.jobs:
                    store(job, kf.block(*_block_args(job, p, X, X2, rows, rows2), timing))
                    bar.update()
            else:
                t0 = time.perf_counter()
                _run_on_dask(client, kf, p, X, X2, rows, rows2, store, bar)
                timing["dask tasks"] = time.perf_counter() - t0
    except BaseException:
        if out is not None:  # a partial kernel (zeros where no tile was written) must not be read as one
            _discard(targets)
            remove_created_folders(out, created)
        raise
    if out is not None:
        targets = {name: f.close() for name, f in targets.items()}
    kf.last_timing = timing
    return targets


def _discard(files: dict) -> None:
    """Close and delete the .npy files of a run that did not finish (an error in a tile, an
    interrupt): files named like a finished run's but holding part of a kernel."""
    for f in files.values():
        os.close(f.fd)
        try:
            os.remove(f.path)
        except OSError:
            pass


def _block_args(job, p: Plan, X, X2, rows, rows2):
    """(A, rows of A, B, rows of B, same) of a tile job."""
    kind, i, j = job
    I, J = (p.blocks[i] if kind == "x" else p.blocks2[i]), p.blocks[j]
    A, RA = (X, rows) if kind == "x" else (X2, rows2)
    same = kind == "x" and i == j
    return A[I], (RA[0][I], RA[1][I]), X[J], (rows[0][J], rows[1][J]), same


# ---------------------------------------------------------------------------------------
# Dask: the same tiles as tasks.
# ---------------------------------------------------------------------------------------
def require_distributed():
    """The ``distributed`` module, or a one-line error saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise validation.ArgumentError(
            "Dask is not installed: the scheduler/client option needs it (pip install 'tpcompiler[dask]')") from None
    return distributed


def _worker_count(client) -> int:
    try:
        return max(1, len(client.nthreads()))
    except Exception:  # noqa: BLE001 - any client-like object: one task at a time is still correct
        return 1


#: Per worker process: the compiled KernelFunction of each program (keyed by ``worker_key``),
#: and a lock so that threads of one process run the parallel Numba stages in turn.
_WORKER_KERNELS: dict = {}
_WORKER_LOCK = threading.Lock()


def worker_key(kf: KernelFunction) -> str:
    """The key of ``kf``'s program in ``_WORKER_KERNELS``: its generated source and its
    derivation's disk-cache key (the graph and options, kernels/stored.py).  The source alone
    is not the program: two programs can share it and differ in what it reads at run time
    (input features such as the coefficients of a bilinear form), and a worker that had
    computed one gave the other's tiles its values.  The key ``kf`` was built with is reused
    (the graph is hashed once); a graph without a derivation key gets a key of its own, so
    that workers build its kernels afresh."""
    import hashlib
    import uuid

    from tpcompiler.backends.kernels.kernel import derivation_key

    ident = kf.derivation_key or derivation_key(kf.graph, kf.rtol, kf.kernels) or f"unkeyed-{uuid.uuid4().hex}"
    return hashlib.sha256(f"{ident}\0{kf.source}".encode()).hexdigest()


def _worker_kernel(graph, rtol: float, key: str, kernels: tuple = KERNELS) -> KernelFunction:
    with _WORKER_LOCK:
        if key not in _WORKER_KERNELS:  # derived once per machine
            _WORKER_KERNELS[key] = KernelFunction(graph, rtol=rtol, cache=True, get=kernels)
        return _WORKER_KERNELS[key]


def remote_block(graph, rtol: float, key: str, a_part, b_part, same: bool,
                 kernels: tuple = KERNELS) -> list[np.ndarray]:
    """A Dask task: the tile of rows ``a_part`` = (A, row features, row values) against
    ``b_part``, by the program's KernelFunction of ``kernels`` built (once per worker) from its
    graph."""
    kf = _worker_kernel(graph, rtol, key, kernels)
    A, RFa, Ra = a_part
    B, RFb, Rb = b_part
    with _WORKER_LOCK:
        return kf.block(A, (RFa, Ra), B, (RFb, Rb), same)


def _run_on_dask(client, kf, p: Plan, X, X2, rows, rows2, store, bar) -> None:
    """Submit the plan's tiles to ``client`` (at most two per worker in flight, so finished
    tiles do not pile up) and store each result as it arrives, one at a time."""
    distributed = require_distributed()
    key = worker_key(kf)
    _WORKER_KERNELS.setdefault(key, kf)  # workers in this process (threads) use it as it is
    parts = [(X[s], rows[0][s], rows[1][s]) for s in p.blocks]
    parts2 = [(X2[s], rows2[0][s], rows2[1][s]) for s in p.blocks2]
    # hash=False: fresh keys per call. With content-hashed keys, a second call on the same data
    # reuses the keys whose cancellation the previous call has just sent, and its tasks are
    # cancelled for 'lost dependencies' (seen under load in the test suite).
    scattered = client.scatter(parts + parts2, hash=False)
    f1, f2 = scattered[:len(parts)], scattered[len(parts):]
    graph = client.scatter(kf.graph, broadcast=True, hash=False)
    jobs = iter(p.jobs)
    window = 2 * _worker_count(client)
    running = distributed.as_completed()
    owner = {}

    def submit_next():
        job = next(jobs, None)
        if job is None:
            return
        kind, i, j = job
        a = f1[i] if kind == "x" else f2[i]
        fut = client.submit(remote_block, graph, kf.rtol, key, a, f1[j], kind == "x" and i == j, kf.kernels,
                            pure=False)
        owner[fut.key] = job
        running.add(fut)

    for _ in range(window):
        submit_next()
    for fut in running:
        outs = fut.result()
        store(owner.pop(fut.key), outs)
        fut.release()
        bar.update()
        submit_next()
    client.cancel(scattered + [graph])


def local_cluster_client(spec: str):
    """A ``distributed.Client`` on a new local cluster of ``local:K`` K worker processes (one
    thread each); the caller closes the client and its cluster."""
    distributed = require_distributed()
    count = spec.partition(":")[2]
    if not count.isdigit() or int(count) < 1:
        raise validation.ArgumentError(f"scheduler: expected local:K with K >= 1 workers (e.g. local:4), got {spec!r}")
    import logging

    cluster = distributed.LocalCluster(n_workers=int(count), threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.ERROR)
    return distributed.Client(cluster)


def connect(address: str):
    """A ``distributed.Client`` for a scheduler ``address`` (host:port or tcp://...), or a
    local cluster for ``local:K``."""
    if address.startswith("local:"):
        return local_cluster_client(address)
    distributed = require_distributed()
    try:
        return distributed.Client(address, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise validation.ArgumentError(f"scheduler: cannot connect to {address!r} ({exc})".splitlines()[0]) from None
    except (ValueError, AssertionError, TypeError) as exc:  # distributed's parsing of the address
        raise validation.ArgumentError(f"scheduler: {address!r} is not a scheduler address (give host:port, "
                                       f"tcp://host:port or local:K){_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f" ({text})" if text else ""
