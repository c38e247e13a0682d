"""Memory of this process and of the machine, and a guard that stops a derivation with a clear
error before the machine runs out of memory.

A derivation whose size grows with the program (the kernels of a CNN: one quantity per pair
of positions and layer, so memory and time grow with the square of the number of positions)
can need more memory than the machine has.  Without a guard the operating system swaps for
minutes and then kills the process, or the whole Python session, without a word.  Inside
``guarded(...)`` the derivation's loops call ``tick()``; every ``CHECK_EVERY`` calls it reads
the memory the machine (or the process's container) has available, and raises
``OutOfMemory`` (a ProgramError and a MemoryError: ``tpc`` prints its one line) once that is
below ``KEEP_FREE`` of what was available when the derivation started.
``TPCOMPILER_MEMORY_GUARD=off`` turns the check off (a machine with swap to spare).  Linux
only: where the memory cannot be read, nothing is checked."""
from __future__ import annotations

import _thread
import ctypes
import itertools
import os
import threading
import time
from typing import Callable

from tpcompiler.ir.graph import ProgramError

#: ``tick()`` reads the available memory once per this many calls (a read takes some 20 us;
#: a CNN's derivation ticks some 10^4 times per second of work).
CHECK_EVERY = 1024
#: The share of the memory available at the start that a guarded derivation leaves free.
KEEP_FREE = 0.1
#: The environment variable that turns the guard off ("off").
SWITCH = "TPCOMPILER_MEMORY_GUARD"


class OutOfMemory(ProgramError, MemoryError):
    """A guarded derivation stopped before the machine ran out of memory."""


def resident_bytes() -> int | None:
    """Bytes of this process's resident set (Linux /proc/self/statm), None where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def available_bytes() -> int | None:
    """Bytes of memory available to new allocations: the machine's (Linux MemAvailable), or
    less if this process's container (its cgroup) has a memory limit closer; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            machine = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError, IndexError):
        machine = None
    known = [n for n in (machine, _container_available()) if n is not None]
    return min(known) if known else None


#: (limit, usage, statistics, the statistic of reclaimable page cache) of the memory
#: controller as a container sees it: cgroup v2, then v1.
_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
                  "inactive_file"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
                  "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"))


def _container_available() -> int | None:
    """The cgroup's memory limit minus its usage (without the page cache it can reclaim, as
    docker counts it), None without a limit (or where it cannot be read)."""
    for limit_file, usage_file, stat_file, reclaimable in _CGROUP_FILES:
        try:
            with open(limit_file) as f:
                text = f.read().strip()
            if text == "max" or int(text) >= 2**60:  # (v1 writes "no limit" as a huge number)
                return None
            with open(usage_file) as f:
                usage = int(f.read())
            with open(stat_file) as f:
                cache = next((int(line.split()[1]) for line in f if line.split()[0] == reclaimable), 0)
            return max(0, int(text) - (usage - cache))
        except (OSError, ValueError, IndexError):
            continue
    return None


def size_text(n: float) -> str:
    """A byte count for a message, in the largest unit it is a tenth of: "2.1 GB", "0.512 GB",
    "12 MB", "300 bytes"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= 0.1 * size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} bytes"


class _Guard:
    """The state of one guarded derivation (``guarded``): what it is, its advice, the memory at
    its start, the step running and the count down to the next check."""

    def __init__(self, what: str, advice: str, available: int):
        self.what, self.advice = what, advice
        self.available, self.resident = available, resident_bytes()
        self.step = ""
        self.countdown = CHECK_EVERY

    def check(self) -> None:
        self.countdown = CHECK_EVERY
        now = available_bytes()
        if now is None or now >= KEEP_FREE * self.available:
            return
        where = f" (in step {self.step!r})" if self.step else ""
        resident, grew = resident_bytes(), ""
        if resident is not None and self.resident is not None:
            grew = f"; this process grew by {size_text(max(0, resident - self.resident))} to {size_text(resident)}"
        raise OutOfMemory(
            f"{self.what}: stopped before the machine runs out of memory{where}: {size_text(now)} available, "
            f"less than {KEEP_FREE:.0%} of the {size_text(self.available)} available when it started{grew}; "
            f"{self.advice} ({SWITCH}=off turns this check off)")


_state = threading.local()  # .guard: the guard of this thread's derivation, if any


def _forget_in_child() -> None:
    _state.__dict__.clear()  # (a forked process starts no derivation of its parent's)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class guarded:
    """``with guarded(what, advice) as step:`` -- within the block, ``tick()`` raises
    ``OutOfMemory`` ("``what``: stopped before the machine runs out of memory ...;
    ``advice``") once the memory available is below ``KEEP_FREE`` of what it was at the start
    (module docstring); ``step(name)`` names the step running, for the message.  One guard per
    thread: a block inside another keeps the outer one.  Unguarded where the memory cannot be
    read or ``TPCOMPILER_MEMORY_GUARD=off``.  The error leaves the block without the frames it
    was raised in (a traceback kept by an interactive session would keep the derivation's
    objects alive, and with them the memory it ran out of)."""

    def __init__(self, what: str, advice: str):
        self.what, self.advice = what, advice
        self.guard = None

    def __enter__(self):
        if getattr(_state, "guard", None) is None and os.environ.get(SWITCH, "").lower() != "off":
            available = available_bytes()
            if available is not None:
                self.guard = _state.guard = _Guard(self.what, self.advice, available)
        return self.step

    def step(self, name: str) -> None:
        if self.guard is not None:
            self.guard.step = name

    def __exit__(self, kind, error, traceback) -> bool:
        if self.guard is not None:
            _state.guard = None
            if isinstance(error, OutOfMemory):
                error.__traceback__ = error.__context__ = None
        return False


def tick() -> None:
    """Called by a guarded derivation's loops (``guarded``): every ``CHECK_EVERY`` calls,
    raise ``OutOfMemory`` if the memory available fell below this thread's guard's reserve."""
    guard = getattr(_state, "guard", None)
    if guard is not None:
        guard.countdown -= 1
        if guard.countdown <= 0:
            guard.check()


class BudgetExceeded(BaseException):
    """What ``within_budget``'s watchdog raises in the call it watches (each call its own
    subclass, so that a budget inside another stops only its own call).  A BaseException, as
    KeyboardInterrupt is: the library code it interrupts (sympy) catches Exception in places,
    and must not swallow it."""


#: How often (seconds) the watchdog looks at the clock and the memory of the calls it watches.
BUDGET_POLL = 0.05
#: The calls being watched (``within_budget``), by a number of their own.
_watched: dict = {}
_numbers = itertools.count()
#: Held for good by the first ``within_budget``, which starts the one watchdog thread.
_watchdog_started = _thread.allocate_lock()


def watched_calls() -> int:
    """How many ``within_budget`` calls the watchdog is watching now (0 between calls)."""
    return len(_watched)


def within_budget(fn, *args, seconds: float, memory_bytes: int, otherwise: Callable[[str], object]):
    """``fn(*args)``, or ``otherwise(reason)`` once it has run ``seconds``, or this process has
    grown by ``memory_bytes`` since the call started, or the machine's available memory fell
    below ``KEEP_FREE`` of what it was then.  For computations that may never end or may fill
    the memory, such as a sympy limit (symbolic/existence.py).

    One watchdog thread (``_watch``, started once per process) looks every ``BUDGET_POLL``
    seconds and raises the call's own ``BudgetExceeded`` in the calling thread
    (``PyThreadState_SetAsyncExc``: at its next Python instruction, so a call stuck inside one
    C function is not stopped), again at each look until the call has left.  When the call
    leaves, however (a return, an error, a KeyboardInterrupt, an outer budget's stop), its
    first step marks it stopped, so the watchdog raises nothing more in it; the call waits if
    the watchdog is raising at that moment, then withdraws a stop not yet delivered.  Nothing
    on that path takes a Python-level lock (a threading.Event or Thread.join interrupted by a
    Ctrl-C at the wrong instruction keeps its lock, and the next one waits forever: review).
    Left: a Ctrl-C that arrives while the watchdog is raising this call's stop, as the call
    leaves, lets that one stop reach the caller."""
    own = type("BudgetExceeded", (BudgetExceeded,), {})
    call = {"thread": threading.get_ident(), "own": own, "stop": False, "raising": False, "reasons": [],
            "start": time.monotonic(), "seconds": seconds, "memory": memory_bytes,
            "resident": resident_bytes(), "available": available_bytes()}
    number = next(_numbers)
    try:
        if _watchdog_started.acquire(False):
            _thread.start_new_thread(_watch, ())
        _watched[number] = call
        return fn(*args)
    except own:
        pass
    finally:
        call["stop"] = True  # (first, and one instruction: from here on the watchdog raises nothing in it)
        _watched.pop(number, None)
        _leave(call)
    return otherwise(call["reasons"][0] if call["reasons"] else "out of budget")


def _leave(call: dict) -> None:
    """The end of a watched call: wait while the watchdog raises in it, withdraw a stop not
    yet delivered.  Its own stop arriving meanwhile is dropped; another exception (a
    KeyboardInterrupt, an outer budget's stop) is raised after."""
    interrupted = None
    while True:
        try:
            while call["raising"]:
                time.sleep(0.0001)
            if call["reasons"]:  # (only if its own stop was raised: an outer budget's pending one stays)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(call["thread"]), None)
            break
        except call["own"]:
            continue
        except BaseException as error:  # noqa: BLE001 - raised once the call has left
            interrupted = error
    if interrupted is not None:
        raise interrupted


def _over_budget(call: dict) -> str | None:
    """Why a watched call is over its budget, or None."""
    if time.monotonic() - call["start"] > call["seconds"]:
        return f"it ran more than {call['seconds']:g} s"
    now, resident = resident_bytes(), call["resident"]
    if now is not None and resident is not None and now - resident > call["memory"]:
        return f"it took more than {size_text(call['memory'])} of memory"
    available = call["available"]
    free = available_bytes() if available is not None else None
    if free is not None and free < KEEP_FREE * available:
        return f"the machine had {size_text(free)} of memory left"
    return None


def _watch() -> None:
    """The watchdog thread: every ``BUDGET_POLL`` seconds, each watched call over its budget
    gets its own stop, unless it is leaving (its "raising" flag makes the leaving call wait)."""
    while True:
        time.sleep(BUDGET_POLL)
        for call in list(_watched.values()):
            if call["stop"]:
                continue
            why = _over_budget(call)
            if why is None:
                continue
            call["raising"] = True
            try:
                if not call["stop"]:
                    call["reasons"].append(why)
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(call["thread"]),
                                                               ctypes.py_object(call["own"]))
            finally:
                call["raising"] = False
