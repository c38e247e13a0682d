"""Closed forms of Gaussian expectations E[phi(u) psi(v)] and E[phi(u)].

For (u, v) ~ N(0, [[k11, k12], [k12, k22]]), phi and psi are expanded into linear combinations
of *atoms* a(c x) (``decompose``):

    1, x^p, relu, step, erf, exp(-x^2) (erf' up to a constant), sin, cos, exp, DiracDelta,

each with a scale c (erfc, sign, sinh, cosh, leaky relu, sin(a x + b), ... are rewritten
into these).  E[phi psi] is bilinear, so it is a sum of atom-pair expectations; a scale
becomes a change of covariance, E[A(a u) B(b v)] = E[A(u') B(v')] with covariance
[[a^2 k11, a b k12], [a b k12, b^2 k22]], so the rules below are stated for unit atoms:

* ``PAIR_RULES``, direct formulas (cos t = k12 / sqrt(k11 k22), sd = sqrt(k11 k22 - k12^2)):
  E relu relu = (sd + (pi - t) k12) / (2 pi) and E step step = (pi - t) / (2 pi) (arc-cosine);
  E relu(u) step(v) = (sqrt(k11) + k12 / sqrt(k22)) / (2 sqrt(2 pi));
  E erf erf = (2/pi) arcsin(2 k12 / sqrt((1 + 2 k11)(1 + 2 k22)));
  E step(u) erf(v) = atan(sqrt(2) k12 / sqrt(k11 + 2 det)) / pi;
  E sin sin = exp(-(k11 + k22)/2) sinh(k12), E cos cos = exp(-(k11 + k22)/2) cosh(k12),
  E exp exp = exp((k11 + 2 k12 + k22)/2), E exp(u) sin(v) = exp((k11 - k22)/2) sin(k12) and
  likewise cos (characteristic functions);
* Gaussian tilt: E[A(u) exp(-v^2)] = (1 + 2 k22)^(-1/2) E[A(u')], var u' = k11 - 2 k12^2 /
  (1 + 2 k22) (so erf' erf' and every atom times a Gaussian);
* the Dirac delta as a conditional expectation: E[A(u) delta(v)] = p_v(0) E[A(u) | v = 0],
  p_v(0) = 1 / sqrt(2 pi k22), var(u | v = 0) = k11 - k12^2 / k22;
* Stein's lemma E[u^p g(v)] = (p-1) k11 E[u^(p-2) g(v)] + k12 E[u^(p-1) g'(v)] (which gives
  Isserlis' theorem for monomials);
* parity: odd times even vanishes ((u, v) -> (-u, -v)); relu = (x + |x|)/2 against an odd
  function and step = (1 + sign)/2 against an even one reduce to x and 1.

The one-variable moments E[a(u)], u ~ N(0, k), are the table ``MOMENTS``.  Every formula is
written without cancellation: the determinant k11 k22 - k12^2 appears as ``_det`` (clipped at
0; never as a difference of large terms such as (1 + 2 k11)(1 + 2 k22) - 4 k12^2), arcsin
as atan, and sinh/cosh of k12 with exp(-(k11 + k22)/2) as exp(|k12| - (k11 + k22)/2) times
expm1, so that they stay accurate from tiny to huge variances and at correlation +-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.codegen.cfunctions import expm1

from tpcompiler.expectations.functions import EVEN, NEITHER, ODD, as_lambda
from tpcompiler.expectations.special import _J0, _J1, _RS, _cvar, _det, _gap
from tpcompiler.ir import nonlinearities as nl

#: Symbols of the covariance entries in closed forms of pair expectations.
K11, K12, K22 = sp.symbols("k11 k12 k22", real=True)
#: The variance in closed forms of one-variable expectations.
K = sp.Symbol("k", real=True)

# ---------------------------------------------------------------------------------------
# Atoms
# ---------------------------------------------------------------------------------------
ONE, POW, RELU, STEP, ERF, GAUSS, SIN, COS, EXP, DELTA = (
    "one", "pow", "relu", "step", "erf", "gauss", "sin", "cos", "exp", "delta",
)
_PARITY = {ONE: EVEN, GAUSS: EVEN, COS: EVEN, DELTA: EVEN, ERF: ODD, SIN: ODD}


@dataclass(frozen=True)
class Atom:
    """a(c x) for a unit atom ``kind``; POW carries its power p (and c = 1)."""

    kind: str
    c: sp.Expr = sp.S.One
    p: int = 0

    def parity(self) -> int:
        if self.kind == POW:
            return EVEN if self.p % 2 == 0 else ODD
        return _PARITY.get(self.kind, NEITHER)

    def unit(self) -> Atom:
        return Atom(self.kind, sp.S.One, self.p)


_ATOM_ONE = Atom(ONE)


def _power(p: int) -> Atom:
    """x^p as an atom (x^0 = 1)."""
    return Atom(POW, p=p) if p > 0 else _ATOM_ONE


def _linear_arg(arg, x):
    """(a, b) with arg = a x + b, or None."""
    if not arg.has(x):
        return None
    try:
        poly = sp.Poly(arg, x)
    except sp.PolynomialError:
        return None
    if poly.degree() != 1:
        return None
    a, b = poly.all_coeffs()
    if a.free_symbols or b.free_symbols:
        return None
    return a, (sp.S.Zero if b.is_zero else b)


#: Functions of a x (no offset) that are one atom.
_ATOM_FUNCTIONS = {nl.relu: RELU, nl.step: STEP, sp.Heaviside: STEP, sp.erf: ERF, sp.DiracDelta: DELTA}


def _atoms_of_factor(f, x):
    """Express one x-dependent factor as a list of (coef, Atom), or None."""
    if f == x:
        return [(sp.S.One, _power(1))]
    if f.is_Pow and f.base == x and f.exp.is_Integer and f.exp > 0:
        return [(sp.S.One, _power(int(f.exp)))]
    if isinstance(f, sp.exp):
        # exp(c2 x^2 + c1 x + c0): a Gaussian (c2 < 0, c1 = 0) or an exponential (c2 = 0)
        arg = sp.expand(f.args[0])
        try:
            poly = sp.Poly(arg, x)
        except sp.PolynomialError:
            return None
        if any(c.free_symbols for c in poly.all_coeffs()) or poly.degree() > 2:
            return None
        coeffs = [sp.S.Zero] * (3 - len(poly.all_coeffs())) + list(poly.all_coeffs())
        c2, c1, c0 = coeffs
        if not c2.is_zero:
            if not c1.is_zero or not (c2 < 0):
                return None
            return [(sp.exp(c0), Atom(GAUSS, sp.sqrt(-c2)))]
        if not c1.is_zero:
            return [(sp.exp(c0), Atom(EXP, c1))]
        return None
    if isinstance(f, (sp.sinh, sp.cosh)):
        lin = _linear_arg(f.args[0], x)
        if lin is None:
            return None
        a, b = lin
        sgn = -1 if isinstance(f, sp.sinh) else 1
        return [(sp.exp(b) / 2, Atom(EXP, a)), (sgn * sp.exp(-b) / 2, Atom(EXP, -a))]
    if isinstance(f, (sp.sin, sp.cos)):
        lin = _linear_arg(f.args[0], x)
        if lin is None:
            return None
        a, b = lin
        if isinstance(f, sp.sin):  # sin(ax+b) = cos b sin(ax) + sin b cos(ax)
            out = [(sp.cos(b), Atom(SIN, a)), (sp.sin(b), Atom(COS, a))]
        else:  # cos(ax+b) = cos b cos(ax) - sin b sin(ax)
            out = [(sp.cos(b), Atom(COS, a)), (-sp.sin(b), Atom(SIN, a))]
        return [(c, t) for c, t in out if not c.is_zero]
    if isinstance(f, (sp.Max, sp.Min)):
        # max(c1 x, c2 x) = min(c) x + (max(c) - min(c)) relu(x) (leaky relu); min likewise
        if len(f.args) != 2:
            return None
        slopes = []
        for arg in f.args:
            if arg.is_zero:
                slopes.append(sp.S.Zero)
                continue
            lin = _linear_arg(arg, x)
            if lin is None or not lin[1].is_zero:
                return None
            slopes.append(lin[0])
        lo, hi = sorted(slopes, key=float)
        if isinstance(f, sp.Max):
            out = [(lo, _power(1)), (hi - lo, Atom(RELU))]
        else:
            out = [(hi, _power(1)), (lo - hi, Atom(RELU))]
        return [(c, t) for c, t in out if not c.is_zero]
    if f.func in _ATOM_FUNCTIONS or isinstance(f, (sp.erfc, sp.sign)):
        if isinstance(f, sp.DiracDelta) and len(f.args) != 1:
            return None  # derivatives of the delta
        lin = _linear_arg(f.args[0], x)
        if lin is None or not lin[1].is_zero:
            return None
        a = lin[0]
        if isinstance(f, sp.erfc):  # erfc = 1 - erf
            return [(sp.S.One, _ATOM_ONE), (-sp.S.One, Atom(ERF, a))]
        # (step(0) = 0; writing sign as 2 step - 1 or Heaviside as step made them -1 and 0 at
        # 0, which a zero-variance argument, a zero input without a bias, reads)
        if isinstance(f, sp.sign):  # sign(ax) = step(ax) - step(-ax): 0 at 0
            return [(sp.S.One, Atom(STEP, a)), (-sp.S.One, Atom(STEP, -a))]
        if isinstance(f, sp.Heaviside):  # H(ax) = (1 - H0) step(ax) + H0 (1 - step(-ax)): H0 at 0
            h0 = f.args[1] if len(f.args) > 1 else sp.Rational(1, 2)
            if h0.free_symbols or not h0.is_real:
                return None
            out = [(1 - h0, Atom(STEP, a)), (h0, _ATOM_ONE), (-h0, Atom(STEP, -a))]
            return [(c, t) for c, t in out if not c.is_zero]
        return [(sp.S.One, Atom(_ATOM_FUNCTIONS[f.func], a))]
    return None


def decompose(expr, x):
    """Write expr(x) as a list of (coefficient, Atom); None when it is not a combination of atoms."""
    expr = sp.expand(sp.sympify(expr), power_base=False, log=False, multinomial=True)
    terms = {}
    for term in sp.Add.make_args(expr):
        coef, factors = sp.S.One, []
        for f in sp.Mul.make_args(term):
            if f.has(x):
                factors.append(f)
            else:
                coef *= f
        if not factors:
            parts = [(sp.S.One, _ATOM_ONE)]
        elif len(factors) == 1:
            parts = _atoms_of_factor(factors[0], x)
            if parts is None:
                return None
        else:
            return None
        for c, atom in parts:
            terms[atom] = terms.get(atom, sp.S.Zero) + coef * c
    out = [(c, a) for a, c in terms.items() if not c.is_zero]
    if not out:
        return [(sp.S.Zero, _ATOM_ONE)]
    if any(not c.is_number for c, _ in out):
        return None
    return out


# ---------------------------------------------------------------------------------------
# Rule tables (built once)
# ---------------------------------------------------------------------------------------
#: E[a(u)], u ~ N(0, k), for a unit atom other than POW (E u^p = (p-1)!! k^(p/2), p even).
MOMENTS = {
    ONE: lambda k: sp.S.One,
    RELU: lambda k: sp.sqrt(k / (2 * sp.pi)),
    STEP: lambda k: nl.step(k) / 2,  # (0 at k = 0: u == 0 and step(0) = 0)
    ERF: lambda k: sp.S.Zero,
    SIN: lambda k: sp.S.Zero,
    GAUSS: lambda k: 1 / sp.sqrt(1 + 2 * k),
    COS: lambda k: sp.exp(-k / 2),
    EXP: lambda k: sp.exp(k / 2),
    DELTA: lambda k: 1 / sp.sqrt(2 * sp.pi * k),
}

#: Derivatives of unit atoms other than ONE and POW, as [(coef, unit Atom)]; GAUSS and DELTA
#: have none that is an atom.
DERIVATIVES = {
    RELU: [(sp.S.One, Atom(STEP))],
    STEP: [(sp.S.One, Atom(DELTA))],
    ERF: [(2 / sp.sqrt(sp.pi), Atom(GAUSS))],
    SIN: [(sp.S.One, Atom(COS))],
    COS: [(-sp.S.One, Atom(SIN))],
    EXP: [(sp.S.One, Atom(EXP))],
}

#: E[A(u) B(v)] for unit atoms of kinds (A, B): (rule name, formula in k11, k12, k22).  The
#: pair (B, A) is the same formula with k11 and k22 exchanged.
PAIR_RULES = {
    (RELU, RELU): ("arc-cosine", lambda k11, k12, k22: _J1(k11, k12, k22)),
    (STEP, STEP): ("arc-cosine", lambda k11, k12, k22: _J0(k11, k12, k22)),
    (RELU, STEP): ("arc-cosine", lambda k11, k12, k22: _RS(k11, k12, k22)),
    # arcsin(z) = atan(z / sqrt(1 - z^2)) with 1 - z^2 written through the determinant:
    # asin(2 k12 / sqrt((1 + 2 k11)(1 + 2 k22))) loses all accuracy near z = +-1 (rows x
    # and -x of large norm: ntk(x, -x) != -ntk(x, x) by 6e-5 at norm 1e6)
    (ERF, ERF): ("erf arcsin", lambda k11, k12, k22: (
        2 / sp.pi * sp.atan(2 * k12 / sp.sqrt(1 + 2 * k11 + 2 * k22 + 4 * _det(k11, k12, k22))))),
    (STEP, ERF): ("erf arcsin", lambda k11, k12, k22: (
        sp.atan(sp.sqrt(2) * k12 / sp.sqrt(k11 + 2 * _det(k11, k12, k22))) / sp.pi)),
    # exp(-(k11 + k22)/2) sinh(k12) and cosh(k12), written so that nothing overflows
    # (exp(-k) sinh(k) was 0 * inf = NaN beyond k = 710), nothing cancels at small k, and the
    # exponent is one value of the three entries (_gap: exactly 0 on the diagonal)
    (SIN, SIN): ("characteristic function", lambda k11, k12, k22: (
        sp.sign(k12) * sp.exp(-_gap(k11, k12, k22)) * (-expm1(-2 * sp.Abs(k12))) / 2)),
    (COS, COS): ("characteristic function", lambda k11, k12, k22: (
        sp.exp(-_gap(k11, k12, k22)) * (1 + sp.exp(-2 * sp.Abs(k12))) / 2)),
    (EXP, EXP): ("characteristic function", lambda k11, k12, k22: sp.exp((k11 + 2 * k12 + k22) / 2)),
    (EXP, SIN): ("characteristic function", lambda k11, k12, k22: sp.exp((k11 - k22) / 2) * sp.sin(k12)),
    (EXP, COS): ("characteristic function", lambda k11, k12, k22: sp.exp((k11 - k22) / 2) * sp.cos(k12)),
}

#: Names of the rules in the order ``describe`` lists them.
RULE_NAMES = ("arc-cosine", "erf arcsin", "Gaussian tilt", "characteristic function",
              "Stein/Isserlis", "conditional delta", "parity")

_MAX_DEPTH = 12  # recursion depth of Stein's lemma and the parity rules


def moment(atom: Atom, k):
    """E[a(u)], u ~ N(0, k), for a unit atom (its scale already folded into k)."""
    if atom.kind == POW:
        p = atom.p
        return sp.S.Zero if p % 2 else sp.factorial2(p - 1) * k ** sp.Rational(p, 2)
    return MOMENTS[atom.kind](k)


def _derivative(atom: Atom):
    """Derivative of a unit atom as [(coef, unit Atom)], or None."""
    if atom.kind == ONE:
        return []
    if atom.kind == POW:
        return [(sp.Integer(atom.p), _power(atom.p - 1))]
    return DERIVATIVES.get(atom.kind)


# The reductions below take the atom they are named for as ``S`` (variance ks) and the other
# atom as ``O`` (variance ko); each returns the expectation or None.
def _tilt(O, S, ko, k12, ks, used, depth):
    """E[O(u) exp(-v^2)] = (1 + 2 ks)^(-1/2) E[O(u')], var u' = ko - 2 k12^2 / (1 + 2 ks),
    written (ko + 2 det) / (1 + 2 ks) (no cancellation at large k and |rho| ~ 1)."""
    used.add("Gaussian tilt")
    return moment(O, (ko + 2 * _det(ko, k12, ks)) / (1 + 2 * ks)) / sp.sqrt(1 + 2 * ks)


def _condition_on_zero(O, S, ko, k12, ks, used, depth):
    """E[O(u) delta(v)] = p_v(0) E[O(u) | v = 0], var(u | v = 0) = det / ks (``_cvar``)."""
    used.add("conditional delta")
    return moment(O, _cvar(ko, k12, ks)) / sp.sqrt(2 * sp.pi * ks)


def _stein(O, S, ko, k12, ks, used, depth):
    """E[v^p g(u)] = (p-1) ks E[v^(p-2) g(u)] + k12 E[v^(p-1) g'(u)]."""
    dO = _derivative(O)
    if dO is None:
        return None
    p = S.p
    total = sp.S.Zero
    if p >= 2:
        t = _pair_unit(_power(p - 2), O, ks, k12, ko, used, depth + 1)
        if t is None:
            return None
        total += (p - 1) * ks * t
    for c, atom in dO:
        t = _pair_unit(_power(p - 1), atom, ks, k12, ko, used, depth + 1)
        if t is None:
            return None
        total += k12 * c * t
    used.add("Stein/Isserlis")
    return total


#: Reductions by the kind of one of the atoms, tried in this order, with the side of the pair
#: they apply to when both atoms are of that kind (1: the second atom, 0: the first).
REDUCTIONS = ((GAUSS, _tilt, 1), (DELTA, _condition_on_zero, 1), (POW, _stein, 0))


def _pair_unit(A: Atom, B: Atom, k11, k12, k22, used: set, depth=0):
    """E[A(u) B(v)] for unit atoms; a sympy expression or None.  ``used`` collects the names
    of the rules applied."""
    if depth > _MAX_DEPTH:
        return None
    if A.parity() * B.parity() == -1:  # one odd, one even: (u, v) -> (-u, -v) flips the sign
        used.add("parity")
        return sp.S.Zero
    if A.kind == ONE:
        return moment(B, k22)
    if B.kind == ONE:
        return moment(A, k11)
    if (A.kind, B.kind) in PAIR_RULES:
        name, formula = PAIR_RULES[(A.kind, B.kind)]
        used.add(name)
        return formula(k11, k12, k22)
    if (B.kind, A.kind) in PAIR_RULES:
        name, formula = PAIR_RULES[(B.kind, A.kind)]
        used.add(name)
        return formula(k22, k12, k11)
    for kind, reduce, side in REDUCTIONS:
        orders = ((A, B, k11, k22), (B, A, k22, k11))  # (O, S, ko, ks): S second, then first
        for O, S, ko, ks in (orders if side == 1 else orders[::-1]):
            if S.kind == kind:
                return reduce(O, S, ko, k12, ks, used, depth)
    # relu = (x + |x|)/2 against an odd g; step = (1 + sign)/2 against an even g
    for X, Y, kx, ky in ((A, B, k11, k22), (B, A, k22, k11)):
        if X.kind == RELU and Y.parity() == ODD:
            t = _pair_unit(_power(1), Y, kx, k12, ky, used, depth + 1)
            if t is not None:
                used.add("parity")
                return t / 2
        if X.kind == STEP and Y.parity() == EVEN:
            used.add("parity")
            return moment(Y, ky) * moment(X, kx)  # (E[step] = 1/2, 0 at kx = 0)
    return None


def closed_form_pair(phi, psi, _used=None):
    """E[phi(u) psi(v)] as a sympy expression in K11, K12, K22, or None when no rule applies.

    ``_used``: a set that collects the names of the rules applied (see ``describe``)."""
    phi, psi = as_lambda(phi), as_lambda(psi)
    dp = decompose(phi.expr, phi.variables[0])
    dq = decompose(psi.expr, psi.variables[0])
    if dp is None or dq is None:
        return None
    used = set() if _used is None else _used
    total = sp.S.Zero
    for ca, A in dp:
        for cb, B in dq:
            a, b = A.c, B.c  # scales: a change of covariance
            t = _pair_unit(A.unit(), B.unit(), a * a * K11, a * b * K12, b * b * K22, used)
            if t is None:
                return None
            total += ca * cb * t
    return total


def closed_form_1d(phi):
    """E[phi(u)], u ~ N(0, k), as a sympy expression in the symbol ``K``, or None."""
    phi = as_lambda(phi)
    dp = decompose(phi.expr, phi.variables[0])
    if dp is None:
        return None
    return sum((c * moment(A.unit(), A.c**2 * K) for c, A in dp), sp.S.Zero)


def describe(used: set) -> str:
    """The method string of a closed form that applied the rules ``used``."""
    names = [n for n in RULE_NAMES if n in used]
    return "closed form: " + (" + ".join(names) if names else "constant")
