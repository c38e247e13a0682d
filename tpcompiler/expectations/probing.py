"""Probing: choose the quadrature rule (kind, step h, scale C) of a generated module by its
measured error, and remember the choice on disk.

The compiled core is run on a fixed probe set at the steps of a ladder h_i = 0.55 * 0.92^i;
the error of step h_i is estimated against the same rule at h_(i+5) (ratio 0.66; the rules
converge exponentially in 1/h, so the finer result is far more accurate).  Errors are relative
to max(|E|, 1e-2 S), S = sqrt(E[phi(u)^2] E[psi(v)^2]) the Cauchy-Schwarz scale of the
expectation, so that values that vanish by symmetry do not make relative errors meaningless.
A step is accepted when it and the next finer step both estimate an error <= rtol / 4 (errors
are not monotone in h); among the candidate (kind, C) the accepted rule with the fewest mean
evaluations wins.  If none reaches the target, the most accurate rule tried is used with a
RuntimeWarning.

The chosen rule is stored next to the generated module (``<module>.rules.json``, keyed by
rtol, kmax, ``GEN_VERSION`` and ``PROBE_VERSION``), so a second run does not probe again.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import sympy as sp

from tpcompiler.backends import codegen
from tpcompiler.expectations.functions import numpy_function
from tpcompiler.expectations.quadrature import HYBRID, UNIFORM, X_TRUNCATION
from tpcompiler.expectations.source import CACHE_KIND, GEN_VERSION, Module

#: The version of the rule selection (``probe``, ``rel_err``), part of a stored rule's key: a
#: rule chosen by an earlier selection is probed again (2: probe points without a finite
#: reference are left out; 3: error scales of functions infinite at 0 on a grid without 0).
PROBE_VERSION = 3

H_LADDER = [0.55 * 0.92**i for i in range(40)]  # 0.55 ... 0.021
FINE = 5  # the error of rung i is estimated against rung i + FINE (h ratio 0.66)

#: Candidate (kind, C) of smooth functions and of functions with kinks (whose outer rule is
#: the exp-exp split whatever the kind; HYBRID serves their smooth inner integrals).
SMOOTH_CANDIDATES = [(HYBRID, 1.5), (HYBRID, 2.0), (UNIFORM, 1.0)]
KINK_CANDIDATES = [(HYBRID, 1.0)]

_LOCK = threading.RLock()


@dataclass
class Rule:
    kind: int
    h: float
    C: float
    error: float
    evals: float  # mean evaluations of psi per expectation on the probe set

    def describe(self, kinks: bool) -> str:
        """The rule's name in method strings (the hybrid kind is named by its sinh rule)."""
        if kinks:
            return "split exp-exp trapezoid at the kink"
        return "uniform trapezoid" if self.kind == UNIFORM else "sinh-mapped trapezoid"


def pair_probe_covariances(kmax: float):
    """Covariances on which pair rules are compared: variances 0.04, 0.3, 1.5, kmax/3, kmax
    (all pairs), correlations 0, +-0.3 ... +-0.999, 0.999999 and exactly +-1 (450 in all)."""
    vs = [0.04, 0.3, 1.5, kmax / 3.0, kmax]
    rhos = [0.0, 0.3, -0.3, 0.6, -0.6, 0.8, -0.8, 0.9, -0.9, 0.95, -0.95, 0.99, -0.99,
            0.999, -0.999, 0.999999, 1.0, -1.0]
    out = [(k11, r * math.sqrt(k11 * k22), k22) for k11 in vs for k22 in vs for r in rhos]
    arr = np.array(out, dtype=np.float64)
    return arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy()


def oned_probe_variances(kmax: float) -> np.ndarray:
    """Variances on which one-variable rules are compared."""
    return np.array([0.01, 0.04, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, kmax / 4, kmax / 2, kmax],
                    dtype=np.float64)


def reference_moment(lam: sp.Lambda, ks: np.ndarray, power: int = 2) -> np.ndarray:
    """E[|g(u)|^power] for u ~ N(0, k), by a fine trapezoid rule in numpy (for error scales)."""
    g = numpy_function(lam)
    z = np.linspace(-X_TRUNCATION, X_TRUNCATION, 4001)
    # a grid without 0 for a function infinite there (log|x|, |x|^-p): with its infinite value
    # the scale was infinite, every rule passed, and the coarsest was used (1% off, error 0)
    z_off = np.linspace(-X_TRUNCATION, X_TRUNCATION, 4000)
    out = np.empty(len(ks))
    with np.errstate(all="ignore"):
        for i, k in enumerate(ks):
            grid = z
            val = g(math.sqrt(max(k, 0.0)) * grid)
            if not np.all(np.isfinite(val)):
                grid = z_off
                val = g(math.sqrt(max(k, 0.0)) * grid)
            w = np.exp(-0.5 * grid * grid)
            out[i] = np.sum(w * np.abs(val) ** power) / w.sum()
    return out


def rel_err(a, b, scale) -> float:
    """max |a - b| / max(|b|, 1e-2 scale) over the points whose reference b is finite (0 for
    no points at all); a rule's non-finite value there is an infinite error, and so is a set
    of points none of which has a finite reference.  Where the reference is not finite the
    expectation does not exist at that covariance (E[exp(u^2/4)] at variance >= 2, which
    tp.compile refuses where a program reaches it) or overflows, and no rule can be judged
    there: counting those points made every rule's error NaN, and the coarsest rule was used
    (E[exp(u^2/4)] at variance 1 erred by 7e-4, behind a RuntimeWarning)."""
    if np.size(b) == 0:
        return 0.0
    keep = np.isfinite(b)
    if not np.any(keep):  # nothing to judge a rule by: it passes nowhere (probe then warns)
        return math.inf
    b, a = b[keep], a[keep]
    den = np.maximum(np.abs(b), 1e-2 * (scale[keep] if np.ndim(scale) else scale))
    den = np.where(den > 0, den, 1.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # (a NaN or inf here is inf below)
        d = np.abs(a - b) / den
    return float(np.max(np.where(np.isnan(d), np.inf, d)))


def probe(run, candidates, rtol, scale_fn) -> Rule:
    """The rule with the fewest evaluations whose estimated error is <= rtol/4.

    run(h, kind, C) -> (values, counts) on the probe set; scale_fn(values) -> error scales.
    """
    target = rtol / 4.0
    best = None
    fallback = None
    for kind, C in candidates:
        cache = {}

        def at(i):
            if i not in cache:
                cache[i] = run(H_LADDER[i], kind, C)
            return cache[i]

        scale = None
        prev = None  # the rule of the previous rung
        for i in range(len(H_LADDER) - FINE):
            vals, counts = at(i)
            ref, _ = at(i + FINE)
            if scale is None:
                scale = scale_fn(ref)
            err = rel_err(vals, ref, scale)
            cost = float(np.mean(counts))
            rule = Rule(kind, H_LADDER[i], C, err, cost)
            if fallback is None or err < fallback.error:
                fallback = rule
            # accept a step only if the next finer one passes too (errors are not monotone)
            if prev is not None and prev.error <= target and err <= target:
                chosen = Rule(kind, prev.h, C, max(prev.error, err), prev.evals)
                if best is None or chosen.evals < best.evals:
                    best = chosen
                break
            if best is not None and cost > 2.0 * best.evals:
                break
            prev = rule
    return fallback if best is None else best


def warn_if_short(rule: Rule, rtol: float) -> Rule:
    """The rule, with a warning when it is a ``probe`` fallback that did not reach rtol: at
    every use, from the rules file too (only the process that probed it used to say so, and
    later ones returned the same inaccurate values in silence)."""
    if rule.error > rtol / 4.0:
        warnings.warn(
            f"quadrature did not reach rtol={rtol:g} on the probe set; using the most accurate "
            f"rule tried (estimated error {rule.error:.2g} on the probe set; at other variances it can be "
            "larger: a function growing like exp(c x^2) near the variance where its expectation stops "
            "existing was 20% off)",
            RuntimeWarning,
            stacklevel=5,
        )
    return rule


# ---------------------------------------------------------------------------------------
# The rules file of a generated module
# ---------------------------------------------------------------------------------------
def _rules_path(module: Module) -> str:
    return os.path.join(codegen.cache_dir(CACHE_KIND), module.name + ".rules.json")


def _read_rules(module: Module) -> dict:
    try:
        with open(_rules_path(module)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _rule_digest(fields: dict) -> str:
    """A checksum of a stored rule's fields: the rules file is read back without probing, and a
    changed digit (a damaged file: C 2.0 read as 6.0) made kernels 0.5% off in silence."""
    text = json.dumps({k: fields[k] for k in sorted(fields) if k != "sha256"})
    return hashlib.sha256(text.encode()).hexdigest()


def _stored_rule(cached) -> Rule | None:
    """The rule of a rules-file entry whose checksum holds, else None (probed again)."""
    if not isinstance(cached, dict) or cached.get("sha256") != _rule_digest(cached):
        return None
    try:
        return Rule(**{k: v for k, v in cached.items() if k != "sha256"})
    except TypeError:
        return None


def _write_rule(module: Module, key: str, rule: Rule) -> None:
    with _LOCK:
        data = _read_rules(module)
        fields = asdict(rule)
        data[key] = {**fields, "sha256": _rule_digest(fields)}
        try:
            codegen.atomic_write(_rules_path(module), json.dumps(data))
        except OSError:  # pragma: no cover - a read-only cache only costs probing time
            pass


def select_rule(module: Module, what: str, rtol, kmax, run, kink: bool, scale_fn) -> Rule:
    """The rule of ``module`` (``what``: "pair" or "1d") for rtol and kmax: from its rules
    file, else probed with ``run`` and ``scale_fn`` (see ``probe``) and stored."""
    key = f"{what}|{rtol!r}|{kmax!r}|{GEN_VERSION}|{PROBE_VERSION}"
    cached = _stored_rule(_read_rules(module).get(key))
    if cached is not None:
        return warn_if_short(cached, rtol)
    rule = probe(run, KINK_CANDIDATES if kink else SMOOTH_CANDIDATES, rtol, scale_fn)
    _write_rule(module, key, rule)
    return warn_if_short(rule, rtol)


def pair_rule(module: Module, core, outer: sp.Lambda, inner: sp.Lambda, rtol, kmax, kink) -> Rule:
    """The rule of a pair module (``core``: its loaded ``_core_many``) on the pair probe set."""
    k11, k12, k22 = pair_probe_covariances(kmax)

    def run(h, kind, C):
        out = np.empty(k11.size)
        cnt = np.empty(k11.size, dtype=np.int64)
        core(k11, k12, k22, h, kind, C, out, cnt)
        return out, cnt.astype(float)

    @functools.cache
    def scale():  # the same for every candidate: computed once
        return np.sqrt(reference_moment(outer, k11) * reference_moment(inner, k22))

    return select_rule(module, "pair", rtol, kmax, run, kink, lambda ref: scale())


def oned_rule(module: Module, core1, nfuncs: int, rtol, kmax, kink) -> Rule:
    """The rule of a one-variable module (``core1``: its loaded ``_core1``), judged on the
    means of its functions and their root mean squares."""
    ks = oned_probe_variances(kmax)

    def run(h, kind, C):
        vals, counts = [], []
        for k in ks:
            (means, sqs), n = core1(k, h, kind, C)
            vals.append(list(means) + [math.sqrt(max(s, 0.0)) for s in sqs])
            counts.append(n)
        return np.array(vals), np.array(counts, dtype=float)

    def scale_fn(ref):
        # each mean relative to max(|mean|, 1e-2 sqrt(E g^2)); the rms columns likewise
        return np.concatenate([ref[:, nfuncs:], ref[:, nfuncs:]], axis=1)

    return select_rule(module, "1d", rtol, kmax, run, kink, scale_fn)
