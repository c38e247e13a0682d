"""Every neural-tangents reference case (tests/data/nt_reference.json, see tests/data/README.md)
reproduced through the public API: tp.compile(tp.load(program, ...)).kernels(x, x_test).

nngp, ntk = k(x, x) and nngp_x2, ntk_x2 = k(x_test, x) are compared with the reference's
'__nngp', '__ntk', '__nngp_test', '__ntk_test' by relative error (max abs difference / max abs
value): <= 1e-10 against neural-tangents for the closed-form cases, <= 1e-8 against the
'*_exact' values for the Gauss-Hermite (num_*) cases, whose neural-tangents values carry its
own quadrature error (up to 14% for tanh at 25 points).

fc cases run programs/mlp.py (standard parametrization: parameterization=standard, width=512),
cnn1d cases programs/cnn1d.py (inputs (L, C) = (8, 3) flattened row-major), resnet cases
programs/resnet.py.  The num_<fn>_25 and num_<fn>_101 cases are the same program (our
quadrature does not use neural-tangents' degree), so each distinct program is compiled once.
"""
import functools
import json
from pathlib import Path

import numpy as np
import pytest

import tpcompiler as tp

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
META = json.loads((DATA / "nt_reference.json").read_text())
CASES = META["cases"]
W_STD = META["W_std"]
HIDDEN = META["hidden_width"]
OUTPUTS = (("nngp", "nngp"), ("ntk", "ntk"), ("nngp_x2", "nngp_test"), ("ntk_x2", "ntk_test"))
TOL_CLOSED = 1e-10
TOL_QUADRATURE = 1e-8


@functools.cache
def reference():
    with np.load(DATA / "nt_reference.npz") as z:
        return {k: z[k] for k in z.files}


def quadrature_case(case: dict) -> bool:
    return case.get("activation", "").startswith("num_")


def program_of(case: dict) -> tuple[str, tuple]:
    """(program file, sorted build parameters) of a reference case."""
    family = case["family"]
    if family == "fc":
        act = case["activation"]
        if act.startswith("num_"):
            act = act.split("_")[1]  # num_tanh_25 -> tanh
        params = dict(depth=case["depth"], phi=act, w_std=W_STD, b_std=case["b_std"], d=5,
                      parameterization=case["parameterization"], width=HIDDEN)
        return "mlp.py", tuple(sorted(params.items()))
    assert case["parameterization"] == "ntk", case
    if family == "cnn1d":
        params = dict(L=8, C=3, depth=case["depth"], phi=case["activation"], w_std=W_STD,
                      b_std=case["b_std"], padding=case["padding"])
        return "cnn1d.py", tuple(sorted(params.items()))
    if family == "resnet":
        params = dict(n_blocks=case["n_blocks"], preactivation=case["preactivation"], phi="relu",
                      w_std=W_STD, b_std=case["b_std"], d=5)
        return "resnet.py", tuple(sorted(params.items()))
    raise AssertionError(f"unknown family {family!r}")


@functools.cache
def kernels(program: str, params: tuple, input_name: str) -> dict:
    ref = reference()
    x, x_test = ref[input_name], ref[input_name + "_test"]
    x, x_test = x.reshape(len(x), -1), x_test.reshape(len(x_test), -1)  # (N, L, C) -> (N, L*C)
    compiled = tp.compile(tp.load(ROOT / "programs" / program, **dict(params)))
    return compiled.kernels(x, x_test)


def relative_errors(name: str) -> dict[str, float]:
    case = CASES[name]
    ref = reference()
    got = kernels(*program_of(case), case["input"])
    suffix = "_exact" if quadrature_case(case) else ""
    errors = {}
    for ours, theirs in OUTPUTS:
        want = ref[f"{name}__{theirs}{suffix}"]
        assert got[ours].shape == want.shape, (ours, got[ours].shape, want.shape)
        errors[ours] = float(np.abs(got[ours] - want).max() / np.abs(want).max())
    return errors


def test_reference_has_all_cases():
    assert len(CASES) == 76
    assert {c["family"] for c in CASES.values()} == {"fc", "cnn1d", "resnet"}
    quadrature = [k for k, c in CASES.items() if quadrature_case(c)]
    assert len(quadrature) == 12 and all(f"{k}__ntk_exact" in reference() for k in quadrature)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_case(name):
    tol = TOL_QUADRATURE if quadrature_case(CASES[name]) else TOL_CLOSED
    errors = relative_errors(name)
    assert max(errors.values()) <= tol, errors


def test_quadrature_cases_beat_neural_tangents_own_quadrature():
    """Our tanh kernels are far closer to the exact values than neural-tangents' 25-point
    Gauss-Hermite layer (its documented error: 0.14)."""
    ref = reference()
    name = "fc_d1_num_tanh_25_b0.1_ntk"
    ours = relative_errors(name)["ntk"]
    exact = ref[f"{name}__ntk_exact"]
    theirs = np.abs(ref[f"{name}__ntk"] - exact).max() / np.abs(exact).max()
    assert theirs > 0.1 and ours < 1e-8
