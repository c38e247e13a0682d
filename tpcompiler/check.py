"""Convergence check of finite width against the limit (docs/DESIGN.md 4, oracle 1).

The Master theorem predicts that an output computed at width n fluctuates around its limit
with root-mean-square error ~ n^{-1/2} (the finite-width bias is O(1/n), smaller).  For each
output we run the finite-width interpreter over seeds at several widths and report

* the seed mean and its standard error at each width,
* the RMS over seeds of (finite value - limit) and the log-log slope fitted to it,
* a verdict: the seed mean at the top width agrees with the limit within ``Z_TOL``
  combined standard errors, and the slope lies in ``SLOPE_RANGE`` (near -1/2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tpcompiler.compiler import CHECK_PARTICLES, Compiled, simulate_seeds

#: Agreement at the top width: |mean - limit| <= Z_TOL * sqrt(se_mean^2 + se_limit^2).
Z_TOL = 4.0
#: Below this many seeds the seed means' standard errors are too rough for the agreement test
#: (a correct limit FAILs it in a large share of runs: 43% at 2 seeds, 30% at 3, 3% at 5 in
#: one measurement, none at 10 or 20); ``tpc check`` says so beside its verdict.
FEW_SEEDS = 10
#: Accepted fitted slopes of log RMS error against log width (theory: -1/2).
SLOPE_RANGE = (-1.1, -0.3)
DEFAULT_WIDTHS = (128, 256, 512, 1024, 2048, 4096)


@dataclass
class OutputCheck:
    name: str
    limit: float
    limit_stderr: float
    widths: list[int]
    means: list[float]
    stderrs: list[float]
    rms: list[float]
    slope: float
    z_top: float
    passed: bool
    reason: str


def fit_slope(widths, rms) -> float:
    """Least-squares slope of log(rms) against log(width) (nan if fewer than 2 usable points)."""
    w = np.asarray(widths, dtype=float)
    r = np.asarray(rms, dtype=float)
    ok = r > 0
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(w[ok]), np.log(r[ok]), 1)[0])


def verdict(limit, limit_se, means, stderrs, rms, slope) -> tuple[bool, float, str]:
    """(passed, z at the top width, reason) for one output."""
    scale = 1.0 + abs(limit)
    if max(rms) <= 1e-12 * scale:
        return True, 0.0, "exact at every width"
    combined = float(np.hypot(stderrs[-1], limit_se))
    gap = abs(means[-1] - limit)
    z = gap / combined if combined > 0 else (0.0 if gap <= 1e-12 * scale else float("inf"))
    reasons = []
    if z > Z_TOL:
        reasons.append(f"top-width mean is {z:.1f} standard errors from the limit (> {Z_TOL:g})")
    if not (SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1]):
        reasons.append(f"error slope {slope:.2f} outside [{SLOPE_RANGE[0]}, {SLOPE_RANGE[1]}] (theory: -1/2)")
    return (not reasons), z, "; ".join(reasons) or "agrees at the top width; error falls like n^-1/2"


def finite_runs(graph, widths, seeds: int, seed: int = 0, x=None, progress=None) -> dict[int, dict[str, np.ndarray]]:
    """{width: {output: values over seeds}} from the finite-width interpreter."""
    runs = {}
    for n in sorted(int(w) for w in widths):
        runs[n] = simulate_seeds(graph, n, range(1000 + seed, 1000 + seed + seeds), x=x)
        if progress:
            progress(n)
    return runs


def judge(limits: dict[str, tuple[float, float]], runs: dict[int, dict[str, np.ndarray]]) -> list[OutputCheck]:
    """Compare limits {output: (value, stderr)} with finite-width runs (see module docstring)."""
    widths = sorted(runs)
    out = []
    for name, (value, se) in limits.items():
        samples = [runs[n][name] for n in widths]
        means = [float(s.mean()) for s in samples]
        stderrs = [float(s.std(ddof=1) / np.sqrt(len(s))) for s in samples]
        rms = [float(np.sqrt(np.mean((s - value) ** 2))) for s in samples]
        slope = fit_slope(widths, rms)
        passed, z, reason = verdict(value, se, means, stderrs, rms, slope)
        out.append(OutputCheck(name, value, se, widths, means, stderrs, rms, slope, z, passed, reason))
    return out


def convergence_check(compiled: Compiled, widths=DEFAULT_WIDTHS, seeds: int = 20, particles: int = CHECK_PARTICLES,
                      seed: int = 0, x=None, progress=None) -> list[OutputCheck]:
    """Check every output of ``compiled`` against the finite-width program."""
    if len(set(widths)) < 2:
        raise ValueError("a convergence check needs at least two widths")
    if seeds < 2:
        raise ValueError("a convergence check needs at least two seeds")
    limits = compiled.limit(particles=particles, seed=seed, x=x)
    return judge(limits, finite_runs(compiled.graph, widths, seeds, seed, x, progress))


def format_report(checks: list[OutputCheck]) -> str:
    """Human-readable table per output."""
    lines = []
    for c in checks:
        lines.append(f"{c.name}: limit {c.limit:.6g} ± {c.limit_stderr:.2g}")
        lines.append(f"  {'width':>7} {'mean':>13} {'stderr':>10} {'error':>11} {'rms error':>10}")
        for n, m, s, r in zip(c.widths, c.means, c.stderrs, c.rms):
            lines.append(f"  {n:>7d} {m:>13.6g} {s:>10.2g} {m - c.limit:>11.3g} {r:>10.3g}")
        lines.append(f"  slope {c.slope:.3f} (theory -0.5); top-width z = {c.z_top:.2f}; {'PASS' if c.passed else 'FAIL'}: {c.reason}")
    return "\n".join(lines)


def plot(checks: list[OutputCheck], path: str, title: str = "") -> None:
    """Log-log plot of RMS error against width, with an n^{-1/2} guide."""
    from tpcompiler.plotting import figure, save

    fig, axes = figure(figsize=(6.4, 4.8))
    ax = axes[0, 0]
    for c in checks:
        rms = np.asarray(c.rms)
        if np.all(rms <= 0):
            continue
        ax.loglog(c.widths, np.where(rms > 0, rms, np.nan), "o-", label=f"{c.name} (slope {c.slope:.2f})")
    widths = np.asarray(checks[0].widths, dtype=float) if checks else np.array([1.0, 2.0])
    ref = max((c.rms[0] for c in checks if c.rms[0] > 0), default=1.0)
    ax.loglog(widths, ref * (widths / widths[0]) ** -0.5, "k--", label=r"$n^{-1/2}$")
    ax.set_xticks(widths)
    ax.set_xticklabels([f"{int(w)}" for w in widths])
    ax.minorticks_off()
    ax.set_xlabel("width n")
    ax.set_ylabel("RMS error to the limit over seeds")
    ax.set_title(title or "finite width vs infinite-width limit")
    ax.legend(fontsize="small")
    fig.tight_layout()
    save(fig, path, dpi=120)
