"""Progress bars for long work, one helper for the whole package (tqdm).

Every operation that can take more than a few seconds -- particle evaluation, the step
engine's training loop, Numba compilation of generated kernels, ``tpc check`` over widths,
``tp.coordcheck``, the experiments -- reports through :func:`bar` (a counted loop) or
:func:`status` (one long call, e.g. a JIT compilation: a line with the elapsed time).

Whether anything is shown is decided in one place, :func:`is_enabled`:

1. an explicit ``enabled=True/False`` argument of the call wins;
2. else the setting of the innermost :func:`configured` block (``tpc --quiet`` runs its
   command inside ``configured(False)``; tests force bars on with ``configured(True)``);
3. else a bar is shown exactly when standard error is a terminal, so logs, pipes and CI stay
   clean.

Bars write to standard error, never to standard output (which carries results and JSON).
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time

_SETTING: contextvars.ContextVar = contextvars.ContextVar("tpcompiler_progress", default=None)
#: The list :func:`status` calls record their steps' times in, within a :func:`timed_steps` block.
_STEP_TIMES: contextvars.ContextVar = contextvars.ContextVar("tpcompiler_step_times", default=None)

#: Seconds between refreshes of a :func:`status` line while its call runs.
STATUS_REFRESH = 0.5
#: Seconds a compile step (``tp.compile``'s passes, a kernel derivation) runs before its
#: :func:`status` line appears: most programs compile faster and print nothing.
COMPILE_DELAY = 2.0


def is_enabled(flag: bool | None = None) -> bool:
    """Whether to show progress (module docstring: argument, then setting, then terminal)."""
    if flag is not None:
        return bool(flag)
    setting = _SETTING.get()
    if setting is not None:
        return setting
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


@contextlib.contextmanager
def configured(show: bool | None):
    """Within the block, progress is shown (True), hidden (False) or follows the terminal (None)."""
    token = _SETTING.set(show)
    try:
        yield
    finally:
        _SETTING.reset(token)


def bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool | None = None, **kwargs):
    """A tqdm bar on standard error (a disabled one, which prints nothing, when progress is off)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not is_enabled(enabled),
                file=sys.stderr, dynamic_ncols=True, **kwargs)


def iterate(iterable, desc: str = "", total: int | None = None, unit: str = "it", enabled: bool | None = None,
            **kwargs):
    """``iterable`` with a bar that advances once per item (``kwargs`` go to tqdm, e.g.
    leave=False for an inner loop whose bar should vanish when done)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with bar(total, desc, unit, enabled, **kwargs) as b:
        for item in iterable:
            yield item
            b.update(1)


@contextlib.contextmanager
def timed_steps():
    """Within the block, every :func:`status` call records how long each of its steps ran,
    whether its line is shown or not: the yielded list receives (description, step, seconds
    of wall time), a step lasting from its ``step(text)`` until the next one or the end of
    the call.  Where a compilation's time goes (``benchmarks/cnn_compile.py --steps``)."""
    found: list = []
    token = _STEP_TIMES.set(found)
    try:
        yield found
    finally:
        _STEP_TIMES.reset(token)


@contextlib.contextmanager
def status(desc: str, enabled: bool | None = None, delay: float = 0.0):
    """A one-line indicator for a single long call (no count to advance): shows ``desc`` and
    the elapsed time, refreshed every STATUS_REFRESH seconds by a helper thread, and marks
    it done when the block ends.  Yields ``step(text)``, which names the part of the call
    now running (shown after the elapsed time).  ``delay``: nothing is shown before the
    call has run that many seconds, so a call that is usually quick prints nothing.  Within
    a :func:`timed_steps` block the steps' times are recorded too."""
    record = _STEP_TIMES.get()
    with _status_line(desc, enabled, delay) as shown_step:
        if record is None:
            yield shown_step
            return
        current: list = []  # [text, start] of the step running

        def step(text):
            now = time.perf_counter()
            if current:
                record.append((desc, current[0], now - current[1]))
            current[:] = [text, now]
            shown_step(text)

        try:
            yield step
        finally:
            if current:
                record.append((desc, current[0], time.perf_counter() - current[1]))


@contextlib.contextmanager
def _status_line(desc: str, enabled: bool | None, delay: float):
    """``status``' line on standard error (nothing when progress is off); yields its step function."""
    show = is_enabled(enabled)
    if not show:
        yield status_step_ignored
        return
    with bar(1, desc, unit="", enabled=True, delay=delay, bar_format="{desc}: {elapsed}{postfix}") as b:
        stop = threading.Event()

        def shown() -> bool:
            return b.format_dict["elapsed"] >= delay

        def refresh():
            while not stop.wait(STATUS_REFRESH):
                if shown():
                    b.refresh()

        def step(text):  # at once when the line shows (after its delay), else at the next refresh
            b.set_postfix_str(text, refresh=shown())

        thread = threading.Thread(target=refresh, daemon=True)
        thread.start()

        try:
            yield step
        finally:
            stop.set()
            thread.join()
            b.set_postfix_str("done", refresh=False)
            b.update(1)


def status_step_ignored(text: str) -> None:
    """``status``' step function when nothing is shown (and a default for callers that take one)."""
