"""Paired comparisons of two models scored on the same items (docs/experiments.md, the MAML and
MNIST sections):

    python experiments/paired.py maml A.json B.json      # maml_mnist.py results: the same meta-test tasks
    python experiments/paired.py mnist A.json B.json     # mnist_features.py results: the same scored digits

Two models scored on the same tasks or digits make correlated errors, so comparing their two
accuracies as independent means overstates the noise of the difference.  Here each item is
compared with itself:

* maml: per meta-test task, d = (correct queries of A - of B) / queries.  The mean of d is the
  difference of the two accuracies; its standard error is std(d) / sqrt(tasks) (the tasks are
  drawn independently), z = mean / standard error.  The sign test counts the tasks where A does
  better and where B does (ties dropped) and gives the exact two-sided binomial p-value of that
  split under "equally good".
* mnist: McNemar's exact test: b digits that A gets right and B wrong, c the reverse; under
  "equally good" b is Binomial(b + c, 1/2), two-sided exact p-value.

Both read only the JSON results (``correct_1step`` / ``correct_20step`` of maml_mnist.py,
``predicted`` of mnist_features.py, whose labels are the script's own split).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.stats

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Paired:
    """A paired comparison of A against B over n items: ``difference`` = mean(A - B) (in the
    items' unit: accuracy), its ``stderr`` and ``z``; ``better``/``worse`` the items where A
    scores above / below B; ``p`` the exact two-sided sign (binomial) test of better vs worse."""

    n: int
    difference: float
    stderr: float
    z: float
    better: int
    worse: int
    p: float


def sign_test(better: int, worse: int) -> float:
    """Exact two-sided p-value of ``better`` successes in ``better + worse`` fair coin flips (1.0
    when there is no discordant item)."""
    n = better + worse
    return 1.0 if n == 0 else float(scipy.stats.binomtest(better, n, 0.5).pvalue)


def paired(a, b, scale: float = 1.0) -> Paired:
    """Per-item scores ``a`` and ``b`` (same items, same order) compared pairwise; differences
    are divided by ``scale`` (maml: the queries per task, so the difference is in accuracy)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"paired: expected two equally long lists of per-item scores (2 or more), got shapes "
                         f"{a.shape} and {b.shape}")
    d = (a - b) / scale
    mean = float(d.mean())
    stderr = float(d.std(ddof=1) / math.sqrt(d.size))
    z = mean / stderr if stderr > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    better, worse = int((d > 0).sum()), int((d < 0).sum())
    return Paired(d.size, mean, stderr, z, better, worse, sign_test(better, worse))


def mcnemar(right_a, right_b) -> Paired:
    """McNemar's exact test from per-item correctness (booleans) of A and B: ``better`` = b (A
    right, B wrong), ``worse`` = c, p the exact binomial p-value; the difference of the accuracies
    with its paired standard error."""
    return paired(np.asarray(right_a, dtype=bool).astype(float), np.asarray(right_b, dtype=bool).astype(float))


def _load(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"paired.py: error: {path}: cannot read a JSON result ({exc})") from None


def _script(name: str):
    """The experiment script ``name`` (experiments/NAME.py) as a module."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # (its dataclasses look it up there)
    spec.loader.exec_module(module)
    return module


def _needs(result: dict, keys: tuple, path: str) -> None:
    missing = [k for k in keys if k not in result]
    if missing:
        raise SystemExit(f"paired.py: error: {path}: has no {', '.join(missing)} (a result written before the "
                         "per-item fields were kept: run it again)")


def compare(kind: str, path_a: str, path_b: str) -> dict[str, Paired]:
    """{what: Paired} of the results at ``path_a`` against ``path_b`` (module docstring)."""
    a, b = _load(path_a), _load(path_b)
    if kind == "maml":
        keys = ("correct_1step", "correct_20step")
        _needs(a, keys, path_a)
        _needs(b, keys, path_b)
        if len(a["correct_1step"]) != len(b["correct_1step"]):
            raise SystemExit(f"paired.py: error: {path_a} scored {len(a['correct_1step'])} tasks, {path_b} "
                             f"{len(b['correct_1step'])}: compare runs on the same meta-test tasks (--test-tasks)")
        mm = _script("maml_mnist")
        queries = mm.WAYS * mm.QUERIES  # per task
        return {f"after {k[len('correct_'):-len('step')]} step(s)": paired(a[k], b[k], scale=queries) for k in keys}
    _needs(a, ("predicted", "split"), path_a)
    _needs(b, ("predicted", "split"), path_b)
    if a["split"] != b["split"]:
        raise SystemExit(f"paired.py: error: {path_a} scored the {a['split']} split, {path_b} the {b['split']} one")
    labels = np.asarray(_script("mnist_features").make_split(a["split"])[3])
    for path, r in ((path_a, a), (path_b, b)):
        if len(r["predicted"]) != len(labels):
            raise SystemExit(f"paired.py: error: {path}: has {len(r['predicted'])} predictions, but the "
                             f"{a['split']} split scores {len(labels)} digits")
    return {"digits": mcnemar(np.equal(a["predicted"], labels), np.equal(b["predicted"], labels))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="paired.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("maml", "mnist"))
    ap.add_argument("a", help="result of model A (JSON)")
    ap.add_argument("b", help="result of model B (JSON)")
    args = ap.parse_args(argv)
    for what, r in compare(args.kind, args.a, args.b).items():
        print(f"{what}: A - B = {r.difference:+.4f} (paired s.e. {r.stderr:.4f}, z = {r.z:+.2f}) over {r.n} items; "
              f"A better on {r.better}, B better on {r.worse}, sign test p = {r.p:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
