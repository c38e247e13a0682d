"""Lowering of sympy expressions to numpy callables (one printer configuration for every
numpy evaluator; the Numba code generator lives with the kernel backend).

Custom nonlinearities resolve to ``nonlinearities.NUMPY_FUNCTIONS``; special functions to
scipy; the rest to numpy.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import sympy as sp

from .nonlinearities import NUMPY_FUNCTIONS

_MODULES = [NUMPY_FUNCTIONS, "scipy", "numpy"]


@lru_cache(maxsize=4096)
def _compiled(expr: sp.Expr, symbols: tuple[sp.Symbol, ...]):
    return sp.lambdify(symbols, expr, modules=_MODULES, dummify=True, cse=True)


def numpy_function(expr: sp.Expr, symbols):
    """f(*values) evaluating ``expr`` with ``symbols`` bound to arrays or floats."""
    return _compiled(sp.sympify(expr), tuple(symbols))


def evaluate(expr: sp.Expr, env: dict, size: int | None = None):
    """Evaluate ``expr`` with free symbols looked up in ``env`` (symbol name -> value).

    With ``size`` the result is broadcast to an array of that length (a constant vector)."""
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    try:
        values = [env[s.name] for s in symbols]
    except KeyError as exc:
        raise KeyError(f"no value for {exc.args[0]!r} while evaluating {sp.sstr(expr)}") from None
    out = numpy_function(expr, symbols)(*values)
    if size is not None:
        out = np.asarray(out, dtype=np.float64)
        if out.shape != (size,):
            out = np.broadcast_to(out, (size,)).copy()
        return out
    return float(out)
