"""Benchmark: infinite-width NNGP + NTK, tpcompiler's kernel backend vs neural-tangents.

    python benchmarks/kernels_vs_nt.py [--quick] [--write-docs] [--nt-python PATH] [--no-nt]

Network (both sides): neural-tangents' NTK parametrization,
``stax.serial(*[Dense(512, W_std=1.5, b_std=0.05), phi] * depth, Dense(1, W_std=1.5, b_std=0.05))``
= ``programs/mlp.py`` with ``depth, phi, w_std=1.5, b_std=0.05, d=784``.  Inputs: rows of iid
N(0, 1) entries, d = 784, numpy ``default_rng`` seeded per case, float64 throughout.

Cases
* relu, depth 10, N = 1000 and 4000 (``--quick``: N = 1000 only): NNGP and NTK k(X, X).
  Agreement of the two results is checked at N = 1000 (max entrywise relative difference).
* tanh, depth 3, N = 100 (``--quick``: 50): our quadrature against neural-tangents'
  ``stax.ElementwiseNumerical(fn=jnp.tanh, deg=25)`` and ``deg=101``.  Every result's error is
  measured against our own kernels at rtol = 1e-12 (normwise: max |K - K_ref| / max |K_ref|,
  NNGP and NTK, the worse of the two); for each ``deg`` we report our fastest ``rtol`` whose
  measured error is no larger than neural-tangents', i.e. time at equal or better accuracy.
  (N is small because neural-tangents' numerical layer materialises a deg^2 grid per pair:
  deg = 101 at N = 500 asks for 61 GB.)

Timing.  Each side runs in its own fresh process (no shared thread pools or in-process
caches).  "first call" includes JIT compilation; "warm" is the median of 3 calls after it
(neural-tangents: ``jax.jit``-ed kernel_fn, ``block_until_ready``).  tpcompiler's "compile"
(``kernel_function().compile_seconds``: derivation + code generation + loading) is reported
separately, once with an empty code cache (cold) and once in a second process with the cache
filled by the first (cached: what every later run pays).

neural-tangents is an optional extra (it imports only with jax <= 0.5.3, see
../shared/reference/README.md).  The NT side runs in a subprocess with the first Python that
can import it: ``--nt-python``, then ``$NT_PYTHON``, then this interpreter, then
``../ntvenv/bin/python`` next to the repository.  Without one the script times tpcompiler only
and says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _machine import machine_info, write_section

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "programs" / "mlp.py"
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Kernels vs neural-tangents"

W_STD, B_STD, D, WIDTH = 1.5, 0.05, 784, 512
RELU_DEPTH, TANH_DEPTH = 10, 3
TANH_DEGS = (25, 101)
TANH_RTOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8, 1e-10)
REF_RTOL = 1e-12
REPEATS = 3


def config(quick: bool) -> dict:
    return {
        "relu_n": [1000] if quick else [1000, 4000],
        "tanh_n": 50 if quick else 100,
        "agree_n": 1000,
    }


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D))


def _timed(fn, repeats=REPEATS):
    """(first-call seconds, median of `repeats` warm calls, last result)."""
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return first, float(np.median(times)), out


# -- tpcompiler worker ---------------------------------------------------------------------------
def tpc_worker(work: Path, cfg: dict, startup_only: bool) -> dict:
    import tpcompiler as tp

    res = {"relu": {}, "tanh": {}}
    relu = tp.compile(tp.load(str(PROGRAM), depth=RELU_DEPTH, phi="relu", w_std=W_STD, b_std=B_STD, d=D))
    for n in cfg["relu_n"]:
        X = np.load(work / f"relu_{n}.npy")
        kf = relu.kernel_function()
        if startup_only:
            t = time.perf_counter()
            kf(X)
            res["relu"][n] = {"compile": kf.compile_seconds, "first": time.perf_counter() - t}
            continue
        first, warm, k = _timed(lambda: kf(X))
        res["relu"][n] = {"compile": kf.compile_seconds, "first": first, "warm": warm, "timing": dict(kf.last_timing)}
        if n == cfg["agree_n"]:
            np.save(work / f"tpc_relu_{n}_nngp.npy", k["nngp"])
            np.save(work / f"tpc_relu_{n}_ntk.npy", k["ntk"])
    tanh = tp.compile(tp.load(str(PROGRAM), depth=TANH_DEPTH, phi="tanh", w_std=W_STD, b_std=B_STD, d=D))
    X = np.load(work / "tanh.npy")
    for rtol in (REF_RTOL,) + TANH_RTOLS:
        kf = tanh.kernel_function(rtol)
        if startup_only:
            t = time.perf_counter()
            kf(X)
            res["tanh"][repr(rtol)] = {"compile": kf.compile_seconds, "first": time.perf_counter() - t}
            continue
        first, warm, k = _timed(lambda: kf(X))
        res["tanh"][repr(rtol)] = {"compile": kf.compile_seconds, "first": first, "warm": warm}
        np.save(work / f"tpc_tanh_{rtol!r}_nngp.npy", k["nngp"])
        np.save(work / f"tpc_tanh_{rtol!r}_ntk.npy", k["ntk"])
    import numba

    res["versions"] = {"tpcompiler": getattr(tp, "__version__", "0.1.0"), "numpy": np.__version__,
                       "numba": numba.__version__, "numba_threads": numba.get_num_threads(),
                       "python": platform.python_version()}
    return res


# -- neural-tangents worker ----------------------------------------------------------------------
def nt_worker(work: Path, cfg: dict) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import jaxlib
    import neural_tangents as nt
    from neural_tangents import stax

    def kernel_fn(act, depth):
        layers = []
        for _ in range(depth):
            layers += [stax.Dense(WIDTH, W_std=W_STD, b_std=B_STD), act]
        layers.append(stax.Dense(1, W_std=W_STD, b_std=B_STD))
        fn = jax.jit(stax.serial(*layers)[2], static_argnames="get")

        def run(X):
            return jax.block_until_ready(fn(X, None, ("nngp", "ntk")))
        return run

    res = {"relu": {}, "tanh": {}}
    relu = kernel_fn(stax.Relu(), RELU_DEPTH)
    for n in cfg["relu_n"]:
        X = jnp.asarray(np.load(work / f"relu_{n}.npy"))
        first, warm, (nngp, ntk) = _timed(lambda: relu(X))
        res["relu"][n] = {"first": first, "warm": warm, "dtype": str(nngp.dtype)}
        if n == cfg["agree_n"]:
            np.save(work / f"nt_relu_{n}_nngp.npy", np.asarray(nngp))
            np.save(work / f"nt_relu_{n}_ntk.npy", np.asarray(ntk))
        del nngp, ntk
    X = jnp.asarray(np.load(work / "tanh.npy"))
    for deg in TANH_DEGS:
        fn = kernel_fn(stax.ElementwiseNumerical(fn=jnp.tanh, deg=deg), TANH_DEPTH)
        first, warm, (nngp, ntk) = _timed(lambda: fn(X))
        res["tanh"][deg] = {"first": first, "warm": warm}
        np.save(work / f"nt_tanh_{deg}_nngp.npy", np.asarray(nngp))
        np.save(work / f"nt_tanh_{deg}_ntk.npy", np.asarray(ntk))
    res["versions"] = {"neural-tangents": nt.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                       "numpy": np.__version__, "python": platform.python_version()}
    return res


# -- driver ----------------------------------------------------------------------------------------
def _run_worker(python: str, kind: str, work: Path, quick: bool, env: dict, extra=()) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--work", str(work)] + (["--quick"] if quick else []) + list(extra)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{kind} worker failed (exit {proc.returncode})")
    return json.loads((work / f"{kind}{''.join(extra)}.json").read_text())


def find_nt_python(explicit: str | None) -> str | None:
    cands = [explicit, os.environ.get("NT_PYTHON"), sys.executable, str(ROOT.parent / "ntvenv" / "bin" / "python")]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for c in cands:
        if not c or not Path(c).exists():
            continue
        probe = subprocess.run([c, "-c", "import jax, neural_tangents"], env=env, capture_output=True)
        if probe.returncode == 0:
            return c
    return None


def _entrywise(a, ref):
    return float(np.max(np.abs(a - ref) / np.abs(ref)))


def _normwise(a, ref):
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def _relu_diagonal(X):
    """NNGP and NTK of the relu network at xi = xi' (rho = 1), in 50-digit arithmetic."""
    import mpmath as mp

    with mp.workdps(50):
        w2, b2 = mp.mpf(W_STD) ** 2, mp.mpf(B_STD) ** 2
        nngp, ntk = [], []
        for row in X:
            k = w2 * mp.fsum(mp.mpf(float(v)) ** 2 for v in row) / X.shape[1] + b2
            theta = k
            for _ in range(RELU_DEPTH):
                k = w2 * k / 2 + b2
                theta = k + w2 * theta / 2
            nngp.append(float(k))
            ntk.append(float(theta))
    return np.array(nngp), np.array(ntk)


def _load(work, stem):
    return np.load(work / f"{stem}_nngp.npy"), np.load(work / f"{stem}_ntk.npy")


def _err(work, stem, ref):
    a = _load(work, stem)
    return max(_normwise(a[0], ref[0]), _normwise(a[1], ref[1]))


def report(cfg, info, tpc, tpc_cached, nt, nt_python, work) -> str:
    f = lambda s: f"{s:.3g}"  # noqa: E731
    out = [SECTION, ""]
    out.append(f"Measured {info['date']} by `python benchmarks/kernels_vs_nt.py{' --quick' if cfg['quick'] else ''}` on "
               f"{info['cpu']}, {info['cores']} cores, {info['memory']} ({info['os']}); "
               f"1-minute load average at start {info['load'][0]:.2f}.")
    v = tpc["versions"]
    out.append(f"tpcompiler {v['tpcompiler']} (Python {v['python']}, numpy {v['numpy']}, numba {v['numba']}, "
               f"{v['numba_threads']} threads)"
               + (f"; neural-tangents {nt['versions']['neural-tangents']} on jax {nt['versions']['jax']} / jaxlib "
                  f"{nt['versions']['jaxlib']} (Python {nt['versions']['python']}, numpy {nt['versions']['numpy']}), "
                  "`jax_enable_x64`, jitted kernel_fn." if nt else "; neural-tangents: not available (not timed)."))
    out.append("")
    out.append(f"Network: `stax.serial(*[Dense({WIDTH}, W_std={W_STD}, b_std={B_STD}), phi] * depth, "
               f"Dense(1, W_std={W_STD}, b_std={B_STD}))` (NTK parametrization) = `programs/mlp.py` with "
               f"`w_std={W_STD}, b_std={B_STD}, d={D}`; inputs: iid N(0, 1) entries, d = {D}, seeded; float64; "
               "NNGP and NTK k(X, X) in one call. Warm = median of 3 calls after a first (JIT) call; each side "
               "in its own process. tpcompiler compile = `kernel_function().compile_seconds` (derivation, code "
               "generation, loading), with an empty code cache (cold) and in a second process with the cache "
               "filled (cached); its first call includes Numba's JIT (cold) or loading Numba's cache (cached).")
    out.append("")
    out.append(f"### relu, depth {RELU_DEPTH}")
    out.append("")
    out.append("| N | tpc compile cold / cached (s) | tpc first call cold / cached (s) | tpc warm (s) "
               "| NT first call (s) | NT warm (s) | NT warm / tpc warm |")
    out.append("|---|---|---|---|---|---|---|")
    for n in cfg["relu_n"]:
        a, c = tpc["relu"][str(n)], tpc_cached["relu"][str(n)]
        b = nt["relu"][str(n)] if nt else None
        out.append(f"| {n} | {f(a['compile'])} / {f(c['compile'])} | {f(a['first'])} / {f(c['first'])} | {f(a['warm'])} | "
                   + (f"{f(b['first'])} | {f(b['warm'])} | **{b['warm'] / a['warm']:.2f}x** |" if b else "n/a | n/a | n/a |"))
    out.append("")
    out.append("Where tpcompiler's warm time goes (`kernel_function().last_timing`, last warm call; s):")
    out.append("")
    out.append("| N | row stage (row features + Numba row loop) | Gram matrices (BLAS) | pair stage (Numba pair loop + symmetrise) |")
    out.append("|---|---|---|---|")
    for n in cfg["relu_n"]:
        t = tpc["relu"][str(n)]["timing"]
        out.append(f"| {n} | {f(t['rows'])} | {f(t['grams'])} | {f(t['pairs'])} |")
    out.append("")
    if nt:
        n = cfg["agree_n"]
        us, them = _load(work, f"tpc_relu_{n}"), _load(work, f"nt_relu_{n}")
        off = ~np.eye(n, dtype=bool)
        exact = _relu_diagonal(np.load(work / f"relu_{n}.npy"))
        diag = lambda a, e: float(np.max(np.abs(np.diag(a) - e) / np.abs(e)))  # noqa: E731
        out.append(f"Agreement at N = {n}, max over entries of |tpc - NT| / |NT|: off the diagonal NNGP "
                   f"{_entrywise(us[0][off], them[0][off]):.1e}, NTK {_entrywise(us[1][off], them[1][off]):.1e}; "
                   f"on the diagonal NNGP {diag(us[0], np.diag(them[0])):.1e}, NTK {diag(us[1], np.diag(them[1])):.1e}. "
                   "Against the diagonal evaluated in 50-digit arithmetic (rho = 1: k <- w^2 k / 2 + b^2, "
                   "theta <- k + w^2 theta / 2): tpcompiler NNGP "
                   f"{diag(us[0], exact[0]):.1e}, NTK {diag(us[1], exact[1]):.1e}; neural-tangents NNGP "
                   f"{diag(them[0], exact[0]):.1e}, NTK {diag(them[1], exact[1]):.1e}.")
        out.append("")
    n = cfg["tanh_n"]
    ref = _load(work, f"tpc_tanh_{REF_RTOL!r}")
    ours = {rtol: (_err(work, f"tpc_tanh_{rtol!r}", ref), tpc["tanh"][repr(rtol)]) for rtol in TANH_RTOLS}
    out.append(f"### tanh, depth {TANH_DEPTH}, N = {n}: quadrature at equal accuracy")
    out.append("")
    out.append(f"Error of each result against tpcompiler at rtol = {REF_RTOL:g} (normwise, the worse of NNGP and NTK).")
    out.append("")
    out.append("| method | error | first call (s) | warm (s) | tpc match: rtol, error, warm (s) | NT warm / tpc warm |")
    out.append("|---|---|---|---|---|---|")
    if nt:
        for deg in TANH_DEGS:
            b = nt["tanh"][str(deg)]
            e = _err(work, f"nt_tanh_{deg}", ref)
            ok = [(r, ours[r]) for r in TANH_RTOLS if ours[r][0] <= e]
            if ok:
                r, (er, t) = min(ok, key=lambda x: x[1][1]["warm"])
                match, ratio = f"{r:g}, {er:.1e}, {f(t['warm'])}", f"**{b['warm'] / t['warm']:.1f}x**"
            else:
                match, ratio = "none", "n/a"
            out.append(f"| NT ElementwiseNumerical deg={deg} | {e:.1e} | {f(b['first'])} | {f(b['warm'])} | {match} | {ratio} |")
    for rtol in TANH_RTOLS:
        e, t = ours[rtol]
        out.append(f"| tpc rtol={rtol:g} | {e:.1e} | {f(t['first'])} | {f(t['warm'])} | | |")
    out.append("")
    if not nt:
        out.append("neural-tangents was not available: only tpcompiler was timed.")
        out.append("")
    return "\n".join(out)


def write_docs(text: str):
    write_section(DOCS, SECTION, text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 1000 only, smaller tanh case")
    ap.add_argument("--write-docs", action="store_true", help=f"write the table to {DOCS.relative_to(ROOT)}")
    ap.add_argument("--nt-python", help="Python interpreter that can import neural_tangents")
    ap.add_argument("--no-nt", action="store_true", help="time tpcompiler only")
    ap.add_argument("--worker", choices=["tpc", "nt"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--startup-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = config(args.quick)
    if args.worker:
        work = Path(args.work)
        res = tpc_worker(work, cfg, args.startup_only) if args.worker == "tpc" else nt_worker(work, cfg)
        (work / f"{args.worker}{'--startup-only' if args.startup_only else ''}.json").write_text(json.dumps(res))
        return
    cfg["quick"] = args.quick
    info = machine_info()
    nt_python = None if args.no_nt else find_nt_python(args.nt_python)
    print(f"neural-tangents: {nt_python or 'not available (tpcompiler only)'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kernels_vs_nt_") as tmp:
        work = Path(tmp)
        for n in cfg["relu_n"]:
            np.save(work / f"relu_{n}.npy", inputs(n, seed=n))
        np.save(work / "tanh.npy", inputs(cfg["tanh_n"], seed=7))
        env = dict(os.environ, TPCOMPILER_CACHE_DIR=str(work / "cache"), TF_CPP_MIN_LOG_LEVEL="3")
        (work / "cache").mkdir()
        print("tpcompiler (empty code cache) ...", flush=True)
        tpc = _run_worker(sys.executable, "tpc", work, args.quick, env)
        print("tpcompiler (cached) ...", flush=True)
        tpc_cached = _run_worker(sys.executable, "tpc", work, args.quick, env, ["--startup-only"])
        nt = None
        if nt_python:
            print("neural-tangents ...", flush=True)
            nt = _run_worker(nt_python, "nt", work, args.quick, env)
        text = report(cfg, info, tpc, tpc_cached, nt, nt_python, work)
    print()
    print(text)
    if args.write_docs:
        write_docs(text)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
