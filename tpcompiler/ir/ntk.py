"""Kernel outputs as pair moments of the differentiated program (docs/DESIGN.md 2.3).

For the readout f(xi) = sigma/sqrt(n) v . x + b beta and the gradient vectors dz of the
backward pass, the infinite-width kernels are pair moments (xi, xi'):

  NNGP(xi, xi') = sigma^2 E[Z^x Z^x'] + b^2,
  NTK(xi, xi')  = sum over trained parameters P of <df/dP(xi), df/dP(xi')>:
      initial vector u:  ntk_weight_u * E[Z^{du} Z^{du}']                (du = sqrt(n) df/du)
      matrix W:          ntk_weight_W * sum_{uses a,b} E[Z^{r_a} Z^{r_b}'] E[Z^{c_a} Z^{c_b}']
                         (use y = W x: r = dy, c = x;  use y = W^T x: r = x, c = dy)
      readout v:         ntk_weight_v * sigma^2 E[Z^x Z^x'];  bias beta: bias_weight.

Because these are ordinary pair moments, the same outputs are evaluated by every backend:
exactly by the pairwise kernel backend, by particles, and at finite width by the interpreter
(where each pair moment is exactly the empirical kernel's sum over the parameter's entries).
"""
from __future__ import annotations

import sympy as sp

from tpcompiler.ir import ops
from tpcompiler.ir.backward import derive_backward, forward_nodes
from tpcompiler.ir.graph import Graph
from tpcompiler.ir.ops import node_symbol, primed_symbol


def _pair(graph: Graph, a: str, b: str, cache: dict) -> sp.Symbol:
    """The pair moment E[Z^a Z^b(xi')] (created once; ``cache`` also holds the set of
    input-dependent nodes under the key None)."""
    key = (a, b)
    if None not in cache:
        cache[None] = graph.input_dependent()
        for k in graph.keys_of(ops.Moment):  # reuse pair moments the program already has
            cache.setdefault(("expr", graph.op(k).expr), node_symbol(k))
    expr = node_symbol(a) * (primed_symbol(b) if b in cache[None] else node_symbol(b))
    if key not in cache and ("expr", expr) in cache:
        cache[key] = cache[("expr", expr)]
    if key not in cache:
        name = f"K_{a}_{b}" if a != b else f"K_{a}"
        k = 1
        base = name
        while name in graph.g:
            k += 1
            name = f"{base}_{k}"
        cache[key] = node_symbol(graph.add_nonlin(name, expr, op_type=ops.Moment, pair=True))
    return cache[key]


def kernel_program(graph: Graph) -> Graph:
    """``graph`` with its backward pass and the outputs ``nngp`` and ``ntk`` (pair moments)."""
    out, grads = derive_backward(graph)
    ro = graph.readout
    out.outputs = {}
    cache: dict = {}
    forward = set(forward_nodes(graph))
    bias2 = ro.bias**2 if ro.bias is not None else sp.S.Zero
    nngp = ro.sigma**2 * _pair(out, ro.vector, ro.vector, cache) + bias2
    terms = []
    v_weight = graph.op(ro.readout).weight()
    terms.append(v_weight * ro.sigma**2 * _pair(out, ro.vector, ro.vector, cache))
    if ro.bias is not None:
        terms.append(ro.bias_weight if ro.bias_weight is not None else bias2)
    uses: dict[str, list[tuple[str, str]]] = {}
    scaled: dict[str, sp.Expr] = {}  # D -> sum_u w_u c_u(xi) c_u(xi') over du = c_u D
    dependent = out.input_dependent()
    for key in graph.order():
        op = graph.op(key)
        if isinstance(op, ops.InitVec) and key in grads and key != ro.readout:
            w = op.weight()
            if w == 0:
                continue
            coef, base = _scalar_multiple(out, grads[key])
            primed = coef.xreplace({s: primed_symbol(s.key) for s in coef.free_symbols if s.key in dependent})
            scaled[base] = scaled.get(base, sp.S.Zero) + w * coef * primed
        elif isinstance(op, ops.MatMul) and key in forward and key in grads:
            mat, x, tr = graph.matmul_parts(key)
            uses.setdefault(mat, []).append((x, grads[key]) if tr else (grads[key], x))
    # Parameters whose gradients are scalar multiples of one vector (the d columns of an
    # input layer: dU_j = (sigma xi_j / sqrt(d)) dh) share one pair moment.
    for base, coef in scaled.items():
        terms.append(coef * _pair(out, base, base, cache))
    # Input matrices: the columns U_j of an input layer A = sum_i s_i U_{c_i} / sqrt(norm) have
    # gradients (s_i / sqrt(norm)) dA, so U contributes w_U sum_{A,B} Cov(Z^A, Z^B') E[dA dB'].
    for U in graph.keys_of(ops.InputMat):
        w = graph.op(U).weight()
        layers = [k for k in graph.keys_of(ops.InputLayer) if graph.args(k)[0] == U and k in grads]
        if w == 0:
            continue
        for a in layers:
            for b in layers:
                cov = out.init_covariance(a, b, prime_b=True, compact=True)
                terms.append(w * cov * _pair(out, grads[a], grads[b], cache))
    for mat, pairs in uses.items():
        w = graph.op(mat).weight()
        if w == 0:
            continue
        for ra, ca in pairs:
            for rb, cb in pairs:
                terms.append(w * _pair(out, ra, rb, cache) * _pair(out, ca, cb, cache))
    out.outputs["nngp"] = nngp
    out.outputs["ntk"] = sp.Add(*terms)
    return out


def _scalar_multiple(graph: Graph, key: str) -> tuple[sp.Expr, str]:
    """(c, D) with Z^key = c * Z^D for a scalar c (c = 1, D = key otherwise)."""
    op = graph.op(key)
    if isinstance(op, ops.Nonlin):
        vectors = [s for s in op.expr.free_symbols if graph.kind(s.key) == ops.VEC]
        if len(vectors) == 1:
            c = sp.simplify(op.expr / vectors[0])
            if not c.has(vectors[0]):
                return c, vectors[0].key
    return sp.S.One, key
