"""Training the finite-width reference MLP (docs/DESIGN.md 2.6): the oracle for feature-learning limits.

The network, at width n, with L = ``depth`` hidden layers, input dimension d and K outputs::

    h^1     = n^{-a_1} w^1 xi / sqrt(d) (+ b^1)
    x^l     = phi(h^l)                              l = 1..L
    h^{l+1} = n^{-a_{l+1}} w^{l+1} x^l (+ b^{l+1})  l = 1..L-1
    f       = n^{-a_{L+1}} w^{L+1} x^L (+ b^{L+1})

with trained parameters w^1 (n x d), w^l (n x n), w^{L+1} (K x n), initialized
w^l_ij ~ N(0, sigma^2 n^{-2 b_l}) (sigma = ``w_std``).  The loss over a batch of B examples is
(1/B) sum_i ||f(xi_i) - y_i||^2 / 2 and every step updates all layers at once with the gradient
at the current parameters: w^l <- w^l - eta n^{-c} dLoss/dw^l.  Gradients are computed by
hand-written backpropagation in float64 numpy; the rank-B weight updates are applied in place,
block by block, so a step costs three passes over each weight matrix (forward, backward,
update) and no n x n temporary is allocated.

Random draws (a contract: tests reproduce it).  ``np.random.default_rng(seed)`` draws, in this
order, ``standard_normal((n, d))``, ``standard_normal((n, n))`` for l = 2..L and
``standard_normal((K, n))``, each then multiplied by sigma n^{-b_l}; then, only when ``b_std`` is
given, ``standard_normal(n)`` for l = 1..L and ``standard_normal(K)``, each times ``b_std``.  So the
weights do not depend on whether biases are used, and (a + t, b - t, c - 2t) reuses the same
standard normals (docs/DESIGN.md 2.4: the trajectory is then identical up to rounding).

Biases (a documented choice).  With ``b_std`` given, every layer l = 1..L+1 gets a bias b^l
(n-vector, or K-vector for the readout), b^l ~ N(0, b_std^2), added to h^l (to f for l = L+1)
with no width exponent, and trained with the same learning rate eta n^{-c} as the weights.  With
NTP exponents this is neural-tangents' ``Dense(W_std=sigma, b_std=b_std)`` (whose h is
(sigma / sqrt(fan_in)) W x + b_std beta, W, beta ~ N(0, 1)), where our trained bias is
b_std times its beta; the tangent kernel w.r.t. our trained parameters is neural-tangents' weight
contributions divided by sigma^2 plus its bias contributions divided by b_std^2 (the whole NTK
divided by sigma^2 when b_std = sigma).  Under muP (c = 0) hidden biases then move O(1/n) per
step, i.e. they are effectively frozen in the limit.

Nonlinearities come from :mod:`tpcompiler.ir.nonlinearities`.  Where phi' contains a Dirac delta
(phi = step) it is replaced by 0, its value almost everywhere (what automatic differentiation
does), so such a network simply does not train its hidden layers.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import sympy as sp

from tpcompiler import validation
from tpcompiler.ir.graph import ProgramError
from tpcompiler.ir.nonlinearities import NUMPY_FUNCTIONS, almost_everywhere, builtin

__all__ = [
    "batch_indices",
    "Params",
    "FiniteTrainResult",
    "ManyResult",
    "init_params",
    "forward",
    "loss_and_grads",
    "train_mlp",
    "train_many",
]


# ---------------------------------------------------------------------------------------------
# The batch schedule (shared with the infinite-width side: do not change its meaning).
# ---------------------------------------------------------------------------------------------
def batch_indices(N: int, B: int | None, t: int) -> np.ndarray:
    """Indices of the training examples used at SGD step ``t`` (0-based).

    This function IS the batch schedule of every training run in tpcompiler, finite or infinite
    width.  Full batch (``B is None`` or ``B == N``): all examples ``0..N-1`` at every step.
    Otherwise cyclic, without shuffling: step t uses ``(t * B + i) mod N`` for ``i = 0..B-1``,
    in that order (so with B dividing N the data are visited in consecutive blocks; an index can
    repeat inside one batch only if B > N, which is rejected).
    """
    N = int(N)
    if N < 1:
        raise ProgramError(f"need at least one training example, got N = {N}")
    if t < 0:
        raise ProgramError(f"step index must be >= 0, got t = {t}")
    if B is None or int(B) == N:
        return np.arange(N)
    B = int(B)
    if not 1 <= B <= N:
        raise ProgramError(f"batch size must be in 1..N = {N} (or None for full batch), got {B}")
    return (int(t) * B + np.arange(B)) % N


# ---------------------------------------------------------------------------------------------
# Nonlinearities: phi and phi' as numpy functions, from the sympy definition.
# ---------------------------------------------------------------------------------------------
_X = sp.Symbol("x", real=True)
_MODULES = [NUMPY_FUNCTIONS, "scipy", "numpy"]


@dataclass(frozen=True)
class _Phi:
    f: Callable[[np.ndarray], np.ndarray]
    df: Callable[[np.ndarray], np.ndarray] | None  # None: phi' is the constant df_const
    df_const: float
    is_identity: bool


def _lambdify(expr):
    return sp.lambdify(_X, expr, modules=_MODULES)


def _make_phi(fn) -> _Phi:
    expr = sp.sympify(fn(_X))
    dexpr = sp.diff(expr, _X)
    dexpr = almost_everywhere(dexpr)
    if dexpr.free_symbols:
        df, const = _lambdify(dexpr), 0.0
    else:
        df, const = None, float(dexpr)
    return _Phi(f=_lambdify(expr), df=df, df_const=const, is_identity=(expr == _X))


@functools.lru_cache(maxsize=None)
def _phi_by_name(name: str) -> _Phi:
    return _make_phi(builtin(name))


def _resolve_phi(phi) -> _Phi:
    """phi: a built-in name (``"tanh"``) or a function from a sympy expression to one."""
    if isinstance(phi, _Phi):
        return phi
    if isinstance(phi, str):
        return _phi_by_name(phi)
    if callable(phi):
        return _make_phi(phi)
    raise validation.ArgumentError(f"phi: expected a nonlinearity name or a sympy function, got {phi!r}")


# ---------------------------------------------------------------------------------------------
# Parameters.
# ---------------------------------------------------------------------------------------------
def _exponent(v, what: str) -> float:
    try:
        return float(sp.sympify(v))
    except (TypeError, ValueError, sp.SympifyError):
        raise ProgramError(f"{what} must be a number, got {v!r}") from None


def _exponents(seq, depth: int, what: str) -> list[float]:
    seq = list(seq)
    if len(seq) != depth + 1:
        raise ProgramError(
            f"{what} needs depth + 1 = {depth + 1} exponents (layers 1..L+1), got {len(seq)}"
        )
    return [_exponent(v, f"{what}[{i}]") for i, v in enumerate(seq)]


@dataclass
class Params:
    """Trained parameters: ``weights[l-1]`` is w^l; ``biases`` is None or ``biases[l-1]`` = b^l."""

    weights: list[np.ndarray]
    biases: list[np.ndarray] | None = None

    @property
    def width(self) -> int:
        return self.weights[0].shape[0]


def init_params(
    d: int,
    width: int,
    depth: int,
    *,
    w_std: float,
    b: Sequence,
    seed,
    out_dim: int = 1,
    b_std: float | None = None,
) -> Params:
    """Initial parameters, drawn in the order stated in the module docstring."""
    if depth < 1:
        raise ProgramError(f"depth (number of hidden layers) must be >= 1, got {depth}")
    n = int(width)
    if n < 1:
        raise ProgramError(f"width must be >= 1, got {width}")
    bs = _exponents(b, depth, "b")
    rng = np.random.default_rng(seed)
    shapes = [(n, d)] + [(n, n)] * (depth - 1) + [(out_dim, n)]
    weights = []
    for shape, bl in zip(shapes, bs):
        w = rng.standard_normal(shape)
        w *= float(w_std) * float(n) ** (-bl)
        weights.append(w)
    biases = None
    if b_std is not None:
        biases = [rng.standard_normal(s[0]) * float(b_std) for s in shapes]
    return Params(weights, biases)


# ---------------------------------------------------------------------------------------------
# Forward and backward passes (rows are examples).
# ---------------------------------------------------------------------------------------------
def _forward(params: Params, Z0: np.ndarray, phi: _Phi, scales: list[float]):
    """Pre-activations H[l] and activations A[l] (A[0] = Z0 = inputs / sqrt(d)); returns f too."""
    H: list[np.ndarray | None] = [None]
    A: list[np.ndarray] = [Z0]
    L = len(params.weights) - 1
    for l, (w, s) in enumerate(zip(params.weights, scales)):
        h = A[-1] @ w.T
        h *= s
        if params.biases is not None:
            h += params.biases[l]
        if l == L:
            return H, A, h
        H.append(h)
        A.append(h if phi.is_identity else phi.f(h))
    raise AssertionError("unreachable")


def _backward(params: Params, H, G: np.ndarray, phi: _Phi, scales: list[float], rows):
    """dLoss/dh^l for l = 1..L+1 (dH[l-1]), given G = dLoss/df on the batch ``rows``."""
    L = len(params.weights) - 1
    dH = [None] * (L + 1)
    dH[L] = G
    for l in range(L, 0, -1):  # dH[l] -> dH[l-1] through w^{l+1} = params.weights[l]
        dx = dH[l] @ params.weights[l]
        dx *= scales[l]
        if phi.df is None:
            if phi.df_const != 1.0:
                dx *= phi.df_const
        else:
            dx *= phi.df(H[l][rows])
        dH[l - 1] = dx
    return dH


def _prepare(X, Y, phi, a, depth):
    X = np.ascontiguousarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ProgramError(f"X must be (N, d), got shape {X.shape}")
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim not in (1, 2) or Y.shape[0] != X.shape[0]:
        raise ProgramError(f"Y must be (N,) or (N, K) with N = {X.shape[0]}, got shape {Y.shape}")
    Y2 = Y.reshape(Y.shape[0], -1)
    return X, Y, Y2, _resolve_phi(phi), _exponents(a, depth, "a")


def forward(params: Params, X, *, phi, a) -> np.ndarray:
    """Network outputs on X (N, d): shape (N, K)."""
    depth = len(params.weights) - 1
    X = np.ascontiguousarray(X, dtype=np.float64)
    phi_, n = _resolve_phi(phi), params.width
    scales = [float(n) ** (-al) for al in _exponents(a, depth, "a")]
    return _forward(params, X / math.sqrt(X.shape[1]), phi_, scales)[2]


def loss_and_grads(params: Params, X, Y, *, phi, a) -> tuple[float, Params]:
    """Loss (1/N) sum_i ||f(xi_i) - y_i||^2 / 2 over all rows of X, and its gradient w.r.t. params.

    The gradient is returned as a :class:`Params` of the same shapes (explicit n x n arrays:
    for tests and small networks; :func:`train_mlp` applies the same gradients in place).
    """
    depth = len(params.weights) - 1
    X, _, Y2, phi_, a_ = _prepare(X, Y, phi, a, depth)
    n, N = params.width, X.shape[0]
    scales = [float(n) ** (-al) for al in a_]
    H, A, f = _forward(params, X / math.sqrt(X.shape[1]), phi_, scales)
    r = f - Y2
    loss = 0.5 * float(np.sum(r * r)) / N
    dH = _backward(params, H, r / N, phi_, scales, slice(None))
    gw = [s * (g.T @ x) for s, g, x in zip(scales, dH, A)]
    gb = None if params.biases is None else [g.sum(axis=0) for g in dH]
    return loss, Params(gw, gb)


def _add_outer(w: np.ndarray, alpha: float, dh: np.ndarray, x: np.ndarray) -> None:
    """In place: w += alpha * dh^T x, with w (m, p) C-contiguous, dh (B, m), x (B, p).

    Done over blocks of rows of w with a ~2 MB temporary, so no m x p temporary is allocated
    and each block of w is read and written once while in cache.  (numpy's BLAS only: calling
    scipy's separately linked BLAS dgemm here was measured ~40% slower per step, its thread pool
    contending with numpy's.)
    """
    m, p = w.shape
    rows = max(1, _UPDATE_BLOCK_ELEMENTS // max(p, 1))
    for i in range(0, m, rows):
        tmp = dh[:, i:i + rows].T @ x
        tmp *= alpha
        w[i:i + rows] += tmp


_UPDATE_BLOCK_ELEMENTS = 1 << 18


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------
@dataclass
class FiniteTrainResult:
    """One finite-width training run.

    f_train: (T+1, N[, K]) outputs on X at init (index 0) and after each step (index t+1).
    f_eval:  (T+1, N_eval[, K]) likewise on X_eval, or None.  The trailing K axis is present
             exactly when Y was given 2-D.
    loss:    (T,) the batch loss (1/B) sum ||f - y||^2 / 2 minimized at step t (before its update).
    features_last / features_first: (T+1, M, M) feature kernels (1/n) x^L x^L^T and
             (1/n) x^1 x^1^T on X_eval (on X when X_eval is None), if record_features.
    params:  the final parameters, if return_params.
    """

    f_train: np.ndarray
    f_eval: np.ndarray | None
    loss: np.ndarray
    width: int
    seed: object
    batch: int
    a: list[float]
    b: list[float]
    c: float
    features_last: np.ndarray | None = None
    features_first: np.ndarray | None = None
    params: Params | None = field(default=None, repr=False)


def train_mlp(
    X,
    Y,
    *,
    depth: int,
    phi,
    w_std: float,
    a: Sequence,
    b: Sequence,
    c,
    lr: float,
    steps: int,
    width: int,
    seed,
    batch: int | None = None,
    X_eval=None,
    b_std: float | None = None,
    record_features: bool = False,
    return_params: bool = False,
) -> FiniteTrainResult:
    """Train the width-``width`` MLP of docs/DESIGN.md 2.6 by SGD for ``steps`` steps (float64).

    X (N, d); Y (N,) or (N, K); a, b: L+1 exponents each (numbers, strings or sympy Rationals);
    c: a number; phi: a built-in name or a sympy function.  Step t uses the examples
    ``batch_indices(N, batch, t)``.  See the module docstring for the exact network, the random
    draws and the bias convention.
    """
    # tpcompiler.validation: the same checks and messages as tp.SGD / tp.train
    depth = validation.count(depth, "depth", minimum=1)
    steps = validation.count(steps, "steps")
    width = validation.count(width, "width", minimum=1)
    lr = validation.number(lr, "lr", positive=True)
    w_std = validation.number(w_std, "w_std", nonnegative=True)
    if b_std is not None:
        b_std = validation.number(b_std, "b_std", nonnegative=True)
    batch = validation.optional_count(batch, "batch", minimum=1)
    if isinstance(seed, (numbers.Real, np.bool_)):
        seed = validation.count(seed, "seed")
    X = validation.array(X, "X", ndim=2)
    Y = validation.array(Y, "Y", ndim=(1, 2))
    X_eval = validation.optional_array(X_eval, "X_eval", ndim=2)
    X, Y, Y2, phi_, a_ = _prepare(X, Y, phi, a, depth)
    b_ = _exponents(b, depth, "b")
    c_ = _exponent(c, "c")
    N, d = X.shape
    K = Y2.shape[1]
    B = N if batch is None else int(batch)
    batch_indices(N, B, 0)  # validates B
    full = B == N

    if X_eval is not None:
        X_eval = np.ascontiguousarray(X_eval, dtype=np.float64)
        if X_eval.ndim != 2 or X_eval.shape[1] != d:
            raise ProgramError(f"X_eval must be (N_eval, {d}), got shape {X_eval.shape}")
        Z0 = np.concatenate([X, X_eval]) / math.sqrt(d)
    else:
        Z0 = X / math.sqrt(d)
    n = int(width)
    params = init_params(d, n, depth, w_std=w_std, b=b_, seed=seed, out_dim=K, b_std=b_std)
    scales = [float(n) ** (-al) for al in a_]
    step_size = float(lr) * float(n) ** (-c_)

    f_all = np.empty((steps + 1, Z0.shape[0], K))
    loss = np.empty(steps)
    feat_rows = slice(N, None) if X_eval is not None else slice(0, N)
    n_feat = Z0[feat_rows].shape[0]
    feats_last = np.empty((steps + 1, n_feat, n_feat)) if record_features else None
    feats_first = np.empty((steps + 1, n_feat, n_feat)) if record_features else None

    for t in range(steps + 1):
        H, A, f = _forward(params, Z0, phi_, scales)
        f_all[t] = f
        if record_features:
            xl, x1 = A[depth][feat_rows], A[1][feat_rows]
            feats_last[t] = (xl @ xl.T) / n
            feats_first[t] = (x1 @ x1.T) / n
        if t == steps:
            break
        rows = slice(0, N) if full else batch_indices(N, B, t)
        r = f[rows] - Y2[rows]
        loss[t] = 0.5 * float(np.sum(r * r)) / B
        # All dLoss/dh first (gradients at the current parameters), then all updates.
        dH = _backward(params, H, r / B, phi_, scales, rows)
        del H
        for l in range(depth + 1):
            _add_outer(params.weights[l], -step_size * scales[l], dH[l], A[l][rows])
            if params.biases is not None:
                params.biases[l] -= step_size * dH[l].sum(axis=0)
        del A, dH

    def shaped(arr):
        return arr if Y.ndim == 2 else arr[..., 0]

    return FiniteTrainResult(
        f_train=shaped(f_all[:, :N]),
        f_eval=shaped(f_all[:, N:]) if X_eval is not None else None,
        loss=loss,
        width=n,
        seed=seed,
        batch=B,
        a=a_,
        b=b_,
        c=c_,
        features_last=feats_last,
        features_first=feats_first,
        params=params if return_params else None,
    )


@dataclass
class ManyResult:
    """Runs over several seeds, stacked on a leading seed axis S.

    f_train (S, T+1, N[, K]), f_eval (S, T+1, N_eval[, K]) or None, loss (S, T), features_* (S,
    T+1, M, M) or None; *_mean and *_stderr are over seeds (stderr = sample std / sqrt(S), ddof 1;
    NaN when S = 1).
    """

    seeds: list
    f_train: np.ndarray
    f_eval: np.ndarray | None
    loss: np.ndarray
    f_train_mean: np.ndarray
    f_train_stderr: np.ndarray
    f_eval_mean: np.ndarray | None
    f_eval_stderr: np.ndarray | None
    features_last: np.ndarray | None = None
    features_first: np.ndarray | None = None


def _mean_stderr(x: np.ndarray):
    S = x.shape[0]
    mean = x.mean(axis=0)
    if S < 2:
        return mean, np.full_like(mean, np.nan)
    return mean, x.std(axis=0, ddof=1) / math.sqrt(S)


def train_many(X, Y, *, seeds: Sequence, **kwargs) -> ManyResult:
    """:func:`train_mlp` (same keywords, without ``seed``) once per seed, results stacked."""
    seeds = list(seeds)
    if not seeds:
        raise ProgramError("train_many needs at least one seed")
    if "seed" in kwargs:
        raise validation.ArgumentError("seed: train_many takes seeds=[...], not seed=")
    kwargs.pop("return_params", None)
    runs = [train_mlp(X, Y, seed=s, **kwargs) for s in seeds]

    def stack(name):
        vals = [getattr(r, name) for r in runs]
        return None if vals[0] is None else np.stack(vals)

    f_train, f_eval = stack("f_train"), stack("f_eval")
    ftm, fts = _mean_stderr(f_train)
    fem, fes = _mean_stderr(f_eval) if f_eval is not None else (None, None)
    return ManyResult(
        seeds=seeds,
        f_train=f_train,
        f_eval=f_eval,
        loss=stack("loss"),
        f_train_mean=ftm,
        f_train_stderr=fts,
        f_eval_mean=fem,
        f_eval_stderr=fes,
        features_last=stack("features_last"),
        features_first=stack("features_first"),
    )
