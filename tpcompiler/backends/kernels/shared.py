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

import contextlib
import functools
import gc
import sysconfig
import threading
from dataclasses import dataclass

import numpy as np
import sympy as sp

from tpcompiler import memory
from tpcompiler.ir import symbols
from tpcompiler.ir.construct import mul, number, product, rebuilt_call, rewrite, total  # (the backend reads them as shared.product ...)
from tpcompiler.ir.symbols import free_symbols  # (memoised; the plan and the lifts read it)


@dataclass
class Group:
    """Members m = 0..M-1 of one template, a tuple: value_m = T(placeholder k <- source
    kinds[k] at index[m, k]); for quantities (``target`` not None) entry e stored as slot
    target[m, e] with factor weight[m, 0]; for output bundles entry o added to output o with
    factor weight[m, 0]."""

    template: sp.Expr
    placeholders: list          # symbols a_k of the template
    kinds: list                 # kind of a_k (a key of the caller's load formats)
    index: np.ndarray           # M x n int64
    weight: np.ndarray          # M x (1 or number of outputs) float64
    target: np.ndarray | None   # M x (entries) int64 slots (quantities) or None (outputs)
    #: output bundles of ``plan(..., blocks=)``: per member, the first output its entry 0 adds to
    offset: np.ndarray | None = None


class Skeletons:
    """Structure ids of expressions: equal ids <=> equal trees (arguments of sums and
    products as multisets), with the symbols of ``kinds`` ({symbol: (kind, index)}; any
    subexpression may be such a "symbol", e.g. an input-layer covariance atom) replaced
    by their kind (``key``), by a label (``_labels``) or by their placeholder (``canonical``).
    Ids are small integers interned in this object, so they order the same way for every
    expression it sees (and, the derivation being deterministic, in every run)."""

    def __init__(self, kinds: dict):
        self.kinds = kinds
        #: every symbol of ``kinds`` an atom (a dict of symbols, as ``plan``'s): ``_shape``
        #: need not look up the nodes with arguments
        self.atoms_only = isinstance(kinds, dict) and not any(k.args for k in kinds)
        self.memo: dict = {}
        self.ids: dict = {}
        self.shapes: dict = {}  # shape (``_shape``) -> (id, positions of the canonical order)

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
        if e in self.kinds:
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
        self._paths(e, (), paths)
        return {s: self.intern(("label", self.kinds[s][0], tuple(sorted(p)))) for s, p in paths.items()}

    def _paths(self, x: sp.Basic, path: tuple, paths: dict) -> None:
        """Append to ``paths[symbol]`` the path to each occurrence of a symbol in x (``_labels``).
        A method, not a recursive closure: a closure that calls itself is a reference cycle,
        which only the cyclic garbage collector frees (see ``paused_gc``)."""
        if x in self.kinds:
            paths.setdefault(x, []).append(path)
            return
        here = self.key(x)
        commutative = x.is_Add or x.is_Mul
        for i, a in enumerate(x.args):
            self._paths(a, path + (here, -1 if commutative else i), paths)

    def _relabelled(self, e: sp.Basic, labels: dict, memo: dict) -> int:
        """The id of e with each symbol replaced by ``labels[symbol]`` (an id); ``memo``
        caches the ids of subexpressions for one ``labels``."""
        hit = memo.get(id(e))
        if hit is not None:
            return hit[0]
        if e in labels:
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
        replaced by placeholder k.  Equal ids <=> equal templates (``template``).

        Derived once per *shape* (``_shape``): an expression of the shape of one seen before
        is that one with its symbols renamed one to one, and the derivation below reads
        symbols only through their kinds and which of them are equal, so its result is the
        earlier one renamed (a CNN: the expressions of all pairs of positions of one window
        pattern are one shape)."""
        shape, found = self._shape(e)
        hit = self.shapes.get(shape)
        if hit is not None:
            cid, positions = hit
            return cid, [found[p] for p in positions]
        cid, order = self._canonical(e)
        position = {s: k for k, s in enumerate(found)}
        self.shapes[shape] = (cid, [position[s] for s in order])
        return cid, order

    def _shape(self, e: sp.Basic) -> tuple[tuple, list]:
        """(shape, symbols): e's tree in preorder, sympy's order of arguments, each node as
        its type and number of arguments, each symbol of ``kinds`` as its kind and the number
        of its first occurrence, any other atom as itself (and its precision: Floats of one
        value and different precisions print differently); and the symbols of ``kinds`` in
        the order of their first occurrence.  Equal shapes: equal trees up to a one-to-one
        renaming of those symbols, symbols[k] of one to symbols[k] of the other."""
        out = []
        found: dict = {}
        stack = [e]
        kinds = self.kinds
        atoms_only = self.atoms_only
        while stack:
            x = stack.pop()
            args = x._args
            if args and atoms_only:  # (no dict look-up of a node that cannot be a kind)
                out.append((type(x), len(args)))
                stack.extend(reversed(args))
            elif x in kinds:
                k = found.get(x)
                if k is None:
                    k = found[x] = len(found)
                out.append(("$", kinds[x][0], k))
            elif args:
                out.append((type(x), len(args)))
                stack.extend(reversed(args))
            else:
                out.append((type(x), x, getattr(x, "_prec", None)))
        return tuple(out), list(found)

    def _canonical(self, e: sp.Expr) -> tuple[int, list]:
        """``canonical`` derived for e itself."""
        labels = self._labels(e)
        out: dict = {}  # the symbols in canonical order (a dict as an ordered set)
        self._visit(e, labels, {}, out)
        placeholders = {s: self.intern(("placeholder", self.kinds[s][0], k)) for k, s in enumerate(out)}
        return self._relabelled(e, placeholders, {}), list(out)

    def _visit(self, x: sp.Basic, labels: dict, lmemo: dict, out: dict) -> None:
        """Record the symbols of x in ``out`` in canonical order (``canonical``): arguments of
        sums and products sorted by their relabelled ids (``lmemo`` their memo), stably."""
        if x in labels:
            out.setdefault(x, None)
            return
        args = x.args
        if x.is_Add or x.is_Mul:
            args = sorted(args, key=lambda a: self._relabelled(a, labels, lmemo))
        for a in args:
            self._visit(a, labels, lmemo, out)


def add_terms(into: dict, expr: sp.Expr, scale: float = 1.0) -> dict:
    """``into`` += scale * expr, for a *term sum* ``into`` = {term: coefficient}: the sum of
    coefficient * term, a float times an expression without a numeric coefficient
    (``as_coeff_Mul``; zero contributions are left out, so the sum of zero is empty).  The
    kernels' outputs are such sums (a CNN's: one term or more per pair of positions); held as a dict,
    the stages handle them term by term instead of rebuilding one sympy sum of thousands of
    terms at every substitution (each rebuild re-sorted and re-collected all of them, and
    multiplying the sum by a number rebuilt every product)."""
    for a in sp.Add.make_args(expr):
        c, t = a.as_coeff_Mul()
        c = scale * float_value(c)
        if c != 0.0:
            into[t] = into.get(t, 0.0) + c
    return into


@functools.lru_cache(maxsize=4096)
def float_value(n: sp.Number) -> float:
    """float(n) of a sympy number, remembered per number (sympy converts through its
    multiprecision value at every call)."""
    return float(n)


class _ProcessWide:
    """A process-wide setting held while any block that asked for it runs: ``install`` when
    the first block enters, ``uninstall`` when the last one exits (reentrant, thread-safe)."""

    def __init__(self, install, uninstall):
        self._install, self._uninstall = install, uninstall
        self._lock = threading.Lock()
        self._users = 0

    @contextlib.contextmanager
    def held(self):
        with self._lock:
            if self._users == 0:
                self._install()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._uninstall()


_ORIGINAL_FLOAT_NEW = sp.Float.__dict__["_new"]
_ORIGINAL_FLOAT_HASH = sp.Float.__dict__["__hash__"]


def _remembered_float_hash(self) -> int:
    """sympy's hash of a Float, computed once per object and kept where sympy keeps the hash
    of any other expression (``_mhash``): sympy's Float converts its value to a Python float
    at every hash, and the pooled Floats (``interned_floats``) are hashed again and again as
    dictionary keys."""
    h = self._mhash
    if h is None:
        h = self._mhash = _ORIGINAL_FLOAT_HASH(self)
    return h


def _install_float_pool():
    sp.Float._new = classmethod(_interning_float_new({}))
    sp.Float.__hash__ = _remembered_float_hash


def _uninstall_float_pool():
    sp.Float._new = _ORIGINAL_FLOAT_NEW
    sp.Float.__hash__ = _ORIGINAL_FLOAT_HASH


_FLOAT_POOL = _ProcessWide(_install_float_pool, _uninstall_float_pool)


def interned_floats():
    """Within the block, every sympy Float sympy creates is one object per value (interned
    by its mpf value and precision; Floats are immutable, so an interned one is
    indistinguishable from a new one).  sympy deduces an object's assumptions the first time
    they are asked, about 40 us for a Float, and every product asks its coefficient
    ``is_zero``: multiplying the template values of a CNN by its slots' numbers made some
    10^5 new Floats, a fifth of the derivation (2-D 6x6 depth 2: 43 -> 34 s).  Their hashes
    are kept too (``_remembered_float_hash``).  The wrapper around ``Float._new`` and the
    hash are installed by the first block entered and removed when the last one exits
    (``_ProcessWide``)."""
    return _FLOAT_POOL.held()


_SYMBOL_POOL = _ProcessWide(symbols.pool_symbols, symbols.unpool_symbols)


def interned_symbols():
    """Within the block, a compiler symbol (symbols.py) of given kind and values is one
    object however many times it is made (``symbols.pool_symbols``): a CNN's derivation
    makes more of them than the symbols' own cache keeps, and a symbol made again as a new
    object is compared field by field at every dictionary look-up (2-D 12x12 depth 2: plan
    10.2 -> 9.0 s).  The pool is freed when the last block exits (``_ProcessWide``)."""
    return _SYMBOL_POOL.held()


_gc_state = {"enabled": True}


def _pause_gc():
    _gc_state["enabled"] = gc.isenabled()
    gc.disable()


def _resume_gc():
    if _gc_state["enabled"]:
        _promote_young_objects()
        gc.enable()


#: The size of the youngest generation from which ``_promote_young_objects`` moves it: a
#: CNN's derivation leaves millions of objects there, a small program's a few thousand.
PROMOTE_FROM = 100_000

#: Whether the interpreter runs without the GIL: its collector has no generations, and
#: ``gc.freeze``/``unfreeze`` would each walk the whole heap.
_FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

#: How many times ``_promote_young_objects`` may move objects between two full collections:
#: a compile pauses the collector up to three times (``tp.compile``'s passes, the kernel
#: derivation, the generated code's first call).
MOVES_PER_FULL_COLLECTION = 4

#: The number of full collections when ``_promote_young_objects`` last moved objects, and
#: how many moves it made since that number was reached.
_moves = {"full_collections": None, "count": 0}


def _promote_young_objects():
    """Move the objects the collector tracks into its oldest generation without walking them,
    when the youngest holds at least ``PROMOTE_FROM``: the objects made while it was paused
    are all there, and the first collections after it resumed walked each of them twice,
    once in the youngest generation and once in the middle one (2-D 12x12 depth 2: 2.2 +
    2.0 s after the kernel derivation, reclaiming almost nothing).  ``gc.freeze`` moves them
    to the permanent generation, ``gc.unfreeze`` back to the oldest one, where a full
    collection still finds any cycle among them.

    ``gc.freeze`` also sets the collector's counters to zero, which postpones the middle
    and full collections: at most ``MOVES_PER_FULL_COLLECTION`` moves between two full
    collections (a loop of large compiles otherwise never reaches one, and the cycles moved
    would pile up), none for small blocks (their counters are left as they were).  Skipped
    when the process keeps objects frozen (unfreezing would release them: Python 3.12
    freezes some of its own at start-up, so there this does nothing) and without the GIL.
    Not atomic: another thread's ``gc.freeze`` between the check and ``gc.unfreeze`` would
    be undone."""
    if _FREE_THREADED or gc.get_count()[0] < PROMOTE_FROM or gc.get_freeze_count() != 0:
        return
    full = gc.get_stats()[-1]["collections"]
    if _moves["full_collections"] != full:
        _moves.update(full_collections=full, count=0)
    if _moves["count"] >= MOVES_PER_FULL_COLLECTION:
        return
    gc.freeze()
    gc.unfreeze()
    _moves["count"] += 1


_GC_PAUSE = _ProcessWide(_pause_gc, _resume_gc)


def paused_gc():
    """Python's cyclic garbage collector off within the block, as it was before after the
    last block exits (``_ProcessWide``; a ``gc.disable()`` by other code while a block runs
    is undone then).  A CNN's derivation allocates millions of sympy
    objects, few of them in reference cycles, and every full collection walks all the live
    ones (2-D 6x6 depth 2: 18 full collections, 17% of the derivation); reference counting
    still frees everything that is not in a cycle.  On the way out the objects made inside
    are moved to the oldest generation (``_promote_young_objects``)."""
    return _GC_PAUSE.held()


def _interning_float_new(pool: dict):
    """``Float._new`` returning the pooled Float of the value it made."""
    original = _ORIGINAL_FLOAT_NEW.__func__

    def _new(cls, *args, **kwargs):
        made = original(cls, *args, **kwargs)
        if type(made) is not sp.Float:  # zero, nan, infinities: sympy's singletons
            return made
        return pool.setdefault((made._mpf_, made._prec), made)

    return _new


def term_sum(expr: sp.Expr) -> dict:
    """The term sum (``add_terms``) of an expression."""
    return add_terms({}, sp.sympify(expr))


def map_terms(terms: dict, f) -> dict:
    """The term sum of sum_t c_t f(t) (f's results split into terms again)."""
    out: dict = {}
    for t, c in terms.items():
        memory.tick()
        add_terms(out, f(t), c)
    return out


def sum_of_terms(terms: dict) -> sp.Expr:
    """The term sum as one sympy expression (small programs' straight-line code)."""
    return sp.Add(*[number(c) * t for t, c in terms.items() if c != 0.0])


def template(e: sp.Expr, syms: list) -> sp.Expr:
    """e with symbol syms[k] renamed to the placeholder a_k."""
    return e.xreplace({s: _placeholder(k) for k, s in enumerate(syms)})


def _placeholder(k: int) -> sp.Symbol:
    return sp.Symbol(f"_a{k}", real=True)


def _divided(e: sp.Expr, c: float) -> sp.Expr:
    """e / c for a number c, term by term, by rescaling each term's numeric coefficient (the
    same value as sympy's division, without rebuilding every product: a CNN has thousands)."""
    return e if c == 1.0 else _rescaled(e, lambda coef: coef / c)


def _scaled(t: sp.Expr, r: float) -> sp.Expr:
    """r * t, term by term as ``_divided``."""
    return t if r == 1.0 else _rescaled(t, lambda coef: coef * r)


def _rescaled(e: sp.Expr, f) -> sp.Expr:
    """e with each term's numeric coefficient c replaced by f(c)."""
    if e.is_Add:
        return sp.Add(*[_rescaled(t, f) for t in e.args])
    coef, rest = e.as_coeff_Mul()
    scaled = number(f(float(coef)))
    if rest == 1:
        return scaled
    if scaled == 1:
        return rest
    if rest.is_Add:
        return scaled * rest
    return sp.Mul._from_args((scaled, *sp.Mul.make_args(rest)))


def _split(e: sp.Expr) -> tuple[float, sp.Expr]:
    """e = c * rest with c a number."""
    c, rest = sp.sympify(e).as_coeff_Mul()
    return float(c), rest


#: A memo's default where None is a value (``dict.get(key, UNSEEN)``).
UNSEEN = object()


def lift_repeated_calls(assignments, outputs, kinds: dict, name=None) -> tuple[list, list]:
    """(assignments, outputs) with every function call that reads symbols of ``kinds`` or
    assigned symbols and occurs in more than one expression (a depth-1 CNN's E[relu relu] of
    a pair of positions, read by the diagonal's terms of every pair it feeds) made an assignment
    of its own, placed before its first use, and read from there.  Equal values: only common
    subexpressions are named, as sympy's cse would, but counted per expression (an output: all
    its terms), which stays linear in the number of expressions.  ``name(k)``: the symbol of
    the k-th lifted call (default ``_lift{k}``)."""
    kind_symbols = set(kinds) | {s for s, _ in assignments}
    exprs = [[e] for _, e in assignments] + [list(terms) for terms in outputs]  # an output: its terms
    inside: dict = {}  # subexpression -> the calls reading kind_symbols in it (_calls_reading)
    free: dict = {}    # free_symbols' memo
    counts: dict = {}
    for parts in exprs:
        seen = set()
        for e in parts:
            memory.tick()
            for sub in _calls_reading(e, kind_symbols, inside, free):
                if sub not in seen:
                    seen.add(sub)
                    counts[sub] = counts.get(sub, 0) + 1
    repeated = [f for f, n in counts.items() if n > 1]
    if not repeated:
        return list(assignments), list(outputs)
    name = name or (lambda k: sp.Symbol(f"_lift{k}", real=True))
    names = {f: name(k) for k, f in enumerate(repeated)}
    definitions: dict = {}   # symbol -> its call, inner calls named
    memo: dict = {}          # substitute's, shared by all expressions

    def calls_in(exprs) -> list:
        """The calls of ``names`` in exprs, in a fixed order (first occurrence)."""
        return list(dict.fromkeys(f for e in exprs for f in _calls_reading(e, kind_symbols, inside, free) if f in names))

    def define(f):
        """Name f (after the repeated calls inside it), in post-order into ``placed``."""
        sym = names[f]
        if sym not in definitions:
            for g in calls_in(f.args):
                define(g)
            inner = rebuilt_call(f, [substitute(a, names, memo) for a in f.args])
            definitions[sym] = inner
            placed.append((sym, inner))

    out = []
    for s, e in assignments:
        memory.tick()
        placed: list = []
        for f in calls_in([e]):
            define(f)
        out.extend(placed)
        out.append((s, substitute(e, names, memo)))
    placed = []
    for terms in outputs:
        for f in calls_in(terms):
            define(f)
    out.extend(placed)
    return out, [map_terms(terms, lambda t: substitute(t, names, memo)) for terms in outputs]


def _calls_reading(e: sp.Basic, kind_symbols: set, memo: dict, free: dict) -> tuple:
    """The function calls in e that read a symbol of ``kind_symbols``, distinct, in preorder
    (first occurrence); memoised per subexpression, so that the calls shared by many terms
    (a pair of positions' expectations) are walked once; ``free`` the memo of
    ``free_symbols``."""
    hit = memo.get(e)
    if hit is None:
        found = [e] if isinstance(e, sp.Function) and free_symbols(e, free) & kind_symbols else []
        for a in e.args:
            found.extend(_calls_reading(a, kind_symbols, memo, free))
        hit = memo[e] = tuple(dict.fromkeys(found))
    return hit


def symbols_read(e: sp.Basic, memo: dict):
    """The free symbols of e (an iterable, repeats possible): read off ``flat_atoms`` when e
    is such an expression, else ``free_symbols(e, memo)``."""
    atoms = flat_atoms(e)
    return free_symbols(e, memo) if atoms is None else [a for a in atoms if a.is_Symbol]


def substitute(e: sp.Basic, rep: dict, memo: dict) -> sp.Basic:
    """``e.xreplace(rep)``, ``memo`` as ``rewrite``'s."""
    return rewrite(e, rep.get, memo)


def flat_atoms(e: sp.Basic) -> list | None:
    """The symbols and numbers of e (with repeats) when e is one, or a sum or product of them
    and of products of them (a CNN's covariance sum c + sum_k c_k q_k, an output term
    c * symbol: most of the expressions a CNN's derivation makes per pair of positions), else
    None.  Such an expression holds no function call, and its free symbols are its symbols:
    the passes below read that off the list instead of walking the tree with a memo.  (Other
    atoms are not taken: sympy's Indexed and Idx are atoms with arguments.)"""
    if e.is_Symbol or e.is_Number:
        return [e]
    if not (e.is_Add or e.is_Mul):
        return None
    found = []
    for a in e.args:
        if a.is_Symbol or a.is_Number:
            found.append(a)
        elif a.is_Mul:
            for b in a.args:
                if not (b.is_Symbol or b.is_Number):
                    return None
                found.append(b)
        else:
            return None
    return found


def rewrite_calls(e: sp.Basic, replacement, memo: dict) -> sp.Basic:
    """``rewrite`` for a ``replacement`` that replaces function calls only (None for every
    symbol, number, sum and product): an expression of ``flat_atoms`` has no call in it and
    is e itself."""
    return e if flat_atoms(e) is not None else rewrite(e, replacement, memo)


def alias_repeated_arguments(assignments, outputs, call_type, kinds: dict) -> tuple[list, list, dict]:
    """(assignments, outputs, aliases): in every call of ``call_type``, a symbol of ``kinds``
    that an earlier argument of the same call already read is replaced by an alias of its
    own (``aliases``: alias -> symbol, read from the same place).  Calls of one template at
    different positions differ in which arguments happen to coincide (the variances of two
    overlapping windows at one input); as far as the generated code goes a coincidence is
    just two reads of one place, so it must not make a structure of its own."""
    aliases: dict = {}
    made: dict = {}

    def alias(sym, k):
        a = made.get((sym, k))
        if a is None:
            a = made[(sym, k)] = sp.Symbol(f"{sym.name}~{k}", real=True)
            aliases[a] = sym
        return a

    def aliased(c):
        """The call c with its repeated reads aliased, or None if it has none (then the calls
        inside its arguments are looked at: ``rewrite``); once per distinct call (``rewrite``'s
        memo: the terms of one pair of positions share their calls)."""
        if not isinstance(c, call_type):
            return None
        if all(a.is_Atom for a in c.args):  # the common case, decided without free_symbols
            read = [a for a in c.args if a in kind_symbols]
            if len(set(read)) == len(read):
                return None
        seen: set = set()
        args = []
        for k, a in enumerate(c.args):
            read = free_symbols(a, free) & kind_symbols
            again = read & seen
            args.append(a.xreplace({x: alias(x, k) for x in again}) if again else a)
            seen |= read
        return c.func(*args) if any(x is not y for x, y in zip(args, c.args)) else None

    def rewrite_all(e):
        memory.tick()
        return rewrite_calls(e, aliased, memo)

    memo: dict = {}
    free: dict = {}  # free_symbols' memo

    kind_symbols = set(kinds) | {s for s, _ in assignments}
    return ([(s, rewrite_all(e)) for s, e in assignments], [map_terms(terms, rewrite_all) for terms in outputs],
            aliases)


def plan(assignments, outputs, kinds: dict, slot_kind: str, aliases: dict | None = None,
         blocks: int = 1) -> tuple[list[Group], list[float], int]:
    """Groups computing ``assignments`` ((symbol, expr) in dependency order; symbol k is
    stored in slot k of kind ``slot_kind``) and then ``outputs`` (term sums, ``add_terms``).

    ``kinds``: {symbol: (kind, index)} of every symbol the expressions read, where it is found
    (the others are fixed and stay in the templates).  Quantities of one level (the length
    of the longest dependency chain among the assignments before them) that read the same
    symbols form a bundle c * (e_0, e_1, ...)/c (the NNGP-like and NTK-like quantities of one
    pair of positions: their common subexpressions are computed once); bundles are grouped
    by (level, structure), so the members of a group never depend on each other and the
    groups run in level order.  ``aliases``: {alias: symbol} read from the symbol's place
    (``alias_repeated_arguments``).  Returns (groups, constant part of each output, number
    of groups of quantities).  ``blocks``: the outputs are that many blocks of equal size (the
    kernels' two parts); a bundle of terms that add to one block only is a bundle of the
    block's size, and the block's first output is its members' ``offset``, so that bundles of
    one structure in different blocks are one group."""
    aliases = aliases or {}
    kinds = dict(kinds)
    kinds.update({s: (slot_kind, k) for k, (s, _) in enumerate(assignments)})
    kinds.update({a: kinds[s] for a, s in aliases.items()})
    sk = Skeletons(kinds)
    slot = {s: k for k, (s, _) in enumerate(assignments)}
    kind_symbols = set(kinds)
    level: dict = {}
    bundles: dict = {}
    free: dict = {}  # free_symbols' memo: output terms share their calls
    for s, e in assignments:
        memory.tick()
        read = {aliases.get(d, d) for d in symbols_read(e, free)}
        level[s] = 1 + max((level[d] for d in read if d in slot), default=-1)
        bundles.setdefault((level[s], frozenset(read & kind_symbols)), []).append((slot[s], e))
    by_key: dict = {}
    for (lev, _), items in bundles.items():
        memory.tick()
        items = sorted(items, key=lambda it: sk.key(it[1]))  # stable: a canonical order of the entries
        c = _split(items[0][1])[0] or 1.0
        bundle = sp.Tuple(*[_divided(e, c) for _, e in items])
        cid, syms = sk.canonical(bundle)
        by_key.setdefault((lev, cid), []).append(([k for k, _ in items], c, syms, bundle, lev))
    groups = []
    for key in sorted(by_key):  # (level, structure): each layer's groups of a level in one order
        members = by_key[key]
        groups.append(_group([(m[2], m[3]) for m in members], kinds, np.array([[m[1]] for m in members]),
                             np.array([m[0] for m in members], dtype=np.int64)))
    n_assign = len(groups)
    constants = [0.0] * len(outputs)
    # Output terms that read the same symbols (the NNGP and NTK terms of one pair of
    # positions) are one *bundle*, the tuple of their sums per output, so the code computes
    # their common subexpressions (an arccos) once: the bundle is c * (e_0, e_1, ...)/c,
    # with c the first term's coefficient, grouped by the structure of the tuple.
    bundles: dict = {}
    kind_symbols = set(kinds)
    for o, output in enumerate(outputs):
        for term, coef in output.items():
            memory.tick()
            if coef == 0.0:
                continue
            read = {aliases.get(d, d) for d in symbols_read(term, free)} & kind_symbols
            if not read and term.is_number:
                constants[o] += coef * float(term)
                continue
            bundles.setdefault(frozenset(read), [[] for _ in outputs])[o].append((coef, term))
    terms: dict = {}   # structure id -> [(binding, coefficient, tuple, offset)]
    width = len(outputs) // blocks
    for parts in bundles.values():
        memory.tick()
        c = next(p[0][0] for p in parts if p)
        used = {o // width for o, p in enumerate(parts) if p}
        offset = 0
        if blocks > 1 and len(used) == 1:
            offset = width * used.pop()
            parts = parts[offset:offset + width]
        bundle = sp.Tuple(*[total([_scaled(t, coef / c) for coef, t in p]) if p else sp.S.Zero for p in parts])
        cid, syms = sk.canonical(bundle)
        terms.setdefault(cid, []).append((syms, c, bundle, offset))
    for members in terms.values():
        group = _group([(m[0], m[2]) for m in members], kinds, np.array([[m[1]] for m in members]), None)
        if blocks > 1:
            group.offset = np.array([m[3] for m in members], dtype=np.int64)
        groups.append(group)
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
        memory.tick()
        if [kinds[s][0] for s in b] != ks:  # the structure id includes the kinds: cannot happen
            raise AssertionError(f"shared: template {t}: members read different kinds of symbols")
        index[m] = [kinds[s][1] for s in b]
    return Group(t, [_placeholder(k) for k in range(n)], ks, index,
                 np.asarray(weight, dtype=np.float64).reshape(len(members), -1), target)
