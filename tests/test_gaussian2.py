"""Tests of tpcompiler.expectations: bivariate Gaussian expectations E[phi(u) psi(v)].

Oracles: exact closed forms against the quadrature (and the quadrature against them), the
quadrature against independent integrations computed here (a fine conditional trapezoid grid
and scipy.integrate.quad), and end to end against neural-tangents reference kernels
(tests/data, see its README) through a one-hidden-layer NNGP/NTK recursion written here.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from numba import njit
from scipy import integrate, special

import tpcompiler as tp
from tpcompiler import expectations as g2
from tpcompiler.expectations.functions import numpy_function
from tpcompiler.ir import nonlinearities as nl

X = sp.Symbol("x", real=True)
DATA = Path(__file__).parent / "data"

NUMPY = {
    "tanh": np.tanh,
    "dtanh": lambda v: 1.0 / np.cosh(np.clip(v, -300, 300)) ** 2,
    "gelu": lambda v: 0.5 * v * (1.0 + special.erf(v / math.sqrt(2.0))),
    "sin": np.sin,
    "sigmoid": special.expit,
    "softplus": lambda v: np.logaddexp(0.0, v),
}
SYMPY = {
    "tanh": sp.tanh(X),
    "dtanh": 1 - sp.tanh(X) ** 2,
    "gelu": nl.gelu(X),
    "sin": sp.sin(X),
    "sigmoid": nl.sigmoid(X),
    "softplus": nl.softplus(X),
}


def cov(k11, rho, k22):
    return (k11, rho * math.sqrt(k11 * k22), k22)


# variances up to 20, correlations 0, moderate, 0.999999 and exactly +-1
COVS = [
    cov(1.0, 0.3, 1.0),
    cov(10.0, 0.7, 10.0),
    cov(20.0, -0.5, 20.0),
    cov(20.0, 0.999999, 20.0),
    (20.0, 20.0, 20.0),
    cov(0.5, 0.9, 20.0),
    cov(20.0, -0.99, 2.0),
    (3.0, -3.0, 3.0),
    cov(0.04, 0.6, 0.04),
]


def grid_pair(f, g, k11, k12, k22, n=2001, half_width=10.0):
    """E[f(u) g(v)] by a fine trapezoid rule, u = sqrt(k11) x, v = sqrt(k22)(rho x + s z)."""
    s1, s2 = math.sqrt(k11), math.sqrt(k22)
    rho = max(-1.0, min(1.0, k12 / (s1 * s2)))
    s = math.sqrt(max(0.0, k11 * k22 - k12 * k12) / (k11 * k22))
    x = np.linspace(-half_width, half_width, n)
    w = np.exp(-0.5 * x * x)
    w /= w.sum()
    if s == 0.0:
        return float(np.sum(w * f(s1 * x) * g(s2 * rho * x)))
    G = np.empty(n)
    for i in range(0, n, 400):
        xi = x[i:i + 400, None]
        G[i:i + 400] = (g(s2 * (rho * xi + s * x[None, :])) * w[None, :]).sum(axis=1)
    return float(np.sum(w * f(s1 * x) * G))


def grid_moment(f, k, n=4001, half_width=10.0):
    """E[f(u)^2], u ~ N(0, k), by a fine trapezoid rule."""
    x = np.linspace(-half_width, half_width, n)
    w = np.exp(-0.5 * x * x)
    return float(np.sum(w * f(math.sqrt(k) * x) ** 2) / w.sum())


def grid_scale(f, g, k11, k22):
    """Cauchy-Schwarz scale sqrt(E f(u)^2 E g(v)^2)."""
    return math.sqrt(grid_moment(f, k11) * grid_moment(g, k22))


def quad_pair(f, g, k11, k12, k22, kink_f=False, kink_g=False):
    """E[f(u) g(v)] by nested scipy.integrate.quad (breakpoints at kinks)."""
    s1, s2 = math.sqrt(k11), math.sqrt(k22)
    rho = k12 / (s1 * s2)
    s = math.sqrt(1.0 - rho * rho)
    opts = dict(epsabs=1e-14, epsrel=1e-13, limit=200)
    pdf = lambda t: math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)

    def inner(x):
        pts = [-rho * x / s] if kink_g and abs(rho * x / s) < 12 else None
        return integrate.quad(lambda z: g(s2 * (rho * x + s * z)) * pdf(z), -12, 12,
                              points=pts, **opts)[0]

    pts = [0.0] if (kink_f or kink_g) else None
    return integrate.quad(lambda x: f(s1 * x) * inner(x) * pdf(x), -12, 12, points=pts, **opts)[0]


def rel(q, r, scale):
    """Relative error, measured against 1e-2 of the Cauchy-Schwarz scale for tiny values."""
    if q == r:
        return 0.0
    return abs(q - r) / max(abs(r), 1e-2 * scale, 1e-300)


# ---------------------------------------------------------------------------------------
# Strategy selection and the closed forms
# ---------------------------------------------------------------------------------------
def test_strategy_is_chosen_from_the_expression_structure():
    y = sp.Symbol("y")
    relu_by_max = sp.Lambda(y, sp.Max(y, 0))  # no name: relu recognised from its structure
    assert g2.pair_expectation(relu_by_max, relu_by_max).method == "closed form: arc-cosine"
    assert g2.pair_expectation("step", "step").method == "closed form: arc-cosine"
    assert "erf arcsin" in g2.pair_expectation((sp.erf(2 * X), X), "erf").method
    assert "Gaussian tilt" in g2.pair_expectation((sp.exp(-3 * X**2), X), (sp.exp(-X**2), X)).method
    assert "characteristic" in g2.pair_expectation((sp.sin(2 * X + 1), X), "cos").method
    assert "Stein" in g2.pair_expectation((3 * X, X), "relu").method
    leaky = sp.Lambda(y, sp.Max(y, y / 10))
    assert g2.pair_expectation(leaky, leaky).method.startswith("closed form")
    assert g2.pair_expectation((X, X), "tanh").method.startswith("quadrature (1-D)")
    assert g2.pair_expectation("tanh", "tanh").method.startswith("quadrature: sinh")
    assert g2.pair_expectation((X * sp.tanh(X), X), "sigmoid").method.startswith("quadrature")
    with pytest.raises(ValueError):
        g2.pair_expectation("tanh", "tanh", strategy="closed")


def test_isserlis_and_symbolic_closed_forms():
    k11, k12, k22 = g2.K11, g2.K12, g2.K22
    e = g2.closed_form_pair((X**2, X), (X**2, X))
    assert sp.simplify(e - (k11 * k22 + 2 * k12**2)) == 0
    e = g2.closed_form_pair((X**3, X), (X, X))
    assert sp.simplify(e - 3 * k11 * k12) == 0
    e = g2.closed_form_pair((X**2 + 1, X), (X**4, X))
    assert sp.simplify(e - (3 * k11 * k22**2 + 12 * k12**2 * k22 + 3 * k22**2)) == 0
    # E sin(u) sin(v) = exp(-(k11 + k22)/2) sinh(k12), generated in a form that neither
    # overflows nor cancels (sign(k12), |k12| and expm1): compared with the textbook formula
    e = g2.closed_form_pair("sin", "sin")
    for a, b, c in [(1.0, 0.3, 2.0), (1.0, -0.3, 2.0), (1e-8, 5e-9, 1e-8), (3.0, -2.5, 4.0), (2.0, 0.0, 5.0)]:
        got = float(e.subs({k11: a, k12: b, k22: c}))
        want = float(sp.exp(-(sp.Float(a) + c) / 2) * sp.sinh(sp.Float(b)))
        assert abs(got - want) <= 1e-15 * abs(want) + 1e-300, (a, b, c)
    assert g2.closed_form_pair("tanh", "tanh") is None


def test_closed_forms_are_symmetric_under_exchange():
    """E[phi(u) psi(v)] is E[psi(u) phi(v)] with k11 and k22 exchanged, also for scaled atoms
    whose rule is stated for the other order (the table of pair rules is used both ways):
    E[sin(u) exp(2v)] = exp((4 k22 - k11)/2) sin(2 k12)."""
    k11, k12, k22 = g2.K11, g2.K12, g2.K22
    e = g2.closed_form_pair("sin", (sp.exp(2 * X), X))
    assert sp.simplify(e - sp.exp((4 * k22 - k11) / 2) * sp.sin(2 * k12)) == 0
    funcs = [(sp.sin(2 * X + 1), X), (sp.exp(2 * X), X), (sp.cosh(X), X), (nl.relu(2 * X), X),
             (nl.step(3 * X), X), (sp.erf(2 * X), X), (X**3, X), (sp.exp(-3 * X**2), X)]
    sd = lambda a, b, c: math.sqrt(max(a * c - b * b, 0.0))  # noqa: E731
    t = lambda a, b, c: math.atan2(sd(a, b, c), b)  # noqa: E731
    helpers = {  # the special functions of closed forms, for k11, k22 > 0
        "_det": lambda a, b, c: sd(a, b, c) ** 2,
        "_cvar": lambda a, b, c: sd(a, b, c) ** 2 / c,
        "_gap": lambda a, b, c: (a + c) / 2 - abs(b),
        "_J1": lambda a, b, c: (sd(a, b, c) + (math.pi - t(a, b, c)) * b) / (2 * math.pi),
        "_J0": lambda a, b, c: (math.pi - t(a, b, c)) / (2 * math.pi),
        "_RS": lambda a, b, c: (math.sqrt(a) + b / math.sqrt(c)) / (2 * math.sqrt(2 * math.pi)),
        "step": lambda x: 1.0 if x > 0 else 0.0,  # (E[step(u)] = step(k)/2: 0 at k = 0)
    }

    def value(e, a, b, c):
        return sp.lambdify([k11, k12, k22], e, modules=[helpers, "math"])(a, b, c)

    for f in funcs:
        for g in funcs:
            fg, gf = g2.closed_form_pair(f, g), g2.closed_form_pair(g, f)
            assert (fg is None) == (gf is None)
            if fg is None:
                continue
            want = value(gf, 0.4, -1 / 3, 1.5)
            assert abs(value(fg, 1.5, -1 / 3, 0.4) - want) <= 1e-13 * (1 + abs(want)), (f, g)


ERFP = 2 / sp.sqrt(sp.pi) * sp.exp(-X**2)  # erf'
CLOSED_FORMS = [
    ("relu", "relu"),
    ("step", "step"),
    ("relu", "step"),
    ("erf", "erf"),
    ((ERFP, X), (ERFP, X)),
    ("sin", "sin"),
    ("relu", "erf"),
    ("step", "erf"),
    ((X**2, X), (X**2, X)),
    ((X, X), "tanh"),  # the 1-D (Stein / regression) route against the 2-D rule
]


@pytest.mark.parametrize("phi,psi", CLOSED_FORMS, ids=lambda p: str(p if isinstance(p, str) else p[0]))
def test_closed_forms_agree_with_quadrature(phi, psi):
    exact = g2.pair_expectation(phi, psi)
    assert not exact.method.startswith("quadrature:")
    quad = g2.pair_expectation(phi, psi, rtol=1e-11, strategy="quadrature")
    assert quad.method.startswith("quadrature:")
    f_np = numpy_function(exact.phi)
    g_np = numpy_function(exact.psi)
    for k in COVS + [cov(2.0, 0.0, 5.0), (0.0, 0.0, 2.0), (2.0, 0.0, 0.0)]:
        e, q = exact.scalar(*k), quad.scalar(*k)
        assert rel(e, q, grid_scale(f_np, g_np, k[0], k[2])) <= 1e-10, (k, e, q)


def test_arc_cosine_values_and_degenerate_inputs():
    rr = g2.pair_expectation("relu", "relu").scalar
    ss = g2.pair_expectation("step", "step").scalar
    rs = g2.pair_expectation("relu", "step").scalar
    k11, k12, k22 = 2.0, 0.7, 3.0
    t = math.acos(k12 / math.sqrt(k11 * k22))
    assert rr(k11, k12, k22) == pytest.approx(
        math.sqrt(k11 * k22) * (math.sin(t) + (math.pi - t) * math.cos(t)) / (2 * math.pi), rel=1e-14)
    assert ss(k11, k12, k22) == pytest.approx((math.pi - t) / (2 * math.pi), rel=1e-14)
    assert rs(k11, k12, k22) == pytest.approx(
        math.sqrt(k11) * (1 + k12 / math.sqrt(k11 * k22)) / (2 * math.sqrt(2 * math.pi)), rel=1e-14)
    # diagonal exactly: E relu^2 = k/2, E step^2 = 1/2
    assert rr(1.7, 1.7, 1.7) == pytest.approx(0.85, rel=1e-15)
    assert ss(1.7, 1.7, 1.7) == 0.5
    # u == 0 identically: the pointwise values relu(0) = step(0) = 0; cos(0) = 1
    assert rr(0.0, 0.0, 2.0) == 0.0 and ss(2.0, 0.0, 0.0) == 0.0
    assert g2.pair_expectation("cos", "cos").scalar(0.0, 0.0, 2.0) == pytest.approx(math.exp(-1.0))
    assert math.isnan(rr(-1.0, 0.0, 1.0))
    # the Dirac delta (relu'') as a conditional expectation: p_u(0) E[relu(v) | u = 0]
    d = g2.pair_expectation((sp.DiracDelta(X), X), "relu").scalar(2.0, 0.6, 1.5)
    var = 1.5 - 0.6**2 / 2.0
    assert d == pytest.approx(math.sqrt(var / (2 * math.pi)) / math.sqrt(2 * math.pi * 2.0), rel=1e-14)
    with pytest.raises(ValueError):
        g2.pair_expectation((sp.DiracDelta(X), X), "tanh")


@pytest.mark.parametrize("k", [1e-160, 1e-200, 1e-300, 1e200])
def test_delta_delta_at_tiny_and_huge_variances(k):
    """E[delta(u) delta(v)] = 1 / (2 pi sqrt(k11 k22 - k12^2)) = 1 / (2 pi k sqrt(1 - rho^2))
    at k11 = k22 = k: the determinant's products underflow below about 1e-154 (it was off
    by 4e-5 at 1e-160 and a division by zero at 1e-200) and overflow above 1e154."""
    dd = g2.pair_expectation((sp.DiracDelta(X), X), (sp.DiracDelta(X), X))
    for rho in (0.3, -0.6, 0.0):
        assert dd.scalar(k, rho * k, k) == pytest.approx(1 / (2 * math.pi * k * math.sqrt(1 - rho**2)), rel=1e-14)
    # the mpmath value of the same closed form (a constant folded at compile time)
    assert float(dd.expression.subs({sp.Symbol("k11", real=True): sp.Float(k), sp.Symbol("k12", real=True): sp.Float(0.3 * k),
                                     sp.Symbol("k22", real=True): sp.Float(k)}).evalf(30)) == pytest.approx(
        1 / (2 * math.pi * k * math.sqrt(1 - 0.09)), rel=1e-14)


def test_divergent_delta_expectations_are_infinite():
    """At rho = +-1 (v = +-u) E[delta(u) delta(v)] = E[delta(u)^2] diverges, as the closed form
    1 / (2 pi sqrt(k11 k22 - k12^2)) does; at k = 0 the density of u at 0 is infinite and so
    is E[delta(u)].  They are inf, from the scalar function and the array evaluator alike (a
    ZeroDivisionError inside the evaluator surfaced as a SystemError before)."""
    dd = g2.pair_expectation((sp.DiracDelta(X), X), (sp.DiracDelta(X), X))
    for k12 in (2.0, -2.0):
        assert dd.scalar(2.0, k12, 2.0) == math.inf
    assert np.all(dd.evaluate(np.array([2.0, 2.0]), np.array([2.0, -2.0]), np.array([2.0, 2.0])) == math.inf)
    t = sp.Symbol("t", real=True)
    d1 = g2.expectation(sp.Lambda(t, sp.DiracDelta(t)))
    assert d1.scalar(0.0) == math.inf and d1.evaluate(np.array([0.0]))[0] == math.inf


# ---------------------------------------------------------------------------------------
# Quadrature accuracy against independent integrations
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tanh", "dtanh", "gelu", "sin", "sigmoid", "softplus"])
def test_quadrature_against_fine_grid(name):
    pe = g2.pair_expectation((SYMPY[name], X), (SYMPY[name], X), strategy="quadrature")
    assert pe.method.startswith("quadrature:")
    assert pe.error_estimate <= 1e-10
    f = NUMPY[name]
    a, b, c = (np.array(t) for t in zip(*COVS))
    vals = pe.evaluate(a, b, c)
    for v, (k11, k12, k22) in zip(vals, COVS):
        r = grid_pair(f, f, k11, k12, k22)
        assert rel(v, r, grid_scale(f, f, k11, k22)) <= 1e-9, ((k11, k12, k22), v, r)
    # the sampled error estimate on the caller's inputs is reported and small
    assert pe.estimate_error(a, b, c) <= 1e-9


def test_quadrature_against_scipy_quad_and_mixed_functions():
    pe = g2.pair_expectation("tanh", "sigmoid")
    assert pe.method.startswith("quadrature:")
    for k in [cov(2.0, 0.4, 7.0), cov(15.0, -0.95, 1.0)]:
        r = quad_pair(math.tanh, lambda t: 1.0 / (1.0 + math.exp(-t)), *k)
        assert abs(pe.scalar(*k) - r) <= 1e-10 * max(abs(r), 1e-2)


def test_rules_are_judged_where_the_expectation_exists(tmp_path, monkeypatch):
    """E[exp(u^2/4)] = (1 - k/2)^(-1/2) exists for variances k < 2 only; the probe set reaches
    beyond, where the reference is infinite, and those points made every rule's estimated
    error NaN, so the coarsest rule was used: 7e-4 off at k = 1 (docs audit).  They are left
    out of the comparison now (near k = 2 no rule reaches 1e-10, which the warning says)."""
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path))  # (probe afresh: no stored rule)
    x = sp.Symbol("x", real=True)
    with pytest.warns(RuntimeWarning, match="did not reach rtol"):
        pe = g2.pair_expectation(sp.Lambda(x, sp.exp(x**2 / 4)), sp.Lambda(x, sp.S.One))
    for k in (0.5, 1.0):
        assert abs(pe.scalar(k, 0.0, 1.0) - (1 - k / 2) ** -0.5) < 1e-9, k


@pytest.mark.parametrize("phi,psi,kink_f,kink_g", [
    ("relu", "tanh", True, False),
    ("step", (1 - sp.tanh(X) ** 2, X), True, False),
])
def test_kinked_quadrature(phi, psi, kink_f, kink_g):
    pe = g2.pair_expectation(phi, psi)
    assert "kink" in pe.method
    f, g = numpy_function(pe.phi), numpy_function(pe.psi)
    fs = lambda t: float(f(np.array([t]))[0])
    gs = lambda t: float(g(np.array([t]))[0])
    for k in [cov(1.0, 0.5, 1.0), cov(10.0, -0.9, 4.0), cov(3.0, 0.999, 3.0)]:
        r = quad_pair(fs, gs, *k, kink_f=kink_f, kink_g=kink_g)
        assert rel(pe.scalar(*k), r, 1.0) <= 1e-9, (k, pe.scalar(*k), r)


def test_a_reflection_holds_on_the_whole_line():
    """functions.reflection is applied on the whole line (the quadrature's G(-m) from G(m)):
    tanh + relu satisfies psi(-v) = -psi(v) + v only for v >= 0 (and -psi(v) - v below), so it
    has none, and E[psi(u) psi(v)] must then be computed without it.  With the identity of one
    half line, the quadrature gave 1.043 for 0.796 (a FanInSum of concatenations of different
    nonlinearities, tp.layers: wrong kernels off the diagonal)."""
    from tpcompiler.expectations.functions import reflection

    relu = nl.BUILTINS["relu"]
    assert reflection(sp.Lambda(X, relu(X))) == (1.0, 0.0, -1.0, 0.0)     # relu(-v) = relu(v) - v
    assert reflection(sp.Lambda(X, sp.tanh(X) + relu(X))) is None
    assert reflection(sp.Lambda(X, sp.tanh(X) + sp.Abs(X))) is None
    f = lambda t: math.tanh(t) + max(t, 0.0)
    for phi, psi, f1, f2, kink_f in [(sp.tanh(X) + relu(X), sp.tanh(X) + relu(X), f, f, True),
                                     (sp.tanh(X), sp.tanh(X) + 2 * relu(X), math.tanh,
                                      lambda t: math.tanh(t) + 2 * max(t, 0.0), False)]:
        pe = g2.pair_expectation(sp.Lambda(X, phi), sp.Lambda(X, psi))
        for k in [cov(1.2, 0.4, 2.7), cov(6.0, -0.7, 0.5)]:
            r = quad_pair(f1, f2, *k, kink_f=kink_f, kink_g=True)
            assert rel(pe.scalar(*k), r, 1.0) <= 1e-9, (phi, psi, k, pe.scalar(*k), r)


def test_a_kink_away_from_zero_is_refused_not_integrated_wrongly():
    """The quadratures split at 0 only: relu(x + 1/2) (kink at -1/2) integrated over its kink
    erred by 3e-2 in an NTK.  Such a function is refused with a clear error (kink_away_from_zero);
    kinks at 0, however written, are not."""
    from tpcompiler.expectations.functions import kink_away_from_zero

    relu, step, sigmoid, gelu = (nl.BUILTINS[name] for name in ("relu", "step", "sigmoid", "gelu"))
    shifted = sp.Lambda(X, relu(X + sp.Rational(1, 2)))
    with pytest.raises(ValueError, match="kink or a jump away from 0"):
        g2.pair_expectation(shifted, (sp.tanh(X), X))
    with pytest.raises(ValueError, match="kink or a jump away from 0"):
        g2.expectation(sp.Lambda(X, relu(X + 1) * sp.tanh(X)))
    for at_zero in (relu(X), sp.Max(X, X / 10), sp.Piecewise((X, X > 0), (sp.exp(X) - 1, True)), sp.Abs(2 * X),
                    sp.Heaviside(X) * X, relu(-X) ** 2, relu(X**3), relu(sp.tanh(X)), sp.Abs(X + X**3),
                    relu(sigmoid(X)), step(relu(X)), relu(step(X)), relu(sigmoid(X) - sp.Rational(1, 2)),
                    step(gelu(X)), relu(gelu(sp.sqrt(2) * X)),
                    # positive, but 0 in float64 below -6 (a cancellation: tp.layers' Sigmoid_like, Gelu, Relu)
                    relu(gelu(sp.erf(X) / 2 + sp.Rational(1, 2))), step(sp.erf(X) / 2 + sp.Rational(1, 2))):
        assert kink_away_from_zero(sp.Lambda(X, at_zero)) is None, at_zero
    for away in (sp.Max(X + 1, 0), sp.Piecewise((X, X > 1), (0, True)), sp.floor(X), relu(sp.sin(X)),
                 relu(X**2 - sp.Rational(1, 10**6)), relu(sigmoid(X) - sp.Rational(1, 10**9)),
                 relu(sp.erf(X) / 2 + sp.Rational(1, 2) - sp.Rational(1, 10**30))):  # (its kink near -11.3)
        assert kink_away_from_zero(sp.Lambda(X, away)) is not None, away


def test_a_switch_of_a_function_that_keeps_its_sign_is_integrated_as_the_function():
    """relu(sigmoid(x)) is sigmoid(x) (it never switches), step(relu(x)) is step(x) (relu is 0
    on a whole half line, where the step is flat) and relu(step(x)) is step(x): their kinks
    are at 0 or nowhere.  They were refused as kinks away from 0 (the switching expression had
    to vanish at 0 and keep a nonzero sign on each half line); their expectations are those of
    the functions they equal.  relu(gelu(erf(x)/2 + 1/2)) too, whose argument is positive but
    0 in float64 below -6: it is integrated with a split at 0 and the function it equals
    without, so the two agree to the quadratures' tolerance (1e-10) rather than to rounding."""
    relu, step, sigmoid, gelu = (nl.BUILTINS[name] for name in ("relu", "step", "sigmoid", "gelu"))
    squashed = gelu(sp.erf(X) / 2 + sp.Rational(1, 2))
    for (a, b), (c, d), tol in [((relu(sigmoid(X)), sp.tanh(X) + X), (sigmoid(X), sp.tanh(X) + X), 1e-12),
                                ((relu(squashed), sp.tanh(X)), (squashed, sp.tanh(X)), 1e-10),
                                ((step(relu(X)), sp.tanh(X)), (step(X), sp.tanh(X)), 1e-12),
                                ((relu(step(X)) * sp.cos(X), sigmoid(X)), (step(X) * sp.cos(X), sigmoid(X)), 1e-12)]:
        got = g2.pair_expectation(sp.Lambda(X, a), sp.Lambda(X, b))
        want = g2.pair_expectation(sp.Lambda(X, c), sp.Lambda(X, d))
        for k in [cov(1.2, 0.4, 2.7), cov(6.0, -0.7, 0.5), cov(0.3, 0.29, 0.3)]:
            assert rel(got.scalar(*k), want.scalar(*k), 1.0) <= tol, (a, b, k)


def test_a_switch_of_gelu_is_at_zero_though_float64_underflows():
    """gelu(x) < 0 for every x < 0, but its float64 value is 0 below -21, where the sign check
    looked: relu(gelu(x)) and step(gelu(x)) were refused as kinks away from 0.  Zeros are
    evaluated again in multiprecision.  Their kernels (input layer, then the function) against
    scipy's quadrature of gelu written with erfc (nested, each split where relu(gelu) has its
    kink), and step(gelu) = step's arc-cosine form."""
    X_in = np.random.default_rng(0).standard_normal((2, 3))
    S = X_in @ X_in.T / 3
    relu_gelu = lambda z: np.maximum(0.5 * z * special.erfc(-z / np.sqrt(2)), 0.0)  # noqa: E731
    L = np.linalg.cholesky(S)
    want = {(0, 0): integrate.quad(lambda z: relu_gelu(z) ** 2 * np.exp(-z * z / (2 * S[0, 0])), 0, np.inf,
                                   epsabs=1e-14, epsrel=1e-13)[0] / np.sqrt(2 * np.pi * S[0, 0]),
            (0, 1): integrate.quad(lambda a: relu_gelu(L[0, 0] * a) * np.exp(-a * a / 2) / (2 * np.pi) * integrate.quad(
                lambda b: relu_gelu(L[1, 0] * a + L[1, 1] * b) * np.exp(-b * b / 2), -L[1, 0] * a / L[1, 1], np.inf,
                epsabs=1e-15, epsrel=1e-13)[0], 0, np.inf, epsabs=1e-15, epsrel=1e-13)[0]}  # (v > 0 beyond the kink)
    for name in ("relu", "step"):
        p = tp.Program(f"{name}_gelu")
        xi = p.input("xi", 3, default=np.ones((1, 3)))
        p.readout(getattr(tp, name)(tp.gelu(p.input_layer("U", xi, sigma=1.0))), sigma=1.0)
        nngp = tp.compile(p).kernels(X_in)["nngp"]
        if name == "step":
            want = {(0, 0): 0.5, (0, 1): (np.pi - np.arccos(S[0, 1] / np.sqrt(S[0, 0] * S[1, 1]))) / (2 * np.pi)}
        for (i, j), value in want.items():
            assert nngp[i, j] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, i, j)


def test_one_dimensional_and_diagonal_consistency():
    e1 = g2.expectation("relu")
    assert e1.method == "closed form"
    assert e1.scalar(3.0) == pytest.approx(math.sqrt(3.0 / (2 * math.pi)), rel=1e-15)
    assert g2.expectation("step").scalar(2.0) == 0.5
    et = g2.expectation("tanh")
    assert et.method.startswith("quadrature (1-D)")
    assert abs(et.scalar(5.0)) < 1e-15  # odd function: exactly symmetric nodes
    eg = g2.expectation("gelu")
    for k in [0.3, 2.0, 17.0]:
        r = grid_pair(NUMPY["gelu"], lambda t: 1.0 + 0 * t, k, 0.0, 1.0)
        assert eg.scalar(k) == pytest.approx(r, rel=1e-10)
    # diagonal k11 = k12 = k22: the pair equals the 1-D expectation of the product
    pt = g2.pair_expectation("tanh", "tanh")
    e2 = g2.expectation((sp.tanh(X) ** 2, X))
    for k in [0.1, 2.0, 20.0]:
        assert pt.scalar(k, k, k) == pytest.approx(e2.scalar(k), rel=1e-10)
        assert pt.scalar(k, k, k) == pytest.approx(grid_pair(np.tanh, np.tanh, k, k, k), rel=1e-10)
    # zero variance: u == 0, so E = tanh(0) E[tanh(v)] = 0; rho = 0: E = E tanh * E tanh = 0
    assert pt.scalar(0.0, 0.0, 3.0) == 0.0 and pt.scalar(3.0, 0.0, 3.0) == pytest.approx(0.0, abs=1e-16)


# ---------------------------------------------------------------------------------------
# Generated code: source, scalar callable from njit code, evaluate, cache
# ---------------------------------------------------------------------------------------
def test_generated_code_and_cache():
    pe = g2.pair_expectation("tanh", "tanh")
    assert "def f(k11, k12, k22):" in pe.source and "math.tanh" in pe.source
    assert g2.pair_expectation((sp.tanh(X), X), sp.Lambda(X, sp.tanh(X))) is pe
    sg = g2.pair_expectation("sigmoid", "sigmoid")
    assert "def sigmoid(x):" in sg.source  # custom function from nonlinearities.SCALAR_SOURCE
    scalar_t = pe.scalar
    scalar_r = g2.pair_expectation("relu", "relu").scalar

    @njit
    def combined(k):
        return scalar_t(k, 0.5 * k, k) + scalar_r(k, 0.5 * k, k)

    assert combined(2.0) == pytest.approx(pe.scalar(2.0, 1.0, 2.0) + scalar_r(2.0, 1.0, 2.0), rel=1e-15)
    # evaluate broadcasts, keeps the shape, and matches the scalar function
    rng = np.random.default_rng(1)
    k11 = rng.uniform(0.1, 10, (4, 5))
    k22 = rng.uniform(0.1, 10, (4, 5))
    k12 = rng.uniform(-1, 1, (4, 5)) * np.sqrt(k11 * k22)
    out = pe.evaluate(k11, k12, k22)
    assert out.shape == (4, 5)
    assert out[2, 3] == pe.scalar(k11[2, 3], k12[2, 3], k22[2, 3])
    assert pe.evaluate(2.0, 0.0, np.ones(3)).shape == (3,)
    assert math.isnan(pe.scalar(-1.0, 0.0, 1.0))


def test_input_validation():
    y = sp.Symbol("y")
    with pytest.raises(ValueError):
        g2.pair_expectation((sp.tanh(X + y), X), "tanh")
    with pytest.raises(ValueError):
        g2.pair_expectation("not_a_function", "tanh")
    with pytest.raises(ValueError):
        g2.pair_expectation("tanh", "tanh", strategy="magic")


# ---------------------------------------------------------------------------------------
# End to end: one hidden layer NNGP / NTK against neural-tangents (tests/data)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    meta = json.loads((DATA / "nt_reference.json").read_text())
    return meta, np.load(DATA / "nt_reference.npz")


def one_hidden_layer(xa, xb, e_phi, e_dphi, w_std, b_std):
    """Dense -> phi -> Dense in NTK parametrization (conventions in nt_reference.json).

    K0 = x.x'/d; Dense: K = W^2 K_in + b^2, Theta = K + W^2 Theta_in (Theta_0 = 0);
    activation: K = E[phi phi], Thetadot = E[phi' phi'], Theta = Thetadot Theta_in.
    """
    d = xa.shape[1]
    dense = lambda p, q: w_std**2 * (p @ q.T) / d + b_std**2
    k1 = dense(xa, xb)
    ka = np.diag(dense(xa, xa))[:, None] + 0 * k1  # the exact diagonal entries
    kb = np.diag(dense(xb, xb))[None, :] + 0 * k1
    theta1 = k1
    k2 = e_phi.evaluate(ka, k1, kb)
    thetadot = e_dphi.evaluate(ka, k1, kb)
    k3 = w_std**2 * k2 + b_std**2
    theta3 = k3 + w_std**2 * thetadot * theta1
    return k3, theta3


@pytest.mark.parametrize("case,phi,strategy,suffix,tol", [
    ("fc_d1_num_tanh_25_b0.1_ntk", sp.tanh(X), "quadrature", "_exact", 1e-8),
    ("fc_d1_num_gelu_25_b0.1_ntk", nl.gelu(X), "quadrature", "_exact", 1e-8),
    ("fc_d1_num_sin_25_b0.1_ntk", sp.sin(X), "quadrature", "_exact", 1e-8),
    ("fc_d1_num_sin_25_b0.1_ntk", sp.sin(X), "auto", "_exact", 1e-8),
    ("fc_d1_gelu_b0.1_ntk", nl.gelu(X), "quadrature", "", 1e-9),
    ("fc_d1_relu_b0.1_ntk", nl.relu(X), "auto", "", 1e-10),
    ("fc_d1_erf_b0.1_ntk", sp.erf(X), "auto", "", 1e-10),
])
def test_reference_one_hidden_layer(reference, case, phi, strategy, suffix, tol):
    meta, ref = reference
    dense = meta["cases"][case]["net"]["layers"][0]
    w_std, b_std = dense["W_std"], dense["b_std"]
    dphi = sp.diff(phi, X)
    e_phi = g2.pair_expectation((phi, X), (phi, X), strategy=strategy)
    e_dphi = g2.pair_expectation((dphi, X), (dphi, X), strategy=strategy)
    if strategy == "auto" and "relu" in case:
        assert e_phi.method == e_dphi.method == "closed form: arc-cosine"
    x_train, x_test = ref["x_fc"], ref["x_fc_test"]
    nngp, ntk = one_hidden_layer(x_train, x_train, e_phi, e_dphi, w_std, b_std)
    nngp_t, ntk_t = one_hidden_layer(x_test, x_train, e_phi, e_dphi, w_std, b_std)
    for got, key in [(nngp, "nngp"), (ntk, "ntk"), (nngp_t, "nngp_test"), (ntk_t, "ntk_test")]:
        want = ref[f"{case}__{key}{suffix}"]
        err = np.max(np.abs(got - want) / np.abs(want))
        assert err <= tol, (case, key, err)


# ---------------------------------------------------------------------------------------
# Source generation: templates, and the same source in every process (it is the cache key)
# ---------------------------------------------------------------------------------------
def test_render_indents_blocks_and_fills_inline_holes():
    from tpcompiler.expectations.source import render

    template = """
        for i in range($n):
            $body
            done = $flag
        $tail
    """
    out = render(template, n="3", body="a = i\nif a:\n    b = a", flag="True", tail="")
    assert out == "for i in range(3):\n    a = i\n    if a:\n        b = a\n    done = True"
    with pytest.raises(ValueError):
        render("x = $value", value="1\n2")
    with pytest.raises(KeyError):
        render("x = $missing")


_SOURCES = """
import hashlib, sympy as sp
from tpcompiler.expectations import functions, quadrature, builders
from tpcompiler.expectations.closed_forms import K11, K12, K22, closed_form_pair
out = []
for name in ("tanh", "sigmoid", "relu"):
    lam = functions.as_lambda(name)
    ref = functions.reflection(lam)
    out.append(quadrature.pair_module(lam, lam, name == "relu", name == "relu", ref).source)
    out.append(quadrature.oned_module([lam, sp.Lambda(lam.variables[0], lam.variables[0] * lam.expr)],
                                      name == "relu").source)
for a, b in (("relu", "relu"), ("erf", "erf"), ("sin", "cos")):
    pa, pb = functions.as_lambda(a), functions.as_lambda(b)
    out.append(builders._closed_module(closed_form_pair(pa, pb), builders._degenerate_pair(pa, pb),
                                       (K11, K12, K22)).source)
print(hashlib.sha256("\\0".join(out).encode()).hexdigest())
"""


def test_generated_source_is_the_same_in_every_process():
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    hashes = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(root))
        run = subprocess.run([sys.executable, "-c", _SOURCES], env=env, capture_output=True,
                             text=True, check=True)
        hashes.add(run.stdout.strip())
    assert len(hashes) == 1


def test_expectation_of_a_dirac_delta_in_one_variable():
    """E[delta(u)] = 1 / sqrt(2 pi k) for u ~ N(0, k) (the Gaussian density at 0); the closed
    form is built without a value at k = 0, where the delta has none."""
    t = sp.Symbol("t", real=True)
    obj = g2.expectation(sp.Lambda(t, sp.DiracDelta(t)))
    for k in (1e-4, 0.5, 2.0, 1e6):
        assert float(obj.scalar(k)) == pytest.approx(1 / np.sqrt(2 * np.pi * k), rel=1e-14)


def test_pair_rules_of_functions_infinite_at_zero_are_judged():
    """log|u| and |u|^-0.3 are infinite at 0, where the error scale's grid evaluated them: the
    scale was infinite, every rung of the ladder passed and the coarsest step was used, 0.3-1%
    off with an error estimate of 0 (QA).  At k12 = 0 the expectation is the product of two
    1-D moments: E log|u| = (log k - gamma - log 2) / 2, E|u|^p = k^(p/2) 2^(p/2) Gamma((p+1)/2) / sqrt(pi)."""
    x = sp.Symbol("x")
    tanh2 = integrate.quad(lambda v: math.tanh(v) ** 2 * math.exp(-v * v / 2) / math.sqrt(2 * math.pi), -40, 40,
                           epsabs=1e-14, epsrel=1e-14)[0]
    for f, moment in ((sp.log(sp.Abs(x)), lambda k: (math.log(k) - np.euler_gamma - math.log(2)) / 2),
                      (sp.Abs(x) ** sp.Rational(-3, 10),
                       lambda k: k ** -0.15 * 2 ** -0.15 * special.gamma(0.35) / math.sqrt(math.pi))):
        pe = g2.pair_expectation(sp.Lambda(x, f), sp.Lambda(x, sp.tanh(x) ** 2))
        for k in (0.3, 1.0, 20.0):
            assert pe(k, 0.0, 1.0) == pytest.approx(moment(k) * tanh2, rel=1e-10)


def test_functions_not_a_number_at_zero_use_the_rules_split_there():
    """log(x^2) and sin(x)^2/x^2 have no kink sympy names, so a smooth rule with a node at 0
    evaluated them there: -inf and a ZeroDivisionError (reviewer).  E[log u^2] = log k - gamma -
    log 2; E[sin(u)^2/u^2] against scipy's quadrature."""
    x = sp.Symbol("x")
    e = g2.expectation(sp.Lambda(x, sp.log(x**2)))
    for k in (0.5, 1.0, 3.0):
        assert float(e(k)) == pytest.approx(math.log(k) - np.euler_gamma - math.log(2), rel=1e-10)
    density = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    reference = integrate.quad(lambda t: (math.sin(t) / t) ** 2 * density(t) if t else density(t), -40, 40,
                               points=[0], epsabs=1e-14, epsrel=1e-13)[0]
    assert float(g2.expectation(sp.Lambda(x, sp.sin(x) ** 2 / x**2))(1.0)) == pytest.approx(reference, rel=1e-10)
