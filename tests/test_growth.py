"""symbolic/growth.py: bounds on a function's growth at infinity, read from its structure,
which let the existence check skip sympy's limits (that never returned on a deep swish net)."""
from __future__ import annotations

import time
from fractions import Fraction

import numpy as np
import pytest
import sympy as sp

import tpcompiler as tp
from tpcompiler import layers
from tpcompiler.ir.ntk import kernel_program
from tpcompiler.ir.nonlinearities import gelu, relu, sigmoid, softplus, step
from tpcompiler.symbolic import existence
from tpcompiler.symbolic.growth import (EXPONENTIAL, POLYNOMIAL, _Bounds, beats_gaussian_tail, outgrown_by_gaussian_tail,
                                        outgrown_by_some_gaussian_tail,
                                        tail_bound)

t = sp.Symbol("t", real=True)

# (f, bound): |f(t)| <= C (1+|t|)^p is (POLYNOMIAL, p), exp(C (1+|t|)^d) is (EXPONENTIAL, d),
# each the smallest such bound by hand, except where noted that the rules give a larger valid one
BOUNDS = [
    (t**3 + 1, (POLYNOMIAL, 3)),
    (1 / t, (POLYNOMIAL, 0)),                         # (bounded for |t| >= 1: a pole at 0 is not growth)
    (sp.tanh(t) / t**2, (POLYNOMIAL, 0)),
    (t / (1 + sp.exp(-t)), (POLYNOMIAL, 1)),          # swish: 1 + exp(-t) >= 1
    (sp.sqrt(t**2 + 1), (POLYNOMIAL, 1)),
    ((t**2 + 1) ** sp.Rational(3, 2), (POLYNOMIAL, 3)),
    (sp.log(t**2 + 1), (POLYNOMIAL, 1)),             # (log grows slower than t: a larger valid bound)
    (sp.Max(t, t / 10) ** 2, (POLYNOMIAL, 2)),
    (1 / sp.cosh(t), (POLYNOMIAL, 0)),
    (sp.Piecewise((t, t > 0), (sp.exp(t) - 1, True)), (EXPONENTIAL, 1)),  # (ELU: exp(t) bounded for t < 0 only)
    (sp.exp(t * sp.tanh(t)), (EXPONENTIAL, 1)),
    (sp.exp(0.3 * t**2), (EXPONENTIAL, 2)),
    (sp.exp(-t**3), (EXPONENTIAL, 3)),               # (grows as t -> -oo)
    (sp.exp(t**3), (EXPONENTIAL, 3)),
    (sp.log(sp.exp(t**3) + 1), (POLYNOMIAL, 3)),
    (t * sp.tanh(sp.log(1 + sp.exp(t))), (POLYNOMIAL, 1)),  # mish: log of a positive function is real
    # Floats beyond a double, read exactly (review): not 0, not 1.5, not an overflow
    ((1 + sp.exp(t**3)) ** sp.Float("1e-400"), (EXPONENTIAL, 3)),
    (sp.Abs(t) ** sp.Float("1.5000000000000001", 40), (POLYNOMIAL, Fraction(sp.Rational(sp.Float("1.5000000000000001", 40)).p,
                                                                           sp.Rational(sp.Float("1.5000000000000001", 40)).q))),
    (sp.exp(t) * sp.Abs(t) ** sp.Float("1e400"), (EXPONENTIAL, 1)),
    # the built-ins sympy has no name for (ir/nonlinearities.py), and exp of what is never positive
    (relu(t) ** 3, (POLYNOMIAL, 3)),
    (step(t) * t, (POLYNOMIAL, 1)),
    (sigmoid(t**5), (POLYNOMIAL, 0)),
    (softplus(t**2) * gelu(t), (POLYNOMIAL, 3)),
    (gelu(sp.exp(t)), (EXPONENTIAL, 1)),
    (sp.exp(-t**2), (POLYNOMIAL, 0)),
    (sp.exp(-softplus(t - sp.Rational(1, 3)) ** 2) * sigmoid(t), (POLYNOMIAL, 0)),  # (erf(softplus)'s derivative)
    (sp.exp(-sp.Abs(t) - relu(t) ** 2 / 2) * t, (POLYNOMIAL, 1)),
    (sp.exp(-t**3), (EXPONENTIAL, 3)),               # (t^3 takes both signs)
    (sp.exp(gelu(t) ** 2), (EXPONENTIAL, 2)),
]

# no bound is claimed: a double exponential, a denominator that reaches 0 at infinity or
# whose sign is not known, a complex argument of a function bounded only on the reals,
# another variable
UNPROVEN = [sp.exp(sp.exp(t)), 1 / (1 - sp.exp(-t)), 1 / (2 + sp.sin(t)), sp.tanh(sp.I * t), sp.I * t,
            sp.Symbol("x") * t, 1 / (1 - 2 * sp.exp(-t)),
            # a coefficient that is 0 without looking it: 1/0, no lower bound (review)
            sp.exp(t) / ((sp.cos(1) ** 2 + sp.sin(1) ** 2 - 1) * (t + 1)),
            sigmoid(sp.I * t), relu(sp.Symbol("x")) * t, sp.exp(-sp.I * t**2)]


@pytest.mark.parametrize("f,bound", BOUNDS, ids=[str(f) for f, _ in BOUNDS])
def test_bounds_of_closed_forms(f, bound):
    assert tail_bound(f, t) == (bound[0], Fraction(bound[1]))


@pytest.mark.parametrize("f", UNPROVEN, ids=[str(f) for f in UNPROVEN])
def test_no_bound_is_claimed_where_the_rules_cannot_prove_one(f):
    assert tail_bound(f, t) is None


def _random_function(rng, depth: int) -> sp.Expr:
    """A random expression in t of the kinds a network's moments are made of."""
    if depth == 0:
        return [t, sp.Rational(int(rng.integers(1, 5)), int(rng.integers(1, 4))), sp.Float(rng.normal())][rng.integers(3)]
    a, b = _random_function(rng, depth - 1), _random_function(rng, depth - 1)
    c = sp.Rational(int(rng.integers(1, 7)), 4)
    kinds = [a + b, a * b, a**2, sp.exp(c * a), sp.exp(-c * t) * a, a / (1 + c * sp.exp(-c * b)), sp.tanh(a) * b,
             1 / (1 + a**2), sp.Max(a, 0) * b, sp.exp(c * a * sp.tanh(b)), sp.cosh(a), sp.Abs(a) ** sp.Rational(3, 2),
             (1 + a**2) ** sp.Float(abs(rng.normal()) + 0.25)]
    return kinds[rng.integers(len(kinds))]


def test_a_proven_bound_holds_where_sympy_computes_the_limit():
    """Soundness against an independent answer: for random functions that the rules prove
    outgrown by the Gaussian tail, sympy's limit of |f(t)| exp(-t^2 / 100) at +-oo is 0; and
    the rules prove it for most of them (else the check would fall back to limits anyway)."""
    rng = np.random.default_rng(3)
    proven = checked = 0
    seen = set()
    while checked < 40:
        f = _random_function(rng, int(rng.integers(1, 3)))
        if f in seen or t not in f.free_symbols:
            continue
        seen.add(f)
        if not outgrown_by_gaussian_tail(f, t):
            continue
        proven += 1
        for sign in (1, -1):
            limit = sp.limit(sp.Abs(f) * sp.exp(-t**2 / 100), t, sign * sp.oo)
            assert limit == 0, (f, sign, limit)
        checked += 1
    assert proven == checked


#: The built-ins written out as sympy's own functions (their docstrings' definitions), for sympy's limits.
_WRITTEN_OUT = {relu: lambda x: sp.Max(x, 0), step: sp.Heaviside, sigmoid: lambda x: 1 / (1 + sp.exp(-x)),
                softplus: lambda x: sp.log(1 + sp.exp(x)), gelu: lambda x: x * (1 + sp.erf(x / sp.sqrt(2))) / 2}


def _random_network_function(rng, depth: int) -> sp.Expr:
    """A random expression in t of built-in nonlinearities and of their derivatives' factors."""
    if depth == 0:
        return [t, t + sp.Rational(int(rng.integers(-3, 4)), 3), sp.Float(rng.normal()) * t][rng.integers(3)]
    a, b = _random_network_function(rng, depth - 1), _random_network_function(rng, depth - 1)
    c = sp.Rational(int(rng.integers(1, 7)), 4)
    kinds = [relu(a) * b, sigmoid(a) * b, softplus(a), gelu(a) + b, step(a) * b, sp.exp(-c * a**2) * b,
             sp.exp(-c * softplus(a) ** 2) * sigmoid(b), relu(a) ** 2, sp.tanh(gelu(a)) * b]
    return kinds[rng.integers(len(kinds))]


def test_a_proven_bound_of_built_in_nonlinearities_holds_numerically():
    """Soundness of the built-ins' bounds (``Nonlinearity.degree``, ``nonnegative``) on random
    functions of them: each is proven at most polynomial, |f(t)| <= C (1 + |t|)^p (exp(-c a^2)
    <= 1, sigmoid and step bounded, relu, softplus and gelu at most linear), and the built-ins
    written out as the sympy functions they are, evaluated at 50 digits, keep |f(+-T)| / (1 +
    T)^p from growing between T = 100 and T = 1000 (a degree too low by one would grow it
    tenfold).  (sympy's limits cannot take many of them: Max of an erf.)"""
    rng = np.random.default_rng(5)
    seen, checked = set(), 0
    while checked < 40:
        f = _random_network_function(rng, int(rng.integers(1, 3)))
        if f in seen or t not in f.free_symbols:
            continue
        seen.add(f)
        level, p = tail_bound(f, t)
        assert level == POLYNOMIAL, f
        written = f.replace(lambda e: type(e) in _WRITTEN_OUT, lambda e: _WRITTEN_OUT[type(e)](*e.args))
        for sign in (1, -1):
            ratio = [abs(sp.N(written.subs(t, sign * T), 50)) / (1 + T) ** sp.Rational(p) for T in (10, 100, 1000)]
            assert ratio[2] <= 2 * max(ratio[:2]) + sp.Rational(1, 10**6), (f, sign, ratio)
        checked += 1


def test_a_net_of_built_ins_takes_no_limit_on_the_particle_path(monkeypatch):
    """erf(softplus(h)), h an input layer plus a bias: the particle path of its kernel program
    at two inputs (numeric variances, ``tpc check``'s path) took sympy's limits of erf'(softplus)
    sigmoid = 2/sqrt(pi) exp(-softplus^2) sigmoid, 15-30 s each, one per leaf, direction and
    moment (a fuzzed net of this kind ran for over 9 minutes).  The built-ins' bounds prove
    them all; the particles agree with the kernel backend."""
    taken = []

    def no_limit(*args, **kwargs):
        taken.append(args[0])
        raise RuntimeError("no limit here")  # (taken as undecided by existence._limit)

    p = tp.Program("softplus_erf")
    xi = p.input("xi", 3, default=np.ones((1, 3)))
    h = p.input_layer("U", xi, sigma=0.7) + p.vec("b", var=0.25)
    p.readout(tp.erf(tp.softplus(h)), sigma=1.0)
    X = np.random.default_rng(7).standard_normal((2, 3))
    kernels = tp.compile(p).kernels(X)
    monkeypatch.setattr(existence.sp, "limit", no_limit)
    values = tp.compile(kernel_program(p.graph)).limit(x=X, method="particles", particles=40000, seed=1)
    assert not taken, taken[:2]
    for name, (value, stderr) in values.items():
        kernel, (i, j) = name[:name.index("[")], map(int, name[name.index("[") + 1:-1].split(","))
        assert abs(value - kernels[kernel][i, j]) < 5 * stderr, (name, value, stderr, kernels[kernel][i, j])


def test_functions_that_outgrow_the_tail_are_still_refused():
    """What the rules cannot prove is decided by the limit as before: exp(t^3) and exp(t^2)
    are refused by the existence check (tests/test_existence.py has the programs)."""
    rate = sp.Symbol("rate", positive=True)
    assert existence._grows_too_fast(sp.exp(t**3), t, rate)
    assert existence._grows_too_fast(sp.exp(t**2 / 2) * t, t, sp.Rational(1, 2))
    assert not existence._grows_too_fast(sp.exp(t**2 / 4), t, sp.Rational(1, 2))


_TWO_PLUS = sp.Float("2.0000000000000004")
_EXACT_TWO_PLUS = Fraction(sp.Rational(_TWO_PLUS).p, sp.Rational(_TWO_PLUS).q)

# (f, direction s, growth): log|f(t)| >= (c - eps) |t|^d as s t -> +oo is (c, d), by hand
# (None for c: positive, not a rational the rules compute)
GROWTHS = [
    (sp.exp(t**3), 1, (1, 3)),
    (sp.exp(t**3), -1, None),                       # (exp(t^3) -> 0 as t -> -oo)
    (sp.exp(-t**3), -1, (1, 3)),
    (sp.exp(sp.Float(0.3) * t**2), 1, (Fraction(sp.Rational(sp.Float(0.3)).p, sp.Rational(sp.Float(0.3)).q), 2)),
    (sp.exp(-t**2), 1, None),
    (sp.cosh(t**2), -1, (1, 2)),
    (t * sp.exp(t**2), 1, (1, 2)),                  # (|t| >= 1: the factor t does not shrink it)
    (sp.exp(t**2) * sp.exp(t**2 / 2), 1, (Fraction(3, 2), 2)),  # (a product's exponents add)
    (sp.exp(t**2) + sp.exp(t**3), 1, (1, 3)),
    (sp.exp(t**2 - t**3), -1, (1, 3)),
    (sp.exp(t**2 - t**3), 1, None),
    (sp.exp(2 * t**2 + t * sp.sin(t)), 1, (2, 2)),  # (t sin t is O(t), below t^2)
    (sp.exp(sp.sqrt(2) * t**3), 1, (None, 3)),
    (sp.exp(sp.Abs(t) ** _TWO_PLUS), -1, (1, _EXACT_TWO_PLUS)),
    (sp.exp(sp.sqrt(2) * sp.Abs(t) ** _TWO_PLUS), 1, (None, _EXACT_TWO_PLUS)),
    (sp.exp((t**2 + 1) ** sp.Rational(3, 4)), 1, (1, Fraction(3, 2))),
    (sp.exp(t**3) - t * sp.exp(t**3), 1, None),     # (two terms of one degree may cancel)
    (sp.exp(t**3) / (1 + sp.exp(t**3)), 1, None),   # (bounded: the denominator is not bounded below the top degree)
    (sp.exp((t / 3 + 1) ** (10**8)), 1, (None, 10**8)),  # ((1/3)^(10^8) is not computed: review)
]


@pytest.mark.parametrize("f,s,growth", GROWTHS, ids=[f"{f}, {s}" for f, s, _ in GROWTHS])
def test_growths_of_closed_forms(f, s, growth):
    found = _Bounds(t).log_growth(f, s)
    expected = None if growth is None else (None if growth[0] is None else Fraction(growth[0]), Fraction(growth[1]))
    assert found == expected


def test_growth_beyond_the_tail_is_proven_only_where_it_is():
    """Degree > 2 beats every rate; degree 2 beats a rate below its coefficient, and at the
    coefficient nothing is claimed (exp(rate t^2) exp(-rate t^2) is 1: the limit decides)."""
    rate = sp.Symbol("rate", positive=True)
    assert beats_gaussian_tail(sp.exp(sp.Abs(t) ** _TWO_PLUS), t, rate)
    assert beats_gaussian_tail(sp.exp(sp.Rational(3, 10) * t**2), t, sp.Rational(1, 4))
    assert not beats_gaussian_tail(sp.exp(sp.Rational(3, 10) * t**2), t, sp.Rational(3, 10))
    assert not beats_gaussian_tail(sp.exp(sp.Rational(3, 10) * t**2), t, rate)
    assert not beats_gaussian_tail(sp.exp(t**2 / 4) * t**5, t, sp.Rational(1, 2))


def test_proven_growth_is_real_growth():
    """Soundness of the lower bounds against independent answers, on random functions: a
    function proven to beat exp(t^2 / 100) is never also proven outgrown by it (the upper
    bounds' rules), and log|f(s T)| - T^2 / 100, evaluated by mpmath at 60 digits, is positive
    and increasing at T = 20, 40, 80 in the direction proven."""
    import mpmath

    rng = np.random.default_rng(11)
    rate = sp.Rational(1, 100)
    seen, checked = set(), 0
    for _ in range(1500):
        f = _random_function(rng, int(rng.integers(1, 4)))
        if f in seen or t not in f.free_symbols:
            continue
        seen.add(f)
        bounds = _Bounds(t)
        for s in (1, -1):
            found = bounds.log_growth(f, s)
            if found is None or not (found[1] > 2 or (found[0] is not None and found[1] == 2 and found[0] > rate)):
                continue
            assert not outgrown_by_gaussian_tail(f, t), f
            values = []
            for T in (20, 40, 80):
                v = sp.N(f.subs(t, s * T), 60)
                values.append(float(mpmath.log(abs(mpmath.mpmathify(v)))) - T**2 / 100)
            assert 0 < values[0] < values[1] < values[2], (f, s, values)
            checked += 1
    assert checked >= 15


def test_a_net_whose_limit_filled_the_memory_is_refused_without_limits(monkeypatch):
    """Dense(W_std = 0.4^(1/2)) -> exp(|x|^2.0000000000000004): E is infinite at any
    variance.  sympy's limit of it expanded the exact rational power of 0.632...; tp.compile
    took 1.4 GB in 15 s and was killed by the memory.  The growth is now proven from the
    structure, no limit taken."""
    def no_limit(*args, **kwargs):
        raise AssertionError(f"a limit was taken: {args[0]}")

    monkeypatch.setattr(existence.sp, "limit", no_limit)
    net = layers.serial(layers.Dense(8, 0.4**0.5, 0.0), layers.Nonlin(lambda a: sp.exp(sp.Abs(a) ** _TWO_PLUS)),
                        layers.Dense(1, 1.0, 0.0))
    with pytest.raises(existence.UndefinedLimit, match="infinite"):
        tp.compile(net.program((3,)))


def test_a_deep_layernorm_swish_net_compiles_without_limits(monkeypatch):
    """Dense -> LayerNorm -> swish, twice: tp.compile took 19 s in sympy's limits of the
    swishes' nested exponentials (106 of them), and tp.compile(...).limit() never returned
    (killed after 7 minutes in one limit).  Every growth is now bounded from the structure:
    no limit is taken, and the limit is the kernel backend's."""
    taken = []
    limit = sp.limit

    def counted(*args, **kwargs):
        taken.append(args[0])
        return limit(*args, **kwargs)

    monkeypatch.setattr(existence.sp, "limit", counted)
    swish = layers.Nonlin(lambda a: a / (1 + sp.exp(-a)), name="swish")
    net = layers.serial(layers.Dense(8, 1.5, 0.1), layers.LayerNorm(), swish, layers.Dense(8, 1.5, 0.1),
                        layers.LayerNorm(), swish, layers.Dense(1, 1.5, 0.1))
    X = np.random.default_rng(7).standard_normal((2, 3))
    start = time.perf_counter()
    values = tp.compile(net.program((3,))).limit(x=X)
    assert not taken, taken[:3]
    assert time.perf_counter() - start < 120
    assert np.isfinite([float(np.asarray(v).ravel()[0]) for v in values.values()]).all()


@pytest.mark.parametrize("f, outgrown", [
    (sp.cosh(t**2 / 2) ** sp.Float(0.99), True),  # exp(0.495 t^2): outgrown by every rate > 0.495
    (sp.exp(3 * t**2) * t**4, True),
    (t**5, True),
    (sp.exp(sp.Abs(t) ** _TWO_PLUS), False),  # (degree 2.0000000000000004: no rate outgrows it)
    (sp.exp(sp.exp(t)), False),  # (a double exponential: not bounded)
])
def test_growth_outgrown_by_some_rate(f, outgrown):
    """exp(C (1 + |t|)^2) is outgrown by every Gaussian rate > C: enough to answer "faster than
    exp(c t^2) for every c?" with no; a degree above 2, or no bound, proves nothing."""
    assert outgrown_by_some_gaussian_tail(f, t) is outgrown


def test_a_valid_net_whose_limit_filled_the_memory_takes_no_limit_at_every_rate(monkeypatch):
    """E[cosh(u^2/2)^0.99] at var(u) = 1 is finite (exp(0.495 u^2) against the density's
    exp(-u^2/2)).  The check for a growth faster than exp(c u^2) for every c took sympy's limit
    of |f| exp(-rate u^2) with the rate a symbol: the process grew to 24 GB in 96 s and was
    killed.  The bound exp(C (1 + |u|)^2) answers it; no limit with a symbolic rate is taken."""
    symbolic = []
    limit = sp.limit

    def recorded(e, *args, **kwargs):
        if any(s.name == "rate" for s in e.free_symbols):
            symbolic.append(e)
            raise NotImplementedError("(the test does not take this limit: it fills the memory)")
        return limit(e, *args, **kwargs)

    monkeypatch.setattr(existence.sp, "limit", recorded)
    for exponent, finite in ((0.99, True), (1.01, False)):
        p = tp.Program("ex")
        u = p.vec("u", var=1.0)
        p.output("m", tp.mean(tp.nonlin(lambda x: sp.cosh(x**2 / 2) ** exponent, u)))
        if finite:
            tp.compile(p)
        else:
            with pytest.raises(existence.UndefinedLimit, match="infinite"):
                tp.compile(p)
    assert symbolic == []
