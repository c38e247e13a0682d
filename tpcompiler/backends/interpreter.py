"""Finite-width interpreter: run a program at width n (docs/DESIGN.md 3, "reference interpreter").

It is the oracle every limit is tested against.  Semantics per instruction (docs/DESIGN.md 2.1):
initial vectors have iid N(0, Sigma) coordinates (jointly across vectors), matrices iid
N(0, sigma^2/n) entries, Nonlin is applied coordinatewise, Moment is (1/n) sum over
coordinates, MatMul is the matrix-vector product with W or W^T.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tpcompiler import progress
from tpcompiler.ir import ops
from tpcompiler.ir.graph import Graph, ProgramError
from tpcompiler.backends.lowering import evaluate
from tpcompiler.ir.rules import RuleTable
from tpcompiler.backends.walk import draw_initial


def _init_vectors(graph: Graph, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All initial vectors at once: n iid draws of the joint Gaussian of their coordinates."""
    return draw_initial(graph, graph.keys_of(ops.InitVec), n, rng)


@dataclass
class _Machine:
    """The state of a finite-width run: width n, the random stream, the values of scalars
    and vectors (``env``) and of matrices (``mats``)."""

    n: int
    rng: np.random.Generator
    env: dict
    mats: dict


def run(graph: Graph, n: int, seed: int = 0, keep=None) -> tuple[dict[str, float], dict]:
    """Run a concrete (input-bound) program at width ``n``: each instruction by its rule in
    ``INTERPRET``, in program order, after all initial vectors are drawn at once.

    Returns (outputs, values) where values holds every scalar and the vectors listed in
    ``keep`` (all vectors if keep is True)."""
    if n < 1:
        raise ProgramError(f"width must be a positive integer, got {n}")
    if graph.inputs:
        raise ProgramError(f"program {graph.name!r} has an unbound input; instantiate it with data first")
    rng = np.random.default_rng(seed)
    machine = _Machine(n, rng, _init_vectors(graph, n, rng), {})
    for key in graph.order():
        op = graph.op(key)
        INTERPRET(op)(machine, key, op, graph.args(key))
    env = machine.env
    outputs = {name: evaluate(expr, env) for name, expr in graph.outputs.items()}
    if keep is True:
        return outputs, env
    keep = set(keep or ())
    values = {k: v for k, v in env.items() if np.ndim(v) == 0 or k in keep}
    return outputs, values


#: What each instruction computes at width n (docs/DESIGN.md 2.1).
INTERPRET = RuleTable("finite-width interpretation", domain=ops.INSTRUCTIONS)


@INTERPRET.register(ops.InitVec)
def _run_init_vec(m: _Machine, key: str, op, args: tuple) -> None:
    """Already drawn, jointly with the other initial vectors (``_init_vectors``)."""


@INTERPRET.register(ops.Param)
def _run_param(m: _Machine, key: str, op, args: tuple) -> None:
    m.env[key] = op.value


@INTERPRET.register(ops.WidthPower)
def _run_width_power(m: _Machine, key: str, op, args: tuple) -> None:
    """n^e."""
    m.env[key] = float(m.n) ** float(op.exponent)


@INTERPRET.register(ops.InputMat)
def _run_input_mat(m: _Machine, key: str, op, args: tuple) -> None:
    """U: n x k, iid N(0, 1) entries."""
    m.mats[key] = m.rng.standard_normal((m.n, op.k))


@INTERPRET.register(ops.InputLayer)
def _run_input_layer(m: _Machine, key: str, op, args: tuple) -> None:
    """sum_i s_i U[:, columns[i]] / sqrt(norm)."""
    U, *scalars = args
    coef = np.array([m.env[s] for s in scalars]) / np.sqrt(op.norm)
    m.env[key] = m.mats[U][:, list(op.columns)] @ coef


@INTERPRET.register(ops.InitMat)
def _run_init_mat(m: _Machine, key: str, op, args: tuple) -> None:
    """W: n x n, iid N(0, sigma^2 / n) entries."""
    sigma = evaluate(op.sigma, m.env)
    m.mats[key] = m.rng.standard_normal((m.n, m.n)) * (sigma / np.sqrt(m.n))


@INTERPRET.register(ops.MatMul)
def _run_matmul(m: _Machine, key: str, op, args: tuple) -> None:
    """W x or W^T x."""
    mat, x = args
    m.env[key] = (m.mats[mat].T if op.transposed else m.mats[mat]) @ m.env[x]


@INTERPRET.register(ops.Nonlin)
def _run_nonlin(m: _Machine, key: str, op, args: tuple) -> None:
    """phi applied coordinatewise."""
    m.env[key] = evaluate(op.expr, m.env, size=m.n)


@INTERPRET.register(ops.Moment)
def _run_moment(m: _Machine, key: str, op, args: tuple) -> None:
    """(1/n) sum over the n coordinates of psi."""
    m.env[key] = float(np.mean(evaluate(op.expr, m.env, size=m.n)))


@INTERPRET.register(ops.Input)
def _run_input(m: _Machine, key: str, op, args: tuple) -> None:
    """Unreachable in a bound program (``run`` refuses unbound inputs); kept so the table is
    complete: an input coordinate has no value until ``instantiate`` binds it."""
    raise ProgramError(f"input coordinate {key!r} is unbound; instantiate the program with data first")


def simulate_many(graph: Graph, n: int, seeds) -> dict[str, np.ndarray]:
    """Outputs of ``run`` over several seeds: name -> array over seeds."""
    seeds = list(seeds)
    rows = [run(graph, n, s)[0] for s in progress.iterate(seeds, f"width {n}", unit="seed", leave=False)]
    return {name: np.array([r[name] for r in rows]) for name in graph.outputs}
