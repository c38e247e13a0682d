"""The experiments run end to end as a user runs them (issue 9, "Done means": from the README's
install on a fresh machine): each script in a fresh interpreter at a tiny size, writing the JSON
fields its docstring and the issue promise.  The full protocols are in docs/experiments.md."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, tmp_path: Path, **env_vars: str) -> dict:
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **env_vars)
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args, "--json", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("width", ["inf", "8"])
def test_maml_mnist_runs_end_to_end(tmp_path, width):
    r = _run("maml_mnist.py", "--width", width, "--seed", "1", "--meta-steps", "2", "--test-tasks", "5",
             tmp_path=tmp_path)
    assert {"width", "seed", "accuracy_1step", "accuracy_20step", "tasks", "seconds"} <= set(r)
    assert str(r["width"]) == width and r["seed"] == 1 and r["tasks"] == 5 and r["meta_steps"] == 2
    # 5 tasks x 5 queries: accuracies are multiples of 1/25
    for key in ("accuracy_1step", "accuracy_20step"):
        assert 0.0 <= r[key] <= 1.0 and abs(r[key] * 25 - round(r[key] * 25)) < 1e-9, r
    # per task, the correct queries of 5 (paired comparisons across runs): their mean is the accuracy
    for steps in (1, 20):
        per_task = r[f"correct_{steps}step"]
        assert len(per_task) == 5 and all(0 <= c <= 5 for c in per_task)
        assert sum(per_task) / 25 == pytest.approx(r[f"accuracy_{steps}step"], abs=1e-12)


def test_word2vec_tp4_runs_end_to_end(tmp_path):
    r = _run("word2vec_tp4.py", "--width", "16", "--epochs", "1", "--seed", "0", "--max-steps", "20",
             tmp_path=tmp_path)
    assert {"width", "epochs", "seed", "vocab", "correct", "total", "accuracy", "seconds"} <= set(r)
    assert r["vocab"] == 9044 and r["steps"] == 20 and r["complete"] is False   # the V; a shortened run says so
    assert 0 < r["total"] <= r["questions_in_file"]
    assert abs(r["accuracy"] - 100.0 * r["correct"] / r["total"]) < 1e-9


def test_word2vec_gensim_scale_runs_on_the_same_vocabulary_and_questions(tmp_path):
    """The gensim CBOW of docs/experiments.md's word2vec reading (a point of scale): its
    vocabulary must be word2vec_tp4's (the script refuses otherwise) and it answers the same
    3,822 questions; seeded without PYTHONHASHSEED, so two runs agree."""
    r = _run("word2vec_gensim.py", "--epochs", "1", "--seed", "3", tmp_path=tmp_path, PYTHONHASHSEED="1")
    assert r["vocab"] == 9044 and r["total"] == 3822 and r["epochs"] == 1 and r["seed"] == 3
    again = _run("word2vec_gensim.py", "--epochs", "1", "--seed", "3", tmp_path=tmp_path, PYTHONHASHSEED="2")
    assert again["vectors_checksum"] == r["vectors_checksum"] and again["correct"] == r["correct"]


@pytest.mark.parametrize("args", [
    ("--model", "ntk", "--ridge", "1e-6"),                                # kernel regression
    ("--model", "pi-finite", "--width", "16", "--r", "8", "--epochs", "1"),  # an SGD model, shortened
])
def test_mnist_features_runs_end_to_end_and_keeps_every_prediction(tmp_path, args):
    """mnist_features.py on the validation split (fit 3000 digits, score 1000): the JSON's
    accuracy is the percentage of its per-digit predictions that equal the split's labels (read
    from the script's own split), so models can be compared digit by digit."""
    r = _run("mnist_features.py", *args, "--split", "validation", tmp_path=tmp_path)
    assert {"model", "width", "r", "phi", "seed", "accuracy", "predicted", "split", "seconds", "peak_mb"} <= set(r)
    labels = _script("mnist_features").make_split("validation")[3]
    assert len(r["predicted"]) == len(labels) == 1000 and set(r["predicted"]) <= set(range(10))
    assert r["accuracy"] == pytest.approx(100.0 * sum(p == y for p, y in zip(r["predicted"], labels)) / 1000, abs=0.005)


def _script(name: str):
    """experiments/NAME.py as a module (registered, as its dataclasses need)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_comparisons_by_hand():
    """experiments/paired.py against numbers worked out by hand: per-task differences (mean,
    standard error std/sqrt(n), counts) and McNemar's exact p-value, 2 P(X >= 9), X ~ Bin(10, 1/2),
    = 2 * 11 / 1024."""
    pm = _script("paired")
    r = pm.paired([5, 3, 2, 4], [4, 3, 4, 4], scale=5)     # d = 0.2, 0, -0.4, 0
    assert r.n == 4 and r.difference == pytest.approx(-0.05)
    assert r.stderr == pytest.approx(((0.25**2 + 0.05**2 + 0.35**2 + 0.05**2) / 3) ** 0.5 / 2)
    assert (r.better, r.worse, r.p) == (1, 1, 1.0)
    right_a = [True] * 9 + [False] + [True] * 90
    right_b = [False] * 9 + [True] + [True] * 90
    m = pm.mcnemar(right_a, right_b)
    assert (m.better, m.worse) == (9, 1) and m.p == pytest.approx(22 / 1024, rel=1e-12)
    assert m.difference == pytest.approx(0.08)
    with pytest.raises(ValueError, match="equally long"):
        pm.paired([1, 2, 3], [1, 2])


def test_paired_reads_maml_results_and_refuses_old_ones(tmp_path):
    """The maml comparison reads the per-task counts of two results (5 queries per task); a
    result written before they were kept is one line naming the file, not a traceback."""
    a, b, old = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "old.json"
    a.write_text(json.dumps({"tasks": 3, "correct_1step": [5, 0, 1], "correct_20step": [5, 5, 5]}))
    b.write_text(json.dumps({"tasks": 3, "correct_1step": [0, 0, 1], "correct_20step": [5, 5, 5]}))
    old.write_text(json.dumps({"tasks": 3, "accuracy_1step": 0.4, "accuracy_20step": 0.5}))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "paired.py"), "maml", str(a), str(b)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first.startswith("after 1 step(s): A - B = +0.3333") and "A better on 1, B better on 0" in first
    assert second.startswith("after 20 step(s): A - B = +0.0000") and "sign test p = 1" in second
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "paired.py"), "maml", str(old), str(b)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert "old.json: has no correct_1step, correct_20step" in proc.stderr
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps({"tasks": 2, "correct_1step": [5, 0], "correct_20step": [5, 5]}))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "paired.py"), "maml", str(a), str(fewer)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "scored 3 tasks" in proc.stderr
