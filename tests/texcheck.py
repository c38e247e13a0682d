"""Validity of generated TeX math, checked by a real parser (matplotlib's mathtext).

mathtext rejects double subscripts/superscripts, unbalanced groups, unknown commands and
\\left without \\right, but it reads the argument of \\text{} without checking it, where
LaTeX and KaTeX reject the math-only characters _ ^ and the specials $ % # & ~ and a
bare backslash command that is not a text-mode escape.  ``problems`` checks both.
"""
from __future__ import annotations

import re

from matplotlib.mathtext import MathTextParser

_PARSER = MathTextParser("path")
#: Escapes valid in LaTeX text mode (and in KaTeX's \text).
_TEXT_ESCAPES = (r"\_", r"\$", r"\%", r"\#", r"\&", r"\{", r"\}", r"\textasciicircum{}",
                 r"\textasciitilde{}", r"\textbackslash{}")


def _text_arguments(formula: str):
    """The raw arguments of every \\text{...} (braces balanced)."""
    for m in re.finditer(r"\\text\{", formula):
        depth, i = 1, m.end()
        while i < len(formula) and depth:
            if formula[i] == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(formula[i], 0)
            i += 1
        yield formula[m.end():i - 1] if depth == 0 else None


def text_problems(formula: str) -> list[str]:
    out = []
    for arg in _text_arguments(formula):
        if arg is None:
            out.append("unbalanced \\text{")
            continue
        rest = arg
        for esc in _TEXT_ESCAPES:
            rest = rest.replace(esc, "")
        bad = [c for c in "_^$%#&~\\{}" if c in rest]
        if bad:
            out.append(f"\\text{{{arg}}} contains {''.join(bad)!r} (not allowed in text mode)")
    return out


_PARSED: dict[str, str | None] = {}


def _mathtext_problem(formula: str) -> str | None:
    """mathtext's objection to ``formula``, or None.  Parsing costs ~0.1 s a formula, and
    generated pages repeat formulas that differ only in digits (indices, values); every
    digit is the same kind of token, so replacing each by 0 does not change validity and
    such formulas are parsed once."""
    key = re.sub(r"[0-9]", "0", formula)
    if key not in _PARSED:
        try:
            _PARSER.parse("$" + key + "$")
            _PARSED[key] = None
        except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
            _PARSED[key] = f"mathtext: {str(exc).strip().splitlines()[-1]}"
    return _PARSED[key]


def problems(formula: str) -> list[str]:
    """Why ``formula`` (TeX math without the $ delimiters) is invalid; [] when valid."""
    out = text_problems(formula)
    problem = _mathtext_problem(formula)
    return out + ([problem] if problem else [])


def markdown_formulas(text: str) -> list[str]:
    """The $...$ formulas of a Markdown page (outside code blocks)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"\$((?:\\.|[^\\$])+)\$", text)


def latex_formulas(text: str) -> list[str]:
    """The lines of every align* environment of a LaTeX fragment (without the & anchor)."""
    out = []
    for block in re.findall(r"\\begin\{align\*\}\n(.*?)\n\\end\{align\*\}", text, re.S):
        for line in block.split(" \\\\\n"):
            assert line.startswith("& "), line
            out.append(line[2:])
    return out


def latex_text_outside_math(text: str) -> list[str]:
    """Text-mode lines of a LaTeX fragment (paragraph titles, comments excluded) whose
    characters are not valid in text mode."""
    out = []
    for title in re.findall(r"\\paragraph\{(.*)\}", text):
        out += text_problems(r"\text{" + title + "}")
    return out


def all_problems(formulas) -> list[str]:
    """``formula: problem`` for every invalid formula of ``formulas``."""
    return [f"{f!r}: {p}" for f in formulas for p in problems(f)]
