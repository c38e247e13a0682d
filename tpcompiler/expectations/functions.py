"""One-variable functions: the inputs of the expectations and their structure.

A function phi is normalised to a sympy ``Lambda`` (``as_lambda``), and its structure decides
how an expectation of it is computed:

* ``has_kink``: phi has a kink or a jump (relu, step, abs, max, Piecewise, ...), so
  quadrature splits the line there (the exp-exp rule of ``quadrature``);
* ``parity``: phi(-x) = phi(x) (EVEN) or -phi(x) (ODD), from the expression's structure and
  the nonlinearities' parity table;
* ``reflection``: psi(-v) = eps psi(v) + c0 + c1 v + c2 v^2, which lets quadrature compute
  G(-x) from G(x) (G the inner integral);
* ``as_poly``: phi as a polynomial, for the one-dimensional rule E[P(u) g(v)] =
  E_v[E[P(u) | v] g(v)].
"""
from __future__ import annotations

import mpmath
import numpy as np
import sympy as sp

from tpcompiler.ir import nonlinearities as nl

EVEN, ODD, NEITHER = nl.EVEN, nl.ODD, nl.NEITHER

def as_lambda(f) -> sp.Lambda:
    """Normalise a one-variable function to a sympy ``Lambda``.

    Accepts a ``Lambda``, a pair ``(expr, symbol)``, an expression with at most one free
    symbol, a sympy function class (``sp.tanh``, ``nonlinearities.relu``), a built-in name
    (``"tanh"``), a number (a constant function) or a Python callable returning a sympy
    expression of a sympy symbol.
    """
    x = sp.Dummy("x", real=True)
    if isinstance(f, sp.Lambda):
        if len(f.variables) != 1:
            raise ValueError(f"expected a one-variable function, got {f}")
        expr, var = f.expr, f.variables[0]
    elif isinstance(f, tuple) and len(f) == 2:
        expr, var = sp.sympify(f[0]), f[1]
        if not isinstance(var, sp.Symbol):
            raise ValueError(f"expected (expr, symbol), got {f!r}")
    elif isinstance(f, str):
        g = nl.builtin(f)
        expr, var = sp.sympify(g(x)), x
    elif isinstance(f, (int, float, sp.Number)):
        expr, var = sp.sympify(f), x
    elif isinstance(f, sp.Basic) and not callable(f):
        syms = f.free_symbols
        if len(syms) > 1:
            raise ValueError(
                f"the expression {f} has several free symbols: give (expr, symbol) or a Lambda"
            )
        expr, var = f, (syms.pop() if syms else x)
    elif callable(f):
        expr, var = sp.sympify(f(x)), x
    else:
        raise TypeError(f"cannot interpret {f!r} as a one-variable function")
    expr = sp.sympify(expr).xreplace({var: x})
    extra = expr.free_symbols - {x}
    if extra:
        raise ValueError(
            f"phi must depend on its argument only; {expr} also has free symbols {extra}"
        )
    return sp.Lambda(x, expr)


def canonical(lam: sp.Lambda) -> str:
    """A key of the function independent of the name of its variable."""
    return sp.srepr(lam.expr.xreplace({lam.variables[0]: sp.Symbol("x", real=True)}))


_KINK_FUNCS = (nl.relu, nl.step, sp.Heaviside, sp.Abs, sp.Max, sp.Min, sp.sign,
               sp.Piecewise, sp.floor, sp.ceiling)

def has_kink(expr) -> bool:
    """Whether expr contains a function with a kink or a jump, or is not a number at 0
    (log(x^2), sin(x)/x as sympy writes it): the rules split at 0 have no node there, the
    smooth ones have one (log(x^2) integrated to -inf, sin(x)^2/x^2 divided by zero)."""
    if any(expr.atoms(f) for f in _KINK_FUNCS):
        return True
    variables = expr.free_symbols
    if len(variables) != 1:
        return False
    try:
        at_zero = expr.subs(next(iter(variables)), 0)
    except (ArithmeticError, TypeError, ValueError):
        return True
    return bool(at_zero.has(sp.zoo, sp.oo, -sp.oo, sp.nan))


def kink_away_from_zero(lam: sp.Lambda):
    """A function call of lam with a kink or a jump that may lie elsewhere than at 0, or None.
    The quadratures split their rules at 0 only (the outer line at 0, the inner one where its
    argument is 0): relu(x + 1/2) integrated with a smooth rule over its kink at -1/2 erred by
    3e-2 in an NTK, with an error estimate that did not see it.  A kink is at 0 when the
    expression that changes sign there (a relu's argument, the difference of a Max's arguments,
    a Piecewise condition's sides) is c x^k; floor and ceiling jump at every integer."""
    x = lam.variables[0]
    for f in lam.expr.atoms(*_KINK_FUNCS):
        if isinstance(f, (sp.floor, sp.ceiling)):
            return f
        if not all(_changes_sign_only_at_zero(sp.expand(c), x) for c in nl.switching_expressions(f)):
            return f
    return None


def _changes_sign_only_at_zero(e: sp.Expr, x: sp.Symbol) -> bool:
    """Whether e (a function of x) changes sign nowhere but at 0, so that a function switching
    where e changes sign has its kink or jump at 0 or nowhere: c x^k (c a nonzero number, k >
    0), or anything that does not read x; else one sign on each half line at 4000 points out
    to 30, where the rules reach.  That sign may be 0 on a whole half line (relu(x): a step of
    it is flat there) and the same on both (sigmoid(x): a relu of it never switches); tanh(x),
    x + x^3, relu(x), step(x) and gelu(x) pass, x + 1/2 and sin(x) do not.  A value that is 0
    in float64 is evaluated again in multiprecision, whose exponents do not underflow: gelu(x)
    is 0 in float64 below -21, and negative."""
    if not e.has(x):
        return True
    c, rest = e.as_coeff_Mul()
    if rest == x:
        return c != 0
    base, exp = rest.as_base_exp()
    if base == x and exp.is_number and exp > 0 and c != 0:
        return True
    try:
        f = numpy_function(sp.Lambda(x, e))
        v = np.geomspace(1e-6, 30.0, 2000)
        right, left = np.sign(f(v)), np.sign(f(-v))
        if not (_one_sign(right) and _one_sign(left)):
            exact = sp.lambdify(x, e, modules=[nl.MPMATH_FUNCTIONS, "mpmath"])
            for signs, side in ((right, v), (left, -v)):
                for k in np.flatnonzero(signs == 0):
                    signs[k] = _exact_sign(exact, float(side[k]))
    except Exception:  # noqa: BLE001 - not evaluable: not shown to be at 0
        return False
    return _one_sign(right) and _one_sign(left)


#: Working precisions (decimal digits) at which ``_exact_sign`` evaluates a float64 zero again.
#: A zero that survives the last is taken as a zero: 0.5 erf(x) + 0.5 at x = -30, the rules'
#: reach, is 1e-393, which cancels to 0 below 400 digits.
EXACT_SIGN_DIGITS = (30, 450)


def _exact_sign(exact, t: float) -> int:
    """The sign of ``exact(t)`` (an mpmath function) at increasing working precision: a value
    0 in float64 may be an underflow (gelu(x) below -21) or a cancellation (0.5 erf(x) + 0.5
    below -6, Sigmoid_like's output) that more digits resolve."""
    value = 0
    for digits in EXACT_SIGN_DIGITS:
        with mpmath.workdps(digits):
            value = int(mpmath.sign(exact(t)))
        if value:
            break
    return value


def _one_sign(signs: np.ndarray) -> bool:
    return bool(np.all(signs == signs[0]))


def parity(expr, x) -> int:
    """Structural parity of expr in x (EVEN, ODD or NEITHER)."""
    if not expr.has(x):
        return EVEN
    if expr == x:
        return ODD
    if expr.is_Add:
        ps = {parity(a, x) for a in expr.args}
        return ps.pop() if len(ps) == 1 and NEITHER not in ps else NEITHER
    if expr.is_Mul:
        out = EVEN
        for a in expr.args:
            p = parity(a, x)
            if p == NEITHER:
                return NEITHER
            out *= p
        return out
    if expr.is_Pow:
        base, ex = expr.args
        if ex.has(x):
            return EVEN if parity(ex, x) == EVEN and not base.has(x) else NEITHER
        pb = parity(base, x)
        if pb == EVEN:
            return EVEN
        if pb == ODD and ex.is_Integer:
            return EVEN if int(ex) % 2 == 0 else ODD
        return NEITHER
    if isinstance(expr, sp.Function) and len(expr.args) == 1:
        pa = parity(expr.args[0], x)
        if pa == EVEN:
            return EVEN
        if pa == ODD:
            return nl.parity_of_function(expr.func)
    return NEITHER


def numpy_function(lam: sp.Lambda):
    """phi as a numpy function of an array (floating-point warnings silenced: probing and
    error scales evaluate phi far out, where it may overflow)."""
    f = sp.lambdify(lam.variables[0], lam.expr, modules=[nl.NUMPY_FUNCTIONS, "numpy", "scipy"])

    def g(x):
        with np.errstate(all="ignore"):
            return np.broadcast_to(np.asarray(f(x), dtype=float), np.shape(x))

    return g


def reflection(lam: sp.Lambda):
    """(eps, c0, c1, c2) with psi(-v) = eps psi(v) + c0 + c1 v + c2 v^2 for every real v, or None.

    Exact parity comes from the expression's structure (nonlinearities' parity table); a
    parity up to a quadratic polynomial (sigmoid: eps = -1, c0 = 1; softplus and gelu:
    eps = 1, c1 = -1; gelu': eps = -1, c0 = 1) is recognised numerically, to 1e-13, at
    points of both signs: the quadrature applies it on the whole line (G(-m) from G(m),
    quadrature.py), and an identity of one half line only (tanh + relu: psi(-v) = -psi(v) + v
    for v >= 0, -psi(v) - v for v < 0) made E[psi(u) psi(v)] wrong by a third.
    """
    x = lam.variables[0]
    p = parity(lam.expr, x)
    if p == EVEN:
        return (1.0, 0.0, 0.0, 0.0)
    if p == ODD:
        return (-1.0, 0.0, 0.0, 0.0)
    if lam.expr.has(sp.DiracDelta):
        return None
    try:
        f = numpy_function(lam)
        v = np.concatenate([np.linspace(-12.0, 12.0, 193),
                            np.random.default_rng(7).uniform(-30.0, 30.0, 128)])
        fp, fm = f(v), f(-v)
        if not (np.all(np.isfinite(fp)) and np.all(np.isfinite(fm))):
            return None
        tol = 1e-13 * (1.0 + np.abs(fp) + np.abs(fm))
        V = np.stack([np.ones_like(v), v, v * v], axis=1)
        for eps in (1.0, -1.0):
            r = fm - eps * fp
            coef = np.linalg.lstsq(V, r, rcond=None)[0]
            coef = np.array([_snap(c) for c in coef])
            if np.all(np.abs(V @ coef - r) <= tol):
                return (eps, float(coef[0]), float(coef[1]), float(coef[2]))
    except Exception:  # pragma: no cover - lambdify failures just disable the shortcut
        pass
    return None


def _snap(c: float) -> float:
    """Round a fitted coefficient to a nearby simple value (integers, halves) when close."""
    for d in (1.0, 2.0, 4.0):
        if abs(c * d - round(c * d)) < 1e-9:
            return round(c * d) / d
    return float(c)


def as_poly(lam: sp.Lambda):
    """lam as a sympy Poly in its variable with numeric coefficients, or None."""
    x = lam.variables[0]
    try:
        poly = sp.Poly(sp.expand(lam.expr), x)
    except sp.PolynomialError:
        return None
    if any(c.free_symbols for c in poly.all_coeffs()):
        return None
    return poly
