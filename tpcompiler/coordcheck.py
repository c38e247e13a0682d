"""Coordinate check in the style of microsoft/mup: how the size of every layer's coordinates,
and their change over the first SGD steps, scales with width under a parametrization.

For each parametrization and width n the finite network of a program (the step engine's
finite method, ``tp.StepEngine(net, abc, method="finite", width=n, seeds=K)``: K networks in
lockstep, docs/DESIGN.md 2.6 and 2.9) is trained for T full-batch SGD steps on a probe batch
(X, Y); at every step t = 0..T we read every vector of the forward pass on X and the output f,
and record

* size_t   = mean over seeds, examples and coordinates of |x_t|   (t = 0: at initialization),
* change_t = mean over seeds, examples and coordinates of |x_t - x_0|   (t >= 1),

then fit, per layer and step, the growth exponent: the least-squares slope of log(value)
against log(n).  The abc theory (docs/DESIGN.md 2.4) predicts them.  The backward vectors
df/dh^l have coordinates of order n^{-(a_{L+1} + b_{L+1})}, so the first SGD step moves

* the first layer's pre-activation by n^{-c - 2 a_1 - (a_{L+1} + b_{L+1})},
* a hidden layer l's pre-activation by n^{1 - c - 2 a_l - (a_{L+1} + b_{L+1})} (its rank-one
  update read along the n coordinates of its input), plus what it inherits from layer l - 1
  through W_0 and through the update read along the input's own change,
* the output f by n^{1 - c - 2 a_{L+1}} through the readout's update (and by the terms
  v_0 . dx^L and dv . dx^L).

muP (a = (-1/2, 0, .., 1/2), b = 1/2, c = 0): every exponent is 0, every layer and f move by
Theta(1) at every step.  NTP (the kernel regime): every layer moves by n^{-1/2}, f by
Theta(1).  SP with a constant learning rate (a = 0, b = (0, 1/2, ..), c = 0): the first layer
moves by n^{-1/2}, the second by n^{+1/2}, and f by n through dv . x^L_0; when the layers'
changes have a nonzero mean (relu: phi(h + dh) - phi(h) has mean of order |dh|) the cross terms
grow faster still (with L = 2, dv . dx^2 ~ n^{3/2}), and after the first step f = O(n) makes
the loss derivative grow too, so later steps blow up further.  At initialization every layer
has Theta(1) coordinates under all three; f_0 is Theta(1) under SP and NTP and n^{-1/2}
under muP (docs/DESIGN.md 2.8).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from tpcompiler import progress, validation
from tpcompiler.check import fit_slope
from tpcompiler.ir.graph import ProgramError
from tpcompiler.training.parametrization import ABC, resolve

DEFAULT_WIDTHS = (64, 128, 256, 512, 1024)
DEFAULT_PARAMS = ("mup", "sp")
DEFAULT_STEPS = 3
DEFAULT_SEEDS = 8
DEFAULT_LR = 0.1
DEFAULT_BATCH = 4
#: Most SGD steps a coordinate check takes (it is about the first steps).
MAX_STEPS = 100
#: Growth of the smallest width's coordinates over their size at initialization beyond which the
#: report says the learning rate blows every width up (``CoordCheck.blown_up``)
BLOWN_UP = 1e6


@dataclass
class CoordCheck:
    """Measurements of ``coordcheck`` (module docstring).  Per parametrization label:
    ``size[label]`` (widths, T+1, layers) and ``change[label]`` (widths, T, layers), NaN after a
    network diverged; ``size_slope[label]`` (T+1, layers) and ``change_slope[label]`` (T, layers)
    the fitted exponents; ``diverged[label]`` {width: first step whose output was not finite}."""

    program: str
    labels: list
    abcs: list
    widths: list
    layers: list
    steps: int
    seeds: int
    lr: float
    size: dict = field(default_factory=dict)
    change: dict = field(default_factory=dict)
    size_slope: dict = field(default_factory=dict)
    change_slope: dict = field(default_factory=dict)
    diverged: dict = field(default_factory=dict)

    def slope(self, label: str, layer: str, step: int) -> float:
        """The fitted exponent of the change of ``layer`` after ``step`` (>= 1), or of its size
        at initialization (``step`` = 0)."""
        if label not in self.size_slope:
            raise validation.ArgumentError(f"slope: no parametrization {label!r} was measured; labels {self.labels}")
        if layer not in self.layers:
            raise validation.ArgumentError(f"slope: no layer {layer!r}; layers {self.layers}")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= self.steps:
            raise validation.ArgumentError(f"slope: step must be an integer from 0 (initialization) to {self.steps}, "
                                           f"got {step!r}")
        j = self.layers.index(layer)
        return float(self.size_slope[label][0, j] if step == 0 else self.change_slope[label][step - 1, j])

    def to_dict(self) -> dict:
        """A JSON-ready dict (NaN as None)."""
        def clean(a):
            return [None if not np.isfinite(v) else float(v) for v in np.ravel(a)]

        params = {}
        for label, abc in zip(self.labels, self.abcs):
            size, change = self.size[label], self.change[label]
            params[label] = {
                "abc": str(abc),
                "size": {layer: {"values": [clean(size[:, t, j]) for t in range(self.steps + 1)],
                                 "slopes": clean(self.size_slope[label][:, j])} for j, layer in enumerate(self.layers)},
                "change": {layer: {"values": [clean(change[:, t, j]) for t in range(self.steps)],
                                   "slopes": clean(self.change_slope[label][:, j])} for j, layer in enumerate(self.layers)},
                "diverged": {str(n): t for n, t in self.diverged[label].items()},
                "blown_up": None if (b := self.blown_up(label)) is None else dict(zip(("growth", "step", "layer"), b)),
            }
        return {"program": self.program, "widths": list(self.widths), "steps": self.steps, "seeds": self.seeds,
                "lr": self.lr, "layers": list(self.layers),
                "statistic": "mean |coordinate| (size: at step t; change: |x_t - x_0|), over seeds, examples, coordinates",
                "params": params}

    def blown_up(self, label: str):
        """(growth, step, layer) where the coordinates of the smallest width first grew more than
        BLOWN_UP times their size at initialization (a layer that starts at 0, such as a readout
        declared with var=0: the largest initial size of any layer), or None.  Such a learning
        rate blows up every width measured, and the exponents (the blow-up's own scaling, often
        near 0) would otherwise read as those of a stable parametrization."""
        size = self.size[label][0]  # (steps + 1, layers) at the smallest width
        init = np.where(size[0] > 0, size[0], np.nanmax(size[0]))
        with np.errstate(divide="ignore", invalid="ignore"):
            growth = np.where(init > 0, size / init, np.nan)
        for t in range(1, size.shape[0]):
            j = int(np.nanargmax(growth[t])) if np.any(np.isfinite(growth[t])) else None
            if j is not None and growth[t, j] > BLOWN_UP:
                return float(growth[t, j]), t, self.layers[j]
        return None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    def report(self) -> str:
        """Per parametrization, a table of fitted exponents: the size at init and the change
        after each step, per layer."""
        lines = [f"coordinate check of {self.program}: widths {','.join(map(str, self.widths))}, "
                 f"{self.seeds} seeds, lr {self.lr:g}; growth exponents (log-log slope against width)"]
        head = ["layer", "init size"] + [f"change@{t}" for t in range(1, self.steps + 1)]
        for label, abc in zip(self.labels, self.abcs):
            lines.append(f"{label} ({abc}):")
            lines.append("  " + "".join(f"{h:>11}" for h in head))
            for j, layer in enumerate(self.layers):
                vals = [self.size_slope[label][0, j]] + list(self.change_slope[label][:, j])
                measured = [self.size[label][:, 0, j]] + [self.change[label][:, t, j] for t in range(self.steps)]
                lines.append("  " + f"{layer:>11}" + "".join(_cell(v, m) for v, m in zip(vals, measured)))
            for n, t in sorted(self.diverged[label].items()):
                lines.append(f"  width {n}: diverged at step {t} (non-finite output); later steps are omitted")
            blown = self.blown_up(label)
            if blown is not None:
                growth, t, layer = blown
                lines.append(f"  width {self.widths[0]}: {layer}'s coordinates grew {growth:.2g} times by step {t}: the "
                             f"learning rate blows up even the smallest width, so the exponents describe that blow-up; "
                             f"try a smaller lr")
        lines.append("(none: exactly 0 at every width, so no exponent; n/a: a width diverged)")
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """One figure: a column per parametrization, a row per step (row 0: size at init;
        row t: change after step t), mean |coordinate| against width on log-log axes with one
        line per layer; rows share their y axis so a parametrization that blows up stands out."""
        import matplotlib

        from tpcompiler.plotting import figure, save

        rows, cols = self.steps + 1, len(self.labels)
        fig, axes = figure(rows, cols, figsize=(4.4 * cols, 3.0 * rows), sharey="row")
        widths = np.asarray(self.widths, dtype=float)
        colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(self.layers)))
        for c, label in enumerate(self.labels):
            for t in range(rows):
                ax = axes[t, c]
                values = self.size[label][:, 0, :] if t == 0 else self.change[label][:, t - 1, :]
                slopes = self.size_slope[label][0] if t == 0 else self.change_slope[label][t - 1]
                drawn = 0
                for j, layer in enumerate(self.layers):
                    y = np.where(values[:, j] > 0, values[:, j], np.nan)
                    if np.all(np.isnan(y)):
                        continue
                    ax.loglog(widths, y, "o-", ms=3, color=colors[j], label=f"{layer} ({slopes[j]:+.2f})")
                    drawn += 1
                ax.set_xscale("log")
                if drawn:
                    ax.legend(fontsize="xx-small", title="layer (slope)", title_fontsize="xx-small")
                else:
                    ax.text(0.5, 0.5, "diverged (non-finite output)", transform=ax.transAxes, ha="center")
                ax.set_xticks(widths)
                ax.set_xticklabels([str(int(w)) for w in widths], fontsize="x-small")
                ax.minorticks_off()
                ax.set_title(f"{label}: " + ("|x| at init" if t == 0 else f"|x_{t} - x_0| after step {t}"), fontsize="small")
                if c == 0:
                    ax.set_ylabel("mean |coordinate|")
                if t == rows - 1:
                    ax.set_xlabel("width n")
        fig.suptitle(f"coordinate check: {self.program} (lr {self.lr:g}, {self.seeds} seeds)")
        fig.tight_layout()
        save(fig, path)


def check_widths(widths) -> list[int]:
    """Widths as a list of at least two strictly increasing positive integers."""
    try:
        out = [validation.count(w, None, minimum=1) for w in widths]
    except TypeError:
        raise validation.ArgumentError(f"widths: expected a list of integers, got {widths!r}") from None
    if len(out) < 2 or any(b <= a for a, b in zip(out, out[1:])):
        raise validation.ArgumentError(f"widths: need at least two strictly increasing integers, got {out}")
    return out


def probe_data(d: int, K: int, loss: str, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A reproducible probe batch: X (batch, d) iid N(0, 1); targets fitting the loss (mse:
    +-3 with random signs, large next to f_0 = O(1), so that the loss derivative f_0 - y, and
    with it the size of the first step, varies little between seeds and the fitted slopes are
    steady; logistic: 0/1; softmax: one-hot)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, d))
    if loss == "logistic":
        return X, rng.integers(0, 2, (batch, K)).astype(float)
    if loss == "softmax":
        return X, np.eye(K)[rng.integers(0, K, batch)]
    return X, 3.0 * rng.choice([-1.0, 1.0], (batch, K))


def _measure(net, abc: ABC, width: int, X, Y, steps: int, seeds: int, lr: float, loss: str, seed: int):
    """(size (T+1, layers), change (T, layers), layer names, first diverged step or None) at one width."""
    from tpcompiler.training.engine import StepEngine

    eng = StepEngine(net, abc, method="finite", width=width, seeds=seeds, seed=seed, loss=loss)
    first = eng.activations(X)
    layers = list(first)
    size = np.full((steps + 1, len(layers)), np.nan)
    change = np.full((steps, len(layers)), np.nan)
    size[0] = [np.mean(np.abs(first[k])) for k in layers]
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, steps + 1):
            try:
                eng.step(X, Y, lr)
            except ProgramError as exc:
                if "not finite" in str(exc):
                    return size, change, layers, t
                raise
            now = eng.activations(X)
            if not all(np.all(np.isfinite(now[k])) for k in layers):
                return size, change, layers, t
            size[t] = [np.mean(np.abs(now[k])) for k in layers]
            change[t - 1] = [np.mean(np.abs(now[k] - first[k])) for k in layers]
    return size, change, layers, None


def coordcheck(net, params=DEFAULT_PARAMS, widths=DEFAULT_WIDTHS, *, steps: int = DEFAULT_STEPS,
               seeds: int = DEFAULT_SEEDS, lr: float = DEFAULT_LR, X=None, Y=None, loss: str = "mse",
               batch: int = DEFAULT_BATCH, seed: int = 0, progress_bar: bool | None = None) -> CoordCheck:
    """Coordinate check of the network template ``net`` (a tp.Program with a readout) under each
    parametrization in ``params`` (names such as "mup", "sp", "ntp", "a=..;b=..;c=.." strings or
    ABC objects), at ``widths``, over ``steps`` full-batch SGD steps with learning rate ``lr``
    on the probe batch (X, Y) (default: ``probe_data``), ``seeds`` networks per width.
    Returns the measurements and fitted exponents (module docstring)."""
    from tpcompiler.compiler import graph_of
    from tpcompiler.training.step import derive_step

    graph = graph_of(net)
    widths = check_widths(widths)
    steps = validation.count(steps, "steps", minimum=1, maximum=MAX_STEPS,
                             why="a coordinate check looks at the first steps")
    seeds = validation.count(seeds, "seeds", minimum=1)
    lr = validation.number(lr, "lr", positive=True)
    batch = validation.count(batch, "batch", minimum=1)
    seed = validation.count(seed, "seed")
    if isinstance(params, (str, ABC)):
        params = [params]
    if not params:
        raise validation.ArgumentError("params: give at least one parametrization (e.g. mup, sp)")
    abcs = [resolve(p, graph) for p in params]
    labels = [p if isinstance(p, str) else str(p) for p in params]
    if len(set(labels)) != len(labels):
        raise validation.ArgumentError(f"params: {labels} names a parametrization twice")
    sp_ = derive_step(graph, abcs[0], loss)
    if X is None:
        X, Y0 = probe_data(sp_.d, sp_.K, loss, batch, seed)
        Y = Y0 if Y is None else Y
    elif Y is None:
        raise validation.ArgumentError("Y: give targets with X (or neither, for the default probe batch)")
    X = validation.array(X, "X", ndim=2, min_rows=1)
    Y = validation.array(Y, "Y")
    if Y.ndim == 0 or Y.shape[0] != X.shape[0]:
        raise validation.ArgumentError(f"Y: need one row of targets per row of X ({X.shape[0]}), got shape {Y.shape}")
    Y = np.asarray(Y, dtype=np.float64).reshape(X.shape[0], -1)
    result = CoordCheck(graph.name, labels, abcs, widths, [], steps, seeds, lr)
    with progress.bar(len(abcs) * len(widths), "coordcheck", unit="width", enabled=progress_bar) as bar:
        for label, abc in zip(labels, abcs):
            sizes, changes, result.diverged[label] = [], [], {}
            for n in widths:
                bar.set_postfix_str(f"{label} n={n}", refresh=False)
                size, change, layers, bad = _measure(graph, abc, n, X, Y, steps, seeds, lr, loss, seed)
                if bad is not None:
                    result.diverged[label][n] = bad
                sizes.append(size)
                changes.append(change)
                result.layers = layers
                bar.update(1)
            result.size[label] = np.array(sizes)
            result.change[label] = np.array(changes)
            result.size_slope[label] = _slopes(widths, result.size[label])
            result.change_slope[label] = _slopes(widths, result.change[label])
    return result


def _cell(slope: float, values: np.ndarray) -> str:
    """A report's cell: the fitted exponent, "none" where the values are exactly 0 at every
    width (a vector that does not move: no exponent), "n/a" where a width diverged."""
    if np.isfinite(slope):
        return f"{slope:>+11.2f}"
    return f"{'none' if np.all(values == 0) else 'n/a':>11}"


def _slopes(widths, values: np.ndarray) -> np.ndarray:
    """Fitted exponent per (step, layer) of values (widths, steps, layers); NaN when a width
    diverged at that step (a slope over the remaining widths would mislead)."""
    W, T, J = values.shape
    out = np.full((T, J), np.nan)
    for t in range(T):
        for j in range(J):
            v = values[:, t, j]
            if np.all(np.isfinite(v)):
                out[t, j] = fit_slope(widths, v)
    return out
