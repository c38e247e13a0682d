"""tpcompiler.sklearn: program kernels inside scikit-learn, checked against neural-tangents'
kernel matrices (tests/data/nt_predict_reference.*: network erf1 = programs/mlp.py with depth 1,
erf, w_std 1, no bias), a closed form for the hyperparameter gradient, and scikit-learn's own
estimator checks."""
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, WhiteKernel
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import parametrize_with_checks

import tpcompiler as tp
from tpcompiler.ir.graph import ProgramError
from tpcompiler.sklearn import NNGP, NTK, KernelEstimator, KernelTransformer

ROOT = Path(__file__).resolve().parent.parent
MLP = str(ROOT / "programs" / "mlp.py")
REF = np.load(ROOT / "tests" / "data" / "nt_predict_reference.npz")
ERF = {"depth": 1, "phi": "erf"}  # reference network erf1 (w_std 1.0 is mlp's default)
X, Y, XT = REF["x_train"], REF["y_train"], REF["x_test"]


def test_kernels_are_neural_tangents_values():
    for cls, kind in ((NNGP, "nngp"), (NTK, "ntk")):
        k = cls(MLP, **ERF)
        np.testing.assert_allclose(k(X), REF[f"erf1__{kind}_train"], rtol=1e-12, atol=1e-14)
        cross = k(XT, X)
        assert cross.shape == (5, 12)
        np.testing.assert_allclose(cross, REF[f"erf1__{kind}_test_train"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(k(X, XT), cross.T, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(k.diag(XT), np.diag(REF[f"erf1__{kind}_test"]), rtol=1e-12)


def test_each_kernel_derives_and_computes_only_its_kernel(monkeypatch):
    """NNGP(...) and KernelTransformer(kernel="nngp") compile the NNGP alone (``get``,
    test_one_kernel.py): a Gaussian process on a CNN no longer derives and computes the NTK it
    drops.  Their values are still those of both kernels' code."""
    from tpcompiler import sklearn as tpsk

    built = []
    make = tpsk.kernel_function
    monkeypatch.setattr(tpsk, "kernel_function", lambda *a, **kw: built.append(make(*a, **kw)) or built[-1])
    both = tp.compile(tp.load(MLP, depth=2, phi="erf", d=X.shape[1])).kernel_function()(X, XT)
    for kind in ("nngp", "ntk"):
        built.clear()
        k = (NNGP if kind == "nngp" else NTK)(MLP, depth=2, phi="erf")
        np.testing.assert_allclose(k(X), both[kind], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(k(XT, X), both[f"{kind}_x2"], rtol=1e-12, atol=1e-14)
        transformer = KernelTransformer(MLP, kind, {"depth": 2, "phi": "erf"}).fit(X)
        np.testing.assert_allclose(transformer.transform(XT), both[f"{kind}_x2"], rtol=1e-12, atol=1e-14)
        assert built and {getattr(f, "kf", f).kernels for f in built} == {(kind,)}


def test_diag_reads_rows_in_chunks_with_the_values_of_the_whole_kernel(monkeypatch):
    """diag(X) built the N x N kernel (np.diag(k(X))): 1.8 GB at N = 8000, out of memory near
    N = 30,000, for N numbers (audit).  It now calls the kernel on DIAG_ROWS rows at a time."""
    from tpcompiler import sklearn as tpsk

    monkeypatch.setattr(tpsk, "DIAG_ROWS", 7)
    k = NTK(MLP, **ERF)
    rows = np.random.default_rng(3).standard_normal((23, 3))
    whole = np.diag(k(rows))
    seen = []
    call = tpsk._ProgramKernel.__call__
    monkeypatch.setattr(tpsk._ProgramKernel, "__call__", lambda self, X, *a, **kw: seen.append(len(X)) or call(self, X, *a, **kw))
    np.testing.assert_array_equal(k.diag(rows), whole)
    assert seen == [7, 7, 7, 2]
    assert k.diag(rows[:0]).shape == (0,)


def test_every_build_parameter_can_be_set_later():
    """get_params listed only the parameters given to the constructor (and the hyperparameters),
    so set_params(phi="tanh") and a grid search over kernel__phi failed (audit)."""
    k = NNGP(MLP, depth=1)
    assert {"phi", "b_std", "parameterization", "width", "w_std"} <= set(k.get_params()) and "d" not in k.get_params()
    tanh = clone(k).set_params(phi="tanh")
    np.testing.assert_allclose(tanh(X), NNGP(MLP, depth=1, phi="tanh")(X), rtol=0, atol=0)
    assert not np.allclose(tanh(X), k(X))


def test_gaussian_process_regressor_is_the_nngp_posterior():
    """GaussianProcessRegressor(NNGP + WhiteKernel) reproduces neural-tangents' NNGP posterior
    (case erf1_inf: diag_reg 1e-4 of the mean training diagonal); WhiteKernel also puts its
    noise on the test covariance's diagonal, which neural-tangents leaves out."""
    K = REF["erf1__nngp_train"]
    noise = 1e-4 * np.trace(K) / len(K)
    gpr = GaussianProcessRegressor(NNGP(MLP, **ERF) + WhiteKernel(noise, "fixed"), alpha=0.0, optimizer=None).fit(X, Y[:, 0])
    mean, cov = gpr.predict(XT, return_cov=True)
    np.testing.assert_allclose(mean, REF["erf1_inf__nngp_mean"][:, 0], rtol=1e-9)
    np.testing.assert_allclose(cov - noise * np.eye(5), REF["erf1_inf__nngp_cov"], rtol=1e-8, atol=1e-12)


def test_hyperparameters_theta_bounds_and_clone():
    k = NNGP(MLP, depth=1, phi="relu", b_std=0.5, w_std_bounds=(0.1, 10.0))
    assert [h.name for h in k.hyperparameters] == ["b_std", "w_std"]  # depth, phi, d are not
    np.testing.assert_allclose(k.theta, np.log([0.5, 1.0]))
    np.testing.assert_allclose(k.bounds, np.log([[1e-2, 1e2], [0.1, 10.0]]))
    twin = clone(k)
    assert twin == k and twin is not k and twin.get_params() == k.get_params()
    moved = k.clone_with_theta(np.log([0.2, 3.0]))
    assert moved.b_std == pytest.approx(0.2) and moved.w_std == pytest.approx(3.0) and k.w_std == 1.0
    fixed = NTK(MLP, depth=1, phi="relu", w_std_bounds="fixed")
    assert fixed.n_dims == 0 and fixed.theta.shape == (0,)
    product = ConstantKernel(2.0) * k
    assert product.n_dims == 3
    np.testing.assert_allclose(product.theta[1:], k.theta)
    k.set_params(w_std=2.0)
    np.testing.assert_allclose(k.theta, np.log([0.5, 2.0]))


def test_hyperparameters_follow_set_params_as_a_new_kernel_has_them():
    """set_params(b_std=0.5) on a kernel without a bias makes b_std a hyperparameter, as in its
    clone (which GaussianProcessRegressor fits; theta was [0] against the clone's [0, log 0.5]);
    b_std=None removes it (theta raised numpy's TypeError); bounds can be set later."""
    k = NNGP(MLP, depth=1, phi="relu")
    k.set_params(b_std=0.5)
    assert [h.name for h in k.hyperparameters] == [h.name for h in clone(k).hyperparameters] == ["w_std", "b_std"]
    np.testing.assert_allclose(k.theta, np.log([1.0, 0.5]))
    np.testing.assert_array_equal(k.theta, clone(k).theta)
    K, grad = k(X[:4], eval_gradient=True)
    assert grad.shape == (4, 4, 2)
    k.set_params(b_std=None)
    assert [h.name for h in k.hyperparameters] == ["w_std"] and k.theta.shape == (1,)
    assert k(X[:4], eval_gradient=True)[1].shape == (4, 4, 1)
    k.set_params(b_std=0.5, b_std_bounds=(0.1, 1.0))
    np.testing.assert_allclose(k.bounds, np.log([[1e-2, 1e2], [0.1, 1.0]]))
    np.testing.assert_array_equal(clone(k).bounds, k.bounds)
    with pytest.raises(ProgramError, match=r"^w_std_bounds: expected 0 < low < high"):
        k.set_params(w_std_bounds=(2.0, 1.0))
    with pytest.raises(ProgramError, match=r"'b_std' is not a hyperparameter .*: give b_std=1\.0$"):
        NNGP(MLP, depth=1, b_std=1, b_std_bounds=(0.1, 10.0))


def _erf_nngp(a, X):
    """NNGP of one erf layer (docs/DESIGN.md 2.8): with S = X X^T / d and a = w_std^2,
    K = a (2/pi) arcsin(2 a S12 / sqrt((1 + 2 a S11)(1 + 2 a S22))); and dK/da."""
    S = X @ X.T / X.shape[1]
    s = np.diag(S)
    q = np.sqrt(np.outer(1 + 2 * a * s, 1 + 2 * a * s))
    r = 2 * a * S / q
    dr = r / a - r * (np.add.outer(s / (1 + 2 * a * s), s / (1 + 2 * a * s)))
    K = a * (2 / np.pi) * np.arcsin(r)
    return K, (2 / np.pi) * np.arcsin(r) + a * (2 / np.pi) * dr / np.sqrt(1 - r**2)


def test_gradient_against_the_closed_form():
    """dK/dlog(w_std) = 2 a dK/da of the erf closed form; the log-space central difference
    must find it to its truncation error (~step^2)."""
    k = NNGP(MLP, **ERF)
    K, grad = k(X[:6], eval_gradient=True)
    assert grad.shape == (6, 6, 1)
    K_exact, dK_da = _erf_nngp(1.0, X[:6])
    np.testing.assert_allclose(K, K_exact, rtol=1e-12)
    np.testing.assert_allclose(grad[..., 0], 2 * dK_da, rtol=1e-7)
    with pytest.raises(ValueError, match="only be evaluated when Y is None"):
        k(X, XT, eval_gradient=True)


def test_precomputed_kernel_ridge_and_svm():
    """A pipeline (KernelTransformer -> KernelRidge / SVC with kernel="precomputed") and
    KernelEstimator give what those estimators give on neural-tangents' kernel matrices."""
    K, Ktx = REF["erf1__ntk_train"], REF["erf1__ntk_test_train"]
    ridge = KernelRidge(alpha=0.1, kernel="precomputed")
    expected = clone(ridge).fit(K, Y).predict(Ktx)
    pipe = make_pipeline(KernelTransformer(MLP, "ntk", ERF), clone(ridge)).fit(X, Y)
    np.testing.assert_allclose(pipe.predict(XT), expected, rtol=1e-9)
    est = KernelEstimator(MLP, clone(ridge), "ntk", ERF).fit(X, Y)
    np.testing.assert_allclose(est.predict(XT), expected, rtol=1e-9)
    labels = (Y[:, 0] > 0).astype(int)
    svc = SVC(kernel="precomputed", C=10.0)
    expected = clone(svc).fit(K, labels).decision_function(Ktx)
    clf = KernelEstimator(MLP, svc, "ntk", ERF).fit(X, labels)
    np.testing.assert_allclose(clf.decision_function(XT), expected, rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(clf.classes_, [0, 1])
    # the estimator's probabilities and fit's sample weights pass through (neither was there)
    weights = np.linspace(0.5, 2.0, len(labels))
    logistic = LogisticRegression(C=10.0)  # (on the rows of the kernel as features)
    expected = clone(logistic).fit(K, labels, sample_weight=weights).predict_proba(Ktx)
    clf = KernelEstimator(MLP, logistic, "ntk", ERF).fit(X, labels, sample_weight=weights)
    np.testing.assert_allclose(clf.predict_proba(XT), expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(clf.predict_log_proba(XT), np.log(expected), rtol=1e-6, atol=1e-9)
    assert not hasattr(KernelEstimator(MLP, clone(ridge), "ntk", ERF).fit(X, Y), "predict_proba")


def test_bad_arguments():
    with pytest.raises(tp.ProgramError, match="depth_bounds: 'depth' is not a hyperparameter"):
        NNGP(MLP, depth_bounds=(1, 3))
    with pytest.raises(tp.ProgramError, match="already built"):
        NNGP(tp.load(MLP, depth=1, d=4), w_std=2.0)(X)
    with pytest.raises(ValueError, match="kernel: expected 'nngp' or 'ntk'"):
        KernelTransformer(MLP, "rbf", ERF).fit(X)
    with pytest.raises(tp.ProgramError, match="no parameter 'depht'"):
        KernelTransformer(MLP, "ntk", {"depht": 2}).fit(X)
    with pytest.raises(ValueError, match="Y: has 3 columns but X has 4"):  # (it named the kernel's X2)
        NNGP(MLP, **ERF)(X[:, :4], X[:2, :3])


@pytest.fixture
def one_numba_thread():
    """scikit-learn's checks evaluate thousands of tiny kernels, for which the parallel loops'
    thread start-up dominates (3x on this loaded 2-core machine); the results are identical."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


def _failed_checks_of_the_inner_estimator(estimator) -> dict:
    """The checks scikit-learn itself expects the wrapped SVC to fail (its own list of expected
    failures of SVC): its sample weights are not repeated rows."""
    if isinstance(estimator, KernelEstimator) and isinstance(estimator.estimator, SVC):
        why = "SVC's sample_weight is not equivalent to removing/repeating samples (scikit-learn expects SVC to fail it)"
        return {"check_sample_weight_equivalence_on_dense_data": why,
                "check_sample_weight_equivalence_on_sparse_data": why}
    return {}


@parametrize_with_checks([
    KernelTransformer(MLP, "ntk", ERF),
    KernelEstimator(MLP, None, "nngp", ERF),                         # KernelRidge: a regressor
    KernelEstimator(MLP, SVC(kernel="precomputed"), "ntk", ERF),     # a classifier
], expected_failed_checks=_failed_checks_of_the_inner_estimator)
def test_sklearn_estimator_checks(estimator, check, one_numba_thread):
    check(estimator)


# ---------------------------------------------------------------------------------------
# Hyperparameters as runtime arguments (one compilation per structure, not per value).
# ---------------------------------------------------------------------------------------
def _fresh(kind, X, **params):
    """The independent oracle: the program built at these values, compiled from scratch."""
    params.setdefault("d", X.shape[1])
    return tp.compile(tp.load(MLP, **params)).kernel_function()(X)[kind]


@pytest.mark.parametrize("phi", ["relu", "tanh"])  # a closed form; a quadrature (E[tanh tanh] has none)
def test_new_hyperparameter_values_reuse_one_compilation(phi):
    from tpcompiler.sklearn import kernel_function

    X6 = X[:6]
    k = NTK(MLP, depth=2, phi=phi, w_std=1.3, b_std=0.2)
    first = kernel_function(MLP, k._build_params(), X6.shape[1], runtime=k._hyper)
    w, b = 0.7, 0.45
    moved = k.clone_with_theta(np.log([w, b]))
    assert (moved.w_std, moved.b_std) == pytest.approx((w, b))
    again = kernel_function(MLP, moved._build_params(), X6.shape[1], runtime=moved._hyper)
    assert again.kf is first.kf  # the same compiled code, other runtime values
    fresh = tp.compile(tp.load(MLP, depth=2, phi=phi, w_std=w, b_std=b, d=X6.shape[1])).kernel_function()(np.vstack([X6, XT]))
    for cls, kind in ((NNGP, "nngp"), (NTK, "ntk")):
        np.testing.assert_allclose(cls(MLP, depth=2, phi=phi, w_std=w, b_std=b)(X6), fresh[kind][:6, :6],
                                   rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(moved(XT, X6), fresh["ntk"][6:, :6], rtol=1e-12, atol=1e-14)


def test_structural_parameters_are_compiled_per_value():
    """In the standard parameterization w_std also sets NTK weights (numbers d / w_std^2), so
    it is not a runtime argument there: each value is compiled, and is still right; a build
    that branches on a value (depth from w_std) is caught by the per-value structure check."""
    from tpcompiler.frontend.loader import build_function
    from tpcompiler.sklearn import _followers

    X6 = X[:6]
    params = {"depth": 1, "phi": "relu", "w_std": 1.5, "b_std": 0.3, "parameterization": "standard", "d": X.shape[1]}
    base = tp.load(MLP, **params).graph
    assert _followers(MLP, params, "b_std", base) == ["b_std"]
    assert _followers(MLP, params, "w_std", base) is None  # structural here
    assert _followers(MLP, {**params, "parameterization": "ntk"}, "w_std", base) is None  # another structure
    ntk_base = tp.load(MLP, **{**params, "parameterization": "ntk"}).graph
    assert sorted(_followers(MLP, {**params, "parameterization": "ntk"}, "w_std", ntk_base)) == ["w_std"]
    # the gradient w.r.t. a structural w_std compiles its moved values (the NNGP is the same in
    # both parameterizations, where w_std is a runtime argument of the NTK-parameterized one)
    _, g_standard = NNGP(MLP, **{k: v for k, v in params.items() if k != "d"})(X6, eval_gradient=True)
    _, g_runtime = NNGP(MLP, depth=1, phi="relu", w_std=1.5, b_std=0.3)(X6, eval_gradient=True)
    np.testing.assert_allclose(g_standard, g_runtime, rtol=1e-8, atol=1e-12)
    assert np.abs(g_standard[..., 0]).max() > 1.0
    k = NTK(MLP, **{k: v for k, v in params.items() if k != "d"})  # b_std stays runtime at this w_std
    np.testing.assert_allclose(k.clone_with_theta(np.log([1.5, 0.4]))(X6),
                               _fresh("ntk", X6, **{**params, "b_std": 0.4}), rtol=1e-12)
    mlp = build_function(MLP)

    def branching(w_std=1.0, d=3):
        return mlp(depth=1 if w_std < 2 else 2, phi="erf", w_std=w_std, d=d)

    kb = NNGP(branching, w_std=1.0)
    np.testing.assert_allclose(kb(X), REF["erf1__nngp_train"], rtol=1e-12, atol=1e-14)  # neural-tangents
    np.testing.assert_allclose(kb.clone_with_theta(np.log([2.5]))(X6),
                               _fresh("nngp", X6, depth=2, phi="erf", w_std=2.5), rtol=1e-12)


def test_gaussian_process_optimizer_recovers_w_std():
    """Targets drawn from the NNGP of a depth-2 relu network with w_std = 1.8 (b_std 0.3
    fixed, 20 independent draws): maximising the marginal likelihood from w_std = 1 finds
    it to a few per cent, in seconds (one compilation; the gradient by central differences)."""
    rng = np.random.default_rng(0)
    Xg = rng.standard_normal((40, 3))
    truth = NNGP(MLP, depth=2, phi="relu", w_std=1.8, b_std=0.3)(Xg)  # equal to a fresh compile: tests above
    noise = 1e-4
    Yg = np.linalg.cholesky(truth + noise * np.eye(40)) @ rng.standard_normal((40, 20))
    kernel = NNGP(MLP, depth=2, phi="relu", w_std=1.0, b_std=0.3, b_std_bounds="fixed") + WhiteKernel(noise, "fixed")
    gpr = GaussianProcessRegressor(kernel, alpha=0.0, random_state=0).fit(Xg, Yg)
    assert gpr.kernel_.k1.w_std == pytest.approx(1.8, rel=0.05)


def test_gradient_with_bias_against_the_closed_form():
    """One erf layer with bias (runtime w_std and b_std): with Sigma = w^2 S + b^2 (S = X X^T / d),
    K = w^2 (2/pi) arcsin(2 Sigma12 / sqrt((1 + 2 Sigma11)(1 + 2 Sigma22))) + b^2, differentiated
    by sympy in log-space; the central difference must find both columns to ~1e-7."""
    import sympy as sp

    w, b, s11, s12, s22 = sp.symbols("w b s11 s12 s22", positive=True)
    sig = lambda s: w**2 * s + b**2  # noqa: E731
    K = w**2 * 2 / sp.pi * sp.asin(2 * sig(s12) / sp.sqrt((1 + 2 * sig(s11)) * (1 + 2 * sig(s22)))) + b**2
    f = sp.lambdify((w, b, s11, s12, s22), [K, w * sp.diff(K, w), b * sp.diff(K, b)], "numpy")
    X6 = X[:6]
    S = X6 @ X6.T / X6.shape[1]
    s = np.diag(S)
    kernel = NNGP(MLP, depth=1, phi="erf", w_std=1.3, b_std=0.4)
    Kc, grad = kernel(X6, eval_gradient=True)
    exact = [np.broadcast_to(v, S.shape) for v in f(1.3, 0.4, s[:, None], S, s[None, :])]
    np.testing.assert_allclose(Kc, exact[0], rtol=1e-12)
    assert [h.name for h in kernel.hyperparameters] == ["w_std", "b_std"]
    np.testing.assert_allclose(grad[..., 0], exact[1], rtol=1e-7)
    np.testing.assert_allclose(grad[..., 1], exact[2], rtol=1e-7)


def test_an_edited_program_file_is_another_program(tmp_path):
    """The kernels' caches knew a program file by its path alone: after an edit of the body
    in the same process (the nonlinearity the build uses, relu -> erf, its parameters
    unchanged), a new NNGP of the file computed the old program (cache audit).  The erf
    kernel is checked against its closed form."""
    path = tmp_path / "net.py"
    text = Path(MLP).read_text()
    assert text.count("act = tp.phi(phi)") == 1
    path.write_text(text)
    relu = NNGP(str(path), depth=1)(X[:6])
    path.write_text(text.replace("act = tp.phi(phi)", "act = tp.phi('erf')"))
    erf = NNGP(str(path), depth=1)(X[:6])
    np.testing.assert_allclose(erf, _erf_nngp(1.0, X[:6])[0], rtol=1e-12)
    assert np.max(np.abs(erf - relu)) > 1e-2


def test_a_fitted_model_refuses_a_program_file_edited_since_and_keeps_its_params(tmp_path):
    """A KernelEstimator (and a GaussianProcessRegressor on NNGP(path)) fitted on a file and
    asked to predict after the file was edited computed k(X_new, X) of the new program beside
    the old one's fit: predictions of neither model (QA: 1.150 where the fit said 0.517 and a
    refit 0.581).  Mutating the params dict after fit changed predictions too."""
    path = tmp_path / "net.py"
    text = Path(MLP).read_text()
    path.write_text(text)
    params = {"depth": 1, "phi": "erf", "w_std": 1.0}
    est = KernelEstimator(str(path), params=params).fit(X[:8], Y[:8, 0])
    before = est.predict(XT)
    params["w_std"] = 2.0
    np.testing.assert_array_equal(est.predict(XT), before)  # the params it was fitted with
    gpr = GaussianProcessRegressor(NNGP(str(path), depth=1, phi="erf", w_std_bounds="fixed")).fit(X[:8], Y[:8, 0])
    path.write_text(text.replace("act = tp.phi(phi)", "act = tp.phi('relu')"))
    with pytest.raises(ProgramError, match=r"net.py' changed since this was fitted; fit it again"):
        est.predict(XT)
    with pytest.raises(ProgramError, match=r"net.py' changed since this was made"):
        gpr.predict(XT)
    refit = KernelEstimator(str(path), params=params).fit(X[:8], Y[:8, 0]).predict(XT)  # a new model: fine
    assert refit.shape == before.shape


def test_a_program_changed_in_place_is_compiled_again():
    """NNGP(program) of a tp.Program is cached by the program's id: changed in place (a Param's
    value, as tp.compile's own check sees it), it kept the old kernels; the reference is the
    program built with the new value."""
    import dataclasses

    p = tp.load(MLP, depth=2, phi="erf", w_std=1.0, b_std=0.1, d=X.shape[1])
    k = NNGP(p)
    k(X[:3])
    p.graph.g.nodes["b_std"]["op"] = dataclasses.replace(p.graph.op("b_std"), value=0.7)
    reference = tp.compile(tp.load(MLP, depth=2, phi="erf", w_std=1.0, b_std=0.7, d=X.shape[1])).kernels(X[:3])["nngp"]
    np.testing.assert_allclose(k(X[:3]), reference, rtol=1e-13)
    np.testing.assert_allclose(NNGP(p)(X[:3]), reference, rtol=1e-13)


def test_a_fitted_estimator_keeps_its_program_and_a_kernel_its_dormant_bounds():
    """A KernelEstimator fitted on a tp.Program predicts with the program it was fitted on
    when the program is changed in place afterwards (it gave the new program's kernel
    against the old fit); a kernel whose b_std was set to None keeps its b_std_bounds for
    later and can be cloned (its clone raised 'b_std is not a hyperparameter')."""
    import dataclasses

    p = tp.load(MLP, depth=1, phi="erf", w_std=1.0, b_std=0.1, d=X.shape[1])
    est = KernelEstimator(p, params={}).fit(X[:8], Y[:8, 0])
    before = est.predict(XT)
    p.graph.g.nodes["b_std"]["op"] = dataclasses.replace(p.graph.op("b_std"), value=0.7)
    np.testing.assert_array_equal(est.predict(XT), before)
    k = NNGP(MLP, depth=1, phi="relu", b_std=0.5, b_std_bounds=(0.1, 1.0))
    k.set_params(b_std=None)
    twin = clone(k)
    assert [h.name for h in twin.hyperparameters] == ["w_std"] and twin.b_std_bounds == (0.1, 1.0)
    GaussianProcessRegressor(k).fit(X[:6], Y[:6, 0])
    twin.set_params(b_std=0.3)
    (b_std,) = [h for h in twin.hyperparameters if h.name == "b_std"]
    np.testing.assert_allclose(b_std.bounds[0], [0.1, 1.0])
