"""Regressions of the exact Gaussian-linear evaluator, each against particles and finite width."""
import numpy as np

import tpcompiler as tp


def _late_family_member_program():
    """b = W u is used (m0 = E[b^2]) before a = W (2u) joins b's ZHat family; E[a b] = 2."""
    p = tp.Program("late_member")
    u = p.vec("u")
    W = p.mat("W")
    b = (W @ u).named("b")
    p.output("m0", tp.mean(b * b))
    a = (W @ (2.0 * u)).named("a")
    p.output("ab", tp.mean(a * b))
    p.output("ba", tp.mean(b * a))
    return p


def test_exact_product_sees_later_family_members():
    prog = _late_family_member_program()
    c = tp.compile(prog)
    exact = c.limit(method="exact")
    parts = c.limit(method="particles", particles=100_000, seed=1)
    finite = [tp.simulate(prog, width=2000, seed=s) for s in range(8)]
    for name in ("ab", "ba"):
        value, _ = exact[name]
        # closed form: Cov(ZHat^{W 2u}, ZHat^{W u}) = E[2u u] = 2
        assert abs(value - 2.0) < 1e-12
        pv, pe = parts[name]
        assert abs(pv - value) < 5 * pe + 1e-12
        vals = np.array([f[name] for f in finite])
        assert abs(vals.mean() - value) < 5 * vals.std(ddof=1) / np.sqrt(len(vals)) + 1e-3


def test_gaussian_linear_zdot_closed_forms_with_sigma_not_one():
    """h = W u, v = W^T h, w = W v with sigma = 1.5 (exact evaluator): Z^v = ZHat + s^2 Z^u,
    Z^w = ZHat^w + s^2 Z^h, Cov(ZHat^w, ZHat^h) = s^2 E[v u] = s^4, so
    E[v u] = s^2, E[v v] = 2 s^4, E[w h] = 2 s^4 (sigma = 1 would hide sigma-vs-sigma^2 bugs).
    No bundled program on the exact path has a non-zero ZDot term, so a wrong ZDot or ZHat
    covariance there was caught only by the random programs of test_properties (mutation audit)."""
    s = 1.5
    p = tp.Program("linear_zdot")
    u = p.vec("u")
    W = p.mat("W", sigma=s)
    h = W @ u
    v = W.T @ h
    w = W @ v
    p.output("vu", tp.mean(v * u))
    p.output("vv", tp.mean(v * v))
    p.output("wh", tp.mean(w * h))
    lim = tp.compile(p).limit()  # Gaussian-linear: the exact evaluator
    assert abs(lim["vu"][0] - s**2) < 1e-12 and lim["vu"][1] == 0.0
    assert abs(lim["vv"][0] - 2 * s**4) < 1e-12
    assert abs(lim["wh"][0] - 2 * s**4) < 1e-12
