"""Exact limit of Gaussian-linear programs (docs/DESIGN.md 2.7, strategy 1).

When every Nonlin is affine in its vector arguments (coefficients may be scalars: Params,
Moments, width powers) and every Moment is a polynomial of degree at most 2 in vectors, every
Z is a linear combination of a finite Gaussian basis -- the initial Gaussians and the ZHats --
and everything is exact:

* a vector carries its coefficient vector c over the basis (plus a constant);
* the basis covariance S is block diagonal: initial vectors by the program's table, input
  layers by their input inner products, each ZHat family by Cov(ZHat^{Wx}, ZHat^{Wy}) =
  sigma^2 E[Z^x Z^y] = sigma^2 c_x^T S c_y (exact, from earlier coefficients);
* ZDot^{Wx} = sigma^2 sum_y Z^y E[dZ^x/dZHat^{W^T y}]: the derivative of a linear form is
  its coefficient, so the ZDot coefficient is read off c_x exactly;
* a Moment E[a + b^T Z + Z^T Q Z] = a + tr(Q S) (quadratic part from the coefficients).

TP4's word2vec and MAML limits are of this kind.  The arithmetic is dense linear algebra on
the basis (numpy/BLAS); its size grows with the number of ZHats, not with any width.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

from tpcompiler.ir import ops
from tpcompiler.ir.graph import ProgramError
from tpcompiler.ir.rules import RuleTable
from tpcompiler.backends.lowering import evaluate
from tpcompiler.backends.walk import initial_covariance, initial_keys, limit_rules, release_schedule, walk
from tpcompiler.ir.ops import VEC, node_symbol
from tpcompiler.symbolic.master import ZProgram


class NotLinear(ProgramError):
    """The program is not Gaussian-linear (a nonlinear function of vectors somewhere)."""


def _vector_symbols(graph, key: str) -> dict:
    """{node symbol: key} of the vector arguments of instruction ``key``."""
    return {node_symbol(a): a for a in graph.args(key) if graph.kind(a) == VEC}


def _polynomial_of_degree(graph, key: str, expr: sp.Expr, degree: int) -> bool:
    """Whether ``expr`` is a polynomial of total degree <= ``degree`` in the vector
    arguments of ``key`` with coefficients free of them.  Its coefficients are taken as they
    are (sympy's EX domain, here and in ``_nonlin`` and ``_moment``): the domain sympy would
    construct for them, a field of fractions over every exp of a softmax's logits (word2vec),
    runs a multivariate gcd per polynomial (vocabulary V = 8: minutes)."""
    vecs = list(_vector_symbols(graph, key))
    if not vecs:
        return True
    try:
        poly = sp.Poly(expr, *vecs, domain=sp.EX)
    except sp.PolynomialError:
        return False
    return poly.total_degree() <= degree and not any(c.has(*vecs) for c in poly.coeffs())


#: Gaussian-linear per op: Nonlins affine, Moments at most quadratic in vectors, the rest always.
GAUSSIAN_LINEAR = RuleTable("Gaussian-linear check", domain=ops.INSTRUCTIONS)
GAUSSIAN_LINEAR.register(ops.Nonlin)(lambda graph, key, op: _polynomial_of_degree(graph, key, op.expr, 1))
GAUSSIAN_LINEAR.register(ops.Moment)(lambda graph, key, op: _polynomial_of_degree(graph, key, op.expr, 2))
GAUSSIAN_LINEAR.register(ops.InitVec, ops.InitMat, ops.InputMat, ops.InputLayer, ops.Param, ops.WidthPower,
                         ops.Input, ops.MatMul)(lambda graph, key, op: True)


def is_gaussian_linear(zp: ZProgram) -> bool:
    """Whether every Nonlin is affine and every Moment at most quadratic in vectors."""
    g = zp.graph
    return all(GAUSSIAN_LINEAR(g.op(key))(g, key, g.op(key)) for key in zp.order)


@dataclass
class _Affine:
    """Z = coef . basis + const; ``scov`` caches (basis size, S coef) for E[Z^a Z^b]."""

    coef: np.ndarray
    const: float
    scov: tuple | None = None


class _Basis:
    """The Gaussian basis (initial Gaussians and ZHats, K in all, known up front) with its
    covariance S filled in as the basis grows."""

    def __init__(self, K: int):
        self.size = 0
        self.cov = np.zeros((K, K))

    def add(self, cov_with_existing: np.ndarray, var: float) -> int:
        k = self.size
        self.cov[k, :k] = self.cov[:k, k] = cov_with_existing[:k]
        self.cov[k, k] = var
        self.size += 1
        return k

    def unit(self, k: int) -> np.ndarray:
        c = np.zeros(self.cov.shape[0])
        c[k] = 1.0
        return c

    def zero(self) -> np.ndarray:
        return np.zeros(self.cov.shape[0])

    def expect_product(self, a: _Affine, b: _Affine) -> float:
        """E[Z^a Z^b] = c_a^T S c_b + k_a k_b (the basis has mean zero).  S c_b is cached on
        b *with the basis size*: a basis element added later (a new ZHat of b's family) is
        correlated with b's support, so S c_b gains entries as S grows."""
        if b.scov is None or b.scov[0] != self.size:
            b.scov = (self.size, self.cov @ b.coef)
        return float(a.coef @ b.scov[1]) + a.const * b.const


class _ExactRun:
    """State of one exact evaluation: the basis, the basis index of every leaf, the values."""

    def __init__(self, zp: ZProgram):
        self.zp = zp
        g = zp.graph
        inits = initial_keys(g)
        self.basis = _Basis(len(inits) + len(g.keys_of(ops.MatMul)))
        self.leaf: dict[str, int] = {}       # ZHat / initial vector -> basis index
        self.members: dict[tuple, list[str]] = {}  # ZHat family -> its products so far
        self.env: dict = {}
        cov = initial_covariance(g, inits)
        for i, k in enumerate(inits):
            self.leaf[k] = self.basis.add(cov[i], cov[i, i])
            self.env[k] = _Affine(self.basis.unit(self.leaf[k]), 0.0)

    def scalar(self, expr: sp.Expr) -> float:
        return evaluate(expr, self.env)


def _nonlin(run: _ExactRun, entry, op) -> _Affine:
    """Z^{phi(x..)} for affine phi: the same combination of the arguments' coefficients."""
    vecs = _vector_symbols(run.zp.graph, entry.key)
    if not vecs:
        return _Affine(run.basis.zero(), run.scalar(op.expr))
    poly = sp.Poly(op.expr, *vecs, domain=sp.EX)
    out = _Affine(run.basis.zero(), 0.0)
    for monom, c in poly.terms():
        w = run.scalar(c)
        if sum(monom) == 0:
            out.const += w
        else:
            arg = run.env[vecs[list(vecs)[monom.index(1)]]]
            out.coef = out.coef + w * arg.coef
            out.const += w * arg.const
    return out


def _matmul(run: _ExactRun, entry, op) -> _Affine:
    """Z^{Wx} = ZHat^{Wx} + ZDot^{Wx}: a new basis element with Cov(ZHat^{Wx}, ZHat^{Wy}) =
    sigma^2 E[Z^x Z^y] over the family, plus sigma^2 sum_y Z^y E[dZ^x/dZHat^{W^T y}], where
    the expected derivative of the linear form Z^x is its coefficient of ZHat^{W^T y}."""
    g, basis, env = run.zp.graph, run.basis, run.env
    mat, x, _ = g.matmul_parts(entry.key)
    s2 = run.scalar(g.op(mat).sigma ** 2)
    # a constant part of x is fine: the ZHat covariance sigma^2 E[Z^x Z^y] includes it, and
    # ZDot reads only the coefficients over the basis
    members = run.members.setdefault(entry.family, [])
    cov = np.zeros(basis.size)
    for m in members:
        cov[run.leaf[m]] = s2 * basis.expect_product(env[x], env[run.zp.entries[m].x])
    run.leaf[entry.key] = basis.add(cov, s2 * basis.expect_product(env[x], env[x]))
    members.append(entry.key)
    out = _Affine(basis.unit(run.leaf[entry.key]), 0.0)
    for t in run.zp.zdot_terms(entry.key):
        w = s2 * env[x].coef[run.leaf[t.source]]
        out.coef = out.coef + w * env[t.y].coef
        out.const += w * env[t.y].const  # ZDot carries Z^y whole, its constant part included
    return out


def _moment(run: _ExactRun, entry, op) -> float:
    """E[psi] for psi of degree <= 2 in the vectors: linear terms are their constant parts
    (the basis has mean zero), quadratic ones c_a^T S c_b + k_a k_b."""
    if entry.z == 0:
        return 0.0
    vecs = dict(sorted(_vector_symbols(run.zp.graph, entry.key).items(), key=lambda item: item[1]))
    if not vecs:
        return run.scalar(op.expr)
    keys = list(vecs.values())
    total = 0.0
    for monom, c in sp.Poly(op.expr, *vecs, domain=sp.EX).terms():
        w = run.scalar(c)
        idx = [i for i, p in enumerate(monom) for _ in range(p)]
        if not idx:
            total += w
        elif len(idx) == 1:
            total += w * run.env[keys[idx[0]]].const
        else:
            total += w * run.basis.expect_product(run.env[keys[idx[0]]], run.env[keys[idx[1]]])
    return total


#: The exact Gaussian-linear evaluator: vectors are affine forms over the Gaussian basis.
EXACT = limit_rules("exact Gaussian-linear limit")
EXACT.register(ops.Nonlin)(_nonlin)
EXACT.register(ops.MatMul)(_matmul)
EXACT.register(ops.Moment)(_moment)


def exact_limit(zp: ZProgram) -> dict[str, tuple[float, float]]:
    """{output: (value, 0.0)} for a Gaussian-linear program (raises NotLinear otherwise)."""
    if not is_gaussian_linear(zp):
        raise NotLinear(f"program {zp.graph.name!r} is not Gaussian-linear")
    values = walk(_ExactRun(zp), EXACT, release_schedule(zp))
    return {name: (value, 0.0) for name, value in values.items()}
