"""Benchmark: predictions from kernels, tpcompiler.predict vs neural-tangents' predict.

    python benchmarks/predict_vs_nt.py [--quick] [--write-docs] [--nt-python PATH]

Both sides get the SAME kernel matrices (NNGP and NTK of ``programs/mlp.py``: relu, depth 3,
w_std 1.5, b_std 0.05, on iid N(0, 1) inputs of dimension 64, computed once by tpcompiler and
saved), N training inputs, 500 test inputs, K = 10 target columns, and compute the NNGP and
NTK means (500 x K) and covariances (500 x 500):

* infinite time (``t = inf`` / NT's ``t=None``, Cholesky on both sides) with diag_reg 1e-4,
* finite time t = 100, learning rate 1 (eigendecomposition on both sides), no regularizer,
* 30 times from 1 to 10^4 (log-spaced) in one call, no regularizer: both sides through
  ``gradient_descent_mse_ensemble``'s ``predict_fn(t=array)`` (tpcompiler's with a kernel_fn
  that returns the stored matrices, as NT's), which decompose each training kernel once.

neural-tangents: ``nt.predict.gradient_descent_mse_ensemble`` with a ``kernel_fn`` that returns
the stored matrices, a fresh predict function per call (it caches its factorizations), outputs
``block_until_ready``; tpcompiler: ``tpcompiler.predict.predict`` on the same arrays.  Each side
runs in its own fresh process; times are the median of 3 calls after a first one.  Agreement:
max |tpc - NT| / max |NT| over the four outputs.  The NT side needs a Python that imports
neural-tangents (``--nt-python``, ``$NT_PYTHON``, or ``../ntvenv/bin/python``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Predictions vs neural-tangents"
N_TEST, K, D, REG, T_FINITE = 500, 10, 64, 1e-4, 100.0
TIMES = tuple(float(t) for t in np.logspace(0, 4, 30))
MANY_TIMES = f"{len(TIMES)} times"
CASES = (("inf", None, REG), ("t=100", T_FINITE, 0.0), (MANY_TIMES, TIMES, 0.0))
REPEATS = 3


def sizes(quick: bool):
    return [1000] if quick else [1000, 2000, 4000]


def _timed(fn):
    fn()
    times = []
    out = None
    for _ in range(REPEATS):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def make_data(work: Path, n: int) -> None:
    import tpcompiler as tp

    rng = np.random.default_rng(n)
    X = rng.standard_normal((n + N_TEST, D))
    net = tp.compile(tp.load(str(ROOT / "programs" / "mlp.py"), depth=3, phi="relu", w_std=1.5, b_std=0.05, d=D))
    k = net.kernels(X)
    for g in ("nngp", "ntk"):
        np.save(work / f"{n}_{g}_train.npy", k[g][:n, :n])
        np.save(work / f"{n}_{g}_test_train.npy", k[g][n:, :n])
        np.save(work / f"{n}_{g}_test.npy", k[g][n:, n:])
    np.save(work / f"{n}_y.npy", rng.standard_normal((n, K)))


def load(work: Path, n: int):
    blocks = {b: {g: np.load(work / f"{n}_{g}_{b}.npy") for g in ("nngp", "ntk")} for b in ("train", "test_train", "test")}
    return blocks, np.load(work / f"{n}_y.npy")


def tpc_worker(work: Path, ns) -> dict:
    from tpcompiler.predict import gradient_descent_mse_ensemble, predict

    res = {}
    for n in ns:
        k, y = load(work, n)
        x_train, x_test = np.zeros((n, 1)), np.zeros((N_TEST, 1))
        Kern = collections.namedtuple("Kernel", "nngp ntk")

        def kernel_fn(x1, x2, get):
            block = "train" if x1.shape[0] == n else ("test" if x2 is None else "test_train")
            return Kern(**{g: k[block][g] for g in ("nngp", "ntk")})

        for name, t, reg in CASES:
            def run():
                if isinstance(t, tuple):  # (as NT's side: a fresh predict function per call)
                    fn = gradient_descent_mse_ensemble(kernel_fn, x_train, y, diag_reg=reg)
                    return fn(np.array(t), x_test, ("nngp", "ntk"), compute_cov=True)._asdict()
                return predict(k["train"], k["test_train"], y, k["test"], t=np.inf if t is None else t, reg=reg)
            sec, out = _timed(run)
            res[f"{n}/{name}"] = {"seconds": sec, "condition": {g: out[g].condition for g in out},
                                  "method": {g: out[g].method for g in out}}
            for g in out:
                np.save(work / f"tpc_{n}_{name}_{g}_mean.npy", out[g].mean)
                np.save(work / f"tpc_{n}_{name}_{g}_cov.npy", out[g].cov)
    return res


def nt_worker(work: Path, ns) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt

    res = {"versions": {"neural-tangents": nt.__version__, "jax": jax.__version__}}
    for n in ns:
        k, y = load(work, n)
        x_train, x_test = jnp.zeros((n, 1)), jnp.zeros((N_TEST, 1))
        Kern = collections.namedtuple("Kernel", "nngp ntk")

        def kernel_fn(x1, x2, get, **kwargs):
            block = "train" if x1.shape[0] == n else ("test" if x2 is None else "test_train")
            get = (get,) if isinstance(get, str) else tuple(get)
            if len(get) == 1:
                return jnp.asarray(k[block][get[0]])
            return Kern(**{g: jnp.asarray(k[block][g]) for g in ("nngp", "ntk")})

        for name, t, reg in CASES:
            def run():
                fn = nt.predict.gradient_descent_mse_ensemble(kernel_fn, x_train, jnp.asarray(y), diag_reg=reg)
                times = jnp.asarray(t) if isinstance(t, tuple) else t
                return jax.block_until_ready(fn(times, x_test, ("nngp", "ntk"), compute_cov=True))
            sec, out = _timed(run)
            res[f"{n}/{name}"] = {"seconds": sec}
            for g in ("nngp", "ntk"):
                np.save(work / f"nt_{n}_{name}_{g}_mean.npy", np.asarray(getattr(out, g).mean))
                np.save(work / f"nt_{n}_{name}_{g}_cov.npy", np.asarray(getattr(out, g).covariance))
    return res


def find_nt_python(explicit):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for c in (explicit, os.environ.get("NT_PYTHON"), sys.executable, str(ROOT.parent / "ntvenv" / "bin" / "python")):
        if c and Path(c).exists() and subprocess.run([c, "-c", "import jax, neural_tangents"], env=env,
                                                     capture_output=True).returncode == 0:
            return c
    return None


def run_worker(python: str, kind: str, work: Path, ns) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--work", str(work), "--sizes", ",".join(map(str, ns))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{kind} worker failed (exit {proc.returncode})")
    return json.loads((work / f"{kind}.json").read_text())


def agreement(work: Path, n: int, name: str) -> float:
    worst = 0.0
    for g in ("nngp", "ntk"):
        for part in ("mean", "cov"):
            a, b = np.load(work / f"tpc_{n}_{name}_{g}_{part}.npy"), np.load(work / f"nt_{n}_{name}_{g}_{part}.npy")
            worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    return worst


def report(info: dict, ns, tpc: dict, ntr: dict, work: Path) -> str:
    lines = [SECTION, "",
             f"Measured {info['date']} by `python benchmarks/predict_vs_nt.py` on {info['cpu']}, {info['cores']} cores, "
             f"{info['memory']}; 1-minute load average at start {info['load'][0]:.2f}"
             f"{' (the machine was shared)' if info['load'][0] > float(info['cores']) else ''}. "
             f"neural-tangents {ntr['versions']['neural-tangents']} on jax {ntr['versions']['jax']} (x64); numpy {info['numpy']}.",
             "",
             f"Same NNGP and NTK matrices on both sides (programs/mlp.py relu depth 3; {N_TEST} test inputs, K = {K} "
             "targets); NNGP and NTK means and covariances in one call; median of 3 after a first call, each side in "
             "its own process.  inf: Cholesky with diag_reg 1e-4; t=100: eigendecomposition, no regularizer; 30 times: "
             "log-spaced from 1 to 1e4 in one `predict_fn(t=array)` call on both sides, no regularizer.",
             "", "| N | case | tpc (s) | NT (s) | NT / tpc | max rel. difference | tpc condition NTK (method) |",
             "|---|---|---|---|---|---|---|"]
    for n in ns:
        for name, _, _ in CASES:
            a, b = tpc[f"{n}/{name}"], ntr[f"{n}/{name}"]
            lines.append(f"| {n} | {name} | {a['seconds']:.3g} | {b['seconds']:.3g} | **{b['seconds'] / a['seconds']:.2f}x** "
                         f"| {agreement(work, n, name):.1e} | {a['condition']['ntk']:.3g} ({a['method']['ntk']}) |")
    nt_ahead_at_many_times = all(ntr[f"{n}/{MANY_TIMES}"]["seconds"] < tpc[f"{n}/{MANY_TIMES}"]["seconds"] for n in ns)
    why = ("  At many times neural-tangents is faster here: tpcompiler's NTK covariance still multiplies N x N by "
           "N x N_test matrices at each time." if nt_ahead_at_many_times else "")
    lines += ["", f"Load average at the end: {os.getloadavg()[0]:.2f}.  With a load far above the core count, OpenBLAS's "
              "spinning threads dominate tpcompiler's LAPACK calls; compare ratios measured on a quiet machine.", "",
              "Both sides factor each training kernel once per call (one Cholesky at t = inf, one eigendecomposition "
              "at finite times, shared by all the times of an array); tpcompiler checks and regularizes each kernel "
              "matrix, and projects each test block onto the eigenvectors, once per call too." + why, ""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--nt-python")
    ap.add_argument("--worker", choices=["tpc", "nt"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        work, ns = Path(args.work), [int(s) for s in args.sizes.split(",")]
        res = (tpc_worker if args.worker == "tpc" else nt_worker)(work, ns)
        (work / f"{args.worker}.json").write_text(json.dumps(res))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _machine import machine_info, write_section

    nt_python = find_nt_python(args.nt_python)
    if nt_python is None:
        raise SystemExit("no Python that imports neural-tangents: give --nt-python (see ../shared/reference/README.md)")
    ns = sizes(args.quick)
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in ns:
            make_data(work, n)
        tpc = run_worker(sys.executable, "tpc", work, ns)
        ntr = run_worker(nt_python, "nt", work, ns)
        text = report(info, ns, tpc, ntr, work)
    print(text)
    if args.write_docs:
        write_section(DOCS, SECTION, text)


if __name__ == "__main__":
    main()
