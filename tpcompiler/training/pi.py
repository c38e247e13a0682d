"""The infinite-width limit of a pi-network, trained by SGD (docs/DESIGN.md 2.10, 2.7 strategy 2, 2.9).

A pi-net of ``depth`` L nonlinear layers keeps every pre-activation in an r-dimensional
Gaussian basis, h^l = Omega_l g^l, so its limit is a *state* of finite arrays (pilimit_orig's
conventions and keys): the input layer A1 (d x r), and for every later layer l = 2..L+1 rows
A_l (M_l x r; the readout M x dout), B_l (M_l x r) and Amult_l (M_l), with optional biases b_l.
Layer l's weight in the limit is the operator

    g  ->  sum_m Amult_m A_m T00(|B_m|^2, B_m.g, |g|^2),

T00(k11, k12, k22) = E[phi(u) phi(v)], (u, v) ~ N(0, [[k11, k12], [k12, k22]]) (u = B_m.w,
v = g.w, w ~ N(0, I_r)).  Forward:  g^1 = a1 (X A1 + ab b1);  g^l = (Amult * T00) A_l + ab b_l;
out = ao g^{L+1}.  Backward (Stein's lemma, d/dg E[phi(B.w) phi(g.w)] = B T11 + g T02 with
T11 = E[phi'(u) phi'(v)], T02 = E[phi(u) phi''(v)]):

    dg^{L+1} = ao delta,   dgam^l = (dg^l A_l^T) * Amult_l,
    dg^{l-1} = (dgam^l * T11) B_l + [sum_m dgam^l_m T02_m] g^{l-1},   dA1 = a1 X^T dg^1.

An SGD step appends one row per example to every layer l >= 2 (A~ = dg^l, B~ = g^{l-1},
Amult~ = -lr mult): the update -lr dh x^T / n of the finite network.  relu is positively
homogeneous, so it uses pilimit_orig's normalised rows (B~ = g/|g| of unit norm, A~ = dg |g|),
with which T00 = |g| F00(c), T11 = F11(c), T02 = F02(c) / |g| of DESIGN.md 2.10 at the
cosine c = B_m.g / |g|.  Weight decay first (A1, every existing Amult and the biases times
1 - lr wd), then per-tensor clipping of dA1, each layer's new rows and each db by
min(1, c / (1e-10 + norm)), with a layer's norm the limit's sqrt(tr(A~^T V A~)),
V_ij = T00(|B~_i|^2, B~_i.B~_j, |B~_j|^2), which is the Frobenius norm of the finite update.

The transforms are derived from phi (``Transforms``): T00 and T11 are the package's bivariate
Gaussian expectations (closed forms, else quadrature to 1e-10); T02 is E[phi phi''] in closed
form when one exists (relu: a Dirac delta), else Price's theorem T02 = 2 dT00/dk22 on T00's
closed form (erf), else quadrature (tanh, gelu, ...).
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import sympy as sp
import numba
from numba import njit, prange
from threadpoolctl import threadpool_limits

from tpcompiler import validation
from tpcompiler.expectations import K11, K12, K22, closed_form_pair, pair_expectation
from tpcompiler.expectations import special
from tpcompiler.ir.graph import ProgramError
from tpcompiler.ir.nonlinearities import NUMPY_FUNCTIONS, builtin

LOSSES = ("softmax", "mse")
MULT_KEYS = ("first", "last", "bias")


# ---------------------------------------------------------------------------------------
# Specification and state
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PiSpec:
    """A pi-net (docs/DESIGN.md 2.10): ``depth`` L nonlinear layers of rank ``r`` on inputs of
    dimension ``d`` with ``dout`` outputs, nonlinearity ``phi``, optional biases, and the
    scalar multipliers a1 (input layer), ao (readout), ab (biases)."""

    depth: int
    r: int
    d: int
    dout: int
    phi: str = "relu"
    bias: bool = False
    a1: float = 1.0
    ao: float = 1.0
    ab: float = 1.0

    def __post_init__(self):
        for name in ("depth", "r", "d", "dout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise validation.ArgumentError(f"PiSpec: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.phi, str):
            raise validation.ArgumentError(f"PiSpec: phi must be the name of a built-in nonlinearity, got {self.phi!r}")
        try:
            builtin(self.phi)
        except ValueError as exc:
            raise validation.ArgumentError(f"PiSpec: phi: {exc}") from None
        for name in ("a1", "ao", "ab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(value):
                raise validation.ArgumentError(f"PiSpec: {name} must be a finite number, got {value!r}")

    @property
    def normalised(self) -> bool:
        """relu keeps unit rows of B (pilimit_orig); other phi keep raw rows."""
        return self.phi == "relu"

    def layers(self) -> range:
        """The layers with rows: 2..depth+1 (depth+1 is the readout)."""
        return range(2, self.depth + 2)

    def columns(self, layer: int) -> int:
        """Width of A_l: r for hidden layers, dout for the readout."""
        return self.dout if layer == self.depth + 1 else self.r

    def bias_size(self, layer: int) -> int:
        return self.dout if layer == self.depth + 1 else self.r

    def shapes(self, rows: dict | None = None) -> dict:
        """The expected shape of every state key (``rows``: M_l per layer, None for any)."""
        rows = rows or {}
        out = {"A1": (self.d, self.r)}
        for l in self.layers():
            m = rows.get(l)
            out[f"A{l}"] = (m, self.columns(l))
            out[f"B{l}"] = (m, self.r)
            out[f"Amult{l}"] = (m,)
        if self.bias:
            for l in range(1, self.depth + 2):
                out[f"b{l}"] = (self.bias_size(l),)
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PiSpec":
        return cls(**json.loads(text))

    @classmethod
    def from_program(cls, program) -> "PiSpec":
        """The spec a ``programs/pinet.py`` program declares (its ``pi_spec`` metadata)."""
        meta = getattr(program, "pi_spec", None)
        if not isinstance(meta, dict):
            raise validation.ArgumentError(f"program {getattr(program, 'name', program)!r} is not a pi-net "
                                           "(no pi_spec metadata; build it with programs/pinet.py)")
        return cls(**meta)


def _unit_rows(rng, m: int, k: int) -> np.ndarray:
    x = rng.standard_normal((m, k))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def init_state(spec: PiSpec, seed: int = 0) -> dict:
    """pilimit_orig's initialisation (docs/DESIGN.md 2.10), M0 = r rows per layer: A1 with
    unit-norm Gaussian columns, B with unit-norm Gaussian rows, hidden A ~ N(0, 1/M0),
    readout A ~ N(0, 1/M0^2), Amult = 1, biases 0."""
    rng = np.random.default_rng(seed)
    m0 = spec.r
    state = {"A1": _unit_rows(rng, spec.r, spec.d).T.copy()}
    for l in spec.layers():
        std = 1.0 / m0 if l == spec.depth + 1 else 1.0 / math.sqrt(m0)
        state[f"A{l}"] = std * rng.standard_normal((m0, spec.columns(l)))
        state[f"B{l}"] = _unit_rows(rng, m0, spec.r)
        state[f"Amult{l}"] = np.ones(m0)
    if spec.bias:
        for l in range(1, spec.depth + 2):
            state[f"b{l}"] = np.zeros(spec.bias_size(l))
    return state


def check_state(spec: PiSpec, state: dict) -> dict:
    """The state as float64 arrays, or a one-line ValueError naming the key that does not fit
    ``spec`` (missing, wrong shape, not finite, rows of B not of unit norm for relu)."""
    if not isinstance(state, dict):
        raise validation.ArgumentError(f"pi state: expected a dict of arrays, got {type(state).__name__}")
    out = {}
    rows = {}
    for key, shape in spec.shapes().items():
        if key not in state:
            raise validation.ArgumentError(f"pi state: key {key!r} is missing (expected shape {_shape_text(shape)})")
        a = np.asarray(state[key], dtype=np.float64)
        layer = _layer_of(key)
        if shape[0] is None and layer in rows:
            shape = (rows[layer],) + shape[1:]
        if a.ndim != len(shape) or any(e is not None and e != g for e, g in zip(shape, a.shape)):
            raise validation.ArgumentError(f"pi state: {key!r} has shape {a.shape}, expected {_shape_text(shape)} "
                                           f"for {_describe(spec)}")
        if shape[0] is None:
            rows[layer] = a.shape[0]
        if not np.all(np.isfinite(a)):
            raise validation.ArgumentError(f"pi state: {key!r} has non-finite entries")
        out[key] = a
    extra = sorted(k for k in state if k not in out and not k.startswith("_"))
    if extra:
        raise validation.ArgumentError(f"pi state: unexpected key {extra[0]!r} for {_describe(spec)}")
    if spec.normalised:
        for l in spec.layers():
            norms = np.linalg.norm(out[f"B{l}"], axis=1)
            bad = np.flatnonzero(np.abs(norms - 1.0) > 1e-6)
            if bad.size:
                raise validation.ArgumentError(f"pi state: row {bad[0]} of 'B{l}' has norm {norms[bad[0]]:.6g}; relu pi-nets "
                                               "need unit-norm rows of B (pilimit_orig's convention)")
    return out


def _layer_of(key: str) -> int:
    return int(key.lstrip("ABmultb"))


def _shape_text(shape) -> str:
    return "(" + ", ".join("M" if e is None else str(e) for e in shape) + ("," if len(shape) == 1 else "") + ")"


def _describe(spec: PiSpec) -> str:
    return f"depth={spec.depth}, r={spec.r}, d={spec.d}, dout={spec.dout}, bias={spec.bias}"


def save_metadata(engine) -> dict:
    """The metadata keys of a saved engine: '_spec', '_options', '_method', '_steps_done' (the
    steps its run has taken: a loaded engine's ``tp.fit`` continues the batch cycle and the
    learning-rate schedule there) and '_run' (JSON, ``engine.run``: what the run was trained
    with, when the caller set it; ``tpc train --resume`` compares it)."""
    meta = dict(_spec=np.array(engine.spec.to_json()), _options=np.array(json.dumps(engine.options())),
                _method=np.array(engine.method), _steps_done=np.array(engine.steps_done))
    if engine.run is not None:
        meta["_run"] = np.array(json.dumps(engine.run))
    return meta


def restore_progress(engine, meta: dict) -> None:
    """``steps_done`` and ``saved_run`` of an engine loaded from a file with ``meta``
    (``save_metadata``; a file written before them: a run at step 0, no settings)."""
    engine.steps_done = int(meta.get("_steps_done", 0))
    engine.saved_run = json.loads(meta["_run"]) if "_run" in meta else None


def spec_and_options(path, meta: dict, spec, kwargs: dict):
    """(spec, constructor options) of a saved engine: the given ones first, else its metadata."""
    if spec is None:
        if "_spec" not in meta:
            raise validation.ArgumentError(f"{path}: no '_spec' metadata; pass the PiSpec")
        spec = PiSpec.from_json(meta["_spec"])
    saved = json.loads(meta["_options"]) if "_options" in meta else {}
    return spec, {**saved, **kwargs}


def load_state_file(path) -> tuple[dict, dict]:
    """(state arrays, metadata strings) of a .npz state file; metadata keys start with '_'."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError:  # (numpy: "... pickled data ...", for any file that is not .npy/.npz)
        raise validation.ArgumentError("not a .npz state file (not a numpy file at all; a state has several named "
                                       "arrays, as --save-state and np.savez write them)") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy: one bare array
        raise validation.ArgumentError("not a .npz state file (a state has several named arrays, as --save-state and "
                                       "np.savez write them)")
    with loaded as z:
        data = {k: z[k] for k in z.files}
    meta = {k: str(v) for k, v in data.items() if _is_metadata(k)}
    return {k: v for k, v in data.items() if not _is_metadata(k)}, meta


def _is_metadata(key: str) -> bool:
    return key.startswith("_")


def state_metadata(path) -> dict:
    """The metadata strings of a .npz state file alone (``load_state_file``'s second part,
    without reading its arrays: the rows of a long run); empty if it is no readable .npz."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: str(z[k]) for k in z.files if _is_metadata(k)}
    except (OSError, ValueError, AttributeError, TypeError):  # (AttributeError: a .npy has no files)
        return {}


# ---------------------------------------------------------------------------------------
# Transforms derived from phi
# ---------------------------------------------------------------------------------------
class Transforms:
    """T00 = E[phi(u) phi(v)], T11 = E[phi'(u) phi'(v)], T02 = E[phi(u) phi''(v)] for
    (u, v) ~ N(0, [[k11, k12], [k12, k22]]), derived from phi (docs/DESIGN.md 2.10)."""

    def __init__(self, phi: str):
        x = sp.Symbol("x", real=True)
        f = builtin(phi)(x)
        lam = [sp.Lambda(x, sp.diff(f, x, k)) for k in range(3)]
        self.phi = phi
        try:
            self._t00 = pair_expectation(lam[0], lam[0])
            self._t11 = pair_expectation(lam[1], lam[1])
            self._t02, self.t02_method = self._second(lam)
        except ValueError as exc:  # (abs, step: a Dirac delta in phi' or phi'' without a closed form)
            raise validation.ArgumentError(f"pi-net: phi {phi!r} cannot be its nonlinearity: the pi-limit needs "
                                           f"E[phi phi], E[phi' phi'] and E[phi phi''] (docs/DESIGN.md 2.10), and {exc}") from None
        self.numpy_phi = _numpy(lam[0])
        self.numpy_dphi = _numpy(lam[1]) if phi != "relu" else (lambda z: (z > 0).astype(np.float64))

    def _second(self, lam):
        try:
            pe = pair_expectation(lam[0], lam[2], strategy="closed")
            return pe.evaluate, pe.method
        except ValueError:
            pass
        t00 = closed_form_pair(lam[0], lam[0])
        if t00 is not None:
            expr = 2 * sp.diff(special.written_out(t00), K22)
            if not expr.has(sp.Derivative, sp.core.function.AppliedUndef):
                fn = sp.lambdify((K11, K12, K22), expr, modules=[NUMPY_FUNCTIONS, "numpy", "scipy"])
                return (lambda a, b, c: np.broadcast_to(fn(a, b, c), np.broadcast_shapes(
                    np.shape(a), np.shape(b), np.shape(c))).astype(np.float64)), \
                    "Price's theorem: 2 d/dk22 of the closed form of E[phi phi]"
        pe = pair_expectation(lam[0], lam[2])
        return pe.evaluate, pe.method

    def t00(self, k11, k12, k22):
        return self._t00.evaluate(k11, k12, k22)

    def all_three(self, k11: np.ndarray, k12: np.ndarray, k22: np.ndarray):
        """(T00, T11, T02) over a (B x M) block, k11 of shape (M,), k22 of shape (B,).

        relu: one fused Numba pass sharing the angle (11x faster than three generated
        evaluations, measured at 8 x 40000); tests check it against the derived transforms.
        Where k22 = 0 (g = 0) T02 is set to 0: its term g T02 vanishes."""
        if self.phi == "relu":
            out = [np.empty(k12.shape) for _ in range(3)]
            _relu_transforms(np.ascontiguousarray(k11), np.ascontiguousarray(k12), np.ascontiguousarray(k22), *out)
            return tuple(out)
        a, c = k11[None, :], k22[:, None]
        zero = k22 == 0.0
        t02 = self.t02(a, k12, np.where(zero[:, None], 1.0, c))
        t02[zero] = 0.0
        return self.t00(a, k12, c), self.t11(a, k12, c), t02

    def t11(self, k11, k12, k22):
        return self._t11.evaluate(k11, k12, k22)

    def t02(self, k11, k12, k22):
        return self._t02(k11, k12, k22)


@njit(parallel=True, cache=True, error_model="numpy")
def _relu_transforms(k11, k12, k22, t00, t11, t02):  # pragma: no cover - compiled
    """relu's closed forms (docs/DESIGN.md 2.8, 2.10): with c = k12 / sqrt(k11 k22),
    T00 = sqrt(k11 k22) F00(c), T11 = F11(c), T02 = sqrt(k11 / k22) F02(c)."""
    B, M = k12.shape
    for b in prange(B):
        s2 = math.sqrt(k22[b])
        for m in range(M):
            s1 = math.sqrt(k11[m])
            if s1 == 0.0 or s2 == 0.0:
                t00[b, m] = 0.0
                t11[b, m] = 0.0
                t02[b, m] = 0.0
                continue
            c = min(1.0, max(-1.0, k12[b, m] / (s1 * s2)))
            sd = math.sqrt(max(1.0 - c * c, 0.0))
            th = math.pi - math.acos(c)
            t00[b, m] = s1 * s2 * (sd + th * c) / (2.0 * math.pi)
            t11[b, m] = th / (2.0 * math.pi)
            t02[b, m] = s1 / s2 * sd / (2.0 * math.pi)


def _numpy(lam: sp.Lambda):
    f = sp.lambdify(lam.variables[0], lam.expr, modules=[NUMPY_FUNCTIONS, "numpy", "scipy"])
    return lambda z: np.broadcast_to(np.asarray(f(z), dtype=np.float64), np.shape(z))


_TRANSFORMS: dict = {}


def transforms(phi: str) -> Transforms:
    """The (process-cached) transforms of phi."""
    if phi not in _TRANSFORMS:
        _TRANSFORMS[phi] = Transforms(phi)
    return _TRANSFORMS[phi]


# ---------------------------------------------------------------------------------------
# Losses and options shared by the limit and the finite pi-net
# ---------------------------------------------------------------------------------------
def finite_outputs(out: np.ndarray, where: str) -> np.ndarray:
    """``out``, or a ProgramError if some output is not finite: a diverged or overflowed state
    (phi = exp at large inputs reaches 1e66 after one step), which a step would carry on and a
    forward pass would return as NaN without a word."""
    if not np.all(np.isfinite(out)):
        raise ProgramError(f"pi-net {where}: the network's output is not finite (training diverged, or phi "
                           "overflowed at these inputs); use a smaller learning rate or smaller inputs")
    return out


def loss_and_delta(out: np.ndarray, Y: np.ndarray, loss: str):
    """Per-example losses (B,) and delta = d(mean loss)/d out (B, dout); a ProgramError if the
    outputs are not finite (``finite_outputs``)."""
    finite_outputs(out, "step")
    B = out.shape[0]
    if loss == "softmax":
        z = out - out.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -(Y * logp).sum(axis=1), (np.exp(logp) * Y.sum(axis=1, keepdims=True) - Y) / B
    diff = out - Y
    return 0.5 * (diff**2).sum(axis=1), diff / B


def clip_factor(norm: float, clip) -> float:
    """min(1, c / (1e-10 + norm)) (1 when clip is None)."""
    return 1.0 if clip is None else min(1.0, clip / (1e-10 + norm))


def check_options(wd, clip, mult, loss=None) -> tuple[float, float | None, dict]:
    """(wd, clip, the multipliers of every key of MULT_KEYS) checked (a bias multiplier is
    read only by a pi-net with biases)."""
    if loss is not None and loss not in LOSSES:
        raise validation.ArgumentError(f"loss must be one of {LOSSES}, got {loss!r}")
    wd = float(wd)
    if not math.isfinite(wd) or wd < 0:
        raise validation.ArgumentError(f"wd must be a finite number >= 0, got {wd!r}")
    if clip is not None:
        clip = float(clip)
        if not clip > 0:
            raise validation.ArgumentError(f"clip must be a positive number or None, got {clip!r}")
    full = dict.fromkeys(MULT_KEYS, 1.0)
    for k, v in (mult or {}).items():
        if k not in MULT_KEYS:
            raise validation.ArgumentError(f"mult: unknown key {k!r} (use {', '.join(MULT_KEYS)})")
        full[k] = validation.number(v, f"mult[{k!r}]", nonnegative=True)
    return wd, clip, full


def check_batch(spec: PiSpec, X, Y=None):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != spec.d:
        raise validation.ArgumentError(f"X: expected an (N, d = {spec.d}) array, got shape {X.shape}")
    if Y is None:
        return X
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1 and spec.dout == 1:
        Y = Y[:, None]
    if Y.shape != (X.shape[0], spec.dout):
        raise validation.ArgumentError(f"Y: expected shape ({X.shape[0]}, dout = {spec.dout}), got {Y.shape}")
    return X, Y


# ---------------------------------------------------------------------------------------
# The limit
# ---------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """Rows of one layer l >= 2 in pre-allocated arrays (grown geometrically)."""

    A: np.ndarray
    B: np.ndarray
    Amult: np.ndarray
    sq: np.ndarray  # |B_m|^2
    m: int = 0

    @classmethod
    def of(cls, A, B, Amult, capacity: int = 0) -> "_Layer":
        m = A.shape[0]
        cap = max(capacity, m, 1)
        layer = cls(np.empty((cap, A.shape[1])), np.empty((cap, B.shape[1])), np.empty(cap), np.empty(cap), 0)
        layer.append(A, B, Amult)
        return layer

    def reserve(self, rows: int) -> None:
        if rows <= self.A.shape[0]:
            return
        for name in ("A", "B", "Amult", "sq"):
            old = getattr(self, name)
            new = np.empty((rows,) + old.shape[1:])
            new[: self.m] = old[: self.m]
            setattr(self, name, new)

    def append(self, A, B, Amult) -> None:
        k = A.shape[0]
        if self.m + k > self.A.shape[0]:
            self.reserve(max(2 * self.A.shape[0], self.m + k))
        sl = slice(self.m, self.m + k)
        self.A[sl], self.B[sl], self.Amult[sl] = A, B, Amult
        self.sq[sl] = np.einsum("ij,ij->i", B, B)
        self.m += k

    def view(self):
        m = self.m
        return self.A[:m], self.B[:m], self.Amult[:m], self.sq[:m]


@dataclass
class _Cache:
    """What the backward pass needs from the forward pass of one batch."""

    X: np.ndarray
    g: list = field(default_factory=list)  # g^1 .. g^{L+1}
    dT: dict = field(default_factory=dict)  # layer -> (T11, T02) over (B, M)
    out: np.ndarray | None = None


@contextlib.contextmanager
def limited_threads(threads: int | None):
    """At most ``threads`` BLAS and Numba threads inside the block (None: the libraries'
    defaults).  Measured on the shared 2-core machine (load ~13): a step at M = 1000 rows took
    610 ms with the default threads and 32 ms with one, at M = 40000 1530 ms against 640 ms."""
    if threads is None:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(threads, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(before)


def weighted_rows(w: np.ndarray, R: np.ndarray) -> np.ndarray:
    """w @ R for a short-and-wide w (B x M) and tall R (M x k), computed as (R^T w^T)^T: the
    same product, but OpenBLAS's threaded gemm is up to 50x slower on the first layout when
    the cores are busy (measured: 1.2 s against 30 ms for 8 x 10000 by 10000 x 200)."""
    return (R.T @ w.T).T


class PiLimit:
    """The infinite-width pi-net (docs/DESIGN.md 2.10): deterministic forward, backward and
    SGD step by concatenation, on a state of pilimit_orig's keys.  See the module docstring
    for the equations; ``state`` is None (``init_state(spec, seed)``), a dict or a .npz path."""

    method = "pi-limit"

    def __init__(self, spec: PiSpec, state=None, seed: int = 0, loss: str = "softmax",
                 wd: float = 0.0, clip=None, mult=None, chunk: int = 128, threads: int | None = 1):
        if not isinstance(spec, PiSpec):
            raise validation.ArgumentError(f"PiLimit: spec must be a PiSpec, got {type(spec).__name__}")
        self.spec = spec
        self.loss = loss
        self.wd, self.clip, self.mult = check_options(wd, clip, mult, loss)
        self.chunk = int(chunk)
        self.threads = threads
        self.T = transforms(spec.phi)
        self._set_state(_resolve_state(spec, state, seed))
        #: SGD steps taken by this engine's run (``tp.fit`` continues from there; saved)
        self.steps_done = 0
        #: what the caller's run trains with (saved), and what a loaded state's run trained with
        self.run: dict | None = None
        self.saved_run: dict | None = None

    def _set_state(self, state: dict) -> None:
        spec = self.spec
        self.A1 = state["A1"].copy()
        self.layers = {l: _Layer.of(state[f"A{l}"], state[f"B{l}"], state[f"Amult{l}"]) for l in spec.layers()}
        self.b = {l: state[f"b{l}"].copy() for l in range(1, spec.depth + 2)} if spec.bias else {}

    # -- state ------------------------------------------------------------------------
    def reserve(self, rows: int) -> None:
        """Room for ``rows`` more rows in every layer (no reallocation while training)."""
        for layer in self.layers.values():
            layer.reserve(layer.m + int(rows))

    def rows(self) -> dict:
        return {l: layer.m for l, layer in self.layers.items()}

    def state(self) -> dict:
        out = {"A1": self.A1.copy()}
        for l, layer in self.layers.items():
            A, B, Amult, _ = layer.view()
            out[f"A{l}"], out[f"B{l}"], out[f"Amult{l}"] = A.copy(), B.copy(), Amult.copy()
        for l, b in self.b.items():
            out[f"b{l}"] = b.copy()
        return out

    def options(self) -> dict:
        """The constructor's training options (saved with the state)."""
        return dict(loss=self.loss, wd=self.wd, clip=self.clip, mult=dict(self.mult))

    def save(self, path) -> None:
        """The state under pilimit_orig's keys, plus '_spec' and '_options' (JSON) metadata."""
        np.savez(path, **self.state(), **save_metadata(self))

    @classmethod
    def load(cls, path, spec: PiSpec | None = None, **kwargs):
        """An engine from a saved .npz (spec and options from its metadata unless given)."""
        state, meta = load_state_file(path)
        spec, kwargs = spec_and_options(path, meta, spec, kwargs)
        engine = cls(spec, state=check_state(spec, state), **kwargs)
        restore_progress(engine, meta)
        return engine

    # -- forward and backward -------------------------------------------------------------
    def _layer_forward(self, l: int, g_prev: np.ndarray, train: bool):
        """(g^l without bias, (T11, T02) when training else None) of layer l for the batch."""
        A, B, Amult, sq = self.layers[l].view()
        k12 = g_prev @ B.T
        k22 = np.einsum("ij,ij->i", g_prev, g_prev)
        if train or self.T.phi == "relu":  # relu's fused pass is faster than T00 alone
            gam, t11, t02 = self.T.all_three(sq, k12, k22)
        else:
            gam, t11, t02 = self.T.t00(sq[None, :], k12, k22[:, None]), None, None
        gam *= Amult
        return weighted_rows(gam, A), (t11, t02) if train else None

    def _forward(self, X: np.ndarray, train: bool = False) -> _Cache:
        spec = self.spec
        cache = _Cache(X)
        g = spec.a1 * (X @ self.A1 + spec.ab * self.b[1]) if spec.bias else spec.a1 * (X @ self.A1)
        cache.g.append(g)
        for l in spec.layers():
            g, cache.dT[l] = self._layer_forward(l, g, train)
            if spec.bias:
                g = g + spec.ab * self.b[l]
            cache.g.append(g)
        cache.out = spec.ao * g
        return cache

    def _backward(self, cache: _Cache, delta: np.ndarray) -> tuple[dict, np.ndarray, dict]:
        """(dg per layer 1..L+1, dA1, db per layer): gradients of the mean loss."""
        spec = self.spec
        dg = {spec.depth + 1: spec.ao * delta}
        for l in reversed(spec.layers()):
            A, B, Amult, _ = self.layers[l].view()
            g_prev = cache.g[l - 2]
            t11, t02 = cache.dT[l]
            dgam = (dg[l] @ A.T) * Amult
            dg[l - 1] = weighted_rows(dgam * t11, B) + np.einsum("ij,ij->i", dgam, t02)[:, None] * g_prev
        dA1 = spec.a1 * cache.X.T @ dg[1]
        db = {}
        if spec.bias:
            db = {l: spec.ab * dg[l].sum(axis=0) for l in range(1, spec.depth + 2)}
            db[1] = spec.a1 * db[1]
        return dg, dA1, db

    def gradients(self, X, Y):
        """(per-example losses, dg, dA1, db, cache) at the current state (no update)."""
        X, Y = check_batch(self.spec, X, Y)
        cache = self._forward(X, train=True)
        losses, delta = loss_and_delta(cache.out, Y, self.loss)
        dg, dA1, db = self._backward(cache, delta)
        return losses, dg, dA1, db, cache

    def new_rows(self, l: int, g_prev: np.ndarray, dg: np.ndarray):
        """(A~, B~) of layer l for the batch: relu's unit rows (A~ = dg |g|, B~ = g/|g|), else
        the raw ones (A~ = dg, B~ = g)."""
        if not self.spec.normalised:
            return dg, g_prev
        s = np.sqrt(np.einsum("ij,ij->i", g_prev, g_prev))[:, None]
        unit = np.divide(g_prev, s, out=np.zeros_like(g_prev), where=s > 0)
        unit[s[:, 0] == 0, 0] = 1.0  # g = 0 adds a zero row (A~ = 0); any unit B~ will do
        return dg * s, unit

    def rows_norm(self, A_new: np.ndarray, B_new: np.ndarray) -> float:
        """sqrt(tr(A~^T V A~)), V_ij = T00(|B~_i|^2, B~_i.B~_j, |B~_j|^2): the limit's Frobenius norm
        of the update sum_b A~_b phi(B~_b . w)."""
        sq = np.einsum("ij,ij->i", B_new, B_new)
        V = self.T.t00(sq[:, None], B_new @ B_new.T, sq[None, :])
        return math.sqrt(max(float(np.einsum("ik,ij,jk->", A_new, V, A_new)), 0.0))

    # -- training ---------------------------------------------------------------------------
    def step(self, X, Y, lr, wd=None, clip=None, mult=None, outputs=None):
        """One SGD step on the batch (docs/DESIGN.md 2.10); returns the per-example losses
        before the step.  wd / clip / mult default to the constructor's."""
        wd, clip, mult = check_options(self.wd if wd is None else wd, self.clip if clip is None else clip,
                                       self.mult if mult is None else mult)
        with limited_threads(self.threads):
            losses = self._step(X, Y, validation.number(lr, "lr", nonnegative=True), wd, clip, mult)
        self.steps_done += 1
        return losses

    def _step(self, X, Y, lr, wd, clip, mult):
        spec = self.spec
        losses, dg, dA1, db, cache = self.gradients(X, Y)
        rows = {}
        for l in spec.layers():
            A_new, B_new = self.new_rows(l, cache.g[l - 2], dg[l])
            rows[l] = (A_new * clip_factor(self.rows_norm(A_new, B_new), clip), B_new)
        dA1 = dA1 * clip_factor(np.linalg.norm(dA1), clip)
        db = {l: v * clip_factor(np.linalg.norm(v), clip) for l, v in db.items()}
        if wd:
            decay = 1.0 - lr * wd
            self.A1 *= decay
            for layer in self.layers.values():
                layer.Amult[: layer.m] *= decay
            for b in self.b.values():
                b *= decay
        self.A1 -= lr * mult["first"] * dA1
        for l, (A_new, B_new) in rows.items():
            m = mult["last"] if l == spec.depth + 1 else 1.0
            if lr * m != 0.0:  # rows with Amult = 0 change nothing (pilimit_orig skips them too)
                self.layers[l].append(A_new, B_new, np.full(A_new.shape[0], -lr * m))
        for l, v in db.items():
            self.b[l] -= lr * mult["bias"] * v
        return losses

    def forward(self, X) -> np.ndarray:
        """The outputs (N, dout), in chunks of ``chunk`` rows."""
        X = check_batch(self.spec, X)
        with limited_threads(self.threads):
            outs = [self._forward(X[i:i + self.chunk]).out for i in range(0, X.shape[0], self.chunk)]
        return finite_outputs(np.concatenate(outs), "forward") if outs else np.zeros((0, self.spec.dout))

    def predict(self, X):
        f = self.forward(X)
        return f, np.zeros_like(f)


def _resolve_state(spec: PiSpec, state, seed) -> dict:
    if state is None:
        return init_state(spec, seed)
    if isinstance(state, dict):
        return check_state(spec, state)
    try:
        arrays, _ = load_state_file(state)
    except (OSError, ValueError) as exc:
        raise validation.ArgumentError(f"pi state: cannot read {str(state)!r}: {exc}") from None
    return check_state(spec, arrays)
