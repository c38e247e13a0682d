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

import functools
import math
import operator
from collections import ChainMap

import numpy as np
import sympy as sp

from tpcompiler.backends.kernels.pairwise import E1, E2, ExpectationRules, NotPairwise, PairwiseEngine, TemplateCall
from tpcompiler.backends.lowering import evaluate
from tpcompiler.ir import ops, symbols
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
    """Values in float64 of the engine's expressions.

    The expressions are arithmetic -- sums, products, integer powers -- over leaves:
    quantities and Params (from ``env``), input-layer covariances InputCov(a, b) (each
    evaluated once: its sum over input coordinates, ``Graph.init_covariance``), and calls
    c = E1/E2/TemplateCall(k, a_1, .., a_m).  A call's value is v(c) = R_k(v(a_1), .., v(a_m)):
    R_k the expectations rule of function k for E1/E2, for a TemplateCall template k's value
    with its slots bound to v(a_j) (``templates_found[k]``, evaluated in the same way, so
    the calls it reads are evaluated where they are, never written out).  Each call is
    evaluated once per distinct (class, k, argument values): ``calls`` is that memo.

    The arithmetic is done here on Python floats (``arithmetic``), not by lambdify: the
    engine writes ~T^2 distinct expressions for an RNN of length T (each quantity's
    definition is a call at its own arguments), and sympy-compiling and substituting into
    each cost ~2 ms a quantity (programs/rnn.py T = 60: 14 s; now 0.8 s).  A value is the
    same IEEE operations as lambdify's up to the order of sums and products (values equal
    to 1e-15 relative or better).  Anything else (a function such as sqrt or exp of a quantity)
    and any arithmetic error (0/0, overflow) goes to ``lowering.evaluate`` as before, with
    its errors.

    (Calls are evaluated where they are, not written out: a template's value reads calls of
    the templates before it, so written out (``engine.instantiate``) a pi-net's values were
    trees that double with every layer, walked whole by every substitution.)"""

    def __init__(self, engine: PairwiseEngine, table: ExpectationRules, env: dict, zp: ZProgram):
        self.engine, self.table, self.env, self.graph = engine, table, env, zp.graph
        self.calls: dict = {}        # (class, index, argument values) -> value
        self.input_covs: dict = {}   # InputCov atom -> value

    def of(self, expr: sp.Expr, env=None) -> float:
        """v(expr), its symbols read from ``env`` (default: the environment; a template's
        slots before it)."""
        env = self.env if env is None else env
        try:
            return arithmetic(expr, lambda leaf: self._leaf(leaf, env))
        except (ArithmeticError, TypeError):  # 0/0, overflow, a complex value: lowering.evaluate says what
            return self._evaluated(expr, env)

    def _leaf(self, leaf: sp.Expr, env) -> float:
        if isinstance(leaf, sp.Symbol):
            return float(env[leaf.name])
        if isinstance(leaf, (E1, E2, TemplateCall)):
            return self.call(leaf, env)
        if isinstance(leaf, ops.InputCov):
            return self.input_cov(leaf)
        return self._evaluated(leaf, env)

    def input_cov(self, c: ops.InputCov) -> float:
        """The value of an input-layer covariance (once each): the sum over matching columns
        of the two layers' scalars s^a_i s^b_k over sqrt(norm_a norm_b)
        (``Graph.input_covariance_terms``), in float64 as ``arithmetic``."""
        found = self.input_covs.get(c)
        if found is None:
            pairs, norm = self.graph.input_covariance_terms(str(c.args[0]), str(c.args[1]), bool(c.args[2]),
                                                            bool(c.args[3]))
            total = 0.0
            for x, y in pairs:
                total += float(self.env[x.name]) * float(self.env[y.name])
            found = self.input_covs[c] = total / math.sqrt(norm)
        return found

    def call(self, c: sp.Expr, env=None) -> float:
        """v(c) for c = E1/E2/TemplateCall(k, a_1, .., a_m), memoised per argument values."""
        args = tuple(self.of(a, env) for a in c.args[1:])
        key = (type(c), int(c.args[0]), args)
        found = self.calls.get(key)
        if found is None:
            found = self.calls[key] = (self.template(key[1], args) if isinstance(c, TemplateCall)
                                       else _call(self.table[key[1]], list(args)))
        return found

    def template(self, index: int, args: tuple) -> float:
        """The value of template ``index`` with its slots bound to ``args``."""
        template = self.engine.templates_found[index]
        return self.of(template.value, ChainMap({s.name: v for s, v in zip(template.slots, args)}, self.env))

    def _evaluated(self, expr: sp.Expr, env) -> float:
        """v(expr) by ``lowering.evaluate``: its calls and input covariances replaced by their
        values (input covariances written out where they stand outside calls)."""
        values = {c: sp.Float(self._leaf(c, env)) for c in symbols.outermost(expr, (E1, E2, TemplateCall))}
        return evaluate(self.graph.expand_input_cov(expr.xreplace(values) if values else expr), env)


def arithmetic(expr: sp.Expr, leaf) -> float:
    """The value of ``expr`` in float64 with its sums, products and integer powers computed
    here, left to right in the order of the arguments, and every other subexpression (a
    symbol, a call, a function) valued by ``leaf(subexpression)``: v(a + b) = v(a) + v(b),
    v(a b) = v(a) v(b), v(a^n) = v(a)^n, v(number) = the nearest float64.  Raises
    ArithmeticError (ZeroDivisionError, OverflowError) as Python's float arithmetic does."""
    if isinstance(expr, sp.Number):
        return float(expr)
    if isinstance(expr, (sp.Add, sp.Mul)):
        return functools.reduce(operator.add if expr.is_Add else operator.mul,
                                [arithmetic(a, leaf) for a in expr.args])
    if isinstance(expr, sp.Pow) and expr.exp.is_Integer:
        return arithmetic(expr.base, leaf) ** int(expr.exp)
    return leaf(expr)


def _call(rule, args: list[float]) -> float:
    """One value of an expectations rule by its compiled scalar function (its array ``evaluate``
    starts a parallel loop per call, which costs more than the value)."""
    try:
        return float(rule.scalar(*args))
    except ArithmeticError as exc:  # compiled with Python's error model (0/0 at a node)
        raise NotPairwise(f"the bivariate Gaussian rule for {rule.method} failed at {args}: {exc!r}") from None
