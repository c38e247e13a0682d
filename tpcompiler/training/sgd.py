"""SGD unrolled into one NETSOR-transpose program (docs/DESIGN.md 2.4-2.6): a graph pass.

Input: a network template (a program with an input, a readout, input matrices, n x n
matrices and coordinatewise nonlinearities), an abc-parametrization, data and a schedule.
Output: a concrete program whose outputs are f_t(xi) for every step t = 0..T and every
train/eval input -- T steps of (mini-)batch SGD written with the instructions of docs/DESIGN.md
2.1 only, so that the Master theorem derives its limit like any other program and the
finite-width interpreter runs it exactly.

Parametrization (docs/DESIGN.md 2.4, 2.6).  Trained tensors P = n^{-a} p, p ~ N(0, sigma^2 n^{-2b})
at init, updated by p <- p - eta n^{-c} dLoss/dp, i.e. P <- P - eta n^{-c-2a} dLoss/dP.  The
program carries O(1) vectors only:

* readout (layer L+1): P = sigma n^{-(a_o+b_o)} v with v O(1); f_k = sigma n^{1-(a_o+b_o)}
  mean(v_k x^L); the loss gradient of the readout vector is dx^L := sigma sum_k chi_k v_k, so
  dLoss/dz = n^{-(a_o+b_o)} dz for every vector z, and
  v_k <- v_k - (eta / (B sigma)) n^{b_o-a_o-c} sum_i chi_ik x^L_i;
* n x n matrices (layer l, a_l + b_l = 1/2 so W_0 has N(0, sigma^2/n) entries):
  W_t z = W_0 z - (eta/B) n^{1-c-2a_l-(a_o+b_o)} sum_{s<t, i} dy_si mean(x_si z) for every
  use y = W x of the template (and W_t^T z likewise with the roles swapped);
* input matrices (layer 1, a_1 + b_1 = 0: N(0, 1) entries): an input layer A = U s /
  sqrt(norm) becomes A_0 - (eta/B) n^{-c-2a_1-(a_o+b_o)} sum dA_si Cov(A_si, A) where Cov is
  the input layers' inner product (xi_s . xi / d for a dense input layer);
* chi_ik = dloss/df_k at (f_t(xi_i), y_i): squared error f - y, logistic sigmoid(f) - y
  (labels 0/1), softmax cross-entropy softmax(f)_k - y_k.

Powers of n are WidthPower scalars (limit 1 or 0); a power that would grow with n means the
parametrization is unstable and is refused.  For muP every power is n^0 and the program is
the recursion of docs/DESIGN.md 2.5; the ZDot terms of every W_0 use are derived, not assumed.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import sympy as sp

from tpcompiler.ir import ops
from tpcompiler import validation
from tpcompiler.compiler import DEFAULT_PARTICLES, graph_of
from tpcompiler.ir.backward import (derive_backward, forward_nodes, refuse_moments, refuse_readout_bias,
                                    refuse_zero_scales)
from tpcompiler.training.finite import batch_indices
from tpcompiler.ir.graph import Graph, ProgramError
from tpcompiler.ir.nonlinearities import sigmoid
from tpcompiler.ir.ops import VEC, node_symbol
from tpcompiler.ir.symbols import NodeSymbol
from tpcompiler.ir.rules import RuleTable
from tpcompiler.training.fit import MAX_STEPS, STEPS_WHY  # the largest number of steps, tp.fit's too
from tpcompiler.training.parametrization import ABC

LOSSES = ("mse", "logistic", "softmax")

#: Largest memory for the returned trajectories (f and its standard error, float64).
MAX_TRAJECTORY_BYTES = 2 * 2**30
SCHEDULES = ("constant", "linear")


def loss_gradient(loss: str, f: list, y) -> list:
    """chi_k = d loss / d f_k as sympy expressions of the outputs f (docs/DESIGN.md 2.6 for mse)."""
    if loss == "mse":
        return [fk - float(yk) for fk, yk in zip(f, y)]
    if loss == "logistic":
        if len(f) != 1:
            raise ProgramError("logistic loss needs a one-dimensional output; use softmax for several classes")
        return [sigmoid(f[0]) - float(y[0])]
    if loss == "softmax":
        top = sp.Add(*[sp.exp(fk) for fk in f])
        return [sp.exp(fk) / top - float(yk) for fk, yk in zip(f, y)]
    raise ProgramError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")


@dataclass
class SGD:
    """What to train on: inputs X (N x d), targets Y (N x K), T steps of learning rate eta,
    batch B (None: full batch; else the cyclic schedule of finite_training.batch_indices)."""

    X: np.ndarray
    Y: np.ndarray
    steps: int
    lr: float
    batch: int | None = None
    loss: str = "mse"
    X_eval: np.ndarray | None = None
    features: bool = False  # also output the last-layer feature kernel on the eval inputs
    #: the step engine's options (tp.train; the unrolled oracle implements the defaults only)
    weight_decay: float = 0.0
    clip: float | None = None
    schedule: str = "constant"   # or "linear": lr -> lr_end over the steps
    lr_end: float = 0.0
    eval_every: int = 1

    def __post_init__(self):
        # tpcompiler.validation: the checks tpc train applies too, with the argument named
        self.X = validation.array(self.X, "X", ndim=(1, 2))
        self.Y = validation.array(self.Y, "Y", ndim=(1, 2))
        self.steps = validation.count(self.steps, "steps", maximum=MAX_STEPS, why=STEPS_WHY)
        self.lr = validation.number(self.lr, "lr", positive=True)
        self.batch = validation.optional_count(self.batch, "batch", minimum=1)
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise validation.ArgumentError(f"loss: unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        self.X_eval = validation.optional_array(self.X_eval, "X_eval", ndim=(1, 2))
        columns = None if self.X_eval is None else np.atleast_2d(self.X_eval).shape[1]
        if columns is not None and self.X.ndim == 2 and columns != self.X.shape[1]:
            raise validation.ArgumentError(f"X_eval: has {columns} columns but X has {self.X.shape[1]} (the same "
                                           "inputs as training)")
        if self.loss == "logistic":
            validation.binary_targets(self.Y, "Y")
        if self.loss == "softmax":
            Y = self.Y
            rows_ok = Y.ndim != 2 or np.abs(Y.sum(axis=1) - 1).max(initial=0) <= 1e-6
            if Y.size and (Y.min() < 0 or Y.max() > 1 or not rows_ok):
                raise validation.ArgumentError("Y: the softmax loss needs probability rows (entries in [0, 1] "
                                               "summing to 1, e.g. one-hot labels)")
        self.weight_decay = validation.number(self.weight_decay, "weight_decay")
        if self.weight_decay < 0:
            raise validation.ArgumentError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        self.clip = None if self.clip is None else validation.number(self.clip, "clip", positive=True)
        if self.schedule not in SCHEDULES:
            raise validation.ArgumentError(f"schedule: unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        self.lr_end = validation.number(self.lr_end, "lr_end", nonnegative=True)
        self.eval_every = validation.count(self.eval_every, "eval_every", minimum=1)
        if self.batch is not None and self.X.ndim == 2 and self.batch > self.X.shape[0]:
            raise validation.ArgumentError(f"batch: {self.batch} is larger than the training set (N = {self.X.shape[0]})")

    def rate(self, t: int) -> float:
        """The learning rate of step t: constant, or linear from lr to lr_end over the steps."""
        if self.schedule == "constant" or self.steps == 0:
            return self.lr
        return self.lr + (self.lr_end - self.lr) * t / self.steps

    def only_plain_sgd(self, what: str) -> None:
        """Refuse the options that ``what`` does not implement."""
        extras = [name for name, default in (("weight_decay", 0.0), ("clip", None), ("schedule", "constant"),
                                             ("eval_every", 1)) if getattr(self, name) != default]
        if extras:
            raise validation.ArgumentError(f"{extras[0]}: {what} implements plain SGD only (constant learning rate, "
                                           "no weight decay or clipping, every step evaluated); use tp.train or tp.StepEngine")


def _targets(Y, N: int, K: int) -> np.ndarray:
    """Targets as an N x K array: one row per training input, one column per output."""
    Y = np.asarray(Y, dtype=np.float64)
    given = Y.shape
    if Y.ndim == 1:
        Y = Y[None, :] if (N == 1 and K > 1) else Y[:, None]
    if Y.ndim != 2 or Y.shape[0] != N:
        raise ProgramError(f"targets Y must have one row per training input (N = {N}), got shape {given}")
    if Y.shape[1] != K:
        raise ProgramError(f"targets have {Y.shape[1]} columns but the network has {K} outputs")
    if not np.all(np.isfinite(Y)):
        raise ProgramError("targets Y contain NaN or infinite values")
    return Y


@dataclass
class _Layers:
    """Which abc layer every trained tensor of the template belongs to."""

    inputs: list[str]    # input matrices: layer 1
    hidden: list[str]    # n x n matrices: layers 2..L in creation order
    readouts: tuple      # readout vectors: layer L + 1


def _layers(net: Graph, abc: ABC) -> _Layers:
    refuse_moments(net, "training (tp.train, tp.unroll)")
    forward = set(forward_nodes(net))
    ro = net.readout
    inputs = [k for k in net.keys_of(ops.InputMat) if net.op(k).trainable]
    hidden = [k for k in net.keys_of(ops.InitMat) if net.op(k).trainable]
    for k in net.keys_of(ops.InitVec):
        if k in forward and k not in ro.readouts and net.op(k).trainable:
            raise ProgramError(
                f"initial vector {k!r} is trained (a bias?): the SGD pass trains input matrices, n x n "
                "matrices and the readout; declare it with trainable=False (the bundled programs: -p b_std=None "
                "drops the biases)"
            )
    refuse_readout_bias(net, "training (tp.train, tp.unroll)")
    L = abc.depth
    if not inputs:
        raise ProgramError(f"program {net.name!r} has no input matrix; declare the input layer with p.input_layer or p.input_matrix")
    if len(hidden) != L - 1:
        raise ProgramError(
            f"the parametrization has depth L = {L} (L - 1 = {L - 1} hidden matrices) but program "
            f"{net.name!r} trains {len(hidden)} n x n matrices ({', '.join(hidden) or 'none'})"
        )
    a, b = abc.a, abc.b
    if a[0] + b[0] != 0:
        raise ProgramError(f"layer 1: a_1 + b_1 = {a[0] + b[0]}, but an input matrix has N(0, 1) entries at init (a_1 + b_1 = 0)")
    for i, W in enumerate(hidden, start=1):
        if a[i] + b[i] != sp.Rational(1, 2):
            raise ProgramError(f"layer {i + 1} ({W}): a + b = {a[i] + b[i]}, but an n x n matrix has N(0, sigma^2/n) entries (a + b = 1/2)")
    refuse_zero_scales(net, inputs, hidden)
    return _Layers(inputs, hidden, ro.readouts)


def _exponent_check(e, what: str):
    e = sp.nsimplify(e)
    if e > 0:
        raise ProgramError(f"{what} grows like n^{e}: the parametrization is unstable (see tpc classify)")
    return e


class _Unroller:
    def __init__(self, net: Graph, abc: ABC, sgd: SGD):
        net.validate()
        if net.readout is None:
            raise ProgramError(f"program {net.name!r} has no readout; training needs p.readout(...)")
        if len(net.inputs) != 1:
            raise ProgramError(f"program {net.name!r} needs exactly one input to be trained")
        if sgd.loss not in LOSSES:
            raise ProgramError(f"unknown loss {sgd.loss!r}; use one of {', '.join(LOSSES)}")
        self.net, self.abc, self.sgd = net, abc, sgd
        self.layers = _layers(net, abc)
        ro = net.readout
        self.K = len(ro.readouts)
        (self.group, decl), = net.inputs.items()
        self.d = len(decl.keys)
        self.X = self._data(sgd.X, "X")
        self.Y = _targets(sgd.Y, self.X.shape[0], self.K)
        self.Xe = self._data(sgd.X_eval, "X_eval") if sgd.X_eval is not None else np.zeros((0, self.d))
        a, b, c = abc.a, abc.b, abc.c
        ao, bo = a[-1], b[-1]
        if sp.nsimplify(ao + bo) == sp.Rational(1, 2):
            # (NTP, SP: stable, but f_0 is O(1) noise, a fluctuation of the mean v . x / n that
            # the limit's program has no variable for; it was refused as "unstable")
            raise ProgramError(
                "tp.unroll: the readout's a + b = 1/2 makes the output at initialization "
                "an O(1) Gaussian fluctuation (the kernel regime: NTP, SP), which an unrolled program cannot "
                "represent (it unrolls parametrizations whose output at initialization tends to 0, such as muP "
                "and MFP); train such a network in the kernel regime (tpc train --param ntp, tp.predict)")
        self.e_f = _exponent_check(1 - (ao + bo), "the output at initialization")
        self.e_v = _exponent_check(bo - ao - c, "the readout update")
        self.e_U = _exponent_check(-c - 2 * a[0] - (ao + bo), "the input-layer update")
        self.e_W = {W: _exponent_check(1 - c - 2 * a[i] - (ao + bo), f"the update of {W}")
                    for i, W in enumerate(self.layers.hidden, start=1)}
        # The backward pass of the loss: seeded by sigma sum_k chi_k v_k, chi_k placeholders
        # that every step replaces by its loss derivatives.
        with_chi = net.copy()
        seed_syms = [node_symbol(with_chi.add(f"chi_{k + 1}", ops.Param(0.0))) for k in range(self.K)]
        seed = ro.sigma * sp.Add(*[s * node_symbol(v) for s, v in zip(seed_syms, ro.readouts)])
        self.template, self.grads = derive_backward(with_chi, prefix="d", seed=seed)
        self.chi_syms = seed_syms
        self.forward = forward_nodes(net)
        self.backward = [k for k in self.template.order() if k not in net.g and self.template.kind(k) == VEC]
        self.g = Graph(f"{net.name}_sgd")
        self.updates_W: dict = {W: [] for W in self.layers.hidden}   # W -> [(coef, r, c)]
        self.updates_U: dict = {U: [] for U in self.layers.inputs}   # U -> [(coef, dA, template A, example)]
        self.updates_v: list = []                                      # [(step, coef_k list, x^L key)]
        self.X_all = np.concatenate([self.X, self.Xe])
        #: output name -> which trajectory entry it is (filled by ``outputs``)
        self.trajectory: dict[str, TrajectoryEntry] = {}

    def _data(self, X, what):
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if X.ndim != 2 or X.shape[1] != self.d:
            raise ProgramError(f"{what} must be N x {self.d} (the network's input dimension), got shape {X.shape}")
        if X.shape[0] == 0 and what == "X":
            raise ProgramError("the training set is empty")
        if not np.all(np.isfinite(X)):
            raise ProgramError(f"{what} contains NaN or infinite values")
        return X

    # -- graph building helpers (every node interned: equal requests share one node) ------
    def nonlin(self, expr: sp.Expr, base: str) -> str:
        """The vector ``expr`` (a node of its own unless it is one already)."""
        if isinstance(expr, NodeSymbol) and expr.key in self.g.g and self.g.kind(expr.key) == VEC:
            return expr.key
        return self.g.intern_expr(ops.Nonlin, expr, base)

    def mean(self, expr: sp.Expr, base: str = "m") -> sp.Symbol:
        """The Moment (1/n) sum_a expr_a."""
        return node_symbol(self.g.intern_expr(ops.Moment, expr, base))

    def power(self, e) -> sp.Expr:
        """n^e (1 for e = 0)."""
        if e == 0:
            return sp.S.One
        name = f"n_pow_{str(e).replace('/', '_').replace('-', 'm')}"
        return node_symbol(self.g.intern(ops.WidthPower(sp.Rational(e)), (), name))

    # -- the program ------------------------------------------------------------------------
    def build(self) -> Graph:
        net, g = self.net, self.g
        dependent = net.input_dependent()
        for k in net.order():  # shared by every step: the declarations that do not depend on the input
            if isinstance(net.op(k), ops.DECLARATIONS) and k not in dependent:
                g.add(k, net.op(k), net.args(k))
        g.init_cov = dict(net.init_cov)
        g.add("eta", ops.Param(float(self.sgd.lr)))
        self.examples = []
        for i, row in enumerate(np.concatenate([self.X, self.Xe])):
            keys = [g.add(f"x{i}_{j + 1}", ops.Param(float(v))) for j, v in enumerate(row)]
            self.examples.append(keys)
        N, T = self.X.shape[0], self.sgd.steps
        B = N if self.sgd.batch is None else int(self.sgd.batch)
        readouts = [node_symbol(v) for v in net.readout.readouts]
        for t in range(T + 1):
            fwd = {e: self.forward_pass(t, e, readouts) for e in range(len(self.examples))}
            f = {e: self.outputs(t, e, fwd[e], readouts) for e in fwd}
            if t == T:
                break
            batch = batch_indices(N, self.sgd.batch, t)
            # every example's backward pass reads the weights of step t; only then are the
            # step's updates recorded (a later example must not see an earlier one's update)
            grads = []
            for e in batch:
                chi = loss_gradient(self.sgd.loss, f[e], self.Y[e])
                grads.append((e, self.backward_pass(t, e, fwd[e], readouts, chi), chi))
            new_v = []
            for e, back, chi in grads:
                self.record(t, e, fwd[e], back, chi, B, new_v)
            readouts = self.step_readout(t, readouts, new_v)
        return g

    def forward_pass(self, t: int, e: int, readouts) -> dict:
        """Replay the template's forward pass for example e at step t: template key -> new key."""
        net = self.net
        step = _Replay(t, e, {}, {node_symbol(k): node_symbol(self.examples[e][net.op(k).index]) for k in net.input_keys()})
        for k in self.forward:
            step.names[k] = REPLAY(net.op(k))(self, net, k, step)
        return step.names

    def input_layer(self, k: str, e: int, t: int) -> str:
        net, g = self.net, self.g
        U, *scalars = net.args(k)
        args = [self.examples[e][net.op(s).index] if isinstance(net.op(s), ops.Input) else s for s in scalars]
        base = g.intern(net.op(k), (U, *args), f"{k}_{t}_{e}_0")
        terms = []
        for coef, dA, A, ex in self.updates_U.get(U, []):
            cov = self.input_cov(A, ex, k, e)
            if cov != 0:
                terms.append(coef * cov * node_symbol(dA))
        if not terms:
            return base
        return self.nonlin(node_symbol(base) + sp.Add(*terms), f"{k}_{t}_{e}")

    def input_cov(self, A: str, ea: int, B: str, eb: int) -> float:
        """Cov(Z^A(xi_ea), Z^B(xi_eb)) of two input layers of one input matrix (a number)."""
        net = self.net
        opa, opb = net.op(A), net.op(B)

        def values(key, e):
            return [float(self.X_all[e, net.op(s).index]) if isinstance(net.op(s), ops.Input) else net.op(s).value
                    for s in net.args(key)[1:]]

        va, vb = values(A, ea), values(B, eb)
        total = sum(x * y for ca, x in zip(opa.columns, va) for cb, y in zip(opb.columns, vb) if ca == cb)
        return total / np.sqrt(opa.norm * opb.norm)


    def matmul(self, mat: str, z: str, transposed: bool, base: str) -> str:
        """W_t z (or W_t^T z) = W_0 z + the rank-one updates of earlier steps."""
        g = self.g
        product = g.intern(ops.MatMul(transposed), (mat, z), base + "_0")
        terms = []
        for coef, r, c in self.updates_W.get(mat, []):
            if transposed:
                terms.append(coef * self.mean(node_symbol(r) * node_symbol(z)) * node_symbol(c))
            else:
                terms.append(coef * self.mean(node_symbol(c) * node_symbol(z)) * node_symbol(r))
        if not terms:
            return product
        return self.nonlin(node_symbol(product) + sp.Add(*terms), base)

    def outputs(self, t: int, e: int, fwd: dict, readouts) -> list:
        ro = self.net.readout
        x = node_symbol(fwd[ro.vector])
        f = [ro.sigma * self.power(self.e_f) * self.mean(v * x, f"f_{t}_{e}") for v in readouts]
        N = self.X.shape[0]
        split, i = ("train", e) if e < N else ("eval", e - N)
        for k, fk in enumerate(f):
            name = f"f_{split}[{t},{i}]" + (f"[{k}]" if self.K > 1 else "")
            self.g.outputs[name] = fk
            self.trajectory[name] = TrajectoryEntry(split, t, i, k)
        if self.sgd.features and split == "eval":
            self._features(t, i, fwd)
        return f

    def _features(self, t: int, i: int, fwd: dict):
        """Last-layer feature kernel mean(x^L(xi_i) x^L(xi_j)) on the eval inputs."""
        ro = self.net.readout
        self._feat = getattr(self, "_feat", {})
        self._feat[(t, i)] = fwd[ro.vector]
        for (s, j), key in list(self._feat.items()):
            if s == t and j <= i:
                self.g.outputs[f"features[{t},{j},{i}]"] = self.mean(node_symbol(key) * node_symbol(fwd[ro.vector]))

    def backward_pass(self, t: int, e: int, fwd: dict, readouts, chi) -> dict:
        """Replay the template's backward pass for example e at step t, reading the forward
        vectors ``fwd``, the current readouts and the loss derivatives chi: key -> new key."""
        tpl = self.template
        sub = {node_symbol(k): node_symbol(v) for k, v in fwd.items()}
        sub.update({node_symbol(v): r for v, r in zip(self.net.readout.readouts, readouts)})
        sub.update(dict(zip(self.chi_syms, chi)))
        sub.update({node_symbol(k): node_symbol(self.examples[e][self.net.op(k).index]) for k in self.net.input_keys()})
        step = _Replay(t, e, dict(fwd), sub)
        for k in self.backward:
            step.names[k] = REPLAY(tpl.op(k))(self, tpl, k, step)
        return {k: step.names[k] for k in self.backward}

    def grad(self, node: str, fwd: dict, back: dict) -> str:
        d = self.grads[node]
        return back[d] if d in back else fwd[d]

    def record(self, t, e, fwd, back, chi, B, new_v):
        """Parameter updates from example e at step t (loss-gradient vectors include chi):
        each forward instruction's rule in ``UPDATES``, then the readout's."""
        for k in self.forward:
            UPDATES(self.net.op(k))(self, k, e, fwd, back, B)
        ro = self.net.readout
        coef = -node_symbol("eta") / (B * ro.sigma) * self.power(self.e_v)
        new_v.append([coef * ck * node_symbol(fwd[ro.vector]) for ck in chi])

    def step_readout(self, t: int, readouts, new_v) -> list:
        out = []
        for k, v in enumerate(readouts):
            expr = v + sp.Add(*[terms[k] for terms in new_v])
            out.append(node_symbol(self.nonlin(expr, f"{self.net.readout.readouts[k]}_{t + 1}")))
        return out


@dataclass
class _Replay:
    """One replay of a template pass at step t for example e: template key -> new key
    (``names``) and the substitution of the template's other symbols (inputs, readouts, chi)."""

    t: int
    e: int
    names: dict
    symbols: dict


#: How a template vector is replayed in the unrolled program (forward and backward passes):
#: rule(unroller, template, key, replay) -> the new node.
REPLAY = RuleTable("SGD replay", domain=ops.VECTOR_OPS)


@REPLAY.register(ops.InitVec)
def _replay_init_vec(u: "_Unroller", tpl: Graph, k: str, step: _Replay) -> str:
    """An untrained initial vector is the same at every step and example."""
    return k


@REPLAY.register(ops.InputLayer)
def _replay_input_layer(u: "_Unroller", tpl: Graph, k: str, step: _Replay) -> str:
    """A_t(xi_e) = A_0(xi_e) + the input matrix's updates so far."""
    return u.input_layer(k, step.e, step.t)


@REPLAY.register(ops.MatMul)
def _replay_matmul(u: "_Unroller", tpl: Graph, k: str, step: _Replay) -> str:
    """W_t z = W_0 z + the matrix's rank-one updates so far."""
    mat, x, tr = tpl.matmul_parts(k)
    return u.matmul(mat, step.names[x], tr, f"{k}_{step.t}_{step.e}")


@REPLAY.register(ops.Nonlin)
def _replay_nonlin(u: "_Unroller", tpl: Graph, k: str, step: _Replay) -> str:
    """phi of the replayed arguments."""
    rep = dict(step.symbols)
    rep.update({node_symbol(a): node_symbol(step.names[a]) for a in tpl.vector_args(k) if a in step.names})
    return u.nonlin(tpl.op(k).expr.xreplace(rep), f"{k}_{step.t}_{step.e}")


#: The parameter update a forward instruction contributes (docs/DESIGN.md 2.4):
#: rule(unroller, key, example, forward names, backward names, batch size).
UPDATES = RuleTable("SGD updates", domain=ops.VECTOR_OPS)


@UPDATES.register(ops.InitVec, ops.Nonlin)
def _no_update(u: "_Unroller", k: str, e: int, fwd: dict, back: dict, B: int) -> None:
    """No trained tensor: nothing to update."""


@UPDATES.register(ops.MatMul)
def _update_matrix(u: "_Unroller", k: str, e: int, fwd: dict, back: dict, B: int) -> None:
    """Use y = W x: W moves by -(eta/B) n^{e_W} dy x^T (x dy^T for y = W^T x)."""
    mat, x, tr = u.net.matmul_parts(k)
    if mat in u.updates_W and k in u.grads:
        coef = -node_symbol("eta") / B * u.power(u.e_W[mat])
        dy, xin = u.grad(k, fwd, back), fwd[x]
        u.updates_W[mat].append((coef, xin, dy) if tr else (coef, dy, xin))


@UPDATES.register(ops.InputLayer)
def _update_input_matrix(u: "_Unroller", k: str, e: int, fwd: dict, back: dict, B: int) -> None:
    """Layer A = U s / sqrt(norm): the trained tensor is scale * U, so U moves by 1/scale^2 of
    its gradient step -(eta/B) n^{e_U} dA (s / sqrt(norm))^T."""
    U = u.net.args(k)[0]
    if U in u.updates_U and k in u.grads:
        coef = -node_symbol("eta") / (B * u.net.op(U).scale ** 2) * u.power(u.e_U)
        u.updates_U[U].append((coef, u.grad(k, fwd, back), k, e))


def _check_abc_sgd(abc, sgd) -> None:
    if not isinstance(abc, ABC):
        raise validation.ArgumentError(f"abc: expected a parametrization such as tp.named('mup', depth) or "
                                       f"tp.parse_abc('a=..;b=..;c=..', depth), got {abc!r}")
    if not isinstance(sgd, SGD):
        raise validation.ArgumentError(f"sgd: expected tp.SGD(X, Y, steps=..., lr=...), got {sgd!r}")


def unroll(net: Graph, abc: ABC, sgd: SGD) -> Graph:
    """T steps of SGD of the template ``net`` under ``abc`` as one program (module docstring).

    Outputs: ``f_train[t,i]`` (and ``f_eval[t,i]``) for t = 0..T, with ``[k]`` appended for a
    K-dimensional output; with ``sgd.features`` also ``features[t,i,j]`` (i <= j), the last
    layer's feature kernel on the eval inputs."""
    return unroll_trajectory(net, abc, sgd)[0]


def unroll_trajectory(net, abc: ABC, sgd: SGD) -> tuple[Graph, dict[str, "TrajectoryEntry"]]:
    """``unroll`` and the record of its outputs: output name -> ``TrajectoryEntry``."""
    net = graph_of(net)
    _check_abc_sgd(abc, sgd)
    sgd.only_plain_sgd("the unrolled program")
    unroller = _Unroller(net, abc, sgd)
    return unroller.build().validate(), unroller.trajectory


class TrajectoryEntry(NamedTuple):
    """Output f_split[t,i][k] of an unrolled program: the function value of output k on input
    i of split ("train" or "eval") after t steps."""

    split: str
    t: int
    i: int
    k: int


# ---------------------------------------------------------------------------------------
# Training with the Dynamical Dichotomy (docs/DESIGN.md 2.4): feature learning runs the limit of
# the unrolled program, the kernel regime runs kernel gradient descent with the NTK.
# ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """Infinite-width training trajectory: f_train (T+1, N[, K]), f_eval (T+1, N_eval[, K]),
    their standard errors (0 where exact), the regime and how it was computed."""

    f_train: np.ndarray
    f_eval: np.ndarray
    f_train_stderr: np.ndarray
    f_eval_stderr: np.ndarray
    regime: str
    method: str
    steps: np.ndarray | None = None   # the steps at which f was recorded


def _limit_power(e) -> float:
    e = sp.nsimplify(e)
    if e > 0:
        raise ProgramError(f"a kernel contribution grows like n^{e}: the parametrization is unstable")
    return 1.0 if e == 0 else 0.0


def training_kernel_graph(net: Graph, abc: ABC) -> Graph:
    """``net`` with the NTK weights of gradient descent under ``abc`` (kernel regime):
    Theta = sum_P n^{-c-2a_P} <df/dP, df/dP'> over the trained tensors P (docs/DESIGN.md 2.6: for
    NTP this is neural-tangents' NTK divided by sigma^2)."""
    layers = _layers(net, abc)
    a, b, c = abc.a, abc.b, abc.c
    ao, bo = a[-1], b[-1]
    back = 1 - 2 * (ao + bo)  # the sqrt(n)-scaled backward vectors carry n^{1/2 - (a_o+b_o)}
    g = net.copy()
    ro = g.readout
    for U in layers.inputs:
        # the trained matrix is scale U: its gradient is dU / scale
        scale2 = float(g.at_param_values(g.op(U).scale)) ** 2
        w = _limit_power(-c - 2 * a[0] + back) / scale2
        g.g.nodes[U]["op"] = ops.InputMat(g.op(U).k, True, sp.Float(w), g.op(U).scale)
    for i, W in enumerate(layers.hidden, start=1):
        op = g.op(W)
        g.g.nodes[W]["op"] = ops.InitMat(op.sigma, True, sp.Float(_limit_power(1 - c - 2 * a[i] + back)))
    sig_o2 = float(g.at_param_values(ro.sigma)) ** 2
    wv = _limit_power(1 - c - 2 * ao) / sig_o2
    for v in ro.readouts:
        op = g.op(v)
        g.g.nodes[v]["op"] = ops.InitVec(op.var, True, sp.Float(wv))
    g.readout = ops.Readout(ro.vector, ro.readout, ro.sigma, None, None, ro.others)
    return g


def train(net, abc: ABC, sgd: SGD, particles: int = DEFAULT_PARTICLES, seed: int = 0, method: str = "auto",
          progress: bool | None = None, resume: str | None = None, save_state: str | None = None) -> TrainResult:
    """The infinite-width trajectory of SGD (docs/DESIGN.md 2.4-2.6, 2.9), routed by the regime:
    unstable -> error naming the violated conditions; feature learning -> the step engine
    (exact if Gaussian-linear, else ``particles`` particles in 10 groups, 2 below 40); kernel -> kernel
    gradient descent with the limiting NTK from f_0 = 0 (the mean over initializations);
    trivial -> f stays at its limit 0.  f is recorded every ``sgd.eval_every`` steps and after
    the last one (``TrainResult.steps``).  Feature learning only: ``resume`` continues the run
    of a step-engine checkpoint (.npz, ``StepEngine.save``) to step ``sgd.steps``, which counts
    the whole run (the schedule and the batch cycle go on from the state's step: 2 steps saved,
    then resumed with steps=4, is the 4-step run; the state's data, batch, learning rates,
    weight decay and clip must be given again: ``_check_same_run``), and ``save_state`` writes
    the final state."""
    from tpcompiler.training.parametrization import classify

    graph = graph_of(net)
    _check_abc_sgd(abc, sgd)
    if sgd.features:
        raise validation.ArgumentError("features: tp.train records f only; the feature kernels are outputs of the unrolled "
                                       "program (tp.unroll(net, abc, sgd)), or read them off tp.StepEngine.features")
    if sgd.lr_end and sgd.schedule != "linear":
        raise validation.ArgumentError(f"lr_end: only the linear schedule reads it (schedule is {sgd.schedule!r}); "
                                       "give schedule='linear' (tpc train --schedule linear) or drop lr_end")
    particles = validation.count(particles, "particles", minimum=1)
    seed = validation.count(seed, "seed")
    validation.choice(method, "method", ("auto", "exact", "particles"))
    cls = classify(abc)
    if not cls.stable:
        raise ProgramError("the parametrization is unstable: " + "; ".join(cls.violated))
    N = np.atleast_2d(sgd.X).shape[0]
    if N == 0:
        raise ProgramError("the training set is empty")
    Ne = 0 if sgd.X_eval is None else np.atleast_2d(sgd.X_eval).shape[0]
    K = len(graph.readout.readouts) if graph.readout is not None else 1
    _targets(sgd.Y, N, K)  # both regimes: one row per input, one column per output
    steps = eval_steps(sgd.steps, sgd.eval_every)
    shape_t, shape_e = (len(steps), N, K), (len(steps), Ne, K)
    size = 16 * len(steps) * (N + Ne) * K  # trajectories and their standard errors, float64
    if size > MAX_TRAJECTORY_BYTES:
        raise validation.ArgumentError(
            f"steps: {len(steps)} evaluations x {N + Ne} inputs x {K} outputs need {size / 2**30:.1f} GiB of trajectories "
            f"(limit {MAX_TRAJECTORY_BYTES / 2**30:.0f} GiB); use fewer steps or inputs, or a larger eval_every")
    if (resume or save_state) and cls.regime != "feature learning":
        raise validation.ArgumentError(f"{'resume' if resume else 'save_state'}: only feature-learning training keeps a state "
                                       f"(this parametrization is in the {cls.regime} regime)")
    if cls.regime == "feature learning":
        _layers(graph, abc)  # the reference network's rules (docs/DESIGN.md 2.6): no trained biases here
        result = _engine_descent(graph, abc, sgd, particles, seed, method, steps, progress, resume, save_state)
    elif cls.regime == "kernel":
        if sgd.loss != "mse":
            raise ProgramError("kernel-regime training is kernel gradient descent of the mean, exact for the squared loss only; use loss mse")
        if sgd.weight_decay or sgd.clip is not None:
            raise ProgramError("kernel-regime training runs kernel gradient descent of the mean, which has no weight decay "
                               "or clipping; train a feature-learning parametrization, or drop weight_decay/clip")
        result = _kernel_descent(graph, abc, sgd, shape_t, shape_e, steps)
    else:  # trivial: the function does not move and starts at 0
        result = TrainResult(np.zeros(shape_t), np.zeros(shape_e), np.zeros(shape_t), np.zeros(shape_e), cls.regime, "trivial")
    if result.steps is None:  # (a resumed run records its own steps, from the state's on)
        result.steps = steps
    if K == 1:
        for field_ in ("f_train", "f_eval", "f_train_stderr", "f_eval_stderr"):
            setattr(result, field_, getattr(result, field_)[..., 0])
    return result


def eval_steps(steps: int, every: int, start: int = 0) -> np.ndarray:
    """start, then the multiples of k after it, and the last step."""
    out = [start] + list(range(start - start % every + every, steps + 1, every))
    if out[-1] != steps:
        out.append(steps)
    return np.array(out, dtype=np.int64)


def _engine_descent(graph: Graph, abc: ABC, sgd: SGD, particles: int, seed: int, method: str, steps, progress,
                    resume=None, save_state=None) -> TrainResult:
    """Feature learning by the step engine (docs/DESIGN.md 2.9)."""
    from tpcompiler.training.engine import StepEngine
    from tpcompiler.training.fit import fit

    X = np.atleast_2d(np.asarray(sgd.X, dtype=np.float64))
    Y = _targets(sgd.Y, X.shape[0], len(graph.readout.readouts))
    # (the engine checks the count itself where it uses particles, naming the value given: at
    # least 4 per group, for the bias extrapolation's half-size run, so 10 groups from 40)
    groups = 10 if particles >= 40 else 2
    options = dict(method=method, loss=sgd.loss, particles=particles, groups=groups,
                   seed=seed, weight_decay=sgd.weight_decay, clip=sgd.clip)
    run = _run_settings(sgd, X, Y)
    if resume:
        try:
            eng = StepEngine.load(resume, graph, abc, **options)
        except validation.ArgumentError as exc:
            raise validation.ArgumentError(f"resume: {exc}") from None
        _check_same_run(eng.saved_run, run)
        if eng.steps_done >= sgd.steps:
            raise validation.ArgumentError(
                f"resume: the state has taken {eng.steps_done} steps; steps = {sgd.steps} counts the whole run "
                f"(the resumed run continues to step {sgd.steps}), so give more than {eng.steps_done}")
    else:
        eng = StepEngine(graph, abc, **options)
    eng.run = run
    Xe = None if sgd.X_eval is None else np.atleast_2d(np.asarray(sgd.X_eval, dtype=np.float64))
    start = eng.steps_done
    hist = fit(eng, X, Y, steps=sgd.steps - start, lr=sgd.rate, batch=sgd.batch, eval_every=sgd.eval_every,
               X_eval=Xe, progress=progress, checkpoint=save_state)
    steps = eval_steps(sgd.steps, sgd.eval_every, start)
    assert list(hist.steps) == list(steps)
    K = Y.shape[1]
    empty = np.zeros((len(steps), 0, K))
    f_eval = np.array(hist.f_eval) if Xe is not None else empty
    f_eval_err = np.array(hist.f_eval_stderr) if Xe is not None else empty
    used = "exact" if eng.method == "exact" else (
        f"particles (M = {eng.alg.R * eng.alg.D}, step engine, extrapolated in the particles per group)")
    return TrainResult(np.array(hist.f_train), f_eval, np.array(hist.f_train_stderr), f_eval_err,
                       "feature learning", used, steps)


def _run_settings(sgd: SGD, X: np.ndarray, Y: np.ndarray) -> dict:
    """What a step-engine state's run was trained with (written into its checkpoint,
    ``StepEngine.run``): ``run_settings`` of the SGD's options."""
    return run_settings(X, Y, batch=sgd.batch, schedule=sgd.schedule, lr=sgd.lr, lr_end=sgd.lr_end, steps=sgd.steps,
                        weight_decay=sgd.weight_decay, clip=sgd.clip)


def run_settings(X: np.ndarray, Y: np.ndarray, *, batch, schedule: str, lr: float, lr_end: float, steps: int,
                 weight_decay: float, clip, **more) -> dict:
    """A training run's settings as a checkpoint records them (``_check_same_run`` compares
    them on resume): a digest of the training data, the batch, the learning rates (for the
    linear schedule, which its total number of steps defines, that too), weight decay, clip
    and ``more`` (a pi-net's loss and learning-rate multipliers)."""
    digest = hashlib.sha256(np.ascontiguousarray(X).tobytes() + np.ascontiguousarray(Y).tobytes())
    run = {"data": f"{X.shape[0]} x {X.shape[1]} inputs, sha256 {digest.hexdigest()[:16]}", "batch": batch,
           "schedule": schedule, "lr": lr, "weight_decay": weight_decay, "clip": clip, **more}
    if schedule == "linear":
        run.update(lr_end=lr_end, steps=steps)
    return run


def _check_same_run(saved: dict | None, run: dict) -> None:
    """Refuse to resume a state with other data, batch, learning rates, weight decay or clip
    than its run had: the resumed trajectory would be neither that run nor the one asked for
    (a state written without these, by StepEngine.save, is not checked)."""
    if saved is None:
        return
    for key in ("data", "batch", "schedule", "lr", "lr_end", "steps", "weight_decay", "clip", "loss", "lr_mult"):
        if saved.get(key) != run.get(key):
            if key == "steps":
                raise validation.ArgumentError(
                    f"resume: the state's run has a linear schedule over {saved[key]} steps, not {run[key]}: its learning "
                    "rates depend on the whole run's length, so a longer run does not continue it; train the whole "
                    "schedule in one run")
            if key == "data":
                raise validation.ArgumentError(
                    f"resume: the state's run was trained on other data ({saved[key]}; given: {run[key]}); a resumed "
                    "run continues the state's run, so give its training data")
            what = {"lr": "learning rate", "lr_end": "final learning rate", "weight_decay": "weight decay",
                    "lr_mult": "learning-rate multipliers"}.get(key, key)
            raise validation.ArgumentError(
                f"resume: the state's run was trained with {what} {_setting(key, saved.get(key))}, not "
                f"{_setting(key, run.get(key))}; a resumed run continues the state's run, so give the same")


def _setting(key: str, value) -> str:
    return "None (the full batch)" if key == "batch" and value is None else repr(value)


def _kernel_descent(graph: Graph, abc: ABC, sgd: SGD, shape_t, shape_e, steps) -> TrainResult:
    """f_{t+1} = f_t - (eta/B) Theta(., X_B) (f_t(X_B) - Y_B), f_0 = 0 (docs/DESIGN.md 2.4, 2.6)."""
    from tpcompiler.backends.kernels.kernel import PARTICLES_HINT, KernelFunction
    from tpcompiler.backends.kernels.pairwise import NotPairwise

    X = np.atleast_2d(np.asarray(sgd.X, dtype=np.float64))
    Xe = np.zeros((0, X.shape[1])) if sgd.X_eval is None else np.atleast_2d(np.asarray(sgd.X_eval, dtype=np.float64))
    Y = _targets(sgd.Y, X.shape[0], shape_t[2])
    try:
        theta = KernelFunction(training_kernel_graph(graph, abc), get="ntk")(np.concatenate([X, Xe]))["ntk"]
    except NotPairwise as exc:  # (its own hint, the particle limit of the kernels, trains nothing)
        text = str(exc).removesuffix(f"; {PARTICLES_HINT}")
        raise NotPairwise(f"{text}; kernel-regime training runs gradient descent with the exact NTK, which "
                          "the kernel backend cannot derive for this network (the step engine, which takes any "
                          "program, trains feature-learning parametrizations such as mup)") from None
    N = X.shape[0]
    f = np.zeros((N + Xe.shape[0], Y.shape[1]))
    traj = [f.copy()]
    for t in range(sgd.steps):
        batch = batch_indices(N, sgd.batch, t)
        chi = f[batch] - Y[batch]
        f = f - (sgd.rate(t) / len(batch)) * theta[:, batch] @ chi
        traj.append(f.copy())
    _warn_if_diverged(theta[:N, :N], Y, traj[-1][:N], sgd)
    traj = np.array(traj)[steps]
    zeros_t, zeros_e = np.zeros(shape_t), np.zeros(shape_e)
    return TrainResult(traj[:, :N], traj[:, N:], zeros_t, zeros_e, "kernel", "kernel gradient descent (exact NTK)")


def _warn_if_diverged(theta: np.ndarray, Y: np.ndarray, f: np.ndarray, sgd: SGD) -> None:
    """A RuntimeWarning when kernel gradient descent ends with a larger training loss than it
    started with (f_0 = 0): its values are the limit's, but of a run that diverges.  Full
    batch, the step multiplies the training residual by I - (eta/N) Theta, so it is stable
    exactly for eta < 2 N / lambda_max(Theta); with batches, the warning gives each batch's
    step's own bound, 2 B / lambda_max(Theta_BB), the smallest over the batch cycle."""
    with np.errstate(over="ignore", invalid="ignore"):
        start, end = float(np.mean(Y**2)), float(np.mean((f - Y) ** 2))
    if np.isfinite(end) and end <= start:
        return
    N = theta.shape[0]
    B = len(batch_indices(N, sgd.batch, 0))
    blocks = {tuple(sorted(batch_indices(N, sgd.batch, t))) for t in range(min(N // math.gcd(N, B), sgd.steps))}
    limit = min(2 * len(b) / np.linalg.eigvalsh(theta[np.ix_(b, b)])[-1] for b in map(list, blocks))
    largest = max(sgd.rate(t) for t in range(sgd.steps))
    warnings.warn(f"kernel gradient descent diverges: the training loss went from {start:.4g} to {end:.4g} in "
                  f"{sgd.steps} steps at a learning rate of up to {largest:.6g}; a step on a batch B alone is stable "
                  f"below 2 B / lambda_max(Theta_BB) = {limit:.6g} (the smallest over the batches; full batch: B = N)",
                  RuntimeWarning, stacklevel=4)
