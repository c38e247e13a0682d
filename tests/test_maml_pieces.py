"""Pieces of TP4's few-shot MAML experiment (experiments/maml_mnist.py, programs/maml_linear.py):
the data classes and task sampler on small arrays, the kernel baselines, the program's kernels,
and an independent numpy implementation of TP4's width-n network (W1, b, W2, cross-entropy,
first-order MAML with clipping) that the step engine is checked against."""
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import tpcompiler as tp

ROOT = Path(__file__).resolve().parents[1]


def _module(rel, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


mm = _module("experiments/maml_mnist.py", "maml_mnist")
ml = _module("programs/maml_linear.py", "maml_linear")


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def small_digits(side=3, per_digit=5, digits=range(10), seed=0):
    """Pixels 0..255 of per_digit random side x side images per digit, digits interleaved."""
    rng = np.random.default_rng(seed)
    y = np.tile(np.array(list(digits)), per_digit)
    X = rng.integers(0, 256, size=(y.size, side * side)).astype(float)
    return X, y


def test_rotate_is_rot90_per_image():
    X = np.arange(2 * 9, dtype=float).reshape(2, 9)
    for k in range(4):
        got = mm.rotate(X, k, side=3)
        for i in range(2):
            np.testing.assert_array_equal(got[i].reshape(3, 3), np.rot90(X[i].reshape(3, 3), k))
    # 90 degrees counterclockwise: the top row becomes the left column read upwards
    np.testing.assert_array_equal(mm.rotate(X[:1], 1, side=3)[0].reshape(3, 3)[:, 0], [2, 1, 0])


def test_classes_split_and_normalization():
    X, y = small_digits(per_digit=5)
    data = mm.make_classes(X, y, train_per_digit=4, side=3)
    assert len(data.train) == 20 and len(data.val) == 20 and len(data.test) == 5
    assert data.train_names[:5] == [(0, 0), (0, 90), (0, 180), (0, 270), (1, 0)]
    assert data.test_names == [(5, 0), (6, 0), (7, 0), (8, 0), (9, 0)]
    assert all(c.shape == (4, 9) for c in data.train) and all(c.shape == (1, 9) for c in data.val)
    assert all(c.shape == (5, 9) for c in data.test)
    # the mean of the meta-training class images is removed from every image
    np.testing.assert_allclose(np.concatenate(data.train).mean(axis=0), 0, atol=1e-12)
    # class (digit 1, 90 degrees) = rot90 of digit 1's first 4 images / 255, minus the mean
    first = X[y == 1][:4] / 255
    np.testing.assert_allclose(data.train[5] + data.mean, mm.rotate(first, 1, side=3), atol=1e-12)
    # validation: the remaining image of each digit; test digits: all their images, unrotated
    np.testing.assert_allclose(data.val[4] + data.mean, X[y == 1][4:] / 255, atol=1e-12)
    np.testing.assert_allclose(data.test[2] + data.mean, X[y == 7] / 255, atol=1e-12)
    # the mean is that of all 4 rotations, so it is invariant under rotation
    np.testing.assert_allclose(mm.rotate(data.mean[None], 1, side=3)[0], data.mean, atol=1e-12)


def test_task_sampler():
    X, y = small_digits(per_digit=6)
    data = mm.make_classes(X, y, train_per_digit=4, side=3)
    rng = np.random.default_rng(3)
    for _ in range(50):
        t = mm.sample_task(data.train, rng)
        assert t.Xs.shape == (5, 9) and t.Xq.shape == (5, 9)
        assert t.ys.tolist() == [0, 1, 2, 3, 4] and t.yq.tolist() == [0, 1, 2, 3, 4]
        assert len(set(t.classes.tolist())) == 5 and all(0 <= c < 20 for c in t.classes)
        for i, (c, p) in enumerate(zip(t.classes, t.picks)):
            assert p[0] != p[1]  # support and query are different images
            np.testing.assert_array_equal(t.Xs[i], data.train[c][p[0]])
            np.testing.assert_array_equal(t.Xq[i], data.train[c][p[1]])
    # every class is drawn and the label order is random
    seen = np.array([mm.sample_task(data.train, rng).classes for _ in range(400)])
    assert set(seen.ravel().tolist()) == set(range(20))
    assert len({tuple(s) for s in seen}) > 300
    # reproducible from the seed
    a = mm.sample_tasks(data.train, np.random.default_rng(7), 3)
    b = mm.sample_tasks(data.train, np.random.default_rng(7), 3)
    for ta, tb in zip(a, b):
        np.testing.assert_array_equal(ta.classes, tb.classes)
        np.testing.assert_array_equal(ta.picks, tb.picks)


def test_meta_test_tasks_fixed_permutations_of_test_digits():
    X, y = small_digits(per_digit=6)
    data = mm.make_classes(X, y, train_per_digit=4, side=3)
    a, b = mm.test_tasks(data, count=30), mm.test_tasks(data, count=30)
    for ta, tb in zip(a, b):
        np.testing.assert_array_equal(ta.Xs, tb.Xs)
        np.testing.assert_array_equal(ta.Xq, tb.Xq)
        assert sorted(ta.classes.tolist()) == [0, 1, 2, 3, 4]


def test_meta_test_tasks_use_a_seed_of_their_own():
    X, y = small_digits(per_digit=6)
    data = mm.make_classes(X, y, train_per_digit=4, side=3)
    t = mm.test_tasks(data, count=1)[0]
    u = mm.sample_task(data.test, np.random.default_rng(mm.TEST_SEED))
    np.testing.assert_array_equal(t.picks, u.picks)


# ------------------------------------------------------------------------------------------
# kernel baselines
# ------------------------------------------------------------------------------------------
def test_kernel_adaptation_is_gradient_descent_of_a_linear_readout():
    """With Theta = Phi Phi^T, kernel gradient descent from f = 0 is GD of f = Phi w from w = 0."""
    rng = np.random.default_rng(1)
    T, B, Q, K, p, lr = 4, 5, 5, 5, 7, 0.9
    Ps, Pq = rng.normal(size=(T, B, p)), rng.normal(size=(T, Q, p))
    ys = np.array([rng.permutation(K) for _ in range(T)])
    yq = np.array([rng.permutation(K) for _ in range(T)])
    Kss, Kqs = Ps @ Ps.transpose(0, 2, 1), Pq @ Ps.transpose(0, 2, 1)
    got = mm.kernel_adaptation(Kss, Kqs, ys, yq, lr=lr, steps=6, report=(1, 6))
    want = {}
    w = np.zeros((T, p, K))
    for t in range(1, 7):
        F = Ps @ w
        P = np.exp(F) / np.exp(F).sum(-1, keepdims=True)
        w = w - lr * Ps.transpose(0, 2, 1) @ (P - np.eye(K)[ys]) / B   # mean cross-entropy
        if t in (1, 6):
            want[t] = ((Pq @ w).argmax(-1) == yq).sum(-1)   # correct queries per task
    assert set(got) == {1, 6}
    for t in (1, 6):
        np.testing.assert_array_equal(got[t], want[t])


def test_program_kernels_match_the_docstring():
    """NNGP = su^2 sv^2 xi.xi'/d, NTK = 2 su^2 sv^2 xi.xi'/d + alpha^2 sv^2 on xi = sqrt(d) x:
    the kernel backend (from the readout declaration) and the template's own outputs."""
    d, K, su, sv, alpha = 4, 3, 1.3, 0.25, 0.7
    X = np.random.default_rng(2).normal(size=(2, d))
    c = tp.compile(ml.build(d=d, K=K, sigma_u=su, sigma_v=sv, bias=True, bias_alpha=alpha))
    k = c.kernels(ml.engine_inputs(X))
    G = X @ X.T  # xi.xi'/d with xi = sqrt(d) x
    nngp, ntk = su**2 * sv**2 * G, 2 * su**2 * sv**2 * G + alpha**2 * sv**2
    np.testing.assert_allclose(k["nngp"], nngp, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(k["ntk"], ntk, rtol=1e-12, atol=1e-15)
    lim = c.limit(x=ml.engine_inputs(X))
    for i in range(2):
        for j in range(2):
            assert lim[f"nngp[{i},{j}]"][0] == pytest.approx(nngp[i, j], rel=1e-12)
            assert lim[f"ntk[{i},{j}]"][0] == pytest.approx(ntk[i, j], rel=1e-12)


def test_program_without_bias():
    X = np.random.default_rng(3).normal(size=(3, 5))
    k = tp.compile(ml.build(d=5, K=2, bias=False)).kernels(ml.engine_inputs(X))
    np.testing.assert_allclose(k["ntk"], 2 * k["nngp"], rtol=1e-12)
    assert "beta" not in ml.build(d=5, K=2, bias=False).graph.g


# ------------------------------------------------------------------------------------------
# TP4's width-n network in numpy (the oracle): f = W2 (W1 x + alpha b)
# ------------------------------------------------------------------------------------------
def tp4_init(n, d, K, su, sv, rng):
    """W1 = su Omega[:, :d]/sqrt(n), W2 = sv Omega[:, d:]^T/sqrt(n), b = 0; Omega ~ N(0,1) n x (d+K)."""
    Om = rng.standard_normal((n, d + K))
    return {"W1": su * Om[:, :d] / math.sqrt(n), "b": np.zeros(n), "W2": sv * Om[:, d:].T / math.sqrt(n)}


def tp4_limit_init(d, K, su, sv):
    """TP4's exact limit: the width-(d+K) network W1 = [su I; 0], W2 = [0, sv I], b = 0."""
    W1 = np.zeros((d + K, d))
    W1[:d] = su * np.eye(d)
    W2 = np.zeros((K, d + K))
    W2[:, d:] = sv * np.eye(K)
    return {"W1": W1, "b": np.zeros(d + K), "W2": W2}


def tp4_forward(P, X, alpha):
    return (X @ P["W1"].T + alpha * P["b"]) @ P["W2"].T


def tp4_loss_grads(P, X, Y, alpha):
    """Mean softmax cross-entropy over the rows of X and its gradient in (W1, b, W2)."""
    H = X @ P["W1"].T + alpha * P["b"]
    F = H @ P["W2"].T
    Z = np.exp(F - F.max(1, keepdims=True))
    S = Z / Z.sum(1, keepdims=True)
    loss = float(-(Y * np.log(S)).sum(1).mean())
    G = (S - Y) / X.shape[0]
    dH = G @ P["W2"]
    return loss, {"W1": dH.T @ X, "b": alpha * dH.sum(0), "W2": G.T @ H}


def tp4_sgd(P, g, lr):
    return {k: P[k] - lr * g[k] for k in P}


def tp4_maml_step(P, tasks, inner_lr, outer_lr, clip, alpha, inner_steps=1):
    """First-order MAML: per task, inner SGD on the support loss, the query-loss gradient at
    the adapted weights; the sum over tasks, clipped to global norm ``clip``, applied by SGD."""
    total = {k: np.zeros_like(v) for k, v in P.items()}
    for Xs, Ys, Xq, Yq in tasks:
        Q = P
        for _ in range(inner_steps):
            Q = tp4_sgd(Q, tp4_loss_grads(Q, Xs, Ys, alpha)[1], inner_lr)
        g = tp4_loss_grads(Q, Xq, Yq, alpha)[1]
        total = {k: total[k] + g[k] for k in P}
    norm = math.sqrt(sum(float((v**2).sum()) for v in total.values()))
    if clip is not None and norm > clip:
        total = {k: v * (clip / norm) for k, v in total.items()}
    return tp4_sgd(P, total, outer_lr)


def toy_tasks(rng, count, d, K):
    out = []
    for _ in range(count):
        Xs, Xq = rng.normal(size=(K, d)), rng.normal(size=(K, d))
        out.append((Xs, np.eye(K), Xq, np.eye(K)[rng.permutation(K)]))
    return out


def test_oracle_gradients_by_finite_differences():
    rng = np.random.default_rng(4)
    d, K, n, alpha = 3, 2, 5, 0.8
    P = tp4_init(n, d, K, 1.0, 0.5, rng)
    P["b"] = rng.normal(size=n) * 0.3
    X, Y = rng.normal(size=(4, d)), np.eye(K)[[0, 1, 1, 0]]
    _, g = tp4_loss_grads(P, X, Y, alpha)
    eps = 1e-6
    for k in P:
        for idx in np.ndindex(P[k].shape):
            Pp = {j: v.copy() for j, v in P.items()}
            Pm = {j: v.copy() for j, v in P.items()}
            Pp[k][idx] += eps
            Pm[k][idx] -= eps
            fd = (tp4_loss_grads(Pp, X, Y, alpha)[0] - tp4_loss_grads(Pm, X, Y, alpha)[0]) / (2 * eps)
            assert abs(fd - g[k][idx]) < 1e-8


def test_oracle_clips_the_summed_gradient():
    rng = np.random.default_rng(5)
    d, K = 3, 2
    P = tp4_init(4, d, K, 1.0, 1.0, rng)
    tasks = toy_tasks(rng, 3, d, K)
    new = tp4_maml_step(P, tasks, 0.4, 1.0, 1e-3, 1.0)
    step = math.sqrt(sum(float(((new[k] - P[k]) ** 2).sum()) for k in P))
    assert step == pytest.approx(1e-3, rel=1e-12)


def test_oracle_wide_network_approaches_tp4_exact_limit():
    """TP4's width-n network after 3 meta-steps approaches its width-(d+K) construction: every
    update stays in the span of Omega, with Omega^T Omega / n -> I."""
    d, K, su, sv, alpha = 4, 3, 1.0, 0.5, 1.0
    rng = np.random.default_rng(6)
    batches = [toy_tasks(rng, 4, d, K) for _ in range(3)]
    Xe = rng.normal(size=(6, d))
    lim = tp4_limit_init(d, K, su, sv)
    for tasks in batches:
        lim = tp4_maml_step(lim, tasks, 0.4, 0.3, 0.5, alpha)
    f_lim = tp4_forward(lim, Xe, alpha)
    errs = []
    for n in (400, 40000):
        P = tp4_init(n, d, K, su, sv, np.random.default_rng(n))
        for tasks in batches:
            P = tp4_maml_step(P, tasks, 0.4, 0.3, 0.5, alpha)
        errs.append(np.abs(tp4_forward(P, Xe, alpha) - f_lim).max())
    # the error shrinks like n^{-1/2} (measured ratio 0.095 for n 400 -> 40000)
    assert errs[1] < 0.2 * errs[0] and errs[1] < 0.06 * np.abs(f_lim).max()


# ------------------------------------------------------------------------------------------
# the step engine against the oracle
# ------------------------------------------------------------------------------------------
D_, K_, SU, SV, ALPHA = 4, 5, 1.0, 0.5, 0.8


def engine_form(tasks):
    """Oracle tasks (x, one-hot) in the engine's coordinates xi = sqrt(d) x."""
    return [(ml.engine_inputs(a), b, ml.engine_inputs(c), e) for a, b, c, e in tasks]


def finite_pair(n, seed=0, clip=0.5):
    """TP4's width-n network and the engine's finite network from the same Omega."""
    Om = np.random.default_rng(seed).standard_normal((n, D_ + K_))
    P = {"W1": SU * Om[:, :D_] / math.sqrt(n), "b": np.zeros(n), "W2": SV * Om[:, D_:].T / math.sqrt(n)}
    init = {"U": Om[:, :D_], "beta": np.zeros(n), **{f"v_{k + 1}": Om[:, D_ + k] for k in range(K_)}}
    net = ml.build(d=D_, K=K_, sigma_u=SU, sigma_v=SV, bias=True, bias_alpha=ALPHA)
    eng = tp.StepEngine(net, ml.parametrization(), method="finite", width=n, loss="softmax", clip=clip, init=init)
    return P, eng, net


def meta_train_both(P, eng, rng, Xe, moved, steps=3):
    """``steps`` meta-steps (4 random tasks, inner 0.4, outer 0.3, clip 0.5) of the oracle from
    P and of the engine; their logits on Xe must agree (and have moved by more than ``moved``)."""
    for _ in range(steps):
        tasks = toy_tasks(rng, 4, D_, K_)
        P = tp4_maml_step(P, tasks, 0.4, 0.3, 0.5, ALPHA)
        eng.maml_step(engine_form(tasks), inner_lr=0.4, outer_lr=0.3)
    f = tp4_forward(P, Xe, ALPHA)
    assert np.abs(f).max() > moved
    np.testing.assert_allclose(eng.predict(ml.engine_inputs(Xe))[0], f, atol=1e-13)


def test_engine_finite_width_is_tp4_network():
    """The map of programs/maml_linear.py: same Omega -> the same logits after first-order MAML
    meta-steps with clipping (active here: the summed gradients have norm > 0.5)."""
    P, eng, _ = finite_pair(7)
    rng = np.random.default_rng(8)
    Xe = rng.normal(size=(6, D_))
    np.testing.assert_allclose(eng.predict(ml.engine_inputs(Xe))[0], tp4_forward(P, Xe, ALPHA), atol=1e-14)
    meta_train_both(P, eng, rng, Xe, moved=0.1)


def test_engine_several_inner_steps_are_tp4_network():
    """Two inner steps per task (the second reads the first's update of U, which the engine
    keeps pending inside the task instead of writing it) = the oracle's two SGD steps."""
    P, eng, _ = finite_pair(6, seed=3)
    rng = np.random.default_rng(10)
    Xe = rng.normal(size=(5, D_))
    for _ in range(2):
        tasks = toy_tasks(rng, 3, D_, K_)
        P = tp4_maml_step(P, tasks, 0.4, 0.3, 0.5, ALPHA, inner_steps=2)
        eng.maml_step(engine_form(tasks), inner_lr=0.4, outer_lr=0.3, inner_steps=2)
    f = tp4_forward(P, Xe, ALPHA)
    assert np.abs(f).max() > 0.1
    np.testing.assert_allclose(eng.predict(ml.engine_inputs(Xe))[0], f, atol=1e-13)


def test_engine_exact_limit_is_tp4_width_d_plus_K_construction():
    """The engine's exact limit (derived from the template) equals TP4's own construction of
    the limit, the width-(d+K) network W1 = [su I; 0], W2 = [0, sv I], to rounding."""
    net = ml.build(d=D_, K=K_, sigma_u=SU, sigma_v=SV, bias=True, bias_alpha=ALPHA)
    eng = tp.StepEngine(net, ml.parametrization(), method="exact", loss="softmax", clip=0.5)
    lim = tp4_limit_init(D_, K_, SU, SV)
    rng = np.random.default_rng(9)
    Xe = rng.normal(size=(6, D_))
    meta_train_both(lim, eng, rng, Xe, moved=0.05)


def test_evaluation_adapts_without_clipping_and_restores():
    """engine_accuracy on an unclipped copy (mm.unclipped) = the oracle's accuracy after 1 and
    3 plain SGD steps per task; the meta-trained weights are unchanged afterwards."""
    P, eng, net = finite_pair(6, seed=1, clip=1e-3)
    rng = np.random.default_rng(10)
    tasks = []
    for _ in range(8):
        Xs, Xq = rng.normal(size=(K_, D_)), rng.normal(size=(K_, D_))
        ys, yq = rng.permutation(K_), rng.permutation(K_)
        tasks.append(mm.Task(Xs, ys, Xq, yq, np.arange(K_), np.zeros((K_, 2), dtype=int)))
    ev = mm.unclipped(eng, ml, net, 6, 0)
    assert ev.clip is None and eng.clip == 1e-3
    Xe = ml.engine_inputs(rng.normal(size=(3, D_)))
    before = ev.predict(Xe)[0]
    got = mm.engine_accuracy(ev, ml, tasks, steps=3, report=(1, 3), progress=False)
    np.testing.assert_array_equal(ev.predict(Xe)[0], before)
    want = {1: [], 3: []}   # correct queries per task
    for t in tasks:
        Q = P
        for s in range(1, 4):
            Q = tp4_sgd(Q, tp4_loss_grads(Q, t.Xs, np.eye(K_)[t.ys], ALPHA)[1], 0.4)
            if s in want:
                want[s].append(int((tp4_forward(Q, t.Xq, ALPHA).argmax(1) == t.yq).sum()))
    assert set(got) == {1, 3}
    for s in (1, 3):
        np.testing.assert_array_equal(got[s], want[s])


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["--width", "foo", "--json", "x.json"], ["--width", "0", "--json", "x.json"],
    ["--width", "8", "--seed", "-1", "--json", "x.json"], ["--width", "8"],
    ["--width", "8", "--json", "/no/such/dir/x.json"], ["--width", "inf", "--test-tasks", "0", "--json", "x.json"],
])
def test_bad_arguments_are_one_line_errors(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mm.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("maml_mnist.py: error: ") and err.count("\n") == 1 and "Traceback" not in err
