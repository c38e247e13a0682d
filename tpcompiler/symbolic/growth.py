"""How fast a function of one real variable can grow at infinity, read from its structure
(docs/DESIGN.md 2.2: existence of the limits; used by ``existence``'s growth check).

E[|f(u)|] under a Gaussian u is infinite only if f outgrows the Gaussian tail exp(-u^2 / (2
var)).  ``existence`` decides that with sympy's limit of |f(t)| exp(-rate t^2) as t -> +-oo,
which is exact but can take seconds per function, or never return, on the nested
exponentials and fractions of a deep net with LayerNorms and swish (issue 11: the particle
path hung in one such limit).  This module proves the common case first, without a limit:

    tail_bound(f, t) = (0, p):  |f(t)| <= C (1 + |t|)^p          for all large |t|,
                       (1, d):  |f(t)| <= exp(C (1 + |t|)^d), d > 0,
                       None:    not proven (the caller falls back to the limit).

A bound of (1, d) with d < 2, or any (0, p), loses to exp(-rate t^2) for every rate > 0, so
such an f does not grow too fast.  The bound is an *upper* bound, built by rules that hold
for complex values too (the triangle inequality, |exp(g)| <= exp(|g|), |b^n| = |b|^n), except
where a rule needs a real argument (a bounded function such as tanh, a sign) and checks
that it is.  A reciprocal 1/D needs |D| bounded *below* at infinity: ``_inverse_bound``
proves that for a product, a power, an exponential, a nonzero polynomial in t, or a sum of
terms that are never negative one of which is a positive number (the 1 + a exp(-b t) of a
sigmoid); anything else is None, never a guess.

The refusals are proven the same way, before any limit (``beats_gaussian_tail``): a *lower*
bound on log|f| as t -> +oo or -oo,

    log_growth(f, s) = (c, d):  log|f(t)| >= (c - eps) |t|^d  for every eps > 0 and all
                                large s t (c > 0 a Fraction, or None: positive, unknown),

from exponentials of functions that grow (``growth(e, sign, s)``: sign e >= (c - eps) |t|^d,
by rules for t, products, powers, |.|, Max, sums whose other terms are polynomially smaller or
of the same sign).
d > 2, or d = 2 and c > rate, proves that |f(t)| exp(-rate t^2) does not tend to 0.  sympy's
limit of such an f with a float exponent (exp(|0.63 t|^2.0000000000000004), whose exact
rational power it expands) took gigabytes and was killed.
"""
from __future__ import annotations

from fractions import Fraction

import sympy as sp

from tpcompiler.ir import nonlinearities, symbols

#: Functions bounded on the real line (erfc by 2, the others by 1 or pi/2), at a real argument.
_BOUNDED = (sp.tanh, sp.erf, sp.erfc, sp.sin, sp.cos, sp.atan, sp.sign, sp.Heaviside)
#: Functions whose modulus is at most exp(|argument|), at any argument.
_EXPONENTIAL = (sp.exp, sp.cosh, sp.sinh)

POLYNOMIAL, EXPONENTIAL = 0, 1
#: The largest integer power whose coefficient c^n a lower bound computes exactly.
_EXACT_POWERS = 64
#: The largest expression (nodes of its tree) a lower bound expands as a polynomial.
_POLYNOMIAL_NODES = 400
#: The bound of a function bounded at infinity.
_CONSTANT = (POLYNOMIAL, Fraction(0))


def tail_bound(f: sp.Expr, t: sp.Symbol):
    """(level, degree) with |f(t)| <= C (1+|t|)^degree (level 0) or exp(C (1+|t|)^degree)
    (level 1, degree > 0) for all large |t|, or None (module docstring).  ``f`` must be a
    function of the real symbol ``t`` alone; any other symbol gives None."""
    return _Bounds(t).upper(f)


def outgrown_by_gaussian_tail(f: sp.Expr, t: sp.Symbol) -> bool:
    """Whether |f(t)| exp(-rate t^2) -> 0 as t -> +-oo for every rate > 0 is proven by
    ``tail_bound`` (False: not proven either way)."""
    bound = tail_bound(f, t)
    return bound is not None and bound < (EXPONENTIAL, 2)


def outgrown_by_some_gaussian_tail(f: sp.Expr, t: sp.Symbol) -> bool:
    """Whether |f(t)| exp(-rate t^2) -> 0 as t -> +-oo for *some* rate > 0 is proven: a bound
    exp(C (1 + |t|)^2) is outgrown by every rate > C (False: not proven either way)."""
    bound = tail_bound(f, t)
    return bound is not None and bound <= (EXPONENTIAL, 2)


def beats_gaussian_tail(f: sp.Expr, t: sp.Symbol, rate) -> bool:
    """Whether |f(t)| exp(-rate t^2) is proven not to tend to 0 as t -> +oo or -oo (module
    docstring: log_growth of degree > 2, or 2 with a coefficient > rate).  ``rate`` a
    positive number, or a symbol standing for every rate (then only degree > 2 proves it).
    False: not proven either way."""
    bounds = _Bounds(t)
    limit = _fraction(rate) if rate.is_number else None
    for s in (1, -1):
        found = bounds.log_growth(f, s)
        if found is None:
            continue
        c, d = found
        if d > 2 or (d == 2 and c is not None and limit is not None and c > limit):
            return True
    return False


def _times(a, b):
    """Product of two positive coefficients (None: positive, unknown)."""
    return None if a is None or b is None else a * b


def _larger_growth(found: list):
    """The faster of proven growths (c, d): the larger degree, then the larger coefficient;
    an unknown coefficient loses to a known one of the same degree."""
    found = [g for g in found if g is not None]
    if not found:
        return None
    return max(found, key=lambda g: (g[1], g[0] is not None, g[0] or 0))


def _normal(level: int, degree: Fraction):
    """exp(C (1+|t|)^0) is a constant: the bound (1, 0) is (0, 0)."""
    return _CONSTANT if level == EXPONENTIAL and degree == 0 else (level, degree)


def _product(bounds):
    """Bound of a product from its factors' bounds: degrees add for polynomials; an
    exponential's exp(C t^d), d > 0, absorbs every polynomial factor and smaller exponential."""
    if any(b is None for b in bounds):
        return None
    exponential = [d for level, d in bounds if level == EXPONENTIAL]
    if exponential:
        return (EXPONENTIAL, max(exponential))
    return (POLYNOMIAL, sum((d for _, d in bounds), Fraction(0)))


def _largest(bounds):
    """The largest of bounds that hold together (a sum's terms, a max's arguments, a
    Piecewise's branches), None if one is unknown."""
    return None if any(b is None for b in bounds) else max(bounds)


def _power(bound, n: Fraction):
    """Bound of b^n, n > 0, from b's bound: |b^n| = |b|^n."""
    if bound is None:
        return None
    level, d = bound
    return (POLYNOMIAL, d * n) if level == POLYNOMIAL else bound


def _fraction(n: sp.Expr):
    """A rational or Float number as an exact Fraction, or None.  A Float is converted exactly
    from its own precision, not through a double: 1e-400 is not 0 and 1.5000000000000001
    (40 digits) is not 1.5, or (1 + exp(t^3))^(1e-400) would be bounded as a constant and
    exp(|t|^1.5000000000000001 (t^2 + 1)^0.25) as exp(t^2) (review)."""
    if n.is_Float:
        n = sp.Rational(n)
    if n.is_Rational:
        return Fraction(int(n.p), int(n.q))
    return None


class _Bounds:
    """The rules of the module docstring for one variable t, memoised per sub-expression
    (the denominators of a deep swish repeat)."""

    def __init__(self, t: sp.Symbol):
        self.t = t
        self._upper: dict = {}
        self._inverse: dict = {}
        self._real: dict = {}
        self._nonnegative: dict = {}
        self._growth: dict = {}
        self._log_growth: dict = {}

    @staticmethod
    def _memoised(memo: dict, e: sp.Expr, rule):
        found = memo.get(e, memo)
        if found is memo:
            found = memo[e] = rule(e)
        return found

    def upper(self, e: sp.Expr):
        """Bound on |e(t)| at infinity (``tail_bound``)."""
        return self._memoised(self._upper, e, self._new_upper)

    def _new_upper(self, e: sp.Expr):
        if e == self.t:
            return (POLYNOMIAL, Fraction(1))
        if e.is_number:
            return _CONSTANT if self.real(e) else None
        if e.is_Symbol:
            return None  # (a variable other than t: unknown)
        if e.is_Add or isinstance(e, (sp.Max, sp.Min)):  # |max(a, b)| <= max(|a|, |b|)
            return _largest([self.upper(a) for a in e.args])
        if e.is_Mul:
            return _product([self.upper(a) for a in e.args])
        if e.is_Pow:
            n = _fraction(e.exp) if e.exp.is_number else None
            return None if n is None else self._power_bound(e.base, n)
        if isinstance(e, sp.exp) and self.nonpositive(e.args[0]):
            return _CONSTANT  # (|exp(g)| <= 1 for real g <= 0: erf's derivative at any argument)
        if isinstance(e, _EXPONENTIAL):
            inner = self.upper(e.args[0])
            if inner is None or inner[0] == EXPONENTIAL:
                return None  # (a double exponential: left to the limit)
            return _normal(EXPONENTIAL, inner[1])
        if isinstance(e, _BOUNDED):
            return _CONSTANT if self.real(e.args[0]) else None
        degree = nonlinearities.TAIL_DEGREE.get(type(e))
        if degree is not None:  # |phi(a)| <= C (1 + |a|)^degree at a real a (relu, sigmoid, ...)
            if not self.real(e.args[0]):
                return None
            return _CONSTANT if degree == 0 else _power(self.upper(e.args[0]), Fraction(degree))
        if isinstance(e, sp.Abs):
            return self.upper(e.args[0])
        if isinstance(e, sp.Piecewise):  # whichever branch holds, its bound holds
            return _largest([self.upper(branch) for branch, _ in e.args])
        if isinstance(e, sp.log):
            # |log g| <= |log|g|| + pi, and log|g| lies between -log|1/g| and log|g|
            above, below = self.upper(e.args[0]), self.inverse(e.args[0])
            if above is None or below is None:
                return None
            return (POLYNOMIAL, max([Fraction(1)] + [d for level, d in (above, below) if level == EXPONENTIAL]))
        return None

    def _power_bound(self, base: sp.Expr, n: Fraction):
        """Bound on |base^n| = |base|^n, from base's bound (n > 0) or its inverse's (n < 0)."""
        if n == 0:
            return _CONSTANT
        return _power(self.upper(base), n) if n > 0 else _power(self.inverse(base), -n)

    def inverse(self, e: sp.Expr):
        """Bound on |1 / e(t)| at infinity, or None (module docstring)."""
        return self._memoised(self._inverse, e, self._new_inverse)

    def _new_inverse(self, e: sp.Expr):
        if e.is_number:
            return _CONSTANT if self.real(e) and e.is_zero is False else None
        if e == self.t:
            return _CONSTANT  # (|1/t| <= 1 for |t| >= 1)
        if e.is_Mul:
            return _product([self.inverse(a) for a in e.args])
        if e.is_Pow:  # |1 / b^n| = |b^(-n)|
            n = _fraction(e.exp) if e.exp.is_number else None
            return None if n is None else self._power_bound(e.base, -n)
        if isinstance(e, sp.exp):  # |1/exp(g)| = |exp(-g)|
            return self.upper(e)
        if isinstance(e, sp.cosh) and self.real(e.args[0]):
            return _CONSTANT  # (cosh >= 1)
        if isinstance(e, sp.Abs):
            return self.inverse(e.args[0])
        if e.is_Add and (self._bounded_away_from_zero(e) or self._nonzero_polynomial(e)):
            return _CONSTANT  # (at least a positive number; or |P(t)| -> oo or a nonzero constant)
        return None

    def _bounded_away_from_zero(self, e: sp.Add) -> bool:
        """Every term is never negative and one is a positive number: e >= that number."""
        return (all(self.nonnegative(a) for a in e.args)
                and any(a.is_number and self.real(a) and a.is_positive for a in e.args))

    def _nonzero_polynomial(self, e: sp.Expr) -> bool:
        """A polynomial in t with real coefficients, one of them proven nonzero (a coefficient
        that is 0 without looking it, cos(1)^2 + sin(1)^2 - 1, proves nothing)."""
        if e.free_symbols != {self.t} or symbols.larger_than(e, _POLYNOMIAL_NODES) or not e.is_polynomial(self.t):
            return False  # (a large one is not expanded: a nested polynomial of degree 2^11 took minutes)
        try:
            coefficients = sp.Poly(e, self.t).all_coeffs()
        except sp.PolynomialError:
            return False
        return all(self.real(c) for c in coefficients) and any(c.is_zero is False for c in coefficients)

    # -- lower bounds: growth that is proven -------------------------------------------
    def log_growth(self, e: sp.Expr, s: int):
        """(c, d): log|e(t)| >= (c - eps) |t|^d as s t -> +oo, d > 0, or None (module docstring)."""
        return self._memoised(self._log_growth, (e, s), self._new_log_growth)

    def _new_log_growth(self, key):
        e, s = key
        if isinstance(e, sp.exp):  # log|exp(a)| = a for a real
            return self.growth(e.args[0], 1, s) if self.real(e.args[0]) else None
        if isinstance(e, (sp.cosh, sp.sinh)):  # |cosh a|, |sinh a| >= exp(|a|) / 4 once |a| >= 1
            a = e.args[0]
            return _larger_growth([self.growth(a, 1, s), self.growth(a, -1, s)]) if self.real(a) else None
        if isinstance(e, sp.Abs):
            return self.log_growth(e.args[0], s)
        if e.is_Pow:  # log|b^n| = n log|b|
            n = _fraction(e.exp) if e.exp.is_number else None
            if n is None or n <= 0:
                return None
            found = self.log_growth(e.base, s)
            return None if found is None else (_times(found[0], n), found[1])
        if e.is_Mul:  # log|prod| = sum of log|factor|: the others at least -O(log t) or -O(|t|^d'), d' < d
            return self._dominant([self.log_growth(a, s) for a in e.args], e.args, self.inverse, add=True)
        if e.is_Add:  # |sum| >= |a_k| - sum of the others, each at most exp(C |t|^d'), d' < d
            return self._dominant([self.log_growth(a, s) for a in e.args], e.args, self.upper, add=False)
        return None

    @staticmethod
    def _dominant(growths: list, parts: tuple, bound, add: bool):
        """The growth of log|e| from its parts' growths: a product's factors (add=True: the
        top degree's coefficients add; every factor that does not grow has an inverse bounded
        below the top degree, ``bound`` = inverse), or a sum's terms (add=False: one term
        grows strictly fastest, and every other is bounded below its degree, ``bound`` =
        upper).  The bounds are asked only once a part grows (a product of nested
        polynomials, none growing, took minutes in their inverse bounds: review)."""
        top = _larger_growth(growths)
        if top is None:
            return None
        d = top[1]
        same = [g for g in growths if g is not None and g[1] == d]
        if not add and len(same) > 1:
            return None  # (two terms of one degree may cancel)
        for g, part in zip(growths, parts):
            if g is None if add else g is not top:
                b = bound(part)
                if b is None or b >= (EXPONENTIAL, d):
                    return None
        if not add:
            return top
        c = Fraction(0)
        for g in same:
            c = None if c is None or g[0] is None else c + g[0]
        return (c, d)

    def growth(self, e: sp.Expr, sign: int, s: int):
        """(c, d): sign * e(t) >= (c - eps) |t|^d as s t -> +oo, d > 0, c > 0 (None: positive,
        unknown), or None; e real (module docstring)."""
        return self._memoised(self._growth, (e, sign, s), self._new_growth)

    def _new_growth(self, key):
        e, sign, s = key
        if e == self.t:
            return (Fraction(1), Fraction(1)) if sign * s > 0 else None
        if e.is_number or e.is_Symbol or not self.real(e):
            return None
        if isinstance(e, sp.Abs):
            return None if sign < 0 else _larger_growth([self.growth(e.args[0], 1, s), self.growth(e.args[0], -1, s)])
        if isinstance(e, sp.Max) and sign > 0:  # max >= each argument
            return _larger_growth([self.growth(a, 1, s) for a in e.args])
        if e.is_Pow:
            return self._power_growth(e.base, e.exp, sign, s)
        if e.is_Mul:
            return self._product_growth(e, sign, s)
        if e.is_Add:
            return self._sum_growth(e, sign, s)
        return None

    def _power_growth(self, base: sp.Expr, exp: sp.Expr, sign: int, s: int):
        """b^n, n > 0: |b|^n for an even n, sign-preserving for an odd one, b > 0 otherwise."""
        n = _fraction(exp) if exp.is_number else None
        if n is None or n <= 0:
            return None
        if n.denominator == 1 and n.numerator % 2 == 0:
            found = None if sign < 0 else _larger_growth([self.growth(base, 1, s), self.growth(base, -1, s)])
        elif n.denominator == 1:
            found = self.growth(base, sign, s)
        else:
            found = None if sign < 0 else self.growth(base, 1, s)
        if found is None:
            return None
        c, d = found
        # (c^n exactly only for a small n: (t/3 + 1)^(10^8) has d = 10^8, whatever c^n is)
        exact = c is not None and n.denominator == 1 and n.numerator <= _EXACT_POWERS
        return (c ** n.numerator if exact else (c if c == 1 else None), d * n)

    def _product_growth(self, e: sp.Mul, sign: int, s: int):
        """A product of real numbers and factors that grow, each with a sign: the signs
        multiply to ``sign``; coefficients multiply, degrees add."""
        c, d = Fraction(1), Fraction(0)
        for factor in e.args:
            if factor.is_number:
                if factor.is_zero is not False or not self.real(factor) or factor.is_positive is None:
                    return None
                sign = sign if factor.is_positive else -sign
                scale = _fraction(factor)
                c = _times(c, None if scale is None else abs(scale))
                continue
            up, down = self.growth(factor, 1, s), self.growth(factor, -1, s)
            if up is None and down is None:
                return None
            sign = sign if up is not None else -sign
            found = up or down
            c, d = _times(c, found[0]), d + found[1]
        return (c, d) if sign > 0 and d > 0 else None

    def _sum_growth(self, e: sp.Add, sign: int, s: int):
        """One term grows fastest; each other is of the same sign or polynomially smaller."""
        candidates = []
        for k, a in enumerate(e.args):
            found = self.growth(a, sign, s)
            if found is None:
                continue
            others = e.args[:k] + e.args[k + 1:]
            if all(self.nonnegative(sign * b) or self.growth(b, sign, s) is not None
                   or ((bound := self.upper(b)) is not None and bound < (POLYNOMIAL, found[1])) for b in others):
                candidates.append(found)
        return _larger_growth(candidates)

    def nonnegative(self, e: sp.Expr) -> bool:
        """e(t) >= 0 for every real t (proven; False: not proven)."""
        return self._memoised(self._nonnegative, e, self._new_nonnegative)

    def _new_nonnegative(self, e: sp.Expr) -> bool:
        if e.is_number:
            return bool(self.real(e) and e.is_nonnegative)
        if isinstance(e, (sp.exp, sp.cosh, sp.erfc)):
            return self.real(e.args[0])
        if isinstance(e, sp.Abs):
            return True
        if type(e) in nonlinearities.NONNEGATIVE:
            return self.real(e.args[0])
        if e.is_Pow:
            base, n = e.args
            if n.is_Integer and n.is_even:
                return self.real(base)
            return bool(n.is_number and self.real(n) and self.nonnegative(base))
        if e.is_Add or e.is_Mul:
            return all(self.nonnegative(a) for a in e.args)
        return False

    def nonpositive(self, e: sp.Expr) -> bool:
        """e(t) <= 0 for every real t (proven; False: not proven): a sum of such terms, or a
        negative number times factors that are never negative (-c sp(t)^2)."""
        if e.is_number:
            return bool(self.real(e) and e.is_nonpositive)
        if e.is_Add:
            return all(self.nonpositive(a) for a in e.args)
        if e.is_Mul:
            numbers = [a for a in e.args if a.is_number]
            return (len(numbers) == 1 and self.real(numbers[0]) and bool(numbers[0].is_negative)
                    and all(self.nonnegative(a) for a in e.args if not a.is_number))
        return False

    def real(self, e: sp.Expr) -> bool:
        """e(t) is real for every real t where it is defined (proven; False: not proven)."""
        return self._memoised(self._real, e, self._new_real)

    def _new_real(self, e: sp.Expr) -> bool:
        if e == self.t:
            return True
        if e.is_number:
            return bool(e.is_real and e.is_finite)
        if e.is_Symbol:
            return False
        if e.is_Pow:
            base, n = e.args
            if n.is_Integer:
                return self.real(base)
            return bool(n.is_number and self.real(n) and self.nonnegative(base))
        if isinstance(e, sp.Piecewise):
            return all(self.real(branch) for branch, _ in e.args)
        if isinstance(e, sp.log):  # (mish's tanh(log(1 + exp(t))))
            return self.nonnegative(e.args[0])
        if (e.is_Add or e.is_Mul or isinstance(e, (*_BOUNDED, *_EXPONENTIAL, sp.Abs, sp.Max, sp.Min))
                or type(e) in nonlinearities.TAIL_DEGREE):
            return all(self.real(a) for a in e.args)
        return False
