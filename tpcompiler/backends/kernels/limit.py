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

from tpcompiler.backends.kernels.pairwise import E1, E2, ExpectationRules, NotPairwise, PairwiseEngine, TemplateCall
from tpcompiler.backends.lowering import evaluate
from tpcompiler.ir import symbols
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
    outputs = {name: engine.scalar(expr) for name, expr in zp.graph.outputs.items()}
    env: dict = zp.graph.param_values()  # input-layer covariances read the bound inputs
    values = _Values(engine, _expectations(engine.functions, rtol), env, zp)
    for q in engine.order:
        env[q.symbol.name] = values.of(q.definition)
    result = {name: values.of(expr) for name, expr in outputs.items()}
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


class _Values:
    """Values in float64 of the engine's expressions: input-layer covariances written out,
    every E1/E2 by its rule and every TemplateCall by its template at its arguments' values
    (the arguments evaluated first), quantities and Params from ``env``.

    Calls are evaluated where they are, once each (memoised), not written out: a template's
    value reads calls of the templates before it, so written out (``engine.instantiate``)
    a pi-net's values were trees that double with every layer, walked whole by every
    substitution (programs/pinet.py depth 4: 7.8 s, 8: minutes; now 1.3 and 2.6 s)."""

    def __init__(self, engine: PairwiseEngine, table: ExpectationRules, env: dict, zp: ZProgram):
        self.engine, self.table, self.env, self.zp = engine, table, env, zp
        self.calls: dict = {}  # call -> its value

    def of(self, expr: sp.Expr) -> float:
        expr = self.zp.graph.expand_input_cov(expr)
        values = {c: sp.Float(self.call(c)) for c in symbols.outermost(expr, (E1, E2, TemplateCall))}
        return evaluate(expr.xreplace(values) if values else expr, self.env)

    def call(self, c: sp.Expr) -> float:
        found = self.calls.get(c)
        if found is None:
            args = [self.of(a) for a in c.args[1:]]
            if isinstance(c, TemplateCall):
                template = self.engine.templates_found[int(c.args[0])]
                found = self.of(template.value.xreplace(dict(zip(template.slots, map(sp.Float, args)))))
            else:
                found = _call(self.table[int(c.args[0])], args)
            self.calls[c] = found
        return found


def _call(rule, args: list[float]) -> float:
    """One value of an expectations rule by its compiled scalar function (its array ``evaluate``
    starts a parallel loop per call, which costs more than the value)."""
    try:
        return float(rule.scalar(*args))
    except ArithmeticError as exc:  # compiled with Python's error model (0/0 at a node)
        raise NotPairwise(f"the bivariate Gaussian rule for {rule.method} failed at {args}: {exc!r}") from None
