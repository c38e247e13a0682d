"""Bivariate Gaussian expectations E[phi(u) psi(v)]: the numeric core of the kernel backend.

For (u, v) ~ N(0, [[k11, k12], [k12, k22]]) and one-variable sympy expressions phi, psi this
module builds, once per pair of functions, a scalar Numba function f(k11, k12, k22) and a
parallel array evaluator (docs/DESIGN.md 2.7, strategy 2).  The strategy is chosen from the
structure of the sympy expressions:

1. **Closed forms.**  phi and psi are expanded into linear combinations of *atoms* a(c x):
   1, x^p, relu, step, erf, exp(-x^2) (erf' up to a constant), sin, cos, exp and DiracDelta,
   each with a scale c.  E[phi psi] is bilinear, so it is a sum of atom-pair expectations,
   and each of those is found by a small set of exact rules (scales and signs become a change
   of covariance):  the arc-cosine formulas (relu*relu, step*step, relu*step), the erf
   arcsin formula, Gaussian tilting for exp(-v^2) factors (erf'*erf' and every atom times a
   Gaussian), the Dirac delta as a conditional expectation, characteristic functions for
   sin/cos/exp, parity (odd times even vanishes; relu = (x+|x|)/2, step = (1+sign)/2) and
   Stein's lemma E[u^p g(v)] = (p-1) k11 E[u^(p-2) g(v)] + k12 E[u^(p-1) g'(v)], which also
   gives Isserlis' theorem for monomials.  The result is a sympy expression in k11, k12, k22,
   printed with a sympy code printer.

2. **Polynomial times anything** (no closed form for the other factor): E[u^p psi(v)] =
   E_v[E[u^p | v] psi(v)] is a *one-dimensional* quadrature (the Stein/regression route).

3. **Quadrature** for everything else, in the conditional decomposition
       u = sqrt(k11) x,  v = a x + b z,  a = sqrt(k22) rho,  b = sqrt(k22 (1 - rho^2)),
   E = E_x[phi(sqrt(k11) x) G(x)],  G(x) = E_z[psi(a x + b z)],  x, z iid N(0, 1).
   Gauss-Hermite converges slowly for tanh, sigmoid, softplus, gelu at large variance (their
   features sit within 1/sqrt(k) of the origin in standard units; for E[tanh tanh] at k = 10,
   rho = 0.7, GH with 101 x 101 points still errs by 7e-5), so each level uses, per call, the
   cheapest of these rules, all driven by one step size h:
     * "sinh": trapezoid in t after x = c sinh(t), c = C / max(sd, 1); nodes cluster at the
       function's feature (the origin, and for the inner integral the point z* = -a x / b
       where psi's argument vanishes, clipped to [-3, 3]) and thin out geometrically in the
       Gaussian tails, so the node count grows only like log(k);
     * Gauss-Hermite with about 1.6/h + (1.5 sd / h)^2 nodes where the integrand is smooth
       on the Gaussian's own scale (small variance, or an inner integral at high correlation),
       used when it needs fewer than twice the sinh rule's nodes (it needs no exp per node);
     * "uniform" (a separate candidate rule family): a truncated trapezoid with spacing
       h / (1 + sd/8), best for oscillating entire functions (sin, cos);
     * "kink": for functions with kinks or jumps (relu, step, abs, max, ...), the line is
       split at the kink and each half is mapped by x = c exp(s - exp(-s)) (double-exponential
       clustering at the kink, so the trapezoid rule keeps its exponential convergence).
   The rules converge exponentially in 1/h.  At construction the rule family and h are chosen
   by *probing*: the compiled rule is evaluated on 450 covariances (all pairs of variances
   from 0.04 to ``kmax``, correlations 0, +-0.3 ... +-0.999, 0.999999 and exactly +-1) at
   decreasing h, the error of each h is estimated against the rule with 0.66 h, and the
   cheapest rule whose estimated error is below rtol / 4 wins.  If psi(-v) = +-psi(v) + (a
   quadratic), as for tanh, sigmoid, softplus, gelu and their derivatives, G(-x) follows from
   G(x) and half of the inner integrals are skipped.

At large variance an inner feature can sit far out in the Gaussian (z* = -a x / b beyond
+-3, width 1/b): the sinh rule, centred at most 3 standard deviations out, no longer resolves
it, so for b > 4 such inner integrals use the split exp-exp rule of kinks instead (E[tanh
tanh] at variance 1e4 erred by 3e-7 before).  With it, and with closed forms written without
cancellation (through the determinant k11 k22 - k12^2, never as a difference of large terms;
see ``_det``), the quadrature stays within rtol from variance 1e-8 to 1e12 and any
correlation (tests/test_kernel_scales.py checks it against an independent QUADPACK
reference).  Inputs are float64 covariances: near correlation +-1 an expectation can be
ill-conditioned in them (E[step step] has a square-root singularity at rho = 1; E[erf'
erf'] at variance k moves by ~k eps per ulp of k12), and the result is then exact for a
covariance within a few ulps of the given one, which is all float64 inputs determine.

Errors are measured relative to max(|E|, 1e-2 S), S = sqrt(E[phi(u)^2] E[psi(v)^2]) (the
Cauchy-Schwarz scale of the expectation), so that values that vanish by symmetry do not make
relative errors meaningless.  ``PairExpectation.error_estimate`` is the largest estimated
error over the probe set; ``estimate_error(k11, k12, k22)`` re-estimates it on a sample of the
caller's own inputs.

Degenerate inputs: k11 == 0 (or k22 == 0) means u == 0 exactly, so E = phi(0) E[psi(v)] with
the pointwise value phi(0) (step(0) = 0).  Negative variances give NaN.

Compiled functions are cached in-process by the hash of their generated source, and on disk
(the generated modules are written to a cache directory, ``TPCOMPILER_CACHE_DIR`` or
``~/.cache/tpcompiler``, and compiled with numba ``cache=True``), together with the rule that
probing selected, so a second run pays neither JIT nor probing time.
"""
from __future__ import annotations

import json
import math
import os
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from tpcompiler.backends import codegen
from tpcompiler.ir import nonlinearities as nl

__all__ = [
    "PairExpectation",
    "Expectation1D",
    "pair_expectation",
    "expectation",
    "closed_form_pair",
    "closed_form_1d",
    "as_lambda",
    "K11",
    "K12",
    "K22",
]

#: Symbols of the covariance entries in closed-form expressions.
K11, K12, K22 = sp.symbols("k11 k12 k22", real=True)
_K = sp.Symbol("k", real=True)

_GEN_VERSION = "g2-v5"  # bump when the generated code or the probing changes

# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Atoms and exact rules
# ---------------------------------------------------------------------------------------
ONE, POW, RELU, STEP, ERF, GAUSS, SIN, COS, EXP, DELTA = (
    "one", "pow", "relu", "step", "erf", "gauss", "sin", "cos", "exp", "delta",
)
_EVEN, _ODD, _NEITHER = nl.EVEN, nl.ODD, nl.NEITHER


@dataclass(frozen=True)
class Atom:
    """a(c x) for a unit atom ``kind``; POW carries its power p (and c = 1)."""

    kind: str
    c: sp.Expr = sp.S.One
    p: int = 0

    def parity(self) -> int:
        if self.kind == POW:
            return _EVEN if self.p % 2 == 0 else _ODD
        return {ONE: _EVEN, GAUSS: _EVEN, COS: _EVEN, DELTA: _EVEN, ERF: _ODD, SIN: _ODD}.get(
            self.kind, _NEITHER
        )


_ATOM_ONE = Atom(ONE)


def _linear_arg(arg, x):
    """(a, b) with arg = a x + b, or None."""
    if not arg.has(x):
        return None
    try:
        poly = sp.Poly(arg, x)
    except sp.PolynomialError:
        return None
    if poly.degree() != 1:
        return None
    a, b = poly.all_coeffs()
    if a.free_symbols or b.free_symbols:
        return None
    return a, (sp.S.Zero if b.is_zero else b)


def _atoms_of_factor(f, x):
    """Express one x-dependent factor as a list of (coef, Atom), or None."""
    if f == x:
        return [(sp.S.One, Atom(POW, p=1))]
    if f.is_Pow and f.base == x and f.exp.is_Integer and f.exp > 0:
        return [(sp.S.One, Atom(POW, p=int(f.exp)))]
    if isinstance(f, sp.exp):
        arg = sp.expand(f.args[0])
        try:
            poly = sp.Poly(arg, x)
        except sp.PolynomialError:
            return None
        if any(c.free_symbols for c in poly.all_coeffs()) or poly.degree() > 2:
            return None
        coeffs = [sp.S.Zero] * (3 - len(poly.all_coeffs())) + list(poly.all_coeffs())
        c2, c1, c0 = coeffs
        if not c2.is_zero:
            if not c1.is_zero or not (c2 < 0):
                return None
            return [(sp.exp(c0), Atom(GAUSS, sp.sqrt(-c2)))]
        if not c1.is_zero:
            return [(sp.exp(c0), Atom(EXP, c1))]
        return None
    if isinstance(f, (sp.sinh, sp.cosh)):
        lin = _linear_arg(f.args[0], x)
        if lin is None:
            return None
        a, b = lin
        sgn = -1 if isinstance(f, sp.sinh) else 1
        return [(sp.exp(b) / 2, Atom(EXP, a)), (sgn * sp.exp(-b) / 2, Atom(EXP, -a))]
    if isinstance(f, (sp.sin, sp.cos)):
        lin = _linear_arg(f.args[0], x)
        if lin is None:
            return None
        a, b = lin
        if isinstance(f, sp.sin):  # sin(ax+b) = cos b sin(ax) + sin b cos(ax)
            out = [(sp.cos(b), Atom(SIN, a)), (sp.sin(b), Atom(COS, a))]
        else:  # cos(ax+b) = cos b cos(ax) - sin b sin(ax)
            out = [(sp.cos(b), Atom(COS, a)), (-sp.sin(b), Atom(SIN, a))]
        return [(c, t) for c, t in out if not c.is_zero]
    if isinstance(f, (sp.Max, sp.Min)):
        # max(c1 x, c2 x) = min(c) x + (max(c) - min(c)) relu(x) (leaky relu); min likewise
        if len(f.args) != 2:
            return None
        slopes = []
        for arg in f.args:
            if arg.is_zero:
                slopes.append(sp.S.Zero)
                continue
            lin = _linear_arg(arg, x)
            if lin is None or not lin[1].is_zero:
                return None
            slopes.append(lin[0])
        lo, hi = sorted(slopes, key=float)
        if isinstance(f, sp.Max):
            out = [(lo, Atom(POW, p=1)), (hi - lo, Atom(RELU))]
        else:
            out = [(hi, Atom(POW, p=1)), (lo - hi, Atom(RELU))]
        return [(c, t) for c, t in out if not c.is_zero]
    kinds = {nl.relu: RELU, nl.step: STEP, sp.Heaviside: STEP, sp.erf: ERF,
             sp.DiracDelta: DELTA}
    if f.func in kinds or isinstance(f, (sp.erfc, sp.sign)):
        if isinstance(f, sp.DiracDelta) and len(f.args) != 1:
            return None  # derivatives of the delta
        lin = _linear_arg(f.args[0], x)
        if lin is None or not lin[1].is_zero:
            return None
        a = lin[0]
        if isinstance(f, sp.erfc):
            return [(sp.S.One, _ATOM_ONE), (-sp.S.One, Atom(ERF, a))]
        if isinstance(f, sp.sign):
            return [(2 * sp.S.One, Atom(STEP, a)), (-sp.S.One, _ATOM_ONE)]
        return [(sp.S.One, Atom(kinds[f.func], a))]
    return None


def decompose(expr, x):
    """Write expr(x) as a list of (coefficient, Atom); None when it is not a combination of atoms."""
    expr = sp.expand(sp.sympify(expr), power_base=False, log=False, multinomial=True)
    terms = {}
    for term in sp.Add.make_args(expr):
        coef, factors = sp.S.One, []
        for f in sp.Mul.make_args(term):
            if f.has(x):
                factors.append(f)
            else:
                coef *= f
        if not factors:
            parts = [(sp.S.One, _ATOM_ONE)]
        elif len(factors) == 1:
            parts = _atoms_of_factor(factors[0], x)
            if parts is None:
                return None
        else:
            return None
        for c, atom in parts:
            terms[atom] = terms.get(atom, sp.S.Zero) + coef * c
    out = [(c, a) for a, c in terms.items() if not c.is_zero]
    if not out:
        return [(sp.S.Zero, _ATOM_ONE)]
    if any(not c.is_number for c, _ in out):
        return None
    return out


class _J1(sp.Function):
    """E relu(u) relu(v) (arc-cosine kernel of degree 1, with 1/(2 pi))."""

    nargs = 3


class _J0(sp.Function):
    """E step(u) step(v) (arc-cosine kernel of degree 0)."""

    nargs = 3


class _RS(sp.Function):
    """E relu(u) step(v)."""

    nargs = 3


class _sdet(sp.Function):
    """sqrt(max(k11 k22 - k12^2, 0)): the shared square root of the arc-cosine kernels."""

    nargs = 3


class _det(sp.Function):
    """max(k11 k22 - k12^2, 0): the covariance determinant.  Closed forms are written with
    it (never as a difference of large terms such as (1 + 2 k11)(1 + 2 k22) - 4 k12^2), so
    that they stay accurate at large variances and at correlation +-1: for rows x and -x
    of norm 1e6 the determinant is exactly 0 in floating point and E[erf' erf'] is exact."""

    nargs = 3


class _pos(sp.Function):
    """1 if k11 > 0 and k22 > 0 else 0 (a zero variance makes relu/step vanish exactly)."""

    nargs = 2


class _angle(sp.Function):
    """atan2(y, x) for y >= 0 (the arc-cosine angle), generated as a branch-free polynomial
    so that loops calling it vectorise (see ``_angle_source``)."""

    nargs = 2


def _atan_coefficients(degree: int = 10) -> list[float]:
    """Coefficients c_k of atan(u) = u + u z sum_k c_k z^k, z = u^2, |u| <= tan(pi/8):
    Chebyshev interpolation at 50 digits (mpmath).  Degree 10 leaves a truncation error
    below 5e-18, so the double-precision result is correct to rounding."""
    import mpmath

    with mpmath.workdps(50):
        Z = mpmath.tan(mpmath.pi / 8) ** 2

        def g(z):
            u = mpmath.sqrt(z)
            return (mpmath.atan(u) - u) / (u * z) if z else mpmath.mpf(-1) / 3

        nodes = [Z / 2 * (1 - mpmath.cos(mpmath.pi * (2 * k + 1) / (2 * (degree + 1)))) for k in range(degree + 1)]
        A = mpmath.matrix([[x**j for j in range(degree + 1)] for x in nodes])
        c = mpmath.lu_solve(A, mpmath.matrix([g(x) for x in nodes]))
        return [float(c[j]) for j in range(degree + 1)]


def _angle_source() -> str:
    """njit source of _angle(y, x) = atan2(y, x) for y >= 0: reduce to t = min/max in
    [0, 1], then to |u| <= tan(pi/8) by atan(t) = pi/4 + atan((t-1)/(t+1)), a polynomial,
    and reflections.  No calls and no branches (selects only): libm's atan2 is a call that
    stops the loop vectoriser, and costs ~10x more per pair than the vectorised polynomial.

    Like the other helpers it is a plain njit function that LLVM inlines into the pair loop;
    numba's own inline="always" would copy its selects into the numba IR as branches, and the
    IR passes are superlinear in the number of blocks (a depth-2 CNN of length 8: 255 s of
    compilation instead of 30 s)."""
    c = _atan_coefficients()
    horner = repr(c[-1])
    for ck in reversed(c[:-1]):
        horner = f"({horner}) * z + {ck!r}"
    return f'''
@njit(cache=True, error_model="numpy")
def _angle(y, x):
    ax = abs(x)
    big = y > ax
    num = ax if big else y
    den = y if big else ax
    den = den if den > 0.0 else 1.0
    t = num / den
    hi = t > 0.41421356237309503
    u = (t - 1.0) / (t + 1.0) if hi else t
    z = u * u
    a = u + u * z * ({horner})
    a = a + 0.7853981633974483 if hi else a
    a = 1.5707963267948966 - a if big else a
    return 3.141592653589793 - a if x < 0.0 else a
'''


def fusable(expr: sp.Expr) -> sp.Expr:
    """Rewrite the arc-cosine helpers into shared primitives, so that generated code that
    evaluates E[relu relu] and E[step step] at the same covariance (every relu layer of an
    NTK) computes one square root and one atan2 instead of two:
        _J1 -> _pos (sd + (pi - t) k12) / (2 pi),  _J0 -> _pos (pi - t) / (2 pi),
        sd = _sdet(k11, k12, k22),  t = atan2(sd, k12)."""
    rep = {}
    for f in expr.atoms(_J0, _J1):
        k11, k12, k22 = f.args
        sd = _sdet(k11, k12, k22)
        t = _angle(sd, k12)
        if isinstance(f, _J1):
            rep[f] = _pos(k11, k22) * (sd + (sp.pi - t) * k12) / (2 * sp.pi)
        else:
            rep[f] = _pos(k11, k22) * (sp.pi - t) / (2 * sp.pi)
    return expr.xreplace(rep) if rep else expr


_HELPER_SOURCE = {
    "_sdet": '''
@njit(cache=True, error_model="numpy")
def _sdet(k11, k12, k22):
    d = k11 * k22 - k12 * k12
    return math.sqrt(d if d > 0.0 else 0.0)
''',
    "_det": '''
@njit(cache=True, error_model="numpy")
def _det(k11, k12, k22):
    d = k11 * k22 - k12 * k12
    return d if d > 0.0 else 0.0
''',
    "_pos": '''
@njit(cache=True, error_model="numpy")
def _pos(k11, k22):
    return 1.0 if (k11 > 0.0 and k22 > 0.0) else 0.0
''',
    "_J1": '''
@njit(cache=True)
def _J1(k11, k12, k22):
    if k11 <= 0.0 or k22 <= 0.0:
        return 0.0
    d = k11 * k22 - k12 * k12
    sd = math.sqrt(d) if d > 0.0 else 0.0
    t = math.atan2(sd, k12)
    return (sd + (math.pi - t) * k12) / (2.0 * math.pi)
''',
    "_J0": '''
@njit(cache=True)
def _J0(k11, k12, k22):
    if k11 <= 0.0 or k22 <= 0.0:
        return 0.0
    d = k11 * k22 - k12 * k12
    sd = math.sqrt(d) if d > 0.0 else 0.0
    return (math.pi - math.atan2(sd, k12)) / (2.0 * math.pi)
''',
    "_RS": '''
@njit(cache=True)
def _RS(k11, k12, k22):
    if k11 <= 0.0 or k22 <= 0.0:
        return 0.0
    s1 = math.sqrt(k11)
    c = k12 / math.sqrt(k22)
    c = min(s1, max(-s1, c))
    return (s1 + c) / (2.0 * math.sqrt(2.0 * math.pi))
''',
}
_HELPER_SOURCE["_angle"] = _angle_source()


def _e1_atom(atom: Atom, k):
    """E[a(u)], u ~ N(0, k), for a unit-scale atom (scale already folded into k)."""
    kind = atom.kind
    if kind == ONE:
        return sp.S.One
    if kind == POW:
        p = atom.p
        if p % 2:
            return sp.S.Zero
        return sp.factorial2(p - 1) * k ** sp.Rational(p, 2)
    if kind == RELU:
        return sp.sqrt(k / (2 * sp.pi))
    if kind == STEP:
        return sp.S.Half
    if kind in (ERF, SIN):
        return sp.S.Zero
    if kind == GAUSS:
        return 1 / sp.sqrt(1 + 2 * k)
    if kind == COS:
        return sp.exp(-k / 2)
    if kind == EXP:
        return sp.exp(k / 2)
    if kind == DELTA:
        return 1 / sp.sqrt(2 * sp.pi * k)
    return None


def _deriv_atom(atom: Atom):
    """Derivative of a unit atom as [(coef, unit Atom)], or None."""
    kind = atom.kind
    if kind == ONE:
        return []
    if kind == POW:
        return [(sp.Integer(atom.p), Atom(POW, p=atom.p - 1) if atom.p > 1 else _ATOM_ONE)]
    return {
        RELU: [(sp.S.One, Atom(STEP))],
        STEP: [(sp.S.One, Atom(DELTA))],
        ERF: [(2 / sp.sqrt(sp.pi), Atom(GAUSS))],
        SIN: [(sp.S.One, Atom(COS))],
        COS: [(-sp.S.One, Atom(SIN))],
        EXP: [(sp.S.One, Atom(EXP))],
    }.get(kind)


def _unit(atom: Atom) -> Atom:
    return Atom(atom.kind, sp.S.One, atom.p)


def _pair_unit(A: Atom, B: Atom, k11, k12, k22, used: set, depth=0):
    """E[A(u) B(v)] for unit atoms; a sympy expression or None."""
    if depth > 12:
        return None
    pa, pb = A.parity(), B.parity()
    if pa * pb == -1:  # one odd, one even: (u, v) -> (-u, -v) flips the sign
        used.add("parity")
        return sp.S.Zero
    if A.kind == ONE:
        return _e1_atom(B, k22)
    if B.kind == ONE:
        return _e1_atom(A, k11)
    key = (A.kind, B.kind)
    table = {
        (RELU, RELU): lambda: (_J1(k11, k12, k22), "arc-cosine"),
        (STEP, STEP): lambda: (_J0(k11, k12, k22), "arc-cosine"),
        (RELU, STEP): lambda: (_RS(k11, k12, k22), "arc-cosine"),
        # arcsin(z) = atan(z / sqrt(1 - z^2)) with 1 - z^2 written through the determinant:
        # asin(2 k12 / sqrt((1 + 2 k11)(1 + 2 k22))) loses all accuracy near z = +-1 (rows x
        # and -x of large norm: ntk(x, -x) != -ntk(x, x) by 6e-5 at norm 1e6)
        (ERF, ERF): lambda: (
            2 / sp.pi * sp.atan(2 * k12 / sp.sqrt(1 + 2 * k11 + 2 * k22 + 4 * _det(k11, k12, k22))),
            "erf arcsin"),
        (STEP, ERF): lambda: (
            sp.atan(sp.sqrt(2) * k12 / sp.sqrt(k11 + 2 * _det(k11, k12, k22))) / sp.pi, "erf arcsin"),
        # exp(-(k11 + k22)/2) sinh(k12) and cosh(k12), written so that nothing overflows
        # (exp(-k) sinh(k) was 0 * inf = NaN beyond k = 710) and nothing cancels at small k
        (SIN, SIN): lambda: (sp.sign(k12) * sp.exp(sp.Abs(k12) - (k11 + k22) / 2)
                             * (-_expm1(-2 * sp.Abs(k12))) / 2, "characteristic function"),
        (COS, COS): lambda: (sp.exp(sp.Abs(k12) - (k11 + k22) / 2)
                             * (1 + sp.exp(-2 * sp.Abs(k12))) / 2, "characteristic function"),
        (EXP, EXP): lambda: (sp.exp((k11 + 2 * k12 + k22) / 2), "characteristic function"),
        (EXP, SIN): lambda: (sp.exp((k11 - k22) / 2) * sp.sin(k12), "characteristic function"),
        (EXP, COS): lambda: (sp.exp((k11 - k22) / 2) * sp.cos(k12), "characteristic function"),
    }
    if key in table:
        val, name = table[key]()
        used.add(name)
        return val
    if (B.kind, A.kind) in table:
        # the table gives E[B(u') A(v')] with var(u') = k11; rename k11 <-> k22 afterwards
        val, name = table[(B.kind, A.kind)]()
        used.add(name)
        return _swap_k(val, k11, k22)
    # Gaussian tilt: E[A(u) exp(-v^2)] = (1+2k22)^(-1/2) E'[A(u)], var' = k11 - 2k12^2/(1+2k22)
    if B.kind == GAUSS or A.kind == GAUSS:
        if B.kind != GAUSS:
            A, B, k11, k22 = B, A, k22, k11
        # k11 - 2 k12^2 / (1 + 2 k22), without the cancellation at large k and |rho| ~ 1
        e = _e1_atom(A, (k11 + 2 * _det(k11, k12, k22)) / (1 + 2 * k22))
        if e is not None:
            used.add("Gaussian tilt")
            return e / sp.sqrt(1 + 2 * k22)
        return None
    # Dirac delta: E[A(u) delta(v)] = p_v(0) E[A(u) | v = 0]
    if B.kind == DELTA or A.kind == DELTA:
        if B.kind != DELTA:
            A, B, k11, k22 = B, A, k22, k11
        e = _e1_atom(A, _det(k11, k12, k22) / k22)  # k11 - k12^2 / k22
        if e is not None:
            used.add("conditional delta")
            return e / sp.sqrt(2 * sp.pi * k22)
        return None
    # Stein: E[u^p g(v)] = (p-1) k11 E[u^(p-2) g(v)] + k12 E[u^(p-1) g'(v)]
    if A.kind == POW or B.kind == POW:
        if A.kind != POW:
            A, B, k11, k22 = B, A, k22, k11
        dB = _deriv_atom(B)
        if dB is None:
            return None
        p = A.p
        lower = Atom(POW, p=p - 1) if p > 1 else _ATOM_ONE
        total = sp.S.Zero
        if p >= 2:
            low2 = Atom(POW, p=p - 2) if p > 2 else _ATOM_ONE
            t = _pair_unit(low2, B, k11, k12, k22, used, depth + 1)
            if t is None:
                return None
            total += (p - 1) * k11 * t
        for c, atom in dB:
            t = _pair_unit(lower, atom, k11, k12, k22, used, depth + 1)
            if t is None:
                return None
            total += k12 * c * t
        used.add("Stein/Isserlis")
        return total
    # relu = (x + |x|)/2 against an odd g; step = (1 + sign)/2 against an even g
    for X, Y, kx, ky in ((A, B, k11, k22), (B, A, k22, k11)):
        if X.kind == RELU and Y.parity() == _ODD:
            t = _pair_unit(Atom(POW, p=1), Y, kx, k12, ky, used, depth + 1)
            if t is not None:
                used.add("parity")
                return t / 2
        if X.kind == STEP and Y.parity() == _EVEN:
            e = _e1_atom(Y, ky)
            if e is not None:
                used.add("parity")
                return e / 2
    return None


def _expm1(x):
    from sympy.codegen.cfunctions import expm1

    return expm1(x)


def _swap_k(expr, k11, k22):
    d = sp.Dummy()
    return expr.xreplace({k11: d}).xreplace({k22: k11}).xreplace({d: k22})


def _pair_atoms(A: Atom, B: Atom, used: set):
    """E[A(cA u) B(cB v)] in K11, K12, K22 (scales become a change of covariance)."""
    a, b = A.c, B.c
    return _pair_unit(_unit(A), _unit(B), a * a * K11, a * b * K12, b * b * K22, used)


def closed_form_pair(phi, psi, _used=None):
    """E[phi(u) psi(v)] as a sympy expression in K11, K12, K22, or None when no rule applies."""
    phi, psi = as_lambda(phi), as_lambda(psi)
    dp = decompose(phi.expr, phi.variables[0])
    dq = decompose(psi.expr, psi.variables[0])
    if dp is None or dq is None:
        return None
    used = set() if _used is None else _used
    total = sp.S.Zero
    for ca, A in dp:
        for cb, B in dq:
            t = _pair_atoms(A, B, used)
            if t is None:
                return None
            total += ca * cb * t
    return total


def closed_form_1d(phi, _used=None):
    """E[phi(u)], u ~ N(0, k), as a sympy expression in the symbol ``k``, or None."""
    phi = as_lambda(phi)
    dp = decompose(phi.expr, phi.variables[0])
    if dp is None:
        return None
    total = sp.S.Zero
    for c, A in dp:
        e = _e1_atom(_unit(A), A.c**2 * _K)
        if e is None:
            return None
        total += c * e
    return total


# ---------------------------------------------------------------------------------------
# Structural analysis for quadrature
# ---------------------------------------------------------------------------------------
_KINK_FUNCS = (nl.relu, nl.step, sp.Heaviside, sp.Abs, sp.Max, sp.Min, sp.sign,
               sp.Piecewise, sp.floor, sp.ceiling)


def _has_kink(expr) -> bool:
    return any(expr.atoms(f) for f in _KINK_FUNCS) or bool(expr.atoms(sp.Piecewise))


def _parity(expr, x) -> int:
    """Structural parity of expr in x (EVEN, ODD or NEITHER)."""
    if not expr.has(x):
        return _EVEN
    if expr == x:
        return _ODD
    if expr.is_Add:
        ps = {_parity(a, x) for a in expr.args}
        return ps.pop() if len(ps) == 1 and _NEITHER not in ps else _NEITHER
    if expr.is_Mul:
        out = _EVEN
        for a in expr.args:
            p = _parity(a, x)
            if p == _NEITHER:
                return _NEITHER
            out *= p
        return out
    if expr.is_Pow:
        base, ex = expr.args
        if ex.has(x):
            return _EVEN if _parity(ex, x) == _EVEN and not base.has(x) else _NEITHER
        pb = _parity(base, x)
        if pb == _EVEN:
            return _EVEN
        if pb == _ODD and ex.is_Integer:
            return _EVEN if int(ex) % 2 == 0 else _ODD
        return _NEITHER
    if isinstance(expr, sp.Function) and len(expr.args) == 1:
        pa = _parity(expr.args[0], x)
        if pa == _EVEN:
            return _EVEN
        if pa == _ODD:
            return nl.parity_of_function(expr.func)
    return _NEITHER


def _numpy_fn(lam: sp.Lambda):
    f = sp.lambdify(lam.variables[0], lam.expr, modules=[nl.NUMPY_FUNCTIONS, "numpy", "scipy"])

    def g(x):
        with np.errstate(all="ignore"):
            return np.broadcast_to(np.asarray(f(x), dtype=float), np.shape(x))

    return g


def _parity_code(lam: sp.Lambda):
    """(eps, c0, c1, c2) with psi(-v) = eps psi(v) + c0 + c1 v + c2 v^2, or None.

    Exact parity comes from the expression's structure (nonlinearities' parity table); a
    parity up to a quadratic polynomial (sigmoid: eps = -1, c0 = 1; softplus and gelu:
    eps = 1, c1 = -1; gelu': eps = -1, c0 = 1) is recognised numerically, to 1e-13.
    """
    x = lam.variables[0]
    p = _parity(lam.expr, x)
    if p == _EVEN:
        return (1.0, 0.0, 0.0, 0.0)
    if p == _ODD:
        return (-1.0, 0.0, 0.0, 0.0)
    if lam.expr.has(sp.DiracDelta):
        return None
    try:
        f = _numpy_fn(lam)
        v = np.concatenate([np.linspace(0.0, 12.0, 97),
                            np.random.default_rng(7).uniform(0.0, 30.0, 64)])
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


# ---------------------------------------------------------------------------------------
# Code printing and the compile cache: shared with every generated module (codegen)
# ---------------------------------------------------------------------------------------
_LOCK = threading.RLock()
codegen.HELPER_SOURCE.update(_HELPER_SOURCE)
_Printer = codegen.NumbaPrinter


def _print_function_body(exprs, arg: str, indent="    "):
    """Lines computing exprs (in terms of Symbol(arg)) with common subexpressions."""
    return codegen.print_expressions(exprs, indent)


def _custom_source(exprs) -> str:
    return codegen.custom_functions_source(exprs)


def _modname(source: str) -> str:
    return codegen.module_name(source, "gaussian2")


def _load_module(source: str):
    return codegen.load_module(source, "gaussian2")


def _cache_dir() -> str:
    return codegen.cache_dir("gaussian2")


def _rules_path(source: str) -> str:
    return os.path.join(_cache_dir(), _modname(source) + ".rules.json")


def _read_rules(source: str) -> dict:
    try:
        with open(_rules_path(source)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _write_rules(source: str, key: str, value) -> None:
    with _LOCK:
        data = _read_rules(source)
        data[key] = value
        path = _rules_path(source)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, path)
        except OSError:  # pragma: no cover - a read-only cache only costs probing time
            pass


_HEADER = f"""# Generated by tpcompiler.expectations.gaussian2 ({_GEN_VERSION}); do not edit.
import math
import numpy as np
from numba import njit, prange
"""

_EVALUATE_SOURCE = """
@njit(cache=True, parallel=True)
def evaluate(k11, k12, k22, out):
    for i in prange(out.size):
        out[i] = f(k11[i], k12[i], k22[i])
"""

_EVALUATE1_SOURCE = """
@njit(cache=True, parallel=True)
def evaluate(k, out):
    for i in prange(out.size):
        out[i] = f(k[i])
"""

# ---------------------------------------------------------------------------------------
# Quadrature templates.  Rule kinds (runtime argument): 0 = sinh-mapped trapezoid centred at
# the feature, 1 = uniform trapezoid.  Kinked functions always use the split exp-exp rule.
# ---------------------------------------------------------------------------------------
_X = 8.5  # truncation of the standard normal (tail mass 2e-17, below rounding)
# Hybrid rule (kind 0): where the integrand is smooth on the Gaussian's own scale (small
# variance, or an inner integral at high correlation) Gauss-Hermite with about
# 1.6 / h + (_GHK sd / h)^2 nodes (a function analytic in a strip of width ~1/sd) is cheaper than the
# sinh map (fewer nodes, and no exp per node); it is used whenever it needs fewer than twice
# the sinh rule's nodes.
_GHK = 1.5
_GH_SIZES = (4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96)
_ZC = 3.0  # the inner sinh rule follows psi's feature up to 3 standard deviations out
_BSPLIT = 4.0  # inner sd above which a feature beyond +-_ZC gets the split rule
_SLO = -math.log(42.0)  # exp-exp map: c exp(s - e^-s) < 1e-18 c below this s

_QUAD_COMMON = f"""
_GHK = 1.5
_GH_SIZES = {_GH_SIZES!r}


def _gh_table():
    from numpy.polynomial.hermite_e import hermegauss
    xs, ws, off = [], [], [0]
    for n in _GH_SIZES:
        x, w = hermegauss(n)
        xs.append(x)
        ws.append(w / w.sum())
        off.append(off[-1] + n)
    return (np.concatenate(xs), np.concatenate(ws), np.array(off, dtype=np.int64),
            np.array(_GH_SIZES, dtype=np.int64))


_GHX, _GHW, _GHOFF, _GHN = _gh_table()
_X = {_X!r}
_ZC = {_ZC!r}
_BSPLIT = {_BSPLIT!r}
_SLO = {_SLO!r}
"""

# outer-rule loops accumulate w * _outer(s1 * x) * G(x); three variants are emitted by
# _outer_loop.  The inner integral G is a function _G(m, b, h, kind, C) -> (value, count).
_INNER_TEMPLATE = '''
@njit(cache=True)
def _gh_index(sd, h):
    """Index into the Gauss-Hermite ladder for a function with feature scale 1/sd, or -1."""
    t = _GHK * sd / h
    need = 1.6 / h + t * t
    for i in range(_GHN.size):
        if _GHN[i] >= need:
            return i
    return -1


@njit(cache=True)
def _G_unif(m, b, dz):
    """Uniform trapezoid for E_z[_inner(m + b z)] with spacing dz."""
    K = int(_X / dz) + 1
    e2 = math.exp(-dz * dz)
    # Gaussian weights by the recurrence w_(j+1) = w_j * r_j, r_(j+1) = r_j * e2
    w = 1.0
    r = math.exp(-0.5 * dz * dz)
    g = _inner(m)
    gw = 1.0
    for j in range(1, K + 1):
        w *= r
        r *= e2
        z = j * dz
        g += w * (_inner(m + b * z) + _inner(m - b * z))
        gw += 2.0 * w
    return g / gw, 2 * K + 1


@njit(cache=True)
def _G_split(m, b, h, C, zs):
    """E_z[_inner(m + b z)] with the line split at zs = -m / b (where psi's argument
    vanishes) and each half mapped by the exp-exp rule clustered at zs."""
    g = 0.0
    gw = 0.0
    n = 0
    ci = C / max(b, 1.0)
    for side in (-1.0, 1.0):
        far = -side * zs  # > 0 when the Gaussian bulk lies on this side, at that distance
        hs = h * 2.0 / far if far > 2.0 else h
        shi = math.log((_X - side * zs) / ci) + 1.0
        jlo = int(math.ceil(_SLO / hs))
        jhi = int(math.floor(shi / hs))
        q = math.exp(-jlo * hs)
        dq = math.exp(-hs)
        for j in range(jlo, jhi + 1):
            s = j * hs
            r = ci * math.exp(s - q)
            z = zs + side * r
            w = r * (1.0 + q) * math.exp(-0.5 * z * z) * hs
            g += w * _inner(m + b * z)
            gw += w
            q *= dq
        n += jhi - jlo + 1
    return g / gw, n


@njit(cache=True)
def _G(m, b, h, kind, C):
    """E_z[_inner(m + b z)], z ~ N(0, 1); returns (value, number of evaluations)."""
    if b == 0.0:
        return _inner(m), 1
    g = 0.0
    gw = 0.0
    n = 0
    zs = -m / b
{kink_block}
    if b > _BSPLIT and _ZC < abs(zs) < _X:
        # psi's feature (width ~1/b) lies beyond the sinh rule's centre range [-3, 3],
        # where that rule's nodes are too far apart to resolve it (E[tanh tanh] at variance
        # 1e4 erred by 3e-7): split at the feature as for a kink
        return _G_split(m, b, h, C, zs)
    if kind == 1:
        return _G_unif(m, b, h / (1.0 + b / 8.0))
    ci = C / max(b, 1.0)
    zc = min(_ZC, max(-_ZC, zs))
    jhi = int(math.floor(math.asinh((_X - zc) / ci) / h))
    jlo = int(math.ceil(math.asinh((-_X - zc) / ci) / h))
    ig = _gh_index(b, h)
    if ig >= 0 and _GHN[ig] <= 2 * (jhi - jlo + 1):
        for j in range(_GHOFF[ig], _GHOFF[ig + 1]):
            g += _GHW[j] * _inner(m + b * _GHX[j])
        return g, _GHN[ig]
    ch = math.cosh(h)
    sh = math.sinh(h)
    st = 0.0
    ct = 1.0
    for j in range(0, jhi + 1):
        z = zc + ci * st
        w = ct * math.exp(-0.5 * z * z)
        g += w * _inner(m + b * z)
        gw += w
        st, ct = st * ch + ct * sh, st * sh + ct * ch
    st = -sh
    ct = ch
    for j in range(-1, jlo - 1, -1):
        z = zc + ci * st
        w = ct * math.exp(-0.5 * z * z)
        g += w * _inner(m + b * z)
        gw += w
        st, ct = st * ch - ct * sh, ct * ch - st * sh
    return g / gw, jhi - jlo + 1
'''

_INNER_KINK_BLOCK = '''
    if abs(zs) < _X:
        # psi has a kink where its argument vanishes: split there, exp-exp map on each side
        return _G_split(m, b, h, C, zs)
'''

_CORE_TEMPLATE = '''
@njit(cache=True)
def _core(k11, k12, k22, h, kind, C):
    """E[_outer(u) _inner(v)] by the conditional rule; returns (value, evaluations)."""
    if not (k11 >= 0.0 and k22 >= 0.0 and math.isfinite(k11) and math.isfinite(k22)
            and math.isfinite(k12)):
        return math.nan, 0
    s1 = math.sqrt(k11)
    s2 = math.sqrt(k22)
    d = k11 * k22
    if d > 0.0:
        rho = k12 / math.sqrt(d)
        rho = min(1.0, max(-1.0, rho))
        e = d - k12 * k12
        sg = math.sqrt(e / d) if e > 0.0 else 0.0
    else:
        rho = 0.0
        sg = 1.0
    a = s2 * rho
    b = s2 * sg
    seff = max(s1, abs(a))
    acc = 0.0
    ws = 0.0
    nev = 0
    G0 = 0.0
    if a == 0.0:
        G0, n0 = _G(0.0, b, h, kind, C)
        nev += n0
{outer_block}
    return acc / ws, nev
'''

# Outer loop bodies.  `_gpair(x)` expands into code computing G(x) and, when psi has a parity,
# G(-x); the outer loops call it through the _GPAIR snippet.
_GPAIR = '''
{ind}if a == 0.0:
{ind}    Gp = G0
{ind}    Gm = G0
{ind}else:
{ind}    Gp, nn = _G(a * x, b, h, kind, C)
{ind}    nev += nn
{gm}
'''

_GM_PARITY = "{ind}    Gm = {eps!r} * Gp{poly}"
_GM_NONE = '''{ind}    Gm, nn = _G(-a * x, b, h, kind, C)
{ind}    nev += nn'''

def _trapezoid_rule(ind: str, center: str, pair: str) -> str:
    """Plain trapezoid on x = k dx (kind 1), weights exp(-x^2/2) by recurrence.  ``center``
    (at indent ``ind``) accumulates the node x = 0 with weight w, ``pair`` (one level deeper)
    the nodes +-x with weight w; the rule adds the weights to ws."""
    i = ind
    return f"""{i}dx = h / (1.0 + seff / 8.0)
{i}K = int(_X / dx) + 1
{i}e2 = math.exp(-dx * dx)
{i}w = 1.0
{i}r = math.exp(-0.5 * dx * dx)
{center}
{i}ws += w
{i}for kk in range(1, K + 1):
{i}    w *= r
{i}    r *= e2
{i}    x = kk * dx
{pair}
{i}    ws += 2.0 * w"""


def _sinh_rule(ind: str, center: str, pair: str) -> str:
    """Trapezoid in t after x = co sinh(t) (kind 2), sinh/cosh by the addition formulas; the
    caller has set co and Ks.  ``center`` and ``pair`` as for _trapezoid_rule."""
    i = ind
    return f"""{i}K = Ks
{i}ch = math.cosh(h)
{i}sh = math.sinh(h)
{i}w = co
{center}
{i}ws += w
{i}st = sh
{i}ct = ch
{i}for kk in range(1, K + 1):
{i}    x = co * st
{i}    w = co * ct * math.exp(-0.5 * x * x)
{pair}
{i}    ws += 2.0 * w
{i}    st, ct = st * ch + ct * sh, st * sh + ct * ch"""


def _kink_rule(pair: str, co_limit: str = "") -> str:
    """Each half line mapped by x = co exp(s - exp(-s)), trapezoid in s (clusters nodes at the
    kink x = 0); ``co_limit`` may shrink co after its default, ``pair`` accumulates +-x."""
    return f"""
    co = C / max(seff, 1.0){co_limit}
    shi = math.log(_X / co) + 1.0
    jlo = int(math.ceil(_SLO / h))
    jhi = int(math.floor(shi / h))
    q = math.exp(-jlo * h)
    dq = math.exp(-h)
    for j in range(jlo, jhi + 1):
        s = j * h
        x = co * math.exp(s - q)
        w = x * (1.0 + q) * math.exp(-0.5 * x * x)
        q *= dq
{pair}
        ws += 2.0 * w
"""


def _outer_pair(ind: str, parity) -> str:
    """Outer nodes +-x: G at both (see _gpair_snippet) and the weighted outer values."""
    return _gpair_snippet(ind, parity) + f"\n{ind}acc += w * (_outer(s1 * x) * Gp + _outer(-s1 * x) * Gm)"


def _outer_center(ind: str, parity) -> str:
    return f"{ind}x = 0.0\n" + _gpair_snippet(ind, parity) + f"\n{ind}acc += w * _outer(0.0) * Gp"


def _outer_smooth(parity) -> str:
    """Outer loop of a smooth outer function: Gauss-Hermite (kind 0, when a tabulated rule
    is small enough), else the trapezoid (kind 1) or sinh (kind 2) rule."""
    i8, i12 = " " * 8, " " * 12
    return f"""
    co = C / max(seff, 1.0)
    Ks = int(math.asinh(_X / co) / h) + 1
    ig = -1
    if kind == 0:
        ig = _gh_index(seff, h)
        if ig >= 0 and _GHN[ig] > 2 * Ks + 1:
            ig = -1
    if ig >= 0:
        n = _GHN[ig]
        o = _GHOFF[ig]
        if n % 2 == 1:
            x = 0.0
            w = _GHW[o + n // 2]
{_gpair_snippet(i12, parity)}
            acc += w * _outer(0.0) * Gp
            ws += w
        for j in range(n // 2):
            x = _GHX[o + n - 1 - j]
            w = _GHW[o + n - 1 - j]
{_outer_pair(i12, parity)}
            ws += 2.0 * w
    elif kind == 1:
{_trapezoid_rule(i8, _outer_center(i8, parity), _outer_pair(i12, parity))}
    else:
{_sinh_rule(i8, _outer_center(i8, parity), _outer_pair(i12, parity))}
"""


def _gpair_snippet(indent: str, parity) -> str:
    """parity: None, or (eps, c0, c1, c2) with psi(-v) = eps psi(v) + c0 + c1 v + c2 v^2, so
    that G(-x) = eps G(x) + c0 + c1 m + c2 (m^2 + b^2), m = a x."""
    if parity is not None:
        eps, c0, c1, c2 = parity
        poly = ""
        if c0:
            poly += f" + {c0!r}"
        if c1:
            poly += f" + {c1!r} * (a * x)"
        if c2:
            poly += f" + {c2!r} * ((a * x) * (a * x) + b * b)"
        gm = _GM_PARITY.format(ind=indent, eps=float(eps), poly=poly)
    else:
        gm = _GM_NONE.format(ind=indent)
    return _GPAIR.format(ind=indent, gm=gm).strip("\n")


def _fn_source(name: str, lam: sp.Lambda, arg="x") -> str:
    s = sp.Symbol(arg, real=True)
    expr = lam.expr.xreplace({lam.variables[0]: s})
    lines, outs = _print_function_body([expr], arg)
    body = "\n".join(lines + [f"    return {outs[0]}"])
    return f"\n@njit(cache=True)\ndef {name}({arg}):\n{body}\n"


def _quad_pair_source(outer: sp.Lambda, inner: sp.Lambda, outer_kink, inner_kink, parity):
    parts = [_HEADER, _QUAD_COMMON, _custom_source([outer.expr, inner.expr])]
    parts.append(_fn_source("_outer", outer, "x"))
    parts.append(_fn_source("_inner", inner, "v"))
    kink_block = _INNER_KINK_BLOCK if inner_kink else ""
    parts.append(_INNER_TEMPLATE.format(kink_block=kink_block))
    if outer_kink:
        co_limit = ("\n    if b > 0.0 and a != 0.0:\n        co = min(co, C * b / abs(a))" if inner_kink else "")
        outer_block = _kink_rule(_outer_pair(" " * 8, parity), co_limit)
    else:
        outer_block = _outer_smooth(parity)
    parts.append(_CORE_TEMPLATE.format(outer_block=outer_block.rstrip()))
    parts.append('''
@njit(cache=True)
def _core_many(k11, k12, k22, h, kind, C, out, counts):
    for i in range(out.size):
        out[i], counts[i] = _core(k11[i], k12[i], k22[i], h, kind, C)
''')
    return "".join(parts)


_ONED_TEMPLATE = '''
@njit(cache=True)
def _core1(k, h, kind, C):
    """E[_g(sqrt(k) x)] (tuple of outputs) by the 1-D rule; returns (values, evaluations)."""
    nan = math.nan
    if not (k >= 0.0 and math.isfinite(k)):
        return {nan_tuple}, 0
    s1 = math.sqrt(k)
    seff = s1
    ws = 0.0
{zero_acc}
{loop}
    return {result}, nev
'''

def _oned_source(funcs, kink: bool) -> str:
    """Module source with _g(x) -> tuple of len(funcs) values and the 1-D core _core1."""
    n = len(funcs)
    parts = [_HEADER, _QUAD_COMMON, _custom_source([f.expr for f in funcs])]
    s = sp.Symbol("x", real=True)
    exprs = [f.expr.xreplace({f.variables[0]: s}) for f in funcs]
    lines, outs = _print_function_body(exprs, "x")
    tup = "(" + ", ".join(outs) + ("," if n == 1 else "") + ")"
    parts.append("\n@njit(cache=True)\ndef _g(x):\n" + "\n".join(lines + [f"    return {tup}"]) + "\n")
    zero_acc = "\n".join(f"    acc{i} = 0.0\n    sq{i} = 0.0" for i in range(n))
    unpack = lambda pre: ", ".join(f"{pre}{i}" for i in range(n)) + ("," if n == 1 else "")
    vals0 = f"        {unpack('p')} = _g(0.0)"
    vals_pm = f"{unpack('p')} = _g(s1 * x)\n{unpack('q')} = _g(-s1 * x)"

    def accumulate(ind: str, center: bool) -> str:
        """Weighted sums of the values (and squares) at the node 0 or at +-x."""
        if center:
            return "\n".join(f"{ind}acc{i} += w * p{i}\n{ind}sq{i} += w * p{i} * p{i}" for i in range(n))
        lines = [ind + v for v in vals_pm.split("\n")]
        lines += [f"{ind}acc{i} += w * (p{i} + q{i})\n{ind}sq{i} += w * (p{i} * p{i} + q{i} * q{i})" for i in range(n)]
        return "\n".join(lines)

    i8, i12 = " " * 8, " " * 12
    if kink:
        loop = _kink_rule(accumulate(i8, False)) + "    nev = 2 * (jhi - jlo + 1)\n"
    else:
        center = vals0 + "\n" + accumulate(i8, True)
        loop = (
            "\n    co = C / max(seff, 1.0)\n    Ks = int(math.asinh(_X / co) / h) + 1\n    if kind == 1:\n"
            + _trapezoid_rule(i8, center, accumulate(i12, False))
            + "\n        nev = 2 * K + 1\n    else:\n"
            + _sinh_rule(i8, center, accumulate(i12, False))
            + "\n        nev = 2 * K + 1\n"
        )
    result = (
        "((" + ", ".join(f"acc{i} / ws" for i in range(n)) + ("," if n == 1 else "") + "), ("
        + ", ".join(f"sq{i} / ws" for i in range(n)) + ("," if n == 1 else "") + "))"
    )
    nan_tuple = "((" + ", ".join("nan" for _ in range(n)) + ("," if n == 1 else "") + "), (" + \
        ", ".join("nan" for _ in range(n)) + ("," if n == 1 else "") + "))"
    parts.append(_ONED_TEMPLATE.format(
        zero_acc=zero_acc, loop=loop.rstrip(), result=result, nan_tuple=nan_tuple))
    return "".join(parts)


# ---------------------------------------------------------------------------------------
# Probing: choose the rule and its step by measured error on a fixed set of covariances
# ---------------------------------------------------------------------------------------
_H_LADDER = [0.55 * 0.92**i for i in range(40)]  # 0.55 ... 0.021
_FINE = 5  # the error of rung i is estimated against rung i + 5 (h ratio 0.66)


def _probe_covariances(kmax: float):
    """Covariances on which quadrature rules are compared: variances from 0.04 to kmax (all
    pairs), correlations from 0 to +-1 including 0.999999 and exactly +-1."""
    vs = [0.04, 0.3, 1.5, kmax / 3.0, kmax]
    rhos = [0.0, 0.3, -0.3, 0.6, -0.6, 0.8, -0.8, 0.9, -0.9, 0.95, -0.95, 0.99, -0.99,
            0.999, -0.999, 0.999999, 1.0, -1.0]
    out = [(k11, r * math.sqrt(k11 * k22), k22) for k11 in vs for k22 in vs for r in rhos]
    arr = np.array(out, dtype=np.float64)
    return arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy()


def _reference_moment(lam: sp.Lambda, ks: np.ndarray, power: int = 2) -> np.ndarray:
    """E[g(u)^power] for u ~ N(0, k), by a fine trapezoid rule in numpy (for error scales)."""
    g = _numpy_fn(lam)
    z = np.linspace(-_X, _X, 4001)
    w = np.exp(-0.5 * z * z)
    w /= w.sum()
    out = np.empty(len(ks))
    for i, k in enumerate(ks):
        val = g(math.sqrt(max(k, 0.0)) * z)
        out[i] = np.sum(w * np.abs(val) ** power)
    return out


def _rel_err(a, b, scale):
    """max |a - b| / max(|b|, 1e-2 scale), ignoring NaN pairs where both are NaN."""
    den = np.maximum(np.abs(b), 1e-2 * scale)
    den = np.where(den > 0, den, 1.0)
    d = np.abs(a - b) / den
    d = np.where(np.isnan(a) & np.isnan(b), 0.0, d)
    return float(np.max(d)) if d.size else 0.0


@dataclass
class _Rule:
    kind: int
    h: float
    C: float
    error: float
    evals: float  # mean evaluations of psi per expectation on the probe set

    def describe(self, kinks):
        if kinks:
            name = "split exp-exp trapezoid at the kink"
        elif self.kind == 1:
            name = "uniform trapezoid"
        else:
            name = "sinh-mapped trapezoid"
        return name


def _probe(run, kinds_C, rtol, scale_fn):
    """Pick (kind, h, C) with the fewest evaluations whose estimated error <= rtol/4.

    run(h, kind, C) -> (values, counts) on the probe set; scale_fn(values) -> error scales.
    """
    target = rtol / 4.0
    best = None
    fallback = None
    for kind, C in kinds_C:
        cache = {}

        def at(i):
            if i not in cache:
                cache[i] = run(_H_LADDER[i], kind, C)
            return cache[i]

        scale = None
        prev = None  # (rule, error) of the previous rung
        for i in range(len(_H_LADDER) - _FINE):
            vals, counts = at(i)
            ref, _ = at(i + _FINE)
            if scale is None:
                scale = scale_fn(ref)
            err = _rel_err(vals, ref, scale)
            cost = float(np.mean(counts))
            rule = _Rule(kind, _H_LADDER[i], C, err, cost)
            if fallback is None or err < fallback.error:
                fallback = rule
            # accept a step only if the next finer one passes too (errors are not monotone)
            if prev is not None and prev.error <= target and err <= target:
                chosen = _Rule(kind, prev.h, C, max(prev.error, err), prev.evals)
                if best is None or chosen.evals < best.evals:
                    best = chosen
                break
            if best is not None and cost > 2.0 * best.evals:
                break
            prev = rule
    if best is None:
        warnings.warn(
            f"quadrature did not reach rtol={rtol:g} on the probe set; using the most accurate "
            f"rule tried (estimated error {fallback.error:.2g})",
            RuntimeWarning,
            stacklevel=4,
        )
        return fallback
    return best


# ---------------------------------------------------------------------------------------
# Public classes
# ---------------------------------------------------------------------------------------
def _as_float_arrays(*arrays):
    arrs = np.broadcast_arrays(*[np.asarray(a, dtype=np.float64) for a in arrays])
    shape = arrs[0].shape
    return shape, [np.ascontiguousarray(a).ravel() for a in arrs]


@dataclass
class PairExpectation:
    """E[phi(u) psi(v)] for (u, v) ~ N(0, [[k11, k12], [k12, k22]]) as generated Numba code.

    Attributes: ``phi``, ``psi`` (sympy Lambdas), ``method`` (how it is computed),
    ``expression`` (the closed form in K11, K12, K22, or None), ``source`` (the generated
    Python source defining ``f(k11, k12, k22)``), ``scalar`` (the compiled ``f``, callable
    from Python and from other njit code), ``error_estimate`` (estimated relative error on
    the probe set; 0 for closed forms, which are exact up to rounding), ``rule`` (the
    quadrature parameters).  ``evaluate(k11, k12, k22)`` broadcasts arrays and runs in
    parallel.
    """

    phi: sp.Lambda
    psi: sp.Lambda
    method: str
    source: str
    scalar: object
    expression: sp.Expr | None = None
    error_estimate: float = 0.0
    rule: dict = field(default_factory=dict)
    _evaluate: object = None
    _rule_runner: object = None  # (k11, k12, k22, h) -> values, for error estimates
    _scale: object = None  # (k11, k22) -> S = sqrt(E phi^2 E psi^2)

    def evaluate(self, k11, k12, k22) -> np.ndarray:
        """E[phi(u) psi(v)] elementwise over broadcast arrays (float64, parallel)."""
        shape, (a, b, c) = _as_float_arrays(k11, k12, k22)
        out = np.empty(a.size, dtype=np.float64)
        if out.size:
            self._evaluate(a, b, c, out)
        return out.reshape(shape)

    __call__ = evaluate

    def estimate_error(self, k11, k12, k22, sample: int = 256, seed: int = 0) -> float:
        """Estimated relative error on (a random sample of) the given inputs.

        Compares the chosen rule with a rule of step 0.66 h on up to ``sample`` elements;
        relative to max(|E|, 1e-2 sqrt(E phi^2 E psi^2)).  Closed forms return 0.0.
        """
        if self._rule_runner is None:
            return 0.0
        _, (a, b, c) = _as_float_arrays(k11, k12, k22)
        if a.size > sample:
            idx = np.random.default_rng(seed).choice(a.size, sample, replace=False)
            a, b, c = a[idx], b[idx], c[idx]
        h = self.rule["h"]
        coarse = self._rule_runner(a, b, c, h)
        fine = self._rule_runner(a, b, c, h * 0.92**_FINE)
        return _rel_err(coarse, fine, self._scale(a, c))


@dataclass
class Expectation1D:
    """E[phi(u)], u ~ N(0, k), as generated Numba code (``scalar(k)``, ``evaluate(k)``)."""

    phi: sp.Lambda
    method: str
    source: str
    scalar: object
    expression: sp.Expr | None = None
    error_estimate: float = 0.0
    rule: dict = field(default_factory=dict)
    _evaluate: object = None

    def evaluate(self, k) -> np.ndarray:
        shape, (a,) = _as_float_arrays(k)
        out = np.empty(a.size, dtype=np.float64)
        if out.size:
            self._evaluate(a, out)
        return out.reshape(shape)

    __call__ = evaluate


def _closed_source(expr, degenerate=None, args=("k11", "k12", "k22")) -> str:
    """Module source defining f(*args) from a closed-form sympy expression."""
    syms = [sp.Symbol(a, real=True) for a in args]
    if args == ("k",):
        expr = expr.xreplace({_K: syms[0]})
    else:
        expr = expr.xreplace({K11: syms[0], K12: syms[1], K22: syms[2]})
    helpers = sorted({type(f).__name__ for f in expr.atoms(sp.Function)} & set(_HELPER_SOURCE))
    lines, outs = _print_function_body([expr], args[0])
    parts = [_HEADER] + [_HELPER_SOURCE[h] for h in helpers]
    sig = ", ".join(args)
    guard = " and ".join(f"{a} >= 0.0" for a in args if a in ("k11", "k22", "k"))
    body = [f"    if not ({guard}):", "        return math.nan"]
    if degenerate is not None:
        body += degenerate
    body += lines + [f"    return {outs[0]}"]
    parts.append(f"\n@njit(cache=True)\ndef f({sig}):\n" + "\n".join(body) + "\n")
    parts.append(_EVALUATE1_SOURCE if args == ("k",) else _EVALUATE_SOURCE)
    return "".join(parts)


def _degenerate_lines(phi: sp.Lambda, psi: sp.Lambda):
    """Branches for k11 == 0 or k22 == 0 (u or v identically 0), when they are finite."""
    printer = _Printer()
    p0 = phi.expr.xreplace({phi.variables[0]: sp.S.Zero})
    q0 = psi.expr.xreplace({psi.variables[0]: sp.S.Zero})
    k11 = sp.Symbol("k11", real=True)
    k22 = sp.Symbol("k22", real=True)
    e_psi = closed_form_1d(psi)
    e_phi = closed_form_1d(phi)
    cands = [("k11 == 0.0 and k22 == 0.0", p0 * q0)]
    if e_psi is not None:
        cands.append(("k11 == 0.0", (p0 * e_psi).xreplace({_K: k22})))
    if e_phi is not None:
        cands.append(("k22 == 0.0", (q0 * e_phi).xreplace({_K: k11})))
    out = []
    for cond, val in cands:
        if val.has(sp.DiracDelta, sp.zoo, sp.oo, -sp.oo, sp.nan):
            continue
        try:
            code = printer.doprint(val)
        except ValueError:
            continue
        out += [f"    if {cond}:", f"        return float({code})"]
    return out


_OBJECTS: dict = {}


def _canon(lam: sp.Lambda) -> str:
    return sp.srepr(lam.expr.xreplace({lam.variables[0]: sp.Symbol("x", real=True)}))


def _method_closed(used: set) -> str:
    order = ["arc-cosine", "erf arcsin", "Gaussian tilt", "characteristic function",
             "Stein/Isserlis", "conditional delta", "parity"]
    names = [n for n in order if n in used]
    return "closed form: " + (" + ".join(names) if names else "constant")


def pair_expectation(phi, psi, rtol: float = 1e-10, kmax: float = 20.0,
                     strategy: str = "auto") -> PairExpectation:
    """Build E[phi(u) psi(v)] for (u, v) ~ N(0, [[k11, k12], [k12, k22]]).

    phi, psi: one-variable functions (see ``as_lambda``).  rtol: target relative accuracy of
    quadrature (relative to max(|E|, 1e-2 S), S = sqrt(E phi^2 E psi^2)); kmax: the largest
    variance in the probe set used to choose the quadrature step (the rules' node counts grow
    like log k, so accuracy holds well beyond it, and ``estimate_error`` checks real inputs).
    strategy: "auto" (closed form, else 1-D quadrature for a polynomial factor, else 2-D
    quadrature), "closed" (raise if there is no closed form) or "quadrature" (always the 2-D
    rule; for cross-checking closed forms).
    """
    if strategy not in ("auto", "closed", "quadrature"):
        raise ValueError(f"strategy must be 'auto', 'closed' or 'quadrature', not {strategy!r}")
    phi, psi = as_lambda(phi), as_lambda(psi)
    key = ("pair", _canon(phi), _canon(psi), float(rtol), float(kmax), strategy)
    with _LOCK:
        if key in _OBJECTS:
            return _OBJECTS[key]
    used: set = set()
    expr = closed_form_pair(phi, psi, used) if strategy != "quadrature" else None
    if expr is not None:
        obj = _build_closed_pair(phi, psi, expr, used)
    elif strategy == "closed":
        raise ValueError(f"no closed form known for E[{phi.expr} * {psi.expr}]")
    else:
        obj = _build_polynomial_pair(phi, psi, rtol, kmax) if strategy == "auto" else None
        if obj is None:
            obj = _build_quadrature_pair(phi, psi, rtol, kmax)
    with _LOCK:
        _OBJECTS[key] = obj
    return obj


def _build_closed_pair(phi, psi, expr, used) -> PairExpectation:
    source = _closed_source(expr, _degenerate_lines(phi, psi))
    mod = _load_module(source)
    return PairExpectation(
        phi=phi, psi=psi, method=_method_closed(used), source=source, scalar=mod.f,
        expression=expr, error_estimate=0.0, _evaluate=mod.evaluate,
    )


def _as_poly(lam: sp.Lambda):
    """lam as a sympy Poly in its variable with numeric coefficients, or None."""
    x = lam.variables[0]
    try:
        poly = sp.Poly(sp.expand(lam.expr), x)
    except sp.PolynomialError:
        return None
    if any(c.free_symbols for c in poly.all_coeffs()):
        return None
    return poly


def _build_polynomial_pair(phi, psi, rtol, kmax):
    """E[P(w) g(v)] = sum_j c_j(k) E[v^j g(v)]: one-dimensional quadrature in v.

    Given v, w = (k12/kv) v + e with e ~ N(0, tau), tau = kw - k12^2/kv independent of v, so
    E[w^p | v] = sum_j C(p, j) (k12 v / kv)^j E[e^(p-j)].
    """
    poly, other, swapped = _as_poly(phi), psi, False
    if poly is None:
        poly, other, swapped = _as_poly(psi), phi, True
    if poly is None or other.expr.has(sp.DiracDelta):
        return None
    deg = poly.degree()
    kw, kv = (K11, K22) if not swapped else (K22, K11)
    tau = kw - K12**2 / kv
    q = sp.symbols(f"q0:{deg + 1}", real=True)
    total = sp.S.Zero
    for (p,), c in poly.terms():
        for j in range(p + 1):
            m = p - j
            if m % 2:
                continue
            em = sp.factorial2(m - 1) * tau ** (m // 2) if m else sp.S.One
            total += c * sp.binomial(p, j) * (K12 / kv) ** j * em * q[j]
    x = other.variables[0]
    funcs = [sp.Lambda(x, x**j * other.expr) for j in range(deg + 1)]
    kink = _has_kink(other.expr)
    src1 = _oned_source(funcs, kink)
    mod1 = _load_module(src1)
    rule = _select_1d_rule(src1, mod1, funcs, rtol, kmax, kink)
    printer = _Printer()
    ks = {K11: sp.Symbol("k11", real=True), K12: sp.Symbol("k12", real=True),
          K22: sp.Symbol("k22", real=True)}
    kvname, kwname = ("k22", "k11") if not swapped else ("k11", "k22")
    moment = sum(
        (c * sp.factorial2(p - 1) * sp.Symbol(kwname, real=True) ** (p // 2) if p else c)
        for (p,), c in poly.terms() if p % 2 == 0
    )
    qs = ", ".join(f"q{j}" for j in range(deg + 1)) + ("," if deg == 0 else "")
    imp = f"from {_modname(src1)} import _core1\n"
    body = _HEADER + imp + f"""
@njit(cache=True)
def f(k11, k12, k22):
    if not (k11 >= 0.0 and k22 >= 0.0):
        return math.nan
    _m, _n = _core1({kvname}, {rule.h!r}, np.int64({rule.kind}), {rule.C!r})
    {qs} = _m[0]
    if {kvname} == 0.0:
        return q0 * ({printer.doprint(sp.S(moment))})
    return {printer.doprint(total.xreplace(ks))}
""" + _EVALUATE_SOURCE
    mod = _load_module(body)
    source = src1 + body.replace(_HEADER, "").replace(imp, "")
    which = "phi" if not swapped else "psi"
    method = (
        f"quadrature (1-D): {which} is a polynomial, E[P(u) g(v)] = E_v[E[P(u)|v] g(v)]; "
        f"{rule.describe(kink)}, h={rule.h:.3g}, ~{rule.evals:.0f} points"
    )
    combine = sp.lambdify([K11, K12, K22, *q], total, modules="numpy")

    def runner(a, b, c, h):
        kvals = c if not swapped else a
        means = np.array([mod1._core1(k, h, rule.kind, rule.C)[0][0] for k in kvals])
        with np.errstate(all="ignore"):
            return np.asarray(combine(a, b, c, *means.T), dtype=float) * np.ones(a.size)

    plam = sp.Lambda(poly.gens[0], poly.as_expr())

    def scale(a, c):
        kp, ko = (a, c) if not swapped else (c, a)
        return np.sqrt(_reference_moment(plam, kp) * _reference_moment(other, ko))

    return PairExpectation(
        phi=phi, psi=psi, method=method, source=source, scalar=mod.f, expression=None,
        error_estimate=rule.error,
        rule=dict(kind=rule.kind, h=rule.h, C=rule.C, evals=rule.evals, swapped=swapped),
        _evaluate=mod.evaluate, _rule_runner=runner, _scale=scale,
    )


def _select_1d_rule(src1, mod1, funcs, rtol, kmax, kink) -> _Rule:
    key = f"1d|{rtol!r}|{kmax!r}|{_GEN_VERSION}"
    cached = _read_rules(src1).get(key)
    if cached:
        return _Rule(**cached)
    ks = np.array([0.01, 0.04, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, kmax / 4, kmax / 2, kmax],
                  dtype=np.float64)

    def run(h, kind, C):
        vals, counts = [], []
        for k in ks:
            (means, sqs), n = mod1._core1(k, h, kind, C)
            vals.append(list(means) + [math.sqrt(max(s, 0.0)) for s in sqs])
            counts.append(n)
        return np.array(vals), np.array(counts, dtype=float)

    nf = len(funcs)

    def scale_fn(ref):
        # error of each mean relative to max(|mean|, 1e-2 sqrt(E g^2)); the rms columns too
        sc = np.concatenate([ref[:, nf:], ref[:, nf:]], axis=1)
        return sc

    kinds = [(0, 1.0)] if kink else [(0, 1.5), (0, 2.0), (1, 1.0)]
    rule = _probe(run, kinds, rtol, scale_fn)
    _write_rules(src1, key, rule.__dict__)
    return rule


def _build_quadrature_pair(phi, psi, rtol, kmax) -> PairExpectation:
    for lam in (phi, psi):
        if lam.expr.has(sp.DiracDelta):
            raise ValueError(
                f"E[phi(u) psi(v)] with {lam.expr}: a Dirac delta has no pointwise value and "
                "this combination has no closed form"
            )
    # the inner function should have a parity (halves the inner integrals); swap if needed
    par_psi = _parity_code(psi)
    par_phi = _parity_code(phi)
    swapped = par_psi is None and par_phi is not None
    outer, inner = (psi, phi) if swapped else (phi, psi)
    parity = par_phi if swapped else par_psi
    okink, ikink = _has_kink(outer.expr), _has_kink(inner.expr)
    kinks = okink or ikink
    src_a = _quad_pair_source(outer, inner, okink or ikink, ikink, parity)
    mod_a = _load_module(src_a)
    rule = _select_pair_rule(src_a, mod_a, outer, inner, rtol, kmax, kinks)
    call = "_core(k22, k12, k11" if swapped else "_core(k11, k12, k22"
    body = (
        _HEADER
        + f"from {_modname(src_a)} import _core\n"
        + f"""
@njit(cache=True)
def f(k11, k12, k22):
    return {call}, {rule.h!r}, np.int64({rule.kind}), {rule.C!r})[0]
"""
        + _EVALUATE_SOURCE
    )
    mod_b = _load_module(body)
    source = src_a + body.replace(_HEADER, "").replace(f"from {_modname(src_a)} import _core\n", "")
    pts = _typical_points(mod_a, rule, kmax)
    method = (
        f"quadrature: {rule.describe(kinks)}, conditional 2-D (outer x inner), h={rule.h:.3g}, "
        f"~{pts[0]:.0f} points at k=1, ~{pts[1]:.0f} at k={kmax:g}"
        + (", inner parity shortcut" if parity is not None else "")
    )

    def runner(a, b, c, h):
        out = np.empty(a.size)
        cnt = np.empty(a.size, dtype=np.int64)
        if swapped:
            mod_a._core_many(c, b, a, h, rule.kind, rule.C, out, cnt)
        else:
            mod_a._core_many(a, b, c, h, rule.kind, rule.C, out, cnt)
        return out

    def scale(a, c):
        return np.sqrt(_reference_moment(phi, a) * _reference_moment(psi, c))

    return PairExpectation(
        phi=phi, psi=psi, method=method, source=source, scalar=mod_b.f, expression=None,
        error_estimate=rule.error,
        rule=dict(kind=rule.kind, h=rule.h, C=rule.C, evals=rule.evals, swapped=swapped,
                  outer_kink=bool(kinks), inner_kink=bool(ikink), parity=parity),
        _evaluate=mod_b.evaluate, _rule_runner=runner, _scale=scale,
    )


def _typical_points(mod_a, rule, kmax):
    """Evaluations of the inner function at k11 = k22 = k, rho = 0.5 for k = 1 and kmax."""
    k = np.array([1.0, kmax])
    out = np.empty(2)
    cnt = np.empty(2, dtype=np.int64)
    mod_a._core_many(k, 0.5 * k, k, rule.h, rule.kind, rule.C, out, cnt)
    return cnt


def _select_pair_rule(src_a, mod_a, outer, inner, rtol, kmax, kinks) -> _Rule:
    key = f"pair|{rtol!r}|{kmax!r}|{_GEN_VERSION}"
    cached = _read_rules(src_a).get(key)
    if cached:
        return _Rule(**cached)
    k11, k12, k22 = _probe_covariances(kmax)
    scale = np.sqrt(_reference_moment(outer, k11) * _reference_moment(inner, k22))

    def run(h, kind, C):
        out = np.empty(k11.size)
        cnt = np.empty(k11.size, dtype=np.int64)
        mod_a._core_many(k11, k12, k22, h, kind, C, out, cnt)
        return out, cnt.astype(float)

    kinds = [(0, 1.0)] if kinks else [(0, 1.5), (0, 2.0), (1, 1.0)]
    rule = _probe(run, kinds, rtol, lambda ref: scale)
    _write_rules(src_a, key, rule.__dict__)
    return rule


def expectation(phi, rtol: float = 1e-10, kmax: float = 20.0,
                strategy: str = "auto") -> Expectation1D:
    """Build E[phi(u)], u ~ N(0, k): closed form when phi is a combination of atoms, else a
    1-D quadrature with the same rules as the pair case (probed for rtol).  strategy as in
    ``pair_expectation``."""
    if strategy not in ("auto", "closed", "quadrature"):
        raise ValueError(f"strategy must be 'auto', 'closed' or 'quadrature', not {strategy!r}")
    phi = as_lambda(phi)
    key = ("1d", _canon(phi), float(rtol), float(kmax), strategy)
    with _LOCK:
        if key in _OBJECTS:
            return _OBJECTS[key]
    expr = closed_form_1d(phi) if strategy != "quadrature" else None
    if expr is None and strategy == "closed":
        raise ValueError(f"no closed form known for E[{phi.expr}]")
    if expr is not None:
        p0 = phi.expr.xreplace({phi.variables[0]: sp.S.Zero})
        degenerate = None
        if p0.is_number and p0.is_finite:
            degenerate = ["    if k == 0.0:", f"        return float({_Printer().doprint(p0)})"]
        source = _closed_source(expr, degenerate, args=("k",))
        mod = _load_module(source)
        obj = Expectation1D(phi=phi, method="closed form", source=source, scalar=mod.f,
                            expression=expr, _evaluate=mod.evaluate)
    else:
        if phi.expr.has(sp.DiracDelta):
            raise ValueError(f"E[{phi.expr}] has a Dirac delta and no closed form")
        kink = _has_kink(phi.expr)
        src1 = _oned_source([phi], kink)
        mod1 = _load_module(src1)
        rule = _select_1d_rule(src1, mod1, [phi], rtol, kmax, kink)
        body = (
            _HEADER + f"from {_modname(src1)} import _core1\n" + f"""
@njit(cache=True)
def f(k):
    return _core1(k, {rule.h!r}, np.int64({rule.kind}), {rule.C!r})[0][0][0]
"""
            + _EVALUATE1_SOURCE
        )
        mod = _load_module(body)
        source = src1 + body.replace(_HEADER, "").replace(f"from {_modname(src1)} import _core1\n", "")
        obj = Expectation1D(
            phi=phi, method=f"quadrature (1-D): {rule.describe(kink)}, h={rule.h:.3g}, "
            f"~{rule.evals:.0f} points", source=source, scalar=mod.f,
            error_estimate=rule.error, rule=dict(kind=rule.kind, h=rule.h, C=rule.C),
            _evaluate=mod.evaluate,
        )
    with _LOCK:
        _OBJECTS[key] = obj
    return obj
