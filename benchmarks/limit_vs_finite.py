"""Benchmark: the muP limit by particles against finite-width training, at equal accuracy.

    python benchmarks/limit_vs_finite.py [--quick] [--write-docs] [--reference REF.json]
                                         [--save-reference REF.json] [--profile OUT.txt]

Problem (both sides): ``programs/mlp.py`` with depth L = 3, phi = tanh, w_std = 1, no biases,
d = 5, trained under muP (``tp.named("mup", 3)``) by full-batch SGD with the squared loss,
learning rate eta = 1.0 (moves f by ~0.6 in 10 steps), T = 10 steps, on N = 4 training inputs
and evaluated on N_eval = 4 further inputs (iid N(0, 1) entries, targets
sin(1.5 xi . 1 / sqrt(d)), ``default_rng(2024)``).  Compared quantity: f_eval, shape (T+1, 4).

Sides
* limit by particles: ``tp.unroll`` (with ``tp.load``) and ``tp.compile`` are timed as the
  symbolic stage; ``Compiled.limit(particles=M, seed=1, groups=10, method="particles")`` as the
  evaluation, at M = 10^4, 10^5, 10^6 (``--quick``: 2 * 10^3, 10^4).
* finite width: ``finite_training.train_many`` (the network of docs/DESIGN.md 2.6) over S = 6
  seeds at n = 1024, 2048, 4096, 8192 (``--quick``: S = 2, n = 256, 512), float64.

Reference ("high-accuracy limit"): the particle evaluator run R = 8 times with 2 x 10^6
particles in 10 groups each (groups twice as large as in any benchmarked run), seeds disjoint
from the benchmarked runs: 1.6 x 10^7 particles, ~12 minutes on 2 cores (``--quick``:
4 x 10^5; ``--ref-runs`` and ``--ref-each`` buy a smaller reference error with more time).
The value is the mean of the runs, its standard error sqrt(sum se_r^2) / R.  ``--save-reference`` /
``--reference`` store and reuse it.

Errors.  err = RMS over the 4 eval inputs and the steps t = 0..T (44 values) of
(f_eval - f_ref); also at the last step only.  The reference's own error adds in quadrature:
E[err^2] = (true error)^2 + (RMS reference stderr)^2, which is reported next to the table.
Finite width: the error of the seed mean (finite-width bias plus seed noise / sqrt(S)) and the
RMS of the per-seed errors (what one network of width n gives).

Timing and memory.  Every configuration runs in its own fresh subprocess (a crash or an
out-of-memory kill loses only that row); wall time by ``time.perf_counter``; memory is the
peak resident set size of that subprocess (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
which includes the interpreter and imports (reported as "baseline").  For the particle
evaluator the peak RSS is also taken after the symbolic stage and after each group
(the walk of each group, ``particles.walk``, is wrapped, not changed), so growth can be attributed to a phase.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
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
SECTION = "## Limit vs finite-width training (muP, depth 3, tanh, 10 steps)"

DEPTH, PHI, W_STD, D, N_TRAIN, N_EVAL, STEPS, LR = 3, "tanh", 1.0, 5, 4, 4, 10, 1.0
GROUPS = 10
DATA_SEED, PARTICLE_SEED, REF_SEED0 = 2024, 1, 1000


def config(quick: bool) -> dict:
    if quick:
        return {"particles": [2_000, 10_000], "widths": [256, 512], "seeds": 2, "ref_each": 100_000, "ref_runs": 4}
    return {"particles": [10_000, 100_000, 1_000_000], "widths": [1024, 2048, 4096, 8192], "seeds": 6,
            "ref_each": 2_000_000, "ref_runs": 8}


def data():
    rng = np.random.default_rng(DATA_SEED)
    X = rng.standard_normal((N_TRAIN + N_EVAL, D))
    Y = np.sin(1.5 * X[:N_TRAIN].sum(axis=1) / math.sqrt(D))
    return X[:N_TRAIN], Y, X[N_TRAIN:]


def _rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def code_version() -> str:
    """Hash of tpcompiler's sources, so a run that mixes two versions of the code is flagged."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "tpcompiler").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


# -- workers (each in its own process) ------------------------------------------------------------
def particle_worker(M: int, seed: int, profile: str | None) -> dict:
    import tpcompiler as tp
    from tpcompiler.backends import particles

    base = _peak_mb()
    version = code_version()
    groups_log = []
    orig_walk = particles.walk

    def timed_walk(run, rules, schedule):
        t = time.perf_counter()
        out = orig_walk(run, rules, schedule)
        noise = [x for fam in run.families.values() for x in fam.noise]
        groups_log.append({"seconds": time.perf_counter() - t, "peak_mb": _peak_mb(), "rss_after_mb": _rss_mb(),
                           "f_eval": [[out[f"f_eval[{s},{i}]"] for i in range(N_EVAL)] for s in range(STEPS + 1)],
                           "noise_arrays": len(noise), "noise_mb": sum(a.nbytes for a in noise) / 2**20})
        return out

    particles.walk = timed_walk
    X, Y, Xe = data()
    t0 = time.perf_counter()
    net = tp.load(str(PROGRAM), depth=DEPTH, phi=PHI, w_std=W_STD, b_std=None, d=D)
    graph = tp.unroll(net.graph, tp.named("mup", DEPTH), tp.SGD(X, Y, steps=STEPS, lr=LR, X_eval=Xe))
    t1 = time.perf_counter()
    compiled = tp.compile(graph)
    t2 = time.perf_counter()
    symbolic_peak = _peak_mb()
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
    t3 = time.perf_counter()
    lim = compiled.limit(particles=M, seed=seed, groups=GROUPS, method="particles")
    t4 = time.perf_counter()
    if profile:
        prof.disable()
        with open(profile, "w") as fh:
            st = pstats.Stats(prof, stream=fh)
            st.sort_stats("tottime").print_stats(25)
            st.sort_stats("cumulative").print_stats(30)
    f = np.array([[lim[f"f_eval[{t},{i}]"][0] for i in range(N_EVAL)] for t in range(STEPS + 1)])
    se = np.array([[lim[f"f_eval[{t},{i}]"][1] for i in range(N_EVAL)] for t in range(STEPS + 1)])
    zp = compiled.zprogram
    return {"M": M, "seed": seed, "code": version, "unroll": t1 - t0, "compile": t2 - t1, "limit": t4 - t3,
            "baseline_mb": base, "symbolic_peak_mb": symbolic_peak, "peak_mb": _peak_mb(),
            "instructions": len(graph.g), "z_entries": len(zp.entries), "groups": groups_log,
            "f_eval": f.tolist(), "stderr": se.tolist()}


def finite_worker(n: int, seeds: int) -> dict:
    from threadpoolctl import threadpool_info

    import tpcompiler as tp
    from tpcompiler.training import finite as ft

    base = _peak_mb()
    version = code_version()
    per_seed = []
    orig = ft.train_mlp

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = orig(*args, **kwargs)
        per_seed.append(time.perf_counter() - t)
        return out

    ft.train_mlp = timed
    X, Y, Xe = data()
    abc = tp.named("mup", DEPTH)
    t = time.perf_counter()
    res = ft.train_many(X, Y, seeds=list(range(seeds)), depth=DEPTH, phi=PHI, w_std=W_STD,
                        a=[float(v) for v in abc.a], b=[float(v) for v in abc.b], c=float(abc.c),
                        lr=LR, steps=STEPS, width=n, X_eval=Xe)
    total = time.perf_counter() - t
    threads = max((p.get("num_threads", 1) for p in threadpool_info() if p.get("user_api") == "blas"), default=1)
    return {"n": n, "seeds": seeds, "code": version, "total": total, "per_seed": per_seed, "baseline_mb": base, "peak_mb": _peak_mb(),
            "blas_threads": threads, "f_eval": res.f_eval.tolist()}


# -- driver ---------------------------------------------------------------------------------------
def _run_worker(args: list[str], work: Path, tag: str) -> dict | None:
    out = work / f"{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-out", str(out)] + args
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stderr[-3000:])
        print(f"  {tag}: FAILED (exit {proc.returncode}) after {time.perf_counter() - t:.0f} s", flush=True)
        return {"failed": True, "exit": proc.returncode, "seconds": time.perf_counter() - t, "stderr": proc.stderr[-3000:]}
    return json.loads(out.read_text())


def reference(cfg: dict, work: Path) -> dict:
    runs = []
    for r in range(cfg["ref_runs"]):
        print(f"reference run {r + 1}/{cfg['ref_runs']}: M = {cfg['ref_each']:.0e} ...", flush=True)
        res = _run_worker(["--worker", "particles", "--M", str(cfg["ref_each"]), "--seed", str(REF_SEED0 + r)], work, f"ref{r}")
        if res.get("failed"):
            raise SystemExit("a reference run failed; see above")
        runs.append(res)
    f = np.mean([r["f_eval"] for r in runs], axis=0)
    se = np.sqrt(np.sum(np.square([r["stderr"] for r in runs]), axis=0)) / len(runs)
    return {"M_total": cfg["ref_each"] * len(runs), "runs": len(runs), "M_each": cfg["ref_each"],
            "seconds": [r["unroll"] + r["compile"] + r["limit"] for r in runs],
            "peak_mb": max(r["peak_mb"] for r in runs), "code": sorted({r["code"] for r in runs}),
            "f_eval": f.tolist(), "stderr": se.tolist()}


def _rms(a) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


def errors(f, ref) -> tuple[float, float]:
    diff = np.asarray(f) - np.asarray(ref["f_eval"])
    return _rms(diff), _rms(diff[-1])


def report(cfg, info, ref, parts, fins, quick, load_end) -> str:
    g = lambda s: f"{s:.3g}"  # noqa: E731
    ref_se = _rms(ref["stderr"])
    ref_se_last = _rms(np.asarray(ref["stderr"])[-1])
    out = [SECTION, ""]
    out.append(f"Measured {info['date']} by `python benchmarks/limit_vs_finite.py{' --quick' if quick else ''}` on "
               f"{info['cpu']}, {info['cores']} cores, {info['memory']} ({info['os']}); load average (1, 5, 15 min) "
               f"at start {info['load'][0]:.2f}, {info['load'][1]:.2f}, {info['load'][2]:.2f}, at the end "
               f"{load_end[0]:.2f}, {load_end[1]:.2f}, {load_end[2]:.2f} (other jobs were running: times are "
               f"wall-clock under that load). Python {info['python']}, numpy {info['numpy']}, numba {info['numba']}.")
    out.append("")
    out.append(f"Problem: `programs/mlp.py` with depth {DEPTH}, {PHI}, w_std = {W_STD:g}, no biases, d = {D}; muP "
               f"(`tp.named(\"mup\", {DEPTH})`), full-batch SGD, squared loss, eta = {LR:g}, T = {STEPS} steps, "
               f"N = {N_TRAIN} training and {N_EVAL} eval inputs (iid N(0, 1), targets sin(1.5 sum(xi) / sqrt(d)), "
               f"seed {DATA_SEED}); f_eval moves by ~0.6 over the 10 steps. "
               f"Unrolled program: {parts[0]['instructions'] if parts and not parts[0].get('failed') else '?'} "
               "instructions.")
    out.append("")
    out.append(f"Reference: particle evaluator, {ref['runs']} runs x {ref['M_each']:.0e} particles ({GROUPS} groups "
               f"each, seeds {REF_SEED0}..{REF_SEED0 + ref['runs'] - 1}) = {ref['M_total']:.0e} particles, "
               f"{sum(ref['seconds']):.0f} s in total; its own standard error, RMS over the 44 values: "
               f"**{ref_se:.1e}** (last step {ref_se_last:.1e}). An error e below means an expected squared "
               f"difference e^2 = (true error)^2 + {ref_se:.1e}^2.")
    out.append("")
    out.append("err = RMS of f_eval - f_ref over the 4 eval inputs and steps 0..10 (last = at step 10 only). "
               "Memory = peak RSS of the configuration's own subprocess (`getrusage` maxrss), imports included "
               f"(baseline after imports ~{parts[0]['baseline_mb'] if parts and not parts[0].get('failed') else 0:.0f} MB). "
               "Time = wall clock; for particles, symbolic = `tp.load` + `tp.unroll` + `tp.compile` (paid once "
               "per problem), limit = `Compiled.limit(particles=M, groups=10)`. err x sqrt(s) is constant for a "
               "Monte-Carlo method (lower is better); 1 / (err^2 s) is the precision gained per second.")
    out.append("")
    out.append("| method | time (s) | peak memory (MB) | err | err, last step | own stderr (RMS) | err x sqrt(s) | 1/(err^2 s) |")
    out.append("|---|---|---|---|---|---|---|---|")
    prows = []
    for p in parts:
        if p.get("failed"):
            out.append(f"| particles M = {p['M']:.0e} | failed after {p['seconds']:.0f} s (exit {p['exit']}) | | | | | | |")
            continue
        e, el = errors(p["f_eval"], ref)
        sym, lim = p["unroll"] + p["compile"], p["limit"]
        tot = sym + lim
        prows.append((p["M"], tot, e))
        out.append(f"| particles M = {p['M']:.0e} | {g(tot)} (symbolic {g(sym)} + limit {g(lim)}) | {p['peak_mb']:.0f} "
                   f"(symbolic {p['symbolic_peak_mb']:.0f}) | {e:.2e} | {el:.2e} | {_rms(p['stderr']):.1e} | "
                   f"{e * math.sqrt(tot):.3f} (limit only {e * math.sqrt(lim):.3f}) | {1 / (e * e * tot):.3g} |")
    frows = []
    for r in fins:
        if r.get("failed"):
            out.append(f"| finite n = {r['n']}, {cfg['seeds']} seeds | failed after {r['seconds']:.0f} s (exit {r['exit']}) | | | | | | |")
            continue
        fe = np.asarray(r["f_eval"])
        em, eml = errors(fe.mean(axis=0), ref)
        per = [errors(x, ref) for x in fe]
        es, esl = _rms([p[0] for p in per]), _rms([p[1] for p in per])
        ts = float(np.mean(r["per_seed"]))
        frows.append((r["n"], r["total"], em, ts, es))
        seed_se = _rms(fe.std(axis=0, ddof=1) / math.sqrt(fe.shape[0]))
        out.append(f"| finite n = {r['n']}, mean of {r['seeds']} seeds | {g(r['total'])} | {r['peak_mb']:.0f} | {em:.2e} | "
                   f"{eml:.2e} | {seed_se:.1e} (over seeds) | {em * math.sqrt(r['total']):.3f} | {1 / (em * em * r['total']):.3g} |")
        out.append(f"| finite n = {r['n']}, one seed | {g(ts)} | {r['peak_mb']:.0f} | {es:.2e} (RMS over seeds) | "
                   f"{esl:.2e} | | {es * math.sqrt(ts):.3f} | {1 / (es * es * ts):.3g} |")
    out.append("")
    if prows and frows:
        out.append("Time to reach the same error: for each finite-width row, the cheapest measured particle run whose "
                   "error is no larger (total time, symbolic stage included), and the ratio finite time / particle time.")
        out.append("")
        out.append("| finite width | its err | its time (s) | cheapest particle run with err <= that | its time (s) | ratio |")
        out.append("|---|---|---|---|---|---|")
        for n, tot, em, ts, es in frows:
            for label, e, t in ((f"n = {n}, mean of {cfg['seeds']} seeds", em, tot), (f"n = {n}, one seed", es, ts)):
                ok = [(pt, M, pe) for M, pt, pe in prows if pe <= e]
                if ok:
                    pt, M, pe = min(ok)
                    out.append(f"| {label} | {e:.2e} | {g(t)} | M = {M:.0e} (err {pe:.2e}) | {g(pt)} | **{t / pt:.2g}x** |")
                else:
                    out.append(f"| {label} | {e:.2e} | {g(t)} | none | | |")
        out.append("")
    good = [p for p in parts if not p.get("failed")]
    if good:
        out.append("Where the particle evaluator's time and memory go, per group of M/10 particles (the groups run one "
                   "after another; `particles.walk` wrapped, not changed): group 1 includes lambdify of every new "
                   "expression form (cached for the later groups); family noise = the N(0, 1) draws kept for every "
                   "ZHat (needed for later conditional samples and Stein estimates); peak RSS after the symbolic stage, "
                   "after group 1 and after group 10.")
        out.append("")
        out.append("| M | group 1 (s) | groups 2..10, mean (s) | family noise held (arrays, MB) | peak RSS: symbolic / group 1 / group 10 (MB) | own stderr (RMS) at step 1 / step 10 |")
        out.append("|---|---|---|---|---|---|")
        for p in good:
            gl = p["groups"]
            rest = float(np.mean([x["seconds"] for x in gl[1:]])) if len(gl) > 1 else float("nan")
            out.append(f"| {p['M']:.0e} | {g(gl[0]['seconds'])} | {g(rest)} | {gl[0]['noise_arrays']}, {gl[0]['noise_mb']:.0f} | "
                       f"{p['symbolic_peak_mb']:.0f} / {gl[0]['peak_mb']:.0f} / {gl[-1]['peak_mb']:.0f} | "
                       f"{_rms(p['stderr'][1]):.1e} / {_rms(p['stderr'][-1]):.1e} |")
        out.append("")
        if len(good) > 1:
            a, z = good[0], good[-1]
            slope = lambda k: -math.log(_rms(z["stderr"][k]) / _rms(a["stderr"][k])) / math.log(z["M"] / a["M"])  # noqa: E731
            out.append(f"The particle evaluator's own stderr falls like M^-p between M = {a['M']:.0e} and {z['M']:.0e} "
                       f"with p = {slope(1):.2f} at step 1 and p = {slope(-1):.2f} at step 10 (p = 1/2 for plain "
                       "Monte Carlo).")
            out.append("")
    codes = sorted({x["code"] for x in good + [r for r in fins if not r.get("failed")]} | set(ref.get("code", [])))
    out.append(f"tpcompiler sources: sha256 prefix {', '.join(codes)}"
               + (" -- WARNING: the code changed during the run; rows are not comparable." if len(codes) > 1 else "."))
    out.append("")
    return "\n".join(out)


def write_docs(text: str):
    write_section(DOCS, SECTION, text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small M and widths, a small reference (smoke run)")
    ap.add_argument("--write-docs", action="store_true", help=f"write the section to {DOCS.relative_to(ROOT)}")
    ap.add_argument("--reference", help="reuse a reference saved by --save-reference")
    ap.add_argument("--save-reference", help="save the reference (JSON) for later runs")
    ap.add_argument("--ref-runs", type=int, help="number of reference runs (default 8)")
    ap.add_argument("--ref-each", type=int, help="particles per reference run (default 2e6)")
    ap.add_argument("--raw", help="save the raw per-configuration results (JSON)")
    ap.add_argument("--profile", help="also profile one particle run (M = 10^5; --quick: 10^4) with cProfile into this file")
    ap.add_argument("--worker", choices=["particles", "finite"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--M", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=PARTICLE_SEED, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seeds", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = particle_worker(args.M, args.seed, args.profile_out) if args.worker == "particles" else finite_worker(args.n, args.seeds)
        Path(args.worker_out).write_text(json.dumps(res))
        return
    cfg = config(args.quick)
    if args.ref_runs:
        cfg["ref_runs"] = args.ref_runs
    if args.ref_each:
        cfg["ref_each"] = args.ref_each
    info = machine_info()
    print(f"load average at start: {info['load']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="limit_vs_finite_") as tmp:
        work = Path(tmp)
        if args.reference:
            ref = json.loads(Path(args.reference).read_text())
            print(f"reference from {args.reference} ({ref['M_total']:.0e} particles)", flush=True)
        else:
            ref = reference(cfg, work)
        if args.save_reference:
            Path(args.save_reference).write_text(json.dumps(ref))
        parts, fins = [], []
        for M in cfg["particles"]:
            print(f"particles M = {M:.0e} ...", flush=True)
            parts.append(_run_worker(["--worker", "particles", "--M", str(M)], work, f"p{M}") | {"M": M})
        for n in cfg["widths"]:
            print(f"finite n = {n}, {cfg['seeds']} seeds ...", flush=True)
            fins.append(_run_worker(["--worker", "finite", "--n", str(n), "--seeds", str(cfg["seeds"])], work, f"f{n}") | {"n": n})
        if args.profile:
            M = 10_000 if args.quick else 100_000
            print(f"profiling particles M = {M:.0e} ...", flush=True)
            _run_worker(["--worker", "particles", "--M", str(M), "--profile-out", args.profile], work, "profile")
    if args.raw:
        Path(args.raw).write_text(json.dumps({"info": info, "config": cfg, "reference": ref, "particles": parts,
                                              "finite": fins}, indent=1))
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    text = report(cfg, info, ref, parts, fins, args.quick, load_end)
    print()
    print(text)
    if args.write_docs:
        write_docs(text)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
