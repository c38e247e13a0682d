"""Simple RNN over a short sequence, one recurrent matrix W reused at every step:
h_1 = u_t(1);  h_t = W phi(h_{t-1}) + u_t(t),  u_t(t) = w_in/sqrt(d) sum_j xi_{t,j} U_j
(one input layer U shared by all steps; the program input is the sequence flattened to
T*d coordinates).  Readout on phi(h_T); backpropagation through time (dz = sqrt(n) df/dz):
dh_T = v phi'(h_T);  dh_{t-1} = phi'(h_{t-1}) * (W^T dh_t).
Outputs: per-step moments E[phi(h_t)^2] (per input) and the kernels
nngp = E[phi(h_T) phi(h_T)'] and ntk = nngp + sigma^2 sum_{s,t >= 2} E[dh_s dh_t'] E[phi(h_{s-1}) phi(h_{t-1})']
+ w_in^2 sum_{s,t} (xi_s . xi_t' / d) E[dh_s dh_t']  (the recurrent matrix is shared over time).
"""
import numpy as np
import sympy as sp

import tpcompiler as tp


def default_inputs(d, T):
    k = np.arange(1, T * d + 1)
    return np.stack([np.cos(k) + 0.2, np.sin(1.7 * k)])


def build(T=3, phi="tanh", sigma=1.2, w_in=1.0, d=2):
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"rnn: T must be a positive integer, got {T!r}")
    p = tp.Program("rnn")
    act = tp.phi(phi)
    act_prime = lambda z: tp.nonlin(lambda a: sp.diff(tp.nonlinearities.builtin(phi)(a), a), z)  # noqa: E731
    xi = p.input("xi", T * d, default=default_inputs(d, T))
    win = p.scalar("w_in", w_in)
    U = p.input_matrix("U", d, scale=win)
    W = p.mat("W", sigma=sigma)
    gs = [U.apply(xi[t * d:(t + 1) * d], name=f"g{t + 1}") for t in range(T)]  # sum_j xi_tj U_j / sqrt(d)
    hs = [(win * gs[0]).named("h1")]
    for t in range(1, T):
        hs.append((W @ act(hs[-1]) + win * gs[t]).named(f"h{t + 1}"))
    v = p.vec("v")
    dhs = [None] * T
    dhs[T - 1] = (v * act_prime(hs[T - 1])).named(f"dh{T}")
    for t in range(T - 1, 0, -1):
        dhs[t - 1] = (act_prime(hs[t - 1]) * (W.T @ dhs[t])).named(f"dh{t}")
    for t in range(T):
        p.output(f"q{t + 1}", tp.mean(act(hs[t]) ** 2))
    nngp = tp.mean(act(hs[-1]) * act(hs[-1]).prime, name="K_out")
    phis, phis_second = [act(h) for h in hs], [act(h).prime for h in hs]
    terms = []  # (added at once by tp.add: one at a time, each addition re-sorts the sum so far)
    for s in range(T):
        for t in range(T):
            kdh = tp.mean(dhs[s] * dhs[t].prime)
            terms.append(win**2 * tp.mean(gs[s] * gs[t].prime) * kdh)
            if s >= 1 and t >= 1:
                terms.append(W_sigma2(p) * tp.mean(phis[s - 1] * phis_second[t - 1]) * kdh)
    ntk = tp.add(nngp, *terms)
    p.output("nngp", nngp)
    p.output("ntk", ntk)
    return p


def W_sigma2(p):
    """sigma_W^2 as a program scalar (the Param created by p.mat)."""
    return tp.Scalar(p, tp.ops.node_symbol("sigma_W")) ** 2
