"""Benchmark: the pi-limit's cost as training goes on (docs/DESIGN.md 2.10) against a finite
pi-net and a finite muP MLP, on the MNIST split of experiments/mnist_features.py.

    python benchmarks/pi_scale.py [--quick] [--write-docs] [--timeout SECONDS]

Every model trains with the recipe of experiments/mnist_features.py (batch 8, softmax
cross-entropy, the paper's multipliers, weight decay and per-tensor clip for the pi-nets, the
x0.15 drop of lr and clip at 80 % of the epochs; muP: the same schedule, no clip), each in a
fresh subprocess.  After every epoch the row records the epoch's wall time (evaluation
excluded), the steps so far, the process's resident memory now and at its peak
(/proc/self/status VmRSS, ``resource.getrusage``) and the test accuracy.  The pi-limit's state
grows by batch rows per layer per step, so its time per epoch grows with the epochs (a kernel
machine's O(steps^2) in total) while a finite network's stays flat; the summary names, for every
finite model, the first (width, epoch) that reaches the pi-limit's final test accuracy and the
training time it took.

Full run: all 4000 training digits and 1000 test digits, r = 200, 10 epochs, widths 256, 1024,
4096.  ``--quick``: the first 100 training digits of each class (1000) and the first 30 test
digits of each class (300), r = 50, 3 epochs, widths 256 and 1024.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

from _machine import machine_info, write_section
from _machine import spawn as spawn_script

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## pi-limit against finite widths: cost as training goes on (MNIST)"


def experiment():
    """experiments/mnist_features.py as a module."""
    spec = importlib.util.spec_from_file_location("mnist_features", ROOT / "experiments" / "mnist_features.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def subsample(X, y, per_class: int):
    """The first ``per_class`` rows of each class (data order kept)."""
    import numpy as np
    rows = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)]))
    return X[rows], y[rows]


def run_case(case: dict) -> dict:
    """One model trained epoch by epoch (in this process): per epoch its time, memory, accuracy."""
    mf = experiment()
    Xf, yf, Xs, ys = mf.make_split("test")
    if case.get("fit_per_class"):
        Xf, yf = subsample(Xf, yf, case["fit_per_class"])
        Xs, ys = subsample(Xs, ys, case["test_per_class"])
    settings = mf.SETTINGS[case["model"]]
    eng = mf.make_engine(case["model"], Xf.shape[1], case["seed"], case.get("width"), case.get("r"), "relu")
    epochs = []
    clock = {"last": time.perf_counter()}

    def on_epoch(epoch, loss):
        seconds = time.perf_counter() - clock["last"]
        now = rss_mib()
        t = time.perf_counter()
        acc = mf.accuracy(mf.predict(eng, Xs), ys)
        epochs.append({"epoch": epoch + 1, "steps": (epoch + 1) * (Xf.shape[0] // mf.BATCH), "seconds": seconds,
                       "rss_mib": now, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                       "accuracy": acc, "eval_seconds": time.perf_counter() - t, "loss": loss})
        clock["last"] = time.perf_counter()

    mf.train_sgd(eng, Xf, mf.one_hot(yf), lr=settings["lr"], clip=settings["clip"], epochs=case["epochs"],
                 seed=case["seed"], on_epoch=on_epoch)
    return {"epochs": epochs}


def spawn(case: dict, timeout: float) -> dict:
    """``run_case`` in a fresh interpreter (_machine.spawn)."""
    return spawn_script(__file__, case, timeout)


def label(case: dict) -> str:
    if case["model"] == "pi-limit":
        return f"pi-limit, r = {case['r']}"
    if case["model"] == "pi-finite":
        return f"finite pi-net, r = {case['r']}, n = {case['width']}"
    return f"finite muP MLP, n = {case['width']}"


def rows_of(case: dict, result: dict) -> list[str]:
    if "error" in result:
        return [f"| {label(case)} | - | - | - | - | - | - | {result['error']} |"]
    out, total = [], 0.0
    for e in result["epochs"]:
        total += e["seconds"]
        out.append(f"| {label(case)} | {e['epoch']} | {e['steps']} | {e['seconds']:.1f} | {total:.1f} | "
                   f"{e['rss_mib']:.0f} | {e['peak_mib']:.0f} | {e['accuracy']:.1f} |")
    return out


def equal_accuracy(plan: list, results: list) -> list[str]:
    """For every finite model: the first epoch reaching the pi-limit's final accuracy, and its time."""
    limit = next((r for c, r in zip(plan, results) if c["model"] == "pi-limit" and "epochs" in r), None)
    if limit is None:
        return ["The pi-limit did not finish, so no equal-accuracy comparison."]
    target = limit["epochs"][-1]["accuracy"]
    lim_time = sum(e["seconds"] for e in limit["epochs"])
    lines = [f"The pi-limit ends at {target:.1f} % test accuracy after {lim_time:.0f} s of training. "
             "First epoch at which each finite model reaches it:"]
    for case, r in zip(plan, results):
        if case["model"] == "pi-limit" or "epochs" not in r:
            continue
        total = 0.0
        for e in r["epochs"]:
            total += e["seconds"]
            if e["accuracy"] >= target:
                lines.append(f"- {label(case)}: epoch {e['epoch']}, {total:.0f} s ({e['accuracy']:.1f} %), peak {e['peak_mib']:.0f} MiB")
                break
        else:
            lines.append(f"- {label(case)}: not reached in {len(r['epochs'])} epochs "
                         f"(best {max(e['accuracy'] for e in r['epochs']):.1f} %, {total:.0f} s)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1000 training digits, r = 50, 3 epochs, widths 256 and 1024")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per model")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    if args.quick:
        base = dict(seed=0, epochs=3, fit_per_class=100, test_per_class=30)
        r, widths = 50, (256, 1024)
    else:
        base = dict(seed=0, epochs=10)
        r, widths = 200, (256, 1024, 4096)
    plan = [dict(base, model="pi-limit", r=r)]
    plan += [dict(base, model="pi-finite", r=r, width=n) for n in widths]
    plan += [dict(base, model="mup-finite", width=n) for n in widths]
    table = ["| model | epoch | steps | epoch time (s) | total (s) | RSS (MiB) | peak RSS (MiB) | test accuracy (%) |",
             "|---|---|---|---|---|---|---|---|"]
    results = []
    loads = []
    for case in plan:
        loads.append(machine_info()["load"][0])
        results.append(spawn(case, args.timeout))
        rows = rows_of(case, results[-1])
        table += rows
        print("\n".join(rows), flush=True)
    info = machine_info()
    summary = equal_accuracy(plan, results)
    data = ("1000 training digits (the first 100 of each class), 300 test digits (the first 30 of each class)"
            if args.quick else "the 4000 training and 1000 test digits")
    text = "\n".join([
        SECTION, "",
        f"`python benchmarks/pi_scale.py{' --quick' if args.quick else ''}` on {info['cpu']}, {info['cores']} cores, "
        f"{info['memory']}, {info['date']}; load average (1 min) {min(loads):.1f} to {max(loads):.1f} at the "
        f"start of the models. Every model a fresh process; data: {data} of experiments/mnist_features.py's "
        f"split; batch 8; the recipe of that experiment (pi-nets: the paper's multipliers, weight decay and "
        f"per-tensor clip; muP: no clip); seed 0. Epoch time excludes the evaluation.",
        "", *table, "", *summary, ""])
    print(text)
    if args.write_docs:
        write_section(DOCS, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
