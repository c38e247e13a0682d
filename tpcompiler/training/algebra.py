"""Vector algebras of the step engine (docs/DESIGN.md 2.7, 2.9): what a vector *is* at finite
width, in the exact Gaussian-linear limit and for particles.

The runtime (``training.engine``) is written once against these operations; only the
meaning of a vector and of "multiply by the initial matrix W_0" differs:

* ``Finite``: a vector is its n coordinates; E[x y] is (1/n) sum_a x_a y_a; W_0 is an
  n x n matrix of iid N(0, sigma^2/n) entries.  R replicas are R independent networks
  (seeds) run in lockstep.
* ``Exact``: a vector is its coefficients over a Gaussian basis whose elements are
  iid N(0, 1) (index 0 is the constant 1, which is orthonormal to them in the sense of
  E[Z^x Z^y]), so E[Z^x Z^y] is the dot product of coefficients and every expectation of a
  Gaussian-linear program is exact.  The basis grows when a new ZHat needs fresh randomness.
* ``Particles``: a vector is M/R iid samples of its Z per replica; E is a particle average;
  R replicas (groups) are independent runs whose spread gives the standard error.

In the two limits W_0 z is ZHat^{W_0 z} + ZDot^{W_0 z} (docs/DESIGN.md 2.2), computed by
``Family``: each matrix side (W, and W^T) keeps the vectors it has multiplied ("members"),
the independent standard Gaussians xi they were built from and the Cholesky factor L of
their covariance sigma^2 E[Z^{x_i} Z^{x_j}], so that ZHat_k = sum_j L_kj xi_j:

* a new ZHat is drawn conditionally on the members: its row of L solves L l = c with
  c_j = sigma^2 E[Z^x Z^{x_j}], plus fresh noise of variance sigma^2 E[Z^x Z^x] - |l|^2
  (a block of new members at once: block Cholesky);
* ZDot^{W_0 x} = sigma^2 sum_j Z^{y_j} E[dZ^x / dZHat^{W^T y_j}] over the members y_j of the
  *other* side, with the expectations by Stein's lemma for the Gaussian family:
  E[grad_ZHat f] = L^{-T} E[f xi].  In the exact algebra E[f xi_j] is f's coefficient on
  xi_j, so this is the exact derivative of a linear form; for particles it is the
  particle average (docs/DESIGN.md 2.7).

Layout: every vector batch is an array (R, N, D) (replica, vector, coordinate/coefficient/
particle); stacks of members are (R, F, D); scalars per replica and vector are (R, N).
"""
from __future__ import annotations

import ctypes

import numpy as np
from numba.extending import get_cython_function_address

from tpcompiler.ir.graph import ProgramError
from tpcompiler.training import replicas
from tpcompiler.training.step import width_limit

#: A new member whose conditional variance is below this fraction of its variance is a
#: linear combination of the earlier members: it gets no fresh noise.
DEGENERATE = 1e-12


def _pad(a: np.ndarray, D: int) -> np.ndarray:
    """``a`` with zero coefficients appended up to D (exact algebra: older vectors do not
    know later basis elements)."""
    if a.shape[-1] >= D:
        return a
    out = np.zeros(a.shape[:-1] + (D,))
    out[..., :a.shape[-1]] = a
    return out


class Rows:
    """A growing stack of vectors, array (R, F, D) with amortized doubling in F (and in D for
    the exact algebra, whose vectors lengthen as the basis grows)."""

    def __init__(self, R: int, D: int):
        self.buf = np.zeros((R, 8, D))
        self.count = 0

    @property
    def data(self) -> np.ndarray:
        return self.buf[:, :self.count]

    def append(self, V: np.ndarray) -> np.ndarray:
        """Append the vectors V (R, N, D'); returns their row indices."""
        R, N, D = V.shape
        if D > self.buf.shape[2]:
            self.buf = _pad(self.buf, D)
        if self.count + N > self.buf.shape[1]:
            grown = np.zeros((R, max(2 * self.buf.shape[1], self.count + N), self.buf.shape[2]))
            grown[:, :self.count] = self.buf[:, :self.count]
            self.buf = grown
        self.buf[:, self.count:self.count + N, :D] = V
        self.buf[:, self.count:self.count + N, D:] = 0.0
        idx = np.arange(self.count, self.count + N)
        self.count += N
        return idx

    def bytes_to_reserve(self, extra: int) -> int:
        """Bytes ``reserve(extra)`` would allocate (0 if the capacity suffices)."""
        need = self.count + extra
        R, cap, D = self.buf.shape
        return 0 if need <= cap else R * need * D * self.buf.itemsize

    def reserve(self, extra: int) -> None:
        """Capacity for ``extra`` more rows."""
        need = self.count + extra
        if need > self.buf.shape[1]:
            grown = np.zeros((self.buf.shape[0], need, self.buf.shape[2]))
            grown[:, :self.count] = self.buf[:, :self.count]
            self.buf = grown

    def truncate(self, count: int) -> None:
        self.count = count


class Algebra:
    """Common operations; subclasses define the inner product's normalisation and what a fresh
    Gaussian, a constant and the initial matrix product are."""

    #: "finite", "exact" or "particles"
    kind = ""
    #: whether W_0 z needs a ``Family`` (the limits) or is a matrix product (finite width)
    limit = True

    def __init__(self, R: int, D: int, rng: np.random.Generator):
        self.R, self.D, self.rng = R, D, rng
        self.norm = 1.0

    # -- powers of n -----------------------------------------------------------------------
    def n_power(self, e) -> float:
        """n^e at this algebra's width (the limit: 1 for e = 0, 0 for e < 0), remembered per
        exponent (a step reads the same few sympy exponents every time)."""
        powers = self.__dict__.setdefault("_powers", {})
        if e not in powers:
            powers[e] = self._n_power(e)
        return powers[e]

    def _n_power(self, e) -> float:
        return width_limit(e)

    # -- vectors -----------------------------------------------------------------------------
    def zeros(self, N: int) -> np.ndarray:
        return np.zeros((self.R, N, self.D))

    def align(self, *arrays):
        """The arrays with a common last dimension (a no-op except for the exact algebra)."""
        return arrays

    def gram(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """E[Z^{a_i} Z^{b_j}] per replica: (R, F, D), (R, N, D) -> (R, F, N)."""
        m = min(A.shape[-1], B.shape[-1])
        A, B = A[..., :m], B[..., :m]
        if B.shape[1] <= A.shape[1]:
            # a few vectors against many members: OpenBLAS is 1.5x faster computing the transpose
            # B A^T ((N x D)(D x F)) than A B^T on these shapes (measured, F = 1600, D = 10^4, N = 8)
            out = np.swapaxes(replicas.matmul(B, np.swapaxes(A, 1, 2)), 1, 2)
        else:
            out = replicas.matmul(A, np.swapaxes(B, 1, 2))
        return out / self.norm

    def diag_inner(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """E[Z^{a_i} Z^{b_i}] per replica: (R, N, D) twice -> (R, N)."""
        m = min(A.shape[-1], B.shape[-1])
        return np.einsum("rnd,rnd->rn", A[..., :m], B[..., :m]) / self.norm

    def combine(self, coefs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """sum_f coefs[r, f, i] rows[r, f]: (R, F, N), (R, F, D) -> (R, N, D)."""
        return replicas.matmul(np.swapaxes(coefs, 1, 2), rows)

    def features(self, V: np.ndarray) -> np.ndarray:
        """V scaled so that E[Z^a Z^b] is the plain dot product of rows."""
        return V / np.sqrt(self.norm)

    def mark(self):
        return None

    def release(self, mark) -> None:
        """Forget randomness created after ``mark`` that nothing kept (exact: basis elements)."""


class Finite(Algebra):
    """Width-n networks (R of them, one per seed)."""

    kind = "finite"
    limit = False

    def __init__(self, R: int, n: int, rng: np.random.Generator):
        super().__init__(R, n, rng)
        self.n = n
        self.norm = float(n)

    def _n_power(self, e) -> float:
        return float(self.n) ** float(e)

    def constant(self, N: int) -> np.ndarray:
        return np.ones((self.R, N, self.D))

    def gaussians(self, cov: np.ndarray) -> np.ndarray:
        """k initial vectors with iid N(0, cov) coordinates: (R, k, n)."""
        k = cov.shape[0]
        w, V = np.linalg.eigh(cov)
        root = V * np.sqrt(np.clip(w, 0.0, None))
        return np.einsum("ij,rjn->rin", root, self.rng.standard_normal((self.R, k, self.n)))

    def iid(self, k: int) -> np.ndarray:
        """k independent vectors of iid N(0, 1) coordinates."""
        return self.rng.standard_normal((self.R, k, self.n))

    def matrix(self, sigma: float) -> np.ndarray:
        """W_0: (R, n, n), iid N(0, sigma^2 / n) entries."""
        return self.rng.standard_normal((self.R, self.n, self.n)) * (sigma / np.sqrt(self.n))


class Particles(Algebra):
    """M particles split into R independent groups of m = M / R."""

    kind = "particles"

    def __init__(self, R: int, m: int, rng: np.random.Generator):
        super().__init__(R, m, rng)
        self.norm = float(m)
        #: (what these groups are, for error messages; particles asked for per particle here)
        self.role = ("", 1)

    def constant(self, N: int) -> np.ndarray:
        return np.ones((self.R, N, self.D))

    def fresh(self, N: int) -> np.ndarray:
        return self.rng.standard_normal((self.R, N, self.D))

    def iid(self, k: int) -> np.ndarray:
        return self.fresh(k)

    def gaussians(self, cov: np.ndarray) -> np.ndarray:
        k = cov.shape[0]
        w, V = np.linalg.eigh(cov)
        root = V * np.sqrt(np.clip(w, 0.0, None))
        return np.einsum("ij,rjn->rin", root, self.fresh(k))


class Exact(Algebra):
    """Coefficients over a growing basis of iid N(0, 1) Gaussians; index 0 is the constant 1."""

    kind = "exact"

    def __init__(self, rng: np.random.Generator):
        super().__init__(1, 1, rng)

    def align(self, *arrays):
        D = max(a.shape[-1] for a in arrays)
        return tuple(_pad(a, D) for a in arrays)

    def constant(self, N: int) -> np.ndarray:
        out = np.zeros((1, N, self.D))
        out[..., 0] = 1.0
        return out

    def fresh(self, N: int) -> np.ndarray:
        """N new basis elements."""
        out = np.zeros((1, N, self.D + N))
        out[0, np.arange(N), self.D + np.arange(N)] = 1.0
        self.D += N
        return out

    def iid(self, k: int) -> np.ndarray:
        return self.fresh(k)

    def gaussians(self, cov: np.ndarray) -> np.ndarray:
        """k initial Gaussians with covariance cov: coefficient rows of a square root of cov
        over k new basis elements."""
        k = cov.shape[0]
        w, V = np.linalg.eigh(cov)
        root = V * np.sqrt(np.clip(w, 0.0, None))
        base = self.fresh(k)
        return np.einsum("ij,rjd->rid", root, base)

    def mark(self):
        return self.D

    def release(self, mark) -> None:
        self.D = mark


_c_int, _c_double, _ptr = ctypes.c_int, ctypes.c_double, ctypes.POINTER
#: scipy's BLAS dtrsm (the library numpy/scipy already load), called with pointers: it solves on
#: the leading F x F block of a larger buffer in place (lda = the buffer's width)
_DTRSM = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                          _ptr(_c_int), _ptr(_c_int), _ptr(_c_double), ctypes.c_void_p, _ptr(_c_int),
                          ctypes.c_void_p, _ptr(_c_int))(
    get_cython_function_address("scipy.linalg.cython_blas", "dtrsm"))


def triangular_solve(L: np.ndarray, F: int, rhs: np.ndarray, transpose: bool) -> np.ndarray:
    """X (R, F, N) with L_r X_r = rhs_r (or L_r^T X_r = rhs_r), L_r the lower-triangular
    leading F x F block of the C-contiguous buffer L (R, cap, cap).

    The block is solved in place of the buffer, not copied out: scipy.linalg.blas.dtrsm copies a
    non-contiguous block into Fortran order first, and with F ~ 10^3 members that copy cost more
    than the solve (a quarter of a particle step).  Read as Fortran, the buffer of L_r is
    A = L_r^T (upper triangular, lda = cap), so L X = B is A^T X = B and L^T X = B is A X = B:
    dtrsm with side L, uplo U, op(A) = A^T or A, on X held in Fortran order (1.5x faster than
    side R on these shapes, N ~ 8 right-hand sides)."""
    R, cap = L.shape[0], L.shape[1]
    if L.dtype != np.float64 or not L.flags.c_contiguous or L.shape[2] != cap or F > cap:
        raise ValueError("triangular_solve: L must be a C-contiguous float64 (R, cap, cap) buffer with F <= cap")
    N = rhs.shape[2]
    XT = np.array(np.swapaxes(rhs, 1, 2), dtype=np.float64, order="C")  # XT[r] is X_r in Fortran order
    if F == 0 or N == 0:
        return np.swapaxes(XT, 1, 2)
    m, n, lda, ldb, one = _c_int(F), _c_int(N), _c_int(cap), _c_int(F), _c_double(1.0)
    trans = b"N" if transpose else b"T"

    def solve(r: int) -> None:
        _DTRSM(b"L", b"U", trans, b"N", ctypes.byref(m), ctypes.byref(n), ctypes.byref(one),
               L[r].ctypes.data, ctypes.byref(lda), XT[r].ctypes.data, ctypes.byref(ldb))

    replicas.for_each_replica(solve, R, work=R * F * F * N / 2)
    return np.swapaxes(XT, 1, 2)


def _block_cholesky(S: np.ndarray):
    """Lower-triangular Lb (R, N, N) with Lb Lb^T = S per replica, and the mask (R, N) of
    degenerate columns (conditional variance <= DEGENERATE of the variance: a linear
    combination of earlier vectors), whose diagonal is set to 1 and whose noise must be 0."""
    R, N, _ = S.shape
    Lb = np.zeros_like(S)
    deg = np.zeros((R, N), dtype=bool)
    for j in range(N):
        d2 = S[:, j, j] - np.einsum("rk,rk->r", Lb[:, j, :j], Lb[:, j, :j])
        ref = np.maximum(np.abs(S[:, j, j]), 1e-300)
        dj = d2 <= DEGENERATE * ref
        deg[:, j] = dj
        diag = np.where(dj, 1.0, np.sqrt(np.maximum(d2, 0.0)))
        Lb[:, j, j] = diag
        if j + 1 < N:
            col = S[:, j + 1:, j] - np.einsum("rik,rk->ri", Lb[:, j + 1:, :j], Lb[:, j, :j])
            Lb[:, j + 1:, j] = np.where(dj[:, None], 0.0, col / diag[:, None])
    return Lb, deg


class Family:
    """One side of an n x n matrix in the limit (W, or W^T): its members, their noise and the
    Cholesky factor of their covariance (module docstring)."""

    def __init__(self, algebra: Algebra, sigma: float):
        self.alg, self.sigma2 = algebra, sigma * sigma
        self.vecs = Rows(algebra.R, algebra.D)
        self.noise = Rows(algebra.R, algebra.D)
        self.L = np.zeros((algebra.R, 8, 8))

    @property
    def count(self) -> int:
        return self.vecs.count

    def _solve(self, rhs: np.ndarray, transpose: bool) -> np.ndarray:
        return triangular_solve(self.L, self.count, rhs, transpose)

    def zhat(self, Z: np.ndarray, G: np.ndarray, keep: bool) -> np.ndarray:
        """ZHat^{W_0 z} for the vectors Z (R, N, D), given G = E[Z^{x_j} Z^{z}] (R, F, N) over
        the members; with ``keep`` the z's become members (their ZHats are then drawn jointly)."""
        alg, F = self.alg, self.count
        N = Z.shape[1]
        if alg.kind == "particles" and F + N > alg.D:
            role, scale = alg.role
            raise ProgramError(
                f"particles: a matrix family needs {F + N} jointly Gaussian members but each group{role} has only "
                f"{alg.D} particles, so its covariance is singular and its ZDot (Stein) estimate is biased "
                f"(bias ~ members / particles per group); use more particles (>= {10 * (F + N) * alg.R * scale} "
                "for this run) or fewer steps x batch")
        L21 = self._solve(self.sigma2 * G, transpose=False)                # (R, F, N)
        S = self.sigma2 * alg.gram(Z, Z) - np.matmul(np.swapaxes(L21, 1, 2), L21)
        Lb, deg = _block_cholesky(S)
        E = alg.fresh(N) * (~deg)[..., None]
        noise = self.noise.data
        (E,) = alg.align(E)
        out = np.matmul(Lb, E)
        if F:
            out, part = alg.align(out, alg.combine(L21, noise))
            out = out + part
        if keep:
            self.vecs.append(Z)
            self.noise.append(E)
            self._grow(F + N)
            self.L[:, F:F + N, :F] = np.swapaxes(L21, 1, 2)
            self.L[:, F:F + N, F:F + N] = Lb
        return out

    def stein(self, Z: np.ndarray) -> np.ndarray:
        """E[dZ^z / dZHat_j] over the members j, per replica: L^{-T} E[Z^z xi] (R, F, N)."""
        if self.count == 0:
            return np.zeros((self.alg.R, 0, Z.shape[1]))
        return self._solve(self.alg.gram(self.noise.data, Z), transpose=True)

    def bytes_to_reserve(self, extra: int) -> int:
        """Bytes ``reserve(extra)`` would allocate: members, their noise and the factor L."""
        F = self.count + extra
        factor = 0 if F <= self.L.shape[1] else self.alg.R * F * F * self.L.itemsize
        return self.vecs.bytes_to_reserve(extra) + self.noise.bytes_to_reserve(extra) + factor

    def reserve(self, extra: int) -> None:
        self.vecs.reserve(extra)
        self.noise.reserve(extra)
        self._grow(self.count + extra, exact=True)

    def _grow(self, F: int, exact: bool = False) -> None:
        cap = self.L.shape[1]
        if F > cap:
            new = F if exact else max(2 * cap, F)
            grown = np.zeros((self.alg.R, new, new))
            grown[:, :cap, :cap] = self.L
            self.L = grown

    def truncate(self, count: int) -> None:
        self.vecs.truncate(count)
        self.noise.truncate(count)
        self.L[:, count:, :] = 0.0
        self.L[:, :, count:] = 0.0
