"""Benchmark: the step engine (docs/DESIGN.md 2.9) against the unrolled program and against
finite-width training, as steps and examples grow.

    python benchmarks/training_scale.py [--quick] [--write-docs] [--target] [--unrolled-max STEPS]

Problem: ``programs/mlp.py`` with depth L = 2, phi = tanh, w_std = 1, no biases, d = 5, under
muP (``tp.named("mup", 2)``), squared loss, learning rate 0.5, cyclic batches of B = 4 from N
training inputs (iid N(0, 1) entries, targets sin(1.5 xi . 1 / sqrt(d)), ``default_rng(2024)``),
f evaluated on the N training inputs after the last step only.

Sides, each in a fresh subprocess (wall time by ``time.perf_counter``, peak resident memory by
``resource.getrusage``; the baseline row is the interpreter with tpcompiler imported):
* step engine, particles (M = 40,000 in 10 groups, plus the extrapolation's half-size run of
  20,000: a group of the half run must hold more particles than a matrix family has members,
  steps x batch, or the engine refuses): "derive" is the
  construction of ``StepEngine`` (the symbolic step and its lowering, independent of the number
  of steps by construction; measured to show it), "run" the steps and the final evaluation;
* unrolled path: ``tp.unroll`` + ``tp.compile`` ("derive") and ``limit(particles=M)`` ("run"),
  only up to ``--unrolled-max`` steps (default 20: its cost grows faster than (steps x inputs)^2);
* finite width: the same step at width n = 1024 (``StepEngine(method="finite")``, one network)
  and ``training.finite.train_mlp`` (hand-written backpropagation) at n = 1024.
* exact engine on a Gaussian-linear network (the same MLP with phi = identity): basis grows
  with the steps (n x n matrices need fresh Gaussians), so it is timed too.

``--target`` also runs the issue's target: depth-3 tanh muP, 64 training inputs (d = 8),
batch 8, 200 steps, M = 10^5 particles (10 groups), evaluated once at the end.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from _machine import machine_info, write_section
from _machine import spawn as spawn_script

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Training at scale: step engine vs unrolled program vs finite width"


def _data(N: int, d: int):
    import numpy as np

    rng = np.random.default_rng(2024)
    X = rng.standard_normal((N, d))
    Y = np.sin(1.5 * X.sum(axis=1) / np.sqrt(d))[:, None]
    return X, Y


def run_case(case: dict) -> dict:
    """One configuration (in this process): timings and peak memory."""
    import numpy as np

    import tpcompiler as tp
    from tpcompiler.training import finite

    side, steps, N = case["side"], case["steps"], case["N"]
    depth, d, B, M = case.get("depth", 2), case.get("d", 5), case.get("batch", 4), case.get("M", 20_000)
    phi = case.get("phi", "tanh")
    X, Y = _data(N, d)
    lr = 0.5
    out = {}
    if side == "baseline":
        pass
    elif side in ("engine", "exact", "finite"):
        t0 = time.perf_counter()
        net = tp.load(ROOT / "programs" / "mlp.py", depth=depth, phi=phi, w_std=1.0, b_std=None, d=d)
        method = {"engine": "particles", "exact": "exact", "finite": "finite"}[side]
        eng = tp.StepEngine(net, tp.named("mup", depth), method=method, particles=M, width=case.get("width"),
                            seeds=case.get("seeds", 1), seed=1)
        t1 = time.perf_counter()
        eng.reserve(steps * B)
        for t in range(steps):
            idx = finite.batch_indices(N, B, t)
            eng.step(X[idx], Y[idx], lr)
        f, e = eng.predict(X)
        t2 = time.perf_counter()
        out.update(derive=t1 - t0, run=t2 - t1, f0=float(f[0, 0]), se0=float(e[0, 0]),
                   f=f[:, 0].tolist(), se=e[:, 0].tolist())
        if method == "particles":
            # the two runs the extrapolation combines, each with its bias of order members / particles
            for key, run in (("m", eng), ("half", eng._half)):
                fr = run._replica_outputs(X)[..., 0]
                out[f"f_{key}"] = fr.mean(axis=0).tolist()
                out[f"se_{key}"] = (fr.std(axis=0, ddof=1) / np.sqrt(fr.shape[0])).tolist()
    elif side == "unrolled":
        t0 = time.perf_counter()
        net = tp.load(ROOT / "programs" / "mlp.py", depth=depth, phi=phi, w_std=1.0, b_std=None, d=d)
        g = tp.unroll(net.graph, tp.named("mup", depth), tp.SGD(X, Y, steps=steps, lr=lr, batch=B))
        c = tp.compile(g)
        t1 = time.perf_counter()
        lim = c.limit(particles=M, seed=1, method="particles")
        t2 = time.perf_counter()
        out.update(derive=t1 - t0, run=t2 - t1, f0=lim[f"f_train[{steps},0]"][0], se0=lim[f"f_train[{steps},0]"][1])
    elif side == "train_mlp":
        t0 = time.perf_counter()
        mup = tp.named("mup", depth)
        res = finite.train_mlp(X, Y, depth=depth, phi=phi, w_std=1.0, a=[float(a) for a in mup.a],
                               b=[float(b) for b in mup.b], c=float(mup.c), lr=lr, steps=steps,
                               width=case["width"], seed=1, batch=B)
        out.update(derive=0.0, run=time.perf_counter() - t0, f0=float(np.ravel(res.f_train[-1])[0]), se0=0.0)
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def spawn(case: dict, timeout: float) -> dict:
    """``run_case`` in a fresh interpreter (_machine.spawn)."""
    return spawn_script(__file__, case, timeout)


def _row(label, case, r):
    if "error" in r:
        return f"| {label} | {case['steps']} | {case['N']} | - | - | - | {r['error']} |"
    f = f"{r['f0']:.4f}" + (f" ± {r['se0']:.4f}" if r.get("se0") else "")
    return (f"| {label} | {case['steps']} | {case['N']} | {r['derive']:.2f} | {r['run']:.2f} | "
            f"{r['peak_mib']:.0f} | {f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="steps 10 and 100 only, smaller widths")
    ap.add_argument("--target", action="store_true", help="also run the issue's target (several minutes)")
    ap.add_argument("--target-only", action="store_true", help="only the target and its finite-width reference")
    ap.add_argument("--unrolled-max", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    args.target = args.target or args.target_only
    steps_list = [] if args.target_only else [10, 100] if args.quick else [10, 100, 1000]
    width = 256 if args.quick else 1024
    rows = ["| side | steps | N | derive (s) | run (s) | peak memory (MiB) | f(x_0) after the last step |",
            "|---|---|---|---|---|---|---|"]
    base = spawn({"side": "baseline", "steps": 0, "N": 0}, args.timeout)
    plan = []
    for steps in steps_list:
        plan.append(("step engine, particles M = 40,000", {"side": "engine", "steps": steps, "N": 16, "M": 40_000}))
        if steps <= args.unrolled_max:
            plan.append(("unrolled program, particles M = 20,000", {"side": "unrolled", "steps": steps, "N": 16}))
        plan.append((f"finite width n = {width}, same step", {"side": "finite", "steps": steps, "N": 16, "width": width}))
        plan.append((f"finite width n = {width}, train_mlp", {"side": "train_mlp", "steps": steps, "N": 16, "width": width}))
        plan.append(("exact engine, phi = identity", {"side": "exact", "steps": steps, "N": 16, "phi": "identity"}))
    for N in ([] if args.target_only else [16, 64] if args.quick else [16, 64, 256]):
        plan.append(("step engine, particles M = 40,000", {"side": "engine", "steps": 100, "N": N, "batch": 16, "M": 40_000}))
        plan.append((f"finite width n = {width}, same step", {"side": "finite", "steps": 100, "N": N, "batch": 16, "width": width}))
    target = {"steps": 200, "N": 64, "depth": 3, "d": 8, "batch": 8}
    if args.target:
        plan.append(("target: depth 3, d = 8, batch 8, M = 10^5", dict(target, side="engine", M=100_000)))
        plan.append(("target: finite width n = 4096, 4 seeds, same step", dict(target, side="finite", width=4096, seeds=4)))
    results = {}
    for label, case in plan:
        r = spawn(case, args.timeout)
        results[label] = r
        rows.append(_row(label, case, r))
        print(rows[-1], flush=True)
    agreement = ""
    if args.target:
        import numpy as np

        lim, fin = (results[k] for k in list(results)[-2:])
        if "f" in lim and "f" in fin:
            z = (np.array(lim["f"]) - np.array(fin["f"])) / np.hypot(lim["se"], fin["se"])
            agreement = (f"Target agreement: on the 64 training inputs, (limit - finite n = 4096) / combined standard "
                         f"error has RMS {np.sqrt(np.mean(z ** 2)):.2f} and max |z| {np.abs(z).max():.2f} "
                         f"(finite-width bias O(1/n) included); mean |f| {np.mean(np.abs(lim['f'])):.3f}.")
            for key, what in (("m", "m = 10^4 particles per group alone"), ("half", "m = 5000 alone")):
                if f"f_{key}" in lim:
                    zk = (np.array(lim[f"f_{key}"]) - np.array(fin["f"])) / np.hypot(lim[f"se_{key}"], fin["se"])
                    agreement += (f" Without the extrapolation ({what}): RMS z {np.sqrt(np.mean(zk ** 2)):.2f}, "
                                  f"max |z| {np.abs(zk).max():.2f}.")
            print(agreement)
    info = machine_info()
    text = "\n".join([
        SECTION, "",
        f"`python benchmarks/training_scale.py{' --quick' if args.quick else ''}{' --target' if args.target else ''}` "
        f"on {info['cpu']}, {info['cores']} cores, {info['memory']}, {info['date']} "
        f"(load average {info['load'][0]:.1f}); every row a fresh process; the baseline process "
        f"(interpreter + tpcompiler imported) peaks at {base.get('peak_mib', float('nan')):.0f} MiB.",
        "Problem: muP depth 2 tanh MLP (d = 5, lr 0.5, squared loss), cyclic batches of 4 (16 in the "
        "examples rows) out of N inputs; f after the last step. \"derive\" = building the step "
        "(StepEngine) or unrolling + compiling the program; \"run\" = the steps and the final evaluation.",
        "", *rows, "", agreement, ""])
    print(text)
    if args.write_docs:
        write_section(DOCS, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
