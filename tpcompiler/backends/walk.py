"""One walk over a Z program; the limit evaluators are rule sets of it (docs/DESIGN.md 2.7).

The Master theorem gives every instruction of a program its limit in program order: an
initial Gaussian, a function of earlier Z's, a new ZHat plus its ZDot, an expectation.  An
evaluator says how it represents those values (coefficients over a Gaussian basis for the
exact Gaussian-linear evaluator, particle arrays for the Monte-Carlo one) by a rule table
keyed by op type, ``rule(run, entry, op) -> value`` (None: nothing to store); ``walk``
applies the rules in order, keeps the values in ``run.env`` and frees each vector after its
last use (``release_schedule``), so memory follows what is live, not the length of an
unrolled training program.

Shared here, written once: the rules every limit evaluator has in common (``limit_rules``)
and the joint draw of the initial Gaussians (``initial_covariance``, ``sample_gaussian``),
which the finite-width interpreter uses too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from tpcompiler.backends.lowering import evaluate
from tpcompiler.ir import ops
from tpcompiler.ir.graph import Graph, ProgramError
from tpcompiler.ir.rules import RuleTable

if TYPE_CHECKING:  # the finite-width interpreter imports this module without the symbolic stage
    from tpcompiler.symbolic.master import ZProgram


def walk(run, rules: RuleTable, schedule: dict[int, list[str]]) -> dict[str, float]:
    """Evaluate ``run.zp`` in program order with ``rules``; {output: value}.

    ``run`` holds ``zp`` and the values ``env`` (initial Gaussians may be there already);
    ``schedule`` is ``release_schedule(zp, ...)``: after position p the vectors listed at p
    are dropped from ``env``."""
    zp, env = run.zp, run.env
    for position, key in enumerate(zp.order):
        for done in schedule.get(position - 1, ()):
            env.pop(done, None)
        op = zp.graph.op(key)
        value = rules(op)(run, zp.entries[key], op)
        if value is not None:
            env[key] = value
    return {name: evaluate(expr, env) for name, expr in zp.graph.outputs.items()}


def release_schedule(zp: ZProgram, reads: Callable[[ZProgram, str], Iterable[str]] | None = None) -> dict[int, list[str]]:
    """{position: vectors whose values are not needed after that position} (liveness).

    A vector is needed by the instructions that read it and, as the input of a product,
    until the last product of the same matrix (a new ZHat's covariance with the earlier
    members of its family reads their inputs; a ZDot term reads the input y of W^T y).
    ``reads(zp, key)`` names further vectors an evaluator's rule for ``key`` reads."""
    g = zp.graph
    pos = {k: i for i, k in enumerate(zp.order)}
    last = {k: pos[k] for k in zp.order if g.kind(k) == ops.VEC}
    for k in zp.order:
        for a in g.args(k):
            if a in last:
                last[a] = max(last[a], pos[k])
    products = [k for k in zp.order if zp.entries[k].family is not None]
    last_on_matrix = {zp.entries[m].family[0]: pos[m] for m in products}
    for m in products:
        x = zp.entries[m].x
        last[x] = max(last[x], last_on_matrix[zp.entries[m].family[0]])
    if reads is not None:
        for k in zp.order:
            for a in reads(zp, k):
                last[a] = max(last[a], pos[k])
    schedule: dict[int, list[str]] = {}
    for k, p in last.items():
        schedule.setdefault(p, []).append(k)
    return schedule


# -- rules every limit evaluator shares ---------------------------------------------------
def _param(run, entry, op):
    return op.value


def _width_power(run, entry, op):
    """n^e -> 1 for e = 0, 0 for e < 0 (e > 0 was refused when the program was built)."""
    return op.limit()


def _drawn_up_front(run, entry, op):
    """Initial Gaussians are drawn (or put in the basis) jointly before the walk; matrices
    have no value of their own (each product draws its ZHat)."""
    return None


def _unbound_input(run, entry, op):
    raise ProgramError(f"program {run.zp.graph.name!r} has an unbound input {entry.key!r}; instantiate it with data first")


def limit_rules(stage: str) -> RuleTable:
    """A new rule table for a limit evaluator, holding the rules all of them share: Params
    by value, width powers by their limit, initial Gaussians and matrices handled up front,
    an unbound input refused.  The evaluator registers Nonlin, MatMul and Moment."""
    table = RuleTable(stage, domain=ops.INSTRUCTIONS)
    table.register(ops.Param)(_param)
    table.register(ops.WidthPower)(_width_power)
    table.register(ops.InitVec, ops.InputLayer, ops.InitMat, ops.InputMat)(_drawn_up_front)
    table.register(ops.Input)(_unbound_input)
    return table


# -- the initial Gaussians -------------------------------------------------------------------
def initial_keys(graph: Graph) -> list[str]:
    """The initial Gaussians of a limit: initial vectors, then input layers."""
    return graph.keys_of(ops.InitVec) + graph.keys_of(ops.InputLayer)


def initial_covariance(graph: Graph, keys: list[str]) -> np.ndarray:
    """Sigma_ab = Cov(Z^a, Z^b) of initial Gaussians (the program's covariance table; input
    layers by their input inner products), Params at their values."""
    values = graph.param_values()
    cov = np.zeros((len(keys), len(keys)))
    # only pairs that can be nonzero are evaluated (Graph.init_covariance is 0 for two distinct
    # initial vectors outside the covariance table, and for an initial vector with an input
    # layer): K independent vectors cost K evaluations, not K^2 (word2vec's V readouts)
    layers: dict[str, list[int]] = {}
    where = {k: i for i, k in enumerate(keys)}
    for i, a in enumerate(keys):
        if isinstance(graph.op(a), ops.InputLayer):
            layers.setdefault(graph.args(a)[0], []).append(i)
    pairs = {(i, i) for i in range(len(keys))}
    pairs |= {(i, j) for same in layers.values() for i in same for j in same}
    for ab in graph.init_cov:
        a, b = tuple(ab) if len(ab) == 2 else (next(iter(ab)),) * 2
        if a in where and b in where:
            pairs |= {(where[a], where[b]), (where[b], where[a])}
    for i, j in pairs:
        if i <= j:
            cov[i, j] = cov[j, i] = float(evaluate(graph.init_covariance(keys[i], keys[j]), values))
    return cov


def sample_gaussian(cov: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` iid draws (rows) of N(0, cov): standard normals times a symmetric square root
    V diag(sqrt(w)) of cov = V diag(w) V^T (eigenvalues clipped at 0, so a singular cov,
    e.g. two equal inputs, is fine)."""
    w, V = np.linalg.eigh(cov)
    root = V * np.sqrt(np.clip(w, 0.0, None))
    return rng.standard_normal((size, cov.shape[0])) @ root.T


def draw_initial(graph: Graph, keys: list[str], size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """{key: size draws} of the initial Gaussians ``keys``, jointly (one contiguous array each)."""
    if not keys:
        return {}
    draws = sample_gaussian(initial_covariance(graph, keys), size, rng)
    return {k: np.ascontiguousarray(draws[:, i]) for i, k in enumerate(keys)}
