"""Finite-width interpreter: run a program at width n (docs/DESIGN.md 3, "reference interpreter").

It is the oracle every limit is tested against.  Semantics per instruction (docs/DESIGN.md 2.1):
initial vectors have iid N(0, Sigma) coordinates (jointly across vectors), matrices iid
N(0, sigma^2/n) entries, Nonlin is applied coordinatewise, Moment is (1/n) sum over
coordinates, MatMul is the matrix-vector product with W or W^T.
"""
from __future__ import annotations

import numpy as np

from tpcompiler.ir import ops
from tpcompiler.ir.graph import Graph, ProgramError
from tpcompiler.backends.lowering import evaluate
from tpcompiler.backends.walk import draw_initial


def _init_vectors(graph: Graph, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All initial vectors at once: n iid draws of the joint Gaussian of their coordinates."""
    return draw_initial(graph, graph.keys_of(ops.InitVec), n, rng)


def run(graph: Graph, n: int, seed: int = 0, keep=None) -> tuple[dict[str, float], dict]:
    """Run a concrete (input-bound) program at width ``n``.

    Returns (outputs, values) where values holds every scalar and the vectors listed in
    ``keep`` (all vectors if keep is True)."""
    if n < 1:
        raise ProgramError(f"width must be a positive integer, got {n}")
    if graph.inputs:
        raise ProgramError(f"program {graph.name!r} has an unbound input; instantiate it with data first")
    rng = np.random.default_rng(seed)
    env: dict = _init_vectors(graph, n, rng)
    mats: dict[str, np.ndarray] = {}
    for key in graph.order():
        op = graph.op(key)
        if isinstance(op, ops.InitVec):
            continue
        if isinstance(op, ops.Param):
            env[key] = op.value
        elif isinstance(op, ops.WidthPower):
            env[key] = float(n) ** float(op.exponent)
        elif isinstance(op, ops.InputMat):
            mats[key] = rng.standard_normal((n, op.k))
        elif isinstance(op, ops.InputLayer):
            U, *scalars = graph.args(key)
            coef = np.array([env[s] for s in scalars]) / np.sqrt(op.norm)
            env[key] = mats[U][:, list(op.columns)] @ coef
        elif isinstance(op, ops.InitMat):
            sigma = evaluate(op.sigma, env)
            mats[key] = rng.standard_normal((n, n)) * (sigma / np.sqrt(n))
        elif isinstance(op, ops.MatMul):
            mat, x, tr = graph.matmul_parts(key)
            env[key] = (mats[mat].T if tr else mats[mat]) @ env[x]
        elif isinstance(op, ops.Nonlin):
            env[key] = evaluate(op.expr, env, size=n)
        elif isinstance(op, ops.Moment):
            env[key] = float(np.mean(evaluate(op.expr, env, size=n)))
        else:
            raise ProgramError(f"the interpreter cannot run {type(op).__name__} ({key!r})")
    outputs = {name: evaluate(expr, env) for name, expr in graph.outputs.items()}
    if keep is True:
        return outputs, env
    keep = set(keep or ())
    values = {k: v for k, v in env.items() if np.ndim(v) == 0 or k in keep}
    return outputs, values


def simulate_many(graph: Graph, n: int, seeds) -> dict[str, np.ndarray]:
    """Outputs of ``run`` over several seeds: name -> array over seeds."""
    rows = [run(graph, n, s)[0] for s in seeds]
    return {name: np.array([r[name] for r in rows]) for name in graph.outputs}
