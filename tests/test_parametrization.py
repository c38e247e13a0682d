"""Tests of abc-parametrizations and their classification (docs/DESIGN.md 2.4, 5: tpc classify)."""
from __future__ import annotations

import json
from fractions import Fraction

import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from tpcompiler.training.parametrization import (
    ABC,
    NAMES,
    Classification,
    classification_report,
    classify,
    named,
    parse_abc,
)

R = sp.Rational
H = R(1, 2)


# --------------------------------------------------------------------------- the table
# docs/DESIGN.md 2.4, transcribed column by column:
# name -> (a_1, a_2..a_L, a_{L+1}, b_1, b_2..b_L, b_{L+1}, c, r, regime)
TABLE = {
    "sp": (0, 0, 0, 0, H, H, 0, -1, "unstable"),
    "sp_c1": (0, 0, 0, 0, H, H, 1, H, "kernel"),
    "ntp": (0, H, H, 0, 0, 0, 0, H, "kernel"),
    "mfp": (0, None, 1, 0, None, 0, -1, 0, "feature learning"),
    "mup": (-H, 0, H, H, H, H, 0, 0, "feature learning"),
}


def table_abc(name, L):
    a1, am, aL1, b1, bm, bL1, c, _, _ = TABLE[name]
    return ABC((a1,) + (am,) * (L - 1) + (aL1,), (b1,) + (bm,) * (L - 1) + (bL1,), c)


# (name, L) pairs where the table's r column applies.  For L = 1 the SP rows have no middle
# layers, so min_l [2a_l + 1(l=1)] = 1 instead of 0 and r differs (tested by hand below).
TABLE_CASES = [
    (name, L)
    for name in TABLE
    for L in (1, 2, 3)
    if not (name == "mfp" and L > 1) and not (name.startswith("sp") and L == 1)
]


@pytest.mark.parametrize("name,L", TABLE_CASES)
def test_table_rows(name, L):
    *_, r, regime = TABLE[name]
    assert named(name, L) == table_abc(name, L)
    got = classify(named(name, L))
    assert got.r == r
    assert got.regime == regime
    assert got.stable == (regime != "unstable")
    assert got.feature_learning == (regime == "feature learning")
    assert got.nontrivial == (regime in ("kernel", "feature learning"))
    assert (got.violated == ()) == (regime in ("kernel", "feature learning"))


def test_named_depth1_exponents():
    assert named("mup", 1) == ABC((-H, H), (H, H), 0)
    assert named("ntp", 1) == ABC((0, H), (0, 0), 0)
    assert named("mfp", 1) == ABC((0, 1), (0, 0), -1)
    assert named("sp", 1) == ABC((0, 0), (0, H), 0)
    assert named(" MuP ", 3) == named("mup", 3)


# Hand computations, r = min(a_{L+1}+b_{L+1}, 2a_{L+1}+c) + c - 1 + min_l[2a_l + 1(l=1)]:
# L = 5
#   mup:   min(1, 1) + 0 - 1 + min(-1+1, 0, 0, 0, 0) = 0                      -> features
#   ntp:   min(1/2, 1) + 0 - 1 + min(1, 1, 1, 1, 1) = 1/2                     -> kernel
#   sp:    min(1/2, 0) + 0 - 1 + min(1, 0, 0, 0, 0) = -1                      -> unstable
#   sp_c1: min(1/2, 1) + 1 - 1 + min(1, 0, ...) = 1/2                         -> kernel
# L = 1 (no middle layers, the min is 2a_1 + 1 = 1):
#   sp:    min(1/2, 0) + 0 - 1 + 1 = 0, unstable since 2a_2 + c = 0 < 1 and
#          a_2 + b_2 + r = 1/2 < 1 (r >= 0 holds)
#   sp_c1: min(1/2, 1) + 1 - 1 + 1 = 3/2; stable (a_2+b_2 = 1/2, 2a_2+c = 1, a_2+b_2+r = 2),
#          nontrivial by 2a_2 + c = 1 -> kernel
HAND = [
    ("mup", 5, 0, "feature learning"),
    ("ntp", 5, H, "kernel"),
    ("sp", 5, -1, "unstable"),
    ("sp_c1", 5, H, "kernel"),
    ("sp", 1, 0, "unstable"),
    ("sp_c1", 1, R(3, 2), "kernel"),
]


@pytest.mark.parametrize("name,L,r,regime", HAND)
def test_hand_computed(name, L, r, regime):
    got = classify(named(name, L))
    assert (got.r, got.regime) == (r, regime)


def test_sp_depth1_violations_by_hand():
    v = classify(named("sp", 1)).violated
    assert len(v) == 2
    assert v[0].startswith("2a_2 + c = 0 < 1")
    assert v[1].startswith("a_2 + b_2 + r = 1/2 < 1")


# --------------------------------------------------------------------------- hand examples

def test_unstable_sp_mentions_r():
    got = classify(named("sp", 2))
    assert not got.stable and got.regime == "unstable" and got.r == -1
    assert not got.feature_learning
    assert "r = -1 < 0: updates blow up with width (r >= 0 required)" in got.violated
    assert any(t.startswith("2a_3 + c = 0 < 1") for t in got.violated)
    assert any(t.startswith("a_3 + b_3 + r = -1/2 < 1") for t in got.violated)
    assert len(got.violated) == 3  # init conditions hold: a_1+b_1 = 0, a_2+b_2 = 1/2, 1/2


def test_trivial_ntp_with_small_readout():
    # NTP, L = 2, readout multiplier n^-1 (a_3 = 1): a_3+b_3 = 1, 2a_3+c = 2,
    # r = min(1, 2) + 0 - 1 + min(1, 1) = 1; stable, but a_3+b_3+r = 2 and 2a_3+c = 2.
    abc = ABC((0, H, 1), (0, 0, 0), 0)
    got = classify(abc)
    assert got.stable and not got.nontrivial and not got.feature_learning
    assert got.regime == "trivial" and got.r == 1
    assert len(got.violated) == 2
    assert got.violated[0].startswith("a_3 + b_3 + r = 2 != 1")
    assert got.violated[1].startswith("2a_3 + c = 2 != 1")
    assert all("do not move the output" in t for t in got.violated)


def test_init_violations_named():
    # a_1 + b_1 = 1/2 and a_2 + b_2 = 1 (L = 2) break the init conditions
    got = classify(ABC((0, H, H), (H, H, 0), 0))
    assert got.regime == "unstable"
    assert any(t.startswith("a_1 + b_1 = 1/2 != 0") for t in got.violated)
    assert any(t.startswith("a_2 + b_2 = 1 != 1/2") for t in got.violated)
    # readout too large at init: a_2 + b_2 = 0 < 1/2 (L = 1)
    got = classify(ABC((0, 0), (0, 0), 1))
    assert any(t.startswith("a_2 + b_2 = 0 < 1/2") for t in got.violated)


# --------------------------------------------------------------------------- properties

small_rationals = st.builds(
    lambda p, q: R(p, q), st.integers(-4, 4), st.sampled_from([1, 2, 4])
)
shifts = st.fractions(min_value=-3, max_value=3, max_denominator=6).map(
    lambda f: R(f.numerator, f.denominator)
)


@st.composite
def abcs(draw):
    L = draw(st.integers(1, 4))
    a = draw(st.lists(small_rationals, min_size=L + 1, max_size=L + 1))
    b = draw(st.lists(small_rationals, min_size=L + 1, max_size=L + 1))
    return ABC(tuple(a), tuple(b), draw(small_rationals))


@settings(max_examples=150, deadline=None)
@given(abcs(), st.lists(shifts, min_size=1, max_size=3))
def test_shift_symmetry(abc, ts):
    base = classify(abc)
    for t in ts:
        assert classify(abc.shifted(t)) == base


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(NAMES), st.integers(1, 4), shifts)
def test_shift_symmetry_named(name, L, t):
    if name == "mfp":
        L = 1
    abc = named(name, L)
    assert classify(abc.shifted(t)) == classify(abc)
    assert abc.shifted(t).shifted(-t) == abc


def _reference(abc):
    """The conditions of docs/DESIGN.md 2.4 restated with Fractions, written out directly."""
    a = [Fraction(int(x.p), int(x.q)) for x in abc.a]
    b = [Fraction(int(x.p), int(x.q)) for x in abc.b]
    c, L = Fraction(int(abc.c.p), int(abc.c.q)), abc.depth
    r = min(a[L] + b[L], 2 * a[L] + c) + c - 1 + min([2 * a[0] + 1] + [2 * x for x in a[1:L]])
    stable = (
        a[0] + b[0] == 0
        and all(a[l] + b[l] == Fraction(1, 2) for l in range(1, L))
        and a[L] + b[L] >= Fraction(1, 2)
        and r >= 0
        and 2 * a[L] + c >= 1
        and a[L] + b[L] + r >= 1
    )
    nontrivial = a[L] + b[L] + r == 1 or 2 * a[L] + c == 1
    return r, stable, nontrivial


@settings(max_examples=200, deadline=None)
@given(abcs())
def test_classify_matches_direct_statement(abc):
    got = classify(abc)
    r, stable, nontrivial = _reference(abc)
    assert got.r == R(r.numerator, r.denominator)
    assert (got.stable, got.nontrivial) == (stable, nontrivial)
    assert got.feature_learning == (stable and nontrivial and r == 0)
    assert got.regime in ("unstable", "trivial", "feature learning", "kernel")
    assert (got.regime == "unstable") == (not stable)
    assert bool(got.violated) == (got.regime in ("unstable", "trivial"))
    if got.regime == "kernel":
        assert got.r > 0


# --------------------------------------------------------------------------- parse_abc

def test_parse_basic():
    abc = parse_abc("a=0,1/2,1/2;b=0,0,0;c=0", 2)
    assert abc == named("ntp", 2)
    assert all(isinstance(x, sp.Rational) for x in abc.a + abc.b + (abc.c,))
    assert abc.depth == 2


def test_parse_forms():
    assert parse_abc(" a = -0.5, 0, 0.5 ; b = 1/2 ; c = 0 ", 2) == named("mup", 2)
    assert parse_abc("c=-1;b=0;a=0,1", 1) == named("mfp", 1)
    assert parse_abc("A=0;B=0,0.5;C=1;", 1) == named("sp_c1", 1)
    assert parse_abc("a=1e-1;b=-0.1;c=0.25", 1).a == (R(1, 10), R(1, 10))


@settings(max_examples=100, deadline=None)
@given(abcs())
def test_parse_round_trip(abc):
    assert parse_abc(str(abc), abc.depth) == abc


@pytest.mark.parametrize(
    "text,depth,words",
    [
        ("a=0,1/2;b=0,0,0;c=0", 2, ["a has 2 entries", "depth 2 needs 3", "single value"]),
        ("a=0,0,0;b=0,0;c=0", 1, ["a has 3 entries", "depth 1 needs 2"]),
        ("a=0,x;b=0,0;c=0", 1, ["a_2", "'x'", "1/2"]),
        ("a=0,1/0;b=0,0;c=0", 1, ["a_2", "1/0"]),
        ("a=0,0;b=0,0", 1, ["missing c"]),
        ("b=0,0", 1, ["missing a, c"]),
        ("a=0,0;b=0,0;c=0;d=1", 1, ["'d=1'", "keys a, b, c"]),
        ("a=0;a=1;b=0;c=0", 1, ["a is given twice"]),
        ("a=0,,1;b=0;c=0", 2, ["empty entry"]),
        ("a=0;b=0;c=0,1", 1, ["c must be a single number"]),
        ("a=0;b=0;c=0", 0, ["depth must be >= 1"]),
        ("a 0;b=0;c=0", 1, ["cannot read 'a 0'"]),
    ],
)
def test_parse_errors(text, depth, words):
    with pytest.raises(ValueError) as err:
        parse_abc(text, depth)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


# --------------------------------------------------------------------------- report

REPORT_KEYS = {"stable", "nontrivial", "feature_learning", "r", "regime", "violated"}


@pytest.mark.parametrize("name", NAMES)
def test_report_shape(name):
    rep = classification_report(1, name)
    assert set(rep) == REPORT_KEYS
    for k in ("stable", "nontrivial", "feature_learning"):
        assert type(rep[k]) is bool
    assert type(rep["r"]) is str and sp.Rational(rep["r"]) == classify(named(name, 1)).r
    assert type(rep["violated"]) is list and all(type(t) is str for t in rep["violated"])
    assert json.loads(json.dumps(rep)) == rep


def test_report_values():
    assert classification_report(2, "mup") == {
        "stable": True, "nontrivial": True, "feature_learning": True,
        "r": "0", "regime": "feature learning", "violated": [],
    }
    rep = classification_report(3, "ntp")
    assert (rep["r"], rep["regime"], rep["feature_learning"]) == ("1/2", "kernel", False)
    rep = classification_report(2, "sp")
    assert (rep["r"], rep["regime"], rep["stable"]) == ("-1", "unstable", False)
    assert rep["violated"][0] == "r = -1 < 0: updates blow up with width (r >= 0 required)"


def test_report_explicit_exponents():
    by_name = classification_report(2, "ntp")
    assert classification_report(2, a=[0, "1/2", 0.5], b=[0, 0, 0], c=0) == by_name
    assert classification_report(2, a="0,1/2,1/2", b="0", c="0") == by_name
    assert classification_report(2, a=[0, H, H], b=0, c=[0]) == by_name
    assert classification_report(2, "a=0,1/2,1/2;b=0;c=0") == by_name
    shifted = named("ntp", 2).shifted(R(1, 3))
    assert classification_report(2, a=list(shifted.a), b=list(shifted.b), c=shifted.c) == by_name
    assert classification_report(1, a=[0, 1], b=[0, 0], c=-1)["regime"] == "feature learning"


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(depth=2, param="xyz"), ["unknown parametrization 'xyz'", "mup", "ntp", "mfp", "sp"]),
        (dict(depth=2, param="mfp"), ["mfp", "depth 1 only", "use mup"]),
        (dict(depth=0, param="mup"), ["depth must be >= 1"]),
        (dict(depth=2.0, param="mup"), ["depth must be an integer"]),
        (dict(depth=True, param="mup"), ["depth must be an integer"]),
        (dict(depth=2, a=[0, 0], b=[0, 0, 0], c=0), ["a has 2 entries", "depth 2 needs 3"]),
        (dict(depth=1, a=[0, 0], b=[0, 0, 0, 0], c=0), ["b has 4 entries", "depth 1 needs 2"]),
        (dict(depth=1, a=[0, "half"], b=[0, 0], c=0), ["a_2", "'half'"]),
        (dict(depth=1, a=[0, 0], b=[0, 0], c=None), ["missing c"]),
        (dict(depth=1, a=[0, 0]), ["missing b, c"]),
        (dict(depth=1), ["no parametrization given", "mup"]),
        (dict(depth=1, param="mup", c=0), ["not both"]),
        (dict(depth=1, a=[0, True], b=[0, 0], c=0), ["a_2", "boolean"]),
        (dict(depth=1, a=[0, float("nan")], b=[0, 0], c=0), ["a_2", "nan"]),
    ],
)
def test_report_errors(kwargs, words):
    with pytest.raises(ValueError) as err:
        classification_report(**kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


# --------------------------------------------------------------------------- ABC itself

def test_abc_dataclass():
    abc = ABC([0, "1/2"], (0, 0.0), "0")
    assert abc == named("ntp", 1) and abc.depth == 1
    assert isinstance(abc.a, tuple) and all(isinstance(x, sp.Rational) for x in abc.a)
    with pytest.raises(AttributeError):
        abc.c = 1  # frozen
    assert hash(abc) == hash(named("ntp", 1))
    s = abc.shifted("1/2")
    assert (s.a, s.b, s.c) == ((H, 1), (-H, -H), -1)
    with pytest.raises(ValueError, match="entries but b has"):
        ABC((0, 0), (0, 0, 0), 0)
    with pytest.raises(ValueError, match="at least one hidden layer"):
        ABC((0,), (0,), 0)
    assert isinstance(classify(abc), Classification)
