"""Benchmark: the existence checks' cost in ``tp.compile`` for nets of user-written functions
(symbolic/existence.py, symbolic/growth.py).

    python benchmarks/existence_checks.py [--write-docs]

Side by side, each case in a fresh process with an empty generated-code cache: "limits only",
the growth check deciding every function by sympy's limits (``growth.outgrown_by_gaussian_tail``
and ``outgrown_by_some_gaussian_tail`` replaced by ones that prove nothing, as before growth.py),
and "bound first", the code as it is.
Reported: the seconds of ``tp.compile`` (which checks that every moment of the kernel program
exists) and the number of sympy limits the growth check took; for the last case, the seconds
of ``tp.compile(...).limit(x=X)`` on 2 inputs, whose symbolic stage checks the limit's own
program (a case of no answer in the time given is reported as such).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's tpcompiler first
from _machine import machine_info, publish_table, spawn, table_arguments  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Existence checks of user-written functions (tp.compile)"
FUNCTIONS = ["sigmoid", "swish", "mish", "logcosh", "softplus"]
CASES = ([{"phi": f, "layernorm": ln, "depth": 2} for f in FUNCTIONS for ln in (False, True)]
         + [{"phi": "swish", "layernorm": True, "depth": 2, "limit": True}])
TIMEOUT = 300.0


def net_of(case: dict):
    """Dense(8) -> [LayerNorm] -> phi, ``depth`` times, -> Dense(1), on 3 inputs (also read by
    user_function_kernels.py)."""
    import sympy as sp
    from tpcompiler import layers

    phi = {"sigmoid": lambda a: 1 / (1 + sp.exp(-a)), "swish": lambda a: a / (1 + sp.exp(-a)),
           "mish": lambda a: a * sp.tanh(sp.log(1 + sp.exp(a))), "logcosh": lambda a: sp.log(sp.cosh(a)),
           "softplus": lambda a: sp.log(1 + sp.exp(a))}[case["phi"]]
    body = []
    for _ in range(case["depth"]):
        body += [layers.Dense(8, 1.5, 0.1)] + ([layers.LayerNorm()] if case["layernorm"] else [])
        body += [layers.Nonlin(phi, name=case["phi"])]
    return layers.serial(*body, layers.Dense(1, 1.5, 0.1)).program((3,))


def run_case(case: dict) -> dict:
    os.environ["TPCOMPILER_CACHE_DIR"] = tempfile.mkdtemp()
    import numpy as np
    import sympy as sp

    import tpcompiler as tp
    from tpcompiler.symbolic import existence, growth

    if case["arm"] == "limits only":
        growth.outgrown_by_gaussian_tail = lambda f, t: False
        growth.outgrown_by_some_gaussian_tail = lambda f, t: False
    limits = [0]
    limit = sp.limit

    def counted(*args, **kwargs):
        limits[0] += 1
        return limit(*args, **kwargs)

    existence.sp.limit = counted  # (existence's sympy module: every limit it takes)
    program = net_of(case)
    start = time.perf_counter()
    compiled = tp.compile(program)
    out = {"compile": time.perf_counter() - start}
    if case.get("limit"):
        X = np.random.default_rng(0).standard_normal((2, 3))
        start = time.perf_counter()
        compiled.limit(x=X)
        out["limit"] = time.perf_counter() - start
    out["limits"] = limits[0]
    return out


def _name(case: dict) -> str:
    name = f"{case['phi']}, depth {case['depth']}" + (", LayerNorm" if case["layernorm"] else "")
    return name + (": .limit()" if case.get("limit") else "")


def _cell(result: dict, what: str) -> str:
    if "error" in result:
        return result["error"]
    return f"{result[what]:.1f} s ({result['limits']} limits)"


def main() -> None:
    args = table_arguments(__doc__.split("\n\n")[0], DOCS, run_case)
    if args is None:
        return
    info = machine_info()
    rows = []
    for case in CASES:
        what = "limit" if case.get("limit") else "compile"
        results = {arm: spawn(__file__, {**case, "arm": arm}, TIMEOUT) for arm in ("limits only", "bound first")}
        row = f"| {_name(case)} | {_cell(results['limits only'], what)} | {_cell(results['bound first'], what)} |"
        print(row, flush=True)
        rows.append(row)
    publish_table(DOCS, SECTION,
                  "`python benchmarks/existence_checks.py --write-docs`: `tp.compile` of nets of user-written "
                  "functions (Dense(8) -> [LayerNorm] -> phi, twice, -> Dense(1)), each in a fresh process, with "
                  "the growth check deciding by sympy's limits only, and with the growth bound of "
                  "symbolic/growth.py first; in parentheses the limits the check took. The last row is "
                  "`tp.compile(...).limit(x=X)` on 2 inputs, whose symbolic stage checks the limit's program "
                  f"(a time-out of {TIMEOUT:.0f} s is reported as no answer).",
                  info, ["net", "limits only", "bound first"], rows, args.write_docs)


if __name__ == "__main__":
    main()
