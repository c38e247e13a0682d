"""What sympy's solveset cannot solve, searched numerically (docs/DESIGN.md 2.2: existence of
the limits; used by ``existence``'s checks): the real zeros of a denominator at which f has a
pole that no Gaussian density can integrate, and a point where the argument of a log or of a
non-integer power is negative.

E[f(u)] under a Gaussian u does not exist when |f| >= c / |t - t0| near a real t0, or when f
is not real on a set of positive probability: the density is positive everywhere.
``existence`` finds the zeros of f's denominators, and the set where an argument is negative,
with sympy's solveset.  solveset answers a ConditionSet for most equations that mix
exponentials or trigonometric functions with polynomials (tanh(t) = t/3, sin(t) + t^2 = 1),
and those were not looked at: E[1/(tanh(u) - u/3)] came out as 0 (by parity),
E[1/(sin(u) + u^2 - 1)] as 0.614 and E[log(tanh(u) - u/3 + 1/2)] as -1.00 (the log's argument is
negative beyond u = 4.5, where no particle went), where none exists.

``numeric_poles(f, den, t)`` looks for poles where solveset cannot:

1. den on a grid of the real line (step 10^-3 on [-10, 10], then geometric out to 10^3);
   a sign change between two finite neighbours brackets a zero (scipy's brentq), and a
   local minimum of |den| that a bounded search takes below 10^-10 times the values around
   it is a zero of even order (exp(t) - 1 - t at 0);
2. each zero t0 refined in 250-digit arithmetic (mpmath's findroot), and f evaluated there at
   t0 +- 10^-6 and t0 +- 10^-18: a pole of order >= 1 keeps delta |f(t0 +- delta)| from
   falling (a simple pole keeps it constant), a removable zero (t / tanh(t)) or an integrable
   singularity |t - t0|^-p, p < 0.996, makes it fall by more than 10% over the 12 decades.

The zeros of |g|^p are sought as those of g (a sign change, where the V of |g| defeats the
search for minima).  The grid is in units of the leaf's standard deviation where that is known
and larger than 1.

``negative_point(arg, t)`` is a point of the same grid where arg is negative, checked in 250-digit
arithmetic there and 10^-6 to either side (so on an interval: with positive probability).

Zeros and negative values beyond |t| = 10^3 (in those units), and zero pairs closer than the grid step that do
not bring |den| below the threshold, are not found; a function found to have none is taken as
defined and integrable, as before.
"""
from __future__ import annotations

import warnings

import mpmath
import numpy as np
import sympy as sp
from scipy import optimize

from tpcompiler.ir.nonlinearities import MPMATH_FUNCTIONS, NUMPY_FUNCTIONS, almost_everywhere

#: The grid on which a denominator's zeros are sought (module docstring).
_INNER, _STEP, _OUTER = 10.0, 1e-3, 1e3
#: Digits of the arithmetic that refines a zero and evaluates f next to it: enough for a
#: zero of order up to 12 at 10^-18 from it, where terms of size 1 cancel (cosh t - 1 - t^2/2
#: at 10^-34 was 0 in 80 digits, and the pole taken as none: review).
_DIGITS = 250
#: The two distances from a zero at which f is evaluated, and the fall of delta |f| between
#: them that makes the zero integrable.
_NEAR, _NEARER, _FALL = mpmath.mpf("1e-6"), mpmath.mpf("1e-18"), 0.9
#: The two module lists of lambdify: double precision on the grid, multiprecision near a zero.
_FAST, _EXACT = [NUMPY_FUNCTIONS, "scipy", "numpy"], [MPMATH_FUNCTIONS, "mpmath"]
#: Half-width of the interval on which a negative point is checked.
_INTERVAL = mpmath.mpf("1e-6")
#: |den| at a refined local minimum, relative to |den| around it, below which it is a zero.
_EVEN_ZERO = 1e-10


def _grid(scale: float) -> np.ndarray:
    """The grid in units of ``scale`` (a leaf's standard deviation when it is known and > 1)."""
    inner = np.linspace(-_INNER, _INNER, int(round(2 * _INNER / _STEP)) + 1)
    outer = np.geomspace(_INNER, _OUTER, 2001)[1:]
    return scale * np.concatenate([-outer[::-1], inner, outer])


def _zero_set_core(den: sp.Expr) -> sp.Expr:
    """g with the zeros of den = |g|^p or g^p (p > 0): a zero of |g| is a sign change of g,
    which the grid finds where the V of |g| defeats the search for minima."""
    while True:
        if isinstance(den, sp.Abs):
            den = den.args[0]
        elif den.is_Pow and den.exp.is_number and den.exp.is_positive:
            den = den.base
        else:
            return den


def _numeric(expr: sp.Expr, t: sp.Symbol, modules):
    """expr as a function of t (a Dirac delta as 0, its value off its point)."""
    try:
        return sp.lambdify(t, almost_everywhere(expr), modules=modules)
    except Exception:  # noqa: BLE001 - a function the printer does not know
        return None


def _values(fn, ts: np.ndarray) -> np.ndarray:
    """fn on the grid, real; nan where it is not finite or not real."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            values = np.broadcast_to(np.asarray(fn(ts), dtype=complex), ts.shape)
        except Exception:  # noqa: BLE001 - not vectorisable: point by point
            values = np.array([_point(fn, x) for x in ts], dtype=complex)
    real = values.real.copy()
    real[~np.isfinite(values) | (np.abs(values.imag) > 1e-12 * np.maximum(1.0, np.abs(values.real)))] = np.nan
    return real


def _point(fn, x: float) -> complex:
    """fn(x), nan where it cannot be evaluated."""
    try:
        return complex(fn(x))
    except Exception:  # noqa: BLE001
        return complex("nan")


def _candidates(den, ts: np.ndarray) -> list[float]:
    """Approximate real zeros of den: brackets of a sign change, and deep minima of |den|."""
    d = _values(den, ts)
    found = []
    finite = np.isfinite(d)
    for i in np.flatnonzero(finite[:-1] & finite[1:] & (np.sign(d[:-1]) * np.sign(d[1:]) <= 0)):
        a, b = ts[i], ts[i + 1]
        if d[i] == 0:
            found.append(a)
        elif d[i + 1] != 0:
            try:
                found.append(optimize.brentq(lambda x: _point(den, x).real, a, b, xtol=1e-15, rtol=1e-15))
            except (ValueError, RuntimeError):
                continue
    size = np.abs(d)
    inside = finite[1:-1] & finite[:-2] & finite[2:]
    for i in np.flatnonzero(inside & (size[1:-1] < size[:-2]) & (size[1:-1] <= size[2:])) + 1:
        around = max(size[i - 1], size[i + 1])
        if around == 0:
            continue
        best = optimize.minimize_scalar(lambda x: abs(_point(den, x)), bounds=(ts[i - 1], ts[i + 1]),
                                        method="bounded", options={"xatol": 1e-14})
        if best.fun <= _EVEN_ZERO * around:
            found.append(float(best.x))
    return sorted(set(found))


def _refined(den, t0: float):
    """The zero of den near t0 in ``_DIGITS`` digits (mpmath's findroot), or None."""
    try:
        return mpmath.findroot(den, mpmath.mpf(t0), tol=mpmath.mpf(10) ** (-_DIGITS + 10), maxsteps=400, verify=False)
    except Exception:  # noqa: BLE001 - not evaluable there
        return None


def _is_pole(f, t0) -> bool:
    """delta |f(t0 + s delta)| does not fall by ``_FALL`` from ``_NEAR`` to ``_NEARER`` on one side s."""
    for s in (1, -1):
        try:
            near = _NEAR * abs(f(t0 + s * _NEAR))
            nearer = _NEARER * abs(f(t0 + s * _NEARER))
        except ZeroDivisionError:
            return True  # (a denominator exactly 0 next to t0, in 250 digits)
        except Exception:  # noqa: BLE001 - not evaluable there
            continue
        if not (mpmath.isfinite(near) and mpmath.isfinite(nearer)):
            return True  # (f is infinite next to t0)
        if near > 0 and nearer >= _FALL * near:
            return True
    return False


def jump_point(f: sp.Expr, switches: list, t: sp.Symbol, draws: int = 3, seed: int = 0) -> float | None:
    """A point where f jumps in t, or None: a zero of one of the ``switches`` (expressions whose
    zeros are where f may jump) on the inner grid, at which f's values at -+1e-6 and -+1e-8
    differ by about the same amount, more than 1e-3 of their size (a jump; across a pole the
    difference grows, across a kink it falls), with the other free symbols drawn N(0, 1)
    ``draws`` times."""
    others = sorted((f.free_symbols | set().union(*(g.free_symbols for g in switches))) - {t}, key=str)
    rng = np.random.default_rng(seed)
    ts = np.linspace(-_INNER, _INNER, 4001)
    for _ in range(draws):
        at = {x: sp.Float(v) for x, v in zip(others, rng.standard_normal(len(others)))}
        fn = _numeric(f.xreplace(at), t, _FAST)
        for g in switches:
            gn = _numeric(g.xreplace(at), t, _FAST)
            if fn is None or gn is None:
                continue
            for a in _candidates(gn, ts):
                a = 0.0 if abs(a) < 1e-9 else a
                gaps = [abs(_point(fn, a + d) - _point(fn, a - d)) for d in (1e-6, 1e-8)]
                size = abs(_point(fn, a + 1e-6)) + abs(_point(fn, a - 1e-6))
                if np.all(np.isfinite(gaps)) and min(gaps) > 1e-3 * (1.0 + size) and gaps[1] < 3.0 * gaps[0]:
                    return float(a)
    return None


def numeric_poles(f: sp.Expr, den: sp.Expr, t: sp.Symbol, scale: float = 1.0) -> list[float]:
    """Real t0 (|t0| <= 10^3 ``scale``) where den, a denominator of f, vanishes and |f| grows at
    least like 1/|t - t0| (module docstring), the nearest to 0 first; [] when none is found or
    the functions cannot be evaluated numerically.  ``f`` and ``den`` are functions of the real
    symbol ``t`` alone."""
    core = _zero_set_core(den)
    core_fast, core_exact, f_exact = _numeric(core, t, _FAST), _numeric(core, t, _EXACT), _numeric(f, t, _EXACT)
    if core_fast is None or core_exact is None or f_exact is None:
        return []
    poles = []
    with mpmath.workdps(_DIGITS):
        for t0 in _candidates(core_fast, _grid(scale)):
            root = _refined(core_exact, t0)
            if root is None or not mpmath.isfinite(root) or abs(mpmath.im(root)) > 1e-30 \
                    or abs(root - t0) > 1e-3 * max(1.0, abs(t0)):
                continue
            if _is_pole(f_exact, mpmath.re(root)):
                x = float(mpmath.re(root))
                x = 0.0 if abs(x) < 1e-20 else x  # (exp(t) - 1 - t's zero refined to -2.6e-44)
                if not poles or abs(x - poles[-1]) > 1e-9 * max(1.0, abs(x)):
                    poles.append(x)
    return sorted(poles, key=abs)


def negative_point(arg: sp.Expr, t: sp.Symbol, scale: float = 1.0) -> float | None:
    """A real t0 (|t0| <= 10^3 ``scale``) with arg < 0 on [t0 - 10^-6, t0 + 10^-6] in 250-digit
    arithmetic (the grid's most negative point), or None (module docstring).  ``arg`` a
    function of the real symbol ``t`` alone."""
    fast, exact = _numeric(arg, t, _FAST), _numeric(arg, t, _EXACT)
    if fast is None or exact is None:
        return None
    ts = _grid(scale)
    values = _values(fast, ts)
    if not np.any(values < 0):
        return None
    t0 = float(ts[np.nanargmin(values)])
    with mpmath.workdps(_DIGITS):
        try:
            inside = [mpmath.mpmathify(exact(mpmath.mpf(t0) + d)) for d in (-_INTERVAL, 0, _INTERVAL)]
        except Exception:  # noqa: BLE001 - not evaluable there
            return None
        if all(mpmath.im(v) == 0 and mpmath.re(v) < 0 for v in inside):
            return t0
    return None


def pole_at(f: sp.Expr, t: sp.Symbol, t0: sp.Expr) -> bool:
    """Whether |f| grows at least like 1/|t - t0| at the real number t0 (exact, e.g. a root in
    radicals), by the test of ``numeric_poles`` in 250-digit arithmetic (for a zero whose limit
    sympy cannot take); False where f cannot be evaluated."""
    f_exact = _numeric(f, t, _EXACT)
    if f_exact is None:
        return False
    with mpmath.workdps(_DIGITS):
        try:
            point = mpmath.mpmathify(sp.N(t0, _DIGITS))
        except Exception:  # noqa: BLE001 - not a number
            return False
        return mpmath.im(point) == 0 and _is_pole(f_exact, mpmath.re(point))
