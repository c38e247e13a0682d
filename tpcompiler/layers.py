"""A neural-tangents-style layer library that *builds programs* (docs/DESIGN.md 2.1, 2.3, 5).

``tp.layers.serial(Conv(512, (3, 3), padding="SAME", W_std=1.5, b_std=0.1), Relu(),
GlobalAvgPool(), Dense(1, W_std=1.5, b_std=0.1)).program((8, 8, 3))`` returns an ordinary
``tp.Program`` whose only declaration is its readout: ``tp.compile`` then derives the backward
pass and the NNGP / NTK from the program (docs/DESIGN.md 2.3), exactly as for a hand-written
program.  No layer carries a kernel formula: a layer only emits NETSOR-transpose instructions.

Representation (width n is the channel dimension; docs/DESIGN.md 2.1).  Between layers the
network's activations are

* the raw input (before the first Dense / Conv): the input coordinates xi as an array of
  shape ``input_shape`` = spatial + (C,), flattened row-major into the program input
  (xi[(i * W + j) * C + c] = x[i, j, c]), so ``c.kernels(X)`` takes X of shape (N, *input_shape);
* afterwards, per spatial position, one n-vector per *block* of channels: a block is the
  output of one Dense / Conv (``channels`` = its out_dim); FanInConcat along channels and
  Flatten produce several blocks.

Instructions, in NTK parametrization (neural-tangents' conventions, tests/data/nt_reference.json):

* Dense on the input: h_s = W_std / sqrt(C) sum_c x[s, c] U_c (+ b), U an input matrix;
  Dense on blocks: h_s = sum_b sqrt(c_b / C) W_b x_{b,s} (+ b), W_b ~ N(0, W_std^2 / n),
  so the effective weight is W_std / sqrt(C) times N(0, 1) entries with C = sum_b c_b;
* Conv (filter k_1 x .. x k_r, strides, padding VALID / SAME / CIRCULAR as lax pads):
  h_o = sum_{taps t} sum_b sqrt(c_b / C) W_{t,b} x_{b, src(o, t)} / sqrt(K) (+ b), K = prod k_i,
  one independent matrix per tap and block shared by all positions; taps outside the input
  are skipped under SAME (the divisor stays K), wrapped under CIRCULAR; on the input the
  taps' coordinates enter one input layer with K C columns;
* biases: one initial vector b ~ N(0, b_std^2) per layer, shared by its positions;
* nonlinearities: phi applied coordinatewise to every vector (any sympy phi; neural-tangents'
  elementwise layers under their names and with their arguments: Relu, Abs, ABRelu, LeakyRelu,
  Sign, Erf, Sigmoid_like, Gelu, Sin, Cos, Exp, Gaussian, plus Step, Tanh, Sigmoid, Softplus);
  neural-tangents' layout arguments (batch_axis, channel_axis, dimension_numbers) are
  accepted at the one layout used here, (N, *spatial, C);
* AvgPool: the mean of the vectors in each window (divided by the window size, as
  neural-tangents' default normalize_edges=False); GlobalAvgPool: the mean over positions;
  Flatten: every (block, position) becomes its own block;
* FanOut / parallel / FanInSum (a plain sum) / FanInConcat (channel axis: blocks joined; a
  spatial axis: each block's vectors joined along it);
* LayerNorm: per group of vectors normalised together (one position, or all positions of the
  normalised spatial axes; every block, weighted by its channel share) the Moments
  mu = sum w mean(h) and var = sum w mean((h - mu)^2), then (h - mu) (var + eps)^(-1/2);
* the last layer must be Dense: the readout f = W_std / sqrt(n) v . y (+ b_std beta) of a
  flat state; for several blocks y = sum_b sqrt(c_b / C) g_b * y_b with fixed (untrained)
  N(0, 1) vectors g_b.  At finite width this is v * g_b in place of independent readout
  rows v_b, which has the same second moments, so the infinite-width NNGP and NTK (which
  only see second moments of the readout, docs/DESIGN.md 2.3) are those of independent rows.

Standard parametrization (``parameterization="standard"``, neural-tangents' NTK weights): a
trained tensor's NTK weight becomes its fan-in over W_std^2 times the default (hidden matrices:
K C; input layers K C / W_std^2; the readout C / W_std^2; biases 1).
"""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import sympy as sp

from tpcompiler.frontend import dsl
from tpcompiler.ir.graph import ProgramError
from tpcompiler.ir.ntk import as_asked, kernel_names
from tpcompiler.ir.nonlinearities import BUILTINS

PADDINGS = ("VALID", "SAME", "CIRCULAR")
PARAMETERIZATIONS = ("ntk", "standard")


class LayerError(ProgramError):
    """A layer cannot be applied as asked (shapes, padding, placement); a ValueError."""


# ---------------------------------------------------------------------------------------
# Activations between layers.
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Raw:
    """The network input: the input coordinates (Scalars) in an array of shape spatial + (C,)."""

    coords: np.ndarray

    @property
    def shape(self) -> tuple:
        return self.coords.shape


@dataclass(frozen=True)
class _Hidden:
    """n-wide activations: blocks (vectors by spatial position, channel count)."""

    blocks: tuple

    @property
    def spatial(self) -> tuple:
        return self.blocks[0][0].shape

    @property
    def channels(self) -> int:
        return sum(c for _, c in self.blocks)

    @property
    def shape(self) -> tuple:
        return self.spatial + (self.channels,)


def _map(fn: Callable, arr: np.ndarray) -> np.ndarray:
    """fn(element, index) over an object array, keeping its shape (0-d included)."""
    out = np.empty(arr.shape, dtype=object)
    for idx in np.ndindex(arr.shape):
        out[idx] = fn(arr[idx], idx)
    return out


class _Builder:
    """The program under construction and a layer counter for names."""

    def __init__(self, program: dsl.Program):
        self.p = program
        self.layer = 0

    def next(self) -> int:
        self.layer += 1
        return self.layer

    @staticmethod
    def name(prefix: str, idx: tuple, block: int | None = None) -> str:
        return prefix + (f"b{block}" if block is not None else "") + "".join(f"_{i}" for i in idx)

    def bias(self, k: int, b_std, standard: bool):
        if b_std is None:
            return None
        try:
            var = float(b_std) ** 2
        except OverflowError:
            raise LayerError(f"layer {k}: b_std = {b_std!r} squares beyond the float64 range; rescale the network") from None
        return self.p.vec(f"b{k}", var=var, ntk_weight=1 if standard else None)


def _hidden(state, layer: str) -> _Hidden:
    """The state as n-wide activations, or a clear error."""
    if isinstance(state, tuple):
        raise LayerError(f"{layer}: receives {len(state)} branches (after FanOut); apply parallel(...) to them "
                         f"or join them with FanInSum() / FanInConcat() first")
    if isinstance(state, _Raw):
        raise LayerError(f"{layer}: cannot act on the raw input (shape {state.shape}); start the network with "
                         f"Dense or Conv (the input layer of the program)")
    return state


def _single(state, layer: str):
    if isinstance(state, tuple):
        raise LayerError(f"{layer}: receives {len(state)} branches (after FanOut); apply parallel(...) to them "
                         f"or join them with FanInSum() / FanInConcat() first")
    return state


# ---------------------------------------------------------------------------------------
# Layers and combinators.
# ---------------------------------------------------------------------------------------
class Layer:
    """A layer: ``apply(builder, state)`` emits instructions; ``readout(builder, state)`` (only
    for layers that can end a network) declares the program's readout instead."""

    def __init__(self, name: str, apply: Callable, readout: Callable | None = None):
        self.name = name
        self._apply = apply
        self._readout = readout

    def __repr__(self):
        return self.name

    def apply(self, b: _Builder, state, last: bool = False):
        if not last:
            return self._apply(b, state)
        if self._readout is None:
            raise LayerError(f"the network ends with {self.name}; its last layer must be Dense (the readout, "
                             f"e.g. Dense(1)), after GlobalAvgPool() or Flatten() for spatial inputs")
        return self._readout(b, state)

    def program(self, input_shape: Sequence[int], name: str = "layers", default=None) -> dsl.Program:
        """The program of this network on inputs of shape ``input_shape`` (one example,
        channels last: (d,), (L, C) or (H, W, C); a leading -1 batch entry is dropped).
        ``default``: example inputs (N, *input_shape) used when no data is given."""
        shape = _input_shape(input_shape)
        d = math.prod(shape)
        p = dsl.Program(name)
        if default is None:
            default = _default_inputs(d)
        default = np.asarray(default, dtype=np.float64).reshape(-1, d)
        xi = p.input("xi", d, default=default)
        p.graph.input_shape = shape
        coords = np.empty(d, dtype=object)
        coords[:] = xi
        self.apply(_Builder(p), _Raw(coords.reshape(shape)), last=True)
        return p

    def kernel_fn(self, input_shape: Sequence[int], rtol: float = 1e-10) -> Callable:
        """neural-tangents' ``kernel_fn`` of this network on inputs of shape ``input_shape``:
        ``kernel_fn(x1, x2=None, get=None)`` is k(x1, x2) (len(x1) x len(x2); x2 None: x1, rows
        of shape (N, *input_shape) or (N, d)) of each kernel ``get`` names, as neural-tangents
        returns it: "nngp" or "ntk" that matrix, a tuple of names a named tuple of them in that
        order, None a named tuple (nngp, ntk).  The program is compiled on the first call that
        needs it (``tp.compile(program, get="nngp")`` for the NNGP alone, which skips the NTK's
        derivation; both kernels otherwise, which also serve the NNGP), at quadrature accuracy
        ``rtol``."""
        from tpcompiler.backends.kernels.kernel import cross
        from tpcompiler.compiler import compile as compile_program, network_rows

        program = self.program(input_shape)
        compiled: dict = {}  # "both" / "nngp" -> the program compiled for both kernels / the NNGP alone

        def compiled_for(nngp_alone: bool):
            key = "nngp" if nngp_alone and "both" not in compiled else "both"
            if key not in compiled:
                compiled[key] = compile_program(program, get="nngp" if key == "nngp" else None)
            return compiled[key]

        def kernel_fn(x1, x2=None, get=None):
            canonical = kernel_names(get)
            c = compiled_for(canonical == ("nngp",))
            # checked here under their own names: the call below may swap them (``cross``)
            x1, x2 = c.kernel_function(rtol, get=canonical).check_inputs(
                network_rows(c.source, x1, "x1"), None if x2 is None else network_rows(c.source, x2, "x2"),
                names=("x1", "x2"))

            def call(X, X2=None):
                return c.kernels(X, X2, rtol=rtol, get=canonical)

            out = call(x1) if x2 is None else cross(call, x1, x2)
            return as_asked(get, out, "Kernel")

        return kernel_fn


def _input_shape(input_shape) -> tuple:
    """The shape as a tuple of ints; anything but a sequence of integers (3.9, "12") is refused,
    not truncated by int()."""
    try:
        items = None if isinstance(input_shape, (str, bytes)) else list(input_shape)
    except TypeError:  # (not a sequence)
        items = None
    if items is None or not all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_)) for s in items):
        raise LayerError(f"program: input_shape must be a tuple of positive integers, got {input_shape!r}")
    shape = tuple(int(s) for s in items)
    if shape and shape[0] == -1:
        shape = shape[1:]
    if not shape or any(s < 1 for s in shape):
        raise LayerError(f"program: input_shape must be a non-empty tuple of positive integers (channels last, "
                         f"without the batch axis), got {input_shape!r}")
    return shape


def _default_inputs(d: int) -> np.ndarray:
    k = np.arange(1, d + 1)
    return np.stack([np.cos(1.3 * k) + 0.2, np.sin(0.7 * k) - 0.1])


def serial(*layers: Layer) -> Layer:
    """The layers one after the other (neural-tangents' stax.serial)."""
    layers = _check_layers(layers, "serial")

    def apply(b, state):
        for layer in layers:
            state = layer.apply(b, state)
        return state

    def readout(b, state):
        for layer in layers[:-1]:
            state = layer.apply(b, state)
        return layers[-1].apply(b, state, last=True)

    return Layer(f"serial({', '.join(map(repr, layers))})", apply, readout)


def parallel(*layers: Layer) -> Layer:
    """Layer i applied to branch i of a FanOut (neural-tangents' stax.parallel)."""
    layers = _check_layers(layers, "parallel")

    def apply(b, state):
        if not isinstance(state, tuple) or len(state) != len(layers):
            got = f"{len(state)} branches" if isinstance(state, tuple) else "one input"
            raise LayerError(f"parallel of {len(layers)} layers receives {got}; put FanOut({len(layers)}) before it")
        return tuple(layer.apply(b, s) for layer, s in zip(layers, state))

    return Layer(f"parallel({', '.join(map(repr, layers))})", apply)


def _check_layers(layers, where: str) -> tuple:
    if not layers:
        raise LayerError(f"{where}() needs at least one layer")
    for layer in layers:
        if not isinstance(layer, Layer):
            raise LayerError(f"{where}: {layer!r} is not a layer (did you forget the parentheses, e.g. Relu()?)")
    return tuple(layers)


def FanOut(num: int) -> Layer:
    """``num`` copies of the input, for ``parallel`` (neural-tangents' stax.FanOut)."""
    num = _positive_int(num, "FanOut: num")
    return Layer(f"FanOut({num})", lambda b, state: (_single(state, "FanOut"),) * num)


def FanInSum() -> Layer:
    """The plain sum of the branches (no rescaling; neural-tangents' stax.FanInSum)."""

    def apply(b, state):
        branches = _branches(state, "FanInSum")
        first = branches[0]
        for other in branches[1:]:
            if other.shape != first.shape:
                raise LayerError(f"FanInSum: branch shapes differ, {first.shape} and {other.shape} (spatial + channels); "
                                 f"every branch must end with the same shape")
            if [c for _, c in other.blocks] != [c for _, c in first.blocks]:
                raise LayerError("FanInSum: branches concatenate different channel blocks; sum them before "
                                 "FanInConcat or after a Dense / Conv")
        blocks = tuple((_map(lambda v, idx, i=i: dsl.add(v, *(br.blocks[i][0][idx] for br in branches[1:])), blk), c)
                       for i, (blk, c) in enumerate(first.blocks))
        return _Hidden(blocks)

    return Layer("FanInSum()", apply)


def FanInConcat(axis: int = -1) -> Layer:
    """Concatenation of the branches (neural-tangents' stax.FanInConcat(axis)), ``axis`` of
    the activations (N, *spatial, C) as neural-tangents counts it.  The channel axis (-1, the
    default): the blocks of all branches, in order.  A spatial axis: each block's vectors
    joined along it, positions of the first branch first; every branch must then have the
    same blocks (channel counts, in order), so that a later Dense / Conv reads a block at
    every position with one matrix.  The covariances between positions of different
    branches are derived, as every other: neural-tangents sets them to 0 and so refuses
    branches that are not Gaussians (its is_gaussian), e.g. after a nonlinearity, where they
    need not vanish; here such branches are taken as they are."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise LayerError(f"FanInConcat: axis must be an integer, got {axis!r}")
    axis = int(axis)

    def apply(b, state):
        branches = _branches(state, "FanInConcat")
        ndim = len(branches[0].spatial) + 2  # (N, *spatial, C)
        if not -ndim <= axis < ndim:
            raise LayerError(f"FanInConcat: axis {axis} out of range for activations of {ndim} axes "
                             f"(N, *spatial, C) = (N, *{branches[0].spatial}, C)")
        at = axis % ndim
        if at == ndim - 1:
            for other in branches[1:]:
                if other.spatial != branches[0].spatial:
                    raise LayerError(f"FanInConcat: branch spatial shapes differ, {branches[0].spatial} and "
                                     f"{other.spatial}")
            return _Hidden(tuple(blk for br in branches for blk in br.blocks))
        if at == 0:
            raise LayerError("FanInConcat: axis 0 is the batch axis; concatenating examples is not a layer")
        return _Hidden(_joined_along(branches, at - 1))

    return Layer(f"FanInConcat({axis})" if axis != -1 else "FanInConcat()", apply)


def _joined_along(branches: list, s: int) -> tuple:
    """The blocks of ``branches`` with each block's vectors concatenated along spatial axis
    ``s`` (FanInConcat along a spatial axis)."""
    first = branches[0]
    channels = [c for _, c in first.blocks]
    for other in branches[1:]:
        if [c for _, c in other.blocks] != channels:
            raise LayerError(f"FanInConcat: along spatial axis {s + 1} every branch needs the same channel blocks, "
                             f"got {channels} and {[c for _, c in other.blocks]} (a concatenation of channels "
                             f"or a Dense / Conv per branch makes them so)")
        shapes = [br.spatial[:s] + br.spatial[s + 1:] for br in (first, other)]
        if shapes[0] != shapes[1]:
            raise LayerError(f"FanInConcat: along spatial axis {s + 1} the other axes must agree, got spatial "
                             f"shapes {first.spatial} and {other.spatial}")
    return tuple((np.concatenate([br.blocks[k][0] for br in branches], axis=s), c) for k, c in enumerate(channels))


def _branches(state, where: str) -> list:
    if not isinstance(state, tuple):
        raise LayerError(f"{where}: needs several branches (FanOut(k), parallel(...)) but receives one input")
    return [_hidden(s, where) for s in state]


def Identity() -> Layer:
    """The identity (neural-tangents' stax.Identity)."""
    return Layer("Identity()", lambda b, state: state)


# -- Dense and Conv ---------------------------------------------------------------------
def _parameterization(value, where: str) -> bool:
    if value not in PARAMETERIZATIONS:
        raise LayerError(f"{where}: parameterization must be 'ntk' or 'standard', got {value!r}")
    return value == "standard"


def _std(value, where: str, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise LayerError(f"{where}: expected a non-negative number{' or None' if optional else ''}, got {value!r}")
    return float(value)


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise LayerError(f"{where}: expected a positive integer, got {value!r}")
    return int(value)


def _layout(layer: str, **axes) -> None:
    """neural-tangents' layout arguments, accepted at the layout every tp.layers layer uses
    (batch first, channels last: (N, *spatial, C)) so that stax code ports as it is written;
    another layout is refused by name."""
    expected = {"batch_axis": 0, "batch_axis_out": 0, "channel_axis": -1}
    for name, value in axes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value != expected[name]:
            raise LayerError(f"{layer}: only {name}={expected[name]} is supported (tp.layers lays inputs out as "
                             f"(N, *spatial, C), batch first and channels last), got {name}={value!r}")


def _weights_args(layer: str, channels, W_std, b_std, parameterization) -> tuple:
    """(channels, W_std, b_std, standard?) of a Dense / Conv, checked.  The standard
    parametrization's NTK weight is channels / W_std^2: it needs W_std^2 > 0 in float64."""
    out = (_positive_int(channels, f"{layer}: {'out_dim' if layer == 'Dense' else 'out_chan'}"),
           _std(W_std, f"{layer}: W_std"), _std(b_std, f"{layer}: b_std", optional=True),
           _parameterization(parameterization, layer))
    if out[3] and out[1] != 0 and not float(out[1]) ** 2 > 0:
        raise LayerError(f"{layer}: W_std = {W_std} in the standard parameterization, whose NTK weights divide by "
                         "W_std^2, which is 0 in float64; give W_std > 1e-150, or parameterization='ntk'")
    return out


def Dense(out_dim: int, W_std: float = 1.0, b_std: float | None = None, parameterization: str = "ntk", *,
          batch_axis: int = 0, channel_axis: int = -1) -> Layer:
    """Fully connected layer on the channel axis (neural-tangents' stax.Dense; its layout
    arguments by keyword, at their defaults); as the last layer, the readout.  ``out_dim`` is
    the channel count (it matters for FanInConcat and the standard parametrization; the
    kernels are per output unit)."""
    _layout("Dense", batch_axis=batch_axis, channel_axis=channel_axis)
    out_dim, W_std, b_std, standard = _weights_args("Dense", out_dim, W_std, b_std, parameterization)
    label = f"Dense({out_dim})"

    def apply(b, state):
        return _linear(b, _single(state, label), (), (), "VALID", W_std, b_std, standard, out_dim)

    def readout(b, state):
        if isinstance(state, _Raw):
            raise LayerError(f"{label} (the readout): the readout needs a hidden layer before it (a Dense or a Conv "
                             f"on the raw input of shape {state.shape}, then the layers of the network); this network "
                             "is the readout alone")
        state = _hidden(state, f"{label} (the readout)")
        if state.spatial:
            raise LayerError(f"{label} (the readout): its input has spatial shape {state.spatial}; insert "
                             f"GlobalAvgPool() or Flatten() before the readout")
        if standard and W_std == 0:
            raise LayerError(f"{label} (the readout): W_std = 0 in the standard parameterization, whose NTK weight "
                             "divides by W_std^2; give W_std > 0, or parameterization='ntk'")
        k = b.next()
        if len(state.blocks) == 1:
            y = state.blocks[0][0][()]
        else:
            C = state.channels
            y = dsl.add(*(math.sqrt(c / C) * b.p.vec(f"m{k}_{i}", trainable=False) * blk[()]
                          for i, (blk, c) in enumerate(state.blocks)))
        b.p.readout(y, sigma=W_std, bias=b_std,
                    ntk_weight=state.channels / W_std**2 if standard else None,
                    bias_ntk_weight=1 if (standard and b_std is not None) else None)
        return None

    return Layer(label, apply, readout)


def Conv(out_chan: int, filter_shape: Sequence[int], strides: Sequence[int] | None = None, padding: str = "VALID",
         W_std: float = 1.0, b_std: float | None = None, parameterization: str = "ntk", *,
         dimension_numbers=None) -> Layer:
    """1-D or 2-D convolution, channels last (neural-tangents' stax.Conv): filter_shape (k,)
    or (kh, kw), strides (default 1), padding VALID / SAME / CIRCULAR; ``dimension_numbers``
    (by keyword) None or the channels-last one, ("NWC", "WIO", "NWC") or ("NHWC", "HWIO",
    "NHWC")."""
    out_chan, W_std, b_std, standard = _weights_args("Conv", out_chan, W_std, b_std, parameterization)
    filt = _int_tuple(filter_shape, "Conv: filter_shape")
    spatial_letters = {1: "W", 2: "HW"}.get(len(filt), "")
    channels_last = ("N" + spatial_letters + "C", spatial_letters + "IO", "N" + spatial_letters + "C")
    if dimension_numbers is not None and tuple(dimension_numbers) != channels_last:
        raise LayerError(f"Conv: only channels-last dimension_numbers {channels_last} (or None) are supported "
                         f"(tp.layers lays inputs out as (N, *spatial, C)), got {dimension_numbers!r}")
    strides = (1,) * len(filt) if strides is None else _int_tuple(strides, "Conv: strides")
    if len(strides) != len(filt):
        raise LayerError(f"Conv: strides {strides} and filter_shape {filt} have different lengths")
    padding = _padding(padding, "Conv")
    label = f"Conv({out_chan}, {filt})"

    def apply(b, state):
        state = _single(state, label)
        spatial = state.shape[:-1]
        if len(spatial) != len(filt):
            raise LayerError(f"{label}: a {len(filt)}-D convolution needs inputs of shape "
                             f"({', '.join('LHW'[i] for i in range(len(filt)))}..., C) with {len(filt)} spatial axes; "
                             f"got shape {state.shape} ({len(spatial)} spatial axes)")
        return _linear(b, state, filt, strides, padding, W_std, b_std, standard, out_chan)

    return Layer(label, apply)


def _int_tuple(value, where: str) -> tuple:
    try:
        out = tuple(value)
    except TypeError:
        raise LayerError(f"{where}: expected a tuple of positive integers, got {value!r}") from None
    if not out or len(out) > 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in out):
        raise LayerError(f"{where}: expected a tuple of 1 or 2 positive integers (1-D or 2-D), got {value!r}")
    return tuple(int(v) for v in out)


def _padding(padding, where: str) -> str:
    name = padding.upper() if isinstance(padding, str) else padding
    if name not in PADDINGS:
        raise LayerError(f"{where}: unknown padding {padding!r}; use 'VALID', 'SAME' or 'CIRCULAR'")
    return name


def _axis_taps(length: int, k: int, stride: int, padding: str, where: str) -> list[list[tuple[int, int]]]:
    """Per output index, the (tap, source index) pairs along one axis (lax's VALID / SAME
    arithmetic; CIRCULAR pads like SAME and wraps)."""
    if padding == "VALID":
        if length < k:
            raise LayerError(f"{where}: window {k} is longer than the input ({length}) under VALID padding")
        out, lo = (length - k) // stride + 1, 0
    else:
        out = -(-length // stride)
        lo = max((out - 1) * stride + k - length, 0) // 2
    taps = []
    for o in range(out):
        row = []
        for t in range(k):
            j = o * stride - lo + t
            if padding == "CIRCULAR":
                row.append((t, j % length))
            elif 0 <= j < length:
                row.append((t, j))
        taps.append(row)
    return taps


def _windows(spatial: tuple, filt: tuple, strides: tuple, padding: str, where: str) -> dict:
    """{output position: [(flat tap index, source position)]} over all spatial axes."""
    per_axis = [_axis_taps(L, k, s, padding, where) for L, k, s in zip(spatial, filt, strides)]
    out = {}
    for pos in itertools.product(*[range(len(a)) for a in per_axis]):
        rows = [per_axis[ax][o] for ax, o in enumerate(pos)]
        out[pos] = [(int(np.ravel_multi_index(tuple(t for t, _ in combo), filt)), tuple(j for _, j in combo))
                    for combo in itertools.product(*rows)]
    return out


def _linear(b: _Builder, state, filt: tuple, strides: tuple, padding: str, W_std: float, b_std, standard: bool,
            out_chan: int) -> _Hidden:
    """Dense (filt = ()) or Conv: instructions per output position (module docstring)."""
    where = f"Dense({out_chan})" if not filt else f"Conv({out_chan}, {filt})"
    if W_std == 0:  # (the derivation divides by it: a crash, not an error, before this check)
        raise LayerError(f"{where}: W_std = 0 makes a hidden layer's output its bias alone, the same for every "
                         "input; give W_std > 0 (the readout may have W_std = 0)")
    k = b.next()
    K = math.prod(filt)
    spatial = state.shape[:-1]
    windows = _windows(spatial, filt, strides, padding, where) if filt else {pos: [(0, pos)] for pos in np.ndindex(spatial)}
    bias = b.bias(k, b_std, standard)
    out_shape = tuple(np.max(list(windows), axis=0) + 1) if filt else spatial
    out = np.empty(out_shape, dtype=object)
    if isinstance(state, _Raw):
        C = state.shape[-1]
        U = b.p.input_matrix(f"U{k}", K * C, ntk_weight=K * C / W_std**2 if standard else None, scale=W_std)
        for pos, taps in windows.items():
            scalars = [state.coords[src + (c,)] for _, src in taps for c in range(C)]
            columns = [t * C + c for t, _ in taps for c in range(C)]
            h = W_std * U.apply(scalars, columns, norm=K * C, name=b.name(f"g{k}", pos))
            out[pos] = (h if bias is None else h + bias).named(b.name(f"h{k}", pos))
        return _Hidden(((out, out_chan),))
    C = state.channels
    mats = {}
    for t in range(K):
        for i, (_, c) in enumerate(state.blocks):
            suffix = (f"_{t}" if filt else "") + (f"_b{i}" if len(state.blocks) > 1 else "")
            mats[t, i] = b.p.mat(f"W{k}{suffix}", sigma=W_std, ntk_weight=K * C if standard else None)
    for pos, taps in windows.items():
        h = dsl.add(*(math.sqrt(c / C) * (mats[t, i] @ blk[src]) for t, src in taps
                      for i, (blk, c) in enumerate(state.blocks)))
        h = h / sp.sqrt(K) if K > 1 else h
        out[pos] = (h if bias is None else h + bias).named(b.name(f"h{k}", pos))
    return _Hidden(((out, out_chan),))


# -- pooling, flattening --------------------------------------------------------------------
def AvgPool(window_shape: Sequence[int], strides: Sequence[int] | None = None, padding: str = "VALID",
            normalize_edges: bool = False, batch_axis: int = 0, channel_axis: int = -1) -> Layer:
    """Average pooling over windows (neural-tangents' stax.AvgPool): the sum over the window's
    positions inside the input divided by the window size, or, with ``normalize_edges``, by the
    number of those positions (SAME padding's edge windows are then means of what they cover)."""
    _layout("AvgPool", batch_axis=batch_axis, channel_axis=channel_axis)
    _flag(normalize_edges, "AvgPool: normalize_edges")
    window = _int_tuple(window_shape, "AvgPool: window_shape")
    strides = (1,) * len(window) if strides is None else _int_tuple(strides, "AvgPool: strides")
    if len(strides) != len(window):
        raise LayerError(f"AvgPool: strides {strides} and window_shape {window} have different lengths")
    padding = _padding(padding, "AvgPool")
    label = f"AvgPool({window})"

    def apply(b, state):
        state = _hidden(state, label)
        if len(state.spatial) != len(window):
            raise LayerError(f"{label}: needs inputs with {len(window)} spatial axes, got shape {state.shape}")
        k = b.next()
        windows = _windows(state.spatial, window, strides, padding, label)
        out_shape = tuple(np.max(list(windows), axis=0) + 1)
        K = math.prod(window)
        blocks = []
        for i, (blk, c) in enumerate(state.blocks):
            out = np.empty(out_shape, dtype=object)
            for pos, taps in windows.items():
                divisor = len(taps) if normalize_edges else K
                if len(taps) == 1 and divisor == 1:  # (the input's vector itself, already named)
                    out[pos] = blk[taps[0][1]]
                    continue
                out[pos] = (dsl.add(*(blk[src] for _, src in taps)) / divisor).named(
                    b.name(f"p{k}", pos, i if len(state.blocks) > 1 else None))
            blocks.append((out, c))
        return _Hidden(tuple(blocks))

    return Layer(label, apply)


def GlobalAvgPool(batch_axis: int = 0, channel_axis: int = -1) -> Layer:
    """The mean over all spatial positions (neural-tangents' stax.GlobalAvgPool)."""
    _layout("GlobalAvgPool", batch_axis=batch_axis, channel_axis=channel_axis)

    def apply(b, state):
        state = _hidden(state, "GlobalAvgPool")
        k = b.next()
        blocks = []
        for i, (blk, c) in enumerate(state.blocks):
            out = np.empty((), dtype=object)
            out[()] = (dsl.add(*blk.flat) / blk.size).named(
                b.name(f"pool{k}", (), i if len(state.blocks) > 1 else None))
            blocks.append((out, c))
        return _Hidden(tuple(blocks))

    return Layer("GlobalAvgPool()", apply)


def Flatten(batch_axis: int = 0, batch_axis_out: int = 0) -> Layer:
    """All spatial positions and channels into one channel axis (neural-tangents' stax.Flatten):
    on the input a reshape; on n-wide activations every (position, block) becomes a block."""
    _layout("Flatten", batch_axis=batch_axis, batch_axis_out=batch_axis_out)

    def apply(b, state):
        state = _single(state, "Flatten")
        if isinstance(state, _Raw):
            return _Raw(state.coords.reshape(-1))
        blocks = []
        for blk, c in state.blocks:
            for v in blk.flat:
                one = np.empty((), dtype=object)
                one[()] = v
                blocks.append((one, c))
        return _Hidden(tuple(blocks))

    return Layer("Flatten()", apply)


# -- normalisation ----------------------------------------------------------------------------
def LayerNorm(axis=-1, eps: float = 1e-12, batch_axis: int = 0, channel_axis: int = -1) -> Layer:
    """Layer normalisation (neural-tangents' stax.LayerNorm): each example's activations are
    centred and scaled by their own mean and variance over ``axis`` (axes of the batched
    shape (N, *spatial, C); the channel axis -1 must be among them, the batch axis 0 not),
    y = (h - mu) / sqrt(var + eps).

    Instructions (docs/DESIGN.md 2.1): over the channels the mean is a Moment, so for a group
    G of (position, block) pairs normalised together (one position unless ``axis`` names
    spatial axes) mu = sum_{(s, b) in G} w_b mean(h_{b,s}) and var = sum w_b mean((h_{b,s} -
    mu)^2) with w_b = c_b / (C |G|) (block b holds c_b of the C channels), and every vector of
    the group becomes the Nonlin (h - mu) (var + eps)^(-1/2).  Over several positions, mu and
    var are one Moment each, mean(sum w_b h_{b,s}) and mean(sum w_b (h_{b,s} - mu)^2) (every
    vector has the same n coordinates, so these are the same numbers at any width): the
    instructions that read them then grow with |G|, not with its square.  The kernels then come from the
    program: the Moments' limits (mu -> E[Z^h], var -> E[(Z^h - mu)^2]) and the backward
    pass through them (``ir.backward``).

    The kernels are exact where the normalised vectors are Gaussian (a LayerNorm right after
    Dense or Conv) or the next layer is linear.  A LayerNorm of a nonlinearity's output (mean
    mu != 0) followed by another nonlinearity, tanh((relu(h) - mu) / sigma), is a nonlinear
    function of a Gaussian with a parameter, which the kernel backend refuses (NotPairwise;
    neural-tangents refuses it too: "LayerNorm only implemented for Gaussian inputs");
    ``tp.compile(program).limit(x=X)`` estimates such kernels by particles."""
    eps = _std(eps, "LayerNorm: eps")
    if batch_axis != 0 or channel_axis != -1:
        raise LayerError(f"LayerNorm: only batch_axis=0 and channel_axis=-1 (channels last, as every tp.layers "
                         f"layer) are supported, got batch_axis={batch_axis!r}, channel_axis={channel_axis!r}")
    axes = _axes(axis)
    label = f"LayerNorm(axis={axis!r})" if axis != -1 else "LayerNorm()"

    def apply(b, state):
        state = _single(state, label)
        if isinstance(state, _Raw):
            raise LayerError(f"{label}: cannot normalise the raw input (shape {state.shape}, finitely many "
                             f"channels); start the network with Dense or Conv")
        ndim = len(state.spatial) + 2
        over = _normalised_axes(axes, ndim, label, state.shape)
        k = b.next()
        keep = [i for i in range(len(state.spatial)) if i + 1 not in over]
        groups: dict = {}
        for pos in np.ndindex(state.spatial):
            groups.setdefault(tuple(pos[i] for i in keep), []).append(pos)
        C = state.channels
        outs = [np.empty(state.spatial, dtype=object) for _ in state.blocks]
        several = len(state.blocks) > 1
        for members in groups.values():
            pairs = [(pos, i) for pos in members for i in range(len(state.blocks))]
            w = {i: sp.Rational(c, C * len(members)) for i, (_, c) in enumerate(state.blocks)}
            if len(members) == 1:  # over the channels: a Moment per block
                mu = dsl.add(*(w[i] * dsl.mean(state.blocks[i][0][pos], name=b.name(f"mu{k}", pos, i if several else None))
                               for pos, i in pairs))
                var = dsl.add(*(w[i] * dsl.mean((state.blocks[i][0][pos] - mu) ** 2,
                                                name=b.name(f"var{k}", pos, i if several else None))
                                for pos, i in pairs))
            else:
                # over positions too: one Moment each, of the weighted sum (the same number at any
                # width, as every vector has n coordinates), so that every later instruction
                # reads one mu and one var, not a sum over the group's positions (whose square,
                # in var and in the backward pass, had |G|^2 terms for each of |G| positions)
                group = tuple(members[0][i] for i in keep)
                mu = dsl.mean(dsl.add(*(w[i] * state.blocks[i][0][pos] for pos, i in pairs)),
                              name=b.name(f"mu{k}", group))
                var = dsl.mean(dsl.add(*(w[i] * (state.blocks[i][0][pos] - mu) ** 2 for pos, i in pairs)),
                               name=b.name(f"var{k}", group))
            scale = (var + eps) ** sp.Rational(-1, 2)
            for pos, i in pairs:
                outs[i][pos] = ((state.blocks[i][0][pos] - mu) * scale).named(
                    b.name(f"ln{k}", pos, i if several else None))
        return _Hidden(tuple((out, c) for out, (_, c) in zip(outs, state.blocks)))

    return Layer(label, apply)


def _axes(axis) -> tuple:
    """LayerNorm's axis argument as a tuple of integers."""
    values = (axis,) if isinstance(axis, numbers.Integral) and not isinstance(axis, bool) else axis
    try:
        values = tuple(values)
    except TypeError:
        values = None
    if not values or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in values):
        raise LayerError(f"LayerNorm: axis must be an integer or a tuple of integers (axes of the batched shape "
                         f"(N, ..., C)), got {axis!r}")
    return tuple(int(a) for a in values)


def _normalised_axes(axes: tuple, ndim: int, label: str, shape: tuple) -> set:
    """The axes of the batched shape (N, *spatial, C) that ``axes`` names, checked."""
    if any(not -ndim <= a < ndim for a in axes):
        raise LayerError(f"{label}: axis out of range for inputs of shape (N, {', '.join(map(str, shape))}) "
                         f"({ndim} axes, batch first)")
    over = {a % ndim for a in axes}
    if len(over) != len(axes):
        raise LayerError(f"{label}: an axis is named twice")
    if ndim - 1 not in over:
        raise LayerError(f"{label}: the channel axis (-1) must be normalised over (as in neural-tangents, "
                         f"the only way to an infinite-width limit); got axis={axes!r} on inputs of shape "
                         f"(N, {', '.join(map(str, shape))})")
    if 0 in over:
        raise LayerError(f"{label}: normalising over the batch axis 0 mixes examples; a per-example "
                         f"LayerNorm names channel (and spatial) axes only")
    return over


# -- nonlinearities ---------------------------------------------------------------------------
def Nonlin(phi: Callable, name: str | None = None) -> Layer:
    """Any coordinatewise phi, given as a Python function of a sympy symbol returning a sympy
    expression (as tp.nonlin): ``Nonlin(lambda a: sympy.tanh(2 * a))``."""
    if not callable(phi):
        raise LayerError(f"Nonlin: expected a function of a sympy symbol, got {phi!r}")
    label = name or "Nonlin"

    def apply(b, state):
        state = _hidden(state, label)
        k = b.next()
        blocks = tuple((_map(lambda v, idx, i=i: dsl.nonlin(phi, v).named(
            b.name(f"x{k}", idx, i if len(state.blocks) > 1 else None)), blk), c)
            for i, (blk, c) in enumerate(state.blocks))
        return _Hidden(blocks)

    return Layer(f"{label}()", apply)


def _builtin_layer(name: str) -> Callable[[], Layer]:
    def make() -> Layer:
        return Nonlin(BUILTINS[name], name=name.capitalize())

    make.__name__ = name.capitalize()
    make.__doc__ = f"The built-in nonlinearity {name} as a layer (applied coordinatewise)."
    return make


Step = _builtin_layer("step")
Tanh = _builtin_layer("tanh")
Sigmoid = _builtin_layer("sigmoid")
Softplus = _builtin_layer("softplus")


def _flag(value, where: str) -> None:
    """A layer's yes/no argument must be True or False.  neural-tangents' ``do_stabilize`` is
    one that changes nothing here (how NT evaluates its arc-cosine kernels, not which function
    the layer applies)."""
    if not isinstance(value, (bool, np.bool_)):
        raise LayerError(f"{where} must be True or False, got {value!r}")


def Relu(do_stabilize: bool = False) -> Layer:
    """relu(x) = max(x, 0) (neural-tangents' stax.Relu)."""
    _flag(do_stabilize, "Relu: do_stabilize")
    return _builtin_layer("relu")()


def Abs(do_stabilize: bool = False) -> Layer:
    """|x| (neural-tangents' stax.Abs)."""
    _flag(do_stabilize, "Abs: do_stabilize")
    return _builtin_layer("abs")()


def ABRelu(a: float, b: float, do_stabilize: bool = False) -> Layer:
    """a min(x, 0) + b max(x, 0) (neural-tangents' stax.ABRelu)."""
    _flag(do_stabilize, "ABRelu: do_stabilize")
    a, b = _number(a, "ABRelu: a"), _number(b, "ABRelu: b")
    return Nonlin(lambda t: a * sp.Min(t, 0) + b * sp.Max(t, 0), name="ABRelu")


def LeakyRelu(alpha: float, do_stabilize: bool = False) -> Layer:
    """alpha min(x, 0) + max(x, 0) (neural-tangents' stax.LeakyRelu)."""
    _flag(do_stabilize, "LeakyRelu: do_stabilize")
    alpha = _number(alpha, "LeakyRelu: alpha")
    return Nonlin(lambda t: alpha * sp.Min(t, 0) + sp.Max(t, 0), name="LeakyRelu")


def Sign() -> Layer:
    """sign(x) (neural-tangents' stax.Sign; its derivative is 0 away from 0, as there)."""
    return Nonlin(sp.sign, name="Sign")


def Gelu(approximate: bool = False) -> Layer:
    """x Phi(x), Phi the standard normal CDF (neural-tangents' stax.Gelu).  neural-tangents'
    ``approximate=True`` changes only its finite-width network (a tanh approximation) and not
    its kernels, which a program cannot split: it is refused."""
    if approximate is not False and approximate is not np.False_:
        raise LayerError(f"Gelu: approximate={approximate!r}: in neural-tangents it changes the finite network "
                         "only (tanh approximation), not the kernels; a program has one function for both. Use "
                         "Gelu() (exact), or Nonlin(lambda t: ...) with the tanh approximation for both")
    return _builtin_layer("gelu")()


def Exp(a: float = 1.0, b: float = 1.0) -> Layer:
    """a exp(b x) (neural-tangents' stax.Exp)."""
    a, b = _number(a, "Exp: a"), _number(b, "Exp: b")
    if (a, b) == (1.0, 1.0):
        return _builtin_layer("exp")()
    return Nonlin(lambda t: a * sp.exp(b * t), name="Exp")


def Gaussian(a: float = 1.0, b: float = -1.0) -> Layer:
    """a exp(b x^2) (neural-tangents' stax.Gaussian)."""
    a, b = _number(a, "Gaussian: a"), _number(b, "Gaussian: b")
    return Nonlin(lambda t: a * sp.exp(b * t**2), name="Gaussian")


def Cos(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> Layer:
    """a cos(b x + c) (neural-tangents' stax.Cos)."""
    a, b, c = _number(a, "Cos: a"), _number(b, "Cos: b"), _number(c, "Cos: c")
    if (a, b, c) == (1.0, 1.0, 0.0):
        return _builtin_layer("cos")()
    return Nonlin(lambda t: a * sp.cos(b * t + c), name="Cos")


def _number(value, where: str) -> float:
    """A layer's real, finite number argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise LayerError(f"{where} must be a finite real number, got {value!r}")
    return float(value)


def Erf(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> Layer:
    """a erf(b x) + c (neural-tangents' stax.Erf)."""
    a, b, c = _number(a, "Erf: a"), _number(b, "Erf: b"), _number(c, "Erf: c")
    if (a, b, c) == (1.0, 1.0, 0.0):
        return _builtin_layer("erf")()
    return Nonlin(lambda t: a * sp.erf(b * t) + c, name="Erf")


def Sigmoid_like() -> Layer:  # noqa: N802 - neural-tangents' name
    """0.5 erf(x / 2.4020563531719796) + 0.5 (neural-tangents' stax.Sigmoid_like)."""
    return Erf(0.5, 1 / 2.4020563531719796, 0.5)


def Sin(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> Layer:
    """a sin(b x + c) (neural-tangents' stax.Sin)."""
    a, b, c = _number(a, "Sin: a"), _number(b, "Sin: b"), _number(c, "Sin: c")
    if (a, b, c) == (1.0, 1.0, 0.0):
        return _builtin_layer("sin")()
    return Nonlin(lambda t: a * sp.sin(b * t + c), name="Sin")
