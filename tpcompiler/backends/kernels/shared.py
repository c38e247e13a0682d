"""Quantities that share one structure, computed by one loop (docs/DESIGN.md 2.7, strategy 2;
issue 11: compile time of programs with many positions).

A convolutional network's kernel has one quantity per pair of positions (i, j) and layer,
and its outputs are sums over such pairs: E[x_i x_j'] for every (i, j) is *the same
expression* of other quantities and features, up to which quantities and features it reads.
Straight-line code for every pair makes code generation and Numba's compile grow like
positions^2 x depth.  Here each lowered expression e (a quantity's definition, or one term
of an output) is written as

    e = c * T(s_1, ..., s_n),

with c a number, T a *template* whose free symbols are placeholders a_1..a_n, and s_k the
quantities / features it reads.  Expressions with the same template (and, for quantities,
the same level in the dependency DAG) form a *group*; the generated code computes a group
by one loop over its members, reading s_k through an index array (I[m, k]), so the code
size, sympy's cse and Numba's compile depend on the number of groups, which for a
convolution does not grow with the number of positions.  Nothing is assumed about the
program: T is found by renaming the symbols of the derived expressions, and
e == c * T(s_1, ..., s_n) holds by construction (T is e with s_k renamed to a_k).

Placeholders are numbered in a canonical traversal: the arguments of sums and products
are visited in the order of their *skeletons* (the expression with every symbol replaced by
its kind), so isomorphic expressions at different positions give the same template;
a symbol's kind is refined by where it occurs (``_labels``), and remaining ties keep sympy's
order (which can only split a group in two, never join different ones).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp


@dataclass
class Group:
    """Members m = 0..M-1 of one template: value_m = T(placeholder k <- source kinds[k] at
    index[m, k]); for quantities (``target`` not None) stored as slot target[m] with factor
    weight[m, 0]; for output terms added to output o with factor weight[m, o]."""

    template: sp.Expr
    placeholders: list          # symbols a_k of the template
    kinds: list                 # kind of a_k (a key of the caller's load formats)
    index: np.ndarray           # M x n int64
    weight: np.ndarray          # M x (1 or number of outputs) float64
    target: np.ndarray | None   # M int64 slots (quantities) or None (output terms)


class _Skeletons:
    """Structure ids of expressions: equal ids <=> equal trees (arguments of sums and
    products as multisets), with the symbols of ``kinds`` ({symbol: (kind, index)}) replaced
    by their kind (``key``), by a label (``_labels``) or by their placeholder (``canonical``).
    Ids are small integers interned in this object, so they order the same way for every
    expression it sees (and, the derivation being deterministic, in every run)."""

    def __init__(self, kinds: dict):
        self.kinds = kinds
        self.memo: dict = {}
        self.ids: dict = {}

    def intern(self, structure: tuple) -> int:
        i = self.ids.get(structure)
        if i is None:
            i = self.ids[structure] = len(self.ids)
        return i

    def _node(self, x: sp.Basic, parts: list) -> int:
        if x.is_Add or x.is_Mul:
            parts = sorted(parts)
        return self.intern((type(x).__name__, tuple(parts)))

    def key(self, e: sp.Basic) -> int:
        """The skeleton of e: its symbols replaced by their kinds."""
        hit = self.memo.get(id(e))  # by identity: equality of large trees is slow
        if hit is not None:
            return hit[0]
        if e.is_Symbol and e in self.kinds:
            k = self.intern(("$", self.kinds[e][0]))
        elif not e.args:
            k = self.intern(("atom", sp.srepr(e)))
        else:
            k = self._node(e, [self.key(a) for a in e.args])
        self.memo[id(e)] = (k, e)  # e kept alive, so its id is not reused
        return k

    def _labels(self, e: sp.Basic) -> dict:
        """{symbol: label}: its kind and where it occurs in e (every path from the root, as
        the skeletons of the nodes passed and the argument positions taken), so that a
        symbol read by two sums is told apart from one read by a single sum.  Invariant
        under renaming: corresponding symbols of isomorphic expressions get equal labels."""
        paths: dict = {}

        def walk(x, path):
            if x.is_Symbol and x in self.kinds:
                paths.setdefault(x, []).append(path)
                return
            here = self.key(x)
            commutative = x.is_Add or x.is_Mul
            for i, a in enumerate(x.args):
                walk(a, path + (here, -1 if commutative else i))

        walk(e, ())
        return {s: self.intern(("label", self.kinds[s][0], tuple(sorted(p)))) for s, p in paths.items()}

    def _relabelled(self, e: sp.Basic, labels: dict, memo: dict) -> int:
        """The id of e with each symbol replaced by ``labels[symbol]`` (an id); ``memo``
        caches the ids of subexpressions for one ``labels``."""
        hit = memo.get(id(e))
        if hit is not None:
            return hit[0]
        if e.is_Symbol and e in labels:
            k = self.intern(("$", labels[e]))
        elif not e.args:
            k = self.key(e)
        else:
            k = self._node(e, [self._relabelled(a, labels, memo) for a in e.args])
        memo[id(e)] = (k, e)
        return k

    def canonical(self, e: sp.Expr) -> tuple[int, list]:
        """(id, [s_1..s_n]): the symbols of ``kinds`` in e in canonical order (first
        occurrence, visiting the arguments of sums and products in the order of their
        skeletons with symbols labelled; ties keep sympy's order), and the id of e with s_k
        replaced by placeholder k.  Equal ids <=> equal templates (``template``)."""
        labels = self._labels(e)
        lmemo: dict = {}

        def lkey(x):
            return self._relabelled(x, labels, lmemo)

        out, seen = [], set()

        def visit(x):
            if x.is_Symbol and x in labels:
                if x not in seen:
                    seen.add(x)
                    out.append(x)
                return
            args = x.args
            if x.is_Add or x.is_Mul:
                args = sorted(args, key=lkey)  # stable
            for a in args:
                visit(a)

        visit(e)
        placeholders = {s: self.intern(("placeholder", self.kinds[s][0], k)) for k, s in enumerate(out)}
        return self._relabelled(e, placeholders, {}), out


def template(e: sp.Expr, syms: list) -> sp.Expr:
    """e with symbol syms[k] renamed to the placeholder a_k."""
    return e.xreplace({s: _placeholder(k) for k, s in enumerate(syms)})


def _placeholder(k: int) -> sp.Symbol:
    return sp.Symbol(f"_a{k}", real=True)


def _split(e: sp.Expr) -> tuple[float, sp.Expr]:
    """e = c * rest with c a number."""
    c, rest = sp.sympify(e).as_coeff_Mul()
    return float(c), rest


def plan(assignments, outputs, kinds: dict, slot_kind: str) -> tuple[list[Group], list[float], int]:
    """Groups computing ``assignments`` ((symbol, expr) in dependency order; symbol k is
    stored in slot k of kind ``slot_kind``) and then ``outputs`` (sums of terms).

    ``kinds``: {symbol: (kind, index)} of every symbol the expressions read, where it is found
    (the others are fixed and stay in the templates).  Quantities are grouped by (level, template), where the level is
    the length of the longest dependency chain among the assignments, so the members of a
    group never depend on each other and the groups run in level order.  Returns (groups,
    constant part of each output, number of groups of quantities)."""
    kinds = dict(kinds)
    kinds.update({s: (slot_kind, k) for k, (s, _) in enumerate(assignments)})
    sk = _Skeletons(kinds)
    slot = {s: k for k, (s, _) in enumerate(assignments)}
    level: dict = {}
    by_key: dict = {}
    for s, e in assignments:
        level[s] = 1 + max((level[d] for d in e.free_symbols if d in slot), default=-1)
        c, rest = _split(e)
        cid, syms = sk.canonical(rest)
        by_key.setdefault((level[s], cid), []).append((slot[s], c, syms, rest))
    groups = []
    for members in sorted(by_key.values(), key=lambda ms: (level[assignments[ms[0][0]][0]], ms[0][0])):
        groups.append(_group([(m[2], m[3]) for m in members], kinds, np.array([[m[1]] for m in members]),
                             np.array([m[0] for m in members], dtype=np.int64)))
    n_assign = len(groups)
    constants = [0.0] * len(outputs)
    terms: dict = {}   # structure id -> {binding: [weights, expression]}
    for o, e in enumerate(outputs):
        for term in sp.Add.make_args(sp.sympify(e)):
            c, rest = _split(term)
            if not (rest.free_symbols & set(kinds)) and rest.is_number:
                constants[o] += c * float(rest)
                continue
            cid, syms = sk.canonical(rest)
            w = terms.setdefault(cid, {}).setdefault(tuple(syms), [[0.0] * len(outputs), rest])
            w[0][o] += c
    for members in terms.values():
        groups.append(_group([(list(b), m[1]) for b, m in members.items()], kinds,
                             np.array([m[0] for m in members.values()]), None))
    return groups, constants, n_assign


def _group(members, kinds, weight, target) -> Group:
    """A Group from its members' (bindings, expressions), which have one structure id: the
    template is built from the first and checked against the last (equal structure ids
    make equal templates; the check guards that argument)."""
    (first, e0), (last, e1) = members[0], members[-1]
    t = template(e0, first)
    if len(members) > 1 and template(e1, last) != t:
        raise AssertionError(f"shared: members of one structure have different templates: {e0} and {e1}")
    n = len(first)
    ks = [kinds[s][0] for s in first]
    index = np.zeros((len(members), n), dtype=np.int64)
    for m, (b, _) in enumerate(members):
        if [kinds[s][0] for s in b] != ks:  # the structure id includes the kinds: cannot happen
            raise AssertionError(f"shared: template {t}: members read different kinds of symbols")
        index[m] = [kinds[s][1] for s in b]
    return Group(t, [_placeholder(k) for k in range(n)], ks, index,
                 np.asarray(weight, dtype=np.float64).reshape(len(members), -1), target)
