"""Instruction set of NETSOR-transpose programs (docs/DESIGN.md 2.1).

Each op is a small frozen dataclass.  Its meaning is stated once, here, and read by every
stage: the finite-width interpreter (what the instruction computes at width n), the symbolic
stage (its Master-theorem rule, docs/DESIGN.md 2.2) and the code generators (which print the same
sympy expressions).

Types of variables: ``VEC`` (n-vector, O(1) coordinates), ``MAT`` (n x n matrix) and
``SCALAR`` (a number with a deterministic limit).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import sympy as sp
from sympy.core.symbol import Str

from tpcompiler.ir.symbols import AT_SECOND_INPUT, NodeSymbol, key_tex

VEC, MAT, SCALAR, INPUT_MAT = "Vec", "Mat", "Scalar", "InputMat"


def node_symbol(key: str) -> NodeSymbol:
    """The sympy symbol standing for node ``key`` inside Nonlin and Moment expressions."""
    return NodeSymbol(key)


def primed_symbol(key: str) -> NodeSymbol:
    """The symbol for node ``key`` evaluated at the second input xi' (pair moments only)."""
    return NodeSymbol(key, True)


def unprime(symbol: NodeSymbol) -> tuple[str | None, bool]:
    """(node key, is_primed) of a program variable; (None, False) for any other symbol."""
    return (symbol.key, symbol.primed) if isinstance(symbol, NodeSymbol) else (None, False)


class Record:
    """An instruction's (or the readout's) record: frozen, of immutable values (sympy
    expressions, numbers, strings, tuples), so it is its own copy: ``Graph.copy`` (a deep
    copy; the backward pass and tp.compile copy a program of 10^5 instructions) shares the
    records instead of rebuilding every sympy expression in them, and one record always has
    one fingerprint (kernels/stored.py reads it back by identity)."""

    __slots__ = ()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class InitVec(Record):
    """Initial vector: coordinates iid N(0, var); jointly Gaussian with other initial vectors
    through the program's covariance table.  Z^x is that Gaussian (ZInit)."""

    var: sp.Expr
    #: Trained parameter?  Its NTK contribution is ntk_weight * E[du du'] with du = sqrt(n)
    #: df/du; the default weight ``var`` means the trained parameter is u / sqrt(var) ~ N(0, 1)
    #: (neural-tangents' NTK parametrization).  ``ntk_weight`` None means that default.
    trainable: bool = True
    ntk_weight: sp.Expr | None = None
    kind = VEC

    def weight(self) -> sp.Expr:
        return sp.S.Zero if not self.trainable else (self.var if self.ntk_weight is None else self.ntk_weight)


@dataclass(frozen=True)
class InitMat(Record):
    """n x n matrix with iid N(0, sigma^2 / n) entries.  ``sigma`` is a sympy expression
    (usually the symbol of a Param) so formulas stay symbolic in it."""

    sigma: sp.Expr
    #: NTK weight of the matrix: contribution ntk_weight * sum_{uses a,b} E[r_a r_b'] E[c_a c_b']
    #: (row and column vectors of each use's gradient outer product); default sigma^2: the
    #: trained parameter is w = sqrt(n) W / sigma ~ N(0, 1) (NTK parametrization).
    trainable: bool = True
    ntk_weight: sp.Expr | None = None
    kind = MAT

    def weight(self) -> sp.Expr:
        return sp.S.Zero if not self.trainable else (self.sigma**2 if self.ntk_weight is None else self.ntk_weight)


@dataclass(frozen=True)
class InputMat(Record):
    """An n x k matrix U of iid N(0, 1) entries: k initial vectors (its columns) that act on
    finite-dimensional inputs (an input layer, a filter on input channels).  Only InputLayer
    instructions read it.  NTK contribution: ntk_weight per column (default 1: the columns
    are the trained N(0, 1) parameters, neural-tangents' NTK parametrization)."""

    k: int
    trainable: bool = True
    ntk_weight: sp.Expr | None = None
    #: The trained tensor of this layer is scale * U (entries N(0, scale^2)), when the
    #: program multiplies the layer by scale (h = sigma U xi / sqrt(d)); training reads it.
    scale: sp.Expr = sp.S.One
    kind = INPUT_MAT

    def weight(self) -> sp.Expr:
        return sp.S.Zero if not self.trainable else (sp.S.One if self.ntk_weight is None else self.ntk_weight)


@dataclass(frozen=True)
class InputLayer(Record):
    """``(1/sqrt(norm)) sum_i s_i U[:, columns[i]]``: the input matrix U (first argument)
    applied to scalars s (the other arguments: input coordinates or Params).

    It is an initial Gaussian whose covariance depends on the input: for two such vectors
    A, B of the same U, Cov(Z^A, Z^B) = sum over matching columns of s^A_i s^B_k /
    sqrt(norm_A norm_B); vectors of different matrices are independent (docs/DESIGN.md 2.1: an
    input layer is d initial vectors, kept as one node so that d never enters the symbolic
    work)."""

    columns: tuple
    norm: int
    kind = VEC


@dataclass(frozen=True)
class Param(Record):
    """A named scalar constant with a numeric value (hyperparameters, matrix scales)."""

    value: float
    kind = SCALAR


@dataclass(frozen=True)
class WidthPower(Record):
    """The scalar n^exponent.  Parametrizations put explicit powers of the width into
    programs (an SGD step of an abc-parametrized network, docs/DESIGN.md 2.4); the finite-width
    interpreter uses n^e, the limit is 1 for e = 0 and 0 for e < 0 (e > 0 diverges: the
    parametrization is unstable and the pass that built the program refuses it)."""

    exponent: sp.Rational
    kind = SCALAR

    def limit(self) -> float:
        if self.exponent > 0:
            raise ValueError(f"n^{self.exponent} has no finite limit")
        return 1.0 if self.exponent == 0 else 0.0


@dataclass(frozen=True)
class Input(Record):
    """Coordinate ``index`` of the program's finite-dimensional input ``group``.

    A program with inputs is a template over one input xi; evaluation binds xi to each row
    of a data matrix (``ir.instantiate``)."""

    group: str
    index: int
    kind = SCALAR


@dataclass(frozen=True)
class MatMul(Record):
    """``W x`` or, with ``transposed``, ``W^T x``.  Arguments: (matrix, vector).
    Master theorem: Z^{Wx} = ZHat^{Wx} + ZDot^{Wx} (docs/DESIGN.md 2.2)."""

    transposed: bool
    kind = VEC


@dataclass(frozen=True)
class Nonlin(Record):
    """Coordinatewise ``phi(x_1..x_k; theta_1..theta_l)``; ``expr`` is a sympy expression in
    the node symbols of its arguments.  Z^{phi(..)} = phi(Z^{x_1}..; lim theta..)."""

    expr: sp.Expr
    kind = VEC


@dataclass(frozen=True)
class Moment(Record):
    """``theta = (1/n) sum_a psi(x_1a..x_ka; thetas)``; limit E psi(Z^{x_1}..).

    With ``pair`` set, ``expr`` may contain primed symbols: vectors evaluated at a second
    input xi'.  Such a pair moment (a kernel entry) may only be read by outputs."""

    expr: sp.Expr
    pair: bool = False
    kind = SCALAR


@dataclass(frozen=True)
class Readout(Record):
    """The network output f(xi) = sigma / sqrt(n) sum_a v_a x_a + bias * beta (docs/DESIGN.md 2.3).

    Not an instruction (its limit is a Gaussian process, not a deterministic scalar): the
    kernel and training passes read it.  ``vector`` is x, ``readout`` the initial vector v,
    ``beta`` ~ N(0, 1) a scalar bias parameter whose NTK contribution is ``bias_weight``
    (bias^2 in NTK parametrization, 1 in standard)."""

    vector: str
    readout: str
    sigma: sp.Expr
    bias: sp.Expr | None = None
    bias_weight: sp.Expr | None = None
    others: tuple = ()   # readout vectors of outputs 2..K (a K-dimensional output)

    @property
    def readouts(self) -> tuple:
        return (self.readout,) + tuple(self.others)


class DirectFunction(sp.Function):
    """A function without evaluation rules (InputCov; the kernel backend's E1, E2 and
    TemplateCall), each call built as a plain sympy node.  sympy's Function constructor
    evaluates, caches (twice), checks the number of arguments and makes a set of the allowed
    numbers on every call, several times the cost of the node itself, and a CNN's derivation
    builds calls per pair of positions; with no evaluation rules, the node is all there is to
    build (the same object: equal arguments, equal calls)."""

    def __new__(cls, *args, **options):
        allowed = cls._direct_nargs()
        if allowed.is_FiniteSet and len(args) not in allowed:
            raise TypeError(f"{cls.__name__} takes {allowed} arguments ({len(args)} given)")
        obj = sp.Basic.__new__(cls, *[a if isinstance(a, sp.Basic) else sp.sympify(a) for a in args])
        obj.nargs = allowed  # as sympy's constructor sets it
        return obj

    @classmethod
    def _direct_nargs(cls):
        """The set of allowed numbers of arguments (sympy's ``nargs`` of an instance), made
        once per class."""
        found = cls.__dict__.get("_nargs_set")
        if found is None:
            found = sp.FiniteSet(*cls._nargs) if cls._nargs else sp.Naturals0
            setattr(cls, "_nargs_set", found)
        return found


class InputCov(DirectFunction):
    """Cov(Z^a, Z^b) of two input layers as one symbol-free atom: InputCov(Str(a), Str(b),
    prime_a, prime_b).  Used where the explicit sum over input coordinates (d terms) would
    only slow symbolic work down; ``Graph.expand_input_cov`` writes it out.  Stated real and
    commutative: sympy cannot deduce either from the arguments (names), and kept it apart in
    products as a factor of unknown commutativity."""

    nargs = 4
    is_real = True
    is_commutative = True
    #: the covariances made by the constructor, by class and arguments with their types (so
    #: that 0, False and 0.0 are three keys): one object per covariance while it is in use,
    #: as sympy's cache of calls kept them while they stayed in it.  A stored derivation
    #: pickles the features, which share them, and the same bytes need the same sharing
    #: whatever was derived before
    _made = weakref.WeakValueDictionary()

    def __new__(cls, *args, **options):
        args = tuple(a if isinstance(a, sp.Basic) else sp.sympify(a) for a in args)
        key = (cls, tuple((type(a), a) for a in args))
        found = cls._made.get(key)
        if found is None:
            found = cls._made[key] = super().__new__(cls, *args, **options)
        return found

    def _latex(self, printer):
        a, b, pa, pb = self.args
        side = lambda p: AT_SECOND_INPUT if p else ""  # noqa: E731
        return r"\mathrm{Cov}(Z^{%s}%s, Z^{%s}%s)" % (key_tex(str(a)), side(pa), key_tex(str(b)), side(pb))


def input_cov(a, b, prime_a, prime_b) -> InputCov:
    """InputCov(a, b, prime_a, prime_b) with a and b in name order when both are at one input:
    Cov(Z^a, Z^b) = Cov(Z^b, Z^a) there, and one atom per covariance lets the terms of (i, j)
    and (j, i) of a kernel's diagonal be one term."""
    a, b = (a if isinstance(a, sp.Basic) else Str(a)), (b if isinstance(b, sp.Basic) else Str(b))
    prime_a, prime_b = sp.Integer(prime_a), sp.Integer(prime_b)
    if prime_a == prime_b and a.name > b.name:
        a, b = b, a
    return InputCov(a, b, prime_a, prime_b)


#: Every instruction type a program graph may hold (Readout is not an instruction).
INSTRUCTIONS = (InitVec, InitMat, InputMat, InputLayer, Param, WidthPower, Input, MatMul, Nonlin, Moment)

#: The random initial tensors: each node is an independent draw, so two equal ops are two
#: different variables (``Graph.intern`` refuses them).  They are also the trained parameters
#: (each has ``weight()``, its NTK weight).
INITIAL = (InitVec, InputMat, InitMat)

#: Leaves a program declares by name: the initial tensors, hyperparameters and input
#: coordinates.  Two declarations are two variables even when their ops are equal (two
#: hyperparameters of value 1 are still two symbols), so ``Graph.add`` never offers them for
#: sharing; every other op is a function of its op and arguments, and equal requests share one
#: node.
DECLARATIONS = INITIAL + (Param, Input)

#: Instructions whose result is a vector (the nodes backward and SGD passes walk).
VECTOR_OPS = tuple(t for t in INSTRUCTIONS if t.kind == VEC)
