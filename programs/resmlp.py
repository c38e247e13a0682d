"""Residual MLP: h_0 = w_std/sqrt(d) sum_j xi_j U_j, then `depth` residual blocks
h_l = h_{l-1} + alpha W_l phi(h_{l-1}) (W_l entries N(0, w_std^2/n)), readout
f = w_std/sqrt(n) v . h_L.  Hand-written backward pass (dz = sqrt(n) df/dz):
dh_L = w_std v;  dh_{l-1} = dh_l + alpha phi'(h_{l-1}) * (W_l^T dh_l).
Outputs (pair moments over two inputs):
nngp = w_std^2 E[h_L h_L'],
ntk  = nngp + sum_l alpha^2 w_std^2 E[phi(h_{l-1}) phi(h_{l-1})'] E[dh_l dh_l']
            + w_std^2 (xi.xi'/d) E[dh_0 dh_0'].
"""
import numpy as np
import sympy as sp

import tpcompiler as tp


def default_inputs(d):
    j = np.arange(1, d + 1)
    return np.stack([np.cos(j) + 0.3, np.sin(2.0 * j) - 0.2])


def build(depth=2, phi="relu", w_std=1.0, alpha=0.5, d=3):
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"resmlp: depth must be a positive integer, got {depth!r}")
    p = tp.Program("resmlp")
    act = tp.phi(phi)
    act_prime = lambda z: tp.nonlin(lambda a: sp.diff(tp.nonlinearities.builtin(phi)(a), a), z)  # noqa: E731
    xi = p.input("xi", d, default=default_inputs(d))
    g = p.input_layer("U", xi, sigma=1.0)
    w = p.scalar("w_std", w_std)
    a = p.scalar("alpha", alpha)
    hs = [(w * g).named("h0")]
    mats, xs = [], []
    for layer in range(1, depth + 1):
        xs.append(act(hs[-1]).named(f"x{layer - 1}"))
        W = p.mat(f"W{layer}", sigma=w_std)
        mats.append(W)
        hs.append((hs[-1] + a * (W @ xs[-1])).named(f"h{layer}"))
    v = p.vec("v")
    dh = (w * v).named(f"dh{depth}")
    dhs = {depth: dh}
    for layer in range(depth, 0, -1):
        back = (mats[layer - 1].T @ dhs[layer]).named(f"db{layer}")
        dhs[layer - 1] = (dhs[layer] + a * act_prime(hs[layer - 1]) * back).named(f"dh{layer - 1}")
    nngp = w**2 * tp.mean(hs[-1] * hs[-1].prime, name=f"K_h{depth}")
    ntk = nngp + w**2 * tp.mean(g * g.prime, name="K_in") * tp.mean(dhs[0] * dhs[0].prime, name="K_dh0")
    for layer in range(1, depth + 1):
        kx = tp.mean(xs[layer - 1] * xs[layer - 1].prime, name=f"K_x{layer - 1}")
        kdh = tp.mean(dhs[layer] * dhs[layer].prime, name=f"K_dh{layer}")
        ntk = ntk + a**2 * w**2 * kx * kdh
    p.output("nngp", nngp)
    p.output("ntk", ntk)
    return p
