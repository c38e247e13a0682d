"""Backward-pass derivation: a graph pass (docs/DESIGN.md 3) that appends, for every vector z on
the way from the parameters to the readout, its gradient vector

    dz = sqrt(n) df/dz        (coordinates O(1); f the readout of docs/DESIGN.md 2.3)

by reverse-mode differentiation of the program itself:

* seed:     dx = sigma v for the readout f = sigma/sqrt(n) v . x;
* Nonlin    y = phi(a_1..a_k; theta):  da_i += (d phi / d a_i) * dy   (sympy derivative, almost
            everywhere: a Dirac delta is 0, as in the finite network's gradient);
* MatMul    y = W a:    da += W^T dy;     y = W^T a:  da += W dy.

Moments on the way (theta = (1/n) sum_a psi(x_a; thetas), read by later vectors as scalar
arguments: a LayerNorm's mean and variance) are differentiated too.  Their gradient is kept
at the scale that makes it O(1),

    D theta = df/dtheta / sqrt(n),

which is itself a Moment of the program (a finite sum of products of Moments), so the
backward program stays a NETSOR-transpose program:

* Nonlin    y = phi(..; theta):  D theta += (1/n) sum_a (d phi / d theta)_a dy_a     (a Moment);
* Moment    theta = (1/n) sum_a psi(x_a; theta'):
                d x += D theta * (d psi / d x)                                  (a Nonlin term),
                D theta' += D theta * (1/n) sum_a (d psi / d theta')_a           (a Moment).

(With f's dependence df/dy_a = dy_a / sqrt(n): df/dtheta = sum_a (d phi/d theta)_a dy_a /
sqrt(n) = sqrt(n) D theta, and df/dx_a += df/dtheta (d psi/d x)_a / n, i.e. dx_a += D theta
(d psi / d x)_a.)  Whether such a term survives in the limit is not decided here: D theta is
an ordinary Moment, and the Master theorem derives its limit (for the kernels' backward pass,
linear in the zero-mean readout vector v, it is E[.. Z^v ..] = 0 by the symbolic stage's
parity rule, docs/DESIGN.md 2.2; at finite width the interpreter computes it exactly).

The result is an ordinary NETSOR-transpose program (the backward products are W^T MatMuls),
so the Master theorem derives its limit like any other: there is no per-architecture
formula anywhere.
"""
from __future__ import annotations

import networkx as nx
import sympy as sp

from tpcompiler.ir import nonlinearities as nl
from tpcompiler.ir import ops
from tpcompiler.ir.graph import Graph, ProgramError
from tpcompiler.ir.ops import VEC, node_symbol
from tpcompiler.ir.symbols import NodeSymbol
from tpcompiler.ir.rules import RuleTable
from tpcompiler.symbolic.master import partials


def _ancestors(graph: Graph) -> set[str]:
    """Nodes the readout vector depends on (itself included)."""
    ro = graph.readout
    if ro is None:
        raise ProgramError(f"program {graph.name!r} has no readout; declare one with p.readout(x, sigma=..., bias=...)")
    return nx.ancestors(graph.g, ro.vector) | {ro.vector}


def forward_nodes(graph: Graph) -> list[str]:
    """Vectors the readout depends on, in program order (the readout vector last)."""
    ancestors = _ancestors(graph)
    return [k for k in graph.order() if k in ancestors and graph.kind(k) == VEC]


def forward_moments(graph: Graph) -> list[str]:
    """Moments the readout depends on (scalar arguments of its vectors), in program order."""
    ancestors = _ancestors(graph)
    return [k for k in graph.order() if k in ancestors and isinstance(graph.op(k), ops.Moment)]


def refuse_moments(graph: Graph, where: str) -> None:
    """A clear error for passes that do not (yet) carry Moments of the forward pass along."""
    moments = forward_moments(graph)
    if moments:
        k = moments[0]
        raise ProgramError(f"instruction {k!r}: the readout depends on the Moment {k!r} (e.g. a LayerNorm); "
                           f"{where} does not support Moments in the network yet (its kernels do: tp.compile)")


def refuse_readout_bias(graph: Graph, where: str) -> None:
    """A clear error for training passes, which do not train the readout's bias: f = sigma/sqrt(n)
    v . x + bias * beta with beta ~ N(0, 1) is random at every width, so trained (the kernels'
    convention) or not, the limit of f would depend on it; it was silently left out."""
    ro = graph.readout
    if ro is not None and ro.bias is not None and not (sp.sympify(ro.bias).is_zero is True):
        bias = sp.sympify(ro.bias)
        shown = f"{float(bias):g}" if bias.is_number else str(bias)
        raise ProgramError(f"program {graph.name!r}: the readout has a bias (p.readout(..., bias={shown})), which "
                           f"{where} does not train or include; declare the readout without bias (the bundled "
                           "programs: -p b_std=None; the kernels, tp.compile(program).kernels, do include it)")


def refuse_zero_scales(graph: Graph, inputs: list, hidden: list) -> None:
    """A clear error for training a tensor of scale 0: training moves the w of each trained
    W = sigma w (docs/DESIGN.md 2.6: its gradient is dW / sigma), which sigma = 0 leaves
    undefined (it was a ZeroDivisionError).  ``inputs``, ``hidden``: the trained input and
    n x n matrices; the readout is always trained."""
    scales = ([(f"input matrix {U!r}", graph.op(U).scale) for U in inputs]
              + [(f"matrix {W!r}", graph.op(W).sigma) for W in hidden] + [("the readout", graph.readout.sigma)])
    for what, scale in scales:
        value = graph.at_param_values(scale)
        if value.is_number and value.is_zero:
            raise ProgramError(f"program {graph.name!r}: {what} has scale 0 (sigma = {scale}): training moves w in "
                               "W = sigma w, which a scale of 0 leaves undefined; give it a positive scale")


def derive_backward(graph: Graph, prefix: str = "d", seed: sp.Expr | None = None) -> tuple[Graph, dict[str, str]]:
    """A copy of ``graph`` with gradient vectors appended; returns (graph, {z: dz}).

    dz = sum of the contributions of the instructions that read z (each op's rule in
    ``BACKWARD``), seeded by dx = sigma v at the readout vector x.  ``seed`` replaces that
    gradient (e.g. a loss gradient sum_k chi_k v_k); it is an expression in node symbols of
    ``graph``.  Moments on the way get scalar gradients D theta (module docstring), which
    only pass contributions on.  New nodes are interned: a gradient the program already
    computes (a hand-written backward pass) is reused, not computed twice."""
    forward = forward_nodes(graph)
    moments = set(forward_moments(graph))
    out = graph.copy()
    ro = graph.readout
    contributions: dict[str, list[sp.Expr]] = {k: [] for k in forward + sorted(moments)}
    contributions[ro.vector].append(ro.sigma * node_symbol(ro.readout) if seed is None else seed)
    grads: dict[str, str] = {}
    for key in reversed([k for k in graph.order() if k in contributions]):
        terms = contributions[key]
        if not terms:
            continue
        total = sp.Add(*terms)
        op = graph.op(key)
        if key in moments:
            if total == 0:
                continue
            grad = total
        elif isinstance(total, NodeSymbol) and total.key in out.g and out.kind(total.key) == VEC:
            grads[key] = grad = total.key
        else:
            grads[key] = grad = out.intern_expr(ops.Nonlin, total, f"{prefix}{key}")
        for arg, term in BACKWARD(op)(graph, out, key, op, grad, prefix):
            contributions[arg].append(term)
    return out, grads


#: Backward rules: given z = op(args) and its gradient (the key of dz for a vector z; the
#: expression D theta for a Moment), the contributions (arg, term) to the gradients of its
#: vector arguments (d arg += term) and Moment arguments (D arg += term).  New nodes go into
#: the differentiated graph.
BACKWARD = RuleTable("backward", domain=ops.VECTOR_OPS + (ops.Moment,))


def _almost_everywhere(derivs: dict) -> dict:
    """The derivatives as the finite network's gradient takes them, almost everywhere
    (``nonlinearities.almost_everywhere``: a Dirac delta is 0, as the finite-width reference
    network of training/finite.py takes it too; ``partials`` writes relu(a)^e, e < 0, beside
    step(a) as |a|^e: d/dh relu(h)^(3/4) was 0 * inf where h < 0).  Kept, its expectation
    E[delta(u) delta(u')] would give the kernels an NTK that no finite width approaches
    (every finite network's gradient through a step is 0) and that is infinite at xi' = xi."""
    return {s: nl.almost_everywhere(d) for s, d in derivs.items()}


@BACKWARD.register(ops.InitVec, ops.InputLayer)
def _backward_leaf(graph: Graph, out: Graph, key: str, op, dkey: str, prefix: str) -> list:
    """Initial Gaussians read no vectors: the gradient stops here."""
    return []


def _moment_args(graph: Graph, key: str) -> list[str]:
    """The Moments among the scalar arguments of ``key`` (Params, inputs and powers of the
    width are constants of the backward pass)."""
    return [a for a in graph.args(key) if isinstance(graph.op(a), ops.Moment)]


def _scalar_terms(graph: Graph, out: Graph, key: str, expr: sp.Expr, weight: sp.Expr, prefix: str,
                  per_coordinate: bool) -> list:
    """Contributions to the Moment arguments theta of ``key``: the Moment
    (1/n) sum_a (d expr / d theta)_a * weight_a, a node of ``out`` (times weight itself when
    ``per_coordinate`` is False: weight is then a scalar factor outside the Moment)."""
    thetas = _moment_args(graph, key)
    derivs = _almost_everywhere(partials(expr, [node_symbol(t) for t in thetas]))
    terms = []
    for t in thetas:
        dt = derivs[node_symbol(t)]
        if dt == 0:
            continue
        if per_coordinate:
            terms.append((t, node_symbol(out.intern_expr(ops.Moment, dt * weight, f"{prefix}{t}_{key}"))))
        else:
            terms.append((t, weight * node_symbol(out.intern_expr(ops.Moment, dt, f"{prefix}{t}_{key}"))))
    return terms


@BACKWARD.register(ops.Nonlin)
def _backward_nonlin(graph: Graph, out: Graph, key: str, op, dkey: str, prefix: str) -> list:
    """y = phi(a_1..a_k; theta):  d a_i += (d phi / d a_i) dy;
    D theta += (1/n) sum_a (d phi / d theta)_a dy_a  for Moments theta."""
    vectors = graph.vector_args(key)
    derivs = _almost_everywhere(partials(op.expr, [node_symbol(a) for a in vectors]))
    terms = [(a, derivs[node_symbol(a)] * node_symbol(dkey)) for a in vectors if derivs[node_symbol(a)] != 0]
    return terms + _scalar_terms(graph, out, key, op.expr, node_symbol(dkey), prefix, per_coordinate=True)


@BACKWARD.register(ops.Moment)
def _backward_moment(graph: Graph, out: Graph, key: str, op, grad: sp.Expr, prefix: str) -> list:
    """theta = (1/n) sum_a psi(x_a; theta'):  d x += D theta (d psi / d x);
    D theta' += D theta (1/n) sum_a (d psi / d theta')_a."""
    if op.pair:
        raise ProgramError(f"instruction {key!r}: a pair moment (a kernel entry) cannot be differentiated")
    vectors = graph.vector_args(key)
    derivs = _almost_everywhere(partials(op.expr, [node_symbol(a) for a in vectors]))
    terms = [(a, grad * derivs[node_symbol(a)]) for a in vectors if derivs[node_symbol(a)] != 0]
    return terms + _scalar_terms(graph, out, key, op.expr, grad, prefix, per_coordinate=False)


@BACKWARD.register(ops.MatMul)
def _backward_matmul(graph: Graph, out: Graph, key: str, op, dkey: str, prefix: str) -> list:
    """y = W a:  d a += W^T dy;   y = W^T a:  d a += W dy."""
    mat, x, tr = graph.matmul_parts(key)
    return [(x, node_symbol(out.intern(ops.MatMul(not tr), (mat, dkey), f"{prefix}{key}_{x}")))]
