"""Regression: the particle evaluator's Stein estimate of ZDot (docs/DESIGN.md 2.7) when a
ZHat family holds members nearly collinear with those Z^x depends on.

Before the fix, Stein's lemma was solved over the whole family, E[grad f] = L^{-T} E[f xi]:
a member of x's dependencies with a tiny conditional variance given the other members
(the same input's features one training step later, in an unrolled program) multiplied the
particle noise by 1 / L_jj, and the nonlinear layers after turned that noise into a bias
(docs/benchmarks.md, "Training at scale": 0.5078 +- 0.0112 against 0.4180 +- 0.0017 at
width 4096).  The references here are independent of the particle code: a closed form, and
finite-width networks trained by the step engine's finite method.
"""
import math

import numpy as np

import tpcompiler as tp
from tpcompiler.training import finite


def test_stein_derivative_given_the_dependent_members_only():
    """ha = W u and hb = W (u + eps v) are nearly collinear (conditional variance of ZHat^hb
    given ZHat^ha: sigma^2 eps^2); s = W^T step(hb) depends on hb alone, so
    Z^s = ZHat^s + sigma^2 Z^{u + eps v} E[delta(Z^hb)], E[delta(Z^hb)] = 1/sqrt(2 pi Var),
    Var = sigma^2 (1 + eps^2).  Closed forms: E[s u] = c, E[s^2] = sigma^2/2 + c^2 (1 + eps^2)
    with c = sigma^2 / sqrt(2 pi Var).  The whole-family solve gave E[s^2] = 142 +- 53."""
    sigma, eps = 1.0, 1e-3
    p = tp.Program("near_collinear")
    u, v = p.vec("u"), p.vec("v")
    W = p.mat("W", sigma=sigma)
    (W @ u).named("ha")
    hb = (W @ (u + eps * v)).named("hb")
    s = (W.T @ tp.step(hb)).named("s")
    p.output("su", tp.mean(s * u))
    p.output("ss", tp.mean(s * s))
    c = sigma**2 / math.sqrt(2 * math.pi * sigma**2 * (1 + eps**2))
    exact = {"su": c, "ss": sigma**2 / 2 + c**2 * (1 + eps**2)}
    lim = tp.compile(p).limit(particles=20_000, seed=0, method="particles")
    for name, value in exact.items():
        got, err = lim[name]
        assert err < 0.02, (name, err)  # 20,000 particles: a few 1e-3; the bug's noise was 50
        assert abs(got - value) <= 4 * err, (name, got, err, value)


def _data(N, d):
    rng = np.random.default_rng(2024)
    X = rng.standard_normal((N, d))
    return X, np.sin(1.5 * X.sum(axis=1) / np.sqrt(d))[:, None]


def test_unrolled_training_particles_agree_with_finite_width():
    """Depth-2 tanh muP MLP, 4 inputs, batch 1, 6 SGD steps (lr 0.5): f(x_0) after the last
    step from the unrolled program's particle limit against 4 networks of width 2048 (the
    step engine's finite method; widths 1024 and 2048 agree to 0.001 here, so finite-width
    bias is below the tolerance).  Before the fix: 0.04 +- 0.08 (seeds 1-5: 0.04-0.30, their
    standard errors 0.045-0.08); after: 0.481-0.491 +- 0.002-0.005; width 2048: 0.490."""
    N, d, steps, lr = 4, 5, 6, 0.5
    X, Y = _data(N, d)
    net = tp.load("programs/mlp.py", depth=2, phi="tanh", w_std=1.0, b_std=None, d=d)
    abc = tp.named("mup", 2)
    g = tp.unroll(net.graph, abc, tp.SGD(X, Y, steps=steps, lr=lr, batch=1))
    lim, lim_err = tp.compile(g).limit(particles=20_000, seed=1, method="particles")[f"f_train[{steps},0]"]

    eng = tp.StepEngine(net, abc, method="finite", width=2048, seeds=4, seed=3)
    for t in range(steps):
        idx = finite.batch_indices(N, 1, t)
        eng.step(X[idx], Y[idx], lr)
    f, f_err = eng.predict(X)
    fin, fin_err = float(f[0, 0]), float(f_err[0, 0])

    assert lim_err < 0.01, lim_err  # a few 1e-3 at 20,000 particles; the bug inflated it 20x
    assert abs(lim - fin) <= 4 * math.hypot(lim_err, fin_err), (lim, lim_err, fin, fin_err)
