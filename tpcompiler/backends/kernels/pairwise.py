"""Exact expectations of Gaussian-linear and pairwise-Gaussian programs (docs/DESIGN.md 2.7,
strategies 1 and 2): Z program -> a DAG of scalar *quantities*.

When every ZDot coefficient is a constant (always at initialisation in the kernel regime,
and for every program whose nonlinearities are linear), each Z^x is an explicit function of
the leaves (initial Gaussians and ZHats): its *form*, built by substituting forms of the
arguments into the recursion (MatMul resets to ZHat + ZDot).  An expectation E[P] of a
product of forms is computed by

1. expanding P into monomials; each factor is a one-variable function g of a linear form L
   of the leaves (a jointly Gaussian variable);
2. grouping factors into independent components (leaves of different blocks are
   independent: a ZHat family; a group of correlated initial vectors);
3. per component: Wick's theorem when every g is a polynomial (exact, any number of
   factors), else a one- or two-dimensional Gaussian expectation (more is refused);
4. covariances of linear forms: initial vectors from the program's covariance table; ZHats
   of one family Cov(ZHat^{Wx}, ZHat^{Wy}) = sigma^2 E[Z^x Z^y] -- a recursive quantity.

A template program over an input xi is evaluated for pairs of inputs (xi, xi'): leaves and
input coordinates that depend on the input carry a prime on the second side.  Quantities
are *row* quantities (functions of xi alone; the same function of xi' is the primed symbol)
or *pair* quantities (functions of both).  Input-dependent coefficients stay as expressions
in the input symbols; the code generator turns them into features (Gram matrices by BLAS).

Expectations of one structure are derived once (``templates``).  A term's leaves and
scalars are renamed to placeholders in a canonical order (shared.Skeletons: invariant under
renaming), keeping which leaves share a block and which depend on the input; the term's
expectation is derived once per renamed form, with each covariance of two placeholder leaves
left as a symbol (``LeafCovariance``), and every term of that form is the template with the
placeholders and covariances replaced by its own.  The expectation depends on the leaves only
through their blocks, sides and covariances, so this is exact; in a CNN the terms of every
pair of positions are a few templates (interior and boundary windows).

A product odd under negating an independent block of leaves has expectation 0; such products
are 0 before anything is derived for them (``_vanishes``; a Flatten readout's products of two
positions), and so are such terms when a product of sums is multiplied out
(``_expanded_without_odd_terms``).
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from functools import reduce
from math import prod

import networkx as nx
import sympy as sp
from sympy.core.function import Application

from tpcompiler import memory
from tpcompiler.ir import ops
from tpcompiler.ir.construct import replaced, rewrite
from tpcompiler.ir import symbols
from tpcompiler.ir.graph import Graph, ProgramError
from tpcompiler.ir.ops import VEC, node_symbol, unprime
from tpcompiler.ir.symbols import ZHatSymbol
from tpcompiler.ir.rules import RuleTable
from tpcompiler.backends.codegen import CacheUnavailable
from tpcompiler.backends.kernels.shared import UNSEEN, Skeletons, add_terms, float_value, product, substitute, sum_of_terms, term_sum, total
from tpcompiler.symbolic.master import Expectation, Z, Zhat, ZProgram, derive

T = symbols.ARG


class NotPairwise(ProgramError):
    """The program needs an expectation this strategy cannot do exactly."""


class E1(ops.DirectFunction):
    """E[g(L)] for L ~ N(0, var): E1(index, var); ``index`` names g in the engine's table."""

    nargs = 2
    is_real = True  # stated, as for TemplateCall: sympy asks them of every new call
    is_commutative = True


class E2(ops.DirectFunction):
    """E[g1(L1) g2(L2)] for a bivariate Gaussian: E2(index, k11, k12, k22)."""

    nargs = 4
    is_real = True
    is_commutative = True


@dataclass
class Quantity:
    """q := definition; ``pair`` if it depends on both inputs, else a row quantity."""

    symbol: sp.Symbol
    definition: sp.Expr
    pair: bool
    label: str = ""


#: The most distinct terms of a form, and pairs of terms of two forms, that ``_vanishes``
#: reads term by term (beyond them it relies on the parity of whole forms only).
_PARITY_TERMS = 256
_PARITY_PAIRS = 4096
#: The most terms ``_expanded_without_odd_terms`` enumerates (beyond: sympy's expand).
_EXPANSION_TERMS = 1 << 20

#: The two parts of the kernels (``scalar_terms``): the terms that read no covariance of a
#: vector with itself at the two inputs (``_coincident``), and those that do.
PARTS = ("apart", "coincident")

#: A Moment read by other instructions whose limit is a sum of more terms than this is read as a
#: row quantity of its own (``PairwiseEngine._moment_read``)
_NAMED_SUM_TERMS = 4

#: A template whose value is a sum of more terms than this is written out where it is used
#: (``PairwiseEngine._templated``), not called.
_CALL_TERMS = 4


class TemplateCall(ops.DirectFunction):
    """E[a product of one structure] at one instance: TemplateCall(k, *arguments) is the value
    of ``PairwiseEngine.templates_found[k]`` with its slots replaced by the arguments
    (``PairwiseEngine.instantiate``)."""

    # stated, not deduced: sympy asks these of every new call while building products, and
    # deducing them from the arguments dominated the derivation of a CNN's kernels
    is_real = True
    is_commutative = True


@dataclass
class Template:
    """The expectation of one structure of product (module docstring): ``value`` is an
    expression of the ``slots`` (TemplateConstants: scalars of the product; LeafCovariance
    symbols), which are the arguments of a TemplateCall in this order."""

    value: sp.Expr
    slots: list


@dataclass
class _Variant:
    """One canonical form of product (``PairwiseEngine._templated``) and its template: per
    canonical symbol its placeholder, the LeafCovariances the template reads, and which of
    the product's own slot values (constants, then covariances) is argument j."""

    placeholders: list
    covariances: list
    index: int
    order: list

    def __post_init__(self):
        #: the positions of the symbols that are not leaves, and per covariance (position of
        #: leaf a, side a, position of leaf b, side b): the same at every instance (``_instance``)
        self.constants = [k for k, ph in enumerate(self.placeholders) if isinstance(ph, symbols.TemplateConstant)]
        position = {symbols.unprimed(ph).key: k for k, ph in enumerate(self.placeholders)
                    if not isinstance(ph, symbols.TemplateConstant)}
        self.covariance_positions = [(position[c.a], c.sa, position[c.b], c.sb) for c in self.covariances]
        #: whether an instance is a TemplateCall (``_instance`` with ``call`` None), once known
        self.calls = None


@dataclass
class _Factor:
    g: sp.Expr          # function of T
    L: sp.Expr          # linear form in leaves (no constant term)
    side: int


@dataclass
class PairwiseEngine:
    """Builds quantity DAGs for expectations of a (template) program's forms."""

    graph: Graph
    zp: ZProgram = None
    quantities: dict = field(default_factory=dict)      # (ka, sa, kb, sb) of a product of forms -> Quantity
    functions: list = field(default_factory=list)       # index -> (g1, g2) or (g,)
    #: Param keys kept as symbols (the kernel's runtime arguments) instead of their values
    runtime: frozenset = frozenset()
    #: derive the expectation of each structure of term once (module docstring)
    templates: bool = True

    def __post_init__(self):
        if self.zp is None:
            self.zp = derive(self.graph)
        self._dependent = set(self.graph.input_dependent())
        self._forms: dict = {}
        self._factor_memo: dict = {}
        self._component_memo: dict = {}
        self._order: list[Quantity] = []
        self._fn_index: dict = {}
        self._params = {node_symbol(k): sp.Float(self.graph.op(k).value) for k in self.graph.keys_of(ops.Param)
                        if k not in self.runtime}
        self._params.update({node_symbol(k): sp.Float(self.graph.op(k).limit()) for k in self.graph.keys_of(ops.WidthPower)})
        self._inputs = {node_symbol(k) for k in self.graph.input_keys()}
        self._leaf_block = dict(self.zp.leaf_blocks)
        self._block_sizes = Counter(self._leaf_block.values())  # block -> the program's leaves in it (_TemplateKinds)
        self._skeletons = Skeletons(_TemplateKinds(self))
        self._variants: dict = {}
        self._leaf_cov_memo: dict = {}
        self._blocks_memo: dict = {}   # symbol -> its leaf's block or None (_block_of)
        self._variance_memo: dict = {} # ZHat -> its matrix's sigma^2 (_matrix_variance)
        self._scaled_memo: dict = {}   # (number, quantity) -> their product (_leaf_covariance)
        self._template_by_value: dict = {}
        self._written: dict = {}
        self._value_skeletons = Skeletons(_SlotKinds())
        #: Template k of every TemplateCall(k, ...) in the results (module docstring)
        self.templates_found: list[Template] = []
        self._placeholder_leaves: set = set()
        self._moment_memo: dict = {}
        self._moments_read: dict = {}     # _moment_read's
        self._in_forms: dict = {}         # (same_input, subexpression of a Moment) -> it in forms
        self._by_pairs_memo: dict = {}
        self._sides_memo: dict = {}
        self._linear_memo: dict = {}
        self._pair_memo: dict = {}
        self._form_canonical_memo: dict = {}
        self._form_ids_memo: dict = {}
        self._vanish_memo: dict = {}       # _vanishes'
        self._monomials_memo: dict = {}    # _monomials'
        self._leaves_memo: dict = {}       # _leaves_by_block's
        self._instances: dict = {}
        self._expectation_templates: dict = {}
        self._constant_memo: dict = {}     # _constant_scalar's
        self._coefficient_memo: dict = {}  # _moment_coefficient's
        self._moment_symbols: dict = {}    # _is_moment's
        self._vector_symbols: dict = {}    # _is_vector_symbol's
        self._quantity_keys: dict = {}     # a quantity's symbol -> its key in ``quantities``
        self._coincident_memo: dict = {}   # id(expression) -> (_coincident's answer, expression)
        self._factor_part_memo: dict = {}  # factor -> _factor_part's answer
        self._factor_terms_memo: dict = {} # (factor, same_input) -> _factor_terms' answer
        # the pair path's symbols as integers (``_symbol_ids``): dicts keyed by small ints and
        # tuples of them, not by sympy objects, whose hash and equality are Python calls
        self._ids: dict = {}              # symbol -> its id
        self._id_symbols: list = []       # id -> symbol
        self._id_unprimed: list = []      # id -> the id of its first-input version
        self._id_block: list = []         # id -> its leaf's block as a number, -1 for no leaf
        self._id_number: list = []        # id -> whether the symbol is a number (sympy's is_number)
        self._block_numbers: dict = {}    # block -> its number
        #: (id a, side a, id b, side b) of first-input leaves -> (_leaf_cov, whether it is a number)
        self._cov_by_ids: dict = {}

    # -- symbols and sides ----------------------------------------------------------------
    def _is_leaf(self, s: sp.Symbol) -> bool:
        """A leaf (Z of an initial vector or a ZHat) of either input."""
        return self._block_of(s) is not None

    def _input_dependent(self, s: sp.Symbol) -> bool:
        """Whether the first-input symbol ``s`` changes with the input: an input coordinate,
        a leaf of an input-dependent node, or a quantity (row quantities are per input)."""
        return (s in self._inputs or (s in self._leaf_block and s.key in self._dependent)
                or symbols.is_quantity(s))

    def _is_moment(self, s: sp.Symbol) -> bool:
        """A first-input program variable that is a Moment of the graph (memoised: asked of
        every factor of every output term)."""
        if not s.is_Symbol:  # (not memoised: the factors asked include large sums)
            return False
        found = self._moment_symbols.get(s)
        if found is None:
            found = self._moment_symbols[s] = (symbols.is_node(s) and not s.primed and s.key in self.graph.g
                                               and isinstance(self.graph.op(s.key), ops.Moment))
        return found

    def to_side(self, expr: sp.Expr, side: int) -> sp.Expr:
        """A side-0 expression evaluated at the second input: prime every input-dependent
        leaf, input coordinate and row quantity, and move first-input InputCov atoms to the
        second input."""
        if side == 0:
            return expr
        rep = {}
        for s in expr.free_symbols:
            if not symbols.is_primed(s) and self._input_dependent(s):
                rep[s] = symbols.primed(s)
        # an input-layer covariance of the first input (a Moment's limit, e.g. a LayerNorm's
        # variance E[Z^h Z^h]) is taken at the second input on both of its sides
        rep.update({c: ops.input_cov(c.args[0], c.args[1], 1, 1) for c in expr.atoms(ops.InputCov)
                    if c.args[2] == 0 and c.args[3] == 0})
        return replaced(expr, rep)

    # -- forms --------------------------------------------------------------------------
    def form(self, key: str) -> sp.Expr:
        """Z^key as an expression of leaves (side 0), parameters substituted."""
        if key in self._forms:
            return self._forms[key]
        f = FORMS(self.graph.op(key))(self, key, self.zp.entries[key])
        self._forms[key] = f
        return f

    def _side_form(self, key: str, side: int) -> sp.Expr:
        """``to_side(form(key), side)``, memoised."""
        memo = self._forms.get((key, side))
        if memo is None:
            memo = self._forms[(key, side)] = self.to_side(self.form(key), side)
        return memo

    def _nonlin_form(self, key: str, e) -> sp.Expr:
        """phi(forms of the arguments), scalars by value."""
        sub = {Z(a): self.form(a) for a in self.graph.vector_args(key)}
        sub.update(self._scalar_values(e.z))
        return replaced(e.z, sub)

    def _matmul_form(self, key: str, e) -> sp.Expr:
        """ZHat^{Wx} + sigma^2 sum_y E[d form(x)/dZHat^{W^T y}] form(y), expectations exact."""
        f = Zhat(key)
        mat = self.graph.matmul_parts(key)[0]
        s2 = self.graph.op(mat).sigma ** 2
        for t in self.zp.zdot_terms(key):
            coef = s2.xreplace(self._params) * self.expect(sp.diff(self.form(e.x), Zhat(t.source)))
            f = f + coef * self.form(t.y)
        return f

    def _scalar_values(self, expr: sp.Expr) -> dict:
        """Parameters by value, Moments by their exact limit (row quantities)."""
        rep = {}
        for s in _ordered(expr.free_symbols):  # quantities are numbered as they are met
            if s in self._params:
                rep[s] = self._params[s]
            elif self._is_moment(s):
                rep[s] = self._moment_read(s.key)
        return rep

    def _moment_read(self, key: str) -> sp.Expr:
        """A Moment's exact limit as the instructions that read it see it: its value, or, when
        that is a sum of more than _NAMED_SUM_TERMS terms of the first input, a row quantity
        defined as that sum (memoised).  A LayerNorm over positions reads its mean in every
        position's vector and in its variance: substituted as a sum over the positions, the
        variance's square of it and every form that reads both grew with the square of the
        positions, for each position."""
        found = self._moments_read.get(key)
        if found is None:
            found = self.moment(key)
            if found.is_Add and len(found.args) > _NAMED_SUM_TERMS and self._sides(found) == {0}:
                found = self._new_quantity(("moment", key), found, False, f"E[{key}]")
            self._moments_read[key] = found
        return found

    def moment(self, key: str, same_input: bool = False) -> sp.Expr:
        """The exact limit of a Moment (pair moments: a function of both inputs; with
        ``same_input`` a pair moment is evaluated at xi' = xi, e.g. a kernel's diagonal),
        memoised (the NNGP and the NTK read the same moments)."""
        memo = self._moment_memo.get((key, same_input))
        if memo is None:
            by_pairs = self._moment_by_pairs(key, same_input)
            memo = self._in_instruction(key, lambda: self._moment_of_forms(key, same_input) if by_pairs is None
                                        else sum_of_terms(by_pairs))
            self._moment_memo[(key, same_input)] = memo
        return memo

    def _in_instruction(self, key: str, compute):
        """``compute()``, a refusal (NotPairwise) from it naming the Moment ``key`` whose limit
        was being derived: the innermost one, as the expectation refused is written in the
        template's placeholders, not in the program's names."""
        try:
            return compute()
        except NotPairwise as exc:
            if getattr(exc, "instruction", None) is not None:
                raise
            named = NotPairwise(f"instruction {key!r} := mean({sp.sstr(self.graph.op(key).expr)}): {exc}")
            named.instruction = key
            raise named from None

    def moment_terms(self, key: str, same_input: bool = False, part: str = "all") -> dict:
        """``moment`` as a term sum (``shared.add_terms``): by pairs without forming the sum
        (a pooled moment's P^2 terms; the memoised dict itself, to be read, not changed).
        ``part``: the pairs of vectors of one part only (``_pair_part``; a moment by pairs)."""
        by_pairs = self._moment_by_pairs(key, same_input, part)
        if by_pairs is None:
            assert part == "all", "a moment's pairs of vectors are split between the parts only if it has pairs"
            return term_sum(self.moment(key, same_input))
        return by_pairs

    def _moment_by_pairs(self, key: str, same_input: bool, part: str = "all"):
        """E[psi] as a term sum (memoised), by linearity when psi is a sum of products of two
        vectors with numeric coefficients, each vector a numeric linear combination of program vectors
        (``_linear_nodes``): E[(sum_k c_k v_k)(sum_l d_l w_l)] = sum_kl c_k d_l E[v_k w_l],
        one expectation per pair of vectors, shared between moments (``_pair_moment``).  A
        pooled vector's moment is then P^2 expectations of one structure, not the expansion
        of a product of two P-term forms.  None if psi is not of that shape.  ``part``: only
        the pairs of that part (``_pair_part``)."""
        memo_key = (key, same_input, part)
        if memo_key in self._by_pairs_memo:
            return self._by_pairs_memo[memo_key]
        value = self._by_pairs_memo[memo_key] = self._in_instruction(key, lambda: self._new_moment_by_pairs(key, same_input, part))
        return value

    def _new_moment_by_pairs(self, key: str, same_input: bool, part: str):
        op = self.graph.op(key)
        vectors = self._two_vectors(op.expr)
        if vectors is not None:  # (the general case below, read for this one: its terms at scale 1)
            return self._pair_terms(vectors[0], vectors[1], 1.0, same_input, {}, part)
        expr = op.expr.xreplace(self._params)
        factors = sp.Mul.make_args(expr)
        if any(_function_of_variables(f) for f in factors):
            return None  # (every term of its expansion keeps that function: not two vectors)
        if not all(f.is_Symbol or f.is_Number or (f.is_Pow and f.base.is_Symbol and f.exp.is_Integer)
                   for f in factors):
            expr = sp.expand(expr)  # (a product of symbols, a pair moment's Z^a Z^b', is expanded already)
        terms: dict = {}
        for term in sp.Add.make_args(expr):
            vectors, coef = [], sp.S.One
            for f in sp.Mul.make_args(term):
                base, exp = f.as_base_exp()
                if base.is_Symbol and symbols.is_node(base) and self.graph.kind(unprime(base)[0]) == VEC \
                        and exp.is_Integer and exp > 0:
                    vectors += [base] * int(exp)
                elif f.is_number:
                    coef *= f
                else:
                    return None
            if len(vectors) != 2:
                return None
            self._pair_terms(vectors[0], vectors[1], float_value(coef), same_input, terms, part)
        return terms

    def _pair_terms(self, a: sp.Symbol, b: sp.Symbol, scale: float, same_input: bool, terms: dict,
                    part: str = "all") -> dict:
        """Add scale * E[Z^a Z^b] to ``terms`` (``_moment_by_pairs``) for the program vectors'
        symbols a and b (primed: at the second input, unless ``same_input``), by linearity
        over their ``_linear_nodes``; ``part``: only the pairs of nodes of that part
        (``_pair_part``, decided at the two inputs whatever ``same_input``)."""
        (ka, pa), (kb, pb) = unprime(a), unprime(b)
        sa, sb = int(pa and not same_input), int(pb and not same_input)
        nodes_b = [(nb, float_value(cb)) for nb, cb in self._linear_nodes(kb)]
        for na, ca in self._linear_nodes(ka):
            scale_a = scale * float_value(ca)
            for nb, cb in nodes_b:
                if part == "all" or self._pair_part(na, int(pa), nb, int(pb)) == part:
                    add_terms(terms, self._pair_moment(na, sa, nb, sb), scale_a * cb)
        return terms

    def _two_vectors(self, expr: sp.Expr):
        """(a, b) when ``expr`` is the product Z^a Z^b of two program vectors' symbols (or the
        square of one), the pair moments ntk.py makes, else None: ``_new_moment_by_pairs``
        reads them without substituting Params or classifying factors (it does for one
        Moment per pair of positions and layer)."""
        if expr.is_Mul and len(expr.args) == 2:
            a, b = expr.args
        elif expr.is_Pow and expr.exp.is_Integer and expr.exp == 2:
            a = b = expr.base
        else:
            return None
        return (a, b) if self._is_vector_symbol(a) and self._is_vector_symbol(b) else None

    def _is_vector_symbol(self, s: sp.Basic) -> bool:
        """Whether s is a program vector's symbol (either input), memoised."""
        if not s.is_Symbol:
            return False
        found = self._vector_symbols.get(s)
        if found is None:
            found = self._vector_symbols[s] = bool(symbols.is_node(s) and self.graph.kind(unprime(s)[0]) == VEC)
        return found

    def _linear_nodes(self, key: str) -> tuple:
        """Z^key as ((node, coefficient), ...) with Z^key = sum coefficient * Z^node: through
        Nonlins that are linear in their vectors with numeric coefficients (a pooling, a sum
        of branches), else ((key, 1),).  Memoised."""
        memo = self._linear_memo.get(key)
        if memo is not None:
            return memo
        memo = ((key, sp.S.One),)
        if isinstance(self.graph.op(key), ops.Nonlin):
            args = list(self.graph.vector_args(key))
            z = self.zp.entries[key].z.xreplace(self._params)
            zs = [Z(a) for a in args]
            coefficients = symbols.linear_coefficients(z, zs) if z.free_symbols <= set(zs) else None
            if coefficients is not None:
                found: dict = {}
                for a, c in zip(args, coefficients):
                    if c != 0:
                        for node, cn in self._linear_nodes(a):
                            found[node] = found.get(node, sp.S.Zero) + c * cn
                memo = tuple((n, c) for n, c in found.items() if c != 0)
        self._linear_memo[key] = memo
        return memo

    def _pair_moment(self, ka: str, sa: int, kb: str, sb: int) -> sp.Expr:
        """E[Z^ka at side sa times Z^kb at side sb], memoised in either order."""
        key = min((ka, sa, kb, sb), (kb, sb, ka, sa))
        value = self._pair_memo.get(key)
        if value is None:
            memory.tick()
            value = self._pair_memo[key] = self._expect_pair(*key)
        return value

    def _expect_pair(self, ka: str, sa: int, kb: str, sb: int) -> sp.Expr:
        """``expect(form ka at side sa * form kb at side sb)``, with the product's template
        found from the two forms' canonical forms (memoised per form) instead of the
        product's: the structure of each form and which of their symbols coincide determine
        the product up to renaming, so products of one such key (a CNN's pairs of positions)
        share one template without building or canonicalising each product."""
        def product_of_forms():
            return self._side_form(ka, sa) * self._side_form(kb, sb)

        if not self.templates:
            return self.expect(product_of_forms())
        if self._vanishes(ka, sa, kb, sb):
            return sp.S.Zero
        (struct_a, ids_a), (struct_b, ids_b) = self._form_ids(ka, sa), self._form_ids(kb, sb)
        ids = ids_a + ids_b
        position: dict = {}
        for n in ids:  # the symbols in order of first occurrence, numbered
            if n not in position:
                position[n] = len(position)
        names = list(position)
        id_block = self._id_block
        if all(id_block[n] < 0 for n in names):
            return self.expect(product_of_forms())
        blocks: dict = {}
        signature = tuple(-1 if (b := id_block[n]) < 0 else blocks.setdefault(b, len(blocks)) for n in names)
        key = ("pair", struct_a, struct_b, tuple([position[n] for n in ids]), signature)
        variant = self._variants.get(key)
        if variant is None:  # the product is built only for the first pair of its key
            symbols_ = self._id_symbols
            variant = self._variants[key] = self._variant(product_of_forms(), [symbols_[n] for n in names], signature,
                                                          self.expect_direct)
        return self._pair_instance(variant, names)

    def _vanishes(self, ka: str, sa: int, kb: str, sb: int) -> bool:
        """Whether E[Z^ka at side sa times Z^kb at side sb] = 0 is proven by symmetry, without
        deriving the expectation or creating a quantity (memoised in either order).

        The leaves of an independent block are jointly Gaussian with mean 0 at both inputs
        and independent of the other blocks, so negating all of them leaves the law of every
        leaf unchanged: a product odd under that negation has expectation 0 (the ZProgram's
        ``provably_uncorrelated``, parity of whole forms).  Term by term (``_monomials``:
        sums of leaves distributed), a term of the product is 0 if it has an odd number of
        factors of such a block outside functions and none inside one.  A ZHat family's
        leaves in the two forms are independent of each other (split, ``_block_split``)
        when every covariance between them, sigma^2 E[Z^x Z^y], is itself proven to vanish,
        and then the two halves are such blocks of their own.  A convolution's backward
        vectors at different positions under a Flatten readout: every tap's ZHat at one
        position against every tap's at another reads the readout's independent vectors
        of two positions, so the P^2 - P products of different positions are 0 without a
        derivation each.

        The proof does not depend on the sides: negating a block negates its leaves at both
        inputs, the parities and blocks of a form are those of its other side's (``to_side``
        renames leaves), and a split asks the same of earlier vectors.  So it is memoised per
        pair of nodes: the NTK's terms ask it at sides (0, 0), (0, 1) and (1, 0), three
        proofs of one fact (a Flatten CNN's backward vectors of neighbouring positions, whose
        windows share readout vectors but not taps: 2-D 32 x 32, 76,000 proofs, 7 s)."""
        key = (ka, kb) if ka <= kb else (kb, ka)
        found = self._vanish_memo.get(key)
        if found is None:
            found = self._vanish_memo[key] = self._proven_zero(*min((ka, sa, kb, sb), (kb, sb, ka, sa)))
        return found

    def _proven_zero(self, ka: str, sa: int, kb: str, sb: int) -> bool:
        """``_vanishes`` of a normalised pair (at any sides), not memoised."""
        if self.zp.provably_uncorrelated(ka, kb):
            return True
        form_a, form_b = self._monomials(ka, sa), self._monomials(kb, sb)
        if form_a is None or form_b is None:
            return False
        split: dict = {}  # block -> whether its leaves in the two forms are independent halves

        def term_vanishes(term_a: tuple, term_b: tuple) -> bool:
            (odd_a, inside_a), (odd_b, inside_b) = term_a, term_b
            return (any(b not in inside_a and b not in inside_b for b in odd_a ^ odd_b)
                    or any(b not in inside_a and self._block_split(b, ka, sa, kb, sb, split) for b in odd_a)
                    or any(b not in inside_b and self._block_split(b, ka, sa, kb, sb, split) for b in odd_b))

        (terms_a, odd_a, inside_a), (terms_b, odd_b, inside_b) = form_a, form_b
        by_odd: dict = {}
        for term in terms_b:
            by_odd.setdefault(term[0], []).append(term)
        # terms odd in the same blocks first: where the product does not vanish, one of them
        # usually shows it at once
        if not all(term_vanishes(a, b) for a in terms_a for b in by_odd.get(a[0], ())):
            return False
        if not (odd_a | odd_b) & (inside_a | inside_b):
            return True  # the other pairs of terms: a block odd in one, read by neither otherwise
        if len(terms_a) * len(terms_b) > _PARITY_PAIRS:
            return False
        return all(term_vanishes(a, b) for a in terms_a for b in terms_b)

    def _block_split(self, block: str, ka: str, sa: int, kb: str, sb: int, split: dict) -> bool:
        """Whether the leaves of ZHat family ``block`` in the form of ka at sa and in the
        form of kb at sb are independent of each other: every covariance between them,
        sigma^2 E[Z^x Z^y] of their vectors x and y, proven to vanish (``_vanishes``).  False
        for an initial block (a covariance table, input layers) or a block one form lacks;
        memoised in ``split`` for one pair of forms."""
        found = split.get(block)
        if found is None:
            leaves_a, leaves_b = self._leaves_by_block(ka, sa).get(block), self._leaves_by_block(kb, sb).get(block)
            found = bool(leaves_a and leaves_b and block.startswith("family:")) and all(
                self._vanishes(self.zp.entries[la].x, side_a, self.zp.entries[lb].x, side_b)
                for la, side_a in leaves_a for lb, side_b in leaves_b)
            split[block] = found
        return found

    def _leaves_by_block(self, key: str, side: int) -> dict:
        """{block: {(leaf's node, side)}} of the leaves of the form of ``key`` at ``side``,
        memoised."""
        memo = self._leaves_memo.get((key, side))
        if memo is None:
            memo = {}
            for s in self._side_form(key, side).free_symbols:
                block = self._block_of(s)
                if block is not None:
                    memo.setdefault(block, set()).add((symbols.unprimed(s).key, int(symbols.is_primed(s))))
            self._leaves_memo[(key, side)] = memo
        return memo

    def _monomials(self, key: str, side: int):
        """The form of ``key`` at ``side`` as (the distinct (odd, inside) of its terms, the
        union of their odd sets, that of their inside sets), with every factor that is a sum
        of scaled leaves distributed: ``odd`` the blocks with an odd number of leaf factors
        outside functions, ``inside`` the blocks of leaves inside any other factor (a
        function, a power of a sum), whose parity is not known; None for more than
        _PARITY_TERMS terms.  Memoised."""
        memo = self._monomials_memo.get((key, side), UNSEEN)
        if memo is not UNSEEN:
            return memo
        block_of = self._block_of
        out: set = set()
        for term in sp.Add.make_args(self._side_form(key, side)):
            rest, sums = [], []  # the factors, and the blocks of the terms of those that are sums of scaled leaves
            for f in sp.Mul.make_args(term):
                blocks = [_scaled_leaf_block(a, block_of) for a in f.args] if f.is_Add else None
                if blocks is not None and all(b is not UNSEEN for b in blocks):
                    sums.append(blocks)
                else:
                    rest.append(f)
            odd, inside = self._parity_parts(rest, {})
            choices = {odd}
            for blocks in sums:
                choices = {c if b is None else c ^ {b} for c in choices for b in blocks}
                if len(choices) > _PARITY_TERMS:
                    self._monomials_memo[(key, side)] = None
                    return None
            out.update((c, inside) for c in choices)
            if len(out) > _PARITY_TERMS:
                out = None
                break
        if out is not None:
            out = (tuple(out), frozenset().union(*(odd for odd, _ in out)),
                   frozenset().union(*(inside for _, inside in out)))
        memo = self._monomials_memo[(key, side)] = out
        return memo

    def _form_ids(self, key: str, side: int) -> tuple:
        """(structure, ids of its symbols) of ``_form_canonical(key, side)``, memoised."""
        memo = self._form_ids_memo.get((key, side))
        if memo is None:
            structure, names = self._form_canonical(key, side)
            memo = self._form_ids_memo[(key, side)] = (structure, tuple(self._symbol_ids(names)))
        return memo

    def _symbol_ids(self, names: list) -> list:
        """The ids of symbols of forms (leaves and scalars of program nodes, never a template's
        placeholders), each symbol numbered when first met, with what the pair path reads of
        it: its first-input version's id, its leaf's block (numbered) and whether it is a
        number."""
        out = []
        for s in names:
            i = self._ids.get(s)
            if i is None:
                u = symbols.unprimed(s)
                first_input = None if u is s else self._symbol_ids([u])[0]  # (numbered first)
                block = self._block_of(s)
                # a block never changes once numbered: only a template's placeholders become leaves later
                assert u not in self._placeholder_leaves
                i = self._ids[s] = len(self._id_symbols)
                self._id_symbols.append(s)
                self._id_block.append(-1 if block is None else self._block_numbers.setdefault(block, len(self._block_numbers)))
                self._id_number.append(bool(s.is_number))
                self._id_unprimed.append(i if first_input is None else first_input)
            out.append(i)
        return out

    def _pair_instance(self, variant: _Variant, names: list) -> sp.Expr:
        """``_instance(variant, symbols of names, None)`` for the ids ``names`` of a product of two
        forms (``_expect_pair``): the same expression, its leaves' covariances looked up by ids."""
        template = self.templates_found[variant.index]
        if not template.slots or template.value.is_Number:
            return template.value
        id_symbols, id_unprimed, id_number = self._id_symbols, self._id_unprimed, self._id_number
        own = [id_symbols[names[k]] for k in variant.constants]
        numbers = all(id_number[names[k]] for k in variant.constants)
        by_ids = self._cov_by_ids
        for ka, sa, kb, sb in variant.covariance_positions:
            key = (id_unprimed[names[ka]], sa, id_unprimed[names[kb]], sb)
            found = by_ids.get(key)
            if found is None:
                value = self._leaf_cov(id_symbols[key[0]], sa, id_symbols[key[2]], sb)
                found = by_ids[key] = (value, bool(value.is_number))
            own.append(found[0])
            numbers = numbers and found[1]
        return self._at_arguments(variant, [own[i] for i in variant.order], None, numbers)

    def _signature(self, names: list) -> tuple:
        """Per symbol of a product (in ``names``' order) the number of its leaf's block, blocks
        numbered as first met, or -1 for a scalar: which leaves of a template are correlated."""
        blocks: dict = {}
        block_of = self._block_of
        return tuple(-1 if (b := block_of(n)) is None else blocks.setdefault(b, len(blocks)) for n in names)

    def _block_of(self, s: sp.Basic):
        """The block of the leaf ``s`` (of either input), None if ``s`` is no leaf; memoised
        (asked for every symbol of every template instance)."""
        found = self._blocks_memo.get(s, UNSEEN)
        if found is UNSEEN:
            found = self._blocks_memo[s] = self._leaf_block.get(symbols.unprimed(s))
        return found

    def _form_canonical(self, key: str, side: int) -> tuple:
        """``Skeletons.canonical`` of the form of ``key`` at ``side``, memoised."""
        memo = self._form_canonical_memo.get((key, side))
        if memo is None:
            memo = self._form_canonical_memo[(key, side)] = self._skeletons.canonical(self._side_form(key, side))
        return memo

    def _moment_of_forms(self, key: str, same_input: bool) -> sp.Expr:
        """E[psi(forms of the moment's vectors)].  psi's subexpressions are written in forms
        once for all moments (``rewrite``'s memo, per ``same_input``: a symbol's form or
        value is the same in every moment): an RNN's phi(h_s) is read by a moment per step t,
        and rebuilding phi(form of h_s), a function of a sum of O(s) terms, for each was most
        of the moments' derivation."""
        op = self.graph.op(key)
        sub = {}
        for s in _ordered(op.expr.free_symbols):
            k, primed = unprime(s)
            side = 1 if primed and not same_input else 0
            if self.graph.kind(k) == VEC:
                sub[s] = self._side_form(k, side)
            else:
                val = self._scalar_values(node_symbol(k)).get(node_symbol(k), node_symbol(k))
                sub[s] = self.to_side(val, side)
        return self.expect(rewrite(op.expr, sub.get, self._in_forms.setdefault(same_input, {})))

    def scalar(self, expr: sp.Expr, same_input: bool = False) -> sp.Expr:
        """A scalar expression with Moments by their exact limits and Params by value
        (``same_input``: pair moments on the diagonal xi' = xi); the kernels' outputs are
        taken term by term (``scalar_terms``)."""
        expr = sp.sympify(expr)
        rep = self._scalar_values(expr)
        if same_input:
            rep.update({s: self.moment(s.key, True) for s in _ordered(expr.free_symbols) if self._is_moment(s)})
            rep.update({s: symbols.unprimed(s) for s in expr.free_symbols if symbols.is_primed(s)})
            rep.update({c: ops.input_cov(c.args[0], c.args[1], 0, 0) for c in expr.atoms(ops.InputCov)})
        return replaced(expr, rep)

    def scalar_terms(self, expr: sp.Expr, same_input: bool = False, part: str = "all") -> dict:
        """``scalar(expr)`` as a term sum (``shared.add_terms``), built term by term: a term
        of ``expr`` with one factor whose value is a sum (a pooled moment, P^2 expectations)
        contributes that sum's terms times the other factors, without forming the product of
        the number and the sum (which rebuilds every one of its terms); any other term is one
        term of the result.

        ``part`` ("all", "apart" or "coincident"): only the terms of that part (``_term_part``),
        decided at the two inputs whatever ``same_input``, so that the two parts at the two
        inputs sum to the whole and the "coincident" part at one input is that part at xi' = xi
        (the kernels' diagonal, module docstring)."""
        out: dict = {}
        for term in sp.Add.make_args(sp.sympify(expr)):
            coef, rest = term.as_coeff_Mul()
            factors = sp.Mul.make_args(rest)
            if self.templates and len(factors) > 1 and any(self._moment_vanishes(f, same_input) for f in factors):
                continue  # (before its other factors are derived: an NTK term's forward moment)
            split = None  # the factor whose pairs of vectors are split between the parts
            if part != "all":
                which = self._term_part(factors)
                if isinstance(which, str):
                    if which != part:
                        continue
                else:
                    split = which
            sums = [self.moment_terms(f.key, same_input, part if k == split else "all") if self._is_moment(f)
                    else self._factor_terms(f, same_input) for k, f in enumerate(factors)]
            if not all(sums):
                continue  # a factor is zero (an empty term sum)
            long = [k for k, s in enumerate(sums) if len(s) > 1]
            if len(long) > 1:  # a product of sums stays one term, as scalar() leaves it
                add_terms(out, sp.Mul(*[sum_of_terms(s) for s in sums]), float_value(coef))
                continue
            k = long[0] if long else 0
            scale, others = float_value(coef), []
            for j, s in enumerate(sums):
                if j != k:
                    (t, c), = s.items()
                    scale = scale * c
                    others.extend(sp.Mul.make_args(t))
            for t, c in sums[k].items():  # t times the others, built directly (shared.product)
                add_terms(out, product(1.0, [*sp.Mul.make_args(t), *others]) if others else t, scale * c)
        return out

    def _moment_vanishes(self, f: sp.Expr, same_input: bool) -> bool:
        """Whether ``f`` is a Moment E[Z^a Z^b] of two program vectors, neither a combination of
        several (``_linear_nodes``), that vanishes by symmetry (``_vanishes``): an NTK term
        E[dh_i dh_j'] E[x_k x_l'] is then skipped before its forward moment is derived."""
        if not self._is_moment(f):
            return False
        vectors = self._two_vectors(self.graph.op(f.key).expr)
        if vectors is None:
            return False
        (ka, pa), (kb, pb) = unprime(vectors[0]), unprime(vectors[1])
        nodes_a, nodes_b = self._linear_nodes(ka), self._linear_nodes(kb)
        return (len(nodes_a) == 1 and len(nodes_b) == 1
                and self._vanishes(nodes_a[0][0], int(pa and not same_input), nodes_b[0][0], int(pb and not same_input)))

    def _term_part(self, factors: tuple):
        """Which part of the kernels a term, the product of ``factors``, belongs to at the two
        inputs: "apart" if no factor's value reads a coincident covariance (``_coincident``),
        else the index of its one factor that is a moment by pairs of vectors with pairs of
        both parts when the others are "apart" (the term is split pair by pair: a pooled
        readout's E[Z^p Z^q'] with p = q or not), else "coincident"."""
        parts = [self._factor_part(f) for f in factors]
        mixed = [k for k, p in enumerate(parts) if p == "mixed"]
        if all(p == "apart" for p in parts):
            return "apart"
        if len(mixed) == 1 and all(p == "apart" for k, p in enumerate(parts) if k != mixed[0]):
            return mixed[0]
        return "coincident"

    def _factor_part(self, f: sp.Expr) -> str:
        """"apart", "coincident" or, for a moment by pairs of vectors with pairs of both parts
        (``_pair_part``), "mixed": whether a factor of an output's term reads a coincident
        covariance at the two inputs.  Memoised."""
        found = self._factor_part_memo.get(f)
        if found is None:
            # (a moment is by pairs if its first part is: the sum of all its pairs, which the
            # two parts replace in the kernels, is not built)
            apart = self._moment_by_pairs(f.key, False, "apart") if self._is_moment(f) else None
            if apart is not None:
                coincident = self._moment_by_pairs(f.key, False, "coincident")
                found = "mixed" if apart and coincident else "coincident" if coincident else "apart"
            else:
                value = self.moment_terms(f.key) if self._is_moment(f) else self._factor_terms(f, False)
                found = "coincident" if any(self._coincident(t) for t in value) else "apart"
            self._factor_part_memo[f] = found
        return found

    def _pair_part(self, ka: str, sa: int, kb: str, sb: int) -> str:
        """"coincident" if E[Z^ka at side sa times Z^kb at side sb] reads a coincident
        covariance (``_coincident``), else "apart"."""
        return "coincident" if self._coincident(self._pair_moment(ka, sa, kb, sb)) else "apart"

    def _coincident(self, e: sp.Basic) -> bool:
        """Whether a value at the two inputs reads the covariance of a vector with itself at
        the two inputs: an input layer's InputCov(a, a, 0, 1), or a pair quantity E[Z^a Z^a']
        or one whose definition reads such a covariance.  At xi' = xi such a covariance is the
        variance it is compared with, computed by other arithmetic; an expectation with a
        square-root singularity at rho = 1 (arccos) turns their last-bit difference into an
        error of ~1e-8, so the kernels' diagonal takes such terms from the row stage (kernel.py's
        module docstring).  Memoised per object (the values share their quantities and calls)."""
        memo = self._coincident_memo
        hit = memo.get(id(e))
        if hit is not None:
            return hit[0]
        if isinstance(e, ops.InputCov):
            a, b, pa, pb = e.args
            found = a == b and pa != pb
        elif e.is_Symbol:
            key = self._quantity_keys.get(e)
            found = key is not None and self.quantities[key].pair and (
                (key[0] == key[2] and key[1] != key[3]) or self._coincident(self.quantities[key].definition))
        else:
            found = any(self._coincident(a) for a in e.args)
        memo[id(e)] = (found, e)  # e kept alive, so its id is not reused
        return found

    def _factor_terms(self, f: sp.Expr, same_input: bool) -> dict:
        """``_new_factor_terms``, memoised (``scalar_terms`` reads a factor once per part;
        the memoised dict itself, to be read, not changed)."""
        key = (f, same_input)
        found = self._factor_terms_memo.get(key)
        if found is None:
            found = self._factor_terms_memo[key] = self._new_factor_terms(f, same_input)
        return found

    def _new_factor_terms(self, f: sp.Expr, same_input: bool) -> dict:
        """A factor of an output's term (not a Moment) as a term sum for ``scalar_terms``.  A
        sum of Moments whose values are single terms (ntk.py's sum over the pairs of uses
        that share a gradient pair, a convolution's taps) is kept one term, whose value is
        that sum: the output's term stays one product per pair of positions."""
        if f.is_Add:
            terms = []
            for t in f.args:
                moments = [g for g in sp.Mul.make_args(t) if self._is_moment(g)]
                if not moments:  # a constant (a bias folded in, ntk.py) or an input covariance
                    # times one: a scalar, which may read runtime Params (they stay symbols in
                    # the sum, unlike a moment's coefficient below, which must be a float)
                    value = self._constant_scalar(t, same_input)
                    if value.is_Add:
                        break
                    terms.append(value)
                    continue
                value = self.moment_terms(moments[0].key, same_input) if len(moments) == 1 else None
                if value is None or len(value) != 1:
                    break
                c = self._moment_coefficient(tuple([g for g in sp.Mul.make_args(t) if g is not moments[0]]))
                if c is None:  # a runtime parameter
                    break
                (v, cv), = value.items()
                terms.append(product(c * cv, sp.Mul.make_args(v)))
            else:
                value = total(terms)
                return {value: 1.0} if value.is_Add else term_sum(value)
        return term_sum(self.scalar(f, same_input))

    def _constant_scalar(self, t: sp.Expr, same_input: bool) -> sp.Expr:
        """``scalar(t, same_input)`` of a term without Moments in a sum of ``_factor_terms``,
        memoised: the constants that ntk.py folds into a convolution's window sums are a few
        values, met once per pair of positions."""
        key = (t, same_input)
        found = self._constant_memo.get(key)
        if found is None:
            found = self._constant_memo[key] = self.scalar(t, same_input)
        return found

    def _moment_coefficient(self, factors: tuple):
        """The product of ``factors`` (a Moment's coefficient in a sum of ``_factor_terms``),
        Params by value, as a float; None if it is not a number (a runtime parameter).
        Memoised: a convolution's taps have one weight."""
        found = self._coefficient_memo.get(factors, UNSEEN)
        if found is UNSEEN:
            c = sp.Mul(*factors).xreplace(self._params)
            found = self._coefficient_memo[factors] = float_value(c) if c.is_number else None
        return found

    # -- expectations -------------------------------------------------------------------
    def expect(self, expr: sp.Expr) -> sp.Expr:
        """E[expr] for an expression of leaves of both sides (exact): a call of the template
        of expr's structure (module docstring), or ``expect_direct``."""
        expr = sp.sympify(expr)
        if not self.templates or not any(self._is_leaf(s) for s in expr.free_symbols):
            return self.expect_direct(expr)
        return self._templated(expr, self.expect_direct, call=None)

    def expect_direct(self, expr: sp.Expr) -> sp.Expr:
        """E[expr] for an expression of leaves of both sides (exact).

        Products are expanded into monomials, except that a non-polynomial sum of functions
        of one linear form (tanh' = 1 - tanh^2, gelu' = Phi + x phi, 1 - sigmoid) is kept
        whole as one function g(L): expanding it would write E[tanh'(u) tanh'(v)], which is
        of order 1/k at variance k, as 1 - E[tanh^2 u] - E[tanh^2 v] + E[tanh^2 u tanh^2 v],
        four terms of order 1 that cancel (relative error ~ k * rtol; the NTK of a tanh
        network at input norm 1e4 came out 6 times too large)."""
        expr, held = self._hold_sums(sp.sympify(expr))
        products_of_sums = _has_products_of_sums(expr)
        if products_of_sums and _functions_times_forms(expr, held):
            # phi'(h) = -2 h exp(-h^2): the forms multiplied out would be separate Gaussians
            # (1.5 Z exp(-h^2) + b exp(-h^2)), three of them with the other input's factor
            try:
                return self._expect_term(expr.xreplace(held) if held else expr)
            except NotPairwise:
                pass
        if products_of_sums:  # (else there is nothing to expand: a product of functions)
            kept = self._expanded_without_odd_terms(expr, held) if self.templates else None
            expr = kept if kept is not None else sp.expand(expr, deep=False, power_exp=False, power_base=False,
                                                            log=False)
        if held:
            expr = expr.xreplace(held)
        return sp.Add(*[self._expect_term(t) for t in sp.Add.make_args(expr)])

    def _expanded_without_odd_terms(self, expr: sp.Expr, held: dict):
        """``expr`` multiplied out as ``sp.expand(expr, deep=False, ...)`` does, but without the
        terms whose expectation vanishes by parity (``_parity_parts``: an odd number of leaves
        of a block outside functions, none inside one).  That expand multiplies out the top
        level only: a product over its factors that are sums (each term plain * (one term of
        each sum), nothing inside them), and a power of a sum (here only a square; a higher
        power is left to expand, which counts multinomial terms); a sum it leaves as it is, and
        so does this (None: expand's turn, as for more than _EXPANSION_TERMS terms).  A Flatten
        readout sum_i g_i y_i times its value at the other input is P^2 terms, of which the P
        with i = j are left: the others read two independent g's.  Without the templates (the
        reference they are tested against) expand does it all."""
        if expr.is_Mul:
            plain = sp.Mul(*[f for f in expr.args if not f.is_Add])
            sums = [f.args for f in expr.args if f.is_Add]
        elif expr.is_Pow and expr.base.is_Add and expr.exp == 2:
            plain, sums = sp.S.One, [expr.base.args] * 2
        else:
            return None
        if not sums or prod(len(terms) for terms in sums) > _EXPANSION_TERMS:
            return None
        choices = [((), *self._parity_parts(sp.Mul.make_args(plain), held))]
        for terms in sums[:-1]:
            described = [(t, *self._parity_parts(sp.Mul.make_args(t), held)) for t in terms]
            choices = [(c + (t,), odd ^ odd_t, inside | inside_t)
                       for c, odd, inside in choices for t, odd_t, inside_t in described]
        last = [(t, *self._parity_parts(sp.Mul.make_args(t), held)) for t in sums[-1]]
        return sp.Add(*[sp.Mul(plain, sp.Mul(*c, t)) for c, t in _even_completions(choices, last)])

    def _parity_parts(self, factors, held: dict) -> tuple:
        """(odd, inside) of the product of ``factors`` (leaves, functions, held sums; terms of
        ``_expanded_without_odd_terms``, factors of ``_monomials``): the blocks with an odd
        number of leaf factors outside functions, and the blocks read inside any other factor."""
        odd, inside = set(), set()
        for f in factors:
            base, exp = (f.base, f.exp) if f.is_Pow else (f, sp.S.One)
            if base.is_Symbol and exp.is_Integer:
                block, blocks = self._symbol_parity(base, held)
                if block is None:
                    inside.update(blocks)
                elif exp % 2 == 1:
                    odd ^= {block}
                continue
            for x in f.free_symbols:
                block, blocks = self._symbol_parity(x, held)
                inside.update(blocks if block is None else (block,))
        return frozenset(odd), frozenset(inside)

    def _symbol_parity(self, s: sp.Symbol, held: dict) -> tuple:
        """(block, ()) if ``s`` is odd under negating that block alone: a leaf, or a held
        linear form (``_hold_sums``) of leaves of one block without a constant; else
        (None, the blocks it reads): a held function or a form of several blocks, or none
        for a constant."""
        if s not in held:
            return self._block_of(s), ()
        value = held[s]
        blocks = {b for x in value.free_symbols if (b := self._block_of(x)) is not None}
        parts = _linear_parts(value) if len(blocks) == 1 else None
        if parts is not None and parts[1] == 0:
            return next(iter(blocks)), ()
        return None, blocks

    def _hold_sums(self, expr: sp.Expr):
        """(expr with held sums replaced by placeholders, {placeholder: sum}); see expect."""
        held: dict = {}
        blocks: set = set()
        self._blocks_in_functions(expr, False, blocks)
        return self._held(expr, held, {}, blocks), held

    def _held(self, e: sp.Expr, held: dict, by_sum: dict, in_functions: set) -> sp.Expr:
        """e with each sum that is a single function, or a linear form whose leaves no
        function of ``e`` reads (``_is_free_linear_form``), replaced by its placeholder
        (``_hold_sums``; a method, not a recursive closure: see shared.Skeletons._paths)."""
        if e.is_Add:
            if self._is_single_function(e) or self._is_free_linear_form(e, in_functions):
                if e not in by_sum:
                    d = sp.Dummy("held")
                    by_sum[e] = d
                    held[d] = e
                return by_sum[e]
            return sp.Add(*[self._held(a, held, by_sum, in_functions) for a in e.args])
        if e.is_Mul:
            return sp.Mul(*[self._held(a, held, by_sum, in_functions) for a in e.args])
        if e.is_Pow and e.exp.is_Integer and e.exp > 0:
            return sp.Pow(self._held(e.base, held, by_sum, in_functions), e.exp)
        return e

    def _blocks_in_functions(self, e: sp.Expr, inside: bool, out: set) -> None:
        """Add to ``out`` the blocks of the leaves that ``e`` reads inside something other
        than sums, products and positive integer powers (a function, a quotient)."""
        if e.is_Symbol:
            if inside and self._is_leaf(e):
                out.add(self._leaf_block[symbols.unprimed(e)])
            return
        inside = inside or not (e.is_Add or e.is_Mul or (e.is_Pow and e.exp.is_Integer and e.exp > 0))
        for a in e.args:
            self._blocks_in_functions(a, inside, out)

    def _is_free_linear_form(self, e: sp.Expr, in_functions: set) -> bool:
        """A sum that is a linear form of two or more leaves with numeric coefficients, none
        of whose leaves is correlated with a leaf read by a function (``in_functions``: their
        blocks).  Its expectation with the rest of the product is then Wick's pairing of whole
        forms, E[... L_1 L_2] = ... Cov(L_1, L_2), not a sum over the pairs of their terms:
        the backward vector of a convolution, a sum over the taps that read a position,
        gives one expectation times the covariance of two such sums (one term per pair of
        positions) instead of one term per pair of taps."""
        parts = _linear_parts(e)
        if parts is None or len(parts[0]) < 2 or not parts[1].is_number:
            return False
        if not all(c.is_number and self._is_leaf(leaf) and self._leaf_block[symbols.unprimed(leaf)] not in in_functions
                   for leaf, c in parts[0].items()):
            return False
        return len(self._leaf_sides(parts[0])) <= 1  # one input, as a factor's (_normalise_factor)

    def _is_single_function(self, e: sp.Expr) -> bool:
        """A sum that is a non-polynomial function g(L) of a single linear form L of leaves."""
        leaves = [s for s in e.free_symbols if self._is_leaf(s)]
        if not leaves:
            return False
        # g(L) has a term that reads every leaf of L (a function of L): a sum of functions of
        # different forms (a Flatten readout's sum over positions, hundreds of leaves) fails
        # here, before the polynomial in all of them that is_polynomial and _factor build
        read = set(leaves)
        if not any(read <= t.free_symbols for t in e.args) or e.is_polynomial(*leaves):
            return False
        try:
            self._factor(e)  # refuses a function with a scalar parameter (relu(L) - mu): expanded instead
        except NotPairwise:
            return False
        return True

    def _expect_term(self, term: sp.Expr) -> sp.Expr:
        """E[term] for a monomial: its constant factors times the expectation of the product
        of its random factors (from the template of that product's structure)."""
        coef, random = [], []
        for f in sp.Mul.make_args(term):
            (random if any(self._is_leaf(s) for s in f.free_symbols) else coef).append(f)
        if not random:
            return term
        if self.templates:
            product = sp.Mul._from_args(random) if len(random) > 1 else random[0]
            value = self._templated(product, self._expect_monomial)
        else:
            value = self._expect_product(random)
        return sp.Mul(*coef) * value

    def _expect_monomial(self, product: sp.Expr) -> sp.Expr:
        """E[product] for a product of random factors (``_expect_product`` of its factors)."""
        return self._expect_product(list(sp.Mul.make_args(product)))

    def _expect_product(self, factors: list) -> sp.Expr:
        """E[prod factors] for functions of linear forms of leaves (independent components
        apart; Wick / quadrature per component)."""
        found = []
        for i, f in enumerate(factors):
            try:
                found.append(self._factor(f))
            except NotPairwise:
                if not _is_sum_or_power_of_sum(f):
                    raise
                # a sum of functions of several forms inside a product (a pooled vector
                # times an independent vector, m * (relu(h1) + relu(h2)) / 2): distribute
                rest = sp.Mul(*factors[:i], *factors[i + 1:])
                return self.expect(rest * sp.expand(f, deep=False, power_exp=False, power_base=False, log=False))
        result = sp.S.One
        for component in self._components(found):
            value = self._component(component)
            if value == 0:
                return sp.S.Zero
            result *= value
        return result

    # -- templates (module docstring) -----------------------------------------------------
    def _templated(self, product: sp.Expr, derive, call: bool = True) -> sp.Expr:
        """E[product] as a call of its structure's template (or the template's value itself
        when it reads nothing of the product: a number; with ``call`` False, the template's
        value at the product's arguments; None: that for a sum of more than _CALL_TERMS
        terms, whose terms are calls of their own templates the code generator groups by
        structure (a pooled vector's P^2 terms), else the call); ``derive(renamed
        product)`` derives a template's value."""
        structure, names = self._skeletons.canonical(product)
        signature = self._signature(names)
        key = (structure, signature, derive.__name__)
        variant = self._variants.get(key)
        if variant is None:
            variant = self._variants[key] = self._variant(product, names, signature, derive)
        return self._instance(variant, names, call)

    def _instance(self, variant: _Variant, names: list, call) -> sp.Expr:
        """The template of ``variant`` at the product whose symbols in the variant's order are
        ``names`` (``call`` as in ``_templated``)."""
        template = self.templates_found[variant.index]
        if not template.slots or template.value.is_Number:  # (a number whatever its slots: E[c Z] = 0)
            return template.value
        unprimed, leaf_cov = symbols.unprimed, self._leaf_cov
        own = [names[k] for k in variant.constants]
        own.extend([leaf_cov(unprimed(names[ka]), sa, unprimed(names[kb]), sb)
                    for ka, sa, kb, sb in variant.covariance_positions])
        return self._at_arguments(variant, [own[i] for i in variant.order], call, None)

    def _at_arguments(self, variant: _Variant, args: list, call, numbers) -> sp.Expr:
        """The template of ``variant`` at its arguments ``args`` (``_instance``; ``call`` as in
        ``_templated``; ``numbers``: whether they are all numbers, None to ask them)."""
        template = self.templates_found[variant.index]
        if call is None:
            if variant.calls is None:
                variant.calls = len(sp.Add.make_args(template.value)) <= _CALL_TERMS
            call = variant.calls
        if not call or (numbers if numbers is not None else all(a.is_number for a in args)):
            # numbers: written out, a number to sympy too (xreplace's result, its products
            # built by shared.product: a CNN writes out the sums of calls of every pair of positions)
            return substitute(template.value, dict(zip(template.slots, args)), {})
        return TemplateCall(sp.Integer(variant.index), *args)

    def _variant(self, product: sp.Expr, names: list, signature: tuple, derive) -> _Variant:
        """The expectation of ``product``, whose symbols in canonical order are ``names``,
        derived once with placeholders: leaf k becomes a placeholder leaf whose key records
        its position, its block's number in ``signature`` and whether it depends on the
        input (so equal keys always mean equal properties); any other scalar a
        TemplateConstant.  Registered as a Template (``_register``)."""
        placeholders = []
        for k, (s, block) in enumerate(zip(names, signature)):
            if block < 0:
                placeholders.append(symbols.TemplateConstant(k))
                continue
            dependent = symbols.unprimed(s).key in self._dependent
            leaf = ZHatSymbol(f"#{k}b{block}" + ("d" if dependent else ""))
            if leaf not in self._placeholder_leaves:
                self._placeholder_leaves.add(leaf)
                self._leaf_block[leaf] = ("#template block", block)
                for side in (leaf, symbols.primed(leaf)):  # (no memo of it as a non-leaf stays)
                    self._blocks_memo.pop(side, None)
                if dependent:
                    self._dependent.add(leaf.key)
            placeholders.append(symbols.primed(leaf) if symbols.is_primed(s) else leaf)
        renamed = substitute(product, dict(zip(names, placeholders)), {})
        value = derive(renamed)  # may register nested templates first
        covariances = _ordered(c for c in value.free_symbols if isinstance(c, symbols.LeafCovariance))
        slots = [ph for ph in placeholders if isinstance(ph, symbols.TemplateConstant)] + covariances
        index, order = self._register(value, slots)
        return _Variant(placeholders, covariances, index, order)

    def _register(self, value: sp.Expr, slots: list) -> tuple[int, list]:
        """(index of the Template equal to ``value`` up to a renaming of its slots, and for
        each of that template's slots the position in ``slots`` of the one it stands for).
        Products of one structure whose canonical orders differ (symbols that tie, such as a
        convolution's taps of one layer, are ordered by name) have equal values up to such a
        renaming: one template, so the code generator sees one structure."""
        structure, order = self._value_skeletons.canonical(sp.Tuple(value))
        read = set(order)
        order = order + [s for s in slots if s not in read]  # slots the value does not read
        key = (structure, len(slots))
        if key not in self._template_by_value:
            self._template_by_value[key] = len(self.templates_found)
            self.templates_found.append(Template(value, list(order)))
        # the registered template's slot j stands for the slot of this value at the same
        # canonical position
        position = {s: k for k, s in enumerate(slots)}
        return self._template_by_value[key], [position[s] for s in order]

    def expectation_template(self, cls, function: sp.Integer, n: int) -> tuple[int, list]:
        """(index, order) of the Template cls(function, c_0, .., c_{n-1}) (cls E1 or E2) of an
        expectation of ``function`` at n arguments, a function of its arguments alone
        (``_register``: argument j of a TemplateCall of it is the expectation's argument
        order[j]); memoised."""
        key = (cls, function, n)
        found = self._expectation_templates.get(key)
        if found is None:
            slots = [symbols.TemplateConstant(k) for k in range(n)]
            found = self._expectation_templates[key] = self._register(cls(function, *slots), slots)
        return found

    def instantiate(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every TemplateCall replaced by its template's value at its
        arguments (recursively): an expression of E1/E2 calls, quantities and inputs.
        Memoised per call (a deep net's outputs repeat the calls of later layers)."""
        calls = expr.atoms(TemplateCall) if isinstance(expr, sp.Basic) else ()
        if not calls:
            return expr
        rep = {}
        for c in calls:
            value = self._instances.get(c)
            if value is None:
                index = int(c.args[0])
                args = [self.instantiate(a) for a in c.args[1:]]
                slots = self.templates_found[index].slots
                value = self._instances[c] = self._written_value(index).xreplace(dict(zip(slots, args)))
            rep[c] = value
        return expr.xreplace(rep)

    def _written_value(self, index: int) -> sp.Expr:
        """Template ``index``'s value with its nested calls written out, memoised (every
        instance of the template is written from it)."""
        value = self._written.get(index)
        if value is None:
            value = self._written[index] = self.instantiate(self.templates_found[index].value)
        return value

    def _factor(self, f: sp.Expr) -> _Factor:
        memo = self._factor_memo.get(f)
        if memo is None:
            memo = self._factor_memo[f] = self._normalise_factor(f)
        return memo

    def _leaf_sides(self, leaves) -> set:
        """The inputs (0, 1) that ``leaves`` depend on (leaves of neither: empty)."""
        return {int(s.primed) for s in leaves if s.primed or s.key in self._dependent}

    def _normalise_factor(self, f: sp.Expr) -> _Factor:
        """f = g(L) with L a linear form of leaves (constant absorbed into g)."""
        leaves = [s for s in f.free_symbols if self._is_leaf(s)]
        sides = self._leaf_sides(leaves)
        side = max(sides, default=0)
        if len(sides) > 1:
            raise NotPairwise(f"a factor mixes both inputs: {f}")
        candidates = None  # all of them, made only if a form is read through several multiples
        for L, const in _linear_candidates(f, set(leaves)):
            g = f.xreplace({L: T}) if L != f else T
            if g.free_symbols & set(leaves):
                if candidates is None:
                    candidates = list(_linear_candidates(f, set(leaves)))
                g = _in_one_form(f, L, const, candidates)
            if g is not None and not (g.free_symbols & set(leaves)):
                if _has_parameters(g) and not g.is_polynomial(T):
                    rescaled = _parameter_free_rescaling(g)
                    if rescaled is None:
                        # relu(L) - mu (a Moment's limit): a sum the caller expands into terms
                        raise NotPairwise(f"E[{f}]: a nonlinear function of {L} with a scalar parameter")
                    scale, g = rescaled
                    L, const = sp.expand(scale * L), sp.expand(scale * const)
                return _Factor(sp.expand(g.xreplace({T: T + const})) if const != 0 else g, L - const, side)
        raise NotPairwise(f"E[{f}] needs a function of several Gaussians at once")

    def _components(self, factors: list[_Factor]) -> list[list[_Factor]]:
        g = nx.Graph()
        g.add_nodes_from(range(len(factors)))
        owner: dict = {}
        for i, f in enumerate(factors):
            for s in f.L.free_symbols:
                block = self._leaf_block.get(symbols.unprimed(s))
                if block is None:
                    continue  # an input coordinate in a coefficient
                if block in owner:
                    g.add_edge(i, owner[block])
                owner[block] = i
        return [[factors[i] for i in sorted(c)] for c in nx.connected_components(g)]

    def _component(self, factors: list[_Factor]) -> sp.Expr:
        key = tuple(sorted(((f.L, f.side, f.g) for f in factors), key=sp.default_sort_key))
        if key not in self._component_memo:
            self._component_memo[key] = self._component_value(factors)
        return self._component_memo[key]

    def _component_value(self, factors: list[_Factor]) -> sp.Expr:
        merged = _merged_by_numbers(factors)
        expanded = [(L, side, sp.expand(g)) for (L, side), g in merged.items()]
        if all(g.is_polynomial(T) for _, _, g in expanded):
            return self._wick_polynomial(expanded)
        if len(merged) > 2:
            regrouped = _merged_through_scalars(factors)
            if regrouped is not None and len(regrouped[0]) < len(merged):
                merged, scale = regrouped
                return scale * self._component_value_of_merged(merged)
        return self._component_value_of_merged(merged)

    def _component_value_of_merged(self, merged: dict) -> sp.Expr:
        """E[prod g(L)] over ``merged`` ({(L, side): g}), not all polynomials: one or two
        Gaussians (E1, E2), else NotPairwise."""
        # a function is kept unexpanded (1 - tanh(t)^2 stays one function, see expect)
        items = [(L, side, g) for (L, side), g in merged.items()]
        for L, _, g in items:
            if _has_parameters(g):
                raise NotPairwise(f"E[{g.xreplace({T: L})}]: a nonlinear function with a scalar parameter (a "
                                  f"Moment's limit or an input coordinate inside the function) has no quadrature")
        if len(items) == 1:
            (L, side, g), = items
            var = self.cov(L, side, L, side)
            square = _square_root(g)
            if square is not None and (square[1], square[1]) in self._fn_index:
                # E[f(u)^2] however sympy wrote it (sigmoid'(u)^2 as e^(-2u) (1 + e^(-u))^-4) by
                # the rule of E[f(u) f(v)] off the diagonal, where the derivation has one: a
                # kernel's diagonal by another rule than its neighbours (a quadrature of the
                # product, accurate to 2.4e-11) left a sigmoid net's NTK of two equal inputs
                # with an eigenvalue of -1.7e-12 times the largest (review)
                c, f = square
                return c * E2(self._function_index((f, f)), var, var, var)
            split = _two_factors(g)
            if split is not None and (split[1] == split[2] or _pair_closed_form(split[1], split[2])):
                # E[f1(u) f2(u)]: the bivariate rule at rho = 1 where it has a closed form
                # (relu(u)^2 by the arc-cosine kernel), or for a square written as one (as
                # above: a tanh net's NTK of nearly parallel inputs had an eigenvalue of
                # -1.2e-12 times the largest); else one quadrature of the product
                c, f1, f2 = split
                return c * E2(self._function_index((f1, f2)), var, var, var)
            return E1(self._function_index((g,)), var)
        if len(items) == 2:
            (L1, s1, g1), (L2, s2, g2) = sorted(items, key=lambda it: it[1])
            k11 = self.cov(L1, s1, L1, s1)
            k22 = self.cov(L2, s2, L2, s2)
            k12 = self.cov(L1, s1, L2, s2)
            return E2(self._function_index((g1, g2)), k11, k12, k22)
        raise NotPairwise(f"an expectation of {len(items)} jointly Gaussian nonlinear factors is not pairwise")

    def _function_index(self, gs: tuple) -> sp.Integer:
        if gs not in self._fn_index:
            self._fn_index[gs] = len(self.functions)
            self.functions.append(gs)
        return sp.Integer(self._fn_index[gs])

    def _wick_polynomial(self, items) -> sp.Expr:
        """E[prod_i g_i(L_i)] for polynomials g_i by Wick's theorem."""
        variables = [(L, side) for L, side, _ in items]
        polys = [sp.Poly(g, T).terms() for _, _, g in items]
        cov = {}

        def c(i, j):
            if (i, j) not in cov:
                cov[(i, j)] = cov[(j, i)] = self.cov(*variables[i], *variables[j])
            return cov[(i, j)]

        total = sp.S.Zero
        for combo in _product(polys):
            coef = reduce(lambda a, b: a * b, [cf for (_, cf) in combo], sp.S.One)
            degrees = [k for ((k,), _) in combo]
            total += coef * _wick([i for i, k in enumerate(degrees) for _ in range(k)], c)
        return total

    def cov(self, L1: sp.Expr, s1: int, L2: sp.Expr, s2: int) -> sp.Expr:
        """Cov(L1 at side s1, L2 at side s2) for linear forms of leaves (a quantity if it
        involves ZHats)."""
        by_block: dict = {}
        for la, ca in _coefficients(L1).items():
            by_block.setdefault(self._leaf_block[symbols.unprimed(la)], []).append((la, ca))
        terms = []
        for lb, cb in _coefficients(L2).items():  # only leaves of one block are correlated
            for la, ca in by_block.get(self._leaf_block[symbols.unprimed(lb)], ()):
                c = self._leaf_cov(symbols.unprimed(la), s1, symbols.unprimed(lb), s2)
                if c != 0:
                    terms.append(ca * cb * c)
        return total(terms)

    def _leaf_cov(self, la: sp.Symbol, s1: int, lb: sp.Symbol, s2: int) -> sp.Expr:
        """Cov(leaf la at side s1, leaf lb at side s2), memoised (every instance of a
        template asks for its leaves' covariances)."""
        key = (la, s1, lb, s2)
        value = self._leaf_cov_memo.get(key)
        if value is None:
            value = self._leaf_cov_memo[key] = self._leaf_covariance(la, s1, lb, s2)
        return value

    def _leaf_covariance(self, la: sp.Symbol, s1: int, lb: sp.Symbol, s2: int) -> sp.Expr:
        if self._leaf_block[la] != self._leaf_block[lb]:
            return sp.S.Zero
        if la in self._placeholder_leaves:  # inside a template: instantiated later
            return symbols.LeafCovariance(la.key, s1, lb.key, s2)
        ka, kb = la.key, lb.key
        if symbols.is_z(la):
            return self.graph.init_covariance(ka, kb, s1 == 1, s2 == 1, compact=True).xreplace(self._params)
        s2_ = self._matrix_variance(ka)
        xa, xb = self.zp.entries[ka].x, self.zp.entries[kb].x
        if s2_.__class__ is float:  # one object per value, the product built directly (shared.product)
            key = (s2_, self.quantity(xa, s1, xb, s2))
            scaled = self._scaled_memo.get(key)
            if scaled is None:  # (a convolution's taps: one covariance per tap, one object for all)
                scaled = self._scaled_memo[key] = product(key[0], [key[1]])
            return scaled
        return s2_ * self.quantity(xa, s1, xb, s2)

    def _matrix_variance(self, zhat: str):
        """sigma^2 of the matrix of the ZHat ``zhat``, with Params by value: a float, or an
        expression of runtime parameters; memoised per ZHat."""
        found = self._variance_memo.get(zhat)
        if found is None:
            mat = self.graph.matmul_parts(zhat)[0]
            found = (self.graph.op(mat).sigma ** 2).xreplace(self._params)
            found = self._variance_memo[zhat] = float(found) if found.is_number else found
        return found

    # -- quantities -----------------------------------------------------------------------
    def quantity(self, ka: str, sa: int, kb: str, sb: int) -> sp.Expr:
        """A named quantity for E[Z^ka at side sa times Z^kb at side sb] (memoised per pair of
        forms; row quantities of the second input are the primed symbols of their first-input
        versions)."""
        sides = (self._form_sides(ka, sa) | self._form_sides(kb, sb)) or {0}
        if sides == {1}:
            return self.to_side(self.quantity(ka, 0, kb, 0), 1)
        key = min((ka, sa, kb, sb), (kb, sb, ka, sa))
        if key in self.quantities:
            return self.quantities[key].symbol
        value = self._pair_moment(*key)
        if isinstance(value, sp.Number):
            return value
        return self._new_quantity(key, value, sides == {0, 1}, f"E[Z^{ka} Z^{kb}]")

    def _new_quantity(self, key: tuple, value: sp.Expr, pair: bool, label: str) -> sp.Symbol:
        """The symbol of a new Quantity defined as ``value``, numbered in creation order and
        registered under ``key`` in ``quantities`` (a pair of forms' (ka, sa, kb, sb), or
        ("moment", key) for ``_moment_read``)."""
        q = Quantity(symbols.quantity(len(self._order)), value, pair=pair, label=label)
        self.quantities[key] = q
        self._quantity_keys[q.symbol] = key
        self._order.append(q)
        return q.symbol

    def _form_sides(self, key: str, side: int) -> set:
        """The inputs (0, 1) the form of ``key`` at ``side`` depends on, memoised."""
        memo = self._sides_memo.get((key, side))
        if memo is None:
            memo = self._sides_memo[(key, side)] = self._sides(self._side_form(key, side))
        return memo

    def _sides(self, expr: sp.Expr) -> set:
        """The inputs (0, 1) expr depends on (empty: neither); a pair quantity depends on both
        (a hidden conv's covariance at the two inputs, read by a moment of the next linear
        layer, made a row quantity was computed in the row stage before its pair quantities)."""
        sides = set()
        for s in expr.free_symbols:
            if self._input_dependent(symbols.unprimed(s)):
                key = self._quantity_keys.get(s)
                if key is not None and self.quantities[key].pair:
                    sides.update((0, 1))
                else:
                    sides.add(int(symbols.is_primed(s)))
        for c in expr.atoms(ops.InputCov):  # input-layer covariances: their sides' flags
            sides.update((int(c.args[2]), int(c.args[3])))
        return sides

    @property
    def order(self) -> list[Quantity]:
        return list(self._order)


class _TemplateKinds:
    """The symbols a template renames (``Skeletons`` kinds): leaves, by side, input
    dependence and, for a block of several of the program's leaves, block; and scalars that
    vary between terms of one structure: quantities, input coordinates, input-layer
    covariance atoms, constants of an enclosing template.  Nothing that depends on the input
    may stay literal in a template: ``to_side`` moves an expression to the second input
    through the arguments of its calls only."""

    def __init__(self, engine: PairwiseEngine):
        self.engine = engine

    def __contains__(self, s) -> bool:
        if isinstance(s, ops.InputCov):
            return True
        return s.is_Symbol and (self.engine._is_leaf(s) or symbols.unprimed(s) in self.engine._inputs
                                or isinstance(s, (symbols.QuantitySymbol, symbols.TemplateConstant)))

    def __getitem__(self, s) -> tuple:
        if self.engine._is_leaf(s):
            # the block too where it has several of the program's leaves: leaves of one sum (a
            # convolution's taps) would otherwise tie, and sympy's order among them (by name)
            # differs between positions.  Not a block of one leaf (a Flatten readout's g_p, one
            # per position: every position's forms would be a structure of their own), nor a
            # template's placeholder (ordered by its name, its position in the template).
            # Leaving a block out is exact: which leaves of a product share a block is the
            # key's ``signature``, and covariances are looked up per instance.
            u = symbols.unprimed(s)
            block = self.engine._leaf_block[u]
            return ("leaf", bool(s.primed), u.key in self.engine._dependent,
                    block if self.engine._block_sizes[block] > 1 else None), None
        return ("scalar",), None


class _SlotKinds:
    """The symbols a template's value is compared up to (``PairwiseEngine._register``)."""

    def __contains__(self, s) -> bool:
        return isinstance(s, (symbols.TemplateConstant, symbols.LeafCovariance))

    def __getitem__(self, s) -> tuple:
        return ("slot",), None


def _has_products_of_sums(expr: sp.Expr) -> bool:
    """Whether a term of expr has a sum, or a power of a sum, among its factors: what
    ``sp.expand(expr, deep=False, power_exp=False, power_base=False, log=False)`` multiplies
    out.  Without one it returns expr as it is (E[relu(h_i) relu(h_j')], the product of two
    forms of a CNN's pair moment, where expand took 1 ms per structure)."""
    for term in sp.Add.make_args(expr):
        for f in sp.Mul.make_args(term):
            if f.is_Add or (f.is_Pow and (f.base.is_Add or f.exp.is_Add)):  # (2**(x + 1) is 2*2**x to expand)
                return True
    return False


def _functions_times_forms(expr: sp.Expr, held: dict) -> bool:
    """Whether expr is one product of non-polynomial functions and of affine forms of leaves
    (sums, or powers of sums, that ``_linear_parts`` reads): E[expr] is then tried whole first
    (``expect_direct``), each form a factor g(L) = L of its own that ``_component_value``
    merges with the functions of a multiple of it.  ``held`` maps the placeholders of
    ``_hold_sums`` to their sums: one that holds a single function g(L) (a sum that is not
    affine: gelu(h) = h (1 + erf(h / sqrt 2)) / 2 reads 1 + erf(...)) is a function, one that
    holds a free linear form is a form; leaves and numbers are neither."""
    if not expr.is_Mul:
        return False
    has_function = False
    for f in expr.args:
        base = f.base if f.is_Pow and f.exp.is_Integer and f.exp > 0 else f
        if base in held:
            has_function = has_function or _linear_parts(held[base]) is None
        elif base.is_Add:
            # (with the held sums written back: a held function inside a sum, 0.375 Z1 H1 +
            # 0.375 Z2 H2, is not an affine form, though it reads as one in the placeholders)
            if _linear_parts(base.xreplace(held) if held else base) is None:
                return False
        elif not (base.is_Symbol or base.is_Number):
            has_function = True
    return has_function


def _function_of_variables(f: sp.Expr) -> bool:
    """Is the factor f a function call (or a positive integer power of one) that is not a
    number: tanh(Z^h), phi(h)^2?  sympy's expand keeps such a call a call (it expands its
    arguments, an exponential into a product of exponentials, a logarithm into a sum of
    logarithms), so every term of the expansion of a product with such a factor has a
    factor that is neither a number nor a vector (``_new_moment_by_pairs``: a moment of
    phi(h_s) phi(h_t)' is no sum of products of two vectors, known without expanding it)."""
    base = f.base if f.is_Pow and f.exp.is_Integer and f.exp > 0 else f
    return isinstance(base, Application) and not base.is_number


def _has_parameters(g: sp.Expr) -> bool:
    """Does the one-variable function g(T) depend on anything but T (a symbol, an input-layer
    covariance or an expectation: quadrature functions are compiled from numbers and T alone)?"""
    return bool(g.free_symbols - {T}) or bool(g.atoms(E1, E2, TemplateCall, ops.InputCov))


def _parameter_free_rescaling(g: sp.Expr):
    """(s, h) with g(T) = h(s T) for a scalar s and h free of parameters (``_has_parameters``),
    or None.  A form with a scalar coefficient c (a LayerNorm's 1/sqrt(variance + eps)) inside
    a function whose derivative squares its argument, erf'(c L) = 2/sqrt(pi) exp(-(c L)^2),
    reaches the engine as exp(-c^2 L^2): sympy multiplies out the power of a product, and
    g(T) = exp(-c^2 T^2) has the parameter c^2.  Each term P T^k (k > 0) of g proposes
    s = P^(1/k) for the non-numeric factors P (roots of a positive scalar: the variance's),
    and the first that makes h(U) = g(U / s) parameter-free, with h(s T) written by sympy as g
    itself, is taken: then E[g(L)] = E[h(L')] for the Gaussian L' = s L.  (s is a real number
    where P > 0; where it is not, a NaN that the kernels' check of finiteness refuses.)"""
    for term in symbols.preorder(g):
        if not term.is_Mul:
            continue
        powers = [f.as_base_exp()[1] for f in term.args if f.as_base_exp()[0] == T]
        rest = [f for f in term.args if not f.has(T) and not f.is_number]
        if len(powers) != 1 or not powers[0].is_number or not powers[0] > 0 or not rest:
            continue
        scale = sp.powdenest(sp.Mul(*rest) ** (1 / sp.sympify(powers[0])), force=True)
        h = g.xreplace({T: T / scale})
        # taken only where sympy writes h(s T) back as g itself: the identity is then exact
        if not _has_parameters(h) and h.has(T) and h.xreplace({T: scale * T}) == g:
            return scale, h
    return None


def _not_a_vector(engine: PairwiseEngine, key: str, e):
    raise NotPairwise(f"{key!r} is not a vector")


#: The form of a vector in the leaves, by op: rule(engine, key, entry) -> expression.
FORMS = RuleTable("pairwise forms", domain=ops.INSTRUCTIONS)
FORMS.register(ops.InitVec, ops.InputLayer)(lambda engine, key, e: Z(key))
FORMS.register(ops.Nonlin)(lambda engine, key, e: engine._nonlin_form(key, e))
FORMS.register(ops.MatMul)(lambda engine, key, e: engine._matmul_form(key, e))
FORMS.register(ops.InitMat, ops.InputMat, ops.Param, ops.WidthPower, ops.Input, ops.Moment)(_not_a_vector)



def expectation_rule(gs: tuple, rtol: float):
    """The ``tpcompiler.expectations`` rule of one engine function (``PairwiseEngine.functions``):
    (g,) -> E[g(u)], (g1, g2) -> E[g1(u) g2(v)], quadratures to ``rtol``."""
    from tpcompiler import expectations

    lams = [sp.Lambda(T, g) for g in gs]
    if len(lams) == 1:
        return expectations.expectation(lams[0], rtol=rtol)
    return expectations.pair_expectation(lams[0], lams[1], rtol=rtol)


class ExpectationRules:
    """The rule of each engine function (``expectation_rule``), built when it is first read.

    The engine's table also holds functions that no output reads: those of expectations
    derived and then dropped (a LayerNorm's backward terms that cancel, a factor that is
    0).  Building a rule probes its quadrature, seconds to tens of seconds for a function
    such as (1 + e^t)^-3 against e^(2t): a depth-2 LayerNorm-sigmoid net spent 107 of its
    117 s of derivation probing three functions nothing read.  ``failed(gs, exc)`` is the
    error to raise when a rule cannot be built (a ValueError or an ArithmeticError)."""

    def __init__(self, functions: list[tuple], rtol: float, failed):
        self.functions, self.rtol, self._failed = functions, rtol, failed
        self._built: dict = {}

    def __getitem__(self, index: int):
        rule = self._built.get(index)
        if rule is None:
            try:
                rule = self._built[index] = expectation_rule(self.functions[index], self.rtol)
            except CacheUnavailable:
                raise  # (the setup's error, not the function's: no NotPairwise, which auto methods avoid)
            except (ValueError, ArithmeticError) as exc:
                raise self._failed(self.functions[index], exc) from None
        return rule

    def built(self) -> list[tuple]:
        """(index, rule) of the rules read so far, by index."""
        return sorted(self._built.items())


# -- which programs the engine applies to ----------------------------------------------------
#: Form classes, in increasing generality: no random variable; an affine form L of the
#: Gaussian leaves; a function g(L) of one such form; a polynomial in such functions of
#: several forms; anything else (out of the engine's reach).
CONSTANT, GAUSSIAN, SINGLE, ATOMS, OTHER = range(5)


def is_pairwise(zp: ZProgram) -> bool:
    """Whether every vector's form, and every averaged function, is a polynomial in
    functions g(L) of affine forms L of the Gaussian leaves (the engine's domain).

    Decided structurally in program order, without building any form, by a class and a
    *root* per subexpression (the root names the affine form L a function of one form is a
    function of): a leaf or an affine vector is Gaussian and its own root; sums and products
    of parts with one root keep it (relu(h) + h, tanh(relu(h)), exp(-h^2)); parts with
    different roots make a polynomial in atoms; a function of parts with one root is an
    atom g(L), of parts with several roots (tanh of a vector that already went through a
    nonlinearity and a ZDot, as after a feature-learning step) out of reach.  Necessary,
    not sufficient: the engine still refuses (NotPairwise) an expectation of three
    correlated nonlinear factors or a quadrature it cannot build."""
    classes: dict[str, tuple] = {}

    def symbol_class(s: sp.Symbol) -> tuple:
        if s in zp.leaf_blocks:
            return GAUSSIAN, s
        if not symbols.is_z(s):
            return CONSTANT, None
        level, root = classes[s.key]
        return (GAUSSIAN, s) if level == GAUSSIAN else (level, root)

    for key in zp.order:
        z = zp.entries[key].z
        if z is None:
            continue
        if zp.graph.kind(key) == VEC:
            classes[key] = _form_class(z, symbol_class)
            level = classes[key][0]
        else:
            level = max((_form_class(e.args[0], symbol_class)[0] for e in z.atoms(Expectation)), default=CONSTANT)
        if level == OTHER:
            return False
    return True


def _form_class(e: sp.Expr, symbol_class) -> tuple:
    """(class, root) of an expression in Z symbols (see is_pairwise)."""
    if isinstance(e, Expectation) or not any(symbols.is_leaf_variable(s) for s in e.free_symbols):
        return CONSTANT, None
    if e.is_Symbol:
        return symbol_class(e)
    parts = [p for p in (_form_class(a, symbol_class) for a in e.args) if p[0] != CONSTANT]
    if not parts:
        return CONSTANT, None
    levels = [level for level, _ in parts]
    roots = {root for _, root in parts}
    one_root = len(roots) == 1 and None not in roots
    polynomial = e.is_Add or e.is_Mul or (e.is_Pow and e.exp.is_Integer and e.exp > 0)
    if e.is_Add and max(levels) == GAUSSIAN:
        return GAUSSIAN, e
    if len(parts) == 1 and (e.is_Mul or (e.is_Pow and e.exp == 1)):
        return parts[0]  # a constant multiple
    if one_root and max(levels) <= SINGLE:
        return SINGLE, roots.pop()
    if polynomial and max(levels) <= ATOMS:
        return ATOMS, None
    return OTHER, None


def _ordered(items) -> list:
    """A set of sympy objects in a fixed order.  Quantities are numbered in the order they
    are created, and the generated kernel source (hence its compile-cache key) follows that
    numbering: iterating a set directly would follow the per-process string hash seed, so
    every run would generate new source and pay the whole Numba compile again."""
    return sorted(items, key=sp.default_sort_key)



def _coefficients(L: sp.Expr) -> dict:
    """{leaf: coefficient} of a linear form without constant term."""
    out = _linear_parts(L)
    if out is None or out[1] != 0:
        raise NotPairwise(f"not a linear form of leaves: {L}")
    return out[0]


def _linear_parts(expr: sp.Expr):
    """({leaf: coefficient}, constant) if expr is affine in the leaves, else None.  Works
    term by term on the expression as it stands (expanding only products of a coefficient
    with a sum), so it stays linear in the number of leaves."""
    coefs: dict = {}
    const = sp.S.Zero
    for term in sp.Add.make_args(expr):
        leaf = _scaled_leaf(term)
        if leaf is not None:  # (what as_independent below finds, found directly)
            c, rest = leaf
            coefs[rest] = coefs.get(rest, sp.S.Zero) + c
            continue
        leaves = [s for s in term.free_symbols if symbols.is_leaf_variable(s)]
        if not leaves:
            const += term
            continue
        c, rest = term.as_independent(*leaves, as_Add=False)
        if len(leaves) == 1 and rest == leaves[0]:
            coefs[rest] = coefs.get(rest, sp.S.Zero) + c
            continue
        if not rest.is_Add:  # otherwise c * (affine form)
            return None
        inner = _linear_parts(rest)
        if inner is None:
            return None
        for k, v in inner[0].items():
            coefs[k] = coefs.get(k, sp.S.Zero) + c * v
        const += c * inner[1]
    return coefs, const


def _scaled_leaf(term: sp.Expr):
    """(c, leaf) when term is a leaf (c = 1) or a number times a leaf, else None."""
    if term.is_Symbol:
        return (sp.S.One, term) if symbols.is_leaf_variable(term) else None
    if term.is_Mul and len(term.args) == 2:
        c, rest = term.args
        if c.is_Number and rest.is_Symbol and symbols.is_leaf_variable(rest):
            return c, rest
    return None


def _linear_candidates(f: sp.Expr, leaves: set):
    """(L, constant) for subexpressions L of f that are affine forms containing all of f's
    leaves (outermost first)."""
    seen = set()
    for sub in symbols.preorder(f):
        if sub in seen or not isinstance(sub, sp.Expr):
            continue
        seen.add(sub)
        if not leaves <= sub.free_symbols:
            continue
        parts = _linear_parts(sub)
        if parts is not None and parts[0]:
            yield sub, parts[1]


def _in_one_form(f: sp.Expr, L: sp.Expr, const: sp.Expr, candidates: list):
    """f with every affine form A of ``candidates`` proportional to L's, A = k (L - const) + c_A,
    written k (T - const) + c_A (T standing for L), or None if none but L is.  sympy multiplies
    a number into a sum, so a function of one form reads several: a leaky relu Max(h, 0.1 h) of
    h = 1.5 Z + b is Max(1.5 Z + b, 0.15 Z + 0.1 b) (``_multiple``)."""
    base = _linear_parts(L)[0]
    rep = {}
    for A, c_A in candidates:
        k = _multiple(_linear_parts(A)[0], base)
        if k is not None:
            rep[A] = k * (T - const) + c_A
    return f.xreplace(rep) if len(rep) > 1 else None


def _onto_merged_form(f: "_Factor", merged: dict) -> tuple:
    """((L, side), g) of factor f on a form of ``merged`` it is a number k times, L_f = k L,
    with g(T) = g_f(k T); f's own otherwise.  sympy multiplies numbers into sums, so factors of one
    form come with different forms: phi'(h) of exp(-h^2) is -2 h exp(-h^2), whose factors are
    -3 Z - 2 b and exp(-(1.5 Z + b)^2), one function of one Gaussian and not two.  An irrational
    number it keeps outside the sum instead, as a product: gelu(h) = h (1 + erf(h / sqrt 2)) / 2
    has the factors 1.5 Z + b and 1 + erf(sqrt(2) (1.5 Z + b) / 2), k = sqrt(2) / 2 (``_is_numeric``)."""
    if (f.L, f.side) in merged or not merged:
        return (f.L, f.side), f.g
    # (a number only: a scalar ratio, a LayerNorm's scale, would put a parameter in g)
    found = _form_multiple(f, merged, _is_numeric)
    if found is None:
        return (f.L, f.side), f.g
    form, k = found
    return form, f.g.xreplace({T: k * T})


def _merged_by_numbers(factors: list) -> dict:
    """{(L, side): g} with prod over ``factors`` f of g_f(L_f) = prod g(L): each factor put on
    a form already there that its own is a number times (``_onto_merged_form``), in order."""
    merged: dict = {}
    for f in factors:
        key, g = _onto_merged_form(f, merged)
        merged[key] = merged.get(key, sp.S.One) * g
    return merged


def _form_multiple(f: "_Factor", forms, accept) -> tuple | None:
    """((L, side), k) for the first form of ``forms`` on f's side with f.L = k L (``_multiple``;
    k free of leaves), both forms without a constant, and ``accept(k)``; None if there is none."""
    parts = _linear_parts(f.L)
    if parts is None or parts[1] != 0 or not parts[0]:
        return None
    for L, side in forms:
        other = _linear_parts(L) if side == f.side else None
        if other is None or other[1] != 0:
            continue
        k = _multiple(parts[0], other[0])
        if k is not None and accept(k):
            return (L, side), k
    return None


def _even_completions(choices: list, last: list):
    """The pairs (c, t), in the order of ``choices`` and then of ``last``, of a partial product
    (c, odd, inside) and a term of the last sum (t, odd_t, inside_t) whose product is not odd:
    (odd ^ odd_t) <= U with U = inside | inside_t, that is odd - U == odd_t - U (their
    symmetric difference outside U is empty).  The terms are looked up in a table per
    (inside, inside_t) keyed by odd_t - U instead of tested one by one: a Flatten readout's
    sum over P positions times its value at the other input has P^2 pairs, of which the P
    of one position are left (at 32 x 32, 4 x 10^6 tests took most of the engine's time)."""
    by_inside: dict = {}  # inside_t -> [(index, t, odd_t)]
    for k, (t, odd_t, inside_t) in enumerate(last):
        by_inside.setdefault(inside_t, []).append((k, t, odd_t))
    tables: dict = {}  # (inside, inside_t) -> {odd_t - U: [(index, t)]}
    for c, odd, inside in choices:
        found = []
        for inside_t, group in by_inside.items():
            union = inside | inside_t
            table = tables.get((inside, inside_t))
            if table is None:
                table = tables[(inside, inside_t)] = {}
                for k, t, odd_t in group:
                    table.setdefault(odd_t - union, []).append((k, t))
            found.extend(table.get(odd - union, ()))
        found.sort(key=lambda kt: kt[0])
        for _, t in found:
            yield c, t


def _merged_through_scalars(factors: list) -> tuple | None:
    """({(L, side): g}, scale) with the product of ``factors`` = scale * prod g(L): first the
    functions (non-polynomial g) merged onto common forms by numbers (``_onto_merged_form``),
    then each monomial factor c L_f^n whose form is a scalar multiple L_f = k L of a
    function's form (k free of leaves: a LayerNorm's (var + eps)^(-1/2), a Moment's limit)
    merged as c T^n onto L, with k^n moved into ``scale``.  That is exact: k is a number for
    each input, constant under the expectation.  A LayerNorm's h = k (Z + b) makes swish(h) =
    h sigmoid(h) the factors k (Z + b) and sigmoid(k (Z + b)): one Gaussian, not two.  None if
    some polynomial factor is not a monomial (its powers would need different scales)."""
    merged = _merged_by_numbers([f for f in factors if not f.g.is_polynomial(T)])
    functions = dict(merged)
    scale = sp.S.One
    for f in factors:
        if f.g.is_polynomial(T):
            c, n = sp.S.One, 0
            for part in sp.Mul.make_args(f.g):
                if part == T:
                    n += 1
                elif part.is_Pow and part.base == T and part.exp.is_Integer:
                    n += int(part.exp)
                elif part.is_number:
                    c *= part
                else:
                    return None
            key, k = _scalar_multiple_of(f, functions)
            merged[key] = merged.get(key, sp.S.One) * c * T**n
            scale = scale * k**n
    return merged, scale


def _scalar_multiple_of(f: "_Factor", forms: dict) -> tuple:
    """((L, side), k) for a form of ``forms`` on f's side with f.L = k L, k free of leaves (a
    number or a scalar expression, ``_form_multiple``); else f's own ((f.L, f.side), 1)."""
    return _form_multiple(f, forms, lambda k: True) or ((f.L, f.side), sp.S.One)


def _multiple(coefficients: dict, base: dict):
    """k with coefficients = k base ({leaf: coefficient} of two linear forms), or None: k read
    off one leaf and checked on the others, numbers (``_is_numeric``: 0.75 sqrt(2) too) to 1e-12
    relative (0.1 * 1.5 is 0.15000000000000002), anything else exactly."""
    if not base or coefficients.keys() != base.keys():
        return None
    pivot = next(iter(base))
    k = coefficients[pivot] / base[pivot]
    for s, b in base.items():
        a, kb = coefficients[s], k * b
        if _is_numeric(a) and _is_numeric(kb):
            if abs(float(a) - float(kb)) > 1e-12 * max(abs(float(a)), abs(float(kb))):
                return None
        elif sp.expand(a - kb) != 0:
            return None
    return k


def _is_numeric(k: sp.Expr) -> bool:
    """Whether k is a real number, rational or not (3/2, 0.75, sqrt(2)/2, pi): no symbol (a
    scalar parameter, a Moment's limit) and no expectation or input covariance inside it
    (``_has_parameters``), so a function g(k T) is as parameter-free as g(T)."""
    if k.is_Number:  # (the common case, without the walks below)
        return True
    return bool(k.is_number) and not _has_parameters(k) and bool(k.is_extended_real)


def _is_sum_or_power_of_sum(f: sp.Expr) -> bool:
    return f.is_Add or (f.is_Pow and f.base.is_Add and f.exp.is_Integer and f.exp > 1)


@functools.lru_cache(maxsize=None)
def _pair_closed_form(f1: sp.Expr, f2: sp.Expr) -> bool:
    """Whether E[f1(u) f2(v)] has a closed form (``expectations.closed_form_pair``).  Without
    one, E[f1(u) f2(u)] for two different functions is better one quadrature of the product
    than the bivariate rule at rho = 1: that rule is probed on every covariance, where a
    factor alone can grow (the derivative of a sigmoid squared, e^(2u) (1 + e^u)^-4, split as
    e^(2u) and (1 + e^u)^-4, took 25 s of probing, which stopped at an estimated error of
    2.6e-7 instead of 1e-10)."""
    from tpcompiler.expectations import closed_form_pair

    return closed_form_pair(sp.Lambda(T, f1), sp.Lambda(T, f2)) is not None


def _square_root(g: sp.Expr):
    """(c, f) with g = c f(t)^2, c > 0 a number, f non-constant, found by halving each factor
    of g (an even integer power's exponent, an exponential's argument); or None."""
    c, rest = g.as_coeff_Mul()
    if not c.is_positive:
        return None
    halves = []
    for factor in sp.Mul.make_args(rest):
        if isinstance(factor, sp.exp):
            halves.append(sp.exp(factor.args[0] / 2))
            continue
        base, n = factor.as_base_exp()
        if not (n.is_Integer and n % 2 == 0):
            return None
        halves.append(base ** (n / 2))
    f = sp.Mul(*halves)
    return (c, f) if f.has(T) else None


def _two_factors(g: sp.Expr):
    """g = c * f1(t) * f2(t) with f1, f2 non-constant (a square counts as two), or None."""
    c, rest = g.as_coeff_Mul()
    parts = []
    for f in sp.Mul.make_args(rest):
        base, exp = f.as_base_exp()
        if exp.is_Integer and exp > 0 and not f.is_Add:
            parts += [base] * int(exp)
        else:
            parts.append(f)
    if len(parts) == 2 and all(f.has(T) for f in parts):
        return c, parts[0], parts[1]
    return None


def _product(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for tail in _product(lists[1:]):
            yield (head,) + tail


def _wick(indices: list[int], cov) -> sp.Expr:
    """E[prod x_i] for zero-mean jointly Gaussian x (Isserlis): sum over pairings."""
    if not indices:
        return sp.S.One
    if len(indices) % 2:
        return sp.S.Zero
    first, rest = indices[0], indices[1:]
    total = sp.S.Zero
    for j in range(len(rest)):
        c = cov(first, rest[j])
        if c != 0:
            total += c * _wick(rest[:j] + rest[j + 1:], cov)
    return total


def _scaled_leaf_block(term: sp.Expr, block_of):
    """For a term of a sum: None if it reads no leaf (a constant), the leaf's block if it is
    a leaf times constants, else UNSEEN (``PairwiseEngine._monomials``)."""
    block = None
    for f in sp.Mul.make_args(term):
        b = block_of(f) if f.is_Symbol else None
        if b is not None:
            if block is not None:
                return UNSEEN
            block = b
        elif any(block_of(s) is not None for s in f.free_symbols):
            return UNSEEN
    return block
