"""Benchmark: the first kernel derivation of nets of user-written functions, where the
quadrature rules of their expectations are probed (backends/kernels/kernel.py,
expectations/probing.py).

    python benchmarks/user_function_kernels.py [--write-docs]

Side by side, each case in a fresh process with an empty generated-code cache, so that
every rule is probed: "every function, rho = 1 split", the derivation as it was before
rules were built on first read (a rule built for every function of the engine's table,
including those of expectations that were dropped) and with E[f1(u) f2(u)] always the
bivariate rule at rho = 1 (``pairwise._pair_closed_form`` answering yes, no square looked
for by ``pairwise._square_root``); and "read
functions only", the code as it is.  Reported: the seconds of
``tp.compile(net).kernel_function()``, the rules built of the engine's functions, the
quadratures that missed their accuracy target (RuntimeWarnings), and the largest relative
difference of the NNGP and NTK on 6 inputs between the two arms.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's tpcompiler first
from _machine import machine_info, publish_table, spawn, table_arguments  # noqa: E402
from existence_checks import net_of  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## First kernel derivation of user-written functions (quadrature probing)"
CASES = [{"phi": f, "layernorm": ln, "depth": 2} for f in ("sigmoid", "swish", "softplus") for ln in (False, True)]
ARMS = ("every function, rho = 1 split", "read functions only")
TIMEOUT = 900.0


def run_case(case: dict) -> dict:
    os.environ["TPCOMPILER_CACHE_DIR"] = tempfile.mkdtemp()
    import numpy as np

    import tpcompiler as tp
    from tpcompiler.backends.kernels import pairwise

    built = []
    if case["arm"] == ARMS[0]:
        pairwise._pair_closed_form = lambda f1, f2: True
        pairwise._square_root = lambda g: None
        lazy_init = pairwise.ExpectationRules.__init__

        def eager_init(self, functions, rtol, failed):
            lazy_init(self, functions, rtol, failed)
            for i in range(len(functions)):
                self[i]

        pairwise.ExpectationRules.__init__ = eager_init
    counted_init = pairwise.ExpectationRules.__init__

    def counting_init(self, functions, rtol, failed):
        built.append(self)
        counted_init(self, functions, rtol, failed)

    pairwise.ExpectationRules.__init__ = counting_init
    compiled = tp.compile(net_of(case))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        kf = compiled.kernel_function()
        seconds = time.perf_counter() - start
    X = np.random.default_rng(0).standard_normal((6, 3))
    values = kf(X)
    rules = built[-1]
    return {"seconds": seconds, "built": len(rules.built()), "functions": len(rules.functions),
            "missed": sum("did not reach" in str(w.message) for w in caught),
            "values": {k: np.asarray(v).tolist() for k, v in values.items()}}


def _name(case: dict) -> str:
    return f"{case['phi']}, depth {case['depth']}" + (", LayerNorm" if case["layernorm"] else "")


def _cell(result: dict) -> str:
    if "error" in result:
        return result["error"]
    missed = f", {result['missed']} missed" if result["missed"] else ""
    return f"{result['seconds']:.1f} s ({result['built']} of {result['functions']} rules{missed})"


def _difference(a: dict, b: dict) -> str:
    import numpy as np

    if "values" not in a or "values" not in b:
        return "-"
    worst = max(float(np.max(np.abs(np.array(a["values"][k]) - np.array(b["values"][k]))
                             / np.max(np.abs(np.array(b["values"][k]))))) for k in b["values"])
    return f"{worst:.1e}"


def _row(case: dict) -> str:
    """One table row: the case in both arms, each in its own process."""
    first, now = (spawn(__file__, {**case, "arm": arm}, TIMEOUT) for arm in ARMS)
    return f"| {_name(case)} | {_cell(first)} | {_cell(now)} | {_difference(first, now)} |"


def main() -> None:
    args = table_arguments(__doc__.split("\n\n")[0], DOCS, run_case)
    if args is None:
        return
    info = machine_info()
    rows = [_row(case) for case in CASES]
    publish_table(DOCS, SECTION,
                  "`python benchmarks/user_function_kernels.py --write-docs`: `tp.compile(net).kernel_function()` "
                  "of nets of user-written functions (Dense(8) -> [LayerNorm] -> phi, twice, -> Dense(1)), each in "
                  "a fresh process with an empty cache, so that every quadrature rule is probed. \"Every function, "
                  "rho = 1 split\": a rule built for every function of the engine's table, and E[f1(u) f2(u)] "
                  "always the bivariate rule at rho = 1 (the derivation before rules were built on first read); "
                  "\"read functions only\": the code as it is. In parentheses the rules built of the engine's "
                  "functions, and the quadratures that missed their accuracy target (1e-10, a RuntimeWarning). "
                  "Last column: the largest difference of the NNGP and NTK on 6 inputs between the two, relative "
                  "to the largest entry.",
                  info, ["net", *ARMS, "difference"], rows, args.write_docs)


if __name__ == "__main__":
    main()
