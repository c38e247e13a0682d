"""Kernels at every input scale (issue 7, class 1): bivariate Gaussian expectations and MLP
NNGP/NTK at norms 1e-8 to 1e6, zero, duplicate, nearly parallel and antiparallel rows.

The oracle is written here and shares nothing with the code under test: every expectation
E[f(u) g(v)], (u, v) ~ N(0, [[k11, k12], [k12, k22]]), is the nested integral
E_x[f(s1 x) E_z[g(a x + b z)]] (x, z iid N(0, 1), s1 = sqrt(k11), a = k12 / s1,
b = sqrt((k11 k22 - k12^2) / k11)) done by scipy's adaptive QUADPACK (``scipy.integrate.quad``)
with breakpoints at each function's feature (where its argument vanishes) and geometrically
around it (so a feature of width 1e-6 in a Gaussian of width 1 is found), the integrands being
plain ``math`` formulas compiled by numba as a ``LowLevelCallable``.  The NNGP/NTK recursion of
``programs/mlp.py`` (neural-tangents' stax conventions, NTK parametrization, tests/data/README.md)
is composed layer by layer from these expectations.  Oscillating functions at large variance
(sin, cos: thousands of periods under the Gaussian) are out of reach of quadrature; there the
reference is the characteristic function evaluated with mpmath at 50 digits.
"""
import functools
import math
import re
import warnings
from pathlib import Path

import mpmath
import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import carray, cfunc, njit, types
from scipy import LowLevelCallable, integrate

import tpcompiler as tp
from tpcompiler import expectations as g2
from tpcompiler.ir import nonlinearities as nl

MLP = str(Path(__file__).resolve().parent.parent / "programs" / "mlp.py")
RTOL = 1e-10  # the backend's default (KernelFunction, pair_expectation)

# ---------------------------------------------------------------------------------------
# Independent reference: the functions, written from their definitions
# ---------------------------------------------------------------------------------------
NAMES = ["relu", "drelu", "step", "erf", "derf", "tanh", "dtanh", "gelu", "dgelu", "sin", "dsin",
         "cos", "dcos", "sigmoid", "dsigmoid", "softplus", "dsoftplus", "exp", "dexp",
         "identity", "didentity", "abs", "dabs"]
ID = {n: i for i, n in enumerate(NAMES)}


@njit(cache=True)
def _fn(i, x):
    if i == 0:
        return x if x > 0.0 else 0.0
    if i == 1 or i == 2:
        return 1.0 if x > 0.0 else 0.0
    if i == 3:
        return math.erf(x)
    if i == 4:
        return 2.0 / math.sqrt(math.pi) * math.exp(-x * x)
    if i == 5:
        return math.tanh(x)
    if i == 6:  # sech^2
        e = math.exp(-2.0 * abs(x))
        return 4.0 * e / ((1.0 + e) * (1.0 + e))
    if i == 7:  # x Phi(x)
        return 0.5 * x * math.erfc(-x / math.sqrt(2.0))
    if i == 8:
        return 0.5 * math.erfc(-x / math.sqrt(2.0)) + x * math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    if i == 9:
        return math.sin(x)
    if i == 10 or i == 11:
        return math.cos(x)
    if i == 12:
        return -math.sin(x)
    if i == 13 or i == 16:  # sigmoid (and softplus')
        e = math.exp(-abs(x))
        return 1.0 / (1.0 + e) if x >= 0.0 else e / (1.0 + e)
    if i == 14:
        e = math.exp(-abs(x))
        return e / ((1.0 + e) * (1.0 + e))
    if i == 15:
        return max(x, 0.0) + math.log1p(math.exp(-abs(x)))
    if i == 17 or i == 18:
        return math.exp(x)
    if i == 19:
        return x
    if i == 21:
        return abs(x)
    if i == 22:  # sign
        return 1.0 if x > 0.0 else (-1.0 if x < 0.0 else 0.0)
    return 1.0


@cfunc(types.double(types.intc, types.CPointer(types.double)), cache=True)
def _inner(n, xx):
    """f_i(m + b z) times the standard normal density of z."""
    a = carray(xx, (n,))
    z, m, b = a[0], a[1], a[2]
    return _fn(int(a[3]), m + b * z) * math.exp(-0.5 * z * z) / 2.5066282746310002


_INNER = LowLevelCallable(_inner.ctypes)
_ZMAX = 12.0  # Gaussian tail beyond 12 sd: 4e-33


def _points(center, width):
    """Breakpoints in (-12, 12): 0, a feature at ``center`` and center +- width 10^(2j)."""
    pts = {0.0, center}
    for j in range(0, 16, 2):
        pts.update((center + width * 10.0**j, center - width * 10.0**j))
    return sorted(p for p in pts if -_ZMAX < p < _ZMAX)


def _quad(f, pts, args=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return integrate.quad(f, -_ZMAX, _ZMAX, points=pts, args=args, epsabs=0.0, epsrel=1e-13,
                              limit=500)[0]


@functools.lru_cache(maxsize=None)
def ref_1d(i, k):
    """E[f_i(u)], u ~ N(0, k)."""
    if k == 0.0:
        return _fn(i, 0.0)
    s = math.sqrt(k)
    return _quad(_INNER, _points(0.0, 1.0 / s), (0.0, s, float(i)))


def _char_pair(i, j, k11, k12, k22):
    """E[f_i(u) f_j(v)] for f in {sin, cos} from E exp(i(s u + t v)), with mpmath."""
    with mpmath.workdps(50):
        k11, k12, k22 = (mpmath.mpf(k11), mpmath.mpf(k12), mpmath.mpf(k22))
        em = mpmath.exp(-(k11 + k22 - 2 * k12) / 2)  # E cos(u - v)
        ep = mpmath.exp(-(k11 + k22 + 2 * k12) / 2)  # E cos(u + v)
        kind = {ID["sin"]: "s", ID["dcos"]: "-s", ID["cos"]: "c", ID["dsin"]: "c"}
        a, b = kind[i], kind[j]
        sign = (-1 if a.startswith("-") else 1) * (-1 if b.startswith("-") else 1)
        a, b = a[-1], b[-1]
        if a == b == "s":
            return float(sign * (em - ep) / 2)
        if a == b == "c":
            return float(sign * (em + ep) / 2)
        return 0.0  # E sin(u) cos(v) = 0 (odd)


_OSC = {ID[n] for n in ("sin", "dsin", "cos", "dcos")}
_EXP = {ID["exp"], ID["dexp"]}


def _mgf_pair(k11, k12, k22):
    """E[exp(u) exp(v)] = exp((k11 + 2 k12 + k22) / 2), the Gaussian moment-generating
    function, in mpmath: quadrature on (-12, 12) sd misses the tilted mass of exp(u) at
    variances near 10 (its centre moves to 2 sqrt(k) sd)."""
    with mpmath.workdps(50):
        return float(mpmath.exp((mpmath.mpf(k11) + 2 * mpmath.mpf(k12) + mpmath.mpf(k22)) / 2))


@functools.lru_cache(maxsize=None)
def ref_pair(i, j, k11, k12, k22, det=None):
    """E[f_i(u) f_j(v)] by nested adaptive quadrature (see the module docstring); ``det``:
    k11 k22 - k12^2 when known more accurately than float64 arithmetic gives it."""
    if (i in _OSC or j in _OSC) and max(k11, k22) > 50.0:
        return _char_pair(i, j, k11, k12, k22)
    if i in _EXP and j in _EXP:
        return _mgf_pair(k11, k12, k22)
    if k11 == 0.0:
        return _fn(i, 0.0) * ref_1d(j, k22)
    if k22 == 0.0:
        return _fn(j, 0.0) * ref_1d(i, k11)
    s1 = math.sqrt(k11)
    if det is None:
        det = k11 * k22 - k12 * k12
    b = math.sqrt(max(det, 0.0) / k11)
    a = k12 / s1

    def G(x):
        m = a * x
        if b == 0.0:
            return _fn(j, m)
        return _quad(_INNER, _points(max(-_ZMAX, min(_ZMAX, -m / b)), 1.0 / b), (m, b, float(j)))

    def outer(x):
        return _fn(i, s1 * x) * G(x) * math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)

    # the outer integrand has features at x = 0 of widths 1/s1 (f), 1/|a| (g) and b/|a|
    # (G(x) is a smoothed g(a x); near correlation 1 that is far narrower than 1/|a|)
    pts = set(_points(0.0, 1.0 / max(s1, abs(a), 1e-300)))
    if a != 0.0 and b > 0.0:
        pts.update(_points(0.0, b / abs(a)))
    return _quad(outer, sorted(pts))


def ref_scale(i, j, k11, k22):
    """Cauchy-Schwarz scale sqrt(E f_i(u)^2 E f_j(v)^2)."""
    return math.sqrt(ref_pair(i, i, k11, k11, k11) * ref_pair(j, j, k22, k22, k22))


def pair_error(got, i, j, k11, k12, k22):
    """Error of ``got`` as an approximation of E[f_i(u) f_j(v)]: relative to
    max(|E|, 1e-2 S) (S the Cauchy-Schwarz scale; the backend's stated measure), and measured
    from the nearest reference value at covariances within 4 ulps of k12 when |rho| > 0.999.
    Near |rho| = 1 the expectation is ill-conditioned in its inputs (E[step step] has a
    square-root singularity at rho = 1, E[erf' erf'] at variance k moves by ~k eps per ulp of
    k12), so no float64 method can do better than the exact value at a covariance a few ulps
    away: that is the accuracy asked of the backend there."""
    want = ref_pair(i, j, k11, k12, k22)
    floor = max(abs(want), 1e-2 * ref_scale(i, j, k11, k22), 1e-300)
    err = abs(got - want) / floor
    if err > RTOL and k11 > 0 and k22 > 0 and abs(k12) > 0.999 * math.sqrt(k11 * k22):
        near = [ref_pair(i, j, k11, k12 * (1 + t * 2.0**-52), k22) for t in (-4, 4)]
        lo, hi = min(near + [want]), max(near + [want])
        err = min(err, max(lo - got, got - hi, 0.0) / floor)
    return err


def test_reference_against_closed_forms_in_mpmath():
    """The oracle itself, at the extremes, against textbook closed forms at 50 digits."""
    with mpmath.workdps(50):
        for k, rho in [(1e-8, 0.3), (1.0, -0.999), (1e4, 0.967), (1e12, 0.5), (1e12, -1.0)]:
            k12 = rho * k
            K, K12 = mpmath.mpf(k), mpmath.mpf(k12)
            det = K * K - K12 * K12
            erf = 2 / mpmath.pi * mpmath.asin(2 * K12 / (1 + 2 * K))
            derf = 4 / mpmath.pi / mpmath.sqrt(1 + 4 * K + 4 * det)
            t = mpmath.acos(K12 / K)
            relu = K * (mpmath.sin(t) + (mpmath.pi - t) * K12 / K) / (2 * mpmath.pi)
            # Cauchy-Schwarz scales E f(u)^2 (the closed forms at k12 = k)
            scales = {"erf": 2 / mpmath.pi * mpmath.asin(2 * K / (1 + 2 * K)),
                      "derf": 4 / mpmath.pi / mpmath.sqrt(1 + 4 * K), "relu": K / 2}
            for name, exact in (("erf", erf), ("derf", derf), ("relu", relu)):
                got = ref_pair(ID[name], ID[name], k, k12, k)
                floor = max(abs(float(exact)), 1e-2 * float(scales[name]))
                assert abs(got - float(exact)) <= 1e-12 * floor, (name, k, rho)


# ---------------------------------------------------------------------------------------
# Property: random covariances for every built-in nonlinearity
# ---------------------------------------------------------------------------------------
X = sp.Symbol("x", real=True)
BUILTIN = sorted(set(nl.BUILTINS) - {"identity"}) + ["identity"]
# largest variance at which E[phi phi] is a finite float64 (exp grows like exp(2 k))
KMAX_LOG = {"exp": 1.0}


def _covariance(draw_k11, draw_k22, rho):
    k11, k22 = 10.0**draw_k11, 10.0**draw_k22
    return k11, rho * math.sqrt(k11 * k22), k22


rhos = st.one_of(
    st.floats(-1.0, 1.0),
    st.sampled_from([0.0, 1.0, -1.0, 0.967, -0.967]),
    st.tuples(st.sampled_from([1.0, -1.0]), st.floats(1.0, 12.0)).map(lambda t: t[0] * (1 - 10.0**-t[1])),
)


@pytest.mark.parametrize("name", BUILTIN)
@settings(max_examples=10, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(lk11=st.floats(-8.0, 12.0), lk22=st.floats(-8.0, 12.0), rho=rhos)
def test_random_covariances_against_quadrature(name, lk11, lk22, rho):
    """E[phi(u) phi(v)] and E[phi'(u) phi'(v)] from the backend (the functions the kernel
    engine builds: phi and its sympy derivative) within the stated rtol of the reference,
    errors relative to max(|E|, 1e-2 S), S the Cauchy-Schwarz scale (the backend's measure)."""
    top = KMAX_LOG.get(name, 12.0)
    lk11, lk22 = min(lk11, top), min(lk22, top)
    k11, k12, k22 = _covariance(lk11, lk22, rho)
    phi = nl.builtin(name)(X)
    pairs = [(phi, name)]
    dphi = sp.diff(phi, X)
    if not dphi.has(sp.DiracDelta):  # step' = delta: no pointwise derivative to square
        pairs.append((dphi, "d" + name))
    for expr, ref_name in pairs:
        if expr.is_number:
            continue
        obj = g2.pair_expectation(sp.Lambda(X, expr), sp.Lambda(X, expr))
        got = float(obj.evaluate(k11, k12, k22))
        i = ID[ref_name]
        err = pair_error(got, i, i, k11, k12, k22)
        assert err <= RTOL, (ref_name, (k11, k12, k22), got, err, obj.method)


# ---------------------------------------------------------------------------------------
# Valid edge inputs through the whole kernel backend (programs/mlp.py)
# ---------------------------------------------------------------------------------------
class MLPReference:
    """NNGP and NTK of stax.serial(*[Dense(W_std=w, b_std=b), phi] * depth, Dense(w, b)) in
    the NTK parametrization, input kernel x.x'/d, composed layer by layer from ref_pair.

    The input kernel is computed from the float64 rows with mpmath (its determinant too: at
    norm 1e-8 with bias 0.1 the rows' own contribution is 1e-14 of the bias, below what a
    float64 covariance entry resolves).  Kernels are functions of that covariance, which the
    backend (like any float64 code) sees rounded; ``interval`` bounds the reference over
    input kernels whose off-diagonal entry is moved by up to 4 ulps."""

    def __init__(self, phi, X, depth, w, b):
        self.i, self.di = ID[phi], ID["d" + phi]
        self.X, self.depth, self.w = X, depth, w
        self.b2 = 0.0 if b is None else b * b
        N, d = X.shape
        with mpmath.workdps(50):
            rows = [[mpmath.mpf(float(v)) for v in row] for row in X]
            W2, B2 = mpmath.mpf(w) ** 2, mpmath.mpf(0.0 if b is None else b) ** 2
            self.K = [[W2 * mpmath.fsum(a * c for a, c in zip(rows[p], rows[q])) / d + B2
                       for q in range(N)] for p in range(N)]
        self.nngp, self.ntk = np.zeros((N, N)), np.zeros((N, N))
        for p in range(N):
            for q in range(p, N):
                self.nngp[p, q], self.ntk[p, q] = self.nngp[q, p], self.ntk[q, p] = self.entry(p, q)

    def _diag(self, k):
        return self.w**2 * ref_pair(self.i, self.i, k, k, k) + self.b2

    def entry(self, p, q, ulps=0):
        """(nngp, ntk) at rows p, q, the input kernel's off-diagonal moved by ``ulps``."""
        K = self.K
        with mpmath.workdps(50):
            k12m = mpmath.mpf(float(K[p][q]) * (1 + ulps * 2.0**-52))
            det = float(K[p][p] * K[q][q] - k12m**2)
        k11, k12, k22 = float(K[p][p]), float(k12m), float(K[q][q])
        w2 = self.w**2
        theta = k12
        for layer in range(self.depth):
            dt = det if layer == 0 else None
            new12 = w2 * ref_pair(self.i, self.i, k11, k12, k22, dt) + self.b2
            theta = new12 + w2 * ref_pair(self.di, self.di, k11, k12, k22, dt) * theta
            k11, k12, k22 = self._diag(k11), new12, self._diag(k22)
        return k12, theta

    def interval(self, p, q, which):
        vals = [self.entry(p, q, u)[which] for u in (-4, 0, 4)]
        return min(vals), max(vals)


def _unit(v):
    return v / np.linalg.norm(v)


_E1 = _unit(np.array([1.0, -0.5, 0.3]))
_E2 = _unit(np.array([0.2, 0.4, -0.1]) - (np.array([0.2, 0.4, -0.1]) @ _E1) * _E1)


def _rotated(c):
    """A unit vector at cosine c to _E1."""
    return c * _E1 + math.sqrt(1.0 - c * c) * _E2


def edge_rows(scale):
    """x, a nearly parallel row (cos 0.9999), -x, a zero row, a duplicate of x, a row at
    cosine 0.967, and x at 1e-8 of the scale (norms from 1e-8 s to s)."""
    rows = [_E1, _rotated(0.9999), -_E1, np.zeros(3), _E1, _rotated(0.967), 1e-8 * _E1]
    return scale * np.stack(rows)


def _check_kernels(K, R, tol):
    """Errors relative to max(|K_ij|, 1e-2 sqrt(K_ii K_jj)), measured from the reference or,
    where that is not within tol, from its 4-ulp interval (MLPReference); symmetry and
    positive semi-definiteness."""
    for which, name in enumerate(("nngp", "ntk")):
        k, r = K[name], (R.nngp, R.ntk)[which]
        floor = np.maximum(np.maximum(np.abs(r), 1e-2 * np.sqrt(np.abs(np.outer(np.diag(r), np.diag(r))))), 1e-300)
        err = np.abs(k - r) / floor
        for p, q in zip(*np.nonzero(err > tol)):
            lo, hi = R.interval(p, q, which)
            err[p, q] = max(lo - k[p, q], k[p, q] - hi, 0.0) / floor[p, q]
        assert np.max(err) <= tol, (name, np.max(err), np.unravel_index(np.argmax(err), err.shape))
        assert np.array_equal(k, k.T), name
        ev = np.linalg.eigvalsh(k)
        assert ev[0] >= -1e-12 * ev[-1], (name, ev[0], ev[-1])


# (phi, b_std, scales): the bias-free erf network is odd, checked exactly below
EDGE_CASES = [
    ("relu", 0.1, (1e-8, 1e6)),
    ("erf", None, (1.0, 1e6)),
    ("tanh", 0.1, (1e-4, 1e6)),
    ("gelu", None, (1e-8, 1e6)),
    ("sin", 0.1, (1.0, 1e4)),
    ("sigmoid", 0.1, (1e-8, 1e6)),
]


@pytest.mark.parametrize("phi,bias,scales", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_edge_inputs_against_reference(phi, bias, scales):
    c = tp.compile(tp.load(MLP, depth=1, phi=phi, w_std=1.5, b_std=bias, d=3))
    for s in scales:
        X = edge_rows(s)
        K = c.kernels(X)
        R = MLPReference(phi, X, 1, 1.5, bias)
        # 2 rtol: the NTK adds two expectations, each within rtol
        _check_kernels(K, R, 2 * RTOL)


@pytest.mark.parametrize("phi", ["sin", "cos"])
@pytest.mark.parametrize("depth", [1, 2])
def test_sin_and_cos_with_a_bias_on_the_diagonal_at_large_variances(phi, depth):
    """E phi(h)^2 at Var h = k is (1 -+ e^{-2k})/2, well conditioned at any k; the closed form
    exp(|k12| - (k11 + k22)/2) sinh/cosh must be exactly that on the diagonal.  Written out,
    the bias's b^2 left k11 as a constant while |k12| kept it: at k = 1e16 the diagonal was
    e^{-b^2}/2 + b^2 (0.52 for 0.54; depth 2: 1.3% off; a QA finding).  Reference: the
    recursion in mpmath at 50 digits, variances exact."""
    w, b = mpmath.mpf("1.3"), mpmath.mpf("0.2")
    xs = [10.0**4, 10.0**6, 10.0**8]
    K = tp.compile(tp.load(MLP, depth=depth, phi=phi, w_std=1.3, b_std=0.2, d=1)).kernels(np.array(xs)[:, None])
    sign = -1 if phi == "sin" else 1
    with mpmath.workdps(50):
        def square(k):  # E phi(h)^2 and E phi'(h)^2, h ~ N(0, k)
            return (1 + sign * mpmath.exp(-2 * k)) / 2, (1 - sign * mpmath.exp(-2 * k)) / 2

        for i, x in enumerate(xs):
            k = w**2 * mpmath.mpf(x) ** 2 + b**2
            theta = k
            for _ in range(depth - 1):
                value, derivative = square(k)
                k, theta = w**2 * value + b**2, w**2 * value + b**2 + w**2 * derivative * theta
            value, derivative = square(k)
            nngp = w**2 * value + b**2
            ntk = nngp + w**2 * derivative * theta
            assert abs(K["nngp"][i, i] - float(nngp)) <= 1e-13 * float(nngp), (x, K["nngp"][i, i], float(nngp))
            assert abs(K["ntk"][i, i] - float(ntk)) <= 1e-13 * float(ntk), (x, K["ntk"][i, i], float(ntk))


def test_tanh_depth2_ntk_does_not_grow_with_the_input_norm():
    """The issue's case: tanh, w_std 1.5, b_std 0.1, depth 2, two rows at cosine 0.967; the
    NTK entry grew like s (6.3 x too large at s = 1e4)."""
    c = tp.compile(tp.load(MLP, depth=2, phi="tanh", w_std=1.5, b_std=0.1, d=3))
    for s in (10.0, 1e4):
        X = s * np.stack([_E1, _rotated(0.967)])
        _check_kernels(c.kernels(X), MLPReference("tanh", X, 2, 1.5, 0.1), 4 * RTOL)


def test_odd_network_is_exactly_odd_at_large_norm():
    """erf without bias: ntk(x, -x) = -ntk(x, x) and the kernel matrix stays PSD at norm 1e6."""
    c = tp.compile(tp.load(MLP, depth=2, phi="erf", w_std=1.5, b_std=None, d=3))
    X = 1e6 * np.stack([_E1, -_E1, _rotated(0.5)])
    K = c.kernels(X)
    for name in ("nngp", "ntk"):
        # the diagonal comes from the row stage, the rest from the pair stage: equal to rounding
        assert abs(K[name][0, 1] + K[name][0, 0]) <= 1e-14 * K[name][0, 0]
        ev = np.linalg.eigvalsh(K[name])
        assert ev[0] >= -1e-13 * ev[-1]


def test_overflowing_inputs_are_refused():
    c = tp.compile(tp.load(MLP, depth=2, phi="relu", w_std=1.5, b_std=0.1, d=3))
    with pytest.raises(tp.ProgramError, match="overflow float64.*rescale"):
        c.kernels(1e200 * np.eye(3))


def test_particles_refuse_a_spike_no_particle_reaches():
    """The issue's particle case: at s = 1e4, E[tanh'(h) tanh'(h')] lives where |h| < ~10,
    which almost no particle reaches; the limit reported 2.159 +- 0.007 against the true 5.49.
    It must refuse; at s = 1 the same evaluator agrees with the kernel backend."""
    c = tp.compile(tp.load(MLP, depth=2, phi="tanh", w_std=1.5, b_std=0.1, d=3))
    rows = np.stack([_E1, _rotated(0.967)])
    with pytest.raises(tp.ProgramError, match="rests on about .* particles.*can be trusted; the function is a spike"):
        c.limit(particles=20_000, seed=0, x=1e4 * rows, method="particles")
    # too few particles for an ordinary function: said as such, with a count that works
    with pytest.raises(tp.ProgramError, match=r"rests on about .* of the 200 particles \([\d.]+% of them\).*"
                                              r"can be trusted; use at least about (\d+) particles \(--particles\)") as refused:
        c.limit(particles=200, seed=0, x=rows, method="particles")
    assert "spike" not in str(refused.value)
    instruction, needed = re.search(r"instruction ('.*?').*at least about (\d+)", str(refused.value)).groups()
    try:  # that many carry this average (another one, carried by fewer, may need more)
        c.limit(particles=int(needed), seed=0, x=rows, method="particles")
    except tp.ProgramError as exc:
        assert f"instruction {instruction}" not in str(exc), exc
    K = c.kernels(rows)
    lim = c.limit(particles=20_000, seed=0, x=rows, method="particles")
    for name in ("nngp", "ntk"):
        value, se = lim[f"{name}[0,1]"]
        assert abs(value - K[name][0, 1]) < 5 * se, (name, value, se, K[name][0, 1])
    # the default evaluator is the pairwise-Gaussian engine: right at both scales
    big, K_big = c.limit(x=1e4 * rows), c.kernels(1e4 * rows)
    for name in ("nngp", "ntk"):
        assert big[f"{name}[0,1]"] == (pytest.approx(K_big[name][0, 1], rel=1e-9), 0.0)


def test_arc_cosine_helpers_at_the_ends_of_the_float_range():
    """The generated arc-cosine helpers take a correlation within about 4 ulps of +-1 as +-1
    (special.DET_AS_ZERO); the bound must not overflow before the determinant does: at
    variances of 1e160 and k12 = 0, E[step(u) step(v)] is 1/4 (a bound written as
    DET_AS_ZERO * (k11 * k22) was inf there and gave 1/2), and tiny variances keep their
    values.  Beyond variances of ~1e154 the products overflow: k11 k22 - k12^2 was
    inf - inf = NaN, taken as 0, so rho = 0.5 gave E[step step] = 1/2 and E[relu relu] = k/2;
    below ~1e-145 they underflow (1e-300, orthogonal: 1/2 for 1/4).  _J1 and _J0 scale there
    and stay exact; the fused form of the kernels' loops (which a branch would keep from
    vectorising) and _det, whose value has no float64, give NaN, which the kernels refuse.
    Exact values: orthogonal, 1/4 and k/(2 pi); equal, 1/2 and k/2; rho = 1/2 (t = pi/3), 1/3
    and k (sqrt(3)/2 + pi/3)/(2 pi); with k22 = 4 k11 and k12 = k11 (rho = 1/2) the same at
    2 k11."""
    from tpcompiler.expectations import special

    ns = {"njit": njit, "math": math}
    for name in ("_sdet", "_det", "_pos", "_angle", "_J0", "_J1"):
        exec(special.HELPER_SOURCE[name].replace("cache=True", "cache=False"), ns)

    def fused(k11, k12, k22):  # the kernels' form (special.fusable)
        sd = ns["_sdet"](k11, k12, k22)
        t = ns["_angle"](sd, k12)
        return (sd + (math.pi - t) * k12) / (2 * math.pi), (math.pi - t) / (2 * math.pi)

    half = (math.sqrt(3) / 2 + math.pi / 3) / (2 * math.pi)
    for k in (1e-300, 1e-170, 1e-160, 1e-140, 1e-12, 1.0, 1e12, 1e150, 1e160, 1e300):
        cases = ((k, 0.0, k, k / (2 * math.pi), 0.25), (k, k, k, k / 2, 0.5), (k, k / 2, k, k * half, 1 / 3),
                 (k / 2, k / 2, 2 * k, k * half, 1 / 3))
        in_range = 1e-145 < k < 1e154
        for k11, k12, k22, j1, j0 in cases:
            scalar = (ns["_J1"](k11, k12, k22), ns["_J0"](k11, k12, k22))
            for got in (scalar, fused(k11, k12, k22)) if in_range else (scalar,):
                assert got[1] == pytest.approx(j0, rel=1e-14), (k11, k12, k22, got)
                assert got[0] == pytest.approx(j1, rel=1e-14, abs=0), (k11, k12, k22, got)
            if not in_range:
                assert all(math.isnan(v) for v in fused(k11, k12, k22)), (k11, k12, k22)
    assert ns["_sdet"](0.0, 0.0, 1e300) == 0.0 and ns["_sdet"](1e-300, 0.0, 0.0) == 0.0  # (a variance of 0)
    assert math.isnan(ns["_det"](1e160, 5e159, 1e160))
    assert ns["_det"](1e150, 5e149, 1e150) == pytest.approx(7.5e299, rel=1e-15)
    for bad in ((math.inf, 1.0, 1.0), (1.0, math.nan, 1.0), (1e160, math.inf, 1e160)):
        assert math.isnan(ns["_sdet"](*bad)) and math.isnan(ns["_J1"](*bad)), bad


def test_quadrature_at_variances_beyond_the_product_range():
    """The quadrature's correlation from k11 k22: beyond variances of ~1e154 the product is
    inf, and E[tanh(u) tanh(v)] was 0 at rho = 1/2 and at rho = 1.  There tanh is sign to
    ~1e-80, so the value is E[sign(u) sign(v)] = (2/pi) arcsin(rho).  Below ~1e-162 the
    product underflows to 0, and the value was 0 too; there tanh(u) = u to ~1e-160, so it is
    E[u v] = k12."""
    t = sp.Symbol("t", real=True)
    f = g2.pair_expectation(sp.Lambda(t, sp.tanh(t)), sp.Lambda(t, sp.tanh(t)), rtol=RTOL).scalar
    for k in (1e160, 1e300):
        for rho in (0.5, -0.3, 1.0):
            assert f(k, rho * k, k) == pytest.approx(2 / math.pi * math.asin(rho), rel=1e-9, abs=1e-12), (k, rho)
        assert f(k, 0.5 * math.sqrt(k) * math.sqrt(k * 1e6), k * 1e6) == pytest.approx(1 / 3, rel=1e-9)
    for k in (1e-170, 1e-300):  # (k11 k22 underflows to 0: it was taken as no correlation, and E = 0)
        for rho in (0.5, 1.0):
            assert f(k, rho * k, k) == pytest.approx(rho * k, rel=1e-9), (k, rho)


def _gaussian_weighted_covariance(k11, k12, k22):
    """(S, det): E[f(u) g(v) exp(-(u^2 + v^2) / 2)] = det^(-1/2) E_S[f g], (u, v) ~ N(0, K), where
    S = K (I + K)^-1 and det = det(I + K) (completing the square in the Gaussian density)."""
    det = (1 + k11) * (1 + k22) - k12**2
    return ((k11 * (1 + k22) - k12**2) / det, k12 / det, (k22 * (1 + k11) - k12**2) / det), det


def _bump_squared(k11, k12, k22):
    """E[u^2 e^(-u^2/2) v^2 e^(-v^2/2)] in closed form: Isserlis, E_S[u^2 v^2] = S11 S22 + 2 S12^2."""
    (s11, s12, s22), det = _gaussian_weighted_covariance(k11, k12, k22)
    return (s11 * s22 + 2 * s12**2) / math.sqrt(det)


def _bump_relu(k11, k12, k22):
    """E[relu(u) e^(-u^2/2) relu(v) e^(-v^2/2)] in closed form: the arc-cosine kernel of S."""
    (s11, s12, s22), det = _gaussian_weighted_covariance(k11, k12, k22)
    r = max(-1.0, min(1.0, s12 / math.sqrt(s11 * s22)))
    j1 = math.sqrt(1 - r * r) + (math.pi - math.acos(r)) * r
    return math.sqrt(s11 * s22) * j1 / (2 * math.pi * math.sqrt(det))


@pytest.mark.parametrize("name,phi,exact", [
    ("bump", lambda t: t**2 * sp.exp(-t**2 / 2), _bump_squared),
    ("kinked_bump", lambda t: sp.Max(t, 0) * sp.exp(-t**2 / 2), _bump_relu)])
def test_quadrature_with_one_variance_far_above_the_other(name, phi, exact):
    """A function with a feature of width 1 at 0, with one variance of order 1 and the other
    up to 1e150 (the sinh rule's inner integral, and the exp-exp split of a kink): the inner
    nodes z = zc + (C / b) sinh(t) are within an ulp of each other once b exceeds ~1e16, and
    computing psi's argument as m + b z collapsed them (errors 4e-8 at 1e20, 7e-3 at 1e30,
    total beyond).  Both functions' values are known in closed form at every variance."""
    t = sp.Symbol("t", real=True)
    f = g2.pair_expectation(sp.Lambda(t, phi(t)), sp.Lambda(t, phi(t)), rtol=RTOL).scalar
    for big in (1e20, 1e30, 1e40, 1e100, 1e150):
        for small in (1e-2, 1.0, 1e2):
            for k11, k22 in ((small, big), (big, small)):
                for rho in (-0.99, -0.5, 0.5, 0.99):
                    k12 = rho * math.sqrt(k11 * k22)
                    assert f(k11, k12, k22) == pytest.approx(exact(k11, k12, k22), rel=1e-10, abs=0), (k11, rho, k22)


def test_weights_beyond_an_int64_square():
    """A weight of 1e10 or more squares to a number the derivation keeps as an exact integer,
    which Numba refuses as an int literal beyond int64 (the kernels failed to compile); it is
    printed as the float nearest to it.  Checked by homogeneity (relu: the kernels scale with
    w^2 exactly, to rounding) and, at 1e80, where the first layer's variances are 1e160, by
    tanh being sign: NNGP = (2/pi) arcsin(rho), the inputs' correlation (quadrature, which
    scales; relu's fused arc-cosine refuses them)."""
    from tpcompiler.layers import Dense, Relu, Tanh, serial

    X = np.array([[1.0, 0.0], [0.6, 0.8], [0.3, -0.2]])
    K1 = tp.compile(serial(Dense(8, W_std=1.0), Relu(), Dense(1)).program((2,))).kernels(X)
    for w in (1e10, 1e60):
        K = tp.compile(serial(Dense(8, W_std=w), Relu(), Dense(1)).program((2,))).kernels(X)
        for name in ("nngp", "ntk"):
            np.testing.assert_allclose(K[name], w**2 * K1[name], rtol=1e-13, atol=0)
    # variances of 1e160: a product of two has no float64, the kernels' arc-cosine refuses them
    with pytest.raises(tp.ProgramError, match="float64 range.*rescale"):
        tp.compile(serial(Dense(8, W_std=1e80), Relu(), Dense(1)).program((2,))).kernels(X)
    # a square beyond any float: printed as the bare name inf (a Numba NameError), or sympy's oo
    # folded through an arc-cosine (AttributeError): now the same refusal (CLI audit)
    for w, b in ((1e160, 0.1), (1.0, 1e200)):
        with pytest.raises(tp.ProgramError, match="float64 range.*rescale"):
            tp.compile(tp.load(MLP, depth=1, w_std=w, b_std=b, d=2)).kernels(X)
    with pytest.raises(tp.ProgramError, match="b_std = 1e.200 squares beyond the float64 range"):
        serial(Dense(8, b_std=1e200), Relu(), Dense(1)).program((2,))
    K = tp.compile(serial(Dense(8, W_std=1e80), Tanh(), Dense(1)).program((2,))).kernels(X)
    norms = np.linalg.norm(X, axis=1)
    rho = np.clip(X @ X.T / np.outer(norms, norms), -1, 1)
    np.fill_diagonal(rho, 1.0)  # (rounded, 1 - 1e-16: arcsin is 1e-8 off there)
    np.testing.assert_allclose(K["nngp"], 2 / np.pi * np.arcsin(rho), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,phi", [("signexp", lambda t: sp.sign(t) * sp.exp(-t**2 / 4)),
                                      ("steptanh", lambda t: sp.Heaviside(t) + sp.tanh(t))])
def test_a_function_with_a_jump_at_two_copies_of_an_input(name, phi):
    """k(x, x') at x' = x is k(x, x).  With a jump at 0, the quadrature's E[f(u) f(v)] has a
    square-root singularity at rho = 1, and two copies of an input meet it: their Gram entry
    and their variances differ in the last bit, which gave sg ~ 1e-8 for 0, an error that grew
    through the layers (signexp, depth 3: 1.8e-2 relative, steptanh 3.2e-4).  The quadrature
    takes a correlation within about 4 ulps of +-1 as +-1, as the arc-cosine helpers do."""
    from tpcompiler.layers import Dense, Nonlin, serial

    layers = []
    for _ in range(3):
        layers += [Dense(16, W_std=1.5, b_std=0.1), Nonlin(phi, name=name)]
    x = np.random.default_rng(0).standard_normal(5)
    K = tp.compile(serial(*layers, Dense(1)).program((5,))).kernels(np.stack([x, x]))
    for kernel in ("nngp", "ntk"):
        assert K[kernel][0, 1] == pytest.approx(K[kernel][0, 0], rel=1e-14, abs=0), kernel
