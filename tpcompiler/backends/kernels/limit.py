"""Exact limits of pairwise-Gaussian programs (docs/DESIGN.md 2.7, strategy 2).

For a concrete (input-bound) program in the pairwise engine's domain (``pairwise.is_pairwise``:
kernels at initialisation, any network whose nonlinearities act on Gaussian pre-activations),
``pairwise.PairwiseEngine`` writes every output as a DAG of quantities: q_k = an expression
in earlier quantities and in bivariate Gaussian expectations

    E1(g, k)              = E[g(u)],          u ~ N(0, k),
    E2(g1, g2, k11, k12, k22) = E[g1(u) g2(v)],  (u, v) ~ N(0, [[k11, k12], [k12, k22]]),

(polynomials by Wick's theorem already expanded).  This module evaluates that DAG in
float64, in order: each E1/E2 by ``tpcompiler.expectations`` (closed forms -- relu and step by
the arc-cosine formulas, erf, monomials -- exact up to rounding; Gauss-Hermite/tanh-sinh
quadrature to ``rtol`` otherwise).  The values are deterministic: stderr 0.  They are the
same numbers as the kernel backend's (``Compiled.kernels``), which compiles the same DAG to
Numba per pair of inputs.
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from tpcompiler.backends.kernels.pairwise import E1, E2, ExpectationRules, NotPairwise, PairwiseEngine
from tpcompiler.backends.lowering import evaluate
from tpcompiler.symbolic.master import ZProgram

#: Relative accuracy of quadratures (the kernel backend's default; closed forms are exact).
RTOL = 1e-10


def pairwise_limit(zp: ZProgram, rtol: float = RTOL) -> dict[str, tuple[float, float]]:
    """{output: (value, 0.0)} of a concrete program by the pairwise-Gaussian engine.

    Raises NotPairwise when an expectation is out of the engine's reach (more than two
    correlated nonlinear factors, a function of several Gaussians, an expectation with no
    closed form that quadrature cannot take, such as a Dirac delta) or comes out non-finite
    (a function outside its domain: the particle evaluator says where)."""
    engine = PairwiseEngine(zp.graph, zp)
    outputs = {name: engine.instantiate(engine.scalar(expr)) for name, expr in zp.graph.outputs.items()}
    table = _expectations(engine.functions, rtol)
    env: dict = zp.graph.param_values()  # input-layer covariances read the bound inputs
    for q in engine.order:
        env[q.symbol.name] = _value(engine.instantiate(q.definition), env, table, zp)
    result = {name: _value(expr, env, table, zp) for name, expr in outputs.items()}
    bad = [name for name, v in result.items() if not np.isfinite(v)]
    if bad:
        raise NotPairwise(f"the pairwise-Gaussian value of {bad[0]!r} is not finite")
    return {name: (v, 0.0) for name, v in result.items()}


def _expectations(functions: list[tuple], rtol: float) -> ExpectationRules:
    """The expectations evaluator of each engine function: (g,) -> E[g(u)], (g1, g2) -> E[g1(u)
    g2(v)], built when first read (functions no output reads are never probed)."""
    def failed(gs, exc):  # a Dirac delta without a closed form; a function the quadrature's
        # probe cannot evaluate at some node (sin(t)/t at t = 0)
        return NotPairwise(f"no bivariate Gaussian rule for {gs}: {exc!r}")

    return ExpectationRules(functions, rtol, failed)


def _value(expr: sp.Expr, env: dict, table: ExpectationRules, zp: ZProgram) -> float:
    """``expr`` in float64: input-layer covariances written out, every E1/E2 by its rule
    (its covariance arguments evaluated first), quantities and Params from ``env``."""
    expr = zp.graph.expand_input_cov(expr)
    calls = {c: sp.Float(_call(table[int(c.args[0])], [_value(a, env, table, zp) for a in c.args[1:]]))
             for c in expr.atoms(E1, E2)}
    return evaluate(expr.xreplace(calls), env)


def _call(rule, args: list[float]) -> float:
    """One value of an expectations rule by its compiled scalar function (its array ``evaluate``
    starts a parallel loop per call, which costs more than the value)."""
    try:
        return float(rule.scalar(*args))
    except ArithmeticError as exc:  # compiled with Python's error model (0/0 at a node)
        raise NotPairwise(f"the bivariate Gaussian rule for {rule.method} failed at {args}: {exc!r}") from None
