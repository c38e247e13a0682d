"""scikit-learn hyperparameters (issue 11, item 2): the cost of a new (w_std, b_std) for
``tpcompiler.sklearn.NNGP`` of programs/mlp.py (depth 3, relu).

* one kernel evaluation at a value never seen before (N = 100 inputs, d = 3): the first call
  pays whatever a new value costs (before: build -> derive -> code generation -> Numba JIT);
* ``GaussianProcessRegressor(NNGP + WhiteKernel).fit`` with its L-BFGS-B optimizer on
  N = 50, d = 3 (targets from a smooth function, seed 0), timed and with the number of kernel
  evaluations it made.

Usage: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/sklearn_hyper.py [--repeats R] [--skip-fit] [--start W_STD B_STD]
(NUMBA_NUM_THREADS=1 as well for small N: two threads' start-up costs ~10 ms per parallel loop on a loaded machine.)
Prints one JSON line per measurement.  Values are random and fresh per run (drawn from
time), so the on-disk code cache of earlier runs cannot serve them.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MLP = str(ROOT / "programs" / "mlp.py")


def fresh_values(rng) -> tuple[float, float]:
    """A (w_std, b_std) pair no earlier run has compiled."""
    return float(rng.uniform(0.6, 2.0)), float(rng.uniform(0.05, 0.6))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-fit", action="store_true", help="only the single evaluations")
    ap.add_argument("--start", type=float, nargs=2, metavar=("W_STD", "B_STD"),
                    help="the GP fit's starting (w_std, b_std) (default: fresh random values); the same start "
                         "as an earlier run must reach the same optimum, whatever the code path")
    args = ap.parse_args()
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import WhiteKernel

    from tpcompiler.sklearn import NNGP

    rng = np.random.default_rng(time.time_ns() % 2**32)
    data = np.random.default_rng(0)
    X100 = data.standard_normal((100, 3))
    # warm-up: imports, the first value's compile (not timed)
    w, b = fresh_values(rng)
    NNGP(MLP, depth=3, phi="relu", w_std=w, b_std=b)(X100)
    t_new = []
    t_same = []
    for _ in range(args.repeats):
        w, b = fresh_values(rng)
        k = NNGP(MLP, depth=3, phi="relu", w_std=w, b_std=b)
        t0 = time.perf_counter()
        k(X100)
        t_new.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        k(X100)
        t_same.append(time.perf_counter() - t0)
    print(json.dumps({"what": "NNGP(mlp depth 3 relu)(X), N=100, new (w_std, b_std)", "seconds": t_new,
                      "again_same_value_seconds": t_same, "load": os.getloadavg()}), flush=True)

    if args.skip_fit:
        return
    X = data.standard_normal((50, 3))
    y = np.sin(X @ np.array([1.0, -0.5, 0.3])) + 0.05 * data.standard_normal(50)
    w, b = args.start if args.start else fresh_values(rng)
    kernel = NNGP(MLP, depth=3, phi="relu", w_std=w, b_std=b) + WhiteKernel(1e-2)
    calls = {"n": 0}
    inner = type(kernel.k1).__call__

    def counting(self, *a, **kw):
        calls["n"] += 1
        return inner(self, *a, **kw)

    type(kernel.k1).__call__ = counting
    t0 = time.perf_counter()
    gpr = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(X, y)
    seconds = time.perf_counter() - t0
    type(kernel.k1).__call__ = inner
    print(json.dumps({"what": "GaussianProcessRegressor(NNGP(mlp depth 3 relu) + WhiteKernel).fit, N=50, d=3",
                      "seconds": seconds, "kernel_calls": calls["n"], "start": [w, b],
                      "kernel_": repr(gpr.kernel_), "log_marginal_likelihood": gpr.log_marginal_likelihood_value_,
                      "load": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
