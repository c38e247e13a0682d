"""The compiler's sympy symbols, defined in one place, each kind its own class.

A symbol's identity is its class and its fields, never its name: two symbols are equal iff
they are of the same class with the same fields (``_hashable_content``), so a program
scalar called ``Z_u`` or ``q`` is a ``NodeSymbol`` and can never equal Z^u or a kernel
quantity, whatever the names.  Code asks a symbol what it is with ``isinstance`` and reads
its fields; nothing parses a name.

* ``NodeSymbol(key, primed)``    the program variable ``key`` (a node of the graph) inside
  Nonlin, Moment and output expressions; primed: evaluated at the second input xi';
* ``ZSymbol(key, primed)``       Z^key, the limit random variable of vector ``key``
  (Master theorem, docs/DESIGN.md 2.2);
* ``ZHatSymbol(key, primed)``    ZHat^key, the Gaussian leaf of the MatMul node ``key``;
* ``QuantitySymbol(k, primed)``  quantity k of the pairwise-Gaussian kernel engine (an
  expectation; the row quantities of the second input are the primed ones);
* ``CallArgumentSymbol(k, primed)`` argument k of the kernel backend's expectation calls
  (a covariance summed over a window's taps, computed once);
* ``RowFeatureSymbol(k, primed)`` row feature k of the kernel backend (a function of one
  input row; primed: of the second input's row);

(the numbered kinds keep k in the field ``key`` too, so every kind with a second-input
copy has the fields ``key`` and ``primed``);
* ``GramSymbol(m)``              Gram entry m of the kernel backend (an inner product of
  the two input rows);
* ``ArgumentSymbol()``           the argument t of a one-variable function g(t).
* ``TemplateConstant(k)``, ``LeafCovariance(a, sa, b, sb)`` a renamed constant and a leaf
  covariance of an expectation template of the kernel engine (shared derivations).

Every symbol is real.  ``primed(s)`` / ``unprimed(s)`` move any kind that has a copy at
the second input between the two inputs.

Names are for people and for code that needs one string per symbol (the numpy lowering's
environments, deterministic sort orders of generated code): a node symbol is named by its
key (``h``, ``h'`` primed) and every other kind carries ``:`` (``Z:h``, ``q:3'``), which no
node key contains (the DSL takes identifiers; derived keys add only ``_ [ , ]``), so names
are distinct across all symbols; but no code reads a meaning from them.  Symbols sort among themselves and with plain sympy symbols by name, as plain
symbols do (``class_key``), so expression orderings do not depend on the classes.
"""
from __future__ import annotations

import functools
import itertools
from functools import lru_cache

import sympy as sp
from sympy.printing.conventions import split_super_sub
from sympy.printing.latex import translate

#: The TeX written after a variable evaluated at the second input (Z^h(xi')).
AT_SECOND_INPUT = r"(\xi')"


class CompilerSymbol(sp.Symbol):
    """A real sympy symbol whose identity is (class, ``fields``).

    Subclasses list their identity attributes in ``fields`` (and ``__slots__``), in
    constructor order, and define ``_display_name``, ``_tex`` and ``_text``.  The text
    (``str``) of a symbol is a Python identifier only when it is its name: lambdify keeps
    symbols whose text is an identifier and prints them by name."""

    __slots__ = ("_values",)
    fields: tuple[str, ...] = ()
    #: Only kinds with a second-input copy (``_Sided``) have a ``primed`` field.
    primed = False

    def __new__(cls, *values):
        return _make(cls, cls._normalise(*values))

    @staticmethod
    def _normalise(*values) -> tuple:
        return values

    @classmethod
    def class_key(cls):
        return sp.Symbol.class_key()

    def values(self) -> tuple:
        """The fields' values, in constructor order (set once, when the symbol is made)."""
        return self._values

    def _hashable_content(self):
        return self.values() + self._assumptions0

    def __getnewargs_ex__(self):
        return self.values(), {}

    def _latex(self, printer):
        names = printer._settings.get("symbol_names") or {}
        return names[self] if self in names else self._tex(printer)

    def _sympystr(self, printer):
        return self._text()

    def _sympyrepr(self, printer):
        return "%s(%s)" % (type(self).__name__, ", ".join(repr(v) for v in self.values()))

    def _tex(self, printer) -> str:
        raise NotImplementedError

    def _text(self) -> str:
        raise NotImplementedError


@lru_cache(maxsize=1 << 16)
def _make(cls, values: tuple) -> CompilerSymbol:
    obj = sp.Symbol.__xnew__(cls, cls._display_name(*values), real=True)
    for f, v in zip(cls.fields, values):
        setattr(obj, f, v)
    obj._values = values
    return obj


_CACHED_MAKE = _make


def pool_symbols() -> None:
    """From now on every symbol of a kind and values is one object, however many are made
    (``_make``'s cache keeps the last 65,536; a 2-D 8x8 CNN's derivation makes 100,000
    symbols, a 12x12 one 500,000, and an equal symbol made again is then another object,
    which every dictionary look-up compares field by field).  Until ``unpool_symbols``,
    which frees the pool; the kernel backend pools the symbols of a derivation
    (``shared.interned_symbols``)."""
    global _make
    pool: dict = {}

    def pooled(cls, values: tuple) -> CompilerSymbol:
        key = (cls, values)
        made = pool.get(key)
        if made is None:
            made = pool[key] = _CACHED_MAKE(cls, values)
        return made

    _make = pooled


def unpool_symbols() -> None:
    """Back to ``_make``'s bounded cache (``pool_symbols``)."""
    global _make
    _make = _CACHED_MAKE


def key_tex(key: str, primed: bool = False) -> str:
    r"""The typeset name of node ``key`` as sympy typesets a symbol of that name (``W2`` ->
    ``W_{2}``, ``xi_1`` -> ``\xi_{1}``, ``sigma_W`` -> ``\sigma_{W}``); primed, the prime
    sits on the base letter, grouped so that a power or index can follow (``{\xi'}_{1}``:
    coordinate 1 of xi')."""
    name, supers, subs = split_super_sub(key)
    tex = "{%s'}" % translate(name) if primed else translate(name)
    if supers:
        tex += "^{%s}" % " ".join(translate(s) for s in supers)
    if subs:
        tex += "_{%s}" % " ".join(translate(s) for s in subs)
    return tex


class _Sided(CompilerSymbol):
    """A kind with a copy at the second input: fields (``key``, ``primed``), where ``key`` is
    a node key (``str``) or an entry's number in its table (``int``, ``key_type``).  Named
    ``prefix + key`` (``'`` appended when primed); its text is ``text_format`` of the key."""

    __slots__ = ("key", "primed")
    fields = ("key", "primed")
    key_type, prefix, text_format = str, "", "{}"

    @classmethod
    def _normalise(cls, key, primed=False):
        return cls.key_type(key), bool(primed)

    @classmethod
    def _display_name(cls, key, primed):
        return f"{cls.prefix}{key}" + ("'" if primed else "")

    def _text(self):
        return self.text_format.format(self.key) + ("'" if self.primed else "")


class NodeSymbol(_Sided):
    """The program variable ``key`` (at the second input xi' if ``primed``)."""

    __slots__ = ()

    def _tex(self, printer):
        return key_tex(self.key, self.primed)


class _NodeVariable(_Sided):
    """A limit random variable attached to node ``key`` (Z or ZHat), at xi' if primed."""

    __slots__ = ()
    head = ""

    def _tex(self, printer):
        return r"%s^{%s}" % (self.head, key_tex(self.key)) + (AT_SECOND_INPUT if self.primed else "")


class ZSymbol(_NodeVariable):
    """Z^key: the limit random variable of vector ``key``."""

    __slots__ = ()
    head, prefix, text_format = "Z", "Z:", "Z^{}"


class ZHatSymbol(_NodeVariable):
    """ZHat^key: the Gaussian leaf of the MatMul node ``key`` (its family's member)."""

    __slots__ = ()
    head, prefix, text_format = r"\hat{Z}", "Zhat:", "Zhat^{}"


class _Numbered(_Sided):
    """Entry number ``key`` of one of the kernel backend's tables, at xi' if primed."""

    __slots__ = ()
    key_type, tex_head = int, ""

    def _tex(self, printer):
        return r"{%s%s}_{%d}" % (self.tex_head, "'" if self.primed else "", self.key)


class QuantitySymbol(_Numbered):
    """Quantity ``key`` of the pairwise-Gaussian engine (an expectation)."""

    __slots__ = ()
    tex_head, prefix, text_format = "q", "q:", "q[{}]"


class CallArgumentSymbol(_Numbered):
    """Argument ``key`` of the kernel backend's expectation calls: an expression an
    expectation is evaluated at (a covariance summed over a window's taps), computed once as
    a value of its own."""

    __slots__ = ()
    tex_head, prefix, text_format = "a", "a:", "a[{}]"


class RowFeatureSymbol(_Numbered):
    """Row feature ``key`` of the kernel backend (a function of one input row)."""

    __slots__ = ()
    tex_head, prefix, text_format = "r", "rf:", "rf[{}]"


class GramSymbol(CompilerSymbol):
    """Gram entry m of the kernel backend (an inner product of the two input rows)."""

    __slots__ = ("m",)
    fields = ("m",)

    @staticmethod
    def _normalise(m):
        return (int(m),)

    @staticmethod
    def _display_name(m):
        return f"G:{m}"

    def _tex(self, printer):
        return "G_{%d}" % self.m

    def _text(self):
        return f"G[{self.m}]"


class ArgumentSymbol(CompilerSymbol):
    """The argument t of a one-variable function g(t) of the kernel engine."""

    __slots__ = ()

    @staticmethod
    def _display_name():
        return "arg:t"

    def _tex(self, printer):
        return "t"

    def _text(self):
        return self.name


class TemplateConstant(CompilerSymbol):
    """Constant k of an expectation *template* of the kernel engine (pairwise.py): a scalar
    (a quantity) renamed so that expectations of one structure share one derivation."""

    __slots__ = ("k",)
    fields = ("k",)

    @staticmethod
    def _normalise(k):
        return (int(k),)

    @staticmethod
    def _display_name(k):
        return f"tc:{k}"

    def _tex(self, printer):
        return "c_{%d}" % self.k

    def _text(self):
        return self.name


class LeafCovariance(CompilerSymbol):
    """Cov(leaf a at side sa, leaf b at side sb) inside an expectation template of the kernel
    engine (pairwise.py), a and b the keys of placeholder leaves; replaced by the covariance
    of the leaves a template is instantiated with."""

    __slots__ = ("a", "sa", "b", "sb")
    fields = ("a", "sa", "b", "sb")

    @staticmethod
    def _normalise(a, sa, b, sb):
        return str(a), int(sa), str(b), int(sb)

    @staticmethod
    def _display_name(a, sa, b, sb):
        return f"cov:{a}.{sa},{b}.{sb}"

    def _tex(self, printer):
        return r"C_{%s%s,%s%s}" % (self.a, "'" * self.sa, self.b, "'" * self.sb)

    def _text(self):
        return self.name


#: the order of two classes in sympy's canonical order (``compare``): looked up once per pair
_CLASS_ORDER: dict = {}
_BASIC_COMPARE = sp.Basic.compare


def compare(a: sp.Basic, b: sp.Basic) -> int:
    """``a.compare(b)``: sympy's canonical order of expressions (-1, 0, 1), by the same rules
    (the classes' order, then the lengths of their hashable contents, then the contents item
    by item), with the order of two classes looked up once per pair of classes (sympy finds
    each name in its list of classes at every comparison; sums and products of the kernel
    backend sort their terms by it, for a CNN per pair of positions).  A class with its own
    ``compare`` is asked itself."""
    if a is b:
        return 0
    ca, cb = a.__class__, b.__class__
    if ca.compare is not _BASIC_COMPARE:
        return a.compare(b)
    if ca is not cb:
        c = _CLASS_ORDER.get((ca, cb))
        if c is None:  # (sympy orders classes of different names apart, before their contents)
            c = _CLASS_ORDER[(ca, cb)] = 0 if ca.__name__ == cb.__name__ else _BASIC_COMPARE(a, b)
        if c:
            return c
    sa, sb = a._hashable_content(), b._hashable_content()
    if len(sa) != len(sb):
        return 1 if len(sa) > len(sb) else -1
    for x, y in zip(sa, sb):
        if isinstance(x, sp.Basic):
            c = compare(x, y)
        elif isinstance(x, frozenset):  # (as sympy: each side that is a frozenset made a Basic)
            c = sp.Basic(*x).compare(sp.Basic(*y) if isinstance(y, frozenset) else y)
        else:
            c = (x > y) - (x < y)
        if c:
            return c
    return 0


#: sympy's canonical order of a product's factors (the key Mul.flatten sorts them by)
FACTOR_ORDER = functools.cmp_to_key(compare)


def preorder(expr: sp.Basic, prune=None):
    """The subexpressions of ``expr``, each before its arguments (as sympy's
    preorder_traversal), each node's arguments in the order of its ``args``.  sympy's
    traversal reads a lattice operation's arguments (Max, Min, And, Or) from their frozenset
    ``_argset`` instead, in an order that follows the per-process hash seed, where their
    ``args`` are in sympy's sort order (``ordered``, at construction).  A choice made by the
    first subexpression that fits (a leaky relu Max(h, h/10) reads two forms of one Gaussian)
    is then the same in every run, and so are the generated code and its floats.
    ``prune(x)`` true: x's arguments are not visited."""
    stack = [expr]
    while stack:
        x = stack.pop()
        yield x
        if prune is None or not prune(x):
            stack.extend(reversed(x.args))


def outermost(expr: sp.Basic, types: tuple) -> list:
    """The distinct subexpressions of ``types`` in expr that are not inside one another, in
    the order of a preorder traversal (``preorder``): fixed by the expression, unlike the
    order of a set of atoms, which follows the per-process hash seed (the generated kernel
    source numbers the arguments it makes in this order, and must be the same in every run
    to hit the cache)."""
    found: dict = {}
    for sub in preorder(expr, prune=lambda x: isinstance(x, types)):
        if isinstance(sub, types):
            found.setdefault(sub, None)
    return list(found)


def larger_than(expr: sp.Basic, nodes: int) -> bool:
    """Whether the expression tree of ``expr`` (a shared subexpression once per occurrence)
    has more than ``nodes`` nodes, counted up to there."""
    return next(itertools.islice(preorder(expr), nodes, None), None) is not None


def monomial(*factors: sp.Expr) -> sp.Expr:
    """sp.Mul(*factors), built directly when the factors are commutative symbols or powers of
    symbols (numeric exponents) with distinct bases: sorted as Mul.flatten sorts them, which
    is the object it builds (flattening, with its power collection and assumptions, cost
    most of a CNN's kernel program: one product per pair of uses of each tap matrix, and
    one pair moment's Z^a Z^b' per pair of positions)."""
    bases = [f.base if f.is_Pow and f.exp.is_Number else f for f in factors]
    if len(factors) > 1 and len(set(bases)) == len(bases) and all(b.is_Symbol and b.is_commutative for b in bases):
        return sp.Mul._from_args(sorted(factors, key=FACTOR_ORDER))
    return sp.Mul(*factors)


def linear_coefficients(expr: sp.Expr, variables: list) -> list | None:
    """[c_k] when expr = sum_k c_k x_k over ``variables`` x_k (a polynomial of degree 1 in them
    without a constant term; the c_k are free of them), else None.

    Read term by term when every term is c x_k with c free of floats or a product of powers
    of the x_k (degree 2 or more: None); sympy's Poly otherwise.  A Poly of a Flatten readout's sum of P products
    m_b y_b is dense in its 2P variables: at 16 x 16 positions, 7 of the 15 s of the kernels'
    derivation."""
    if not variables:
        return None
    wanted = set(variables)
    found: dict = {}
    for term in sp.Add.make_args(expr):
        coefficient, x = _coefficient_and_variable(term, wanted) or term.as_independent(*variables, as_Add=False)
        if x in wanted:
            found.setdefault(x, []).append(coefficient)
        elif x.is_Mul and all(f in wanted or (f.is_Pow and f.base in wanted and f.exp.is_Integer and f.exp > 0)
                              for f in x.args):
            return None  # (a monomial of degree 2 or more: no term of another kind can cancel it)
        else:
            return _linear_coefficients_of_poly(expr, variables)
    if any(c.has(sp.Float) for cs in found.values() for c in cs):
        # (Poly's domain of floats gives its constant term as Float 0.0, which is != 0 in
        # sympy: such a sum has been read as not linear, and stays so)
        return _linear_coefficients_of_poly(expr, variables)
    return [sp.Add(*found[x]) if x in found else sp.S.Zero for x in variables]


def _coefficient_and_variable(term: sp.Expr, wanted: set):
    """(c, x) of a term x or c x, x in ``wanted`` and c a product of factors free of them, as
    ``term.as_independent(*wanted, as_Add=False)`` gives it (which makes a set of all the
    variables for every term: a shared bias's gradient sums one term per position); None
    for any other term."""
    if term in wanted:
        return sp.S.One, term
    if not (term.is_Mul and term.is_commutative):
        return None
    reading = [f for f in term.args if f in wanted]
    if len(reading) != 1:
        return None
    others = [f for f in term.args if f is not reading[0]]
    if any(not f.free_symbols.isdisjoint(wanted) for f in others):
        return None
    return sp.Mul(*others), reading[0]


def _linear_coefficients_of_poly(expr: sp.Expr, variables: list) -> list | None:
    """``linear_coefficients`` by sympy's Poly."""
    if not expr.is_polynomial(*variables):
        return None
    poly = sp.Poly(expr, *variables)
    if poly.total_degree() != 1 or poly.coeff_monomial(1) != 0:
        return None
    return [poly.coeff_monomial(x) for x in variables]


def Z(key: str, primed: bool = False) -> ZSymbol:
    """The symbol Z^key (Z^key(xi') if primed)."""
    return ZSymbol(key, primed)


def Zhat(key: str) -> ZHatSymbol:
    """The leaf ZHat of the MatMul node ``key``."""
    return ZHatSymbol(key)


def quantity(k: int) -> QuantitySymbol:
    """Quantity number k of the pairwise-Gaussian engine."""
    return QuantitySymbol(k)


def call_argument(k: int) -> CallArgumentSymbol:
    """Argument number k of the kernel backend's expectation calls."""
    return CallArgumentSymbol(k)


def row_feature(k: int, second: bool = False) -> RowFeatureSymbol:
    """Row feature number k (of the second input's row if ``second``)."""
    return RowFeatureSymbol(k, second)


def gram(m: int) -> GramSymbol:
    """Gram entry number m."""
    return GramSymbol(m)


#: The argument t of one-variable functions g(t) in the kernel engine.
ARG = ArgumentSymbol()


def is_primed(s: sp.Basic) -> bool:
    """Whether ``s`` is a symbol evaluated at the second input xi'."""
    return isinstance(s, CompilerSymbol) and s.primed


#: {(symbol, primed): its copy at that input}: ``primed``/``unprimed`` are asked a million
#: times in a CNN's derivation (every leaf of every template instance), and building the
#: symbol anew cost more than the lookup; cleared when it grows past _SIDE_COPIES_MAX.
_SIDE_COPIES: dict = {}
_SIDE_COPIES_MAX = 1 << 20


def _with_primed(s: CompilerSymbol, value: bool) -> CompilerSymbol:
    key = (s, value)
    hit = _SIDE_COPIES.get(key)
    if hit is None:
        if not isinstance(s, _Sided):
            raise TypeError(f"{s} has no copy at the second input")
        if len(_SIDE_COPIES) >= _SIDE_COPIES_MAX:
            _SIDE_COPIES.clear()
        hit = _SIDE_COPIES[key] = type(s)(s.key, value)
    return hit


def primed(s: CompilerSymbol) -> CompilerSymbol:
    """The copy of ``s`` at the second input xi' (``s`` itself if it is already primed)."""
    return s if is_primed(s) else _with_primed(s, True)


def unprimed(s: sp.Basic) -> sp.Basic:
    """The first-input version of ``s`` (``s`` itself when it is not primed)."""
    return _with_primed(s, False) if is_primed(s) else s


def is_z(s: sp.Basic) -> bool:
    return isinstance(s, ZSymbol)


def is_zhat(s: sp.Basic) -> bool:
    return isinstance(s, ZHatSymbol)


def is_leaf_variable(s: sp.Basic) -> bool:
    """Z or ZHat: a limit random variable."""
    return isinstance(s, _NodeVariable)


def is_quantity(s: sp.Basic) -> bool:
    return isinstance(s, QuantitySymbol)


def is_node(s: sp.Basic) -> bool:
    """A program variable (of either input)."""
    return isinstance(s, NodeSymbol)


def to_first_input(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every symbol of the second input replaced by its first-input version."""
    rep = {s: unprimed(s) for s in expr.free_symbols if is_primed(s)}
    return expr.xreplace(rep) if rep else expr


_UNION_OF_ARGUMENTS: dict = {}  # type -> whether its free_symbols is Basic's (``unions_its_arguments``)


def unions_its_arguments(kind: type) -> bool:
    """Whether the free symbols of an expression of type ``kind`` are those of its arguments
    (sympy's ``Basic.free_symbols``), not its own rule (a symbol, a bound variable's scope)."""
    union = _UNION_OF_ARGUMENTS.get(kind)
    if union is None:
        owner = next(k for k in kind.__mro__ if "free_symbols" in k.__dict__)
        union = _UNION_OF_ARGUMENTS[kind] = owner is sp.Basic
    return union


def free_symbols_of(expr: sp.Basic) -> set:
    """``expr.free_symbols``, collected by one walk over the tree: sympy builds a set per
    node and joins them up the tree, which for the NTK output of a CNN's kernel program (a
    sum of 41,000 products at 12 x 12 positions) took 0.6 s against 0.2 s."""
    found: set = set()
    stack = [expr]
    while stack:
        x = stack.pop()
        if not unions_its_arguments(type(x)):
            found |= x.free_symbols
        else:
            stack.extend(x.args)
    return found


def free_symbols(e: sp.Basic, memo: dict) -> frozenset:
    """e.free_symbols, memoised per subexpression in ``memo``: sympy walks the whole tree at
    every call, and the terms of a CNN's kernels share their calls (a pair of positions'
    expectations and cores), whose symbols are then collected once.  Types whose
    free_symbols is not sympy's union over the arguments (a symbol, a bound variable's
    scope) are asked themselves."""
    hit = memo.get(e)
    if hit is None:
        if not unions_its_arguments(type(e)):
            hit = frozenset(e.free_symbols)
        elif e.args:
            hit = frozenset().union(*[free_symbols(a, memo) for a in e.args])
        else:
            hit = frozenset()
        memo[e] = hit
    return hit
