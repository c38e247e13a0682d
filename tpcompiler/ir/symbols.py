"""The compiler's internal sympy symbols, defined in one place.

A program's own variables are sympy symbols named by their node keys (``ops.node_symbol``),
and node keys are Python identifiers (the DSL refuses anything else).  Every symbol the
compiler makes for itself therefore carries the character ``:``, which no identifier
contains, so no user name can ever be read as an internal symbol or collide with one:

* ``Z:x``      Z^x, the limit random variable of vector x (docs/DESIGN.md 2.2);
* ``Zhat:x``   ZHat^x, the Gaussian leaf of the MatMul node x;
* ``q:k``      quantity k of the pairwise-Gaussian kernel engine (an expectation);
* ``rf:k``     row feature k of the kernel backend (a function of one input row);
* ``G:m``      Gram entry m of the kernel backend (an inner product of two input rows);
* ``arg:t``    the dummy argument of a one-variable function g(t) in the kernel engine.

A trailing ``'`` marks the copy of a symbol evaluated at the second input xi' (pair moments
and kernel entries); it applies to program and internal symbols alike.
"""
from __future__ import annotations

import sympy as sp

SEP = ":"
PRIME = "'"

Z_KIND, ZHAT_KIND, QUANTITY_KIND, ROW_FEATURE_KIND, GRAM_KIND = "Z", "Zhat", "q", "rf", "G"


def _internal(kind: str, name: str, primed: bool = False) -> sp.Symbol:
    return sp.Symbol(f"{kind}{SEP}{name}" + (PRIME if primed else ""), real=True)


def Z(key: str, primed: bool = False) -> sp.Symbol:
    """The symbol Z^key (Z^key(xi') if primed)."""
    return _internal(Z_KIND, key, primed)


def Zhat(key: str) -> sp.Symbol:
    """The leaf ZHat of the MatMul node ``key``."""
    return _internal(ZHAT_KIND, key)


def quantity(k: int) -> sp.Symbol:
    """Quantity number k of the pairwise-Gaussian engine."""
    return _internal(QUANTITY_KIND, str(k))


def row_feature(k: int, second: bool = False) -> sp.Symbol:
    """Row feature number k (at the second input if ``second``)."""
    return _internal(ROW_FEATURE_KIND, str(k), second)


def gram(m: int) -> sp.Symbol:
    """Gram entry number m."""
    return _internal(GRAM_KIND, str(m))


#: The argument t of one-variable functions g(t) in the kernel engine.
ARG = _internal("arg", "t")


def is_primed(s: sp.Symbol) -> bool:
    return s.name.endswith(PRIME)


def primed(s: sp.Symbol) -> sp.Symbol:
    """The second-input copy of ``s`` (program or internal symbol)."""
    return sp.Symbol(s.name + PRIME, real=True)


def unprimed(s: sp.Symbol) -> sp.Symbol:
    """The first-input version of ``s`` (``s`` itself when it is not primed)."""
    return sp.Symbol(s.name[:-1], real=True) if is_primed(s) else s


def kind_of(s: sp.Symbol) -> str | None:
    """The internal kind of ``s`` (Z_KIND, ZHAT_KIND, ...), or None for a program symbol."""
    head, sep, _ = s.name.partition(SEP)
    return head if sep else None


def key_of(s: sp.Symbol) -> tuple[str, bool]:
    """(name after the kind, primed) of an internal symbol: the node key of Z and ZHat."""
    name = s.name[:-1] if is_primed(s) else s.name
    return name.partition(SEP)[2], is_primed(s)


def is_z(s: sp.Symbol) -> bool:
    return kind_of(s) == Z_KIND


def is_zhat(s: sp.Symbol) -> bool:
    return kind_of(s) == ZHAT_KIND


def is_leaf_variable(s: sp.Symbol) -> bool:
    """Z or ZHat: a limit random variable."""
    return kind_of(s) in (Z_KIND, ZHAT_KIND)


def is_quantity(s: sp.Symbol) -> bool:
    return kind_of(s) == QUANTITY_KIND
