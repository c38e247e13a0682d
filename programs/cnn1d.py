"""1-D convolutional network: neural-tangents' stax.serial(*[Conv(n, (3,), padding, W_std, b_std),
phi] * depth, GlobalAvgPool(), Dense(1, W_std, b_std)) in NTK parametrization, on inputs of
shape (L, C) flattened into the program input (d = L*C, xi[i*C + c] = x[i, c]).

One n-vector per spatial position i = 0..L-1 and layer (n channels); filter taps a = -1, 0, 1.
First conv (an input matrix U with 3C columns, column (a+1)*C + c for tap a, channel c):
  h1_i = w_std/sqrt(3C) sum_{a,c} xi[(i+a)*C + c] U_{(a+1)C+c}  (+ b1),
Hidden convs (three n x n matrices W_l,a shared by all positions, entries N(0, w_std^2/n)):
  h_l,i = (1/sqrt(3)) sum_a W_l,a x_{l-1,i+a}  (+ b_l),     x_l,i = phi(h_l,i),
with biases b_l ~ N(0, b_std^2) shared by positions.  SAME padding skips the taps that fall
outside 0..L-1 (the divisor stays 3 resp. 3C); CIRCULAR padding wraps i+a mod L.
Global average pooling: pool = (1/L) sum_i x_depth,i;  readout f = w_std/sqrt(n) v . pool
(+ b_std beta).  Only the readout is declared: the NNGP and NTK (pair moments of the
auto-differentiated program) are its outputs, and, per neural-tangents' conventions,
NNGP = w_std^2 mean_{i,j} E[x_i x_j'] + b_std^2.
"""
import numpy as np
import sympy as sp

import tpcompiler as tp

PADDINGS = ("SAME", "CIRCULAR")


def default_inputs(d):
    """Two fixed inputs of dimension d = L*C (used when no data is given)."""
    k = np.arange(1, d + 1)
    return np.stack([np.cos(1.3 * k) + 0.2, np.sin(0.7 * k) - 0.1])


def _taps(i, L, padding):
    """(tap a, source position) pairs of output position i."""
    out = []
    for a in (-1, 0, 1):
        j = i + a
        if padding == "CIRCULAR":
            out.append((a, j % L))
        elif 0 <= j < L:
            out.append((a, j))
    return out


def build(L=None, C=2, depth=1, phi="relu", w_std=1.5, b_std=0.1, padding="SAME", d=None):
    if not isinstance(C, int) or C < 1:
        raise ValueError(f"cnn1d: C (channels) must be a positive integer, got {C!r}")
    if d is not None:
        if not isinstance(d, int) or d < 1 or d % C:
            raise ValueError(f"cnn1d: d = {d!r} must be a positive multiple of C = {C} (d = L*C)")
        if L is not None and L * C != d:
            raise ValueError(f"cnn1d: d = {d} but L*C = {L}*{C} = {L * C}")
        L = d // C
    L = 4 if L is None else L
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"cnn1d: L (length) must be a positive integer, got {L!r}")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"cnn1d: depth must be a positive integer, got {depth!r}")
    padding = str(padding).upper()
    if padding not in PADDINGS:
        raise ValueError(f"cnn1d: padding must be 'SAME' or 'CIRCULAR', got {padding!r}")
    p = tp.Program("cnn1d")
    act = tp.phi(phi)
    xi = p.input("xi", L * C, default=default_inputs(L * C))
    w = p.scalar("w_std", w_std)
    U = p.input_matrix("U", 3 * C)

    def bias(layer):
        return None if b_std is None else p.vec(f"b{layer}", var=b_std**2)

    b = bias(1)
    hs = []
    for i in range(L):
        scalars, columns = [], []
        for a, j in _taps(i, L, padding):
            for c in range(C):
                scalars.append(xi[j * C + c])
                columns.append((a + 1) * C + c)
        h = w * U.apply(scalars, columns, norm=3 * C, name=f"g{i}")
        hs.append((h if b is None else h + b).named(f"h1_{i}"))
    for layer in range(2, depth + 1):
        xs = [act(h).named(f"x{layer - 1}_{i}") for i, h in enumerate(hs)]
        W = {a: p.mat(f"W{layer}_{'m0p'[a + 1]}", sigma=w_std) for a in (-1, 0, 1)}
        b = bias(layer)
        hs = []
        for i in range(L):
            h = tp.add(*(W[a] @ xs[j] for a, j in _taps(i, L, padding))) / sp.sqrt(3)
            hs.append((h if b is None else h + b).named(f"h{layer}_{i}"))
    xs = [act(h).named(f"x{depth}_{i}") for i, h in enumerate(hs)]
    pool = (tp.add(*xs) / L).named("pool")  # (one sum: Python's sum(xs) would rebuild it at each addition)
    p.readout(pool, sigma=w, bias=b_std)
    return p
