"""`tpc train PROGRAM --param pi` (issue 10, item 3; docs/DESIGN.md 2.10): the pi-limit (or the
width-N pi-net with --width) trained through tp.fit with --wd, per-tensor --clip and --lr-mult;
--init starts from a state file, --save-state writes the final one; T.npz keeps the format of
docs/DESIGN.md 5; bad input is one line on stderr.

The numbers of the pi-limit itself are tests/test_pi*.py's business; here the references are
the API run with the same options (so every option must reach the engine), and a property that
holds for any correct checkpointing: 2 full-batch steps, saved, then 1 step from that state
equal 3 steps in one run."""
import functools
from pathlib import Path

import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler.cli.commands import build_parser, main
from tpcompiler.training.pi_finite import PiFinite

ROOT = Path(__file__).resolve().parent.parent
PINET = ROOT / "programs" / "pinet.py"
MLP = ROOT / "programs" / "mlp.py"
N, D, K, R = 6, 5, 3, 2  # tiny: tp.load of programs/pinet.py grows with r
OPTS = dict(wd=1e-2, clip=0.3, mult={"first": 0.1, "last": 4.0})
CLI_OPTS = ["--wd", "1e-2", "--clip", "0.3", "--lr-mult", "first=0.1,last=4"]  # (no biases: bias= is refused)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pi_cli")
    rng = np.random.default_rng(7)
    X = rng.standard_normal((N, D))
    Y = np.eye(K)[rng.integers(0, K, N)]
    paths = {"dir": d, "X": d / "X.npy", "Y": d / "Y.npy", "XE": d / "XE.npy", "X_arr": X, "Y_arr": Y}
    np.save(paths["X"], X)
    np.save(paths["Y"], Y)
    paths["XE_arr"] = rng.standard_normal((2, D))
    np.save(paths["XE"], paths["XE_arr"])
    return paths


def tpc(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def pi_argv(data, out, *extra, r=R, steps=3, batch=None):
    argv = ["train", PINET, "-p", "depth=2", "-p", f"r={r}", "--param", "pi", "--x", data["X"], "--y", data["Y"],
            "--loss", "softmax", "--lr", "0.5", "--steps", steps, "--seed", 3, "--quiet", "--out", out, *extra]
    return argv + (["--batch", batch] if batch else [])


@functools.cache
def spec():
    """The PiSpec the command builds from programs/pinet.py (loaded once: a load takes seconds)."""
    return tp.PiSpec.from_program(tp.load(PINET, depth=2, r=R, d=D, dout=K))


def assert_one_error_line(rc, err, *words):
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpc: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_pi_limit_matches_the_api_with_every_option(capsys, data):
    out, state = data["dir"] / "T.npz", data["dir"] / "S.npz"
    rc, stdout, err = tpc(capsys, *pi_argv(data, out, *CLI_OPTS, "--eval", data["XE"], "--save-state", state, batch=2))
    assert rc == 0, err
    assert "pi-limit" in stdout
    eng = tp.PiLimit(spec(), seed=3, loss="softmax", **OPTS)
    hist = tp.fit(eng, data["X_arr"], data["Y_arr"], steps=3, lr=0.5, batch=2, eval_every=1, X_eval=data["XE_arr"],
                  progress=False)
    with np.load(out) as T:
        assert str(T["regime"]) == "feature learning"
        assert T["f_train"].shape == (4, N, K) and T["f_eval"].shape == (4, 2, K)
        np.testing.assert_array_equal(T["f_train"], np.array(hist.f_train))
        np.testing.assert_array_equal(T["f_eval"], np.array(hist.f_eval))
        assert np.all(T["f_train_stderr"] == 0)
    saved, final = tp.pi.load_state_file(state)[0], eng.state()
    assert saved.keys() == final.keys() and saved["A2"].shape[0] == R + 3 * 2  # r initial rows + batch per step
    for k in final:
        np.testing.assert_array_equal(saved[k], final[k])
    # the options matter: without them the trajectory differs
    plain = tp.fit(tp.PiLimit(spec(), seed=3, loss="softmax"), data["X_arr"], data["Y_arr"], steps=3, lr=0.5, batch=2,
                   eval_every=3, progress=False)
    assert np.abs(np.array(plain.f_train)[-1] - np.array(hist.f_train)[-1]).max() > 1e-6


def test_init_and_save_state_continue_a_run(capsys, data):
    d = data["dir"]
    rc, _, err = tpc(capsys, *pi_argv(data, d / "three.npz", *CLI_OPTS, steps=3))
    assert rc == 0, err
    rc, _, err = tpc(capsys, *pi_argv(data, d / "two.npz", *CLI_OPTS, "--save-state", d / "two_state.npz", steps=2))
    assert rc == 0, err
    rc, _, err = tpc(capsys, *pi_argv(data, d / "one.npz", *CLI_OPTS, "--init", d / "two_state.npz", steps=1))
    assert rc == 0, err
    with np.load(d / "three.npz") as three, np.load(d / "two.npz") as two, np.load(d / "one.npz") as one:
        # equal up to rounding: a reloaded state's arrays have another capacity, so BLAS may sum in another order
        np.testing.assert_allclose(one["f_train"][0], two["f_train"][-1], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(one["f_train"][-1], three["f_train"][-1], rtol=1e-12, atol=1e-14)
        assert np.abs(three["f_train"][-1] - three["f_train"][-2]).max() > 1e-6  # the last step moved f


@pytest.mark.parametrize("width", [None, 64])
def test_resume_continues_a_minibatch_run(capsys, data, width):
    """--resume continues the saved run's batch cycle at its step (--init, a new run, and a
    resume that restarted at step 0 train other runs: QA found 0.02-0.12 differences);
    a finite pi-net's state is resumed at its width."""
    d, w = data["dir"], (["--width", width] if width else [])
    rc, _, err = tpc(capsys, *pi_argv(data, d / "u5.npz", *CLI_OPTS, *w, steps=5, batch=4))
    assert rc == 0, err
    rc, _, err = tpc(capsys, *pi_argv(data, d / "h2.npz", *CLI_OPTS, *w, "--save-state", d / "h2_state.npz", steps=2,
                                      batch=4))
    assert rc == 0, err
    rc, _, err = tpc(capsys, *pi_argv(data, d / "r5.npz", *CLI_OPTS, "--resume", d / "h2_state.npz", steps=5, batch=4))
    assert rc == 0, err
    with np.load(d / "u5.npz") as whole, np.load(d / "r5.npz") as resumed:
        assert list(resumed["steps"]) == [2, 3, 4, 5]
        np.testing.assert_allclose(resumed["f_train"], whole["f_train"][2:], rtol=1e-12, atol=1e-14)
    rc, _, err = tpc(capsys, *pi_argv(data, d / "i3.npz", *CLI_OPTS, "--init", d / "h2_state.npz", steps=3, batch=4))
    assert rc == 0, err
    with np.load(d / "u5.npz") as whole, np.load(d / "i3.npz") as new_run:  # (the batch cycle from step 0)
        assert np.abs(new_run["f_train"][-1] - whole["f_train"][-1]).max() > 1e-6
    if width:  # a finite state of another spec is refused by --init too (it trained the state's net)
        rc, _, err = tpc(capsys, *pi_argv(data, d / "bad.npz", "--init", d / "h2_state.npz", r=R + 1, steps=1))
        assert_one_error_line(rc, err, "--init", "another pi-net")
    for extra, words in ((["--batch", 3], ["batch 4, not 3"]), (["--batch", 4, "--lr-mult", "first=0.1"], ["multipliers"]),
                         (["--batch", 4, "--steps", 2], ["taken 2 steps"]),
                         (["--batch", 4, "--init", d / "h2_state.npz"], ["--resume and --init"])):
        argv = pi_argv(data, d / "bad.npz", "--wd", "1e-2", "--clip", "0.3", *([] if "multipliers" in words else
                                                                                 ["--lr-mult", "first=0.1,last=4"]),
                       "--resume", d / "h2_state.npz", *extra, steps=5)
        rc, _, err = tpc(capsys, *argv)
        assert_one_error_line(rc, err, *words)


def test_fit_continues_a_loaded_engine(tmp_path, data):
    """tp.fit, save, load, tp.fit again: the uninterrupted run (steps_done saved with the state)."""
    X, Y = data["X_arr"], data["Y_arr"]
    for make, load in ((lambda: tp.PiLimit(spec(), seed=3, loss="softmax", **OPTS), tp.PiLimit.load),
                       (lambda: PiFinite(spec(), 32, seed=3, loss="softmax", **OPTS), PiFinite.load)):
        whole = tp.fit(make(), X, Y, steps=5, lr=0.5, batch=4, eval_every=1, progress=False)
        first = make()
        tp.fit(first, X, Y, steps=2, lr=0.5, batch=4, progress=False, checkpoint=str(tmp_path / "c.npz"))
        engine = load(tmp_path / "c.npz")
        assert engine.steps_done == 2
        rest = tp.fit(engine, X, Y, steps=3, lr=0.5, batch=4, eval_every=1, progress=False)
        assert rest.steps == [2, 3, 4, 5]
        np.testing.assert_allclose(np.array(rest.f_train), np.array(whole.f_train)[2:], rtol=1e-12, atol=1e-14)


def test_width_trains_the_finite_pi_net(capsys, data):
    out = data["dir"] / "fin.npz"
    rc, stdout, err = tpc(capsys, *pi_argv(data, out, *CLI_OPTS, "--width", 64, steps=2))
    assert rc == 0, err
    assert "pi-finite" in stdout
    eng = PiFinite(spec(), width=64, seed=3, loss="softmax", **OPTS)
    hist = tp.fit(eng, data["X_arr"], data["Y_arr"], steps=2, lr=0.5, eval_every=1, progress=False)
    with np.load(out) as T:
        np.testing.assert_array_equal(T["f_train"], np.array(hist.f_train))


def test_the_programs_seed_draws_the_trained_state(capsys, data):
    """-p seed=S draws the pi-net's state in tpc limit and tpc formulas; tpc train --param pi
    trained seed 0's state instead unless --seed S was also given (audit).  Now -p seed alone
    is the program's state, --seed alone still picks one, and both must agree."""
    out = data["dir"] / "seeded.npz"
    argv = ["train", PINET, "-p", "depth=2", "-p", f"r={R}", "-p", "seed=4", "--param", "pi", "--x", data["X"],
            "--y", data["Y"], "--loss", "softmax", "--lr", "0.5", "--steps", 1, "--quiet", "--out", out]
    rc, _, err = tpc(capsys, *argv)
    assert rc == 0, err
    program = tp.load(PINET, depth=2, r=R, d=D, dout=K, seed=4)
    hist = tp.fit(tp.PiLimit(tp.PiSpec.from_program(program), seed=program.pi_seed, loss="softmax"), data["X_arr"],
                  data["Y_arr"], steps=1, lr=0.5, eval_every=1, progress=False)
    with np.load(out) as T:
        np.testing.assert_array_equal(T["f_train"], np.array(hist.f_train))
    rc, _, err = tpc(capsys, *argv, "--seed", 3)
    assert_one_error_line(rc, err, "--seed 3 and -p seed=4 disagree")


def test_wd_is_weight_decay_for_every_parametrization():
    base = ["train", str(MLP), "--param", "mup", "--x", "x.npy", "--y", "y.npy", "--lr", "1", "--steps", "1", "--out", "o"]
    assert build_parser().parse_args(base + ["--wd", "0.25"]).weight_decay == 0.25
    assert build_parser().parse_args(base + ["--weight-decay", "0.25"]).weight_decay == 0.25


@pytest.mark.parametrize("extra, words", [
    (["--lr-mult", "first=0.1,middle=2"], ["--lr-mult", "middle"]),
    (["--lr-mult", "first=-1"], ["--lr-mult", "first"]),
    (["--width", "1"], ["--width", f"r = {R}", "larger"]),
    (["--width", str(10**13)], ["at width n = 10,000,000,000,000", "use a smaller width"]),  # (was a MemoryError)
    (["--resume", "S.npz"], ["--resume", "not found"]),
    (["--loss", "logistic"], ["--loss", "softmax"]),
])
def test_bad_pi_options_are_one_line(capsys, data, extra, words):
    rc, _, err = tpc(capsys, *pi_argv(data, data["dir"] / "bad.npz", *extra, steps=1))
    assert_one_error_line(rc, err, *words)


def test_bad_init_states_are_one_line(capsys, data):
    d = data["dir"]
    state = tp.pi.init_state(tp.PiSpec(depth=2, r=R + 1, d=D, dout=K), seed=0)
    np.savez(d / "wider.npz", **state)
    rc, _, err = tpc(capsys, *pi_argv(data, d / "bad.npz", "--init", d / "wider.npz", steps=1))
    assert_one_error_line(rc, err, "--init", "A1", "shape")
    state = tp.pi.init_state(spec(), seed=0)
    state["B2"] = 2.0 * state["B2"]
    np.savez(d / "long_rows.npz", **state)
    rc, _, err = tpc(capsys, *pi_argv(data, d / "bad.npz", "--init", d / "long_rows.npz", steps=1))
    assert_one_error_line(rc, err, "--init", "B2", "unit")
    rc, _, err = tpc(capsys, *pi_argv(data, d / "bad.npz", "--init", d / "missing.npz", steps=1))
    assert_one_error_line(rc, err, "--init", "not found")


def test_softmax_targets_must_be_one_hot(capsys, data):
    d = data["dir"]
    np.save(d / "Ysoft.npy", np.full((N, K), 1.0 / K))
    argv = pi_argv(data, d / "bad.npz", steps=1)
    argv[argv.index(data["Y"])] = d / "Ysoft.npy"
    rc, _, err = tpc(capsys, *argv)
    assert_one_error_line(rc, err, "--y", "one-hot")


@pytest.mark.parametrize("extra", [["--init", "S.npz"], ["--lr-mult", "first=0.1"], ["--width", "64"]])
def test_pi_options_with_another_parametrization_are_one_line(capsys, data, extra):
    argv = ["train", MLP, "-p", "depth=2", "--param", "mup", "--x", data["X"], "--y", data["Y"], "--lr", "1",
            "--steps", "1", "--out", data["dir"] / "bad.npz", *extra]
    rc, _, err = tpc(capsys, *argv)
    assert_one_error_line(rc, err, extra[0], "--param pi")


def test_one_dimensional_targets_give_one_output(capsys, data, tmp_path):
    """N targets (a 1-D --y) train a pi-net with dout = 1, as N x K targets give dout = K."""
    np.save(tmp_path / "y.npy", data["Y_arr"][:, 0])
    argv = ["train", PINET, "-p", "depth=1", "-p", "r=2", "--param", "pi", "--x", data["X"], "--y", tmp_path / "y.npy",
            "--loss", "mse", "--lr", "0.1", "--steps", 2, "--quiet", "--out", tmp_path / "T.npz"]
    rc, _, err = tpc(capsys, *argv)
    assert rc == 0, err
    with np.load(tmp_path / "T.npz") as T:
        assert T["f_train"].shape == (3, N)
    (tmp_path / "text.npz").write_text("not numpy")
    rc, _, err = tpc(capsys, *argv[:-2], "--out", tmp_path / "T2.npz", "--init", tmp_path / "text.npz")
    assert_one_error_line(rc, err, "--init", "not a .npz state file")
