"""Special functions of the closed forms, as sympy functions with Numba source.

Closed forms of bivariate Gaussian expectations (``closed_forms``) are sympy expressions in
the covariance entries k11, k12, k22 that use these functions; the printer of generated code
(``backends.codegen.NumbaPrinter``) prints them by name, and the modules that call them get
their njit definitions from ``HELPER_SOURCE`` (registered in ``codegen.HELPER_SOURCE``):

    _J1(k11, k12, k22) = E relu(u) relu(v) = (sd + (pi - t) k12) / (2 pi),
    _J0(k11, k12, k22) = E step(u) step(v) = (pi - t) / (2 pi),
    _RS(k11, k12, k22) = E relu(u) step(v) = (sqrt(k11) + k12 / sqrt(k22)) / (2 sqrt(2 pi)),
    with sd = sqrt(k11 k22 - k12^2), t = atan2(sd, k12) (cos t = rho), each 0 when a
    variance is 0 (relu(0) = step(0) = 0);
    _det(k11, k12, k22) = max(k11 k22 - k12^2, 0),  _sdet = sqrt(_det),
    _cvar(k11, k12, k22) = max(k11 - k12^2 / k22, 0) (= _det / k22, without the products),
    _gap(k11, k12, k22) = (k11 + k22)/2 - |k12| (the exponent of E sin sin, E cos cos),
    _pos(k11, k22) = 1 if both variances are positive else 0,
    _angle(y, x) = atan2(y, x) for y >= 0 (branch-free, so loops calling it vectorise).

``fusable`` rewrites _J1 and _J0 into _sdet, _angle and _pos, so that code evaluating both at
one covariance (every relu layer of an NTK) shares one square root and one angle.
"""
from __future__ import annotations

import sympy as sp

from tpcompiler.backends import codegen
from tpcompiler.expectations.source import function, render

__all__ = ["HELPER_SOURCE", "fusable", "written_out"]


class _Special(sp.Function):
    """A special function whose value at numbers ``evalf`` computes with mpmath
    (``_value``): an expectation of functions of input-independent vectors is a number at
    compile time (a readout relu(a) of an initial vector a), which the code generator folds
    into a constant with float().  The determinant helpers also have ``written_out(k11, k12,
    k22)``, their sympy expression without the clamp at 0, which ``written_out`` below
    substitutes where sympy must differentiate a closed form (pi-nets' transforms)."""

    def _eval_evalf(self, prec):
        import mpmath

        args = [a.evalf(prec) for a in self.args]
        if not all(a.is_Number for a in args):
            return None
        with mpmath.workprec(prec):
            # (a Float, or an infinite number: a variance beyond any float, b_std = 1e200 squared,
            # whose value is then not finite and refused by the kernels)
            return sp.Float(self._value(mpmath, *[mpmath.mpf(float(a)) if a.is_Float or not a.is_finite
                                                  else mpmath.mpf(a.p) / a.q for a in args]), precision=prec)


def _arc_cosine(mp, k11, k12, k22):
    """(sd, t): sqrt(max(k11 k22 - k12^2, 0)) and atan2(sd, k12) (cos t = rho)."""
    sd = _sdet._value(mp, k11, k12, k22)
    return sd, mp.atan2(sd, k12)


class _J1(_Special):
    """E relu(u) relu(v) (arc-cosine kernel of degree 1, with 1/(2 pi))."""

    nargs = 3

    @staticmethod
    def _value(mp, k11, k12, k22):
        if k11 <= 0 or k22 <= 0:
            return mp.mpf(0)
        sd, t = _arc_cosine(mp, k11, k12, k22)
        return (sd + (mp.pi - t) * k12) / (2 * mp.pi)


class _J0(_Special):
    """E step(u) step(v) (arc-cosine kernel of degree 0)."""

    nargs = 3

    @staticmethod
    def _value(mp, k11, k12, k22):
        if k11 <= 0 or k22 <= 0:
            return mp.mpf(0)
        return (mp.pi - _arc_cosine(mp, k11, k12, k22)[1]) / (2 * mp.pi)


class _RS(_Special):
    """E relu(u) step(v)."""

    nargs = 3

    @staticmethod
    def _value(mp, k11, k12, k22):
        if k11 <= 0 or k22 <= 0:
            return mp.mpf(0)
        return (mp.sqrt(k11) + k12 / mp.sqrt(k22)) / (2 * mp.sqrt(2 * mp.pi))


class _sdet(_Special):
    """sqrt(max(k11 k22 - k12^2, 0)): the shared square root of the arc-cosine kernels (the
    generated code takes a determinant within ``DET_AS_ZERO`` of 0 as 0)."""

    nargs = 3

    @staticmethod
    def _value(mp, k11, k12, k22):
        return mp.sqrt(_det._value(mp, k11, k12, k22))

    @staticmethod
    def written_out(k11, k12, k22):
        return sp.sqrt(k11 * k22 - k12**2)


class _det(_Special):
    """max(k11 k22 - k12^2, 0): the covariance determinant.  Closed forms are written with
    it (never as a difference of large terms such as (1 + 2 k11)(1 + 2 k22) - 4 k12^2), so
    that they stay accurate at large variances and at correlation +-1: for rows x and -x
    of norm 1e6 the determinant is exactly 0 in floating point and E[erf' erf'] is exact."""

    nargs = 3

    @staticmethod
    def _value(mp, k11, k12, k22):
        return max(k11 * k22 - k12**2, mp.mpf(0))

    @staticmethod
    def written_out(k11, k12, k22):
        return k11 * k22 - k12**2


class _cvar(_Special):
    """max(k11 - k12^2 / k22, 0): the variance of u given v = 0, det / k22 without forming the
    products k11 k22 and k12^2, which underflow for variances below about 1e-154 (E[delta
    delta] = 1 / (2 pi sqrt(det)) was off by 4e-5 at 1e-160 and a division by zero at 1e-200)
    and overflow above about 1e154."""

    nargs = 3

    @staticmethod
    def _value(mp, k11, k12, k22):
        return max(k11 - k12**2 / k22, mp.mpf(0))

    @staticmethod
    def written_out(k11, k12, k22):
        return k11 - k12**2 / k22


class _gap(_Special):
    """(k11 + k22)/2 - |k12|: the exponent of E sin sin and E cos cos, from the covariance
    entries as values.  Written out, sympy distributes the 1/2 over k11 and k22 and the code
    generator takes their constant terms (a bias's variance) out of the row features, while
    |k12| keeps its own: at k = x^2 + b^2 with x^2 = 1e16, b^2 rounds off k12 but not off the
    constant, and E sin(h)^2 came out as e^{-b^2}/2 instead of 1/2.  As a function of k11, k12,
    k22 it is exactly 0 on the diagonal (k11 = k12 = k22, one value)."""

    nargs = 3

    @staticmethod
    def _value(mp, k11, k12, k22):
        return (k11 + k22) / 2 - abs(k12)

    @staticmethod
    def written_out(k11, k12, k22):
        return (k11 + k22) / 2 - sp.Abs(k12)

    def fdiff(self, argindex=1):
        return sp.S.Half if argindex != 2 else -sp.sign(self.args[1])


class _pos(_Special):
    """1 if k11 > 0 and k22 > 0 else 0 (a zero variance makes relu/step vanish exactly)."""

    nargs = 2

    @staticmethod
    def _value(mp, k11, k22):
        return mp.mpf(1 if k11 > 0 and k22 > 0 else 0)


class _angle(_Special):
    """atan2(y, x) for y >= 0 (the arc-cosine angle), generated as a branch-free polynomial
    so that loops calling it vectorise (see ``_angle_source``)."""

    nargs = 2

    @staticmethod
    def _value(mp, y, x):
        return mp.atan2(y, x)


def _atan_coefficients(degree: int = 10) -> list[float]:
    """Coefficients c_k of atan(u) = u + u z sum_k c_k z^k, z = u^2, |u| <= tan(pi/8):
    Chebyshev interpolation at 50 digits (mpmath).  Degree 10 leaves a truncation error
    below 5e-18, so the double-precision result is correct to rounding."""
    import mpmath

    with mpmath.workdps(50):
        Z = mpmath.tan(mpmath.pi / 8) ** 2

        def g(z):
            u = mpmath.sqrt(z)
            return (mpmath.atan(u) - u) / (u * z) if z else mpmath.mpf(-1) / 3

        nodes = [Z / 2 * (1 - mpmath.cos(mpmath.pi * (2 * k + 1) / (2 * (degree + 1)))) for k in range(degree + 1)]
        A = mpmath.matrix([[x**j for j in range(degree + 1)] for x in nodes])
        c = mpmath.lu_solve(A, mpmath.matrix([g(x) for x in nodes]))
        return [float(c[j]) for j in range(degree + 1)]


def _angle_source() -> str:
    """njit source of _angle(y, x) = atan2(y, x) for y >= 0: reduce to t = min/max in
    [0, 1], then to |u| <= tan(pi/8) by atan(t) = pi/4 + atan((t-1)/(t+1)), a polynomial,
    and reflections.  No calls and no branches (selects only): libm's atan2 is a call that
    stops the loop vectoriser, and costs ~10x more per pair than the vectorised polynomial.

    Like the other helpers it is a plain njit function that LLVM inlines into the pair loop;
    numba's own inline="always" would copy its selects into the numba IR as branches, and the
    IR passes are superlinear in the number of blocks (a depth-2 CNN of length 8: 255 s of
    compilation instead of 30 s)."""
    c = _atan_coefficients()
    horner = repr(c[-1])
    for ck in reversed(c[:-1]):
        horner = f"({horner}) * z + {ck!r}"
    return f'''
@njit(cache=True, error_model="numpy")
def _angle(y, x):
    ax = abs(x)
    big = y > ax
    num = ax if big else y
    den = y if big else ax
    den = den if den > 0.0 else 1.0
    t = num / den
    hi = t > 0.41421356237309503
    u = (t - 1.0) / (t + 1.0) if hi else t
    z = u * u
    a = u + u * z * ({horner})
    a = a + 0.7853981633974483 if hi else a
    a = 1.5707963267948966 - a if big else a
    return 3.141592653589793 - a if x < 0.0 else a
'''


def fusable(expr: sp.Expr) -> sp.Expr:
    """Rewrite the arc-cosine helpers into shared primitives, so that generated code that
    evaluates E[relu relu] and E[step step] at the same covariance (every relu layer of an
    NTK) computes one square root and one atan2 instead of two:
        _J1 -> _pos (sd + (pi - t) k12) / (2 pi),  _J0 -> _pos (pi - t) / (2 pi),
        sd = _sdet(k11, k12, k22),  t = atan2(sd, k12)."""
    rep = {}
    for f in expr.atoms(_J0, _J1):
        k11, k12, k22 = f.args
        sd = _sdet(k11, k12, k22)
        t = _angle(sd, k12)
        if isinstance(f, _J1):
            rep[f] = _pos(k11, k22) * (sd + (sp.pi - t) * k12) / (2 * sp.pi)
        else:
            rep[f] = _pos(k11, k22) * (sp.pi - t) / (2 * sp.pi)
    return expr.xreplace(rep) if rep else expr


#: A determinant k11 k22 - k12^2 at most this times k11 k22 is taken as 0 by the generated
#: code: a correlation within about 4 ulps of +-1 is +-1.  sqrt(det) has a square-root
#: singularity there, so a covariance and a variance that are equal but were computed by
#: different arithmetic (two equal windows of an image: a Gram entry against a row's sum),
#: one ulp apart, would give an angle of ~1e-8 instead of 0; through the arc-cosine
#: kernels of several step layers that error grows to ~1e-3.  Snapping stays within the
#: accuracy float64 inputs allow near +-1 (the exact value at a covariance a few ulps away,
#: tests/test_kernel_scales.py's measure); ``_value`` (mpmath) stays exact.
DET_AS_ZERO = 2.0**-50

#: sd = sqrt(k11 k22 - k12^2) of the generated helpers, snapped (DET_AS_ZERO).  Where the
#: products overflow (variances beyond about 1e154), k11 k22 - k12^2 is inf - inf = NaN,
#: which compared as "not above the bound" gave sd = 0, a correlation of 1 whatever the
#: covariance (E[step step] = 1/2 at rho = 0.5); where they underflow (variances below about
#: 1e-145), they lose digits (E[step step] = 0.3333337 at 1e-160) and then vanish (1/2 at
#: 1e-170).  Outside [PRODUCT_RANGE], k11 and k22 are scaled by even powers of 2 and k12 by
#: the square root of their product, exactly, and sd scaled back.  An infinite or NaN argument
#: gives NaN (the kernels then refuse it, check_finite).  (The lower end keeps a determinant
#: down to DET_AS_ZERO times the product a normal float.)
PRODUCT_RANGE = (2.0**-960, 1.7976931348623157e308)

#: Generated code: a covariance (k11, k12, k22) of finite entries and positive variances scaled
#: exactly for use outside PRODUCT_RANGE: q11 = k11 2^-e1 and q22 = k22 2^-e2 with e1, e2 even
#: (both in [1/4, 1)), q12 = k12 2^-eh with eh = (e1 + e2) / 2, so that q12 / sqrt(q11 q22)
#: is the correlation and q11 q22 - q12^2 = (k11 k22 - k12^2) 2^-2eh.  (Also read by the
#: quadrature's core, quadrature.py, whose own h is its step.)
SCALED_COVARIANCE = """
    e1 = math.frexp(k11)[1] & -2
    e2 = math.frexp(k22)[1] & -2
    eh = (e1 + e2) // 2
    q11, q12, q22 = math.ldexp(k11, -e1), math.ldexp(k12, -eh), math.ldexp(k22, -e2)"""

_SQRT_DET = """
    p = k11 * k22
    if $tiny <= p and p <= $huge:
        d = p - k12 * k12
        sd = 0.0 if d <= $as_zero * p else math.sqrt(d)  # (a NaN stays NaN)
    elif math.isfinite(k11) and math.isfinite(k12) and math.isfinite(k22):
        $scaled
        d = q11 * q22 - q12 * q12
        sd = 0.0 if d <= ($as_zero * q11) * q22 else math.ldexp(math.sqrt(d), eh)
    else:
        sd = math.nan"""


def _sqrt_det_source() -> str:
    """``_SQRT_DET`` with its constants."""
    return render(_SQRT_DET, as_zero=repr(DET_AS_ZERO), tiny=repr(PRODUCT_RANGE[0]), huge=repr(PRODUCT_RANGE[1]),
                  scaled=SCALED_COVARIANCE)


_ARC_COSINE = """
    @njit(cache=True)
    def $name(k11, k12, k22):
        if k11 <= 0.0 or k22 <= 0.0:
            return 0.0
        $sqrt_det
        $value
"""

def written_out(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every special function that has a ``written_out`` form replaced by it (so
    that sympy can differentiate it)."""
    return expr.replace(lambda e: isinstance(e, _Special) and hasattr(e, "written_out"),
                        lambda e: e.written_out(*e.args))


#: njit source of each function, by name.  _J1 and _J0 (in closed-form modules, evaluated once
#: per call) use libm's atan2; the fused form (in kernel pair loops) uses _angle.
HELPER_SOURCE = {
    "_sdet": function("""
    @njit(cache=True, error_model="numpy")
    def _sdet(k11, k12, k22):
        # (in the kernels' pair loops, which vectorise: selects, no branch; NaN outside
        # PRODUCT_RANGE, which the kernels refuse, where _J1 and _J0 scale)
        p = k11 * k22
        d = p - k12 * k12
        sd = 0.0 if d <= $as_zero * p else math.sqrt(d)
        return sd if ($tiny <= p and p <= $huge) or k11 == 0.0 or k22 == 0.0 else math.nan
""", as_zero=repr(DET_AS_ZERO), tiny=repr(PRODUCT_RANGE[0]), huge=repr(PRODUCT_RANGE[1])),
    "_det": '''
@njit(cache=True, error_model="numpy")
def _det(k11, k12, k22):
    d = k11 * k22 - k12 * k12
    if not math.isfinite(d):  # (the products overflow: no float64 value; NaN was taken as 0)
        return math.nan
    return d if d > 0.0 else 0.0
''',
    "_cvar": '''
@njit(cache=True, error_model="numpy")
def _cvar(k11, k12, k22):
    d = k11 - k12 * (k12 / k22)
    if not math.isfinite(d):  # (k22 = 0: no conditional law)
        return math.nan
    return d if d > 0.0 else 0.0
''',
    "_gap": '''
@njit(cache=True, error_model="numpy")
def _gap(k11, k12, k22):
    return 0.5 * (k11 + k22) - abs(k12)
''',
    "_pos": '''
@njit(cache=True, error_model="numpy")
def _pos(k11, k22):
    return 1.0 if (k11 > 0.0 and k22 > 0.0) else 0.0
''',
    "_J1": function(_ARC_COSINE, name="_J1", sqrt_det=_sqrt_det_source(), value="""
        t = math.atan2(sd, k12)
        return (sd + (math.pi - t) * k12) / (2.0 * math.pi)"""),
    "_J0": function(_ARC_COSINE, name="_J0", sqrt_det=_sqrt_det_source(), value="""
        return (math.pi - math.atan2(sd, k12)) / (2.0 * math.pi)"""),
    "_RS": '''
@njit(cache=True)
def _RS(k11, k12, k22):
    if k11 <= 0.0 or k22 <= 0.0:
        return 0.0
    s1 = math.sqrt(k11)
    c = k12 / math.sqrt(k22)
    c = min(s1, max(-s1, c))
    return (s1 + c) / (2.0 * math.sqrt(2.0 * math.pi))
''',
    "_angle": _angle_source(),
}

codegen.HELPER_SOURCE.update(HELPER_SOURCE)
