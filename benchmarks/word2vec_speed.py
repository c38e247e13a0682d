"""Benchmark: how fast can word2vec's exact limit go on this machine?  The step engine against a
hand-fused loop doing the same arithmetic, and both against the memory bandwidth the step's
row traffic can get (issue 9, item 5a's 15-minute target).

    python benchmarks/word2vec_speed.py [--steps S] [--write-docs]

The first S steps (default 20,000) of TP4's protocol (experiments/word2vec_tp4.py, seed 0, epoch 1
of 15; V = 9,044, so every vector of the exact limit is 9,045 coefficients) are generated once and
then run twice from the same initial state:

* **engine**: ``tp.StepEngine`` on programs/word2vec_cbow.py (``method="exact"``), stepped as
  the experiment steps it (``step`` per step), and the same steps as one ``steps`` call (the
  engine's compiled loop for row-local exact steps, training/fused.py);
* **fused loop**: one hand-fused single-threaded Numba loop over the same steps doing the same float64
  arithmetic on the same two tables (context mean h, the sampled dots, the logistic errors, the
  readout rows' decay + update while they are in cache, the context columns' decay + update):
  each touched row is streamed from memory once and written once, with no per-step Python.  It is
  a *reference for speed only* (fastmath: its dot products are summed in vector lanes, as BLAS
  sums them): it is this benchmark's, not the library's, and it is checked
  against the engine (both tables after the run, max abs difference printed; it must be rounding);
* **one visit per row**: the same loop with each sampled readout row's dot, error and update done
  in one visit (word2vec.c's order; the same numbers for the logistic loss, see the kernel);
* **two threads**: the same loop with every row split into two column halves, one per core (one
  parallel region for the dots, one for the updates, per step).

The issue's target, 15 epochs (3.57 million steps) in 15 minutes, needs ~3,970 steps/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit, prange

from _machine import machine_info, write_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## word2vec's exact limit: the step engine, a hand-fused loop and the memory bandwidth"
TARGET_STEPS, TARGET_SECONDS = 3_570_000, 900.0


def steps_of_the_protocol(corpus, S: int, seed: int = 0, epochs: int = 15):
    """The first S steps as arrays: context columns and weights (padded, with counts), outputs
    (target first), labels, learning rates."""
    import word2vec_tp4 as w2v

    V, T = corpus.vocab.size, corpus.vocab.total
    rng = np.random.default_rng(seed)
    cols, vals, outs, lrs = [], [], [], []
    for st in w2v.epoch_steps(corpus.encoded, corpus.keep, corpus.cdf, rng, 0, T):
        c, v = st.context_mean(V)
        cols.append(c), vals.append(v), outs.append(st.outputs()), lrs.append(w2v.learning_rate(st.words_read, epochs * T))
        if len(cols) == S:
            break
    return cols, vals, outs, lrs


def _padded(rows, dtype):
    width = max(len(r) for r in rows)
    out = np.zeros((len(rows), width), dtype=dtype)
    count = np.array([len(r) for r in rows], dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, count


@njit(cache=True)
def _row_error(outs, k, i, chi):
    """(whether i is the first occurrence of output row outs[i] among the step's k samples, the
    row's summed error): a row drawn twice gets its gradient from the old row and decays once."""
    o = outs[i]
    for i2 in range(i):
        if outs[i2] == o:
            return False, 0.0
    c = 0.0
    for i2 in range(i, k):
        if outs[i2] == o:
            c += chi[i2]
    return True, c


@njit(cache=True, fastmath=True)
def _context_sum(U, cols, vals, n, h):
    """h = sum_a vals_a U_{cols_a} over the first n context entries."""
    h[:] = 0.0
    for a in range(n):
        row, w = U[cols[a]], vals[a]
        for d in range(h.size):
            h[d] += w * row[d]


@njit(cache=True, fastmath=True)
def _context_update(U, cols, vals, n, keep, lr, g):
    """U_{cols_a} <- keep U_{cols_a} - lr vals_a g over the first n context entries."""
    for a in range(n):
        row, w = U[cols[a]], vals[a]
        for d in range(g.size):
            row[d] = keep * row[d] - lr * w * g[d]


@njit(cache=True, fastmath=True)
def fused_steps(U, Vt, ccols, cvals, ccount, outs, ocount, lrs, keep_rate):
    """U (V, D): input columns; Vt (V, D): readout rows.  Per step: h = sum_j vals_j U_j;
    f_i = h . v_{o_i} (old rows); chi_i = sigmoid(f_i) - [i == 0]; g = sum_i chi_i v_{o_i} (old);
    v_o <- keep v_o - lr sum_{i: o_i = o} chi_i h; U_j <- keep U_j - lr vals_j g."""
    D = U.shape[1]
    h, g = np.empty(D), np.empty(D)
    for s in range(ccols.shape[0]):
        lr = lrs[s]
        keep = 1.0 - lr * keep_rate
        _context_sum(U, ccols[s], cvals[s], ccount[s], h)
        k = ocount[s]
        chi = np.empty(k)
        for i in range(k):
            row = Vt[outs[s, i]]
            f = 0.0
            for d in range(D):
                f += h[d] * row[d]
            chi[i] = 1.0 / (1.0 + np.exp(-f)) - (1.0 if i == 0 else 0.0)
        g[:] = 0.0
        for i in range(k):
            first, c = _row_error(outs[s], k, i, chi)
            if not first:
                continue
            row = Vt[outs[s, i]]
            for d in range(D):
                g[d] += c * row[d]
                row[d] = keep * row[d] - lr * c * h[d]
        _context_update(U, ccols[s], cvals[s], ccount[s], keep, lr, g)


@njit(cache=True, fastmath=True)
def fused_steps_single_pass(U, Vt, ccols, cvals, ccount, outs, ocount, lrs, keep_rate):
    """``fused_steps`` visiting each sampled readout row once: its dot, its error, its share of g
    and its update while the row is in cache (word2vec.c's order).  The same numbers: the logistic
    error of output o depends on f_o alone, and a row drawn c times has c equal dots (same old
    row, same h), so its summed error is c times one error."""
    D = U.shape[1]
    h, g = np.empty(D), np.empty(D)
    for s in range(ccols.shape[0]):
        lr = lrs[s]
        keep = 1.0 - lr * keep_rate
        _context_sum(U, ccols[s], cvals[s], ccount[s], h)
        g[:] = 0.0
        k = ocount[s]
        ones = np.ones(k)
        for i in range(k):
            first, count = _row_error(outs[s], k, i, ones)
            if not first:
                continue
            row = Vt[outs[s, i]]
            f = 0.0
            for d in range(D):
                f += h[d] * row[d]
            c = count * (1.0 / (1.0 + np.exp(-f)) - (1.0 if i == 0 else 0.0))
            for d in range(D):
                g[d] += c * row[d]
                row[d] = keep * row[d] - lr * c * h[d]
        _context_update(U, ccols[s], cvals[s], ccount[s], keep, lr, g)


@njit(cache=True, parallel=True, fastmath=True)
def fused_steps_two_threads(U, Vt, ccols, cvals, ccount, outs, ocount, lrs, keep_rate):
    """``fused_steps`` with every row split into two column halves, one per thread: per step one
    parallel region for h and the partial dots, the dots summed (half 0 + half 1: deterministic),
    then one parallel region for the updates.  Distinct rows' updates do not interact, so the
    halves need no other synchronisation."""
    D = U.shape[1]
    h, g = np.empty(D), np.empty(D)
    k_max = outs.shape[1]
    part = np.zeros((2, k_max))
    chi = np.zeros(k_max)
    for s in range(ccols.shape[0]):
        lr = lrs[s]
        keep = 1.0 - lr * keep_rate
        k = ocount[s]
        for t in prange(2):
            lo, hi = t * D // 2, (t + 1) * D // 2
            h[lo:hi] = 0.0
            for a in range(ccount[s]):
                row, w = U[ccols[s, a]], cvals[s, a]
                for d in range(lo, hi):
                    h[d] += w * row[d]
            for i in range(k):
                row = Vt[outs[s, i]]
                f = 0.0
                for d in range(lo, hi):
                    f += h[d] * row[d]
                part[t, i] = f
        for i in range(k):
            chi[i] = 1.0 / (1.0 + np.exp(-(part[0, i] + part[1, i]))) - (1.0 if i == 0 else 0.0)
        for t in prange(2):
            lo, hi = t * D // 2, (t + 1) * D // 2
            g[lo:hi] = 0.0
            for i in range(k):
                first, c = _row_error(outs[s], k, i, chi)
                if not first:
                    continue
                row = Vt[outs[s, i]]
                for d in range(lo, hi):
                    g[d] += c * row[d]
                    row[d] = keep * row[d] - lr * c * h[d]
            for a in range(ccount[s]):
                row, w = U[ccols[s, a]], cvals[s, a]
                for d in range(lo, hi):
                    row[d] = keep * row[d] - lr * w * g[d]


@njit(cache=True, parallel=True)
def _stream_rows(T, rows, threads):
    """row <- 0.999 row + 1e-3 x (read and write) for the given rows, split into ``threads``
    independent streams with no synchronisation: the memory bandwidth a row-streaming step can
    get from this machine with 1 or 2 cores."""
    D = T.shape[1]
    x = np.ones(D)
    per = rows.size // threads
    for t in prange(threads):
        for q in range(t * per, (t + 1) * per):
            row = T[rows[q]]
            for d in range(D):
                row[d] = 0.999 * row[d] + 1e-3 * x[d]


def stream_bandwidth(T, rows) -> dict:
    """GB/s (read + write) of ``_stream_rows`` with 1 and with 2 threads on the same rows."""
    out = {}
    for threads in (1, 2):
        _stream_rows(T, rows[:threads * 2], threads)  # compile / load
        t0 = time.perf_counter()
        _stream_rows(T, rows, threads)
        out[threads] = 2 * rows.size * T.shape[1] * 8 / (time.perf_counter() - t0) / 1e9
    return out


def main(argv=None):
    import tpcompiler as tp  # noqa: F401
    import word2vec_tp4 as w2v

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    info = machine_info()
    corpus = w2v.Corpus.load()
    V = corpus.vocab.size
    cols, vals, outs, lrs = steps_of_the_protocol(corpus, args.steps)
    eng = w2v.make_engine("inf", V, 0)
    U0 = eng.input_cols["U"][:, 0].copy()          # the fused loops' copy of the state, (V, D)
    R0 = np.zeros((eng.readout.shape[1], U0.shape[1]))
    R0[:, :eng.readout.shape[2]] = eng.readout[0]    # readout rows start as 0 (shorter: the basis grows)
    Xs = [w2v.csr_row(c, v, V) for c, v in zip(cols, vals)]
    labels = [np.eye(1, o.size)[0][None, :] for o in outs]
    t0 = time.perf_counter()
    for X, y, o, lr in zip(Xs, labels, outs, lrs):
        eng.step(X, y, lr, outputs=o[None, :])
    engine_s = time.perf_counter() - t0
    # the same steps as one sequence (StepEngine.steps: training/fused.py's compiled loop)
    import scipy.sparse as sps

    seq = w2v.make_engine("inf", V, 0)
    Xall, ys = sps.vstack(Xs).tocsr(), [y[0] for y in labels]
    seq.steps(Xall[:1], ys[:1], lrs[:1], outs[:1])  # compile / load the loop outside the timing
    seq = w2v.make_engine("inf", V, 0)
    t0 = time.perf_counter()
    seq.steps(Xall, ys, lrs, outs)
    steps_s = time.perf_counter() - t0
    ccols, ccount = _padded(cols, np.int64)
    cvals, _ = _padded(vals, np.float64)
    outs_p, ocount = _padded(outs, np.int64)
    lrs = np.asarray(lrs)
    args_of = (ccols, cvals, ccount, outs_p, ocount, lrs, w2v.WEIGHT_DECAY)
    timed = {}
    for name, kernel in (("one", fused_steps), ("single", fused_steps_single_pass), ("two", fused_steps_two_threads)):
        kernel(U0[:1].copy(), R0[:1].copy(), ccols[:1] * 0, cvals[:1], ccount[:1] * 0, outs_p[:1] * 0,
               ocount[:1] * 0, lrs[:1], w2v.WEIGHT_DECAY)  # compile (or load from the cache) outside the timing
        U, Rt = U0.copy(), R0.copy()
        t0 = time.perf_counter()
        kernel(U, Rt, *args_of)
        timed[name] = (time.perf_counter() - t0, U, Rt)
    fused_s, U0, R0 = timed["one"]
    two_s, U2, R2 = timed["two"]
    single_s, U1, R1 = timed["single"]

    def gap(mine, theirs):
        m = max(mine.shape[1], theirs.shape[1])
        pad = lambda a: np.pad(a, ((0, 0), (0, m - a.shape[1])))  # noqa: E731
        return float(np.abs(pad(mine) - pad(theirs)).max())

    diff = max(gap(seq.input_cols["U"][:, 0], eng.input_cols["U"][:, 0]), gap(seq.readout[0], eng.readout[0]),
               gap(U0, eng.input_cols["U"][:, 0]), gap(R0, eng.readout[0]), gap(U2, U0), gap(R2, R0), gap(U1, U0), gap(R1, R0))
    # the same rows the steps touch, in the same order (35 per step on average), on a scratch table
    touched = np.concatenate([np.concatenate((c, o)) for c, o in zip(cols, outs)])
    bandwidth = stream_bandwidth(U2, touched[: 2 * (touched.size // 2)])
    scale = max(np.abs(R0).max(), 1e-300)
    rows = [("step engine, one `step` call per step", engine_s),
            ("step engine, one `steps` call for all (fused loop of training/fused.py)", steps_s), ("hand-fused loop, one thread", fused_s),
            ("hand-fused loop, one thread, one visit per readout row", single_s),
            ("hand-fused loop, two threads (row halves)", two_s)]
    where = (f"{info['date']} on {info['cpu']}, {info['cores']} cores, {info['memory']} (load average "
             f"{info['load'][0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)")
    lines = [SECTION, "", f"Measured {where} by `python benchmarks/word2vec_speed.py --steps {args.steps}`: the first "
             f"{args.steps:,} steps of TP4's protocol (seed 0), V = {V:,}.", "",
             "| implementation | seconds | steps/s | 3.57 M steps would take (min) |", "|---|---|---|---|"]
    for name, s in rows:
        rate = args.steps / s
        lines.append(f"| {name} | {s:.1f} | {rate:,.0f} | {TARGET_STEPS / rate / 60:.1f} |")
    lines += ["", f"All agree: max abs difference of the tables after the runs {diff:.1e} "
              f"(largest readout coefficient {scale:.2f}).  The target (15 minutes) needs "
              f"{TARGET_STEPS / TARGET_SECONDS:,.0f} steps/s.", "",
              f"Memory bandwidth for this access pattern (every touched row of every step read and written "
              f"once, as `x <- 0.999 x + c`, no synchronisation): {bandwidth[1]:.1f} GB/s on one thread, "
              f"{bandwidth[2]:.1f} GB/s on two.  A step moves about "
              f"{2 * touched.size / args.steps * U0.shape[1] * 8 / 1e6:.1f} MB (read + write), so these "
              f"bound any implementation at {bandwidth[1] * 1e9 / (2 * touched.size / args.steps * U0.shape[1] * 8):,.0f} "
              f"and {bandwidth[2] * 1e9 / (2 * touched.size / args.steps * U0.shape[1] * 8):,.0f} steps/s.", ""]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_section(DOCS, SECTION, text)
    return 0 if diff < 1e-9 * max(1.0, scale) else 1


if __name__ == "__main__":
    sys.exit(main())
