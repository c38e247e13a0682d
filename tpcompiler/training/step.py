"""One SGD step of a network template, derived once (docs/DESIGN.md 2.9): the symbolic stage of
the step engine.

Input: a network template (one input, input layers, n x n matrices, coordinatewise
nonlinearities, a readout), an abc-parametrization and a loss.  Output: a ``StepProgram``,
everything a runtime needs to repeat the step any number of times without touching sympy:

* the forward instructions of the template, and its backward pass derived by
  ``ir.backward.derive_backward`` from a *seed vector* dx^L = sigma sum_k chi_k v_k that the
  runtime computes from the loss derivatives chi (so K, e.g. a vocabulary of outputs, never
  enters the symbolic work);
* every Nonlin lowered once to a numpy function of its arguments, and -- for the exact
  evaluator -- split into its affine coefficients (constant + sum_i c_i x_i, each c_i a
  function of scalars), or marked non-affine;
* the powers of n of every update and of every tensor's gradient norm, from the
  parametrization (the same rules as ``training.sgd``, whose module docstring states them):
  readout v_k <- v_k - (eta / sigma) n^{e_v} sum_b w_b chi_bk x^L_b, an n x n matrix
  W <- W - eta n^{e_W} sum_b w_b dy_b x_b^T / n, an input matrix column
  U_j <- U_j - eta / scale^2 n^{e_U} sum_b w_b c_bj dA_b, where w_b = 1/B are the example
  weights of the batch mean and c_b the input layer's column weights of example b.

Trained initial vectors other than the readout (biases) are trained like an input-layer column
whose input is the constant 1 -- muP's convention that a bias is an input weight (layer-1
exponents: b <- b - eta n^{e_U} sum_b w_b db_b) -- so a bias that starts at 0 (TP4's MAML)
moves at O(1) under muP.  ``tp.train`` keeps refusing biases: its reference network
(docs/DESIGN.md 2.6, training/finite.py) trains them with no width exponent instead.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import sympy as sp

from tpcompiler.backends.lowering import evaluate, numpy_function
from tpcompiler.ir import ops
from tpcompiler.ir.backward import (derive_backward, forward_nodes, refuse_moments, refuse_readout_bias,
                                    refuse_zero_scales)
from tpcompiler.ir.graph import Graph, ProgramError
from tpcompiler.ir.ops import VEC, node_symbol
from tpcompiler.ir.symbols import NodeSymbol
from tpcompiler.training.parametrization import ABC

LOSSES = ("mse", "logistic", "softmax", "negative_sampling")

#: Name of the placeholder vector that carries dx^L = sigma sum_k chi_k v_k into the backward pass.
SEED = "step_seed"


def width_limit(e) -> float:
    """lim_{n -> oo} n^e for e <= 0 (1 or 0); e > 0 has no limit (the caller refuses it)."""
    e = sp.nsimplify(e)
    if e > 0:
        raise ValueError(f"n^{e} diverges")
    return 1.0 if e == 0 else 0.0


def refuse_growth(e, what: str):
    """The exponent e of a quantity that must stay bounded; a positive one is an unstable
    parametrization (docs/DESIGN.md 2.4)."""
    e = sp.nsimplify(e)
    if e > 0:
        raise ProgramError(f"{what} grows like n^{e}: the parametrization is unstable (see tpc classify)")
    return e


@dataclass
class Lowered:
    """A template Nonlin as numbers: ``fn(*values)`` over the argument symbols ``names``; for
    an affine one also ``const`` and ``coefs`` [(vector key, fn of the scalar names)]."""

    fn: object
    names: tuple
    vectors: tuple
    affine: bool
    const: object = None
    coefs: list = field(default_factory=list)


def _lower(graph: Graph, key: str) -> Lowered:
    expr = graph.op(key).expr
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    names = tuple(s.key if isinstance(s, NodeSymbol) else s.name for s in symbols)
    vectors = tuple(k for k in names if k in graph.g and graph.kind(k) == VEC)
    vec_syms = [node_symbol(k) for k in vectors]
    fn = numpy_function(expr, symbols)
    affine = True
    try:
        poly = sp.Poly(expr, *vec_syms) if vec_syms else None
        if poly is not None and (poly.total_degree() > 1 or any(c.has(*vec_syms) for c in poly.coeffs())):
            affine = False
    except sp.PolynomialError:
        affine = False
    low = Lowered(fn, names, vectors, affine)
    if affine:
        zero = {s: 0 for s in vec_syms}
        const = expr.xreplace(zero)
        low.const = (numpy_function(const, symbols), const != 0)
        low.coefs = [(k, numpy_function(sp.diff(expr, s), symbols)) for k, s in zip(vectors, vec_syms)]
    return low


@dataclass
class StepProgram:
    """One SGD step of ``net`` under ``abc`` with ``loss`` (module docstring)."""

    net: Graph
    abc: ABC
    loss: str
    template: Graph
    grads: dict
    forward: list
    backward: list
    inputs: list            # the template's input coordinate keys, by index
    input_layers: list      # InputLayer keys read by the forward pass
    hidden: list            # trained n x n matrices
    matrices: list          # every n x n matrix the step multiplies by (trained or not)
    input_mats: list        # trained input matrices
    biases: list            # trained initial vectors other than the readout (layer-1 tensors)
    fixed: list             # untrained initial vectors the forward pass reads
    readouts: tuple
    readout_vector: str
    sigma_out: float
    params: dict
    lowered: dict
    exponents: dict
    fingerprint: str
    _numbers: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def K(self) -> int:
        return len(self.readouts)

    @property
    def d(self) -> int:
        return len(self.inputs)

    @property
    def forward_reuses_a_matrix(self) -> bool:
        """Whether one forward pass multiplies by the same matrix twice, on either side (an RNN's
        W twice; tied weights, W and W^T): then an evaluation must keep its first product as a
        family member while it draws the second, whose ZDot term goes through the first.
        (Counting W and W^T as two matrices dropped that term: E[z^2] was 0.43 in the limit of
        z = W^T tanh(W tanh(g)) + g against 0.96 at finite width.)"""
        uses = [self.template.matmul_parts(k)[0] for k in self.forward if isinstance(self.template.op(k), ops.MatMul)]
        return len(uses) != len(set(uses))

    def check_limit(self) -> None:
        """Refuse a parametrization under which the output or an update grows with n: it has
        no infinite-width limit (finite widths run it as it is)."""
        what = {"f": "the output at initialization", "v": "the readout update", "U": "the input-layer update"}
        for key, e in self.exponents.items():
            if key == "v" and sp.nsimplify(e) > 0:
                raise ProgramError(self._small_readout(sp.nsimplify(e)))
            if key in what:
                refuse_growth(e, what[key])
            elif isinstance(key, tuple) and key[0] == "W":
                refuse_growth(e, f"the update of {key[1]}")

    def _small_readout(self, e) -> str:
        """The error for b_o - a_o - c = e > 0: not an unstable parametrization (TP4's conditions
        read 2 a_o + c there, tpc classify), but a readout whose initial value is negligible
        against its first update, which the engine's units (the initial scale) cannot hold."""
        L1 = len(self.abc.a)
        ao, c = sp.nsimplify(self.abc.a[-1]), sp.nsimplify(self.abc.c)
        return (f"the readout update grows like n^{e} against the readout's initial scale (b_{L1} - a_{L1} - c = {e} > 0: "
                "the readout starts negligibly small): the step engine holds the readout in units of its initial scale "
                "and cannot take this parametrization, stable or not (tpc classify); start the readout at 0 instead, "
                f"p.readout(..., var=0), with b_{L1} = a_{L1} + c = {ao + c}")

    def is_gaussian_linear(self) -> bool:
        return all(low.affine for low in self.lowered.values())

    def nonaffine(self) -> list[str]:
        return [k for k, low in self.lowered.items() if not low.affine]

    def scale_of(self, U: str) -> float:
        """The scale of the input matrix U (remembered: the runtime reads it every step)."""
        if ("scale", U) not in self._numbers:
            self._numbers[("scale", U)] = float(evaluate(sp.sympify(self.net.op(U).scale), self.params))
        return self._numbers[("scale", U)]

    def sigma_of(self, W: str) -> float:
        return float(evaluate(sp.sympify(self.net.op(W).sigma), self.params))


def _fingerprint(net: Graph, abc: ABC, loss: str) -> str:
    """A digest of what a checkpoint's state means: the template's instructions, the
    parametrization and the loss."""
    text = [f"{k}|{net.op(k)!r}|{net.args(k)}" for k in net.order()]
    text.append(repr(net.readout))
    text.append(f"{abc.a}|{abc.b}|{abc.c}|{loss}")
    return hashlib.sha256("\n".join(text).encode()).hexdigest()[:16]


def derive_step(net: Graph, abc: ABC, loss: str = "mse") -> StepProgram:
    """The ``StepProgram`` of ``net`` (a network template) under ``abc`` (module docstring)."""
    net.validate()
    if loss not in LOSSES:
        raise ProgramError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    if net.readout is None:
        raise ProgramError(f"program {net.name!r} has no readout; training needs p.readout(...)")
    if len(net.inputs) != 1:
        raise ProgramError(f"program {net.name!r} needs exactly one input to be trained, it has {len(net.inputs)}")
    ro = net.readout
    refuse_moments(net, "the step engine")
    refuse_readout_bias(net, "the step engine")
    forward = forward_nodes(net)
    input_mats, hidden = _trained_layers(net, abc)
    with_seed = net.copy()
    seed = with_seed.add(SEED, ops.InitVec(sp.S.Zero, False))
    template, grads = derive_backward(with_seed, prefix="d", seed=node_symbol(seed))
    backward = [k for k in template.order() if k not in with_seed.g and template.kind(k) == VEC]
    params = net.param_values()
    a, b, c = abc.a, abc.b, abc.c
    ao, bo = a[-1], b[-1]
    exps = {
        "f": 1 - (ao + bo),
        "v": bo - ao - c,
        "U": -c - 2 * a[0] - (ao + bo),
        "lr": -c,  # weight decay: p <- (1 - eta n^{-c} lambda) p
        # squared gradient norms in the parametrization's own coordinates (clipping)
        "norm_v": 1 - 2 * ao,
        "norm_U": 1 - 2 * a[0] - 2 * (ao + bo),
    }
    for i, W in enumerate(hidden, start=1):
        exps[("W", W)] = 1 - c - 2 * a[i] - (ao + bo)
        exps[("norm_W", W)] = 2 - 2 * a[i] - 2 * (ao + bo)
    lowered = {k: _lower(template, k) for k in forward + backward if isinstance(template.op(k), ops.Nonlin)}
    (group, decl), = net.inputs.items()
    in_forward = set(forward)
    matrices = sorted({template.matmul_parts(k)[0] for k in forward + backward if isinstance(template.op(k), ops.MatMul)})
    biases = [k for k in net.keys_of(ops.InitVec) if k in in_forward and k not in ro.readouts and net.op(k).trainable]
    fixed = [k for k in net.keys_of(ops.InitVec) if k in in_forward and k not in ro.readouts and not net.op(k).trainable]
    return StepProgram(
        net=net, abc=abc, loss=loss, template=template, grads=grads, forward=forward, backward=backward,
        inputs=list(decl.keys), input_layers=[k for k in forward if isinstance(net.op(k), ops.InputLayer)],
        hidden=hidden, matrices=matrices, input_mats=input_mats, biases=biases, fixed=fixed,
        readouts=tuple(ro.readouts), readout_vector=ro.vector,
        sigma_out=float(evaluate(sp.sympify(ro.sigma), params)), params=params, lowered=lowered,
        exponents=exps, fingerprint=_fingerprint(net, abc, loss))


def _trained_layers(net: Graph, abc: ABC) -> tuple[list, list]:
    """(trained input matrices, trained n x n matrices in creation order), checked against the
    parametrization's depth and init conditions (layer 1: a_1 + b_1 = 0, an input matrix has
    N(0, 1) entries; layers 2..L: a + b = 1/2, N(0, sigma^2/n) entries).  Unlike
    ``training.sgd`` a network may train no input matrix (frozen embeddings: a kernel baseline)
    and may train biases (module docstring)."""
    inputs = [k for k in net.keys_of(ops.InputMat) if net.op(k).trainable]
    hidden = [k for k in net.keys_of(ops.InitMat) if net.op(k).trainable]
    L = abc.depth
    if len(hidden) != L - 1:
        raise ProgramError(
            f"the parametrization has depth L = {L} (L - 1 = {L - 1} hidden matrices) but program "
            f"{net.name!r} trains {len(hidden)} n x n matrices ({', '.join(hidden) or 'none'})")
    a, b = abc.a, abc.b
    if inputs and a[0] + b[0] != 0:
        raise ProgramError(f"layer 1: a_1 + b_1 = {a[0] + b[0]}, but an input matrix has N(0, 1) entries at init (a_1 + b_1 = 0)")
    for i, W in enumerate(hidden, start=1):
        if a[i] + b[i] != sp.Rational(1, 2):
            raise ProgramError(f"layer {i + 1} ({W}): a + b = {a[i] + b[i]}, but an n x n matrix has N(0, sigma^2/n) entries (a + b = 1/2)")
    refuse_zero_scales(net, inputs, hidden)
    return inputs, hidden
