"""Symbolic Master theorem (docs/DESIGN.md 2.2): graph IR -> Z program.

For every vector x the stage derives Z^x in *recursion form*: an expression in the Z symbols
of x's direct arguments (never the whole history expanded), with

* ZInit:   Z^u is the Gaussian of the initial vector u (a leaf);
* ZNonlin: Z^{phi(x..;theta..)} = phi(Z^x..; theta..);
* ZMatMul: Z^{Wx} = ZHat^{Wx} + ZDot^{Wx}, ZHat^{Wx} a leaf of W's family (W and W^T are
  different families), and
      ZDot^{Wx} = sigma_W^2 sum_{v = W^T y before Wx} Z^y E[dZ^x / dZHat^v]
  (symmetrically for W^T y);
* ZMoment: lim theta = E[psi(Z^x..)].

Leaves are the initial Gaussians and the ZHats; each ZHat is its own variable for
differentiation and every expectation is a constant (docs/DESIGN.md 2.8).

Provably zero expectations simplify to 0 by a sign-flip symmetry: the leaves split into
independent zero-mean Gaussian *blocks* (a ZHat family; a group of correlated initial
vectors).  Negating one block leaves the joint law unchanged, so E[f] = 0 whenever f is odd
under that negation.  The parity of every Z under every block is derived structurally
(``parity``), which proves e.g. that backward vectors linear in an independent readout have
vanishing ZDot at initialisation ("gradient independence" as an output of the derivation).

Oddness proves E[f] = 0 only for an integrable f (E[1/u] does not exist; it is not 0), so
every Moment is first checked to exist, and every Nonlin to be a real number, by
``existence.Checker`` (division by zero, logs and roots of arguments that take negative
values, non-integrable poles, growth beyond the Gaussian tail); what it cannot decide, the
particle evaluator refuses when it meets a non-finite value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import sympy as sp
from sympy.core.function import ArgumentIndexError

from tpcompiler import memory
from tpcompiler.ir import ops
from tpcompiler.ir.construct import replaced, rewrite
from tpcompiler.symbolic import numeric_search
from tpcompiler.symbolic.existence import Checker
from tpcompiler.ir.graph import Graph, ProgramError
from tpcompiler.ir.nonlinearities import EVEN, NEITHER, ODD, parity_of_function, relu, step, switching_expressions
from tpcompiler.ir import symbols
from tpcompiler.ir.ops import VEC, node_symbol, unprime
from tpcompiler.ir.rules import RuleTable
from tpcompiler.ir.symbols import NodeSymbol, Z, Zhat, monomial

#: Derivative expressions larger than this are shown as dZ^x/dZHat^v rather than inlined.
MAX_INLINE_OPS = 60
#: A derivative whose expression, as a tree, has more nodes than this has far more than
#: MAX_INLINE_OPS operations (an Add or Mul counts one per argument beyond the first, a
#: function one, an E[dZ/dZHat] atom of 6 nodes 2), so it is not inlined without being
#: counted: derivatives share subexpressions, and count_ops walks them as a tree, which for
#: mup_mlp's formulas at 5 steps was 7.9 s of 12.5.
INLINE_NODES = 2000


class Expectation(sp.Function):
    """E[...]: an unevaluated expectation over the limit random variables (a constant)."""

    nargs = 1

    @classmethod
    def eval(cls, arg):
        """Linearity for constants: E[c] = c and E[c f] = c E[f] for non-random c."""
        if not _is_random(arg):
            return arg
        if arg.is_Mul:
            const = [t for t in arg.args if not _is_random(t)]
            if const:
                return sp.Mul(*const) * cls(sp.Mul(*[t for t in arg.args if _is_random(t)]))
        return None

    @classmethod
    def of(cls, psi: sp.Expr) -> sp.Expr:
        """Expectation(psi), the same object: ``eval``'s value where it has one, else the node
        built by ``of_random`` (sympy's constructor only evaluates, and psi is no Float)."""
        value = cls.eval(psi)
        return cls.of_random(psi) if value is None else value

    @classmethod
    def of_random(cls, psi: sp.Expr) -> "Expectation":
        """E[psi] for psi a random symbol or a product of random symbols, which ``eval``
        leaves as it is: the node itself, without sympy's Function constructor (its
        evaluation, argument checks and caches cost about 0.1 ms, once per pair moment, of
        which a CNN's kernel program has one per pair of positions and layer)."""
        obj = sp.Basic.__new__(cls, psi)
        obj.nargs = _ONE_ARGUMENT  # as sympy's constructor sets it
        return obj

    def _latex(self, printer, exp=None):
        body = r"\mathbb{E}\left[%s\right]" % printer._print(self.args[0])
        return body if exp is None else r"\left(%s\right)^{%s}" % (body, exp)

    def _sympystr(self, printer):
        return "E[%s]" % printer._print(self.args[0])


_ONE_ARGUMENT = sp.FiniteSet(1)


def _is_random(expr: sp.Expr) -> bool:
    """Whether ``expr`` involves a limit random variable (a Z or ZHat symbol)."""
    return any(symbols.is_leaf_variable(s) for s in expr.free_symbols)


@dataclass
class ZDotTerm:
    """One term sigma^2 Z^y E[dZ^x/dZHat^source] of a ZDot (``coefficient`` includes sigma^2)."""

    y: str
    source: str
    coefficient: sp.Expr
    zero_reason: str | None = None

    @property
    def is_zero(self) -> bool:
        return self.coefficient == 0


@dataclass
class ZEntry:
    """The Master-theorem rule applied to one node.

    A vector's ``z`` is its recursion Z^x = f(Z^{p_1}, .., Z^{p_k}, leaf): a function of the
    Z of its ``parents`` (a Nonlin's vector arguments; the y of a MatMul's nonzero ZDot
    terms) and of the Gaussian ``leaf`` the entry introduces (Z^u of an initial vector u,
    ZHat^{Wx} of a MatMul), every expectation in it a constant.  Walking the recursion
    (derivatives by the chain rule, parities, forms in the leaves) needs nothing else."""

    key: str
    rule: str                     # init | nonlin | matmul | moment | param | input | mat
    z: sp.Expr | None = None      # Z^x (vectors) or the limit (moments)
    deps: frozenset = frozenset()  # leaves (initial vectors and MatMul keys) Z^x depends on
    family: tuple | None = None   # (matrix, transposed) for MatMul
    x: str | None = None          # MatMul input
    zdot: list[ZDotTerm] = field(default_factory=list)
    zero_reason: str | None = None  # for moments proven to vanish
    parents: tuple = ()           # vectors whose Z the recursion z reads
    leaf: sp.Symbol | None = None  # the Gaussian leaf this entry introduces


def partials(expr: sp.Expr, symbols) -> dict:
    """{s: d expr / d s} for the given symbols (the ZDot partials and the backward pass alike),
    each with its gated negative powers written finite (``gated_negative_powers``)."""
    return {s: gated_negative_powers(d) for s, d in _partials_of(expr, symbols).items()}


def _partials_of(expr: sp.Expr, symbols) -> dict:
    """{s: d expr / d s}, touching only the terms of a sum that contain s (an input layer's
    sum over d inputs would otherwise cost d^2); the derivatives of what is left are
    ``_diff``'s, the objects ``sp.diff`` returns."""
    symbols = set(symbols)
    if expr.is_Add:
        out: dict = {}
        for term in expr.args:
            for s, d in _partials_of(term, symbols & term.free_symbols).items():
                out[s] = out.get(s, sp.S.Zero) + d
        return {s: out.get(s, sp.S.Zero) for s in symbols}
    if expr.is_Mul:
        const = [f for f in expr.args if not (f.free_symbols & symbols)]
        rest = [f for f in expr.args if f.free_symbols & symbols]
        if const and len(rest) == 1:
            c = sp.Mul(*const)
            return {s: c * d for s, d in _partials_of(rest[0], symbols).items()}
    return {s: _diff(expr, s) for s in symbols}


def _positive_part_argument(b: sp.Expr):
    """a if b is relu(a) or Max(a, 0), else None."""
    if isinstance(b, relu):
        return b.args[0]
    if isinstance(b, sp.Max) and len(b.args) == 2 and sp.S.Zero in b.args:
        return b.args[0] if b.args[1] == 0 else b.args[1]
    return None


def gated_negative_powers(d: sp.Expr) -> sp.Expr:
    """d with each relu(a)^e or Max(a, 0)^e, e < 0, in a product that also holds step(a) or
    Heaviside(a) written |a|^e: equal wherever the step is not 0 (a >= 0), and finite where it
    is (a < 0), where relu(a)^e = 0^e is infinite.  d/dh relu(h)^(1/2) = step(h) relu(h)^(-1/2)/2
    is 0 for h < 0, but evaluated as 0 * inf it was NaN on half of the particles, and the limit,
    which exists (E[step(h)/(2 sqrt(h))] is finite), was refused."""
    if not d.has(step, sp.Heaviside):
        return d

    def gated(term: sp.Expr) -> sp.Expr:
        if not term.is_Mul:
            return term
        gates = {f.args[0] for f in term.args if isinstance(f, (step, sp.Heaviside))}
        rep = {f: sp.Abs(_positive_part_argument(f.base)) ** f.exp for f in term.args
               if gates and f.is_Pow and f.exp.is_negative and _positive_part_argument(f.base) in gates}
        return term.xreplace(rep) if rep else term

    terms = sp.Add.make_args(sp.expand(d, deep=False, mul=True, multinomial=False, power_exp=False, power_base=False,
                                       log=False))
    out = [gated(t) for t in terms]
    return d if all(a is b for a, b in zip(out, terms)) else sp.Add(*out)


def _diff(expr: sp.Expr, s: sp.Symbol) -> sp.Expr:
    """``sp.diff(expr, s)``, the same object, without its ``Derivative`` dispatch (about 100 us
    a call, once per tap of every convolution's pre-activation) where its result is known:
    1 for s itself, 0 for an expression without s, f'(s) (``fdiff``) for a function of one
    argument that is s itself and that sympy differentiates by ``fdiff``
    (``Function._eval_derivative`` not overridden, f' holding no Derivative), and a product
    with s in one factor by sympy's Leibniz rule (``_leibniz``); anything else by
    ``sp.diff``."""
    if expr is s:
        return sp.S.One
    if s not in expr.free_symbols:
        return sp.S.Zero
    if expr.is_Mul and expr.is_commutative:
        holding = [k for k, a in enumerate(expr.args) if s in a.free_symbols]
        if len(holding) == 1:
            return _leibniz(expr.args, holding[0], _diff(expr.args[holding[0]], s))
    if (isinstance(expr, sp.Function) and expr.args == (s,)
            and type(expr)._eval_derivative is sp.Function._eval_derivative):
        try:
            derivative = expr.fdiff(1)
        except ArgumentIndexError:
            return sp.diff(expr, s)
        if not derivative.has(sp.Derivative):
            return derivative
    return sp.diff(expr, s)


#: Functions at whose switching points (their arguments' zeros, a Piecewise condition's sides)
#: a function may jump while sympy's derivative of it shows no Dirac delta.
_SWITCHES = (sp.Piecewise, sp.Abs, sp.sign)


def refuse_lost_jump(key: str, expr: sp.Expr, s: sp.Symbol, derivative: sp.Expr) -> None:
    """A clear error where ``derivative`` = d expr/ds misses a jump of expr in s (docs/DESIGN.md
    2.2: a ZDot coefficient E[dZ^x/dZHat^v] is a distributional derivative, by Stein's lemma,
    and a jump of size J at s = a adds J delta(s - a)).  sympy gives the delta for Heaviside
    and sign, but differentiates a Piecewise piece by piece, Abs(s)/s as sign(s)/s - Abs(s)/s^2
    and atan(1/s) as -1/(s^2 + 1): all 0 at the jump, and the limit of W^T f(W u) was 0
    instead of 0.399 for a Piecewise step.  floor and ceiling have no derivative sympy writes.
    A jump is sought numerically (``numeric_search.jump_point``) at the zeros in s of the
    switching expressions and of denominators, at three draws of the other symbols."""
    if derivative.has(sp.Derivative):
        raise ProgramError(f"instruction {key!r}: the derivative of {expr} in {s} (a ZDot coefficient of the "
                           "Master theorem) is not known to sympy, which leaves it unevaluated (as for floor and "
                           "ceiling, which jump at every integer); write the function without what it cannot "
                           "differentiate")
    if derivative.has(sp.DiracDelta):
        return
    switching = _switching_expressions(expr, s)
    at = numeric_search.jump_point(expr, switching, s) if switching else None
    if at is not None:
        others = sorted(map(str, expr.free_symbols - {s}))
        # (a jump's place that depends on the other variables was found at one random draw of them)
        where = (f"at {s} = {at:.6g}" if not others else
                 f"in {s} (at {s} = {at:.6g} for one random draw of {', '.join(others)}, on which its place depends)")
        raise ProgramError(f"instruction {key!r}: {expr} jumps {where}, and its derivative as sympy "
                           "writes it has no Dirac delta there, which the Master theorem's ZDot terms need; "
                           "write the jump with Heaviside (Heaviside(t - a) jumps by 1 at t = a), whose derivative "
                           "sympy knows")


def _switching_expressions(expr: sp.Expr, s: sp.Symbol) -> list:
    """Expressions whose zeros in s are where expr may jump: those of its switching
    functions (``switching_expressions``) and the bases of its negative powers."""
    out = [g for f in expr.atoms(*_SWITCHES) for g in switching_expressions(f)]
    out += [p.base for p in expr.atoms(sp.Pow) if p.exp.is_negative]
    return [g for g in out if s in g.free_symbols]


def _leibniz(factors: tuple, k: int, derivative: sp.Expr) -> sp.Expr:
    """d/ds of the product of ``factors`` as sympy's ``diff`` builds it (the general Leibniz
    rule of ``Mul._eval_derivative_n_times`` at order 1: the sum over the factors of the
    product with that factor differentiated), for s in factor k only (d/ds of it:
    ``derivative``; of every other factor: 0): a Flatten readout's sum over positions of
    c m_p x_p, a backward pass's step(h) dy, without sympy's Derivative dispatch per factor.
    (``1 *``: the multinomial coefficient sympy multiplies each term by.)"""
    return sp.Add(*[1 * sp.Mul(*factors[:j], derivative if j == k else sp.S.Zero, *factors[j + 1:])
                    for j in range(len(factors))])


def _sum_signature(sigs: list[dict]) -> dict:
    """Signature of a sum: under a block, a sum has a parity if all its terms share it."""
    seen: dict = {}
    count: dict = {}
    for sig in sigs:
        for b, p in sig.items():
            seen.setdefault(b, set()).add(p)
            count[b] = count.get(b, 0) + 1
    out = {}
    for b, ps in seen.items():
        if count[b] < len(sigs):
            ps = ps | {EVEN}
        out[b] = ps.pop() if len(ps) == 1 else NEITHER
    return {b: p for b, p in out.items() if p != EVEN}


def _product_signature(sigs: list[dict]) -> dict:
    out: dict = {}
    for sig in sigs:
        for b, p in sig.items():
            q = out.get(b, EVEN)
            out[b] = NEITHER if NEITHER in (p, q) else p * q
    return {b: p for b, p in out.items() if p != EVEN}


def expr_signature(expr: sp.Expr, symbol_signature) -> dict:
    """Parities of ``expr`` under negation of every independent block at once.

    Returns {block: ODD | NEITHER}; blocks not listed leave ``expr`` unchanged (EVEN).  ODD
    and EVEN are proofs (f(-s) = -f(s) or f(s) when the block's leaves are negated);
    NEITHER means "not proven".  The rules are structural: sums keep a parity their terms
    share, products multiply parities, odd/even functions act on odd arguments."""
    if expr.is_Number or isinstance(expr, Expectation):
        return {}
    if expr.is_Symbol:
        return symbol_signature(expr)
    if expr.is_Add:
        return _sum_signature([expr_signature(t, symbol_signature) for t in expr.args])
    if expr.is_Mul:
        return _product_signature([expr_signature(t, symbol_signature) for t in expr.args])
    if expr.is_Pow:
        base, exp = expr.args
        sb, se = expr_signature(base, symbol_signature), expr_signature(exp, symbol_signature)
        if se:
            return {b: NEITHER for b in set(sb) | set(se)}
        if exp.is_integer:
            return {b: (NEITHER if p == NEITHER else (EVEN if exp.is_even else ODD) if p == ODD else p)
                    for b, p in sb.items() if not (p == ODD and exp.is_even)}
        return {b: NEITHER for b in sb}
    args = [expr_signature(a, symbol_signature) for a in expr.args]
    if isinstance(expr, sp.Function) and len(expr.args) == 1:
        fp = parity_of_function(expr.func)
        return {b: (fp if p == ODD else NEITHER) for b, p in args[0].items() if not (p == ODD and fp == EVEN)}
    return {b: NEITHER for sig in args for b in sig}



def parity_in(expr: sp.Expr, x: sp.Symbol) -> int:
    """Parity of ``expr`` under x -> -x: EVEN or ODD when proven by the structural rules of
    ``expr_signature`` (the one implementation of parity), else NEITHER."""
    return expr_signature(expr, lambda s: {x: ODD} if s == x else {}).get(x, EVEN)


class ZProgram:
    """The Master-theorem derivation of one program graph."""

    def __init__(self, graph: Graph, drop_zdot: bool = False):
        graph.validate()
        self.graph = graph
        #: Ablation for tests and demonstrations: derive as if every ZDot were 0 (the
        #: "gradient independence" assumption applied blindly).
        self.drop_zdot = drop_zdot
        self.order = graph.order()
        self.entries: dict[str, ZEntry] = {}
        self.families: dict[tuple, list[str]] = {}
        self._family_position: dict[tuple, dict[str, int]] = {}  # family -> {member: its index}
        #: {leaf symbol: independent block} of every Gaussian leaf (initial Z, ZHat).
        self.leaf_blocks: dict[sp.Symbol, str] = {}
        self._signature: dict = {}
        self._dsignature: dict = {}
        self._uncorrelated: dict = {}  # node -> _parity_sets
        self._derivative: dict = {}
        self._derivative_displays: dict = {}  # (x, source) -> derivative_display
        self._partials: dict = {}
        self._init_block = self._init_blocks()
        self.checker = Checker(self)
        for key in self.order:
            memory.tick()
            entry = self.entries[key] = MASTER(graph.op(key))(self, key, graph.op(key))
            if entry.leaf is not None:
                self.leaf_blocks[entry.leaf] = self.block_of_leaf(key)

    # -- leaves and blocks --------------------------------------------------------------
    def _init_blocks(self) -> dict[str, str]:
        """Initial vectors grouped into independent blocks (connected by covariances)."""
        g = nx.Graph()
        inits = self.graph.keys_of(ops.InitVec)
        g.add_nodes_from(inits)
        for pair, c in self.graph.init_cov.items():
            if c != 0:
                g.add_edge(*pair)
        block = {}
        for comp in nx.connected_components(g):
            name = "init:" + min(comp, key=lambda k: self.graph.g.nodes[k]["index"])
            for k in comp:
                block[k] = name
        for k in self.graph.keys_of(ops.InputLayer):  # one block per input matrix
            block[k] = "init:" + self.graph.args(k)[0]
        return block

    def is_initial(self, key: str) -> bool:
        """Whether ``key`` is an initial Gaussian (an initial vector or an input layer)."""
        return key in self._init_block

    def block_of_leaf(self, leaf: str) -> str:
        """The independent Gaussian block of a leaf: its init group or its ZHat family."""
        if leaf in self._init_block:
            return self._init_block[leaf]
        mat, _, tr = self.graph.matmul_parts(leaf)
        return f"family:{mat}{'.T' if tr else ''}"

    def describe_block(self, block: str) -> str:
        """Words for a block, used to say why an expectation vanishes."""
        kind, name = block.split(":", 1)
        if kind == "family":
            return f"the ZHat family of {name}, independent of the rest"
        if self.graph.kind(name) == ops.INPUT_MAT:  # input layers' block is named by their matrix
            return f"the input matrix {name}, independent of the rest"
        members = self._block_members.get(block, [])
        return f"the initial Gaussian{'s' if len(members) > 1 else ''} {', '.join(members)}, independent of the rest"

    @cached_property
    def _block_members(self) -> dict[str, list]:
        """{block: its initial Gaussians, sorted} (``describe_block``, asked once per vanishing
        ZDot term: a Flatten readout's P blocks of one vector each)."""
        members: dict = {}
        for k, b in sorted(self._init_block.items()):
            members.setdefault(b, []).append(k)
        return members

    # -- parity under negation of the independent blocks ----------------------------------
    def signature(self, key: str) -> dict:
        """{block: ODD | NEITHER} of Z^key (absent blocks: EVEN), memoised per node: the
        signature of its recursion z, each leaf odd in its own block.  Scalars are
        deterministic constants (no signature)."""
        memo = self._signature.get(key)
        if memo is not None:
            return memo
        z = self.entries[key].z
        sig = {} if z is None else expr_signature(z, self._symbol_signature)
        self._signature[key] = sig
        return sig

    def parity(self, key: str, block: str) -> int:
        return self.signature(key).get(block, EVEN)

    def _symbol_signature(self, s: sp.Symbol) -> dict:
        block = self.leaf_blocks.get(s)
        if block is not None:
            return {block: ODD}
        if symbols.is_z(s):
            return self.signature(s.key)
        return {}

    def zero_block(self, zexpr: sp.Expr) -> str | None:
        """A block under whose negation ``zexpr`` is odd (so E[zexpr] = 0), or None."""
        return _proof_block(expr_signature(zexpr, self._symbol_signature))

    def provably_uncorrelated(self, a: str, b: str) -> bool:
        """Whether E[Z^a Z^b] = 0 is proven (then ZHat^{Wa}, ZHat^{Wb} are independent): the
        signature of Z^a Z^b (``zero_block``) is odd under a block in which one of them is odd
        and which the other does not read.  From each node's ``_parity_sets``, without a memo
        per pair (the kernel engine asks for every pair of positions of a CNN)."""
        (odd_a, read_a), (odd_b, read_b) = self._parity_sets(a), self._parity_sets(b)
        return bool(odd_a - read_b or odd_b - read_a)

    def _parity_sets(self, key: str) -> tuple:
        """(the blocks under which Z^key is odd, every block in its signature), memoised."""
        found = self._uncorrelated.get(key)
        if found is None:
            signature = self.signature(key)
            found = self._uncorrelated[key] = (frozenset(b for b, p in signature.items() if p == ODD),
                                               frozenset(signature))
        return found

    def derivative_zero_block(self, x: str, source: str) -> str | None:
        """A block proving E[dZ^x/dZHat^source] = 0 (the derivative is odd under it)."""
        return _proof_block(self.derivative_signature(x, source))

    def derivative_signature(self, x: str, source: str) -> dict:
        """Signature of dZ^x/dZHat^source, proven two ways and combined: from the parity p
        of Z^x (the derivative in a leaf of the negated block has parity -p, else p), and
        term by term along the chain rule."""
        key = (x, source)
        memo = self._dsignature.get(key)
        if memo is not None:
            return memo
        sig_x = self.signature(x)
        src = self.block_of_leaf(source)
        whole = {b: p for b, p in sig_x.items() if p != NEITHER}
        p_src = sig_x.get(src, EVEN)
        if p_src != NEITHER:
            whole[src] = -p_src
        chain = self._chain_signature(x, source)
        combined = {}
        for b in set(sig_x) | set(chain) | {src}:
            ps = {whole.get(b, NEITHER if b in sig_x else EVEN), chain.get(b, EVEN)}
            combined[b] = ODD if ODD in ps else (EVEN if EVEN in ps else NEITHER)
        combined = {b: p for b, p in combined.items() if p != EVEN}
        self._dsignature[key] = combined
        return combined

    def _chain_signature(self, x: str, source: str) -> dict:
        """Signature of dZ^x/dZHat^source = sum_p dZ^x/dZ^p dZ^p/dZHat^source (x != source)."""
        if x == source:
            return {}
        parts = [_product_signature([expr_signature(self.partial(x, a), self._symbol_signature),
                                     self.derivative_signature(a, source)])
                 for a in self.parents_on(x, source)]
        return _sum_signature(parts) if parts else {}

    def parents_on(self, x: str, source: str) -> list[str]:
        """The parents of x whose Z depends on the leaf ``source`` (the chain rule's terms)."""
        return [a for a in self.entries[x].parents if source in self.entries[a].deps]

    def partial(self, key: str, arg: str) -> sp.Expr:
        """dZ^key/dZ^arg of a vector's recursion for a parent ``arg`` (a Nonlin's partial
        derivative; a MatMul's ZDot coefficient of Z^arg), all parents at once, cached."""
        if (key, arg) not in self._partials:
            entry = self.entries[key]
            zs = [Z(p) for p in entry.parents]
            found = partials(entry.z, zs)
            for a in zs:  # in the parents' order: the first jump refused is the same under any hash seed
                if entry.rule == "nonlin":
                    refuse_lost_jump(key, entry.z, a, found[a])
                self._partials[(key, a.key)] = found[a]
        return self._partials[(key, arg)]

    # -- rules: the Master theorem per op (the MASTER table below) ------------------------
    def _nonlin(self, key: str, op: ops.Nonlin) -> ZEntry:
        """ZNonlin: Z^{phi(x..; theta..)} = phi(Z^x..; theta..)."""
        vecs = tuple(dict.fromkeys(self.graph.vector_args(key)))
        z = replaced(op.expr, {node_symbol(a): Z(a) for a in vecs})
        deps = frozenset().union(*(self.entries[a].deps for a in vecs))
        entry = self.entries[key] = ZEntry(key, "nonlin", z, deps, parents=vecs)
        self.checker.risky(key)  # memoised in program order (no deep recursion later)
        self.checker.check_nonlin(key)
        return entry

    def _matmul(self, key: str) -> ZEntry:
        """ZMatMul: Z^{Wx} = ZHat^{Wx} + ZDot^{Wx} with
        ZDot^{Wx} = sigma_W^2 sum_{v = W^T y before Wx} Z^y E[dZ^x/dZHat^v]."""
        mat, x, tr = self.graph.matmul_parts(key)
        sigma = self.graph.op(mat).sigma
        entry = ZEntry(key, "matmul", family=(mat, tr), x=x, leaf=Zhat(key))
        self.entries[key] = entry
        xdeps = self.entries[x].deps
        terms = []
        for source in [] if self.drop_zdot else self._family_members_in((mat, not tr), xdeps):
            y = self.entries[source].x
            reason_block = self.derivative_zero_block(x, source)
            if reason_block is not None:
                terms.append(ZDotTerm(y, source, sp.S.Zero, f"odd in {self.describe_block(reason_block)}"))
            else:
                # recursion form: the coefficient names the derivative; display() inlines it
                terms.append(ZDotTerm(y, source, sigma**2 * Expectation(sp.Derivative(Z(x), Zhat(source), evaluate=False))))
        live = [t for t in terms if not t.is_zero]
        entry.zdot = terms
        entry.z = Zhat(key) + sp.Add(*[t.coefficient * Z(t.y) for t in terms])
        entry.deps = frozenset([key]).union(*(self.entries[t.y].deps for t in live))
        entry.parents = tuple(dict.fromkeys(t.y for t in live))
        members = self.families.setdefault((mat, tr), [])
        self._family_position.setdefault((mat, tr), {})[key] = len(members)
        members.append(key)
        self.checker.risky(key)
        self.checker.check_second_moment(key, x)
        return entry

    def _family_members_in(self, family: tuple, deps: frozenset) -> list:
        """The members of ``family`` (MatMuls of one matrix, one orientation) in ``deps``, in
        the family's order: the ZHats a vector's Z depends on, of which the ZDot sums over.
        Read from whichever is smaller: a convolution's filter tap is one family of a
        MatMul per position, and each backward vector depends on the few of its window
        (2-D 32 x 32: 8.7 million members visited for 17,672 MatMuls)."""
        members = self.families.get(family, [])
        if len(deps) >= len(members):
            return [m for m in members if m in deps]
        position = self._family_position[family]
        return sorted((d for d in deps if d in position), key=position.__getitem__)

    def _moment(self, key: str, op: ops.Moment) -> ZEntry:
        """ZMoment: lim theta = E[psi(Z^x..)], 0 when psi is odd under an independent block."""
        factors = sp.Mul.make_args(op.expr)
        zs = [self._vector_z(f) for f in factors]
        random_product = None not in zs  # psi is the product of their Z symbols
        if random_product:  # a pair moment's Z^a Z^b': the product built directly
            psi = monomial(*zs)
        else:
            psi = rewrite(op.expr, self._vector_z, {})
        # an odd function has expectation 0 only if it is integrable: check existence first
        self.checker.check_moment(key, psi)
        block = self.zero_block(psi)
        if block is not None:
            return ZEntry(key, "moment", sp.S.Zero, frozenset(), zero_reason=f"odd in {self.describe_block(block)}")
        return ZEntry(key, "moment", Expectation.of_random(psi) if random_product else Expectation.of(psi), frozenset())

    def _vector_z(self, e: sp.Basic):
        """Z^x (primed: at the second input) for the symbol of a program vector x, else None."""
        if isinstance(e, NodeSymbol) and self.graph.kind(e.key) == VEC:
            return Z(e.key, e.primed)
        return None

    # -- derivatives dZ^x/dZHat^v (chain rule through the recursion) --------------------
    def derivative(self, x: str, source: str) -> sp.Expr:
        """dZ^x/dZHat^source as an expression in Z symbols, inlined along the recursion by
        the chain rule, sum_p dZ^x/dZ^p dZ^p/dZHat^source (ZHats are leaves, expectations
        constants)."""
        memo = self._derivative.get((x, source))
        if memo is not None:
            return memo
        if source not in self.entries[x].deps:
            d = sp.S.Zero
        elif x == source:
            d = sp.S.One
        else:
            d = sp.Add(*[self.partial(x, a) * self.derivative(a, source) for a in self.parents_on(x, source)])
        self._derivative[(x, source)] = d
        return d

    def derivative_display(self, x: str, source: str) -> sp.Expr:
        """The derivative inlined (inner ZDot coefficients too) when small, else the
        unevaluated dZ^x/dZHat^source.  Memoised: each inlined derivative reads the displays
        of inner ones, so without the memo a residual network's formulas made 2^(depth - 2)
        calls (resmlp depth 16: 16,384)."""
        memo = self._derivative_displays
        found = memo.get((x, source))
        if found is None:
            d = self.derivative(x, source)
            # (displaying replaces E[dZ/dZHat] atoms by E[displays]: never fewer operations)
            small = not symbols.larger_than(d, INLINE_NODES)
            if small:
                d = self.display(d)
                small = not symbols.larger_than(d, INLINE_NODES) and sp.count_ops(d) <= MAX_INLINE_OPS
            found = memo[(x, source)] = d if small else sp.Derivative(Z(x), Zhat(source), evaluate=False)
        return found

    def display(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every E[dZ^x/dZHat^v] written out by derivative_display."""
        rep = {}
        for e in expr.atoms(Expectation):
            d = e.args[0]
            if isinstance(d, sp.Derivative):
                x, v = d.expr.key, d.variables[0].key
                rep[e] = Expectation(self.derivative_display(x, v))
        return expr.xreplace(rep) if rep else expr

    # -- convenient views ---------------------------------------------------------------
    @cached_property
    def vectors(self) -> list[str]:
        return [k for k in self.order if self.graph.kind(k) == VEC]

    def zdot_terms(self, key: str, nonzero: bool = True) -> list[ZDotTerm]:
        terms = self.entries[key].zdot
        return [t for t in terms if not t.is_zero] if nonzero else list(terms)

    def nonzero_zdot_count(self) -> int:
        return sum(len(self.zdot_terms(k)) for k in self.order)


def _proof_block(signature: dict) -> str | None:
    """The block to cite for a vanishing expectation among those under which the function is
    odd: a ZHat family first (the usual, cheapest proof), then by name; None if none."""
    odd = [b for b, p in signature.items() if p == ODD]
    return min(odd, key=lambda b: (not b.startswith("family:"), b)) if odd else None


def _leaf(key: str, kind: str) -> ZEntry:
    return ZEntry(key, kind, Z(key), frozenset([key]), leaf=Z(key))


#: The Master theorem per op (docs/DESIGN.md 2.2): rule(zp, key, op) -> ZEntry.
MASTER = RuleTable("Master theorem", domain=ops.INSTRUCTIONS)
MASTER.register(ops.InitVec, ops.InputLayer)(lambda zp, key, op: _leaf(key, "init"))  # ZInit
MASTER.register(ops.InitMat, ops.InputMat)(lambda zp, key, op: ZEntry(key, "mat"))
MASTER.register(ops.Param, ops.WidthPower)(lambda zp, key, op: ZEntry(key, "param", node_symbol(key)))
MASTER.register(ops.Input)(lambda zp, key, op: ZEntry(key, "input", node_symbol(key)))
MASTER.register(ops.Nonlin)(lambda zp, key, op: zp._nonlin(key, op))
MASTER.register(ops.MatMul)(lambda zp, key, op: zp._matmul(key))
MASTER.register(ops.Moment)(lambda zp, key, op: zp._moment(key, op))


def derive(graph: Graph, drop_zdot: bool = False) -> ZProgram:
    """Apply the Master theorem to every node of ``graph``."""
    return ZProgram(graph, drop_zdot=drop_zdot)
