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

from dataclasses import dataclass, field

import sympy as sp

from tpcompiler.ir import ops
from tpcompiler.ir.backward import derive_backward, forward_nodes
from tpcompiler.ir.graph import Graph
from tpcompiler.ir.ops import node_symbol, primed_symbol
from tpcompiler.ir.rules import RuleTable
from tpcompiler.ir.symbols import monomial


def _pair(d: "_Differentiated", a: str, b: str) -> sp.Symbol:
    """The pair moment E[Z^a Z^b(xi')]: b is primed where it depends on the input.  Interned,
    so the program's own pair moment of the same expression (or an earlier request) is reused;
    memoised (a convolution's taps share their gradient pairs)."""
    found = d.pairs.get((a, b))
    if found is None:
        expr = monomial(node_symbol(a), primed_symbol(b) if b in d.dependent else node_symbol(b))
        found = d.pairs[(a, b)] = node_symbol(
            d.out.intern_expr(ops.Moment, expr, f"K_{a}_{b}" if a != b else f"K_{a}", pair=True))
    return found


@dataclass
class _Differentiated:
    """A template and its backward pass: ``out`` (the graph gradients were appended to),
    ``grads`` {z: dz}, the forward vectors and the input-dependent nodes of ``out``, and the
    pair moments made so far."""

    graph: Graph
    out: Graph
    grads: dict
    forward: set
    dependent: set
    pairs: dict = field(default_factory=dict)   # (a, b) -> its pair moment's symbol (_pair)


def kernel_program(graph: Graph) -> Graph:
    """``graph`` with its backward pass and the outputs ``nngp`` and ``ntk`` (pair moments)."""
    return kernel_outputs(graph, *derive_backward(graph))


def kernel_outputs(graph: Graph, out: Graph, grads: dict[str, str]) -> Graph:
    """The kernel-program pass: ``out`` (``graph`` with its backward pass, gradients
    ``grads`` = {z: dz}) with the outputs ``nngp`` and ``ntk`` as pair moments, replacing its
    outputs.  NTK = v's term + the bias term + the contributions of every trained parameter
    type, each by its rule in ``NTK_TERMS`` (in the order of that table's domain)."""
    d = _Differentiated(graph, out, grads, set(forward_nodes(graph)), out.input_dependent())
    ro = graph.readout
    out.outputs = {}
    bias2 = ro.bias**2 if ro.bias is not None else sp.S.Zero
    nngp = ro.sigma**2 * _pair(d, ro.vector, ro.vector) + bias2
    terms = [graph.op(ro.readout).weight() * ro.sigma**2 * _pair(d, ro.vector, ro.vector)]
    if ro.bias is not None:
        terms.append(ro.bias_weight if ro.bias_weight is not None else bias2)
    for op_type in NTK_TERMS.domain:
        keys = [k for k in graph.keys_of(op_type) if graph.op(k).weight() != 0 and k != ro.readout]
        terms += NTK_TERMS(op_type)(d, keys)
    out.outputs["nngp"] = nngp
    out.outputs["ntk"] = sp.Add(*terms)
    return out


#: NTK contributions of the trained parameters, by op type: rule(differentiated, keys of that
#: type with a nonzero NTK weight) -> terms.
NTK_TERMS = RuleTable("NTK contributions", domain=ops.INITIAL)


@NTK_TERMS.register(ops.InitVec)
def _ntk_vectors(d: _Differentiated, keys: list) -> list:
    """Initial vector u: w_u E[Z^{du} Z^{du}'].  Vectors whose gradients are scalar multiples
    c_u D of one vector (the d columns of an input layer: dU_j = (sigma xi_j / sqrt(d)) dh)
    share one pair moment: sum_u w_u c_u(xi) c_u(xi') E[Z^D Z^D']."""
    scaled: dict[str, sp.Expr] = {}
    for key in keys:
        if key not in d.grads:
            continue
        coef, base = _scalar_multiple(d.out, d.grads[key])
        primed = coef.xreplace({s: primed_symbol(s.key) for s in coef.free_symbols if s.key in d.dependent})
        scaled[base] = scaled.get(base, sp.S.Zero) + d.graph.op(key).weight() * coef * primed
    return [coef * _pair(d, base, base) for base, coef in scaled.items()]


@NTK_TERMS.register(ops.InputMat)
def _ntk_input_matrices(d: _Differentiated, keys: list) -> list:
    """Input matrix U: the columns U_j of an input layer A = sum_i s_i U_{c_i} / sqrt(norm)
    have gradients (s_i / sqrt(norm)) dA, so U contributes w_U sum_{A,B} Cov(Z^A, Z^B') E[dA dB']."""
    terms = []
    for U in keys:
        layers = [k for k in d.graph.keys_of(ops.InputLayer) if d.graph.args(k)[0] == U and k in d.grads]
        for a in layers:
            for b in layers:
                cov = d.out.init_covariance(a, b, prime_b=True, compact=True)
                terms.append(sp.Mul(d.graph.op(U).weight(), cov, _pair(d, d.grads[a], d.grads[b])))
    return terms


@NTK_TERMS.register(ops.InitMat)
def _ntk_matrices(d: _Differentiated, keys: list) -> list:
    """Matrix W: w_W sum_{uses a,b} E[Z^{r_a} Z^{r_b}'] E[Z^{c_a} Z^{c_b}'] over its forward
    uses (y = W x: r = dy, c = x;  y = W^T x: r = x, c = dy), matrices in order of first use."""
    uses: dict[str, list[tuple[str, str]]] = {}
    for key in d.graph.keys_of(ops.MatMul):
        mat, x, tr = d.graph.matmul_parts(key)
        if key in d.forward and key in d.grads and mat in keys:
            uses.setdefault(mat, []).append((x, d.grads[key]) if tr else (d.grads[key], x))
    # Pairs of uses with the same (r_a, r_b), of any matrices, share that factor:
    # E[Z^{r_a} Z^{r_b}'] * sum w_W E[Z^{c_a} Z^{c_b}'].  A convolution's taps that read one
    # pair of output positions have one gradient pair, so its term is one product per pair of
    # positions (the NTK recursion's Theta = Sigma-dot * (sum over the window)), not one per
    # pair of positions and tap.  A single pair stays one product of three factors.
    weights = {mat: d.graph.op(mat).weight() for mat in uses}
    by_rows: dict = {}
    for mat, pairs in uses.items():
        for ra, ca in pairs:
            for rb, cb in pairs:
                by_rows.setdefault((ra, rb), []).append((weights[mat], ca, cb))
    terms = []
    for (ra, rb), parts in by_rows.items():
        if len(parts) == 1:
            (w, ca, cb), = parts
            terms.append(monomial(w, _pair(d, ra, rb), _pair(d, ca, cb)))
        else:
            terms.append(sp.Mul(_pair(d, ra, rb), sp.Add(*[monomial(w, _pair(d, ca, cb)) for w, ca, cb in parts])))
    return terms


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
