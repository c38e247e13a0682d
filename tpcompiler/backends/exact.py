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

import numpy as np
import sympy as sp

from tpcompiler.ir import ops
from tpcompiler.ir.graph import ProgramError
from tpcompiler.backends.lowering import evaluate
from tpcompiler.ir.ops import VEC, node_symbol
from tpcompiler.symbolic.master import ZProgram


class NotLinear(ProgramError):
    """The program is not Gaussian-linear (a nonlinear function of vectors somewhere)."""


def is_gaussian_linear(zp: ZProgram) -> bool:
    """Whether every Nonlin is affine and every Moment at most quadratic in vectors."""
    g = zp.graph
    for key in zp.order:
        op = g.op(key)
        if isinstance(op, (ops.Nonlin, ops.Moment)):
            vecs = [node_symbol(a) for a in g.args(key) if g.kind(a) == VEC]
            if not vecs:
                continue
            try:
                poly = sp.Poly(op.expr, *vecs)
            except sp.PolynomialError:
                return False
            if poly.total_degree() > (1 if isinstance(op, ops.Nonlin) else 2):
                return False
            if any(c.has(*vecs) for c in poly.coeffs()):
                return False
    return True


class _Basis:
    """Coefficient vectors over the Gaussian basis (initial Gaussians and ZHats, K in all,
    known up front) with its covariance S filled in as the basis grows.  E[Z^a Z^b] =
    c_a^T S c_b uses S c_b, computed once per vector."""

    def __init__(self, K: int):
        self.size = 0
        self.cov = np.zeros((K, K))
        self._scov: dict = {}

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

    def product(self, key_a, ca, key_b, cb) -> float:
        """c_a^T S c_b, with S c_b cached per vector *and basis size*: a basis element added
        later (a new ZHat of b's family) is correlated with b's support, so S c_b gains
        entries as S grows and a cache keyed by the vector alone would go stale."""
        cached = self._scov.get(key_b)
        if cached is None or cached[0] != self.size:
            cached = self._scov[key_b] = (self.size, self.cov @ cb)
        return float(ca @ cached[1])


def exact_limit(zp: ZProgram) -> dict[str, tuple[float, float]]:
    """{output: (value, 0.0)} for a Gaussian-linear program (raises NotLinear otherwise)."""
    if not is_gaussian_linear(zp):
        raise NotLinear(f"program {zp.graph.name!r} is not Gaussian-linear")
    g = zp.graph
    inits = g.keys_of(ops.InitVec) + g.keys_of(ops.InputLayer)
    basis = _Basis(len(inits) + len(g.keys_of(ops.MatMul)))
    coef: dict[str, np.ndarray] = {}     # vector -> coefficients over the basis
    const: dict[str, float] = {}         # vector -> constant part
    leaf: dict[str, int] = {}            # ZHat / initial vector -> basis index
    env: dict = {}
    families: dict[tuple, list[str]] = {}

    def expect_product(a: str, b: str) -> float:
        return basis.product(a, coef[a], b, coef[b]) + const[a] * const[b]

    values = {k: g.op(k).value for k in g.keys_of(ops.Param)}
    for k in inits:
        cov = np.zeros(basis.size)
        for other, j in leaf.items():
            cov[j] = evaluate(g.init_covariance(other, k), values)
        leaf[k] = basis.add(cov, evaluate(g.init_covariance(k, k), values))
        coef[k], const[k] = basis.unit(leaf[k]), 0.0
    for key in zp.order:
        entry, op = zp.entries[key], g.op(key)
        if entry.rule in ("init", "mat"):
            continue
        if entry.rule == "param":
            env[key] = op.limit() if isinstance(op, ops.WidthPower) else op.value
        elif entry.rule == "input":
            raise ProgramError(f"program {g.name!r} has an unbound input {key!r}")
        elif entry.rule == "nonlin":
            coef[key], const[key] = _affine(g, key, op.expr, env, coef, const, basis)
        elif entry.rule == "matmul":
            mat, x, _ = g.matmul_parts(key)
            s2 = evaluate(g.op(mat).sigma ** 2, env)
            # a constant part of x is fine: the ZHat covariance sigma^2 E[Z^x Z^y] includes
            # it (expect_product), and ZDot reads only the coefficients over the basis
            members = families.setdefault(entry.family, [])
            cov = np.zeros(basis.size)
            for m in members:
                cov[leaf[m]] = s2 * expect_product(x, zp.entries[m].x)
            leaf[key] = basis.add(cov, s2 * expect_product(x, x))
            members.append(key)
            c, k = basis.unit(leaf[key]), 0.0
            for t in zp.zdot_terms(key):  # E[dZ^x/dZHat^src] is the coefficient of ZHat^src in Z^x
                w = s2 * coef[x][leaf[t.source]]
                c = c + w * coef[t.y]
                k += w * const[t.y]  # ZDot carries Z^y whole, its constant part included
            coef[key], const[key] = c, k
        elif entry.rule == "moment":
            env[key] = 0.0 if entry.z == 0 else _moment(g, op.expr, env, expect_product, const)
    return {name: (evaluate(expr, env), 0.0) for name, expr in g.outputs.items()}


def _split_affine(expr: sp.Expr, vecs: list) -> tuple[sp.Expr, dict]:
    poly = sp.Poly(expr, *vecs)
    parts = {}
    constant = sp.S.Zero
    for monom, c in poly.terms():
        if sum(monom) == 0:
            constant += c
        else:
            parts[vecs[monom.index(1)]] = parts.get(vecs[monom.index(1)], sp.S.Zero) + c
    return constant, parts


def _affine(g, key, expr, env, coef, const, basis):
    vecs = [node_symbol(a) for a in g.args(key) if g.kind(a) == VEC]
    if not vecs:
        return np.zeros(basis.cov.shape[0]), evaluate(expr, env)
    constant, parts = _split_affine(expr, vecs)
    c = np.zeros(basis.cov.shape[0])
    k = evaluate(constant, env) if constant != 0 else 0.0
    for s, a in parts.items():
        w = evaluate(a, env)
        c = c + w * coef[s.key]
        k += w * const[s.key]
    return c, k


def _moment(g, expr, env, expect_product, const):
    """E[psi] for psi of degree <= 2 in the vectors: linear terms are their constant parts
    (the basis has mean zero), quadratic ones c_a^T S c_b + k_a k_b."""
    vecs = sorted((s for s in expr.free_symbols if s.key in g.g and g.kind(s.key) == VEC), key=lambda s: s.key)
    if not vecs:
        return evaluate(expr, env)
    total = 0.0
    for monom, c in sp.Poly(expr, *vecs).terms():
        w = evaluate(c, env)
        idx = [i for i, p in enumerate(monom) for _ in range(p)]
        if not idx:
            total += w
        elif len(idx) == 1:
            total += w * const[vecs[idx[0]].key]
        else:
            total += w * expect_product(vecs[idx[0]].key, vecs[idx[1]].key)
    return total
