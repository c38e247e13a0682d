"""Limit evaluator by particles (docs/DESIGN.md 2.7, strategy 3): works for any program.

M particles are M iid samples of all the limit random variables at once.  Walking the Z
program in order:

* initial Gaussians are drawn from their joint covariance;
* a new ZHat^{Wx} is drawn conditionally on the earlier members of W's family: with the
  family's members generated as ZHat_k = sum_j L_kj xi_j (xi iid N(0,1) per particle), the
  new row of L solves L l = c, c_j = sigma^2 E[Z^x Z^{x_j}], and the new diagonal is
  sqrt(sigma^2 E[Z^x Z^x] - |l|^2) (incremental Cholesky of the family's covariance);
* ZDot coefficients E[dZ^x/dZHat^v] are averages over particles of the symbolic
  derivative, propagated forward through the recursion (tangents), or, where that
  derivative holds a Dirac delta (derivatives of step/relu') or the product has at least
  STEIN_TERMS ZDot terms, Stein's lemma over the family's members D that Z^x depends
  on: E[grad_D f] = Sigma_DD^{-1} E[f ZHat_D];
* Nonlin applies phi to particles; Moments and expectations are particle averages;
  expectations proven zero by the symbolic stage are exactly 0.

The whole computation is repeated on G independent groups of M/G particles; values are the
group means and standard errors the spread of the groups over sqrt(G) (so the error of
every estimate that feeds later instructions is accounted for).  Cost grows with M, not
with any width.  G is chosen from M (``default_groups``) unless the caller gives it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import sympy as sp
from threadpoolctl import threadpool_limits

from tpcompiler import progress
from tpcompiler.ir import ops
from tpcompiler.symbolic.existence import UndefinedLimit
from tpcompiler.ir.graph import ProgramError
from tpcompiler.backends.lowering import evaluate
from tpcompiler.symbolic.master import Expectation, ZProgram
from tpcompiler.ir.rules import RuleTable
from tpcompiler.backends.walk import draw_initial, initial_keys, limit_rules, release_schedule, walk

#: Relative size below which a new ZHat's conditional variance counts as zero.
DEGENERATE = 1e-12
#: A product with at least this many ZDot terms gets all its coefficients from one Stein
#: estimate (cost: one average per family member) instead of one tangent per term
#: (cost: a chain-rule sweep per term, which grows quadratically in unrolled programs).
STEIN_TERMS = 4


@dataclass
class _Family:
    """Particles of one ZHat family: members, their noise draws and Cholesky factor."""

    members: list[str] = field(default_factory=list)
    noise: list[np.ndarray] = field(default_factory=list)
    L: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def _require_finite(values, key: str, what: str) -> None:
    """Refuse non-finite particle values (the symbolic stage decides what it can; this
    catches the rest, e.g. a log of something it could not prove positive)."""
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(values)
    if not np.all(finite):
        bad = np.size(finite) - int(np.count_nonzero(finite))
        raise UndefinedLimit(
            f"instruction {key!r}: {what} not a finite real number at {bad} of {np.size(finite)} "
            "particles (nan: a function outside its domain, e.g. log or sqrt of a negative number; "
            "inf: division by zero, or float64 overflow of a finite but huge value, such as exp of a variance "
            "of 1e8); the limit cannot be computed as a float64 number (rescale the program if it overflows)")


#: An average carried by fewer effective particles than this, over all the groups, is refused:
#: its value and the spread of the groups rest on a handful of samples (it was 10 per group
#: at 10 groups; judged per group at 40 groups of 5,000, a group's Poisson count refused
#: averages that 200,000 particles hold, so the total is judged).
MIN_EFFECTIVE_PARTICLES = 100
#: Below this share of the particles carrying an average, the function is a spike (the
#: refusal then says so); above it, the particles are only too few for it
SPIKE_SHARE = 0.01


def effective_particles(values) -> float | None:
    """The effective sample size (sum |f|)^2 / sum f^2 of an average of ``values``: M for a
    constant f, about M E|f|^2 / E f^2 in general, tiny when f is a spike that almost no
    particle reaches (tanh' of a pre-activation with variance 1e8, say), where the group
    stderr cannot see the mass that no particle hit.  None for a function that is exactly 0
    on every particle (a product like relu(h) relu(-h)): nothing to refuse."""
    a = np.abs(np.asarray(values, dtype=np.float64))
    top = a.max() if a.size else 0.0
    if top == 0.0:
        return None
    a = a / top
    return float(a.sum() ** 2 / np.dot(a, a))


def _require_effective_particles(effective: dict, particles: int) -> None:
    """Refuse an average that few particles carry: ``effective`` {instruction: effective
    particles summed over the groups} (``effective_particles``) of ``particles`` in all."""
    for key, ess in effective.items():
        if ess >= MIN_EFFECTIVE_PARTICLES:
            continue
        share = ess / particles
        needed = math.ceil(2 * MIN_EFFECTIVE_PARTICLES / share)  # at this share, with a margin for its noise
        fix = (f"the function is a spike that few particles reach: rescale the inputs, compute kernels with "
               f"c.kernels, or use at least about {needed} particles" if share < SPIKE_SHARE else
               f"use at least about {needed} particles (--particles)")
        raise ProgramError(
            f"instruction {key!r}: its average rests on about {ess:.1f} of the {particles} particles "
            f"({100 * share:.2g}% of them), so neither the value nor its stderr can be trusted; {fix}")


def _forward_substitution(L: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Solve L l = c for lower-triangular L whose zero diagonals mark degenerate members
    (ZHats that are combinations of earlier ones): their coefficients are 0, since the
    covariance with them is already carried by the members they combine."""
    k = len(c)
    row = np.zeros(k)
    for j in range(k):
        if L[j, j] > 0.0:
            row[j] = (c[j] - L[j, :j] @ row[:j]) / L[j, j]
    return row


class _Run:
    """One independent evaluation with M particles (the state the PARTICLES rules act on)."""

    def __init__(self, zp: ZProgram, M: int, rng: np.random.Generator):
        self.zp = zp
        self.graph = zp.graph
        self.M = M
        self.rng = rng
        #: {instruction: the fewest effective particles of its averages} (``effective_particles``)
        self.effective: dict[str, float] = {}
        # initial vectors and input layers (Gaussians whose covariance is set by the input
        # values, jointly over all inputs), drawn from their joint covariance
        self.env: dict = draw_initial(zp.graph, initial_keys(zp.graph), M, rng)
        self.families: dict[tuple, _Family] = {}
        self.coefficients: dict[tuple, float] = {}  # (matmul, source) -> sigma^2 E[dZ^x/dZHat^source]
        self.zdot_used: dict[str, list] = {}         # matmul -> [(source, y, coefficient)]
        self._tangents: dict = {}
        self._delta: dict = {}

    def eval_vec(self, zexpr: sp.Expr) -> np.ndarray:
        env = {}
        for s in zexpr.free_symbols:
            env[s.name] = self.env[s.key]  # Z^x and the scalar x: both the value of node x
        return evaluate(zexpr, env, size=self.M)

    def limit_scalar(self, expr: sp.Expr, key: str) -> float:
        """A deterministic limit: every E[f] replaced by its particle average."""
        means = {}
        for e in expr.atoms(Expectation):
            samples = self.eval_vec(e.args[0])
            _require_finite(samples, key, "the function it averages is")
            ess = effective_particles(samples)
            if ess is not None:
                self.effective[key] = min(ess, self.effective.get(key, math.inf))
            means[e] = sp.Float(np.mean(samples))
        value = evaluate(expr.xreplace(means), self.env)
        _require_finite(value, key, "its value is")
        return value

    # -- MatMul: ZHat sampled conditionally on its family, plus ZDot -------------------
    def matmul(self, key: str) -> np.ndarray:
        entry = self.zp.entries[key]
        mat, x, _ = self.graph.matmul_parts(key)
        s2 = evaluate(self.graph.op(mat).sigma ** 2, self.env)
        zhat = self._sample_zhat(key, entry.family, x, s2)
        out = zhat
        terms = self.zp.zdot_terms(key)
        if not terms:
            return out
        if len(terms) >= STEIN_TERMS or any(self._has_delta(x, t.source) for t in terms):
            # a delta forces Stein, and then for every source at once: Stein's derivative along
            # a member is the total one along its direction, which includes the share of a
            # degenerate member combining it (h2 = W(2u) beside h1 = W u), credited to the basis
            # and 0 for the degenerate member; next to that member's own tangent, that share
            # was counted twice (step(h1) + tanh(h2): 1.86 for 1.13)
            derivatives = self._stein(x, [t.source for t in terms])
        else:
            derivatives = {t.source: float(np.mean(self.tangent(x, t.source))) for t in terms}
        used = []
        for source, dv in derivatives.items():
            c = s2 * dv
            y = self.zp.entries[source].x
            self.coefficients[(key, source)] = c
            used.append((source, y, c))
            out = out + c * self.env[y]
        self.zdot_used[key] = used
        return out

    def _sample_zhat(self, key: str, family: tuple, x: str, s2: float) -> np.ndarray:
        fam = self.families.setdefault(family, _Family())
        X = self.env[x]
        k = len(fam.members)
        cov = np.empty(k + 1)
        for j, m in enumerate(fam.members):
            xj = self.zp.entries[m].x
            cov[j] = 0.0 if self.zp.provably_uncorrelated(x, xj) else s2 * float(np.mean(X * self.env[xj]))
        cov[k] = s2 * float(np.mean(X * X))
        row = _forward_substitution(fam.L, cov[:k])
        d2 = cov[k] - row @ row
        d = np.sqrt(d2) if d2 > DEGENERATE * max(cov[k], 1e-300) else 0.0
        L = np.zeros((k + 1, k + 1))
        L[:k, :k] = fam.L
        L[k, :k] = row
        L[k, k] = d
        fam.L = L
        noise = self.rng.standard_normal(self.M)
        fam.members.append(key)
        fam.noise.append(noise)
        zhat = d * noise
        for j in range(k):
            if row[j] != 0.0:
                zhat = zhat + row[j] * fam.noise[j]
        return zhat

    # -- ZDot coefficients ----------------------------------------------------------------
    def _has_delta(self, x: str, source: str) -> bool:
        """Whether dZ^x/dZHat^source holds a Dirac delta somewhere along the chain rule."""
        memo = self._delta.get((x, source))
        if memo is not None:
            return memo
        result = x != source and any(self.zp.partial(x, a).has(sp.DiracDelta) or self._has_delta(a, source)
                                     for a in self.zp.parents_on(x, source))
        self._delta[(x, source)] = result
        return result

    def tangent(self, x: str, source: str):
        """dZ^x/dZHat^source per particle, by the chain rule through the recursion:
        sum over parents p of (dZ^x/dZ^p per particle) * dZ^p/dZHat^source."""
        memo = self._tangents.get((x, source))
        if memo is not None:
            return memo
        if source not in self.zp.entries[x].deps:
            t = 0.0
        elif x == source:
            t = 1.0
        else:
            t = TANGENTS(self.graph.op(x))(self, x, source)
        self._tangents[(x, source)] = t
        return t

    def _stein(self, x: str, sources: list[str]) -> dict[str, float]:
        """E[dZ^x/dZHat^k] for sources k of one ZHat family, all at once, by Stein's lemma
        over the members D that Z^x depends on.

        The family's members are ZHat = L xi with xi iid N(0, 1) per particle, and Z^x depends
        on the family only through ZHat_D = L_D xi (the rest of its randomness is independent
        of the family), so E[f ZHat_D] = Sigma_DD E[grad_D f] with Sigma_DD = L_D L_D^T.
        With L_D^T = Q R (QR), eta = Q^T xi are iid N(0, 1), ZHat_D = R^T eta and
        E[grad_D f] = R^{-1} Q^T E[f xi] (one average per member and a triangular solve).

        Solving over D, not over the whole family: a member of D that is nearly a linear
        combination of members outside D (in an unrolled training program, the features of
        the other inputs and steps) has a tiny conditional variance given the whole family,
        and the whole family's L^{-T} multiplies the particle noise of E[f xi] by its inverse
        (10^4 was seen), which the nonlinear layers after turn into a bias.  Given D alone the
        derivative is as well-determined as Z^x's dependence on it, and the noise it leaves
        in the ZDot sum sigma^2 sum_{k in D} Z^{y_k} E[dZ^x/dZHat^k] stays of order
        |D| / particles.  A member of D that is a combination of earlier members of D
        (degenerate: no direction of its own) has its derivative carried by the members it
        combines, which gives the same ZDot sum."""
        family = self.zp.entries[sources[0]].family
        fam = self.families[family]
        deps = self.zp.entries[x].deps
        D = [j for j, m in enumerate(fam.members) if m in deps]
        last = D[-1]
        f = self.env[x]
        r = np.array([float(np.dot(f, fam.noise[j])) / self.M for j in range(last + 1)])
        LD = fam.L[np.ix_(D, range(last + 1))]
        Q, R = np.linalg.qr(LD.T)
        w = Q.T @ r
        scale = np.sqrt(np.maximum(np.einsum("ij,ij->i", LD, LD), 1e-300))
        live = np.abs(np.diag(R)) > np.sqrt(DEGENERATE) * scale
        u = np.zeros(len(D))
        for i in range(len(D) - 1, -1, -1):  # back substitution for R u = w, skipping degenerate rows
            if live[i]:
                u[i] = (w[i] - R[i, i + 1:] @ u[i + 1:]) / R[i, i]
        position = {fam.members[j]: i for i, j in enumerate(D)}
        out = {s: float(u[position[s]]) if s in position else 0.0 for s in sources}
        for s in sources:  # a degenerate source's derivative lives on the members it combines
            i = position.get(s)
            if i is not None and not live[i]:
                for k in np.nonzero(R[:i, i])[0]:
                    out.setdefault(fam.members[D[k]], float(u[k]))
        return out


def _tangent_reads(zp: ZProgram, key: str):
    """Vectors a product's ZDot coefficients read besides its input: for tangents (fewer
    than STEIN_TERMS terms), the chain rule walks the consumers from the sources to x, so
    their arguments and ZDot inputs stay alive until this product."""
    entry = zp.entries[key]
    terms = zp.zdot_terms(key)
    if entry.family is None or not 0 < len(terms) < STEIN_TERMS:
        return
    g = zp.graph
    sources = {t.source for t in terms}
    for n in nx.ancestors(g.g, entry.x) | {entry.x}:
        if g.kind(n) == ops.VEC and zp.entries[n].deps & sources:
            yield from g.vector_args(n)
            yield from (t.y for t in zp.entries[n].zdot)


def _chain_through_partials(run: _Run, x: str, source: str):
    """Nonlin: sum_a phi_a(Z..) dZ^a/dZHat^source, phi_a = dphi/dZ^a on the particles."""
    t = 0.0
    for a in run.zp.parents_on(x, source):
        t = t + run.eval_vec(run.zp.partial(x, a)) * run.tangent(a, source)
    return t


def _chain_through_zdot(run: _Run, x: str, source: str):
    """MatMul: sum_y c_y dZ^y/dZHat^source over the ZDot terms with the estimated c_y."""
    t = 0.0
    for _, y, c in run.zdot_used.get(x, ()):
        t = t + c * run.tangent(y, source)
    return t


#: dZ^x/dZHat^source per particle by op of x (only vectors with parents get here).
TANGENTS = RuleTable("particle tangents", domain=(ops.Nonlin, ops.MatMul))
TANGENTS.register(ops.Nonlin)(_chain_through_partials)
TANGENTS.register(ops.MatMul)(_chain_through_zdot)


def _nonlin(run: _Run, entry, op) -> np.ndarray:
    values = run.eval_vec(entry.z)
    _require_finite(values, entry.key, "its values are")
    return values


def _matmul(run: _Run, entry, op) -> np.ndarray:
    values = run.matmul(entry.key)
    run._tangents.clear()  # per product; recomputed if a later one needs them
    return values


#: The particle evaluator: vectors are M samples of their Z.
PARTICLES = limit_rules("particle limit")
PARTICLES.register(ops.Nonlin)(_nonlin)
PARTICLES.register(ops.MatMul)(_matmul)
PARTICLES.register(ops.Moment)(lambda run, entry, op: run.limit_scalar(entry.z, entry.key))


#: Particles per group that ``default_groups`` keeps at least (above MIN_GROUPS groups).
GROUP_PARTICLES = 5_000
MIN_GROUPS, MAX_GROUPS = 10, 40


def default_groups(particles: int) -> int:
    """The number of groups of a particle limit of ``particles`` particles: as many groups of
    GROUP_PARTICLES as there are, within [MIN_GROUPS, MAX_GROUPS] (40 at the default 200,000).

    The standard error is the spread of G group values, an estimate with G - 1 degrees of
    freedom: with 10 groups it is itself 24% uncertain, and |value - limit| exceeded 3
    standard errors in 1.25% of runs (programs/zdot.py, 400 seeds, against 0.27% for a normal
    variable), up to 5.5.  With 40 groups: 11% and 0.21%.  Each group value is computed from
    m = M / G particles, with a bias O(1/m) where an output is a nonlinear function of averages
    (ZDot coefficients, Cholesky factors of estimated covariances), which the spread does
    not show; groups of 5,000 particles moved zdot's values by about 0.1 standard error
    against groups of 20,000, so smaller groups than that are not made."""
    return min(MAX_GROUPS, max(MIN_GROUPS, particles // GROUP_PARTICLES))


def limit(zp: ZProgram, particles: int, seed: int = 0, groups: int | None = None) -> dict[str, tuple[float, float]]:
    """{output: (value, standard error)} from ``groups`` independent runs of particles/groups
    (the caller chooses the count; the API default is ``compiler.DEFAULT_PARTICLES``);
    ``groups`` None: ``default_groups(particles)``."""
    if groups is None:
        groups = default_groups(particles)
    if particles < 2 * groups:
        raise ProgramError(f"need at least {2 * groups} particles for {groups} groups, got {particles}")
    seqs = np.random.SeedSequence(seed).spawn(groups)
    per = particles // groups
    # The particle loop makes many small BLAS calls (one average per family member); a
    # multi-threaded BLAS spends more on waking threads than on the work.
    schedule = release_schedule(zp, _tangent_reads)
    with threadpool_limits(1, user_api="blas"):
        rows, effective = [], {}
        for s in progress.iterate(seqs, f"particles ({particles})", unit="group"):
            run = _Run(zp, per, np.random.default_rng(s))  # (one group's particles alive at a time)
            rows.append(walk(run, PARTICLES, schedule))
            for key, ess in run.effective.items():
                effective[key] = effective.get(key, 0.0) + ess
    _require_effective_particles(effective, per * groups)
    out = {}
    for name in zp.graph.outputs:
        vals = np.array([r[name] for r in rows])
        out[name] = (float(vals.mean()), float(vals.std(ddof=1) / np.sqrt(groups)))
    return out
