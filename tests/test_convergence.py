"""Finite width converges to the derived limit (docs/DESIGN.md 4, oracle 1): for every program in
programs/, widths 2^7..2^12 over 20 seeds (mup_mlp: ``STRICTER``), RMS error slope near -1/2
and agreement at the top width; and dropping the ZDot terms makes the check fail."""
import math
from pathlib import Path

import pytest
import scipy.integrate as si

import tpcompiler as tp
from tpcompiler.check import DEFAULT_WIDTHS, finite_runs, format_report, judge

PROGRAMS = sorted(Path(__file__).resolve().parent.parent.glob("programs/*.py"))
SEEDS = 20
PARTICLES = 1_000_000
#: Programs checked with more seeds and particles (and the small widths left out): mup_mlp's
#: training limit at the defaults let a ZDot coefficient 5% too small pass (largest z 3.8,
#: mutation audit); with these, 4 of its 9 outputs fail on that error (z up to 4.9) and the
#: right limit stays below z = 1.
STRICTER = {"mup_mlp": ((512, 1024, 2048, 4096), 80, 4_000_000)}


@pytest.mark.parametrize("path", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_program_converges_to_its_limit(path):
    program = tp.load(path)
    compiled = tp.compile(program)
    widths, seeds, particles = STRICTER.get(path.stem, (DEFAULT_WIDTHS, SEEDS, PARTICLES))
    runs = finite_runs(program.graph, widths, seeds)
    checks = judge(compiled.limit(particles=particles), runs)
    assert checks, "program has outputs"
    assert all(c.passed for c in checks), format_report(checks)


def test_dropping_zdot_terms_fails_the_check():
    """The ZDot example's outputs other than E[h^2] all depend on ZDot terms."""
    program = tp.load("programs/zdot.py")
    runs = finite_runs(program.graph, DEFAULT_WIDTHS, SEEDS)
    right = {c.name: c for c in judge(tp.compile(program).limit(particles=PARTICLES), runs)}
    wrong = {c.name: c for c in judge(tp.compile(program, drop_zdot=True).limit(particles=PARTICLES), runs)}
    assert all(c.passed for c in right.values()), format_report(list(right.values()))
    assert wrong["hh"].passed
    for name in ("vu", "vv", "wg", "ru", "rv", "su"):
        assert not wrong[name].passed and wrong[name].z_top > 20, name


def test_design_example_written_from_the_public_names():
    """The DSL snippet of docs/DESIGN.md 5, not one of programs/: formulas, limit and finite width.
    Closed form: s = E[(2v + h u) u] = 2 sigma^2 E[tanh'(Z^h)] (h independent of u)."""
    p = tp.Program("name")
    u = p.vec("u", var=1.0)
    W = p.mat("W", sigma=1.0)
    h = W @ u
    v = W.T @ tp.tanh(h)
    y = 2.0 * v + h * u
    s = tp.mean(y * u)
    w = s * v + tp.tanh(h)
    p.output("s", s)
    p.output("ww", tp.mean(w * w))
    p.output("wu", tp.mean(w * u))
    c = tp.compile(p)
    formulas = c.formulas(format="markdown")
    assert r"\dot{Z}" in formulas and r"\tanh" in formulas
    assert r"\begin{align*}" in c.formulas(format="latex")
    tprime = si.quad(lambda z: (1 - math.tanh(z) ** 2) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi), -30, 30)[0]
    lim = c.limit(particles=PARTICLES, seed=1)
    value, err = lim["s"]  # bivariate moments: the exact pairwise evaluator (err 0) by default
    assert abs(value - 2 * tprime) < 4 * err + 1e-10
    # wu = s E[v u] = s * tprime (tanh(h) is independent of u and odd)
    value, err = lim["wu"]
    assert abs(value - 2 * tprime * tprime) < 4 * err + 1e-3
    finite = tp.simulate(p, width=2048, seed=0)
    assert set(finite) == {"s", "ww", "wu"}
    checks = judge(lim, finite_runs(p.graph, DEFAULT_WIDTHS, SEEDS))
    assert all(ch.passed for ch in checks), format_report(checks)
