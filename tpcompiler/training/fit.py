"""Training loops over the step engine: learning-rate schedules, batches from arrays or an
iterator, evaluation every k steps, checkpoints and a progress bar (docs/DESIGN.md 2.9).

The loop means the same at every width: ``fit`` only calls ``StepEngine.step`` /
``predict`` / ``save``, so a finite-width engine and a limit engine given the same data and
schedule run the same training.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from tpcompiler import progress as bars, validation
from tpcompiler.training.finite import batch_indices

#: The largest number of steps of tp.fit, and of tp.SGD (training/sgd.py reads it): every step is kept.
MAX_STEPS = 1_000_000
STEPS_WHY = "every step is kept in the returned trajectory"

SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class Schedule:
    """A learning rate per step t (0-based): ``constant`` eta, or ``linear`` from ``start`` at
    t = 0 to ``end`` at t = ``steps`` (and ``end`` after), never below ``floor``."""

    kind: str
    start: float
    end: float = 0.0
    steps: int = 1
    floor: float = 0.0

    def __call__(self, t: int) -> float:
        if self.kind == "constant":
            return self.start
        frac = min(max(t, 0) / self.steps, 1.0)
        return max(self.start + (self.end - self.start) * frac, self.floor)


def constant(eta: float) -> Schedule:
    """eta at every step."""
    return Schedule("constant", validation.number(eta, "lr"))


def linear(start: float, end: float, steps: int, floor: float = 0.0) -> Schedule:
    """start -> end linearly over ``steps`` steps, at least ``floor`` (word2vec's alpha decay)."""
    return Schedule("linear", validation.number(start, "lr", nonnegative=True), validation.number(end, "lr_end", nonnegative=True),
                    validation.count(steps, "steps", minimum=1), validation.number(floor, "floor", nonnegative=True))


def schedule(lr) -> Callable[[int], float]:
    """A learning rate given as a number, a Schedule, a callable t -> eta or a name
    ("constant:ETA", "linear:START:END:STEPS")."""
    if isinstance(lr, Schedule) or callable(lr):
        return lr
    if isinstance(lr, str):
        kind, _, rest = lr.partition(":")
        parts = rest.split(":") if rest else []
        try:
            if kind == "constant" and len(parts) == 1:
                return constant(float(parts[0]))
            if kind == "linear" and len(parts) == 3:
                return linear(float(parts[0]), float(parts[1]), int(parts[2]))
        except ValueError:
            pass
        raise validation.ArgumentError(f"lr: unknown schedule {lr!r}; use a number, 'constant:ETA' or "
                                       f"'linear:START:END:STEPS' ({', '.join(SCHEDULES)})")
    return constant(lr)


@dataclass
class History:
    """What ``fit`` recorded: the steps at which it evaluated, f (and its standard error) on
    the training inputs (array data only) and on X_eval at those steps, the loss of every step
    (mean over replicas) and the wall time."""

    steps: list = field(default_factory=list)
    f_train: list = field(default_factory=list)
    f_train_stderr: list = field(default_factory=list)
    f_eval: list = field(default_factory=list)
    f_eval_stderr: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    seconds: float = 0.0

    def arrays(self) -> dict:
        out = {"steps": np.array(self.steps, dtype=np.int64), "loss": np.array(self.loss)}
        for name in ("f_train", "f_train_stderr", "f_eval", "f_eval_stderr"):
            vals = getattr(self, name)
            if vals:
                out[name] = np.array(vals)
        return out


def _batches(X, Y, batch, steps: int, start: int = 0):
    """(X_b, Y_b, None) per step t = start, ..., start + steps - 1: the cyclic schedule of
    ``finite.batch_indices``."""
    N = X.shape[0]
    for t in range(start, start + steps):
        idx = batch_indices(N, batch, t)
        yield X[idx], Y[idx], None


def fit(engine, X, Y=None, *, steps: int | None = None, lr=0.1, batch: int | None = None,
        eval_every: int | None = None, X_eval=None, progress: bool | None = None,
        checkpoint: str | None = None, checkpoint_every: int | None = None) -> History:
    """Train ``engine`` for ``steps`` SGD steps with learning rate ``lr`` (number, Schedule or
    callable step -> eta).

    Data: arrays X (N, d), Y (N, K) with cyclic batches of size ``batch`` (None: full batch),
    or an iterable X of (X_b, Y_b) or (X_b, Y_b, outputs) tuples (Y None; stops when the
    iterable or ``steps`` ends).  With ``eval_every`` k, f is evaluated at steps 0, k, 2k, ...
    and after the last step, on the training inputs (array data) and on ``X_eval``.  With
    ``checkpoint`` the state is saved there every ``checkpoint_every`` steps and at the end.

    An engine that has taken steps already (``steps_done``: one resumed from a checkpoint)
    continues its run: its next step is step t = steps_done of the schedule and of the batch
    cycle, and f is recorded at the run's steps (steps_done, then multiples of ``eval_every``).
    A resume that restarted them at 0 trained another run than the one it continued."""
    rate = schedule(lr)
    arrays = Y is not None
    t0 = getattr(engine, "steps_done", 0)  # (a resumed engine's run goes on from its step)
    if arrays:
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        if Y.ndim == 1:
            Y = Y[:, None]
        if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
            raise validation.ArgumentError(f"X, Y: need N x d inputs and N x K targets with the same N, got {X.shape} and {Y.shape}")
        if steps is None:
            raise validation.ArgumentError("steps: give the number of SGD steps")
        steps = validation.count(steps, "steps", maximum=MAX_STEPS, why=STEPS_WHY)
        batch = validation.optional_count(batch, "batch", minimum=1)
        if batch is not None and batch > X.shape[0]:
            raise validation.ArgumentError(f"batch: {batch} is larger than the training set (N = {X.shape[0]})")
        data: Iterable = _batches(X, Y, batch, steps, t0)
    else:
        data = X
        steps = None if steps is None else validation.count(steps, "steps")
    eval_every = validation.optional_count(eval_every, "eval_every", minimum=1)
    checkpoint_every = validation.optional_count(checkpoint_every, "checkpoint_every", minimum=1)
    if X_eval is not None and not eval_every:
        raise validation.ArgumentError("X_eval: f is evaluated on it only at the steps eval_every gives; pass eval_every=k "
                                       "(every k steps and after the last), or drop X_eval")
    if checkpoint_every and not checkpoint:
        raise validation.ArgumentError("checkpoint_every: no checkpoint file to save to; pass checkpoint=PATH too")
    history = History()
    start = time.perf_counter()

    def evaluate(t: int) -> None:
        history.steps.append(t)
        if arrays:
            m, e = engine.predict(X)
            history.f_train.append(m)
            history.f_train_stderr.append(e)
        if X_eval is not None:
            m, e = engine.predict(X_eval)
            history.f_eval.append(m)
            history.f_eval_stderr.append(e)

    if arrays:
        B = X.shape[0] if batch is None else batch
        engine.reserve(steps * B)
    t = t0
    # a bar on a terminal (tpcompiler.progress); ``progress`` True/False forces it on/off
    with bars.bar(steps, f"train ({engine.method})", unit="step", enabled=progress) as bar:
        if eval_every:
            evaluate(t0)
        for item in data:
            if steps is not None and t >= t0 + steps:
                break
            if not isinstance(item, tuple) or len(item) not in (2, 3):
                raise validation.ArgumentError(f"data: step {t - t0} yielded {type(item).__name__}; yield (X, Y) or (X, Y, outputs)")
            Xb, Yb, *rest = item
            loss = engine.step(Xb, Yb, rate(t), outputs=rest[0] if rest else None)
            history.loss.append(float(np.mean(loss)))
            t += 1
            bar.update(1)
            if eval_every and t % eval_every == 0:
                evaluate(t)
            if checkpoint and checkpoint_every and t % checkpoint_every == 0:
                engine.save(checkpoint)
        if eval_every and (not history.steps or history.steps[-1] != t):
            evaluate(t)
    if checkpoint:
        engine.save(checkpoint)
    history.seconds = time.perf_counter() - start
    return history
