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
from tpcompiler.symbolic import existence
from tpcompiler.symbolic.growth import EXPONENTIAL, POLYNOMIAL, outgrown_by_gaussian_tail, tail_bound

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
]

# no bound is claimed: a double exponential, a denominator that reaches 0 at infinity or
# whose sign is not known, a complex argument of a function bounded only on the reals,
# another variable
UNPROVEN = [sp.exp(sp.exp(t)), 1 / (1 - sp.exp(-t)), 1 / (2 + sp.sin(t)), sp.tanh(sp.I * t), sp.I * t,
            sp.Symbol("x") * t, 1 / (1 - 2 * sp.exp(-t)),
            # a coefficient that is 0 without looking it: 1/0, no lower bound (review)
            sp.exp(t) / ((sp.cos(1) ** 2 + sp.sin(1) ** 2 - 1) * (t + 1))]


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


def test_functions_that_outgrow_the_tail_are_still_refused():
    """What the rules cannot prove is decided by the limit as before: exp(t^3) and exp(t^2)
    are refused by the existence check (tests/test_existence.py has the programs)."""
    rate = sp.Symbol("rate", positive=True)
    assert existence._grows_too_fast(sp.exp(t**3), t, rate)
    assert existence._grows_too_fast(sp.exp(t**2 / 2) * t, t, sp.Rational(1, 2))
    assert not existence._grows_too_fast(sp.exp(t**2 / 4), t, sp.Rational(1, 2))


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
