"""ResNet-style network of neural-tangents' reference cases (tests/data/nt_reference.json,
resnet_dense_relu_dense_2blocks and resnet_preact_2blocks), NTK parametrization:

  serial(Dense(n, w_std, b_std),
         *[serial(FanOut(2), parallel(branch, Identity()), FanInSum())] * n_blocks,
         phi, Dense(1, w_std, b_std))
  branch = serial(Dense(n), phi, Dense(n))            (preactivation=False)
  branch = serial(phi, Dense(n), phi, Dense(n))       (preactivation=True)

FanInSum is a plain sum (no 1/sqrt(2)).  As a program, with Dense = W @ . + b, W entries
N(0, w_std^2/n), b ~ N(0, b_std^2):
  h_0 = w_std/sqrt(d) sum_j xi_j U_j (+ b_0);
  a_l = A_l (phi(h_{l-1}) if preactivation else h_{l-1}) (+ c_l);
  h_l = h_{l-1} + B_l phi(a_l) (+ b_l);
readout f = w_std/sqrt(n) v . phi(h_L) (+ b_std beta).  Only the readout is declared: the NNGP
and NTK (pair moments of the auto-differentiated program) are its outputs.
"""
import numpy as np

import tpcompiler as tp


def default_inputs(d):
    """Two fixed inputs of dimension d (used when no data is given)."""
    j = np.arange(1, d + 1)
    return np.stack([np.cos(j) + 0.3, np.sin(2.0 * j) - 0.2])


def build(n_blocks=1, preactivation=False, phi="relu", w_std=1.5, b_std=0.1, d=3):
    if not isinstance(n_blocks, int) or n_blocks < 0:
        raise ValueError(f"resnet: n_blocks must be a non-negative integer, got {n_blocks!r}")
    if not isinstance(preactivation, bool):
        raise ValueError(f"resnet: preactivation must be True or False, got {preactivation!r}")
    p = tp.Program("resnet")
    act = tp.phi(phi)
    xi = p.input("xi", d, default=default_inputs(d))
    w = p.scalar("w_std", w_std)

    def bias(name):
        return 0 if b_std is None else p.vec(name, var=b_std**2)

    U = p.input_matrix("U", d)
    h = (w * U.apply(xi, name="g") + bias("b0")).named("h0")
    for block in range(1, n_blocks + 1):
        A = p.mat(f"A{block}", sigma=w_std)
        B = p.mat(f"B{block}", sigma=w_std)
        inner = act(h).named(f"r{block}") if preactivation else h
        a = (A @ inner + bias(f"c{block}")).named(f"a{block}")
        h = (h + B @ act(a).named(f"z{block}") + bias(f"b{block}")).named(f"h{block}")
    p.readout(act(h).named("out"), sigma=w, bias=b_std)
    return p
