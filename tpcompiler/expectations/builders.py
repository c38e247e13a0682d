"""Builders of expectations as generated Numba code: ``pair_expectation`` and ``expectation``.

``pair_expectation(phi, psi)`` builds E[phi(u) psi(v)], (u, v) ~ N(0, [[k11, k12], [k12, k22]]),
as a module defining the scalar njit function ``f(k11, k12, k22)`` and the parallel array
evaluator ``evaluate``, by the first strategy that applies:

1. a closed form (``closed_forms``), printed by the Numba printer, with exact branches for a
   zero variance: k11 == 0 means u == 0, so E = phi(0) E[psi(v)] with the pointwise value
   phi(0) (step(0) = 0);
2. a polynomial factor: E[P(u) g(v)] = E_v[E[P(u) | v] g(v)], a one-dimensional quadrature of
   the moments E[v^j g(v)] (``oned_module``), combined in closed form;
3. the two-dimensional conditional quadrature (``pair_module``), with the function that has a
   reflection (``functions.reflection``) as the inner one.

Quadrature rules are chosen by probing (``probing``); ``PairExpectation.error_estimate`` is the
largest estimated error on the probe set, relative to max(|E|, 1e-2 S), S = sqrt(E[phi(u)^2]
E[psi(v)^2]).  Negative or non-finite variances give NaN.  ``expectation(phi)`` builds E[phi(u)],
u ~ N(0, k), likewise (closed form, else the one-dimensional rule).

Accuracy: with the split rule for far features and closed forms written without
cancellation, results stay within rtol from variance 1e-8 to 1e12 and at any correlation
(tests/test_kernel_scales.py checks them against an independent QUADPACK reference).  Inputs
are float64 covariances: near correlation +-1 an expectation can be ill-conditioned in them
(E[step step] has a square-root singularity at rho = 1; E[erf' erf'] at variance k moves by
~k eps per ulp of k12), and the result is then exact for a covariance within a few ulps of the
given one, which is all float64 inputs determine.

Built objects are cached in-process by their functions and parameters, and the generated
modules on disk by the hash of their source (``source.Module``), with the rules that probing
chose, so a second run pays neither JIT nor probing time.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from tpcompiler.backends import codegen
from tpcompiler.expectations import closed_forms, probing
from tpcompiler.expectations.closed_forms import K, K11, K12, K22, closed_form_1d, closed_form_pair
from tpcompiler.expectations.functions import as_lambda, as_poly, canonical, has_kink, kink_away_from_zero, reflection
from tpcompiler.expectations.quadrature import oned_module, pair_module
from tpcompiler.expectations.source import Module, evaluate_function, function, listing, targets

_LOCK = threading.RLock()
_OBJECTS: dict = {}
_STRATEGIES = ("auto", "closed", "quadrature")
_PAIR_ARGS = ("k11", "k12", "k22")


def _as_float_arrays(*arrays):
    arrs = np.broadcast_arrays(*[np.asarray(a, dtype=np.float64) for a in arrays])
    shape = arrs[0].shape
    return shape, [np.ascontiguousarray(a).ravel() for a in arrs]


@dataclass(kw_only=True)
class _Expectation:
    """Fields and methods common to both kinds of generated expectation."""

    phi: sp.Lambda
    method: str
    source: str
    scalar: object
    expression: sp.Expr | None = None
    error_estimate: float = 0.0
    rule: dict = field(default_factory=dict)
    _evaluate: object = None
    _symbols = ()  # the variables of ``expression``

    def evaluate(self, *variances) -> np.ndarray:
        """The expectation elementwise over broadcast arrays (float64, parallel)."""
        shape, flat = _as_float_arrays(*variances)
        out = np.empty(flat[0].size, dtype=np.float64)
        if out.size:
            self._evaluate(*flat, out)
        return out.reshape(shape)

    def __call__(self, *variances) -> np.ndarray:
        return self.evaluate(*variances)

    def at(self, *variances) -> sp.Expr:
        """The closed form (``expression``) at the given variances (sympy expressions)."""
        return self.expression.xreplace(dict(zip(self._symbols, variances)))


@dataclass(kw_only=True)
class PairExpectation(_Expectation):
    """E[phi(u) psi(v)] for (u, v) ~ N(0, [[k11, k12], [k12, k22]]) as generated Numba code.

    Attributes: ``phi``, ``psi`` (sympy Lambdas), ``method`` (how it is computed),
    ``expression`` (the closed form in K11, K12, K22, or None), ``source`` (the generated
    Python source defining ``f(k11, k12, k22)``), ``scalar`` (the compiled ``f``, callable
    from Python and from other njit code), ``error_estimate`` (estimated relative error on
    the probe set; 0 for closed forms, which are exact up to rounding), ``rule`` (the
    quadrature parameters).  ``evaluate(k11, k12, k22)`` broadcasts arrays and runs in
    parallel; ``at(k11, k12, k22)`` is the closed form at sympy arguments.
    """

    psi: sp.Lambda
    _rule_runner: object = None  # (k11, k12, k22, h) -> values, for error estimates
    _scale: object = None  # (k11, k22) -> S = sqrt(E phi^2 E psi^2)
    _symbols = (K11, K12, K22)

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
        fine = self._rule_runner(a, b, c, h * 0.92**probing.FINE)
        return probing.rel_err(coarse, fine, self._scale(a, c))


@dataclass(kw_only=True)
class Expectation1D(_Expectation):
    """E[phi(u)], u ~ N(0, k), as generated Numba code (``scalar(k)``, ``evaluate(k)``,
    ``at(k)``; other attributes as in ``PairExpectation``)."""

    _symbols = (K,)


def _cached(key, build):
    """The object of ``key``, built once per process."""
    with _LOCK:
        if key in _OBJECTS:
            return _OBJECTS[key]
    obj = build()
    with _LOCK:
        _OBJECTS[key] = obj
    return obj


def _check_strategy(strategy: str) -> None:
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be 'auto', 'closed' or 'quadrature', not {strategy!r}")


def _no_delta(lam: sp.Lambda, message: str) -> None:
    if lam.expr.has(sp.DiracDelta):
        raise ValueError(message)


def _kinks_at_zero(lam: sp.Lambda, what: str) -> None:
    """Refuse a quadrature of a function with a kink or jump the rules do not split at
    (``functions.kink_away_from_zero``): a clear error instead of a wrong number."""
    f = kink_away_from_zero(lam)
    if f is not None:
        raise ValueError(f"{what} with {lam.expr}: {f} has a kink or a jump away from 0, which the quadrature "
                         "rules (split at 0) do not integrate accurately, and this function has no closed form")


# ---------------------------------------------------------------------------------------
# Generated functions
# ---------------------------------------------------------------------------------------
# Closed forms divide as floats do (error_model "numpy", as the kernel stages that inline
# them): where an expectation diverges, E[delta(u) delta(v)] at rho = +-1 or E[delta(u)] at
# k = 0, the density at 0 is infinite and so is the value, not a ZeroDivisionError.
_CLOSED = """
    @njit(cache=True, error_model="numpy")
    def f($args):
        if not ($guard):
            return math.nan
        $degenerate
        $body
        return $result
"""

_POLYNOMIAL = """
    @njit(cache=True)
    def f(k11, k12, k22):
        if not (k11 >= 0.0 and k22 >= 0.0):
            return math.nan
        _m, _n = _core1($kv, $h, np.int64($kind), $C)
        $moments = _m[0]
        if $kv == 0.0:
            return q0 * ($moment)
        return $total
"""

_QUADRATURE = """
    @njit(cache=True)
    def f(k11, k12, k22):
        return _core($args, $h, np.int64($kind), $C)[0]
"""

_QUADRATURE_1D = """
    @njit(cache=True)
    def f(k):
        return _core1(k, $h, np.int64($kind), $C)[0][0][0]
"""


def _rule_holes(rule: probing.Rule) -> dict:
    """The rule's parameters as template holes (exact float literals)."""
    return dict(h=repr(rule.h), kind=repr(rule.kind), C=repr(rule.C))


def _closed_module(expr: sp.Expr, degenerate: list[tuple[str, str]], variables) -> Module:
    """The module of f(*variables) (the symbols K11, K12, K22 or K, printed by their names)
    from a closed form; ``degenerate``: (condition, printed value) branches taken first."""
    args = tuple(v.name for v in variables)
    lines, outs = codegen.print_expressions([expr], "")
    guard = " and ".join(f"{a} >= 0.0" for a in args if a != "k12")
    branches = "\n".join(f"if {cond}:\n    return float({value})" for cond, value in degenerate)
    return Module((
        codegen.custom_functions_source([expr]),
        function(_CLOSED, args=", ".join(args), guard=guard, degenerate=branches,
                 body="\n".join(lines), result=outs[0]),
        evaluate_function(args),
    ))


def _printable(value: sp.Expr) -> str | None:
    """The printed number ``value``, or None when it is not finite or has no pointwise value."""
    if value.has(sp.DiracDelta, sp.zoo, sp.oo, -sp.oo, sp.nan):
        return None
    try:
        return codegen.NumbaPrinter().doprint(value)
    except ValueError:
        return None


def _degenerate_pair(phi: sp.Lambda, psi: sp.Lambda) -> list[tuple[str, str]]:
    """Branches for k11 == 0 or k22 == 0 (u or v identically 0), when they are finite:
    E = phi(0) psi(0), phi(0) E[psi(v)] or psi(0) E[phi(u)]."""
    p0 = phi.expr.xreplace({phi.variables[0]: sp.S.Zero})
    q0 = psi.expr.xreplace({psi.variables[0]: sp.S.Zero})
    e_psi = closed_form_1d(psi)
    e_phi = closed_form_1d(phi)
    cands = [("k11 == 0.0 and k22 == 0.0", p0 * q0)]
    if e_psi is not None:
        cands.append(("k11 == 0.0", (p0 * e_psi).xreplace({K: K22})))
    if e_phi is not None:
        cands.append(("k22 == 0.0", (q0 * e_phi).xreplace({K: K11})))
    out = []
    for cond, value in cands:
        code = _printable(value)
        if code is not None:
            out.append((cond, code))
    return out


# ---------------------------------------------------------------------------------------
# Pair expectations
# ---------------------------------------------------------------------------------------
def pair_expectation(phi, psi, rtol: float = 1e-10, kmax: float = 20.0,
                     strategy: str = "auto") -> PairExpectation:
    """Build E[phi(u) psi(v)] for (u, v) ~ N(0, [[k11, k12], [k12, k22]]).

    phi, psi: one-variable functions (see ``as_lambda``).  rtol: target relative accuracy of
    quadrature (relative to max(|E|, 1e-2 S), S = sqrt(E phi^2 E psi^2)); kmax: the largest
    variance in the probe set used to choose the quadrature step (the rules' node counts grow
    like log k, so for monotone and slowly varying functions accuracy holds well beyond it;
    not for oscillating ones: sin(u) tanh(u) is right to 3e-8 at k = 100 and wrong in sign at
    k = 1e3, so give a kmax that covers the variances used, and ``estimate_error`` checks
    real inputs).
    strategy: "auto" (closed form, else 1-D quadrature for a polynomial factor, else 2-D
    quadrature), "closed" (raise if there is no closed form) or "quadrature" (always the 2-D
    rule; for cross-checking closed forms).
    """
    _check_strategy(strategy)
    phi, psi = as_lambda(phi), as_lambda(psi)
    key = ("pair", canonical(phi), canonical(psi), float(rtol), float(kmax), strategy)
    return _cached(key, lambda: _build_pair(phi, psi, rtol, kmax, strategy))


def _build_pair(phi, psi, rtol, kmax, strategy) -> PairExpectation:
    used: set = set()
    expr = closed_form_pair(phi, psi, used) if strategy != "quadrature" else None
    if expr is not None:
        return _build_closed_pair(phi, psi, expr, used)
    if strategy == "closed":
        raise ValueError(f"no closed form known for E[{phi.expr} * {psi.expr}]")
    obj = _build_polynomial_pair(phi, psi, rtol, kmax) if strategy == "auto" else None
    return obj if obj is not None else _build_quadrature_pair(phi, psi, rtol, kmax)


def _build_closed_pair(phi, psi, expr, used) -> PairExpectation:
    module = _closed_module(expr, _degenerate_pair(phi, psi), (K11, K12, K22))
    loaded = module.load()
    return PairExpectation(
        phi=phi, psi=psi, method=closed_forms.describe(used), source=module.source,
        scalar=loaded.f, expression=expr, error_estimate=0.0, _evaluate=loaded.evaluate,
    )


def _build_polynomial_pair(phi, psi, rtol, kmax):
    """E[P(w) g(v)] = sum_j c_j(k) E[v^j g(v)]: one-dimensional quadrature in v.

    Given v, w = (k12/kv) v + e with e ~ N(0, tau), tau = kw - k12^2/kv independent of v, so
    E[w^p | v] = sum_j C(p, j) (k12 v / kv)^j E[e^(p-j)], E[e^m] = (m-1)!! tau^(m/2) (m even),
    and q_j = E[v^j g(v)] come from one rule.  At kv = 0 (v == 0): E = q0 E[P(w)].
    """
    poly, other, swapped = as_poly(phi), psi, False
    if poly is None:
        poly, other, swapped = as_poly(psi), phi, True
    if poly is None or other.expr.has(sp.DiracDelta):
        return None
    # (its 1-D rule splits at 0 too: step(v - 1) v' was 0.7% off with an error estimate of 0)
    _kinks_at_zero(other, "E[phi(u) psi(v)]")
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
    kink = has_kink(other.expr)
    base = oned_module(funcs, kink)
    core1 = base.load()._core1
    rule = probing.oned_rule(base, core1, len(funcs), rtol, kmax, kink)
    printer = codegen.NumbaPrinter()
    moment = sum(  # E[P(w)] = sum_p c_p (p-1)!! kw^(p/2) over even p
        (c * sp.factorial2(p - 1) * kw ** (p // 2) if p else c)
        for (p,), c in poly.terms() if p % 2 == 0
    )
    wrapper = Module((
        function(_POLYNOMIAL, kv=kv.name, moments=targets(f"q{j}" for j in range(deg + 1)),
                 moment=printer.doprint(sp.S(moment)), total=printer.doprint(total),
                 **_rule_holes(rule)),
        evaluate_function(_PAIR_ARGS),
    ), imports=(base.importing("_core1"),))
    loaded = wrapper.load()
    which = "phi" if not swapped else "psi"
    method = (
        f"quadrature (1-D): {which} is a polynomial, E[P(u) g(v)] = E_v[E[P(u)|v] g(v)]; "
        f"{rule.describe(kink)}, h={rule.h:.3g}, ~{rule.evals:.0f} points"
    )
    combine = sp.lambdify([K11, K12, K22, *q], total, modules="numpy")

    def runner(a, b, c, h):
        kvals = c if not swapped else a
        means = np.array([core1(k, h, rule.kind, rule.C)[0][0] for k in kvals])
        with np.errstate(all="ignore"):
            return np.asarray(combine(a, b, c, *means.T), dtype=float) * np.ones(a.size)

    plam = sp.Lambda(poly.gens[0], poly.as_expr())

    def scale(a, c):
        kp, ko = (a, c) if not swapped else (c, a)
        return np.sqrt(probing.reference_moment(plam, kp) * probing.reference_moment(other, ko))

    return PairExpectation(
        phi=phi, psi=psi, method=method, source=listing(base, wrapper), scalar=loaded.f,
        expression=None, error_estimate=rule.error,
        rule=dict(kind=rule.kind, h=rule.h, C=rule.C, evals=rule.evals, swapped=swapped),
        _evaluate=loaded.evaluate, _rule_runner=runner, _scale=scale,
    )


def _build_quadrature_pair(phi, psi, rtol, kmax) -> PairExpectation:
    for lam in (phi, psi):
        _no_delta(lam, f"E[phi(u) psi(v)] with {lam.expr}: a Dirac delta has no pointwise value "
                       "and this combination has no closed form")
        _kinks_at_zero(lam, "E[phi(u) psi(v)]")
    # the inner function should have a reflection (halves the inner integrals); swap if needed
    ref_psi = reflection(psi)
    ref_phi = reflection(phi)
    swapped = ref_psi is None and ref_phi is not None
    outer, inner = (psi, phi) if swapped else (phi, psi)
    ref = ref_phi if swapped else ref_psi
    okink, ikink = has_kink(outer.expr), has_kink(inner.expr)
    kinks = okink or ikink
    base = pair_module(outer, inner, kinks, ikink, ref)
    core_many = base.load()._core_many
    rule = probing.pair_rule(base, core_many, outer, inner, rtol, kmax, kinks)
    args = "k22, k12, k11" if swapped else "k11, k12, k22"
    wrapper = Module((function(_QUADRATURE, args=args, **_rule_holes(rule)), evaluate_function(_PAIR_ARGS)),
                     imports=(base.importing("_core"),))
    loaded = wrapper.load()
    pts = _typical_points(core_many, rule, kmax)
    method = (
        f"quadrature: {rule.describe(kinks)}, conditional 2-D (outer x inner), h={rule.h:.3g}, "
        f"~{pts[0]:.0f} points at k=1, ~{pts[1]:.0f} at k={kmax:g}"
        + (", inner parity shortcut" if ref is not None else "")
    )

    def runner(a, b, c, h):
        out = np.empty(a.size)
        cnt = np.empty(a.size, dtype=np.int64)
        if swapped:
            core_many(c, b, a, h, rule.kind, rule.C, out, cnt)
        else:
            core_many(a, b, c, h, rule.kind, rule.C, out, cnt)
        return out

    def scale(a, c):
        return np.sqrt(probing.reference_moment(phi, a) * probing.reference_moment(psi, c))

    return PairExpectation(
        phi=phi, psi=psi, method=method, source=listing(base, wrapper), scalar=loaded.f,
        expression=None, error_estimate=rule.error,
        rule=dict(kind=rule.kind, h=rule.h, C=rule.C, evals=rule.evals, swapped=swapped,
                  outer_kink=bool(kinks), inner_kink=bool(ikink), parity=ref),
        _evaluate=loaded.evaluate, _rule_runner=runner, _scale=scale,
    )


def _typical_points(core_many, rule, kmax):
    """Evaluations of the inner function at k11 = k22 = k, rho = 0.5 for k = 1 and kmax."""
    k = np.array([1.0, kmax])
    out = np.empty(2)
    cnt = np.empty(2, dtype=np.int64)
    core_many(k, 0.5 * k, k, rule.h, rule.kind, rule.C, out, cnt)
    return cnt


# ---------------------------------------------------------------------------------------
# One-variable expectations
# ---------------------------------------------------------------------------------------
def expectation(phi, rtol: float = 1e-10, kmax: float = 20.0,
                strategy: str = "auto") -> Expectation1D:
    """Build E[phi(u)], u ~ N(0, k): closed form when phi is a combination of atoms, else a
    1-D quadrature with the same rules as the pair case (probed for rtol).  strategy as in
    ``pair_expectation``."""
    _check_strategy(strategy)
    phi = as_lambda(phi)
    key = ("1d", canonical(phi), float(rtol), float(kmax), strategy)
    return _cached(key, lambda: _build_1d(phi, rtol, kmax, strategy))


def _build_1d(phi, rtol, kmax, strategy) -> Expectation1D:
    expr = closed_form_1d(phi) if strategy != "quadrature" else None
    if expr is None and strategy == "closed":
        raise ValueError(f"no closed form known for E[{phi.expr}]")
    if expr is not None:
        p0 = phi.expr.xreplace({phi.variables[0]: sp.S.Zero})
        degenerate = []
        # k == 0: u == 0, E = phi(0); a Dirac delta has no value there (E[delta(u)] -> inf)
        if p0.is_number and p0.is_finite and not p0.has(sp.DiracDelta):
            degenerate = [("k == 0.0", codegen.NumbaPrinter().doprint(p0))]
        module = _closed_module(expr, degenerate, (K,))
        loaded = module.load()
        return Expectation1D(phi=phi, method="closed form", source=module.source, scalar=loaded.f,
                             expression=expr, _evaluate=loaded.evaluate)
    _no_delta(phi, f"E[{phi.expr}] has a Dirac delta and no closed form")
    _kinks_at_zero(phi, "E[phi(u)]")
    kink = has_kink(phi.expr)
    base = oned_module([phi], kink)
    rule = probing.oned_rule(base, base.load()._core1, 1, rtol, kmax, kink)
    wrapper = Module((function(_QUADRATURE_1D, **_rule_holes(rule)), evaluate_function(("k",))),
                     imports=(base.importing("_core1"),))
    loaded = wrapper.load()
    return Expectation1D(
        phi=phi, method=f"quadrature (1-D): {rule.describe(kink)}, h={rule.h:.3g}, "
        f"~{rule.evals:.0f} points", source=listing(base, wrapper), scalar=loaded.f,
        error_estimate=rule.error, rule=dict(kind=rule.kind, h=rule.h, C=rule.C),
        _evaluate=loaded.evaluate,
    )
