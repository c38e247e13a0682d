"""The step engine's runtime (docs/DESIGN.md 2.9): derive one SGD step once, run it many times.

``StepEngine(net, abc, method=...)`` derives the step (``training.step.derive_step``) and
keeps a *state*: every trained tensor as its initial value plus the updates recorded so far.

* input-matrix columns U_j, the readout vectors v_k and trained biases are stored as vectors
  and updated in place (U_j <- U_j + coef sum_b c_bj dA_b touches only the columns j an
  input uses: one-hot and sparse inputs touch only their rows);
* an n x n matrix is W_t = a_t W_0 + sum_p c_p dy_p x_p^T / n (a_t the product of the weight
  decay factors), so W_t z = a_t W_0 z + sum_p c_p dy_p E[x_p z] and W_t^T z alike, with
  W_0 z = ZHat + ZDot in the limits (``training.algebra.Family``) and a matrix product at
  finite width.

What a vector is -- n coordinates, coefficients over a Gaussian basis, particles -- is the
algebra's business (``training.algebra``); the step is written once, so the finite-width
oracle runs the same step as the limits.  A step processes its whole batch at once: forward
pass, readout f, loss derivatives chi, the backward pass seeded by dx^L = sigma sum_k chi_k
v_k, then every tensor's update from the weights of that step.

Meaning of the hyper-parameters (the same at every width): the batch loss is the mean over
the batch's examples; ``weight_decay`` lambda makes every trained tensor p <- (1 - eta n^{-c}
lambda) p - eta n^{-c} dLoss/dp (``decay_rows="touched"``: only the rows a step touches decay --
the input-matrix columns its inputs use and, under negative sampling, the sampled readout
vectors -- as word2vec.c decays the rows it updates; n x n matrices and biases, used by every
example, decay at every step either way; a frozen input matrix never decays); ``clip`` scales the loss
gradient so that its global norm
(all trained tensors, in the parametrization's p coordinates; docs/DESIGN.md 2.4) is at most
``clip``.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse

from tpcompiler import validation
from tpcompiler.backends.walk import initial_covariance
from tpcompiler.ir import ops
from tpcompiler.ir.graph import ProgramError
from tpcompiler.ir.rules import RuleTable
from tpcompiler.memory import available_bytes as available_memory  # (the tests replace it here)
from tpcompiler.training import fused, replicas
from tpcompiler.training.algebra import Exact, Family, Finite, Particles, Rows, _pad
from tpcompiler.training.parametrization import ABC
from tpcompiler.training.rowops import add_rows, decay_add_rows, row_dots, row_sums
from tpcompiler.training.step import LOSSES, SEED, StepProgram, derive_step

METHODS = ("auto", "exact", "particles", "finite")
DEFAULT_STEP_PARTICLES = 100_000
DEFAULT_GROUPS = 10
#: Version of the checkpoint layout.
CHECKPOINT_VERSION = 1


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def loss_derivative(loss: str, f: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chi = dloss/df, loss per example) for outputs f (R, B, K) and targets y (B, K)."""
    if loss == "mse":
        chi = f - y
        return chi, 0.5 * np.sum(chi * chi, axis=-1)
    if loss in ("logistic", "negative_sampling"):
        p = _sigmoid(f)
        value = np.logaddexp(0.0, f) - y * f
        return p - y, value.sum(axis=-1)
    if loss == "softmax":
        z = f - f.max(axis=-1, keepdims=True)
        e = np.exp(z)
        p = e / e.sum(axis=-1, keepdims=True)
        value = -np.sum(y * (z - np.log(e.sum(axis=-1, keepdims=True))), axis=-1)
        return p - y, value
    raise ProgramError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")


class _Growing:
    """Append-only arrays along their last axis (pair indices and coefficients)."""

    def __init__(self, lead: tuple = (), dtype=np.float64):
        self.buf = np.zeros(lead + (16,), dtype=dtype)
        self.count = 0

    @property
    def data(self):
        return self.buf[..., :self.count]

    def extend(self, values: np.ndarray) -> None:
        n = values.shape[-1]
        if self.count + n > self.buf.shape[-1]:
            grown = np.zeros(self.buf.shape[:-1] + (max(2 * self.buf.shape[-1], self.count + n),), dtype=self.buf.dtype)
            grown[..., :self.count] = self.buf[..., :self.count]
            self.buf = grown
        self.buf[..., self.count:self.count + n] = values
        self.count += n


class _Matrix:
    """State of one n x n matrix: its two sides (vectors multiplied by W, by W^T), the recorded
    rank-one updates (pairs of rows) and the decay factor of W_0."""

    def __init__(self, alg, sigma: float, W0=None):
        self.alg, self.sigma = alg, sigma
        if alg.limit:
            self.sides = {False: Family(alg, sigma), True: Family(alg, sigma)}
        else:
            self.sides = {False: _FiniteSide(alg), True: _FiniteSide(alg)}
        self.W0 = W0
        self.decay = np.ones(alg.R)
        self.pi = _Growing(dtype=np.int64)
        self.pj = _Growing(dtype=np.int64)
        self.pc = _Growing((alg.R,))

    def multiply(self, z: np.ndarray, transposed: bool, keep: bool) -> tuple[np.ndarray, np.ndarray]:
        """(W_t z or W_t^T z, the row indices of z on its side if kept)."""
        alg = self.alg
        own, other = self.sides[transposed], self.sides[not transposed]
        F = own.count
        G = alg.gram(own.vecs.data, z) if F else np.zeros((alg.R, 0, z.shape[1]))
        rows = np.arange(F, F + z.shape[1])
        # coefficients on the other side's vectors: ZDot (limits) and the recorded updates,
        # combined in one pass over that side's history
        w = None
        if alg.limit and other.count:
            w = other.sigma2 * self.decay[:, None, None] * other.stein(z)
        if self.pi.count and F:
            own_idx, other_idx = (self.pj.data, self.pi.data) if transposed else (self.pi.data, self.pj.data)
            terms = self.pc.data[:, :, None] * G[:, own_idx, :]
            if w is None:
                w = np.zeros((alg.R, other.count, z.shape[1]))
            if len(np.unique(other_idx)) == len(other_idx):
                w[:, other_idx] += terms
            else:
                np.add.at(w, (slice(None), other_idx), terms)
        if alg.limit:
            out = own.zhat(z, G, keep) * self.decay[:, None, None]
        else:
            W0 = self.W0
            out = replicas.matmul(z, W0 if transposed else np.swapaxes(W0, 1, 2)) * self.decay[:, None, None]
            if keep:
                own.vecs.append(z)
        if w is not None:
            out, part = alg.align(out, alg.combine(w, other.vecs.data))
            out = out + part
        return out, rows

    def store(self, z: np.ndarray, transposed: bool) -> np.ndarray:
        """Add z to a side without needing its product (an update vector no matmul read)."""
        side = self.sides[transposed]
        F = side.count
        if self.alg.limit:
            G = self.alg.gram(side.vecs.data, z) if F else np.zeros((self.alg.R, 0, z.shape[1]))
            side.zhat(z, G, keep=True)
        else:
            side.vecs.append(z)
        return np.arange(F, F + z.shape[1])


class _FiniteSide:
    def __init__(self, alg):
        self.vecs = Rows(alg.R, alg.D)

    def reserve(self, extra: int) -> None:
        self.vecs.reserve(extra)

    def bytes_to_reserve(self, extra: int) -> int:
        return self.vecs.bytes_to_reserve(extra)

    @property
    def count(self):
        return self.vecs.count

    def truncate(self, count):
        self.vecs.truncate(count)


@dataclass
class Gradient:
    """The loss gradient of a batch at the current weights, per tensor (before the learning
    rate): example weights w (R, B) already folded into the vectors' coefficients below."""

    B: int
    xL: np.ndarray                       # (R, B, D) readout input
    chi: np.ndarray                      # (R, B, K') weighted loss derivatives (w_b chi_bk)
    outputs: np.ndarray | None           # (B, K') output coordinates (negative sampling) or None
    matrices: dict = field(default_factory=dict)   # W -> list of (x rows, dy rows, x, dy, w (R,B))
    input_mats: dict = field(default_factory=dict)  # U -> list of (columns idx, C (B, j), dA (R,B,D))
    biases: dict = field(default_factory=dict)      # b -> list of (db (R,B,D),)
    loss: np.ndarray | None = None       # (R,) mean loss of the batch

    def merged(self, *others: "Gradient") -> "Gradient":
        """The sum of this gradient and ``others`` (first-order MAML's outer gradient over
        tasks), their examples concatenated once."""
        grads = (self,) + others
        if len({g.outputs is None for g in grads}) > 1:
            raise ProgramError("cannot add gradients of different losses")
        D = max(g.xL.shape[-1] for g in grads)
        out = Gradient(sum(g.B for g in grads), np.concatenate([_pad(g.xL, D) for g in grads], axis=1),
                       np.concatenate([g.chi for g in grads], axis=1),
                       None if self.outputs is None else np.concatenate([g.outputs for g in grads]))
        for name in ("matrices", "input_mats", "biases"):
            parts = [getattr(g, name) for g in grads]
            keys = dict.fromkeys(k for part in parts for k in part)
            setattr(out, name, {k: [e for part in parts for e in part.get(k, [])] for k in keys})
        if self.loss is not None:
            out.loss = self.loss
            for g in others:
                out.loss = out.loss + g.loss
        return out


def _as_rows(X, d: int, what: str):
    """A batch as (B, d) float64: a dense array, or a scipy.sparse CSR matrix kept sparse."""
    if scipy.sparse.issparse(X):
        if not (X.format == "csr" and X.dtype == np.float64):  # a float64 CSR is used as given
            X = scipy.sparse.csr_matrix(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != d:
            raise ProgramError(f"{what}: the batch must have {d} columns (the network's input dimension), got shape {X.shape}")
        if not np.all(np.isfinite(X.data)):
            raise ProgramError(f"{what} contains NaN or infinite values")
        return X
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2 or X.shape[1] != d:
        raise ProgramError(f"{what}: the batch must be B x {d} (the network's input dimension), got shape {X.shape}")
    if X.shape[0] == 0:
        raise ProgramError(f"{what}: the batch is empty")
    if not np.all(np.isfinite(X)):
        raise ProgramError(f"{what} contains NaN or infinite values")
    return X


class StepEngine:
    """Training limits (and finite widths) by repeating one derived step (module docstring).

    ``method``: "exact" (Gaussian-linear templates), "particles" (any template; ``particles``
    split into ``groups`` independent replicas), "finite" (width ``width``, ``seeds``
    networks), "auto" (exact when every Nonlin is affine, else particles).

    ``extrapolate`` (particles only, on by default): the particle limit of a trained network
    has a bias of order F / m (F: members of a matrix family, steps x batch; m: particles
    per group), because every ZDot coefficient is a Stein estimate from the same m particles
    that it then moves (a regression on F directions from m samples), and the nonlinearities
    turn the estimates' noise into a shift of the mean.  The groups' spread does not show it.
    With ``extrapolate`` a second run with half as many particles per group (same groups,
    independent randomness, 1.5x the cost and memory) cancels the first-order term:
    f = 2 f_m - f_{m/2} (Richardson), stderr sqrt(4 s_m^2 + s_{m/2}^2).  ``predict`` returns
    the extrapolated values; ``activations`` and ``features`` are those of the m-run."""

    def __init__(self, net, abc: ABC, *, method: str = "auto", loss: str = "mse", width: int | None = None,
                 seeds: int = 1, particles: int = DEFAULT_STEP_PARTICLES, groups: int = DEFAULT_GROUPS,
                 seed: int = 0, weight_decay: float = 0.0, clip: float | None = None, init: dict | None = None,
                 decay_rows: str = "all", extrapolate: bool = True, _stream: int = 0,
                 _program: StepProgram | None = None):
        from tpcompiler.compiler import graph_of

        if not isinstance(abc, ABC):
            raise validation.ArgumentError(f"abc: expected a parametrization such as tp.named('mup', depth), got {abc!r}")
        validation.choice(method, "method", METHODS)
        validation.choice(loss, "loss", LOSSES)
        self.seed = validation.count(seed, "seed")
        self.weight_decay = validation.number(weight_decay, "weight_decay")
        if self.weight_decay < 0:
            raise validation.ArgumentError(f"weight_decay: must be >= 0, got {weight_decay}")
        self.decay_rows = validation.choice(decay_rows, "decay_rows", ("all", "touched"))
        self.clip = None if clip is None else validation.number(clip, "clip", positive=True)
        # the extrapolation's half-size run reuses the step derived here (_program)
        self.program: StepProgram = _program or derive_step(graph_of(net), abc, loss)
        sp_ = self.program
        if method == "auto":
            method = "exact" if sp_.is_gaussian_linear() else "particles"
        if method == "exact" and not sp_.is_gaussian_linear():
            bad = sp_.nonaffine()
            raise ProgramError(f"instruction {bad[0]!r}: not affine in its vectors, so the network is not Gaussian-linear "
                               f"and has no exact limit by coefficients; use method='particles'")
        if loss == "softmax" and sp_.K < 2:
            raise ProgramError(f"loss softmax: program {sp_.net.name!r} has one output, and a softmax over one output is "
                               "constant (zero gradient); use logistic or mse, or a readout with out_dim >= 2")
        if method != "finite":
            sp_.check_limit()
        self.method = method
        # the extrapolation's second run draws from its own stream of the same seed
        self.rng = np.random.default_rng([self.seed, _stream] if _stream else self.seed)
        if method != "finite" and (width is not None or seeds != 1):
            given = f"width={width!r}" if width is not None else f"seeds={seeds!r}"
            raise validation.ArgumentError(f"{given}: only the finite method runs networks of a width (and seeds of them); "
                                           f"method {method!r} computes the limit, so drop it or use method='finite'")
        if method == "finite":
            if width is None:
                raise validation.ArgumentError("width: the finite method needs a width n")
            self.width = validation.count(width, "width", minimum=1)
            self.alg = Finite(validation.count(seeds, "seeds", minimum=1), self.width, self.rng)
        elif method == "particles":
            groups = validation.count(groups, "groups", minimum=2)
            extrapolate = validation.flag(extrapolate, "extrapolate")
            particles = validation.count(particles, "particles", minimum=(4 if extrapolate else 2) * groups)
            self.width = None
            self.alg = Particles(groups, particles // groups, self.rng)
            if _stream:
                self.alg.role = (" of the bias extrapolation's half-size run (StepEngine(extrapolate=False) "
                                 "skips it)", 2)
        else:
            self.width = None
            self.alg = Exact(self.rng)
        if self.weight_decay and self.alg.limit and sp_.exponents["lr"] > 0:
            raise ProgramError(f"weight decay: the learning rate grows like n^{sp_.exponents['lr']} under this "
                               "parametrization (c < 0), so the decay eta n^-c lambda has no limit; use weight_decay=0")
        self.steps_done = 0
        self._temporary = 0
        self._column_maps: dict = {}   # input layer -> (dense_map, const), see _column_map
        self._rules = _rules(sp_)
        self._layer_matrix = {k: sp_.net.args(k)[0] for k in sp_.input_layers}   # input layer -> its matrix U
        self._powers: dict = {}        # exponent key -> n^e, see _n
        # input-matrix updates deferred inside a block that undoes them (see _restoring(defer=True))
        self._pending: dict = {}
        self._deferring = 0
        self._init_state(init or {})
        #: the step as one compiled loop over a sequence (``steps``), when it is row-local
        self._fused = fused.plan(self)
        #: what the caller's run trained with (``tp.train``'s data, batch, learning rates, weight
        #: decay and clip), a JSON-able dict written into checkpoints; ``saved_run`` is the one a
        #: checkpoint was written with (``load``), None if it had none
        self.run: dict | None = None
        self.saved_run: dict | None = None
        self._half = None
        if method == "particles" and extrapolate:
            self._half = StepEngine(net, abc, method="particles", loss=loss, particles=(particles // groups // 2) * groups,
                                    groups=groups, seed=seed, weight_decay=weight_decay, clip=clip,
                                    decay_rows=decay_rows, extrapolate=False, _stream=1,
                                    _program=self.program)

    def _engines(self):
        """This engine and, when extrapolating, its half-size run: every update goes to both."""
        return (self,) if self._half is None else (self, self._half)

    # -- state -----------------------------------------------------------------------------
    def _init_state(self, init: dict) -> None:
        """Draw the initial tensors: the initial vectors jointly by the program's covariance
        (readouts, fixed vectors), then every input matrix's columns (iid N(0, 1)),
        then the n x n matrices (finite width only)."""
        sp_, alg = self.program, self.alg
        net = sp_.net
        keys = list(sp_.readouts) + sp_.biases + sp_.fixed
        cov = initial_covariance(net, keys)
        live = [i for i in range(len(keys)) if cov[i, i] > 0]
        vecs = np.zeros((alg.R, len(keys), alg.D))
        if live:
            drawn = alg.gaussians(cov[np.ix_(live, live)])
            vecs = np.zeros((alg.R, len(keys), max(alg.D, drawn.shape[-1])))
            vecs[:, live, :drawn.shape[-1]] = drawn
        self.vectors = {k: vecs[:, i:i + 1].copy() for i, k in enumerate(keys)}
        for k in keys:
            if k in init:
                self.vectors[k] = self._given(init[k], k, (alg.D,))[:, None, :]
        K = sp_.K
        self.readout = np.concatenate([self.vectors.pop(k) for k in sp_.readouts], axis=1)  # (R, K, D)
        # A readout vector no update has touched is its initial Gaussian; when that is
        # independent of every initial vector the forward pass reads, E[Z^v Z^x] is exactly
        # 0 in the limit (muP's f_0 = 0, docs/DESIGN.md 2.8): the limits return 0, not a
        # particle estimate of it.
        self.touched = np.zeros(K, dtype=bool)
        others = sp_.biases + sp_.fixed
        self._independent_readout = not others or not np.any(
            initial_covariance(net, list(sp_.readouts) + others)[:K, K:])
        self.input_cols = {}
        for U in sp_.input_mats + [u for u in self._input_matrices() if u not in sp_.input_mats]:
            k = net.op(U).k
            cols = alg.iid(k)                                   # (R, k, D)
            if U in init:
                cols = np.swapaxes(self._given(init[U], U, (alg.D, k)), 1, 2)
            self.input_cols[U] = np.ascontiguousarray(np.swapaxes(cols, 0, 1))  # (k, R, D)
        self.mats = {}
        for W in sp_.matrices:
            sigma = sp_.sigma_of(W)
            W0 = None
            if not alg.limit:
                W0 = self._given(init[W], W, (alg.D, alg.D)) if W in init else alg.matrix(sigma)
            self.mats[W] = _Matrix(alg, sigma, W0)
        unknown = set(init) - set(keys) - set(self.input_cols) - set(self.mats)
        if unknown:
            raise validation.ArgumentError(f"init: {sorted(unknown)} are not tensors of program {net.name!r}")
        if init and alg.limit:
            raise validation.ArgumentError("init: initial tensors can only be given to the finite method")
        assert self.readout.shape[1] == K

    def _input_matrices(self) -> list[str]:
        net = self.program.net
        return sorted({net.args(k)[0] for k in self.program.input_layers})

    def _given(self, value, key: str, shape: tuple) -> np.ndarray:
        a = np.asarray(value, dtype=np.float64)
        if a.shape == shape:
            a = np.broadcast_to(a, (self.alg.R,) + shape).copy()
        if a.shape != (self.alg.R,) + shape:
            raise validation.ArgumentError(f"init[{key!r}]: expected shape {shape} (or {(self.alg.R,) + shape}), got {a.shape}")
        return a

    # -- the forward and backward passes ------------------------------------------------------
    def _forward(self, X, keep: bool) -> dict:
        env = {"__X": X, "__rows": {}, "__cols": {}}
        for k, rule in self._rules["forward"]:
            env[k] = rule(self, k, env, keep)
        return env

    def _outputs(self, env: dict, outputs=None) -> np.ndarray:
        """f (R, B, K) on the batch of ``env`` (only the coordinates ``outputs`` (B, k) if given)."""
        sp_, alg = self.program, self.alg
        xL = env[sp_.readout_vector]
        scale = sp_.sigma_out * self._n("f")
        if outputs is None:
            f = scale * np.swapaxes(alg.gram(self.readout, xL), 1, 2)
            untouched = ~self.touched[None, :]
        else:
            # f_bi = <v_{outputs[b, i]}, x_b> read in place (a gather would copy the rows)
            dots = row_dots(_contiguous_readout(self), True, outputs, np.ascontiguousarray(np.swapaxes(xL, 0, 1)))
            f = scale * np.transpose(dots, (2, 0, 1)) / alg.norm
            untouched = ~self.touched[outputs]
        if alg.limit and self._independent_readout:
            f = np.where(untouched[None], 0.0, f)
        return f

    def _gradient(self, X, Y, outputs=None, weight: float | None = None) -> Gradient:
        """The loss gradient of the batch (X, Y) at the current weights; the vectors it reads
        are kept (they are the updates' vectors)."""
        sp_ = self.program
        X = _as_rows(X, sp_.d, "X")
        B = X.shape[0]
        Y, outputs = self._targets(Y, B, outputs)
        env = self._forward(X, keep=True)
        f = self._outputs(env, outputs)
        if not np.all(np.isfinite(f)):
            raise ProgramError(f"step {self.steps_done}: the network output is not finite (training diverged); "
                               "use a smaller learning rate")
        chi, value = loss_derivative(sp_.loss, f, Y[None])
        w = (1.0 / B) if weight is None else weight
        chi = chi * w
        # dx^L = sigma sum_k chi_k v_k, with the example weights folded in
        if outputs is None:
            seed = sp_.sigma_out * np.matmul(chi, self.readout)
        else:
            W = np.ascontiguousarray(np.transpose(chi, (1, 2, 0)))     # (B, k, R)
            seed = sp_.sigma_out * np.swapaxes(row_sums(_contiguous_readout(self), True, outputs, W), 0, 1)
        env[SEED] = seed
        for k, rule in self._rules["backward"]:
            env[k] = rule(self, k, env, True)
        grad = Gradient(B, env[sp_.readout_vector], chi, outputs, loss=value.sum(axis=1) / B)
        for k, rule in self._rules["gradient"]:
            rule(self, k, env, grad)
        return grad

    def _n(self, key) -> float:
        """n^e for the program's exponent ``key`` ("f", "v", "U", "lr", ("W", W)), remembered by
        key (hashing the sympy exponent itself costs more than the rest of the look-up)."""
        if key not in self._powers:
            self._powers[key] = self.alg.n_power(self.program.exponents[key])
        return self._powers[key]

    def _targets(self, Y, B: int, outputs):
        sp_ = self.program
        Y = np.asarray(Y, dtype=np.float64)
        if sp_.loss == "negative_sampling":
            if outputs is None:
                raise ProgramError("negative_sampling: give outputs=(B, k) output coordinates and Y (B, k) labels 0/1")
            outputs = np.asarray(outputs)
            integer = outputs.dtype.kind in "iu"
            if integer:
                outputs = np.ascontiguousarray(outputs, dtype=np.int64)
            if outputs.ndim == 1:
                outputs = outputs[None, :]
            if outputs.shape[0] != B or not integer:
                raise ProgramError(f"outputs: need an integer array with one row per example (B = {B}), got {outputs.shape} {outputs.dtype}")
            _check_output_range(outputs, sp_.K)
            Y = Y.reshape(outputs.shape) if Y.size == outputs.size else Y
            if Y.shape != outputs.shape:
                raise ProgramError(f"Y: negative sampling needs one label per sampled output, shape {outputs.shape}, got {Y.shape}")
            validation.binary_targets(Y, "Y")
            return Y, outputs
        if outputs is not None:
            raise ProgramError(f"outputs: only the negative_sampling loss reads a subset of outputs, not {sp_.loss!r}")
        if Y.ndim <= 1:
            Y = Y.reshape(B, -1) if Y.size == B * sp_.K else Y
        if Y.ndim != 2 or Y.shape != (B, sp_.K):
            raise ProgramError(f"Y: targets must be B x K = {B} x {sp_.K} (one row per example, one column per output), got shape {np.shape(Y)}")
        if not np.all(np.isfinite(Y)):
            raise ProgramError("Y contains NaN or infinite values")
        if sp_.loss == "logistic":
            validation.binary_targets(Y, "Y")
        if sp_.loss == "softmax" and (Y.min() < 0 or np.abs(Y.sum(axis=1) - 1).max() > 1e-6):
            raise ProgramError("Y: the softmax loss needs probability rows (entries >= 0 summing to 1, e.g. one-hot labels)")
        return Y, None

    # -- updates ------------------------------------------------------------------------------
    def _norm2(self, g: Gradient) -> np.ndarray:
        """Squared global norm of the loss gradient per replica, in the parametrization's p
        coordinates (docs/DESIGN.md 2.4): readout n^{1-2a_o} sum_k |sum_b chi_bk x_b|^2/n,
        W n^{2-2a-2(a_o+b_o)} sum_bb' E[dy dy'] E[x x'], U n^{1-2a_1-2(a_o+b_o)}/scale^2
        sum_bb' E[dA dA'] c_b.c_b' (biases as U with c = 1)."""
        sp_, alg, ex = self.program, self.alg, self.program.exponents
        total = np.zeros(alg.R)

        def power(e, what):
            if e > 0:
                raise ProgramError(f"clip: the gradient norm of {what} grows like n^{e} under this parametrization; "
                                   "clipping has no limit here")
            return alg.n_power(e)

        Gx = alg.gram(g.xL, g.xL)                       # (R, B, B)
        if g.outputs is None:
            CC = np.matmul(g.chi, np.swapaxes(g.chi, 1, 2))
        else:
            same = (g.outputs[:, :, None, None] == g.outputs[None, None, :, :])      # (B, k, B, k)
            CC = np.einsum("rbi,bicj,rcj->rbc", g.chi, same, g.chi)
        total += power(ex["norm_v"], "the readout") * np.einsum("rbc,rbc->r", CC, Gx)
        for W, entries in g.matrices.items():
            x = np.concatenate([_pad_to(e[2], entries) for e in entries], axis=1)
            dy = np.concatenate([_pad_to(e[3], entries) for e in entries], axis=1)
            total += power(ex[("norm_W", W)], W) * np.einsum("rbc,rbc->r", alg.gram(x, x), alg.gram(dy, dy))
        for U, entries in g.input_mats.items():
            scale2 = sp_.scale_of(U) ** 2
            cc = _column_products(entries, sp_.net.op(U).k)
            D = max(e[2].shape[-1] for e in entries)
            dA = np.concatenate([_pad(e[2], D) for e in entries], axis=1)
            total += power(ex["norm_U"], U) / scale2 * np.einsum("rbc,bc->r", alg.gram(dA, dA), cc)
        for b, entries in g.biases.items():
            db = np.concatenate([e[0] for e in entries], axis=1)
            total += power(ex["norm_U"], b) * alg.gram(db, db).sum(axis=(1, 2))
        return total

    def _apply(self, g: Gradient, lr: float, clip: bool = True) -> None:
        """p <- (1 - lr n^-c lambda) p - lr n^-c s dLoss/dp for every trained tensor, s the
        clipping factor (module docstring; s = 1 when ``clip`` is False)."""
        sp_, alg = self.program, self.alg
        s = np.ones(alg.R)
        if self.clip is not None and clip:
            norm = np.sqrt(np.maximum(self._norm2(g), 0.0))
            s = np.minimum(1.0, self.clip / np.maximum(norm, 1e-300))
        # touched rows decay in the same pass as their update below (``rowops.decay_add_rows``)
        row_keep, col_keep = 1.0, {}
        if self.weight_decay:
            keep = 1.0 - lr * self._n("lr") * self.weight_decay
            touched = self.decay_rows == "touched"
            if touched and g.outputs is not None:
                row_keep = keep
            else:
                self.readout *= keep
            for U, cols in self.input_cols.items():
                if U not in sp_.input_mats:
                    continue  # a frozen input matrix is not trained
                if touched:
                    used = [idx for idx, _C, _dA in g.input_mats.get(U, [])]
                    if len(used) > 1:  # several layers read U: decay each used column once
                        cols[np.unique(np.concatenate(used))] *= keep
                    elif used:
                        col_keep[U] = keep
                else:
                    cols *= keep
            for W in sp_.hidden:  # a frozen matrix, which the step also multiplies by, is not trained
                M = self.mats[W]
                M.decay *= keep
                M.pc.buf[:, :M.pc.count] *= keep
            for b in sp_.biases:  # read by every example: decays at every step
                self.vectors[b] *= keep
        # readout
        coef = -lr / sp_.sigma_out * self._n("v") * s
        chi = g.chi * coef[:, None, None]
        self.readout, xL = alg.align(self.readout, g.xL)
        if g.outputs is None:
            self.readout += np.matmul(np.swapaxes(chi, 1, 2), xL)
            self.touched[:] = True
        else:
            # v_o <- keep v_o + sum_b W_ob x_b, W_ob = sum of chi_bi over the i with outputs[b, i] = o,
            # on the distinct sampled rows o in place (one pass over each row)
            uniq, inv = _unique_inverse(g.outputs.ravel())
            self.touched[uniq] = True
            B, k = g.outputs.shape
            W = np.zeros((uniq.size, B, alg.R))
            np.add.at(W, (inv, np.repeat(np.arange(B), k)), chi.reshape(alg.R, B * k).T)
            decay_add_rows(_contiguous_readout(self), True, uniq, row_keep, W,
                           np.ascontiguousarray(np.swapaxes(xL, 0, 1)), np.ones(alg.R))
        # input matrices: U_j <- keep U_j + c sum_b C_bj dA_b on the used columns j, in place
        for U, entries in g.input_mats.items():
            if U not in sp_.input_mats:
                continue
            c = -lr / sp_.scale_of(U) ** 2 * self._n("U") * s
            D = max(e[2].shape[-1] for e in entries)
            if D > self.input_cols[U].shape[-1] and not self._deferring:
                self.input_cols[U] = _pad(self.input_cols[U], D)
            if self._deferring:
                # recorded, not written: the block undoes them (_restoring(defer=True))
                self._pending.setdefault(U, []).extend((idx, C, c[:, None, None] * dA) for idx, C, dA in entries)
                continue
            dense = _dense_columns(entries) if len(entries) > 1 else None
            if dense is not None:
                # several entries (MAML's tasks): sum_b C_bj dA_b over all their examples as one
                # BLAS product on the union of their columns, added in one pass
                union, C_all = dense
                dA = np.concatenate([_pad(e[2], D) for e in entries], axis=1)          # (R, sum B, D)
                inc = np.ascontiguousarray(np.swapaxes(np.matmul(C_all.T[None], dA), 0, 1))  # (j, R, D)
                add_rows(_contiguous_cols(self, U), False, union, inc, c)
                continue
            for idx, C, dA in entries:
                W = np.repeat(C.T[:, :, None], alg.R, axis=2)             # (j, B, R)
                decay_add_rows(_contiguous_cols(self, U), False, idx, col_keep.get(U, 1.0), W,
                               np.ascontiguousarray(np.swapaxes(dA, 0, 1)), c)
        for b, entries in g.biases.items():
            c = -lr * self._n("U") * s
            for (db,) in entries:
                self.vectors[b], db = alg.align(self.vectors[b], db)
                self.vectors[b] += c[:, None, None] * db.sum(axis=1, keepdims=True)
        for W, entries in g.matrices.items():
            M = self.mats[W]
            c = -lr * self._n(("W", W)) * s
            for i_rows, j_rows, _x, _dy, w in entries:
                M.pi.extend(i_rows)
                M.pj.extend(j_rows)
                M.pc.extend(c[:, None] * w)

    def reserve(self, examples: int) -> None:
        """Room for the vectors of ``examples`` more training examples on every matrix side
        (avoids regrowing the history arrays when the number of steps is known).  Refused with
        a clear error when the history would not fit in the memory this machine has available
        (instead of the operating system killing the run hours later)."""
        examples = validation.count(examples, "examples")
        extra: dict = {}  # side -> members it gains: B per step for every product that reads it
        tpl = self.program.template
        for eng in self._engines():
            for k in self.program.forward + self.program.backward:
                if isinstance(tpl.op(k), ops.MatMul):
                    W, _, tr = tpl.matmul_parts(k)
                    side = eng.mats[W].sides[tr]
                    extra[side] = extra.get(side, 0) + examples
        need = sum(side.bytes_to_reserve(n) for side, n in extra.items())
        available = available_memory()
        if available is not None and need > available:
            what = {"particles": f"particles={self.alg.R * self.alg.D} (fewer particles)", "finite": "a smaller width",
                    "exact": "a smaller basis"}[self.method]
            raise validation.ArgumentError(
                f"steps: the history of {examples} more training examples needs {need / 2**30:.1f} GiB (every hidden "
                f"matrix side keeps its vectors{' and their noise' if self.alg.limit else ''}), but this machine has "
                f"{available / 2**30:.1f} GiB available; use {what}, or fewer steps x batch")
        for side, n in extra.items():
            side.reserve(n)

    # -- public API -------------------------------------------------------------------------
    def step(self, X, Y, lr: float, outputs=None) -> np.ndarray:
        """One SGD step on the batch (rows of X, targets Y); returns the batch loss per replica
        before the step."""
        lr = validation.number(lr, "lr")
        if lr < 0:
            raise validation.ArgumentError(f"lr: must be >= 0, got {lr}")
        if self._half is not None:
            self._half.step(X, Y, lr, outputs)
        g = self._gradient(X, Y, outputs)
        self._apply(g, lr)
        if not self._temporary:
            self.steps_done += 1
        return g.loss

    def steps(self, X, Y, lr, outputs=None) -> np.ndarray:
        """Len(X) steps of one example each, in order: step t on row t of X (an array or a
        scipy.sparse matrix), targets Y[t], learning rate lr[t] (or one number for all), sampled
        outputs outputs[t] (negative sampling; the rows may differ in length: a list).  The
        same as calling ``step`` T times; a row-local exact step (``training.fused``: e.g.
        word2vec's limit) runs the whole sequence in one compiled loop.  Returns the loss of
        every step, (T, replicas)."""
        sp_ = self.program
        X = _as_rows(X, sp_.d, "X")
        T = X.shape[0]
        lrs = np.broadcast_to(np.asarray(lr, dtype=np.float64), (T,)) if np.ndim(lr) == 0 else np.asarray(lr, dtype=np.float64)
        if lrs.shape != (T,):
            raise validation.ArgumentError(f"lr: one learning rate per step (T = {T}) or one number, got shape {lrs.shape}")
        if not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
            raise validation.ArgumentError("lr: learning rates must be finite and >= 0")
        if outputs is not None and len(outputs) != T:
            raise ProgramError(f"outputs: one row of sampled outputs per step (T = {T}), got {len(outputs)}")
        if len(Y) != T:
            raise ProgramError(f"Y: one row of targets per step (T = {T}), got {len(Y)}")
        plan = self._fused
        if plan is None or outputs is None or self._temporary or self._deferring:
            row = _row_getter(X)
            return np.array([self.step(row(t), Y[t], lrs[t], None if outputs is None else outputs[t])
                             for t in range(T)]).reshape(T, -1)
        if any(np.asarray(o).dtype.kind not in "iu" for o in outputs):
            raise ProgramError("outputs: need integer arrays of sampled output coordinates")
        outs, ocount = _ragged(outputs, np.int64, "outputs")
        labels, lcount = _ragged(Y, np.float64, "Y")
        if not np.array_equal(ocount, lcount):
            raise ProgramError("Y: negative sampling needs one label per sampled output in every step")
        _check_output_range(outs, sp_.K)
        validation.binary_targets(labels, "Y")
        Xs = X.tocsr() if scipy.sparse.issparse(X) else scipy.sparse.csr_matrix(X)
        # the loop reads both tables over one basis: (k_U, 1, D) and (1, K, D)
        self.input_cols[plan.U], self.readout = self.alg.align(self.input_cols[plan.U], self.readout)
        U, V = _contiguous_cols(self, plan.U), _contiguous_readout(self)
        loss = fused.run(U[:, 0], V[0], self.touched, self._independent_readout, Xs.indptr.astype(np.int64),
                         Xs.indices.astype(np.int64), Xs.data, plan.col_of, plan.weight, outs, ocount, labels,
                         np.ascontiguousarray(lrs), plan.a, sp_.sigma_out * self._n("f") / self.alg.norm,
                         self._n("v") / sp_.sigma_out, sp_.sigma_out * self._n("U") / sp_.scale_of(plan.U) ** 2,
                         self._n("lr") * self.weight_decay, plan.trained)
        self.steps_done += T
        return loss[:, None]

    def maml_step(self, tasks, inner_lr: float, outer_lr: float, inner_steps: int = 1) -> np.ndarray:
        """First-order MAML (docs/DESIGN.md 2.9): per task (Xs, Ys, Xq, Yq), ``inner_steps`` SGD
        steps on the support set from the current weights (undone afterwards), then the
        query-loss gradient at the adapted weights; the outer update applies the SUM of the
        tasks' query gradients (clipped to ``clip`` if set; the inner steps are not clipped)
        with ``outer_lr``.  Returns the
        mean query loss per replica."""
        inner_lr = validation.number(inner_lr, "inner_lr")
        outer_lr = validation.number(outer_lr, "outer_lr")
        inner_steps = validation.count(inner_steps, "inner_steps")
        tasks = list(tasks)
        if not tasks:
            raise validation.ArgumentError("tasks: a meta-batch needs at least one task")
        if self._half is not None:
            self._half.maml_step(tasks, inner_lr, outer_lr, inner_steps)
        grads = []
        for i, task in enumerate(tasks):
            if len(task) != 4:
                raise validation.ArgumentError(f"tasks[{i}]: expected (X_support, Y_support, X_query, Y_query)")
            Xs, Ys, Xq, Yq = task
            with self._restoring(families=False, defer=True):
                for _ in range(inner_steps):
                    # the inner steps are not clipped: ``clip`` bounds the meta-gradient only (TP4's MAML)
                    self._apply(self._gradient(Xs, Ys), inner_lr, clip=False)
                grads.append(self._gradient(Xq, Yq))
        total = grads[0].merged(*grads[1:])
        self._apply(total, outer_lr)
        self.steps_done += 1
        return total.loss / len(tasks)

    @contextlib.contextmanager
    def temporary(self):
        """Steps taken inside the block are undone when it ends (test-time adaptation).  The
        random generator is not put back: with particles, each block (a test task's adaptation)
        draws fresh randomness, and so do the steps after it."""
        with contextlib.ExitStack() as stack:
            for eng in self._engines():
                stack.enter_context(eng._restoring(families=True))
                eng._temporary += 1
                stack.callback(setattr, eng, "_temporary", eng._temporary - 1)
            yield self

    @contextlib.contextmanager
    def _restoring(self, families: bool, tensors: bool = True, defer: bool = False, look: bool = False):
        """Undo, when the block ends, what it changed: with ``tensors`` the trained tensors (kept as
        copies: a block that only runs forward passes, which read them, needs none), with
        ``families`` the vectors the block added to the matrices' sides and the randomness it
        drew (the algebra's new basis elements).  ``defer`` (a block of a few steps, such as a
        MAML task's inner steps, without weight decay): input-matrix updates are recorded as
        pending (idx, C, c dA), read by the input layers as U + sum_p c_p dA_p C_p^T, and dropped
        at the end, so that the input matrices are neither copied nor written.  ``look`` (predict,
        activations, features): also the random generator's state, so that a look draws nothing
        from the stream of later steps and a run's training is the same realisation whatever it
        evaluates (with particles, an evaluation set or --eval-every changed the trajectory)."""
        defer = defer and tensors and not self.weight_decay
        generator = self.rng.bit_generator.state if look else None
        saved = None
        if tensors:
            saved = (self.readout.copy(), self.touched.copy(),
                     self.input_cols if defer else {k: v.copy() for k, v in self.input_cols.items()},
                     {k: v.copy() for k, v in self.vectors.items()},
                     {W: (M.decay.copy(), M.pi.count, M.pc.buf[:, :M.pc.count].copy()) for W, M in self.mats.items()})
        pending = {U: len(v) for U, v in self._pending.items()}
        self._deferring += defer
        sides = {W: {t: s.count for t, s in M.sides.items()} for W, M in self.mats.items()}
        mark = self.alg.mark()
        try:
            yield
        finally:
            self._deferring -= defer
            if defer:
                self._pending = {U: v[:pending.get(U, 0)] for U, v in self._pending.items()}
            if tensors:
                self.readout, self.touched, self.input_cols, self.vectors = saved[:4]
                for W, M in self.mats.items():
                    decay, count, coefs = saved[4][W]
                    M.decay = decay
                    M.pi.count = M.pj.count = M.pc.count = count
                    M.pc.buf[:, :count] = coefs
            if families:
                for W, M in self.mats.items():
                    for t, side in M.sides.items():
                        side.truncate(sides[W][t])
                self.alg.release(mark)
            if look:
                self.rng.bit_generator.state = generator

    def _looking(self):
        """The block of a look (predict, activations, features): a forward pass, which reads the
        tensors only, leaving the matrices' sides and the random stream as they were."""
        return self._restoring(families=True, tensors=False, look=True)

    def predict(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(mean, stderr) of f on the rows of X: arrays (N, K); stderr over replicas (0 for exact);
        particles: extrapolated to infinitely many particles per group (class docstring).  A look
        draws nothing from the stream of later steps (``_restoring(look=True)``), so with
        particles it is fixed by the state: calling it again gives the same values (only more
        particles reduce its noise), and the next step reuses the draws it made."""
        X = _as_rows(X, self.program.d, "X")
        mean, err = _mean_stderr(self._replica_outputs(X))
        if self._half is None:
            return mean, err
        half, half_err = _mean_stderr(self._half._replica_outputs(X))
        return 2.0 * mean - half, np.sqrt(4.0 * err ** 2 + half_err ** 2)

    def _replica_outputs(self, X) -> np.ndarray:
        """f on the rows of X per replica, (R, N, K), state unchanged."""
        with self._looking():
            return self._outputs(self._forward(X, keep=self.program.forward_reuses_a_matrix))

    def activations(self, X) -> dict:
        """Every vector of the forward pass on the rows of X at the current weights, {key: (R, N,
        D)}, and the output under "f": (R, N, K) (a look, like ``predict``: the state is
        unchanged).  At finite width D = n coordinates: what ``tp.coordcheck`` measures."""
        X = _as_rows(X, self.program.d, "X")
        with self._looking():
            env = self._forward(X, keep=self.program.forward_reuses_a_matrix)
            # copies: a trained vector's entry is the engine's own state array, which a later
            # step updates in place (tp.coordcheck measured a hidden bias's change as 0)
            out = {k: np.array(env[k]) for k in self.program.forward}
            out["f"] = self._outputs(env)
        return out

    def features(self, X, node: str | None = None) -> np.ndarray:
        """F (R, N, D) with E[Z^{node(x_i)} Z^{node(x_j)}] = F[r, i] . F[r, j] (averaged over r)."""
        X = _as_rows(X, self.program.d, "X")
        node = node or self.program.readout_vector
        if node not in self.program.forward:
            raise validation.ArgumentError(f"node: {node!r} is not a vector of the forward pass "
                                           f"({', '.join(self.program.forward)})")
        with self._looking():
            V = self._forward(X, keep=self.program.forward_reuses_a_matrix)[node]
        return self.alg.features(V)

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, path) -> None:
        """The state as .npz: tensors, the matrices' sides and pairs, the random generator and
        a fingerprint of (program, parametrization, loss, method) that ``load`` checks, and the
        caller's ``run``; the extrapolation's half-size run under the prefix "half/".  (``load``
        takes other update options: a meta-trained state adapts without the meta-step's clip.)"""
        arrays = self._state_arrays()
        if self._half is not None:
            arrays.update({f"half/{k}": v for k, v in self._half._state_arrays().items()})
        np.savez(path, **arrays)

    def _state_arrays(self) -> dict:
        arrays = {"readout": self.readout, "touched": self.touched}
        for k, v in self.input_cols.items():
            arrays[f"U/{k}"] = v
        for k, v in self.vectors.items():
            arrays[f"vec/{k}"] = v
        for W, M in self.mats.items():
            arrays[f"W/{W}/decay"] = M.decay
            arrays[f"W/{W}/pi"], arrays[f"W/{W}/pj"], arrays[f"W/{W}/pc"] = M.pi.data, M.pj.data, M.pc.data
            if M.W0 is not None:
                arrays[f"W/{W}/W0"] = M.W0
            for t, side in M.sides.items():
                arrays[f"W/{W}/{int(t)}/vecs"] = side.vecs.data
                if self.alg.limit:
                    arrays[f"W/{W}/{int(t)}/noise"] = side.noise.data
                    arrays[f"W/{W}/{int(t)}/L"] = side.L[:, :side.count, :side.count]
        meta = {"version": CHECKPOINT_VERSION, "fingerprint": self.program.fingerprint, "method": self.method,
                "width": self.width, "R": self.alg.R, "D": self.alg.D, "steps_done": self.steps_done,
                "rng": self.rng.bit_generator.state, "weight_decay": self.weight_decay, "decay_rows": self.decay_rows,
                "clip": self.clip, "extrapolate": self._half is not None, "run": self.run}
        arrays["meta"] = np.array(json.dumps(meta))
        return arrays

    @classmethod
    def load(cls, path, net, abc: ABC, **options) -> "StepEngine":
        """An engine for (net, abc, options) resumed from the checkpoint ``path``."""
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile) or "meta" not in data.files:
                raise ValueError("no 'meta' entry: write checkpoints with StepEngine.save or tpc train --save-state")
            meta = json.loads(str(data["meta"]))
        except (OSError, KeyError, ValueError) as exc:
            raise validation.ArgumentError(f"checkpoint {path}: not a step-engine checkpoint ({exc})") from None
        eng = cls(net, abc, **options)
        if meta.get("version") != CHECKPOINT_VERSION:
            raise validation.ArgumentError(f"checkpoint {path}: layout version {meta.get('version')}, expected {CHECKPOINT_VERSION}")
        if meta["fingerprint"] != eng.program.fingerprint:
            raise validation.ArgumentError(f"checkpoint {path}: it was written for another program, parametrization or loss "
                                           f"(fingerprint {meta['fingerprint']} != {eng.program.fingerprint})")
        if meta["method"] != eng.method or meta["width"] != eng.width or meta["R"] != eng.alg.R:
            raise validation.ArgumentError(
                f"checkpoint {path}: written by method {meta['method']!r} (width {meta['width']}, {meta['R']} replicas), "
                f"not {eng.method!r} (width {eng.width}, {eng.alg.R} replicas)")
        if eng.method == "particles" and data["readout"].shape[-1] != eng.alg.D:
            raise validation.ArgumentError(f"checkpoint {path}: {data['readout'].shape[-1]} particles per group, not {eng.alg.D}")
        if bool(meta.get("extrapolate", False)) != (eng._half is not None):
            raise validation.ArgumentError(
                f"checkpoint {path}: written with extrapolate={bool(meta.get('extrapolate', False))}, "
                f"resumed with extrapolate={eng._half is not None}; use the same setting")
        eng._restore(data, meta, "")
        eng.saved_run = meta.get("run")
        if eng._half is not None:
            eng._half._restore(data, json.loads(str(data["half/meta"])), "half/")
        return eng

    def _restore(self, data, meta: dict, prefix: str) -> None:
        """Set this engine's state from the checkpoint arrays under ``prefix``."""
        def arr(key):
            return data[prefix + key]

        R = self.alg.R
        self.readout = arr("readout").copy()
        self.touched = arr("touched").copy()
        self.input_cols = {k: arr(f"U/{k}").copy() for k in self.input_cols}
        self.vectors = {k: arr(f"vec/{k}").copy() for k in self.vectors}
        for W, M in self.mats.items():
            M.decay = arr(f"W/{W}/decay").copy()
            M.pi, M.pj, M.pc = _Growing(dtype=np.int64), _Growing(dtype=np.int64), _Growing((R,))
            M.pi.extend(arr(f"W/{W}/pi"))
            M.pj.extend(arr(f"W/{W}/pj"))
            M.pc.extend(arr(f"W/{W}/pc"))
            if M.W0 is not None:
                M.W0 = arr(f"W/{W}/W0").copy()
            for t, side in M.sides.items():
                vecs = arr(f"W/{W}/{int(t)}/vecs")
                side.vecs = Rows(R, vecs.shape[-1])
                if vecs.shape[1]:
                    side.vecs.append(vecs)
                if self.alg.limit:
                    side.noise = Rows(R, vecs.shape[-1])
                    noise = arr(f"W/{W}/{int(t)}/noise")
                    if noise.shape[1]:
                        side.noise.append(noise)
                    side.L = np.zeros((R, 8, 8))
                    side._grow(vecs.shape[1])
                    side.L[:, :vecs.shape[1], :vecs.shape[1]] = arr(f"W/{W}/{int(t)}/L")
        self.alg.D = int(meta["D"])
        self.steps_done = int(meta["steps_done"])
        self.rng.bit_generator.state = meta["rng"]


def csr_row(cols: np.ndarray, vals: np.ndarray, d: int) -> scipy.sparse.csr_matrix:
    """The 1 x d CSR matrix with ``vals`` at the sorted, distinct columns ``cols``, made without
    scipy's format checks (valid by construction): scipy's checked constructor costs 75-150 us
    and its row slicing ~15 us, more than a small step's own data work (word2vec: 3.6 million
    steps).  The tests compare it with the checked constructor."""
    X = scipy.sparse.csr_matrix.__new__(scipy.sparse.csr_matrix)
    X.data = np.asarray(vals, dtype=np.float64)
    X.indices = np.asarray(cols, dtype=np.int32)
    X.indptr = np.array([0, X.indices.size], dtype=np.int32)
    X._shape = (1, int(d))
    return X


def _row_getter(X):
    """t -> row t of the batch X as a one-row batch (a sparse row by ``csr_row``)."""
    if not scipy.sparse.issparse(X):
        return lambda t: X[t:t + 1]
    if not X.has_canonical_format:  # csr_row needs sorted, distinct columns
        X = X.copy()
        X.sum_duplicates()
    ptr = X.indptr
    return lambda t: csr_row(X.indices[ptr[t]:ptr[t + 1]], X.data[ptr[t]:ptr[t + 1]], X.shape[1])


def _check_output_range(outputs: np.ndarray, K: int) -> None:
    """Sampled output coordinates must be outputs of the network."""
    if outputs.size and (outputs.min() < 0 or outputs.max() >= K):
        raise ProgramError(f"outputs: coordinates must be in 0..{K - 1} (the network has K = {K} outputs)")


def _ragged(rows, dtype, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of different lengths as a zero-padded array (T, max length) and the lengths."""
    rows = [np.asarray(r, dtype=dtype).ravel() for r in rows]
    count = np.array([r.size for r in rows], dtype=np.int64)
    out = np.zeros((len(rows), int(count.max()) if rows else 0), dtype=dtype)
    for t, r in enumerate(rows):
        if not np.all(np.isfinite(r)):
            raise ProgramError(f"{what}: row {t} contains NaN or infinite values")
        out[t, :r.size] = r
    return out, count


def _pad_to(v, entries):
    D = max(e[2].shape[-1] for e in entries)
    D = max(D, max(e[3].shape[-1] for e in entries))
    return _pad(v, D)


#: ``_column_products`` multiplies a dense matrix of at most this many numbers, else a sparse one.
DENSE_COLUMNS = 1 << 22


def _column_products(entries, k: int) -> np.ndarray:
    """c_b . c_b' for every pair of examples of the input-matrix gradient entries (idx, C, dA):
    C_all C_all^T with C_all (sum B, k) holding every entry's C on its columns idx (one product,
    not a loop over pairs).  C_all is dense over the union of the entries' columns when that is
    small (MAML's dense images: a sparse product of dense rows costs ~10x more), else sparse
    (a large batch of one-hot inputs)."""
    dense = _dense_columns(entries)
    if dense is not None:
        return dense[1] @ dense[1].T
    C_all = scipy.sparse.vstack([_sparse_columns(e, k) for e in entries]).tocsr()
    return (C_all @ C_all.T).toarray()


def _dense_columns(entries):
    """(the union of the entries' columns, C_all (sum B, union) with every entry's C on its
    columns), or None when C_all would have more than DENSE_COLUMNS numbers."""
    union = np.unique(np.concatenate([e[0] for e in entries])) if len(entries) > 1 else np.asarray(entries[0][0])
    total = sum(e[1].shape[0] for e in entries)
    if total * union.size > DENSE_COLUMNS:
        return None
    C_all = np.zeros((total, union.size))
    row = 0
    for idx, C, _ in entries:
        C_all[row:row + C.shape[0], np.searchsorted(union, idx)] = C
        row += C.shape[0]
    return union, C_all


def _sparse_columns(entry, k: int):
    """An input-matrix gradient entry (idx, C, dA)'s weights as a sparse (B, k) matrix: row b
    holds C[b] on the columns idx (the other columns are 0)."""
    idx, C, _ = entry
    B, J = C.shape
    return scipy.sparse.csr_matrix((C.ravel(), np.tile(np.asarray(idx), B), np.arange(0, B * J + 1, J)), shape=(B, k))


def _mean_stderr(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over replicas of (R, N, K) values."""
    R = f.shape[0]
    mean = f.mean(axis=0)
    if R < 2:
        return mean, np.zeros_like(mean)
    return mean, f.std(axis=0, ddof=1) / np.sqrt(R)


def _unique_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(a, return_inverse=True) for a 1-D integer array; a short one (a step's few
    dozen sampled outputs) through a Python set, ~3x faster than numpy's sort there."""
    if a.size > 64:
        return np.unique(a, return_inverse=True)
    values = sorted(set(a.tolist()))
    pos = {v: i for i, v in enumerate(values)}
    return np.array(values, dtype=a.dtype), np.array([pos[v] for v in a.tolist()], dtype=np.intp)


def _contiguous_readout(eng: StepEngine) -> np.ndarray:
    """The readout vectors (R, K, D) as the C-contiguous array the row kernels
    (``training.rowops``) read and write in place (made so once if it is not)."""
    if not eng.readout.flags.c_contiguous:
        eng.readout = np.ascontiguousarray(eng.readout)
    return eng.readout


def _contiguous_cols(eng: StepEngine, U: str) -> np.ndarray:
    """The columns (k, R, D) of input matrix U, C-contiguous (see ``_contiguous_readout``)."""
    cols = eng.input_cols[U]
    if not cols.flags.c_contiguous:
        cols = eng.input_cols[U] = np.ascontiguousarray(cols)
    return cols


def _rules(program: StepProgram) -> dict:
    """The rule of every instruction of the step, looked up once: {"forward": [(key, PASS rule)],
    "backward": [...], "gradient": [(key, GRADIENT rule)] over the forward instructions}."""
    op = program.template.op
    return {"forward": [(k, PASS(op(k))) for k in program.forward],
            "backward": [(k, PASS(op(k))) for k in program.backward],
            "gradient": [(k, GRADIENT(op(k))) for k in program.forward]}


# ---------------------------------------------------------------------------------------------
# One rule per instruction: its value in a pass (forward or backward) and the gradient entry
# it contributes (docs/DESIGN.md 2.9).
# ---------------------------------------------------------------------------------------------
#: rule(engine, key, env, keep) -> the vector (R, B, D) of instruction ``key`` in this pass.
PASS = RuleTable("step-engine pass", domain=ops.VECTOR_OPS)
#: rule(engine, key, env, gradient) -> adds the gradient entry of the tensor ``key`` reads.
GRADIENT = RuleTable("step-engine gradient", domain=ops.VECTOR_OPS)


@PASS.register(ops.InitVec)
def _pass_init_vec(eng: StepEngine, k: str, env: dict, keep: bool) -> np.ndarray:
    """An initial vector (a fixed one, or a trained bias at its current value)."""
    v = eng.vectors[k]
    return np.broadcast_to(v, (v.shape[0], _batch(env), v.shape[2]))


def _batch(env: dict) -> int:
    return env["__X"].shape[0]


def _column_map(eng: StepEngine, k: str) -> tuple[scipy.sparse.csr_matrix, np.ndarray | None, tuple | None]:
    """The input layer ``k`` as a fixed linear map of the input: (M (d x k_U) sparse, the
    constant part (k_U,) or None when it is 0, and ``single`` = (M's one column per input
    coordinate (-1: none), its weight) when no coordinate feeds two columns, else None).
    Built once per layer: it depends on the program only (a dense d x k_U map per step costs
    O(V^2) for word2vec's one-hot inputs)."""
    cache = eng.__dict__.setdefault("_column_maps", {})
    if k in cache:
        return cache[k]
    net = eng.program.net
    op = net.op(k)
    U, *scalars = net.args(k)
    kU = net.op(U).k
    params = eng.program.params
    const = np.zeros(kU)
    index_of = {key: i for i, key in enumerate(eng.program.inputs)}
    rows, cols, vals = [], [], []
    for col, s in zip(op.columns, scalars):
        if s in index_of:
            rows.append(index_of[s])
            cols.append(col)
            vals.append(1.0 / np.sqrt(op.norm))
        else:
            const[col] += params[s] / np.sqrt(op.norm)
    d = len(eng.program.inputs)
    M = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(d, kU))  # duplicates summed
    M.sum_duplicates()
    single = None
    if np.all(np.diff(M.indptr) <= 1):
        single = np.full(d, -1, dtype=np.int64)
        has = np.diff(M.indptr) == 1
        single[has] = M.indices
        weight = np.zeros(d)
        weight[has] = M.data
        single = (single, weight)
    cache[k] = (M, const if np.any(const) else None, single)
    return cache[k]


def _columns(eng: StepEngine, k: str, X) -> tuple[np.ndarray, np.ndarray]:
    """(column indices j, weights C (B, j)) of the input layer ``k`` on the batch X:
    A(x) = sum_j C_j U_j with C_j = s_i / sqrt(norm) for the i-th scalar s_i on column j."""
    M, const, single = _column_map(eng, k)
    if scipy.sparse.issparse(X):
        if single is not None and const is None:
            # each input coordinate feeds at most one column: C from X's nonzeros directly
            col_of, weight = single
            B = X.shape[0]
            if B == 1:
                cols = col_of[X.indices]
                if cols.size and cols[0] >= 0 and np.all(cols[1:] > cols[:-1]):
                    # one example whose columns are distinct and increasing (a sorted CSR row under
                    # an increasing map): they are the columns, its values the weights
                    return cols, (X.data * weight[X.indices])[None, :]
            rows = np.repeat(np.arange(B), np.diff(X.indptr))
            cols = col_of[X.indices]
            live = cols >= 0
            idx, pos = np.unique(cols[live], return_inverse=True)
            C = np.zeros((B, idx.size))
            np.add.at(C, (rows[live], pos), X.data[live] * weight[X.indices[live]])
            return idx, C
        C = (X @ M).tocsr()
        if const is not None:
            C = scipy.sparse.csr_matrix(C.toarray() + const)
        idx = np.unique(C.indices)
        return idx, np.asarray(C[:, idx].todense())
    if single is not None and const is None:
        # each input coordinate feeds at most one column: C_j = weight_i x_i for i -> j
        col_of, weight = single
        live = col_of >= 0
        C = np.zeros((X.shape[0], M.shape[1]))
        C[:, col_of[live]] = X[:, live] * weight[live]
    else:
        C = np.asarray(X @ M) + (0.0 if const is None else const)
    idx = np.flatnonzero(np.any(C != 0, axis=0))
    return idx, C[:, idx]


#: Input layers: a batch of at most this many examples sums its columns in place (``row_sums``);
#: a larger one gathers them for a BLAS product.
SMALL_BATCH = 8


@PASS.register(ops.InputLayer)
def _pass_input_layer(eng: StepEngine, k: str, env: dict, keep: bool) -> np.ndarray:
    """A(x) = sum_j C_j U_j over the columns j the batch uses: with most of the k_U columns
    used, one BLAS product C' U over all of them (C' = C with zero weights on the others, no
    copy of U); with a few, a small batch sums them in place (``rowops.row_sums``) and a larger
    one gathers them for a BLAS product (einsum's loop would cost B j D: minutes for V = 9044
    one-hot features)."""
    idx, C = _columns(eng, k, env["__X"])
    env["__cols"][k] = (idx, C)
    U = eng._layer_matrix[k]
    out = _column_sum(_contiguous_cols(eng, U), idx, C)
    for idx_p, C_p, X_p in eng._pending.get(U, ()):
        # a deferred update U_j += sum_b' C_p[b', j] X_p[b'] adds (C C_p^T on the shared columns) X_p
        shared, i, i_p = np.intersect1d(idx, idx_p, assume_unique=True, return_indices=True)
        if shared.size:
            out, part = eng.alg.align(out, np.matmul((C[:, i] @ C_p[:, i_p].T)[None], X_p))
            out = out + part
    return out


def _column_sum(table: np.ndarray, idx: np.ndarray, C: np.ndarray) -> np.ndarray:
    """sum_j C[b, j] table[idx[j]] as (R, B, D), for a table (k_U, R, D)."""
    kU, R, D = table.shape
    B = C.shape[0]
    if 2 * idx.size >= kU:
        if idx.size < kU:
            full = np.zeros((B, kU))
            full[:, idx] = C
            C = full
        return np.swapaxes((C @ table.reshape(kU, R * D)).reshape(B, R, D), 0, 1)
    if B <= SMALL_BATCH:
        W = np.repeat(C[:, :, None], R, axis=2)          # (B, j, R)
        return np.swapaxes(row_sums(table, False, np.repeat(idx[None, :], B, axis=0), W), 0, 1)
    cols = table[idx]                                    # (j, R, D)
    return np.swapaxes((C @ cols.reshape(idx.size, R * D)).reshape(B, R, D), 0, 1)


@PASS.register(ops.MatMul)
def _pass_matmul(eng: StepEngine, k: str, env: dict, keep: bool) -> np.ndarray:
    """W_t z (or W_t^T z): a_t W_0 z + the recorded updates (module docstring)."""
    W, z, tr = eng.program.template.matmul_parts(k)
    out, rows = eng.mats[W].multiply(env[z], tr, keep)
    if keep:
        env["__rows"][(W, tr, z)] = rows
    return out


@PASS.register(ops.Nonlin)
def _pass_nonlin(eng: StepEngine, k: str, env: dict, keep: bool) -> np.ndarray:
    """phi of the arguments, coordinatewise (finite width, particles); for the exact algebra
    the affine map on coefficients: const * 1 + sum_i c_i x_i."""
    low = eng.program.lowered[k]
    values = [_value(eng, name, env) for name in low.names]
    if eng.alg.kind != "exact":
        out = low.fn(*values)
        B = _batch(env)
        return np.broadcast_to(out, (eng.alg.R, B, eng.alg.D)) if np.ndim(out) < 3 else out
    alg = eng.alg
    const_fn, has_const = low.const
    terms = []
    if has_const:
        terms.append(np.asarray(const_fn(*values)).reshape(-1, 1) * alg.constant(_batch(env))[0][None])
    for vec, fn in low.coefs:
        c = np.asarray(fn(*values), dtype=np.float64)
        terms.append(_coef_shape(c) * env[vec])
    terms = alg.align(*terms)
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return np.broadcast_to(out, (1, _batch(env), out.shape[-1])) if out.shape[1] != _batch(env) else out


def _coef_shape(c: np.ndarray) -> np.ndarray:
    """A scalar coefficient (float, or per example (1, B, 1) from input coordinates)."""
    return c if c.ndim == 3 else c.reshape(-1, 1) if c.ndim == 1 else c


def _value(eng: StepEngine, name: str, env: dict):
    """The value of a Nonlin argument: a vector of this pass, a Param, an input coordinate
    (per example), or a power of n."""
    if name in env:
        return env[name]
    sp_ = eng.program
    if name in sp_.params:
        return sp_.params[name]
    op = sp_.template.op(name)
    if isinstance(op, ops.Input):
        X = env["__X"]
        col = X[:, op.index]
        col = np.asarray(col.todense()).ravel() if scipy.sparse.issparse(X) else col
        return col[None, :, None]
    if isinstance(op, ops.WidthPower):
        return eng.alg.n_power(op.exponent)
    raise ProgramError(f"instruction {name!r}: the step engine cannot read a {type(op).__name__} inside a pass")


@GRADIENT.register(ops.Nonlin)
def _no_tensor(eng: StepEngine, k: str, env: dict, g: Gradient) -> None:
    """No trained tensor."""


@GRADIENT.register(ops.InitVec)
def _bias_gradient(eng: StepEngine, k: str, env: dict, g: Gradient) -> None:
    """A trained bias b: its gradient vector db (the example weights are in chi)."""
    if k in eng.program.biases and k in eng.program.grads:
        g.biases.setdefault(k, []).append((env[eng.program.grads[k]],))


@GRADIENT.register(ops.InputLayer)
def _input_matrix_gradient(eng: StepEngine, k: str, env: dict, g: Gradient) -> None:
    """Layer A = sum_j C_j U_j: the entry (columns, C, dA)."""
    U = eng._layer_matrix[k]
    if U in eng.program.input_mats and k in eng.program.grads:
        idx, C = env["__cols"][k]
        g.input_mats.setdefault(U, []).append((idx, C, env[eng.program.grads[k]]))


@GRADIENT.register(ops.MatMul)
def _matrix_gradient(eng: StepEngine, k: str, env: dict, g: Gradient) -> None:
    """Use y = W x: the pair (x on W's side, dy on W^T's side); for y = W^T x the roles swap.
    A dy that no backward matmul read is added to its side now."""
    sp_ = eng.program
    W, x, tr = sp_.template.matmul_parts(k)
    if W not in sp_.hidden or k not in sp_.grads:
        return
    dy_key = sp_.grads[k]
    rows = env["__rows"]
    x_rows = rows[(W, tr, x)]
    dy_rows = rows.get((W, not tr, dy_key))
    if dy_rows is None:
        dy_rows = eng.mats[W].store(env[dy_key], not tr)
        rows[(W, not tr, dy_key)] = dy_rows
    i_rows, j_rows = (dy_rows, x_rows) if tr else (x_rows, dy_rows)
    w = np.full((eng.alg.R, len(x_rows)), 1.0)
    # the example weights already sit in dy (the backward pass is linear in chi)
    g.matrices.setdefault(W, []).append((i_rows, j_rows, env[x], env[dy_key], w))
