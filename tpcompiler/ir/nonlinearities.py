"""Coordinatewise nonlinearities: the single source of truth for their meaning.

Every nonlinearity is a sympy expression (docs/DESIGN.md 2.1: phi must be sympy so it can be
differentiated symbolically).  Functions that sympy has no name for (relu, step, sigmoid,
gelu, softplus) are defined here as sympy ``Function`` classes with their derivatives, so
that formulas print readably (``relu(Z^h)`` rather than ``Max(0, Z^h)``).

Each built-in is one ``Nonlinearity`` record in ``REGISTRY``, read by every stage:
  * the DSL looks it up by name (``builtin``; ``tp.phi(name)``);
  * the symbolic stage differentiates through the sympy function and asks its parity;
  * the numpy lowering (finite-width interpreter, particle evaluator) uses its numpy
    implementation (``NUMPY_FUNCTIONS``);
  * the Numba code generator uses its one-line scalar definition (``SCALAR_SOURCE``);
  * the existence checks' numeric search evaluates it in multiprecision (``MPMATH_FUNCTIONS``).
Adding a nonlinearity is adding one record (and, for speed, a closed form of its bivariate
Gaussian expectations in ``tpcompiler.expectations``; without one, quadrature is used).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mpmath
import numpy as np
import scipy.special
import sympy as sp

from tpcompiler.ir.symbols import CompilerSymbol
from tpcompiler.printing.latex import function_latex

SQRT2 = sp.sqrt(2)


class _Printed:
    r"""LaTeX of a custom function: \operatorname{name}(x), and its powers
    \operatorname{name}^{k}(x) (sympy passes ``exp`` when it prints f(x)**k).  Each is real at
    a real argument, which sympy is told: without it, the derivative of abs(relu(x)) was
    written with re(relu(x)) and im(relu(x)), which the generated code cannot print and the
    particles evaluated as 0/0."""

    def _latex(self, printer, exp=None):
        return function_latex(type(self).__name__, printer, self.args, exp)

    def _eval_is_real(self):
        return True if self.args[0].is_real else None


class relu(_Printed, sp.Function):
    """relu(x) = max(x, 0); relu'(x) = step(x)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sp.Max(x, 0)
        if x.is_Add:
            # A sum's sign from its terms' signs, term by term, stopping at the first
            # undecided one: sympy's x.is_nonnegative asks every assumption of every term of a
            # new sum (a CNN's pre-activation, a window of ZHats: 0.7 s of its derivation), and
            # decides the sum only where its terms share a sign, apart from sums of one
            # variable (x - 1 for x >= 1), which stay relu(...), whose value is the same.
            # A term c Z of a compiler symbol (real, of either sign) decides nothing, and
            # asking sympy so costs half a millisecond per new term.
            if any(_of_either_sign(t) for t in x.args):
                return None
            if all(t.is_nonnegative for t in x.args):
                return x
            if all(t.is_nonpositive for t in x.args):
                return sp.S.Zero
            return None
        if x.is_nonnegative:
            return x
        if x.is_nonpositive:
            return sp.S.Zero

    def fdiff(self, argindex=1):
        return step(self.args[0])



def _of_either_sign(t: sp.Expr) -> bool:
    """Whether t is a compiler symbol (``ir.symbols``: real, with no other assumption) times a
    nonzero number, so that sympy can prove neither t >= 0 nor t <= 0."""
    if t.is_Mul and len(t.args) == 2 and t.args[0].is_Number:
        coefficient, t = t.args
        if not coefficient.is_nonzero:
            return False
    return isinstance(t, CompilerSymbol)


class step(_Printed, sp.Function):
    """step(x) = 1 if x > 0 else 0 (the Heaviside function); step'(x) = DiracDelta(x)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sp.S.One if x > 0 else sp.S.Zero

    def fdiff(self, argindex=1):
        return sp.DiracDelta(self.args[0])



class sigmoid(_Printed, sp.Function):
    """sigmoid(x) = 1 / (1 + exp(-x)); sigmoid' = sigmoid (1 - sigmoid)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return 1 / (1 + sp.exp(-x))

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)



class gelu(_Printed, sp.Function):
    """gelu(x) = x Phi(x) with Phi the standard normal CDF (the exact GELU)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return x * (1 + sp.erf(x / SQRT2)) / 2

    def fdiff(self, argindex=1):
        x = self.args[0]
        return (1 + sp.erf(x / SQRT2)) / 2 + x * sp.exp(-x**2 / 2) / sp.sqrt(2 * sp.pi)



class softplus(_Printed, sp.Function):
    """softplus(x) = log(1 + exp(x)); softplus' = sigmoid."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sp.log(1 + sp.exp(x))

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


# ---------------------------------------------------------------------------------------
# Where a function switches branch (kinks and jumps): the quadratures split their rules there,
# and the Master theorem looks there for jumps whose Dirac delta sympy does not write.
# ---------------------------------------------------------------------------------------
def switching_expressions(f: sp.Basic) -> list:
    """The expressions whose change of sign is where the switching function call ``f``
    changes branch: a Piecewise's condition sides (lhs - rhs of every relation), the pairwise
    differences of a Max's or Min's arguments, else (relu, step, Heaviside, Abs, sign) its
    argument."""
    if isinstance(f, sp.Piecewise):
        return [r.lhs - r.rhs for _, cond in f.args for r in sp.S(cond).atoms(sp.core.relational.Relational)]
    if isinstance(f, (sp.Max, sp.Min)):
        args = list(f.args)
        return [a - b for i, a in enumerate(args) for b in args[i + 1:]]
    return [f.args[0]]


# ---------------------------------------------------------------------------------------
# Parity: f(-x) = +f(x) (even) or -f(x) (odd).  Used by the symbolic stage to prove that an
# expectation vanishes (docs/DESIGN.md 2.2).  Unknown functions are "neither" (conservative).
# ---------------------------------------------------------------------------------------
EVEN, ODD, NEITHER = 1, -1, 0

#: Parities of sympy functions that are not built-in nonlinearities but occur in programs.
_OTHER_PARITY = {sp.sinh: ODD, sp.atan: ODD, sp.asinh: ODD, sp.cosh: EVEN, sp.sign: ODD, sp.DiracDelta: EVEN}


def almost_everywhere(expr: sp.Expr) -> sp.Expr:
    """A derivative as a network's gradient takes it, almost everywhere: every Dirac delta (step'
    = delta) is 0 off a null set, where autodiff and neural-tangents' Sign take it 0."""
    return expr.replace(sp.DiracDelta, lambda *args: sp.S.Zero) if expr.has(sp.DiracDelta) else expr


def parity_of_function(func) -> int:
    """Parity of a one-argument sympy function class (EVEN, ODD or NEITHER)."""
    return _PARITY.get(func, NEITHER)


def _identity(x):
    return x


# ---------------------------------------------------------------------------------------
# Numeric implementations.
# ---------------------------------------------------------------------------------------
def _np_step(x):
    return (np.asarray(x) > 0).astype(np.float64)


def _np_relu(x):
    return np.maximum(x, 0.0)


def _np_sigmoid(x):
    return scipy.special.expit(x)


def _np_gelu(x):
    return 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))


def _np_softplus(x):
    return np.logaddexp(0.0, x)


def _np_dirac(*args):
    raise ValueError(
        "a Dirac delta (the derivative of step or relu') cannot be evaluated pointwise; "
        "its expectation needs Stein's lemma or a smooth nonlinearity"
    )


def _mp_gelu(x):
    return x * mpmath.erfc(-x / mpmath.sqrt(2)) / 2  # (1 + erf would cancel to 0 below -21)


@dataclass(frozen=True)
class Nonlinearity:
    """A built-in phi and its meaning at every stage.

    ``sympy``: the function of a sympy expression (symbolic stage, formulas); ``parity``:
    EVEN, ODD or NEITHER (zero proofs of the symbolic stage); ``numpy``: a vectorised
    implementation, or None when sympy's numpy printer already knows the function;
    ``scalar_source``: a Numba-compilable one-argument definition named ``name``, or None
    when the ``math`` module has it; ``mpmath``: a multiprecision implementation, or None when
    sympy's mpmath printer already knows the function; ``degree`` (custom functions only):
    |phi(x)| <= C (1 + |x|)^degree for real x, and ``nonnegative``: phi(x) >= 0 for real x
    (the existence checks' tail bounds, symbolic/growth.py, read both; sympy's own functions
    have rules there)."""

    name: str
    sympy: Callable
    parity: int = NEITHER
    numpy: Callable | None = None
    scalar_source: str | None = None
    mpmath: Callable | None = None
    degree: int | None = None
    nonnegative: bool = False


REGISTRY: dict[str, Nonlinearity] = {nl.name: nl for nl in (
    Nonlinearity("relu", relu, NEITHER, _np_relu, "def relu(x):\n    return x if x > 0.0 else 0.0\n",
                 lambda x: x if x > 0 else 0 * x, degree=1, nonnegative=True),
    Nonlinearity("step", step, NEITHER, _np_step, "def step(x):\n    return 1.0 if x > 0.0 else 0.0\n",
                 lambda x: 1 + 0 * x if x > 0 else 0 * x, degree=0, nonnegative=True),
    Nonlinearity("tanh", sp.tanh, ODD),
    Nonlinearity("erf", sp.erf, ODD, scipy.special.erf),
    Nonlinearity("sigmoid", sigmoid, NEITHER, _np_sigmoid,
                 "def sigmoid(x):\n    return 1.0 / (1.0 + math.exp(-x)) if x >= 0.0 else math.exp(x) / (1.0 + math.exp(x))\n",
                 lambda x: 1 / (1 + mpmath.exp(-x)), degree=0, nonnegative=True),
    Nonlinearity("gelu", gelu, NEITHER, _np_gelu, "def gelu(x):\n    return 0.5 * x * (1.0 + math.erf(x * 0.7071067811865476))\n",
                 _mp_gelu, degree=1),
    Nonlinearity("sin", sp.sin, ODD),
    Nonlinearity("cos", sp.cos, EVEN),
    Nonlinearity("exp", sp.exp, NEITHER),
    Nonlinearity("softplus", softplus, NEITHER, _np_softplus,
                 "def softplus(x):\n    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))\n",
                 lambda x: mpmath.log1p(mpmath.exp(x)), degree=1, nonnegative=True),
    Nonlinearity("identity", _identity, ODD),
    Nonlinearity("abs", sp.Abs, EVEN),
)}

#: Built-in phi by name: a function from a sympy expression to a sympy expression.
BUILTINS = {name: nl.sympy for name, nl in REGISTRY.items()}

#: The custom sympy function classes by name, for sympify of generated source.
SYMPY_NAMESPACE = {name: nl.sympy for name, nl in REGISTRY.items()
                   if isinstance(nl.sympy, type) and issubclass(nl.sympy, _Printed)}

#: Names sympy's lambdify should resolve to numpy implementations.
NUMPY_FUNCTIONS = {name: nl.numpy for name, nl in REGISTRY.items() if nl.numpy is not None}
NUMPY_FUNCTIONS["DiracDelta"] = _np_dirac

#: Names sympy's lambdify should resolve to mpmath implementations.
MPMATH_FUNCTIONS = {name: nl.mpmath for name, nl in REGISTRY.items() if nl.mpmath is not None}

#: Scalar (Numba-compilable) definitions of the custom functions, as Python source.
SCALAR_SOURCE = {name: nl.scalar_source for name, nl in REGISTRY.items() if nl.scalar_source}

#: |f(x)| <= C (1 + |x|)^degree for real x, by custom sympy function (``Nonlinearity.degree``).
TAIL_DEGREE = {nl.sympy: nl.degree for nl in REGISTRY.values() if nl.degree is not None}

#: The custom sympy functions that are never negative at a real argument.
NONNEGATIVE = frozenset(nl.sympy for nl in REGISTRY.values() if nl.nonnegative)

#: Parity by sympy function (read in the symbolic stage's hot parity walk: one lookup).
_PARITY = {**_OTHER_PARITY, **{nl.sympy: nl.parity for nl in REGISTRY.values()}}


def builtin(name: str):
    """The sympy function of a built-in nonlinearity, with a clear error for unknown names."""
    try:
        return BUILTINS[name]
    except KeyError:
        known = ", ".join(sorted(BUILTINS))
        raise ValueError(f"unknown nonlinearity {name!r}; built-in ones are: {known}") from None
