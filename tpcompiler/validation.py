"""One validation layer for the numbers and arrays that enter tpcompiler, shared by the Python
API (``tp.compile(...).limit``, ``tp.simulate``, ``tp.SGD``, ``tp.train``, ...) and the ``tpc``
command line, so that both refuse the same inputs with the same one-line message.

Every check returns the cleaned value or raises :class:`ArgumentError` (a ``ProgramError``, so
a ``ValueError``, and also a ``TypeError``, like ``DSLError``) whose message names the argument,
says what is wrong and what is expected, e.g. ``"lr: expected a positive finite number, got
nan"``.  The API names its parameters (``"lr"``); ``tpc`` runs the same checks as argparse
types (``cli._count``, ``cli._real``), so its messages name the option (``"argument --lr: ..."``).

Counts (widths, particles, steps, seeds, ...) accept Python and numpy integers and integral
floats such as ``1e4``; booleans, fractions, NaN and infinities are refused.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from tpcompiler.ir.graph import ProgramError


class ArgumentError(ProgramError, TypeError):
    """An argument of the API or the command line is invalid; the message names it."""


#: Largest magnitude accepted for input data entries.  Kernels and limits square and multiply
#: such values (|x|^2, then products of two such norms); beyond this, float64 overflows.
MAX_DATA_MAGNITUDE = 1e50
#: Smallest largest-magnitude entry accepted for a row of limit or kernel inputs that is not
#: all zero: below it the row's squared norm (|x|^2 / d) leaves float64's normal range, so the
#: first layer's variance is subnormal or 0 and the kernels take the row for 0 (a relu kernel at
#: 1e-300 was exactly 0, and predictions from it 0).  Rows between this and ~1e-72, where the
#: product of two such variances underflows, are refused by the kernels' own finiteness check.
MIN_ROW_MAGNITUDE = 1e-150


def _fail(name: str | None, problem: str):
    raise ArgumentError(f"{name}: {problem}" if name else problem)


def _show(value) -> str:
    """A value as it appears in a message: its repr, shortened to keep the message one line."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def count(value, name: str | None, minimum: int = 0, maximum: int | None = None, why: str = "") -> int:
    """``value`` as an int in [minimum, maximum]; integral floats (1e4) accepted.  ``why``
    explains the maximum in its message."""
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    if maximum is not None:
        what = f"an integer in {minimum}..{maximum}"
    if isinstance(value, (bool, np.bool_)):
        _fail(name, f"expected {what}, got the boolean {value!r}")
    if isinstance(value, numbers.Integral):
        out = int(value)
    elif isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v) or not v.is_integer():
            _fail(name, f"expected {what}, got {_show(value)}")
        out = int(v)
    else:
        _fail(name, f"expected {what}, got {_show(value)}")
    if out < minimum:
        _fail(name, f"expected {what}, got {out}")
    if maximum is not None and out > maximum:
        _fail(name, f"{out} is above the limit {maximum}{' (' + why + ')' if why else ''}")
    return out


def optional_count(value, name: str | None, minimum: int = 0, maximum: int | None = None) -> int | None:
    return None if value is None else count(value, name, minimum, maximum)


def number(value, name: str | None, *, positive: bool = False, nonnegative: bool = False,
           maximum: float | None = None) -> float:
    """``value`` as a finite float (optionally > 0, >= 0, <= maximum)."""
    what = "a positive finite number" if positive else ("a non-negative finite number" if nonnegative else "a finite number")
    if isinstance(value, (bool, np.bool_)):
        _fail(name, f"expected {what}, got the boolean {value!r}")
    if isinstance(value, (numbers.Complex, np.complexfloating)) and not isinstance(value, numbers.Real):
        _fail(name, f"expected {what}, got the complex number {value!r}")
    if not isinstance(value, numbers.Real):
        _fail(name, f"expected {what}, got {_show(value)}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0) or (nonnegative and v < 0):
        _fail(name, f"expected {what}, got {_show(v)}")
    if maximum is not None and v > maximum:
        _fail(name, f"expected {what} at most {maximum:g}, got {v:g}")
    return v


def flag(value, name: str | None) -> bool:
    """A yes/no option: True or False (numpy's bools too).  A string such as 'no' is refused,
    not read as True (tp.compile(p, drop_zdot='no') ran the ablation)."""
    if not isinstance(value, (bool, np.bool_)):
        _fail(name, f"expected True or False, got {_show(value)}")
    return bool(value)


def choice(value, name: str | None, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        _fail(name, f"expected one of {', '.join(map(str, choices))}, got {_show(value)}")
    return value


def array(value, name: str | None, *, ndim=None, min_rows: int = 0, finite: bool = True,
          max_abs: float | None = MAX_DATA_MAGNITUDE) -> np.ndarray:
    """``value`` as a float64 array of real, finite numbers (``ndim`` an int or a tuple of
    allowed ranks; ``max_abs`` the largest magnitude accepted; ``finite=False`` leaves NaN
    and infinities to a later check with a more specific message)."""
    try:
        arr = np.asarray(value)
    except Exception:  # e.g. ragged lists
        _fail(name, f"expected an array of numbers, got {_show(value)}")
    if arr.dtype == object:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            _fail(name, f"expected an array of real numbers, got an array of Python objects ({_show(value)})")
    if np.iscomplexobj(arr):
        _fail(name, f"holds complex numbers (dtype {arr.dtype}); pass real data (e.g. x.real, if the imaginary part is meaningless)")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        _fail(name, f"does not hold numbers (dtype {arr.dtype})")
    arr = arr.astype(np.float64, copy=False)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            shape = {1: "a vector (N,)", 2: "an N x d matrix"}
            _fail(name, f"expected {' or '.join(shape.get(k, f'{k}-d array') for k in allowed)}, got shape {arr.shape}")
    if arr.ndim and arr.shape[0] < min_rows:
        _fail(name, f"needs at least {min_rows} row{'s' if min_rows > 1 else ''}, got shape {arr.shape}")
    if finite and arr.size and not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        _fail(name, f"has NaN or infinite entries (first at index {tuple(int(i) for i in bad)}); remove or impute them")
    if max_abs is not None and arr.size:
        magnitudes = np.abs(arr[np.isfinite(arr)])
        big = float(magnitudes.max()) if magnitudes.size else 0.0
        if big > max_abs:
            _fail(name, f"has entries as large as {big:.3g}; values above {max_abs:.0e} overflow float64 in "
                        "the kernels (they are squared and multiplied): rescale the data")
    return arr


def tiny_row(X: np.ndarray, what: str) -> None:
    """Refuse a row of N x d inputs ``X`` that is not all zero but has no entry of magnitude
    MIN_ROW_MAGNITUDE or more (an all-zero row is an input like any other)."""
    if X.ndim != 2 or not X.size:
        return
    largest = np.max(np.abs(X), axis=1)
    bad = np.flatnonzero((largest > 0) & (largest < MIN_ROW_MAGNITUDE))
    if bad.size:
        i = int(bad[0])
        raise ProgramError(f"{what}: row {i} is not zero but has no entry of magnitude {MIN_ROW_MAGNITUDE:.0e} or "
                           f"more (largest {largest[i]:.3g}); its squared norm underflows float64, so the limit would "
                           "take it for 0: rescale the data")


def optional_array(value, name: str | None, **kwargs) -> np.ndarray | None:
    return None if value is None else array(value, name, **kwargs)


def binary_targets(Y: np.ndarray, name: str | None) -> None:
    """Logistic-loss targets must be labels 0 or 1."""
    bad = Y[(Y != 0) & (Y != 1)]
    if bad.size:
        _fail(name, f"the logistic loss needs labels 0 or 1, got {bad[0]:g}; use mse for real-valued targets")


def finite_results(results: dict, what: str, hint: str) -> None:
    """Outputs must not silently carry NaN or infinities: name the first one that does."""
    for key, value in results.items():
        arr = np.asarray(value[0] if isinstance(value, tuple) else value, dtype=np.float64)
        if arr.size and not np.all(np.isfinite(arr)):
            raise ProgramError(f"{what} {key!r} is not finite (NaN or overflow); {hint}")
