"""Sums and products built as the objects sympy's constructors build, without their
flattening (which collects terms and powers, distributes numbers over sums and asks
assumptions at a cost a CNN's derivation paid per pair of positions): the kernel program's
NTK terms (ntk.py) and the kernel backend's expressions (backends/kernels)."""
from __future__ import annotations

import functools

import sympy as sp
from sympy.core.function import Application
from mpmath.libmp import finf, fnan, fninf, fzero

from tpcompiler.ir.symbols import FACTOR_ORDER


_UNITS: dict = {1.0: sp.S.One, -1.0: sp.S.NegativeOne}


def number(c: float) -> sp.Number:
    """The sympy number of a term sum's coefficient c: 1 and -1 as sympy's integers (a
    coefficient of 1 is no factor), any other value a Float (one object per value within the
    derivation, ``shared.interned_floats``; non-zero ones remembered, ``_float_number``)."""
    unit = _UNITS.get(c)
    if unit is not None:
        return unit
    return _float_number(c) if c != 0.0 else sp.Float(c)  # (0.0 and -0.0 are one key of a cache)


@functools.lru_cache(maxsize=4096)
def _float_number(c: float) -> sp.Float:
    """sp.Float(c), made once per value (sympy's Float from a Python float takes
    microseconds, and a CNN's term sums hold a few coefficients thousands of times)."""
    return sp.Float(c)


def product(c, factors) -> sp.Expr:
    """c * prod(factors), for c a sympy number or a float (``number(c)``: 1.0 is no factor, as
    in a term sum), built directly when sympy's flattening would only sort: the factors
    (after ``_flat_factors``: 1s dropped, products' factors taken in, their numbers
    multiplied into c) commutative symbols, integer powers of symbols, function calls or
    sums, no two of one base, c finite and non-zero, and no number times a single sum
    (which sympy distributes).  Then the factors are sorted as sympy sorts a product's
    factors, the number first unless it is 1: the object sympy's flattening builds (it also
    collects powers, distributes numbers over sums and asks assumptions, none of which
    applies here, at a cost a CNN's derivation paid per pair of positions, and a recurrent
    net's instantiation per pair of steps: sigma^2 E[..] E[..]).  Anything else (a number or
    another power among the factors, two factors of one base, a zero or infinite c): sympy's
    own product."""
    coefficient = number(c) if isinstance(c, float) else c
    factors = list(factors)
    flat = _flat_factors(coefficient, factors)
    if flat is None:
        return sp.Mul(coefficient, *factors)
    coefficient, plain = flat
    plain.sort(key=FACTOR_ORDER)
    if coefficient is not sp.S.One:
        plain.insert(0, coefficient)
    if len(plain) == 1:
        return plain[0]
    # commutative: every factor was checked (sympy's _from_args would ask each of them again)
    return sp.Mul._from_args(plain, True) if plain else sp.S.One


def _flat_factors(coefficient: sp.Number, factors: list):
    """(coefficient, factors) of the product ``product`` may build itself, or None (see
    ``product``).  As sympy's Mul: 1s are dropped (the identity), a product's factors join
    the others and its number multiplies the coefficient after the given one, in order."""
    plain = []
    for f in factors:
        if f is sp.S.One:
            continue
        if f.is_Mul:
            inner, rest = f.as_coeff_Mul()
            if inner is not sp.S.One:
                coefficient = inner if coefficient is sp.S.One else coefficient * inner
            plain.extend(sp.Mul.make_args(rest))
        else:
            plain.append(f)
    sums = 0
    for f in plain:
        if f.is_Add:
            sums += 1
        elif f.is_Pow and f.base.is_Symbol and f.exp.is_Integer:
            pass  # (an integer power of a symbol: kept as it is unless another factor has its base)
        elif not (f.is_Symbol or isinstance(f, sp.Function)) or f.as_base_exp()[1] is not sp.S.One:
            return None  # (exp(x) is E**x to sympy's Mul, which adds the exponents of equal bases)
        if not f.is_commutative:
            return None
    bases = {f.base if f.is_Pow else f for f in plain}
    if not _finite_nonzero(coefficient) or len(bases) != len(plain) or (sums and len(plain) == 1):
        return None
    return coefficient, plain


def total(terms) -> sp.Expr:
    """sp.Add(*terms), the same object, built directly when sympy's flattening would only
    sort: the terms are commutative, none is a sum, a power or zero, at most one is a number
    (finite), and no two of them have the same non-numeric part (nothing to collect).  Then
    the terms are sorted as sympy sorts them, the number first: the object Add.flatten
    builds (each term c*s it rebuilds is the term it was given).  Anything else (zoo among the
    terms too): sympy's own sum.  A CNN's covariance sums (a window's taps) are built once per
    pair of positions."""
    terms = list(terms)
    constant, plain, parts = None, [], set()
    for t in terms:
        if t.is_Number:
            if constant is not None or not _finite_nonzero(t):  # (sympy drops a zero, 0.0 included)
                return sp.Add(*terms)
            constant = t
            continue
        if t.is_Add or t.is_Pow or t.is_Order or not t.is_commutative or t is sp.S.ComplexInfinity:
            return sp.Add(*terms)  # (zoo, no Number to sympy, absorbs the other terms)
        rest = t.as_coeff_Mul()[1]
        if rest in parts:
            return sp.Add(*terms)
        parts.add(rest)
        plain.append(t)
    if not plain or (len(plain) == 1 and constant is None):  # (sympy's sum of one term is the term)
        return sp.Add(*terms)
    plain.sort(key=FACTOR_ORDER)  # sympy sorts a sum's terms by Basic.compare too (add._addsort)
    if constant is not None:
        plain.insert(0, constant)
    return sp.Add._from_args(plain, True)  # commutative: every term was checked


def replaced(expr: sp.Basic, rule: dict) -> sp.Basic:
    """``expr.xreplace(rule)``, the same object, with every sum, product and call it rebuilds
    built by ``rewrite`` (``total``, ``product``: directly where sympy's flattening would only
    sort): a CNN's Z entries and forms put values into sums of a window's taps, once per
    position."""
    return rewrite(expr, rule.get, {})


def rewrite(e: sp.Basic, replacement, memo: dict) -> sp.Basic:
    """e with every outermost subexpression x for which replacement(x) is not None replaced by
    it (as ``xreplace`` replaces), with ``memo`` ({subexpression: result}) kept across calls:
    the subexpressions many expressions share (a pair of positions' calls, read by all its
    terms) are rewritten once."""
    hit = memo.get(e)
    if hit is None:
        hit = replacement(e)
        if hit is None:
            if e.args:
                args = [rewrite(a, replacement, memo) for a in e.args]
                if all(x is y for x, y in zip(args, e.args)):
                    hit = e
                elif e.is_Mul:
                    hit = mul(*args)
                else:
                    hit = total(args) if e.is_Add else rebuilt_call(e, args)
            else:
                hit = e
        memo[e] = hit
    return hit


_NO_EVALUATION = Application.eval.__func__  # the eval of a function class that defines none


def rebuilt_call(e: sp.Basic, args: list) -> sp.Basic:
    """e.func(*args), the same expression: for a call of a function class without
    evaluation rules (the closed forms' helpers _sdet, _angle, _pos, the engine's calls) at
    arguments not all numbers, sympy's constructor only checks, caches and sets ``nargs``
    (it would evaluate numerically at numbers alone), so the node is built directly, as
    ``e`` itself was (``nargs`` from it).  Anything else: the class's own constructor."""
    cls = type(e)
    if isinstance(e, sp.Function) and cls.eval.__func__ is _NO_EVALUATION and not all(a.is_number for a in args):
        obj = sp.Basic.__new__(cls, *args)
        obj.nargs = e.nargs
        return obj
    return e.func(*args)


def mul(*factors) -> sp.Expr:
    """sp.Mul(*factors), the same object, by ``product`` (which leaves to sympy whatever it
    does not build itself), a leading number as its coefficient: a product's new arguments in
    ``rewrite``, the products of featurized terms (features.py)."""
    if factors and factors[0].is_Number:
        return product(factors[0], factors[1:])
    return product(sp.S.One, factors)


#: The multiprecision values of zero, infinities and nan (mpmath's libmp).
_ZERO_OR_INFINITE = (fzero, finf, fninf, fnan)


def _finite_nonzero(n: sp.Number) -> bool:
    """Whether a sympy number is finite and not zero, decided from its value (asking sympy's
    assumptions of each new number deduces all of them, a cost per product)."""
    if n.is_Rational:
        return n.p != 0
    if n.is_Float:
        return n._mpf_ not in _ZERO_OR_INFINITE  # its multiprecision value, not converted
    return False
