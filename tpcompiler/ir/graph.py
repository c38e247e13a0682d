"""Graph IR: a program as a networkx DiGraph of typed instruction nodes (docs/DESIGN.md 3).

Nodes are keyed by their name; each carries ``op`` (an instance from ``ops``), ``args``
(ordered argument keys) and ``index`` (creation order, which makes the topological order
deterministic).  Edges run from arguments to the instructions that read them.  Passes are
functions Graph -> Graph (``instantiate`` here; backward derivation and SGD unrolling later).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import networkx as nx
import numpy as np
import sympy as sp
from sympy.core.symbol import Str

from tpcompiler.ir import ops
from tpcompiler.ir.ops import MAT, SCALAR, VEC, node_symbol, unprime


class ProgramError(ValueError):
    """A program is malformed; the message names the instruction and variable at fault."""


@dataclass
class InputDecl:
    """A finite-dimensional input xi of dimension d: its coordinate nodes and default rows."""

    keys: list[str]
    default: np.ndarray | None


class Graph:
    """A NETSOR-transpose program: typed instruction nodes, init covariances, outputs."""

    def __init__(self, name: str):
        self.name = name
        self.g = nx.DiGraph()
        self.outputs: dict[str, sp.Expr] = {}
        self.init_cov: dict[frozenset, sp.Expr] = {}
        self.inputs: dict[str, InputDecl] = {}
        self.readout: ops.Readout | None = None
        self._count = 0

    # -- construction -------------------------------------------------------------------
    def fresh_key(self, prefix: str = "x") -> str:
        while True:
            self._count += 1
            key = f"{prefix}{self._count}"
            if key not in self.g:
                return key

    def add(self, key: str, op, args: tuple[str, ...] = ()) -> str:
        """Append instruction ``key = op(args)``; arguments must already exist."""
        if key in self.g:
            raise ProgramError(f"program {self.name!r}: the name {key!r} is already used")
        for a in args:
            if a not in self.g:
                raise ProgramError(f"instruction {key!r}: unknown argument {a!r}")
        self.g.add_node(key, op=op, args=tuple(args), index=self.g.number_of_nodes())
        for pos, a in enumerate(args):
            self.g.add_edge(a, key, pos=pos)
        return key

    def add_nonlin(self, key: str, expr: sp.Expr, op_type=None, **fields) -> str:
        """Append a Nonlin (or, with op_type, a Moment) whose arguments are the free symbols
        of ``expr`` (primed symbols count as their node)."""
        op_type = op_type or ops.Nonlin
        args = sorted({unprime(s)[0] for s in expr.free_symbols}, key=lambda k: self.g.nodes[k]["index"])
        return self.add(key, op_type(expr, **fields), tuple(args))

    def add_matmul(self, key: str, mat: str, x: str, transposed: bool) -> str:
        return self.add(key, ops.MatMul(transposed), (mat, x))

    def rename(self, old: str, new: str) -> None:
        """Give a node a new name; only allowed before anything reads it."""
        if new == old:
            return
        if new in self.g:
            raise ProgramError(f"program {self.name!r}: the name {new!r} is already used")
        if self.g.out_degree(old) or any(node_symbol(old) in e.free_symbols for e in self.outputs.values()):
            raise ProgramError(
                f"cannot name {old!r} as {new!r}: it is already used by later instructions; "
                "name a vector right where it is created"
            )
        nx.relabel_nodes(self.g, {old: new}, copy=False)
        if self.readout is not None and old in (self.readout.vector, self.readout.readout):
            self.readout = dataclasses.replace(
                self.readout,
                vector=new if self.readout.vector == old else self.readout.vector,
                readout=new if self.readout.readout == old else self.readout.readout,
            )

    # -- queries ------------------------------------------------------------------------
    def op(self, key: str):
        return self.g.nodes[key]["op"]

    def args(self, key: str) -> tuple[str, ...]:
        return self.g.nodes[key]["args"]

    def kind(self, key: str) -> str:
        return self.op(key).kind

    def order(self) -> list[str]:
        """Deterministic topological order (creation order among ready nodes)."""
        index = nx.get_node_attributes(self.g, "index")
        return list(nx.lexicographical_topological_sort(self.g, key=lambda k: index[k]))

    def keys_of(self, optype) -> list[str]:
        return [k for k in self.order() if isinstance(self.op(k), optype)]

    def vector_args(self, key: str) -> list[str]:
        return [a for a in self.args(key) if self.kind(a) == VEC]

    def matmul_parts(self, key: str) -> tuple[str, str, bool]:
        """(matrix, input vector, transposed) of a MatMul node."""
        mat, x = self.args(key)
        return mat, x, self.op(key).transposed

    def init_covariance(self, a: str, b: str, prime_a: bool = False, prime_b: bool = False,
                        compact: bool = False) -> sp.Expr:
        """Covariance of two initial Gaussians (InitVec or InputLayer nodes); with
        prime_a/prime_b the input coordinates of that node are those of the second input.
        ``compact`` gives input layers' covariance as one InputCov atom."""
        oa, ob = self.op(a), self.op(b)
        if isinstance(oa, ops.InputLayer) or isinstance(ob, ops.InputLayer):
            if not (isinstance(oa, ops.InputLayer) and isinstance(ob, ops.InputLayer)):
                return sp.S.Zero
            if self.args(a)[0] != self.args(b)[0]:
                return sp.S.Zero
            if compact:
                return ops.InputCov(Str(a), Str(b), sp.Integer(prime_a), sp.Integer(prime_b))
            sa = self._layer_scalars(a, prime_a)
            sb = self._layer_scalars(b, prime_b)
            terms = [x * y for ca, x in zip(oa.columns, sa) for cb, y in zip(ob.columns, sb) if ca == cb]
            return sp.Add(*terms) / sp.sqrt(oa.norm * ob.norm)
        if a == b:
            return oa.var
        return self.init_cov.get(frozenset((a, b)), sp.S.Zero)

    def expand_input_cov(self, expr: sp.Expr) -> sp.Expr:
        """Write every InputCov atom of ``expr`` out as its sum over input coordinates."""
        rep = {c: self.init_covariance(str(c.args[0]), str(c.args[1]), bool(c.args[2]), bool(c.args[3]))
               for c in expr.atoms(ops.InputCov)}
        return expr.xreplace(rep) if rep else expr

    def _layer_scalars(self, key: str, primed: bool) -> list:
        from tpcompiler.ir.ops import primed_symbol

        dependent = self.input_dependent() if primed else set()
        return [primed_symbol(s) if s in dependent else node_symbol(s) for s in self.args(key)[1:]]

    def input_keys(self) -> list[str]:
        return [k for decl in self.inputs.values() for k in decl.keys]

    def input_dependent(self) -> set[str]:
        """Nodes whose value depends on the program's input coordinates."""
        dep: set[str] = set()
        for k in self.input_keys():
            dep.add(k)
            dep |= nx.descendants(self.g, k)
        return dep

    def copy(self) -> "Graph":
        return copy.deepcopy(self)

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Check types, argument kinds, pair-moment use and outputs; raise ProgramError."""
        if not nx.is_directed_acyclic_graph(self.g):
            raise ProgramError(f"program {self.name!r} has a cycle")
        for key in self.order():
            op = self.op(key)
            args = self.args(key)
            if isinstance(op, ops.MatMul):
                mat, x = args
                if self.kind(mat) != MAT or self.kind(x) != VEC:
                    raise ProgramError(f"instruction {key!r}: MatMul needs (Mat, Vec), got ({self.kind(mat)}, {self.kind(x)})")
            if isinstance(op, ops.InputLayer):
                U, *scalars = args
                if not isinstance(self.op(U), ops.InputMat):
                    raise ProgramError(f"instruction {key!r}: an input layer reads an input matrix, not {U!r}")
                if len(scalars) != len(op.columns) or any(not 0 <= c < self.op(U).k for c in op.columns):
                    raise ProgramError(f"instruction {key!r}: columns {op.columns} do not fit {U!r} (k = {self.op(U).k}) and {len(scalars)} scalars")
                for s in scalars:
                    if not isinstance(self.op(s), (ops.Input, ops.Param)):
                        raise ProgramError(f"instruction {key!r}: an input layer multiplies input coordinates or constants, not {s!r}")
            if isinstance(op, (ops.Nonlin, ops.Moment)):
                syms = {unprime(s)[0] for s in op.expr.free_symbols}
                if syms != set(args):
                    raise ProgramError(f"instruction {key!r}: expression variables {sorted(syms)} do not match arguments {list(args)}")
                for a in args:
                    if self.kind(a) in (MAT, ops.INPUT_MAT):
                        raise ProgramError(f"instruction {key!r}: matrix {a!r} used where a Vec or Scalar is needed")
                    if isinstance(self.op(a), ops.Moment) and self.op(a).pair:
                        raise ProgramError(f"instruction {key!r} reads the pair moment {a!r}; pair moments (kernels) may only be read by outputs")
        for name, expr in self.outputs.items():
            for s in expr.free_symbols:
                k, primed = unprime(s)
                if k not in self.g or self.kind(k) != SCALAR:
                    raise ProgramError(f"output {name!r}: {str(s)!r} is not a scalar of this program")
                if primed and not isinstance(self.op(k), ops.Input):
                    raise ProgramError(f"output {name!r}: only input coordinates can be primed, not {k!r}")


# ---------------------------------------------------------------------------------------
# Pass: bind the input of a template program to concrete data rows.
# ---------------------------------------------------------------------------------------
def instantiate(graph: Graph, X: np.ndarray | None) -> tuple[Graph, dict[str, tuple]]:
    """Replicate the input-dependent part of ``graph`` once per row of ``X`` (docs/DESIGN.md 2.1:
    a network on N inputs is one program holding N forward passes that share weights).

    Returns the concrete graph and ``index``: output name -> (template output, example
    indices) — ``name[a]`` for per-input outputs and ``name[a,b]`` for pair outputs.
    Input coordinates become Params holding the data values.  Programs without inputs are
    returned unchanged."""
    if not graph.inputs:
        if X is not None:
            raise ProgramError(f"program {graph.name!r} has no input, but input data was given")
        return graph, {name: (name, ()) for name in graph.outputs}
    (group, decl), = graph.inputs.items()
    if X is None:
        if decl.default is None:
            raise ProgramError(f"program {graph.name!r} has input {group!r}; give input data (N x {len(decl.keys)})")
        X = decl.default
    try:
        X = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError):
        raise ProgramError(f"program {graph.name!r}: input data must be numbers (an N x d array)") from None
    if X.ndim == 1:
        X = X[None, :]
    d = len(decl.keys)
    if X.ndim != 2 or X.shape[1] != d:
        raise ProgramError(f"program {graph.name!r}: input {group!r} has dimension {d}, data has shape {X.shape}")
    if X.shape[0] == 0:
        raise ProgramError(f"program {graph.name!r}: the input data is empty")
    if not np.all(np.isfinite(X)):
        raise ProgramError(f"program {graph.name!r}: the input data has NaN or infinite entries")

    dependent = graph.input_dependent()
    out = Graph(graph.name)
    out.init_cov = dict(graph.init_cov)
    N = X.shape[0]

    def rep(key: str, a: int) -> str:
        return f"{key}[{a}]" if key in dependent else key

    for key in graph.order():
        op = graph.op(key)
        if key not in dependent:
            out.add(key, op, graph.args(key))
            continue
        if isinstance(op, ops.Input):
            for a in range(N):
                out.add(rep(key, a), ops.Param(float(X[a, op.index])))
            continue
        if isinstance(op, ops.Moment) and op.pair:
            for a in range(N):
                for b in range(N):
                    sub = {}
                    for s in op.expr.free_symbols:
                        k, primed = unprime(s)
                        sub[s] = node_symbol(rep(k, b if primed else a))
                    args = tuple(dict.fromkeys(s.key for s in sub.values()))
                    out.add(f"{key}[{a},{b}]", ops.Moment(op.expr.xreplace(sub)), args)
            continue
        for a in range(N):
            sub = {node_symbol(k): node_symbol(rep(k, a)) for k in graph.args(key)}
            new_op = op
            if isinstance(op, (ops.Nonlin, ops.Moment)):
                new_op = type(op)(op.expr.xreplace(sub))
            out.add(rep(key, a), new_op, tuple(rep(k, a) for k in graph.args(key)))

    index: dict[str, tuple] = {}
    for name, expr in graph.outputs.items():
        expr = graph.expand_input_cov(expr)  # input-layer covariances as sums over coordinates
        keys = {unprime(s)[0] for s in expr.free_symbols}
        pair = any(unprime(s)[1] or (isinstance(graph.op(unprime(s)[0]), ops.Moment) and graph.op(unprime(s)[0]).pair)
                   for s in expr.free_symbols)
        if pair:
            for a in range(N):
                for b in range(N):
                    sub = {}
                    for s in expr.free_symbols:
                        k, primed = unprime(s)
                        if isinstance(graph.op(k), ops.Moment) and graph.op(k).pair:
                            sub[s] = node_symbol(f"{k}[{a},{b}]")
                        else:
                            sub[s] = node_symbol(rep(k, b if primed else a))
                    out.outputs[f"{name}[{a},{b}]"] = expr.xreplace(sub)
                    index[f"{name}[{a},{b}]"] = (name, (a, b))
        elif keys & dependent:
            for a in range(N):
                out.outputs[f"{name}[{a}]"] = expr.xreplace({node_symbol(k): node_symbol(rep(k, a)) for k in keys})
                index[f"{name}[{a}]"] = (name, (a,))
        else:
            out.outputs[name] = expr
            index[name] = (name, ())
    return out, index
