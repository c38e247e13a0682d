"""Coordinatewise nonlinearities: the single source of truth for their meaning.

Every nonlinearity is a sympy expression (docs/DESIGN.md 2.1: phi must be sympy so it can be
differentiated symbolically).  Functions that sympy has no name for (relu, step, sigmoid,
gelu, softplus) are defined here as sympy ``Function`` classes with their derivatives, so
that formulas print readably (``relu(Z^h)`` rather than ``Max(0, Z^h)``).

Three consumers read this module and nothing else about a nonlinearity:
  * the symbolic stage differentiates through ``fdiff`` and asks ``parity_of_function``;
  * the numpy lowering (finite-width interpreter, particle evaluator) uses ``NUMPY_FUNCTIONS``;
  * the Numba code generator uses ``SCALAR_SOURCE`` (one-line scalar definitions).
"""
from __future__ import annotations

import math

import numpy as np
import scipy.special
import sympy as sp

from tpcompiler.printing.latex import function_latex

SQRT2 = sp.sqrt(2)


class _Printed:
    r"""LaTeX of a custom function: \operatorname{name}(x), and its powers
    \operatorname{name}^{k}(x) (sympy passes ``exp`` when it prints f(x)**k)."""

    def _latex(self, printer, exp=None):
        return function_latex(type(self).__name__, printer, self.args, exp)


class relu(_Printed, sp.Function):
    """relu(x) = max(x, 0); relu'(x) = step(x)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sp.Max(x, 0)
        if x.is_nonnegative:
            return x
        if x.is_nonpositive:
            return sp.S.Zero

    def fdiff(self, argindex=1):
        return step(self.args[0])



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



#: Names of the custom sympy functions, for sympify of generated source.
SYMPY_NAMESPACE = {"relu": relu, "step": step, "sigmoid": sigmoid, "gelu": gelu, "softplus": softplus}


def _identity(x):
    return x


#: Built-in phi by name: a function from a sympy expression to a sympy expression.
BUILTINS = {
    "relu": relu,
    "step": step,
    "tanh": sp.tanh,
    "erf": sp.erf,
    "sigmoid": sigmoid,
    "gelu": gelu,
    "sin": sp.sin,
    "cos": sp.cos,
    "exp": sp.exp,
    "softplus": softplus,
    "identity": _identity,
}

# ---------------------------------------------------------------------------------------
# Parity: f(-x) = +f(x) (even) or -f(x) (odd).  Used by the symbolic stage to prove that an
# expectation vanishes (docs/DESIGN.md 2.2).  Unknown functions are "neither" (conservative).
# ---------------------------------------------------------------------------------------
EVEN, ODD, NEITHER = 1, -1, 0

_FUNCTION_PARITY = {
    sp.tanh: ODD,
    sp.erf: ODD,
    sp.sin: ODD,
    sp.sinh: ODD,
    sp.atan: ODD,
    sp.asinh: ODD,
    sp.cos: EVEN,
    sp.cosh: EVEN,
    sp.Abs: EVEN,
    sp.DiracDelta: EVEN,
    relu: NEITHER,
    step: NEITHER,
    sigmoid: NEITHER,
    gelu: NEITHER,
    softplus: NEITHER,
}


def parity_of_function(func) -> int:
    """Parity of a one-argument sympy function class (EVEN, ODD or NEITHER)."""
    return _FUNCTION_PARITY.get(func, NEITHER)


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


#: Names sympy's lambdify should resolve to these numpy implementations.
NUMPY_FUNCTIONS = {
    "relu": _np_relu,
    "step": _np_step,
    "sigmoid": _np_sigmoid,
    "gelu": _np_gelu,
    "softplus": _np_softplus,
    "DiracDelta": _np_dirac,
    "erf": scipy.special.erf,
}

#: Scalar (Numba-compilable) definitions of the custom functions, as Python source.
SCALAR_SOURCE = {
    "relu": "def relu(x):\n    return x if x > 0.0 else 0.0\n",
    "step": "def step(x):\n    return 1.0 if x > 0.0 else 0.0\n",
    "sigmoid": "def sigmoid(x):\n    return 1.0 / (1.0 + math.exp(-x)) if x >= 0.0 else math.exp(x) / (1.0 + math.exp(x))\n",
    "gelu": "def gelu(x):\n    return 0.5 * x * (1.0 + math.erf(x * 0.7071067811865476))\n",
    "softplus": "def softplus(x):\n    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))\n",
}


def builtin(name: str):
    """The sympy function of a built-in nonlinearity, with a clear error for unknown names."""
    try:
        return BUILTINS[name]
    except KeyError:
        known = ", ".join(sorted(BUILTINS))
        raise ValueError(f"unknown nonlinearity {name!r}; built-in ones are: {known}") from None
