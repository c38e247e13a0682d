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
from tpcompiler.ir.rules import RuleTable
from tpcompiler.symbolic.master import partials


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

    dz = sum of the contributions of the instructions that read z (each op's rule in
    ``BACKWARD``), seeded by dx = sigma v at the readout vector x.  ``seed`` replaces that
    gradient (e.g. a loss gradient sum_k chi_k v_k); it is an expression in node symbols of
    ``graph``.  New nodes are interned: a gradient the program already computes (a
    hand-written backward pass) is reused, not computed twice."""
    forward = forward_nodes(graph)
    out = graph.copy()
    ro = graph.readout
    contributions: dict[str, list[sp.Expr]] = {k: [] for k in forward}
    contributions[ro.vector].append(ro.sigma * node_symbol(ro.readout) if seed is None else seed)
    grads: dict[str, str] = {}
    for key in reversed(forward):
        terms = contributions[key]
        if not terms:
            continue
        total = sp.Add(*terms)
        if isinstance(total, NodeSymbol) and total.key in out.g and out.kind(total.key) == VEC:
            grads[key] = total.key
        else:
            grads[key] = out.intern_expr(ops.Nonlin, total, f"{prefix}{key}")
        op = graph.op(key)
        for arg, term in BACKWARD(op)(graph, out, key, op, grads[key], prefix):
            contributions[arg].append(term)
    return out, grads


#: Backward rules: given z = op(args) and dz, the contributions (arg, term) to the gradients
#: of its vector arguments (d arg += term).  New nodes go into the differentiated graph.
BACKWARD = RuleTable("backward", domain=ops.VECTOR_OPS)


@BACKWARD.register(ops.InitVec, ops.InputLayer)
def _backward_leaf(graph: Graph, out: Graph, key: str, op, dkey: str, prefix: str) -> list:
    """Initial Gaussians read no vectors: the gradient stops here."""
    return []


@BACKWARD.register(ops.Nonlin)
def _backward_nonlin(graph: Graph, out: Graph, key: str, op, dkey: str, prefix: str) -> list:
    """y = phi(a_1..a_k; theta):  d a_i += (d phi / d a_i) dy."""
    vectors = graph.vector_args(key)
    derivs = partials(op.expr, [node_symbol(a) for a in vectors])
    return [(a, derivs[node_symbol(a)] * node_symbol(dkey)) for a in vectors if derivs[node_symbol(a)] != 0]


@BACKWARD.register(ops.MatMul)
def _backward_matmul(graph: Graph, out: Graph, key: str, op, dkey: str, prefix: str) -> list:
    """y = W a:  d a += W^T dy;   y = W^T a:  d a += W dy."""
    mat, x, tr = graph.matmul_parts(key)
    return [(x, node_symbol(out.intern(ops.MatMul(not tr), (mat, dkey), f"{prefix}{key}_{x}")))]
