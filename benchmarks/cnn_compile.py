"""Benchmark: compile time of CNN kernels as the number of positions grows (issue 11).

    python benchmarks/cnn_compile.py [--quick] [--write-docs]
    python benchmarks/cnn_compile.py --steps [--write-docs]
    python benchmarks/cnn_compile.py --flatten [--write-docs]

Each case runs in a fresh process with an empty generated-code cache (``TPCOMPILER_CACHE_DIR``
a new directory, so the first call pays Numba's whole compile) and ``OMP_NUM_THREADS=1``.
Reported per case: "derive + codegen" (``tp.compile`` + ``kernel_function()``: the pairwise
derivation, lowering, grouping and code generation), "first call" (the first ``kf(X)`` on 7
inputs: Numba's compile), warm (median of 3 calls on N = 200 inputs; in tiles of a 16 GB
budget, ``tiled.kernels``, where the call's Gram matrices would not fit the available memory),
the number of expectation templates the engine derived (``derivation_sizes``), the pair
quantities (one per pair of positions and layer), the generated source's lines, the process's peak resident
memory after the derivation (``ru_maxrss``: the derivation's objects, the imports and numba), and
"again": the same program compiled and first called in a second fresh process that finds the
first one's caches (the stored derivation, kernels/stored.py, and Numba's cache).

cnn1d: ``programs/cnn1d.py`` (C = 2, filter 3 SAME, relu, GlobalAvgPool); 2-D: ``Conv(512,
(3, 3), SAME), Relu`` x depth, ``GlobalAvgPool, Dense`` on (H, W, 2) inputs (tp.layers); "Flatten":
``Flatten`` in place of ``GlobalAvgPool``.

``--depth``: deep CNNs (cnn1d L = 8, depth 4 to 16) and deep MLPs (programs/mlp.py, relu,
depth 20 to 100), each case twice in one run: as generated (a layer's loops once, inside a loop
over the layers: kernels._folded) and written out layer by layer (CNNs: ``_FOLD_PERIOD = 0``;
MLPs: the straight-line code, ``share=False``, the code before each change), in a section of its
own; the kernels of the two are compared bit for bit (an MLP's: to rounding).

``--get``: the 2-D depth-2 pooled cases with both kernels and with the NNGP alone
(``tp.compile(program, get="nngp")``, neural-tangents' ``get``), and the NTK alone, each in fresh
processes with empty caches, in a section of its own; the NNGP alone is compared with both's.

``--steps``: where the derivation's time goes, per step of ``tp.compile`` and of the kernel
derivation (``progress.timed_steps``), in seconds and in microseconds per pair of positions
(what grows: the quantities of a pooled readout are three per pair), for the 2-D depth-2
cases; its own section of docs/benchmarks.md.  ``--flatten``: the same for Flatten readouts at
8 x 8, 16 x 16 and 32 x 32 (the limit's kernel program has no products of two positions,
ir/parity.py), in a section of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's tpcompiler first
from _machine import machine_info, spawn, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## CNN compile time vs positions (tp.layers, issue 11)"
N = 200
CASES = [
    {"kind": "cnn1d", "L": 4, "depth": 1}, {"kind": "cnn1d", "L": 4, "depth": 2},
    {"kind": "cnn1d", "L": 8, "depth": 1}, {"kind": "cnn1d", "L": 8, "depth": 2},
    {"kind": "cnn1d", "L": 16, "depth": 1}, {"kind": "cnn1d", "L": 16, "depth": 2},
    {"kind": "2d", "L": 4, "depth": 1}, {"kind": "2d", "L": 8, "depth": 1},
    {"kind": "2d", "L": 4, "depth": 2}, {"kind": "2d", "L": 6, "depth": 2}, {"kind": "2d", "L": 8, "depth": 2},
    {"kind": "2d", "L": 12, "depth": 2},  # 144 positions: where the per-pair compile work shows
    {"kind": "2d", "L": 16, "depth": 2},  # 256 positions: minutes and gigabytes (memory.py's guard)
    # a Flatten readout: only pairs of one position are read (pairwise.py's _vanishes)
    {"kind": "2d", "L": 8, "depth": 2, "readout": "flatten"}, {"kind": "2d", "L": 12, "depth": 2, "readout": "flatten"},
    {"kind": "2d", "L": 16, "depth": 2, "readout": "flatten"},
]
STEPS_SECTION = "## CNN compile time per step (tp.layers, issue 11)"
STEPS_CASES = [{"kind": "2d", "L": L, "depth": 2, "steps": True} for L in (8, 12, 16)] + \
    [{"kind": "2d", "L": 16, "depth": 2, "readout": "flatten", "steps": True}]
FLATTEN_SECTION = "## CNN compile time per step, Flatten readouts (tp.layers, issue 11)"
FLATTEN_CASES = [{"kind": "2d", "L": L, "depth": 2, "readout": "flatten", "steps": True} for L in (8, 16, 32)]
DEPTH_SECTION = "## CNN compile time vs depth: a layer's loops once (issue 11)"
DEPTH_CASES = [{"kind": "cnn1d", "L": 8, "depth": depth} for depth in (4, 8, 16)] + \
    [{"kind": "mlp", "depth": depth} for depth in (20, 50, 100)]
GET_SECTION = "## CNN compile time, one kernel alone (get=, issue 11)"
GET_CASES = [{"kind": "2d", "L": L, "depth": 2} for L in (8, 12, 16)]
QUICK = [{"kind": "cnn1d", "L": 8, "depth": 2}, {"kind": "2d", "L": 4, "depth": 1}]


def program(case: dict):
    from tpcompiler.frontend.loader import load
    from tpcompiler.layers import Conv, Dense, Flatten, GlobalAvgPool, Relu, serial

    if case["kind"] == "cnn1d":
        return load(ROOT / "programs" / "cnn1d.py", L=case["L"], depth=case["depth"]), (case["L"] * 2,)
    if case["kind"] == "mlp":
        return load(ROOT / "programs" / "mlp.py", depth=case["depth"], phi="relu", d=3), (3,)
    layers = []
    for _ in range(case["depth"]):
        layers += [Conv(512, (3, 3), None, "SAME", 1.5, 0.1), Relu()]
    shape = (case["L"], case["L"], 2)
    readout = Flatten() if case.get("readout") == "flatten" else GlobalAvgPool()
    return serial(*layers, readout, Dense(1, 1.5, 0.1)).program(shape), shape


def run_case(case: dict) -> dict:
    import tpcompiler as tp

    if case.get("written") and case["kind"] != "mlp":  # the loops written out layer by layer (--depth)
        from tpcompiler.backends.kernels import kernel
        kernel._FOLD_PERIOD = 0
    t = time.perf_counter()
    prog, shape = program(case)
    built = time.perf_counter() - t
    d = int(np.prod(shape))
    X = np.random.default_rng(0).standard_normal((N, d))
    if case.get("steps"):
        return steps_case(prog, int(np.prod(shape[:-1])), built)
    t = time.perf_counter()
    if case["kind"] == "mlp" and case.get("written"):  # an MLP written out: the straight-line code
        from tpcompiler.backends.kernels.kernel import KernelFunction
        kf = KernelFunction(tp.compile(prog).source, share=False)
    else:
        kf = tp.compile(prog, get=case.get("get")).kernel_function()
    derive = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    t = time.perf_counter()
    first_kernels = kf(X[:7])
    first = time.perf_counter() - t
    if case.get("depth_table"):
        return {"derive": derive, "first": first, "lines": len(kf.source.splitlines()),
                "bits": {k: v.view(np.int64).tolist() for k, v in first_kernels.items()}, "load": os.getloadavg()[0]}
    if case.get("get_table"):
        call, how = _warm_call(kf)
        t = time.perf_counter()
        call(X)
        return {"derive": derive, "first": first, "warm": time.perf_counter() - t, "warm_how": how, "peak": peak,
                "pairs": kf.derivation_sizes["pair quantities"], "load": os.getloadavg()[0],
                "nngp": first_kernels.get("nngp", np.zeros(0)).tolist()}
    if case.get("again"):  # a second process on the first one's caches: the stored derivation
        return {"again": derive + first, "cached": kf.derivation_cached}
    call, how = _warm_call(kf)
    warm = []
    for _ in range(3):
        t = time.perf_counter()
        call(X)
        warm.append(time.perf_counter() - t)
    return {"derive": derive, "first": first, "warm": float(np.median(warm)), "warm_how": how, "peak": peak,
            "templates": kf.derivation_sizes["templates"], "pairs": kf.derivation_sizes["pair quantities"],
            "lines": len(kf.source.splitlines()), "shared": kf.shared, "load": os.getloadavg()[0]}


def _warm_call(kf):
    """(the call on N inputs, how it runs): the untiled call, or, where its Gram matrices would
    not fit the available memory (16 x 16: 65,536 Gram matrices of N x N, 21 GB), tiles of a
    16 GB budget (the process holds some 5 GB after the derivation, which counts)."""
    from tpcompiler.backends.kernels import tiled
    from tpcompiler.memory import OutOfMemory

    try:
        kf._check_memory(N, 0)
        return kf, "whole"
    except OutOfMemory:
        return (lambda X: tiled.kernels(kf, X, memory="16GB", progress=False)), "tiled, 16 GB"


def steps_case(prog, positions: int, built: float) -> dict:
    """tp.compile + kernel_function() of ``prog`` (of ``positions`` spatial positions) with each
    step's time (``progress.timed_steps``); ``built``: the seconds ``program(case)`` took (tp.layers
    building the program, before tp.compile)."""
    import tpcompiler as tp
    from tpcompiler import progress

    with progress.timed_steps() as times:
        t = time.perf_counter()
        kf = tp.compile(prog).kernel_function()
        total = time.perf_counter() - t
    steps = [(("tp.compile: " if desc.startswith("tp.compile") else "kernels: ") + step, seconds)
             for desc, step, seconds in times]
    return {"steps": steps, "total": total, "quantities": kf.derivation_sizes["quantities"],
            "positions": positions, "built": built, "load": os.getloadavg()[0]}


def steps_table(rows, section: str = STEPS_SECTION, command: str = "--steps") -> str:
    """The --steps (or --flatten) section: seconds per step, and microseconds per pair of positions."""
    m = machine_info()
    names = list(dict.fromkeys(step for _, r in rows if "error" not in r for step, _ in r["steps"]))
    lines = [section, "",
             f"`python benchmarks/cnn_compile.py {command}` on {m['cpu']}, {m['cores']} cores, {m['memory']}; "
             f"{m['date']}.  Each case in a fresh process with an empty code cache: `tp.compile(...).kernel_function()`, "
             "the time of each of its steps (`progress.timed_steps`: a step lasts until the next starts) in seconds, "
             "and in parentheses in microseconds per pair of positions; quantities: the derivation's "
             "(`derivation_sizes`); \"other\" is "
             "the time outside the steps (storing the derivation, loading the module); program built: the time "
             "tp.layers took to build the program, before `tp.compile` (not in the total); load = 1-minute load "
             "average at the end of the case.", "",
             "| program | pairs of positions | quantities | program built (s) | " + " | ".join(names) +
             " | other | total (s) | load |",
             "|---|---|---|---|" + "---|" * (len(names) + 3)]
    for case, r in rows:
        if "error" in r:
            lines.append(f"| {name(case)} | failed: {r['error']} | | |" + " |" * (len(names) + 3))
            continue
        q = r["positions"] ** 2
        took = dict(r["steps"])
        cells = [f"{took[n]:.1f} ({1e6 * took[n] / q:.0f})" if n in took else "" for n in names]
        other = r["total"] - sum(took.values())
        lines.append(f"| {name(case)} | {q} | {r['quantities']} | {r['built']:.1f} | " + " | ".join(cells) +
                     f" | {other:.1f} | **{r['total']:.1f}** ({1e6 * r['total'] / q:.0f}) | {r['load']:.1f} |")
    return "\n".join(lines) + "\n"


def depth_table() -> str:
    """The --depth section: each deep CNN generated as it is and written out layer by layer, in
    fresh processes with empty code caches, one after the other."""
    rows = []
    for case in DEPTH_CASES:
        pair = []
        for written in (False, True):
            with tempfile.TemporaryDirectory() as cache:
                os.environ["TPCOMPILER_CACHE_DIR"] = cache
                pair.append(spawn(Path(__file__), {**case, "depth_table": True, "written": written}, timeout=1800))
        print(name(case), [{k: v for k, v in r.items() if k != "bits"} for r in pair], flush=True)
        rows.append((case, *pair))
    m = machine_info()
    lines = [DEPTH_SECTION, "",
             f"`python benchmarks/cnn_compile.py --depth` on {m['cpu']}, {m['cores']} cores, {m['memory']}; "
             f"{m['date']}; numba {m['numba']}.  Each case in a fresh process with an empty code cache, "
             "OMP_NUM_THREADS=1, twice: as generated (a sequence of loops repeated with other tables, a layer's, "
             "written once inside a loop over the repetitions: `kernel._folded`) and written out layer by layer "
             "(CNNs: `_FOLD_PERIOD = 0`, the code before that change; MLPs: the straight-line code, `share=False`, "
             "which they got before `_derive` compared the two modules' stages).  "
             "derive + codegen = "
             "`tp.compile(...).kernel_function()`; first call = the first `kf(X)` on 7 inputs (Numba's compile); "
             "lines = the generated module's; same bits = the two kernels equal bit for bit (else their largest "
             "relative difference); load = 1-minute load "
             "average at the end of the case.", "",
             "| program | derive + codegen (s) | first call (s) | first call, written out (s) | ratio | lines | "
             "lines, written out | same bits | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, folded, written in rows:
        if "error" in folded or "error" in written:
            lines.append(f"| {name(case)} | failed: {folded.get('error') or written.get('error')} | | | | | | | |")
            continue
        lines.append(f"| {name(case)} | {folded['derive']:.1f} | **{folded['first']:.1f}** | {written['first']:.1f} | "
                     f"{written['first'] / folded['first']:.1f}x | {folded['lines']} | {written['lines']} | "
                     f"{_same_bits(folded['bits'], written['bits'])} | {max(folded['load'], written['load']):.1f} |")
    return "\n".join(lines) + "\n"


def get_table() -> str:
    """The --get section: each pooled 2-D CNN with both kernels, the NNGP alone and the NTK
    alone, in fresh processes with empty code caches, one after the other."""
    rows = []
    for case in GET_CASES:
        runs = {}
        for get in (None, "nngp", "ntk"):
            with tempfile.TemporaryDirectory() as cache:
                os.environ["TPCOMPILER_CACHE_DIR"] = cache
                runs[get] = spawn(Path(__file__), {**case, "get_table": True, "get": get}, timeout=1800)
            print(name(case), get, {k: v for k, v in runs[get].items() if k != "nngp"}, flush=True)
        rows.append((case, runs))
    m = machine_info()
    lines = [GET_SECTION, "",
             f"`python benchmarks/cnn_compile.py --get` on {m['cpu']}, {m['cores']} cores, {m['memory']}; "
             f"{m['date']}; numba {m['numba']}.  Each case in a fresh process with an empty code cache, "
             "OMP_NUM_THREADS=1: `tp.compile(program, get=...).kernel_function()` (derive + codegen), its first call on 7 "
             f"inputs (Numba's compile) and a second call on N = {N} inputs (warm), for both kernels (get=None), "
             "the NNGP alone and the NTK alone.  The NNGP alone is the one a Gaussian process (NNGP posterior, "
             "`tpcompiler.sklearn.NNGP`) needs: it skips the NTK's sums over the pairs of uses of every weight.  "
             "NNGP vs both = the largest relative difference of the NNGP on the 7 inputs; load = 1-minute load "
             "average at the end of the case.", "",
             "| program | kernels | derive + codegen (s) | first call (s) | total (s) | warm N = 200 (s) | "
             "peak memory (GB) | pair quantities | NNGP vs both | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case, runs in rows:
        both = runs[None]
        for get, label in ((None, "both"), ("nngp", "NNGP alone"), ("ntk", "NTK alone")):
            r = runs[get]
            if "error" in r:
                lines.append(f"| {name(case)} | {label} | failed: {r['error']} | | | | | | | |")
                continue
            same = ""
            if get == "nngp" and "error" not in both:
                a, b = np.array(r["nngp"]), np.array(both["nngp"])
                same = f"{float(np.abs(a - b).max() / np.abs(b).max()):.1e}"
            lines.append(f"| {name(case)} | {label} | {r['derive']:.1f} | {r['first']:.1f} | "
                         f"**{r['derive'] + r['first']:.1f}** | {r['warm']:.2f}"
                         f"{'' if r.get('warm_how', 'whole') == 'whole' else ' (' + r['warm_how'] + ')'} | "
                         f"{r['peak'] / 1e9:.2f} | {r['pairs']} | "
                         f"{same} | {r['load']:.1f} |")
    return "\n".join(lines) + "\n"


def _same_bits(a: dict, b: dict) -> str:
    """"yes" if the kernels (as int64 bits) are equal bit for bit, else their largest relative
    difference (an MLP's loops and its straight-line code add in other orders)."""
    if a == b:
        return "yes"
    diff = max(float(np.abs(np.array(a[k]).view(np.float64) - np.array(b[k]).view(np.float64)).max()
                     / np.abs(np.array(b[k]).view(np.float64)).max()) for k in a)
    return f"no: {diff:.1e} relative"


def name(case: dict) -> str:
    if case["kind"] == "mlp":
        return f"mlp.py relu, depth {case['depth']}"
    if case["kind"] == "cnn1d":
        return f"cnn1d L={case['L']}, depth {case['depth']}"
    return f"2-D {case['L']} x {case['L']}, depth {case['depth']}{', Flatten' if case.get('readout') == 'flatten' else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--steps", action="store_true", help="time each step of the derivation (its own section)")
    parser.add_argument("--flatten", action="store_true",
                        help="time each step for Flatten readouts up to 32 x 32 (its own section)")
    parser.add_argument("--depth", action="store_true",
                        help="deep CNNs, folded against written out (its own section)")
    parser.add_argument("--get", action="store_true",
                        help="pooled 2-D CNNs with both kernels, the NNGP alone and the NTK alone (its own section)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    rows = []
    if args.depth or args.get:
        text = depth_table() if args.depth else get_table()
        print(text)
        if args.write_docs:
            write_section(DOCS, DEPTH_SECTION if args.depth else GET_SECTION, text)
        return
    if args.steps or args.flatten:
        section, command = (FLATTEN_SECTION, "--flatten") if args.flatten else (STEPS_SECTION, "--steps")
        for case in FLATTEN_CASES if args.flatten else STEPS_CASES:
            with tempfile.TemporaryDirectory() as cache:
                os.environ["TPCOMPILER_CACHE_DIR"] = cache
                rows.append((case, spawn(Path(__file__), case, timeout=1800)))
            print(name(case), rows[-1][1], flush=True)
        text = steps_table(rows, section, command)
        print(text)
        if args.write_docs:
            write_section(DOCS, section, text)
        return
    for case in QUICK if args.quick else CASES:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TPCOMPILER_CACHE_DIR"] = cache
            r = spawn(Path(__file__), case, timeout=1800)
            if "error" not in r:  # the same program again in a new process (kernels/stored.py)
                again = spawn(Path(__file__), {**case, "again": True}, timeout=1800)
                r["again"] = again["again"] if again.get("cached") else None
        rows.append((case, r))
        print(name(case), r, flush=True)
    m = machine_info()
    lines = [SECTION, "",
             f"`python benchmarks/cnn_compile.py` on {m['cpu']}, {m['cores']} cores, {m['memory']}; {m['date']}; "
             f"numba {m['numba']}.  Each case in a fresh process with an empty code cache, OMP_NUM_THREADS=1; "
             "derive + codegen = `tp.compile(...).kernel_function()`; first call = the first `kf(X)` on 7 "
             f"inputs (Numba's compile); warm = median of 3 calls at N = {N}; again = `tp.compile` + "
             "`kernel_function()` + first call of the same program in a second fresh process on the first one's "
             "caches (the derivation read back from the disk cache, kernels/stored.py; Numba's cache); peak memory = "
             "the process's peak resident set after the derivation; load = "
             "1-minute load average at the end of the case.", "",
             "| program | derive + codegen (s) | first call (s) | total (s) | again (s) | warm N = 200 (s) | peak memory (GB) | templates | pair quantities | generated lines | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, r in rows:
        if "error" in r:
            lines.append(f"| {name(case)} | failed: {r['error']} | | | | | | | | | |")
            continue
        again = "not read back" if r.get("again") is None else f"{r['again']:.1f}"
        lines.append(f"| {name(case)} | {r['derive']:.1f} | {r['first']:.1f} | **{r['derive'] + r['first']:.1f}** | "
                     f"{again} | {r['warm']:.3f}{'' if r.get('warm_how', 'whole') == 'whole' else ' (' + r['warm_how'] + ')'} | {r['peak'] / 1e9:.2f} | {r['templates']} | {r['pairs']} | {r['lines']} | {r['load']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        write_section(DOCS, SECTION, text)


if __name__ == "__main__":
    main()
