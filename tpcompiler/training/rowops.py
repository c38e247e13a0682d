"""Row kernels of the step engine (docs/DESIGN.md 2.9): what a step does with a few rows of a
large table -- the readout vectors v_k (K of them) or an input matrix's columns U_j -- without
copying the rows out and back (numpy's fancy indexing gathers a copy, and writing it
back scatters another; for word2vec's exact limit the rows are 9045 coefficients long and a step
touches about 35 of them, so the copies cost more than the arithmetic).

A table is a C-contiguous array, either (R, K, D) with row k of replica r at A[r, k] (the readout:
``replica_first``) or (K, R, D) with it at A[k, r] (an input matrix's columns); the kernels
read rows in place (a transposed view would make every row access strided, 2x slower).  The
vectors a kernel meets may be shorter than the rows (the exact algebra's basis grows): it uses
their length m, as ``Algebra.gram`` uses the common length.

With a_{k,r} row k of replica r:

* ``row_dots``:       F[b, i, r] = a_{idx[b, i], r}[:m] . X[b, r, :m]
* ``row_sums``:       Y[b, r, :] = sum_i W[b, i, r] a_{idx[b, i], r}
* ``decay_add_rows``: a_{idx[u], r}[:m] <- keep a_{idx[u], r}[:m] + c_r sum_b W[u, b, r] X[b, r, :m],
  the rest of the row <- keep a (idx distinct): weight decay and an SGD update in one pass;
* ``add_rows``:       a_{idx[u], r}[:m] <- a_{idx[u], r}[:m] + c_r inc[u, r, :m] (an update summed
  beforehand by BLAS, when many examples share the rows).

The sums run in a fixed order (``row_dots``: BLAS ddot; ``row_sums`` and ``decay_add_rows``: b and
i in order), so a run is reproducible bit for bit on one machine.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _row(A, replica_first, k, r):
    """Row k of replica r of the table A (module docstring)."""
    return A[r, k] if replica_first else A[k, r]


@njit(cache=True, nogil=True)
def row_dots(A, replica_first, idx, X):
    """F (B, k, R): F[b, i, r] = a_{idx[b, i], r}[:m] . X[b, r, :m], m = min(A's, X's length)."""
    B, k = idx.shape
    R = A.shape[0] if replica_first else A.shape[1]
    m = min(A.shape[2], X.shape[2])
    F = np.empty((B, k, R))
    for b in range(B):
        for i in range(k):
            for r in range(R):
                F[b, i, r] = np.dot(_row(A, replica_first, idx[b, i], r)[:m], X[b, r, :m])
    return F


@njit(cache=True, nogil=True)
def row_sums(A, replica_first, idx, W):
    """Y (B, R, D): Y[b, r] = sum_i W[b, i, r] a_{idx[b, i], r} (i in order)."""
    B, k = idx.shape
    R = A.shape[0] if replica_first else A.shape[1]
    D = A.shape[2]
    Y = np.zeros((B, R, D))
    for b in range(B):
        for i in range(k):
            for r in range(R):
                w = W[b, i, r]
                row = _row(A, replica_first, idx[b, i], r)
                out = Y[b, r]
                for d in range(D):
                    out[d] += w * row[d]
    return Y


@njit(cache=True, nogil=True)
def decay_add_rows(A, replica_first, idx, keep, W, X, c):
    """a_{idx[u], r}[:m] <- keep a_{idx[u], r}[:m] + (sum_b W[u, b, r] X[b, r, :m]) c[r] and the
    rest of the row <- keep a, m = X's length (<= A's); keep = 1 skips the product.  idx distinct."""
    R = A.shape[0] if replica_first else A.shape[1]
    B, m = X.shape[0], X.shape[2]
    acc = np.empty(m)
    for u in range(idx.size):
        for r in range(R):
            row = _row(A, replica_first, idx[u], r)
            if B == 1:
                w = W[u, 0, r]
                x = X[0, r]
                for d in range(m):
                    acc[d] = w * x[d]
            else:
                acc[:] = 0.0
                for b in range(B):
                    w = W[u, b, r]
                    x = X[b, r]
                    for d in range(m):
                        acc[d] += w * x[d]
            cr = c[r]
            if keep != 1.0:
                for d in range(m):
                    row[d] = keep * row[d] + acc[d] * cr
                for d in range(m, row.size):
                    row[d] = keep * row[d]
            else:
                for d in range(m):
                    row[d] = row[d] + acc[d] * cr


@njit(cache=True, nogil=True)
def add_rows(A, replica_first, idx, inc, c):
    """a_{idx[u], r}[:m] <- a_{idx[u], r}[:m] + inc[u, r, :m] c[r], m = inc's length (<= A's).
    idx distinct."""
    R = A.shape[0] if replica_first else A.shape[1]
    m = inc.shape[2]
    for u in range(idx.size):
        for r in range(R):
            row = _row(A, replica_first, idx[u], r)
            add = inc[u, r]
            cr = c[r]
            for d in range(m):
                row[d] = row[d] + add[d] * cr
