"""Graph IR: a program as a networkx DiGraph of typed instruction nodes (docs/DESIGN.md 3).

Nodes are keyed by their name; each carries ``op`` (an instance from ``ops``), ``args``
(ordered argument keys) and ``index`` (creation order, which makes the topological order
deterministic).  Edges run from arguments to the instructions that read them.

Construction is hash-consed: ``Graph.intern(op, args)`` returns the node that already
computes op(args), so a program never holds one computation twice and passes need no
common-subexpression tables or fresh-name loops of their own; ``Graph.add`` adds a node under
a name its author chose.  Passes are functions Graph -> Graph (``validate`` and
``instantiate`` here, each instruction by its rule in a ``RuleTable``).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple
from itertools import count

import networkx as nx
import numpy as np
import sympy as sp

from tpcompiler.ir import ops
from tpcompiler.ir.construct import replaced
from tpcompiler.ir.ops import MAT, SCALAR, VEC, node_symbol, unprime
from tpcompiler.ir.rules import RuleTable
from tpcompiler.ir.symbols import free_symbols_of


#: Prefix of the names ``Graph.intern`` generates, by op type (others: "t").
GENERATED_PREFIX = {ops.Moment: "theta", ops.Param: "c"}


def _intern_key(op, args) -> tuple:
    """What makes two instructions the same: op type, op fields and arguments."""
    return type(op), op, tuple(args)


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
        #: (op type, op, args) -> the node computing it (see ``intern``).
        self._interned: dict[tuple, str] = {}
        #: Names made up by ``intern`` (not given by the program's author).
        self.generated: set[str] = set()
        #: node -> the other names asked for it (``intern`` found it computed already: the
        #: backward pass's gradients of taps that enter one sum with one weight); printed
        #: beside its definition, so a listing's reader can find every name it was given.
        self.aliases: dict[str, list[str]] = {}
        self._count = 0
        self._suffix: dict[str, int] = {}  # name -> last suffix given to a copy (name_2, ...)
        self._order_memo = None  # (graph state, its order): ``order``

    # -- construction -------------------------------------------------------------------
    def add(self, key: str, op, args: tuple[str, ...] = ()) -> str:
        """Append instruction ``key = op(args)`` under the name ``key`` (which must be unused);
        arguments must already exist.  The node is always new; unless ``op`` is a declaration
        (``ops.DECLARATIONS``) it is offered to later ``intern`` requests for the same op and
        arguments (the first such node wins)."""
        if key in self.g:
            raise ProgramError(f"program {self.name!r}: the name {key!r} is already used")
        for a in args:
            if a not in self.g:
                raise ProgramError(f"instruction {key!r}: unknown argument {a!r}")
        self.g.add_node(key, op=op, args=tuple(args), index=self.g.number_of_nodes())
        for pos, a in enumerate(args):
            self.g.add_edge(a, key, pos=pos)
        if not isinstance(op, ops.DECLARATIONS):
            self._interned.setdefault(_intern_key(op, args), key)
        return key

    def intern(self, op, args: tuple[str, ...] = (), name: str | None = None) -> str:
        """The node computing ``op(args)``: an existing node with the same op and arguments if
        there is one (hash-consing: equal requests share one node, so no common subexpression
        is computed twice), else a new node.  The new node is called ``name`` if that is
        unused, else name_2, name_3, ...; without a name it gets a generated one (t1, theta2,
        ... numbered in order of generation).  Random initial tensors (``ops.INITIAL``) cannot
        be interned: every draw is its own variable."""
        if isinstance(op, ops.INITIAL):
            raise TypeError(f"{type(op).__name__} is a random draw: declare it by name with Graph.add (a bug in "
                            "the pass that interned it, not in the program)")
        found = self._interned.get(_intern_key(op, args))
        if found is not None and self._computes(found, op, args):
            if name is not None and name != found and name not in self.g and name not in self.aliases.get(found, ()):
                self.aliases.setdefault(found, []).append(name)
            return found
        key = self.add(self._unused_name(name, op), op, args)
        self._interned[_intern_key(op, args)] = key
        if name is None:
            self.generated.add(key)
        return key

    def _computes(self, key: str, op, args) -> bool:
        """Does node ``key`` still compute op(args)?  (The sharing table is only trusted as far
        as this: code that edits ``self.g`` directly may have removed or replaced the node.)"""
        node = self.g.nodes.get(key)
        return node is not None and type(node["op"]) is type(op) and node["op"] == op and node["args"] == tuple(args)

    def intern_expr(self, op_type, expr: sp.Expr, name: str | None = None, **fields) -> str:
        """``intern`` a Nonlin (or, with op_type, a Moment) of ``expr``: its arguments are the
        nodes of the expression's symbols (``expr_args``)."""
        return self.intern(op_type(expr, **fields), self.expr_args(expr), name)

    def expr_args(self, expr: sp.Expr) -> tuple[str, ...]:
        """The nodes an expression reads (a primed symbol reads its node), in creation order."""
        keys = {unprime(s)[0] for s in expr.free_symbols}
        return tuple(sorted(keys, key=lambda k: self.g.nodes[k]["index"]))

    def _unused_name(self, name: str | None, op) -> str:
        """``name``, name_2, name_3, ...: the first that no node has; without a name, the op's
        prefix (``GENERATED_PREFIX``) and the next number of a counter shared by all
        generated names."""
        if name is not None:
            if name not in self.g:
                return name
            # start after the last suffix handed out for this name: a training run asks for
            # the same names at every step, and scanning from _2 each time is quadratic
            i = next(i for i in count(self._suffix.get(name, 1) + 1) if f"{name}_{i}" not in self.g)
            self._suffix[name] = i
            return f"{name}_{i}"
        prefix = GENERATED_PREFIX.get(type(op), "t")
        self._count = next(i for i in count(self._count + 1) if f"{prefix}{i}" not in self.g)
        return f"{prefix}{self._count}"

    def rename(self, old: str, new: str) -> None:
        """Give a node a new name; only allowed before anything reads it."""
        if new == old:
            return
        if new in self.g:
            raise ProgramError(f"program {self.name!r}: the name {new!r} is already used")
        if self.g.out_degree(old) or any(node_symbol(old) in e.free_symbols for e in self.outputs.values()):
            if old in self.generated:  # (the same computation made again: a name the author never wrote)
                raise ProgramError(
                    f"cannot name this vector {new!r}: the same computation was made before (as {old!r}) and is "
                    "already read by later instructions; name it where it is first made, or keep the first name")
            raise ProgramError(
                f"cannot name {old!r} as {new!r}: it is already used by later instructions; "
                "name a vector right where it is created"
            )
        nx.relabel_nodes(self.g, {old: new}, copy=False)
        self._interned = {k: (new if v == old else v) for k, v in self._interned.items()}
        # the other tables keyed by name: an initial vector's covariances (p.vecs) and an input's
        # coordinates (its data columns); left behind, the interpreter drew the renamed vector
        # uncorrelated with its partners
        if any(old in pair for pair in self.init_cov):
            self.init_cov = {frozenset(new if k == old else k for k in pair): v for pair, v in self.init_cov.items()}
        for decl in self.inputs.values():
            if old in decl.keys:
                decl.keys[decl.keys.index(old)] = new
        if old in self.aliases:
            self.aliases[new] = self.aliases.pop(old)
        self.generated.discard(old)
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
        """Deterministic topological order (creation order among ready nodes); memoised for
        the graph as it is (its nodes, in insertion order, and number of edges: the passes
        and the kernel backend ask for it a dozen times of a graph they do not change, which
        for a CNN's kernel program of 25,000 nodes cost 0.25 s)."""
        state = self._order_state()
        cached = self._order_memo
        if cached is None or cached[0] != state:
            cached = self._order_memo = (state, _creation_order(self.g))
        return list(cached[1])

    def _order_state(self) -> tuple:
        """What ``order``'s memo is valid for: the nodes in insertion order and the number of edges."""
        return tuple(self.g), self.g.number_of_edges()

    def keys_of(self, optype) -> list[str]:
        return [k for k in self.order() if isinstance(self.op(k), optype)]

    def is_pair_moment(self, key: str) -> bool:
        """Is ``key`` a pair moment (a kernel entry, read by outputs only)?"""
        op = self.op(key)
        return isinstance(op, ops.Moment) and op.pair

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
                return ops.input_cov(a, b, prime_a, prime_b)
            pairs, norm = self.input_covariance_terms(a, b, prime_a, prime_b)
            return sp.Add(*[x * y for x, y in pairs]) / sp.sqrt(norm)
        if a == b:
            return oa.var
        return self.init_cov.get(frozenset((a, b)), sp.S.Zero)

    def input_covariance_terms(self, a: str, b: str, prime_a: bool = False,
                               prime_b: bool = False) -> tuple[list[tuple[sp.Symbol, sp.Symbol]], int]:
        """Cov(Z^a, Z^b) of two input layers of one matrix as (pairs, norm): the sum of
        s^a_i s^b_k over the pairs (s^a_i, s^b_k) of their scalars at matching columns, over
        sqrt(norm) = sqrt(norm_a norm_b) (``init_covariance`` writes it as an expression)."""
        oa, ob = self.op(a), self.op(b)
        sa = self._layer_scalars(a, prime_a)
        sb = self._layer_scalars(b, prime_b)
        return [(x, y) for ca, x in zip(oa.columns, sa) for cb, y in zip(ob.columns, sb) if ca == cb], oa.norm * ob.norm

    def expand_input_cov(self, expr: sp.Expr) -> sp.Expr:
        """Write every InputCov atom of ``expr`` out as its sum over input coordinates."""
        rep = {c: self.init_covariance(str(c.args[0]), str(c.args[1]), bool(c.args[2]), bool(c.args[3]))
               for c in expr.atoms(ops.InputCov)}
        return expr.xreplace(rep) if rep else expr

    def _layer_scalars(self, key: str, primed: bool) -> list:
        from tpcompiler.ir.ops import primed_symbol

        dependent = self.input_dependent() if primed else set()
        return [primed_symbol(s) if s in dependent else node_symbol(s) for s in self.args(key)[1:]]

    def param_values(self) -> dict[str, float]:
        """{Param key: value}: the environment in which covariances and scalars are evaluated."""
        return {k: self.op(k).value for k in self.keys_of(ops.Param)}

    def at_param_values(self, expr) -> sp.Expr:
        """``expr`` (a sigma, a variance, an NTK weight) with every Param at its value now: a
        sympy number when it reads nothing else (a bare Param becomes its Float, not a float).
        Only the Params ``expr`` reads are looked up: the DSL checks every declaration's
        variance with it while the program grows, and listing all Params (``param_values``:
        the program's order, recomputed after each new node) made declaring V vectors take
        V^2 time (word2vec's 9,044: 225 s)."""
        expr = sp.sympify(expr)
        values = {}
        for s in expr.free_symbols:
            key, primed = unprime(s)
            if key is not None and not primed and key in self.g and isinstance(self.op(key), ops.Param):
                values[s] = self.op(key).value
        return sp.sympify(expr.xreplace(values)) if values else expr

    def input_keys(self) -> list[str]:
        return [k for decl in self.inputs.values() for k in decl.keys]

    def input_dependent(self) -> set[str]:
        """Nodes whose value depends on the program's input coordinates: the inputs and every
        node reachable from one, found by one walk from all of them (a walk per input
        coordinate crossed a CNN's whole graph once per pixel)."""
        dep: set[str] = set(self.input_keys())
        stack = list(dep)
        while stack:
            for child in self.g.successors(stack.pop()):
                if child not in dep:
                    dep.add(child)
                    stack.append(child)
        return dep

    def copy(self) -> "Graph":
        return copy.deepcopy(self)

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> "Graph":
        """Check types, argument kinds, pair-moment use and outputs (each instruction by its
        rule in ``VALIDATE``); raise ProgramError.  Returns the graph, so it composes as a pass."""
        # the order computed afresh, not read from order()'s memo: a graph edited in place
        # (an edge removed, another added) keeps its number of edges but may have a cycle
        try:
            order = _creation_order(self.g)
        except nx.NetworkXUnfeasible:
            raise ProgramError(f"program {self.name!r} has a cycle") from None
        self._order_memo = (self._order_state(), order)
        for key in order:
            op = self.op(key)
            VALIDATE(op)(self, key, op, self.args(key))
        for name, expr in self.outputs.items():
            if any(self._output_symbol_error(s) for s in free_symbols_of(expr)):
                # the symbol named is the first of sympy's set, as before the walk above
                problem = next(p for p in map(self._output_symbol_error, expr.free_symbols) if p)
                raise ProgramError(f"output {name!r}: {problem}")
        return self

    def _output_symbol_error(self, s: sp.Symbol) -> str | None:
        """What is wrong with an output reading ``s`` (``validate``), or None."""
        k, primed = unprime(s)
        if k not in self.g or self.kind(k) != SCALAR:
            return f"{str(s)!r} is not a scalar of this program"
        if primed and not isinstance(self.op(k), ops.Input):
            return f"only input coordinates can be primed, not {k!r}"
        return None


def _creation_order(g: nx.DiGraph) -> list[str]:
    """The topological order of ``g`` that takes, among the nodes whose arguments are all
    placed, the one created first (smallest ``index``).  When every edge runs from an earlier
    node to a later one (``Graph.add`` only appends nodes after their arguments) and no two
    nodes share an index, that is simply the creation order, without networkx's heap (a
    CNN's kernel program has 10^5 nodes); otherwise (code that edited ``g`` directly)
    networkx's lexicographical sort."""
    index = nx.get_node_attributes(g, "index")
    if (len(index) == g.number_of_nodes() and len(set(index.values())) == len(index)
            and all(index[a] < index[b] for a, b in g.edges())):
        return sorted(index, key=index.__getitem__)
    return list(nx.lexicographical_topological_sort(g, key=lambda k: g.nodes[k]["index"]))


# ---------------------------------------------------------------------------------------
# Validation rules: what each instruction requires of its arguments (docs/DESIGN.md 2.1).
# ---------------------------------------------------------------------------------------
VALIDATE = RuleTable("validation", domain=ops.INSTRUCTIONS)


@VALIDATE.register(ops.InitVec, ops.InitMat, ops.InputMat, ops.Param, ops.WidthPower, ops.Input)
def _validate_leaf(graph: Graph, key: str, op, args: tuple) -> None:
    """Declarations read no vectors (a matrix's arguments are the Params of its sigma)."""


@VALIDATE.register(ops.MatMul)
def _validate_matmul(graph: Graph, key: str, op, args: tuple) -> None:
    """W x reads a matrix and a vector."""
    mat, x = args
    if graph.kind(mat) != MAT or graph.kind(x) != VEC:
        raise ProgramError(f"instruction {key!r}: MatMul needs (Mat, Vec), got ({graph.kind(mat)}, {graph.kind(x)})")


@VALIDATE.register(ops.InputLayer)
def _validate_input_layer(graph: Graph, key: str, op, args: tuple) -> None:
    """U s / sqrt(norm) reads an input matrix U and one input coordinate or constant per column."""
    U, *scalars = args
    if not isinstance(graph.op(U), ops.InputMat):
        raise ProgramError(f"instruction {key!r}: an input layer reads an input matrix, not {U!r}")
    if len(scalars) != len(op.columns) or any(not 0 <= c < graph.op(U).k for c in op.columns):
        raise ProgramError(f"instruction {key!r}: columns {op.columns} do not fit {U!r} (k = {graph.op(U).k}) and {len(scalars)} scalars")
    for s in scalars:
        if not isinstance(graph.op(s), (ops.Input, ops.Param)):
            raise ProgramError(f"instruction {key!r}: an input layer multiplies input coordinates or constants, not {s!r}")


@VALIDATE.register(ops.Nonlin, ops.Moment)
def _validate_expression(graph: Graph, key: str, op, args: tuple) -> None:
    """phi(x..; theta..) and (1/n) sum psi(x..): the arguments are exactly the expression's
    variables, none a matrix, none a pair moment (pair moments are read by outputs only)."""
    syms = {unprime(s)[0] for s in op.expr.free_symbols}
    if syms != set(args):
        raise ProgramError(f"instruction {key!r}: expression variables {sorted(syms)} do not match arguments {list(args)}")
    for a in args:
        if graph.kind(a) in (MAT, ops.INPUT_MAT):
            raise ProgramError(f"instruction {key!r}: matrix {a!r} used where a Vec or Scalar is needed")
        if graph.is_pair_moment(a):
            raise ProgramError(f"instruction {key!r} reads the pair moment {a!r}; pair moments (kernels) may only be read by outputs")


# ---------------------------------------------------------------------------------------
# Pass: bind the input of a template program to concrete data rows.
# ---------------------------------------------------------------------------------------
class OutputIndex(NamedTuple):
    """Where a concrete output comes from: its template output and the example indices
    (() for an input-free output, (a,) per input, (a, b) for a pair output)."""

    template: str
    examples: tuple


def instantiate(graph: Graph, X: np.ndarray | None) -> tuple[Graph, dict[str, OutputIndex]]:
    """Replicate the input-dependent part of ``graph`` once per row of ``X`` (docs/DESIGN.md 2.1:
    a network on N inputs is one program holding N forward passes that share weights).

    Returns the concrete graph and ``index``: output name -> ``OutputIndex`` -- ``name[a]`` for
    per-input outputs and ``name[a,b]`` for pair outputs.  Input coordinates become Params
    holding the data values (each instruction is replicated by its rule in ``INSTANTIATE``;
    expressions renamed by ``construct.replaced``, the objects ``xreplace`` builds without
    sympy's flattening of each product: an RNN's NTK has a product per pair of steps, each
    instantiated per pair of inputs).  Programs without inputs are returned unchanged."""
    if not graph.inputs:
        if X is not None:
            raise ProgramError(f"program {graph.name!r} has no input, but input data was given")
        return graph, {name: OutputIndex(name, ()) for name in graph.outputs}
    X = _input_rows(graph, X)
    binding = _Binding(graph, Graph(graph.name), X, graph.input_dependent())
    binding.out.init_cov = dict(graph.init_cov)
    for key in graph.order():
        op = graph.op(key)
        if key in binding.dependent:
            INSTANTIATE(op)(binding, key, op)
        else:
            binding.out.add(key, op, graph.args(key))
    index: dict[str, OutputIndex] = {}
    for name, expr in graph.outputs.items():
        for concrete, examples, value in binding.output(name, graph.expand_input_cov(expr)):
            if concrete in index:  # an output named like another's copy at an input: "m[1]" and m at input 1
                raise ProgramError(f"program {graph.name!r}: outputs {index[concrete].template!r} and {name!r} both give "
                                   f"the name {concrete!r} on these inputs (name[a] and name[a,b] are an output at "
                                   "input a, or at the pair of inputs (a, b)); rename one of them")
            binding.out.outputs[concrete] = value
            index[concrete] = OutputIndex(name, examples)
    return binding.out, index


def _input_rows(graph: Graph, X) -> np.ndarray:
    """The data rows bound to the program's one input (its default rows when X is None),
    checked to be a finite, non-empty N x d array."""
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
    if X.ndim != 2:
        raise ProgramError(f"program {graph.name!r}: input data must be an N x {d} array (one row per input of "
                           f"{group!r}), got shape {X.shape}")
    if X.shape[1] != d:
        raise ProgramError(f"program {graph.name!r}: input {group!r} has dimension {d}, data has shape {X.shape}; give "
                           f"N x {d} data, or build the program for {X.shape[1]} columns (its build() parameters, "
                           "e.g. tpc -p: a program whose input is not d-dimensional, such as an RNN's T steps of "
                           "d each, does not take d from the columns)")
    if X.shape[0] == 0:
        raise ProgramError(f"program {graph.name!r}: the input data is empty")
    if not np.all(np.isfinite(X)):
        raise ProgramError(f"program {graph.name!r}: the input data has NaN or infinite entries")
    from tpcompiler.validation import tiny_row  # (validation imports this module)
    tiny_row(X, f"program {graph.name!r}: input data")
    return X


@dataclass
class _Binding:
    """The state of ``instantiate``: template, concrete graph, data rows, and the template
    nodes that depend on the input (those are replicated per row; copy ``key[a]``)."""

    graph: Graph
    out: Graph
    X: np.ndarray
    dependent: set

    @property
    def N(self) -> int:
        return self.X.shape[0]

    def rep(self, key: str, a: int) -> str:
        """The copy of template node ``key`` for example a (the node itself if input-free)."""
        return f"{key}[{a}]" if key in self.dependent else key

    def symbol(self, s: sp.Symbol, a: int, b: int) -> sp.Symbol:
        """A template symbol at the pair (xi_a, xi_b): primed symbols read example b, pair
        moments their (a, b) entry."""
        k, primed = unprime(s)
        if self.graph.is_pair_moment(k) and k in self.dependent:  # (one copy when input-free)
            return node_symbol(f"{k}[{a},{b}]")
        return node_symbol(self.rep(k, b if primed else a))

    def output(self, name: str, expr: sp.Expr):
        """(concrete name, example indices, expression) of every copy of output ``name``."""
        pair = any(unprime(s)[1] or self.graph.is_pair_moment(unprime(s)[0]) for s in expr.free_symbols)
        if pair:
            for a in range(self.N):
                for b in range(self.N):
                    rule = {s: self.symbol(s, a, b) for s in expr.free_symbols}
                    yield f"{name}[{a},{b}]", (a, b), replaced(expr, rule)
        elif {unprime(s)[0] for s in expr.free_symbols} & self.dependent:
            for a in range(self.N):
                yield f"{name}[{a}]", (a,), replaced(expr, {s: self.symbol(s, a, a) for s in expr.free_symbols})
        else:
            yield name, (), expr


# Instantiation rules: how an input-dependent instruction is replicated per example.
INSTANTIATE = RuleTable("instantiation", domain=ops.INSTRUCTIONS)


@INSTANTIATE.register(ops.Input)
def _bind_input(b: _Binding, key: str, op) -> None:
    """Input coordinate j at example a: the Param X[a, j]."""
    for a in range(b.N):
        b.out.add(b.rep(key, a), ops.Param(float(b.X[a, op.index])))


@INSTANTIATE.register(ops.InitVec, ops.InitMat, ops.InputMat, ops.Param, ops.WidthPower, ops.InputLayer, ops.MatMul)
def _bind_by_arguments(b: _Binding, key: str, op) -> None:
    """The same op on example a's copies of the arguments."""
    for a in range(b.N):
        b.out.add(b.rep(key, a), op, tuple(b.rep(k, a) for k in b.graph.args(key)))


@INSTANTIATE.register(ops.Nonlin, ops.Moment)
def _bind_expression(b: _Binding, key: str, op) -> None:
    """phi / psi of example a's copies; a pair moment once per pair (a, c) of examples, its
    primed symbols reading example c."""
    pair = isinstance(op, ops.Moment) and op.pair
    for a, c in ([(a, c) for a in range(b.N) for c in range(b.N)] if pair else [(a, a) for a in range(b.N)]):
        expr = replaced(op.expr, {s: b.symbol(s, a, c) for s in op.expr.free_symbols})
        b.out.add(f"{key}[{a},{c}]" if pair else b.rep(key, a), type(op)(expr), b.out.expr_args(expr))
