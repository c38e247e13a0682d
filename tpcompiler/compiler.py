"""The compile step and the user-facing entry points (docs/DESIGN.md 5):
``tp.compile(program)`` -> ``Compiled`` with ``formulas``, ``limit``; ``tp.simulate``.

``tp.compile`` is the list ``PASSES``, run in order, each a function of the ``Compilation``
record the previous one returned:

    validate        check types, argument kinds, pair-moment use and outputs
    backward        (program with a readout and no outputs) append dz = sqrt(n) df/dz
    kernel program  (same) outputs nngp and ntk as pair moments of the differentiated program
    derive          the Master theorem: the Z program of the template

A program with an input is a template over one input xi: formulas are derived and shown for
the template, while evaluation binds xi to data rows (``bind``: instantiate -> derive, per
data).  The backward pass runs on the template, once, before instantiation.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from tpcompiler.backends import interpreter
from tpcompiler import progress, validation
from tpcompiler.backends.exact import NotLinear, exact_limit, is_gaussian_linear
from tpcompiler.backends.kernels.shared import paused_gc
from tpcompiler.backends.particles import limit as particle_limit
from tpcompiler.frontend.dsl import Program
from tpcompiler.memory import guarded
from tpcompiler.ir.backward import derive_backward
from tpcompiler.ir.graph import Graph, OutputIndex, ProgramError, instantiate
from tpcompiler.ir.ntk import KERNELS, kernel_names, kernel_outputs, kernel_program
from tpcompiler.symbolic.master import ZProgram, derive

#: Relative accuracy of the kernels' quadratures when none is given (``Compiled.kernels``).
DEFAULT_RTOL = 1e-10
#: Monte-Carlo sample size M of ``limit``, ``tp.train`` and ``tpc limit``/``tpc train`` when
#: none is given (moments without an exact evaluator): the standard error is sd / sqrt(M),
#: about 0.2 % of the spread of the averaged quantity.
DEFAULT_PARTICLES = 200_000
#: ... of ``tpc check``, whose limit must be more precise than the finite-width runs it is
#: compared with (20 seeds at width 8192: the limit's error must be negligible beside theirs).
CHECK_PARTICLES = 5 * DEFAULT_PARTICLES
#: What to do when the passes do not fit in memory (``memory.guarded``): a program with a
#: readout only (its kernel program is made), any other.
_TOO_LARGE_ADVICE = ("its kernel program has one pair moment per pair of positions and layer (a CNN), so its "
                     "memory grows with the square of the number of positions; give the program fewer positions "
                     "(a smaller input, or a pooling or a stride earlier)",
                     "give the program fewer instructions")


def graph_of(program) -> Graph:
    """The graph of a ``tp.Program`` (or the graph itself)."""
    if isinstance(program, Program):
        return program.graph
    if isinstance(program, Graph):
        return program
    raise ProgramError(f"expected a tpcompiler.Program, got {type(program).__name__}")


# ---------------------------------------------------------------------------------------
# The passes of tp.compile.
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Compilation:
    """What the passes have produced so far (a field stays None until its pass ran)."""

    source: Graph                       # the program as written
    drop_zdot: bool = False             # ablation: derive with every ZDot term omitted
    finite_width: bool = False          # the kernel program is run at finite width, not derived
    kernels: tuple = KERNELS            # the kernel program's outputs (readout-only programs; ntk.KERNELS)
    grads: dict | None = None           # backward: {z: dz} (kernel programs only)
    graph: Graph | None = None          # the graph whose outputs are evaluated
    zprogram: ZProgram | None = None    # derive: its Master-theorem Z program


@dataclass(frozen=True)
class Pass:
    """One named step of ``tp.compile``: Compilation -> Compilation."""

    name: str
    run: Callable[[Compilation], Compilation]


def _wants_kernels(graph: Graph) -> bool:
    """A program that declares only a readout is evaluated through its kernels (NNGP, NTK)."""
    return not graph.outputs and graph.readout is not None


def _validate(c: Compilation) -> Compilation:
    """Check the program (``Graph.validate``); it is then the graph to evaluate."""
    return dataclasses.replace(c, graph=c.source.validate())


def _backward(c: Compilation) -> Compilation:
    """Readout-only programs: a copy with dz = sqrt(n) df/dz appended (``derive_backward``);
    not for the NNGP alone, which reads no gradient."""
    if not _wants_kernels(c.source) or "ntk" not in c.kernels:
        return c
    graph, grads = derive_backward(c.source)
    return dataclasses.replace(c, graph=graph, grads=grads)


def _kernel_program(c: Compilation) -> Compilation:
    """After a backward pass: the outputs nngp, ntk as pair moments (``ntk.kernel_outputs``):
    those of the limit, or with ``finite_width`` the network's own empirical kernels; the NNGP
    alone (``kernels``) on the program itself (``ntk.kernel_program``)."""
    if not _wants_kernels(c.source):
        return c
    if "ntk" not in c.kernels:  # (no backward pass was made: _backward)
        return dataclasses.replace(c, graph=kernel_program(c.source, ntk=False))
    return dataclasses.replace(c, graph=kernel_outputs(c.source, c.graph, c.grads, in_the_limit=not c.finite_width))


def _derive(c: Compilation) -> Compilation:
    """The Master-theorem Z program of the graph to evaluate (``symbolic.master.derive``)."""
    return dataclasses.replace(c, zprogram=derive(c.graph, c.drop_zdot))


PASSES: tuple[Pass, ...] = (
    Pass("validate", _validate),
    Pass("backward", _backward),
    Pass("kernel program", _kernel_program),
    Pass("derive", _derive),
)


def run_passes(program, drop_zdot: bool = False, until: str = PASSES[-1].name,
               finite_width: bool = False, kernels: tuple = KERNELS) -> Compilation:
    """Run ``PASSES`` on ``program`` in order, up to and including the pass ``until``
    (``finite_width``, ``kernels``: ``Compilation``'s)."""
    state = Compilation(graph_of(program), drop_zdot, finite_width, kernels)
    with _compiling(state) as running:
        return continue_passes(state, None, until, running)


def _compiling(state: Compilation):
    """The status line of ``tp.compile`` (a CNN of many positions takes seconds: it says which
    pass runs; on a terminal, after ``progress.COMPILE_DELAY``)."""
    return progress.status(f"tp.compile {state.source.name}", delay=progress.COMPILE_DELAY)


def continue_passes(state: Compilation, after: str | None, until: str = PASSES[-1].name,
                    running=progress.status_step_ignored) -> Compilation:
    """Run on ``state`` the passes that follow the pass ``after`` (all when None), up to and
    including the pass ``until``, telling ``running`` each one's name as it starts."""
    names = [step.name for step in PASSES]
    if until not in names:
        raise ValueError(f"no pass called {until!r}; the passes are {names}")
    # A CNN's kernel program makes 10^5-10^6 objects, almost none in reference cycles: the
    # cyclic collector's full passes over them were a fifth of tp.compile (shared.paused_gc).
    advice = _TOO_LARGE_ADVICE[0 if _wants_kernels(state.source) else 1]
    with paused_gc(), guarded(f"tp.compile {state.source.name!r}", advice) as guard_step:
        for step in PASSES[0 if after is None else names.index(after) + 1:names.index(until) + 1]:
            running(step.name)
            guard_step(step.name)
            state = step.run(state)
    return state


def _feeds_kernels(state: Compilation) -> bool:
    """Whether the passes make the kernel program the kernel backend reads (a readout-only
    program, whose backward pass the kernel program is built on; not an ablation without ZDot
    terms)."""
    return _wants_kernels(state.source) and not state.drop_zdot


def _kernels_stored(state: Compilation, parts: dict) -> bool:
    """Whether the kernel derivation of ``state``'s program (``_feeds_kernels``), with
    ``Compiled.kernel_function``'s defaults, is in the disk cache (``parts``: the program's
    ``stored.graph_parts``).  The same code then derived it from the same program before, so
    the passes after validation, which it no longer needs, succeeded then and would succeed
    again."""
    if not _feeds_kernels(state):
        return False
    from tpcompiler.backends.kernels.kernel import derivation_stored

    return derivation_stored(state.source, DEFAULT_RTOL, parts, state.kernels)


class Bound(NamedTuple):
    """A compiled program bound to input rows: its Z program and where each concrete output
    comes from (``OutputIndex``)."""

    zprogram: ZProgram
    index: dict[str, OutputIndex]


class Compiled:
    """A program with its derived Z program; evaluates limits and renders formulas.

    ``source`` is the program's graph as written (kernels and training read it); ``graph`` the
    graph whose outputs are evaluated (``source``, or its kernel program when the program
    declares only a readout); ``zprogram`` the Master-theorem derivation of ``graph``.  For a
    readout-only program whose kernels' derivation is in the disk cache (kernels/stored.py),
    the backward pass, the kernel program and its derivation are made only when something
    reads them (from the program as it was compiled): ``kernels``/``kernel_function`` then
    need none of them."""

    def __init__(self, program, drop_zdot: bool = False, get=None):
        #: the kernels this compilation serves (``compile``'s ``get``; both by default)
        self.kernel_names = kernel_names(get)
        compilation = Compilation(graph_of(program), drop_zdot, kernels=self.kernel_names)
        with _compiling(compilation) as running:
            compilation = continue_passes(compilation, None, "validate", running)
            self.source = compilation.source
            self.drop_zdot = drop_zdot
            self._bound: dict = {}
            self._fingerprints: dict = {}  # (the instructions' texts, read again by _unchanged)
            self._snapshot = _snapshot(self.source, self._fingerprints)
            # The backward pass, the kernel program and its derivation (seconds for a CNN of
            # many positions) wait until something reads them when the kernels' derivation is
            # in the disk cache; they then run on a copy of the program as it is now, so that
            # they show what an eager compile shows even if the program is changed in between.
            self._passes_left = None
            self._passes_lock = threading.Lock()
            if _kernels_stored(compilation, self._snapshot[3]):  # (the snapshot's graph_parts)
                copy = compilation.source.copy()  # (validation's graph is the program itself)
                self._passes_left = dataclasses.replace(compilation, source=copy, graph=copy)
            else:
                self._passes_done(continue_passes(compilation, "validate", running=running))

    def _passes_done(self, compilation: Compilation) -> None:
        self._graph = compilation.graph
        self._zprogram: ZProgram = compilation.zprogram
        # (kernel program, its Z program) for the kernel backend, when the passes made them
        self._kernel_derivation = (self._graph, self._zprogram) if _feeds_kernels(compilation) else None

    def _finish_passes(self) -> None:
        """Run the passes that waited (``__init__``), on the program as it was compiled; once,
        whichever thread asks first."""
        if self._passes_left is None:
            return
        with self._passes_lock:
            left = self._passes_left
            if left is not None:
                with _compiling(left) as running:
                    self._passes_done(continue_passes(left, "validate", running=running))
                self._passes_left = None

    @property
    def graph(self) -> Graph:
        """The graph whose outputs are evaluated (class docstring)."""
        self._finish_passes()
        return self._graph

    @property
    def zprogram(self) -> ZProgram:
        """The Master-theorem derivation of ``graph``."""
        self._finish_passes()
        return self._zprogram

    def _unchanged(self) -> None:
        """The program must not have grown or changed since compile: its new instructions or
        outputs would be missing from the derived Z program, and the kernels would be derived
        from the kernel program of what it was (an instruction's value changed in place)."""
        now = _snapshot(self.source, self._fingerprints)
        if now != self._snapshot:
            added = [k for k in now[1] if k not in self._snapshot[1]]
            if added:
                what = f"output {added[0]!r} was added"
            elif now[:3] != self._snapshot[:3]:
                what = "instructions or outputs were added"
            else:
                part = next(k for k in sorted(set(now[3]) | set(self._snapshot[3]))
                            if now[3].get(k) != self._snapshot[3].get(k))
                what = f"{_PARTS.get(part, f'its attribute {part!r}')} was changed in place"
            raise ProgramError(f"program {self.name!r} changed after tp.compile ({what}); call tp.compile(program) again")

    @property
    def name(self) -> str:
        return self.source.name  # (the kernel program keeps the program's name)

    def formulas(self, format: str = "markdown") -> str:
        """The derived Z recursions, ZHat covariances, ZDot terms and moments."""
        from tpcompiler.printing.render import render

        validation.choice(format, "format", ("markdown", "latex"))
        return render(self.zprogram, format)

    def bind(self, x=None) -> Bound:
        """The program bound to input rows ``x`` (default: the program's own): the passes
        instantiate -> derive, cached per data."""
        key = None if x is None else np.asarray(x, dtype=np.float64).tobytes() + bytes(str(np.shape(x)), "ascii")
        if key not in self._bound:
            graph, index = instantiate(self.graph, x)
            zp = self.zprogram if graph is self.graph else derive(graph, self.drop_zdot)
            self._bound[key] = Bound(zp, index)
        return self._bound[key]

    def kernels(self, X, X2=None, rtol: float = DEFAULT_RTOL, *, memory=None, out=None, dtype: str = "float64",
                client=None, progress: bool | None = None, tile: int | None = None, get=None) -> dict[str, np.ndarray]:
        """Infinite-width NNGP and NTK (docs/DESIGN.md 2.3): {"nngp", "ntk"} = k(X, X) (N x N),
        plus {"nngp_x2", "ntk_x2"} = k(X2, X) (N2 x N) when X2 is given.  Exact: closed
        forms where they exist, quadrature to ``rtol`` otherwise (see ``kernel_function``).
        ``get``: "nngp" or "ntk" for that kernel alone (as neural-tangents' ``get``; None: the
        kernels ``tp.compile`` was asked for, both by default), which derives and computes only
        its terms (a pooled CNN's NNGP alone compiles in about half the time of both, and with
        ``tp.compile(program, get="nngp")`` in less than a third).

        Any data size (``backends.kernels.tiled``): computed in tiles whose working set, with
        the inputs and in-memory outputs, stays within ``memory`` ("4GB", "512MB", "1.5GiB" or
        bytes, for the whole process; None: 4 GB beyond what the process holds at the call); ``out`` a directory (or path prefix) to write memory-mapped .npy files
        (``out/nngp.npy``, ...; returned as read-only memory maps) when the kernels do not fit;
        ``dtype`` "float32" stores the float64 results in single precision; ``client`` a
        ``dask.distributed.Client`` that runs the tiles as tasks; ``progress`` a bar over
        tiles (None: when stderr is a terminal); ``tile`` forces the tile side.  Programs of
        ``tp.layers`` take X of shape (N, *input_shape)."""
        from tpcompiler.backends.kernels import tiled

        X = validation.array(network_rows(self.source, X, "X"), "X", ndim=2)
        X2 = validation.optional_array(network_rows(self.source, X2, "X2"), "X2", ndim=2)
        return tiled.kernels(self.kernel_function(rtol, get=get), X, X2, memory=memory, out=out, dtype=dtype,
                             client=client, progress=progress, tile=tile)  # refuses non-finite kernels itself

    def _kernel_program(self) -> tuple | None:
        """(kernel program, its Z program) as the passes made them, or None (a program with
        outputs of its own, or compiled with drop_zdot)."""
        self._finish_passes()
        return self._kernel_derivation

    def kernel_function(self, rtol: float = DEFAULT_RTOL, cache: bool = True, get=None):
        """The compiled kernel evaluator (generated Numba code, cached on disk).  ``cache``:
        read the derivation from the disk cache when the same program was derived by the same
        code before, else store it there (kernels/stored.py); False derives it again.
        ``get``: the kernels it computes ("nngp", "ntk"; None: those ``tp.compile`` was asked
        for; see ``kernels``)."""
        from tpcompiler.backends.kernels.kernel import KernelFunction

        rtol = validation.number(rtol, "rtol", positive=True)
        cache = validation.flag(cache, "cache")
        if not MIN_RTOL <= rtol <= MAX_RTOL:
            raise validation.ArgumentError(
                f"rtol: expected a relative accuracy between {MIN_RTOL:g} and {MAX_RTOL:g}, got {rtol:g}")
        get = self.kernel_names if get is None else kernel_names(get)
        if "ntk" in get and "ntk" not in self.kernel_names:  # (an NTK compilation has both outputs)
            raise validation.ArgumentError(
                f"get: program {self.source.name!r} was compiled for the NNGP alone (tp.compile(program, "
                f"get='nngp')), which derives no NTK; compile it without get for the NTK, or ask get='nngp'")
        self._unchanged()
        key = ("kernels", float(rtol), bool(cache), get)
        if key not in self._bound:  # (the program is as compiled: the snapshot's graph_parts are its own)
            # the NNGP alone needs no backward pass: where the passes still wait (the kernels of
            # both are stored), the kernel backend makes its own NNGP program (ntk.kernel_program)
            derived = self._kernel_program if self._passes_left is None or "ntk" in get else None
            self._bound[key] = KernelFunction(self.source, rtol=rtol, derived=derived, cache=bool(cache),
                                              graph_parts=self._snapshot[3], get=get)
        return self._bound[key]

    def limit(self, particles: int = DEFAULT_PARTICLES, seed: int = 0, x=None, groups: int | None = None,
              method: str = "auto") -> dict[str, tuple[float, float]]:
        """{output: (value, stderr)} of the infinite-width limit (stderr 0 where exact).

        method (docs/DESIGN.md 2.7): "exact" (Gaussian-linear programs, strategy 1),
        "pairwise" (moments that need only bivariate Gaussian expectations, strategy 2:
        closed forms, else quadrature to 1e-10), "particles" (any program, strategy 3, with
        ``particles`` samples in ``groups`` groups from ``seed``; by default 10 groups up to
        50,000 particles, one per 5,000 above, at most 40: ``particles.default_groups``) or
        "auto": the most exact of the three that applies, in that order."""
        from tpcompiler.backends.kernels.limit import pairwise_limit
        from tpcompiler.backends.kernels.pairwise import NotPairwise, is_pairwise

        particles = validation.count(particles, "particles", minimum=1)
        seed = validation.count(seed, "seed")
        if groups is not None:
            groups = validation.count(groups, "groups", minimum=2)
        validation.choice(method, "method", ("auto", "exact", "pairwise", "particles"))
        x = _rows(network_rows(self.source, x, "x"), "x")  # (a tp.layers program takes (N, *input_shape) too)
        self._unchanged()
        _require_outputs(self.graph)
        zp, _ = self.bind(x)
        result = None
        if method == "exact" or (method == "auto" and is_gaussian_linear(zp)):
            try:
                result = exact_limit(zp)
            except NotLinear as exc:
                raise NotLinear(f"{exc}: method 'exact' needs a Gaussian-linear program; method 'particles' or 'auto' "
                                f"takes any program (tpc limit --method ...)") from None
        elif method == "pairwise":
            try:
                result = pairwise_limit(zp)
            except NotPairwise as exc:
                raise NotPairwise(f"program {self.graph.name!r}, method 'pairwise': {exc}; method 'particles' or "
                                  "'auto' takes any program (tpc limit --method ...)") from None
        refused = None  # why the pairwise limit did not apply, under "auto"
        if method == "auto" and result is None and is_pairwise(zp):
            try:
                result = pairwise_limit(zp)
            except NotPairwise as exc:
                refused = exc  # an expectation beyond two correlated factors: particles below
        if result is None:
            _sampled_pointwise(self.graph, refused)
            result = particle_limit(zp, particles=particles, seed=seed, groups=groups)
        validation.finite_results(result, "the limit of output", OVERFLOW_HINT)
        return result


OVERFLOW_HINT = ("the expectation does not exist or float64 overflowed; check the program's nonlinearities "
                 "and rescale large inputs or sigmas")

#: Quadrature accuracies ``kernels`` accepts: below 1e-14 float64 rounding dominates, above
#: 0.1 the result would hardly be a number.
MIN_RTOL, MAX_RTOL = 1e-14, 0.1


#: How ``Compiled._unchanged`` names a part of the graph changed in place.
_PARTS = {"g": "an instruction", "readout": "the readout", "init_cov": "the covariance table",
          "inputs": "an input's declaration", "outputs": "an output"}


def _snapshot(graph: Graph, memo: dict):
    """What ``Compiled._unchanged`` compares: the instructions and outputs, whether there is a
    readout, and a digest of each attribute of the graph written out exactly (an instruction,
    the readout or a covariance changed in place; kernels/stored.py ``graph_parts``, with
    ``memo``, its texts of the instructions it wrote before)."""
    from tpcompiler.backends.kernels.stored import graph_parts

    return len(graph.g), tuple(graph.outputs), graph.readout is not None, graph_parts(graph, memo)


def _rows(x, name: str):
    """Input rows for a program with an input: real numbers of a sane magnitude (shape, NaN
    and infinities are checked by ``ir.instantiate`` against the program's input)."""
    return validation.optional_array(x, name, finite=False)


def network_rows(graph: Graph, x, name: str):
    """Inputs of a program built by ``tp.layers`` (which records ``graph.input_shape``): an
    (N, *input_shape) array becomes the (N, d) rows of the program input, flattened row-major
    (channels last); flat (N, d) rows pass unchanged, as does anything for other programs."""
    shape = getattr(graph, "input_shape", None)
    if shape is None or x is None:
        return x
    arr = validation.array(x, name, finite=False)
    d = int(np.prod(shape))
    if arr.ndim == len(shape) + 1 and arr.shape[1:] == tuple(shape):
        return arr.reshape(arr.shape[0], d)
    if arr.ndim == 2 and arr.shape[1] == d:
        return arr
    want = ", ".join(str(s) for s in shape)
    raise validation.ArgumentError(f"{name}: the network takes inputs of shape (N, {want}) (or (N, {d}) flattened "
                                   f"row-major), got shape {arr.shape}")


def _dirac_instruction(graph: Graph) -> str | None:
    """The first instruction of ``graph`` with a Dirac delta in its expression, or None."""
    import sympy as sp

    for key in graph.g:
        expr = getattr(graph.op(key), "expr", None)
        if isinstance(expr, sp.Basic) and expr.has(sp.DiracDelta):
            return key
    return None


def _pointwise(graph: Graph) -> None:
    """A finite-width run evaluates every instruction coordinatewise: a Dirac delta (allowed
    in the limit, where Stein's lemma turns its expectation into a closed form) cannot be."""
    key = _dirac_instruction(graph)
    if key is not None:
        raise ProgramError(f"instruction {key!r}: a Dirac delta cannot be evaluated coordinatewise, so the "
                           "program cannot run at finite width (its limit may still exist: use limit)")


def _sampled_pointwise(graph: Graph, refused: Exception | None) -> None:
    """Particles evaluate every instruction at samples, which a Dirac delta has no value at: its
    expectations need the exact pairwise limit (Stein's lemma), whose refusal ``refused`` (None:
    it was not tried) says why that did not apply (an NTK of step's derivative: E[delta delta']
    diverges at correlation 1)."""
    key = _dirac_instruction(graph)
    if key is None:
        return
    why = (f"; the exact pairwise limit did not apply: {refused}" if refused is not None
           else "; its limit needs Stein's lemma: method 'pairwise' or 'auto'")
    raise ProgramError(f"instruction {key!r}: a Dirac delta has no value at particles (samples){why}")


def _require_outputs(graph: Graph) -> None:
    if not graph.outputs:
        raise ProgramError(f"program {graph.name!r} has no outputs, so there is nothing to evaluate; "
                           "declare one with p.output(name, tp.mean(...)) or p.readout(...)")


def compile(program, drop_zdot: bool = False, get=None) -> Compiled:  # noqa: A001 - the public name is tp.compile
    """Derive the Master-theorem Z program of ``program`` (``drop_zdot``: ablation that
    omits every ZDot term, to show what the "gradient independence" shortcut gets wrong).
    ``get``: for a program with a readout only, the kernels to derive (as neural-tangents'
    ``get``: "nngp", "ntk"; None: both); "nngp" makes neither the backward pass nor the NTK's
    pair moments (a pooled CNN's NNGP then takes less than a third of the time of both), and
    its kernel program, limit and kernels are the NNGP's alone."""
    return Compiled(program, validation.flag(drop_zdot, "drop_zdot"), get)


def _finite_width_graph(program, x) -> Graph:
    """The program's graph bound to the input rows ``x``, checked to be runnable at finite
    width (it has outputs, every instruction is pointwise)."""
    graph = run_passes(program, until="kernel program", finite_width=True).graph
    _require_outputs(graph)
    graph, _ = instantiate(graph, _rows(network_rows(graph_of(program), x, "x"), "x"))
    _pointwise(graph)
    return graph


def simulate(program, width: int, seed: int = 0, x=None) -> dict[str, float]:
    """Run the program at finite width ``width`` with ``seed``: {output: value}."""
    width = validation.count(width, "width", minimum=1)
    seed = validation.count(seed, "seed")
    graph = _finite_width_graph(program, x)
    result = interpreter.run(graph, width, seed)[0]
    validation.finite_results(result, "at finite width, output", OVERFLOW_HINT)
    return result


def simulate_seeds(program, width: int, seeds, x=None) -> dict[str, np.ndarray]:
    """Finite-width outputs over several seeds: {output: array over seeds}."""
    width = validation.count(width, "width", minimum=1)
    seeds = [validation.count(s, "seed") for s in seeds]
    graph = _finite_width_graph(program, x)
    result = interpreter.simulate_many(graph, width, seeds)
    validation.finite_results(result, "at finite width, output", OVERFLOW_HINT)
    return result
