"""A pi-network at initialization (docs/DESIGN.md 2.10): the forward pass as a NETSOR program.

depth L nonlinear layers of rank r on inputs of dimension d, dout outputs, nonlinearity phi,
multipliers alpha_first (a1), alpha_last (ao), alpha_bias (ab; 0: no biases).  The state is
pilimit_orig's initialization drawn from ``seed`` (``tp.pi.init_state``), written into the
program as numbers.  There is no n x n Gaussian matrix: each layer l has r initial vectors
w_l1..w_lr (the columns of Omega_l, iid N(0, 1)) and

    h1 = sum_k g1_k w_1k,  g1_k = a1 sum_j xi_j A1[j, k];      x_l = phi(h_l);
    row m of layer l+1:  phi(sum_k B[m, k] w_lk)   (a Nonlin of the previous layer's basis);
    g_{l+1, k} = sum_m Amult_m A[m, k] E[phi(sum_k B[m, k] w_lk) x_l]        (Moments);
    h_{l+1} = sum_k g_{l+1, k} w_{l+1, k};   f_k = ao sum_m Amult_m A[m, k] E[row_m x_L].

Every Moment is a bivariate Gaussian expectation, so the compiler's pairwise strategy (2.7,
strategy 2) gives the limit exactly (closed forms, else quadrature); tp.PiLimit computes the
same numbers from the same state (tests/test_pi.py), and trains it (tp.PiSpec.from_program
reads the spec this program declares).  Biases are 0 at initialization, so they do not appear.
"""
import numpy as np

import tpcompiler as tp


def default_inputs(d):
    """Two fixed inputs of dimension d (used when no data is given)."""
    j = np.arange(1, d + 1)
    return np.stack([np.cos(j) + 0.3, np.sin(2.0 * j) - 0.2])


def build(depth=2, r=4, d=3, dout=2, phi="relu", alpha_first=1.0, alpha_last=1.0, alpha_bias=0.0, seed=0):
    spec = tp.PiSpec(depth=depth, r=r, d=d, dout=dout, phi=phi, bias=alpha_bias != 0,
                     a1=alpha_first, ao=alpha_last, ab=alpha_bias if alpha_bias != 0 else 1.0)
    state = tp.pi.init_state(spec, seed=seed)
    act = tp.phi(phi)
    p = tp.Program("pinet")
    xi = p.input("xi", d, default=default_inputs(d))
    bases = {l: [p.vec(f"w{l}_{k + 1}") for k in range(r)] for l in range(1, depth + 1)}

    def combine(coefs, vecs):
        total = coefs[0] * vecs[0]
        for c, v in zip(coefs[1:], vecs[1:]):
            total = total + c * v
        return total

    g = [combine([alpha_first * float(state["A1"][j, k]) for j in range(d)], xi) for k in range(r)]
    x = act(combine(g, bases[1])).named("x1")
    for l in range(2, depth + 2):
        A, B, Amult = state[f"A{l}"], state[f"B{l}"], state[f"Amult{l}"]
        moments = [tp.mean(act(combine([float(b) for b in B[m]], bases[l - 1]).named(f"row{l}_{m + 1}")) * x,
                           name=f"gam{l}_{m + 1}") for m in range(A.shape[0])]
        g = [combine([float(Amult[m] * A[m, k]) for m in range(A.shape[0])], moments) for k in range(A.shape[1])]
        if l <= depth:
            x = act(combine(g, bases[l])).named(f"x{l}")
    for k in range(dout):
        p.output(f"f{k + 1}", alpha_last * g[k])
    p.pi_spec = {f: getattr(spec, f) for f in ("depth", "r", "d", "dout", "phi", "bias", "a1", "ao", "ab")}
    p.pi_seed = seed
    return p
