"""One kernel alone (``get``, as neural-tangents' ``kernel_fn(x1, x2, get)``; issue 11): the
NNGP or the NTK derived and computed without the other.  The NNGP alone skips the backward
pass and the NTK's terms (a CNN's sums over the pairs of uses of every weight, most of its
derivation and of its pair stage), so a Gaussian process on a CNN compiles in a fraction of
the time.

The reference of every comparison is that kernel computed with both (the backend as tested
against neural-tangents and finite width in test_kernels*.py and test_layers.py): the
derivation of one kernel is the same derivation with the other's terms left out, so the two
agree to rounding (the generated code adds in another order where its groups differ)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler.backends.kernels.kernel import KernelFunction, kernel_names
from tpcompiler.ir.ops import node_symbol
from tpcompiler.layers import Conv, Dense, Erf, GlobalAvgPool, LayerNorm, Relu, serial
from tpcompiler.validation import ArgumentError

CNN = Path(__file__).resolve().parent.parent / "programs" / "cnn1d.py"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A disk cache of the test's own (stored derivations, generated code)."""
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path))
    return tmp_path


def _pooled_cnn():
    """Two SAME convolutions and a global average pool (tp.layers, 1-D, 5 positions): the
    looped pair stage of a CNN, with NTK terms per pair of positions and layer."""
    net = serial(Conv(8, (3,), None, "SAME", 1.5, 0.1), Relu(), Conv(8, (3,), None, "SAME", 1.3, 0.2), Erf(),
                 GlobalAvgPool(), Dense(1, 1.2, 0.05))
    return net.program((5, 2)), 10


def _layer_normed_mlp():
    """Dense, LayerNorm, relu, Dense: the straight-line code of a small net."""
    return serial(Dense(16, 1.4, 0.1), LayerNorm(), Relu(), Dense(1, 1.1, 0.0)).program((3,)), 3


NETS = {"pooled_cnn": _pooled_cnn, "layer_normed_mlp": _layer_normed_mlp}


@pytest.fixture(scope="module", params=sorted(NETS))
def net(request):
    program, d = NETS[request.param]()
    rng = np.random.default_rng(5)
    X, X2 = rng.standard_normal((6, d)), 1.7 * rng.standard_normal((4, d))
    graph = tp.compile(program).source
    both = KernelFunction(graph)
    return request.param, graph, X, X2, both, both(X, X2)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_one_kernel_alone_is_that_kernel_of_both(net, get):
    name, graph, X, X2, both, reference = net
    alone = KernelFunction(graph, get=get)
    assert alone.kernels == (get,)
    result = alone(X, X2)
    assert sorted(result) == [get, f"{get}_x2"]
    for key, K in result.items():
        err = np.max(np.abs(K - reference[key])) / np.max(np.abs(reference[key]))
        assert err <= 1e-13, (name, key, err)
    if get == "nngp":  # it derived less: no NTK term, no backward quantity
        assert alone.derivation_sizes["quantities"] <= both.derivation_sizes["quantities"], name
        assert len(alone.source) < len(both.source), name


def test_the_nngp_alone_of_a_pooled_cnn_has_no_backward_pair_quantities():
    """The pooled CNN's NNGP is mean_ij E[erf(h2_i) erf(h2_j')] with Cov(h2_i, h2_j') = 1.3^2/3
    sum over the common taps of E[relu(h1_k) relu(h1_l')] + 0.2^2: one pair quantity per pair
    of positions (the relu expectation; the erf one is the readout's term).  Both kernels also
    read the backward covariances E[dh_i dh_j'] per pair of positions and layer."""
    graph = tp.compile(_pooled_cnn()[0]).source
    alone, both = KernelFunction(graph, get="nngp"), KernelFunction(graph)
    assert alone.shared and both.shared  # the looped pair stage (shared.py)
    assert alone.derivation_sizes["pair quantities"] == 5 * 5
    assert both.derivation_sizes["pair quantities"] > 5 * 5


@pytest.mark.parametrize("get, expected", [
    (None, ("nngp", "ntk")), ("nngp", ("nngp",)), ("NTK", ("ntk",)), (("ntk", "nngp"), ("nngp", "ntk")),
    (["nngp"], ("nngp",)), ("ntk, nngp", ("nngp", "ntk")),
])
def test_get_names_the_kernels_as_neural_tangents_does(get, expected):
    assert kernel_names(get) == expected


@pytest.mark.parametrize("get", ["nngpp", "", (), ("nngp", 3), 7, "nngp,"])
def test_an_unknown_kernel_is_one_clear_error(get):
    with pytest.raises(ArgumentError, match=r"^get: expected 'nngp', 'ntk' or both"):
        kernel_names(get)
    compiled = tp.compile(tp.load(str(CNN), L=3))
    with pytest.raises(ArgumentError, match=r"^get: expected 'nngp', 'ntk' or both"):
        compiled.kernels(np.ones((2, 6)), get=get)


def test_one_kernel_is_stored_under_a_key_of_its_own(cache):
    """A stored NNGP alone is not read back for both kernels (nor the other way round), and
    is read back for the NNGP alone."""
    X = np.random.default_rng(2).standard_normal((3, 8))
    first = tp.compile(tp.load(str(CNN), L=4, depth=2)).kernel_function(get="nngp")
    assert not first.derivation_cached and first.kernels == ("nngp",)
    both = tp.compile(tp.load(str(CNN), L=4, depth=2)).kernel_function()
    assert not both.derivation_cached and both.kernels == ("nngp", "ntk")
    again = tp.compile(tp.load(str(CNN), L=4, depth=2)).kernel_function(get="nngp")
    assert again.derivation_cached and again.kernels == ("nngp",)
    assert np.array_equal(again(X)["nngp"], first(X)["nngp"])
    assert sorted(again(X)) == ["nngp"]


def test_the_nngp_alone_needs_no_backward_pass(cache):
    """A program whose kernels are stored compiles without its backward pass and kernel program
    (they wait until read, tp.compile); the NNGP alone, derived then, does not make them: the
    kernel backend builds the NNGP's pair moment on the program itself (ntk.kernel_program)."""
    X = np.random.default_rng(4).standard_normal((3, 8))
    both = tp.compile(tp.load(str(CNN), L=4, depth=2)).kernel_function()(X)
    compiled = tp.compile(tp.load(str(CNN), L=4, depth=2))
    assert compiled._passes_left is not None  # (both kernels were read back: nothing derived)
    alone = compiled.kernel_function(get="nngp")
    assert not alone.derivation_cached and compiled._passes_left is not None
    np.testing.assert_allclose(alone(X)["nngp"], both["nngp"], rtol=1e-13, atol=0)


def test_a_program_compiled_for_the_nngp_alone():
    """tp.compile(program, get="nngp"): neither the backward pass nor the NTK's pair moments;
    its kernel program's one output is the NNGP, which its kernels compute as both's do."""
    program, d = _pooled_cnn()
    X = np.random.default_rng(6).standard_normal((5, d))
    both = tp.compile(program)
    alone = tp.compile(program, get="nngp")
    assert list(alone.graph.outputs) == ["nngp"] and list(both.graph.outputs) == ["nngp", "ntk"]
    added = [k for k in alone.graph.g if k not in alone.source.g]
    assert len(added) == 1 and alone.graph.outputs["nngp"].has(node_symbol(added[0]))  # E[Z^x Z^x']
    assert len(both.graph.g) > len(both.source.g) + 1  # (the backward pass and the NTK's pair moments)
    result = alone.kernels(X)
    assert sorted(result) == ["nngp"] and alone.kernel_function().kernels == ("nngp",)
    np.testing.assert_allclose(result["nngp"], both.kernels(X)["nngp"], rtol=1e-13, atol=0)
    with pytest.raises(ArgumentError, match=r"^get: program 'layers' was compiled for the NNGP alone .* compile it "
                                            r"without get for the NTK"):
        alone.kernels(X, get="ntk")
    ntk = tp.compile(program, get="ntk")  # (its kernel program has both outputs: the NTK reads the backward pass)
    assert sorted(ntk.kernels(X)) == ["ntk"] and sorted(ntk.kernels(X, get="nngp")) == ["nngp"]
    with pytest.raises(ArgumentError, match=r"^get: expected 'nngp', 'ntk' or both"):
        tp.compile(program, get="gp")
