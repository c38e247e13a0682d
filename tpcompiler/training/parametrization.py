"""abc-parametrizations of an MLP with L hidden layers, classified exactly (docs/DESIGN.md 2.4).

An abc-parametrization of an MLP with L hidden layers, trained by SGD, is given by exponents
a_1..a_{L+1}, b_1..b_{L+1} and c:

    W^l = n^{-a_l} w^l,   w^l trained,   w^l ~ N(0, n^{-2 b_l}) at init,   lr = eta n^{-c}.

Layers 1..L are the hidden layers (layer 1 reads the finite-dimensional input), layer L+1 is
the readout.  The shift (a_l + t, b_l - t, c - 2t) for all l gives the same SGD dynamics, and
every quantity computed here is invariant under it.  With

    r = min(a_{L+1} + b_{L+1}, 2 a_{L+1} + c) + c - 1 + min_{l=1..L} [2 a_l + 1(l = 1)]

the parametrization is

  * stable iff   a_1 + b_1 = 0;   a_l + b_l = 1/2 (2 <= l <= L);   a_{L+1} + b_{L+1} >= 1/2;
                 r >= 0;   2 a_{L+1} + c >= 1;   a_{L+1} + b_{L+1} + r >= 1;
  * nontrivial iff   a_{L+1} + b_{L+1} + r = 1   or   2 a_{L+1} + c = 1;
  * feature learning iff stable, nontrivial and r = 0; a stable nontrivial parametrization
    with r > 0 is in the kernel regime (Dynamical Dichotomy).

All arithmetic uses exact sympy Rationals.  ``classification_report`` produces the JSON
object of ``tpc classify`` (docs/DESIGN.md 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from numbers import Rational as _RationalABC

import sympy as sp

from tpcompiler.ir.graph import ProgramError

__all__ = [
    "ABC",
    "Classification",
    "NAMES",
    "classification_report",
    "abc_from_values",
    "classify",
    "compute_r",
    "named",
    "parse_abc",
    "resolve_abc",
    "to_rational",
]

HALF = sp.Rational(1, 2)
ZERO = sp.Integer(0)
ONE = sp.Integer(1)

#: Names accepted by :func:`named` (and by ``--param`` of ``tpc classify`` / ``tpc train``).
NAMES = ("mup", "ntp", "mfp", "sp", "sp_c1")

_NAME_HELP = {
    "mup": "maximal-update parametrization",
    "ntp": "neural tangent parametrization",
    "mfp": "mean-field parametrization, depth 1 only",
    "sp": "standard parametrization with c = 0",
    "sp_c1": "standard parametrization with learning rate n^-1 (c = 1)",
}


# --------------------------------------------------------------------------- numbers

def to_rational(value, what: str = "value") -> sp.Rational:
    """Convert ``value`` to an exact sympy Rational.

    Accepts sympy Rationals/Integers, Python ints and Fractions, finite floats (read through
    their shortest decimal repr, so 0.1 becomes 1/10) and strings such as "1/2", "0.5", "-1",
    "1e-1".  Raises ValueError naming ``what`` otherwise.
    """
    if isinstance(value, bool):
        raise ProgramError(f"{what}: expected a number, got the boolean {value!r}")
    if isinstance(value, sp.Rational):
        return value
    if isinstance(value, sp.Basic):
        if value.is_Rational:
            return sp.Rational(value)
        raise ProgramError(f"{what}: {value} is not an exact rational number")
    if isinstance(value, _RationalABC):  # int, Fraction
        return sp.Rational(int(value.numerator), int(value.denominator))
    if isinstance(value, float):
        text = repr(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise ProgramError(f"{what}: expected a number such as 1/2, 0.5 or -1, got {value!r}")
    try:
        frac = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise ProgramError(
            f"{what}: cannot read {value!r} as a number; write e.g. 1/2, 0.5 or -1"
        ) from None
    return sp.Rational(frac.numerator, frac.denominator)


#: The deepest parametrization classified: its exponents are sympy numbers per layer (10^5
#: layers take about 0.3 s; 10^9 filled 24 GB before the machine stopped the process).
MAX_DEPTH = 10**5


def _check_depth(depth) -> int:
    """Return ``depth`` as an int in 1..MAX_DEPTH (the number L of hidden layers) or raise ValueError."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ProgramError(f"depth must be an integer >= 1 (hidden layers L), got {depth!r}")
    if depth < 1:
        raise ProgramError(f"depth must be >= 1 (hidden layers L), got {depth}")
    if depth > MAX_DEPTH:
        raise ProgramError(f"depth must be at most {MAX_DEPTH} (hidden layers L; the exponents are kept per "
                           f"layer), got {depth}")
    return depth


# --------------------------------------------------------------------------- ABC

@dataclass(frozen=True)
class ABC:
    """Exponents of an abc-parametrization of an MLP with L hidden layers (docs/DESIGN.md 2.4).

    ``a`` and ``b`` hold a_1..a_{L+1} and b_1..b_{L+1} (index L+1 is the readout); ``c`` is
    the learning-rate exponent.  Entries are converted to exact sympy Rationals.
    """

    a: tuple
    b: tuple
    c: sp.Rational

    def __post_init__(self):
        for name in ("a", "b"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ProgramError(f"{name} must be a list or tuple of L+1 exponents")
        a = tuple(to_rational(x, f"a_{i}") for i, x in enumerate(self.a, 1))
        b = tuple(to_rational(x, f"b_{i}") for i, x in enumerate(self.b, 1))
        if len(a) != len(b):
            raise ProgramError(
                f"a has {len(a)} entries but b has {len(b)}; give both L+1 entries"
            )
        if len(a) < 2:
            raise ProgramError(
                f"a and b need L+1 >= 2 entries (at least one hidden layer), got {len(a)}"
            )
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "c", to_rational(self.c, "c"))

    @property
    def depth(self) -> int:
        """L, the number of hidden layers (len(a) - 1)."""
        return len(self.a) - 1

    def shifted(self, t) -> "ABC":
        """The equivalent parametrization (a_l + t, b_l - t, c - 2t) (docs/DESIGN.md 2.4)."""
        t = to_rational(t, "t")
        return ABC(
            tuple(x + t for x in self.a), tuple(x - t for x in self.b), self.c - 2 * t
        )

    def __str__(self) -> str:
        """The ``parse_abc`` form, e.g. "a=0,1/2;b=0,0;c=0"."""
        return (
            "a=" + ",".join(map(str, self.a))
            + ";b=" + ",".join(map(str, self.b))
            + f";c={self.c}"
        )


def named(name: str, depth: int) -> ABC:
    """The named parametrization of docs/DESIGN.md 2.4 for an MLP with ``depth`` = L hidden layers.

    sp     a = (0, .., 0),            b = (0, 1/2, .., 1/2),  c = 0
    sp_c1  a = (0, .., 0),            b = (0, 1/2, .., 1/2),  c = 1
    ntp    a = (0, 1/2, .., 1/2),     b = (0, .., 0),         c = 0
    mfp    a = (0, 1),                b = (0, 0),             c = -1   (L = 1 only)
    mup    a = (-1/2, 0, .., 0, 1/2), b = (1/2, .., 1/2),     c = 0
    """
    L = _check_depth(depth)
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in NAMES:
        raise ProgramError(
            f"unknown parametrization {name!r}; use one of {', '.join(NAMES)} "
            "or give exponents as 'a=..;b=..;c=..'"
        )
    if key == "mfp" and L != 1:
        raise ProgramError(
            f"mfp (mean-field) is defined for depth 1 only, got depth {L}; "
            "use mup for deeper networks"
        )
    return _BUILDERS[key](L)


def _sp(L: int, c) -> ABC:
    return ABC((ZERO,) * (L + 1), (ZERO,) + (HALF,) * L, c)


_BUILDERS = {
    "sp": lambda L: _sp(L, ZERO),
    "sp_c1": lambda L: _sp(L, ONE),
    "ntp": lambda L: ABC((ZERO,) + (HALF,) * L, (ZERO,) * (L + 1), ZERO),
    "mfp": lambda L: ABC((ZERO, ONE), (ZERO, ZERO), -ONE),
    "mup": lambda L: ABC((-HALF,) + (ZERO,) * (L - 1) + (HALF,), (HALF,) * (L + 1), ZERO),
}


# --------------------------------------------------------------------------- parsing

def _split_assignments(text: str) -> dict:
    """Split "a=..;b=..;c=.." into {'a': '..', 'b': '..', 'c': '..'} (keys checked)."""
    if not isinstance(text, str):
        raise ProgramError(f"expected a string like 'a=0,1/2;b=0,0;c=0', got {text!r}")
    parts = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("a", "b", "c"):
            raise ProgramError(
                f"cannot read {item!r} in {text!r}; write 'a=..;b=..;c=..' "
                "(keys a, b, c separated by ';')"
            )
        if key in parts:
            raise ProgramError(f"{key} is given twice in {text!r}; give each of a, b, c once")
        parts[key] = value
    missing = [k for k in ("a", "b", "c") if k not in parts]
    if missing:
        raise ProgramError(
            f"missing {', '.join(missing)} in {text!r}; write 'a=..;b=..;c=..'"
        )
    return parts


def _layer_values(name: str, values, depth: int) -> tuple:
    """Exponents of one letter for layers 1..L+1: a list of L+1 entries or one shared value.

    ``values`` is a comma-separated string or a sequence of numbers/strings.
    """
    if isinstance(values, str):
        items = [s.strip() for s in values.split(",")]
        if any(s == "" for s in items):
            raise ProgramError(f"{name} has an empty entry in {values!r}; separate numbers by ','")
    elif isinstance(values, (list, tuple)):
        items = list(values)
    else:
        items = [values]
    n = depth + 1
    if len(items) == 1:
        items = items * n
    if len(items) != n:
        raise ProgramError(
            f"{name} has {len(items)} entries but depth {depth} needs {n} "
            f"({name}_1..{name}_{n}) or a single value for all layers"
        )
    return tuple(to_rational(x, f"{name}_{i}") for i, x in enumerate(items, 1))


def _scalar_value(name: str, value) -> sp.Rational:
    """A single exponent such as c (a one-element list is accepted)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ProgramError(f"{name} must be a single number, got {len(value)} entries")
        value = value[0]
    if isinstance(value, str) and "," in value:
        raise ProgramError(f"{name} must be a single number, got {value!r}")
    return to_rational(value, name)


def abc_from_values(depth: int, a, b, c) -> ABC:
    """Build an ABC from per-layer values a, b (lists, comma strings, or one shared value)."""
    L = _check_depth(depth)
    return ABC(_layer_values("a", a, L), _layer_values("b", b, L), _scalar_value("c", c))


def parse_abc(text: str, depth: int) -> ABC:
    """Parse "a=a_1,..,a_{L+1};b=b_1,..,b_{L+1};c=c" into an ABC for ``depth`` = L.

    Each of a and b is a comma list of L+1 numbers or a single number shared by all layers;
    numbers are exact rationals written as "1/2", "0.5", "-1", ...  Raises ValueError saying
    what is wrong (missing key, wrong number of entries, unreadable number).
    """
    parts = _split_assignments(text)
    return abc_from_values(depth, parts["a"], parts["b"], parts["c"])



def network_depth(graph) -> int:
    """L of a network template: 1 + its trained n x n matrices (docs/DESIGN.md 2.4)."""
    from tpcompiler.ir.ops import InitMat

    return 1 + sum(1 for k in graph.g if isinstance(graph.op(k), InitMat) and graph.op(k).trainable)


def resolve(spec, graph) -> ABC:
    """The parametrization ``spec`` -- an ABC, a name of ``named`` or "a=..;b=..;c=.." -- for the
    network template ``graph`` (its depth from ``network_depth``)."""
    if isinstance(spec, ABC):
        return spec
    if not isinstance(spec, str):
        raise ProgramError(f"parametrization: expected a name such as 'mup' or 'a=..;b=..;c=..', got {spec!r}")
    depth = network_depth(graph)
    return parse_abc(spec, depth) if "=" in spec else named(spec, depth)

# --------------------------------------------------------------------------- classification

@dataclass(frozen=True)
class Classification:
    """The verdict of docs/DESIGN.md 2.4 for one abc-parametrization.

    ``violated`` lists, in words and with the actual (shift-invariant) numbers, the
    stability conditions that fail; for a stable but trivial parametrization it lists the
    two nontriviality conditions that fail.  It is empty in the kernel and feature-learning
    regimes.
    """

    stable: bool
    nontrivial: bool
    feature_learning: bool
    r: sp.Rational
    regime: str
    violated: tuple


def compute_r(abc: ABC) -> sp.Rational:
    """r = min(a_{L+1}+b_{L+1}, 2a_{L+1}+c) + c - 1 + min_{l=1..L}[2a_l + 1(l=1)]."""
    a, b, c, L = abc.a, abc.b, abc.c, abc.depth
    out = min(a[L] + b[L], 2 * a[L] + c)
    hidden = min(2 * a[l] + (1 if l == 0 else 0) for l in range(L))
    return out + c - 1 + hidden


def stability_violations(abc: ABC, r) -> list:
    """The stability conditions of docs/DESIGN.md 2.4 that fail, in words (empty if stable)."""
    a, b, c, L = abc.a, abc.b, abc.c, abc.depth
    out_ab, out_ac = a[L] + b[L], 2 * a[L] + c
    found = []
    if a[0] + b[0] != 0:
        found.append(
            f"a_1 + b_1 = {a[0] + b[0]} != 0: first-layer preactivations at init "
            "are not Theta(1) (a_1 + b_1 = 0 required)"
        )
    for l in range(1, L):
        if a[l] + b[l] != HALF:
            found.append(
                f"a_{l + 1} + b_{l + 1} = {a[l] + b[l]} != 1/2: hidden layer {l + 1} "
                f"preactivations at init are not Theta(1) (a_{l + 1} + b_{l + 1} = 1/2 required)"
            )
    if out_ab < HALF:
        found.append(
            f"a_{L + 1} + b_{L + 1} = {out_ab} < 1/2: the output at init blows up with "
            f"width (a_{L + 1} + b_{L + 1} >= 1/2 required)"
        )
    if r < 0:
        found.append(f"r = {r} < 0: updates blow up with width (r >= 0 required)")
    if out_ac < 1:
        found.append(
            f"2a_{L + 1} + c = {out_ac} < 1: the readout-weight update blows up the output "
            f"(2a_{L + 1} + c >= 1 required)"
        )
    if out_ab + r < 1:
        found.append(
            f"a_{L + 1} + b_{L + 1} + r = {out_ab + r} < 1: the feature updates blow up "
            f"the output (a_{L + 1} + b_{L + 1} + r >= 1 required)"
        )
    return found


def triviality_reasons(abc: ABC, r) -> list:
    """Both nontriviality conditions, in words, if neither holds (else empty)."""
    a, b, c, L = abc.a, abc.b, abc.c, abc.depth
    out_abr, out_ac = a[L] + b[L] + r, 2 * a[L] + c
    if out_abr == 1 or out_ac == 1:
        return []
    return [
        f"a_{L + 1} + b_{L + 1} + r = {out_abr} != 1: feature updates do not move the "
        f"output in the limit (nontrivial needs this = 1 or 2a_{L + 1} + c = 1)",
        f"2a_{L + 1} + c = {out_ac} != 1: readout updates do not move the output in the "
        f"limit (nontrivial needs this = 1 or a_{L + 1} + b_{L + 1} + r = 1)",
    ]


def _regime(stable: bool, nontrivial: bool, r) -> str:
    if not stable:
        return "unstable"
    if not nontrivial:
        return "trivial"
    return "feature learning" if r == 0 else "kernel"


def classify(abc: ABC) -> Classification:
    """Classify ``abc`` per docs/DESIGN.md 2.4: stability, nontriviality, r and the regime.

    regime = "unstable" if not stable, else "trivial" if not nontrivial, else
    "feature learning" if r = 0, else "kernel" (r > 0).  The result is invariant under
    ``abc.shifted(t)``.
    """
    if not isinstance(abc, ABC):
        hint = f"tp.named({abc!r}, depth)" if isinstance(abc, str) else "tp.named('mup', depth)"
        raise ProgramError(f"classify: expected an abc-parametrization such as {hint}, got {abc!r}")
    r = compute_r(abc)
    unstable = stability_violations(abc, r)
    trivial = triviality_reasons(abc, r)
    stable, nontrivial = not unstable, not trivial
    regime = _regime(stable, nontrivial, r)
    return Classification(
        stable=stable,
        nontrivial=nontrivial,
        feature_learning=regime == "feature learning",
        r=r,
        regime=regime,
        violated=tuple(unstable if unstable else trivial),
    )


# --------------------------------------------------------------------------- report

def resolve_abc(depth: int, param=None, a=None, b=None, c=None) -> ABC:
    """The ABC meant by either ``param`` (a name or "a=..;b=..;c=..") or by a, b, c."""
    L = _check_depth(depth)
    given = [k for k, v in (("a", a), ("b", b), ("c", c)) if v is not None]
    if param is not None:
        if given:
            raise ProgramError(
                f"give either a parametrization name or a, b, c, not both (got param and {', '.join(given)})"
            )
        if isinstance(param, ABC):
            abc = param
        elif isinstance(param, str) and "=" in param:
            abc = parse_abc(param, L)
        else:
            abc = named(param, L)
        if abc.depth != L:
            raise ProgramError(f"the parametrization has depth {abc.depth} but depth {L} was asked")
        return abc
    if not given:
        raise ProgramError(
            f"no parametrization given; pass a name ({', '.join(NAMES)}) or all of a, b, c"
        )
    missing = [k for k in ("a", "b", "c") if k not in given]
    if missing:
        raise ProgramError(f"missing {', '.join(missing)}; give all of a, b and c (or a name)")
    return abc_from_values(L, a, b, c)


def classification_report(depth: int, param=None, a=None, b=None, c=None) -> dict:
    """The JSON object of ``tpc classify`` (docs/DESIGN.md 5).

    {"stable": bool, "nontrivial": bool, "feature_learning": bool, "r": "1/2",
     "regime": "feature learning"|"kernel"|"trivial"|"unstable", "violated": [str, ...]}

    ``param`` is a name from NAMES (or an "a=..;b=..;c=.." string); otherwise a and b are
    lists of L+1 numbers/strings (or one shared value) and c a number.  Bad input raises
    ValueError with a one-line message.
    """
    result = classify(resolve_abc(depth, param, a, b, c))
    return {
        "stable": bool(result.stable),
        "nontrivial": bool(result.nontrivial),
        "feature_learning": bool(result.feature_learning),
        "r": str(result.r),
        "regime": result.regime,
        "violated": list(result.violated),
    }
