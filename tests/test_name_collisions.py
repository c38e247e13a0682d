"""User names can never be read as the compiler's internal symbols (Z^x, ZHat^x, kernel
quantities, row features, Grams): a program means the same whatever its variables are called."""
import numpy as np
import pytest
import sympy as sp

import tpcompiler as tp
from tpcompiler.ir import symbols
from tpcompiler.ir.graph import ProgramError

# Names that spell internal symbols in plausible encodings (the old "Z_u" / "q_1" ones first).
TRICKY = ["Z_u", "Zhat_h", "q_0", "q_1", "rf0", "G0", "t", "k", "x", "k11", "_a0", "_v0", "_c0"]


def _scaled_tanh(scalar_name: str):
    p = tp.Program("collide")
    u = p.vec("u")
    W = p.mat("W", sigma=1.2)
    h = (W @ u).named("h")
    c = p.scalar(scalar_name, 0.5)
    y = tp.tanh(c * u) + c * tp.tanh(h)
    p.output("m", tp.mean(y * y))
    p.output("g", tp.mean((W.T @ y) * u))   # a ZDot term through W^T
    return p


@pytest.mark.parametrize("name", TRICKY)
def test_scalar_names_do_not_change_the_limit(name):
    reference = tp.compile(_scaled_tanh("c")).limit(particles=20_000, seed=3)
    got = tp.compile(_scaled_tanh(name)).limit(particles=20_000, seed=3)
    for out in reference:
        assert got[out][0] == pytest.approx(reference[out][0], abs=1e-12)


def test_scalar_named_like_z_matches_finite_width():
    """The reported bug: a scalar named Z_u became Z^u, so tanh(c u) turned into tanh(Z_u^2)."""
    prog = _scaled_tanh("Z_u")
    lim = tp.compile(prog).limit(particles=200_000, seed=0)
    runs = [tp.simulate(prog, width=4000, seed=s) for s in range(6)]
    for out in lim:
        vals = np.array([r[out] for r in runs])
        se = np.hypot(vals.std(ddof=1) / np.sqrt(len(vals)), lim[out][1])
        assert abs(vals.mean() - lim[out][0]) < 5 * se + 2e-3, (out, vals.mean(), lim[out])


@pytest.mark.parametrize("input_name", ["q", "rf", "G", "t", "Z"])
def test_input_names_do_not_change_kernels(input_name):
    """An input named q made coordinates q_1.. that were read as kernel quantities q_k."""
    X = np.random.default_rng(0).normal(size=(4, 3))

    def build(name):
        p = tp.Program("named_input")
        xi = p.input(name, 3)
        U = p.input_matrix("U", 3)
        h = U.apply(xi, name="h")
        x1 = tp.relu(h).named("x1")
        W = p.mat("W", sigma=1.3)
        x2 = tp.erf(W @ x1).named("x2")
        p.readout(x2, sigma=1.0, bias=0.1)
        return p

    ref = tp.compile(build("xi")).kernels(X)
    got = tp.compile(build(input_name)).kernels(X)
    for k in ("nngp", "ntk"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-13, atol=0)


def test_dsl_refuses_names_that_are_not_identifiers():
    """Node keys are identifiers, so the names of node symbols never contain the ':' that
    every other kind's name carries (the numpy lowering keys its environment by name)."""
    for s in (symbols.Z("u"), symbols.Zhat("h"), symbols.quantity(0), symbols.row_feature(1),
              symbols.gram(2), symbols.ARG):
        assert ":" in s.name and not s.name.isidentifier()
    with pytest.raises(tp.DSLError):
        tp.Program("p").vec("Z:u")


#: One symbol of every kind, and a program variable spelled exactly like its name.
KINDS = [symbols.Z("u"), symbols.Z("u", True), symbols.Zhat("h"), symbols.quantity(0),
         symbols.primed(symbols.quantity(0)), symbols.row_feature(1), symbols.row_feature(1, True),
         symbols.gram(2), symbols.ARG]


@pytest.mark.parametrize("s", KINDS, ids=[repr(k) for k in KINDS])
def test_identity_is_the_class_and_fields_not_the_name(s):
    twin = symbols.NodeSymbol(s.name)           # same name, a program variable
    plain = sp.Symbol(s.name, real=True)       # same name, a plain sympy symbol
    assert twin.name == plain.name == s.name
    assert s != twin and s != plain and twin != plain
    assert len({s, twin, plain}) == 3 and len({s: 1, twin: 2, plain: 3}) == 3
    assert not symbols.is_node(s) and symbols.is_node(twin) and not symbols.is_node(plain)
    assert symbols.is_leaf_variable(twin) is False and symbols.is_quantity(twin) is False
    expr = 2 * s + 3 * twin + 5 * plain
    assert expr.xreplace({s: 0}) == 3 * twin + 5 * plain
    assert expr.xreplace({twin: 0}) == 2 * s + 5 * plain
    assert sp.diff(expr, s) == 2 and sp.diff(expr, twin) == 3
    assert expr.subs(twin, 7) == 2 * s + 21 + 5 * plain
    assert sp.lambdify([s, twin, plain], expr)(1.0, 10.0, 100.0) == 532.0


def test_fields_not_names_decide_kind_key_and_side():
    z = symbols.Z("u", True)
    assert symbols.is_z(z) and z.key == "u" and z.primed and symbols.unprimed(z) == symbols.Z("u")
    assert symbols.primed(symbols.Z("u")) == z and symbols.primed(z) == z
    node = symbols.NodeSymbol("u", True)
    assert node.key == "u" and symbols.unprimed(node) == symbols.NodeSymbol("u") != symbols.Z("u")
    assert tp.ops.unprime(node) == ("u", True) and tp.ops.unprime(z) == (None, False)
    assert symbols.to_first_input(z * node + symbols.quantity(3) * symbols.primed(symbols.quantity(3))) \
        == symbols.Z("u") * symbols.NodeSymbol("u") + symbols.quantity(3) ** 2
    with pytest.raises(TypeError):
        symbols.primed(symbols.gram(0))
    # a key that looks primed is still the first input's variable
    assert not symbols.NodeSymbol("u'").primed and symbols.NodeSymbol("u'") != node


@pytest.mark.parametrize("s", KINDS + [symbols.NodeSymbol("h_2", True)], ids=repr)
def test_symbols_survive_pickling_and_copying(s):
    import copy
    import pickle

    for back in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s), eval(sp.srepr(s), vars(symbols))):
        assert back == s and type(back) is type(s) and back.values() == s.values() and back.is_real


def test_symbols_print_their_kind():
    h1 = symbols.NodeSymbol("h_1", True)
    assert sp.latex(symbols.Z("h2", True)) == r"Z^{h_{2}}(\xi')"
    assert sp.latex(symbols.Zhat("h_2")) == r"\hat{Z}^{h_{2}}"
    assert sp.latex(symbols.NodeSymbol("xi_1", True)) == r"{\xi'}_{1}"
    assert sp.latex(h1 ** 2) == r"{h'}_{1}^{2}"
    assert sp.sstr(symbols.Z("u") + h1) == "Z^u + h_1'"


def test_numpy_lowering_keeps_every_bit_of_float_constants():
    """lambdify's own printer writes a sympy Float with 15 significant digits (1/3 as
    0.333333333333333, ~1e-15 relative off); the numpy lowering must compute with the
    float64 the constant stands for."""
    import sympy as sp

    from tpcompiler.backends.lowering import numpy_function

    x = sp.Symbol("x", real=True)
    for c in (1.0 / 3.0, 0.1 ** 2, 2.0 / 7.0 * 1e-300, -1.2345678901234567e10):
        f = numpy_function(sp.Float(c) * x + sp.Float(c), [x])
        assert f(1.0) == c * 1.0 + c and f(np.array([0.0, 2.0]))[1] == c * 2.0 + c, c


def _output_named_like_a_copy():
    """Output m depends on the input (copies m[0], m[1] on two inputs); another is named m[1]."""
    p = tp.Program("copies")
    xi = p.input("xi", 1, default=[[1.0], [2.0]])
    W = p.mat("W")
    h = (W @ p.vec("u")).named("h")
    p.output("m", tp.mean(h * h) * xi[0])
    p.output("m[1]", tp.mean(h * h))
    return p


@pytest.mark.parametrize("run", [lambda p: tp.compile(p).limit(), lambda p: tp.simulate(p, width=8)])
def test_an_output_named_like_another_outputs_copy_is_refused(run):
    """Before: {m[0]: 1, m[1]: 1}, m at input 1 (2.0) silently replaced by the output m[1]."""
    with pytest.raises(ProgramError, match=r"outputs 'm' and 'm\[1\]' both give the name 'm\[1\]'.*rename one"):
        run(_output_named_like_a_copy())


def test_automatic_names_are_explained_and_a_node_keeps_its_own():
    """W @ u is made as t1: naming it t1 is no change (it said 'already used'); naming another
    vector after an automatic name says whose it is."""
    p = tp.Program("auto_names")
    u, W = p.vec("u"), p.mat("W")
    h = (W @ u).named("t1")
    assert h.expr.key == "t1" and "t1" not in p.graph.generated
    g = W.T @ tp.tanh(h)  # tanh(t1) is made, unnamed, as t2
    with pytest.raises(ProgramError, match=r"'t2' is already used by an unnamed instruction, tanh\(t1\), which the "
                                           r"program named automatically .*pick another name"):
        g.named("t2")
