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
    found = texcheck.all_problems(formulas)
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


def _graphs_of(program):
    """The graphs a program is printed as: its template, the template bound to its default
    inputs (keys such as h[0], K[0,1]) and, with a readout, its kernel program."""
    from tpcompiler.ir.graph import instantiate
    from tpcompiler.ir.ntk import kernel_program

    g = tp.load(program).graph
    out = [g]
    if g.inputs and all(d.default is not None for d in g.inputs.values()):
        out.append(instantiate(g, None)[0])
    if g.readout is not None and g.inputs:
        out.append(kernel_program(g))
    return out


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_every_listing_line_parses(program):
    """The program listing of every graph a program becomes is valid TeX, line by line."""
    from tpcompiler.printing.program import listing

    for g in _graphs_of(program):
        lines = listing(g)
        assert len(lines) == g.g.number_of_nodes()
        assert not texcheck.all_problems(lines), g.name


def _listing_program():
    """Every instruction type, indexed names, an input named xi, covariances, a pair moment."""
    p = tp.Program("listing")
    xi = p.input("xi", 2, default=[[1.0, 2.0]])
    U = p.input_matrix("U_1", 2)
    h = U.apply(xi, name="h_2")
    u, w = p.vecs(["u_1", "w2"], [[2.0, 0.5], [0.5, 1.0]])
    W2 = p.mat("W2", sigma=1.5)
    x = tp.tanh(W2 @ (h + u)).named("x_2")
    y = (W2.T @ x).named("y")
    p.output("k[0,0] & 50%", tp.mean(x * x.prime) + tp.mean(y * w))
    return p


def test_listing_prints_each_instruction_in_the_papers_notation():
    from tpcompiler.printing.program import ProgramPrinter

    g = _listing_program().graph
    printer = ProgramPrinter(g)
    lines = {k: printer.instruction(k) for k in g.order()}
    assert not texcheck.all_problems(lines.values())
    assert lines["xi_1"] == r"\xi_{1}:\ \text{input coordinate 1 of } \xi"
    assert lines["U_1"] == r"U_{1} \in \mathbb{R}^{n\times 2}:\ {U_{1}}_{\alpha j} \sim \mathcal{N}(0, 1)\ \text{(2 initial vectors)}"
    assert lines["h_2"] == r"h_{2} := \frac{\sqrt{2} \left({U_{1}}_{1} \xi_{1} + {U_{1}}_{2} \xi_{2}\right)}{2}"
    assert lines["W2"] == r"W_{2} \in \mathbb{R}^{n\times n}:\ {W_{2}}_{\alpha \beta} \sim \mathcal{N}(0, \sigma_{W2}^{2}/n)"
    assert lines["w2"] == (r"w_{2} \in \mathbb{R}^n:\ \text{initial},\ {w_{2}}_{\alpha} \sim \mathcal{N}(0, 1),"
                           r"\ \mathrm{Cov}({w_{2}}_{\alpha}, {u_{1}}_{\alpha}) = 0.5")
    assert lines["y"] == r"y := W_{2}^{\top} x_{2}"
    pair = [line for k, line in lines.items() if isinstance(g.op(k), tp.ops.Moment) and g.op(k).pair]
    assert len(pair) == 1 and pair[0].endswith(r"\sum_{\alpha=1}^{n} {x_{2}}_{\alpha} {x_{2}}_{\alpha}(\xi')"), pair


def test_a_printer_without_a_rule_names_the_op():
    from dataclasses import dataclass

    from tpcompiler.ir.rules import MissingRule
    from tpcompiler.printing.program import ProgramPrinter

    @dataclass(frozen=True)
    class Mystery:
        kind = "Vec"

    p = tp.Program("mystery")
    p.graph.add("m", Mystery())
    with pytest.raises(MissingRule, match="printing.*Mystery"):
        ProgramPrinter(p.graph).instruction("m")


def test_primed_symbols_print_valid_powers():
    from tpcompiler.ir.symbols import NodeSymbol, Z

    xi1 = NodeSymbol("xi_1", True)
    for e in (xi1 ** 2, Z("h", True) ** 3 * xi1, sp.sqrt(1 + xi1 ** 2), Z("h_2") ** 2):
        s = tex.latex(e)
        assert not texcheck.problems(s), s
    assert tex.latex(xi1 * NodeSymbol("xi_1")) == r"\xi_{1} {\xi'}_{1}"
