"""pi-networks (docs/DESIGN.md 2.10): the limit against an independent naive implementation of
DESIGN's equations, finite differences, the compiler's pairwise-Gaussian machinery, and the
finite pi-net at growing width; plus bad input."""
import math

import numpy as np
import pytest
from scipy import integrate

import tpcompiler as tp
from tpcompiler.training.pi_finite import PiFinite


# ---------------------------------------------------------------------------------------
# An independent reference: DESIGN.md 2.10 written out naively (loops per example and row,
# numpy/math only, nothing shared with tpcompiler.training.pi), relu only.
# ---------------------------------------------------------------------------------------
def f00(c):
    return (math.sqrt(max(1.0 - c * c, 0.0)) + (math.pi - math.acos(c)) * c) / (2 * math.pi)


def f11(c):
    return (math.pi - math.acos(c)) / (2 * math.pi)


def f02(c):
    return math.sqrt(max(1.0 - c * c, 0.0)) / (2 * math.pi)


def cosine(a, b):
    return min(1.0, max(-1.0, float(np.dot(a, b))))


class NaivePiRelu:
    def __init__(self, state, depth, a1, ao, ab, bias, loss="softmax"):
        self.L, self.a1, self.ao, self.ab, self.bias, self.loss = depth, a1, ao, ab, bias, loss
        self.A1 = state["A1"].copy()
        self.rows = {l: [[state[f"A{l}"][m].copy(), state[f"B{l}"][m].copy(), float(state[f"Amult{l}"][m])]
                         for m in range(state[f"A{l}"].shape[0])] for l in range(2, depth + 2)}
        self.b = {l: state[f"b{l}"].copy() for l in range(1, depth + 2)} if bias else {}
        self.clip_factors = []

    def forward_one(self, x, bump=None):
        """[g^1, ..., g^{L+1}] for one input; bump: {layer: vector added to g^layer}."""
        bump = bump or {}
        g = self.a1 * (x @ self.A1 + (self.ab * self.b[1] if self.bias else 0.0)) + bump.get(1, 0.0)
        gs = [g]
        for l in range(2, self.L + 2):
            s = np.linalg.norm(g)
            new = np.zeros(self.rows[l][0][0].shape)
            for A, B, Am in self.rows[l]:
                new = new + s * f00(cosine(g / s, B)) * Am * A
            if self.bias:
                new = new + self.ab * self.b[l]
            g = new + bump.get(l, 0.0)
            gs.append(g)
        return gs

    def loss_one(self, out, y):
        if self.loss == "mse":
            return 0.5 * float(np.sum((out - y) ** 2)), out - y
        z = out - out.max()
        p = np.exp(z) / np.exp(z).sum()
        return -float(np.sum(y * np.log(p))), p - y

    def mean_loss(self, X, Y, bumps=None):
        bumps = bumps or {}
        return sum(self.loss_one(self.ao * self.forward_one(X[i], bumps.get(i))[-1], Y[i])[0]
                   for i in range(len(X))) / len(X)

    def gradients(self, X, Y):
        Bn = len(X)
        dA1 = np.zeros_like(self.A1)
        db = {l: np.zeros_like(v) for l, v in self.b.items()}
        losses, new_rows, dgs = [], {l: [] for l in self.rows}, []
        for i in range(Bn):
            gs = self.forward_one(X[i])
            loss, dout = self.loss_one(self.ao * gs[-1], Y[i])
            losses.append(loss)
            dg = {self.L + 1: self.ao * dout / Bn}
            for l in range(self.L + 1, 1, -1):
                g_prev = gs[l - 2]
                s = np.linalg.norm(g_prev)
                v = np.zeros_like(g_prev)
                coef = 0.0
                for A, B, Am in self.rows[l]:
                    dgam = float(np.dot(dg[l], A)) * Am
                    c = cosine(g_prev / s, B)
                    v = v + dgam * f11(c) * B
                    coef += dgam * f02(c) / s
                dg[l - 1] = v + coef * g_prev
                new_rows[l].append((dg[l] * s, g_prev / s))
            dA1 += self.a1 * np.outer(X[i], dg[1])
            for l in db:
                db[l] += self.ab * (self.a1 if l == 1 else 1.0) * dg[l]
            dgs.append(dg)
        return np.array(losses), dA1, db, new_rows, dgs

    def factor(self, norm, clip):
        f = 1.0 if clip is None else min(1.0, clip / (1e-10 + norm))
        self.clip_factors.append(f)
        return f

    def step(self, X, Y, lr, wd=0.0, clip=None, mult=None):
        mult = {"first": 1.0, "last": 1.0, "bias": 1.0, **(mult or {})}
        losses, dA1, db, new_rows, _ = self.gradients(X, Y)
        dA1 = dA1 * self.factor(np.linalg.norm(dA1), clip)
        db = {l: v * self.factor(np.linalg.norm(v), clip) for l, v in db.items()}
        for l, rows in new_rows.items():
            sq = sum(float(np.dot(Ai, Aj)) * f00(cosine(Bi, Bj)) for Ai, Bi in rows for Aj, Bj in rows)
            f = self.factor(math.sqrt(sq), clip)
            new_rows[l] = [(A * f, B) for A, B in rows]
        decay = 1.0 - lr * wd
        self.A1 = self.A1 * decay
        for rows in self.rows.values():
            for row in rows:
                row[2] *= decay
        self.b = {l: v * decay for l, v in self.b.items()}
        self.A1 = self.A1 - lr * mult["first"] * dA1
        for l, rows in new_rows.items():
            m = mult["last"] if l == self.L + 1 else 1.0
            self.rows[l].extend([A, B, -lr * m] for A, B in rows)
        for l in db:
            self.b[l] = self.b[l] - lr * mult["bias"] * db[l]
        return losses

    def outputs(self, X):
        return np.array([self.ao * self.forward_one(x)[-1] for x in X])


def data(N=3, d=3, dout=2, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    return X, np.eye(dout)[rng.integers(0, dout, N)]


def random_biases(spec, state, seed=7):
    rng = np.random.default_rng(seed)
    for l in range(1, spec.depth + 2):
        state[f"b{l}"] = 0.3 * rng.standard_normal(state[f"b{l}"].shape)
    return state


CASES = [
    dict(depth=2, bias=False, wd=0.0, clip=None, mult=None, loss="softmax"),
    dict(depth=2, bias=True, wd=1e-2, clip=0.05, mult=dict(first=0.1, last=4.0, bias=0.5), loss="softmax"),
    dict(depth=3, bias=True, wd=0.0, clip=0.05, mult=dict(first=2.0, last=0.5, bias=1.5), loss="mse"),
]


@pytest.mark.parametrize("case", CASES, ids=["plain", "bias-clip-wd-mult", "depth3-mse"])
def test_relu_limit_trajectory_equals_naive_reference(case):
    spec = tp.PiSpec(depth=case["depth"], r=5, d=3, dout=2, bias=case["bias"], a1=1.0, ao=0.5, ab=0.5)
    state = tp.pi.init_state(spec, seed=2)
    if spec.bias:
        state = random_biases(spec, state)
    lim = tp.PiLimit(spec, state=state, loss=case["loss"])
    ref = NaivePiRelu(state, spec.depth, spec.a1, spec.ao, spec.ab, spec.bias, loss=case["loss"])
    X, Y = data(N=9)
    for t in range(3):
        sl = slice(3 * t, 3 * t + 3)
        kw = dict(wd=case["wd"], clip=case["clip"], mult=case["mult"])
        np.testing.assert_allclose(lim.step(X[sl], Y[sl], 0.8, **kw), ref.step(X[sl], Y[sl], 0.8, **kw), rtol=1e-9)
        np.testing.assert_allclose(lim.forward(X), ref.outputs(X), rtol=1e-9, atol=1e-12)
    if case["clip"] is not None:
        assert min(ref.clip_factors) < 0.9  # clipping was active
    final = lim.state()
    np.testing.assert_allclose(final["A1"], ref.A1, rtol=1e-9, atol=1e-13)
    for l, rows in ref.rows.items():
        np.testing.assert_allclose(final[f"A{l}"], np.array([r[0] for r in rows]), rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(final[f"B{l}"], np.array([r[1] for r in rows]), rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(final[f"Amult{l}"], np.array([r[2] for r in rows]), rtol=1e-12)
    for l, b in ref.b.items():
        np.testing.assert_allclose(final[f"b{l}"], b, rtol=1e-9, atol=1e-13)


def test_naive_reference_backward_equals_finite_differences():
    """The reference's (and so the limit's) backward pass is the gradient of its forward."""
    spec = tp.PiSpec(depth=2, r=4, d=3, dout=2, bias=True, a1=0.7, ao=1.3, ab=0.5)
    state = random_biases(spec, tp.pi.init_state(spec, seed=5))
    ref = NaivePiRelu(state, spec.depth, spec.a1, spec.ao, spec.ab, True)
    ref.step(*data(N=2, seed=4), 0.5)  # rows that are not at initialization
    X, Y = data(N=2)
    _, dA1, db, _, dgs = ref.gradients(X, Y)
    eps = 1e-6

    def central(setter, size):
        out = np.empty(size)
        for k in range(size):
            vals = []
            for sign in (1, -1):
                undo = setter(k, sign * eps)
                vals.append(ref.mean_loss(X, Y))
                undo()
            out[k] = (vals[0] - vals[1]) / (2 * eps)
        return out

    def bump_array(arr):
        def setter(k, h):
            arr.flat[k] += h
            return lambda: arr.flat.__setitem__(k, arr.flat[k] - h)
        return setter

    np.testing.assert_allclose(central(bump_array(ref.A1), ref.A1.size), dA1.ravel(), rtol=1e-6, atol=1e-9)
    for l, b in ref.b.items():
        np.testing.assert_allclose(central(bump_array(b), b.size), db[l], rtol=1e-6, atol=1e-9)
    for i in range(len(X)):
        for l in range(1, spec.depth + 2):
            size = dgs[i][l].size
            fd = np.empty(size)
            for k in range(size):
                e = np.zeros(size)
                e[k] = eps
                fd[k] = (ref.mean_loss(X, Y, {i: {l: e}}) - ref.mean_loss(X, Y, {i: {l: -e}})) / (2 * eps)
            np.testing.assert_allclose(fd, dgs[i][l], rtol=1e-6, atol=1e-9)


def test_smooth_limit_backward_equals_finite_differences():
    """For erf (T02 from Price's theorem) the limit's dA1 and db are gradients of its loss."""
    spec = tp.PiSpec(depth=2, r=3, d=2, dout=2, phi="erf", bias=True, a1=0.9, ao=1.1, ab=0.5)
    lim = tp.PiLimit(spec, state=random_biases(spec, tp.pi.init_state(spec, seed=1)))
    lim.step(*data(N=2, d=2, seed=3), 0.7)
    X, Y = data(N=2, d=2)
    _, _, dA1, db, _ = lim.gradients(X, Y)
    eps = 1e-6

    def fd(arr):
        out = np.empty(arr.size)
        for k in range(arr.size):
            vals = []
            for h in (eps, -eps):
                arr.flat[k] += h
                vals.append(lim.gradients(X, Y)[0].mean())
                arr.flat[k] -= h
            out[k] = (vals[0] - vals[1]) / (2 * eps)
        return out

    np.testing.assert_allclose(fd(lim.A1), dA1.ravel(), rtol=1e-6, atol=1e-9)
    for l in (1, 2, 3):
        np.testing.assert_allclose(fd(lim.b[l]), db[l], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Transforms derived from phi
# ---------------------------------------------------------------------------------------
def test_relu_transforms_are_designs_F00_F11_F02():
    T = tp.pi.transforms("relu")
    c = np.linspace(-0.999, 0.999, 41)
    for s in (0.3, 1.0, 4.0):
        F00 = np.array([f00(v) for v in c])
        F11 = np.array([f11(v) for v in c])
        F02 = np.array([f02(v) for v in c])
        np.testing.assert_allclose(T.t00(1.0, s * c, s * s), s * F00, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(T.t11(1.0, s * c, s * s), F11, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(T.t02(1.0, s * c, s * s), F02 / s, rtol=1e-13, atol=1e-15)
    # the fused Numba pass of the training step against the derived (generated) transforms
    rng = np.random.default_rng(0)
    k11, k22 = rng.uniform(0.1, 3.0, 50), rng.uniform(0.1, 3.0, 4)
    k12 = rng.uniform(-1, 1, (4, 50)) * np.sqrt(np.outer(k22, k11))
    for fused, generic in zip(T.all_three(k11, k12, k22), (T.t00, T.t11, T.t02)):
        np.testing.assert_allclose(fused, generic(k11[None, :], k12, k22[:, None]), rtol=1e-12, atol=1e-15)


def gauss2(f, g, k11, k12, k22):
    """E[f(u) g(v)] by adaptive 2-D quadrature (scipy), u = a z1, v = b z1 + c z2."""
    a = math.sqrt(k11)
    b = k12 / a
    c = math.sqrt(max(k22 - b * b, 0.0))
    dens = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    val, _ = integrate.dblquad(lambda z2, z1: f(a * z1) * g(b * z1 + c * z2) * dens(z1) * dens(z2),
                               -9, 9, -9, 9, epsabs=1e-12, epsrel=1e-11)
    return val


@pytest.mark.parametrize("phi", ["erf", "tanh"])
def test_smooth_transforms_against_scipy_quadrature(phi):
    """T00, T11 (and T02 for erf, via Price's theorem) against scipy's dblquad."""
    from scipy.special import erf
    fs = {
        "erf": (erf, lambda z: 2 / math.sqrt(math.pi) * math.exp(-z * z),
                lambda z: -4 * z / math.sqrt(math.pi) * math.exp(-z * z)),
        "tanh": (math.tanh, lambda z: 1 - math.tanh(z) ** 2, None),
    }[phi]
    T = tp.pi.transforms(phi)
    for k11, k12, k22 in [(1.0, 0.3, 2.0), (0.5, -0.4, 0.8), (2.5, 1.9, 1.7)]:
        assert abs(T.t00(k11, k12, k22) - gauss2(fs[0], fs[0], k11, k12, k22)) < 1e-9
        assert abs(T.t11(k11, k12, k22) - gauss2(fs[1], fs[1], k11, k12, k22)) < 1e-9
        if fs[2] is not None:
            assert abs(T.t02(k11, k12, k22) - gauss2(fs[0], fs[2], k11, k12, k22)) < 1e-9


# ---------------------------------------------------------------------------------------
# The compiler's pairwise-Gaussian machinery on programs/pinet.py
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("phi, depth", [("relu", 2), ("erf", 2), ("relu", 6)])
def test_init_forward_equals_compiled_pinet_program(phi, depth):
    """(Depth 6: the pairwise limit evaluates each template call once where it is; written
    out, a pi-net's values grew about seven-fold with every layer: depth 4 took 4.5 s, 5
    30 s.)"""
    prog = tp.load("programs/pinet.py", depth=depth, r=3, d=2, dout=2, phi=phi, alpha_first=0.7, alpha_last=1.3, seed=4)
    spec = tp.PiSpec.from_program(prog)
    assert (spec.depth, spec.r, spec.d, spec.dout, spec.phi, spec.a1, spec.ao, spec.bias) == (depth, 3, 2, 2, phi, 0.7, 1.3, False)
    X = prog.graph.inputs["xi"].default
    res = tp.compile(prog).limit(x=X, method="pairwise")
    compiled = np.array([[res[f"f{k + 1}[{i}]"][0] for k in range(2)] for i in range(len(X))])
    np.testing.assert_allclose(tp.PiLimit(spec, seed=prog.pi_seed).forward(X), compiled, rtol=1e-9, atol=1e-13)


# ---------------------------------------------------------------------------------------
# Finite pi-nets converge to the limit like n^{-1/2}
# ---------------------------------------------------------------------------------------
WIDTHS = (256, 1024, 4096)
SEEDS = 12
CONVERGENCE = [
    dict(phi="relu", depth=2, bias=False, wd=0.0, clip=None),
    dict(phi="relu", depth=3, bias=True, wd=1e-2, clip=0.03),
    dict(phi="erf", depth=2, bias=True, wd=0.0, clip=0.03),
    dict(phi="erf", depth=3, bias=False, wd=1e-2, clip=None),
]


@pytest.mark.parametrize("case", CONVERGENCE, ids=lambda c: f"{c['phi']}-L{c['depth']}-bias{int(c['bias'])}-"
                         f"wd{c['wd']}-clip{c['clip']}")
def test_finite_pi_net_converges_to_limit(case):
    """Outputs and first-layer weights (A1 against the finite K1^T, W^1 = Omega_1 K1) after
    three SGD steps: the error falls like n^{-1/2} and the seed mean at the top width agrees
    with the limit.  A1 is the sensitive check of the backward pass (halving T02 moves it by
    ~15 standard errors at n = 4096)."""
    spec = tp.PiSpec(depth=case["depth"], r=4, d=3, dout=2, phi=case["phi"], bias=case["bias"], ab=0.5)
    state = tp.pi.init_state(spec, seed=3)
    if spec.bias:
        state = random_biases(spec, state)
    X, Y = data(N=3)
    opts = dict(wd=case["wd"], clip=case["clip"], mult=dict(first=0.5, last=2.0, bias=0.5))

    def train(engine, clip=case["clip"]):
        for _ in range(3):
            engine.step(X, Y, 1.0, **{**opts, "clip": clip})
        first = engine.A1 if isinstance(engine, tp.PiLimit) else engine.K[1].T
        return engine.forward(X), first

    limit = train(tp.PiLimit(spec, state=state))
    if case["clip"] is not None:  # clipping changes the trajectory by much more than the tolerances
        assert np.abs(train(tp.PiLimit(spec, state=state), clip=None)[0] - limit[0]).max() > 0.05 * np.abs(limit[0]).max()
    runs = {n: [train(PiFinite(spec, n, state=state, seed=s)) for s in range(SEEDS)] for n in WIDTHS}
    for k, what in enumerate(("outputs", "A1")):
        rms = [np.sqrt(np.mean([(run[k] - limit[k]) ** 2 for run in runs[n]])) for n in WIDTHS]
        slope = np.polyfit(np.log(WIDTHS), np.log(rms), 1)[0]
        assert -0.8 < slope < -0.3, (what, slope, rms)
        top = np.array([run[k] - limit[k] for run in runs[WIDTHS[-1]]])
        z = top.mean(axis=0) / (top.std(axis=0, ddof=1) / math.sqrt(SEEDS))
        assert np.all(np.abs(z) < 4.0), (what, z)


@pytest.mark.parametrize("phi", ["relu", "erf"])
def test_finite_clip_norms_converge_to_the_limits_norms(phi):
    """The norm each tensor is clipped with (limit: sqrt(tr(A~^T V A~)) for a layer's new rows,
    |dA1|, |db|) is the limit of the finite network's norm of the same update."""
    spec = tp.PiSpec(depth=2, r=4, d=3, dout=2, phi=phi, bias=True, ab=0.5)
    state = random_biases(spec, tp.pi.init_state(spec, seed=3))
    X, Y = data(N=3)
    lim = tp.PiLimit(spec, state=state)
    _, dg, dA1, db, cache = lim.gradients(X, Y)
    expected = {("K", 1): np.linalg.norm(dA1), **{("c", l): np.linalg.norm(v) for l, v in db.items()}}
    for l in spec.layers():
        expected[("K", l)] = lim.rows_norm(*lim.new_rows(l, cache.g[l - 2], dg[l]))
    errs = {n: [] for n in (1024, 16384)}
    for n in errs:
        for seed in range(4):
            fin = PiFinite(spec, n, state=state, seed=seed)
            hs, out = fin._forward(X)
            updates = fin._updates(X, hs, tp.pi.loss_and_delta(out, Y, "softmax")[1])
            errs[n].append([updates[key][1] / value - 1 for key, value in expected.items()])
    rms = {n: np.sqrt(np.mean(np.square(e))) for n, e in errs.items()}
    assert rms[16384] < 0.05 and rms[16384] < 0.5 * rms[1024], rms


# ---------------------------------------------------------------------------------------
# State, interface, bad input
# ---------------------------------------------------------------------------------------
def test_init_state_follows_pilimit_orig():
    spec = tp.PiSpec(depth=2, r=6, d=4, dout=3, bias=True)
    s = tp.pi.init_state(spec, seed=0)
    assert s["A1"].shape == (4, 6) and np.allclose(np.linalg.norm(s["A1"], axis=0), 1.0)
    for l in (2, 3):
        assert np.allclose(np.linalg.norm(s[f"B{l}"], axis=1), 1.0) and s[f"B{l}"].shape == (6, 6)
        assert np.all(s[f"Amult{l}"] == 1.0)
    assert s["A2"].shape == (6, 6) and s["A3"].shape == (6, 3)
    assert all(np.all(s[f"b{l}"] == 0) for l in (1, 2, 3)) and s["b3"].shape == (3,)
    big = tp.pi.init_state(tp.PiSpec(depth=2, r=400, d=4, dout=3), seed=1)  # scales of A: 1/M0 and 1/M0^2
    assert abs(big["A2"].var() * 400 - 1) < 0.02 and abs(big["A3"].var() * 400**2 - 1) < 0.1


def test_save_load_round_trip_and_fit(tmp_path):
    spec = tp.PiSpec(depth=2, r=3, d=3, dout=2, bias=True)
    X, Y = data(N=4)
    for make, cls in ((lambda: tp.PiLimit(spec, seed=1, clip=0.5, wd=1e-3), tp.PiLimit),
                      (lambda: PiFinite(spec, 64, seed=1, clip=0.5), PiFinite)):
        eng = make()
        hist = tp.fit(eng, X, Y, steps=3, lr=0.5, batch=2)
        assert len(hist.loss) == 3
        eng.save(tmp_path / "s.npz")
        back = cls.load(tmp_path / "s.npz", spec)
        for k, v in eng.state().items():
            assert np.array_equal(v, back.state()[k]), k
        # same numbers up to rounding (BLAS may block arrays of another capacity differently)
        np.testing.assert_allclose(back.step(X, Y, 0.3), eng.step(X, Y, 0.3), rtol=1e-13)
        np.testing.assert_allclose(back.predict(X)[0], eng.predict(X)[0], rtol=1e-12, atol=1e-16)


def test_a_diverged_state_is_refused_not_stepped_on():
    """phi = exp at a learning rate of 50: the first step overflows the state, and the next
    step carried the NaN on silently, in the limit and at finite width (audit).  It is now
    refused, as the step engine refuses a non-finite output (a ProgramError: tpc prints one line);
    so is a forward pass (predict) of such a state, which returned NaN without a word (QA)."""
    spec = tp.PiSpec(depth=2, r=3, d=3, dout=2, phi="exp")
    X = np.random.default_rng(0).standard_normal((4, 3))
    Y = np.eye(2)[[0, 1, 0, 1]]
    for eng in (tp.PiLimit(spec), PiFinite(spec, width=64)):
        with np.errstate(all="ignore"):
            eng.step(X, Y, 50.0)
            for look in (eng.forward, eng.predict):
                with pytest.raises(tp.ProgramError, match="pi-net forward: the network's output is not finite"):
                    look(X)
            with pytest.raises(tp.ProgramError, match="output is not finite .*smaller learning rate"):
                eng.step(X, Y, 50.0)


def test_bad_state_and_parameters_give_one_line_errors():
    spec = tp.PiSpec(depth=2, r=4, d=3, dout=2)
    good = tp.pi.init_state(spec, seed=0)
    cases = [
        ({**good, "A1": np.zeros((5, 4))}, "'A1' has shape (5, 4), expected (3, 4)"),
        ({**good, "B2": good["B2"][:3]}, "'B2' has shape (3, 4), expected (4, 4)"),
        ({**good, "A3": np.zeros((4, 3))}, "'A3' has shape (4, 3), expected (M, 2)"),
        ({k: v for k, v in good.items() if k != "Amult3"}, "key 'Amult3' is missing"),
        ({**good, "B3": 2 * good["B3"]}, "row 0 of 'B3' has norm 2"),
    ]
    for state, text in cases:
        with pytest.raises(ValueError) as err:
            tp.PiLimit(spec, state=state)
        assert text in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="r = 4 is larger than the width n = 3"):
        PiFinite(spec, 3)
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        tp.PiSpec(depth=0, r=4, d=3, dout=2)
    with pytest.raises(ValueError, match="loss must be one of"):
        tp.PiLimit(spec, loss="hinge")
    with pytest.raises(ValueError, match="is not a pi-net"):
        tp.PiSpec.from_program(tp.load("programs/mlp.py"))
    with pytest.raises(ValueError, match="cannot read"):
        tp.PiLimit(spec, state="no-such-state.npz")
    with pytest.raises(ValueError, match="X: expected an"):
        tp.PiLimit(spec).step(np.zeros((2, 5)), np.zeros((2, 2)), 0.1)
    # abs and step: a Dirac delta in phi' or phi'' (it failed with the expectation builder's
    # message alone, which never named phi or the pi-net: audit)
    for phi in ("abs", "step"):
        with pytest.raises(ValueError, match=f"pi-net: phi '{phi}' cannot be its nonlinearity: the pi-limit needs"):
            tp.PiLimit(tp.PiSpec(depth=1, r=2, d=3, dout=2, phi=phi))


def test_a_finite_width_that_does_not_fit_is_refused_before_allocating(monkeypatch):
    """At width 10^8 the finite pi-net's arrays grew until the system killed the process (exit
    137, no message; a helper's audit of `tpc train --param pi --width 100000000`).  The
    weights are now refused before they are allocated, and so is a batch whose activations
    would not fit (the available memory pretended here: 1 GB, then 1 MB)."""
    from tpcompiler import memory

    spec = tp.PiSpec(depth=2, r=3, d=3, dout=2)
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**9)
    with pytest.raises(ValueError, match=r"PiFinite: at width n = 100,000,000 its weights need about .* GB, but this "
                                         r"machine has 1 GB available; use a smaller width") as err:
        PiFinite(spec, 10**8)
    assert "\n" not in str(err.value)
    net = PiFinite(spec, 1000)  # 1000 x 3 bases: fits
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**6)
    X, Y = np.ones((64, 3)), np.eye(2)[np.arange(64) % 2]
    with pytest.raises(ValueError, match="the 64 examples' activations need about"):
        net.step(X, Y, 0.1)
    with pytest.raises(ValueError, match="the 64 examples' activations need about"):
        net.forward(X)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: not refused
    assert np.isfinite(net.step(X, Y, 0.1)).all()
