"""Replica-parallel BLAS of the step engine (tpcompiler/training/replicas.py) and the in-place
triangular solve: the threaded path computes what the batched numpy path computes (every
replica by the same single-threaded BLAS), and the solve on a block of a larger buffer is the
textbook triangular solve (scipy.linalg.solve_triangular on the extracted block)."""
import numpy as np
import pytest
import scipy.linalg

import tpcompiler as tp
from tpcompiler.training import algebra, replicas
from tpcompiler.training.engine import StepEngine
from pathlib import Path

PROGRAMS = Path(__file__).resolve().parent.parent / "programs"


@pytest.fixture(params=[False, True], ids=["serial", "threads"])
def threads(request, monkeypatch):
    """Run a test once below and once above the threading threshold."""
    monkeypatch.setattr(replicas, "PARALLEL_WORK", 0 if request.param else float("inf"))
    return request.param


def _buffer(rng, R, cap, F):
    """(R, cap, cap) buffers whose leading F x F blocks are well-conditioned lower Cholesky
    factors; everything outside the blocks (including their upper triangles) is garbage the
    solve must not read."""
    L = rng.standard_normal((R, cap, cap))
    for r in range(R):
        A = rng.standard_normal((F, F))
        L[r, :F, :F] = np.linalg.cholesky(A @ A.T / F + np.eye(F)) + np.triu(rng.standard_normal((F, F)), 1)
    return L


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("R,cap,F,N", [(3, 40, 33, 8), (2, 12, 12, 1), (4, 9, 5, 3)])
def test_triangular_solve_on_a_block_of_a_larger_buffer(threads, transpose, R, cap, F, N):
    rng = np.random.default_rng(R * cap + F)
    L = _buffer(rng, R, cap, F)
    rhs = rng.standard_normal((R, F, N))
    X = algebra.triangular_solve(L, F, rhs, transpose)
    for r in range(R):
        ref = scipy.linalg.solve_triangular(np.tril(L[r, :F, :F]), rhs[r], lower=True, trans=1 if transpose else 0)
        np.testing.assert_allclose(X[r], ref, rtol=0, atol=1e-12)


def test_triangular_solve_refuses_a_buffer_it_cannot_read_in_place():
    L = np.zeros((2, 6, 6))[:, :, :5]
    with pytest.raises(ValueError, match="C-contiguous"):
        algebra.triangular_solve(L, 3, np.zeros((2, 3, 1)), False)


def test_threaded_gram_and_combine_equal_the_batched_products(monkeypatch):
    rng = np.random.default_rng(7)
    alg = algebra.Particles(5, 300, rng)
    A, B, C = rng.standard_normal((5, 40, 300)), rng.standard_normal((5, 6, 300)), rng.standard_normal((5, 40, 6))
    monkeypatch.setattr(replicas, "PARALLEL_WORK", float("inf"))
    g0, c0, h0 = alg.gram(A, B), alg.combine(C, A), alg.gram(B, A)
    monkeypatch.setattr(replicas, "PARALLEL_WORK", 0)
    g1, c1, h1 = alg.gram(A, B), alg.combine(C, A), alg.gram(B, A)
    np.testing.assert_allclose(h1, np.swapaxes(g1, 1, 2), rtol=0, atol=1e-12)  # few members, many vectors
    np.testing.assert_allclose(h1, h0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(g1, np.einsum("rfd,rnd->rfn", A, B) / 300, rtol=0, atol=1e-12)
    np.testing.assert_allclose(g1, g0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c1, np.einsum("rfn,rfd->rnd", C, A), rtol=0, atol=1e-12)
    np.testing.assert_allclose(c1, c0, rtol=0, atol=1e-12)


def test_threaded_matmul_equals_numpy(monkeypatch):
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((3, 5, 7)), rng.standard_normal((3, 4, 7))
    monkeypatch.setattr(replicas, "PARALLEL_WORK", 0)
    np.testing.assert_allclose(replicas.matmul(a, np.swapaxes(b, 1, 2)), np.einsum("rpq,rsq->rps", a, b), rtol=0, atol=1e-13)


@pytest.mark.parametrize("method,options", [("particles", dict(particles=4000)), ("finite", dict(width=64, seeds=3))])
def test_a_run_is_the_same_with_and_without_threads(monkeypatch, method, options):
    """Depth-3 tanh muP, 6 steps of batch 4: every product (families' Grams, solves and Stein
    estimates; at finite width the initial matrices' products) goes through the threaded path in
    one run and the batched path in the other."""
    net = tp.load(PROGRAMS / "mlp.py", depth=3, phi="tanh", w_std=1.0, b_std=None, d=4)
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((8, 4)), rng.standard_normal((8, 1))
    out = []
    for work in (float("inf"), 0):
        monkeypatch.setattr(replicas, "PARALLEL_WORK", work)
        eng = StepEngine(net, tp.named("mup", 3), method=method, seed=5, **options)
        for t in range(6):
            eng.step(X[4 * (t % 2):4 * (t % 2) + 4], Y[4 * (t % 2):4 * (t % 2) + 4], 0.5)
        out.append(eng.predict(X))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=0, atol=1e-11)
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=0, atol=1e-11)


def test_a_forked_child_gets_its_own_worker_threads(monkeypatch):
    """A process forked after the pool started (multiprocessing, Dask workers) must not wait on
    threads that exist only in its parent."""
    import multiprocessing

    monkeypatch.setattr(replicas, "PARALLEL_WORK", 0)
    a = np.arange(24.0).reshape(2, 3, 4)
    replicas.matmul(a, np.swapaxes(a, 1, 2))  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_child_product).get(timeout=60)
    np.testing.assert_allclose(got, np.matmul(a, np.swapaxes(a, 1, 2)))


def _child_product():
    replicas.PARALLEL_WORK = 0
    a = np.arange(24.0).reshape(2, 3, 4)
    return replicas.matmul(a, np.swapaxes(a, 1, 2))
