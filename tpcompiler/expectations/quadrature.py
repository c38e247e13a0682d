"""Quadrature rules for Gaussian expectations, as templates of generated Numba source.

A pair expectation uses the conditional decomposition of (u, v) ~ N(0, [[k11, k12], [k12, k22]]):

    u = s1 x,  v = a x + b z,  s1 = sqrt(k11),  a = sqrt(k22) rho,  b = sqrt(k22 (1 - rho^2)),
    E[phi(u) psi(v)] = E_x[phi(s1 x) G(a x)],  G(m) = E_z[psi(m + b z)],  x, z iid N(0, 1),

an outer rule over x and, at every outer node, an inner rule over z (``pair_module`` generates
``_core(k11, k12, k22, h, kind, C) -> (value, evaluations)``).  A one-variable expectation
E[g(sqrt(k) x)] uses the outer rule alone (``oned_module``, ``_core1``).  Every rule is a
weighted sum over nodes, normalised by the sum of its weights, and is driven by one step h
(errors fall exponentially in 1/h) and one scale C:

* **uniform trapezoid** (kind ``UNIFORM``): nodes k dx, dx = h / (1 + sd/8), weights
  exp(-x^2/2), truncated at |x| <= ``X_TRUNCATION``; best for oscillating entire functions
  (sin, cos).
* **hybrid** (kind ``HYBRID``): Gauss-Hermite, the smallest tabulated size (``GH_SIZES``) of
  at least 1.6/h + (``GHK`` sd/h)^2 nodes (enough for a function analytic in a strip of width
  ~1/sd), where the integrand is smooth on the Gaussian's own scale (small variance, or an
  inner integral at high correlation) so that this is cheap: the outer rule uses it when it
  needs no more nodes than the sinh rule, the inner rule when it needs at most twice as many
  (it needs no exp per node).  Otherwise the **sinh-mapped trapezoid**: x = x0 + co sinh(t),
  t = j h, weight proportional to cosh(t) exp(-x^2/2), co = C / max(sd, 1).  Nodes cluster at
  the function's feature x0 (the origin; for the inner integral the point z* = -m / b where
  psi's argument vanishes, clipped to [-``ZC``, ``ZC``]) and thin out geometrically in the
  tails, so the node count grows only like log(k).  The one-variable rule uses the sinh rule
  alone (no Gauss-Hermite).
* **exp-exp split** (kinks and jumps, whatever the kind): the line is split at the kink and
  each half mapped by x = c exp(s - exp(-s)), s = j h, weight x (1 + exp(-s)) exp(-x^2/2): a
  double-exponential clustering at the kink that keeps the trapezoid rule exponentially
  convergent.  The outer rule splits at 0 when phi or psi has a kink; the inner rule splits
  at z* when psi has a kink, and also for a smooth psi whose feature lies far out (b >
  ``BSPLIT`` and |z*| > ``ZC``: width 1/b, beyond the sinh rule's reach; E[tanh tanh] at
  variance 1e4 erred by 3e-7 with the sinh rule).
* **reflection**: when psi(-v) = eps psi(v) + c0 + c1 v + c2 v^2 (``functions.reflection``),
  G(-m) = eps G(m) + c0 + c1 m + c2 (m^2 + b^2), so the inner integral at -x is not computed.

``probing`` chooses the kind, h and C of each generated module.  The source is composed with
``source.render``: each rule is one template with holes for the statements at a node (the
centre node and the pair of nodes +-x); the uniform and exp-exp templates serve both the
outer and the inner integrals.
"""
from __future__ import annotations

import math

import sympy as sp

from tpcompiler.backends import codegen
from tpcompiler.expectations import special
from tpcompiler.expectations.source import Module, function, render, targets, tuple_source

#: Rule kinds (the runtime argument ``kind`` of the generated cores).  Kinked functions use
#: the exp-exp split whatever the kind (their inner integrals of a smooth psi use the kind).
HYBRID, UNIFORM = 0, 1

X_TRUNCATION = 8.5  # truncation of the standard normal (tail mass 2e-17, below rounding)
GHK = 1.5  # Gauss-Hermite with 1.6 / h + (GHK sd / h)^2 nodes for feature scale 1/sd
GH_SIZES = (4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96)
ZC = 3.0  # the inner sinh rule follows psi's feature up to 3 standard deviations out
BSPLIT = 4.0  # inner sd above which a feature beyond +-ZC gets the split rule
SLO = -math.log(42.0)  # exp-exp map: c exp(s - e^-s) < 1e-18 c below this s

# ---------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------
_COMMON = """
    _GHK = $ghk
    _GH_SIZES = $sizes


    def _gh_table():
        from numpy.polynomial.hermite_e import hermegauss
        xs, ws, off = [], [], [0]
        for n in _GH_SIZES:
            x, w = hermegauss(n)
            xs.append(x)
            ws.append(w / w.sum())
            off.append(off[-1] + n)
        return (np.concatenate(xs), np.concatenate(ws), np.array(off, dtype=np.int64),
                np.array(_GH_SIZES, dtype=np.int64))


    _GHX, _GHW, _GHOFF, _GHN = _gh_table()
    _X = $x
    _ZC = $zc
    _BSPLIT = $bsplit
    _SLO = $slo
    _HYBRID = $hybrid
    _UNIFORM = $uniform
"""

_GH_INDEX = '''
    @njit(cache=True)
    def _gh_index(sd, h):
        """Index into the Gauss-Hermite ladder for a function with feature scale 1/sd, or -1."""
        t = _GHK * sd / h
        need = 1.6 / h + t * t
        for i in range(_GHN.size):
            if _GHN[i] >= need:
                return i
        return -1
'''

# The node rules.  $center: statements for the node x = 0 with weight w; $pair: for the nodes
# +-x, each with weight w.  The rule adds the weights to ws.
_UNIFORM_RULE = """
    K = int(_X / dx) + 1
    e2 = math.exp(-dx * dx)
    w = 1.0
    r = math.exp(-0.5 * dx * dx)
    $center
    ws += w
    for kk in range(1, K + 1):
        # Gaussian weights by the recurrence w_(k+1) = w_k r_k, r_(k+1) = r_k e2
        w *= r
        r *= e2
        x = kk * dx
        $pair
        ws += 2.0 * w
"""

_SINH_RULE = """
    K = Ks
    ch = math.cosh(h)
    sh = math.sinh(h)
    w = co
    $center
    ws += w
    st = sh
    ct = ch
    for kk in range(1, K + 1):
        x = co * st
        w = co * ct * math.exp(-0.5 * x * x)
        $pair
        ws += 2.0 * w
        # sinh and cosh of kk h by the addition formulas
        st, ct = st * ch + ct * sh, st * sh + ct * ch
"""

# One half line of the exp-exp map, s = j $h for SLO <= s <= shi, node $x = $at at distance
# r = $c exp(s - exp(-s)) from the split point, weight r (1 + exp(-s)) exp(-$x^2/2)$step;
# $step is the factor h of the trapezoid rule, needed only when the two halves have
# different steps.  $body: the statements at the node.
_EXPEXP_RULE = """
    jlo = int(math.ceil(_SLO / $h))
    jhi = int(math.floor(shi / $h))
    q = math.exp(-jlo * $h)
    dq = math.exp(-$h)
    for j in range(jlo, jhi + 1):
        r = $c * math.exp(j * $h - q)
        $x = $at
        w = r * (1.0 + q) * math.exp(-0.5 * $x * $x)$step
        q *= dq
        $body
"""

_G_UNIFORM = '''
    @njit(cache=True)
    def _G_unif(m, b, dx):
        """E_z[_inner(m + b z)] by the uniform trapezoid with spacing dx."""
        acc = 0.0
        ws = 0.0
        $rule
        return acc / ws, 2 * K + 1
'''

_G_SPLIT = '''
    @njit(cache=True)
    def _G_split(m, b, h, C, zs):
        """E_z[_inner(m + b z)] with the line split at zs = -m / b (where psi's argument
        vanishes) and each half mapped by the exp-exp rule clustered at zs.  At the node
        z = zs + side r the argument is side b r (m + b zs = 0): computed as m + b z, nodes
        closer to zs than an ulp of zs collapsed onto it for b beyond ~1e16."""
        g = 0.0
        gw = 0.0
        n = 0
        ci = C / max(b, 1.0)
        for side in (-1.0, 1.0):
            far = -side * zs  # > 0 when the Gaussian bulk lies on this side, at that distance
            hs = h * 2.0 / far if far > 2.0 else h
            shi = math.log((_X - side * zs) / ci) + 1.0
            $half_line
            n += jhi - jlo + 1
        return g / gw, n
'''

_G = '''
    @njit(cache=True)
    def _G(m, b, h, kind, C):
        """E_z[_inner(m + b z)], z ~ N(0, 1); returns (value, number of evaluations)."""
        if b == 0.0:
            return _inner(m), 1
        g = 0.0
        gw = 0.0
        zs = -m / b
        $kink_split
        if b > _BSPLIT and _ZC < abs(zs) < _X:
            # psi's feature (width ~1/b) lies beyond the sinh rule's centre range [-3, 3],
            # where that rule's nodes are too far apart to resolve it (E[tanh tanh] at variance
            # 1e4 erred by 3e-7): split at the feature as for a kink
            return _G_split(m, b, h, C, zs)
        if kind == _UNIFORM:
            return _G_unif(m, b, h / (1.0 + b / 8.0))
        ci = C / max(b, 1.0)
        zc = min(_ZC, max(-_ZC, zs))
        jhi = int(math.floor(math.asinh((_X - zc) / ci) / h))
        jlo = int(math.ceil(math.asinh((-_X - zc) / ci) / h))
        ig = _gh_index(b, h)
        if ig >= 0 and _GHN[ig] <= 2 * (jhi - jlo + 1):
            for j in range(_GHOFF[ig], _GHOFF[ig + 1]):
                g += _GHW[j] * _inner(m + b * _GHX[j])
            return g, _GHN[ig]
        # the sinh rule centred at zc: t = j h for j = 0 .. jhi, then j = -1 .. jlo.  psi's
        # argument at z = zc + ci sinh(t) is r0 + b ci sinh(t), not m + b z: for b beyond
        # ~1e16, ci sinh(t) is below an ulp of zc near the centre, and the nodes collapsed
        # (tanh'/tanh' erred by 1e-3 at k22 = 1e30).  r0 = m + b zc is 0 when zc = zs, where
        # computing it would leave ulp(m), a shift of the nodes off psi's feature.
        r0 = 0.0 if zc == zs else m + b * zc
        bc = b * ci
        ch = math.cosh(h)
        sh = math.sinh(h)
        st = 0.0
        ct = 1.0
        for j in range(0, jhi + 1):
            z = zc + ci * st
            w = ct * math.exp(-0.5 * z * z)
            g += w * _inner(r0 + bc * st)
            gw += w
            st, ct = st * ch + ct * sh, st * sh + ct * ch
        st = -sh
        ct = ch
        for j in range(-1, jlo - 1, -1):
            z = zc + ci * st
            w = ct * math.exp(-0.5 * z * z)
            g += w * _inner(r0 + bc * st)
            gw += w
            st, ct = st * ch - ct * sh, ct * ch - st * sh
        return g / gw, jhi - jlo + 1
'''

_KINK_SPLIT = """
    if abs(zs) < _X:
        # psi has a kink where its argument vanishes: split there, exp-exp map on each side
        return _G_split(m, b, h, C, zs)
"""

_CORE = '''
    @njit(cache=True)
    def _core(k11, k12, k22, h, kind, C):
        """E[_outer(u) _inner(v)] by the conditional rule; returns (value, evaluations)."""
        if not (k11 >= 0.0 and k22 >= 0.0 and math.isfinite(k11) and math.isfinite(k22)
                and math.isfinite(k12)):
            return math.nan, 0
        s1 = math.sqrt(k11)
        s2 = math.sqrt(k22)
        q11, q12, q22 = k11, k12, k22
        d = k11 * k22
        if not ($tiny <= d and d <= $huge) and k11 > 0.0 and k22 > 0.0:
            # (variances beyond ~1e154 or below ~1e-145: rho and sg are scale-free, so k11 and
            # k22 are scaled by even powers of 2 and k12 by the square root of their product,
            # exactly; unscaled, inf / inf was NaN, and the rule 0, or digits were lost, or d
            # was 0 and rho taken as 0)
            $scaled
            d = q11 * q22
        if d > 0.0:
            rho = q12 / math.sqrt(d)
            rho = min(1.0, max(-1.0, rho))
            e = d - q12 * q12
            # (a correlation within about 4 ulps of +-1 is +-1, as in the arc-cosine helpers:
            # special.DET_AS_ZERO; a function with a jump turns sg ~ 1e-8 into an error ~1e-8)
            sg = math.sqrt(e / d) if e > $as_zero * d else 0.0
        else:
            rho = 0.0
            sg = 1.0
        a = s2 * rho
        b = s2 * sg
        seff = max(s1, abs(a))
        acc = 0.0
        ws = 0.0
        nev = 0
        G0 = 0.0
        if a == 0.0:
            G0, n0 = _G(0.0, b, h, kind, C)
            nev += n0
        $outer_rule
        return acc / ws, nev


    @njit(cache=True)
    def _core_many(k11, k12, k22, h, kind, C, out, counts):
        for i in range(out.size):
            out[i], counts[i] = _core(k11[i], k12[i], k22[i], h, kind, C)
'''

# The outer rule of a smooth pair: Gauss-Hermite when the hybrid kind allows it, else the
# uniform or the sinh rule.
_OUTER_SMOOTH = """
    co = C / max(seff, 1.0)
    Ks = int(math.asinh(_X / co) / h) + 1
    ig = -1
    if kind == _HYBRID:
        ig = _gh_index(seff, h)
        if ig >= 0 and _GHN[ig] > 2 * Ks + 1:
            ig = -1
    if ig >= 0:
        n = _GHN[ig]
        o = _GHOFF[ig]
        if n % 2 == 1:
            w = _GHW[o + n // 2]
            $center
            ws += w
        for j in range(n // 2):
            x = _GHX[o + n - 1 - j]
            w = _GHW[o + n - 1 - j]
            $pair
            ws += 2.0 * w
    elif kind == _UNIFORM:
        dx = h / (1.0 + seff / 8.0)
        $uniform
    else:
        $sinh
"""

# The outer rule with a kink at 0 (in phi, or in psi at a = 0): both half lines at once.
_OUTER_SPLIT = """
    co = C / max(seff, 1.0)
    $co_limit
    shi = math.log(_X / co) + 1.0
    $half_lines
"""

# G at the outer nodes +-x (G0 when a = 0; G(-x) by the reflection of psi if it has one).
_G_PAIR = """
    if a == 0.0:
        Gp = G0
        Gm = G0
    else:
        Gp, nn = _G(a * x, b, h, kind, C)
        nev += nn
        $g_minus
"""

_CORE1 = '''
    @njit(cache=True)
    def _core1(k, h, kind, C):
        """(E[_g(sqrt(k) x)], E[_g(sqrt(k) x)^2]) (tuples over the outputs of _g) by the 1-D
        rule; returns (moments, evaluations)."""
        if not (k >= 0.0 and math.isfinite(k)):
            return $nans, 0
        s1 = math.sqrt(k)
        seff = s1
        ws = 0.0
        $zero
        $rule
        return $result, nev
'''

_ONED_SMOOTH = """
    co = C / max(seff, 1.0)
    Ks = int(math.asinh(_X / co) / h) + 1
    if kind == _UNIFORM:
        dx = h / (1.0 + seff / 8.0)
        $uniform
    else:
        $sinh
    nev = 2 * K + 1
"""

_SCALAR_FUNCTION = """
    @njit(cache=True)
    def $name($arg):
        $body
        return $result
"""


# ---------------------------------------------------------------------------------------
# Printing the rules
# ---------------------------------------------------------------------------------------
def _common() -> str:
    return function(_COMMON, ghk=repr(GHK), sizes=repr(GH_SIZES), x=repr(X_TRUNCATION),
                    zc=repr(ZC), bsplit=repr(BSPLIT), slo=repr(SLO), hybrid=repr(HYBRID),
                    uniform=repr(UNIFORM))


def _symmetric_rules(center: str, pair: str) -> dict:
    """The uniform and sinh rules around 0 with the given node statements (template holes)."""
    return dict(uniform=render(_UNIFORM_RULE, center=center, pair=pair),
                sinh=render(_SINH_RULE, center=center, pair=pair))


def _split_at_zero(pair: str, co_limit: str = "") -> str:
    """The outer exp-exp rule split at 0, nodes +-x together (``pair``)."""
    half_lines = render(_EXPEXP_RULE, h="h", c="co", x="x", at="r", step="", body=pair + "\nws += 2.0 * w")
    return render(_OUTER_SPLIT, co_limit=co_limit, half_lines=half_lines)


def _scalar_function(name: str, exprs, arg: str) -> str:
    """``name(arg)`` returning the expression (or the tuple of ``exprs`` when it is a list)."""
    lines, outs = codegen.print_expressions(exprs if isinstance(exprs, list) else [exprs], "")
    result = tuple_source(outs) if isinstance(exprs, list) else outs[0]
    return function(_SCALAR_FUNCTION, name=name, arg=arg, body="\n".join(lines), result=result)


def _of(lam: sp.Lambda, arg: str) -> sp.Expr:
    """lam's expression in the variable Symbol(arg) of the generated function."""
    return lam.expr.xreplace({lam.variables[0]: sp.Symbol(arg, real=True)})


def _g_minus(reflection) -> str:
    """Statements setting Gm = G(-x): reflection None, or (eps, c0, c1, c2) with psi(-v) =
    eps psi(v) + c0 + c1 v + c2 v^2, so that G(-x) = eps G(x) + c0 + c1 m + c2 (m^2 + b^2),
    m = a x."""
    if reflection is None:
        return "Gm, nn = _G(-a * x, b, h, kind, C)\nnev += nn"
    eps, c0, c1, c2 = reflection
    terms = [f"{float(eps)!r} * Gp"]
    if c0:
        terms.append(f"{c0!r}")
    if c1:
        terms.append(f"{c1!r} * (a * x)")
    if c2:
        terms.append(f"{c2!r} * ((a * x) * (a * x) + b * b)")
    return "Gm = " + " + ".join(terms)


def pair_module(outer: sp.Lambda, inner: sp.Lambda, split_outer: bool, split_inner: bool,
                reflection) -> Module:
    """The module of ``_core(k11, k12, k22, h, kind, C)`` for E[outer(u) inner(v)].

    split_outer: the outer rule splits at 0 (outer or inner has a kink); split_inner: inner
    has a kink (split at z*; then the outer map's scale co is also kept below C b / |a|:
    G(x) = E_z[inner(a x + b z)] is a kink smoothed over a width ~b / |a| around x = 0).  reflection: inner's, or None (see ``_g_minus``)."""
    g_pair = render(_G_PAIR, g_minus=_g_minus(reflection))
    center = "x = 0.0\n" + g_pair + "\nacc += w * _outer(0.0) * Gp"
    pair = g_pair + "\nacc += w * (_outer(s1 * x) * Gp + _outer(-s1 * x) * Gm)"
    if split_outer:
        co_limit = "if b > 0.0 and a != 0.0:\n    co = min(co, C * b / abs(a))" if split_inner else ""
        outer_rule = _split_at_zero(pair, co_limit)
    else:
        outer_rule = render(_OUTER_SMOOTH, center=center, pair=pair, **_symmetric_rules(center, pair))
    half_line = render(_EXPEXP_RULE, h="hs", c="ci", x="z", at="zs + side * r", step=" * hs",
                       body="g += w * _inner(side * (b * r))\ngw += w")
    inner_uniform = render(_UNIFORM_RULE, center="acc += w * _inner(m)",
                           pair="acc += w * (_inner(m + b * x) + _inner(m - b * x))")
    return Module((
        _common(),
        codegen.custom_functions_source([outer.expr, inner.expr]),
        _scalar_function("_outer", _of(outer, "x"), "x"),
        _scalar_function("_inner", _of(inner, "v"), "v"),
        function(_GH_INDEX),
        function(_G_UNIFORM, rule=inner_uniform),
        function(_G_SPLIT, half_line=half_line),
        function(_G, kink_split=_KINK_SPLIT if split_inner else ""),
        function(_CORE, outer_rule=outer_rule, as_zero=repr(special.DET_AS_ZERO), tiny=repr(special.PRODUCT_RANGE[0]),
                 huge=repr(special.PRODUCT_RANGE[1]), scaled=special.SCALED_COVARIANCE),
    ))


def oned_module(funcs: list[sp.Lambda], kink: bool) -> Module:
    """The module of ``_core1(k, h, kind, C)``: the means and mean squares of the functions
    ``funcs`` of u ~ N(0, k), by one rule (``_g(x)`` returns their tuple)."""
    n = range(len(funcs))
    p = [f"p{i}" for i in n]
    q = [f"q{i}" for i in n]
    center = "\n".join([f"{targets(p)} = _g(0.0)"]
                       + [f"acc{i} += w * p{i}\nsq{i} += w * p{i} * p{i}" for i in n])
    pair = "\n".join([f"{targets(p)} = _g(s1 * x)", f"{targets(q)} = _g(-s1 * x)"]
                     + [f"acc{i} += w * (p{i} + q{i})\nsq{i} += w * (p{i} * p{i} + q{i} * q{i})" for i in n])
    if kink:
        rule = _split_at_zero(pair) + "\nnev = 2 * (jhi - jlo + 1)"
    else:
        rule = render(_ONED_SMOOTH, **_symmetric_rules(center, pair))
    nans = tuple_source([tuple_source(["math.nan"] * len(funcs))] * 2)
    result = tuple_source([tuple_source(f"acc{i} / ws" for i in n), tuple_source(f"sq{i} / ws" for i in n)])
    return Module((
        _common(),
        codegen.custom_functions_source([f.expr for f in funcs]),
        _scalar_function("_g", [_of(f, "x") for f in funcs], "x"),
        function(_CORE1, nans=nans, zero="\n".join(f"acc{i} = 0.0\nsq{i} = 0.0" for i in n),
                 rule=rule, result=result),
    ))
