"""Backward-pass derivation: a graph pass (docs/DESIGN.md 3) that appends, for every vector z on
the way from the parameters to the readout, its gradient vector

    dz = sqrt(n) df/dz        (coordinates O(1); f the readout of docs/DESIGN.md 2.3)

by reverse-mode differentiation of the program itself:

* seed:     dx = sigma v for the readout f = sigma/sqrt(n) v . x;
* Nonlin    y = phi(a_1..a_k; theta):  da_i += (d phi / d a_i) * dy   (sympy derivative);
* MatMul    y = W a:    da += W^T dy;     y = W^T a:  da += W dy.

The result is an ordinary NETSOR-transpose program (the backward products are W^T MatMuls),
so the Master theorem derives its limit like any other: there is no per-architecture
formula anywhere.
"""
from __future__ import annotations

import networkx as nx
import sympy as sp

from tpcompiler.ir import ops
from tpcompiler.ir.graph import Graph, ProgramError
from tpcompiler.ir.ops import VEC, node_symbol
from tpcompiler.ir.symbols import NodeSymbol
from tpcompiler.symbolic.master import partials


def _fresh(graph: Graph, base: str) -> str:
    key, k = base, 1
    while key in graph.g:
        k += 1
        key = f"{base}_{k}"
    return key


def _existing_instructions(graph: Graph) -> dict:
    """Nonlin expressions and MatMul products already in the program, so a derived backward
    pass reuses a hand-written one where they coincide."""
    found = {}
    for key in graph.order():
        op = graph.op(key)
        if isinstance(op, ops.Nonlin):
            found.setdefault(("nonlin", op.expr), key)
        elif isinstance(op, ops.MatMul):
            mat, x, tr = graph.matmul_parts(key)
            found.setdefault(("matmul", mat, x, tr), key)
    return found


def forward_nodes(graph: Graph) -> list[str]:
    """Vectors the readout depends on, in program order (the readout vector last)."""
    ro = graph.readout
    if ro is None:
        raise ProgramError(f"program {graph.name!r} has no readout; declare one with p.readout(x, sigma=..., bias=...)")
    ancestors = nx.ancestors(graph.g, ro.vector) | {ro.vector}
    for k in ancestors:
        if isinstance(graph.op(k), ops.Moment):
            raise ProgramError(
                f"instruction {k!r}: the readout depends on the Moment {k!r}; differentiating through a Moment "
                "is not supported by the backward pass"
            )
    return [k for k in graph.order() if k in ancestors and graph.kind(k) == VEC]


def derive_backward(graph: Graph, prefix: str = "d", seed: sp.Expr | None = None) -> tuple[Graph, dict[str, str]]:
    """A copy of ``graph`` with gradient vectors appended; returns (graph, {z: dz}).

    ``seed`` replaces the readout's gradient sigma v (e.g. a loss gradient sum_k chi_k v_k);
    it is an expression in node symbols of ``graph``."""
    forward = forward_nodes(graph)
    out = graph.copy()
    ro = graph.readout
    existing = _existing_instructions(out)

    def nonlin(base: str, expr: sp.Expr) -> str:
        if ("nonlin", expr) not in existing:
            existing[("nonlin", expr)] = out.add_nonlin(_fresh(out, base), expr)
        return existing[("nonlin", expr)]

    def matmul(base: str, mat: str, x: str, tr: bool) -> str:
        if ("matmul", mat, x, tr) not in existing:
            existing[("matmul", mat, x, tr)] = out.add_matmul(_fresh(out, base), mat, x, tr)
        return existing[("matmul", mat, x, tr)]

    contributions: dict[str, list[sp.Expr]] = {k: [] for k in forward}
    contributions[ro.vector].append(ro.sigma * node_symbol(ro.readout) if seed is None else seed)
    grads: dict[str, str] = {}
    for key in reversed(forward):
        terms = contributions[key]
        if not terms:
            continue
        total = sp.Add(*terms)
        if isinstance(total, NodeSymbol) and total.key in out.g and out.kind(total.key) == VEC:
            dkey = total.key
        else:
            dkey = nonlin(f"{prefix}{key}", total)
        grads[key] = dkey
        op = graph.op(key)
        if isinstance(op, ops.Nonlin):
            derivs = partials(op.expr, [node_symbol(a) for a in graph.vector_args(key)])
            for a in graph.vector_args(key):
                partial = derivs[node_symbol(a)]
                if partial != 0:
                    contributions[a].append(partial * node_symbol(dkey))
        elif isinstance(op, ops.MatMul):
            mat, x, tr = graph.matmul_parts(key)
            back = matmul(f"{prefix}{key}_{x}", mat, dkey, not tr)
            contributions[x].append(node_symbol(back))
    return out, grads
