"""Flip symmetries (tpcompiler/ir/parity.py): pair moments proven 0 because they are odd under
negating an independent initial Gaussian, and the limit's kernel program that leaves them out
of the NTK (ir/ntk.py, ``in_the_limit``).

References: expectations in closed form (products of independent standard Gaussians, Stein's
lemma), and the kernels derived from the kernel program that keeps every product (the engine
then proves the zeros itself, tests/test_templates.py)."""
import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler import layers
from tpcompiler.backends.kernels.kernel import KernelFunction
from tpcompiler.compiler import run_passes
from tpcompiler.ir.ntk import kernel_program
from tpcompiler.ir.parity import Characters


def _characters_of_a_small_program():
    p = tp.Program("parity")
    u, w, s, t = p.vec("u"), p.vec("w"), p.vec("s"), p.vec("t")
    a, b = p.vecs(["a", "b"], [[1.0, 0.5], [0.5, 1.0]])
    W = p.mat("W", sigma=1.3)
    named = {
        "u": u, "w": w, "a": a, "b": b,
        "uw": (u * w).named("uw"), "upw": (u + w).named("upw"),
        "Wuw": (W @ (u * w)).named("Wuw"), "Wuu": (W @ (u * u)).named("Wuu"),
        "WTw": (W.T @ w).named("WTw"),
        "s": s, "t": t, "relu_spt": tp.relu(s + t).named("relu_spt"), "st": (s * t).named("st"),
        "uu": (u * u).named("uu"),
    }
    for k, v in named.items():
        p.output(f"m_{k}", tp.mean(v * v))
    graph = run_passes(p, until="validate").graph
    return graph, Characters(graph)


def test_odd_pair_moments_are_proven_zero_and_the_others_are_not():
    """Each claim against its closed form for independent N(0, 1) u, w and the pair a, b of
    covariance 1/2: E[uw (u + w)] = 0, E[W(uw) u] = 0 (W is not negated), E[a b] = 1/2 (a
    correlated pair is one atom), E[relu(s + t) s] = P(s + t > 0) Cov(s + t, s) = 1/2 (a
    relu of an odd vector drops its atoms, so that E[relu(s + t) st], with p = s + t and
    st = (p^2 - (s - t)^2) / 4, = (E[relu(p) p^2] - 2 E[relu(p)]) / 4 = (sqrt(2) E|z|^3 - 2
    sqrt(2 / 2 pi)) / 4 = 0.28, is not claimed 0 either), E[u^2 relu(s + t)] = E[relu(s + t)]
    = 1 / sqrt(pi), and E[W(uw) W(uw)] = 1.69 E[u^2 w^2] = 1.69."""
    graph, c = _characters_of_a_small_program()
    zero = [("uw", "upw"), ("Wuw", "u"), ("Wuw", "w"), ("Wuw", "upw"), ("u", "w"), ("a", "u"), ("WTw", "u")]
    nonzero = [("a", "b"), ("relu_spt", "s"), ("relu_spt", "t"), ("relu_spt", "st"), ("uu", "relu_spt"),
               ("Wuw", "Wuw"), ("uw", "uw"), ("upw", "u")]
    for x, y in zero:
        assert c.vanishes(x, y) and c.vanishes(y, x), (x, y)
    for x, y in nonzero:
        assert not c.vanishes(x, y), (x, y)


def _flatten_cnn(positions: int, **kw):
    blocks = [layers.Conv(8, (3,), padding="SAME", W_std=1.5, b_std=0.1, **kw), layers.Relu()] * 2
    return layers.serial(*blocks, layers.Flatten(), layers.Dense(1, 1.5, 0.1, **kw)).program((positions, 2))


def _pair_moments(graph) -> int:
    return sum(graph.is_pair_moment(k) for k in graph.order())


def test_the_limit_kernel_program_of_a_flatten_readout_is_linear_in_the_positions():
    """Under Flatten the gradients of two positions read the readout's independent vectors of
    those positions: the limit's kernel program leaves out their products (linear in the
    positions: about twice the pair moments for twice the positions), the finite-width
    program, which is the network's empirical kernel, keeps all of them (about four times)."""
    limit = [_pair_moments(kernel_program(_flatten_cnn(P).graph, in_the_limit=True)) for P in (8, 16)]
    finite = [_pair_moments(run_passes(_flatten_cnn(P), until="kernel program", finite_width=True).graph)
              for P in (8, 16)]
    assert limit[1] / limit[0] < 2.3 and finite[1] / finite[0] > 3.5, (limit, finite)
    assert _pair_moments(tp.compile(_flatten_cnn(8)).graph) == limit[0]


NETS = {
    "flatten": lambda: _flatten_cnn(5),
    "flatten_standard": lambda: _flatten_cnn(4, parameterization="standard"),
    "flatten_layernorm": lambda: layers.serial(
        layers.Conv(8, (3,), padding="CIRCULAR", W_std=1.5, b_std=0.1), layers.Erf(), layers.Flatten(),
        layers.LayerNorm(), layers.Dense(8, 1.2, 0.3), layers.Relu(), layers.Dense(1, 1.5, 0.1)).program((4, 2)),
    "flatten_2d_pool": lambda: layers.serial(
        layers.Conv(8, (2, 2), padding="VALID", W_std=1.5, b_std=0.1), layers.Tanh(), layers.AvgPool((2, 1)),
        layers.Flatten(), layers.Dense(1, 1.5, 0.1)).program((3, 3, 2)),
    "gap": lambda: layers.serial(
        layers.Conv(8, (3,), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu(), layers.GlobalAvgPool(),
        layers.Dense(1, 1.5, 0.1)).program((4, 2)),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_the_limit_kernel_program_gives_the_kernels_of_the_whole_one(name):
    """The kernels derived from the limit's kernel program equal those derived from the one
    that keeps every product (whose zeros the engine proves on its own, or derives) to 1e-13."""
    graph = NETS[name]().graph
    X = np.random.default_rng(5).standard_normal((4, len(graph.input_keys())))
    whole = KernelFunction(graph, derived=(kernel_program(graph), None))(X)
    limit = KernelFunction(graph, derived=(kernel_program(graph, in_the_limit=True), None))(X)
    for k in ("nngp", "ntk"):
        np.testing.assert_allclose(limit[k], whole[k], rtol=1e-13, atol=1e-13 * np.abs(whole[k]).max())


def test_a_readout_of_more_positions_than_a_products_bound_is_still_pruned():
    """A sum's characters are not bounded (parity.MAX_CHARACTERS bounds products): a Flatten
    readout over 300 positions has 300 characters, and its gradients at two positions still
    have none in common, so the limit's kernel program has one pair moment per position (the
    NTK's gradient pairs) plus the readout's, not 300^2."""
    P = 300
    net = layers.serial(layers.Conv(4, (3,), padding="SAME", W_std=1.5, b_std=0.1), layers.Relu(), layers.Flatten(),
                        layers.Dense(1, 1.5, 0.1))
    assert _pair_moments(kernel_program(net.program((P, 1)).graph, in_the_limit=True)) <= P + 1


@pytest.mark.parametrize("name, whole, zeros", [("flatten", True, True), ("flatten", False, True),
                                                ("flatten_layernorm", False, True), ("gap", True, False)])
def test_the_engines_proofs_of_zero_do_not_depend_on_the_sides(monkeypatch, name, whole, zeros):
    """The engine proves E[Z^a Z^b] = 0 once per pair of nodes (``PairwiseEngine._vanishes``),
    whichever inputs (sides) the two stand at: the same derivation with one proof per pair of
    nodes and sides proves the same zeros at every sides it is asked (and writes the same
    source).  ``whole``: from the kernel program that keeps every product, whose zeros of
    pairs of positions the engine proves itself; ``zeros``: whether there are zeros to prove
    (a pooled readout's gradients at two positions are correlated)."""
    from tpcompiler.backends.kernels import kernel, pairwise

    class PerSides(pairwise.PairwiseEngine):
        def _vanishes(self, ka, sa, kb, sb):
            key = min((ka, sa, kb, sb), (kb, sb, ka, sa))
            found = self._vanish_memo.get(key)
            if found is None:
                found = self._vanish_memo[key] = self._proven_zero(*key)
            return found

    graph = NETS[name]().graph
    derived = (kernel_program(graph, in_the_limit=not whole), None)
    per_nodes = KernelFunction(graph, derived=derived, cache=False)
    monkeypatch.setattr(kernel, "PairwiseEngine", PerSides)
    per_sides = KernelFunction(graph, derived=derived, cache=False)
    assert per_sides.source == per_nodes.source
    by_nodes, by_sides = per_nodes._engine._vanish_memo, per_sides._engine._vanish_memo
    assert (sum(by_sides.values()) > 10) == zeros and len(by_sides) > len(by_nodes)
    for (ka, sa, kb, sb), zero in by_sides.items():
        assert by_nodes[min(ka, kb), max(ka, kb)] == zero, (ka, sa, kb, sb)
