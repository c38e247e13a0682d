"""Instruction set of NETSOR-transpose programs (DESIGN.md 2.1).

Each op is a small frozen dataclass.  Its meaning is stated once, here, and read by every
stage: the finite-width interpreter (what the instruction computes at width n), the symbolic
stage (its Master-theorem rule, DESIGN.md 2.2) and the code generators (which print the same
sympy expressions).

Types of variables: ``VEC`` (n-vector, O(1) coordinates), ``MAT`` (n x n matrix) and
``SCALAR`` (a number with a deterministic limit).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

VEC, MAT, SCALAR = "Vec", "Mat", "Scalar"


def node_symbol(key: str) -> sp.Symbol:
    """The sympy symbol standing for node ``key`` inside Nonlin and Moment expressions."""
    return sp.Symbol(key, real=True)


def primed_symbol(key: str) -> sp.Symbol:
    """The symbol for node ``key`` evaluated at the second input xi' (pair moments only)."""
    return sp.Symbol(key + "'", real=True)


def unprime(symbol: sp.Symbol) -> tuple[str, bool]:
    """(node key, is_primed) of a symbol made by node_symbol or primed_symbol."""
    name = symbol.name
    return (name[:-1], True) if name.endswith("'") else (name, False)


@dataclass(frozen=True)
class InitVec:
    """Initial vector: coordinates iid N(0, var); jointly Gaussian with other initial vectors
    through the program's covariance table.  Z^x is that Gaussian (ZInit)."""

    var: sp.Expr
    kind = VEC


@dataclass(frozen=True)
class InitMat:
    """n x n matrix with iid N(0, sigma^2 / n) entries.  ``sigma`` is a sympy expression
    (usually the symbol of a Param) so formulas stay symbolic in it."""

    sigma: sp.Expr
    kind = MAT


@dataclass(frozen=True)
class Param:
    """A named scalar constant with a numeric value (hyperparameters, matrix scales)."""

    value: float
    kind = SCALAR


@dataclass(frozen=True)
class Input:
    """Coordinate ``index`` of the program's finite-dimensional input ``group``.

    A program with inputs is a template over one input xi; evaluation binds xi to each row
    of a data matrix (``ir.instantiate``)."""

    group: str
    index: int
    kind = SCALAR


@dataclass(frozen=True)
class MatMul:
    """``W x`` or, with ``transposed``, ``W^T x``.  Arguments: (matrix, vector).
    Master theorem: Z^{Wx} = ZHat^{Wx} + ZDot^{Wx} (DESIGN.md 2.2)."""

    transposed: bool
    kind = VEC


@dataclass(frozen=True)
class Nonlin:
    """Coordinatewise ``phi(x_1..x_k; theta_1..theta_l)``; ``expr`` is a sympy expression in
    the node symbols of its arguments.  Z^{phi(..)} = phi(Z^{x_1}..; lim theta..)."""

    expr: sp.Expr
    kind = VEC


@dataclass(frozen=True)
class Moment:
    """``theta = (1/n) sum_a psi(x_1a..x_ka; thetas)``; limit E psi(Z^{x_1}..).

    With ``pair`` set, ``expr`` may contain primed symbols: vectors evaluated at a second
    input xi'.  Such a pair moment (a kernel entry) may only be read by outputs."""

    expr: sp.Expr
    pair: bool = False
    kind = SCALAR
