"""Row-local exact steps in one compiled loop (docs/DESIGN.md 2.9): ``StepEngine.steps``.

A Gaussian-linear network whose forward pass is one input layer A(xi) = sum_j C_j(xi) U_j
followed by affine maps with no constant term, read out on sampled output coordinates
(``loss="negative_sampling"``), has a step that touches only rows: with h = a A(xi) (a, the
product of the affine maps' coefficients, read from the step program's lowered forward pass)

    f_o   = sigma n^{e_f} E[Z^h Z^{v_o}] / norm                      (o sampled)
    chi_o = sigmoid(f_o) - y_o                                        (per occurrence of o)
    dA    = a sigma sum_o chi_o v_o                                   (old rows)
    v_o  <- keep v_o - lr n^{e_v} / sigma (sum of chi_o) h             (each sampled row once)
    U_j  <- keep U_j - lr n^{e_U} / scale_U^2 C_j dA                   (each used column)

with keep = 1 - lr n^{e_lr} lambda on touched rows (weight decay) -- the generic engine's
``_gradient`` and ``_apply`` for this class of networks, term by term.  Each sampled readout row
is visited once for its dot and once for its share of dA and its update, four rows at a time
(``BLOCK``): the logistic error of output o depends on f_o alone, and a row sampled twice has
two equal dots.

``plan`` decides from the step program whether a network is of this class and reads a, the
column map and the scales; ``run`` is the loop over a sequence of batch-1 steps, with no Python
per step (the generic engine's per-step Python cost more than its row arithmetic for word2vec:
docs/benchmarks.md).  ``StepEngine.steps`` falls back to the generic step for everything else,
and the tests compare the two to 1e-12.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from tpcompiler.ir import ops


@dataclass(frozen=True)
class Plan:
    """What ``run`` needs from the engine, read once per engine."""

    U: str              # the input layer's matrix
    trained: bool       # whether U is trained
    col_of: np.ndarray  # input coordinate -> column of U (-1: none)
    weight: np.ndarray  # its weight (1 / sqrt(norm) of the layer)
    a: float            # h = a A(xi)


def plan(eng) -> Plan | None:
    """The fused plan of ``eng``'s step, or None when the step is not row-local (module
    docstring): exact method, one replica, sampled outputs, no n x n matrix, no bias or fixed
    vector, one input layer with one column per input coordinate, affine maps without constant
    between it and the readout, no clipping, weight decay (if any) on touched rows only."""
    from tpcompiler.training.engine import _column_map, _value

    sp_ = eng.program
    if (eng.method != "exact" or eng.alg.R != 1 or sp_.loss != "negative_sampling" or sp_.matrices
            or sp_.biases or sp_.fixed or len(sp_.input_layers) != 1 or eng.clip is not None
            or (eng.weight_decay and eng.decay_rows != "touched")):
        return None
    layer = sp_.input_layers[0]
    tpl = sp_.template
    a, k = 1.0, sp_.readout_vector
    while k != layer:
        if not isinstance(tpl.op(k), ops.Nonlin):
            return None
        low = sp_.lowered[k]
        if low.const[1] or len(low.coefs) != 1:
            return None
        if any(name not in sp_.params and not isinstance(tpl.op(name), ops.WidthPower) for name in low.names
               if name != low.coefs[0][0]):
            return None  # a coefficient that reads an input coordinate or a vector
        vec, fn = low.coefs[0]
        try:
            c = np.asarray(fn(*[_value(eng, name, {"__X": None, vec: 0.0}) for name in low.names]), dtype=np.float64)
        except (TypeError, ValueError, KeyError):
            return None
        if c.size != 1:
            return None
        a *= float(c.reshape(()))
        k = vec
    _M, const, single = _column_map(eng, layer)
    if const is not None or single is None:
        return None
    used = single[0][single[0] >= 0]
    if np.unique(used).size != used.size:
        return None  # two coordinates on one column: the loop would decay that column twice
    U = eng._layer_matrix[layer]
    return Plan(U, U in sp_.input_mats, single[0], single[1], a)


@njit(cache=True)
def _distinct_rows(outs, labels, k, rows, counts, ysums):
    """The distinct rows among the k sampled outputs, in order of first occurrence, with their
    counts and label sums (written to rows, counts, ysums); returns how many."""
    m = 0
    for i in range(k):
        o = outs[i]
        seen = False
        for i2 in range(i):
            if outs[i2] == o:
                seen = True
                break
        if seen:
            continue
        count, ysum = 0, 0.0
        for i2 in range(i, k):
            if outs[i2] == o:
                count += 1
                ysum += labels[i2]
        rows[m], counts[m], ysums[m] = o, count, ysum
        m += 1
    return m


#: Sampled readout rows visited together: their dots share one pass over h, their updates one
#: pass over h and g (4: 1.35x faster than one at a time for word2vec, measured)
BLOCK = 4


@njit(cache=True, fastmath=True)
def run(U, V, touched, independent, indptr, indices, data, col_of, weight, outs, ocount, labels, lrs,
        a, f_scale, v_scale, u_scale, decay, trained):
    """The steps t = 0 .. T-1 (module docstring) on U (k_U, D) and V (K, D) in place; returns
    the loss of every step.  f_scale = sigma n^{e_f} / norm, v_scale = n^{e_v} / sigma,
    u_scale = sigma n^{e_U} / scale_U^2 (dA = a sigma sum chi v: its sigma folded in here),
    decay = n^{e_lr} lambda.  The distinct sampled rows are taken BLOCK at a time: one pass for
    their dots, one for their share of g and their updates (a block's rows stay in cache)."""
    T = lrs.size
    D = U.shape[1]
    h, g = np.empty(D), np.empty(D)
    loss = np.zeros(T)
    kmax = outs.shape[1]
    rows = np.empty(kmax, dtype=np.int64)
    counts = np.empty(kmax, dtype=np.int64)
    ysums = np.empty(kmax)
    f = np.empty(BLOCK)
    chi = np.empty(BLOCK)
    upd = np.empty(BLOCK)
    kp = np.empty(BLOCK)
    for t in range(T):
        lr = lrs[t]
        keep = 1.0 - lr * decay
        h[:] = 0.0
        for p in range(indptr[t], indptr[t + 1]):
            j = col_of[indices[p]]
            if j < 0:
                continue
            c = a * data[p] * weight[indices[p]]
            row = U[j]
            for d in range(D):
                h[d] += c * row[d]
        g[:] = 0.0
        m = _distinct_rows(outs[t], labels[t], ocount[t], rows, counts, ysums)
        for b0 in range(0, m, BLOCK):
            nb = min(BLOCK, m - b0)
            # a short block repeats its last row in the unused slots, with zero weight and no write
            r0 = V[rows[b0]]
            r1 = V[rows[b0 + min(1, nb - 1)]]
            r2 = V[rows[b0 + min(2, nb - 1)]]
            r3 = V[rows[b0 + min(3, nb - 1)]]
            f0, f1, f2, f3 = 0.0, 0.0, 0.0, 0.0
            for d in range(D):
                hd = h[d]
                f0 += hd * r0[d]
                f1 += hd * r1[d]
                f2 += hd * r2[d]
                f3 += hd * r3[d]
            f[0], f[1], f[2], f[3] = f0, f1, f2, f3
            for q in range(BLOCK):
                chi[q], upd[q], kp[q] = 0.0, 0.0, 1.0
                if q >= nb:
                    continue
                o = rows[b0 + q]
                fq = f[q] * f_scale if (touched[o] or not independent) else 0.0
                pq = 0.5 * (1.0 + np.tanh(0.5 * fq))
                loss[t] += counts[b0 + q] * (max(fq, 0.0) + np.log1p(np.exp(-abs(fq)))) - ysums[b0 + q] * fq
                chi[q] = counts[b0 + q] * pq - ysums[b0 + q]
                upd[q] = -lr * v_scale * chi[q]
                kp[q] = keep
                touched[o] = True
            c0, c1, c2, c3 = chi[0], chi[1], chi[2], chi[3]
            u0, u1, u2, u3 = upd[0], upd[1], upd[2], upd[3]
            k0, k1, k2, k3 = kp[0], kp[1], kp[2], kp[3]
            for d in range(D):
                hd = h[d]
                x0, x1, x2, x3 = r0[d], r1[d], r2[d], r3[d]
                g[d] += c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3
                r0[d] = k0 * x0 + u0 * hd
                if nb > 1:
                    r1[d] = k1 * x1 + u1 * hd
                if nb > 2:
                    r2[d] = k2 * x2 + u2 * hd
                if nb > 3:
                    r3[d] = k3 * x3 + u3 * hd
        if not trained:
            continue
        for p in range(indptr[t], indptr[t + 1]):
            j = col_of[indices[p]]
            if j < 0:
                continue
            cu = -lr * u_scale * a * data[p] * weight[indices[p]]
            row = U[j]
            for d in range(D):
                row[d] = keep * row[d] + cu * g[d]
    return loss
