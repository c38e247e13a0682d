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
import os
import select
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


#: How often (seconds) ``within_budget``'s watchdog looks at the clock and the memory.
BUDGET_POLL = 0.05
#: Watchdogs running now (each adds 1 while it runs: for tests).
_watchdogs = [0]


def watchdogs_running() -> int:
    """How many ``within_budget`` watchdogs are running in this process."""
    return _watchdogs[0]


def within_budget(fn, *args, seconds: float, memory_bytes: int, otherwise: Callable[[str], object]):
    """``fn(*args)``, or ``otherwise(reason)`` once it has run ``seconds``, or this process has
    grown by ``memory_bytes`` since the call started, or the machine's available memory fell
    below ``KEEP_FREE`` of what it was then.  For computations that may never end or may fill
    the memory, such as a sympy limit (symbolic/existence.py).

    A watchdog thread looks every ``BUDGET_POLL`` seconds and raises this call's own
    ``BudgetExceeded`` in the calling thread (``PyThreadState_SetAsyncExc``: at its next Python
    instruction, so a call stuck inside one C function is not stopped), again at each look
    until the call has left.  Whatever way the call leaves (a return, an error, a
    KeyboardInterrupt, an outer budget's stop), the watchdog has stopped before it does and a
    stop not yet delivered is withdrawn: none reaches the caller's later code.  Nothing here
    takes a Python-level lock (a threading.Event or Thread.join interrupted by a Ctrl-C at the
    wrong instruction keeps its lock, and the next one waits forever: review), only flags,
    a pipe and ``_thread.start_new_thread``."""
    own = type("BudgetExceeded", (BudgetExceeded,), {})
    caller = ctypes.c_ulong(threading.get_ident())
    start, resident, available = time.monotonic(), resident_bytes(), available_bytes()
    state, reasons = {"stop": False, "running": False, "done": False}, []
    wake_read, wake_write = os.pipe()

    def reason() -> str | None:
        if time.monotonic() - start > seconds:
            return f"it ran more than {seconds:g} s"
        now = resident_bytes()
        if now is not None and resident is not None and now - resident > memory_bytes:
            return f"it took more than {size_text(memory_bytes)} of memory"
        free = available_bytes() if available is not None else None
        if free is not None and free < KEEP_FREE * available:
            return f"the machine had {size_text(free)} of memory left"
        return None

    def watch() -> None:
        state["running"] = True
        _watchdogs[0] += 1
        try:
            while not state["stop"]:  # (read before the pipe: a watchdog that starts late touches nothing)
                if select.select([wake_read], [], [], BUDGET_POLL)[0] or state["stop"]:
                    break
                why = reason()
                if why is not None and not state["stop"]:
                    reasons.append(why)
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(caller, ctypes.py_object(own))
        finally:
            _watchdogs[0] -= 1
            state["done"] = True

    try:
        _thread.start_new_thread(watch, ())
        return fn(*args)
    except own:
        pass
    finally:
        _stop_watchdog(state, wake_read, wake_write, caller, own)
    return otherwise(reasons[0] if reasons else "out of budget")


def _stop_watchdog(state: dict, wake_read: int, wake_write: int, caller, own: type) -> None:
    """Stop ``within_budget``'s watchdog, wait until it has (if it runs), withdraw a stop not
    yet delivered, close the pipe.  An exception arriving meanwhile (its own stop on the way:
    dropped; a KeyboardInterrupt, an outer budget's stop) does not cut this short: it is
    raised after."""
    interrupted = None
    while True:
        try:
            state["stop"] = True  # (one instruction: the watchdog injects nothing once it reads it)
            os.write(wake_write, b"x")
            deadline = time.monotonic() + 10
            while state["running"] and not state["done"] and time.monotonic() < deadline:
                time.sleep(0.0001)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(caller, None)
            break
        except own:
            continue
        except BaseException as error:  # noqa: BLE001 - raised once the watchdog has stopped
            interrupted = error
    if state["done"] or not state["running"]:  # (else it may still read the pipe: left open)
        for fd in (wake_read, wake_write):
            try:
                os.close(fd)
            except OSError:
                pass
    if interrupted is not None:
        raise interrupted
