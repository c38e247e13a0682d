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
