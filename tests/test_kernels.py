"""The kernel backend (c.kernels, `tpc kernels`; docs/DESIGN.md 2.3, 4, 5):

(a) exact identities: kernels are symmetric and positive semi-definite up to rounding;
(b) k(X2, X) is the corresponding block of k([X; X2], [X; X2]);
(c) finite width converges to the kernels (docs/DESIGN.md 4, oracle 1): the empirical NNGP and NTK
    of the finite-width interpreter (the kernel outputs of the readout-only program, pair
    moments of its derived backward pass) approach c.kernels(X) with RMS error slope near -1/2
    and agree at the top width, for a relu MLP, a tanh MLP (quadrature), a residual net and a
    1-D CNN; and the same check fails for a kernel with one term dropped;
(d) clear one-line errors from the API and the command line.
"""
import dataclasses
import functools
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import tpcompiler as tp
from tpcompiler import layers
from tpcompiler.check import finite_runs, format_report, judge
from tpcompiler.cli.commands import main
from tpcompiler.ir.ntk import kernel_program

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "programs" / "mlp.py"

#: name -> (program file, build parameters)
PROGRAMS = {
    "mlp_relu": ("mlp.py", dict(depth=3, phi="relu", w_std=1.5, b_std=0.1, d=4)),
    "mlp_relu_nobias": ("mlp.py", dict(depth=2, phi="relu", w_std=1.5, b_std=None, d=4)),
    "mlp_tanh": ("mlp.py", dict(depth=2, phi="tanh", w_std=1.5, b_std=0.1, d=4)),
    "mlp_erf_standard": ("mlp.py", dict(depth=2, phi="erf", w_std=1.5, b_std=0.1, d=4,
                                        parameterization="standard", width=512)),
    "resnet": ("resnet.py", dict(n_blocks=1, preactivation=True, w_std=1.5, b_std=0.1, d=4)),
    "cnn1d": ("cnn1d.py", dict(L=3, C=2, depth=2, padding="SAME", w_std=1.5, b_std=0.1)),
}


def load(name: str) -> tp.Program:
    file, params = PROGRAMS[name]
    return tp.load(ROOT / "programs" / file, **params)


@functools.cache
def compiled(name: str):
    return tp.compile(load(name))


def dim(name: str) -> int:
    (decl,) = load(name).graph.inputs.values()
    return len(decl.keys)


def inputs(name: str, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim(name)))


def relerr(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- (a) symmetric and positive semi-definite ------------------------------------------------
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_kernels_are_symmetric_and_psd(name):
    X = inputs(name, 9, seed=1)
    # hard pairs: a repeated row (correlation 1), a multiple (correlation 1, other norm), a
    # negated row (correlation -1) and a zero row (zero variance without bias)
    X = np.vstack([X, X[0], 3.0 * X[1], -X[2], np.zeros(X.shape[1])])
    K = compiled(name).kernels(X)
    assert set(K) == {"nngp", "ntk"}
    for kind, M in K.items():
        assert M.shape == (len(X), len(X)) and np.all(np.isfinite(M)), kind
        assert np.abs(M - M.T).max() <= 1e-14 * np.abs(M).max(), kind
        eig = np.linalg.eigvalsh(M)
        assert eig[0] >= -1e-10 * eig[-1], (kind, eig[0], eig[-1])
        # the repeated row gives the same kernel row up to rounding, which the arc-cosine
        # angle near correlation 1 amplifies to ~sqrt(machine epsilon) (theta ~ sqrt(2 delta))
        assert np.abs(M[0] - M[9]).max() <= 1e-8 * np.abs(M).max(), kind


# -- (b) k(X2, X) is a block of k([X; X2]) ---------------------------------------------------
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_cross_kernel_is_a_block_of_the_joint_kernel(name):
    X, X2 = inputs(name, 5, seed=2), inputs(name, 3, seed=3)
    c = compiled(name)
    K = c.kernels(X, X2)
    joint = c.kernels(np.vstack([X, X2]))
    assert set(K) == {"nngp", "ntk", "nngp_x2", "ntk_x2"}
    for kind in ("nngp", "ntk"):
        assert K[f"{kind}_x2"].shape == (3, 5)
        assert relerr(K[f"{kind}_x2"], joint[kind][5:, :5]) <= 1e-12, kind
        assert relerr(K[kind], joint[kind][:5, :5]) <= 1e-12, kind
        assert relerr(c.kernels(X2)[kind], joint[kind][5:, 5:]) <= 1e-12, kind


def test_large_input_sets_take_the_threaded_gram_path_with_the_same_result():
    """From 256 rows the Grams are computed in two halves on two threads; the kernels of a
    few rows must not depend on which path computed them."""
    c = compiled("mlp_relu")
    X, X2 = inputs("mlp_relu", 301, seed=5), inputs("mlp_relu", 263, seed=6)
    big = c.kernels(X, X2)
    small = c.kernels(X[:7], X2[:4])
    for kind in ("nngp", "ntk"):
        assert relerr(big[kind][:7, :7], small[kind]) <= 1e-13, kind
        assert relerr(big[f"{kind}_x2"][:4, :7], small[f"{kind}_x2"]) <= 1e-13, kind
        assert np.array_equal(big[kind], big[kind].T), kind



def test_input_layer_values_read_by_index_plans_are_the_scalars_one_by_one():
    """The Grams read each input layer's scalars through an index plan built once (a CNN
    reads one Gram per pair of windows); it must give the scalars LAYER_SCALARS gives one by
    one, row-major (the layout the Grams' rounding was fixed with), also at boundary windows
    that read fewer inputs, and the stacked Grams (written in place, on two threads from 256
    rows, in batches for few rows) the separate ones, bit for bit."""
    from tpcompiler.backends.kernels.features import LAYER_SCALARS
    from tpcompiler.ir import ops

    net = tp.layers.serial(tp.layers.Conv(8, (2, 2), None, "SAME", 1.3, 0.2), tp.layers.Relu(),
                           tp.layers.GlobalAvgPool(), tp.layers.Dense(1, 1.3, 0.2))
    kf = tp.compile(net.program((3, 3, 2))).kernel_function()
    features = kf.features
    X = np.random.default_rng(3).standard_normal((5, 18))
    layers = features.graph.keys_of(ops.InputLayer)
    assert len(layers) == 9
    for key in layers:
        scalars = features.graph.args(key)[1:]
        positions = tuple(range(len(scalars)))
        got = features._layer_values(key, X, positions)
        want = np.stack([LAYER_SCALARS(features.graph.op(s))(X, features.graph.op(s)) for s in scalars], axis=1)
        assert np.array_equal(got, want) and got.flags["C_CONTIGUOUS"], key
    assert len({len(features.graph.args(k)) for k in layers}) > 1  # boundary windows read fewer inputs
    # from 256 rows the Grams are written in place by two threads into blocks of the array;
    # up to 100 x 100 entries those of input columns in batches (features._batched_cov_grams)
    for rows, rows2 in ((300, 270), (7, 5)):
        X = np.random.default_rng(4).standard_normal((rows, 18))
        X2 = X[:rows2] + 0.5
        for second in (None, X2):
            stacked = features.pair_values(X, second, stacked=True)
            assert all(np.array_equal(g, s) for g, s in zip(features.pair_values(X, second), stacked))
    batches, others = features._gram_batches()
    assert sum(len(batch[1]) for batch in batches) == len(features.bases) and not others  # all batched



def test_row_features_linear_in_input_covariances_take_their_exact_coefficients():
    """Row features c0 + sum c_k Cov_k (a CNN's window variances, thousands) are evaluated
    from a plan without building a numpy function each; their values must be the features'
    own exactly (each covariance substituted into the sympy expression, which evaluates in
    float64 precision, one rounding per operation in the printed order), the coefficients exact (0.1**2 is 0.010000000000000002, not the 15-digit 0.01 a printed
    sympy Float gives)."""
    import sympy as sp

    net = tp.layers.serial(tp.layers.Conv(8, (3,), None, "SAME", 1.3, 0.1), tp.layers.Tanh(),
                           tp.layers.Conv(8, (3,), None, "SAME", 1.3, 0.1), tp.layers.Relu(),
                           tp.layers.Flatten(), tp.layers.Dense(1, 1.3, 0.1))
    # derived, not read back from the disk cache (a restored derivation keeps these rows as numbers)
    features = tp.compile(net.program((4, 2))).kernel_function(cache=False).features
    X = np.random.default_rng(2).standard_normal((3, 8))
    plan, values = features._row_plan(), features.row_values(X)
    assert sum(fn is None for fn, _, _ in plan) >= len(plan) // 2
    assert any(0.010000000000000002 in columns for fn, columns, _ in plan if fn is None)
    for k, expr in enumerate(features.row):
        covs = sorted(expr.atoms(tp.ir.ops.InputCov), key=sp.default_sort_key)
        for i in range(X.shape[0]):
            rep = {c: sp.Float(features._cov_values(str(c.args[0]), str(c.args[1]), X[i:i + 1], None, True)[0])
                   for c in covs}
            assert values[i, k] == float(expr.xreplace(rep)), (k, expr)


# -- (c) finite width converges to the kernels -----------------------------------------------
#: The smallest setting that still rejects a kernel with one term dropped (see below): widths
#: 128..2048 over 20 seeds on 3 inputs (9 entries per kernel).
WIDTHS = (128, 256, 512, 1024)
SEEDS = 20
CONVERGENCE = ["mlp_relu", "mlp_tanh", "resnet", "cnn1d"]


def limits_of(K: dict) -> dict:
    """{"nngp[a,b]": (value, 0.0), ...}: the output names of the instantiated program."""
    N = K["nngp"].shape[0]
    return {f"{kind}[{a},{b}]": (float(K[kind][a, b]), 0.0) for kind in ("nngp", "ntk") for a in range(N) for b in range(N)}


@functools.cache
def runs(name: str):
    """Finite-width kernel outputs of the readout-only program (its derived backward pass):
    the empirical NNGP and NTK at each width and seed."""
    X = inputs(name, 3, seed=4)
    return X, finite_runs(kernel_program(load(name).graph), WIDTHS, SEEDS, x=X)


@pytest.mark.parametrize("name", CONVERGENCE)
def test_finite_width_converges_to_the_kernels(name):
    X, finite = runs(name)
    checks = judge(limits_of(compiled(name).kernels(X)), finite)
    assert len(checks) == 18
    assert all(c.passed for c in checks), format_report(checks)
    slopes = [c.slope for c in checks if c.reason != "exact at every width"]
    assert -0.75 < np.median(slopes) < -0.35, slopes


def without_training(name: str, key: str):
    """The program with the tensor ``key`` frozen: its NTK lacks exactly that tensor's term."""
    graph = load(name).graph.copy()
    op = graph.op(key)
    graph.g.nodes[key]["op"] = dataclasses.replace(op, trainable=False)
    return tp.compile(graph)


@pytest.mark.parametrize("name, key", [("mlp_relu", "W3"), ("mlp_tanh", "W2"), ("resnet", "A1")])
def test_a_kernel_with_one_term_dropped_fails_the_check(name, key):
    X, finite = runs(name)
    right = {c.name: c for c in judge(limits_of(compiled(name).kernels(X)), finite)}
    wrong_kernels = without_training(name, key).kernels(X)
    wrong = {c.name: c for c in judge(limits_of(wrong_kernels), finite)}
    assert all(c.passed for c in right.values())
    nngp = [c for n, c in wrong.items() if n.startswith("nngp")]
    ntk = [c for n, c in wrong.items() if n.startswith("ntk")]
    assert all(c.passed for c in nngp)  # freezing a tensor does not change the NNGP
    failed = [c for c in ntk if not c.passed]
    assert len(failed) >= 6, format_report(ntk)


# -- (d) errors ------------------------------------------------------------------------------
def assert_one_line_program_error(fn, match):
    with pytest.raises(tp.ProgramError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and match in message, message


def test_input_errors_are_clear():
    c = compiled("mlp_relu")
    X = inputs("mlp_relu", 3, seed=0)
    assert_one_line_program_error(lambda: c.kernels(X[:, :3]), "dimension d = 4, got 3")
    assert_one_line_program_error(lambda: c.kernels(X, X[:, :2]), "dimension d = 4, got 2")
    bad = X.copy()
    bad[1, 2] = np.nan
    assert_one_line_program_error(lambda: c.kernels(bad), "NaN or infinite")
    bad[1, 2] = np.inf
    assert_one_line_program_error(lambda: c.kernels(X, bad), "NaN or infinite")
    bad[1, 2] = -np.inf
    assert_one_line_program_error(lambda: c.kernels(bad), "NaN or infinite")
    assert_one_line_program_error(lambda: c.kernels(np.empty((0, 4))), "empty")
    assert_one_line_program_error(lambda: c.kernels(X, np.empty((0, 4))), "empty")
    assert_one_line_program_error(lambda: c.kernels(X[0]), "N x d")


def test_program_errors_are_clear():
    p = tp.Program("no_readout")
    xi = p.input("xi", 2)
    U = p.input_matrix("U", 2)
    h = U.apply(xi)
    p.output("k", tp.mean(tp.relu(h) * tp.relu(h).prime))
    assert_one_line_program_error(lambda: tp.compile(p).kernels(np.ones((2, 2))), "has no readout")

    q = tp.Program("no_input")
    u = q.vec("u")
    W = q.mat("W")
    q.readout(tp.relu(W @ u))
    assert_one_line_program_error(lambda: tp.compile(q).kernels(np.ones((2, 2))), "has no input")

    # an expectation beyond the engine names the moment it was deriving, not only the
    # template's placeholders (Zhat^#1b0d) in which the refused expectation is written
    r = tp.Program("scaled_by_a_moment")
    g = tp.softplus(r.input_layer("U", r.input("xi", 2), sigma=0.7))
    r.readout(tp.relu(g * (tp.mean(g * g) + 0.1) ** -0.5).named("y"))
    assert_one_line_program_error(lambda: tp.compile(r).kernels(np.ones((2, 2))), "but: instruction 'K_y' := mean(y*y')")


# -- (d) tpc kernels -------------------------------------------------------------------------
MLP_ARGS = ["-p", "depth=3", "-p", "phi=relu", "-p", "w_std=1.5", "-p", "b_std=0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels")
    X, X2 = inputs("mlp_relu", 4, seed=7), inputs("mlp_relu", 2, seed=8)
    nan = X.copy()
    nan[0, 0] = np.nan
    arrays = {"X": X, "X2": X2, "X2_d3": X2[:, :3], "nan": nan, "empty": np.empty((0, 4)), "cnn": np.random.default_rng(9).standard_normal((3, 6))}
    for k, v in arrays.items():
        np.save(d / f"{k}.npy", v)
    return d, arrays


def tpc(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc, err, match):
    assert rc != 0 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpc: error: ") and match in lines[0], err


def test_cli_kernels_writes_npz(capsys, data):
    d, arrays = data
    rc, out, err = tpc(capsys, "kernels", MLP, *MLP_ARGS, "--x", d / "X.npy", "--out", d / "K.npz")
    assert rc == 0, err
    assert "wrote" in out and "compile" in out
    with np.load(d / "K.npz") as K:
        assert set(K.files) == {"nngp", "ntk"}
        assert K["nngp"].shape == (4, 4)
        expected = compiled("mlp_relu").kernels(arrays["X"])  # d = 4 filled from --x
        np.testing.assert_array_equal(K["ntk"], expected["ntk"])

    rc, out, err = tpc(capsys, "kernels", MLP, *MLP_ARGS, "--x", d / "X.npy", "--x2", d / "X2.npy", "--out", d / "K2.npz")
    assert rc == 0, err
    with np.load(d / "K2.npz") as K:
        assert set(K.files) == {"nngp", "ntk", "nngp_x2", "ntk_x2"}
        assert K["ntk_x2"].shape == (2, 4)
        expected = compiled("mlp_relu").kernels(arrays["X"], arrays["X2"])
        for k in K.files:
            np.testing.assert_array_equal(K[k], expected[k])


def test_cli_kernels_fills_cnn_length_from_the_data(capsys, data):
    d, arrays = data
    args = ["-p", "C=2", "-p", "depth=2", "-p", "padding=SAME", "-p", "w_std=1.5", "-p", "b_std=0.1"]
    rc, out, err = tpc(capsys, "kernels", ROOT / "programs" / "cnn1d.py", *args, "--x", d / "cnn.npy", "--out", d / "C.npz")
    assert rc == 0, err
    with np.load(d / "C.npz") as K:
        np.testing.assert_array_equal(K["nngp"], compiled("cnn1d").kernels(arrays["cnn"])["nngp"])  # L = 6 / 2


def test_cli_kernels_errors_are_one_line(capsys, data):
    d, _ = data
    cases = [
        (["--x", d / "X.npy", "--x2", d / "X2_d3.npy", "--out", d / "E.npz"], "dimension d = 4, got 3"),
        (["--x", d / "nan.npy", "--out", d / "E.npz"], "NaN or infinite"),
        (["--x", d / "empty.npy", "--out", d / "E.npz"], "empty"),
        (["--x", d / "missing.npy", "--out", d / "E.npz"], "not found"),
        (["--x", d / "X.npy"], "--out"),
        (["--out", d / "E.npz"], "--x"),
        (["--x", d / "X.npy", "--out", d / "no_such_dir" / "E.npz"], "cannot write"),
        (["-p", "d=5", "--x", d / "X.npy", "--out", d / "E.npz"], "dimension d = 5, got 4"),
    ]
    for extra, match in cases:
        rc, out, err = tpc(capsys, "kernels", MLP, *MLP_ARGS, *extra)
        assert_one_error_line(rc, err, match)
    rc, out, err = tpc(capsys, "kernels", ROOT / "programs" / "zdot.py", "--x", d / "X.npy", "--out", d / "E.npz")
    assert_one_error_line(rc, err, "")
    assert not (d / "E.npz").exists()


def test_cli_kernels_refuses_a_program_without_readout_before_compiling(capsys, data, monkeypatch):
    """programs/rnn.py declares its kernels as moments and has no readout: the one-line error
    comes before tp.compile (whose passes took 4 of the 15 s it took to say so at T = 100)."""
    d, _ = data
    import tpcompiler.compiler as C

    def no_compile(*args, **kwargs):
        raise AssertionError("tp.compile ran before the readout was checked")

    monkeypatch.setattr(C, "compile", no_compile)
    rc, out, err = tpc(capsys, "kernels", ROOT / "programs" / "rnn.py", "--x", d / "X.npy", "--out", d / "R.npz")
    assert_one_error_line(rc, err, "program 'rnn' has no readout")
    with pytest.raises(tp.ProgramError, match="program 'rnn' has no readout"):
        tp.predict.predict_program(tp.load(ROOT / "programs" / "rnn.py"), np.ones((2, 6)), np.ones(2), np.ones((1, 6)))


def test_cli_kernels_error_in_a_real_process(data):
    d, _ = data
    proc = subprocess.run([sys.executable, "-m", "tpcompiler.cli", "kernels", str(MLP), *MLP_ARGS,
                           "--x", str(d / "nan.npy"), "--out", str(d / "S.npz")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert_one_error_line(proc.returncode, proc.stderr, "NaN or infinite")
    assert proc.stdout == ""


def test_a_readout_of_an_input_independent_vector_has_the_closed_form_nngp():
    """relu(g) + relu(a), g = U xi an input layer and a an initial vector: E[relu(a)^2] and
    the cross terms' E[relu(a)] are numbers at compile time, printed as constants with
    float(), which raised "Cannot convert complex to float" on the special functions
    (_angle, _sdet, _pos) that had no numeric value.  NNGP = J1(q) + (sqrt(q11) + sqrt(q22))
    / (2 pi) + 1/2 with q = X X^T / d (E relu(z) = sqrt(var / (2 pi)))."""
    p = tp.Program("constant_readout")
    xi = p.input("xi", 2, default=np.eye(2))
    g = p.input_matrix("U", 2).apply(xi, name="g")
    a = p.vec("a")
    p.readout((tp.relu(g) + tp.relu(a)).named("x"), sigma=1.0)
    X = np.random.default_rng(0).standard_normal((3, 2))
    K = tp.compile(p).kernels(X)
    q = X @ X.T / 2
    d = np.sqrt(np.diag(q))
    rho = np.clip(q / np.outer(d, d), -1, 1)
    t = np.arccos(rho)
    j1 = np.outer(d, d) * (np.sin(t) + (np.pi - t) * rho) / (2 * np.pi)
    np.testing.assert_allclose(K["nngp"], j1 + (d[:, None] + d[None, :]) / (2 * np.pi) + 0.5, rtol=1e-14, atol=0)



def test_a_linear_networks_kernels_through_limit_and_check():
    """f = v . W (s U xi / sqrt(d)) / sqrt(n): its backward vectors (v, W^T v) do not depend on
    the input, so their pair moments (E[v v'], ...) are input-free and bound once.  Binding
    read them as per-pair copies that did not exist: `tpc limit` and `tpc check` failed with
    "'K_v[0,0]' is not a scalar of this program", and the finite-width kernel program with a
    KeyError.  Closed forms (NTK parametrization): NNGP = s_W^2 s^2 xi.xi'/d, and the three
    trained tensors (v, W, U) each add that much to the NTK."""
    p = tp.Program("linear_net")
    X = np.array([[1.0, 0.5, -0.2], [0.3, -1.0, 0.8]])
    xi = p.input("xi", 3, default=X)
    W = p.mat("W", sigma=1.2)
    p.readout(W @ p.input_layer("U", xi, sigma=1.5), sigma=1.0)
    nngp = 1.2**2 * 1.5**2 * X @ X.T / 3
    lim = tp.compile(p).limit()
    for a in range(2):
        for b in range(2):
            assert lim[f"nngp[{a},{b}]"] == (pytest.approx(nngp[a, b], rel=1e-14), 0.0)
            assert lim[f"ntk[{a},{b}]"] == (pytest.approx(3 * nngp[a, b], rel=1e-14), 0.0)
    finite = finite_runs(kernel_program(p.graph), [1024], 12, x=X)[1024]
    for name, want in (("nngp", nngp), ("ntk", 3 * nngp)):
        values = finite[f"{name}[0,1]"]
        assert abs(values.mean() - want[0, 1]) < 5 * values.std(ddof=1) / np.sqrt(len(values))

def test_a_repeated_input_has_the_diagonals_kernel_in_every_block():
    """k(x, x') with x' = x is k(x, x): within X, between X2 and X (a test point that is a
    training point), and across tiles.  The pair formulas at rho = 1 carry their arguments'
    rounding, which arc-cosine kernels amplify like a square root: after Abs (quadrature,
    2e-13 at rho = 1) and Relu the repeated input's NTK was 1.3e-7 off its diagonal, after
    Abs, Step, Step 5.6e-4 (layers audit against neural-tangents, which computes repeats as
    the diagonal)."""
    net = layers.serial(layers.Dense(64, 1.0, 0.3), layers.Abs(), layers.Dense(64, 1.0, 0.2), layers.Relu(),
                        layers.Dense(64, 1.0, 0.2), layers.Relu(), layers.Dense(1, 1.0))
    rs = np.random.RandomState(1)
    a, b, c = rs.randn(3, 3)
    X, X2 = np.stack([a, b, a, c, b]), np.stack([c, a])
    compiled = tp.compile(net.program((3,)))
    for K in (compiled.kernels(X, X2), compiled.kernels(X, X2, tile=2)):
        for k in ("nngp", "ntk"):
            d = np.diag(K[k])
            assert K[k][0, 2] == K[k][2, 0] == d[0] == d[2] and K[k][1, 4] == d[1] == d[4], k
            assert K[f"{k}_x2"][0, 3] == d[3] and K[f"{k}_x2"][1, 0] == K[f"{k}_x2"][1, 2] == d[0], k
            assert K[k][0, 1] != d[0]  # (only equal inputs)


def test_special_functions_have_their_values_at_numbers():
    """expectations.special's functions evaluate at numbers (evalf), as their Numba source
    computes them: the arc-cosine kernels against numpy's formulas, a zero variance 0."""
    import sympy

    from tpcompiler.expectations.special import _J0, _J1, _RS, _angle, _cvar, _det, _pos, _sdet

    k11, k12, k22 = 1.3, -0.4, 0.7
    sd = np.sqrt(k11 * k22 - k12**2)
    t = np.arctan2(sd, k12)
    expected = {_J1: (sd + (np.pi - t) * k12) / (2 * np.pi), _J0: (np.pi - t) / (2 * np.pi),
                _RS: (np.sqrt(k11) + k12 / np.sqrt(k22)) / (2 * np.sqrt(2 * np.pi)), _sdet: sd, _det: sd**2,
                _cvar: sd**2 / k22}
    for f, value in expected.items():
        assert float(f(k11, k12, k22)) == pytest.approx(value, rel=1e-14), f
        assert float(f(sympy.Rational(13, 10), sympy.Rational(-2, 5), sympy.Rational(7, 10))) == pytest.approx(value, rel=1e-14)
    assert float(_J1(0.0, 0.0, 0.7)) == 0.0 and float(_det(1.0, 2.0, 1.0)) == 0.0
    assert float(_angle(sd, k12)) == pytest.approx(t, rel=1e-15)
    assert float(_pos(1.0, 0.0)) == 0.0 and float(_pos(1.0, 2.0)) == 1.0


def _sigmoid_layernorm_net(depth: int):
    from tpcompiler import layers

    sigmoid = layers.Nonlin(lambda a: 1 / (1 + sp.exp(-a)), name="sigmoid")
    net = []
    for _ in range(depth):
        net += [layers.Dense(8, 1.5, 0.1), layers.LayerNorm(), sigmoid]
    return layers.serial(*net, layers.Dense(1, 1.5, 0.1)).program((3,))


def test_only_the_expectations_the_derivation_reads_get_a_rule():
    """The engine's function table also holds functions of expectations derived and then
    dropped (a depth-2 LayerNorm-sigmoid net: three of six); their rules were built anyway,
    and probing their quadratures took most of the derivation.  A rule is now built when
    the lowering first reads it: every function with a rule is read by a template or a
    quantity, and the ones that none reads have none."""
    from tpcompiler.backends.kernels.kernel import KernelFunction
    from tpcompiler.backends.kernels.pairwise import E1, E2

    kf = KernelFunction(tp.compile(_sigmoid_layernorm_net(2)).graph)
    engine = kf.engine
    read = set()
    for expr in [t.value for t in engine.templates_found] + [q.definition for q in engine.order]:
        read.update(int(c.args[0]) for c in expr.atoms(E1, E2))
    built = {i for i, _ in kf.expectations.built()}
    assert built and built <= read
    unread = set(range(len(engine.functions))) - read
    assert unread and not unread & built
    values = kf(np.random.default_rng(0).standard_normal((4, 3)))
    assert all(np.isfinite(v).all() for v in values.values())


def test_a_product_of_two_functions_of_one_gaussian_without_a_closed_form_is_one_quadrature():
    """E[f1(u) f2(u)] went to the bivariate rule at rho = 1 whatever f1, f2 were: the square
    of a sigmoid's derivative, e^(2u) (1 + e^u)^-4, as e^(2u) against (1 + e^u)^-4, whose
    probing took 25 s and missed its target (estimated error 2.6e-7 for 1e-10).  Without a
    closed form it is now one quadrature of the product, checked against scipy's quad; with
    one (relu(u)^2, the arc-cosine kernel at rho = 1), or for a square, it stays the
    bivariate rule."""
    import scipy.integrate
    from tpcompiler.backends.kernels.limit import pairwise_limit
    from tpcompiler.backends.kernels.pairwise import E1, E2, PairwiseEngine

    def program(f, var):
        p = tp.Program("square")
        u = p.vec("u", var=var)
        h = (p.mat("W", sigma=1.0) @ u).named("h")
        p.output("m", tp.mean(tp.nonlin(f, h)))
        return tp.compile(p).zprogram

    derivative_squared = lambda x: (sp.exp(-x) / (1 + sp.exp(-x)) ** 2) ** 2  # noqa: E731
    for var in (0.5, 9.0):
        zp = program(derivative_squared, var)
        engine = PairwiseEngine(zp.graph, zp)
        value = engine.instantiate(engine.scalar(zp.graph.outputs["m"]))
        assert value.atoms(E1) and not value.atoms(E2), value
        density = lambda x: np.exp(-x * x / (2 * var)) / np.sqrt(2 * np.pi * var)  # noqa: E731
        reference = scipy.integrate.quad(lambda x: density(x) / (16 * np.cosh(x / 2) ** 4), -60, 60,
                                         epsabs=0, epsrel=1e-13, limit=200)[0]
        assert pairwise_limit(zp)["m"][0] == pytest.approx(reference, rel=1e-9, abs=0)
    zp = program(lambda x: sp.Max(x, 0) ** 2, 2.0)
    engine = PairwiseEngine(zp.graph, zp)
    assert engine.instantiate(engine.scalar(zp.graph.outputs["m"])).atoms(E2)
    assert pairwise_limit(zp)["m"][0] == pytest.approx(1.0, rel=1e-12)  # E[relu(u)^2] = var / 2
    # a square keeps the rule of E[f(u) f(v)] off the diagonal (the NTK's diagonal of tanh's
    # derivative, consistent with its neighbours: tests/test_kernel_scales.py's edge inputs)
    zp = program(lambda x: (1 - sp.tanh(x) ** 2) ** 2, 2.0)
    engine = PairwiseEngine(zp.graph, zp)
    assert engine.instantiate(engine.scalar(zp.graph.outputs["m"])).atoms(E2)


def test_a_square_however_sympy_writes_it_takes_the_rule_of_its_pair_off_the_diagonal():
    """The NTK's diagonal reads E[sigmoid'(u)^2], which sympy writes e^(-2u) (1 + e^(-u))^-4:
    computed as one quadrature of that product (accurate to 2.4e-11) while its neighbours
    read E[sigmoid'(u) sigmoid'(v)] by the bivariate rule, the NTK of two equal inputs had an
    eigenvalue of -1.7e-12 times the largest (review).  The square is found however it is
    written, and takes the pair's rule: the kernel of equal inputs is PSD to 1e-12."""
    from tpcompiler import layers
    from tpcompiler.backends.kernels.kernel import KernelFunction

    sigmoid = layers.Nonlin(lambda a: 1 / (1 + sp.exp(-a)), name="sigmoid")
    kf = KernelFunction(tp.compile(layers.serial(layers.Dense(8, 1.0, 0.0), sigmoid,
                                                 layers.Dense(1, 1.0, 0.0)).program((3,))).graph)
    from tpcompiler.ir.symbols import ARG

    derivative_squared = float((sp.exp(0.3) / (1 + sp.exp(0.3)) ** 2) ** 2)
    for gs in kf.engine.functions:  # sigmoid'^2 is neither its own function nor a split of two
        assert len(gs) == 1 or gs[0] == gs[1], gs
        assert len(gs) == 2 or abs(float(gs[0].subs(ARG, 0.3)) - derivative_squared) > 1e-6, gs
    u = np.array([1.0, -0.5, 0.3]) / np.linalg.norm([1.0, -0.5, 0.3])
    for var in (5.0, 10.5, 32.0):
        x = u * np.sqrt(3 * var)
        ntk = kf(np.vstack([x, x]))["ntk"]
        eigenvalues = np.linalg.eigvalsh(ntk)
        assert eigenvalues[0] >= -1e-12 * eigenvalues[-1], (var, eigenvalues)


def test_a_quadrature_rule_short_of_rtol_warns_also_when_read_from_its_file(monkeypatch):
    """A rule that missed rtol (probing's fallback) is stored in the module's rules file; the
    process that probed it warned, later ones read it and returned the same inaccurate values
    in silence (t tanh(20 t): 1.8e-7 relative for 1e-10)."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from tpcompiler.expectations import probing

    short = probing.Rule(kind=probing.UNIFORM, h=0.5, C=1.0, error=1e-6, evals=40.0)
    fine = probing.Rule(kind=probing.UNIFORM, h=0.1, C=1.0, error=1e-12, evals=200.0)
    module = SimpleNamespace(name="test_module")
    for rule, warns in ((short, True), (fine, False)):
        stored = {**asdict(rule), "sha256": probing._rule_digest(asdict(rule))}
        monkeypatch.setattr(probing, "_read_rules", lambda m, r=stored: _Everywhere(r))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert probing.select_rule(module, "pair", 1e-10, 9.0, None, False, None) == rule
        assert any("did not reach rtol=1e-10" in str(w.message) for w in caught) == warns


def test_a_damaged_rules_file_entry_is_probed_again(monkeypatch):
    """A rules-file entry is read back without probing: one whose fields no longer match its
    checksum (a flipped bit: C 2.0 read as 6.0 made kernels 0.5% off in silence), or that has
    none (an older file), is probed again."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from tpcompiler.expectations import probing

    rule = probing.Rule(kind=probing.UNIFORM, h=0.1, C=2.0, error=1e-12, evals=200.0)
    fresh = probing.Rule(kind=probing.UNIFORM, h=0.1, C=2.0, error=2e-12, evals=210.0)
    probed = []
    monkeypatch.setattr(probing, "probe", lambda *args: probed.append(1) or fresh)
    monkeypatch.setattr(probing, "_write_rule", lambda *args: None)
    module = SimpleNamespace(name="test_module")
    good = {**asdict(rule), "sha256": probing._rule_digest(asdict(rule))}
    for entry, expected in ((good, rule), ({**good, "C": 6.0}, fresh), (asdict(rule), fresh)):
        monkeypatch.setattr(probing, "_read_rules", lambda m, e=entry: _Everywhere(e))
        assert probing.select_rule(module, "pair", 1e-10, 9.0, None, False, None) == expected
    assert len(probed) == 2


class _Everywhere(dict):
    """A rules file that has one rule under every key."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def get(self, key, default=None):
        return self.rule


@pytest.mark.parametrize("var", [1.0, 2.0, 0.0])
def test_the_readouts_variance_scales_the_nngp_and_not_its_ntk_weight(var):
    """f = sigma/sqrt(n) v . h, v ~ N(0, var), h = U xi / sqrt(d): by hand, NNGP = var sigma^2
    xi.xi'/d and NTK = sigma^2 xi.xi'/d (v's entries, weight 1) + var sigma^2 xi.xi'/d (U,
    through dh = sigma v).  The NNGP ignored var, and the readout's NTK term was weighted by
    var (0 for word2vec's zero readout, which trains)."""
    p = tp.Program("readout_var")
    xi = p.input("xi", 3)
    h = p.input_matrix("U", 3).apply(xi, name="h")
    p.readout(h, sigma=1.5, var=var)
    X = np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.4], [0.0, 0.3, 2.0]])
    K = tp.compile(p).kernels(X)
    gram = X @ X.T / 3
    np.testing.assert_allclose(K["nngp"], var * 2.25 * gram, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(K["ntk"], (1 + var) * 2.25 * gram, rtol=1e-14, atol=1e-15)


def test_an_unusable_cache_is_an_error_not_another_method(tmp_path, monkeypatch):
    """With TPCOMPILER_CACHE_DIR unusable for the quadratures' generated code (a read-only
    mount; here a file where their folder goes), tpc limit's auto method returned particle
    estimates in silence: the cache error became the kernel backend's NotPairwise."""
    from tpcompiler.backends import codegen

    (tmp_path / "gaussian2").write_text("not a folder")
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path))
    from tpcompiler.expectations import builders

    # (rules and modules an earlier test built in this process would not open the cache)
    monkeypatch.setattr(codegen, "_MODULES", {})
    monkeypatch.setattr(builders, "_OBJECTS", {})
    p = tp.Program("unusable_cache")
    u = p.vec("u")
    h = (p.mat("W", sigma=1.3) @ u).named("h")
    p.output("m", tp.mean(tp.nonlin(lambda t: sp.tanh(0.8125 * t) ** 2 + t / 7, h)))  # (a function no other test builds)
    with pytest.raises(tp.ProgramError, match=r"TPCOMPILER_CACHE_DIR=.*cannot use .*gaussian2.* as the cache"):
        tp.compile(p).limit()
