"""Tests of the finite-width reference network (docs/DESIGN.md 2.6): tpcompiler.finite_training."""
import math

import numpy as np
import pytest
import sympy as sp

from tpcompiler.training.finite import (
    Params,
    batch_indices,
    forward,
    init_params,
    loss_and_grads,
    train_many,
    train_mlp,
)

HALF = sp.Rational(1, 2)


def mup(depth):
    return [-HALF] + [0] * (depth - 1) + [HALF], [HALF] * (depth + 1), 0


def ntp(depth):
    return [0] + [HALF] * depth, [0] * (depth + 1), 0


def data(N=4, d=3, K=None, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    Y = rng.standard_normal(N if K is None else (N, K))
    return X, Y


# ------------------------------------------------------------------------------------------
# batch schedule
# ------------------------------------------------------------------------------------------
def test_batch_indices_full_batch():
    for t in range(4):
        np.testing.assert_array_equal(batch_indices(5, None, t), np.arange(5))
        np.testing.assert_array_equal(batch_indices(5, 5, t), np.arange(5))


def test_batch_indices_cycle():
    got = [batch_indices(5, 2, t).tolist() for t in range(6)]
    assert got == [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4], [0, 1]]
    assert [batch_indices(3, 1, t).tolist() for t in range(4)] == [[0], [1], [2], [0]]
    # B dividing N: consecutive blocks, each example once per epoch
    epoch = np.concatenate([batch_indices(6, 3, t) for t in range(2)])
    np.testing.assert_array_equal(epoch, np.arange(6))


@pytest.mark.parametrize("N,B,t", [(5, 0, 0), (5, 6, 0), (0, None, 0), (5, 2, -1)])
def test_batch_indices_rejects(N, B, t):
    with pytest.raises(ValueError):
        batch_indices(N, B, t)


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------
def _fd_check(params, X, Y, phi, a, eps=1e-6):
    loss, grads = loss_and_grads(params, X, Y, phi=phi, a=a)
    tensors = list(zip(params.weights, grads.weights))
    if params.biases is not None:
        tensors += list(zip(params.biases, grads.biases))
    for p, g in tensors:
        fd = np.empty_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + eps
            lp = loss_and_grads(params, X, Y, phi=phi, a=a)[0]
            p[idx] = old - eps
            lm = loss_and_grads(params, X, Y, phi=phi, a=a)[0]
            p[idx] = old
            fd[idx] = (lp - lm) / (2 * eps)
        rel = np.linalg.norm(fd - g) / np.linalg.norm(g)
        assert rel < 1e-6, rel
    return loss


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("param", [mup, ntp])
def test_gradient_finite_differences(depth, param):
    a, b, _ = param(depth)
    X, Y = data(N=4, d=3, seed=depth)
    params = init_params(3, 7, depth, w_std=1.3, b=b, seed=1)
    _fd_check(params, X, Y, "tanh", a)


def test_gradient_finite_differences_biases_and_vector_output():
    depth = 2
    a, b, _ = ntp(depth)
    X, Y = data(N=3, d=3, K=2, seed=5)
    params = init_params(3, 7, depth, w_std=1.1, b=b, seed=2, out_dim=2, b_std=0.4)
    _fd_check(params, X, Y, "tanh", a)


def test_training_step_applies_the_gradient():
    """train_mlp's in-place update equals w - lr n^{-c} dLoss/dw (minibatch, biases, K = 2)."""
    depth, n, lr, c = 3, 9, 0.3, sp.Rational(1, 3)
    a, b, _ = mup(depth)
    X, Y = data(N=5, d=3, K=2, seed=3)
    kw = dict(depth=depth, phi="tanh", w_std=1.2, a=a, b=b, c=c, lr=lr, width=n, seed=4,
              b_std=0.5)
    res = train_mlp(X, Y, steps=1, batch=2, return_params=True, **kw)
    p0 = init_params(3, n, depth, w_std=1.2, b=b, seed=4, out_dim=2, b_std=0.5)
    rows = batch_indices(5, 2, 0)
    loss, g = loss_and_grads(p0, X[rows], Y[rows], phi="tanh", a=a)
    step = lr * n ** -float(c)
    for p1, p, gw in zip(res.params.weights + res.params.biases, p0.weights + p0.biases,
                         g.weights + g.biases):
        np.testing.assert_allclose(p1, p - step * gw, rtol=1e-12, atol=1e-15)
    assert res.loss[0] == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(res.f_train[1], forward(res.params, X, phi="tanh", a=a),
                               rtol=1e-12)


# ------------------------------------------------------------------------------------------
# exact identities
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("param", [mup, ntp])
@pytest.mark.parametrize("t", [HALF, sp.Rational(-1, 3), 0.25])
def test_abc_symmetry(depth, param, t):
    a, b, c = param(depth)
    X, Y = data(N=4, d=3, seed=7)
    Xe = np.random.default_rng(8).standard_normal((3, 3))
    kw = dict(depth=depth, phi="tanh", w_std=1.0, lr=0.5, steps=4, width=64, seed=11,
              X_eval=Xe)
    r0 = train_mlp(X, Y, a=a, b=b, c=c, **kw)
    r1 = train_mlp(X, Y, a=[x + t for x in a], b=[x - t for x in b], c=c - 2 * t, **kw)
    assert np.all(np.abs(r0.f_train[-1] - r0.f_train[0]) > 1e-6)  # training did something
    for f0, f1 in [(r0.f_train, r1.f_train), (r0.f_eval, r1.f_eval)]:
        np.testing.assert_allclose(f1, f0, rtol=1e-10, atol=1e-14 * np.abs(f0).max())
    np.testing.assert_allclose(r1.loss, r0.loss, rtol=1e-10)


def test_ntp_init_is_neural_tangents_function():
    """NTP at init: f = (w_std/sqrt n) v phi((w_std/sqrt n) W2 phi((w_std/sqrt d) W1 x)),
    with W's standard normal, drawn in the documented order."""
    depth, n, d, w_std = 2, 50, 3, 1.7
    a, b, c = ntp(depth)
    X, Y = data(N=4, d=d)
    res = train_mlp(X, Y, depth=depth, phi="tanh", w_std=w_std, a=a, b=b, c=c, lr=1.0,
                    steps=0, width=n, seed=3)
    rng = np.random.default_rng(3)
    W1, W2, v = rng.standard_normal((n, d)), rng.standard_normal((n, n)), rng.standard_normal(n)
    x1 = np.tanh(w_std / np.sqrt(d) * X @ W1.T)
    x2 = np.tanh(w_std / np.sqrt(n) * x1 @ W2.T)
    f = w_std / np.sqrt(n) * x2 @ v
    assert res.f_train.shape == (1, 4)
    np.testing.assert_allclose(res.f_train[0], f, rtol=1e-12)


def test_ntp_linear_depth1_one_step_closed_form():
    n, d, N, w_std, lr = 40, 3, 5, 1.3, 0.7
    a, b, c = ntp(1)
    X, Y = data(N=N, d=d, seed=2)
    res = train_mlp(X, Y, depth=1, phi="identity", w_std=w_std, a=a, b=b, c=c, lr=lr,
                    steps=1, width=n, seed=9)
    # f(x) = (1/sqrt n) v . (U x / sqrt d), U = w_std G1 (n x d), v = w_std g2, written out.
    rng = np.random.default_rng(9)
    U = w_std * rng.standard_normal((n, d))
    v = w_std * rng.standard_normal(n)
    Xs = X / np.sqrt(d)

    def f(U, v):
        return (Xs @ U.T @ v) / np.sqrt(n)

    r = (f(U, v) - Y) / N                          # dLoss/df_i
    dv = (U @ Xs.T @ r) / np.sqrt(n)               # sum_i r_i U x_i / sqrt(n d)
    dU = np.outer(v, Xs.T @ r) / np.sqrt(n)        # sum_i r_i v x_i^T / sqrt(n d)
    np.testing.assert_allclose(res.f_train[0], f(U, v), rtol=1e-12)
    np.testing.assert_allclose(res.f_train[1], f(U - lr * dU, v - lr * dv), rtol=1e-11)
    assert res.loss[0] == pytest.approx(0.5 * np.mean((f(U, v) - Y) ** 2), rel=1e-12)


def test_mup_linear_depth1_loss_decreases():
    a, b, c = mup(1)
    X, Y = data(N=6, d=4, seed=4)
    res = train_mlp(X, Y, depth=1, phi="identity", w_std=1.0, a=a, b=b, c=c, lr=0.05,
                    steps=20, width=256, seed=0)
    assert np.all(np.diff(res.loss) < 0)
    full_loss = 0.5 * np.mean((res.f_train - Y) ** 2, axis=1)
    np.testing.assert_allclose(full_loss[:-1], res.loss, rtol=1e-12)  # full batch
    assert full_loss[-1] < 0.9 * full_loss[0]


# ------------------------------------------------------------------------------------------
# shapes, options, reproducibility
# ------------------------------------------------------------------------------------------
def test_shapes_features_and_eval():
    depth, n = 2, 32
    a, b, c = mup(depth)
    X, Y = data(N=5, d=3)
    Xe = np.random.default_rng(1).standard_normal((3, 3))
    kw = dict(depth=depth, phi="relu", w_std=1.0, a=a, b=b, c=c, lr=0.2, steps=3, width=n,
              seed=0, batch=2)
    r = train_mlp(X, Y, X_eval=np.concatenate([X, Xe]), record_features=True,
                  return_params=True, **kw)
    assert r.f_train.shape == (4, 5) and r.f_eval.shape == (4, 8) and r.loss.shape == (3,)
    np.testing.assert_allclose(r.f_eval[:, :5], r.f_train, rtol=1e-13)
    assert r.features_last.shape == (4, 8, 8) and r.features_first.shape == (4, 8, 8)
    # last step's feature kernel from the final parameters
    Z = np.concatenate([X, Xe]) / np.sqrt(3)
    x1 = np.maximum(Z @ r.params.weights[0].T * n ** 0.5, 0)
    x2 = np.maximum(x1 @ r.params.weights[1].T, 0)
    np.testing.assert_allclose(r.features_first[-1], x1 @ x1.T / n, rtol=1e-12)
    np.testing.assert_allclose(r.features_last[-1], x2 @ x2.T / n, rtol=1e-12)
    # same seed, same result (to BLAS rounding: X_eval changes the matmul shapes);
    # Y (N, 1) gives the (N,) run with a trailing axis
    r2 = train_mlp(X, Y[:, None], **kw)
    assert r2.f_train.shape == (4, 5, 1)
    np.testing.assert_allclose(r2.f_train[..., 0], r.f_train, rtol=1e-12)
    # features default to X when there is no X_eval
    r3 = train_mlp(X, Y, record_features=True, **kw)
    assert r3.f_eval is None and r3.features_last.shape == (4, 5, 5)


def test_train_many_stacks_seeds():
    a, b, c = ntp(1)
    X, Y = data(N=3, d=2)
    m = train_many(X, Y, seeds=[0, 1, 2], depth=1, phi="erf", w_std=1.0, a=a, b=b, c=c,
                   lr=0.5, steps=2, width=16, X_eval=X[:2])
    assert m.f_train.shape == (3, 3, 3) and m.f_eval.shape == (3, 3, 2)
    np.testing.assert_allclose(m.f_eval_mean, m.f_eval.mean(0))
    np.testing.assert_allclose(m.f_eval_stderr, m.f_eval.std(0, ddof=1) / math.sqrt(3))
    single = train_mlp(X, Y, depth=1, phi="erf", w_std=1.0, a=a, b=b, c=c, lr=0.5, steps=2,
                       width=16, seed=1, X_eval=X[:2])
    np.testing.assert_array_equal(m.f_train[1], single.f_train)


def test_bad_arguments():
    X, Y = data()
    a, b, c = mup(2)
    kw = dict(phi="tanh", w_std=1.0, c=c, lr=0.1, steps=1, width=8, seed=0)
    with pytest.raises(ValueError, match="depth \\+ 1"):
        train_mlp(X, Y, depth=2, a=a[:2], b=b, **kw)
    with pytest.raises(ValueError, match="batch size"):
        train_mlp(X, Y, depth=2, a=a, b=b, batch=9, **kw)
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        train_mlp(X, Y, depth=2, a=a, b=b, **{**kw, "phi": "nope"})
