"""A nonlinearity is one record in ir.nonlinearities.REGISTRY, and every stage reads it.

``abs`` was added as that one record (issue 8's example of extending the compiler); these
tests check each stage on it against sources independent of the compiler: the closed form
of the arc-cosine-type kernels of |.| and sign, and the finite-width network."""
import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler.ir import nonlinearities as nl

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
X = np.random.default_rng(0).standard_normal((3, 4))


def test_every_builtin_is_one_record_read_by_each_table():
    for name, record in nl.REGISTRY.items():
        assert nl.builtin(name) is record.sympy
        assert (name in nl.NUMPY_FUNCTIONS) == (record.numpy is not None)
        assert (name in nl.SCALAR_SOURCE) == (record.scalar_source is not None)


def _abs_closed_form(X):
    """One hidden layer, NTK parametrization, w_std = 1, no bias: with rho the input cosine,
    E|u||v| = (2/pi)(sqrt(1 - rho^2) + rho asin rho) |x||x'| and E[sign u sign v] = (2/pi) asin rho."""
    G = X @ X.T / X.shape[1]
    norms = np.sqrt(np.diag(G))
    rho = np.clip(G / np.outer(norms, norms), -1, 1)
    nngp = 2 / np.pi * (np.sqrt(1 - rho**2) + rho * np.arcsin(rho)) * np.outer(norms, norms)
    return nngp, nngp + G * 2 / np.pi * np.arcsin(rho)


def test_abs_kernels_match_the_closed_form():
    prog = tp.load(ROOT / "programs" / "mlp.py", depth=1, phi="abs", d=4, w_std=1.0, b_std=None)
    K = tp.compile(prog).kernels(X)
    nngp, ntk = _abs_closed_form(X)
    np.testing.assert_allclose(K["nngp"], nngp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(K["ntk"], ntk, rtol=1e-10, atol=1e-12)


def test_abs_limit_agrees_with_finite_width():
    """Depth 2 (a nonlinearity of a nonlinearity's output): the exact limit against the
    seed mean at width 4096, within 4 standard errors."""
    prog = tp.load(ROOT / "programs" / "mlp.py", depth=2, phi="abs", d=4, w_std=1.0, b_std=None)
    lim = tp.compile(prog).limit(x=X[:2])
    runs = [tp.simulate(prog, width=4096, seed=s, x=X[:2]) for s in range(6)]
    for name, (value, err) in lim.items():
        assert err == 0.0
        seeds = np.array([r[name] for r in runs])
        assert abs(seeds.mean() - value) < 4 * seeds.std(ddof=1) / np.sqrt(len(seeds)) + 1e-12, name


def test_abs_is_even_for_the_zero_proofs():
    assert nl.parity_of_function(nl.builtin("abs")) == nl.EVEN
    p = tp.Program("odd")
    u = p.vec("u")
    p.output("s", tp.mean(tp.phi("abs")(u) * u))
    assert tp.compile(p).limit() == {"s": (0.0, 0.0)}


def test_relu_of_a_sum_is_decided_only_where_its_terms_share_a_sign():
    """relu.eval leaves a sum with a term c Z (a compiler symbol: real, of either sign)
    unevaluated without asking sympy; sums whose terms sympy proves of one sign still
    evaluate (to the sum, or to 0), as sympy's Max(x, 0) would."""
    import sympy as sp

    from tpcompiler.ir.symbols import NodeSymbol

    z, h = NodeSymbol("z"), NodeSymbol("h")
    p, q = sp.symbols("p q", positive=True)
    assert isinstance(nl.relu(2 * z + 3 * h - 1), nl.relu)
    assert isinstance(nl.relu(p + z), nl.relu) and isinstance(nl.relu(0.5 * z + p), nl.relu)
    assert nl.relu(p + 2 * q + 1) == p + 2 * q + 1
    assert nl.relu(-z ** 2 - p) == 0 and nl.relu(z ** 2 + p) == z ** 2 + p
    assert isinstance(nl.relu(p - q), nl.relu)
