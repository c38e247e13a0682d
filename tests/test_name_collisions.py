"""User names can never be read as the compiler's internal symbols (Z^x, ZHat^x, kernel
quantities, row features, Grams): a program means the same whatever its variables are called."""
import numpy as np
import pytest
import sympy as sp

import tpcompiler as tp
from tpcompiler.ir import symbols

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


def test_internal_symbols_are_not_identifiers():
    """Every internal symbol kind carries a character no DSL name (an identifier) can have."""
    for s in (symbols.Z("u"), symbols.Zhat("h"), symbols.quantity(0), symbols.row_feature(1),
              symbols.gram(2), symbols.ARG):
        assert not s.name.isidentifier()
        assert symbols.kind_of(s) is not None
    assert symbols.kind_of(sp.Symbol("Z_u")) is None
    with pytest.raises(tp.DSLError):
        tp.Program("p").vec("Z:u")
