"""Feature learning and the Dynamical Dichotomy (issue 4; docs/DESIGN.md 2.4-2.6, 4).

Every expected value comes from an independent source:
* closed forms written here (linear networks: every vector is a coefficient vector over an
  iid N(0, 1) basis, so the limit of SGD is a few lines of numpy);
* the finite-width reference trainer of docs/DESIGN.md 2.6 (``train_many``), which shares no code
  with the unroll pass, the symbolic stage or the evaluators;
* the finite-width interpreter running the unrolled program (``check.judge``: convergence
  with slope -1/2), and exact identities (abc symmetry, muP's f_0 = 0).

Sizes (all float64, fixed seeds).  At width n the seed spread of f is ~ 0.5 n^-1/2, so with
S seeds the standard error at n = 4096 is ~ 0.008 / sqrt(S); what a wrong derivation changes
is far larger: dropping the ZDot terms moves f by ~ 0.1 (L = 2, tanh), a missing or extra
factor sigma, eta or 1/B in an update changes f by O(0.1), and the kernel regime's feature
kernel moves ~ 1000x less than muP's at n = 4096.  Three widths (256, 1024, 4096) suffice to
see the n^-1/2 decay; the particle counts keep the limit's own error below the seed error.
"""
from __future__ import annotations

import functools
import importlib.util
import re
import warnings
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import sympy as sp
from threadpoolctl import threadpool_limits

import tpcompiler as tp
from tpcompiler.ir import ops
from tpcompiler.ir.backward import derive_backward
from tpcompiler.check import Z_TOL, finite_runs, fit_slope, format_report, judge
from tpcompiler.training.finite import batch_indices, train_many
from tpcompiler.backends.kernels.kernel import KernelFunction
from tpcompiler.symbolic.master import Z, Zhat, derive
from tpcompiler.training.sgd import training_kernel_graph

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "programs" / "mlp.py"


def _module(name):
    spec = importlib.util.spec_from_file_location(f"_prog_{name}", ROOT / "programs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


linear_net = _module("linear_net")
word2vec = _module("word2vec")

# One small data set for every MLP test: d = 3, N = 3 training and 2 evaluation inputs.
D = 3
_rng = np.random.default_rng(0)
X = _rng.standard_normal((3, D))
Y = np.array([1.0, -1.0, 0.5])
XE = _rng.standard_normal((2, D))
LR = 1.0  # moves f from 0 to ~0.5 within 5 steps: an O(1) change


def load_mlp(L, phi, **kw):
    return tp.load(MLP, depth=L, phi=phi, d=D, **kw)


@functools.lru_cache(maxsize=None)
def finite(param: str, L: int, phi: str, width: int, seeds: int, steps: int):
    """train_many on the shared data (cached: several tests read the same runs)."""
    abc = tp.named(param, L)
    # One BLAS thread: a 2-thread OpenBLAS on a loaded 2-core machine makes the thin rank-B
    # weight updates ~100x slower (threads spin-waiting), and the result does not change.
    with threadpool_limits(1):
        return train_many(X, Y, seeds=range(seeds), depth=L, phi=phi, w_std=1.0, a=list(abc.a),
                          b=list(abc.b), c=abc.c, lr=LR, steps=steps, width=width, X_eval=XE,
                          record_features=True)


@functools.lru_cache(maxsize=None)
def mup_limit(L: int, phi: str, steps: int, particles: int):
    return tp.train(load_mlp(L, phi), tp.named("mup", L), tp.SGD(X, Y, steps=steps, lr=LR, X_eval=XE),
                    particles=particles, seed=0)


def stacked(run, vector_output=False):
    """f on the training and evaluation inputs side by side (the input axis is the last one,
    or the one before the output axis K for a vector output)."""
    return np.concatenate([run.f_train, run.f_eval], axis=-2 if vector_output else -1)


def stacked_se(res, vector_output=False):
    """The limit's standard errors, laid out like stacked(res)."""
    return np.concatenate([res.f_train_stderr, res.f_eval_stderr], axis=-2 if vector_output else -1)


# =============================================================================================
# 1. Backward derivation
# =============================================================================================
MLP_VARIANTS = [(2, "relu"), (2, "tanh"), (3, "relu"), (3, "tanh")]


@pytest.mark.parametrize("L,phi", MLP_VARIANTS)
def test_derived_backward_reuses_the_hand_written_nodes(L, phi):
    g = load_mlp(L, phi).graph
    out, grads = derive_backward(g)
    for l in range(1, L + 1):
        assert grads[f"h{l}"] == f"dh{l}" and grads[f"x{l}"] == f"dx{l}"
    # the only new vector is the gradient of the unit-scale input layer g (h1 = w_std g),
    # which the hand-written program does not need: dg = w_std dh1
    new = [k for k in out.order() if k not in g.g]
    assert new == [grads["g"]]
    zp0, zp1 = derive(g), derive(out)
    w = ops.node_symbol("w_std")
    assert sp.simplify(zp1.entries[new[0]].z - w * Z("dh1")) == 0
    for k in g.order():
        e0, e1 = zp0.entries[k], zp1.entries[k]
        assert (e0.rule, e0.z, e0.deps) == (e1.rule, e1.z, e1.deps), k


def _forward_only(g):
    """The mlp program without its hand-written backward pass and kernel outputs."""
    fwd = g.copy()
    fwd.outputs = {}
    keep = nx.ancestors(g.g, g.readout.vector) | {g.readout.vector, g.readout.readout}
    keep |= {k for k in g.g if isinstance(g.op(k), (ops.Param, ops.InitMat, ops.InputMat, ops.Input, ops.InitVec))}
    fwd.g.remove_nodes_from([k for k in list(fwd.g) if k not in keep])
    return fwd


@pytest.mark.parametrize("L,phi", MLP_VARIANTS)
def test_derived_backward_from_the_forward_pass_equals_the_hand_written_one(L, phi):
    """Derive the backward pass of the forward-only program: its Z recursions (Z, ZHat
    families, every ZDot term and why it vanishes) equal the hand-written program's, node for
    node, once the derived names are mapped to dh_l, dx_l."""
    hand = load_mlp(L, phi).graph
    fwd = _forward_only(hand)
    assert not any(k.startswith("d") for k in fwd.g)
    out, grads = derive_backward(fwd, prefix="D")
    names = {f"dh{l}": grads[f"h{l}"] for l in range(1, L + 1)} | {f"dx{l}": grads[f"x{l}"] for l in range(1, L + 1)}
    derived_new = {k for k in out.g if k not in fwd.g}
    assert set(names.values()) | {grads["g"]} == derived_new
    zh, zd = derive(hand), derive(out)
    ren = {Z(k): Z(v) for k, v in names.items()} | {Zhat(k): Zhat(v) for k, v in names.items()}
    for k, v in names.items():
        eh, ed = zh.entries[k], zd.entries[v]
        assert eh.rule == ed.rule, k
        assert ed.z == eh.z.xreplace(ren), (k, eh.z, ed.z)
        if eh.rule == "matmul":
            assert ed.family == eh.family and ed.x == names.get(eh.x, eh.x)
            th = [(names.get(t.y, t.y), names.get(t.source, t.source), t.is_zero, t.zero_reason) for t in eh.zdot]
            td = [(t.y, t.source, t.is_zero, t.zero_reason) for t in ed.zdot]
            assert th == td and th, k  # W_l^T dh_l has a ZDot term through W_l x_{l-1} (proved 0)
    for l in range(1, L + 1):  # phi' from sympy: Z^{dh_l} = Z^{dx_l} phi'(Z^{h_l})
        a = sp.Symbol("a", real=True)
        dphi = sp.diff(tp.nonlinearities.builtin(phi)(a), a).subs(a, Z(f"h{l}"))
        assert sp.simplify(zd.entries[names[f"dh{l}"]].z - Z(names[f"dx{l}"]) * dphi) == 0


# =============================================================================================
# 2. Linear networks: exact evaluator vs closed form, vs finite width
# =============================================================================================
def _chi(loss, f, y):
    if loss == "mse":
        return f - y
    if loss == "logistic":
        return 1.0 / (1.0 + np.exp(-f)) - y
    e = np.exp(f - f.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True) - y


def linear_closed_form(X, Y, XE, sigma, lr, steps, batch=None, loss="mse"):
    """Infinite-width SGD of h = sigma U xi / sqrt(d), f_k = sigma <v_k, h> under muP.

    Basis: v_1..v_K (the readouts at init) and G_j = U e_j, iid N(0, 1) in the limit; every
    vector is a coefficient vector over it and E[Z^a Z^b] is the dot product.  muP (docs/DESIGN.md
    2.5/2.6, all width powers n^0), with chi_ik = dloss/df_k at example i of the batch:
      v_k  <- v_k - eta / (B sigma) sum_i chi_ik h(xi_i)
      h(xi) <- h(xi) - eta sigma / B sum_i (sum_k chi_ik v_k) xi_i . xi / d
    both from the values before the step.  Returns f of shape (T+1, N + N_eval, K)."""
    N, d = X.shape
    K = Y.shape[1]
    XA = np.concatenate([X, XE])
    V = np.eye(K + d)[:K]
    H = np.zeros((len(XA), K + d))
    H[:, K:] = sigma * XA / np.sqrt(d)
    gram = XA @ X.T / d
    traj = []
    for t in range(steps + 1):
        f = sigma * H @ V.T
        traj.append(f)
        if t == steps:
            break
        idx = np.arange(N) if batch is None else (t * batch + np.arange(batch)) % N
        chi = _chi(loss, f[idx], Y[idx])
        B = len(idx)
        V, H = V - lr / (B * sigma) * chi.T @ H[idx], H - lr * sigma / B * gram[:, idx] @ (chi @ V)
    return np.array(traj)


def test_closed_form_batches_follow_the_shared_schedule():
    # the closed form above writes the cyclic schedule out; it must be batch_indices'
    for t in range(7):
        np.testing.assert_array_equal((t * 2 + np.arange(2)) % 3, batch_indices(3, 2, t))


LIN_SIGMA, LIN_LR, LIN_STEPS = 1.3, 0.5, 4


def test_linear_net_program_exact_limit_equals_closed_form():
    """programs/linear_net.py (K = 2, muP): the exact evaluator vs the closed form to 1e-10."""
    prog = tp.load(ROOT / "programs" / "linear_net.py", w_std=LIN_SIGMA, steps=LIN_STEPS, lr=LIN_LR)
    lim = tp.compile(prog).limit(method="exact")
    Xl, Yl, XEl = linear_net.default_data(3, 2, 3, 2)
    ref = linear_closed_form(Xl, Yl, XEl, LIN_SIGMA, LIN_LR, LIN_STEPS)
    assert np.abs(ref[-1]).max() > 0.3  # training moved f by O(1)
    got = np.zeros_like(ref)
    for name, (v, e) in lim.items():
        assert e == 0.0
        split, rest = name.split("[", 1)
        t, i, k = (int(s) for s in rest.replace("][", ",").rstrip("]").split(","))
        got[t, i + (3 if split == "f_eval" else 0), k] = v
    assert len(lim) == ref.size
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("loss,K,batch", [("mse", 2, None), ("mse", 2, 2), ("logistic", 1, None),
                                          ("softmax", 3, 1)])
def test_linear_net_train_equals_closed_form(loss, K, batch):
    """tp.train routes a linear net to the exact evaluator; every loss and a minibatch
    schedule agree with the closed form to 1e-10."""
    rng = np.random.default_rng(5)
    Xl, XEl = rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    Yl = rng.standard_normal((3, K)) if loss == "mse" else np.eye(K)[[0, 1, 0]] if K > 1 else np.array([[1.0], [0.0], [1.0]])
    lr = 0.4 if loss == "mse" else 1.0
    net = linear_net.network(d=4, K=K, w_std=LIN_SIGMA)
    res = tp.train(net, tp.named("mup", 1), tp.SGD(Xl, Yl, steps=5, lr=lr, batch=batch, loss=loss, X_eval=XEl))
    assert res.method == "exact" and res.regime == "feature learning"
    ref = linear_closed_form(Xl, Yl, XEl, LIN_SIGMA, lr, 5, batch, loss)
    got = stacked(res, K > 1).reshape(ref.shape)
    assert 0.2 < np.abs(ref[-1] - ref[0]).max() < 20  # training moved f, without diverging
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)
    assert np.all(stacked_se(res, K > 1) == 0)


def test_word2vec_exact_limit_equals_closed_form():
    """programs/word2vec.py: one-hot inputs, softmax cross-entropy, muP."""
    V, steps, lr, sigma = 4, 3, 2.0, 1.2
    lim = tp.compile(tp.load(ROOT / "programs" / "word2vec.py", V=V, steps=steps, lr=lr, w_std=sigma)).limit()
    pairs = word2vec.pairs(V)
    Xw, Yw = np.eye(V)[[w for w, _ in pairs]], np.eye(V)[[c for _, c in pairs]]
    ref = linear_closed_form(Xw, Yw, np.zeros((0, V)), sigma, lr, steps, loss="softmax")
    for t in range(steps + 1):
        for i in range(V):
            for k in range(V):
                assert abs(lim[f"f_train[{t},{i}][{k}]"][0] - ref[t, i, k]) < 1e-10
    assert ref[-1, 0, 1] > 0.5  # word 0 learned its context 1


def test_linear_net_interpreter_converges_to_the_exact_limit():
    """The unrolled program run at finite width (the interpreter) -> exact limit, slope -1/2.
    20 seeds at 6 widths: per output the fitted slope has spread ~ 0.1, the pooled one less."""
    prog = tp.load(ROOT / "programs" / "linear_net.py", w_std=LIN_SIGMA, steps=LIN_STEPS, lr=LIN_LR)
    compiled = tp.compile(prog)
    widths = (128, 256, 512, 1024, 2048, 4096)
    with threadpool_limits(1):
        runs = finite_runs(compiled.graph, widths, 20)
    checks = judge(compiled.limit(), runs)
    assert all(c.limit_stderr == 0 for c in checks)
    assert max(c.z_top for c in checks) < Z_TOL, format_report(checks)
    pooled = np.sqrt(np.mean([np.square(c.rms) for c in checks], axis=0))
    assert -0.65 < fit_slope(widths, pooled) < -0.35
    assert np.mean([c.passed for c in checks]) >= 0.9, format_report([c for c in checks if not c.passed])


def test_linear_net_finite_trainer_agrees_with_the_exact_limit():
    """train_many (depth 1, identity, K = 2 targets, muP exponents) against the exact limit
    of the unrolled program: agreement at n = 4096 within 4 standard errors (20 seeds) and
    RMS error falling like n^-1/2 from 256 to 4096."""
    Xl, Yl, XEl = linear_net.default_data(3, 2, 3, 2)
    res = tp.train(linear_net.network(3, 2, LIN_SIGMA), tp.named("mup", 1),
                   tp.SGD(Xl, Yl, steps=LIN_STEPS, lr=LIN_LR, X_eval=XEl))
    limit = stacked(res, True)
    abc = tp.named("mup", 1)
    widths, rms = (256, 1024, 4096), []
    for n in widths:
        m = train_many(Xl, Yl, seeds=range(20), depth=1, phi="identity", w_std=LIN_SIGMA, a=list(abc.a),
                       b=list(abc.b), c=abc.c, lr=LIN_LR, steps=LIN_STEPS, width=n, X_eval=XEl)
        f = stacked(m, True)
        rms.append(np.sqrt(np.mean((f - limit) ** 2)))
    z = np.abs(f.mean(0) - limit) / (f.std(0, ddof=1) / np.sqrt(20))
    assert z.max() < Z_TOL, z
    assert -0.7 < fit_slope(widths, rms) < -0.3, rms


# =============================================================================================
# 3. muP MLPs: the unrolled program is SGD; particles vs the finite-width trainer
# =============================================================================================
def _chi_from_outputs(loss, f, y):
    return f - y if loss == "mse" else 1.0 / (1.0 + np.exp(-f)) - y


@pytest.mark.parametrize("L,phi,param,batch,loss", [
    (1, "tanh", "mup", None, "mse"),
    (1, "tanh", "mfp", None, "mse"),
    (2, "tanh", "mup", None, "mse"),
    (2, "tanh", "a=-1/6,1/3,5/6;b=1/6,1/6,1/6;c=-2/3", 2, "mse"),  # muP shifted by t = 1/3
    (2, "gelu", "mup", None, "logistic"),
    (3, "relu", "mup", None, "mse"),
    (3, "relu", "mup", 2, "mse"),
])
def test_unrolled_program_is_exactly_sgd_at_finite_width(L, phi, param, batch, loss):
    """Run the unrolled program with the interpreter at width 96 and SGD of docs/DESIGN.md 2.6 on
    the very same initial weights, with the trainer's own backprop (loss_and_grads): equal to
    rounding.  Targets f - chi turn its squared-loss gradient into any loss's.  (Catches e.g.
    one example's update leaking into a later example's backward pass within a step.)"""
    from tpcompiler.backends import interpreter
    from tpcompiler.training.finite import Params, forward, loss_and_grads

    n, seed, sigma, lr, steps = 96, 4, 1.3, 0.7, 3
    abc = tp.parse_abc(param, L) if "=" in param else tp.named(param, L)
    Yl = (Y > 0).astype(float) if loss == "logistic" else Y
    net = load_mlp(L, phi, w_std=sigma)
    g = tp.unroll(net.graph, abc, tp.SGD(X, Yl, steps=steps, lr=lr, batch=batch, loss=loss, X_eval=XE))
    out, env = interpreter.run(g, n, seed, keep=True)
    # The interpreter's draws: initial vectors first (here the readout v), then the matrices
    # in program order: U (n x d), then W_2..W_L with N(0, sigma^2/n) entries.
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, 1))[:, 0]
    U = rng.standard_normal((n, D))
    Ws = [rng.standard_normal((n, n)) * (sigma / np.sqrt(n)) for _ in range(L - 1)]
    assert np.array_equal(env[net.graph.readout.readouts[0]], v)
    a, b, c = [float(x) for x in abc.a], [float(x) for x in abc.b], float(abc.c)
    # trained weights w^l ~ sigma n^{-b_l} N(0, 1) (docs/DESIGN.md 2.6) built from those draws
    params = Params([sigma * n ** -b[0] * U] + [n ** (0.5 - b[l]) * W for l, W in enumerate(Ws, 1)]
                    + [sigma * n ** -b[L] * v[None, :]])
    XA = np.concatenate([X, XE])
    for t in range(steps + 1):
        f = forward(params, XA, phi=phi, a=a)[:, 0]
        program = [out[f"f_train[{t},{i}]"] for i in range(len(X))] + [out[f"f_eval[{t},{i}]"] for i in range(len(XE))]
        np.testing.assert_allclose(program, f, rtol=0, atol=1e-12, err_msg=f"step {t} (t = 0: the draws above changed)")
        if t == steps:
            break
        idx = batch_indices(len(X), batch, t)
        fb = f[idx]
        _, grads = loss_and_grads(params, X[idx], fb - _chi_from_outputs(loss, fb, Yl[idx]), phi=phi, a=a)
        params = Params([w - lr * n ** -c * gw for w, gw in zip(params.weights, grads.weights)])
    assert np.abs(f).max() > 0.2


# (L, phi, steps, particles, seeds at the widths 256, 1024, 4096).  Seeds shrink with depth
# (an L = 3 run at 4096 costs ~1.3 s, most of it drawing the two n x n matrices).
MUP_CASES = [
    (1, "tanh", 10, 200_000, 16),
    (1, "relu", 10, 200_000, 16),
    (2, "tanh", 5, 400_000, 8),
    (2, "relu", 5, 400_000, 8),
    (3, "tanh", 5, 400_000, 6),
    (3, "relu", 5, 400_000, 6),
]
WIDTHS = (256, 1024, 4096)


@pytest.mark.parametrize("L,phi,steps,particles,seeds", MUP_CASES, ids=[f"L{c[0]}-{c[1]}" for c in MUP_CASES])
def test_mup_particle_limit_matches_finite_width_training(L, phi, steps, particles, seeds):
    res = mup_limit(L, phi, steps, particles)
    assert res.regime == "feature learning" and res.method.startswith("particles")
    limit, limit_se = stacked(res), stacked_se(res)
    assert np.abs(limit[-1]).max() > 0.3  # an O(1) move from f_0 = 0
    rms = []
    for n in WIDTHS:
        f = stacked(finite("mup", L, phi, n, seeds, steps))[:, 1:]
        rms.append(float(np.sqrt(np.mean((f - limit[1:]) ** 2))))
    se = f.std(0, ddof=1) / np.sqrt(seeds)
    z = np.abs(f.mean(0) - limit[1:]) / np.hypot(se, limit_se[1:])
    assert z.max() < Z_TOL, (z.max(), np.unravel_index(z.argmax(), z.shape))
    assert rms[0] > rms[1] > rms[2] and rms[2] < 0.6 * rms[0], rms


# 4. Dropping the ZDot terms fails (measured: 30 and 50 standard errors; the relu nets' ZDot
# terms move f less, 11 (L = 2) and 5 (L = 3) standard errors with these seeds)
@pytest.mark.parametrize("L,phi", [(2, "tanh"), (3, "tanh")])
def test_dropping_zdot_terms_disagrees_with_finite_width(L, phi):
    """The same unrolled program with every ZDot term dropped ("gradient independence"
    applied blindly) is many standard errors away from finite-width training."""
    steps, particles, seeds = 5, 400_000, {2: 8, 3: 6}[L]
    g = tp.unroll(load_mlp(L, phi).graph, tp.named("mup", L), tp.SGD(X, Y, steps=steps, lr=LR, X_eval=XE))
    wrong = tp.compile(g, drop_zdot=True)
    assert wrong.zprogram.nonzero_zdot_count() == 0 < tp.compile(g).zprogram.nonzero_zdot_count()
    lim = wrong.limit(particles=particles, seed=0)
    bad = np.array([[lim[f"f_eval[{t},{i}]"][0] for i in range(len(XE))] for t in range(steps + 1)])
    bad_se = np.array([[lim[f"f_eval[{t},{i}]"][1] for i in range(len(XE))] for t in range(steps + 1)])
    good = mup_limit(L, phi, steps, particles)
    f = finite("mup", L, phi, 4096, seeds, steps).f_eval
    se = f.std(0, ddof=1) / np.sqrt(seeds)
    z_bad = np.abs(f.mean(0) - bad) / np.hypot(se, bad_se)
    z_good = np.abs(f.mean(0) - good.f_eval) / np.hypot(se, good.f_eval_stderr)
    assert z_good[1:].max() < Z_TOL
    assert z_bad.max() > 10, z_bad.max()
    assert np.abs(bad - good.f_eval).max() > 0.03


# =============================================================================================
# 5. Kernel regime (NTP, SP with c = 1); 6. muP f_0 = 0 and moving features
# =============================================================================================
KERNEL_CASES = [("ntp", "tanh"), ("sp_c1", "relu")]
KERNEL_STEPS, KERNEL_SEEDS = 5, 8


def _feature_change(run):
    """Per seed: Frobenius norm of the last-layer feature kernel's change from step 0 to T."""
    return np.linalg.norm(run.features_last[:, -1] - run.features_last[:, 0], axis=(1, 2))


@pytest.mark.parametrize("param,phi", KERNEL_CASES)
def test_kernel_regime_feature_kernel_freezes(param, phi):
    """The change of (1/n) x^L x^L' over training vanishes with width: at least like n^-1/2
    (measured ~ n^-1: the feature kernel's drift is O(1/n) in the NTK regime), while muP's does
    not (next tests)."""
    change = [_feature_change(finite(param, 2, phi, n, KERNEL_SEEDS, KERNEL_STEPS)).mean() for n in WIDTHS]
    assert change[0] > change[1] > change[2]
    assert fit_slope(WIDTHS, change) < -0.45, change
    mup = _feature_change(finite("mup", 2, "tanh", 4096, 8, 5)).mean()
    assert change[-1] < 0.01 * mup


@pytest.mark.parametrize("param,phi", KERNEL_CASES)
def test_kernel_regime_trajectory_is_kernel_gradient_descent(param, phi):
    """tp.train in the kernel regime = the mean of finite-width training.  f_0 is a GP sample
    (spread ~ 0.3 at any width), so compare the control variate f_T - P f_0 per seed, where
    f_T = P f_0 + (kernel GD from 0) + O(n^-1/2) and P = A^T, A = I - (eta/N) Theta[:, train];
    E[P f_0] = 0 for any fixed P, so the mean is unchanged and only the spread drops (~30x)."""
    L = 2
    abc = tp.named(param, L)
    res = tp.train(load_mlp(L, phi), abc, tp.SGD(X, Y, steps=KERNEL_STEPS, lr=LR, X_eval=XE))
    assert res.regime == "kernel" and res.method.startswith("kernel gradient descent")
    limit = stacked(res)
    assert np.all(limit[0] == 0) and np.all(stacked_se(res) == 0)
    assert np.abs(limit[-1]).max() > 0.2
    theta = KernelFunction(training_kernel_graph(load_mlp(L, phi).graph, abc))(np.concatenate([X, XE]))["ntk"]
    N, M = len(X), len(X) + len(XE)
    A = np.eye(M) - LR / N * theta[:, :N] @ np.eye(M)[:N]
    P = np.linalg.matrix_power(A, KERNEL_STEPS)
    f = stacked(finite(param, L, phi, 4096, KERNEL_SEEDS, KERNEL_STEPS))
    cv = f[:, -1] - f[:, 0] @ P.T
    se = cv.std(0, ddof=1) / np.sqrt(KERNEL_SEEDS)
    assert se.max() < 0.01  # the control variate works: raw spread / sqrt(S) is ~ 0.1
    z = np.abs(cv.mean(0) - limit[-1]) / se
    assert z.max() < Z_TOL, (z, cv.mean(0), limit[-1])
    # the same at every step t (P_t = A^t)
    for t in range(1, KERNEL_STEPS):
        cvt = f[:, t] - f[:, 0] @ np.linalg.matrix_power(A, t).T
        zt = np.abs(cvt.mean(0) - limit[t]) / (cvt.std(0, ddof=1) / np.sqrt(KERNEL_SEEDS))
        assert zt.max() < Z_TOL, (t, zt)


def test_mup_f0_is_exactly_zero_in_the_limit():
    res = mup_limit(2, "tanh", 5, 400_000)
    assert np.all(res.f_train[0] == 0) and np.all(res.f_eval[0] == 0)
    assert np.all(res.f_train_stderr[0] == 0) and np.all(res.f_eval_stderr[0] == 0)
    assert np.all(res.f_eval_stderr[1:] > 0)  # later steps are particle estimates
    # while at finite width f_0 is O(n^-1/2) and nonzero
    f0 = finite("mup", 2, "tanh", 4096, 8, 5).f_eval[:, 0]
    assert np.all(f0 != 0) and np.abs(f0).max() < 0.1


def test_mup_feature_kernel_moves_by_a_width_independent_amount():
    """muP: the last-layer feature kernel's change from step 0 to T is O(1), the same at
    n = 512 and 4096 (kernel regime: ~ n^-1), and equals the limit's change."""
    steps = 5
    changes = {n: _feature_change(finite("mup", 2, "tanh", n, 8, steps)) for n in (512, 4096)}
    assert changes[4096].mean() > 0.1
    assert 0.8 < changes[4096].mean() / changes[512].mean() < 1.25
    g = tp.unroll(load_mlp(2, "tanh").graph, tp.named("mup", 2),
                  tp.SGD(X, Y, steps=steps, lr=LR, X_eval=XE, features=True))
    lim = tp.compile(g).limit(particles=200_000, seed=0)
    feats = finite("mup", 2, "tanh", 4096, 8, steps).features_last
    delta = feats[:, -1] - feats[:, 0]
    for i in range(len(XE)):
        for j in range(i, len(XE)):
            (vT, eT), (v0, e0) = lim[f"features[{steps},{i},{j}]"], lim[f"features[0,{i},{j}]"]
            se = delta[:, i, j].std(ddof=1) / np.sqrt(len(delta))
            assert abs(delta[:, i, j].mean() - (vT - v0)) < Z_TOL * np.hypot(se, eT + e0), (i, j)
    assert np.linalg.norm([lim[f"features[{steps},{i},{j}]"][0] - lim[f"features[0,{i},{j}]"][0]
                           for i in range(2) for j in range(i, 2)]) > 0.05


# =============================================================================================
# 7. abc symmetry (a + t, b - t, c - 2t) of the unrolled limit
# =============================================================================================
SHIFTS = ["1/3", "-1/2", "1"]


@pytest.mark.parametrize("t", SHIFTS)
def test_abc_symmetry_exact_linear_limit(t):
    Xl, Yl, XEl = linear_net.default_data(3, 2, 3, 2)
    net = linear_net.network(3, 2, LIN_SIGMA)
    sgd = tp.SGD(Xl, Yl, steps=3, lr=LIN_LR, X_eval=XEl)
    base = tp.train(net, tp.named("mup", 1), sgd)
    shifted = tp.train(net, tp.named("mup", 1).shifted(t), sgd)
    assert shifted.regime == "feature learning" and shifted.method == "exact"
    np.testing.assert_allclose(stacked(shifted, True), stacked(base, True), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stacked(base, True), linear_closed_form(Xl, Yl, XEl, LIN_SIGMA, LIN_LR, 3), rtol=0, atol=1e-10)


@pytest.mark.parametrize("t", SHIFTS)
def test_abc_symmetry_particle_limit_and_kernel_regime(t):
    """Same particles (seed) -> the shifted muP limit is identical, values and stderrs; the
    kernel regime's trajectory (NTP) too."""
    net = load_mlp(2, "tanh")
    sgd = tp.SGD(X, Y, steps=2, lr=LR, X_eval=XE)
    base = tp.train(net, tp.named("mup", 2), sgd, particles=20_000, seed=3)
    shifted = tp.train(net, tp.named("mup", 2).shifted(t), sgd, particles=20_000, seed=3)
    assert shifted.regime == "feature learning"
    for name in ("f_train", "f_eval", "f_train_stderr", "f_eval_stderr"):
        np.testing.assert_array_equal(getattr(shifted, name), getattr(base, name))
    k0, k1 = tp.train(net, tp.named("ntp", 2), sgd), tp.train(net, tp.named("ntp", 2).shifted(t), sgd)
    assert k1.regime == "kernel"
    np.testing.assert_allclose(stacked(k1), stacked(k0), rtol=1e-13, atol=1e-15)


# =============================================================================================
# 8. Losses: logistic and softmax cross-entropy converge at finite width
# =============================================================================================
def _logistic_net(L):
    Yb = np.array([[1.0], [0.0], [1.0]])
    return tp.unroll(load_mlp(L, "tanh").graph, tp.named("mup", L),
                     tp.SGD(X, Yb, steps=3, lr=2.0, loss="logistic", X_eval=XE))


@pytest.mark.parametrize("which", ["word2vec", "logistic-L1", "logistic-L2"])
def test_cross_entropy_programs_converge_to_their_limit(which):
    """Interpreter over widths 128..2048 (16 seeds) vs the limit: every output within Z_TOL
    standard errors at the top width; pooled RMS error slope near -1/2."""
    if which == "word2vec":
        graph = tp.load(ROOT / "programs" / "word2vec.py", V=4, steps=2, lr=2.0).graph
        widths = (128, 256, 512, 1024, 2048)
    else:
        graph = _logistic_net(int(which[-1]))
        widths = (128, 256, 512, 1024, 2048) if which.endswith("1") else (128, 512, 2048)
    compiled = tp.compile(graph)
    lim = compiled.limit(particles=200_000, seed=0)
    with threadpool_limits(1):
        runs = finite_runs(compiled.graph, widths, 16)
    checks = judge(lim, runs)
    moved = max(abs(c.limit) for c in checks)
    assert moved > 0.2
    assert max(c.z_top for c in checks) < Z_TOL, format_report(sorted(checks, key=lambda c: -c.z_top)[:3])
    pooled = np.sqrt(np.mean([np.square(c.rms) for c in checks], axis=0))
    assert -0.75 < fit_slope(widths, pooled) < -0.35, pooled


# =============================================================================================
# 9. Errors
# =============================================================================================
def _sgd(**kw):
    args = dict(X=X, Y=Y, steps=2, lr=1.0)
    args.update(kw)
    return tp.SGD(**args)


def test_unstable_parametrization_names_the_violated_conditions():
    with pytest.raises(tp.ProgramError) as info:
        tp.train(load_mlp(2, "tanh"), tp.named("sp", 2), _sgd())
    msg = str(info.value)
    assert "unstable" in msg
    for cond in ("r = -1 < 0", "2a_3 + c = 0 < 1", "a_3 + b_3 + r = -1/2 < 1"):
        assert cond in msg, msg


@pytest.mark.parametrize("param", ["mup", "ntp"])
@pytest.mark.parametrize("case,words", [
    ("depth3", "depth L = 3"),
    ("depth1", "depth L = 1"),
    ("bias", "'b1' is trained (a bias?)"),
    ("rows", "one row per training input (N = 3), got shape (4,)"),
    ("cols", "targets have 2 columns but the network has 1 outputs"),
    ("empty", "the training set is empty"),
    ("xdim", "dimension"),
])
def test_training_errors(param, case, words):
    net, L, sgd = load_mlp(2, "tanh"), 2, _sgd()
    if case.startswith("depth"):
        L = int(case[-1])
    elif case == "bias":
        net = load_mlp(2, "tanh", b_std=1.0)
    elif case == "rows":
        sgd = _sgd(Y=np.ones(4))
    elif case == "cols":
        sgd = _sgd(Y=np.ones((3, 2)))
    elif case == "empty":
        sgd = _sgd(X=np.zeros((0, D)), Y=np.zeros(0))
    elif case == "xdim":
        sgd = _sgd(X=np.ones((3, D + 1)))
    with pytest.raises(tp.ProgramError) as info:
        tp.train(net, tp.named(param, L), sgd)
    assert words in str(info.value), str(info.value)


def test_kernel_regime_needs_squared_loss():
    with pytest.raises(tp.ProgramError, match="squared loss"):
        tp.train(load_mlp(2, "tanh"), tp.named("ntp", 2), _sgd(Y=np.array([1.0, 0.0, 1.0]), loss="logistic"))
    with pytest.raises(tp.ProgramError, match="unknown loss 'hinge'"):
        tp.unroll(load_mlp(2, "tanh").graph, tp.named("mup", 2), _sgd(loss="hinge"))


def test_kernel_regime_training_with_w_std_not_one_is_gd_with_the_ntk_over_sigma_squared():
    """docs/DESIGN.md 2.6: in the kernel regime tp.train is kernel GD with Theta = neural-tangents'
    NTK / sigma^2 (trained parameters are sigma times NT's).  The kernels of tp.compile are
    checked against neural-tangents elsewhere; here w_std = 1.5 so that every 1/sigma^2 of
    training_kernel_graph matters (w_std = 1 everywhere else hid them: dropping either division
    passed the suite, mutation audit)."""
    s, L, steps, lr = 1.5, 2, 5, 0.5
    rng = np.random.default_rng(0)
    X, Xe = rng.standard_normal((3, 3)), rng.standard_normal((2, 3))
    Y = np.array([1.0, -1.0, 0.5])
    net = tp.load(ROOT / "programs" / "mlp.py", depth=L, phi="tanh", w_std=s, d=3)
    res = tp.train(net, tp.named("ntp", L), tp.SGD(X, Y, steps=steps, lr=lr, X_eval=Xe))
    got = np.concatenate([res.f_train, res.f_eval], axis=-1)
    theta = tp.compile(net).kernels(np.concatenate([X, Xe]))["ntk"] / s**2
    N = len(X)
    f = np.zeros(N + len(Xe))
    for t in range(steps + 1):
        np.testing.assert_allclose(got[t], f, atol=1e-9)
        f = f - lr / N * theta[:, :N] @ (f[:N] - Y)


def test_kernel_regime_training_beyond_the_kernel_backend_says_what_trains_it():
    """Tied weights (W and W^T in one forward pass) with tanh: the NTK needs expectations of
    several Gaussians at once, which the kernel backend refuses.  The refusal used to end with
    its kernels' hint (tp.compile(program).limit(x=X) estimates the kernels by particles),
    which trains nothing (training audit)."""
    p = tp.Program("tied")
    xi = p.input("xi", 3)
    W = p.mat("W")
    h = tp.tanh(p.input_matrix("U", 3).apply(xi))
    p.readout(tp.tanh(W.T @ tp.tanh(W @ h)))
    with pytest.raises(tp.ProgramError) as info:
        tp.train(p, tp.named("ntp", 2), tp.SGD(X, Y, steps=1, lr=0.5))
    message = str(info.value)
    assert "kernel-regime training runs gradient descent with the exact NTK" in message, message
    assert "limit(x=X)" not in message and "\n" not in message


@pytest.mark.parametrize("batch", [None, 2])
def test_diverging_kernel_gradient_descent_is_warned_at_its_stability_limit(batch):
    """Kernel gradient descent is the limit even where it diverges, so it warns rather than
    refuses.  The warning states the largest stable rate, 2 B / lambda_max(Theta_BB) (exact for
    the full batch; for this batch cycle too, as it happens); the dynamics themselves check it:
    at 0.9 of it the loss falls over 300 steps, unwarned; at 1.1 times it, it grows and the
    warning comes."""
    net, abc = load_mlp(2, "relu"), tp.named("ntp", 2)
    with pytest.warns(RuntimeWarning, match="kernel gradient descent diverges") as record:
        tp.train(net, abc, tp.SGD(X, Y, steps=50, lr=1e3, batch=batch))
    limit = float(re.search(r"= ([0-9.e+-]+) \(the smallest", str(record[0].message)).group(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        stable = tp.train(net, abc, tp.SGD(X, Y, steps=300, lr=0.9 * limit, batch=batch))
    assert np.mean((stable.f_train[-1] - Y) ** 2) < np.mean(Y**2)
    with pytest.warns(RuntimeWarning, match="kernel gradient descent diverges"):
        tp.train(net, abc, tp.SGD(X, Y, steps=300, lr=1.1 * limit, batch=batch))


def test_unrolling_the_kernel_regime_says_why_it_cannot():
    """NTP's readout a + b = 1/2: the output at initialization is an O(1) Gaussian fluctuation,
    stable (tpc classify), but not representable by an unrolled program; it was refused as
    'grows like n^1/2: the parametrization is unstable'."""
    with pytest.raises(tp.ProgramError, match=r"a \+ b = 1/2 makes the output at initialization an O\(1\) Gaussian "
                                              r"fluctuation.*kernel regime \(tpc train --param ntp"):
        tp.compile(tp.load(str(ROOT / "programs" / "linear_net.py"), param="ntp"))
