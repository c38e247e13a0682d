"""Kernel backend (docs/DESIGN.md 2.3, 2.7 strategies 1-2): exact NNGP and NTK of any program whose
kernel-regime expectations are pairwise Gaussian, as generated Numba code.

Pipeline: template program with a readout -> ``ntk.kernel_program`` (backward pass derived,
kernels as pair moments) -> ``pairwise.PairwiseEngine`` (quantity DAG: Wick / closed forms /
quadrature calls) -> this module:

* **features**: every input-dependent coefficient becomes a feature.  Functions of one input
  are *row features* (vectors over the data); bilinear forms in (xi, xi') reduce to a few base
  Gram matrices X A X2^T computed by BLAS, so d never enters the per-pair code;
* **row stage**: the quantities of one input (variances, a part of the diagonal kernels), one
  loop over data rows;
* **pair stage**: all layers of one pair (xi, xi') fused into one straight-line function
  (common subexpressions shared by sympy's cse, e.g. one arccos per relu layer), a loop over
  pairs, only the upper triangle when X2 is not given.

Both stages are serial Numba functions that release the GIL, run on threads over strided
rows (``_in_threads``): numba's parallel (prange) compile of the same loops took 2.5-3.5x as
long (a two-layer MLP's first call 3.1 s against 0.9 s).

Each kernel is computed in two parts (``PARTS``, ``PairwiseEngine.scalar_terms``): the terms
that read a covariance of a vector with itself at the two inputs, Cov(Z^v, Z^v'), and the
others.  At xi' = xi such a covariance is a variance computed by other arithmetic, and an
arc-cosine (or any expectation with a singularity at correlation 1) turns their last-bit
difference into an error of ~1e-8, so on the diagonal those terms come from the row stage,
derived at one input, where they are exact.  The others (a pooled readout's E[f(h_p) f(h_q')]
for p != q: all but P of its P^2 terms) come from the pair stage at (i, i), as off the
diagonal.  Where the windows of two positions hold equal values (a constant region of an
image) their correlation is 1 too, and a Gram entry and a row's sum, one ulp apart, would make
the same error; the arc-cosine kernels take a correlation within about 4 ulps of +-1 as +-1
(``expectations.special.DET_AS_ZERO``), which keeps such terms exact, on the diagonal and
between two equal inputs alike.

The kernels (and their diagonal) are carried through these steps as term sums ({term:
coefficient}, ``shared.add_terms``): a CNN's are thousands of terms, handled one by one
instead of as one sympy sum rebuilt at every step.

When the quantities and output terms are many but of few structures (a CNN: one quantity
per pair of positions and layer, all of one form), both stages are generated instead as one
loop per structure over index arrays (``shared``), so code size and compile time stop
growing with the number of positions; ``_should_share`` decides, ``share=`` overrides.  What
is grouped: the engine's template calls as they come (depth 1: cheap, only their arguments
are lowered), or, with quantities (depth 2 and more), every expectation as a call of its
function's template at arguments that are values of their own (``_lower_expectation_calls``),
so that windows at a boundary, which sum fewer taps, share the loop of the interior.

Expectations with closed forms (expectations.closed_form_pair) are inlined as sympy expressions;
the others call the generated quadrature functions of ``expectations``.  Generated source is
cached on disk keyed by its hash (``codegen.load_module``), and numba compiles it with
``cache=True``, so a second run of the same program pays no JIT time.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import time
from dataclasses import dataclass
from fractions import Fraction

import numba
import numpy as np
import sympy as sp

from tpcompiler import expectations, memory, progress, threads, validation
from tpcompiler.ir import ops, symbols
from tpcompiler.backends.codegen import (common_subexpressions, custom_functions_source, load_module, load_names,
                                         packed_array, print_body)
from tpcompiler.ir.graph import Graph, ProgramError
from tpcompiler.ir.ntk import KERNELS, kernel_names, kernel_program  # (KERNELS, kernel_names: read from here too)
from tpcompiler.backends.kernels import shared, stored
from tpcompiler.backends.kernels.features import Features
from tpcompiler.ir.ops import node_symbol
from tpcompiler.backends.kernels.pairwise import (E1, E2, PARTS, ExpectationRules, NotPairwise, PairwiseEngine,
                                                  TemplateCall)

#: What to do when a derivation does not fit in memory (``memory.guarded``).
TOO_LARGE_ADVICE = ("the kernel derivation makes one quantity per pair of positions and layer, so a CNN's memory "
                    "and time grow with the square of its number of positions; give the program fewer positions "
                    "(a smaller input, or a pooling or a stride earlier)")
#: Pairs (i, j) per block of the looped pair stage (``_shared_source``): its quantities take
#: (number of pair quantities) x _J_BLOCK floats per thread.
_J_BLOCK = 256


@numba.njit(parallel=True, cache=True)
def mirror(out, diagonal):
    """The lower triangle of a symmetric block from its upper one, in 64 x 64 tiles (a plain
    transposed copy misses the cache on every read), block rows b and nb-1-b together for
    equal work per thread; the row stage's part of the diagonal added to the pair stage's
    (``PARTS``).  One compiled function for every kernel (Numba's disk cache keeps it): as
    part of each generated module, its parallel compile cost every program's first call 0.5 s."""
    N = out.shape[0]
    nb = (N + 63) // 64
    for t in numba.prange((nb + 1) // 2):
        for r in range(2):
            b = t + r * (nb - 1 - 2 * t)
            if r == 1 and b == t:
                continue
            for c in range(b + 1):
                for i in range(b * 64, min(N, b * 64 + 64)):
                    for j in range(c * 64, min(i, c * 64 + 64)):
                        out[i, j] = out[j, i]
            for i in range(b * 64, min(N, b * 64 + 64)):
                out[i, i] += diagonal[i]


#: The bound variable of the functions g(t) printed into generated source.
_PRINTED_ARG = sp.Symbol("t", real=True)


def _one_blas_thread():
    """Grams as single-threaded BLAS calls (features.py spreads them over two Python threads):
    OpenBLAS's own idle workers spin for ~0.1 s after a call and take the cores from the Numba
    pair loop that follows (depth-10 relu, N = 1000: pair stage 15 ms -> 33 ms after a Gram
    on OpenBLAS's threads)."""
    return threads.one_blas_thread()


class KernelFunction:
    """NNGP and NTK of a template program, compiled to Numba (see module docstring)."""

    def __init__(self, graph: Graph, rtol: float = 1e-10, runtime=(), share: bool | None = None,
                 templates: bool = True, derived=None, cache: bool = False, graph_parts: dict | None = None,
                 get=None):
        """``get``: which kernels to derive and compute ("nngp", "ntk", or both, as
        neural-tangents' ``kernel_fn(x1, x2, get)``; None: both, ``kernel_names``): the NNGP alone
        skips the NTK's terms, the sums over the pairs of uses of every weight, which are most
        of a CNN's derivation and of its pair stage (and, when the kernel program is made here,
        the backward pass).  ``runtime``: Param keys of ``graph`` kept as symbols through the
        derivation and the generated code, whose values are arguments of every call
        (``params``), so one compilation serves every value of them; the others are compiled in
        as numbers.
        Refused (NotPairwise) where a runtime Param would enter a quadrature function.
        ``share``: compute quantities (and output terms) of one structure by one loop
        (``shared``: a CNN's pairs of positions) instead of straight-line code; None decides
        by the program (``_should_share``).  ``templates``: derive each structure of
        expectation once (pairwise.py; False derives every expectation on its own, the
        reference the templates are tested against).  ``derived``: (kernel program of
        ``graph``, its Z program) when the caller has them (``tp.compile``'s passes), or a
        function returning them (or None), called only if the derivation is not read from
        the disk cache; else derived here (they must be those of ``graph`` as it is:
        ``tp.compile`` checks that the program was not changed since).  ``cache``: read the
        derivation from the disk cache when this program was derived with these options by
        this code before, and store it
        otherwise (stored.py; ``derivation_cached`` says which happened).  Off by default
        here, where tests change the derivation's code in place;
        ``tp.compile(...).kernel_function()`` turns it on.  ``graph_parts``: the graph's
        ``stored.graph_parts`` when the caller has just computed them (``tp.compile``'s check
        that the program is unchanged), for the cache's key."""
        start = time.perf_counter()
        self.rtol = rtol
        #: the kernels this function computes and returns, in KERNELS' order
        self.kernels = kernel_names(get)
        bad = [k for k in runtime if k not in graph.g or not isinstance(graph.op(k), ops.Param)]
        if bad:
            raise ProgramError(f"kernels: runtime parameter {bad[0]!r} is not a constant (p.scalar) of program {graph.name!r}")
        layer_scalars = [k for k in runtime if any(isinstance(graph.op(c), ops.InputLayer) for c in graph.g.successors(k))]
        if layer_scalars:
            raise ProgramError(f"kernels: runtime parameter {layer_scalars[0]!r} is a scalar of an input layer, whose "
                               "Gram matrices are computed from its compiled value; it cannot be a runtime argument")
        #: the runtime Params in argument order, and their values in the program (the default)
        self.runtime = tuple(runtime)
        self.runtime_defaults = np.array([graph.op(k).value for k in self.runtime], dtype=np.float64)
        check_kernel_program(graph)
        self.graph = graph
        (self.input_name, decl), = graph.inputs.items()
        self.d = len(decl.keys)
        key = _derivation_key(graph, rtol, self.runtime, share, templates, graph_parts, self.kernels) if cache else None
        #: the derivation's disk-cache key (None without ``cache``), also its identity for Dask workers
        self.derivation_key = key
        state = stored.load(key)
        #: whether the derivation was read from the disk cache (stored.py) instead of derived
        self.derivation_cached = state is not None
        self._engine = None
        #: {"templates", "quantities", "pair quantities"}: the size of the derivation (None
        #: when it was read from the disk cache)
        self.derivation_sizes = None
        with shared.paused_gc():  # see its docstring: speed only (storing walks the derivation's objects too)
            if state is not None:
                self.source, self.shared, self.row_symbols = state["source"], state["shared"], state["row_symbols"]
                self.features = Features.restored(graph, state["features"])
            else:
                with shared.interned_floats(), shared.interned_symbols():  # see their docstrings: speed only
                    # a CNN of many positions takes seconds: say which step runs (a terminal only),
                    # and stop with a clear error before its derivation exhausts the memory
                    with progress.status(f"kernels: deriving {graph.name}", delay=progress.COMPILE_DELAY) as running, \
                            memory.guarded(f"kernels of program {graph.name!r}", TOO_LARGE_ADVICE) as guard_step:
                        def step(name: str) -> None:
                            running(name)
                            guard_step(name)

                        try:
                            self.source = self._derive(graph, templates, share, derived, step)
                        except BaseException:
                            # the object is not made: let go of the derivation (its engine, its
                            # memos) even where the traceback is kept (an interactive session)
                            self.__dict__.clear()
                            raise
                self._forget_lowering()
                engine = self._engine
                self.derivation_sizes = {"templates": len(engine.templates_found), "quantities": len(engine.order),
                                         "pair quantities": sum(q.pair for q in engine.order)}
            self.module = load_module(self.source, "kernels")
            if state is None:  # stored once its module has loaded
                features = self.features.runtime_state()
                stored.store(key, {"source": self.source, "shared": self.shared, "row_symbols": self.row_symbols,
                                   "features": features})
                if cache:
                    self._become_stored(graph, features)
        self.compile_seconds = time.perf_counter() - start
        self.last_timing: dict = {}
        self.last_plan = None  # the tile plan of the last tiled.kernels call

    @property
    def engine(self) -> PairwiseEngine:
        """The pairwise engine of the derivation (its quantities and templates); kept only by
        ``cache=False`` (``_become_stored``)."""
        if self._engine is None:
            raise AttributeError("kernels: this KernelFunction has no pairwise engine: its derivation was read from "
                                 "the disk cache, or made with cache=True (tp.compile(...).kernel_function()), which "
                                 "lets the engine go; build it with KernelFunction(graph, cache=False) to inspect one")
        return self._engine

    def _become_stored(self, graph: Graph, features: dict) -> None:
        """With ``cache=True`` (``tp.compile(...).kernel_function()``), once the derivation is
        stored: keep what a read-back of it keeps (the source, the row symbols, the features
        restored from ``features``, their ``runtime_state``) and let go of the rest: the
        pairwise engine, the features' sympy expressions, the lowering's templates.  They are
        millions of objects for a CNN, which every full collection of the cyclic collector
        walks: the first one after a 2-D 16x16 depth-2 derivation took 12 s (33 million
        objects), in the first kernel call; at 8x8 the objects left go from 1.04 to 0.67
        million (with the kernel program ``tp.compile`` keeps), a full collection from 1.07 to
        0.40 s.  The engine's attributes are cleared, since it is in reference cycles (its
        symbol kinds read it back) that reference counting alone would not free."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.__dict__.clear()
        self.features = Features.restored(graph, features)
        for name in _DERIVATION_ONLY:
            self.__dict__.pop(name, None)

    def _derive(self, graph: Graph, templates: bool, share: bool | None, derived,
                running=progress.status_step_ignored) -> str:
        """The generated module's source: the kernel program's quantities and outputs from the
        engine, lowered, grouped (``share``) or written out, printed (module docstring).
        ``running(step)`` is told each step as it starts (``progress.status``)."""
        running("kernel program")
        derived = derived() if callable(derived) else derived
        kp, zp = derived if derived is not None else (kernel_program(graph, True, "ntk" in self.kernels), None)
        running("pair expectations")
        self._engine = engine = PairwiseEngine(kp, zp, runtime=frozenset(self.runtime), templates=templates)
        try:
            # The pair stage computes the kernels in two parts, PARTS (the terms that read no
            # covariance of a vector with itself at the two inputs, and the others); on the
            # diagonal k(xi, xi) it computes the first, and the row stage the second from row
            # quantities: exact at rho = 1, where a pair formula would amplify rounding
            # (arc-cosine kernels have a square-root singularity there).  Of a pooled readout's
            # P^2 terms, P are then derived for the row stage.
            derived_outputs = [engine.scalar_terms(kp.outputs[k], part=part) for part in PARTS for k in self.kernels]
            derived_diagonal = [engine.scalar_terms(kp.outputs[k], same_input=True, part=PARTS[1])
                                for k in self.kernels]
        except NotPairwise as exc:
            text = str(exc) if len(str(exc)) < 200 else str(exc)[:197] + "..."
            raise NotPairwise(f"program {graph.name!r}: the kernel backend needs bivariate Gaussian expectations "
                              f"of parameter-free functions, but: {text}; {PARTICLES_HINT}") from None
        self._inputs0 = {node_symbol(k): kp.op(k).index for k in kp.input_keys()}
        self.expectations = ExpectationRules(engine.functions, self.rtol, functools.partial(_no_rule, graph.name))
        self._bodies: dict = {}     # template index -> lowered body (_template_body)
        self._recipes: dict = {}    # template index -> its _Recipe or None (_recipe)
        self._linear_values: dict = {}  # engine's argument -> _linear (_linear_value)
        plans = None
        if share is not False:
            # With quantities (depth 2 and more), each expectation a call of its function at
            # symbols (the covariance sums of boundary windows computed by loops of their own):
            # one group per function and level wherever the window is (2-D 4x4 depth 2: 59
            # loops, against 128 for the engine's calls or the written-out expressions,
            # whichever were fewer, of which both were computed).  Without quantities (depth
            # 1), the engine's calls as they come: only their arguments are lowered, cheap
            # whatever the number of positions; if they make many groups, the calls of
            # expectations too, and the fewer groups win.
            lower = self._lower_expectation_calls if engine.order else self._lower_calls
            running("lowering")
            lowered = self._named_stages(self._lowered(engine.order, derived_diagonal, derived_outputs, lower))
            running("grouping")
            plans = self._plans(*lowered)
            if not engine.order and _groups(plans) > _MANY_GROUPS:
                kept = self._module_state
                other = self._named_stages(self._lowered(engine.order, derived_diagonal, derived_outputs,
                                                           self._lower_expectation_calls))
                other_plans = self._plans(*other)
                if _groups(other_plans) < _groups(plans):
                    lowered, plans = other, other_plans
                else:
                    self._module_state = kept
        #: whether the generated code computes groups of quantities by loops (shared.py)
        self.shared = _should_share(plans) if share is None else bool(share)
        running("writing code")
        if self.shared:
            return self._shared_source(*lowered, plans)
        looped = None
        if share is None and _repeats_structures(plans):
            # a deep network: few structures repeated layer after layer, whose loops are written
            # once (_folded); the smaller stages win, since numba's compile grows with them
            looped = self._shared_source(*lowered, plans)
            kept = self._module_state
        rows, diagonal, pairs, outputs = self._lowered(engine.order, derived_diagonal, derived_outputs,
                                                       self._lower_instances)
        straight = self._source(rows, [shared.sum_of_terms(t) for t in diagonal], pairs,
                                [shared.sum_of_terms(t) for t in outputs])
        if looped is not None and _stages_size(looped) < _stages_size(straight):
            self._module_state = kept
            self.shared = True
            return looped
        return straight

    @property
    def _module_state(self) -> tuple:
        """What a lowering leaves that the generated module's calls read (its input features, row
        symbols and pair slots): kept while another lowering is tried, and put back if the
        first one's module is the one kept."""
        return self.features, self.row_symbols, self._pair_slots

    @_module_state.setter
    def _module_state(self, state: tuple) -> None:
        self.features, self.row_symbols, self._pair_slots = state

    def _forget_lowering(self) -> None:
        """Drop the lowering's per-call memos once the source is written: nothing reads them
        after, and they kept alive one in seven of the objects a derivation leaves (2-D 8x8
        depth 2: 0.22 of 1.64 million tracked objects), each of which every later full
        collection of the cyclic garbage collector walks (about 1.2 s at 8x8)."""
        for name in _LOWERING_MEMOS:
            self.__dict__.pop(name, None)

    # -- construction helpers -----------------------------------------------------------
    def _lowered(self, order, diagonal, outputs, lower) -> tuple:
        """(rows, diagonal, pairs, outputs) lowered by ``lower`` onto fresh input features
        (``self.features``): row and pair quantities as (symbol, expression), with the
        arguments ``lower`` made values of their own (``_argument``) before their first use;
        the diagonal and the outputs term sums (``shared.add_terms``)."""
        self.features = Features(self.engine.graph, self._inputs0)
        self._argument_count = 0
        rows, diagonal = self._lower_stage([(q.symbol, q.definition) for q in order if not q.pair], diagonal, lower)
        pairs, outputs = self._lower_stage([(q.symbol, q.definition) for q in order if q.pair], outputs, lower)
        self.row_symbols = [s for s, _ in rows]
        return rows, diagonal, pairs, outputs

    def _lower_stage(self, assignments, results, lower) -> tuple[list, list]:
        """One stage's (assignments, results) lowered by ``lower`` and then featurized (input-
        dependent coefficients as features), each argument it names (``_argument``) assigned
        before the expression that first reads it; results are term sums, lowered term by
        term (``shared.map_terms``, ``Features.featurize_terms``)."""
        self._arguments: dict = {}   # expression -> its CallArgumentSymbol, within one stage
        self._calls: dict = {}       # expectation -> its call (_expectation_call), within one stage
        self._lower_memo: dict = {}  # subexpression -> lowered (_lower_expectation_calls), within one stage
        self._calls_at: dict = {}    # (E1/E2, function, arguments) -> its call (_expectation_call_at), within one stage
        self._linear_arguments: dict = {}  # (constant, coefficients) -> argument (_linear_argument), within one stage
        self._form_arguments: dict = {}  # (form, the slots' values it reads) -> argument (_form_argument), within one stage
        self._linear_terms: dict = {}  # (number, is a float) or (variable, coefficient, is a float) -> its term (_linear_term)
        self._pending: list = []
        out = []
        for s, e in assignments:
            memory.tick()
            value = self.features.featurize(lower(e))
            out.extend(self._pending)
            self._pending.clear()
            out.append((s, value))
        results = [self.features.featurize_terms(shared.map_terms(shared.map_terms(terms, lower), self._sums_named))
                   for terms in results]
        out.extend(self._pending)
        self._pending.clear()
        return out, results

    def _sums_named(self, term: sp.Expr) -> sp.Expr:
        """An output's term with each factor that is a sum of expectations or quantities made
        a value of its own (``_named``; the term is lowered, so no expectation is left in
        it): a convolution's NTK term E[dy dy'] * sum over the window's taps of E[x x']
        (ntk.py) then has one structure whatever the window's size (the sums, one per size,
        are grouped as the covariances of windows are)."""
        if not term.is_Mul:
            return term
        factors = [self._named(f) if f.is_Add and _reads_values(f) else f for f in term.args]
        return term if all(a is b for a, b in zip(factors, term.args)) else shared.mul(*factors)

    def _lower_expectation_calls(self, expr: sp.Expr) -> sp.Expr:
        """Templates written out down to their expectations (E1/E2), each expectation a call of
        the template of its function alone at symbols (``_expectation_call``).  An
        expectation is then one structure wherever its window is: in a CNN, E[relu(h_i)
        relu(h_j')] at a boundary reads a covariance summed over fewer taps, which is an
        argument computed by a loop of its own, and the expectations of all pairs of
        positions are one group."""
        return shared.rewrite(expr, self._lowered_expectation, self._lower_memo)

    def _lowered_expectation(self, x: sp.Basic):
        """``_lower_expectation_calls``' replacement of x (``shared.rewrite``): an engine call
        lowered, an expectation outside the engine's calls (with any call in it written out
        first) as a call of its function; None for anything else."""
        if isinstance(x, TemplateCall):
            return self._lowered_call(x)
        if isinstance(x, (E1, E2)):
            return self._expectation_call(self.engine.instantiate(x) if x.has(TemplateCall) else x)
        return None

    def _lowered_call(self, call: sp.Expr) -> sp.Expr:
        """An engine's TemplateCall instantiated (``engine.instantiate``) with each
        expectation a call of its function (``_expectation_call``); from the template's
        recipe (``_call_from_recipe``) when it has one and the call's arguments are linear.
        Once per distinct call and stage (the memo of ``_lower_expectation_calls``' rewrite:
        the NNGP and the NTK read the same calls)."""
        recipe = self._recipe(int(call.args[0]))
        lowered = None if recipe is None else self._call_from_recipe(recipe, call.args[1:])
        if lowered is None:
            value = self.engine.instantiate(call)
            rep = {c: self._expectation_call(c) for c in symbols.outermost(value, (E1, E2))}
            lowered = value.xreplace(rep) if rep else value
        return lowered

    def _recipe(self, index: int):
        """Template ``index`` written out (nested calls too) as a ``_Recipe``, or None when it
        has more than one expectation (the instantiated value orders them, and so numbers
        their arguments, by the values it is instantiated at) or an argument of its
        expectation is not a linear combination of its slots with numeric coefficients (a
        runtime parameter, an expectation inside).  Memoised."""
        if index in self._recipes:
            return self._recipes[index]
        template = self.engine.templates_found[index]
        value = self.engine.instantiate(template.value)
        position = {s: k for k, s in enumerate(template.slots)}
        calls = symbols.outermost(value, (E1, E2))
        recipe = None
        if not calls:
            recipe = _Recipe(value, None, None, [(s, k) for s, k in position.items() if s in value.free_symbols], [])
        elif len(calls) == 1:
            (call,) = calls
            forms = [_linear(a, position.get) for a in call.args[1:]]
            if all(f is not None for f in forms):
                hole = sp.Dummy("e0")
                body = value.xreplace({call: hole})
                recipe = _Recipe(body, hole, (type(call), call.args[0], forms),
                                 [(s, k) for s, k in position.items() if s in body.free_symbols],
                                 sorted({k for _, coefficients in forms for k, _ in coefficients}),
                                 _product_parts(body, hole, position))
        self._recipes[index] = recipe
        return recipe

    def _call_from_recipe(self, recipe: "_Recipe", args: tuple):
        """The lowered value of a call of the recipe's template at ``args``: the expectation's
        arguments are combined from the call's arguments as {symbol: coefficient} maps
        (``_linear``), with Python numbers that compute as sympy's do (``_exact``), so no
        sympy expression is built for an argument the stage has already met.  None, before
        any argument is made (one made would stay, read by nothing), if an argument the
        expectation reads is not linear or is a sum."""
        values = [self._linear_value(a) for a in args]
        if any(values[k] is None or args[k].is_Add for k in recipe.reads):
            # (a sum's terms are added by sympy after the others, in an order _combined
            # does not follow: floats could differ in the last bit)
            return None
        body, loose = recipe.body, {s: args[k] for s, k in recipe.loose}
        kept = recipe.hole is not None
        if kept and loose and (body.is_Add or any(v.is_Number and v.is_zero for v in loose.values())):
            # the slots' values can cancel the expectation (a zero covariance): it gets its
            # arguments only if it is left, as when the template's value is instantiated
            body, loose = shared.substitute(body, loose, {}), {}
            kept = recipe.hole in body.free_symbols
        rep = {}
        if kept:
            cls, function, forms = recipe.expectation
            arguments = tuple(self._form_argument(form, args, values) for form in forms)
            rep[recipe.hole] = self._expectation_call_at(cls, function, arguments)
        if recipe.product is not None and body is recipe.body:
            built = _product_at(recipe.product, rep, args)
            if built is not None:
                return built
        rep.update(loose)
        return shared.substitute(body, rep, {})

    def _linear_value(self, a: sp.Expr):
        """``_linear`` of an engine call's argument, memoised (the calls of neighbouring pairs
        of positions share their arguments)."""
        value = self._linear_values.get(a, shared.UNSEEN)
        if value is shared.UNSEEN:
            value = self._linear_values[a] = _linear(a, self._linear_variable)
        return value

    def _linear_variable(self, x: sp.Expr):
        """x itself if an engine call's argument may be linear in it (a symbol, an input-layer
        covariance), else None (``_linear``)."""
        return x if x.is_Symbol or isinstance(x, ops.InputCov) else None

    def _form_argument(self, form: tuple, args: tuple, values: list) -> sp.Expr:
        """``_linear_argument`` of a recipe's argument ``form`` at the call's ``args`` (their
        ``values``), memoised by the form and the arguments it reads: the variances of a
        window, read by the calls of every pair of positions with that window, are combined
        once."""
        key = (id(form), tuple([args[k] for k, _ in form[1]]))  # (forms live in the memoised recipes)
        found = self._form_arguments.get(key)
        if found is None:
            found = self._form_arguments[key] = self._linear_argument(*_combined(form, values))
        return found

    def _linear_argument(self, constant, coefficients: tuple) -> sp.Expr:
        """``_argument`` of constant + sum coefficient * variable (``_combined``), memoised by
        these numbers; the expression is built once per distinct argument, as sympy builds it
        when the template's value is instantiated (so ``_argument`` gives it the same symbol
        it would have given that expression)."""
        key = (constant, coefficients)
        symbol = self._linear_arguments.get(key)
        if symbol is None:
            terms = [self._linear_term(term) for term in coefficients]
            symbol = self._linear_arguments[key] = self._named(shared.total([self._linear_term(constant), *terms]))
        return symbol

    def _linear_term(self, term: tuple) -> sp.Expr:
        """A term of ``_linear_argument``'s sum: a number (constant, is a float) or
        coefficient * variable (variable, coefficient, is a float), memoised within a stage:
        a quantity is a tap of the windows of up to nine neighbouring positions, each of which
        would build the same product again.  Keyed with the float flag: a Fraction and a float
        of one value are equal keys of a dict but two sympy numbers."""
        found = self._linear_terms.get(term)
        if found is None:
            if len(term) == 2:
                found = _sympy_number(term[0])
            else:
                found = shared.product(_sympy_number(term[1]), [term[0]])
            self._linear_terms[term] = found
        return found

    def _expectation_call_at(self, cls, function: sp.Integer, arguments: tuple) -> sp.Expr:
        """The expectation cls(function, *arguments), its arguments made symbols or numbers
        (``_argument``), as a TemplateCall of the template of its function
        (``engine.expectation_template``), or written out if the arguments are all numbers;
        memoised within a stage."""
        key = (cls, function, arguments)
        memo = self._calls_at.get(key)
        if memo is None:
            if all(a.is_number for a in arguments):
                memo = self._inline_expectations(cls(function, *arguments))
            else:
                index, order = self.engine.expectation_template(cls, function, len(arguments))
                memo = TemplateCall(sp.Integer(index), *[arguments[k] for k in order])
            self._calls_at[key] = memo
        return memo

    def _expectation_call(self, call: sp.Expr) -> sp.Expr:
        """TemplateCall of the template of ``call``'s function (engine.expectation_template)
        at its arguments made symbols (``_argument``); a number if they are all numbers.
        Memoised within a stage."""
        memo = self._calls.get(call)
        if memo is None:
            memo = self._calls[call] = self._new_expectation_call(call)
        return memo

    def _new_expectation_call(self, call: sp.Expr) -> sp.Expr:
        return self._expectation_call_at(call.func, call.args[0], tuple(self._argument(a) for a in call.args[1:]))

    def _argument(self, a: sp.Expr) -> sp.Expr:
        """``a`` if it is a number, a symbol or an input-layer covariance (a Gram entry once
        featurized), else the feature it featurizes to, else a CallArgumentSymbol assigned its
        lowered value, one per distinct expression of the stage (``_lower_stage``)."""
        inner = symbols.outermost(a, (E1, E2))
        if inner:
            a = a.xreplace({c: self._expectation_call(c) for c in inner})
        return self._named(a)

    def _named(self, a: sp.Expr) -> sp.Expr:
        """``_argument`` of an expression without expectations in it."""
        if a.is_number or a.is_Symbol or isinstance(a, ops.InputCov):
            return a
        symbol = self._arguments.get(a)
        if symbol is None:
            value = self.features.featurize(a)
            if value.is_Symbol:  # a feature (a window's input covariance): read where it is
                symbol = self._arguments[a] = value
            else:
                symbol = self._arguments[a] = symbols.call_argument(self._argument_count)
                self._argument_count += 1
                self._pending.append((symbol, value))
        return symbol

    def _lower_instances(self, expr: sp.Expr) -> sp.Expr:
        """Every expectation written out (templates instantiated, closed forms inlined): the
        straight-line code's expressions."""
        return self._inline_expectations(self.engine.instantiate(expr))

    def _lower_calls(self, expr: sp.Expr) -> sp.Expr:
        """The engine's TemplateCalls kept (``_template_body`` writes each template out once,
        in the generated loops; the stage featurizes their arguments), closed forms inlined; a
        call whose arguments are all numbers is written out (a number)."""
        numeric = {c: self.engine.instantiate(c) for c in expr.atoms(TemplateCall) if all(a.is_number for a in c.args)}
        return self._inline_expectations(expr.xreplace(numeric) if numeric else expr)

    def _template_body(self, index: int) -> sp.Expr:
        """Template ``index``'s value lowered (closed forms inlined, nested calls written
        out, input-dependent coefficients as features), an expression of its slots."""
        if index not in self._bodies:
            value = self.engine.templates_found[index].value
            self._bodies[index] = self.features.featurize(self._inline_expectations(self._write_calls(value)))
        return self._bodies[index]

    def _named_stages(self, lowered: tuple) -> tuple:
        """(rows, diagonal, pairs, outputs) with ``_calls_named`` applied to each stage."""
        rows, diagonal, pairs, outputs = lowered
        return (*self._calls_named(rows, diagonal), *self._calls_named(pairs, outputs))

    def _calls_named(self, assignments, outputs) -> tuple[list, list]:
        """(assignments, outputs) of one stage with every TemplateCall a value of its own,
        assigned before its first use (a quantity that is a call is that call's assignment),
        when some quantity of the stage reads a call (``_reads_calls``; it still does after
        this, so ``_plans`` can tell a named stage).  Calls at the same arguments are then
        assignments of one level reading the same symbols, which ``shared.plan`` computes as
        one bundle, whose common subexpressions the printed code computes once: a layer's
        E[relu relu] (a quantity) and E[relu' relu'] (an NTK term's factor) at one pair of
        positions share their arccos, and the NNGP's and the NTK's window sums their loads.
        Without such quantities (a depth-1 net) the calls of one pair of positions are all
        in one output bundle, which shares them anyway, and naming them would only add
        assignments."""
        if not _reads_calls(assignments):
            return list(assignments), list(outputs)
        named: dict = {}    # call -> the symbol of its value
        placed: list = []   # the calls named while rewriting one expression, in order

        def name(x):
            if not isinstance(x, TemplateCall):
                return None
            symbol = named.get(x)
            if symbol is None:
                symbol = named[x] = symbols.call_argument(self._argument_count)
                self._argument_count += 1
                placed.append((symbol, x))
            return symbol

        memo: dict = {}  # shared.rewrite's: the terms of one pair of positions share their calls
        out = []
        for q, e in assignments:
            memory.tick()
            if isinstance(e, TemplateCall) and e not in named:
                named[e] = q  # (its arguments are symbols and numbers: _argument)
                out.append((q, e))
                continue
            e = shared.rewrite_calls(e, name, memo)
            out.extend(placed)
            placed.clear()
            out.append((q, e))
        outputs = [shared.map_terms(terms, lambda t: shared.rewrite_calls(t, name, memo)) for terms in outputs]
        out.extend(placed)
        return out, outputs

    def _write_calls(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with each TemplateCall replaced by its lowered template body at its
        arguments."""
        calls = expr.atoms(TemplateCall)
        if not calls:
            return expr
        rep = {}
        for c in calls:
            index = int(c.args[0])
            rep[c] = self._template_body(index).xreplace(dict(zip(self.engine.templates_found[index].slots, c.args[1:])))
        return expr.xreplace(rep)

    def _inline_expectations(self, expr: sp.Expr) -> sp.Expr:
        rep = {}
        for call in expr.atoms(E1, E2):
            idx = int(call.args[0])
            obj = self.expectations[idx]
            args = [self._inline_expectations(a) for a in call.args[1:]]
            if obj.expression is not None:
                if isinstance(call, E2):
                    rep[call] = expectations.fusable(obj.at(*args))
                else:
                    rep[call] = obj.at(*args)
            else:
                rep[call] = sp.Function(f"_e{idx}")(*args)
        return expr.xreplace(rep)

    def _source(self, rows, diagonal, pairs, outputs) -> str:
        """Module source: the row stage (row quantities, then its part of the kernels'
        diagonal) and the pair stage (pair quantities, then the kernels), each one fused
        straight-line body."""
        n_row = len(self.features.row)
        loads0 = {symbols.row_feature(k): f"RF1[i, {k}]" for k in range(n_row)}
        loads1 = {symbols.row_feature(k, second=True): f"RF2T[{k}, j]" for k in range(n_row)}
        loads_q0 = {s: f"R1[i, {k}]" for k, s in enumerate(self.row_symbols)}
        loads_q1 = {symbols.primed(s): f"R2T[{k}, j]" for k, s in enumerate(self.row_symbols)}
        n_g = len(self.features.bases)
        loads_g = {symbols.gram(m): f"G{m}[i, j]" for m in range(n_g)}
        loads_p = {node_symbol(k): f"P[{m}]" for m, k in enumerate(self.runtime)}
        grams = "".join(f"G{m}, " for m in range(n_g))
        n_out = len(self.kernels)
        outs = ", ".join(f"out{k}" for k in range(n_out))
        header = self._header([e for _, e in rows + pairs] + diagonal + outputs)
        row_lines, row_outs = print_body([s for s, _ in rows] + diagonal, {**loads0, **loads_p}, "        ", rows)
        pair_lines, pair_outs = print_body(outputs, {**loads0, **loads1, **loads_q0, **loads_q1, **loads_g, **loads_p},
                                           "                ", pairs)
        src = header + f"""

@njit(cache=True, nogil=True, error_model="numpy")
def row_stage(t0, stride, RF1, R, P):
    # rows t0, t0 + stride, ... (one call per thread, see _in_threads; not named step, the
    # custom function a printed expression may call)
    for i in range(t0, RF1.shape[0], stride):
{chr(10).join(row_lines) if row_lines else '        pass'}
{chr(10).join(f'        R[i, {k}] = {e}' for k, e in enumerate(row_outs))}


@njit(cache=True, nogil=True, error_model="numpy")
def pair_stage(t0, stride, {grams}RF1, RF2T, R1, R2T, {outs}, symmetric, P):
    # For the loop over j to vectorise: second-input rows are transposed (feature, j) so they
    # are read contiguously, every Gram and output is its own 2-D array, and error_model
    # numpy drops division checks.  Rows t0, t0 + stride, ... of the loop (one call per thread,
    # see _in_threads); symmetric: rows t and N-1-t together, so every thread gets equal work.
    N = RF1.shape[0]
    M = RF2T.shape[1]
    half = (N + 1) // 2 if symmetric else N
    reps = 2 if symmetric else 1
    for t in range(t0, half, stride):
        for r in range(reps):
            i = t + r * (N - 1 - 2 * t)
            if r == 1 and i == t:
                continue
            start = i if symmetric else 0
            for j in range(start, M):
{chr(10).join(pair_lines)}
{chr(10).join(f'                out{k}[i, j] = {e} if symmetric and j == i else {e} + {pair_outs[n_out + k]}'
              for k, e in enumerate(pair_outs[:n_out]))}
"""
        return src

    def _row_kinds(self) -> dict:
        """{symbol: (kind, index)} of what the row stage reads (shared.plan)."""
        return {symbols.row_feature(k): ("RF1", k) for k in range(len(self.features.row))}

    def _pair_kinds(self) -> dict:
        """{symbol: (kind, index)} of what the pair stage reads (shared.plan)."""
        kinds = {symbols.row_feature(k): ("RF1", k) for k in range(len(self.features.row))}
        kinds.update({symbols.row_feature(k, second=True): ("RF2T", k) for k in range(len(self.features.row))})
        kinds.update({s: ("R1", k) for k, s in enumerate(self.row_symbols)})
        kinds.update({symbols.primed(s): ("R2T", k) for k, s in enumerate(self.row_symbols)})
        kinds.update({symbols.gram(m): ("GS", m) for m in range(len(self.features.bases))})
        return kinds

    def _plans(self, rows, diagonal, pairs, outputs) -> tuple:
        """The row stage and the pair stage as groups of one template each (shared.plan)."""
        row_kinds = self._row_kinds()
        # repeated calls (of a depth-1 net, whose calls _calls_named leaves in its terms: a
        # window's E[relu relu] read by the diagonal's terms of every pair of positions whose
        # windows hold it) become quantities of their own, computed once per row or pair;
        # the row stage's are row quantities, named as call arguments
        # (numbered after the stages' own) since the pair stage reads their primed copies.
        # A stage whose calls _calls_named named (its assignments read calls) has none to lift.
        if not _reads_calls(rows):
            rows, diagonal = shared.lift_repeated_calls(rows, diagonal, row_kinds,
                                                        lambda k: symbols.call_argument(self._argument_count + k))
        self.row_symbols = [s for s, _ in rows]
        pair_kinds = self._pair_kinds()
        if not _reads_calls(pairs):
            pairs, outputs = shared.lift_repeated_calls(pairs, outputs, pair_kinds)
        self._pair_slots = len(pairs)
        rows, diagonal, row_aliases = shared.alias_repeated_arguments(rows, diagonal, TemplateCall, row_kinds)
        pairs, outputs, pair_aliases = shared.alias_repeated_arguments(pairs, outputs, TemplateCall, pair_kinds)
        return (shared.plan(rows, diagonal, row_kinds, "R", row_aliases),
                shared.plan(pairs, outputs, pair_kinds, "Q", pair_aliases, blocks=len(PARTS)))

    def _shared_source(self, rows, diagonal, pairs, outputs, plans=None) -> str:
        """Module source with loops over groups (shared.py): the row stage (row quantities,
        then its part of the kernels' diagonal) and the pair stage (pair quantities into a
        per-thread array Q, then the kernels), one loop per group of expressions of one
        template.  The stages run on threads as the straight-line ones do (module docstring)."""
        loads_p = {node_symbol(k): f"P[{m}]" for m, k in enumerate(self.runtime)}
        (row_groups, row_constants, _), (pair_groups, pair_constants, _) = plans or self._plans(rows, diagonal, pairs, outputs)
        for group in row_groups + pair_groups:
            group.template = self._write_calls(group.template)
        row_formats = {"RF1": "RF1[i, {}]", "R": "R[i, {}]"}
        pair_formats = {"RF1": "RF1[i, {}]", "RF2T": "RF2T[{}, j]", "R1": "R1[i, {}]", "R2T": "R2T[{}, j]",
                        "GS": "GS[{}, i, j]", "Q": "Q[{}, jj]"}
        tables = _Tables()
        row_loads = _fixed_loads(self._row_kinds(), row_formats, loads_p)
        pair_loads = _fixed_loads(self._pair_kinds(), pair_formats, loads_p)
        row_body = _group_loops(row_groups, row_formats, row_loads, "        ", "R[i, {}]", "_acc{}", tables)
        pair_body = _group_loops(pair_groups, pair_formats, pair_loads, "                ", "Q[{}, jj]",
                                 "ACC[{}, jj]", tables, inner="for j in range(jb, je):", inner_setup="jj = j - jb")
        n_rows = len(self.row_symbols)  # (with the calls _plans lifted)
        n = len(self.kernels)  # ACC[k]: kernel k's first part, ACC[n + k] its second (PARTS)
        row_outs = "\n".join(f"        R[i, {n_rows + k}] = _acc{k}" for k in range(n))
        row_init = "\n".join(f"        _acc{k} = {c!r}" for k, c in enumerate(row_constants))
        pair_init = "\n".join(f"                    ACC[{k}, j - jb] = {c!r}" for k, c in enumerate(pair_constants))
        pair_outs = "\n".join(f"                    out{k}[i, j] = ACC[{k}, j - jb] + ACC[{n + k}, j - jb]"
                               for k in range(n))
        diagonal_parts = "\n".join(f"                    out{k}[i, i] = ACC[{k}, 0]" for k in range(n))
        outs = ", ".join(f"out{k}" for k in range(n))
        # the custom functions the printed code calls: those of the groups' templates
        header = self._header([group.template for group in row_groups + pair_groups])
        return header + "\n" + tables.source() + f"""

@njit(cache=True, nogil=True, error_model="numpy")
def row_stage(t0, stride, RF1, R, P, IT, WT):
    # rows t0, t0 + stride, ... (one call per thread, see _in_threads)
    for i in range(t0, RF1.shape[0], stride):
{row_body[0]}
{row_init}
{row_body[1]}
{row_outs}


@njit(cache=True, nogil=True, error_model="numpy")
def pair_stage(t0, stride, GS, RF1, RF2T, R1, R2T, {outs}, symmetric, P, IT, WT):
    # GS: the Grams stacked (number, i, j); Q: the pair quantities of pairs (i, jb..je-1).
    # Rows t0, t0 + stride, ... of the loop (one call per thread, see _in_threads); symmetric:
    # rows t and N-1-t together, so every thread gets equal work.  Each group is one loop
    # over its members around a loop over a block of j (contiguous reads: it vectorises)
    N = RF1.shape[0]
    M = RF2T.shape[1]
    half = (N + 1) // 2 if symmetric else N
    reps = 2 if symmetric else 1
    Q = np.empty(({max(self._pair_slots, 1)}, {_J_BLOCK}))
    ACC = np.empty(({len(pair_constants)}, {_J_BLOCK}))
    for t in range(t0, half, stride):
        for r in range(reps):
            i = t + r * (N - 1 - 2 * t)
            if r == 1 and i == t:
                continue
            start = i if symmetric else 0
            for jb in range(start, M, {_J_BLOCK}):
                je = min(M, jb + {_J_BLOCK})
                for j in range(jb, je):
{pair_init}
{pair_body[0]}
{pair_body[1]}
                for j in range(jb, je):
{pair_outs}
                if symmetric and jb == start:  # (i, i): the first part; block() adds the row stage's
{diagonal_parts}
"""

    def _header(self, printed) -> str:
        """Module source before the stages: imports, quadrature functions, the custom functions
        the ``printed`` expressions call."""
        quad = [i for i, obj in self.expectations.built() if obj.expression is None]
        header = [
            "import math",
            "import numpy as np",
            "import sympy as _sp",
            "from numba import njit",
            "from tpcompiler import expectations as _ex",
            "from tpcompiler.ir.nonlinearities import SYMPY_NAMESPACE as _NS",
            f"_T = _sp.Symbol({_PRINTED_ARG.name!r}, real=True)",
        ]
        for i in quad:
            obj = self.expectations[i]
            lams = [obj.phi] + ([obj.psi] if isinstance(obj, expectations.PairExpectation) else [])
            # printed as Lambda(t, expression) with a plain bound symbol, re-read with sympify
            # (the srepr of Lambda(t, t), sympy's IdentityFunction, does not read back)
            exprs = [lam.expr.xreplace({lam.variables[0]: _PRINTED_ARG}) for lam in lams]
            args = ", ".join(f"_sp.Lambda(_T, _sp.sympify({sp.srepr(e)!r}, locals=_NS))" for e in exprs)
            build = "pair_expectation" if len(lams) == 2 else "expectation"
            # naming the callee's module keeps this module's numba cache from outliving it
            header.append(f"_e{i} = _ex.{build}({args}, rtol={self.rtol!r}).scalar  # {obj.scalar.py_func.__module__}")
        # (closed forms are inlined when printed: the custom functions they call, such as step
        # in E[step(u)] = step(k)/2, are defined too)
        closed = [obj.expression for _, obj in self.expectations.built() if obj.expression is not None]
        return "\n".join(header) + "\n" + custom_functions_source(list(printed) + closed)

    # -- evaluation -----------------------------------------------------------------------
    def _check(self, X, what):
        if not isinstance(X, np.ndarray) or X.dtype != np.float64:
            # (complex data: refused, as c.kernels does, not cast with the imaginary part dropped)
            X = validation.array(X, what, finite=False, max_abs=None)
        if X.ndim != 2:
            raise ProgramError(f"{what}: inputs must be an N x d array, got shape {X.shape}")
        if X.shape[0] == 0:
            raise ProgramError(f"{what}: the input set is empty")
        if X.shape[1] != self.d:
            raise ProgramError(f"{what}: program {self.graph.name!r} takes inputs of dimension d = {self.d}, got {X.shape[1]}")
        if not np.all(np.isfinite(X)):
            raise ProgramError(f"{what}: inputs contain NaN or infinite values")
        validation.tiny_row(X, what)
        return np.ascontiguousarray(X)

    def check_inputs(self, X, X2=None, names: tuple = ("X", "X2")):
        """X and X2 (or None) as C-contiguous float64 N x d arrays of finite numbers; ``names``:
        theirs in messages (the caller's arguments)."""
        return self._check(X, names[0]), None if X2 is None else self._check(X2, names[1])

    def parameter_values(self, params=None) -> np.ndarray:
        """The runtime Params' values as the generated code takes them: ``params`` a
        {key: value} dict (missing keys: the program's values), None for the program's."""
        if params is None:
            return self.runtime_defaults
        unknown = sorted(set(params) - set(self.runtime))
        if unknown:
            raise ProgramError(f"kernels: {unknown[0]!r} is not a runtime parameter of this compiled kernel "
                               f"(runtime parameters: {', '.join(self.runtime) or 'none'})")
        values = np.array([float(params.get(k, d)) for k, d in zip(self.runtime, self.runtime_defaults)], dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ProgramError(f"kernels: runtime parameter values must be finite, got {dict(zip(self.runtime, values))}")
        return values

    def rows(self, X, params=None) -> tuple[np.ndarray, np.ndarray]:
        """Row features and the row stage's quantities (then the part of the kernels' diagonal
        the row stage computes, ``PARTS``) of X (``params``: runtime parameter values,
        ``parameter_values``)."""
        RF = self.features.row_values(X)
        R = np.empty((X.shape[0], len(self.row_symbols) + len(self.kernels)))
        _in_threads(self.module.row_stage, X.shape[0], RF, R, self.parameter_values(params), *self._tables())
        return RF, R

    def _tables(self) -> tuple:
        """The index and weight tables the looped stages read (none in straight-line code)."""
        return self.module.TABLES if self.shared else ()

    def block(self, A, rows_A, B, rows_B, same: bool, timing: dict | None = None, params=None) -> list[np.ndarray]:
        """The kernels (``self.kernels``: [nngp, ntk] by default) of the rows A (first input)
        against the rows B (second input): the Grams of (A, B), then the pair stage; ``rows_*``
        are ``rows()`` of A and B.  ``same``: B is A, and only the upper triangle is computed,
        mirrored, the row stage's part of the diagonal added (``PARTS``).  ``timing``
        accumulates the seconds of the Gram and pair stages."""
        timing = {} if timing is None else timing
        # Grams (BLAS) before any Numba stage: each runtime's idle threads spin for a while
        # after a call and slow down the other's next one.
        t0 = time.perf_counter()
        with _one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):  # see check_finite
            G = self.features.pair_values(A, None if same else B, stacked=self.shared)
        t1 = time.perf_counter()
        (RFa, Ra), (RFb, Rb) = rows_A, rows_B
        outs = [np.empty((A.shape[0], B.shape[0])) for _ in self.kernels]
        args = (RFa, np.ascontiguousarray(RFb.T), Ra, np.ascontiguousarray(Rb.T), *outs, same, self.parameter_values(params))
        grams = (G,) if self.shared else tuple(G)  # (stacked for the loops; one argument each in straight-line code)
        _in_threads(self.module.pair_stage, (A.shape[0] + 1) // 2 if same else A.shape[0], *grams, *args,
                    *self._tables())
        if same:  # the diagonal: the pair stage's first part plus the row stage's second (PARTS)
            for k, out in enumerate(outs):
                mirror(out, np.ascontiguousarray(Ra[:, len(self.row_symbols) + k]))
        self._duplicates_as_the_diagonal(A, rows_A, B, same, outs, params)
        timing["grams"] = timing.get("grams", 0.0) + t1 - t0
        timing["pairs"] = timing.get("pairs", 0.0) + time.perf_counter() - t1
        return outs

    def _duplicates_as_the_diagonal(self, A, rows_A, B, same: bool, outs, params) -> None:
        """k(x, x') for an x' equal to x (a repeated input, or a test point that is a training
        point) set to k(x, x) as the diagonal computes it.  The pair formulas at rho = 1 carry
        the rounding of their arguments, which the arc-cosine kernels amplify like a square root
        (an off-diagonal quadrature's 2e-13 became 5.6e-4 after Abs, Sign, Sign: layers audit);
        the diagonal is computed from one input, exactly, as neural-tangents does."""
        pairs = equal_rows(A, B, same)
        if not pairs:
            return
        RFa, Ra = rows_A
        diagonal: dict = {}
        for i, j in pairs:
            if i not in diagonal:
                if same:
                    diagonal[i] = [out[i, i] for out in outs]
                else:
                    one = (RFa[i:i + 1], Ra[i:i + 1])
                    diagonal[i] = [out[0, 0] for out in self.block(A[i:i + 1], one, A[i:i + 1], one, True, None, params)]
            for out, value in zip(outs, diagonal[i]):
                out[i, j] = value
                if same:
                    out[j, i] = value

    def __call__(self, X, X2=None, params=None) -> dict[str, np.ndarray]:
        """{"nngp", "ntk"}: k(X, X); with X2 also {"nngp_x2", "ntk_x2"}: k(X2, X) (of these, the
        kernels asked for, ``self.kernels``).
        ``params``: {runtime Param key: value} (default: the values the program was built with)."""
        X, X2 = self.check_inputs(X, X2)
        params = self.parameter_values(params)
        # the first call JIT-compiles the generated module (seconds): say so on a terminal
        with progress.status("kernels: compiling the generated Numba code and running",
                             enabled=False if self.module.pair_stage.signatures else None):
            return self._call(X, X2, params)

    def _call(self, X, X2, params):
        self._check_memory(X.shape[0], 0 if X2 is None else X2.shape[0])
        timing = {}
        t0 = time.perf_counter()
        params = dict(zip(self.runtime, params))
        rows1 = self.rows(X, params)
        timing["rows"] = time.perf_counter() - t0
        result = dict(zip(self.kernels, self.block(X, rows1, X, rows1, True, timing, params)))
        if X2 is not None:
            outs2 = self.block(X2, self.rows(X2, params), X, rows1, False, timing, params)
            result.update({f"{name}_x2": out for name, out in zip(self.kernels, outs2)})
        self.check_finite(result, (X, X2))
        self.last_timing = timing
        return result

    def _check_memory(self, N: int, N2: int) -> None:
        """Refuse a call whose Gram matrices (one N x N, then N2 x N, per base Gram of the input
        features: a CNN has one per pair of positions) and kernels need more memory than the
        machine has available (``memory.available_bytes``), saying what to do instead: the
        tiled path (``tiled.kernels``), which bounds the memory of a call."""
        available = memory.available_bytes()
        bases = len(self.features.bases)
        need = 8 * (bases * N * max(N, N2) + len(self.kernels) * N * (N + N2))
        if available is not None and need > available:
            raise memory.OutOfMemory(
                f"kernels of program {self.graph.name!r}: a call on {N} inputs{f' and {N2} more' if N2 else ''} "
                f"needs {memory.size_text(need)} ({bases} base Gram matrices of {N} x {max(N, N2)} and the "
                f"kernels), more than the {memory.size_text(available)} available; compute the kernels in tiles "
                f"of bounded memory: tp.compile(program).kernels(X, memory='4GB'), or tpc kernels --memory 4GB")

    def check_finite(self, result, inputs):
        """Refuse kernels that overflowed (never return inf or NaN for finite inputs)."""
        bad = [name for name, K in result.items() if not np.isfinite(K).all()]
        if not bad:
            return
        norms = [float(np.max(np.abs(A))) for A in inputs if A is not None]
        first = result[bad[0]]
        i, j = (int(k) for k in np.argwhere(~np.isfinite(first))[0])
        raise ProgramError(
            f"kernels: {', '.join(bad)} are not finite for these inputs ({bad[0]}[{i}, {j}] is {first[i, j]}; "
            f"largest input entry {max(norms):.3g}): a variance of the network left the float64 range, above "
            f"~1e154 (large inputs or sigmas: rescale, e.g. divide the inputs by their largest norm) or nonzero "
            f"below ~1e-145 (tiny inputs or sigmas: scale them up), where arc-cosine kernels multiply two variances; or a "
            f"function was evaluated where it is undefined (0/0: a LayerNorm with eps=0 of a row whose "
            f"variance is 0)"
        )


def check_kernel_program(graph: Graph) -> None:
    """Refuse, before anything is derived, a program whose kernels this backend cannot define:
    no readout, or not exactly one input (callers that compile first check here: ``tpc kernels``
    on a long RNN without a readout spent 15 s compiling before saying so)."""
    if graph.readout is None:
        raise ProgramError(f"program {graph.name!r} has no readout; kernels need p.readout(x, sigma=..., bias=...)")
    if len(graph.inputs) != 1:
        raise ProgramError(f"program {graph.name!r} has no input; kernels need p.input(name, d)")


def equal_rows(A: np.ndarray, B: np.ndarray, same: bool) -> list[tuple[int, int]]:
    """The pairs (i, j) with A[i] equal to B[j] entry for entry (bit for bit), i < j when
    ``same`` (B is A)."""
    def keys(M):
        return [row.tobytes() for row in np.ascontiguousarray(M, dtype=np.float64)]

    where: dict = {}
    for j, key in enumerate(keys(B)):
        where.setdefault(key, []).append(j)
    return [(i, j) for i, key in enumerate(keys(A)) for j in where.get(key, ()) if not same or j > i]


#: More groups than this in the grouped engine calls: try the calls of expectations too.
_MANY_GROUPS = 100


#: What only the derivation reads (``_become_stored``).
_DERIVATION_ONLY = ("_bodies", "_recipes", "expectations", "_inputs0", "_argument_count", "_pair_slots")
#: KernelFunction's memos that only its derivation reads, one entry per call or argument
#: (``_forget_lowering``; the per-template ones, ``_recipes`` and ``_bodies``, are kept)
_LOWERING_MEMOS = ("_linear_values", "_arguments", "_calls", "_lower_memo", "_calls_at", "_linear_arguments",
                   "_form_arguments", "_linear_terms", "_pending")


#: How the kernels of a program the kernel backend refuses are computed: the last part of every
#: such refusal (one place, so that kernel-regime training, which has no such route, can drop it).
PARTICLES_HINT = "tp.compile(program).limit(x=X) estimates the kernels by particles"


def _no_rule(name: str, gs: tuple, exc: Exception) -> NotPairwise:
    """The error of a function whose expectation rule cannot be built (``ExpectationRules``)."""
    if isinstance(exc, ZeroDivisionError):  # (the quadrature's nodes include 0, where sin(x)/x is 0/0)
        return NotPairwise(f"program {name!r}: the kernel backend cannot compute an expectation: a function divides "
                           "by zero at a quadrature node (a removable singularity such as sin(x)/x at 0 is evaluated "
                           f"there); write the function without the division; {PARTICLES_HINT}")
    # (a function the quadratures cannot take: a kink away from 0, a delta)
    return NotPairwise(f"program {name!r}: the kernel backend cannot compute an expectation: {exc}; {PARTICLES_HINT}")


def cross(call, A: np.ndarray, B: np.ndarray) -> dict[str, np.ndarray]:
    """{name: k(A, B)} (len(A) x len(B)) of each kernel that ``call(X, X2)`` returns (a
    ``KernelFunction``, ``Compiled.kernels``: k(X, X) and k(X2, X) as "<name>_x2").  ``call``
    computes k(X, X) as well, so the smaller of the two sets is its first argument."""
    if len(A) <= len(B):
        out = call(A, B)
        return {k[:-3]: v.T for k, v in out.items() if k.endswith("_x2")}
    out = call(B, A)
    return {k[:-3]: v for k, v in out.items() if k.endswith("_x2")}


def _derivation_key(graph: Graph, rtol: float, runtime: tuple = (), share: bool | None = None,
                    templates: bool = True, parts: dict | None = None, kernels: tuple = KERNELS) -> str | None:
    """The disk-cache key of the derivation of ``graph``'s kernels with these options
    (stored.py; ``parts``: the graph's ``stored.graph_parts``, when the caller has them).  The
    kernels asked for enter it only when they are not both, so keys of both stay as they were."""
    options = {"rtol": float(rtol), "runtime": tuple(runtime), "share": share, "templates": bool(templates)}
    if kernels != KERNELS:
        options["kernels"] = tuple(kernels)
    return stored.derivation_key(graph, options, parts)


def derivation_key(graph: Graph, rtol: float, kernels: tuple = KERNELS) -> str | None:
    """The disk-cache key of the derivation of ``graph``'s ``kernels`` with the default options
    and ``rtol``: the program's identity for tiled.py's Dask workers."""
    return _derivation_key(graph, rtol, kernels=kernels)


def derivation_stored(graph: Graph, rtol: float, parts: dict | None = None, kernels: tuple = KERNELS) -> bool:
    """Whether the disk cache holds the derivation of ``graph``'s ``kernels`` with the default
    options and ``rtol`` (``KernelFunction(graph, rtol=rtol, cache=True, get=kernels)`` would
    read it); ``parts`` as ``_derivation_key`` takes them."""
    return stored.is_stored(_derivation_key(graph, rtol, parts=parts, kernels=kernels))


def _reads_calls(assignments) -> bool:
    """Whether some assignment of a stage reads a TemplateCall (``_calls_named``)."""
    return any(e.has(TemplateCall) for _, e in assignments)


def _reads_values(e: sp.Expr) -> bool:
    """Whether ``e`` reads an expectation (a TemplateCall) or a quantity."""
    atoms = shared.flat_atoms(e)
    if atoms is not None:
        return any(a.is_Symbol and symbols.is_quantity(a) for a in atoms)
    return any(isinstance(x, TemplateCall) or (x.is_Symbol and symbols.is_quantity(x)) for x in sp.preorder_traversal(e))


@dataclass
class _Recipe:
    """A template written out, for lowering its calls without instantiating it
    (``KernelFunction._call_from_recipe``): ``body`` is its value with its expectation (it
    has at most one) replaced by the symbol ``hole``; ``expectation`` that expectation's
    (E1 or E2, function index, arguments), each argument (constant, ((slot position,
    coefficient), ...)); both None for a template without expectation.  ``loose``: the
    (slot, position) pairs the body reads outside the expectation; ``reads``: the slot
    positions its arguments read; ``product``: the body as ``_product_parts``, or None."""

    body: sp.Expr
    hole: sp.Dummy | None
    expectation: tuple | None
    loose: list
    reads: list
    product: tuple | None = None


def _product_parts(body: sp.Expr, hole: sp.Dummy, position: dict):
    """A recipe's body that is a number times its hole and distinct slots, as (number, [hole
    or slot position, ...]) for ``_product_at``; None for any other body."""
    coefficient, rest = body.as_coeff_Mul()
    parts = []
    for f in sp.Mul.make_args(rest):
        if f == hole:
            parts.append(f)
        elif f in position:
            parts.append(position[f])
        elif f != 1:
            return None
    return coefficient, parts


def _product_at(parts: tuple, rep: dict, args: tuple):
    """The body of ``_product_parts`` at the hole's call ``rep`` and the slots' values
    ``args``, built by ``shared.product`` with the numbers multiplied as sympy multiplies
    them (``_exact``): the object the body's substitution gives, without sympy flattening a
    product per call.  None if a number is not one ``_exact`` knows."""
    coefficient, slots = parts
    total = _exact(coefficient)
    factors = []
    for part in slots:
        value = rep[part] if isinstance(part, sp.Basic) else args[part]
        c, rest = value.as_coeff_Mul()
        number = _exact(c)
        if total is None or number is None:
            return None
        total = total * number
        factors.extend(f for f in sp.Mul.make_args(rest) if f != 1)
    return shared.product(_sympy_number(total), factors)


@functools.lru_cache(maxsize=4096)
def _exact(n: sp.Expr):
    """A sympy number as the Python number that computes as sympy computes with it: a
    Fraction for a rational (exact), a float for a double-precision Float (sympy rounds a
    rational to the nearest double before adding it to or multiplying it with a Float, as
    Python does with a Fraction and a float); None for any other number."""
    if n.is_Rational:
        return Fraction(int(n.p), int(n.q))
    if n.is_Float and n._prec == 53:
        return float(n)
    return None


@functools.lru_cache(maxsize=4096, typed=True)  # typed: Fraction(1, 2) and 0.5 are two numbers
def _sympy_number(c) -> sp.Number:
    """The sympy number of an ``_exact`` number (a float stays a Float, 1.0 included, as in
    sympy's arithmetic)."""
    if isinstance(c, Fraction):
        return sp.Rational(c.numerator, c.denominator)
    return sp.Float(c)


def _linear(expr: sp.Expr, variable):
    """expr = constant + sum_k coefficient_k * x_k as (constant, ((variable(x_k),
    coefficient_k), ...)), numbers ``_exact``, terms in expr's order; None if expr is not of
    that form (``variable(x)`` None: x may not be a variable; a number ``_exact`` does not
    know).  An engine call's arguments are memoised by ``_linear_values``."""
    constant, coefficients = Fraction(0), {}
    for term in sp.Add.make_args(expr):
        if term.is_Number:
            number = _exact(term)
            if number is None:
                return None
            constant = constant + number
            continue
        c, rest = term.as_coeff_Mul()
        x, number = variable(rest), _exact(c)
        if x is None or number is None:
            return None
        coefficients[x] = coefficients[x] + number if x in coefficients else number
    return constant, tuple(coefficients.items())


def _combined(form: tuple, values: list) -> tuple:
    """An expectation's argument, ``form`` = (constant, ((slot position, coefficient), ...))
    of the template's slots, at the slots' ``values`` (``_linear``): (constant,
    ((variable, coefficient, is a float), ...)), the numbers combined in the order sympy
    combines them when the template's value is instantiated, and tagged with their type so
    that a Fraction and a float of one value stay two arguments, as a Rational and a Float
    are two expressions."""
    constant, coefficients = form
    total, combined = constant, {}
    for k, c in coefficients:
        value_constant, value_coefficients = values[k]
        if value_constant:
            total = total + c * value_constant
        # a Fraction times a float is float(Fraction) times it (Python's numeric tower),
        # computed here without Fraction's dispatch, which cost more than the rest
        fc = float(c)
        for x, cx in value_coefficients:
            term = fc * cx if cx.__class__ is float else c * cx
            combined[x] = combined[x] + term if x in combined else term
    return ((total, isinstance(total, float)),
            tuple((x, c, isinstance(c, float)) for x, c in combined.items()))


def _groups(plans) -> int:
    """The number of groups (generated loops) of both stages' plans."""
    return sum(len(group_list) for group_list, _, _ in plans)


def _should_share(plans) -> bool:
    """Loops pay off when the stages have many expressions of few structures (a CNN: one per
    pair of positions); small programs (an MLP: one quantity per layer; a CNN on 4
    positions, where boundaries are most of the structures) keep the straight-line code,
    which compiles faster per expression and whose loop over pairs vectorises.  Rule: at
    least 32 quantities and output terms in all, at least 4 per group on average."""
    units, groups, _ = _plan_sizes(plans)
    return units >= 32 and units >= 4 * groups


def _plan_sizes(plans) -> tuple[int, int, int]:
    """(quantities and output terms, groups, structures: distinct (template, kinds, quantity or
    term) at any level) of both stages' plans."""
    units = groups = 0
    structures: set = set()
    for group_list, _, _ in plans:
        units += sum(len(g.index) for g in group_list)
        groups += len(group_list)
        structures.update((g.template, tuple(g.kinds), g.target is None) for g in group_list)
    return units, groups, len(structures)


def _stages_size(source: str) -> int:
    """The characters of a generated module's stages (``row_stage``, ``pair_stage`` and what
    follows; not its tables and helpers): what numba compiles at the first call."""
    return len(source) - source.index("\ndef row_stage(")


def _repeats_structures(plans) -> bool:
    """Whether the groups repeat few structures (template and kinds) at many levels: at least
    32 quantities and output terms, at least 4 per structure.  A deep network's layers do
    (``mlp.py`` relu at depth 50: 301 in 207 groups of 17 structures), and its loops, written
    once per layer sequence (``_folded``), can make smaller stages than the straight-line
    code (``_stages_size``), which ``_derive`` then takes (depth 100: 292 lines against 2,562,
    its first call 2.5 s against 32 s); not always (``resnet.py`` with 10 blocks: 80
    structures, 46,000 characters against 24,000)."""
    units, _, structures = _plan_sizes(plans)
    return units >= 32 and units >= 4 * structures


def _in_threads(stage, rows: int, *args) -> None:
    """stage(t0, step, *args) for t0 = 0..step-1 on ``numba.get_num_threads()`` threads (the
    generated stages release the GIL), or one call when there is one thread or one row."""
    # A stage's first call compiles it, and Numba then makes some 10^5 Python objects: the
    # cyclic collector would walk the derivation's million live ones meanwhile (shared.paused_gc).
    with shared.paused_gc() if not stage.signatures else contextlib.nullcontext():
        step = max(1, min(numba.get_num_threads(), rows))
        if step == 1:
            stage(0, 1, *args)
            return
        threads.run(functools.partial(stage, t0, step, *args) for t0 in range(step))


def _fixed_loads(kinds: dict, formats: dict, params: dict) -> dict:
    """Loads of every symbol a stage can read (a template's body may read a feature that is
    the same for all members of its group), and the runtime parameters."""
    loads = {s: formats[kind].format(index) for s, (kind, index) in kinds.items() if kind in formats}
    loads.update(params)
    return loads


class _Tables:
    """The index, slot and weight tables of a module's groups, flattened into one int64 and one
    float64 array (``TABLES`` of the module) that the stages take as arguments (IT, WT): Numba
    does not cache a function that reads a global array of more than 1 MB (a 2-D depth-2 net
    on 8 x 8 positions), and would compile it again in every process."""

    def __init__(self):
        self.ints: list[int] = []
        self.floats: list[float] = []

    def add_ints(self, table: np.ndarray) -> int:
        """Offset in IT of ``table``'s rows, stored one after another."""
        return _append(self.ints, np.asarray(table, dtype=np.int64))

    def add_floats(self, column: np.ndarray) -> int:
        """Offset in WT of ``column``."""
        return _append(self.floats, np.asarray(column, dtype=np.float64))

    def source(self) -> str:
        """The module's ``TABLES`` assignment (``codegen.packed_array``: a string, not a
        list literal Python would compile number by number)."""
        ints, floats = np.array(self.ints, dtype=np.int64), np.array(self.floats, dtype=np.float64)
        return ("from tpcompiler.backends.codegen import unpacked_array as _unpacked_array\n"
                f"TABLES = ({packed_array(ints)}, {packed_array(floats)})")


def _append(store: list, array: np.ndarray) -> int:
    """Offset in ``store`` at which ``array``'s entries (row by row) are appended."""
    offset = len(store)
    store.extend(array.ravel().tolist())
    return offset


def _group_loops(groups, formats: dict, fixed: dict, indent: str, slot: str, acc: str, tables: _Tables,
                 inner: str | None = None, inner_setup: str | None = None) -> tuple[str, str]:
    """Generated loops of ``groups`` (shared.plan): (quantities' loops storing into ``slot``,
    output terms' loops adding to ``acc`` (formatted with the output's number)).  ``inner``:
    a loop header nested inside each group's loop over members (the pair stage's loop over
    a block of j, which vectorises), ``inner_setup`` its first statement.  Each group's
    index, slot and weight arrays go into ``tables``; a member's row of them is read once,
    before the inner loop.  Consecutive groups of linear quantities are one loop
    (``_linear_run``), and a sequence of loops repeated with other tables (a layer's, in a
    deep network) is one loop over the repetitions (``_folded``)."""
    quantity_codes, term_codes, generated = [], [], []
    forms = [_linear_forms(g) if g.target is not None else None for g in groups]
    for linear, members in itertools.groupby(zip(groups, forms), key=lambda member: member[1] is not None):
        members = list(members)
        if linear and len(members) > 1:
            generated.append(_linear_run(members, formats, indent, slot, inner, inner_setup))
            quantity_codes.append(generated[-1])
            continue
        for group, _ in members:
            code = _group_loop(group, formats, fixed, indent, slot, acc, inner, inner_setup)
            if code.lines:
                generated.append(code)
                (quantity_codes if group.target is not None else term_codes).append(code)
    for code in generated:  # the tables in the order of the loops (as when each loop placed its own)
        code.place(tables)
    return _folded(quantity_codes, indent, tables), _folded(term_codes, indent, tables)


class _Code:
    """A generated loop whose table offsets and loop counts are *holes* (``ints``, ``floats``,
    ``count``), filled in by ``place`` (the offsets at which its tables are placed, its
    counts): loops that differ only in their holes' values have equal ``key``s, which
    ``_folded`` writes once, inside a loop over their repetitions."""

    def __init__(self):
        self.lines: list[str] = []
        self._holes: list[tuple] = []   # ("ints" | "floats" | "count", array or number)
        self.values: list[int] = []     # per hole, once placed: its offset or count

    def ints(self, table) -> str:
        return self._hole("ints", np.asarray(table, dtype=np.int64))

    def floats(self, column) -> str:
        return self._hole("floats", np.asarray(column, dtype=np.float64))

    def count(self, n: int) -> str:
        return self._hole("count", int(n))

    def _hole(self, kind: str, value) -> str:
        self._holes.append((kind, value))
        return f"\0{len(self._holes) - 1}\0"

    def key(self) -> tuple:
        return tuple(self.lines), tuple(kind for kind, _ in self._holes)

    def place(self, tables: _Tables) -> None:
        """Each hole's value: its table placed in ``tables`` (in the holes' order), or its count."""
        self.values = [tables.add_ints(v) if kind == "ints" else tables.add_floats(v) if kind == "floats" else v
                       for kind, v in self._holes]

    def text(self, names: list, extra_indent: str = "") -> str:
        """The loop with hole k written ``names[k]``."""
        parts = "\n".join(extra_indent + line for line in self.lines).split("\0")
        return "".join(str(names[int(p)]) if n % 2 else p for n, p in enumerate(parts))


#: The longest sequence of loops ``_folded`` looks for repetitions of (a layer's loops)
_FOLD_PERIOD = 64


def _folded(codes: list[_Code], indent: str, tables: _Tables) -> str:
    """The loops ``codes`` (placed) in their order, with each run of r >= 2 consecutive
    repetitions of a sequence of k loops that differ only in their holes' values (a deep
    network's layers: the same templates, other members) written once, inside ``for _rep in
    range(r)``: the holes that differ between repetitions are read from a table at the start
    of each repetition (``_h0``, ``_h1``, ...), the others written as numbers.  The same
    statements run in the same order, so the results are the same to the bit; the module's
    size, and numba's compile time (which grows faster than the statements of a stage), no
    longer grow with the repetitions."""
    keys = _interned([code.key() for code in codes])
    out, at = [], 0
    while at < len(codes):
        period, reps = _repetition(keys, at)
        if reps < 2:
            out.append(codes[at].text(codes[at].values))
            at += 1
            continue
        run = [codes[at + r * period: at + (r + 1) * period] for r in range(reps)]
        values = np.array([[v for code in rep for v in code.values] for rep in run], dtype=np.int64)
        varying = [h for h in range(values.shape[1]) if not (values[:, h] == values[0, h]).all()]
        names = [str(v) for v in values[0]]
        for k, h in enumerate(varying):
            names[h] = f"_h{k}"
        lines = [f"{indent}for _rep in range({reps}):"]
        if varying:
            offset = tables.add_ints(values[:, varying])
            lines += [f"{indent}    _h{k} = IT[{offset} + _rep * {len(varying)} + {k}]" for k in range(len(varying))]
        first = 0
        for code in run[0]:
            lines.append(code.text(names[first: first + len(code.values)], "    "))
            first += len(code.values)
        out.append("\n".join(lines))
        at += period * reps
    return "\n".join(out)


def _interned(keys: list) -> list[int]:
    """Each key as a small integer, equal for equal keys."""
    ids: dict = {}
    return [ids.setdefault(key, len(ids)) for key in keys]


def _repetition(keys: list[int], at: int) -> tuple[int, int]:
    """(k, r): the sequence keys[at: at + k] repeated r times from ``at``, the k of the
    longest such run (the shortest k among equals), k at most ``_FOLD_PERIOD``."""
    best = (1, 1)
    n = len(keys)
    for period in range(1, min(_FOLD_PERIOD, (n - at) // 2) + 1):
        reps = 1
        while at + (reps + 1) * period <= n and keys[at + reps * period: at + (reps + 1) * period] == keys[at: at + period]:
            reps += 1
        if reps >= 2 and period * reps > best[0] * best[1]:
            best = (period, reps)
    return best


def _group_loop(group, formats, fixed, indent, slot, acc, inner, inner_setup) -> _Code:
    """One group's loop over its members (``_group_loops``), its tables as holes; no lines for
    output terms whose template came out zero once written out."""
    code = _Code()
    M, n = group.index.shape
    body = indent + ("        " if inner else "    ")
    if group.target is None and all(e == 0 for e in group.template.args):
        return code
    loads = {a: formats[kind].format(f"_x{k}") for k, (a, kind) in enumerate(zip(group.placeholders, group.kinds))}
    loads.update(fixed)
    exprs = list(group.template.args)
    lines, values = print_body(exprs, loads, body)
    out = [f"{indent}for m in range({code.count(M)}):"]
    if n:  # one offset per member, then a constant index per argument (fewer statements for numba)
        out.append(f"{indent}    _b = {code.ints(group.index)} + m * {n}")
        out.extend(f"{indent}    _x{k} = IT[_b + {k}]" if k else f"{indent}    _x0 = IT[_b]" for k in range(n))
    out.append(f"{indent}    _w = WT[{code.floats(group.weight[:, 0])} + m]")
    if group.target is not None:
        at, width = code.ints(group.target), group.target.shape[1]
        out.extend(f"{indent}    _t{e} = IT[{at} + m * {width} + {e}]" for e in range(width))
    elif group.offset is not None:  # (the first output of the member's block, shared.plan)
        out.append(f"{indent}    _o = IT[{code.ints(group.offset)} + m]")
    if inner:
        out.append(f"{indent}    {inner}")
        if inner_setup:
            out.append(f"{body}{inner_setup}")
    out.extend(lines)
    if group.target is not None:
        out.extend(f"{body}{slot.format(f'_t{e}')} = _w * ({v})" for e, v in enumerate(values))
    else:
        first = "_o + " if group.offset is not None else ""
        out.extend(f"{body}{acc.format(f'{first}{o}')} += _w * ({v})" for o, (e, v) in enumerate(zip(exprs, values))
                   if e != 0)
    code.lines = out
    return code


def _linear_forms(group) -> list | None:
    """Per entry of a group of quantities, (scale, constant, [(placeholder number,
    coefficient), ...]) when the code ``print_body`` writes for the entry is scale * (sum of
    coefficient * argument + constant) with numeric coefficients (a window's covariance sum,
    a copy), the terms in the order it writes them, so that ``_linear_run`` rounds as the
    written expression does; else None."""
    exprs = list(group.template.args)
    number = {a: k for k, a in enumerate(group.placeholders)}
    used = set().union(*(e.free_symbols for e in exprs))
    if not used <= set(number):
        return None  # a runtime parameter
    names = load_names(used)
    back = {v: number[a] for a, v in names.items()}
    reps, reduced = common_subexpressions([e.xreplace(names) for e in exprs])
    if reps:
        return None
    forms = []
    for r in reduced:
        scale, inner = (r.args if r.is_Mul and len(r.args) == 2 and r.args[0].is_Number and r.args[1].is_Add
                        else (sp.S.One, r))
        # -0.0 is the identity of floating-point addition (x + -0.0 is x, the sign of a zero
        # included): no constant, and the sum's start in _linear_run
        constant, terms = -0.0, []
        ordered = [] if inner == 0 else inner.as_ordered_terms()
        for n, t in enumerate(ordered):
            c, v = t.as_coeff_Mul()
            if v is sp.S.One and c.is_Number and n == len(ordered) - 1:
                constant = float(c)
            elif v in back and c.is_Number:
                terms.append((back[v], float(c)))
            else:
                return None
        forms.append((float(scale), constant, terms))
    return forms


def _linear_run(run, formats: dict, indent: str, slot: str, inner, inner_setup) -> _Code:
    """Consecutive groups of linear quantities (``_linear_forms``) as one loop over rows
    (member, entry) of a sparse table: slot = w * (scale * (sum_k c_k source_k + constant)),
    the sum in the printed order.  One small loop instead of one per group: numba's compile time
    grows with the statements of the generated stage, and a CNN's covariance sums (windows
    of 9, 6 and 4 taps, rows and pairs) are many groups of one kind."""
    targets, weights, scales, constants, starts, xs, cs, ks = [], [], [], [], [0], [], [], []
    codes = {kind: k for k, kind in enumerate(formats)}
    for group, forms in run:
        for m in range(group.index.shape[0]):
            memory.tick()
            for e, (scale, constant, terms) in enumerate(forms):
                targets.append(group.target[m, e])
                weights.append(group.weight[m, 0])
                scales.append(scale)
                constants.append(constant)
                for k, c in terms:
                    xs.append(group.index[m, k])
                    cs.append(c)
                    ks.append(codes[group.kinds[k]])
                starts.append(len(xs))
    kinds = sorted(set(ks))
    target = slot.format("_t")

    def inner_lines(ind: str) -> list:
        """The inner loop's header and first statement at indentation ``ind``."""
        return [f"{ind}{inner}"] + ([f"{ind}    {inner_setup}"] if inner_setup else [])

    code = _Code()
    lines = [f"{indent}for _r in range({code.count(len(targets))}):",
             f"{indent}    _t = IT[{code.ints(targets)} + _r]",
             f"{indent}    _w = WT[{code.floats(weights)} + _r]",
             f"{indent}    _k0 = WT[{code.floats(constants)} + _r]",
             f"{indent}    _f = WT[{code.floats(scales)} + _r]"]
    at = code.ints(starts)
    if inner:
        lines += inner_lines(f"{indent}    ") + [f"{indent}        {target} = -0.0"]
    else:
        lines.append(f"{indent}    _acc = -0.0")
    lines += [f"{indent}    for _p in range(IT[{at} + _r], IT[{at} + _r + 1]):",
              f"{indent}        _x = IT[{code.ints(xs)} + _p]",
              f"{indent}        _c = WT[{code.floats(cs)} + _p]"]
    if len(kinds) > 1:
        lines.append(f"{indent}        _kind = IT[{code.ints(ks)} + _p]")
    names = list(formats)
    for n, kind in enumerate(kinds):
        ind = f"{indent}        "
        if len(kinds) > 1:
            lines.append(f"{ind}{'if' if n == 0 else 'elif'} _kind == {kind}:")
            ind += "    "
        load = formats[names[kind]].format("_x")
        if inner:
            lines += inner_lines(ind) + [f"{ind}    {target} += _c * {load}"]
        else:
            lines.append(f"{ind}_acc += _c * {load}")
    if inner:
        lines += inner_lines(f"{indent}    ") + [f"{indent}        {target} = _w * (_f * ({target} + _k0))"]
    else:
        lines.append(f"{indent}    {target} = _w * (_f * (_acc + _k0))")
    code.lines = lines
    return code
