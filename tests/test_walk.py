"""The one evaluator walk (tpcompiler.backends.walk): liveness, shared rules, initial draws."""
import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler.backends import walk as W
from tpcompiler.backends.exact import EXACT
from tpcompiler.backends.particles import PARTICLES
from tpcompiler.ir import ops, rules
from tpcompiler.symbolic.master import derive


def _chain():
    """h = W u, x = tanh(h), g = W^T x (ZDot reads u), y = relu(g), z = V y: u is read
    by the product h and, through the ZDot of g, by the last product on W."""
    p = tp.Program("chain")
    u = p.vec("u")
    Wm, V = p.mat("W", sigma=1.2), p.mat("V", sigma=0.7)
    h = (Wm @ u).named("h")
    x = tp.tanh(h).named("x")
    g = (Wm.T @ x).named("g")
    y = tp.relu(g).named("y")
    z = (V @ y).named("z")
    p.output("m", tp.mean(z * z))
    p.output("k", tp.mean(x * y))
    return p


def _released_after(zp, schedule):
    return {k: zp.order[p] for p, keys in schedule.items() for k in keys}


def test_release_schedule_frees_each_vector_after_its_last_use():
    zp = derive(_chain().graph)
    after = _released_after(zp, W.release_schedule(zp))
    assert after["h"] == "x"           # read only by x
    assert after["u"] == "g"           # the input of a product lives until W's last product
    assert after["x"] == "k"           # read by g and by the moment k
    assert after["z"] == "m"
    assert set(after) == set(zp.vectors)


def test_an_evaluator_may_extend_liveness():
    zp = derive(_chain().graph)
    after = _released_after(zp, W.release_schedule(zp, lambda zp, key: ["h"] if key == "z" else []))
    assert after["h"] == "z"


def test_walk_holds_only_live_vectors():
    """A tracing rule set sees, at every instruction, exactly the vectors still needed."""
    zp = derive(_chain().graph)
    schedule = W.release_schedule(zp)
    trace = W.limit_rules("test tracing walk")
    try:
        seen = {}

        def record(run, entry, op):
            seen[entry.key] = set(run.env) & set(zp.vectors)  # scalars stay: outputs read them
            return 1.0

        trace.register(ops.Nonlin, ops.MatMul, ops.Moment)(record)

        class Run:
            pass

        run = Run()
        run.zp, run.env = zp, {"u": 1.0}
        out = W.walk(run, trace, schedule)
        assert out == {"m": 1.0, "k": 1.0}
        assert seen["h"] == {"u"}
        assert seen["g"] == {"u", "x"}           # h was freed after x, u is g's ZDot input
        assert seen["y"] == {"x", "g"}           # u was freed after W's last product
        assert seen["z"] == {"x", "y"}           # g was freed after y
        assert seen["m"] == {"x", "y", "z"}
    finally:
        del rules.TABLES[trace.stage]


def test_limit_evaluators_share_the_common_rules():
    for table in (EXACT, PARTICLES):
        assert table.missing() == []
        assert table(ops.Param) is W._param and table(ops.Input) is W._unbound_input


def test_initial_draws_have_the_program_covariance():
    p = tp.Program("cov")
    p.vecs(["a", "b", "c"], [[1.0, 0.6, 0.0], [0.6, 2.0, -0.5], [0.0, -0.5, 0.5]])
    g = p.graph
    keys = W.initial_keys(g)
    cov = W.initial_covariance(g, keys)
    np.testing.assert_allclose(cov, [[1.0, 0.6, 0.0], [0.6, 2.0, -0.5], [0.0, -0.5, 0.5]])
    draws = W.draw_initial(g, keys, 400_000, np.random.default_rng(1))
    sample = np.cov(np.stack([draws[k] for k in keys]))
    np.testing.assert_allclose(sample, cov, atol=0.02)
    assert all(draws[k].flags.c_contiguous for k in keys)


def test_a_singular_covariance_is_sampled():
    draws = W.sample_gaussian(np.array([[1.0, 1.0], [1.0, 1.0]]), 1000, np.random.default_rng(0))
    np.testing.assert_allclose(draws[:, 0], draws[:, 1], atol=1e-12)


def test_the_interpreter_draws_initial_vectors_like_the_particles():
    """One sampler: the finite-width run and a particle run with the same generator draw the
    same initial coordinates."""
    from tpcompiler.backends.interpreter import _init_vectors

    g = _chain().graph
    a = _init_vectors(g, 50, np.random.default_rng(3))
    b = W.draw_initial(g, W.initial_keys(g), 50, np.random.default_rng(3))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_unbound_input_is_refused_by_every_limit_evaluator():
    prog = tp.load("programs/mlp.py")
    zp = derive(prog.graph)
    for table in (EXACT, PARTICLES):
        with pytest.raises(tp.ProgramError, match="unbound input"):
            table(ops.Input)(type("Run", (), {"zp": zp})(), zp.entries[prog.graph.input_keys()[0]], None)
