"""Benchmark: NNGP + NTK at large N with the tiled kernel path, and what neural-tangents does there.

    python benchmarks/kernels_scale.py --n 10000 20000 [--memory 4GB] [--dtype float64]
    python benchmarks/kernels_scale.py --n 60000 --dtype float32          # 2 x 14.4 GB on disk, deleted after
    python benchmarks/kernels_scale.py --nt 10000 20000 [--nt-batch 0 2000] [--nt-limit 10GiB] [--nt-timeout 1800]
    python benchmarks/kernels_scale.py --write-docs                        # table from the results file

Network: ``programs/mlp.py`` with depth 3, relu, w_std = 1.5, b_std = 0.05, d = 784 = neural-
tangents' ``stax.serial(*[Dense(512, W_std=1.5, b_std=0.05), Relu()] * 3, Dense(1, ...))``.
Data: there is no full MNIST offline, so the inputs are a fixed-seed synthetic set of MNIST's
shape: N rows of 784 iid N(0, 1) entries (numpy ``default_rng(0)``); the kernels' cost does not
depend on the values.

tpcompiler: each N runs in a fresh process: ``c.kernels(X, memory=BUDGET, out=DIR/, dtype=...)``
(memory-mapped .npy output, deleted afterwards unless --keep).  Reported: wall time of the call
(with its row / Gram / pair-stage split; the rest is writing the files), the process's peak
resident set (VmHWM) and its resident set before the call (interpreter, Numba, the inputs),
the tile plan, and a spot check: 300 random rows' kernels recomputed by the untiled call and
compared with the stored entries (max relative difference).

neural-tangents (``--nt``, run with ``--nt-python`` or ``../ntvenv/bin/python``): its jitted
``kernel_fn(X, None, ("nngp", "ntk"))`` (batch 0) or ``nt.batch(kernel_fn, batch_size=B,
store_on_device=False)``, float64, in a subprocess watched by this script: killed when its
resident set passes --nt-limit or after --nt-timeout seconds (the machine is shared).

Results accumulate in --results (JSON, one entry per run); --write-docs renders them into the
"Kernels at any data size" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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
SECTION = "## Kernels at any data size (tiled, memory budget)"
DEPTH, W_STD, B_STD, D, WIDTH = 3, 1.5, 0.05, 784, 512
SPOT_ROWS = 300


def inputs(n: int) -> np.ndarray:
    """The synthetic MNIST-shaped data set: n x 784 iid N(0, 1), seed 0 (the first rows of a
    larger N are the same)."""
    return np.random.default_rng(0).standard_normal((n, D))


def _status(pid: int | str = "self") -> dict:
    """VmRSS and VmHWM (peak) of a process, in bytes (Linux)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


# -- tpcompiler, one N per process ----------------------------------------------------------------
def tpc_worker(n: int, memory: str, dtype: str, out_dir: str, keep: bool) -> dict:
    import tpcompiler as tp

    c = tp.compile(tp.load(str(PROGRAM), depth=DEPTH, phi="relu", w_std=W_STD, b_std=B_STD, d=D))
    kf = c.kernel_function()
    kf(inputs(64))  # loads Numba's cache: not part of the timed call
    X = inputs(n)
    before = _status()["VmRSS"]
    load0 = os.getloadavg()
    t = time.perf_counter()
    K = c.kernels(X, memory=memory, out=out_dir + "/", dtype=dtype, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - t
    load1 = os.getloadavg()
    peak = _status()["VmHWM"]
    plan, timing = kf.last_plan, dict(kf.last_timing)
    idx = np.sort(np.random.default_rng(1).choice(n, size=min(SPOT_ROWS, n), replace=False))
    ref = kf(X[idx])
    spot = {name: float(np.max(np.abs(np.asarray(K[name][np.ix_(idx, idx)], dtype=np.float64) - ref[name])
                                / np.abs(ref[name]))) for name in ("nngp", "ntk")}
    disk = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    del K
    if not keep:
        shutil.rmtree(out_dir)
    return {"kind": "tpc", "n": n, "memory": memory, "dtype": dtype, "seconds": seconds,
            "timing": timing, "tile": plan.tile, "tiles": len(plan.jobs),
            "planned_peak": plan.peak_bytes, "rss_before": before, "peak_rss": peak, "disk": disk,
            "spot_max_rel": spot, "load_start": load0, "load_end": load1, "compile": kf.compile_seconds}


# -- neural-tangents, one (N, batch) per process ---------------------------------------------------
def nt_worker(n: int, batch: int) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    layers = []
    for _ in range(DEPTH):
        layers += [stax.Dense(WIDTH, W_std=W_STD, b_std=B_STD), stax.Relu()]
    layers.append(stax.Dense(1, W_std=W_STD, b_std=B_STD))
    kernel_fn = stax.serial(*layers)[2]
    fn = nt.batch(kernel_fn, batch_size=batch, store_on_device=False) if batch else jax.jit(kernel_fn, static_argnames="get")
    X = jnp.asarray(inputs(n))
    t = time.perf_counter()
    nngp, ntk = jax.block_until_ready(fn(X, None, ("nngp", "ntk")))
    seconds = time.perf_counter() - t
    return {"kind": "nt", "n": n, "batch": batch, "seconds": seconds, "peak_rss": _status()["VmHWM"],
            "outcome": "completed", "nt": nt.__version__, "jax": jax.__version__, "shape": list(nngp.shape)}


# -- driver ---------------------------------------------------------------------------------------
def run_watched(cmd: list[str], limit: int | None, timeout: float | None, env=None) -> tuple[dict | None, dict]:
    """Run ``cmd`` (which prints one JSON line last), killing it when its resident set passes
    ``limit`` bytes or after ``timeout`` s: (its JSON or None, {"outcome", "seconds", "peak_rss"})."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, outcome = 0, None
    while proc.poll() is None:
        rss = _status(proc.pid).get("VmRSS", 0)
        peak = max(peak, rss)
        if limit and rss > limit:
            outcome = f"killed by the watchdog at resident set {rss / 1e9:.1f} GB (limit {limit / 1e9:.1f} GB)"
        elif timeout and time.perf_counter() - start > timeout:
            outcome = f"killed after the {timeout:.0f} s timeout"
        if outcome:
            proc.kill()
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    info = {"wall_seconds": time.perf_counter() - start, "peak_rss_watched": peak}
    if outcome:
        return None, {**info, "outcome": outcome}
    if proc.returncode != 0:
        last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [""]
        return None, {**info, "outcome": f"failed (exit {proc.returncode}): {last[0][:200]}"}
    return json.loads(stdout.strip().splitlines()[-1]), info


def find_nt_python(explicit: str | None) -> str | None:
    for c in (explicit, os.environ.get("NT_PYTHON"), str(ROOT.parent / "ntvenv" / "bin" / "python")):
        if c and Path(c).exists():
            probe = subprocess.run([c, "-c", "import jax, neural_tangents"], capture_output=True)
            if probe.returncode == 0:
                return c
    return None


def save(results_file: Path, entry: dict) -> None:
    old = json.loads(results_file.read_text()) if results_file.exists() else []
    same = ("kind", "n", "batch", "dtype", "memory")
    old = [e for e in old if any(e.get(k) != entry.get(k) for k in same)]
    results_file.write_text(json.dumps(old + [entry], indent=1))


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def render(results: list[dict]) -> str:
    m = machine_info()
    tpc = sorted((e for e in results if e["kind"] == "tpc"), key=lambda e: e["n"])
    nt = sorted((e for e in results if e["kind"] == "nt"), key=lambda e: (e["n"], e["batch"]))
    lines = [SECTION, "",
             f"`python benchmarks/kernels_scale.py` on {m['cpu']}, {m['cores']} cores, {m['memory']}, shared with other "
             f"jobs (the 1-minute load average at the start and end of each call is in the table; 2 means both cores "
             f"busy). Network: `programs/mlp.py` depth 3, relu, w_std 1.5, b_std 0.05 = neural-tangents' "
             f"`stax.serial(*[Dense(512, W_std=1.5, b_std=0.05), Relu()] * 3, Dense(1, ...))`; NNGP and NTK k(X, X) in "
             f"one call. **Data: synthetic**, no full MNIST offline: N x 784 iid N(0, 1) entries, seed 0 (the cost does "
             f"not depend on the values).",
             "",
             "tpcompiler: `c.kernels(X, memory=BUDGET, out=DIR/, dtype=...)`, one fresh process per N, output as "
             "memory-mapped .npy files (deleted after the run). Peak RSS is the process's VmHWM (interpreter, Numba, "
             "the 784-column inputs and the tiles; the output files live in the page cache, not in the process); "
             "\"before\" is its resident set just before the call. Spot check: 300 random rows recomputed by the "
             "untiled call, max relative difference of the stored entries (float32 storage: rounding ~6e-8).",
             "",
             "| N | budget | dtype | tiles (side) | time (s) | rows / Grams / pairs (s) | peak RSS (GB) | before (GB) | on disk (GB) | spot check NNGP / NTK | load start / end |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in tpc:
        t = e["timing"]
        lines.append(
            f"| {e['n']:,} | {e['memory']} | {e['dtype']} | {e['tiles']} ({e['tile']}) | {e['seconds']:.0f} | "
            f"{t.get('rows', 0):.1f} / {t.get('grams', 0):.0f} / {t.get('pairs', 0):.0f} | {_gb(e['peak_rss'])} | "
            f"{_gb(e['rss_before'])} | {_gb(e['disk'])} | {e['spot_max_rel']['nngp']:.1e} / {e['spot_max_rel']['ntk']:.1e} | "
            f"{e['load_start'][0]:.1f} / {e['load_end'][0]:.1f} |")
    if nt:
        lines += ["", "neural-tangents 0.6.5 (jax 0.5.3, float64, CPU), same network and data, in a subprocess watched "
                  "for its resident set and time: batch 0 = its jitted `kernel_fn` on all of X at once; batch B = "
                  "`nt.batch(kernel_fn, batch_size=B, store_on_device=False)`, its own tiling.", "",
                  "| N | batch | outcome | time (s), first call with JIT; until killed | peak RSS (GB) | load at start |", "|---|---|---|---|---|---|"]
        for e in nt:
            peak = e.get("peak_rss") or e.get("peak_rss_watched", 0)
            seconds = e.get("seconds", e["wall_seconds"])
            lines.append(f"| {e['n']:,} | {e['batch'] or 'none'} | {e['outcome']} | {seconds:.0f} | {_gb(peak)} | "
                         f"{e['load_start'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[], help="tpcompiler runs at these N")
    ap.add_argument("--memory", default="4GB")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--out-dir", default=None, help="where the .npy files go (a new folder inside it)")
    ap.add_argument("--keep", action="store_true", help="keep the output files")
    ap.add_argument("--nt", type=int, nargs="*", default=[], help="neural-tangents runs at these N")
    ap.add_argument("--nt-batch", type=int, nargs="*", default=[0, 2000], help="0: no batching")
    ap.add_argument("--nt-limit", default="10GiB", help="kill neural-tangents above this resident set")
    ap.add_argument("--nt-timeout", type=float, default=1800)
    ap.add_argument("--nt-python", default=None)
    ap.add_argument("--results", default=str(Path(tempfile.gettempdir()) / "kernels_scale.json"))
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--worker", choices=["tpc", "nt"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "tpc":
        print(json.dumps(tpc_worker(args.n[0], args.memory, args.dtype, args.worker_out, args.keep)))
        return
    if args.worker == "nt":
        print(json.dumps(nt_worker(args.n[0], args.nt_batch[0])))
        return
    results = Path(args.results)
    me = str(Path(__file__).resolve())
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for n in args.n:
        out = tempfile.mkdtemp(prefix=f"kernels_scale_{n}_", dir=args.out_dir)
        entry, info = run_watched([sys.executable, me, "--worker", "tpc", "--n", str(n), "--memory", args.memory,
                                   "--dtype", args.dtype, "--worker-out", out] + (["--keep"] if args.keep else []),
                                  None, None, env)
        if entry is None:
            shutil.rmtree(out, ignore_errors=True)
            raise SystemExit(f"tpcompiler at N = {n}: {info['outcome']}")
        print(json.dumps(entry))
        save(results, entry)
    if args.nt:
        sys.path.insert(0, str(ROOT))
        from tpcompiler.backends.kernels.tiled import parse_memory

        python = find_nt_python(args.nt_python)
        if python is None:
            raise SystemExit("no Python with neural_tangents found (--nt-python)")
        for n in args.nt:
            for batch in args.nt_batch:
                if batch and n % batch:
                    continue  # nt.batch needs N divisible by the batch size
                load = os.getloadavg()
                entry, info = run_watched([python, me, "--worker", "nt", "--n", str(n), "--nt-batch", str(batch)],
                                          parse_memory(args.nt_limit, "--nt-limit"), args.nt_timeout,
                                          dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
                entry = {**(entry or {"kind": "nt", "n": n, "batch": batch}), **info, "load_start": load}
                if "outcome" in info:
                    entry["outcome"] = info["outcome"]
                print(json.dumps(entry))
                save(results, entry)
    if args.write_docs:
        write_section(DOCS, SECTION, render(json.loads(results.read_text())))
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
