"""Lowering of sympy expressions to numpy callables (one printer configuration for every
numpy evaluator; the Numba code generator lives with the kernel backend).

Custom nonlinearities resolve to ``nonlinearities.NUMPY_FUNCTIONS``; special functions to
scipy; the rest to numpy.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import sympy as sp
from sympy.printing.numpy import SciPyPrinter

from tpcompiler.ir.nonlinearities import NUMPY_FUNCTIONS

_MODULES = [NUMPY_FUNCTIONS, "scipy", "numpy"]


class _ExactFloatPrinter(SciPyPrinter):
    """lambdify's printer with every Float written as the float64 it stands for (repr: 17
    significant digits); sympy's own writes 15, so 1/3 became 0.333333333333333, an error of
    about 1e-15 relative in every value computed with it."""

    def _print_Float(self, expr):
        return repr(float(expr))


@lru_cache(maxsize=4096)
def _compiled(expr: sp.Expr, symbols: tuple[sp.Symbol, ...]):
    # the settings lambdify gives its own printer for these modules (the dict's names by name)
    printer = _ExactFloatPrinter({"fully_qualified_modules": False, "inline": True, "allow_unknown_functions": True,
                                  "user_functions": {name: name for name in NUMPY_FUNCTIONS}})
    return sp.lambdify(symbols, expr, modules=_MODULES, dummify=True, cse=True, printer=printer)


def numpy_function(expr: sp.Expr, symbols):
    """f(*values) evaluating ``expr`` with ``symbols`` bound to arrays or floats."""
    return _compiled(sp.sympify(expr), tuple(symbols))


_CANONICAL = [sp.Symbol(f"_a{k}", real=True) for k in range(96)]


@lru_cache(maxsize=65536)
def _canonical(expr: sp.Expr) -> tuple[sp.Expr, tuple, tuple]:
    """(canonical form, symbol names, float constants): free symbols renamed _a0, _a1, ...
    (sorted by name) and Float constants turned into further arguments.

    Programs repeat one expression under many names and coefficients (every step and input
    of an unrolled SGD program), so functions are compiled per canonical form, not per
    instruction."""
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    floats = sorted(expr.atoms(sp.Float), key=float)
    if len(symbols) + len(floats) > len(_CANONICAL):
        return None, tuple(s.name for s in symbols), ()
    rep = dict(zip(symbols + floats, _CANONICAL))
    return expr.xreplace(rep), tuple(s.name for s in symbols), tuple(float(f) for f in floats)


def _shown(expr: sp.Expr) -> str:
    text = sp.sstr(expr)
    return text if len(text) <= 120 else text[:100] + "..."


def evaluate(expr: sp.Expr, env: dict, size: int | None = None):
    """Evaluate ``expr`` with free symbols looked up in ``env`` (symbol name -> value).

    With ``size`` the result is broadcast to an array of that length (a constant vector)."""
    canonical, names, constants = _canonical(expr)
    try:
        values = [env[name] for name in names]
    except KeyError as exc:
        raise KeyError(f"no value for {exc.args[0]!r} while evaluating {sp.sstr(expr)}") from None
    try:
        if canonical is None:
            out = numpy_function(expr, sorted(expr.free_symbols, key=lambda s: s.name))(*values)
        else:
            out = numpy_function(canonical, tuple(_CANONICAL[:len(names) + len(constants)]))(*values, *constants)
        if size is None:
            if np.iscomplexobj(out) or isinstance(out, complex):
                from tpcompiler.ir.graph import ProgramError

                raise ProgramError(f"evaluating {_shown(expr)} gives the complex number {complex(out):.6g} (a root or "
                                   "log of a negative value); the program's outputs must be real")
            out = float(out)  # an exact sympy integer beyond float64 (3 var^2 at var = 1e300) overflows here
    except ZeroDivisionError:  # (Python's 0.0 ** -1: an output 1/m where m is 0)
        from tpcompiler.ir.graph import ProgramError

        zeros = [n for n, v in zip(names, values) if np.size(v) == 1 and float(np.asarray(v).ravel()[0]) == 0.0]
        raise ProgramError(f"evaluating {_shown(expr)} divides by zero" + (f" ({zeros[0]!r} is 0)" if zeros else "")
                           + "; the value does not exist as a number") from None
    except OverflowError:  # Python floats raise where numpy would return inf: a user-facing error
        from tpcompiler.ir.graph import ProgramError

        sizes = {n: float(np.max(np.abs(v))) for n, v in zip(names, values) if np.size(v)}
        name = max(sizes, key=sizes.get) if sizes else None
        culprit = f" ({name!r} is {sizes[name]:.3g})" if name else ""
        raise ProgramError(f"evaluating {_shown(expr)} overflows float64{culprit}; rescale the program's "
                           f"sigmas, variances or input data") from None
    if size is not None:
        out = np.asarray(out, dtype=np.float64)
        if out.shape != (size,):
            out = np.broadcast_to(out, (size,)).copy()
    return out
