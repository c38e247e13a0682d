"""Hash-consed graph construction (Graph.intern), the rule tables of the IR, front-end and
training stages, and tp.compile as a named list of passes."""
import inspect
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import tpcompiler as tp
from tpcompiler import compiler
from tpcompiler.backends import interpreter
from tpcompiler.cli.commands import build_parser
from tpcompiler.ir import ops
from tpcompiler.ir.backward import derive_backward
from tpcompiler.ir.graph import Graph, OutputIndex, ProgramError, instantiate
from tpcompiler.ir.ops import node_symbol, primed_symbol
from tpcompiler.ir.rules import MissingRule
from tpcompiler.training import finite, sgd

ROOT = Path(__file__).resolve().parent.parent


def _graph() -> Graph:
    g = Graph("g")
    g.add("u", ops.InitVec(sp.Integer(1)))
    g.add("sigma_W", ops.Param(1.0))
    g.add("W", ops.InitMat(node_symbol("sigma_W")), ("sigma_W",))
    return g


# -- Graph.intern -------------------------------------------------------------------------
def test_intern_returns_the_same_node_for_the_same_op_and_args():
    g = _graph()
    a = g.intern(ops.MatMul(False), ("W", "u"))
    assert g.intern(ops.MatMul(False), ("W", "u")) == a
    expr = sp.tanh(node_symbol(a))
    b = g.intern_expr(ops.Nonlin, expr)
    assert g.intern_expr(ops.Nonlin, sp.tanh(node_symbol(a))) == b
    assert len(g.g) == 5  # u, sigma_W, W and one node each


def test_different_ops_or_args_never_share_a_node():
    g = _graph()
    g.add("v", ops.InitVec(sp.Integer(1)))
    keys = {
        g.intern(ops.MatMul(False), ("W", "u")),
        g.intern(ops.MatMul(True), ("W", "u")),   # the transpose is another instruction
        g.intern(ops.MatMul(False), ("W", "v")),  # another argument
        g.intern_expr(ops.Nonlin, node_symbol("u") ** 2),
        g.intern_expr(ops.Moment, node_symbol("u") ** 2),  # same expression, another op
    }
    assert len(keys) == 5
    assert isinstance(g.op(g.intern_expr(ops.Moment, node_symbol("u") ** 2)), ops.Moment)


def test_random_draws_and_named_declarations_are_never_shared():
    g = _graph()
    with pytest.raises(TypeError, match="random draw"):
        g.intern(ops.InitVec(sp.Integer(1)))
    # two hyperparameters of the same value are two variables; an unnamed constant is a third
    g.add("a", ops.Param(1.0))
    g.add("b", ops.Param(1.0))
    c = g.intern(ops.Param(1.0))
    assert c not in ("a", "b", "sigma_W") and g.intern(ops.Param(1.0)) == c


def test_generated_and_preferred_names():
    g = _graph()
    g.add("t1", ops.InitVec(sp.Integer(1)))  # a user's name that the generator must skip
    first = g.intern(ops.MatMul(False), ("W", "u"))
    assert first == "t2" and first in g.generated
    assert g.intern_expr(ops.Moment, node_symbol("u") * node_symbol(first)) == "theta3"
    # a preferred name is used if free, else suffixed
    assert g.intern(ops.MatMul(True), ("W", "u"), "h") == "h"
    assert g.intern(ops.MatMul(True), ("W", first), "h") == "h_2"
    assert "h" not in g.generated


def test_rename_keeps_the_shared_node():
    g = _graph()
    a = g.intern(ops.MatMul(False), ("W", "u"))
    g.rename(a, "h")
    assert g.intern(ops.MatMul(False), ("W", "u")) == "h" and a not in g.g


def test_renaming_keeps_a_vectors_covariances_and_an_inputs_columns():
    """``tp.identity(u1).named("x")`` names u1 itself (identity is u1).  The rename left the
    p.vecs covariance keyed by the old name: the interpreter drew x uncorrelated with u2
    (mean(x u2) = -0.003 +- 0.007 at width 4096, where it is 0.8) and the limit was a
    KeyError.  Renaming an input's coordinate lost its data column (a NetworkXError)."""
    def correlated():
        p = tp.Program("rename_cov")
        u1, u2 = p.vecs(["u1", "u2"], [[1.0, 0.8], [0.8, 1.0]])
        p.output("xu2", tp.mean(tp.identity(u1).named("x") * u2))
        return p

    assert tp.compile(correlated()).limit()["xu2"] == (pytest.approx(0.8, abs=1e-15), 0.0)
    values = compiler.simulate_seeds(correlated(), 1024, range(8))["xu2"]
    assert abs(values.mean() - 0.8) < 5 * values.std(ddof=1) / np.sqrt(len(values)) + 1e-12

    p = tp.Program("rename_input")
    xi = p.input("xi", 2, default=[[0.5, -1.0], [1.5, 0.3]])
    g = p.input_matrix("U", 2).apply([xi[0].named("a"), xi[1]], name="g")   # (a U0 + xi_2 U1) / sqrt(2)
    p.output("hh", tp.mean(g * g.prime))
    limit = tp.compile(p).limit()
    assert [limit[f"hh[0,{j}]"][0] for j in (0, 1)] == pytest.approx([(0.25 + 1) / 2, (0.75 - 0.3) / 2], abs=1e-15)


def test_handles_follow_renamings_made_after_they_were_read():
    """A handle's expression is renamed only when a node was renamed since it was last read
    (not at every operation: an RNN's NTK, T^2 terms added one at a time, was renamed whole
    at each addition); a renaming after the read still shows, in the handle and in what is
    built from it."""
    p = tp.Program("late_rename")
    u, v = p.vec("u"), p.vec("v")
    W = p.mat("W")
    h = W @ u  # an interned node with a generated name
    generated = h.expr.key
    s = h * v + u
    assert node_symbol(generated) in s.expr.free_symbols  # (read now: remembered)
    h.named("h")  # renames the generated node
    assert s.expr == node_symbol("h") * node_symbol("v") + node_symbol("u")
    assert (s * 2).expr == 2 * (node_symbol("h") * node_symbol("v") + node_symbol("u"))
    p.output("m", tp.mean(s * s))
    assert generated not in tp.compile(p).graph.g


def test_prime_marks_what_depends_on_the_input_after_nodes_are_added_and_renamed():
    """``.prime`` primes exactly the nodes reading the program's input, memoised per node
    (it walked the whole graph at every call): nodes added after an earlier ``.prime``, a
    node renamed after its answer was memoised, and nodes of initial vectors only."""
    p = tp.Program("prime_memo")
    xi = p.input("xi", 2, default=[[1.0, 0.5]])
    u = p.vec("u")
    g = p.input_layer("U", xi).named("g")
    first = (g * u).prime  # memoises g (and u: not on the input)
    assert first.expr == primed_symbol("g") * node_symbol("u")
    h = tp.nonlin(sp.tanh, g).named("h")  # added after: reads g
    w = tp.nonlin(sp.tanh, u).named("w")  # added after: does not
    assert (h * w).prime.expr == primed_symbol("h") * node_symbol("w")
    h2 = h.named("h2")  # renamed after its answer was memoised
    assert (h2 + w).prime.expr == primed_symbol("h2") + node_symbol("w")


def test_names_asked_for_a_shared_node_are_kept_and_listed_beside_it():
    """A name asked for a computation that already has a node (the backward pass's gradient
    of a second tap entering one sum with one weight) is an alias of that node, which the
    listing shows: docs/programs/cnn1d.md printed dh_{1 0} := dx_{1 3} step(h_{1 0}) with no
    trace of dx_{1 0} (review of the docs)."""
    from tpcompiler.printing.program import listing

    g = _graph()
    h = g.intern(ops.MatMul(False), ("W", "u"), "h")
    assert g.intern(ops.MatMul(False), ("W", "u"), "k") == h == "h"
    assert g.intern(ops.MatMul(False), ("W", "u"), "k") == "h"   # asked again: listed once
    assert g.intern(ops.MatMul(False), ("W", "u"), "u") == "h"   # a name in use is no alias
    assert g.intern(ops.MatMul(False), ("W", "u")) == "h"
    assert g.aliases == {"h": ["k"]}
    g.rename("h", "h0")  # (nothing reads h yet)
    assert g.aliases == {"h0": ["k"]}
    line, = [entry for entry in listing(g) if entry.startswith("h_{0}")]
    assert line.endswith(r"\qquad (\text{also } k)"), line
    cnn = tp.compile(tp.load(ROOT / "programs" / "cnn1d.py", L=3, depth=1)).graph
    assert cnn.aliases["dx1_2"] == ["dx1_1", "dx1_0"]


def test_a_node_removed_behind_the_graphs_back_is_not_returned():
    g = _graph()
    a = g.intern(ops.MatMul(False), ("W", "u"), "h")
    g.g.remove_node(a)                      # a pass editing the networkx graph directly
    g.add("h", ops.InitVec(sp.Integer(1)))  # ... and reusing the name for something else
    b = g.intern(ops.MatMul(False), ("W", "u"), "h")
    assert b == "h_2" and isinstance(g.op(b), ops.MatMul)


def test_dsl_shares_unnamed_expressions_and_keeps_named_ones():
    p = tp.Program("p")
    u = p.vec("u")
    W = p.mat("W")
    h = (W @ u).named("h")
    assert (W @ u).expr == h.expr            # the product is computed once
    assert tp.mean(tp.tanh(h)).expr == tp.mean(tp.tanh(h)).expr
    a = tp.tanh(h).named("a")
    b = tp.tanh(h).named("b")                # the user asked for two variables
    assert {a.expr.name, b.expr.name} == {"a", "b"}
    assert (W @ tp.tanh(h)).expr == (W @ a).expr  # unnamed requests share the first node


def test_only_generated_moment_names_are_adopted_by_outputs():
    p = tp.Program("p")
    u = p.vec("u")
    p.output("s", tp.mean(u * u))
    named = tp.mean(u * u * u, name="theta_user")
    p.output("r", named)
    assert "s" in p.graph.g and "theta_user" in p.graph.g
    assert p.graph.outputs["r"] == node_symbol("theta_user")


def test_backward_pass_reuses_a_hand_written_one():
    net = tp.load("programs/mlp.py", depth=2).graph
    out, grads = derive_backward(net)
    assert grads["h2"] == "dh2" and grads["h1"] == "dh1" and grads["x1"] == "dx1"
    # nothing the hand-written pass computes is computed again
    assert len(out.g) - len(net.g) == len(set(grads.values()) - set(net.g))


# -- rule tables --------------------------------------------------------------------------
def test_a_missing_rule_names_the_op_and_the_stage():
    class Fresh:
        kind = ops.VEC

    for table, stage in [(tp.ir.graph.VALIDATE, "validation"), (interpreter.INTERPRET, "finite-width"),
                         (tp.ir.backward.BACKWARD, "backward"), (sgd.REPLAY, "SGD replay")]:
        with pytest.raises(MissingRule, match=f"{stage}.*Fresh"):
            table(Fresh())


# -- compile: passes and typed records ----------------------------------------------------
def _readout_only() -> tp.Program:
    """A one-hidden-layer network that declares only its readout (so it compiles to kernels)."""
    p = tp.Program("net")
    xi = p.input("xi", 3, default=np.eye(3)[:2])
    p.readout(tp.relu(p.input_layer("h", xi)).named("x"))
    return p


def test_compile_is_a_named_list_of_passes():
    assert [p.name for p in compiler.PASSES] == ["validate", "backward", "kernel program", "derive"]
    net = _readout_only()
    back = compiler.run_passes(net, until="backward")
    assert back.grads is not None and back.zprogram is None and not back.graph.outputs
    done = compiler.run_passes(net)
    assert set(done.graph.outputs) == {"nngp", "ntk"} and done.zprogram is not None
    assert done.source is net.graph and not net.graph.outputs  # the program is untouched
    c = tp.compile(net)
    assert c.source is net.graph and set(c.graph.outputs) == {"nngp", "ntk"}
    with pytest.raises(ValueError, match="no pass called"):
        compiler.run_passes(net, until="optimise")


def test_bound_outputs_are_typed_records():
    net = _readout_only()
    X = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]])
    zp, index = tp.compile(net).bind(X)
    assert index["ntk[0,1]"] == OutputIndex("ntk", (0, 1))
    assert index["nngp[1,1]"].template == "nngp" and index["nngp[1,1]"].examples == (1, 1)
    graph, index2 = instantiate(tp.compile(net).graph, X)
    assert index2 == index and set(graph.outputs) == set(index)


def test_unrolled_outputs_carry_their_trajectory_entry():
    net = tp.load("programs/mlp.py", depth=1, phi="tanh")
    X, Y = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]]), np.array([0.3, -0.2])
    graph, entries = sgd.unroll_trajectory(net, tp.named("mup", 1), tp.SGD(X, Y, steps=2, lr=0.5, X_eval=X[:1]))
    assert set(entries) == set(graph.outputs)
    assert entries["f_train[2,1]"] == sgd.TrajectoryEntry("train", 2, 1, 0)
    assert entries["f_eval[0,0]"] == sgd.TrajectoryEntry("eval", 0, 0, 0)


def test_train_results_have_distinct_names_and_one_particle_default():
    assert tp.TrainResult is sgd.TrainResult and finite.FiniteTrainResult is not sgd.TrainResult
    assert not hasattr(finite, "TrainResult")
    for fn in (tp.Compiled.limit, tp.train):
        assert inspect.signature(fn).parameters["particles"].default == compiler.DEFAULT_PARTICLES
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    # None until the command resolves it (tpc train: a pi-net refuses --particles given; tpc limit:
    # a given --particles unused by an exact limit is noted), then the same default
    for name in ("limit", "train"):
        (particles,) = [a for a in commands[name]._actions if a.dest == "particles"]
        assert particles.default is None and f"default {compiler.DEFAULT_PARTICLES}" in particles.help
    import tpcompiler.cli.commands as cli
    assert cli.DEFAULT_PARTICLES == compiler.DEFAULT_PARTICLES


# -- Graph.order ----------------------------------------------------------------------------
def _networkx_order(g: Graph) -> list:
    """The order Graph.order defines, by networkx: among ready nodes, the first created."""
    import networkx as nx

    index = nx.get_node_attributes(g.g, "index")
    return list(nx.lexicographical_topological_sort(g.g, key=lambda k: index[k]))


@pytest.mark.parametrize("name", ["mlp", "resnet", "rnn", "cnn1d"])
def test_order_is_the_first_ready_node_in_creation_order(name):
    """Graph.order (creation order when every edge runs forward) is networkx's lexicographic
    topological sort by creation index, on programs and on their kernel programs."""
    from tpcompiler.frontend.loader import load

    c = tp.compile(load(f"programs/{name}.py"))
    for g in (c.source, c.graph):
        assert g.order() == _networkx_order(g)


def test_order_of_a_graph_edited_behind_its_back_is_still_topological():
    """Edges added to the networkx graph directly, one from a later node to an earlier one,
    and a removed node whose index a new node takes: the order follows the edges and is
    networkx's (not the creation order)."""
    g = _graph()
    a = g.intern(ops.MatMul(False), ("W", "u"))
    b = g.intern_expr(ops.Nonlin, sp.tanh(node_symbol(a)))
    g.add("v", ops.InitVec(sp.Integer(1)))
    g.g.add_edge("v", "u", pos=0)  # backwards: v was created after u
    order = g.order()
    assert order.index("v") < order.index("u") < order.index(a) < order.index(b)
    assert order == _networkx_order(g)
    g.g.remove_node(b)
    g.add("w", ops.InitVec(sp.Integer(1)))  # gets index 5 (five nodes left), which v has
    g.g.add_edge("w", "sigma_W", pos=0)
    assert g.order() == _networkx_order(g) and g.order().index("w") < g.order().index("sigma_W")


def test_order_with_a_shared_index_and_forward_edges_is_networkxs():
    """Two nodes with one index (a node removed, another added), every edge still forward:
    the order is still networkx's (its ties broken by insertion order)."""
    g = _graph()
    a = g.intern(ops.MatMul(False), ("W", "u"))
    g.g.remove_node("u")  # (and the edge u -> a)
    g.add("v", ops.InitVec(sp.Integer(1)))  # index 3, as a
    g.add("x", ops.InitVec(sp.Integer(1)))
    g.g.add_edge("x", a, pos=1)  # 4 -> 3: backwards, so networkx orders
    assert g.order() == _networkx_order(g)
    g.g.remove_edge("x", a)
    g.add("h", ops.MatMul(False), ("W", "v"))
    assert g.order() == _networkx_order(g)  # all edges forward, indices 3 twice


def test_a_node_added_behind_the_graphs_back_without_an_index_is_not_dropped():
    g = _graph()
    g.g.add_node("stray", op=ops.InitVec(sp.Integer(1)), args=())
    with pytest.raises(KeyError):
        g.order()


def test_a_cycle_made_behind_the_graphs_back_is_a_program_error():
    """Graph.validate reports a cycle (from the topological order it walks) as a ProgramError."""
    g = _graph()
    a = g.intern(ops.MatMul(False), ("W", "u"))
    g.g.add_edge(a, "u", pos=0)
    with pytest.raises(ProgramError, match="has a cycle"):
        g.validate()


def test_a_cycle_that_keeps_the_number_of_edges_is_found_after_order_was_asked():
    """order()'s memo is keyed by the nodes and the number of edges; validate computes the
    order afresh, so an edge swapped for one that closes a cycle is still found."""
    g = _graph()
    a = g.intern(ops.MatMul(False), ("W", "u"))
    g.validate()
    g.g.remove_edge("sigma_W", "W")
    g.g.add_edge(a, "u", pos=0)
    with pytest.raises(ProgramError, match="has a cycle"):
        g.validate()


def test_free_symbols_of_is_sympys_free_symbols():
    """One walk over the tree finds sympy's free symbols, bound variables left out."""
    from tpcompiler.ir.symbols import free_symbols_of

    x, y, z, t = sp.symbols("x y z t")
    for e in [x * sp.tanh(y + 2) + sp.exp(x * y), sp.Integral(x * t, (t, 0, z)) + y, sp.Lambda(t, t * x)(y),
              sp.Sum(x ** t, (t, 1, 3)), sp.Integer(3), (x + y) ** z - sp.Derivative(sp.Function("f")(t), t)]:
        assert free_symbols_of(e) == e.free_symbols


def test_add_builds_the_sum_that_python_sum_builds():
    """tp.add(*terms) is the left fold terms[0] + terms[1] + ... built as one sum: the same
    expression (like terms collected, their float coefficients added in the same order, sums
    among the terms flattened, numbers before the first Vec or Scalar added by Python: 2.5 +
    2.5 is the integer 5), a Vec if any term is one, else a Scalar.  Random sums of vectors,
    MatMuls, Nonlins, Moments and numbers with integer, rational and float scales."""
    rng = np.random.default_rng(0)
    p = tp.Program("sums")
    u = [p.vec(f"u{i}") for i in range(3)]
    W = p.mat("W")
    s = tp.mean(u[0] * u[1])
    pool = [*u, W @ u[0], tp.tanh(W @ u[1]), u[0] + u[1], s, s * u[2], 2 * s + 1]
    scales = [1, -1, 2, 0.5, 0.1, 0.2, 1 / 3, sp.Rational(1, 3), -0.7]
    numbers = [0, 1, 2.5, 0.1, 0.5, np.float32(0.1), sp.Float(0.2)]
    cases = [[2.5, 2.5, u[0]], [0.5, 0.5, u[0]], [np.float32(0.1), np.float32(0.2), 0.3, s], [1, 0.5, 0.5, s, 2.5]]
    for trial in range(1000):
        terms = [pool[rng.integers(len(pool))] * scales[rng.integers(len(scales))]
                 for _ in range(rng.integers(1, 10))]
        for _ in range(rng.integers(0, 4)):  # numbers among them, anywhere (leading ones: Python adds them)
            terms.insert(int(rng.integers(len(terms) + 1)), numbers[rng.integers(len(numbers))])
        cases.append(terms)
    for trial, terms in enumerate(cases):
        expected = sum(terms[1:], terms[0])
        got = tp.add(*terms)
        assert type(got) is type(expected), trial
        assert sp.srepr(got.expr) == sp.srepr(expected.expr), (trial, got.expr, expected.expr)
    assert isinstance(tp.add(s, 2, s * s), tp.Scalar) and isinstance(tp.add(2, u[0]), tp.Vec)
