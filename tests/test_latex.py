"""Every generated formula is valid TeX math (issue 7, class 4), checked by a real parser
(matplotlib's mathtext, see texcheck.py) plus a text-mode check of every \\text{}."""
import logging
from pathlib import Path

import pytest
import sympy as sp

import tpcompiler as tp
from tpcompiler.printing import latex as tex
from tpcompiler.ir.nonlinearities import BUILTINS

import texcheck

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = sorted((ROOT / "programs").glob("*.py"))
logging.getLogger("matplotlib").setLevel(logging.ERROR)


def _all_problems(text: str, format: str) -> list[str]:
    formulas = texcheck.markdown_formulas(text) if format == "markdown" else texcheck.latex_formulas(text)
    assert formulas, "no formulas found"
    found = [f"{f!r}: {p}" for f in formulas for p in texcheck.problems(f)]
    if format == "latex":
        found += texcheck.latex_text_outside_math(text)
    return found


@pytest.mark.parametrize("format", ["markdown", "latex"])
@pytest.mark.parametrize("program", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_every_formula_of_every_program_parses(program, format):
    text = tp.compile(tp.load(program)).formulas(format)
    assert not _all_problems(text, format)


def _powers_program():
    """Powers (2, 3, -1 and 1/2 of positive ones) of every built-in nonlinearity, of a moment
    and of vectors with indexed names; outputs with text-mode special characters."""
    p = tp.Program("powers")
    u = p.vec("u_1")
    W2 = p.mat("W2", sigma=1.5)
    h = (W2 @ u).named("h_2")
    outs = []
    for name in sorted(BUILTINS):
        f = tp.phi(name)
        outs.append(tp.mean(f(h) ** 2 + f(u) ** 3 * h))
        if name != "identity":  # identity(h) is h itself, already named
            outs.append(tp.mean(h * f(h).named(f"y_{name}") ** 2))
    m = tp.mean(tp.tanh(h) ** 2).named("m_2")
    outs.append(tp.mean(1 / (1 + tp.exp(u) ** 2) + tp.nonlin(sp.sqrt, 1 + h**2) * m**2))
    for i, o in enumerate(outs):
        p.output(f"f_{i}[0,0] 50% #{i} & ~x^2 {{a}} $ \\", o)
    return p


@pytest.mark.parametrize("format", ["markdown", "latex"])
def test_powers_of_every_nonlinearity_render_and_parse(format):
    text = tp.compile(_powers_program()).formulas(format)
    assert not _all_problems(text, format)
    for name in ("relu", "step", "sigmoid", "gelu", "softplus"):
        assert rf"\operatorname{{{name}}}^{{2}}" in text, name


@pytest.mark.parametrize("func", ["relu", "step", "sigmoid", "gelu", "softplus"])
def test_custom_function_powers_print(func):
    """relu(h)**2 used to raise "_latex() got an unexpected keyword argument 'exp'"."""
    x = sp.Symbol("x", real=True)
    f = BUILTINS[func]
    for e in (f(x) ** 2, f(x) ** 3 / (1 + f(x) ** 2), sp.sqrt(1 + f(x) ** 2), f(x + 1)):
        s = tex.latex(e)
        assert not texcheck.problems(s), s


def test_text_escapes_special_characters():
    s = tex.text("f_train[0,0] 50% #1 & ~x^2 {a} $ \\")
    assert not texcheck.problems(s), s
    assert s.startswith(r"\text{f\_train[0,0] 50\% \#1 \& ")


def test_checker_rejects_what_latex_rejects():
    """The checks can fail: the formerly generated invalid forms are caught."""
    for bad in (r"W_{2}_{\alpha\beta}", r"x_{2}_{\alpha} y", r"\text{f_train[0,0]} = 1", r"Z^{h}^{2}",
                r"\text{odd in W2^T}", r"\left(x", r"\frac{1}"):
        assert texcheck.problems(bad), bad
    for good in (r"{W_{2}}_{\alpha\beta}", r"\left(Z^{h}\right)^{2}", r"\text{f\_train[0,0]} = 1"):
        assert not texcheck.problems(good), good
