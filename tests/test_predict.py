"""tpcompiler.predict and `tpc predict` (docs/DESIGN.md 2.3, 2.6): NNGP posterior and NTK
ensemble predictions, checked against

* neural-tangents' ``gradient_descent_mse_ensemble`` on the same kernel matrices
  (tests/data/nt_predict_reference.*, generated once by tests/data/make_nt_predict_reference.py),
* step-by-step kernel gradient descent (``tp.train`` in the kernel regime, NTP),
* closed forms: a rank-one (singular) kernel, t = 0, duplicated training inputs.
"""
import json
import weakref
from pathlib import Path

import numpy as np
import scipy.linalg
import pytest

import tpcompiler as tp
from tpcompiler import predict as P
from tpcompiler.validation import ArgumentError
from tpcompiler.cli.commands import main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
MLP = ROOT / "programs" / "mlp.py"
REF = np.load(DATA / "nt_predict_reference.npz")
META = json.loads((DATA / "nt_predict_reference.json").read_text())
KINDS = ("nngp", "ntk")


def nt_kernels(net):
    """neural-tangents' kernel blocks of a reference network: {kind: {train, test_train, test}}."""
    return {g: {b: REF[f"{net}__{g}_{b}"] for b in ("train", "test_train", "test")} for g in KINDS}


def by_block(kernels, block):
    return {g: kernels[g][block] for g in KINDS}


def assert_close(actual, expected, rtol):
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, (np.abs(actual - expected).max(), scale)


def nt_cases():
    """The reference cases on test inputs (the train-set ones, x_test None, are
    gradient_descent_mse_ensemble's alone)."""
    for name, case in META["cases"].items():
        if case["x_test"] is None:
            continue
        for i, t in enumerate(case["t"] or [None]):
            yield pytest.param(name, case, i, t, id=f"{name}-t{t}")


@pytest.mark.parametrize("name,case,i,t", nt_cases())
def test_matches_neural_tangents(name, case, i, t):
    """Both means and covariances, at infinite time (Cholesky) and finite times
    (eigendecomposition), with learning rates, regularizers and K = 2 outputs."""
    k = nt_kernels(case["net"])
    out = P.predict(by_block(k, "train"), by_block(k, "test_train"), REF["y_train"], by_block(k, "test"),
                    t=t, lr=case["learning_rate"], reg=case["diag_reg"])
    for g in KINDS:
        mean, cov = REF[f"{name}__{g}_mean"], REF[f"{name}__{g}_cov"]
        if case["t"] is not None:
            mean, cov = mean[i], cov[i]
        assert out[g].mean.shape == mean.shape == (5, 2)
        assert_close(out[g].mean, mean, 1e-12)
        assert_close(out[g].cov, cov, 1e-12)
        assert np.isfinite(out[g].condition) and out[g].condition > 1


@pytest.fixture(scope="module")
def erf_net():
    """programs/mlp.py as reference network erf1 (depth 1, erf, w_std 1, no bias)."""
    return tp.compile(tp.load(MLP, depth=1, phi="erf", w_std=1.0, d=4))


def test_program_end_to_end_matches_neural_tangents(erf_net):
    """Kernels from the program, predictions from them: neural-tangents' numbers at t = 1, lr = 2."""
    out = P.predict_program(erf_net, REF["x_train"], REF["y_train"], REF["x_test"], t=1.0, lr=2.0)
    for g in KINDS:
        assert_close(out[g].mean, REF[f"erf1_t__{g}_mean"][0], 1e-12)
        assert_close(out[g].cov, REF[f"erf1_t__{g}_cov"][0], 1e-12)
    mean_only = P.predict_program(erf_net, REF["x_train"], REF["y_train"], REF["x_test"], t=1.0, lr=2.0, cov=False)
    assert mean_only["ntk"].cov is None
    np.testing.assert_allclose(mean_only["ntk"].mean, out["ntk"].mean, rtol=1e-13, atol=1e-15)


def test_gradient_flow_is_the_limit_of_tp_train(erf_net):
    """tp.train (NTP, kernel regime) runs discrete kernel gradient descent, f_{k+1} = f_k -
    (eta/N) Theta (f_k - Y), whose mean after T steps approaches the flow at t = T with
    learning rate eta as eta -> 0 at fixed T * eta, with an error linear in eta: halving eta
    halves it, and the Richardson combination 2 f(eta/2) - f(eta) is second order."""
    X, Xt, y = REF["x_train"], REF["x_test"], REF["y_train"][:, 0]
    abc = tp.named("ntp", 1)
    flow_time = 60.0  # T * eta
    means = []
    for eta in (0.04, 0.02):
        steps = int(round(flow_time / eta))
        trained = tp.train(erf_net.source, abc, tp.SGD(X, y, steps=steps, lr=eta, X_eval=Xt))
        means.append(trained.f_eval[-1])
    flow = P.predict_program(erf_net, X, y, Xt, t=flow_time, lr=1.0, cov=False)["ntk"].mean
    err = [np.abs(m - flow).max() for m in means]
    assert 1.8 < err[0] / err[1] < 2.2, err
    assert err[0] > 1e-5  # the check has teeth: first-order error visible at eta = 0.04
    assert np.abs(2 * means[1] - means[0] - flow).max() < err[1] / 20


def _rank_one(x_train, x_test):
    """The linear kernel of one-dimensional inputs: K = x x^T, singular for N > 1."""
    return np.outer(x_train, x_train), np.outer(x_test, x_train), np.outer(x_test, x_test)


@pytest.mark.parametrize("t", [0.0, 0.7, 25.0, np.inf])
def test_singular_kernel_closed_form(t):
    """K = x x^T has one eigenvalue |x|^2 and N - 1 zeros: the prediction is
    x_* (1 - exp(-|x|^2 s)) / |x|^2 x^T y with s = t lr / N (at t = inf: x_* x^T y / |x|^2, the
    minimum-norm interpolant), and the NNGP covariance x_* x_*^T exp(-2 |x|^2 s); never NaN."""
    x, xt = np.array([1.0, -2.0, 0.5, 3.0]), np.array([0.3, -1.1])
    y = np.array([0.2, -1.0, 0.7, 2.0])
    K, Ktx, Ktt = _rank_one(x, xt)
    lr, n2 = 0.5, x @ x
    s = t * lr / len(x)
    decay = 0.0 if t == np.inf else np.exp(-n2 * s)
    g = P.nngp_ensemble(K, Ktx, y, Ktt, t=t, lr=lr)
    np.testing.assert_allclose(g.mean, xt * (1 - decay) * (x @ y) / n2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g.cov, np.outer(xt, xt) * decay**2, rtol=1e-12, atol=1e-12)
    assert g.condition == np.inf
    if t == np.inf:
        assert "pseudo-inverse" in g.method and "3 eigenvalues" in g.method


def test_duplicated_training_inputs_at_infinite_time():
    """Every row duplicated (an exactly singular kernel, no regularizer): gradient flow still
    reaches the interpolant of the distinct inputs -- the same mean and covariances."""
    k = nt_kernels("relu2")
    idx = np.repeat(np.arange(12), 2)
    dup = {g: {"train": k[g]["train"][np.ix_(idx, idx)], "test_train": k[g]["test_train"][:, idx],
               "test": k[g]["test"]} for g in KINDS}
    y = REF["y_train"]
    once = P.predict(by_block(k, "train"), by_block(k, "test_train"), y, by_block(k, "test"))
    twice = P.predict(by_block(dup, "train"), by_block(dup, "test_train"), y[idx], by_block(dup, "test"))
    for g in KINDS:
        assert "pseudo-inverse" in twice[g].method
        assert_close(twice[g].mean, once[g].mean, 1e-9)
        assert_close(twice[g].cov, once[g].cov, 1e-9)


@pytest.mark.parametrize("t", [30.0, 1e8, 1e16, 1e300])
def test_duplicated_training_inputs_at_finite_times(t):
    """Every row and target duplicated: the flow of f on the distinct inputs is the same at
    every time (twice the eigenvalues, half the scaled time s = t lr / N).  The null
    directions of the duplicated kernel multiplied rounding by g = s (at t = 1e300 the NTK
    covariance overflowed and was refused as "kernels too large for float64"); they are
    now dropped at every time, as at t = inf."""
    k = nt_kernels("relu2")
    idx = np.repeat(np.arange(12), 2)
    dup = {g: {"train": k[g]["train"][np.ix_(idx, idx)], "test_train": k[g]["test_train"][:, idx],
               "test": k[g]["test"]} for g in KINDS}
    y = REF["y_train"]
    once = P.predict(by_block(k, "train"), by_block(k, "test_train"), y, by_block(k, "test"), t=t)
    twice = P.predict(by_block(dup, "train"), by_block(dup, "test_train"), y[idx], by_block(dup, "test"), t=t)
    for g in KINDS:
        assert "eigenvalues below N eps lambda_max dropped" in twice[g].method
        assert_close(twice[g].mean, once[g].mean, 1e-9)
        assert_close(twice[g].cov, once[g].cov, 1e-9)


def test_conflicting_duplicates_tend_to_the_infinite_time_prediction():
    """A training input twice with different targets (an exactly singular kernel, reg = 0):
    gradient flow fits their mean, and the predictions at t = 1e16 and 1e300 are the t = inf
    one (the minimum-norm interpolant), not rounding times s (the means were off by 4e-5 at
    t = 1e12, by 34% (NNGP) and 43% (NTK) at 1e16, and refused at 1e300)."""
    k = nt_kernels("relu2")
    idx = np.array([0, 1, 2, 3, 4, 5, 1])
    y = REF["y_train"][idx].copy()
    y[-1] = -y[1] + 1.0
    blocks = {g: {"train": k[g]["train"][np.ix_(idx, idx)], "test_train": k[g]["test_train"][:, idx],
                  "test": k[g]["test"]} for g in KINDS}
    end = P.predict(by_block(blocks, "train"), by_block(blocks, "test_train"), y, by_block(blocks, "test"))
    for t in (1e16, 1e300):
        late = P.predict(by_block(blocks, "train"), by_block(blocks, "test_train"), y, by_block(blocks, "test"), t=t)
        for g in KINDS:
            assert_close(late[g].mean, end[g].mean, 1e-9)
            assert_close(late[g].cov, end[g].cov, 1e-9)


def test_time_zero_and_late_times():
    """t = 0: the prior (mean 0, covariance K_**); a very late time: the t = inf prediction."""
    k = nt_kernels("relu2")
    args = (by_block(k, "train"), by_block(k, "test_train"), REF["y_train"], by_block(k, "test"))
    start = P.predict(*args, t=0.0)
    late = P.predict(*args, t=1e9)
    end = P.predict(*args)
    for g in KINDS:
        assert np.all(start[g].mean == 0)
        np.testing.assert_allclose(start[g].cov, k["nngp"]["test"], rtol=1e-14)
        assert_close(late[g].mean, end[g].mean, 1e-8)
        assert_close(late[g].cov, end[g].cov, 1e-8)


def test_times_where_lambda_s_overflows_give_the_gradient_flow_closed_form():
    """g_s(lambda) = (1 - exp(-lambda s)) / lambda, written independently with expm1, on a kernel
    with lambda_max 2e4 at t = 1e306 (lambda s = 1e309 overflows float64): the largest
    directions were dropped (g = 0), and the NNGP covariance's g_{2s} with them, silently."""
    rng = np.random.default_rng(7)
    Q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    lam = np.geomspace(1e-2, 2e4, 20)
    k_train = (Q * lam) @ Q.T
    k_test_train = rng.normal(size=(3, 20))
    y = rng.normal(size=(20, 1))
    for t in (1e300, 1e306, 1e308):
        s = t / 20  # lr 1, N 20, K 1 (neural-tangents' normalisation)
        with np.errstate(over="ignore"):
            g = -np.expm1(-lam * s) / lam
        expected = k_test_train @ (Q @ (g[:, None] * (Q.T @ y)))
        got = P.gradient_descent_mean(k_train, k_test_train, y, t=t)
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=0)


def test_gp_posterior_and_regularizer_scale():
    """reg is relative to the mean of the training kernel's diagonal: gp_posterior with reg r
    is the textbook posterior with noise variance r * mean(diag K)."""
    k = nt_kernels("erf1")["nngp"]
    K, Ktx, Ktt, y = k["train"], k["test_train"], k["test"], REF["y_train"]
    noise = 0.1 * np.trace(K) / len(K)
    A = np.linalg.solve(K + noise * np.eye(len(K)), np.c_[y, Ktx.T])
    g = P.gp_posterior(K, Ktx, y, Ktt, reg=0.1)
    np.testing.assert_allclose(g.mean, Ktx @ A[:, :2], rtol=1e-12)
    np.testing.assert_allclose(g.cov, Ktt - Ktx @ A[:, 2:], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(P.gradient_descent_mean(K, Ktx, y, reg=0.1), g.mean, rtol=1e-13)


def test_shared_projections_belong_to_their_decomposition():
    """Inside ``shared_decompositions`` a test block's projection is kept per decomposition: one
    test block object read under two training kernels (the NNGP's and the NTK's), and fresh
    training kernels one after another (whose eigenvectors may take a freed one's address),
    give what each call gives alone.  Keyed by the block alone, the first case put the NTK
    covariance off by ~5; keyed by the eigenvectors' address without holding them, the second
    was off by ~2 (a review's repro)."""
    rng = np.random.default_rng(5)

    def kernel(seed, n=30):
        A = np.random.default_rng(seed).standard_normal((n, n))
        K = A @ A.T / n + 0.1 * np.eye(n)
        K[0, 1] += 1e-15  # (rounding-size asymmetry: symmetrized into a new array, as computed kernels are)
        return K

    K1, K2 = kernel(1), kernel(2)
    Ktx, Ktt, y = rng.standard_normal((4, 30)), np.eye(4), rng.standard_normal((30, 2))
    args = ({"nngp": K1, "ntk": K2}, {"nngp": Ktx, "ntk": Ktx}, y, {"nngp": Ktt})
    alone = P.predict(*args, t=2.0)
    with P.shared_decompositions():
        shared = P.predict(*args, t=2.0)
    for g in KINDS:
        np.testing.assert_array_equal(shared[g].mean, alone[g].mean)
        np.testing.assert_array_equal(shared[g].cov, alone[g].cov)
    reference = [P.nngp_ensemble(kernel(s), Ktx, y, t=3.0, reg=0.1).mean for s in range(30)]
    with P.shared_decompositions():
        got = [P.nngp_ensemble(kernel(s), Ktx, y, t=3.0, reg=0.1).mean for s in range(30)]
        np.testing.assert_array_equal(np.array(got), np.array(reference))
        # (whether an address is reused above depends on the allocator; what rules it out is
        # that an entry holds the objects it is keyed by)
        V = np.ones(2)
        alive = weakref.ref(V)
        P._once_per_array("test", Ktx, lambda: None, held=(V,))
        del V
        assert alive() is not None
    assert alive() is None  # (let go with the block)


def test_a_training_kernel_that_is_not_semidefinite_is_refused():
    """[[1, 2], [2, 1]] has the eigenvalue -1 beside 3: no covariance.  Its pseudo-inverse
    dropped the -1 as if it were rounding and returned a prediction (a QA finding); it is now
    refused, naming the kernel, at every time and on every path.  A kernel whose negative
    eigenvalue is rounding (1e-12 of the largest) is still inverted, as before."""
    bad = np.array([[1.0, 2.0], [2.0, 1.0]])
    Ktx, y = np.ones((1, 2)), np.ones(2)
    calls = [
        (lambda: P.gp_posterior(bad, Ktx, y), "k_train"),
        (lambda: P.nngp_ensemble(bad, Ktx, y, t=3.0), "k_train"),
        (lambda: P.ntk_ensemble(bad, Ktx, y), "ntk_train"),
        (lambda: P.predict({"nngp": bad, "ntk": bad}, {"nngp": Ktx, "ntk": Ktx}, y, get="ntk"), "ntk_train"),
    ]
    for call, name in calls:
        with pytest.raises(tp.ProgramError, match=f"{name}: is not positive semidefinite .* eigenvalue -1, its largest is 3"):
            call()
    Kern = __import__("collections").namedtuple("Kern", "nngp ntk")
    fn = P.gradient_descent_mse_ensemble(lambda a, b, get: Kern(bad, bad), np.zeros((2, 1)), y)
    with pytest.raises(tp.ProgramError, match="nngp_train: is not positive semidefinite"):
        fn(t=None, get="nngp")
    # within rounding: eigenvalues 1 and -1e-12 (a duplicated input's kernel, computed)
    Q = np.array([[0.6, -0.8], [0.8, 0.6]])
    near = Q @ np.diag([-1e-12, 1.0]) @ Q.T
    near = (near + near.T) / 2
    assert np.isfinite(P.gp_posterior(near, Ktx, y).mean).all()
    assert "dropped" in P.nngp_ensemble(near, Ktx, y, t=3.0).method


def test_kernel_checks_read_every_block_and_copy_only_what_they_change(monkeypatch):
    """The symmetry check compares K with K^T a few rows at a time (3 rows of 20 here): an
    asymmetry in any block is refused with its size; a slightly asymmetric kernel becomes
    exactly (K + K^T) / 2 in a new array; an exactly symmetric one is read in place, read-only;
    the ridge is K + reg mean(diag K) I, and K itself at reg 0."""
    monkeypatch.setattr(P, "_BLOCK_ENTRIES", 64)
    rng = np.random.default_rng(3)
    A = rng.standard_normal((20, 20))
    K = A @ A.T
    K = (K + K.T) / 2
    same = P._checked_kernel_matrix(K, "k")
    assert np.shares_memory(same, K) and not same.flags.writeable and np.array_equal(same, K)
    top = float(np.abs(K).max())
    for i, j in [(19, 2), (0, 19), (10, 11), (3, 4), (19, 18), (17, 17 - 2)]:
        bad = K.copy()
        bad[i, j] += 1e-3 * top
        with pytest.raises(tp.ProgramError, match=f"largest .K - K.T. = {1e-3 * top:.3g}"):
            P._checked_kernel_matrix(bad, "k")
        slightly = K.copy()
        slightly[i, j] += 1e-12 * top
        got = P._checked_kernel_matrix(slightly, "k")
        np.testing.assert_array_equal(got, (slightly + slightly.T) / 2)
        assert got.flags.writeable and not np.shares_memory(got, slightly)
    np.testing.assert_array_equal(P.regularized(K, 0.1), K + 0.1 * (np.trace(K) / 20) * np.eye(20))
    assert P.regularized(K, 0.0) is K


@pytest.mark.parametrize("call,words", [
    (lambda K, T, y: P.nngp_ensemble(K + np.triu(K, 1), T, y), ["k_train", "not symmetric"]),
    (lambda K, T, y: P.nngp_ensemble(K, T, y[:5]), ["y", "5 rows", "12 x 12"]),
    (lambda K, T, y: P.nngp_ensemble(K, T[:, :3], y), ["k_test_train", "(N_test, 12)", "(5, 3)"]),
    (lambda K, T, y: P.nngp_ensemble(K, T, y, t=-1.0), ["t", "non-negative"]),
    (lambda K, T, y: P.nngp_ensemble(K, T, y, t=np.nan), ["t", "non-negative"]),
    (lambda K, T, y: P.nngp_ensemble(K, T, y, t=1.0, lr=0.0), ["lr", "positive"]),
    (lambda K, T, y: P.nngp_ensemble(K, T, y, reg=-1e-3), ["reg", "non-negative"]),
    (lambda K, T, y: P.nngp_ensemble(K * np.nan, T, y), ["k_train", "NaN"]),
    (lambda K, T, y: P.ntk_ensemble(K, T, y, nngp_train=K), ["nngp_test_train", "all three"]),
    (lambda K, T, y: P.predict({"nngp": K}, {"nngp": T, "ntk": T}, y), ["train", "'ntk'"]),
    (lambda K, T, y: P.predict({"ntk": K}, {"ntk": T}, y, {"nngp": K}, get="ntk"),
     ["train", "'nngp'", "covariance reads the NNGP", "test=None"]),
    (lambda K, T, y: P.predict({"nngp": K}, {"nngp": T}, y, get="gp"), ["get", "'nngp', 'ntk' or both", "'gp'"]),
])
def test_bad_input_names_the_argument(call, words):
    k = nt_kernels("relu2")["ntk"]
    with pytest.raises(tp.ProgramError) as info:
        call(k["train"], k["test_train"], REF["y_train"])
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# ---------------------------------------------------------------------------------------
# get: the asked predictions alone (neural-tangents' predict_fn(get=...))
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("get, asked", [("nngp", ["nngp"]), ("ntk", ["ntk"]), (("ntk", "nngp"), ["nngp", "ntk"]),
                                        ("NTK, nngp", ["nngp", "ntk"])])
def test_get_makes_the_asked_predictions_from_the_kernels_they_read(get, asked):
    """Each asked prediction is that of both, computed alike (equal to the bit), in KERNELS'
    order, from dictionaries holding only the kernels it reads: the NNGP's its own, the NTK
    mean (no test) its own, the NTK covariance both."""
    k = nt_kernels("erf1")
    for test in ("test", None):
        both = P.predict(by_block(k, "train"), by_block(k, "test_train"), REF["y_train"],
                         by_block(k, "test") if test else None, t=1.0, lr=2.0)
        reads = [g for g in KINDS if g in asked or (g == "nngp" and test)]
        blocks = {b: {g: k[g][b] for g in reads} for b in ("train", "test_train", "test")}
        out = P.predict(blocks["train"], blocks["test_train"], REF["y_train"], blocks["test"] if test else None,
                        t=1.0, lr=2.0, get=get)
        assert list(out) == asked
        for g in asked:
            np.testing.assert_array_equal(out[g].mean, both[g].mean)
            assert (out[g].cov is None) == (test is None)
            if test:
                np.testing.assert_array_equal(out[g].cov, both[g].cov)
            assert (out[g].condition, out[g].method) == (both[g].condition, both[g].method)


@pytest.fixture
def computed(monkeypatch):
    """[(the Compiled, the keys of the kernels it computed)] of every Compiled.kernels call
    during the test."""
    calls = []
    kernels = tp.Compiled.kernels

    def spy(self, *args, **kwargs):
        result = kernels(self, *args, **kwargs)
        calls.append((self, sorted(result)))
        return result

    monkeypatch.setattr(tp.Compiled, "kernels", spy)
    return calls


@pytest.mark.parametrize("get, cov, derived", [
    ("nngp", True, ("nngp",)), ("nngp", False, ("nngp",)),
    ("ntk", False, ("ntk",)),           # the NTK mean reads the NTK alone
    ("ntk", True, ("nngp", "ntk")),     # its covariance reads the NNGP too
])
def test_predict_program_derives_and_computes_only_the_kernels_read(erf_net, computed, get, cov, derived):
    """A program is compiled for the kernels the asked prediction reads, and only those are
    computed; the prediction is that of both kernels (to rounding: the generated code of one
    kernel adds in another order)."""
    args = (REF["x_train"], REF["y_train"], REF["x_test"])
    both = P.predict_program(erf_net, *args, t=1.0, lr=2.0, cov=cov)
    computed.clear()
    out = P.predict_program(tp.load(MLP, depth=1, phi="erf", w_std=1.0, d=4), *args, t=1.0, lr=2.0, cov=cov, get=get)
    assert list(out) == [get]
    [(compiled, keys)] = computed
    assert compiled.kernel_names == derived
    assert keys == sorted(derived if cov else derived + tuple(f"{g}_x2" for g in derived))
    assert_close(out[get].mean, both[get].mean, 1e-13)
    if cov:
        assert_close(out[get].cov, both[get].cov, 1e-13)


def test_a_program_compiled_for_the_nngp_alone_makes_the_nngp_prediction(erf_net):
    """tp.compile(program, get="nngp") derives no NTK: its NNGP prediction is made, and asking
    for the NTK's (get "ntk", or None: both) is one error naming get."""
    args = (REF["x_train"], REF["y_train"], REF["x_test"])
    alone = tp.compile(erf_net.source, get="nngp")
    out = P.predict_program(alone, *args, get="nngp")
    assert list(out) == ["nngp"]
    assert_close(out["nngp"].mean, P.predict_program(erf_net, *args)["nngp"].mean, 1e-13)
    for get in ("ntk", None):
        with pytest.raises(tp.ProgramError, match=r"^get: program 'mlp' was compiled for the NNGP alone .* compile it "
                                                   r"without get for the NTK, or ask get='nngp'$"):
            P.predict_program(alone, *args, get=get)


# ---------------------------------------------------------------------------------------
# gradient_descent_mse_ensemble: neural-tangents' predict_fn, called as it is
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layer_kernel_fns():
    """The reference networks as tp.layers (stax's lines of make_nt_predict_reference.py):
    {net: net.kernel_fn((4,))}."""
    from tpcompiler.layers import Dense, Erf, Relu, serial

    def net(depth, phi, w_std, b_std):
        act = {"relu": Relu, "erf": Erf}[phi]
        layers = []
        for _ in range(depth):
            layers += [Dense(512, w_std, b_std), act()]
        return serial(*layers, Dense(1, w_std, b_std))

    return {name: net(**spec).kernel_fn((4,)) for name, spec in META["nets"].items()}


@pytest.mark.parametrize("name", list(META["cases"]))
def test_gradient_descent_mse_ensemble_matches_neural_tangents_end_to_end(layer_kernel_fns, name):
    """neural-tangents' own script line, predict_fn(t, x_test, ("nngp", "ntk"), compute_cov=True),
    on tp.layers kernels: its stored means and covariances (times as a leading axis), to rounding;
    also on the training inputs (x_test None), whose regularizer neural-tangents treats as part of
    the training kernel."""
    case = META["cases"][name]
    predict_fn = P.gradient_descent_mse_ensemble(layer_kernel_fns[case["net"]], REF["x_train"], REF["y_train"],
                                                 learning_rate=case["learning_rate"], diag_reg=case["diag_reg"])
    out = predict_fn(None if case["t"] is None else np.array(case["t"]),
                     None if case["x_test"] is None else REF["x_test"], ("nngp", "ntk"), compute_cov=True)
    assert out._fields == ("nngp", "ntk")
    for g in KINDS:
        mean, covariance = getattr(out, g)   # unpacks as neural-tangents' Gaussian
        assert mean.shape == tuple(case["shapes"]["mean"]) and covariance.shape == tuple(case["shapes"]["cov"])
        assert_close(mean, REF[f"{name}__{g}_mean"], 1e-12)
        assert_close(covariance, REF[f"{name}__{g}_cov"], 1e-12)
        assert getattr(out, g).covariance is covariance


def test_predict_fn_returns_as_neural_tangents_and_computes_only_what_it_reads(layer_kernel_fns):
    """A string get: that mean alone (a Gaussian with compute_cov); x_test None: the training
    inputs, which the t = inf mean interpolates (Y itself); the kernel_fn is asked only for the
    kernels the prediction reads, and for the training kernels once."""
    asked = []
    x_train = REF["x_train"]  # (each read of the .npz makes a new array)

    def kernel_fn(x1, x2=None, get=None):
        asked.append(("train" if x1 is x_train and x2 is None else "other", tuple(get)))
        return layer_kernel_fns["relu2"](x1, x2, get)

    predict_fn = P.gradient_descent_mse_ensemble(kernel_fn, x_train, REF["y_train"])
    mean = predict_fn(x_test=REF["x_test"], get="nngp")
    assert isinstance(mean, np.ndarray) and mean.shape == (5, 2)
    assert asked == [("train", ("nngp",)), ("other", ("nngp",))]
    asked.clear()
    ntk_mean = predict_fn(x_test=REF["x_test"], get="ntk")          # the NTK mean reads the NTK alone
    assert asked == [("train", ("ntk",)), ("other", ("ntk",))]
    asked.clear()
    gaussian = predict_fn(x_test=REF["x_test"], get="ntk", compute_cov=True)  # its covariance the NNGP too
    assert asked == [("other", ("nngp", "ntk")), ("other", ("nngp",))]   # the training kernels are kept
    np.testing.assert_array_equal(gaussian.mean, ntk_mean)
    both = P.predict_program(tp.load(MLP, depth=2, phi="relu", w_std=1.5, b_std=0.1, d=4), REF["x_train"],
                             REF["y_train"], REF["x_test"])
    assert_close(mean, both["nngp"].mean, 1e-12)
    assert_close(gaussian.covariance, both["ntk"].cov, 1e-12)
    at_train = predict_fn(get=("ntk", "nngp"), compute_cov=True)   # neural-tangents: N(Y, 0) at t = inf
    assert at_train._fields == ("ntk", "nngp")
    for g in KINDS:
        np.testing.assert_array_equal(getattr(at_train, g)[0], REF["y_train"])
        np.testing.assert_array_equal(getattr(at_train, g)[1], np.zeros((12, 12)))
        assert len(getattr(at_train, g)) == 2
    # a 0-d array and a 2-D array of times: no time axis, and the array's shape in front
    one = predict_fn(np.array(3.0), REF["x_test"], "ntk")
    grid = predict_fn(np.array([[3.0], [30.0]]), REF["x_test"], "ntk")
    assert one.shape == (5, 2) and grid.shape == (2, 1, 5, 2)
    np.testing.assert_array_equal(grid[0, 0], one)
    assert_close(grid[1, 0], predict_fn(30.0, REF["x_test"], "ntk"), 1e-15)


@pytest.mark.parametrize("x_test", ["test", None])
def test_predict_fn_decomposes_each_training_kernel_once_for_all_times(layer_kernel_fns, monkeypatch, x_test):
    """An array of times, with covariances (each NNGP time reads g_s and g_2s): one
    eigendecomposition per training kernel for the whole call, as neural-tangents keeps one
    (each time decomposed it again: 30 times of both kernels at N = 800 took 14.8 s, now 1.9 s),
    each kernel matrix checked once (as for one time), and every time's prediction bit for bit
    the one of that time alone; a new call decomposes again (nothing is kept between calls).
    Each test block is projected onto its training kernel's eigenvectors once for all the
    times too (two N x N by N x N_test products per time and kernel, most of a call at N = 4000)."""
    x_test = REF["x_test"] if x_test else None
    predict_fn = P.gradient_descent_mse_ensemble(layer_kernel_fns["relu2"], REF["x_train"], REF["y_train"],
                                                 diag_reg=1e-2)
    times = np.array([0.5, 3.0, 30.0, 300.0])
    alone = [predict_fn(t, x_test, ("nngp", "ntk"), compute_cov=True) for t in times]
    decomposed, checked = [], []
    eigh, check = scipy.linalg.eigh, P._checked_kernel_matrix
    monkeypatch.setattr(scipy.linalg, "eigh", lambda a, **kw: decomposed.append(a.shape) or eigh(a, **kw))
    monkeypatch.setattr(P, "_checked_kernel_matrix", lambda k, name: checked.append(name) or check(k, name))
    projected, once = [], P._once_per_array

    def counted(what, array, make, *extra, **held):
        return once(what, array, (lambda: projected.append(array.shape) or make()) if what == "projected" else make,
                    *extra, **held)

    monkeypatch.setattr(P, "_once_per_array", counted)
    predict_fn(times[:1], x_test, ("nngp", "ntk"), compute_cov=True)
    decomposed.clear()
    checked_at_one_time = list(checked)
    checked.clear()
    projected.clear()
    together = predict_fn(times, x_test, ("nngp", "ntk"), compute_cov=True)
    assert decomposed == [(12, 12)] * 2          # the NNGP's and the NTK's training kernels
    assert len(projected) == 2                   # a test block per kernel, for all the times
    assert sorted(checked) == sorted(checked_at_one_time)  # each kernel matrix checked once, not per time
    for k, one in enumerate(alone):
        for g in KINDS:
            np.testing.assert_array_equal(getattr(together, g).mean[k], getattr(one, g).mean)
            np.testing.assert_array_equal(getattr(together, g).covariance[k], getattr(one, g).covariance)
    predict_fn(times[:1], x_test, "ntk")
    assert len(decomposed) == 3


@pytest.mark.parametrize("call, words", [
    (lambda fn: P.gradient_descent_mse_ensemble(np.eye(3), REF["x_train"], REF["y_train"]), ["kernel_fn", "ndarray"]),
    (lambda fn: P.gradient_descent_mse_ensemble(fn, REF["x_train"], REF["y_train"])(t=np.ones((0, 2))),
     ["t:", "empty array", "(0, 2)"]),
    (lambda fn: P.gradient_descent_mse_ensemble(fn, REF["x_train"], REF["y_train"], learning_rate=-1.0),
     ["learning_rate", "positive", "-1"]),
    (lambda fn: P.gradient_descent_mse_ensemble(fn, REF["x_train"], REF["y_train"], diag_reg=-0.1),
     ["diag_reg", "non-negative", "-0.1"]),
    (lambda fn: P.gradient_descent_mse_ensemble(fn, REF["x_train"], REF["y_train"][:5]),
     ["y_train", "5 rows", "12 inputs"]),
    (lambda fn: P.gradient_descent_mse_ensemble(fn, REF["x_train"], REF["y_train"])(get="gp"), ["get", "'gp'"]),
    (lambda fn: P.gradient_descent_mse_ensemble(fn, REF["x_train"], REF["y_train"])(t=-1.0, get="nngp"), ["t"]),
    (lambda fn: P.gradient_descent_mse_ensemble(fn, REF["x_train"], REF["y_train"])(t=1j, get="nngp"),
     ["t:", "complex", "1j"]),
    (lambda fn: P.gradient_descent_mse_ensemble(fn, REF["x_train"], REF["y_train"])(t=[1j, 2.0], get="nngp"),
     ["t:", "real numbers", "1j"]),
    (lambda fn: P.gradient_descent_mse_ensemble(fn, REF["x_train"], REF["y_train"])(t=[None, 1.0], get="nngp"),
     ["t:", "real numbers", "np.inf for the end of training", "None"]),
    (lambda fn: P.gradient_descent_mse_ensemble(fn, REF["x_train"], REF["y_train"])(
        x_test=np.zeros((0, REF["x_train"].shape[1])), get="nngp"), ["x_test:", "empty"]),
    (lambda fn: P.gradient_descent_mse_ensemble(fn, REF["x_train"][:0], REF["y_train"][:0]), ["x_train:", "empty"]),
    (lambda fn: fn(REF["x_train"], REF["x_train"][:0], "nngp"), ["x2:", "empty"]),
    (lambda fn: fn(REF["x_train"][:, :1], REF["x_train"], "nngp"), ["x1:", "shape"]),
])
def test_predict_fn_bad_input_names_the_argument(layer_kernel_fns, call, words):
    with pytest.raises(tp.ProgramError) as info:
        call(layer_kernel_fns["relu2"])
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# ---------------------------------------------------------------------------------------
# tpc predict
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict_cli")
    arrays = {"x": REF["x_train"], "y": REF["y_train"], "y1": REF["y_train"][:, 0], "xt": REF["x_test"],
              "xt3": REF["x_test"][:, :3], "y5": REF["y_train"][:5], "xt0": REF["x_test"][:0],
              "y0": REF["y_train"][:, :0]}
    for name, arr in arrays.items():
        np.save(d / f"{name}.npy", arr)
    return d


def tpc(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def predict_argv(d, *extra, y="y", xt="xt"):
    return ["predict", MLP, "-p", "depth=1", "-p", "phi=erf", "--x", d / "x.npy", "--y", d / f"{y}.npy",
            "--xt", d / f"{xt}.npy", *extra]


def test_cli_writes_the_four_arrays(capsys, files, erf_net):
    out = files / "p.npz"
    rc, stdout, err = tpc(capsys, *predict_argv(files, "--time", 1, "--lr", 2, "--out", out))
    assert rc == 0, err
    assert "condition" in stdout
    with np.load(out) as p:
        assert {"nngp_mean", "nngp_cov", "ntk_mean", "ntk_cov"} <= set(p.files)
        for g in KINDS:
            assert p[f"{g}_mean"].shape == (5, 2) and p[f"{g}_cov"].shape == (5, 5)
            assert_close(p[f"{g}_mean"], REF[f"erf1_t__{g}_mean"][0], 1e-12)
            assert_close(p[f"{g}_cov"], REF[f"erf1_t__{g}_cov"][0], 1e-12)
    out1 = files / "p1.npz"
    rc, _, err = tpc(capsys, *predict_argv(files, "--reg", 1e-4, "--out", out1, y="y1"))  # t = inf by default
    assert rc == 0, err
    api = P.predict_program(erf_net, REF["x_train"], REF["y_train"][:, 0], REF["x_test"], reg=1e-4)
    with np.load(out1) as p:
        assert p["ntk_mean"].shape == (5, 1)  # N_test x K also for targets given as a vector
        np.testing.assert_array_equal(p["ntk_mean"][:, 0], api["ntk"].mean)
        np.testing.assert_array_equal(p["nngp_cov"], api["nngp"].cov)


def test_targets_of_any_size_scale_the_means(capsys, files, erf_net, tmp_path):
    """Predictions are linear in the targets, which never enter the kernels: targets of 1e60
    give 1e60 times the unit targets' means (they were refused as overflowing the kernels)."""
    unit = P.predict_program(erf_net, REF["x_train"], REF["y_train"], REF["x_test"], t=3.0)
    big = P.predict_program(erf_net, REF["x_train"], 1e60 * REF["y_train"], REF["x_test"], t=3.0)
    np.save(tmp_path / "y60.npy", 1e60 * REF["y_train"])
    rc, _, err = tpc(capsys, "predict", MLP, "-p", "depth=1", "-p", "phi=erf", "--x", files / "x.npy",
                     "--y", tmp_path / "y60.npy", "--xt", files / "xt.npy", "--time", 3, "--out", tmp_path / "p.npz")
    assert rc == 0, err
    with np.load(tmp_path / "p.npz") as p:
        for g in KINDS:
            np.testing.assert_allclose(big[g].mean, 1e60 * unit[g].mean, rtol=1e-13)
            np.testing.assert_allclose(p[f"{g}_mean"], 1e60 * unit[g].mean, rtol=1e-13)
            np.testing.assert_array_equal(big[g].cov, unit[g].cov)


def test_api_errors_name_the_shape_and_time_expected():
    """A transposed test block: the expected shape has N_test rows, not the block's own first
    axis ((8, 8) was named for an (8, 3) block); a negative time: inf is a time too."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(8, 8))
    k_train, k_test_train = A @ A.T, rng.normal(size=(3, 8))
    y = rng.normal(size=8)
    for f in (P.nngp_ensemble, P.ntk_ensemble):
        with pytest.raises(ArgumentError, match=r"_test_train: expected .* of shape \(N_test, 8\), got \(8, 3\)$"):
            f(k_train, k_test_train.T, y)
        with pytest.raises(ArgumentError, match=r"^t: expected a non-negative time or inf, got -1$"):
            f(k_train, k_test_train, y, t=-1)


def test_cli_get_writes_that_prediction_alone(capsys, files):
    """--get nngp|ntk: that kind's three arrays alone, the default's to rounding, and a summary
    of what was written; without --get, both kinds and the summary as before."""
    default = files / "both.npz"
    rc, stdout, err = tpc(capsys, *predict_argv(files, "--out", default))
    assert rc == 0, err
    assert stdout.startswith(f"wrote {default}: nngp_mean, ntk_mean (5, 2), nngp_cov, ntk_cov (5, 5); "
                             "nngp kernel condition ") and "; ntk kernel condition " in stdout
    for get, other in (("nngp", "ntk"), ("ntk", "nngp")):
        out = files / f"{get}.npz"
        rc, stdout, err = tpc(capsys, *predict_argv(files, "--get", get, "--out", out))
        assert rc == 0, err
        assert stdout.startswith(f"wrote {out}: {get}_mean (5, 2), {get}_cov (5, 5); {get} kernel condition ")
        assert other not in stdout
        with np.load(out) as p, np.load(default) as d:
            assert sorted(p.files) == [f"{get}_condition", f"{get}_cov", f"{get}_mean"]
            for key in p.files:
                assert_close(p[key], d[key], 1e-13)


@pytest.mark.parametrize("extra,y,xt,words", [
    (["--time", "-1"], "y", "xt", ["--time", "non-negative number or inf", "'-1'"]),
    (["--time", "soon"], "y", "xt", ["--time", "'soon'"]),
    (["--lr", "0"], "y", "xt", ["--lr", "positive"]),
    (["--reg", "-0.1"], "y", "xt", ["--reg"]),
    ([], "y5", "xt", ["--y", "N = 12", "(5, 2)"]),
    ([], "y", "xt3", ["--xt", "N_test x 4", "(5, 3)"]),
    (["--get", "nngp,gp"], "y", "xt", ["--get", "expected 'nngp', 'ntk' or both", "'nngp,gp'"]),
    ([], "y", "xt0", ["--xt: needs at least 1 row", "(0, 4)"]),     # (named X_test, an argument of the API)
    ([], "y0", "xt", ["--y: has no target columns", "(12, 0)"]),   # (named y)
])
def test_cli_errors_are_one_line(capsys, files, extra, y, xt, words):
    out = files / "bad.npz"
    rc, stdout, err = tpc(capsys, *predict_argv(files, *extra, "--out", out, y=y, xt=xt))
    assert rc != 0 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpc: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists()
