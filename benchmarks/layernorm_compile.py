"""Benchmark: compile time of CNN kernels with a LayerNorm over positions (tp.layers, issue 11).

    python benchmarks/layernorm_compile.py [--against CHECKOUT] [--timeout S] [--write-docs]

A LayerNorm over positions and channels (neural-tangents' ``LayerNorm(axis=(1, 2, 3))``)
couples every position of a group through its mean and variance.  Per case, in a fresh
process with an empty generated-code cache and OMP_NUM_THREADS=1: "derive + codegen"
(``tp.compile(...).kernel_function()``), "first call" (the first ``kf(X)`` on 5 inputs:
Numba's compile), the generated source's lines.  ``--against CHECKOUT`` runs every case on
that checkout too (a directory with tpcompiler/, e.g. ``git worktree add /tmp/main main``),
one after the other, and reports the largest difference of the two kernels relative to their
largest entry.  A case that does not finish within ``--timeout`` seconds (default 600) is
reported as such.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## CNN compile time with a LayerNorm over positions (tp.layers, issue 11)"
N = 5

#: name -> (stax text, input shape)
CASES = {
    "2-D 3 x 3, LayerNorm over positions, Flatten": (
        "Conv(8, (2, 2), None, 'SAME', 1.3, 0.2), Relu(), LayerNorm(axis=(1, 2, 3)), "
        "Conv(8, (2, 2), None, 'SAME', 1.3, 0.2), Relu(), Flatten(), Dense(1, 1.3, 0.2)", (3, 3, 2)),
    "2-D 4 x 3, AvgPool SAME, LayerNorm over positions, Flatten": (
        "Conv(8, (2, 2), None, 'SAME', 1.3, 0.2), Relu(), AvgPool((2, 2), (1, 1), 'SAME'), LayerNorm(axis=(1, 2, 3)), "
        "Conv(8, (2, 2), None, 'SAME', 1.3, 0.2), Relu(), Flatten(), Dense(1, 1.3, 0.2)", (4, 3, 2)),
    "2-D 4 x 4, LayerNorm over positions, GlobalAvgPool": (
        "Conv(8, (3, 3), None, 'SAME', 1.3, 0.2), Relu(), LayerNorm(axis=(1, 2, 3)), "
        "Conv(8, (3, 3), None, 'SAME', 1.3, 0.2), Relu(), GlobalAvgPool(), Dense(1, 1.3, 0.2)", (4, 4, 2)),
    "2-D 8 x 8, LayerNorm over rows, Flatten": (
        "Conv(8, (3, 3), None, 'SAME', 1.3, 0.2), Relu(), LayerNorm(axis=(2, 3)), "
        "Conv(8, (3, 3), None, 'SAME', 1.3, 0.2), Relu(), Flatten(), Dense(1, 1.3, 0.2)", (8, 8, 2)),
}


def run_case(name: str, out: str) -> dict:
    """One case in this process (its tpcompiler: the first on sys.path); kernels saved to ``out``."""
    import tpcompiler as tp
    from tpcompiler import layers

    text, shape = CASES[name]
    net = eval(f"serial({text})", {k: getattr(layers, k) for k in dir(layers) if not k.startswith("_")})
    prog = net.program(shape)
    t = time.perf_counter()
    kf = tp.compile(prog).kernel_function()
    derive = time.perf_counter() - t
    X = np.random.default_rng(0).standard_normal((N, int(np.prod(shape))))
    t = time.perf_counter()
    K = kf(X)
    first = time.perf_counter() - t
    np.savez(out, **K)
    return {"derive": derive, "first": first, "lines": len(kf.source.splitlines()), "load": os.getloadavg()[0],
            "package": str(Path(tp.__file__).parent)}


def spawn(root: Path, name: str, out: Path, timeout: float) -> dict:
    """``run_case`` in a fresh interpreter on ``root``'s tpcompiler with an empty code cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": str(root), "TPCOMPILER_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--case", json.dumps([name, str(out)])],
                                  capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())
        except subprocess.TimeoutExpired:
            return {"error": f"no answer in {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cell(r: dict) -> str:
    if "error" in r:
        return f"{r['error']} | | |"
    return f"{r['derive']:.1f} | {r['first']:.1f} | **{r['derive'] + r['first']:.1f}** | {r['lines']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="another checkout (a directory with tpcompiler/) to compare with")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        name, out = json.loads(args.case)
        print(json.dumps(run_case(name, out)))
        return
    sys.path.insert(0, str(HERE))
    from _machine import machine_info, write_section

    roots = [("this", ROOT)] + ([("against", Path(args.against).resolve())] if args.against else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            res = {label: spawn(root, name, Path(tmp) / f"{label}.npz", args.timeout) for label, root in reversed(roots)}
            diff = ""
            if args.against and not any("error" in r for r in res.values()):
                a, b = np.load(Path(tmp) / "this.npz"), np.load(Path(tmp) / "against.npz")
                diff = f"{max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in b.files):.1e}"
            rows.append((name, res, diff))
            print(name, json.dumps(res), diff, flush=True)
    m = machine_info()
    head = "| program | derive + codegen (s) | first call (s) | total (s) | generated lines |"
    if args.against:
        head += " before (--against): derive + codegen (s) | first call (s) | total (s) | generated lines | max rel. diff |"
    lines = [SECTION, "",
             f"`python benchmarks/layernorm_compile.py{' --against CHECKOUT' if args.against else ''}` on {m['cpu']}, "
             f"{m['cores']} cores, {m['memory']}; {m['date']}; numba {m['numba']}.  Each case in a fresh process with "
             f"an empty code cache, OMP_NUM_THREADS=1; first call = the first `kf(X)` on {N} inputs (Numba's compile); "
             f"a case stopped after {args.timeout:.0f} s says so.  Networks in neural-tangents' stax text, ported line "
             "by line to tp.layers.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, res, diff in rows:
        line = f"| {name} | {cell(res['this'])} |"
        if args.against:
            line += f" {cell(res['against'])} | {diff} |"
        lines.append(line)
    lines += ["", "Networks:", ""] + [f"- {name}: `{text}` on inputs of shape {shape}" for name, (text, shape) in CASES.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        write_section(DOCS, SECTION, text)


if __name__ == "__main__":
    main()
