"""Figures the ``tpc`` commands write (matplotlib, Agg backend: no display needed): the format
follows the file's suffix (.png or .svg).

* ``training_figure``: training trajectories of the infinite-width limit (``tp.train``) and of
  finite networks at several widths (the step engine's finite method, ``finite_trajectories``):
  the training loss and f on the first training inputs against the step;
* ``kernels_figure``: NNGP and NTK matrices as heat maps side by side;
* ``figure`` / ``save``: the common setup, also used by ``tp.coordcheck`` and ``tpc check``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from tpcompiler import validation

#: Formats a plot may be written in, by file suffix.
FORMATS = (".png", ".svg")
#: Training inputs whose f is drawn in the trajectory figure.
SHOWN_INPUTS = 3


def check_path(path: str) -> str:
    """``path`` if its suffix is a supported format (FORMATS), else an ArgumentError."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise validation.ArgumentError(f"plot: cannot write {path!r}: unsupported format {suffix or '(none)'!r}; "
                                       f"use a file name ending in {' or '.join(FORMATS)}")
    return path


def figure(rows: int = 1, cols: int = 1, **kwargs):
    """(fig, axes as a rows x cols array) on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, squeeze=False, **kwargs)


def save(fig, path: str, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` (format from its suffix) and release it."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(check_path(path), dpi=dpi)
    finally:
        plt.close(fig)


@dataclass
class Trajectory:
    """f on the training inputs at ``steps``: ``f`` (T', N, K) (mean over seeds at finite width)
    and its standard error, labelled for the legend."""

    label: str
    steps: np.ndarray
    f: np.ndarray
    stderr: np.ndarray


def finite_trajectories(net, abc, sgd, widths, seeds: int = 4, seed: int = 0) -> list[Trajectory]:
    """SGD of ``sgd`` (a tp.SGD) on the finite network of ``net`` under ``abc`` at each width:
    the step engine's finite method with ``seeds`` networks in lockstep (docs/DESIGN.md 2.6,
    2.9), recording f on the training inputs every ``sgd.eval_every`` steps."""
    from tpcompiler.compiler import graph_of
    from tpcompiler.training.engine import StepEngine
    from tpcompiler.training.fit import fit

    graph = graph_of(net)
    X = np.atleast_2d(np.asarray(sgd.X, dtype=np.float64))
    Y = np.asarray(sgd.Y, dtype=np.float64).reshape(X.shape[0], -1)
    out = []
    for n in widths:
        eng = StepEngine(graph, abc, method="finite", width=n, seeds=seeds, seed=seed, loss=sgd.loss,
                         weight_decay=sgd.weight_decay, clip=sgd.clip)
        hist = fit(eng, X, Y, steps=sgd.steps, lr=sgd.rate, batch=sgd.batch, eval_every=sgd.eval_every)
        out.append(Trajectory(f"width {n} ({seeds} seeds)", np.asarray(hist.steps), np.array(hist.f_train),
                              np.array(hist.f_train_stderr)))
    return out


def _loss(loss: str, f: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Mean training loss of f (T', N, K) against Y (N, K), per recorded step."""
    from tpcompiler.training.engine import loss_derivative

    return np.array([loss_derivative(loss, ft[None], Y)[1].mean() for ft in f])


def training_figure(path: str, Y, loss: str, trajectories: list[Trajectory], title: str = "") -> None:
    """Two panels: the training loss of f against the step (log scale when positive; for a
    finite width, the loss of its seeds' mean f, which converges to the limit's), and f on
    the first SHOWN_INPUTS training inputs (output 0), one line style per trajectory; the
    first trajectory (the limit) is drawn solid and black-edged."""
    Y = np.asarray(Y, dtype=np.float64)
    Y = Y.reshape(Y.shape[0], -1)
    fig, axes = figure(1, 2, figsize=(11, 4.2))
    ax_loss, ax_f = axes[0]
    colors = ["black"] + [f"C{i}" for i in range(len(trajectories))]
    shown = min(SHOWN_INPUTS, Y.shape[0])
    for i, tr in enumerate(trajectories):
        f = tr.f.reshape(tr.f.shape[0], tr.f.shape[1], -1)
        style = "-" if i == 0 else "--"
        ax_loss.plot(tr.steps, _loss(loss, f, Y), style, color=colors[i], label=tr.label)
        for j in range(shown):
            ax_f.plot(tr.steps, f[:, j, 0], style, color=colors[i], alpha=1.0 - 0.25 * j,
                      label=tr.label if j == 0 else None)
            if np.any(tr.stderr):
                err = tr.stderr.reshape(f.shape)[:, j, 0]
                ax_f.fill_between(tr.steps, f[:, j, 0] - err, f[:, j, 0] + err, color=colors[i], alpha=0.15)
    for j in range(shown):
        ax_f.axhline(Y[j, 0], color="grey", lw=0.6, ls=":")
    ax_loss.set_xlabel("step")
    # of the mean f over a width's seeds (what converges to the limit's curve), not the mean of
    # the seeds' own losses, which keeps their spread around the mean
    ax_loss.set_ylabel(f"training loss ({loss})\n(finite widths: of the mean f over seeds)", fontsize="small")
    if all(np.all(_loss(loss, t.f.reshape(t.f.shape[0], t.f.shape[1], -1), Y) > 0) for t in trajectories):
        ax_loss.set_yscale("log")
    ax_loss.legend(fontsize="small")
    ax_f.set_xlabel("step")
    ax_f.set_ylabel(f"f on training inputs 1..{shown} (dotted: targets)")
    ax_f.legend(fontsize="small")
    fig.suptitle(title or "training trajectories")
    fig.tight_layout()
    save(fig, path)


def kernels_figure(path: str, kernels: dict, title: str = "") -> None:
    """NNGP and NTK matrices k(X, X) as heat maps side by side, each with its colour bar."""
    names = [k for k in ("nngp", "ntk") if k in kernels]
    fig, axes = figure(1, len(names), figsize=(5.2 * len(names), 4.4))
    for ax, name in zip(axes[0], names):
        K = np.asarray(kernels[name])
        im = ax.imshow(K, cmap="viridis", interpolation="nearest")
        ax.set_title(f"{name.upper()} k(X, X), {K.shape[0]} x {K.shape[1]}")
        ax.set_xlabel("input j")
        ax.set_ylabel("input i")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or "infinite-width kernels")
    fig.tight_layout()
    save(fig, path)
