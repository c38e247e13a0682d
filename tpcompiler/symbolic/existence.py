"""Existence of the limits the symbolic stage writes down (docs/DESIGN.md 2.2, issue 7 class 3).

The Master theorem gives lim theta = E[psi(Z..)] only when that expectation exists, and
Z^{phi(x..)} = phi(Z^x..) only when phi is a real number at the values Z^x takes.  This
module refuses, with an error naming the instruction, what provably does not exist:

* a number that is not one (division by zero: sympy's ``zoo``/``nan``);
* log, sqrt and other non-integer powers (cube roots included: x**(1/3) is the principal,
  complex root for x < 0), and powers with a random exponent, of an argument that takes
  negative values with positive probability;
* a non-integrable singularity: psi >= c / |t - t0| near a zero t0 of a denominator, where
  the Gaussian leaf t has positive density (E[1/u] does not exist, so it is not 0 by
  oddness);
* growth that beats the Gaussian tail: E[exp(q(u))] with q a quadratic form too large for
  the covariance of the initial Gaussians (exp(u^2) for var(u) >= 1/2), or super-quadratic
  growth in any leaf (exp(u^3)); growth slower than exp(C |u|^d), d < 2, is proven from
  the function's structure (``growth``), and sympy's limits are taken only where that
  proves nothing.

Proofs work on psi written in the *leaves* (initial Gaussians, ZHats): one leaf t at a
time, the other leaves and every constant fixed at generic values (a property shown on an
open set of the other leaves has positive probability).  What cannot be decided here
is left to the evaluator, which refuses non-finite values (``particles``).  Only
expressions that contain a risky atom (negative, fractional or random power, log, an exp
that can grow, a function with a restricted domain, zoo/nan) are analysed at all, so the
usual programs (polynomials, tanh, relu, gelu and their derivatives) cost nothing.
"""
from __future__ import annotations

import math
import warnings

import sympy as sp

from tpcompiler import memory
from tpcompiler.ir import symbols
from tpcompiler.ir.graph import ProgramError
from tpcompiler.symbolic import growth, numeric_search


def shown(expr: sp.Expr) -> str:
    """``expr`` as text in the program's names (Z^x written x, ZHat^x written ZHat[x])."""
    rep = {}
    for s in expr.free_symbols:
        if symbols.is_zhat(s):
            rep[s] = sp.Symbol(f"ZHat[{s.key}]" + ("'" if s.primed else ""))
        elif symbols.is_z(s):
            rep[s] = symbols.NodeSymbol(s.key, s.primed)
    return sp.sstr(expr.xreplace(rep))


class UndefinedLimit(ProgramError):
    """A Nonlin that is not a real number or a Moment whose expectation does not exist."""


#: Functions defined only on part of the real line (their arguments are checked; log by
#: sign, the others only at run time by the evaluator).
_RESTRICTED = (sp.log, sp.asin, sp.acos, sp.atanh, sp.acosh, sp.loggamma)
#: Functions with poles on the real line, and the ratios of sin and cos they are analysed as
#: (``_as_ratios``).
_RATIOS = {sp.tan: lambda x: sp.sin(x) / sp.cos(x), sp.cot: lambda x: sp.cos(x) / sp.sin(x),
           sp.sec: lambda x: 1 / sp.cos(x), sp.csc: lambda x: 1 / sp.sin(x),
           # gamma's poles at 0, -1, -2 as zeros of a denominator (by gamma(x + 1) = x gamma(x));
           # an argument that reaches a lower pole without crossing these is not caught
           sp.gamma: lambda x: sp.gamma(x + 3) / (x * (x + 1) * (x + 2)),
           # polygamma(m, x) (digamma: m = 0) = polygamma(m, x + 3) + (-1)^(m+1) m! sum_j (x + j)^-(m+1)
           sp.polygamma: lambda m, x: sp.polygamma(m, x + 3) + (-1) ** (m + 1) * sp.factorial(m) * sum(
               (x + j) ** -(m + 1) for j in range(3))}
_WITH_POLES = tuple(_RATIOS)
#: Generic values for the leaves held fixed while another is analysed.
_GENERIC = [sp.Rational(3, 7), sp.Rational(-5, 11), sp.Rational(7, 13), sp.Rational(-2, 9),
            sp.Rational(9, 17), sp.Rational(-4, 19)]


def _is_int_power(exp) -> bool:
    return exp.is_Integer or (exp.is_Float and float(exp).is_integer())


def _is_monomial(expr: sp.Expr) -> bool:
    """Whether expr is a product of symbols, powers of symbols with integer exponents >= 0
    and finite numbers (a pair moment's Z^a Z^b'), in which ``risky_atoms`` finds nothing
    (provided ``is_random`` calls no integer random, as the checker's, which asks for free
    symbols, does not): a CNN's kernel program has 10^4-10^5 of them, each walked by the
    rules below."""
    for f in (expr.args if expr.is_Mul else (expr,)):
        if f.is_Pow:
            base, exp = f.args
            if not (base.is_Symbol and exp.is_Integer and exp >= 0):
                return False
        elif not (f.is_Symbol or (f.is_Number and f.is_finite)):
            return False
    return True


def risky_atoms(expr: sp.Expr, is_random) -> list[sp.Expr]:
    """Sub-expressions of ``expr`` that may leave the reals or the integrable functions."""
    if _is_monomial(expr):
        return []
    out = []
    if expr.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        out.append(expr)
    for a in symbols.preorder(expr):
        if isinstance(a, sp.Pow) and is_random(a):
            base, exp = a.args
            if is_random(exp) or not (_is_int_power(exp) and exp >= 0):
                out.append(a)
        elif isinstance(a, (*_RESTRICTED, *_WITH_POLES)) and is_random(a):
            out.append(a)
        elif isinstance(a, (sp.exp, sp.cosh, sp.sinh)) and is_random(a):
            if not (a.args[0].is_nonpositive and isinstance(a, sp.exp)):
                out.append(a)
    return out


def _domain_args(expr: sp.Expr, is_random) -> list[tuple[sp.Expr, str]]:
    """(argument, what) for every part of ``expr`` defined only for some arguments."""
    out = []
    for a in symbols.preorder(expr):
        if isinstance(a, sp.Pow) and is_random(a.args[0]):
            base, exp = a.args
            if is_random(exp):
                out.append((base, f"a power with a random exponent, {shown(a)},"))
            elif exp.is_number and not _is_int_power(exp):
                out.append((base, f"the non-integer power {shown(a)} (the principal root is complex for a negative base; for a real cube root write sign(x)*abs(x)**(1/3))"))
        elif isinstance(a, (sp.log, sp.loggamma)) and is_random(a):  # (loggamma: complex for x < 0 too)
            out.append((a.args[0], shown(a)))
        elif isinstance(a, (sp.asin, sp.acos, sp.atanh, sp.acosh)) and is_random(a):
            out.append((None, shown(a)))
    return out


def _exact(expr: sp.Expr) -> sp.Expr:
    """Every float of ``expr`` as the rational it holds, exactly: a removable singularity then
    cancels (sin(h)/h at the zero of h = b + 1.5 g, a float, left a limit of -5e-17, read as
    a pole: sinc was refused), and a coefficient 1e-15 above a growth threshold stays above
    it (sympy's nsimplify rounds to 15 digits: exp(1.3513513513513526 u^2) at var 0.37, an
    infinite expectation, was accepted; a review found it)."""
    floats = expr.atoms(sp.Float)
    return expr.xreplace({x: sp.Rational(x) for x in floats}) if floats else expr


def _readable(x: sp.Expr) -> sp.Expr:
    """A number for an error message: as it is if short, else to 8 digits (an exact float's
    rational has dozens)."""
    return x if len(str(x)) <= 30 else sp.N(x, 8)


def _as_ratios(expr: sp.Expr) -> sp.Expr:
    """tan, cot, sec and csc written as ratios of sin and cos, and gamma(x) as
    gamma(x + 3) / (x (x + 1) (x + 2)), so that their poles are zeros of a denominator
    (E[tan(u)^2] and E[gamma(u)] do not exist; they were never looked at)."""
    if not expr.has(*_WITH_POLES):
        return expr
    return expr.replace(lambda e: type(e) in _RATIOS, lambda e: _RATIOS[type(e)](*e.args))


def _negative_set(arg_t: sp.Expr, t: sp.Symbol, scale: float = 1.0):
    """Whether {t real: arg_t < 0} is provably non-empty (True), empty (False) or unknown;
    ``scale``: t's standard deviation where known (numeric_search's grid)."""
    if arg_t.is_nonnegative:
        return False
    if arg_t.is_negative:
        return True
    s = _solveset(sp.StrictLessThan(arg_t, 0), t, sp.S.Reals)
    try:
        measure = None if s is None or s.has(sp.ConditionSet) else s.measure
    except (NotImplementedError, AttributeError, TypeError):
        measure = None  # (a Union with a ConditionSet inside raised: review)
    if measure is None:
        # (tanh(t) - t/3 + 1/2 < 0 beyond t = 4.5: a ConditionSet, and its log was taken as real)
        return True if numeric_search.negative_point(arg_t, t, scale) is not None else None
    return s is not sp.S.EmptySet and measure != 0


#: Half-width of the window in which the zeros of a denominator with infinitely many are sought.
_ZERO_WINDOW = 10


def _real_zeros(den_t: sp.Expr, t: sp.Symbol):
    """Finite list of real zeros of ``den_t`` in t, or None when unknown."""
    if den_t.is_positive or den_t.is_negative:
        return []
    s = _solveset(sp.Eq(den_t, 0), t, sp.S.Reals)
    if s is None:
        return None
    if isinstance(s, sp.FiniteSet):
        return [r for r in s if r.is_real]
    if s is sp.S.EmptySet:
        return []
    # infinitely many zeros (cos t = 0), where a pole found is a pole (tan's were never looked
    # at, and E[tan(u) tan(v)] came out as a number): the members n = 0, 1, -1 of each
    # family of zeros, wherever they lie (tan(t/10)'s are at 5 pi + 10 pi n), else those in a window
    representatives = _family_members(s)
    if representatives:
        return representatives
    window = _solveset(sp.Eq(den_t, 0), t, sp.Interval(-_ZERO_WINDOW, _ZERO_WINDOW))
    return [r for r in window if r.is_real] if isinstance(window, sp.FiniteSet) else None


#: The budget of one solveset of the checks, in seconds (a quintic's took 22 s; past it, the
#: zeros are unknown and numeric_search.py looks for them numerically).
SOLVE_SECONDS = 10.0


def _solveset(*args):
    """sympy's solveset, or None where it raises or runs past ``SOLVE_SECONDS`` (or ``LIMIT_MEMORY``)."""
    try:
        return memory.within_budget(sp.solveset, *args, seconds=SOLVE_SECONDS, memory_bytes=LIMIT_MEMORY,
                                    otherwise=lambda why: None)
    except Exception:  # noqa: BLE001 - sympy may give up in many ways
        return None


def _complex_at(expr: sp.Expr, values: dict) -> bool:
    """Whether ``values`` put a negative number under a non-integer power or a log of
    ``expr`` (making it complex, whether or not sympy's evaluation shows an I)."""
    given = set(values)
    for a in symbols.preorder(expr):
        if isinstance(a, sp.Pow) and a.exp.is_number and not _is_int_power(a.exp):
            base = a.base
        elif isinstance(a, sp.log):
            base = a.args[0]
        else:
            continue
        if base.free_symbols and base.free_symbols <= given:
            value = base.xreplace(values)
            if value.is_number and value.is_extended_negative:
                return True
    return False


def _family_members(s) -> list:
    """The real members at n = 0, 1, -1 of each ImageSet over the integers in ``s`` (an
    ImageSet or a Union of them: solveset's periodic solutions)."""
    out = []
    for part in (s.args if isinstance(s, sp.Union) else (s,)):
        if isinstance(part, sp.ImageSet) and tuple(part.base_sets) == (sp.S.Integers,):
            for n in (0, 1, -1):
                value = part.lamda(n)
                if value.is_extended_real and value not in out:
                    out.append(value)
    return out


#: The budget of one sympy limit of the checks (``_limit``): seconds, and bytes the process may grow by.
LIMIT_SECONDS = 30.0
LIMIT_MEMORY = 2 * 10**9


def _limit(build, shown_as: sp.Expr, t: sp.Symbol, point, direction: str = "+"):
    """sympy's limit as t -> point of the expression ``build()`` makes, or None where sympy
    raises or the limit runs out of its budget (``LIMIT_SECONDS``, ``LIMIT_MEMORY``; a warning
    names ``shown_as``).  The check that asked then proves nothing and the function is taken as
    it is, as where sympy cannot take the limit.  Without a budget, sympy's limit of
    |cosh(t^2/2)^0.99| exp(-rate t^2), rate a symbol, grew the process to 24 GB in 96 s, and
    the machine killed it.  The expression is built inside the budget too: sympy's Abs of a
    deep sigmoid/step net's derivative ran for minutes in its sign simplification."""
    def undecided(why: str) -> None:
        warnings.warn(f"the existence checks left sympy's limit of {shown(shown_as)} as {t} -> {point} undecided "
                      f"({why})", RuntimeWarning, stacklevel=3)

    try:
        lim = memory.within_budget(lambda: sp.limit(build(), t, point, dir=direction), seconds=LIMIT_SECONDS,
                                   memory_bytes=LIMIT_MEMORY, otherwise=undecided)
    except Exception:  # noqa: BLE001 - sympy cannot take it
        return None
    # sympy answers a limit it cannot take with the unevaluated Limit(e, t, oo), which holds oo
    # as its point: read as a value, it "proved" that gelu'(gelu(u)) grows too fast
    return None if lim is None or lim.has(sp.Limit) else lim


def _pole(f_t: sp.Expr, t: sp.Symbol, t0) -> bool:
    """|f| >= c/|t - t0| near t0 from one side (a non-integrable singularity); where sympy
    takes neither one-sided limit, decided in 250-digit arithmetic (``numeric_search.pole_at``)."""
    decided = False
    for d in ("+", "-"):
        lim = _limit(lambda: f_t * (t - t0), f_t, t, t0, d)
        if lim is None:
            continue
        decided = True
        if lim.has(sp.oo, -sp.oo, sp.zoo) or (lim.is_number and lim.is_nonzero):
            return True
    return not decided and numeric_search.pole_at(f_t, t, t0)


def _grows_too_fast(f_t: sp.Expr, t: sp.Symbol, rate) -> bool:
    """|f(t)| exp(-rate t^2) does not tend to 0 as t -> +oo or -oo (so E|f| = oo under a
    Gaussian leaf of variance 1/(2 rate), or any variance when rate is a free positive
    symbol: super-quadratic growth).  Growth proven slower than exp(C |t|^d), d < 2, from
    f's structure (``growth``) answers False without a limit: sympy's limits of a deep
    swish net's nested exponentials took seconds each, or never returned.  Growth proven
    faster (``growth.beats_gaussian_tail``) answers True without a limit: sympy's limit of
    exp(|0.63 t|^2.0000000000000004) filled the memory."""
    if growth.outgrown_by_gaussian_tail(f_t, t):
        return False
    if not rate.is_number and growth.outgrown_by_some_gaussian_tail(f_t, t):
        return False  # (a symbolic rate asks for every rate: sympy's limit of cosh(t^2/2)^0.99 filled 24 GB)
    if growth.beats_gaussian_tail(f_t, t, rate):
        return True
    for sign in (1, -1):
        lim = _limit(lambda: sp.Abs(f_t) * sp.exp(-rate * t**2), f_t, t, sign * sp.oo)
        if lim is None:
            continue
        if lim.has(sp.oo) or (lim.is_number and lim.is_positive):
            return True
    return False


class Checker:
    """Checks Nonlin values and Moment expectations of one Z program (``zp``)."""

    def __init__(self, zp):
        self.zp = zp
        self._risky: dict = {}
        self._leaf_form: dict = {}
        self._params: dict | None = None

    # -- which vectors need a look --------------------------------------------------------
    def is_random(self, expr) -> bool:
        from tpcompiler.symbolic.master import _is_random

        return _is_random(expr)

    def risky(self, key: str) -> bool:
        """Whether Z^key may leave the reals or the integrable functions: a risky atom in its
        recursion or in a parent's."""
        memo = self._risky.get(key)
        if memo is None:
            e = self.zp.entries[key]
            memo = any(self.risky(a) for a in e.parents) or (e.z is not None and bool(risky_atoms(e.z, self.is_random)))
            self._risky[key] = memo
        return memo

    def _z_keys(self, expr):
        return [s.key for s in symbols.free_symbols_of(expr) if symbols.is_z(s)]

    def expr_risky(self, expr) -> bool:
        return bool(risky_atoms(expr, self.is_random)) or any(self.risky(k) for k in self._z_keys(expr))

    # -- psi written in the leaves ---------------------------------------------------------
    def leaf_form(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every Z of a Nonlin/MatMul replaced by its recursion, down to the
        leaves Z^init and ZHat; every expectation and scalar symbol is kept (constants)."""
        rep = {}
        for s in expr.free_symbols:
            if symbols.is_z(s) and not symbols.is_primed(s):
                rep[s] = self._leaf_of(s.key)
        return expr.xreplace(rep)

    def _leaf_of(self, key: str) -> sp.Expr:
        """Z^key in the leaves: its recursion with every parent's Z replaced by its own."""
        from tpcompiler.symbolic.master import Z

        memo = self._leaf_form.get(key)
        if memo is None:
            e = self.zp.entries[key]
            memo = e.z.xreplace({Z(a): self._leaf_of(a) for a in e.parents}) if e.parents else e.z
            self._leaf_form[key] = memo
        return memo

    def _generic(self, expr: sp.Expr, keep) -> sp.Expr:
        """Every free symbol but ``keep`` and every expectation at a generic value."""
        return self._generic_except(expr, set() if keep is None else {keep})

    def _leaf_names(self, expr):
        """Leaves analysed as Gaussian variables (a primed Z of a template is held fixed)."""
        return sorted((s for s in expr.free_symbols if symbols.is_leaf_variable(s) and not symbols.is_primed(s)),
                      key=sp.default_sort_key)

    @staticmethod
    def _show_leaf(s) -> str:
        return s.key if symbols.is_z(s) else "ZHat^" + s.key

    # -- the checks ------------------------------------------------------------------------
    def check_nonlin(self, key: str) -> None:
        """Z^key must be a real number: no zoo/nan, no log/root of a negative argument."""
        e = self.zp.entries[key]
        if not risky_atoms(e.z, self.is_random):
            return
        what = f"instruction {key!r} := {sp.sstr(self.zp.graph.op(key).expr)}"
        self._check_defined(e.z, what)

    def check_moment(self, key: str, psi: sp.Expr) -> None:
        """E[psi] must exist (be a finite number)."""
        if not self.expr_risky(psi):
            return
        what = f"instruction {key!r} := mean({sp.sstr(self.zp.graph.op(key).expr)})"
        self.check_expectation(psi, what)
        # a pair moment of a kernel program (primed: at the second input) is evaluated at
        # xi' = xi too, the kernels' diagonal, where E[phi'(u) phi'(u')] becomes E[phi'(u)^2]
        # (phi = sqrt|t|: finite for two inputs, infinite on the diagonal)
        diagonal = psi.xreplace({s: symbols.unprimed(s) for s in psi.free_symbols if symbols.is_primed(s)})
        if diagonal != psi:
            self.check_expectation(diagonal, f"{what} at equal inputs xi' = xi (the kernels' diagonal)")

    def check_second_moment(self, key: str, x: str) -> None:
        """A MatMul W x needs E[(Z^x)^2] < oo (the covariance of its ZHat)."""
        from tpcompiler.symbolic.master import Z

        if self.risky(x):
            mat, _, tr = self.zp.graph.matmul_parts(key)
            what = (f"instruction {key!r} := {mat}{'.T' if tr else ''} @ {x} (its ZHat has the variance "
                    f"sigma^2 E[{x}^2], which must be finite)")
            self.check_expectation(Z(x) ** 2, what)

    def _check_defined(self, expr: sp.Expr, what: str) -> None:
        if expr.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
            raise UndefinedLimit(f"{what}: divides by zero (or is otherwise not a number: {shown(expr)}); "
                                 "no limit exists; remove the division by zero")
        for arg, desc in _domain_args(expr, self.is_random):
            if arg is None:
                continue
            if self._takes_negative(arg):
                raise UndefinedLimit(
                    f"{what}: {desc} is not a real number for negative arguments, and {shown(arg)} takes "
                    "negative values with positive probability; apply it to a positive quantity "
                    "(e.g. an abs(.), a square plus a constant, or an exp)")

    def _takes_negative(self, arg: sp.Expr) -> bool:
        # a nonzero expression that is odd under the negation of an independent Gaussian
        # block takes both signs with equal probability
        if self.zp.zero_block(arg) is not None and arg != 0:
            return True
        leaf_arg = self._constants_for_expectations(self.leaf_form(arg))
        for t in self._leaf_names(leaf_arg):
            if _negative_set(self._generic(leaf_arg, t), t, self._scale(t)):
                return True
        return False

    def check_expectation(self, psi: sp.Expr, what: str) -> None:
        self._check_defined(psi, what)
        f = _exact(sp.powsimp(_as_ratios(self._constants_for_expectations(self.leaf_form(psi)))))
        self._check_defined(f, what)
        leaves = self._leaf_names(f)
        # poles at finite points
        dens = [a.args[0] for a in symbols.preorder(f)
                if isinstance(a, sp.Pow) and a.args[1].is_number and a.args[1].is_negative and self.is_random(a.args[0])]
        for den in dens:
            for t in self._leaf_names(den):
                f_t, den_t = self._generic(f, t), self._generic(den, t)
                zeros = _real_zeros(den_t, t)
                if zeros is None:  # (solveset cannot say: tanh(t) = t/3 gave a ConditionSet, and no pole was sought)
                    t0 = next((sp.Float(x, 10) for x in numeric_search.numeric_poles(f_t, den_t, t, self._scale(t))),
                              None)
                else:
                    t0 = next((z for z in zeros if _pole(f_t, t, z)), None)
                if t0 is not None:
                    t0 = _readable(t0)
                    if len(leaves) == 1:
                        where = f"near {self._show_leaf(t)} = {t0} (it grows at least like 1/|{shown(t - t0)}|)"
                    else:
                        where = (f"where {shown(den)} = 0 (e.g. it grows at least like 1/|{shown(t - t0)}| near "
                                 f"{self._show_leaf(t)} = {t0} when the other Gaussians take generic values)")
                    raise UndefinedLimit(
                        f"{what}: E[{shown(psi)}] does not exist: the function is not integrable {where}, "
                        "and the Gaussians have positive density there; the average over coordinates has no "
                        "limit (it is not 0 by symmetry); use a function bounded there")
        # growth against the Gaussian tail
        grows = [a for a in symbols.preorder(f)
                 if (isinstance(a, (sp.exp, sp.cosh, sp.sinh)) and self.is_random(a) and not a.args[0].is_nonpositive)
                 or (isinstance(a, sp.Pow) and self.is_random(a.args[1]))]
        if grows:
            self._check_growth(f, psi, leaves, what)

    def _check_growth(self, f, psi, leaves, what):
        import numpy as np

        # 1. the initial Gaussians with a known covariance: exact rate along the worst ray
        inits = [s for s in leaves if symbols.is_z(s)]
        g = self.zp.graph
        if inits:
            from tpcompiler.backends.walk import initial_covariance

            try:
                cov = initial_covariance(g, [s.key for s in inits])
            except Exception:  # noqa: BLE001 - covariance not numeric (inputs)
                cov = None
            if cov is not None and len(inits) <= 4 and abs(np.linalg.det(cov)) > 1e-12:
                S = sp.Matrix([[sp.Rational(float(c)) for c in row] for row in cov])  # (exactly: see _exact)
                fixed = self._generic_except(f, set(inits))
                for q in dict.fromkeys(a.args[0] for a in symbols.preorder(fixed) if isinstance(a, sp.exp)):
                    try:
                        P = sp.Poly(_exact(q), *inits)
                    except (sp.PolynomialError, ValueError, TypeError):
                        continue
                    if P.total_degree() != 2:
                        continue
                    Q = sp.hessian(P.as_expr(), inits) / 2
                    # E exp(x^T Q x) over N(0, S) is finite iff every eigenvalue of 2 S Q is < 1;
                    # along the top eigenvector d the exponent and the log-density compare exactly
                    A = S * 2 * Q
                    t = sp.Dummy("t", real=True)
                    for lam, _, vecs in A.eigenvects():
                        if not (lam.is_real and sp.N(lam) >= 1 - 1e-9):
                            continue
                        d = vecs[0]
                        rate = (d.T * S.inv() * d)[0] / 2  # (not nsimplify'd: it rounds a rational to 15 digits too)
                        ray = fixed.xreplace({sym: d[i] * t for i, sym in enumerate(inits)})
                        if _grows_too_fast(ray, t, rate):
                            raise UndefinedLimit(self._growth_message(
                                what, psi, f"the quadratic form Q in exp({shown(q)}) has 2 Sigma Q with the eigenvalue "
                                f"{sp.N(lam, 4)} >= 1 for the covariance Sigma of the initial Gaussians"))
        # 2. a single leaf whose variance is known (a ZHat of W u, u initial): exact rate
        if len(leaves) == 1:
            var = self._known_variance(leaves[0])
            if var is not None and var > 0:
                t = leaves[0]
                if _grows_too_fast(self._generic(f, t), t, 1 / (2 * sp.Rational(var))):  # (exactly: see _exact)
                    raise UndefinedLimit(self._growth_message(
                        what, psi, f"it grows at least like exp({self._show_leaf(t)}^2 / (2 var)) with var = {var:.6g} the variance of {self._show_leaf(t)}"))
        # 3. any leaf, any variance: super-quadratic growth
        rate = sp.Symbol("rate", positive=True)
        for t in leaves:
            f_t = self._generic(f, t)
            if _grows_too_fast(f_t, t, rate):
                raise UndefinedLimit(self._growth_message(what, psi, f"it grows faster than exp(c {self._show_leaf(t)}^2) for every c"))

    def _scale(self, leaf) -> float:
        """The leaf's standard deviation where it is known and above 1, else 1 (the unit of the
        numeric search's grid: a leaf of variance 10^6 has its zeros at thousands)."""
        var = self._known_variance(leaf)
        return math.sqrt(var) if var is not None and var > 1 else 1.0

    def _known_variance(self, leaf) -> float | None:
        """Variance of a leaf when it is a number: an initial Gaussian, or the ZHat of W u
        with u initial (sigma^2 var(u))."""
        from tpcompiler.backends.lowering import evaluate

        g = self.zp.graph
        values = g.param_values()
        try:
            key = leaf.key
            if symbols.is_z(leaf):
                return float(evaluate(g.init_covariance(key, key), values))
            mat, x, _ = g.matmul_parts(key)
            if self.zp.is_initial(x):
                return float(evaluate(g.op(mat).sigma ** 2 * g.init_covariance(x, x), values))
        except Exception:  # noqa: BLE001 - not numeric (inputs, moments)
            return None
        return None

    @staticmethod
    def _constants_for_expectations(expr: sp.Expr) -> sp.Expr:
        """Every expectation (a ZDot coefficient, a moment) at a generic positive value, so
        the symbols inside it are not mistaken for variables."""
        from tpcompiler.symbolic.master import Expectation

        atoms = sorted(expr.atoms(Expectation), key=sp.default_sort_key)
        return expr.xreplace({e: sp.Rational(11 + i, 10 + i) for i, e in enumerate(atoms)}) if atoms else expr

    def _generic_except(self, expr, keep: set):
        """``expr`` with every expectation and every free symbol not in ``keep`` at a generic
        value (a Param at its value).  Where the generic values make a real expression
        complex, they are taken positive instead (a Param keeps its value, whatever its sign:
        exp(-c u^2) at c = -0.51 must stay a growing function)."""
        expr = self._constants_for_expectations(expr)
        params = self._param_values()
        rep = {}
        i = 0
        for s in sorted(expr.free_symbols, key=sp.default_sort_key):
            if s in keep:
                continue
            if s in params:
                rep[s] = sp.Rational(params[s])  # (exactly: see _exact)
            else:
                rep[s] = _GENERIC[i % len(_GENERIC)] * (1 + i // len(_GENERIC))
                i += 1
        positive = {s: v if s in params else abs(v) for s, v in rep.items()}
        try:
            generic = expr.xreplace(rep)
        except TypeError:
            # a negative value under a square root inside a comparison (a Piecewise of a
            # LayerNorm's h / sqrt(var): "Invalid comparison of non-real"): positive values
            # are as generic
            return expr.xreplace(positive)
        if not expr.has(sp.I) and (generic.has(sp.I) or _complex_at(expr, rep)):
            # the same without the comparison: a LayerNorm's (var + eps)^(-1/2) at a negative
            # var made its h imaginary, so exp(-h) oscillates instead of growing (a wrong
            # answer about growth, and sympy's limits of it took minutes); sympy may not show
            # the I (cosh(I x) is cos(x): log cosh(h) read as log cos, which has poles)
            generic = expr.xreplace(positive)
        return generic

    def _param_values(self) -> dict:
        """{symbol: value} of the program's Params (computed once)."""
        if self._params is None:
            from tpcompiler.ir import ops
            from tpcompiler.ir.ops import node_symbol

            g = self.zp.graph
            self._params = {node_symbol(k): g.op(k).value for k in g.keys_of(ops.Param)}
        return self._params

    @staticmethod
    def _growth_message(what, psi, why) -> str:
        # (E[|psi|] = oo: E[psi] is +-oo for a psi of one sign, undefined for an odd one such as sinh(u^3))
        return (f"{what}: E[{shown(psi)}] does not exist: E[|{shown(psi)}|] is infinite: {why}, so the "
                "function outgrows the Gaussian tail; the average over coordinates has no finite limit as the "
                "width grows; use a function that grows more slowly (e.g. a smaller coefficient in the exponent)")
