"""Predictions of infinitely wide networks from their kernels (docs/DESIGN.md 2.3, 2.4, 2.6):
exact Bayesian inference with the NNGP, and the mean and covariance over initializations of
an infinite ensemble trained by gradient descent on the squared loss (the NTK regime).

Conventions are those of neural-tangents' ``predict.gradient_descent_mse_ensemble``, so numbers
compare one for one:

* the loss is (1 / (2 N K)) sum (f(X) - Y)^2 over the N training inputs and K outputs, run as
  gradient flow for time ``t`` at learning rate ``lr``: the training kernel's eigenvalue
  lambda decays like exp(-lambda s) with s = t * lr / (N K);
* ``reg`` (neural-tangents' ``diag_reg``) adds reg * mean(diag K) to the diagonal of the
  training kernel that is inverted or exponentiated (never to the test kernels, and not to the
  NNGP that sits inside the NTK covariance);
* ``t = inf`` (the default; ``None`` means the same) is the end of training: the solve
  K_r^{-1} by Cholesky.

With g_s(K) = K^{-1} (I - exp(-K s)) (= K^{-1} at s = inf), K the NNGP and Theta the NTK,
subscripts * for test inputs, X for training inputs, and A = g_s(Theta_r) Theta_{X*}:

    NNGP mean  K_{*X} g_s(K_r) Y            cov  K_{**} - K_{*X} g_{2s}(K_r) K_{X*}
    NTK  mean  Theta_{*X} g_s(Theta_r) Y    cov  K_{**} + A^T K_{XX} A - A^T K_{X*} - K_{*X} A

(the NNGP at time t is gradient descent on the readout alone; at t = inf it is the GP
posterior; Lee et al. 2019, "Wide neural networks of any depth evolve as linear models",
for the NTK ensemble).  The functions of K are computed stably for ill-conditioned kernels:
g_s(lambda) = s * exprel(-lambda s) has no division, and eigenvalues below N * eps * lambda_max
(rounding; negative ones included) are dropped (g = 0) at every time (``_eigen_filter``), so
that at t = inf a kernel that Cholesky cannot factor or whose reciprocal condition number is
below N * eps is inverted as a pseudo-inverse, the minimum-norm interpolant that gradient
flow reaches from f_0 = 0, and finite times tend to it.  Every result carries the condition number of the matrix it
inverted and how it was inverted; nothing returns NaN.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.linalg
import scipy.special

from tpcompiler import validation
from tpcompiler.ir.ntk import as_asked, asked_kernels, kernel_names

INF = math.inf


@dataclass(frozen=True)
class Gaussian:
    """A prediction on the test inputs: ``mean`` (N_test, or N_test x K like the targets),
    ``cov`` (N_test x N_test, shared by every output; None when not asked), the condition
    number of the regularized training kernel and how it was inverted (``method``)."""

    mean: np.ndarray
    cov: np.ndarray | None
    condition: float
    method: str

    @property
    def covariance(self) -> np.ndarray | None:
        """``cov`` by neural-tangents' name (its ``Gaussian(mean, covariance)``)."""
        return self.cov

    def __iter__(self):
        """Unpacks as neural-tangents' Gaussian (a named tuple) does: ``mean, covariance = gaussian``."""
        return iter((self.mean, self.cov))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        """``gaussian[0]`` the mean, ``gaussian[1]`` the covariance, as of neural-tangents' Gaussian."""
        return (self.mean, self.cov)[i]


# ---------------------------------------------------------------------------------------
# Checks of the arguments.
# ---------------------------------------------------------------------------------------
def _time(t) -> float:
    if t is None:
        return INF
    if isinstance(t, (int, float, np.integer, np.floating)) and not isinstance(t, (bool, np.bool_)) and float(t) == INF:
        return INF
    if isinstance(t, numbers.Real) and not isinstance(t, (bool, np.bool_)) and float(t) < 0:
        raise validation.ArgumentError(f"t: expected a non-negative time or inf, got {float(t):g}")
    return validation.number(t, "t", nonnegative=True)


def _targets(y, n: int) -> np.ndarray:
    """The training targets, N or N x K finite numbers of any size: they never enter the
    kernels, and predictions are linear in them (a mean that overflows is refused by
    ``_checked``)."""
    y = validation.array(y, "y", ndim=(1, 2), max_abs=None)
    if y.ndim == 2 and y.shape[1] == 0:
        raise validation.ArgumentError(f"y: has no target columns (shape {y.shape}); give N or N x K targets, K >= 1")
    if y.shape[0] != n:
        raise validation.ArgumentError(f"y: has {y.shape[0]} rows but the training kernel is {n} x {n} "
                                       "(one target row per training input)")
    return y


def _kernel_matrix(k, name: str) -> np.ndarray:
    """k checked to be a kernel matrix and symmetrized (once per array within
    ``shared_decompositions``)."""
    return _once_per_array("kernel", k, lambda: _checked_kernel_matrix(k, name), name)


def _checked_kernel_matrix(k, name: str) -> np.ndarray:
    k = validation.array(k, name, ndim=2, max_abs=None)
    n = k.shape[0]
    if k.shape != (n, n) or n == 0:
        raise validation.ArgumentError(f"{name}: expected a square N x N kernel matrix, got shape {k.shape}")
    scale = float(max(k.max(), -k.min()))
    asym = _largest_asymmetry(k)
    if asym > 1e-8 * max(scale, 1e-300):
        raise validation.ArgumentError(f"{name}: is not symmetric (largest |K - K^T| = {asym:.3g} of entries up to "
                                       f"{scale:.3g}); pass k(X, X) of its inputs")
    if (np.diag(k) < 0).any():  # (a covariance's diagonal: -I gave a posterior variance of -1)
        raise validation.ArgumentError(f"{name}: has a negative diagonal entry ({float(np.diag(k).min()):.3g}), so it is "
                                       "not a kernel matrix (a covariance); pass k(X, X)")
    if asym == 0.0:  # (k + k^T) / 2 is k itself: read it in place (a read-only view, nothing copied)
        view = k.view()
        view.flags.writeable = False
        return view
    sym = np.add(k, k.T)
    sym *= 0.5  # (exactly / 2)
    return sym


#: Rows of a kernel matrix compared with its transpose at a time (``_largest_asymmetry``):
#: temporaries of about 8 MB instead of two of the matrix's size
_BLOCK_ENTRIES = 1 << 20


def _largest_asymmetry(k: np.ndarray) -> float:
    """max |K - K^T| by blocks of rows, each pair of entries compared once (a 4000 x 4000 matrix
    whole: 0.4 s, most of it the first touch of two new 128 MB temporaries)."""
    n = k.shape[0]
    rows = max(1, _BLOCK_ENTRIES // max(n, 1))
    worst = 0.0
    for i in range(0, n, rows):  # (rows i.. against columns i.. : each pair once)
        block = k[i:i + rows, i:] - k[i:, i:i + rows].T
        np.abs(block, out=block)
        worst = max(worst, float(block.max(initial=0.0)))
    return worst


def _block(k, name: str, shape: tuple, what: str) -> np.ndarray:
    return _once_per_array("block", k, lambda: _checked_block(k, name, shape, what), name, shape)


def _checked_block(k, name: str, shape: tuple, what: str) -> np.ndarray:
    """k as a 2-D array of ``shape`` (None: any number of rows, the test inputs')."""
    k = validation.array(k, name, ndim=2, max_abs=None)
    if any(want is not None and got != want for got, want in zip(k.shape, shape)):
        expected = "(" + ", ".join("N_test" if want is None else str(want) for want in shape) + ")"
        raise validation.ArgumentError(f"{name}: expected {what} of shape {expected}, got {k.shape}")
    return k


def regularized(k_train: np.ndarray, reg: float) -> np.ndarray:
    """K + reg * mean(diag K) * I (neural-tangents' ``diag_reg``, relative scale; once per
    array and reg within ``shared_decompositions``)."""
    reg = validation.number(reg, "reg", nonnegative=True)
    return _once_per_array("regularized", k_train, lambda: _with_ridge(k_train, reg), reg)


def _with_ridge(k_train: np.ndarray, reg: float) -> np.ndarray:
    """k_train + reg * mean(diag) * I with one new array (k_train itself when reg is 0): the
    same numbers as adding the scaled identity, without making it."""
    if reg == 0.0:
        return k_train
    n = k_train.shape[0]
    out = np.array(k_train, dtype=np.float64)
    out[np.diag_indices(n)] += reg * (np.trace(k_train) / n)
    return out


# ---------------------------------------------------------------------------------------
# g_s(K_r) applied to a matrix, by Cholesky (s = inf) or eigendecomposition.
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Filter:
    """B -> g_s(K_r) B for one regularized training kernel and one s (see module docstring)."""

    apply: Callable[[np.ndarray], np.ndarray]
    condition: float
    method: str
    #: for a filter from an eigendecomposition K_r = V diag(lambda) V^T: V and g_s(lambda), so
    #: that a test block's projection V^T k_{X*} is computed once for every time (``_projected``)
    evecs: np.ndarray | None = None
    g: np.ndarray | None = None


def _rounding_floor(n: int) -> float:
    """Relative size below which an eigenvalue is rounding: N * eps (numpy's pinv default)."""
    return n * np.finfo(np.float64).eps


def _cholesky(k_reg: np.ndarray) -> Filter | None:
    """K_r^{-1} by Cholesky, if K_r is numerically positive definite; its 1-norm condition
    number estimated by LAPACK's pocon."""
    try:
        factor = scipy.linalg.cho_factor(k_reg, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    # ||K_r||_1, the largest column sum of |K_r|: the largest row sum of its transpose, which is
    # Fortran-ordered, so LAPACK reads it in place (np.abs(K_r) was a new N x N array)
    anorm = float(scipy.linalg.lapack.dlange("I", k_reg.T))
    rcond, info = scipy.linalg.lapack.dpocon(factor[0], anorm, uplo="L")
    if info != 0 or not rcond > _rounding_floor(k_reg.shape[0]):
        return None
    return Filter(lambda B: scipy.linalg.cho_solve(factor, B, check_finite=False), 1.0 / rcond,
                  "cholesky (1-norm condition estimate)")


def _eigen_filter(evals: np.ndarray, evecs: np.ndarray, s: float) -> Filter:
    """g_s from the eigendecomposition of K_r: s * exprel(-lambda s) for finite s (1/lambda where
    lambda s overflows), 1/lambda (the pseudo-inverse) for s = inf, on the eigenvalues above
    N eps lambda_max; g = 0 on the others, at every s.

    Those are rounding: the kernel's entries are known to about eps, so the directions of
    such eigenvalues (an exactly singular kernel's null space, duplicated training inputs)
    are not determined by it.  In exact arithmetic the test kernel has no component along a
    null direction (the joint kernel is positive semidefinite), but computed, it has one of
    rounding size, which g = s (lambda = 0) multiplied: at t = 1e16 a prediction of about 0.5
    came out near 2, at t = 1e300 near 1e284.  With g = 0 there the finite-time
    predictions tend to the t = inf one."""
    top = float(max(evals[-1], 0.0))
    low = float(evals[0])
    condition = top / low if low > _rounding_floor(len(evals)) * top else INF  # numerically singular: inf
    lam = np.maximum(evals, 0.0)
    keep = lam > _rounding_floor(len(lam)) * top
    g = np.zeros_like(lam)
    if s == INF:
        g[keep] = 1.0 / lam[keep]
    else:
        with np.errstate(over="ignore"):
            x = lam[keep] * s
        # lambda s beyond float64 (t = 1e306 on a kernel of lambda_max 2e4) is inf, and
        # exprel(-inf) = 0 would drop the direction: there g_s = 1/lambda to the last bit
        g[keep] = np.where(np.isinf(x), 1.0 / lam[keep], s * scipy.special.exprel(-x))
    dropped = int((~keep).sum())
    below = f"{dropped} eigenvalue{'s' if dropped > 1 else ''} below N eps lambda_max dropped" if dropped else ""
    if s == INF:
        method = "eigendecomposition (pseudo-inverse" + (f", {below})" if dropped else ")")
    else:
        method = "eigendecomposition" + (f" ({below})" if dropped else "")
    return Filter(lambda B: evecs @ (g[:, None] * (evecs.T @ B)), condition, method, evecs, g)


#: Within ``shared_decompositions``: (what, id of an array, ...) -> (weak reference to the
#: array, what was made of it)
_decompositions: contextvars.ContextVar = contextvars.ContextVar("decompositions", default=None)


@contextlib.contextmanager
def shared_decompositions():
    """Within the block, each kernel array is checked and regularized once, and each
    regularized training kernel factored or decomposed once, however many times and
    predictions read it (``gradient_descent_mse_ensemble`` at an array of times, as
    neural-tangents keeps one decomposition for every time: 30 times at N = 4000 checked the
    training kernels again at each time, most of the call).  The results are those of
    computing again; they are let go at the end of the block, which is meant to span one call:
    an array read inside it may be kept until it ends (an exactly symmetric kernel is read in
    place, so what is kept of it refers to it)."""
    memo: dict = {}
    token = _decompositions.set(memo)
    try:
        yield
    finally:
        _decompositions.reset(token)
        memo.clear()  # (arrays that live on keep finalizers pointing here, not the results)


def _once_per_array(what: str, array, make: Callable, *extra, held: tuple = ()):
    """``make()`` (something computed from ``array`` alone, with ``extra`` and the objects
    ``held``), once per array object within ``shared_decompositions``, else at every call.
    Keyed by the object's identity while it lives (a weak reference; the entry goes when the
    array does, so arrays made anew at each call are not kept) and by the identities of
    ``held``, which the entry keeps alive so that no other object takes their ids while it
    exists (a decomposition's eigenvectors: a later one at the same address was taken for it);
    arrays are not changed in place inside the block."""
    memo = _decompositions.get()
    if memo is None or not isinstance(array, np.ndarray):
        return make()
    key = (what, id(array), *extra, *map(id, held))
    found = memo.get(key)
    if found is not None and found[0]() is array:
        return found[1]
    value = make()
    memo[key] = (weakref.ref(array), value, held)
    weakref.finalize(array, memo.pop, key, None)
    return value


def _decomposed(k_reg: np.ndarray, what: str, make: Callable):
    """``make(k_reg)`` (a factor of K_r), once per kernel within ``shared_decompositions``."""
    return _once_per_array(what, k_reg, lambda: make(k_reg))


#: An eigenvalue of a training kernel below -NOT_SEMIDEFINITE * lambda_max is not rounding:
#: such a matrix is no covariance (computed float64 kernels are off by about N eps lambda_max
#: and float32 ones by 1e-8 to 1e-5 of it), and dropping the eigenvalue would be a wrong number
NOT_SEMIDEFINITE = 1e-4


def _semidefinite(spectrum: tuple, name: str, reg: float) -> tuple:
    """The eigendecomposition of a regularized training kernel, refused (with ``name``) when an
    eigenvalue is negative beyond rounding (``NOT_SEMIDEFINITE``)."""
    evals = spectrum[0]
    top, low = float(max(evals[-1], 0.0)), float(evals[0])
    if low < -NOT_SEMIDEFINITE * top:
        ridge = f" plus the ridge reg = {reg:g}" if reg else ""
        raise validation.ArgumentError(f"{name}: is not positive semidefinite (the matrix{ridge} has the eigenvalue "
                                       f"{low:.3g}, its largest is {top:.3g}), so it is not a kernel matrix (a "
                                       "covariance); pass k(X, X) of a kernel")
    return spectrum


def descent_filters(k_train: np.ndarray, reg: float, *scales: float, name: str = "k_train") -> list[Filter]:
    """g_s(K_r) = K_r^{-1} (I - exp(-K_r s)) as operators for each s in ``scales``, K_r =
    ``regularized(k_train, reg)``: Cholesky at s = inf when K_r is well enough conditioned,
    else one eigendecomposition shared by all the scales (and by every call within
    ``shared_decompositions``), refused when K_r has a negative eigenvalue beyond rounding
    (``_semidefinite``; ``name`` is the kernel's in the message)."""
    k_reg = regularized(k_train, reg)
    chol = _decomposed(k_reg, "cholesky", _cholesky) if INF in scales else None
    spectrum = None
    filters = []
    for s in scales:
        if s == INF and chol is not None:
            filters.append(chol)
            continue
        if spectrum is None:
            # divide and conquer (LAPACK's syevd, as numpy and jax): at N = 4000 7.0 s against 8.2-8.9 s
            # for scipy's default (syevr), and eigenvectors orthogonal to 6e-15 instead of 5e-11
            spectrum = _semidefinite(_decomposed(k_reg, "eigh", lambda k: scipy.linalg.eigh(k, check_finite=False,
                                                                                              driver="evd")), name, reg)
        filters.append(_eigen_filter(*spectrum, s))
    return filters


def descent_filter(k_train: np.ndarray, s: float, reg: float = 0.0, name: str = "k_train") -> Filter:
    """g_s(K_r) for one s (``descent_filters``)."""
    return descent_filters(k_train, reg, s, name=name)[0]


def _projected(filt: Filter, k: np.ndarray) -> np.ndarray:
    """V^T k^T for a test block k (N_test x N) and the eigenvectors V of an eigendecomposition
    filter, once per block and decomposition within ``shared_decompositions``: the times of an
    array (and g_s, g_2s of one time) share it, so each time's covariances cost products with
    g_s(lambda) alone instead of two N x N by N x N_test products (neural-tangents keeps the same
    projection).  The means apply g_s(K_r) to the targets, N x K: cheaper than a projection."""
    return _once_per_array("projected", k, lambda: filt.evecs.T @ k.T, held=(filt.evecs,))


def _filtered_block(filt: Filter, k: np.ndarray) -> np.ndarray:
    """g_s(K_r) k^T (N x N_test) for a test block k."""
    if filt.evecs is None:
        return filt.apply(k.T)
    return filt.evecs @ (filt.g[:, None] * _projected(filt, k))


def _between(filt: Filter, k: np.ndarray) -> np.ndarray:
    """k g_s(K_r) k^T for a test block k (N_test x N)."""
    if filt.evecs is None:
        return k @ filt.apply(k.T)
    p = _projected(filt, k)
    return p.T @ (filt.g[:, None] * p)


def _scaled_time(t, lr, n_targets: int) -> float:
    """s = t * lr / (N K): neural-tangents' gradient flow on the mean squared loss."""
    t = _time(t)
    lr = validation.number(lr, "lr", positive=True)
    return INF if t == INF else t * lr / n_targets


def _symmetric(c: np.ndarray) -> np.ndarray:
    return (c + c.T) / 2


# ---------------------------------------------------------------------------------------
# Predictions from kernel matrices.
# ---------------------------------------------------------------------------------------
def nngp_ensemble(k_train, k_test_train, y, k_test=None, t=INF, lr: float = 1.0, reg: float = 0.0) -> Gaussian:
    """Gradient descent on the readout alone, from the NNGP prior, at time t (module
    docstring): mean K_{*X} g_s(K_r) Y, cov K_{**} - K_{*X} g_{2s}(K_r) K_{X*}.  At t = inf
    (default) this is the exact Bayesian posterior of the NNGP with noise variance
    reg * mean(diag K).  ``k_test`` (k(X_test, X_test)) is needed for the covariance only."""
    k_train = _kernel_matrix(k_train, "k_train")
    n = k_train.shape[0]
    y = _targets(y, n)
    k_test_train = _block(k_test_train, "k_test_train", (None, n), "k(X_test, X_train)")
    s = _scaled_time(t, lr, y.size)
    filt, filt2 = descent_filters(k_train, reg, s, 2 * s)  # 2 * inf = inf: the same filter
    mean = _like(k_test_train @ filt.apply(_column(y)), y)
    cov = None
    if k_test is not None:
        nt = k_test_train.shape[0]
        k_test = _kernel_matrix(_block(k_test, "k_test", (nt, nt), "k(X_test, X_test)"), "k_test")
        cov = _symmetric(k_test - _between(filt2, k_test_train))
    return _checked(Gaussian(mean, cov, filt.condition, filt.method), "nngp")


def ntk_ensemble(ntk_train, ntk_test_train, y, nngp_train=None, nngp_test_train=None, nngp_test=None,
                 t=INF, lr: float = 1.0, reg: float = 0.0) -> Gaussian:
    """An infinite ensemble of infinitely wide networks trained by gradient descent on the
    squared loss, at time t, over random initializations (module docstring): mean
    Theta_{*X} g_s(Theta_r) Y; cov K_{**} + A^T K A - A^T K_{X*} - K_{*X} A with
    A = g_s(Theta_r) Theta_{X*} (needs the three NNGP blocks; omit them for the mean only)."""
    ntk_train = _kernel_matrix(ntk_train, "ntk_train")
    n = ntk_train.shape[0]
    y = _targets(y, n)
    ntk_test_train = _block(ntk_test_train, "ntk_test_train", (None, n), "Theta(X_test, X_train)")
    nt = ntk_test_train.shape[0]
    filt = descent_filter(ntk_train, _scaled_time(t, lr, y.size), reg, name="ntk_train")
    mean = _like(ntk_test_train @ filt.apply(_column(y)), y)
    given = [k is not None for k in (nngp_train, nngp_test_train, nngp_test)]
    cov = None
    if any(given):
        if not all(given):
            raise validation.ArgumentError("nngp_train, nngp_test_train, nngp_test: the NTK ensemble's covariance needs "
                                           "all three NNGP blocks (give none of them for the mean only)")
        K = _kernel_matrix(nngp_train, "nngp_train")
        if K.shape != (n, n):
            raise validation.ArgumentError(f"nngp_train: expected shape {(n, n)} like ntk_train, got {K.shape}")
        K_tx = _block(nngp_test_train, "nngp_test_train", (nt, n), "K(X_test, X_train)")
        K_tt = _kernel_matrix(_block(nngp_test, "nngp_test", (nt, nt), "K(X_test, X_test)"), "nngp_test")
        A = _filtered_block(filt, ntk_test_train)
        cross = A.T @ K_tx.T
        cov = _symmetric(K_tt + A.T @ K @ A - cross - cross.T)
    return _checked(Gaussian(mean, cov, filt.condition, filt.method), "ntk")


def gradient_descent_mean(k_train, k_test_train, y, t=INF, lr: float = 1.0, reg: float = 0.0) -> np.ndarray:
    """The mean prediction of gradient descent on the squared loss with kernel k at time t,
    k_{*X} g_s(k_r) Y (the NTK: the ensemble mean; the NNGP: readout-only training)."""
    return nngp_ensemble(k_train, k_test_train, y, None, t, lr, reg).mean


def gp_posterior(k_train, k_test_train, y, k_test=None, reg: float = 0.0) -> Gaussian:
    """Exact Bayesian inference with prior covariance k and Gaussian noise of variance
    reg * mean(diag k): mean k_{*X} k_r^{-1} Y, cov k_{**} - k_{*X} k_r^{-1} k_{X*}."""
    return nngp_ensemble(k_train, k_test_train, y, k_test, INF, 1.0, reg)


def prediction_kernels(get, cov: bool) -> tuple[str, ...]:
    """The kernels that the predictions ``get`` names (``ir.ntk.kernel_names``: "nngp", "ntk",
    both; None: both) read, in KERNELS' order: each prediction its own kernel, and the NTK
    ensemble's covariance (``cov``) the NNGP too."""
    asked = kernel_names(get)
    return kernel_names(asked + ("nngp",)) if cov and "ntk" in asked else asked


def predict(train: dict, test_train: dict, y, test: dict | None = None, t=INF, lr: float = 1.0,
            reg: float = 0.0, get=None) -> dict[str, Gaussian]:
    """The predictions ``get`` asks for ("nngp", "ntk", both as a tuple or a comma-separated
    string; None: both, as neural-tangents' ``predict_fn(get=...)``) from kernel dictionaries
    {"nngp", "ntk"} (as ``tp.compile(...).kernels`` returns them): train = k(X, X),
    test_train = k(X_test, X), test = k(X_test, X_test) (only its "nngp", and only for the
    covariances).  {"nngp": Gaussian, "ntk": Gaussian} with the asked keys alone, in that
    order.  The dictionaries need only the kernels read (``prediction_kernels``): the NNGP
    prediction its "nngp", the NTK mean (test None) its "ntk", the NTK covariance both."""
    asked = kernel_names(get)
    needed = prediction_kernels(asked, test is not None)
    for name, d, kinds in (("train", train, needed), ("test_train", test_train, needed), ("test", test, ("nngp",))):
        missing = [k for k in kinds if d is not None and k not in d]
        if missing:
            why = ("; the NTK ensemble's covariance reads the NNGP (give test=None for its mean alone)"
                   if "nngp" in missing and "nngp" not in asked else "")
            raise validation.ArgumentError(f"{name}: needs the kernel{'s' if len(missing) > 1 else ''} "
                                           f"{', '.join(map(repr, missing))} (a dict like tp.compile(p).kernels "
                                           f"returns){why}")
    nngp_test = None if test is None else test["nngp"]
    out = {}
    if "nngp" in asked:
        out["nngp"] = nngp_ensemble(train["nngp"], test_train["nngp"], y, nngp_test, t, lr, reg)
    if "ntk" in asked:
        out["ntk"] = ntk_ensemble(train["ntk"], test_train["ntk"], y,
                                  *((train["nngp"], test_train["nngp"], nngp_test) if test is not None else ()),
                                  t=t, lr=lr, reg=reg)
    return out


def predict_program(program, X, Y, X_test, t=INF, lr: float = 1.0, reg: float = 0.0, cov: bool = True,
                    rtol: float = 1e-10, get=None) -> dict[str, Gaussian]:
    """``predict`` with the kernels of ``program`` (a tp.Program, or ``tp.compile``'s result)
    on training inputs X (N x d), targets Y (N or N x K) and test inputs X_test: one kernel
    evaluation on the stacked inputs when ``cov`` (all three blocks), else k(X, X) and
    k(X_test, X).  ``get``: the predictions to make (``predict``; None: both), for which only
    the kernels they read are derived and computed (``prediction_kernels``): "nngp" the NNGP
    alone (a tp.Program is compiled with ``get="nngp"``, without its backward pass), "ntk"
    with ``cov`` False the NTK alone, "ntk" with ``cov`` both.  A program compiled for the
    NNGP alone (``tp.compile(program, get="nngp")``) makes the NNGP prediction only."""
    from tpcompiler.backends.kernels.kernel import check_kernel_program
    from tpcompiler.compiler import Compiled, compile, graph_of, network_rows

    cov = validation.flag(cov, "cov")
    needed = prediction_kernels(get, cov)
    if not isinstance(program, Compiled):
        check_kernel_program(graph_of(program))  # (before tp.compile, whose passes can take seconds)
    compiled = program if isinstance(program, Compiled) else compile(program, get=needed)
    # (a tp.layers program takes inputs of shape (N, *input_shape) too, as its kernels do)
    X = validation.array(network_rows(compiled.source, X, "X"), "X", ndim=2, min_rows=1)
    X_test = validation.array(network_rows(compiled.source, X_test, "X_test"), "X_test", ndim=2, min_rows=1)
    if X_test.shape[1] != X.shape[1]:
        raise validation.ArgumentError(f"X_test: has {X_test.shape[1]} columns but X has {X.shape[1]}")
    n = X.shape[0]
    if cov:
        k = compiled.kernels(np.concatenate([X, X_test]), rtol=rtol, get=needed)
        train = {g: k[g][:n, :n] for g in needed}
        test_train = {g: k[g][n:, :n] for g in needed}
        test = {g: k[g][n:, n:] for g in needed}
    else:
        k = compiled.kernels(X, X_test, rtol=rtol, get=needed)
        train = {g: k[g] for g in needed}
        test_train = {g: k[g + "_x2"] for g in needed}
        test = None
    return predict(train, test_train, Y, test, t, lr, reg, get)


def gradient_descent_mse_ensemble(kernel_fn: Callable, x_train, y_train, learning_rate: float = 1.0,
                                  diag_reg: float = 0.0) -> Callable:
    """neural-tangents' ``nt.predict.gradient_descent_mse_ensemble`` with its arguments and
    results (not its ``diag_reg_absolute_scale``, ``trace_axes`` or keyword arguments for the
    kernel function), so that a script written for it runs with ``tp.layers`` kernels
    (``net.kernel_fn(input_shape)``) or any ``kernel_fn(x1, x2, get)`` that returns a named
    tuple of the kernels a tuple ``get`` names.  Returns
    ``predict_fn(t=None, x_test=None, get=None, compute_cov=False)``:

    * ``t``: the training time (None or inf: the end of training); an array of times puts its
      shape in front of every result;
    * ``x_test``: the inputs to predict at; None: neural-tangents' train-set predictions, which
      treat the regularizer as part of the training kernel: at the end of training the targets
      themselves with covariance 0, at time t the mean (I - exp(-K_r s)) Y and the covariance
      K_r exp(-2 K_r s) (NNGP) or exp(-Theta_r s) K exp(-Theta_r s) (NTK, K the NNGP without
      the regularizer; module docstring: K_r, s);
    * ``get``: "nngp" or "ntk" for that prediction alone (its mean, N_test x K for N x K
      targets and N_test for N targets, or with ``compute_cov`` a ``Gaussian`` that unpacks as
      ``mean, covariance``), a tuple (or None: both) for a named tuple of them in that order
      (a name given twice counts once);
    * the conventions (learning rate, ``diag_reg`` relative to the mean of the training
      kernel's diagonal) are ``predict``'s, which are neural-tangents' (module docstring).

    Only the kernels the asked predictions read are computed (``prediction_kernels``); the
    training kernels once for all calls, and each is decomposed once for all the times of a
    call (``shared_decompositions``), as neural-tangents does."""
    if not callable(kernel_fn):
        raise validation.ArgumentError(f"kernel_fn: expected a function kernel_fn(x1, x2, get) (as net.kernel_fn(shape) "
                                       f"returns), got {type(kernel_fn).__name__}")
    learning_rate = validation.number(learning_rate, "learning_rate", positive=True)
    diag_reg = validation.number(diag_reg, "diag_reg", nonnegative=True)
    y_train = validation.array(y_train, "y_train", ndim=(1, 2))
    _some_rows(x_train, "x_train")
    if y_train.shape[0] != len(x_train):
        raise validation.ArgumentError(f"y_train: has {y_train.shape[0]} rows but x_train has {len(x_train)} inputs "
                                       "(one target row per training input)")
    train: dict = {}  # kernel name -> k(x_train, x_train), computed when first needed

    def kernels(x1, x2, names: tuple) -> dict:
        out = kernel_fn(x1, x2, tuple(names))
        return {g: np.asarray(getattr(out, g), dtype=np.float64) for g in names}

    def predict_fn(t=None, x_test=None, get=None, compute_cov: bool = False):
        if x_test is not None:
            _some_rows(x_test, "x_test")
        asked = asked_kernels(get)
        cov = validation.flag(compute_cov, "compute_cov")
        shape, times = _times(t)
        needed = prediction_kernels(asked, cov)
        missing = tuple(g for g in needed if g not in train)
        if missing:
            train.update(kernels(x_train, None, missing))
        with shared_decompositions():  # (one per training kernel for all the times)
            if x_test is None:
                runs = [{g: _train_set_prediction(g, train, y_train, time, learning_rate, diag_reg, cov)
                         for g in asked} for time in times]
            else:
                test_train = kernels(x_test, x_train, needed)
                test = kernels(x_test, None, ("nngp",)) if cov else None
                runs = [predict({g: train[g] for g in needed}, test_train, y_train, test, t=time, lr=learning_rate,
                                reg=diag_reg, get=asked) for time in times]

        def result(g: str):
            def stacked(arrays):
                return arrays[0] if shape is None else np.stack(arrays).reshape(shape + arrays[0].shape)
            mean = stacked([r[g].mean for r in runs])
            if not cov:
                return mean
            return Gaussian(mean, stacked([r[g].cov for r in runs]), runs[0][g].condition, runs[0][g].method)

        return as_asked(get, {g: result(g) for g in asked}, "Predictions")

    return predict_fn


def _some_rows(x, name: str) -> None:
    """Refuse an input set without rows under the caller's name (the kernel function would name
    its own argument)."""
    if not np.shape(x) or np.shape(x)[0] == 0:
        raise validation.ArgumentError(f"{name}: the input set is empty (shape {np.shape(x)}); give at least one input")


def _times(t) -> tuple[tuple | None, list[float]]:
    """(the shape of an array of times, None for one time; the times, each checked)."""
    if t is None or isinstance(t, (numbers.Number, np.generic, str)):
        return None, [_time(t)]
    if np.ndim(t) == 0 and hasattr(t, "dtype"):  # a 0-d array (numpy's, jax's)
        return None, [_time(t.item() if hasattr(t, "item") else float(t))]
    raw = np.asarray(t)
    if raw.dtype.kind not in "iuf":  # (None read as nan, complex numbers as a TypeError, strings as numbers)
        bad = next((x for x in raw.ravel().tolist() if isinstance(x, bool) or not isinstance(x, numbers.Real)), None)
        raise validation.ArgumentError(f"t: an array of times must hold real numbers (np.inf for the end of "
                                       f"training), got {bad!r} in it")
    times = raw.astype(np.float64)
    if times.size == 0:
        raise validation.ArgumentError(f"t: is an empty array of times (shape {times.shape}); give a time, None "
                                       "(the end of training) or a non-empty array")
    return times.shape, [_time(float(x)) for x in times.ravel()]


def _train_set_prediction(g: str, train: dict, y: np.ndarray, t: float, lr: float, reg: float,
                          cov: bool) -> Gaussian:
    """neural-tangents' prediction ``g`` on the training inputs (``gradient_descent_mse_ensemble``
    with x_test None): at t = inf the targets with covariance 0; at time t the test-set
    formulas with the regularized training kernel as the test kernels of ``g`` (the NTK's
    covariance reads the NNGP without the regularizer): mean (I - exp(-K_r s)) Y, covariance
    K_r exp(-2 K_r s), or exp(-Theta_r s) K exp(-Theta_r s)."""
    if t == INF:
        n = len(y)
        at_end = descent_filter(_kernel_matrix(train[g], f"{g}_train"), INF, reg, name=f"{g}_train")
        return Gaussian(np.array(y, dtype=np.float64), np.zeros((n, n)) if cov else None, at_end.condition,
                        at_end.method)
    k_reg = regularized(train[g], reg)
    if g == "nngp":
        return nngp_ensemble(train["nngp"], k_reg, y, k_reg if cov else None, t, lr, reg)
    nngp = (train["nngp"],) * 3 if cov else ()
    return ntk_ensemble(train["ntk"], k_reg, y, *nngp, t=t, lr=lr, reg=reg)


def _column(y: np.ndarray) -> np.ndarray:
    return y[:, None] if y.ndim == 1 else y


def _like(mean: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The mean with the targets' rank: (N_test,) for targets (N,), else (N_test, K)."""
    return mean[:, 0] if y.ndim == 1 else mean


def _checked(g: Gaussian, kind: str) -> Gaussian:
    """Never NaN: a non-finite result means the kernels themselves overflowed."""
    for name, value in (("mean", g.mean), ("cov", g.cov)):
        if value is not None and not np.all(np.isfinite(value)):
            raise validation.ArgumentError(f"{kind} {name}: is not finite (condition number {g.condition:.3g}, "
                                           f"{g.method}); the kernels are too large for float64: rescale the targets "
                                           "or the inputs, or raise reg")
    return g
