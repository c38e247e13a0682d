"""Unit tests of each Master-theorem rule (docs/DESIGN.md 2.2), against hand derivations."""
import math

import pytest
import sympy as sp

import tpcompiler as tp
from tpcompiler.ir.nonlinearities import step
from tpcompiler.ir.ops import node_symbol
from tpcompiler.symbolic.master import Expectation, Z, Zhat, derive


def sig(name="W"):
    return node_symbol(f"sigma_{name}")


def zdot(zp, key):
    return sp.Add(*[zp.display(t.coefficient) * Z(t.y) for t in zp.zdot_terms(key)])


def same(a, b):
    return sp.simplify(sp.expand(a - b)) == 0


def test_zinit_is_its_own_gaussian_with_covariance():
    p = tp.Program("init")
    a, b = p.vecs(["a", "b"], cov=[[2.0, 0.5], [0.5, 1.0]])
    c = p.vec("c", var=3.0)
    p.output("ab", tp.mean(a * b))
    zp = derive(p.graph)
    assert zp.entries["a"].z == Z("a") and zp.entries["a"].deps == {"a"}
    assert zp.graph.init_covariance("a", "b") == sp.Float(0.5)
    # a and b form one independent block, c another
    assert zp.block_of_leaf("a") == zp.block_of_leaf("b") != zp.block_of_leaf("c")


def test_znonlin_substitutes_argument_z_and_scalar_symbols():
    p = tp.Program("nl")
    u, h = p.vec("u"), p.vec("h")
    eta = p.scalar("eta", 0.3)
    y = (eta * tp.tanh(h) * u + h**2).named("y")
    zp = derive(p.graph)
    assert same(zp.entries["y"].z, node_symbol("eta") * sp.tanh(Z("h")) * Z("u") + Z("h") ** 2)


def test_first_product_has_no_zdot():
    p = tp.Program("first")
    u = p.vec("u")
    W = p.mat("W", sigma=2.0)
    (W @ u).named("h")
    zp = derive(p.graph)
    assert zp.entries["h"].z == Zhat("h")
    assert zp.entries["h"].zdot == []


def test_zdot_of_the_design_example():
    """h = W u, v = W^T g(h): ZDot^v = sigma^2 Z^u E[g'(Z^h)] (docs/DESIGN.md 2.2)."""
    for name, g in [("tanh", sp.tanh), ("sin", sp.sin), ("gelu", tp.nonlinearities.gelu)]:
        p = tp.Program("ex")
        u = p.vec("u")
        W = p.mat("W", sigma=1.5)
        h = (W @ u).named("h")
        (W.T @ tp.phi(name)(h)).named("v")
        zp = derive(p.graph)
        a = sp.Symbol("a", real=True)
        expected = sig() ** 2 * Z("u") * Expectation(sp.diff(g(a), a).subs(a, Z("h")))
        assert same(zdot(zp, "v"), expected), name
        assert same(zp.display(zp.entries["v"].z), Zhat("v") + expected)


def test_zdot_of_w_after_w_transpose_is_sigma2_times_input():
    """w = W v with v = W^T x: dZ^v/dZHat^v = 1, so ZDot^w = sigma^2 Z^x."""
    p = tp.Program("wwt")
    u = p.vec("u")
    W = p.mat("W")
    h = (W @ u).named("h")
    x = tp.tanh(h).named("x")
    v = (W.T @ x).named("v")
    (W @ v).named("w")
    zp = derive(p.graph)
    assert same(zdot(zp, "w"), sig() ** 2 * Z("x"))


def test_nested_zdot_through_an_earlier_zdot():
    """r = W^T sin(w), w = W tanh(v): Z^w depends on ZHat^h through its own ZDot term
    sigma^2 tanh(Z^h) E[tanh'(Z^v)], so dZ^{sin w}/dZHat^h = cos(Z^w) sigma^2 tanh'(Z^h) E[tanh'(Z^v)]."""
    p = tp.load("programs/zdot.py")
    zp = derive(p.graph)
    s2 = sig() ** 2
    th = lambda z: 1 - sp.tanh(z) ** 2  # noqa: E731
    c_w = s2 * Expectation(th(Z("v")))
    assert same(zdot(zp, "w"), c_w * Z("t2"))
    expected_r = s2 * Z("u") * Expectation(sp.cos(Z("w")) * th(Z("h")) * c_w) + s2 * Z("t4") * Expectation(sp.cos(Z("w")))
    assert same(zdot(zp, "r"), expected_r)


def test_zdot_with_a_dirac_delta():
    """s = W^T step(h): ZDot^s = sigma^2 Z^u E[delta(Z^h)]."""
    p = tp.load("programs/zdot.py")
    zp = derive(p.graph)
    assert same(zdot(zp, "s"), sig() ** 2 * Z("u") * Expectation(sp.DiracDelta(Z("h"))))


def _through_a_jump(f):
    """v = W^T f(W u), output E[v u] = sigma^2 E[f'(h)] (h ~ N(0, 1), f' distributional)."""
    p = tp.Program("jump")
    u = p.vec("u")
    W = p.mat("W", sigma=1.0)
    v = (W.T @ tp.nonlin(f, (W @ u).named("h"))).named("v")
    p.output("vu", tp.mean(v * u))
    return p


@pytest.mark.parametrize("f,where", [
    (lambda t: sp.Piecewise((1, t > 0), (0, True)), "jumps at Z\\^h = 0"),
    (lambda t: sp.Piecewise((t + 1, t > 0.5), (t, True)), "jumps at Z\\^h = 0.5"),
    (lambda t: sp.Abs(t) / t, "jumps at Z\\^h = 0"),
    (lambda t: sp.atan(1 / t), "jumps at Z\\^h = 0"),
    (lambda t: sp.floor(t), "not known to sympy"),
], ids=["piecewise_step", "piecewise_shifted", "abs_over_t", "atan_of_inverse", "floor"])
def test_a_jump_whose_derivative_sympy_loses_is_refused(f, where):
    """A ZDot coefficient is a distributional derivative: a jump J at a adds J delta(h - a).
    sympy differentiates these forms without it, and the limit was 0 for the Piecewise step
    (finite widths: 0.399, a helper's audit), 1.004 for the second (1.352), 0 for |h|/h
    (0.798) and -0.655 for atan(1/h) (0.598); floor crashed in the code printer.  Written
    with Heaviside, as the error says, they are the closed forms: pdf(0) and 1 + pdf(0.5)."""
    with pytest.raises(tp.ProgramError, match=where):
        tp.compile(_through_a_jump(f)).limit(particles=1000, seed=0)


def test_a_jump_between_two_vectors_is_refused_without_a_misleading_place():
    """1{h > g} jumps where h = g, which moves with g: the error says so, and does not name one
    place as if it were fixed (it said "jumps at Z^h = 0.12573", from one random draw of Z^g)."""
    p = tp.Program("jump_between")
    u, w = p.vec("u"), p.vec("w")
    W = p.mat("W", sigma=1.0)
    h = (W @ u).named("h")
    v = (W.T @ tp.nonlin(lambda a, b: sp.Piecewise((1, a > b), (0, True)), h, w.named("g"))).named("v")
    p.output("vu", tp.mean(v * u))
    # (the first of its arguments whose derivative misses the jump is named, in the argument
    # order: it depended on the hash seed, a test of this failed in CI)
    with pytest.raises(tp.ProgramError, match=r"jumps in Z\^g \(at Z\^g = \S+ for one random draw of Z\^h, on which"):
        tp.compile(p).limit(particles=1000, seed=0)


@pytest.mark.parametrize("f,exact", [
    (lambda t: sp.Heaviside(t), 1 / math.sqrt(2 * math.pi)),
    (lambda t: t + sp.Heaviside(t - sp.Rational(1, 2)), 1 + math.exp(-1 / 8) / math.sqrt(2 * math.pi)),
    (lambda t: sp.Piecewise((sp.exp(t) - 1, t < 0), (t, True)), None),  # continuous (ELU): no jump to refuse
], ids=["heaviside", "shifted_heaviside", "elu"])
def test_a_jump_written_with_heaviside_has_its_delta(f, exact):
    """(E[delta(h)] is a closed form; E[delta(h - 1/2)] is estimated from the particles.)"""
    value, err = tp.compile(_through_a_jump(f)).limit(particles=20_000, seed=0)["vu"]
    if exact is not None:
        assert abs(value - exact) < 4 * err + 1e-12, (value, err, exact)


def test_cubic_zdot_is_not_mistaken_for_zero():
    """v = W^T h^3: ZDot = 3 sigma^2 Z^u E[(Z^h)^2], even in ZHat^h, so it must survive."""
    p = tp.Program("cubic")
    u = p.vec("u")
    W = p.mat("W")
    h = (W @ u).named("h")
    (W.T @ h**3).named("v")
    zp = derive(p.graph)
    assert same(zdot(zp, "v"), 3 * sig() ** 2 * Z("u") * Expectation(Z("h") ** 2))


def test_odd_derivatives_vanish():
    """v = W^T (h tanh(h)) and v = W^T h^2: E[d/dh] is odd in ZHat^h -> exactly 0."""
    for body in (lambda h: h * tp.tanh(h), lambda h: h**2, lambda h: tp.tanh(h) + h):
        p = tp.Program("odd")
        u = p.vec("u")
        W = p.mat("W")
        h = (W @ u).named("h")
        (W.T @ body(h)).named("v")
        zp = derive(p.graph)
        terms = zp.zdot_terms("v", nonzero=False)
        if body(h).expr.has(sp.tanh) and body(h).expr.is_Add:
            # d(tanh(h) + h)/dh = sech^2 + 1 is even: a genuine term
            assert len(zp.zdot_terms("v")) == 1
        else:
            assert len(terms) == 1 and terms[0].is_zero and "ZHat family of W" in terms[0].zero_reason


def test_gradient_independence_is_derived_not_assumed():
    """Kernel-regime backward passes: ZDot terms vanish because backward vectors are odd in
    the independent readout v (docs/DESIGN.md 2.8), for every depth and nonlinearity."""
    for depth in (2, 3):
        for phi in ("relu", "tanh", "erf"):
            zp = derive(tp.load("programs/mlp.py", depth=depth, phi=phi, b_std=0.1).graph)
            terms = [t for k in zp.order if zp.entries[k].rule == "matmul" for t in zp.entries[k].zdot]
            assert terms, "the backward W^T products must have candidate ZDot terms"
            assert all(t.is_zero for t in terms)
            assert any("initial Gaussian v" in t.zero_reason for t in terms)


def test_zero_through_a_transposed_family():
    """resmlp: E[Z^{W2^T dh2} delta(Z^h1)] is odd in the W2.T family although dh1 itself is not."""
    zp = derive(tp.load("programs/resmlp.py", depth=2).graph)
    terms = zp.entries["db1"].zdot
    assert len(terms) == 1 and terms[0].is_zero and "W2.T" in terms[0].zero_reason


def test_zmoment_expectations_and_provable_zeros():
    p = tp.Program("mom")
    u, g = p.vec("u"), p.vec("g")
    W = p.mat("W")
    h = (W @ u).named("h")
    p.output("hh", tp.mean(h * h))
    p.output("hg", tp.mean(h * g))
    p.output("mean_h", tp.mean(h))
    p.output("th", tp.mean(tp.tanh(h) * u))
    zp = derive(p.graph)
    assert zp.entries["hh"].z == Expectation(Z("h") ** 2)
    for key in ("hg", "mean_h", "th"):
        assert zp.entries[key].z == 0, key


def test_recursion_form_refers_only_to_direct_arguments():
    zp = derive(tp.load("programs/mlp.py", depth=3).graph)
    for key in zp.vectors:
        e = zp.entries[key]
        if e.rule != "nonlin":
            continue
        zsyms = {s for s in e.z.free_symbols if s.name.startswith("Z")}
        assert zsyms <= {Z(a) for a in zp.graph.vector_args(key)}


def test_pair_moment_in_template():
    zp = derive(tp.load("programs/mlp.py", depth=1).graph)
    assert zp.entries["K_x1"].z == Expectation(Z("x1") * Z("x1", primed=True))


def test_drop_zdot_ablation_removes_terms():
    zp = derive(tp.load("programs/zdot.py").graph, drop_zdot=True)
    assert all(zp.entries[k].zdot == [] for k in zp.order)


def test_formulas_render_markdown_and_latex():
    c = tp.compile(tp.load("programs/zdot.py"))
    md = c.formulas()
    assert r"\dot{Z}^{v}" in md and r"\mathbb{E}" in md and "## ZHat families" in md
    assert r"\delta\left(Z^{h}\right)" in md
    tex = c.formulas("latex")
    assert r"\begin{align*}" in tex and r"\hat{Z}^{r}" in tex


def test_step_derivative_is_dirac():
    x = sp.Symbol("x")
    assert sp.diff(step(x), x) == sp.DiracDelta(x)
    assert sp.diff(tp.nonlinearities.relu(x), x) == step(x)


def test_parity_in_one_variable_is_the_block_signature():
    """parity_in (what gaussian2's own _parity can become) follows expr_signature's rules."""
    import sympy as sp

    from tpcompiler.ir.nonlinearities import EVEN, NEITHER, ODD, relu
    from tpcompiler.symbolic.master import parity_in

    x, y = sp.Symbol("x", real=True), sp.Symbol("y", real=True)
    assert parity_in(x * sp.exp(-x**2), x) == ODD
    assert parity_in(1 - sp.tanh(x) ** 2, x) == EVEN
    assert parity_in(relu(x), x) == NEITHER
    assert parity_in(sp.Max(x**2, 1), x) == EVEN        # a function of even arguments
    assert parity_in(sp.tanh(x) * y, x) == ODD          # other symbols are constants
    assert parity_in(x + 1, x) == NEITHER


def test_expectation_of_random_products_is_the_node_sympy_builds():
    """Expectation.of_random builds E[psi] of a product of random symbols (a pair moment)
    without sympy's constructor; it must be the expression Expectation(psi) is (equal, same
    hash, arguments and number of arguments), primed and repeated symbols included."""
    a, b, h = Z("a"), Z("b", True), Zhat("w")
    for psi in [a * b, a, a * a, a ** 2 * b, a * b * h]:
        built, direct = Expectation(psi), Expectation.of_random(psi)
        assert type(direct) is Expectation and direct == built and hash(direct) == hash(built)
        assert direct.args == built.args and direct.nargs == built.nargs and direct.is_commutative


def test_linear_coefficients_read_term_by_term_agree_with_sympys_poly():
    """symbols.linear_coefficients reads sums of c x_k term by term (a Poly of a Flatten
    readout's P products was dense in 2P variables); on 400 random sums of linear terms,
    products, powers, constants and functions it must give what sympy's Poly gives, types of
    the coefficients included (a float coefficient keeps Poly's reading)."""
    import random

    import sympy as sp
    from tpcompiler.ir.symbols import _linear_coefficients_of_poly, linear_coefficients

    x, y, z, a, b = sp.symbols("x y z a b")
    variables = [x, y, z]
    rng = random.Random(11)

    def term():
        v, w = rng.choice(variables), rng.choice(variables)
        return rng.choice([
            rng.randint(-3, 3) * v, sp.Rational(rng.randint(1, 5), 7) * v, rng.uniform(-2, 2) * v, a * v,
            (a + b) * v, sp.sqrt(2) * b * v, v * w, 2 * v ** 2, sp.exp(a) * v, sp.sin(v) * a, v / (1 + w),
            sp.Integer(rng.randint(0, 2)), a, 0.5 * a * v])

    for _ in range(400):
        expr = sp.Add(*[term() for _ in range(rng.randint(1, 4))])
        got, want = linear_coefficients(expr, variables), _linear_coefficients_of_poly(expr, variables)
        assert got == want and [type(c) for c in got or ()] == [type(c) for c in want or ()], expr


def test_derivatives_read_directly_are_the_objects_sympys_diff_builds():
    """master._diff (what partials leaves to sympy) reads d/ds of s, of an expression without
    s, of f(s) (f differentiated by its fdiff) and of a product with s in one factor (sympy's
    Leibniz rule) without sp.diff's dispatch; on 300 random expressions of the package's
    nonlinearities, sympy's functions (zeta's fdiff raises), Max/Abs (own derivative rules), a
    function whose derivative is a Derivative, powers and products of several variables,
    every derivative must be the object sp.diff returns (srepr-equal), and partials must be
    what it was with sp.diff in _diff's place."""
    import random

    from tpcompiler.ir import nonlinearities as nl
    from tpcompiler.symbolic import master

    x, y, z = (node_symbol(k) for k in "xyz")
    rng = random.Random(3)
    undefined = sp.Function("g")

    class nested(sp.Function):
        def fdiff(self, argindex=1):
            return sp.Derivative(undefined(self.args[0]), self.args[0])

    functions = [nl.relu, nl.step, nl.gelu, nl.sigmoid, nl.softplus, sp.tanh, sp.erf, sp.exp, sp.sin, sp.Abs,
                 sp.atan, sp.zeta, lambda u: sp.Max(u, 0), lambda u: u ** 2, lambda u: sp.sqrt(u ** 2 + 1)]

    def linear():
        return sp.Add(*[rng.choice([1, -2, sp.Rational(1, 3), 0.5]) * v for v in rng.sample([x, y, z], rng.randint(1, 3))])

    def term():
        f, v = rng.choice(functions), rng.choice([x, y, z])
        return rng.choice([f(v), f(linear()), rng.choice([2, 0.25, sp.Rational(-1, 3)]) * f(v) * (1 + y), f(v) * z,
                           f(linear()) * f(v), x * y, linear(), f(x * y), sp.Integer(rng.randint(0, 2)),
                           2 * nested(v),  # (its derivative: a Derivative, at a symbol only)
                           # products of numbers and distinct symbols, a power
                           rng.choice([1, -1, 0.3, 2, sp.Rational(-2, 3), 1.5])
                           * sp.Mul(*rng.sample([x, y, z], rng.randint(1, 3))),
                           0.7 * x * y * z * sp.Rational(1, 3), 2.5 * x * x * y])

    def partials_by_sympy(expr, variables):  # partials with sp.diff where it calls _diff
        original = master._diff
        master._diff = sp.diff
        try:
            return master.partials(expr, variables)
        finally:
            master._diff = original

    for _ in range(300):
        expr = sp.Add(*[term() for _ in range(rng.randint(1, 3))])
        for s in (x, y, z):
            assert sp.srepr(master._diff(expr, s)) == sp.srepr(sp.diff(expr, s)), (expr, s)
            for t in sp.Add.make_args(expr):
                assert sp.srepr(master._diff(t, s)) == sp.srepr(sp.diff(t, s)), (t, s)
        got, want = master.partials(expr, [x, y, z]), partials_by_sympy(expr, [x, y, z])
        assert {s: sp.srepr(d) for s, d in got.items()} == {s: sp.srepr(d) for s, d in want.items()}, expr


def test_coefficient_and_variable_read_directly_are_what_as_independent_gives():
    """linear_coefficients reads a term x or c x (x a variable) without sympy's as_independent
    (which makes a set of all the variables per term); on 2000 random terms, wherever it
    reads one directly, coefficient and variable must be what as_independent gives."""
    import random

    from tpcompiler.ir.symbols import NodeSymbol, _coefficient_and_variable

    x, y, a, b = sp.symbols("x y a b")
    variables = [x, y] + [NodeSymbol(f"h{i}") for i in range(3)]
    rng = random.Random(1)
    read = 0
    for _ in range(2000):
        v, w = rng.choice(variables), rng.choice(variables)
        term = rng.choice([v, 2 * v, sp.Rational(1, 3) * v, 0.5 * v, a * v, (a + b) * v, sp.sqrt(2) * b * v, v * w,
                           2 * v ** 2, sp.exp(a) * v, sp.sin(v) * a, v / (1 + w), a, -v, a * b * v, v * sp.exp(w)])
        got = _coefficient_and_variable(term, set(variables))
        if got is not None:
            read += 1
            want = term.as_independent(*variables, as_Add=False)
            assert sp.srepr(got[0]) == sp.srepr(want[0]) and got[1] is want[1], (term, got, want)
    assert read > 500


def test_zdot_sums_read_the_earlier_family_members_the_vector_depends_on():
    """ZMatMul (docs/DESIGN.md 2.2): the ZDot of W x sums over the earlier MatMuls of W's other
    orientation whose ZHat Z^x depends on, in program order.  A convolution's filter tap is a
    family of one MatMul per position, and the ZDot reads it from the smaller of the family
    and the dependencies (master._family_members_in): checked against the definition for
    every MatMul of a 2-D CNN's kernel program."""
    from tpcompiler import layers

    net = layers.serial(*[layers.Conv(4, (3, 3), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu()] * 2,
                        layers.GlobalAvgPool(), layers.Dense(1, 1.5, 0.1))
    shared = tp.Program("shared")  # one matrix used 8 times, then transposed on products of a
    W = shared.mat("W", sigma=1.2)  # few of its outputs: ZDots of several terms of a larger family
    xs = [shared.vec("u")]
    for k in range(8):
        xs.append(tp.tanh(W @ xs[-1]).named(f"x{k}"))
    for k, (a, b, c) in enumerate([(1, 2, 5), (7, 3, 4), (8, 6, 2)]):
        shared.output(f"m{k}", tp.mean((W.T @ (xs[a] * xs[b] * xs[c])) ** 2))
    terms, several = 0, 0
    for zp in (tp.compile(net.program((4, 4, 1))).zprogram, tp.compile(shared).zprogram):
        order = {k: i for i, k in enumerate(zp.order)}
        for key in zp.order:
            entry = zp.entries[key]
            if entry.rule != "matmul":
                continue
            mat, tr = entry.family
            want = [s for s in zp.families.get((mat, not tr), [])
                    if order[s] < order[key] and s in zp.entries[entry.x].deps]
            assert [t.source for t in entry.zdot] == want, key
            terms, several = terms + len(want), several + (len(want) > 1)
    assert terms > 100 and several >= 3, (terms, several)


@pytest.mark.parametrize("phi", ["relu", "sigmoid", "gelu"])
def test_the_zdot_of_abs_of_a_built_in_is_its_derivative(phi):
    """y = W^T |phi(W u)|, E[y u] = sigma^2 E[d|phi(h)|/dh] (Stein).  sympy wrote d|phi|/dh with
    re(phi) and im(phi) until the built-ins said they are real at a real argument: the kernel
    code could not print re, and the particles read abs(relu) as 0/0 ("the limit does not
    exist").  Against E[step(h)] = 1/2 for relu and scipy's quadrature of the derivative."""
    import numpy as np
    from scipy import integrate, special

    p = tp.Program("abs_of_" + phi)
    u = p.vec("u")
    W = p.mat("W", sigma=1.0)
    p.output("yu", tp.mean((W.T @ tp.phi("abs")(tp.phi(phi)(W @ u))) * u))
    derivative = {"relu": lambda z: float(z > 0),
                  "sigmoid": lambda z: special.expit(z) * (1 - special.expit(z)),
                  "gelu": lambda z: np.sign(z) * (special.ndtr(z) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi))}[phi]
    want = integrate.quad(lambda z: derivative(z) * np.exp(-z * z / 2) / np.sqrt(2 * np.pi), -np.inf, np.inf,
                          epsabs=1e-13, epsrel=1e-12)[0] if phi != "relu" else 0.5
    value, stderr = tp.compile(p).limit()["yu"]
    assert stderr == 0 and value == pytest.approx(want, rel=1e-9)


def test_formulas_display_each_derivative_once_and_decide_inlining_as_count_ops_does(monkeypatch):
    """``derivative_display`` is memoised: an inlined derivative reads the displays of inner
    ones, and without the memo resmlp's formulas displayed 2^(depth - 2) of them (depth 12:
    1,024).  A derivative whose tree has more than INLINE_NODES nodes is not inlined without
    count_ops (which walks shared subexpressions as a tree: mup_mlp at 8 steps ran for
    minutes); the formulas are the same as with count_ops deciding every one."""
    from pathlib import Path

    from tpcompiler.frontend.loader import load
    from tpcompiler.symbolic import master

    programs = Path(__file__).resolve().parent.parent / "programs"
    calls = []
    display = master.ZProgram.display
    monkeypatch.setattr(master.ZProgram, "display", lambda self, e: calls.append(e) or display(self, e))
    c = tp.compile(load(programs / "resmlp.py", depth=12))
    c.formulas()
    assert 0 < len(calls) <= 10 * 12, len(calls)
    monkeypatch.setattr(master.ZProgram, "display", display)
    for path, params in (("resmlp.py", {"depth": 8}), ("mup_mlp.py", {"steps": 3}), ("cnn1d.py", {"depth": 4})):
        c = tp.compile(load(programs / path, **params))
        bounded = c.formulas()
        monkeypatch.setattr(master, "INLINE_NODES", 10**9)
        c.zprogram._derivative_displays.clear()
        assert c.formulas() == bounded, path
        monkeypatch.setattr(master, "INLINE_NODES", 2000)
