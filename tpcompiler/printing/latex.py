"""LaTeX printing of formulas (docs/DESIGN.md 3: Inspect), emitting only valid TeX math.

Every formula the project prints goes through this module:

* ``Printer``, a sympy ``LatexPrinter`` that parenthesises the powers of a symbol whose
  typeset name (``symbol_names``: ``Z^{h_{2}}``, ``Z^{h}(\\xi')``) carries a superscript or
  an argument, so no double superscript (``Z^{h}^{2}``) or misplaced power is printed;
  names that end in a subscript are built grouped (``{x_{2}}_{\\alpha}``, never the double
  subscript ``x_{2}_{\\alpha}``);
* ``latex(expr, names)`` prints an expression with such names;
* ``name(key)`` typesets a node key (``W2`` -> ``W_{2}``, ``xi`` -> ``\\xi``) and
  ``indexed(key, index)`` a coordinate of it (``{W_{2}}_{\\alpha\\beta}``);
* ``text(s)`` is ``\\text{s}`` with the characters that text mode does not accept as
  themselves (``_ ^ $ % # & ~ { } \\``) escaped.

Custom sympy functions print their powers as ``\\operatorname{f}^{k}\\left(x\\right)``
(``function_latex``).  The tests parse every generated formula with matplotlib's mathtext
and check every ``\\text{}`` (which mathtext does not check) for unescaped characters.
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.latex import LatexPrinter

from tpcompiler.ir.ops import node_symbol

_TEXT_ESCAPES = {
    "\\": r"\textbackslash{}",
    "_": r"\_",
    "^": r"\textasciicircum{}",
    "~": r"\textasciitilde{}",
    "$": r"\$",
    "%": r"\%",
    "#": r"\#",
    "&": r"\&",
    "{": r"\{",
    "}": r"\}",
}


def escape_text(s: str) -> str:
    """``s`` with the characters that are special in LaTeX text mode escaped."""
    return "".join(_TEXT_ESCAPES.get(c, c) for c in str(s))


def text(s: str) -> str:
    r"""``\text{s}`` with text-mode special characters escaped."""
    return r"\text{%s}" % escape_text(s)


def group(tex: str) -> str:
    """``tex`` as one TeX group (braced unless it is a single token)."""
    return tex if len(tex) == 1 or (tex.startswith("\\") and tex[1:].isalpha()) else "{%s}" % tex


class Printer(LatexPrinter):
    """sympy's LaTeX printer with safe powers of typeset names (see the module docstring)."""

    printmethod = "_latex"

    def _print_Pow(self, expr):
        base = expr.base
        names = self._settings.get("symbol_names") or {}
        if (base.is_Symbol and base in names and ("^" in names[base] or "(" in names[base])
                and expr.exp.is_Rational and expr.exp.q == 1 and expr.exp > 0):
            return r"\left(%s\right)^{%s}" % (names[base], self._print(expr.exp))
        return super()._print_Pow(expr)


def latex(expr, names: dict | None = None) -> str:
    """LaTeX of ``expr``; ``names`` maps symbols to their typeset form."""
    return Printer({"symbol_names": dict(names or {})}).doprint(sp.sympify(expr))


def name(key: str) -> str:
    """The typeset name of node ``key`` (a sympy symbol's LaTeX: W2 -> W_{2}, xi -> \\xi)."""
    return latex(node_symbol(key))


def indexed(key: str, index: str) -> str:
    """Coordinate ``index`` of node ``key``: ``{W_{2}}_{\\alpha\\beta}``."""
    return r"%s_{%s}" % (group(name(key)), index)


def function_latex(func_name: str, printer, args, exp=None) -> str:
    r"""``\operatorname{f}\left(x\right)``, or ``\operatorname{f}^{k}\left(x\right)`` for a
    power (sympy passes ``exp`` when it prints f(x)**k)."""
    head = r"\operatorname{%s}" % func_name
    if exp is not None:
        head += "^{%s}" % exp
    return r"%s\left(%s\right)" % (head, ", ".join(printer._print(a) for a in args))
