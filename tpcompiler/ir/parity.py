"""Flip symmetries: pair moments that are 0 because they are odd (docs/DESIGN.md 2.3).

An *atom* is a group of initial Gaussians independent of the rest of the program's
randomness and of mean 0: an initial vector together with those the covariance table
correlates it with, or the columns of an input matrix (its input layers).  Negating all of an
atom's coordinates leaves the law of the program unchanged, at every width and for both
inputs xi and xi' at once (they read the same initial vectors and matrices).

Every vector and scalar of the program is then a sum of parts, each with a *character*: the
set of atoms it is odd in (the flip of an atom of the set negates the part, the flip of any
other atom leaves it as it is).  A pair moment (1/n) sum_a x_a y'_a of two vectors with no
character in common is a sum of products of parts each negated by the flip of some atom, so
the moment and its images under the flips have one law, so they converge (the Master theorem)
to one constant, while their average over the group of flips is 0 at every width: the limit
is 0.  A Flatten readout y = sum_b g_b * y_b (tp.layers) reads one
independent vector g_b per position: the gradients of two positions have no character in
common, and the kernel program of the limit leaves out the NTK's products of their pairs
(``ntk.kernel_outputs`` with ``in_the_limit``), P^2 - P of them per layer.

The characters come from the program, one rule per op (``CHARACTERS``), in topological order:

* an initial vector, an input layer: {its atom};  a Param, an input coordinate, n^e: {{}};
* W x and W^T x: those of x (matrices are not negated);
* phi(x..; theta..) and a moment (1/n) sum psi(..): read from the expression: a sum has the
  union of its terms' characters, a product the symmetric differences of one character of
  each factor (a positive integer power likewise), a number {{}};
* any other function of an argument that is not even (relu(h) of h = W x + b) has no definite
  parity: the atoms of that argument are *dropped*, i.e. no longer negated, which makes that
  argument and the function even.  Dropping keeps every earlier conclusion true once its
  characters are projected onto the atoms left (projection commutes with unions and symmetric
  differences), so one pass suffices; characters are read projected.  A product whose
  characters would exceed ``MAX_CHARACTERS`` drops its atoms too (fewer atoms: fewer zeros
  proven, never a wrong one); a sum has at most its terms' characters (a Flatten readout one
  per position, 1024 at 32 x 32), and is not bounded.
"""
from __future__ import annotations

import networkx as nx
import sympy as sp

from tpcompiler.ir import ops
from tpcompiler.ir.graph import Graph
from tpcompiler.ir.rules import RuleTable

EVEN = frozenset({frozenset()})

#: The most characters a product keeps before its atoms are dropped (a product of sums of
#: many odd parts would otherwise multiply them).
MAX_CHARACTERS = 256


class Characters:
    """The characters of every vector and scalar of a graph (module docstring):
    ``vanishes(a, b)`` says whether E[Z^a Z^b'] = 0 follows from a flip symmetry."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.atom_of = _atoms(graph)
        self.dropped: set = set()
        self._raw: dict = {}
        for key in graph.order():
            op = graph.op(key)
            if op.kind in (ops.VEC, ops.SCALAR) and not (isinstance(op, ops.Moment) and op.pair):
                self._raw[key] = CHARACTERS(op)(self, key, op)
        # projected once, now that no atom will be dropped (``of`` is asked per pair of uses)
        self._raw = {key: self.of(key) for key in self._raw}
        self.dropped = set()

    def of(self, key: str) -> frozenset:
        """The characters of node ``key``, projected onto the atoms not dropped."""
        raw = self._raw[key]
        if not self.dropped or raw is EVEN:
            return raw
        return frozenset(c - self.dropped for c in raw)

    def vanishes(self, a: str, b: str) -> bool:
        """Whether E[Z^a Z^b'] = 0 (at every width, so in the limit): no common character."""
        return self.of(a).isdisjoint(self.of(b))

    def drop(self, characters: frozenset) -> frozenset:
        """Stop negating the atoms of ``characters``; even from now on."""
        for c in characters:
            self.dropped.update(c)
        return EVEN

    def _bounded(self, characters: frozenset) -> frozenset:
        return self.drop(characters) if len(characters) > MAX_CHARACTERS else characters

    def of_expression(self, expr: sp.Expr) -> frozenset:
        """The characters of a Nonlin's or Moment's expression (module docstring)."""
        if expr.is_Number:
            return EVEN
        if isinstance(expr, ops.NodeSymbol):
            return self.of(expr.key)  # (a KeyError: a node read before it is made, or a pair moment read)
        if expr.is_Add:
            return frozenset().union(*(self.of_expression(a) for a in expr.args))
        if expr.is_Mul:
            out = EVEN
            for factor in expr.args:
                out = self._bounded(_products(out, self.of_expression(factor)))
            return out
        if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:
            base, out = self.of_expression(expr.base), EVEN
            for _ in range(int(expr.exp)):
                out = self._bounded(_products(out, base))
            return out
        for s in expr.free_symbols:  # any other function: its odd arguments lose their atoms
            if isinstance(s, ops.NodeSymbol):
                self.drop(self.of(s.key))
        return EVEN


def _products(a: frozenset, b: frozenset) -> frozenset:
    """The characters of a product of parts of characters ``a`` and ``b``."""
    if b is EVEN:
        return a
    if a is EVEN:
        return b
    return frozenset(x ^ y for x in a for y in b)


def _atoms(graph: Graph) -> dict:
    """{initial vector or input matrix: its atom}: initial vectors joined by the covariance
    table are one atom (connected components); an input matrix is the atom of its layers."""
    linked = nx.Graph()
    linked.add_nodes_from(graph.keys_of(ops.InitVec))
    linked.add_edges_from(tuple(pair) for pair, value in graph.init_cov.items() if len(pair) == 2 and value != 0)
    atoms = {}
    for component in nx.connected_components(linked):
        name = min(component)
        atoms.update({k: name for k in component})
    atoms.update({k: k for k in graph.keys_of(ops.InputMat)})
    return atoms


#: The characters of a node, by op type: rule(characters so far, key, op) -> frozenset.
CHARACTERS = RuleTable("flip characters", domain=ops.INSTRUCTIONS)


@CHARACTERS.register(ops.InitVec)
def _initial_vector(c: Characters, key: str, op) -> frozenset:
    return frozenset({frozenset({c.atom_of[key]})})


@CHARACTERS.register(ops.InputLayer)
def _input_layer(c: Characters, key: str, op) -> frozenset:
    return frozenset({frozenset({c.atom_of[c.graph.args(key)[0]]})})


@CHARACTERS.register(ops.MatMul)
def _matmul(c: Characters, key: str, op) -> frozenset:
    return c.of(c.graph.args(key)[1])


@CHARACTERS.register(ops.Nonlin, ops.Moment)
def _expression(c: Characters, key: str, op) -> frozenset:
    return c.of_expression(op.expr)


@CHARACTERS.register(ops.Param, ops.Input, ops.WidthPower)
def _even(c: Characters, key: str, op) -> frozenset:
    return EVEN


@CHARACTERS.register(ops.InitMat, ops.InputMat)
def _matrix(c: Characters, key: str, op) -> frozenset:
    return EVEN  # (not read: matrices are not negated)
