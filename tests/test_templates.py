"""Expectation templates of the kernel engine (backends/kernels/pairwise.py, issue 11: CNN
compile time): deriving each structure of expectation once and instantiating it must give
the kernels that deriving every expectation on its own gives.  Programs where a template
could go wrong: pairs of positions with overlapping windows and boundaries (conv depth 2,
SAME), a pooled vector (one-of-a-kind product of sums), LayerNorm (Moment limits inside the
forms, which a template must carry to the second input), and quadrature (tanh)."""
import functools

import numpy as np
import pytest

from tpcompiler import layers
from tpcompiler.backends.kernels.kernel import KernelFunction
from tpcompiler.backends.kernels.pairwise import E1, E2
from tpcompiler.ir.ntk import kernel_program
from tpcompiler.frontend.loader import load
from pathlib import Path

PROGRAMS = Path(__file__).resolve().parent.parent / "programs"

NETS = {
    "conv1d_same_depth2": (lambda: load(PROGRAMS / "cnn1d.py", L=5, depth=2).graph, 10),
    "conv2d_same_avgpool": (lambda: layers.serial(
        layers.Conv(8, (2, 2), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu(),
        layers.AvgPool((2, 2), (1, 1), "SAME"), layers.Flatten(), layers.Dense(1, 1.5, 0.1)).program((3, 3, 1)).graph, 9),
    "fc_relu_layernorm": (lambda: layers.serial(
        layers.Dense(8, 1.5, 0.1), layers.Relu(), layers.LayerNorm(), layers.Dense(8, 1.5, 0.1), layers.Erf(),
        layers.Dense(1, 1.5, 0.1)).program((3,)).graph, 3),
    # a Flatten readout: products of two positions vanish by the readout's independent rows,
    # proven by parity before they are derived (PairwiseEngine._vanishes), at the inner
    # layers through the covariances of the taps' ZHats (its split blocks)
    "conv1d_same_depth3_flatten": (lambda: _flatten_cnn(3, 4), 8),
    # a power of a sum inside a product, which expand (deep=False) leaves whole: the
    # monomials kept by parity must be the ones it makes (E2 of (h + b)^2 and tanh(h' + b))
    "fc_tanh_plus_square": (lambda: layers.serial(
        layers.Dense(8, 1.5, 0.1), layers.FanOut(2), layers.parallel(layers.Tanh(), layers.Nonlin(lambda t: t**2)),
        layers.FanInSum(), layers.Dense(1, 1.5, 0.1)).program((3,)).graph, 3),
    "conv1d_layernorm_spatial_tanh": (lambda: layers.serial(
        layers.Conv(8, (2,), padding="SAME", W_std=1.5, b_std=0.1), layers.LayerNorm(axis=(1, 2)), layers.Tanh(),
        layers.Flatten(), layers.Dense(1, 1.5, 0.1)).program((3, 1)).graph, 3),
    # erf'(u) = exp(-u^2) of a normalised form: a function with a parameter until its form is
    # rescaled (PairwiseEngine._normalise_factor), in templates too
    "conv1d_layernorm_spatial_erf_gap": (lambda: layers.serial(
        layers.Conv(8, (2,), padding="SAME", W_std=1.5), layers.LayerNorm(axis=(1, 2)), layers.Erf(),
        layers.GlobalAvgPool(), layers.Dense(1, 1.5, 0.1)).program((3, 1)).graph, 3),
}


def _flatten_cnn(depth: int, *spatial: int):
    """A SAME convolution of ``depth`` relu layers on 2 channels, flattened into the readout."""
    blocks = [layers.Conv(8, (3,) * len(spatial), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu()] * depth
    return layers.serial(*blocks, layers.Flatten(), layers.Dense(1, 1.5, 0.1)).program((*spatial, 2)).graph


@pytest.mark.parametrize("name", sorted(NETS))
def test_templated_kernels_equal_the_direct_derivation(name):
    build, d = NETS[name]
    graph = build()
    X = np.random.default_rng(3).standard_normal((5, d))
    X2 = np.random.default_rng(4).standard_normal((3, d))
    # (the direct derivation's quantities computed by loops: its straight-line code took as long
    # to compile as the templated one's, and the templated straight-line code is compared below)
    direct = KernelFunction(graph, templates=False, share=True)
    # no templates of products: only those of the expectations its loops call, E1/E2 at slots
    assert all(isinstance(t.value, (E1, E2)) for t in direct.engine.templates_found)
    b = direct(X, X2)
    # the templates written out (straight-line code) and kept as calls (looped code)
    for share in (False, True):
        templated = KernelFunction(graph, share=share)
        assert templated.engine.templates_found
        a = templated(X, X2)
        for key in b:
            assert np.max(np.abs(a[key] - b[key])) <= 1e-12 * np.max(np.abs(b[key])), (name, share, key)


LINEAR_NETS = {
    # a global average pool (the bias gradient of the conv is a sum over positions too)
    "conv1d_same_depth2_gap": (lambda: load(PROGRAMS / "cnn1d.py", L=4, depth=2).graph, 8),
    # a residual sum of branches, then a window average
    "residual_avgpool": (lambda: layers.serial(
        layers.Conv(8, (2,), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu(), layers.FanOut(2),
        layers.parallel(layers.Identity(), layers.serial(layers.Conv(8, (2,), padding="SAME", W_std=1.5, b_std=0.1),
                                                         layers.Tanh())),
        layers.FanInSum(), layers.AvgPool((2,), (1,), "VALID"), layers.Flatten(),
        layers.Dense(1, 1.5, 0.1)).program((3, 2)).graph, 6),
}


@pytest.mark.parametrize("name", sorted(LINEAR_NETS))
def test_moments_by_linearity_equal_the_expanded_forms(name, monkeypatch):
    """A moment of a sum of vectors (a pooled vector, a residual sum) is derived as the sum of
    the expectations of pairs of its vectors (PairwiseEngine._moment_by_pairs); it must equal
    the expectation of the expanded product of the forms, which the engine computes when
    that rule is switched off."""
    from tpcompiler.backends.kernels.pairwise import PairwiseEngine

    build, d = LINEAR_NETS[name]
    graph = build()
    X = np.random.default_rng(5).standard_normal((4, d))
    X2 = np.random.default_rng(6).standard_normal((3, d))
    linear = KernelFunction(graph)
    through_sums = [k for k, n in linear.engine._linear_memo.items() if n != ((k, 1),)]
    assert through_sums, "the program has no vector that is a sum of others: the test would test nothing"
    a = linear(X, X2)
    monkeypatch.setattr(PairwiseEngine, "_moment_by_pairs", lambda self, key, same_input, part="all": None)
    expanded = KernelFunction(graph, templates=False, share=False)
    assert not expanded.engine._linear_memo
    b = expanded(X, X2)
    for key in b:
        assert np.max(np.abs(a[key] - b[key])) <= 1e-12 * np.max(np.abs(b[key])), (name, key)


@pytest.mark.parametrize("name", ["conv1d_same_depth2_gap", "conv2d_same_avgpool"])
def test_output_term_sums_equal_the_outputs(name):
    """The kernels' outputs are taken term by term (PairwiseEngine.scalar_terms: a pooled
    moment's P^2 terms times the other factors of its term, never one sympy sum); the sum
    of the terms must be the output scalar() gives, on the diagonal too, and for products
    of two pooled moments (kept as one term) and numeric multiples of them.  The two parts
    of the kernels (pairwise.PARTS), decided at the two inputs, must sum to the same at the
    two inputs and on the diagonal: the pair stage computes both, and on the diagonal the
    first and the row stage the second."""
    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import PARTS, PairwiseEngine
    from tpcompiler.backends.kernels.shared import sum_of_terms, term_sum
    from tpcompiler.ir import ops
    from tpcompiler.ir.ntk import kernel_program

    graph = kernel_program({**NETS, **LINEAR_NETS}[name][0]())
    engine = PairwiseEngine(graph)
    nngp, ntk = graph.outputs["nngp"], graph.outputs["ntk"]
    moments = sorted((s for s in nngp.free_symbols if isinstance(graph.op(s.key), ops.Moment)), key=str)
    m = max(moments, key=lambda s: len(engine.moment_terms(s.key)))
    assert len(engine.moment_terms(m.key)) > 1, "no moment of a sum of vectors: the test would test nothing"
    for expr in (nngp, ntk, 3 * m * ntk + m ** 2 - 0.5 * m):
        for same_input in (False, True):
            terms = engine.scalar_terms(expr, same_input)
            assert len(terms) >= len(engine.moment_terms(m.key, same_input))
            want = sp.expand(engine.scalar(expr, same_input))
            difference = term_sum(sp.expand(sum_of_terms(terms) - want))
            scale = max(abs(c) for c in term_sum(want).values())
            assert max((abs(c) for c in difference.values()), default=0.0) <= 1e-12 * scale, (name, expr, same_input)
            parts = [engine.scalar_terms(expr, same_input, part) for part in PARTS]
            difference = term_sum(sp.expand(sum(sum_of_terms(t) for t in parts) - want))
            assert max((abs(c) for c in difference.values()), default=0.0) <= 1e-12 * scale, (name, expr, same_input)
    if name.endswith("_gap"):  # a pooled moment is split pair by pair: E[Z^p Z^q'], p != q, in the first part
        assert all(engine.moment_terms(m.key, False, part) for part in PARTS)


def test_a_pooled_readout_needs_the_row_stage_once_per_position():
    """The kernels' diagonal k(xi, xi) of a global average pool reads E[f(h_p) f(h_q)] for every
    pair of positions; only the terms p = q read covariances of a vector with itself at the two
    inputs (variances at xi' = xi, where the arc-cosine would amplify rounding), and only
    they are derived at one input for the row stage.  The others come from the pair stage at
    (i, i).  So the row quantities grow with the positions, the pair quantities with their
    square; the kernels themselves are checked against neural-tangents and finite width in
    test_layers and against the direct derivation above."""
    def quantities(L):
        order = KernelFunction(load(PROGRAMS / "cnn1d.py", L=L, depth=2).graph).engine.order
        return len([q for q in order if not q.pair]), len([q for q in order if q.pair])

    (rows4, pairs4), (rows8, pairs8) = quantities(4), quantities(8)
    assert pairs8 >= 3.5 * pairs4
    assert rows8 <= 2 * rows4


def test_factored_ntk_terms_equal_the_expanded_ones(monkeypatch):
    """Two factorings keep a CNN's NTK at a few terms per pair of positions: ntk.py sums the
    taps that share a gradient pair inside one term (E[dy dy'] * sum_taps w E[x x']), and the
    engine takes the expectation of a free linear form (a position's backward vector, a sum
    over the taps that read it) whole, E[f f' L L'] = E[f f'] Cov(L, L'), instead of one
    monomial per pair of taps (PairwiseEngine._is_free_linear_form).  With both undone (the
    NTK expanded, no form held) the kernels must be the same, and there must be more terms."""
    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import PairwiseEngine
    from tpcompiler.ir.ntk import kernel_program

    graph = NETS["conv1d_same_depth2"][0]()
    X = np.random.default_rng(7).standard_normal((4, 10))
    X2 = np.random.default_rng(8).standard_normal((3, 10))
    kp = kernel_program(graph)
    assert any(f.is_Add for t in sp.Add.make_args(kp.outputs["ntk"]) for f in sp.Mul.make_args(t))
    held = []
    original = PairwiseEngine._is_free_linear_form
    monkeypatch.setattr(PairwiseEngine, "_is_free_linear_form",
                        lambda self, e, blocks: held.append(e) or True if original(self, e, blocks) else False)
    factored = KernelFunction(graph, derived=(kp, None))
    assert held, "no free linear form was held: the test would test nothing"
    a = factored(X, X2)
    factored_terms = len(factored.engine.scalar_terms(kp.outputs["ntk"]))
    monkeypatch.setattr(PairwiseEngine, "_is_free_linear_form", lambda self, e, blocks: False)
    kp_expanded = kernel_program(graph)
    kp_expanded.outputs["ntk"] = sp.expand(kp_expanded.outputs["ntk"])
    expanded = KernelFunction(graph, derived=(kp_expanded, None))
    b = expanded(X, X2)
    for key in b:
        assert np.max(np.abs(a[key] - b[key])) <= 1e-12 * np.max(np.abs(b[key])), key
    assert factored_terms < len(expanded.engine.scalar_terms(kp_expanded.outputs["ntk"]))


def test_a_linear_form_of_both_inputs_is_expanded_not_held():
    """A sum of a leaf at the first input and a leaf at the second is no factor of one input
    (helper review: holding it as a free linear form made the engine expand it back and hold
    it again, without end): E[(g + g')(g - g')] = Var(g) - Var(g'), expanded as before."""
    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import PairwiseEngine
    from tpcompiler.ir import ops
    from tpcompiler.ir.ntk import kernel_program
    from tpcompiler.ir.symbols import ZSymbol, primed
    from sympy.core.symbol import Str

    engine = PairwiseEngine(kernel_program(layers.serial(layers.Dense(4, 1.5, 0.1), layers.Relu(),
                                                         layers.Dense(1, 1.5)).program((3,)).graph))
    g = ZSymbol("g1")
    value = engine.instantiate(engine.expect((g + primed(g)) * (g - primed(g))))
    def cov(a, b):
        return ops.InputCov(Str("g1"), Str("g1"), sp.Integer(a), sp.Integer(b))

    assert sp.expand(value - (cov(0, 0) - cov(1, 1))) == 0, value


def test_depth1_alternative_grouping_gives_the_same_kernels(monkeypatch):
    """A depth-1 net's engine calls that make many groups are grouped again as calls of their
    expectations and the fewer groups win (KernelFunction, _MANY_GROUPS); forced here on a
    small 2-D net, the generated code must compute the kernels the straight-line code does."""
    from tpcompiler.backends.kernels import kernel

    graph = NETS["conv2d_same_avgpool"][0]()
    X = np.random.default_rng(7).standard_normal((4, 9))
    reference = KernelFunction(graph, share=False)(X)
    tried = []
    lower = kernel.KernelFunction._lower_expectation_calls

    def counted(self, expr):
        tried.append(1)
        return lower(self, expr)

    monkeypatch.setattr(kernel, "_MANY_GROUPS", 0)
    monkeypatch.setattr(kernel.KernelFunction, "_lower_expectation_calls", counted)
    kf = KernelFunction(graph, share=True)
    assert tried and not kf.engine.order
    got = kf(X)
    for key in reference:
        assert np.max(np.abs(got[key] - reference[key])) <= 1e-12 * np.max(np.abs(reference[key])), key


_KERNEL_SOURCES = """
import hashlib
import sympy
from tpcompiler import layers
from tpcompiler.backends.kernels.kernel import KernelFunction
net = layers.serial(layers.Conv(8, (2, 2), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu(),
                    layers.Conv(8, (2, 2), padding="SAME", W_std=1.5, b_std=0.1), layers.Tanh(),
                    layers.GlobalAvgPool(), layers.Dense(1, 1.5, 0.1))
kf = KernelFunction(net.program((3, 3, 1)).graph, share=True)
assert kf.engine.order and kf.shared
# a leaky relu written as Max(a, a / 10): its two forms of one Gaussian, a frozenset's order
leaky = layers.Nonlin(lambda a: sympy.Max(a, a / 10))
mlp = layers.serial(layers.Dense(8, 1.5, 0.1), leaky, layers.Dense(8, 1.5, 0.1), leaky, layers.Dense(1, 1.5, 0.1))
leaky_kf = KernelFunction(mlp.program((3,)).graph)
print(hashlib.sha256(kf.source.encode()).hexdigest(), hashlib.sha256(leaky_kf.source.encode()).hexdigest())
"""


def test_grouped_kernel_source_is_the_same_in_every_process():
    """The generated source is the key of the compiled-code cache: the expectation calls'
    arguments, numbered as they are met, must not follow the process's string hash seed (a
    2-D depth-2 net paid Numba's whole compile again in every process).  Nor may the form a
    function is read on: a leaky relu Max(h, h / 10) took h or h / 10, whichever its frozenset
    gave first, so its code and the kernels' last bits changed from run to run
    (symbols.preorder)."""
    import os
    import subprocess
    import sys

    hashes = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(PROGRAMS.parent))
        run = subprocess.run([sys.executable, "-c", _KERNEL_SOURCES], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        hashes.add(run.stdout.strip())
    assert len(hashes) == 1


def test_interned_floats_one_object_per_value_within_the_block_only():
    """shared.interned_floats makes sympy return one Float object per value inside the block
    (so their assumptions are deduced once), nests, and restores sympy's own constructor
    when the last block exits, also after an error; values and zero are unchanged."""
    import sympy as sp
    from tpcompiler.backends.kernels.shared import interned_floats

    x = sp.Symbol("x")
    with interned_floats():
        a, b = sp.Float(2.25) * sp.Rational(1, 9), sp.Float(0.75) / 3
        assert a is b and a == sp.Float(0.25)
        assert (sp.Float(2.0) - 2.0) is sp.S.Zero
        with interned_floats():
            assert (x * sp.Float(0.5)).args[0] is sp.Float(1.0) / 2
        assert sp.Float(3.5) is sp.Float(3.5)  # still inside the outer block
        with pytest.raises(RuntimeError):
            with interned_floats():
                raise RuntimeError
        assert sp.Float(4.5) is sp.Float(4.5)
        # hashes kept per object are sympy's (equal Floats, Python floats, infinities)
        inside = [sp.Float(v) for v in (0.1, -2.5, 1e300, float("inf"), float("-inf"))]
        assert [hash(f) for f in inside] == [hash(f) for f in inside]
    assert sp.Float(3.5) is not sp.Float(3.5) and sp.Float(3.5) == sp.Float(3.5)
    assert [hash(f) for f in inside] == [hash(sp.Float(f)) for f in inside]
    assert hash(inside[0]) == hash(0.1) and sp.Float.__hash__ is sp.Float.__dict__["__hash__"]
    assert type(sp.Float(1.5)).__hash__.__qualname__ == "Float.__hash__"  # sympy's own again


def test_interned_symbols_one_object_per_symbol_beyond_the_cache_within_the_block_only():
    """shared.interned_symbols keeps one object per compiler symbol inside the block even when
    more are made than symbols._make's cache holds (a CNN's derivation), nests, and gives
    the cache back when the last block exits, also after an error."""
    from tpcompiler.backends.kernels.shared import interned_symbols
    from tpcompiler.ir import symbols

    size = symbols._CACHED_MAKE.cache_info().maxsize
    with interned_symbols():
        first = symbols.quantity(0)
        many = [symbols.quantity(k) for k in range(1, size + 10)]  # evicts quantity(0) from the cache
        assert symbols.quantity(0) is first and symbols.quantity(size) is many[size - 1]
        with pytest.raises(RuntimeError):
            with interned_symbols():
                raise RuntimeError
        assert symbols.quantity(0) is first  # still inside the outer block
    assert symbols._make is symbols._CACHED_MAKE
    [symbols.quantity(k) for k in range(size + 10, 2 * size + 20)]
    assert symbols.quantity(0) is not first and symbols.quantity(0) == first and hash(symbols.quantity(0)) == hash(first)
    del many


def test_paused_gc_restores_the_collector_state():
    """shared.paused_gc turns the cyclic collector off inside the block (nested blocks too) and
    leaves it as it found it: on again after an error, still off if the caller had it off."""
    import gc
    from tpcompiler.backends.kernels.shared import paused_gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with pytest.raises(RuntimeError):
            with paused_gc():
                raise RuntimeError
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_objects_made_while_the_collector_was_paused_are_not_walked_again(monkeypatch):
    """When paused_gc's last block exits after making many objects, they are moved to the
    oldest generation (a young collection would walk each of them, twice in all): the young
    generation's count starts at zero, and cyclic garbage made in the block is still
    collected by a full collection.  At most MOVES_PER_FULL_COLLECTION moves between two full
    collections (a move resets the counters that start one), none after a small block, and
    objects the process froze itself stay frozen."""
    import gc
    import weakref

    from tpcompiler.backends.kernels import shared

    if gc.get_freeze_count() != 0 or shared._FREE_THREADED:
        pytest.skip("this interpreter keeps objects frozen (3.12) or has no generations: nothing is moved")
    moves, unfreezes = [], []
    freeze, unfreeze = gc.freeze, gc.unfreeze
    monkeypatch.setattr(gc, "freeze", lambda: (moves.append(1), freeze())[1])
    monkeypatch.setattr(gc, "unfreeze", lambda: (unfreezes.append(1), unfreeze())[1])

    class Node:
        pass

    def block(size):
        with shared.paused_gc():
            made = [[k] for k in range(size)]  # tracked objects: the young generation's count
            a, b = Node(), Node()
            a.other, b.other = b, a  # a cycle, unreachable once the names are gone
            return made, weakref.ref(a)

    big, most = shared.PROMOTE_FROM + 50_000, shared.MOVES_PER_FULL_COLLECTION
    gc.collect()
    kept, gone = block(big)
    assert len(moves) == 1 and gc.get_count()[0] < 1_000 and gc.get_freeze_count() == 0 and gc.isenabled()
    assert gone() is not None  # moved with the others: a full collection finds it
    for _ in range(most):  # no full collection since the first move: the last is left as it is
        block(big)
    assert len(moves) == most
    gc.collect()
    assert gone() is None
    block(1_000)  # small: left as it is
    assert len(moves) == most
    block(big)
    assert len(moves) == most + 1
    assert len(unfreezes) == len(moves)  # each move is a freeze and an unfreeze
    frozen = [[k] for k in range(10)]
    gc.collect()
    freeze()
    try:
        block(big)
        # the caller's frozen objects left alone: neither frozen again nor unfrozen (the freeze
        # count itself is no test: a frozen object another thread lets go of leaves it)
        assert len(moves) == most + 1 and len(unfreezes) == most + 1 and gc.get_freeze_count() > 0
    finally:
        unfreeze()
    del kept, frozen


def test_cycles_made_between_small_paused_blocks_are_collected_as_usual():
    """Many short paused_gc blocks (a loop of small compiles) leave the collector's counters
    alone, so the cycles made between them are collected by its young collections."""
    import weakref

    from tpcompiler.backends.kernels.shared import paused_gc

    class Node:
        pass

    refs = []
    for _ in range(300):
        for _ in range(100):
            a, b = Node(), Node()
            a.other, b.other = b, a
            refs.append(weakref.ref(a))
        del a, b
        with paused_gc():
            pass
    alive = sum(r() is not None for r in refs)
    assert alive < len(refs) // 10, alive


def test_the_lowering_memos_are_dropped_after_the_derivation(monkeypatch):
    """A KernelFunction keeps none of its lowering's per-call memos once its source is written
    (they kept one in seven of the objects a CNN's derivation left alive), and its kernels
    still run."""
    from tpcompiler.backends.kernels import kernel

    graph = layers.serial(layers.Conv(8, (2,), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu(),
                          layers.Flatten(), layers.Dense(1, 1.5, 0.1)).program((3, 1)).graph
    held = []
    forget = kernel.KernelFunction._forget_lowering

    def recorded(self):
        held.extend(name for name in kernel._LOWERING_MEMOS if name in vars(self))
        forget(self)

    monkeypatch.setattr(kernel.KernelFunction, "_forget_lowering", recorded)
    kf = kernel.KernelFunction(graph)
    assert held == list(kernel._LOWERING_MEMOS)  # (each name is one the derivation sets)
    assert not [name for name in kernel._LOWERING_MEMOS if name in vars(kf)]
    X = np.random.default_rng(0).standard_normal((4, 3))
    assert np.isfinite(kf(X)["ntk"]).all()


def test_every_call_argument_the_lowering_makes_is_read(monkeypatch):
    """Lowering an engine call from its template's recipe makes the arguments of the
    expectations the call keeps, and no others: an expectation whose term a zero slot value
    cancels (a zero input covariance on the kernels' diagonal) must not leave an argument
    that is computed for every pair and read by nothing."""
    from tpcompiler.backends.kernels import kernel
    from tpcompiler.ir.symbols import CallArgumentSymbol

    seen = []
    plans = kernel.KernelFunction._plans

    def capture(self, rows, diagonal, pairs, outputs):
        seen.append((rows, diagonal, pairs, outputs))
        return plans(self, rows, diagonal, pairs, outputs)

    monkeypatch.setattr(kernel.KernelFunction, "_plans", capture)
    net = layers.serial(layers.Conv(8, (3,), padding="SAME", W_std=1.3, b_std=0.2), layers.Tanh(),
                        layers.Conv(8, (3,), padding="CIRCULAR", W_std=1.3, b_std=0.2), layers.Relu(),
                        layers.AvgPool((2,), (2,), "VALID"), layers.Flatten(), layers.Dense(1, 1.3, 0.2))
    KernelFunction(net.program((6, 2)).graph, share=True)
    (rows, diagonal, pairs, outputs), = seen
    assigned = {s for s, _ in rows + pairs if isinstance(s, CallArgumentSymbol)}
    read = set()
    for _, e in rows + pairs:
        read |= e.free_symbols
    for terms in diagonal + outputs:
        for t in terms:
            read |= t.free_symbols
    assert assigned and assigned <= read, sorted(map(str, assigned - read))


def test_product_is_the_object_sympy_builds():
    """shared.product builds c * f_1 * ... * f_k without sympy's flattening when the factors
    are distinct symbols or calls; it must be the very expression sympy's product is (same
    arguments in the same order, equal, same hash), for any order of the factors given, and
    sympy's own product for anything else (numbers, sums, powers other than integer powers
    of symbols, factors of one base)."""
    import random

    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import E2, TemplateCall
    from tpcompiler.backends.kernels.shared import interned_floats, mul, product
    from tpcompiler.ir import ops

    q = [sp.Symbol(f"q[{i}]", real=True) for i in range(5)] + [sp.Symbol("a[1]'", real=True), sp.Dummy("e0")]
    calls = [TemplateCall(sp.Integer(k), q[k], q[k + 1]) for k in range(3)] + [
        E2(sp.Integer(1), q[0], q[1], q[2]), ops.InputCov("g1_0", "g1_1", sp.Integer(0), sp.Integer(1)), sp.acos(q[3])]
    # numbers, sums (alone they take a number in: 2*(a + b) -> 2*a + 2*b), powers, products
    # (their numbers join the coefficient; a number times a product with a sum is sympy's
    # two-argument case), the identity 1
    other = [sp.Integer(3), q[0] + q[1], q[2] ** 2, 2 * q[4], sp.S.One, sp.Rational(1, 9) * q[3] * calls[0],
             sp.Float(2.25) * (q[0] + q[2]), 3 * (q[1] + q[2]) * q[4], -q[2], sp.Float(0.5) * q[5] * (q[0] + q[1]),
             (q[0] + q[1]) * q[3], sp.Rational(1, 3) * q[0] + calls[1], q[5] - calls[2],
             # exp(x) is E**x to sympy's Mul, which adds exponents: exp(x)*exp(-x) is 1
             sp.exp(q[0]), sp.exp(-q[0]), sp.exp(2 * q[0]), sp.exp(sp.Rational(1, 2)), sp.exp(q[1] + q[2]),
             # integer powers of symbols: kept apart when no other factor has their base
             q[3] ** -1, q[1] ** 3, q[5] ** -2, q[6] ** 2, sp.sqrt(q[4]), q[0] ** sp.Float(2.0)]
    rng = random.Random(0)
    with interned_floats():
        for _ in range(3000):
            factors = rng.sample(q + calls, rng.randint(0, 5))
            for _ in range(rng.choice([0, 0, 1, 2])):
                factors.append(rng.choice(other + factors[:1]))
            rng.shuffle(factors)
            c = rng.choice([1.0, 2.25, -0.5, 1e-3, -1.0, sp.Rational(1, 9), sp.Integer(9), sp.S.One, sp.Float(4.0)])
            if isinstance(c, float):
                want = sp.Mul(sp.Float(c), *factors) if c not in (1.0, -1.0) else sp.Mul(sp.Integer(int(c)), *factors)
            else:
                want = sp.Mul(c, *factors)
            got = product(c, factors)
            assert got == want and got.args == want.args and hash(got) == hash(want), (c, factors)
            # shared.mul: sp.Mul of its arguments, a leading number as the coefficient
            for args in (factors, [want.as_coeff_Mul()[0], *factors] if factors else []):
                want = sp.Mul(*args)
                got = mul(*args)
                assert got == want and got.args == want.args and hash(got) == hash(want), args


@pytest.mark.parametrize("net, shape", [
    # default weight scale: the taps' 1/K stays an exact rational, printed as (1.0/9.0)
    (layers.serial(layers.Conv(8, (3, 3), padding="SAME", b_std=0.1), layers.Relu(),
                   layers.Conv(8, (3, 3), padding="SAME", b_std=0.1), layers.Relu(),
                   layers.GlobalAvgPool(), layers.Dense(1, 1.0, 0.1)), (3, 3, 1)),
    # six taps of a circular filter on one position: 6 * (1/6) must stay exactly 1
    (layers.serial(layers.Conv(4, (3,), padding="CIRCULAR", b_std=0.1), layers.Relu(),
                   layers.Conv(4, (6,), padding="CIRCULAR"), layers.Relu(), layers.Flatten(),
                   layers.Dense(1, 1.0, 0.0)), (1, 1)),
    # a depth-1 net whose templates hold several expectations, grouped by expectation calls
    (layers.serial(layers.Conv(8, (2, 2), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu(),
                   layers.AvgPool((2, 2), (1, 1), "SAME"), layers.Flatten(), layers.Dense(1, 1.5, 0.1)), (3, 3, 1)),
])
def test_recipe_lowering_writes_the_source_instantiating_writes(net, shape, monkeypatch):
    """Lowering an engine call from its template's recipe (numbers combined in Python,
    KernelFunction._call_from_recipe) must give the generated source that instantiating the
    template's sympy value gives: same arguments, same numbering, exact rationals kept exact
    and floats combined as sympy combines them."""
    from tpcompiler.backends.kernels import kernel

    monkeypatch.setattr(kernel, "_MANY_GROUPS", 0)  # the depth-1 net: grouped by expectation calls
    graph = net.program(shape).graph
    with_recipes = KernelFunction(graph, share=True)
    assert any(r is not None for r in with_recipes._recipes.values())
    monkeypatch.setattr(kernel.KernelFunction, "_recipe", lambda self, index: None)
    assert KernelFunction(graph, share=True).source == with_recipes.source


def test_repeated_reads_are_aliased_inside_unchanged_calls():
    """alias_repeated_arguments aliases a symbol read again by a later argument of the same
    call, in every call, also one nested in the argument of a call that needs no alias."""
    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import TemplateCall
    from tpcompiler.backends.kernels.shared import alias_repeated_arguments

    x0, x1, y = sp.symbols("x0 x1 y", real=True)
    inner = TemplateCall(1, x0, x0)
    outer = TemplateCall(2, x1, 2 * inner)
    kinds = {x0: ("R", 0), x1: ("R", 1)}
    assignments, outputs, aliases = alias_repeated_arguments([(y, outer)], [{outer: 1.0}], TemplateCall, kinds)
    (alias, read), = aliases.items()
    assert read == x0 and alias.name == "x0~2"
    want = TemplateCall(2, x1, 2 * TemplateCall(1, x0, alias))
    assert assignments == [(y, want)] and outputs == [{want: 1.0}]


@pytest.mark.parametrize("net, shape", [
    # rows and pairs of windows of 4, 6 and 9 taps, two layers
    (layers.serial(layers.Conv(8, (3, 3), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu(),
                   layers.Conv(8, (3, 3), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu(),
                   layers.GlobalAvgPool(), layers.Dense(1, 1.5, 0.1)), (3, 3, 2)),
    # default weight scale (exact 1/9 coefficients), tanh, circular windows, pooling
    (layers.serial(layers.Conv(8, (3,), padding="CIRCULAR", b_std=0.2), layers.Tanh(),
                   layers.Conv(8, (3,), padding="SAME", b_std=0.2), layers.Relu(),
                   layers.AvgPool((2,), (2,), "VALID"), layers.Flatten(), layers.Dense(1, 1.0, 0.2)), (6, 2)),
])
def test_linear_runs_compute_what_the_group_loops_compute(net, shape, monkeypatch):
    """Consecutive groups of linear quantities (covariance sums over windows) are generated
    as one loop over a sparse table (kernel._linear_run); summed in the printed order, they
    must give bit for bit the kernels of one loop per group, and a CNN must use them."""
    from tpcompiler.backends.kernels import kernel

    graph = net.program(shape).graph
    X = np.random.default_rng(7).standard_normal((6, int(np.prod(shape))))
    runs = KernelFunction(graph, share=True)
    assert "for _r in range(" in runs.source
    monkeypatch.setattr(kernel, "_linear_forms", lambda group: None)
    loops = KernelFunction(graph, share=True)
    assert "for _r in range(" not in loops.source
    a, b = runs(X, X[:4] + 0.3), loops(X, X[:4] + 0.3)
    for key in a:  # bit for bit, the sign of a zero included
        assert np.array_equal(a[key].view(np.int64), b[key].view(np.int64)), key


def test_monomial_is_the_object_sympy_builds():
    """symbols.monomial builds products of distinct symbols and powers of symbols (the kernel
    program's w * K_ab * K_cd terms) without flattening; it must be sympy's own product (same
    arguments in the same order, same hash), and sympy's product for anything else
    (numbers, repeated bases, sums, non-commutative factors)."""
    import random

    import sympy as sp
    from tpcompiler.ir import ops
    from tpcompiler.ir.symbols import monomial

    syms = [ops.node_symbol(f"K_x{i}_x{i + 1}") for i in range(4)] + [ops.primed_symbol("h1"), sp.Symbol("sigma_W3_0")]
    pows = [syms[5] ** 2, syms[0] ** 3, syms[1] ** sp.Rational(1, 2)]
    other = [sp.Integer(2), sp.Float(0.5), syms[2] + syms[3], ops.InputCov(sp.Symbol("g0"), sp.Symbol("g1"), 0, 1)]
    rng = random.Random(1)
    for _ in range(2000):
        factors = rng.sample(syms + pows, rng.randint(0, 4))
        if rng.random() < 0.2:
            factors.append(rng.choice(other + factors[:1]))
        got, want = monomial(*factors), sp.Mul(*factors)
        assert got == want and got.args == want.args and hash(got) == hash(want), factors


def test_linear_runs_equal_group_loops_on_random_groups_and_signed_zeros(monkeypatch):
    """The generated code of random runs of linear groups (every load kind of the pair stage,
    several entries per member, negative, rational and factored coefficients, constants or
    none), executed as Python on inputs that include +0.0 and -0.0, must store what one loop
    per group stores, bit for bit (the sign of a zero included)."""
    import math
    import random

    import sympy as sp
    from tpcompiler.backends.kernels import kernel
    from tpcompiler.backends.kernels.shared import Group, _placeholder

    formats = {"RF1": "RF1[i, {}]", "RF2T": "RF2T[{}, j]", "R1": "R1[i, {}]", "R2T": "R2T[{}, j]",
               "GS": "GS[{}, i, j]", "Q": "Q[{}, jj]"}
    rng, pick = np.random.default_rng(3), random.Random(3)

    def group(first_slot: int) -> Group:
        n, width, members = pick.randint(1, 4), pick.randint(1, 3), pick.randint(1, 3)
        slots = [_placeholder(k) for k in range(n)]
        kinds = [pick.choice(list(formats)[:5] + (["Q"] if first_slot else [])) for _ in range(n)]
        entries = []
        for _ in range(width):
            e = sum((sp.Float(pick.choice([1.0, -1.0, 0.5, -0.3, 2.0])) * s for s in slots if pick.random() < 0.8),
                    sp.S.Zero)
            e = e + sp.Float(pick.choice([0.01, -2.5])) if pick.random() < 0.4 else e
            e = sp.Rational(1, 3) * e if pick.random() < 0.3 else e
            entries.append(e if e != 0 else slots[0])
        index = np.array([[pick.randrange(first_slot if k == "Q" else 4) for k in kinds] for _ in range(members)])
        target = np.arange(first_slot, first_slot + members * width).reshape(members, width)
        return Group(sp.Tuple(*entries), slots, kinds, index.reshape(members, n), rng.standard_normal((members, 1)), target)

    def values(shape):
        v = rng.standard_normal(shape)
        v[rng.random(shape) < 0.3] = 0.0
        v[rng.random(shape) < 0.3] = -0.0
        return v

    runs = 0
    for _ in range(40):  # (30 made 20 runs before cse lost its sign rewrites, which pulled -1 out: 18 since)
        groups, slots = [], 0
        for _ in range(pick.randint(2, 4)):
            groups.append(group(slots))
            slots += groups[-1].target.size
        inputs = {"RF1": values((4, 4)), "RF2T": values((4, 5)), "R1": values((4, 4)), "R2T": values((4, 5)),
                  "GS": values((4, 4, 5))}
        stored = []
        for linear in (True, False):
            if not linear:
                monkeypatch.setattr(kernel, "_linear_forms", lambda g: None)
            tables = kernel._Tables()
            body = kernel._group_loops(groups, formats, {}, "", "Q[{}, jj]", "ACC[{}, jj]", tables,
                                       inner="for j in range(jb, je):", inner_setup="jj = j - jb")[0]
            runs += linear and "for _r in range(" in body
            env = {"IT": np.array(tables.ints, dtype=np.int64), "WT": np.array(tables.floats), "i": 2, "jb": 1,
                   "je": 4, "Q": np.full((slots, 3), np.nan), "math": math, **inputs}
            exec(body, env)
            stored.append(env["Q"])
        monkeypatch.undo()
        assert np.array_equal(stored[0].view(np.int64), stored[1].view(np.int64))
    assert runs >= 20


def test_canonical_forms_by_shape_are_those_derived():
    """shared.Skeletons.canonical derives an expression's canonical order once per shape and
    renames it for every later expression of that shape; the result must be what deriving it
    for that expression gives (same structure id, same symbols in the same order), for
    expressions renamed one to one (hits) and for others (misses), repeated symbols included."""
    import random

    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import TemplateCall
    from tpcompiler.backends.kernels.shared import Skeletons

    q = [sp.Symbol(f"q[{i}]", real=True) for i in range(8)]
    g = [sp.Symbol(f"G{i}", real=True) for i in range(4)]
    kinds = {s: ("Q", i) for i, s in enumerate(q)} | {s: ("G", i) for i, s in enumerate(g)}
    rng = random.Random(1)

    def tree(depth):
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(q + g + [sp.Float(2.25), sp.Float(0.5), sp.Rational(1, 9), sp.Rational(1, 3)])
        op = rng.choice(["add", "mul", "acos", "call"])
        args = [tree(depth - 1) for _ in range(rng.randint(2, 4))]
        if op == "add":
            return sp.Add(*args)
        if op == "mul":
            return sp.Mul(*args)
        if op == "acos":
            return sp.acos(args[0])
        return TemplateCall(sp.Integer(rng.randint(0, 2)), *args)

    sk = Skeletons(kinds)
    hits = 0
    for _ in range(300):
        e = tree(4)
        for _ in range(3):
            qs, gs = q[:], g[:]
            rng.shuffle(qs), rng.shuffle(gs)
            renamed = e.xreplace(dict(zip(q + g, qs + gs)))
            hits += sk._shape(renamed)[0] in sk.shapes
            assert sk.canonical(renamed) == sk._canonical(renamed), renamed
    assert hits > 300  # the shortcut was taken (most renamings keep sympy's order of arguments)


def test_total_is_the_object_sympy_builds():
    """shared.total builds a sum without sympy's flattening when there is nothing to collect;
    it must be the very expression sp.Add builds (same arguments in the same order, equal, same
    hash) for any order of the terms, and sympy's own sum for anything else (repeated
    non-numeric parts, several numbers, zero, sums and powers among the terms)."""
    import random

    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import TemplateCall
    from tpcompiler.backends.kernels.shared import interned_floats, total
    from tpcompiler.ir import ops

    q = [sp.Symbol(f"q[{i}]", real=True) for i in range(5)] + [sp.Symbol("a[1]'", real=True)]
    calls = [TemplateCall(sp.Integer(k), q[k], q[k + 1]) for k in range(2)] + [
        ops.InputCov("g1_0", "g1_1", sp.Integer(0), sp.Integer(1)), sp.acos(q[3])]
    atoms = q + calls
    numbers = [sp.Float(2.25), sp.Rational(1, 9), sp.Integer(-3), sp.S.Zero, sp.Float(-0.5), sp.S.One, sp.Float(0.0)]
    rng = random.Random(2)

    def term():
        kind = rng.random()
        if kind < 0.4:
            return rng.choice(atoms)
        if kind < 0.7:
            return rng.choice(numbers[:3] + [sp.Float(0.01), sp.S.NegativeOne]) * rng.choice(atoms)
        if kind < 0.8:
            return sp.Float(2.25) * rng.choice(atoms) * rng.choice(atoms)
        if kind < 0.9:
            return rng.choice(numbers + [sp.Float(0.0)] * 3)  # sympy drops a zero constant, 0.0 too
        return rng.choice([q[0] + q[1], q[2] ** 2, sp.Float(2.25) * (q[0] + q[3])])

    with interned_floats():
        for _ in range(3000):
            terms = [term() for _ in range(rng.randint(0, 6))]
            want, got = sp.Add(*terms), total(terms)
            assert got == want and got.args == want.args and hash(got) == hash(want), terms


def test_free_symbols_memoised_are_sympys():
    """shared.free_symbols (memoised per subexpression) must be sympy's free_symbols for the
    expressions the derivation builds, including types whose free_symbols is their own (a
    symbol; a Lambda's bound variable is not free)."""
    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import E2, TemplateCall
    from tpcompiler.backends.kernels.shared import free_symbols
    from tpcompiler.ir import ops

    x, y, t = sp.symbols("x y t", real=True)
    memo: dict = {}
    exprs = [x, sp.Float(2.5), 2 * x * TemplateCall(sp.Integer(1), x, y + 1), E2(sp.Integer(0), x, x * y, y),
             ops.InputCov("g1_0", "g1_1", sp.Integer(0), sp.Integer(1)) * y, sp.acos(x / (1 + y)),
             sp.Lambda(t, t * x), sp.Tuple(x, sp.Lambda(t, t + y)), sp.Integral(x * t, (t, 0, y))]
    for e in exprs + exprs:  # the second time from the memo
        assert free_symbols(e, memo) == e.free_symbols, e


def test_sums_taken_as_expanded_are_what_expand_returns():
    """features._expanded lets a pair feature skip sp.expand; wherever it says yes, expand
    must return the expression unchanged (same arguments in the same order)."""
    import sympy as sp
    from tpcompiler.backends.kernels.features import _expanded
    from tpcompiler.ir import ops

    x, y = sp.symbols("x y", real=True)
    c = [ops.InputCov(f"g1_{k}", f"g1_{k + 1}", sp.Integer(0), sp.Integer(k % 2)) for k in range(4)]
    yes = [x, sp.Float(0.01) + 2.25 * c[0] + 2.25 * c[1], sp.Rational(1, 9) * c[2] - c[3] + 3 * x, c[0], -x, sp.Float(2.0)]
    no = [x * y + c[0], x * (c[0] + c[1]), (x + 1) ** 2, x * c[0], sp.acos(x) + 1]
    for e in yes:
        assert _expanded(e) and sp.expand(e) == e and sp.expand(e).args == e.args, e
    for e in no:
        assert not _expanded(e), e


def test_expressions_without_products_of_sums_are_what_expand_returns():
    """pairwise._has_products_of_sums lets expect_direct skip sp.expand; wherever it says
    no, expand (with expect_direct's hints) must return the expression unchanged."""
    import random

    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import _has_products_of_sums
    from tpcompiler.ir.nonlinearities import relu, step

    x, y, z = sp.symbols("x y z", real=True)
    pieces = [x, y, relu(x + y), step(z - x), sp.tanh(x) ** 2, x + y, (x + z) ** 2, sp.Float(2.25), sp.exp(x + y),
              relu(x) + relu(y), (relu(x) + 1) ** 3, sp.Integer(2) ** (x + 1), sp.sqrt(2) ** (y + 1)]
    rng = random.Random(3)
    hints = dict(deep=False, power_exp=False, power_base=False, log=False)
    said_no = 0
    for _ in range(400):
        terms = [sp.Mul(*rng.sample(pieces, rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        e = sp.Add(*terms)
        if not _has_products_of_sums(e):
            said_no += 1
            assert sp.expand(e, **hints) == e and sp.expand(e, **hints).args == e.args, e
    assert said_no > 50


def test_calls_rebuilt_directly_are_what_their_constructor_builds():
    """construct.rebuilt_call builds calls of function classes without evaluation rules as
    plain nodes; they must equal what the class's constructor builds (arguments, hash,
    nargs, assumptions), and classes with rules or numeric arguments go through it."""
    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import TemplateCall
    from tpcompiler.ir.construct import rebuilt_call
    from tpcompiler.expectations.special import _angle, _pos, _sdet
    from tpcompiler.ir.nonlinearities import relu

    x, y, z = sp.symbols("x y z", real=True)
    for e, args in [(_sdet(x, y, z), [y, x * z, sp.Float(2.0)]), (_angle(_sdet(x, y, z), y), [_sdet(z, y, x), z]),
                    (_pos(x, y), [y + 1, x]), (TemplateCall(sp.Integer(3), x, y), [sp.Integer(3), z, x])]:
        got, want = rebuilt_call(e, args), e.func(*args)
        assert got == want and got.args == want.args and hash(got) == hash(want) and got.nargs == want.nargs
        assert got.is_commutative == want.is_commutative and got.is_real == want.is_real
    # numbers alone: the constructor (sympy evaluates functions of Floats numerically)
    assert rebuilt_call(_sdet(x, y, z), [sp.Float(1.0), sp.Float(0.5), sp.Float(1.0)]) == _sdet(1.0, 0.5, 1.0)
    assert rebuilt_call(relu(x), [sp.Integer(-2)]) == 0  # relu has rules: relu(-2) evaluates


@pytest.mark.parametrize("name", ["conv1d_same_depth2", "conv2d_same_avgpool"])
def test_pair_variants_keyed_by_ids_are_those_keyed_by_symbols(name):
    """The engine keys a product of two forms by integer ids of its symbols
    (``_expect_pair``); the key must be the one its symbols give (the canonical forms'
    structures, which positions coincide, which leaves share a block), and the instance the
    one ``_instance`` builds from the symbols."""
    engine = KernelFunction(NETS[name][0]()).engine
    checked = 0
    for ka, sa, kb, sb in list(engine._pair_memo):
        (struct_a, names_a), (struct_b, names_b) = engine._form_canonical(ka, sa), engine._form_canonical(kb, sb)
        names = list(dict.fromkeys(names_a + names_b))
        if not any(engine._is_leaf(n) for n in names):
            continue
        position = {n: k for k, n in enumerate(names)}
        key = ("pair", struct_a, struct_b, tuple(position[n] for n in names_a + names_b), engine._signature(names))
        variant = engine._variants[key]
        ids = list(dict.fromkeys(engine._form_ids(ka, sa)[1] + engine._form_ids(kb, sb)[1]))
        assert [engine._id_symbols[i] for i in ids] == names
        assert engine._pair_instance(variant, ids) == engine._instance(variant, names, None)
        checked += 1
    assert checked > 20


def test_input_covariances_are_one_object_each_as_sympy_builds_them():
    """ops.InputCov is built as a plain node (ops.DirectFunction), one object per covariance:
    it must equal what sympy's Function constructor builds (arguments, hash, nargs,
    assumptions), and equal covariances must be one object, also read back from a pickle
    (stored derivations pickle features that share them)."""
    import pickle

    import sympy as sp
    from tpcompiler.ir import ops

    c = ops.input_cov("h1", "h0", 0, 1)
    want = sp.Function.__new__(ops.InputCov, *c.args)  # sympy's constructor, without the table
    assert c == want and c.args == want.args and hash(c) == hash(want) and c.nargs == want.nargs
    assert c.is_real and c.is_commutative and want.is_real
    assert ops.input_cov("h1", "h0", 0, 1) is c and ops.InputCov(*c.args) is c and c.func(*c.args) is c
    assert ops.input_cov("h1", "h0", 1, 1) is ops.input_cov("h0", "h1", 1, 1)  # one input: name order
    assert pickle.loads(pickle.dumps(c)) is c
    # keyed with the arguments' types: Python's False == 0 must not hand back the other's object
    flags = ops.InputCov(c.args[0], c.args[1], False, True)
    numbers = ops.InputCov(c.args[0], c.args[1], 0, 1)
    assert flags.args[2:] == (sp.false, sp.true) and numbers.args[2:] == (sp.Integer(0), sp.Integer(1))
    assert (c + 1).xreplace({sp.Integer(7): sp.Integer(8)}).args[1] is c


def test_compare_is_sympys_canonical_order():
    """symbols.compare (the order the direct sums and products sort by, construct.py) must be
    sympy's Basic.compare on every pair: random nested sums, products, powers, calls and
    the numbers and symbols of the kernel backend, classes known and unknown to sympy."""
    import random

    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import E1, E2, TemplateCall
    from tpcompiler.ir import ops, symbols

    x, y = sp.symbols("x y", real=True)
    atoms = [symbols.quantity(3), symbols.quantity(12), symbols.call_argument(4), symbols.gram(2),
             symbols.row_feature(1), symbols.row_feature(1, True), sp.Float(0.5), sp.Float(2.25), sp.Float(0.5, 30),
             sp.Integer(2), sp.Rational(1, 3), sp.S.One, sp.S.Half, sp.S.NegativeOne, sp.pi, x, y,
             ops.input_cov("h0", "h1", 0, 1), ops.input_cov("h0", "h1", 1, 1)]
    rng = random.Random(1)

    def expression(depth):
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(atoms)
        kind = rng.choice(["add", "mul", "pow", "E1", "E2", "call", "exp"])
        if kind == "add":
            return sp.Add(*[expression(depth - 1) for _ in range(rng.randint(2, 4))])
        if kind == "mul":
            return sp.Mul(*[expression(depth - 1) for _ in range(rng.randint(2, 3))])
        if kind == "pow":
            return sp.Pow(expression(depth - 1), rng.choice([2, -1, sp.Rational(1, 2)]))
        if kind == "E1":
            return E1(sp.Integer(rng.randint(0, 3)), expression(depth - 1))
        if kind == "E2":
            return E2(sp.Integer(rng.randint(0, 3)), *[expression(depth - 1) for _ in range(3)])
        if kind == "exp":
            return sp.exp(expression(depth - 1))
        return TemplateCall(sp.Integer(rng.randint(0, 3)), expression(depth - 1), expression(depth - 1))

    exprs = [expression(3) for _ in range(300)] + atoms
    for a in exprs:
        for b in rng.sample(exprs, 40) + [a, sp.sympify(a)]:
            assert symbols.compare(a, b) == a.compare(b), (a, b)
    terms = [rng.choice(exprs) for _ in range(200)]
    assert sorted(terms, key=symbols.FACTOR_ORDER) == sorted(terms, key=functools.cmp_to_key(sp.Basic.compare))


def _pair_keys(graph) -> list:
    """The (vector a, side, vector b, side) of the pair quantities the kernels' derivation makes
    from the kernel program that keeps every product (the finite-width one: the limit's leaves
    out those a flip symmetry proves 0 before the engine sees them, tests/test_parity.py)."""
    return [key for key, q in KernelFunction(graph, derived=(kernel_program(graph), None)).engine.quantities.items()
            if q.pair]


@pytest.mark.parametrize("spatial", [(4,), (3, 3)])
def test_a_flattened_cnn_reads_only_pairs_of_one_position(spatial):
    """Under a Flatten readout every position has its own readout row, so the kernels read
    only E[Z^a Z^a'] of one vector at the two inputs (neural-tangents keeps only the
    diagonal of the spatial covariance there): the products of two positions, NTK terms
    included, vanish by parity before they are derived (PairwiseEngine._vanishes) and no
    quantity is made for them.  Their number is then linear in the positions (twice the
    positions, twice the quantities); the reference derivation, which proves nothing in
    advance, makes quantities for pairs of positions it then multiplies by zero."""
    graph = _flatten_cnn(3, *spatial)
    pairs = _pair_keys(graph)
    assert pairs and all(ka == kb for ka, _, kb, _ in pairs), [key for key in pairs if key[0] != key[2]][:3]
    if spatial == (4,):
        assert len(_pair_keys(_flatten_cnn(3, 8))) == 2 * len(pairs)
        direct = KernelFunction(graph, templates=False, share=False, derived=(kernel_program(graph), None))
        assert len(pairs) < sum(q.pair for q in direct.engine.order)


def test_products_are_multiplied_out_as_expand_does():
    """PairwiseEngine._expanded_without_odd_terms, with no term found odd, must give what
    sp.expand(deep=False) gives (the engine's expectations are derived from those terms), or
    leave the expression to it (None)."""
    import types

    import sympy as sp
    from tpcompiler.backends.kernels.pairwise import PairwiseEngine

    a, b, c, d, e = sp.symbols("a b c d e")
    f = sp.Function("f")
    engine = types.SimpleNamespace(_parity_parts=lambda t, held: (frozenset(), frozenset()))
    hints = dict(deep=False, power_exp=False, power_base=False, log=False)
    cases = [(a + b) * (c + d) * f(a + c), 2.5 * (a + b) * (0.5 * c + 0.25 * d), (0.5 * a + b) ** 2,
             (a + b) * (c + d) * (a + e), e * (a + b) ** 2 * (c + d), (a * (b + c) + d) * (e + a)]
    left = [3 * (a + b) ** 2, e + (a + b) * (c + d), (a + b) ** 3]  # expand leaves or counts these
    for expr in cases:
        assert PairwiseEngine._expanded_without_odd_terms(engine, expr, {}) == sp.expand(expr, **hints), expr
    for expr in left:
        assert PairwiseEngine._expanded_without_odd_terms(engine, expr, {}) is None, expr


def test_a_flattened_cnns_derivation_does_not_grow_with_positions():
    """A Flatten readout gives every position its own readout vector g_p, each an independent
    block of one leaf.  Its blocks are not part of a leaf's kind in the templates' canonical
    order (pairwise._TemplateKinds): the products of one structure at every position are then
    one variant, derived once.  With the block in the kind, each position's were derived
    anew (1-D depth 2: 68 variants at 8 positions, 116 at 16)."""
    from tpcompiler import layers

    counts = []
    for positions in (8, 16):
        net = layers.serial(layers.Conv(8, (3,), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu(),
                            layers.Conv(8, (3,), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu(),
                            layers.Flatten(), layers.Dense(1, 1.5, 0.1))
        engine = KernelFunction(net.program((positions, 2)).graph).engine
        counts.append((len(engine._variants), len(engine.order)))
    assert counts[1][1] == 2 * counts[0][1]  # one quantity per position and layer ...
    assert counts[1][0] == counts[0][0], counts  # ... but the derivations do not grow


def test_even_completions_are_the_pairs_that_pass_the_parity_test():
    """pairwise._even_completions (a table per (inside, inside_t) keyed by odd_t - U) keeps
    exactly the pairs, in the same order, that the direct test (odd ^ odd_t) <= inside | inside_t
    keeps, on random parity sets over a few blocks (both empty and overlapping insides)."""
    import random

    from tpcompiler.backends.kernels.pairwise import _even_completions

    rng = random.Random(5)
    blocks = "abcde"

    def subset(p):
        return frozenset(x for x in blocks if rng.random() < p)

    for trial in range(200):
        p_inside = rng.choice([0.0, 0.2, 0.5])
        choices = [(("c", i), subset(0.4), subset(p_inside)) for i in range(rng.randint(1, 12))]
        last = [(("t", k), subset(0.4), subset(p_inside)) for k in range(rng.randint(1, 12))]
        direct = [(c, t) for c, odd, inside in choices for t, odd_t, inside_t in last
                  if odd ^ odd_t <= inside | inside_t]
        assert list(_even_completions(choices, last)) == direct, trial


def test_replaced_is_the_object_xreplace_builds():
    """construct.replaced (xreplace with sums, products and calls rebuilt by total, product
    and rebuilt_call) must give the very expression sympy's xreplace gives (srepr-equal) on
    300 random expressions: a Z entry's window sum (c_k * Z of node symbols, a bias), relu
    and sympy functions of sums, products of sums, powers, and values that are sums, numbers
    (0 included) or other symbols; and a value that makes a term zoo."""
    import random

    import sympy as sp
    from tpcompiler.ir.construct import replaced
    from tpcompiler.ir.nonlinearities import relu
    from tpcompiler.ir.ops import node_symbol
    from tpcompiler.ir.symbols import Z, Zhat

    x = [node_symbol(f"x{i}") for i in range(5)]
    rng = random.Random(5)
    coefficients = [1, -1, sp.Rational(1, 3), 0.5, 1.5, -2]

    def window():
        return sp.Add(*[rng.choice(coefficients) * v for v in rng.sample(x, rng.randint(1, 4))],
                      rng.choice([0, 0.1, sp.Rational(1, 2)]))

    def expression():
        return rng.choice([window(), relu(window()), sp.tanh(window()) * x[0], window() * window(),
                           rng.choice(coefficients) * relu(x[1]) * x[2], window() ** 2 + x[3], sp.exp(-x[4] ** 2) * window()])

    values = [lambda k: Z(f"x{k}"), lambda k: Zhat(f"m{k}") + 0.5 * Z(f"y{k}"), lambda k: sp.S.Zero,
              lambda k: sp.Float(2.0), lambda k: -Z(f"x{k}"), lambda k: x[(k + 1) % 5]]
    for _ in range(300):
        e = expression()
        rule = {v: rng.choice(values)(k) for k, v in enumerate(x) if rng.random() < 0.8}
        assert sp.srepr(replaced(e, rule)) == sp.srepr(e.xreplace(rule)), (e, rule)
    for e in (sp.log(x[0]) + x[1] + 2, 1 / x[0] + x[1] + 0.5):  # a term that becomes zoo absorbs the others
        assert replaced(e, {x[0]: sp.S.Zero}) is sp.zoo is e.xreplace({x[0]: sp.S.Zero})


def test_output_terms_of_the_two_parts_share_their_groups(monkeypatch):
    """The kernels' two parts (pairwise.PARTS) add to different accumulators, but a structure
    of output terms is one group whatever part its members add to (shared.plan's blocks: a
    bundle of one part is that part's size, its first output the member's offset): a pooled
    readout's terms of two positions p != q and p = q share their loop."""
    from tpcompiler.backends.kernels.kernel import KernelFunction

    seen = []
    original = KernelFunction._plans
    monkeypatch.setattr(KernelFunction, "_plans", lambda self, *a: seen.append(original(self, *a)) or seen[-1])
    KernelFunction(load(PROGRAMS / "cnn1d.py", L=4, depth=2).graph)
    (_, (groups, _, n_assign)), = seen
    outputs = groups[n_assign:]
    assert any(set(g.offset.tolist()) == {0, 2} for g in outputs)
    assert len({g.template for g in outputs}) == len(outputs)


_DEEP_NETS = {
    # programs/cnn1d.py: a layer's row and pair loops repeated with other tables, forward and backward
    "cnn1d_depth4": (lambda: load(PROGRAMS / "cnn1d.py", L=3, depth=4).graph, 6),
    # tp.layers: 2-D windows (boundary classes), erf, a pooled readout
    "conv2d_erf_depth3_gap": (lambda: layers.serial(
        *[layers.Conv(8, (2, 2), padding="SAME", W_std=1.4, b_std=0.2), layers.Erf()] * 3,
        layers.GlobalAvgPool(), layers.Dense(1, 1.5, 0.1)).program((3, 3, 1)).graph, 9),
    # residual blocks (FanOut / FanInSum) of relu convolutions, circular windows
    "conv1d_residual_depth2": (lambda: layers.serial(
        layers.Conv(8, (3,), padding="CIRCULAR", W_std=1.5, b_std=0.1),
        *[layers.serial(layers.FanOut(2), layers.parallel(
            layers.serial(layers.Relu(), layers.Conv(8, (3,), padding="CIRCULAR", W_std=1.5, b_std=0.1)),
            layers.Identity()), layers.FanInSum())] * 2,
        layers.Relu(), layers.Flatten(), layers.Dense(1, 1.5, 0.1)).program((3, 2)).graph, 6),
}


@pytest.mark.parametrize("name", sorted(_DEEP_NETS))
def test_repeated_loops_are_one_loop_over_the_repetitions(name, monkeypatch):
    """A deep network's layers are loops of the same templates over other tables; they are
    generated once inside a loop over the repetitions (kernel._folded), which runs the same
    statements in the same order: the kernels must be those of the loops written out, bit
    for bit, and the network must use such a loop."""
    from tpcompiler.backends.kernels import kernel

    make, d = _DEEP_NETS[name]
    graph = make()
    X = np.random.default_rng(3).standard_normal((5, d))
    folded = KernelFunction(graph, share=True)
    assert "for _rep in range(" in folded.source
    monkeypatch.setattr(kernel, "_FOLD_PERIOD", 0)
    written = KernelFunction(graph, share=True)
    assert "for _rep in range(" not in written.source
    assert len(written.source.splitlines()) > len(folded.source.splitlines())
    a, b = folded(X, X[:3] + 0.4), written(X, X[:3] + 0.4)
    for key in a:  # bit for bit, the sign of a zero included
        assert np.array_equal(a[key].view(np.int64), b[key].view(np.int64)), key


def test_a_deep_cnns_generated_source_does_not_grow_with_depth():
    """Doubling a CNN's depth adds repetitions, not loops (numba's compile time grows faster
    than the generated statements: cnn1d L = 8 depth 16 took 56 s to compile written out):
    written out, depth 12 is about twice depth 6; folded, the same source but for the
    repetitions' counts, since shared.plan orders a level's groups by structure, the same at
    every layer (by their first slot, the backward pass's runs broke where two groups traded
    places: 641 and 672 lines)."""
    lines = {depth: len(KernelFunction(load(PROGRAMS / "cnn1d.py", L=4, depth=depth).graph, share=True)
                        .source.splitlines()) for depth in (6, 12)}
    assert lines[12] == lines[6], lines


def test_a_deep_mlp_is_one_loop_over_its_layers():
    """A deep MLP's layers repeat a few structures at other levels (kernel._repeats_structures),
    and its loops, one loop over the layers' repetitions, make smaller stages than the
    straight-line code, which it therefore gets: the same source at depth 20 and 40 (written
    out: one quantity per layer, a 100-layer net's first call took 51 s).  The kernels are the
    relu arc-cosine recursion (NNGP) and the NTK's, Theta <- K + Theta * (pi - theta) / (2 pi),
    written out here.  A deep residual net whose loops would be the larger stages keeps its
    straight-line code (resnet.py, 10 blocks: 46,000 characters against 24,000)."""
    X = np.random.default_rng(5).standard_normal((4, 3))
    lines = {}
    for depth in (20, 40):
        kf = KernelFunction(load(PROGRAMS / "mlp.py", depth=depth, phi="relu", d=3).graph)
        assert kf.shared, depth
        lines[depth] = len(kf.source.splitlines())
        k = kf(X)
        K = X @ X.T / 3  # input layer, w_std = 1, no bias
        theta = K.copy()
        for _ in range(depth):
            d = np.sqrt(np.outer(np.diag(K), np.diag(K)))
            t = np.arccos(np.clip(K / d, -1.0, 1.0))
            K = d * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi)
            theta = K + theta * (np.pi - t) / (2 * np.pi)
        np.testing.assert_allclose(k["nngp"], K, rtol=1e-12)
        np.testing.assert_allclose(k["ntk"], theta, rtol=1e-12)
    assert lines[40] == lines[20], lines
    from tpcompiler.backends.kernels import kernel

    resnet = load(PROGRAMS / "resnet.py", n_blocks=10).graph
    looped = KernelFunction(resnet, share=True, cache=False)
    chosen = KernelFunction(resnet, cache=False)
    assert not chosen.shared and kernel._stages_size(chosen.source) < kernel._stages_size(looped.source)


def test_repetitions_are_the_longest_runs_of_a_sequence():
    """kernel._repetition: (period, repetitions) of the longest run starting at a position,
    the shortest period among equals, none beyond _FOLD_PERIOD."""
    from tpcompiler.backends.kernels import kernel

    assert kernel._repetition([0, 1, 0, 1, 0, 1, 2], 0) == (2, 3)
    assert kernel._repetition([0, 1, 0, 1, 0, 1, 2], 1) == (2, 2)   # 1 0 1 0, then 1 2
    assert kernel._repetition([5, 5, 5, 5], 0) == (1, 4)             # not (2, 2)
    assert kernel._repetition([0, 1, 2, 3], 0) == (1, 1)
    assert kernel._repetition([7], 0) == (1, 1)
    long = list(range(kernel._FOLD_PERIOD + 1)) * 2
    assert kernel._repetition(long, 0) == (1, 1)
