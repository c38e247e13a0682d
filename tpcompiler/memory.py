"""Memory of this process and of the machine, and a guard that stops a derivation with a clear
error before it takes more memory than the machine has.

A derivation whose size grows with the program (the kernels of a CNN: one quantity per pair
of positions and layer, so memory and time grow with the square of the number of positions)
can need more memory than the machine has.  Without a guard the operating system then swaps
for minutes and kills the process, or the whole Python session, without a word.  Inside
``guarded(...)`` the derivation's loops call ``tick()``; every ``CHECK_EVERY`` calls it
reads this process's resident memory and raises ``OutOfMemory`` (a ProgramError and a
MemoryError: ``tpc`` prints its one line) once that passes the limit: the resident memory at
the start plus ``FRACTION`` of the memory the machine had available then."""
from __future__ import annotations

import contextlib
import os
import threading

from tpcompiler.ir.graph import ProgramError

#: ``tick()`` reads the resident memory once per this many calls (about 5 us a read; a CNN's
#: derivation ticks some 10^5 times per second of work).
CHECK_EVERY = 2048
#: The share of the memory available at the start a guarded derivation may take.
FRACTION = 0.9


class OutOfMemory(ProgramError, MemoryError):
    """A guarded derivation stopped before it exhausted the machine's memory."""


def resident_bytes() -> int | None:
    """Bytes of this process's resident set (Linux /proc/self/statm), None where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def available_bytes() -> int | None:
    """Bytes of memory available to new allocations (Linux: MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def size_text(n: float) -> str:
    """A byte count for a message, in the largest unit it is a tenth of: "2.1 GB", "0.512 GB",
    "12 MB", "300 bytes"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= 0.1 * size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} bytes"


class _Guard:
    """The limit of one guarded derivation (``guarded``) and the count down to its next check."""

    def __init__(self, what: str, advice: str, start: int, available: int):
        self.what, self.advice = what, advice
        self.start, self.available = start, available
        self.limit = start + FRACTION * available
        self.step = ""
        self.countdown = CHECK_EVERY

    def check(self) -> None:
        self.countdown = CHECK_EVERY
        resident = resident_bytes()
        if resident is not None and resident > self.limit:
            where = f" (in step {self.step!r})" if self.step else ""
            raise OutOfMemory(
                f"{self.what}: stopped before running out of memory{where}: this process grew from "
                f"{size_text(self.start)} to {size_text(resident)}, and the machine had {size_text(self.available)} "
                f"available when it started; {self.advice}")


_active: _Guard | None = None
_lock = threading.Lock()


@contextlib.contextmanager
def guarded(what: str, advice: str):
    """Within the block, ``tick()`` raises ``OutOfMemory`` ("``what``: stopped before running
    out of memory ...; ``advice``") once this process's resident memory passes its size at
    the start plus ``FRACTION`` of the memory available then (module docstring).  Yields a
    function that names the step running, for the message.  A block inside another (or
    beside it, in another thread) keeps the first one's guard, whose limit is the process's;
    where the memory cannot be read (not Linux), the block runs unguarded."""
    global _active
    start, available = resident_bytes(), available_bytes()
    with _lock:
        own = _active is None and start is not None and available is not None
        if own:
            _active = _Guard(what, advice, start, available)
    guard = _active if own else None

    def step(name: str) -> None:
        if guard is not None:
            guard.step = name

    try:
        yield step
    finally:
        if own:
            with _lock:
                _active = None


def tick() -> None:
    """Called by a guarded derivation's loops (``guarded``): every ``CHECK_EVERY`` calls,
    raise ``OutOfMemory`` if this process passed the active guard's limit."""
    guard = _active
    if guard is not None:
        guard.countdown -= 1
        if guard.countdown <= 0:
            guard.check()
