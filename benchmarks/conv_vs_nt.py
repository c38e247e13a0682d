"""Benchmark: Conv / pooling kernels, tp.layers + tpcompiler's kernel backend vs neural-tangents.

    python benchmarks/conv_vs_nt.py [--quick] [--write-docs] [--nt-python PATH] [--no-nt]

Each case is one stax.serial text, evaluated with neural-tangents' stax on one side and with
tp.layers on the other (the line-by-line port), NTK parametrization, W_std 1.5, b_std 0.1,
inputs iid N(0, 1) (numpy default_rng(seed)), float64.  Reported per case and side:
tpcompiler's compile (derivation + code generation, ``kernel_function().compile_seconds``,
with an empty code cache), first call (includes Numba's / XLA's JIT), warm call (median of 3)
at N inputs, the ratio NT / tpcompiler of warm times, and the largest relative difference of
the two sides' NNGP and NTK.  neural-tangents runs in a subprocess with the first Python that
imports it (``--nt-python``, ``$NT_PYTHON``, this interpreter, ../ntvenv/bin/python).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's tpcompiler first
from _machine import machine_info, write_section  # noqa: E402
from kernels_vs_nt import find_nt_python  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Conv / pooling kernels vs neural-tangents (tp.layers)"
W, B = 1.5, 0.1
REPEATS = 3

#: name -> (input shape, stax.serial text, N)
CASES = {
    "conv1d_same_gap": ((8, 3), "Conv(512, (3,), None, 'SAME', W, B), Relu(), GlobalAvgPool(), Dense(1, W, B)", 200),
    "conv1d_circular_d2": ((6, 3), "Conv(512, (3,), None, 'CIRCULAR', W, B), Relu(), Conv(512, (3,), None, 'CIRCULAR', W, B), "
                                   "Relu(), GlobalAvgPool(), Dense(1, W, B)", 200),
    "conv2d_same_gap": ((3, 3, 2), "Conv(512, (2, 2), None, 'SAME', W, B), Relu(), GlobalAvgPool(), Dense(1, W, B)", 200),
    "conv2d_valid_avgpool_flatten": ((4, 4, 2), "Conv(512, (2, 2), None, 'VALID', W, B), Relu(), "
                                                "AvgPool((2, 2), (2, 2), 'VALID'), Flatten(), Dense(1, W, B)", 200),
    # images of the size benchmarks/cnn_compile.py times (pooled: every pair of positions)
    "conv2d_8x8_same_d2_gap": ((8, 8, 2), "Conv(512, (3, 3), None, 'SAME', W, B), Relu(), "
                                          "Conv(512, (3, 3), None, 'SAME', W, B), Relu(), GlobalAvgPool(), Dense(1, W, B)", 200),
    "conv2d_12x12_same_d2_gap": ((12, 12, 2), "Conv(512, (3, 3), None, 'SAME', W, B), Relu(), "
                                              "Conv(512, (3, 3), None, 'SAME', W, B), Relu(), GlobalAvgPool(), Dense(1, W, B)", 100),
    "conv2d_16x16_same_d2_flatten": ((16, 16, 2), "Conv(512, (3, 3), None, 'SAME', W, B), Relu(), "
                                                  "Conv(512, (3, 3), None, 'SAME', W, B), Relu(), Flatten(), Dense(1, W, B)", 200),
}
QUICK = ("conv1d_same_gap", "conv2d_same_gap")


def inputs(shape, n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape))


def _median_time(fn):
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def tpc_case(name, work: Path) -> dict:
    import tpcompiler as tp

    shape, text, n = CASES[name]
    scope = {k: getattr(tp.layers, k) for k in dir(tp.layers) if not k.startswith("_")}
    scope.update(W=W, B=B)
    net = eval(f"serial({text})", scope)
    X = inputs(shape, n)
    t = time.perf_counter()
    kf = tp.compile(net.program(shape)).kernel_function()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    K = kf(X.reshape(n, -1))
    first = time.perf_counter() - t
    warm = _median_time(lambda: kf(X.reshape(n, -1)))
    np.savez(work / f"tpc_{name}.npz", **K)
    return {"compile": compile_s, "first": first, "warm": warm}


NT_WORKER = r"""
import json, sys, time
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
from neural_tangents import stax
cfg = json.loads(sys.argv[1])
scope = {k: getattr(stax, k) for k in dir(stax) if not k.startswith("_")}
scope.update(W=cfg["W"], B=cfg["B"])
_, _, eager_fn = eval("serial(" + cfg["text"] + ")", scope)
kernel_fn = jax.jit(eager_fn, static_argnames="get")
X = np.load(cfg["x"])
def run():
    k = kernel_fn(X, None, get=("nngp", "ntk"))
    return k.nngp.block_until_ready(), k.ntk.block_until_ready()
t = time.perf_counter(); nngp, ntk = run(); first = time.perf_counter() - t
times = []
for _ in range(3):
    t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
# also without jit: XLA's compiled arithmetic moves the NTK's diagonal (correlation 1, where
# arccos has an infinite slope) by ~5e-10 relative; the eager values are the reference
eager = eager_fn(X, None, get=("nngp", "ntk"))
np.savez(cfg["out"], nngp=np.asarray(nngp), ntk=np.asarray(ntk),
         nngp_eager=np.asarray(eager.nngp), ntk_eager=np.asarray(eager.ntk))
print(json.dumps({"first": first, "warm": float(np.median(times))}))
"""


def nt_case(python: str, name: str, work: Path) -> dict:
    shape, text, n = CASES[name]
    np.save(work / f"x_{name}.npy", inputs(shape, n))
    cfg = {"W": W, "B": B, "text": text, "x": str(work / f"x_{name}.npy"), "out": str(work / f"nt_{name}.npz")}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    proc = subprocess.run([python, "-c", NT_WORKER, json.dumps(cfg)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"neural-tangents worker failed on {name}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(work: Path, name: str) -> tuple[float, float | None]:
    """Max relative difference (over NNGP and NTK) to NT's jit-compiled and to its eager values."""
    with np.load(work / f"tpc_{name}.npz") as a, np.load(work / f"nt_{name}.npz") as b:
        rel = lambda k, key: float(np.max(np.abs(a[k] - b[key])) / np.max(np.abs(b[key])))  # noqa: E731
        jit = max(rel(k, k) for k in ("nngp", "ntk"))
        eager = max(rel(k, k + "_eager") for k in ("nngp", "ntk")) if "ntk_eager" in b.files else None
        return jit, eager


def report(rows, info, nt_python) -> str:
    load = ", ".join(f"{x:.1f}" for x in info["load"])
    lines = [SECTION, "",
             f"`python benchmarks/conv_vs_nt.py` on {info['cpu']}, {info['cores']} cores, {info['memory']}; "
             f"{info['date']}; load average at the end {load} (shared machine: times are inflated by other jobs).",
             f"neural-tangents: {nt_python or 'not available'}. W_std 1.5, b_std 0.1, NTK parametrization, "
             "N inputs k(X, X), NNGP + NTK. tpcompiler compile = derivation + code generation (empty cache); "
             "first call includes JIT (Numba / XLA); warm = median of 3.", "",
             "| case | input | N | tpc compile (s) | tpc first (s) | tpc warm (s) | NT first (s) | NT warm (s) | NT warm / tpc warm | NT first / tpc compile + first | max rel. diff vs NT jit | vs NT eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, tpc, nt, diff in rows:
        shape, text, n = CASES[name]
        ntf = f"{nt['first']:.3f}" if nt else "-"
        ntw = f"{nt['warm']:.4f}" if nt else "-"
        ratio = f"{nt['warm'] / tpc['warm']:.2f}" if nt else "-"
        ratio_first = f"{nt['first'] / (tpc['compile'] + tpc['first']):.2f}" if nt else "-"
        d = " | ".join("-" if x is None else f"{x:.1e}" for x in (diff if diff is not None else (None, None)))
        lines.append(f"| {name} | {shape} | {n} | {tpc['compile']:.1f} | {tpc['first']:.2f} | {tpc['warm']:.4f} | {ntf} | {ntw} | {ratio} | {ratio_first} | {d} |")
    lines += ["", "NT's timed kernel is jit-compiled (XLA); its eager values (no jit) are the reference for "
              "agreement: the compiled arithmetic moves the NTK's diagonal, where the correlation is 1 and arccos "
              "has an infinite slope, by ~5e-10 relative.  Where the eager difference is larger than 1e-12 (16 x 16 "
              "Flatten) it is the NTK's diagonal alone (a check at N = 20 on 2026-12-06: 6e-10 on the diagonal, 6e-16 "
              "off it): NT's eager arithmetic too puts an input's correlation with itself a few ulps below 1, which "
              "tpcompiler takes as 1 (expectations/special.py, DET_AS_ZERO).", ""]
    big = [(name, tpc, nt) for name, tpc, nt, _ in rows if nt and "gap" in name and CASES[name][0][0] >= 8]
    if big:
        sizes = ", ".join(" x ".join(map(str, CASES[n][0][:2])) for n, _, _ in big)
        faster = ", ".join(f"{nt['warm'] / tpc['warm']:.1f}" for _, tpc, nt in big)
        later = ", ".join(f"{(tpc['compile'] + tpc['first']) / nt['first']:.1f}" for _, tpc, nt in big)
        lines += [f"Pooled images of {sizes} positions: tpcompiler's warm calls are {faster} times faster than NT's, "
                  f"but its first kernel comes {later} times later than NT's first call: its derivation still works "
                  "per pair of positions (issue 11).", ""]
    lines += ["", "Networks (stax.serial text, ported line by line to tp.layers):", ""]
    lines += [f"- {name}: `{CASES[name][1]}`" for name, *_ in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--nt-python")
    ap.add_argument("--no-nt", action="store_true")
    args = ap.parse_args(argv)
    nt_python = None if args.no_nt else find_nt_python(args.nt_python)
    names = QUICK if args.quick else tuple(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["TPCOMPILER_CACHE_DIR"] = str(work / "cache")  # cold code cache: compile and JIT measured
        rows = []
        for name in names:
            tpc = tpc_case(name, work)
            nt = nt_case(nt_python, name, work) if nt_python else None
            diff = agreement(work, name) if nt else None
            rows.append((name, tpc, nt, diff))
            print(name, tpc, nt, diff, flush=True)
        text = report(rows, machine_info(), nt_python)
    print(text)
    if args.write_docs:
        write_section(DOCS, SECTION, text)


if __name__ == "__main__":
    main()
