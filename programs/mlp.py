"""Fully connected network: neural-tangents' stax.serial(*[Dense(n, W_std, b_std), phi] * depth,
Dense(1, W_std, b_std)) (docs/DESIGN.md 5), forward pass and a hand-written backward pass.

Forward (per input xi):  h1 = w_std/sqrt(d) sum_j xi_j U_j (+ b1);  x_l = phi(h_l);
h_{l+1} = W_{l+1} x_l (+ b_{l+1}), W_l entries N(0, w_std^2/n), biases b_l ~ N(0, b_std^2);
readout f = w_std/sqrt(n) v . x_L (+ b_std beta).
Backward, scaled so coordinates are O(1) (dz = sqrt(n) df/dz):
dx_L = w_std v;  dh_l = dx_l * phi'(h_l);  dx_{l-1} = W_l^T dh_l.
Outputs (pair moments over two inputs xi, xi'), in NTK parametrization:
nngp = w_std^2 E[x_L x_L'] + b_std^2,
ntk  = nngp + sum_{l>=2} (w_std^2 E[x_{l-1} x_{l-1}'] + b_std^2) E[dh_l dh_l']
            + (w_std^2 xi.xi'/d + b_std^2) E[dh_1 dh_1'],
with xi.xi'/d = E[g g'] for g = sum_j xi_j U_j / sqrt(d) (the input kernel as a moment).
`parameterization="standard"` declares neural-tangents' standard parametrization for the
kernel backend (trained weights N(0, w_std^2/n_in) with n_in = d, then `width`), which only
changes the NTK weights of the parameters; the outputs above stay the NTK-parametrized ones.
"""
import numpy as np
import sympy as sp

import tpcompiler as tp


def default_inputs(d):
    """Two fixed inputs of dimension d (used when no data is given)."""
    j = np.arange(1, d + 1)
    return np.stack([np.cos(j) + 0.3, np.sin(2.0 * j) - 0.2])


def build(depth=2, phi="relu", w_std=1.0, b_std=None, d=3, parameterization="ntk", width=512):
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"mlp: depth must be a positive integer, got {depth!r}")
    if parameterization not in ("ntk", "standard"):
        raise ValueError(f"mlp: parameterization must be 'ntk' or 'standard', got {parameterization!r}")
    standard = parameterization == "standard"
    p = tp.Program("mlp")
    act = tp.phi(phi)
    act_prime = lambda z: tp.nonlin(lambda a: sp.diff(tp.nonlinearities.builtin(phi)(a), a), z)  # noqa: E731
    xi = p.input("xi", d, default=default_inputs(d))
    w = p.scalar("w_std", w_std)
    U = p.input_matrix("U", d, ntk_weight=d / w_std**2 if standard else None, scale=w)
    g = U.apply(xi, name="g")            # sum_j xi_j U_j / sqrt(d): the unit-scale input layer
    h_in = w * g

    b = None if b_std is None else p.scalar("b_std", b_std)  # a symbol in formulas (and a runtime kernel argument)

    def dense_bias(h, layer):
        if b is None:
            return h
        return h + p.vec(f"b{layer}", var=b**2, ntk_weight=1 if standard else None)

    hs = [dense_bias(h_in, 1).named("h1")]
    xs = []
    mats = []
    for layer in range(2, depth + 1):
        xs.append(act(hs[-1]).named(f"x{layer - 1}"))
        W = p.mat(f"W{layer}", sigma=w_std, ntk_weight=width if standard else None)
        mats.append(W)
        hs.append(dense_bias(W @ xs[-1], layer).named(f"h{layer}"))
    xs.append(act(hs[-1]).named(f"x{depth}"))
    v = p.readout(xs[-1], sigma=w, bias=b,
                  ntk_weight=width / w_std**2 if standard else None,
                  bias_ntk_weight=1 if (standard and b_std is not None) else None)

    # Backward pass: dh_l = sqrt(n) df/dh_l.
    dx = (w * v).named(f"dx{depth}")
    dhs = [None] * depth
    for layer in range(depth, 0, -1):
        dhs[layer - 1] = (dx * act_prime(hs[layer - 1])).named(f"dh{layer}")
        if layer > 1:
            dx = (mats[layer - 2].T @ dhs[layer - 1]).named(f"dx{layer - 1}")

    bias2 = b**2 if b is not None else 0
    nngp = w**2 * tp.mean(xs[-1] * xs[-1].prime, name="K_x%d" % depth) + bias2
    ntk = nngp + (w**2 * tp.mean(g * g.prime, name="K_in") + bias2) * tp.mean(dhs[0] * dhs[0].prime, name="K_dh1")
    for layer in range(2, depth + 1):
        kx = tp.mean(xs[layer - 2] * xs[layer - 2].prime, name=f"K_x{layer - 1}")
        kdh = tp.mean(dhs[layer - 1] * dhs[layer - 1].prime, name=f"K_dh{layer}")
        ntk = ntk + (w**2 * kx + bias2) * kdh
    p.output("nngp", nngp)
    p.output("ntk", ntk)
    return p
