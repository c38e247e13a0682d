"""Kernel derivations stored on disk (backends/kernels/stored.py, issue 11): a program derived
once is read back in a later KernelFunction (another process: the key does not depend on the
hash seed) and computes bit for bit what the derivation computes; any change to the program,
the options or the code is another key; a file that does not read back, or a graph that
cannot be keyed exactly, is derived as if nothing were stored."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler.backends.kernels import stored
from tpcompiler.backends.kernels.kernel import KernelFunction

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "programs" / "cnn1d.py"


def graph_of(**params):
    return tp.compile(tp.load(str(CNN), **{"L": 4, "depth": 2, **params})).source


def key_of(graph, rtol=1e-10):
    return stored.derivation_key(graph, {"rtol": rtol, "runtime": (), "share": None, "templates": True})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path))
    return tmp_path / "derivations"


def scaled_graph():
    """A net whose row features read an input coordinate (xi_0^2 Cov(h, h): kept as
    expressions, evaluated by numpy functions), not only sums of input covariances (kept as
    numbers)."""
    p = tp.Program("scaled")
    xi = p.input("xi", 8)
    p.readout(tp.relu(xi[0] * p.input_layer("h", xi)).named("x"))
    return tp.compile(p).source


@pytest.mark.parametrize("make", [graph_of, scaled_graph], ids=["cnn1d", "scaled"])
def test_a_stored_derivation_is_read_back_and_computes_the_same_bits(cache, make):
    graph = make()
    X = np.random.default_rng(0).standard_normal((9, 8))
    X2 = np.random.default_rng(1).standard_normal((4, 8))
    derived = KernelFunction(graph, cache=True)
    assert not derived.derivation_cached
    assert len(list(cache.glob("*.pickle"))) == 1
    read = KernelFunction(make(), cache=True)  # the same program, built again
    assert read.derivation_cached and read.source == derived.source and read.shared == derived.shared
    # the row features come back as the plans the derivation evaluates
    kinds = [entry[0] for entry in read.features._row_entries()]
    assert kinds == [entry[0] for entry in derived.features._row_entries()] and kinds
    assert set(kinds) == ({"linear"} if make is graph_of else {"expression"})
    want, got = derived(X, X2), read(X, X2)
    for name in want:
        assert np.array_equal(want[name], got[name]), name
    with pytest.raises(AttributeError, match="read from the disk cache.*cache=False"):
        read.engine
    # the derived object keeps what the read one keeps: the derivation's objects are let go
    with pytest.raises(AttributeError, match="cache=True"):
        derived.engine
    assert set(vars(derived)) == set(vars(read))
    assert derived.features.row == read.features.row and derived.features.bases == read.features.bases
    assert read.derivation_sizes is None and derived.derivation_sizes is not None
    if make is graph_of:
        assert derived.derivation_sizes["pair quantities"] == 2 * 4 * 4
        # tp.compile's kernel_function stores and reads; cache=False derives again
        compiled = tp.compile(tp.load(str(CNN), L=4, depth=2))
        assert compiled.kernel_function().derivation_cached
        assert not compiled.kernel_function(cache=False).derivation_cached


def test_the_key_changes_with_the_program_the_options_and_the_code(monkeypatch):
    import copy
    import dataclasses

    import sympy as sp

    key = key_of(graph_of())
    assert key is not None and key == key_of(graph_of())
    # one ulp is another program: w_std is a Param's float, b_std a sympy Float (b1's variance,
    # the readout's bias), which a 15-digit text would not tell apart
    assert key_of(graph_of(w_std=1.5)) == key and key_of(graph_of(b_std=0.1)) == key
    assert key_of(graph_of(w_std=float(np.nextafter(1.5, 2.0)))) != key
    assert key_of(graph_of(b_std=float(np.nextafter(0.1, 1.0)))) != key
    assert key_of(graph_of(L=5)) != key
    # attributes of the graph outside its instructions: the readout, the covariance table
    graph = copy.deepcopy(graph_of())
    graph.readout = dataclasses.replace(graph.readout, bias_weight=sp.Integer(2))
    assert key_of(graph) != key
    graph = copy.deepcopy(graph_of())
    graph.init_cov[frozenset({"b1", "v"})] = sp.Float(0.5)
    assert key_of(graph) != key
    # the options
    base = {"rtol": 1e-10, "runtime": (), "share": None, "templates": True}
    for change in ({"rtol": 1e-9}, {"runtime": ("w_std",)}, {"share": False}, {"templates": False}):
        assert stored.derivation_key(graph_of(), {**base, **change}) not in (key, None), change
    # the code
    monkeypatch.setattr(tp._code, "AT_IMPORT", "another version of the code")
    assert key_of(graph_of()) != key


KEY_SCRIPT = """
import tpcompiler as tp
from tpcompiler.backends.kernels import stored
graph = tp.compile(tp.load({path!r}, L=4, depth=2)).source
print(stored.derivation_key(graph, {{"rtol": 1e-10, "runtime": (), "share": None, "templates": True}}))
"""


def test_the_key_does_not_depend_on_the_hash_seed():
    keys = set()
    for seed in ("0", "1"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", KEY_SCRIPT.format(path=str(CNN))], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        keys.add(out.stdout.strip().splitlines()[-1])
    assert len(keys) == 1 and len(keys.pop()) == 64


def _stored_state(path) -> dict:
    """The derivation a stored file holds, read back (stored.load's format: digest, payload)."""
    import pickle

    return pickle.loads(path.read_bytes().partition(b"\n")[2])


def test_a_file_that_does_not_read_back_whole_is_derived_again(cache):
    """Stored anew: the same derivation, compared read back (pickle's bytes of one state can
    differ between two derivations of a process, by which equal objects happen to be one
    object: a CI run in 2026-12 had the second file differ in its bytes, not its contents)."""
    graph = graph_of()
    KernelFunction(graph, cache=True)
    (path,) = cache.glob("*.pickle")
    whole = path.read_bytes()
    state = _stored_state(path)
    middle = len(whole) // 2
    flipped = whole[:middle] + bytes([whole[middle] ^ 1]) + whole[middle + 1:]  # one bit
    for damaged in (b"not a pickle", whole[:middle], flipped, b""):
        path.write_bytes(damaged)
        assert not KernelFunction(graph, cache=True).derivation_cached
        assert _stored_state(path) == state  # stored anew
        assert KernelFunction(graph, cache=True).derivation_cached


def test_a_cache_that_cannot_be_written_only_costs_the_derivation(cache):
    cache.parent.mkdir(exist_ok=True)
    cache.write_text("a file where the directory of derivations would be")
    kf = KernelFunction(graph_of(), cache=True)
    assert not kf.derivation_cached and np.isfinite(kf(np.ones((2, 8)))["ntk"]).all()
    assert not KernelFunction(graph_of(), cache=True).derivation_cached


def test_nothing_is_stored_when_the_files_are_no_longer_the_code_imported(cache, monkeypatch):
    """A checkout changed under a running process: its derivation is not stored under the key of
    the new files (nor the old ones)."""
    monkeypatch.setattr(tp._code, "AT_IMPORT", "the source as it was when this process imported it")
    kf = KernelFunction(graph_of(), cache=True)
    assert not kf.derivation_cached and not list(cache.glob("*.pickle"))


def test_a_program_changed_in_place_after_compile_is_refused():
    """The kernels are derived from the passes tp.compile ran: a program changed since (one
    instruction's value, the readout) would mix the old derivation with the new graph, and
    limit() would return the old program's values."""
    import dataclasses

    import sympy as sp

    def edit_instruction(graph):
        graph.g.nodes["w_std"]["op"] = tp.ops.Param(2.0)

    def edit_readout(graph):
        graph.readout = dataclasses.replace(graph.readout, bias=sp.Float(0.3))

    def edit_unkeyable(graph):  # a graph stored.py cannot key is still checked
        graph.provenance = {"by": object()}
        return edit_instruction

    for edit, part in ((edit_instruction, "an instruction"), (edit_readout, "the readout"),
                       (edit_unkeyable, "an instruction")):
        program = tp.load(str(CNN), L=4, depth=1)
        then = edit(program.graph) if edit is edit_unkeyable else None
        compiled = tp.compile(program)
        (then or edit)(program.graph)
        for method in (compiled.kernel_function, lambda: compiled.limit(x=np.ones((2, 8)))):
            with pytest.raises(tp.ProgramError, match=f"changed after tp.compile .{part} was changed in place"):
                method()


def test_changing_the_array_of_default_rows_after_declaring_it_changes_nothing():
    """The program keeps the default rows as declared (a copy), so the caller's array is free."""
    X = np.random.default_rng(0).standard_normal((3, 4))
    net = tp.layers.serial(tp.layers.Dense(8, 1.5, 0.1), tp.layers.Relu(), tp.layers.Dense(1, 1.5, 0.1))
    compiled = tp.compile(net.program((4,), default=X))
    want = compiled.kernels(X.copy())
    X /= 2.0
    got = compiled.kernels(X * 2.0)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_a_graph_that_cannot_be_keyed_is_not_stored(cache):
    graph = graph_of()
    graph.annotation = object()  # nothing fingerprint can write exactly
    assert key_of(graph) is None
    kf = KernelFunction(graph, cache=True)
    assert not kf.derivation_cached and not list(cache.glob("*.pickle"))
    assert np.isfinite(kf(np.ones((2, 8)))["ntk"]).all()


def test_a_function_defined_outside_sympy_and_tpcompiler_is_not_keyed():
    import sympy as sp

    class shifted_tanh(sp.Function):  # a user's class: srepr would write only its name
        pass

    x = sp.Symbol("x")
    from tpcompiler.ir.nonlinearities import relu

    assert "relu" in stored.fingerprint(relu(x) + sp.tanh(x))  # tpcompiler's, sympy's
    with pytest.raises(stored.Unkeyable, match="shifted_tanh is defined in"):
        stored.fingerprint(sp.Add(x, shifted_tanh(x)))
    # undefined functions: srepr leaves out an attached implementation and assumptions
    from sympy.utilities.lambdify import implemented_function

    with pytest.raises(stored.Unkeyable):
        stored.fingerprint(implemented_function("g", np.tanh)(x))
    with pytest.raises(stored.Unkeyable):
        stored.fingerprint(sp.Function("f", real=True)(x))


def test_a_program_whose_kernels_are_stored_compiles_without_its_kernel_program(cache, monkeypatch):
    """tp.compile of a readout-only program whose kernels' derivation is in the disk cache
    leaves the kernel program and its Z program until something reads them: the kernels come
    from the cache without them (bit for bit those of the first derivation), and formulas(),
    graph and zprogram still give what an eager compile gives."""
    from tpcompiler import compiler

    made = []

    def counted(*args, **kwargs):
        made.append(args[0].name)
        return compiler_kernel_outputs(*args, **kwargs)

    compiler_kernel_outputs = compiler.kernel_outputs
    monkeypatch.setattr(compiler, "kernel_outputs", counted)
    X = np.random.default_rng(0).standard_normal((5, 8))
    first = tp.compile(tp.load(str(CNN), L=4, depth=2))
    assert made == ["cnn1d"]  # nothing stored yet: compiled as always
    want = first.kernels(X)
    again = tp.compile(tp.load(str(CNN), L=4, depth=2))
    got = again.kernels(X)
    assert made == ["cnn1d"] and again.kernel_function().derivation_cached  # no kernel program made
    assert all(np.array_equal(want[k], got[k]) for k in ("nngp", "ntk"))
    assert again.name == "cnn1d" and made == ["cnn1d"]
    assert again.formulas() == first.formulas() and made == ["cnn1d", "cnn1d"]  # made once it is read
    assert again.zprogram.order == first.zprogram.order and set(again.graph.g) == set(first.graph.g)
    assert made == ["cnn1d", "cnn1d"]
    # other rtols, other options, programs with outputs of their own: as before
    other = tp.compile(tp.load(str(CNN), L=4, depth=2, b_std=0.3))
    assert len(made) == 3 and not other.kernel_function().derivation_cached


def test_reading_stored_kernels_writes_the_program_out_once_per_check(cache, monkeypatch):
    """Compiling a program whose kernels are stored and reading them writes the graph out
    (``stored.graph_parts``, seconds for a CNN of many positions) twice: for the compile's
    change snapshot, which also keys the look-up that lets the kernel program wait, and for
    kernel_function()'s check that the program is unchanged, whose parts key the cache."""
    X = np.random.default_rng(0).standard_normal((5, 8))
    tp.compile(tp.load(str(CNN), L=4, depth=2)).kernels(X)  # derived and stored
    written = []
    graph_parts = stored.graph_parts

    def counted(*args, **kwargs):
        written.append(args[0].name)
        return graph_parts(*args, **kwargs)

    monkeypatch.setattr(stored, "graph_parts", counted)
    compiled = tp.compile(tp.load(str(CNN), L=4, depth=2))
    assert written == ["cnn1d"]
    assert compiled.kernel_function().derivation_cached and written == ["cnn1d", "cnn1d"]


def test_a_compile_that_waited_shows_the_program_as_compiled_like_an_eager_one(cache):
    """The passes that waited run on the program as it was compiled: changed since, its
    formulas and Z program are those an eager compile shows (the program as compiled), and
    kernel_function and limit refuse it, as they refuse it after an eager compile."""
    import threading

    eager = tp.compile(tp.load(str(CNN), L=4, depth=1))
    eager.kernel_function()  # stored
    program = tp.load(str(CNN), L=4, depth=1)
    compiled = tp.compile(program)
    assert compiled._passes_left is not None
    program.graph.g.nodes["w_std"]["op"] = tp.ops.Param(2.0)
    with pytest.raises(tp.ProgramError, match="changed after tp.compile .an instruction was changed in place"):
        compiled.kernel_function(cache=False)
    # two threads asking at once: the passes run once, both see their result
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(compiled.formulas())) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert seen == [eager.formulas()] * 2
    assert compiled.zprogram.order == eager.zprogram.order


def test_graph_parts_read_back_by_identity_are_the_parts_written_afresh():
    """graph_parts with a memo (tp.compile's second look at a program) reads the texts of
    instructions it wrote before by identity; its parts must equal those written afresh, also
    after an instruction is replaced, and the replaced instruction's part must change."""
    from tpcompiler.backends.kernels.stored import graph_parts

    program = tp.load(str(CNN), L=4, depth=1)
    memo: dict = {}
    first = graph_parts(program.graph, memo)
    assert memo and graph_parts(program.graph, memo) == first == graph_parts(program.graph)
    program.graph.g.nodes["w_std"]["op"] = tp.ops.Param(2.0)
    again = graph_parts(program.graph, memo)
    assert again == graph_parts(program.graph) and again["g"] != first["g"]
    assert {k for k in first if first[k] != again[k]} == {"g"}


def test_sympy_expressions_are_written_as_exactly_as_srepr_writes_them():
    """stored.fingerprint writes a sympy expression node by node (a sum's terms in sympy's
    order, not sorted for printing as srepr sorts them): two expressions get one text exactly
    when srepr gives them one.  Random sums, products, powers and calls, and values equal as
    numbers but not as objects (1 and 1.0, a Float at two precisions), symbols with and without
    assumptions (also two that sympy finds equal, given differently), dummies of one name."""
    import sympy as sp

    from tpcompiler.ir import ops
    from tpcompiler.ir.nonlinearities import relu

    x, y, xr = sp.Symbol("x"), sp.Symbol("y"), sp.Symbol("x", real=True)
    h = ops.node_symbol("h")
    leaves = [sp.Integer(1), sp.Float(1.0), sp.Float("0.2", 30), sp.Float("0.2", 53), sp.Rational(1, 5),
              sp.Integer(-2), x, y, xr, sp.Dummy("x"), sp.Dummy("x"), h, ops.primed_symbol("h"),
              ops.InputCov("a", "b", 0, 1), ops.InputCov("a", "b", 1, 0), sp.pi]
    symbols_ = [x, y, xr, h]
    rng = np.random.default_rng(0)

    def random_expression(depth: int):
        if depth == 0 or rng.random() < 0.3:
            return leaves[rng.integers(len(leaves))] if rng.random() < 0.3 else symbols_[rng.integers(len(symbols_))]
        a, b = random_expression(depth - 1), random_expression(depth - 1)
        return [lambda: a + b, lambda: a * b, lambda: a ** 2, lambda: relu(a), lambda: sp.tanh(a) + 0.5 * b,
                lambda: sp.exp(a) * sp.sqrt(b)][rng.integers(6)]()

    corpus = leaves + [relu(x), relu(xr), sp.tanh(x), x + y, x * y, x ** 2, x ** sp.Float(2.0), sp.Tuple(1, 2),
                       sp.Tuple(2, 1), sp.Tuple(x, sp.Tuple(y))]
    # equal to sympy, written as given by srepr: each its own text, whichever was written first
    positive, positive_real = sp.Symbol("z", positive=True), sp.Symbol("z", positive=True, real=True)
    corpus += [positive, positive_real, positive]
    corpus += [random_expression(3) for _ in range(300)]
    texts = [stored.fingerprint(e) for e in corpus]
    reprs = [sp.srepr(e) for e in corpus]
    for i in range(len(corpus)):
        for j in range(i):
            assert (texts[i] == texts[j]) == (reprs[i] == reprs[j]), (corpus[i], corpus[j])
    assert len(set(texts)) > 200  # (the corpus is varied)
