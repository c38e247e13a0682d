"""``Compiled.limit`` picks the most exact evaluator that applies (docs/DESIGN.md 2.7):
Gaussian-linear -> exact, bivariate-Gaussian moments -> the pairwise-Gaussian engine (exact,
stderr 0, the same numbers as ``Compiled.kernels``), anything else -> particles; and
``method="particles"`` still forces particles."""
import json
from pathlib import Path

import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler.backends.kernels.pairwise import NotPairwise, is_pairwise
from tpcompiler.cli.commands import main

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "programs" / "mlp.py"
COV3 = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.4], [0.0, 0.4, 1.0]])


def _kernel_entries(c, X) -> dict:
    """{"nngp[a,b]": value, "ntk[a,b]": value} from the kernel backend on rows X."""
    K = c.kernels(X)
    return {f"{k}[{a},{b}]": K[k][a, b] for k in ("nngp", "ntk") for a in range(len(X)) for b in range(len(X))}


@pytest.mark.parametrize("phi", ["relu", "erf"])
def test_mlp_limit_is_exact_by_default_and_equals_the_kernels(phi):
    prog = tp.load(MLP, depth=3, phi=phi, w_std=1.3, b_std=0.2)
    c = tp.compile(prog)
    X = np.random.default_rng(4).standard_normal((3, 3))
    lim = c.limit(x=X)
    expected = _kernel_entries(c, X)
    assert set(lim) == set(expected)
    for name, (value, err) in lim.items():
        assert err == 0.0, name
        assert value == pytest.approx(expected[name], rel=1e-12, abs=1e-14), name


def test_mlp_exact_limit_lies_within_the_particle_error_bars():
    c = tp.compile(tp.load(MLP, depth=2, phi="relu"))
    exact = c.limit()
    parts = c.limit(method="particles", particles=400_000, seed=2, groups=20)
    assert all(err > 0 for _, err in parts.values())  # forced particles are Monte Carlo
    for name, (value, _) in exact.items():
        v, err = parts[name]
        assert abs(v - value) < 5 * err, (name, v, value, err)


def test_tpc_limit_of_the_readme_program_is_exact(capsys, monkeypatch):
    """The README's first command (with --json): stderr 0, the kernel backend's values."""
    monkeypatch.chdir(ROOT)
    assert main(["limit", "programs/mlp.py", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    prog = tp.load(MLP)
    expected = _kernel_entries(tp.compile(prog), prog.graph.inputs["xi"].default)
    assert {name: entry["stderr"] for name, entry in out.items()} == {name: 0.0 for name in expected}
    for name, entry in out.items():
        assert entry["value"] == pytest.approx(expected[name], rel=1e-12), name


def test_gaussian_linear_programs_stay_with_the_exact_evaluator():
    """A linear network's limit comes from the Gaussian-linear evaluator (same numbers)."""
    c = tp.compile(tp.load(ROOT / "programs" / "linear_net.py"))
    assert c.limit() == c.limit(method="exact")


def _three_correlated_relus():
    """E[relu(u) relu(v) relu(w)] of three correlated Gaussians: not a bivariate expectation."""
    p = tp.Program("three")
    u, v, w = p.vecs(["u", "v", "w"], COV3)
    p.output("m", tp.mean(tp.relu(u) * tp.relu(v) * tp.relu(w)))
    return p


def test_programs_beyond_bivariate_expectations_use_particles():
    c = tp.compile(_three_correlated_relus())
    zp, _ = c.bind(None)
    assert is_pairwise(zp)  # the structure passes; the engine refuses the expectation itself
    with pytest.raises(NotPairwise, match="3 jointly Gaussian nonlinear factors.*; method 'particles' or 'auto' takes"):
        c.limit(method="pairwise")
    with pytest.raises(tp.ProgramError, match="not Gaussian-linear: method 'exact' needs .*; method 'particles' or"):
        c.limit(method="exact")
    value, err = c.limit(particles=200_000, seed=1)["m"]
    assert err > 0
    u, v, w = _correlated_draws(2_000_000)
    mc = np.mean(np.maximum(u, 0) * np.maximum(v, 0) * np.maximum(w, 0))
    assert abs(value - mc) < 5 * err


def _correlated_draws(n):
    return (np.random.default_rng(9).standard_normal((n, 3)) @ np.linalg.cholesky(COV3).T).T



def test_tpc_limit_method_forces_particles(capsys, monkeypatch):
    """--method particles answers the same program with Monte-Carlo error bars that cover
    the exact values; an unknown method is a one-line usage error."""
    monkeypatch.chdir(ROOT)
    assert main(["limit", "programs/mlp.py", "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert main(["limit", "programs/mlp.py", "--method", "particles", "--particles", "20000", "--json"]) == 0
    parts = json.loads(capsys.readouterr().out)
    assert parts.keys() == exact.keys()
    for name, entry in parts.items():
        assert entry["stderr"] > 0
        assert abs(entry["value"] - exact[name]["value"]) < 5 * entry["stderr"], name
    assert main(["limit", "programs/mlp.py", "--method", "fast"]) == 2
    err = capsys.readouterr().err
    assert "--method" in err and len(err.strip().splitlines()) == 1

def test_feature_learning_is_not_pairwise_and_uses_particles():
    """After one muP step tanh acts on a vector that already went through a nonlinearity
    and a ZDot: the structural check refuses it before any form is built."""
    c = tp.compile(tp.load(ROOT / "programs" / "mup_mlp.py", steps=1))
    zp, _ = c.bind(None)
    assert not is_pairwise(zp)
    lim = c.limit(particles=4_000, seed=0)
    assert any(err > 0 for _, err in lim.values())


def test_zdot_through_a_nonlinearity_of_a_zdot_uses_particles():
    c = tp.compile(tp.load(ROOT / "programs" / "zdot.py"))
    assert not is_pairwise(c.bind(None)[0])
    assert any(err > 0 for _, err in c.limit(particles=20_000).values())


def test_pairwise_is_exact_where_particles_only_estimate():
    """W^T tanh(W u): the ZDot coefficient sigma^2 E[tanh'(Z^h)] and the moment are
    bivariate, so the README's example program has an exact limit."""
    p = tp.Program("example")
    u = p.vec("u", var=1.0)
    W = p.mat("W", sigma=1.0)
    h = (W @ u).named("h")
    v = (W.T @ tp.tanh(h)).named("v")
    p.output("s", tp.mean(v * u))
    c = tp.compile(p)
    value, err = c.limit()["s"]
    assert err == 0.0
    # E[Z^v Z^u] = sigma^2 E[tanh'(Z^h)] E[u^2] with Z^h ~ N(0, 1): E[1 - tanh^2] by quadrature
    z = np.linspace(-12, 12, 200_001)
    density = np.exp(-z**2 / 2) / np.sqrt(2 * np.pi)
    assert value == pytest.approx(np.trapezoid((1 - np.tanh(z) ** 2) * density, z), rel=1e-9)
    v_p, err_p = c.limit(method="particles", particles=200_000, seed=3)["s"]
    assert err_p > 0 and abs(v_p - value) < 5 * err_p


def test_method_choice_names_pairwise():
    c = tp.compile(tp.load(ROOT / "programs" / "zdot.py"))
    with pytest.raises(ValueError, match="auto, exact, pairwise, particles"):
        c.limit(method="fast")


def test_pairwise_values_are_float_arithmetic_with_each_call_evaluated_once(monkeypatch):
    """The pairwise limit's values (backends/kernels/limit.py ``_Values``): sums, products and
    integer powers of quantities, calls and input covariances are done on floats, not
    compiled by lambdify per expression (an RNN of length T writes ~T^2 distinct ones:
    programs/rnn.py T = 60 took 14 s in them), and each expectation rule and template is
    evaluated once per distinct arguments.  A function of a moment (a square root) still goes
    to ``lowering.evaluate``."""
    from collections import Counter

    from tpcompiler.backends.kernels import limit

    evaluated, rules, templates = [], Counter(), Counter()
    evaluate, call, template = limit.evaluate, limit._call, limit._Values.template
    monkeypatch.setattr(limit, "evaluate", lambda expr, env, size=None: evaluated.append(expr) or evaluate(expr, env))
    monkeypatch.setattr(limit, "_call", lambda rule, args: rules.update([(id(rule), tuple(args))]) or call(rule, args))
    monkeypatch.setattr(limit._Values, "template",
                        lambda self, k, args: templates.update([(k, args)]) or template(self, k, args))
    zp = tp.compile(tp.load(ROOT / "programs" / "rnn.py", T=4)).bind(None)[0]
    result = limit.pairwise_limit(zp)
    assert not evaluated
    assert rules and max(rules.values()) == 1
    assert templates and max(templates.values()) == 1
    assert len(result) == 2 * 4 + 2 * 4 and all(np.isfinite(v) and e == 0.0 for v, e in result.values())

    p = tp.Program("root")
    h = (p.mat("W", sigma=1.0) @ p.vec("u", var=1.0)).named("h")
    m = tp.mean(tp.tanh(h) ** 2)
    p.output("m", m)
    p.output("r", m ** 0.5)
    values = tp.compile(p).limit(method="pairwise")
    assert len(evaluated) == 1 and values["r"][0] == pytest.approx(np.sqrt(values["m"][0]), rel=1e-15)


def test_pairwise_engine_writes_a_moments_function_of_a_vector_in_forms_once(monkeypatch):
    """An RNN's moments E[phi(h_s) phi(h_t)'] read phi(h_s) once per step t: the pairwise
    engine writes each such subexpression in forms once (``PairwiseEngine._moment_of_forms``,
    a memo of ``construct.rewrite`` across moments), not once per moment (rebuilding
    phi(form of h_s), a function of a sum of O(s) terms, per moment was most of the
    moments' derivation: programs/rnn.py T = 60)."""
    from collections import Counter

    from tpcompiler.backends.kernels.pairwise import PairwiseEngine
    from tpcompiler.ir import construct, ops, symbols

    zp = tp.compile(tp.load(ROOT / "programs" / "rnn.py", T=5)).bind(None)[0]
    readers = Counter(sub for key in zp.graph.keys_of(ops.Moment)
                      for sub in {x for x in symbols.preorder(zp.graph.op(key).expr) if x.is_Function})
    assert readers and max(readers.values()) > 2  # phi(h_s) is read by several moments
    built = Counter()
    rebuilt_call = construct.rebuilt_call
    monkeypatch.setattr(construct, "rebuilt_call", lambda e, args: built.update([e]) or rebuilt_call(e, args))
    engine = PairwiseEngine(zp.graph, zp)
    for expr in zp.graph.outputs.values():
        engine.scalar(expr)
    in_moments = {e: n for e, n in built.items() if e in readers}
    assert in_moments and max(in_moments.values()) == 1, in_moments


def test_a_jump_away_from_zero_times_a_polynomial_is_not_pairwise():
    """E[step(h1 - 1) h2], h1, h2 correlated: the 1-D rule of a polynomial pair splits at 0
    only, and gave 0.23305 with stderr 0 for the exact 0.6 sigma^2 p_sigma(1) = 0.23148 (Stein's
    lemma; QA).  Refused by the pairwise engine, so auto estimates it by particles."""
    import math

    sigma = 1.3
    p = tp.Program("jump")
    u1, u2 = p.vecs(["u1", "u2"], [[1.0, 0.6], [0.6, 2.0]])
    W = p.mat("W", sigma=sigma)
    h1, h2 = (W @ u1).named("h1"), (W @ u2).named("h2")
    p.output("fx", tp.mean(tp.step(h1 - 1.0) * h2))
    c = tp.compile(p)
    with pytest.raises(Exception, match="kink or a jump away from 0"):
        c.limit(method="pairwise")
    exact = 0.6 * sigma**2 * math.exp(-0.5 / sigma**2) / (sigma * math.sqrt(2 * math.pi))
    value, stderr = c.limit(seed=0)["fx"]
    assert stderr > 0 and abs(value - exact) < 4 * stderr
