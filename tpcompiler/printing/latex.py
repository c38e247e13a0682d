"""LaTeX printing of formulas (docs/DESIGN.md 3: Inspect), emitting only valid TeX math.

Every formula the project prints goes through this module:

* ``Printer``, a sympy ``LatexPrinter``.  The compiler's symbols print themselves
  (``ir.symbols``: ``Z^{h_{2}}``, ``\\hat{Z}^{h}``, ``Z^{h}(\\xi')``, ``{\\xi'}_{1}``); the
  printer parenthesises the powers of a symbol whose TeX carries a superscript, a prime or
  an argument, so no double superscript (``Z^{h}^{2}``) or misplaced power is printed, and
  prints an entry of a sympy ``IndexedBase`` as its grouped base with the indices
  juxtaposed (``{W_{2}}_{\\alpha \\beta}``, never the double subscript
  ``W_{2}_{\\alpha\\beta}``), at the second input as ``{x_{2}}_{\\alpha}(\\xi')``;
* ``latex(expr)`` prints an expression;
* ``name(key)`` typesets a node key (``W2`` -> ``W_{2}``, ``xi`` -> ``\\xi``);
* ``text(s)`` is ``\\text{s}`` with the characters that text mode does not accept as
  themselves (``_ ^ $ % # & ~ { } \\``) escaped.

Custom sympy functions print their powers as ``\\operatorname{f}^{k}\\left(x\\right)``
(``function_latex``).  The tests parse every generated formula with matplotlib's mathtext
and check every ``\\text{}`` (which mathtext does not check) for unescaped characters.
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.latex import LatexPrinter

from tpcompiler.ir.symbols import AT_SECOND_INPUT, NodeSymbol, key_tex

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
    """sympy's LaTeX printer with safe powers and indexed entries (see the module docstring)."""

    printmethod = "_latex"

    def _print_Pow(self, expr):
        base, exp = expr.base, expr.exp
        if (base.is_Symbol or isinstance(base, sp.Indexed)) and exp.is_Rational and exp.q == 1 and exp > 0:
            tex = self._print(base)
            if any(c in tex for c in "^'("):
                return r"\left(%s\right)^{%s}" % (tex, self._print(expr.exp))
        return super()._print_Pow(expr)

    def _print_Indexed(self, expr):
        label = expr.base.label
        primed = isinstance(label, NodeSymbol) and label.primed
        base = key_tex(label.key) if isinstance(label, NodeSymbol) else self._print(label)
        indices = " ".join(self._print(i) for i in expr.indices)
        return r"%s_{%s}" % (group(base), indices) + (AT_SECOND_INPUT if primed else "")


def latex(expr) -> str:
    """LaTeX of ``expr``."""
    return Printer().doprint(sp.sympify(expr))


def name(key: str) -> str:
    """The typeset name of node ``key`` (a sympy symbol's LaTeX: W2 -> W_{2}, xi -> \\xi)."""
    return key_tex(key)


def function_latex(func_name: str, printer, args, exp=None) -> str:
    r"""``\operatorname{f}\left(x\right)``, or ``\operatorname{f}^{k}\left(x\right)`` for a
    power (sympy passes ``exp`` when it prints f(x)**k)."""
    head = r"\operatorname{%s}" % func_name
    if exp is not None:
        head += "^{%s}" % exp
    return r"%s\left(%s\right)" % (head, ", ".join(printer._print(a) for a in args))
