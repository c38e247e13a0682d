"""The step engine's row kernels (training/rowops.py) against numpy's fancy indexing, on both
table layouts, with rows longer than the vectors they meet and repeated indices where allowed."""
import numpy as np
import pytest

from tpcompiler.training.rowops import add_rows, decay_add_rows, row_dots, row_sums


def _tables(rng, K=7, R=2, D=6):
    """The same rows as (R, K, D) (replica first) and (K, R, D)."""
    A = rng.normal(size=(R, K, D))
    return A, np.ascontiguousarray(np.swapaxes(A, 0, 1))


@pytest.mark.parametrize("replica_first", [True, False])
def test_row_dots_and_sums_read_the_indexed_rows(replica_first):
    rng = np.random.default_rng(0)
    A, At = _tables(rng)
    table = A if replica_first else At
    idx = np.array([[3, 0, 3], [6, 1, 2]])                      # B = 2, a row read twice
    X = rng.normal(size=(2, 2, 4))                              # shorter than the rows (m = 4)
    expect = np.einsum("rbid,brd->bir", A[:, idx, :4], X)
    np.testing.assert_allclose(row_dots(table, replica_first, idx, X), expect, rtol=1e-14)
    W = rng.normal(size=(2, 3, 2))
    expect = np.einsum("bir,rbid->brd", W, A[:, idx])
    np.testing.assert_allclose(row_sums(table, replica_first, idx, W), expect, rtol=1e-14)


@pytest.mark.parametrize("replica_first", [True, False])
@pytest.mark.parametrize("keep", [1.0, 0.9])
def test_decay_add_and_add_rows_update_only_the_indexed_rows(replica_first, keep):
    rng = np.random.default_rng(1)
    A, At = _tables(rng)
    table = (A if replica_first else At).copy()
    idx = np.array([5, 2, 0])
    W, X, c = rng.normal(size=(3, 2, 2)), rng.normal(size=(2, 2, 4)), np.array([0.5, -2.0])
    expect = A.copy()
    expect[:, idx] *= keep
    expect[:, idx, :4] += np.einsum("ubr,brd->rud", W, X) * c[:, None, None]
    decay_add_rows(table, replica_first, idx, keep, W, X, c)
    got = table if replica_first else np.swapaxes(table, 0, 1)
    np.testing.assert_allclose(got, expect, rtol=1e-14, atol=1e-15)
    inc = rng.normal(size=(3, 2, 5))
    expect[:, idx, :5] += np.swapaxes(inc, 0, 1) * c[:, None, None]
    add_rows(table, replica_first, idx, inc, c)
    np.testing.assert_allclose(got, expect, rtol=1e-14, atol=1e-15)
