"""`tpc train` and `tpc classify` (docs/DESIGN.md 5): T.npz holds f_train (T+1, N), f_eval
(T+1, N_eval) and the regime; the numbers are those of tp.train with the same particles and
seed; unstable parametrizations and bad data are one line on stderr, never a traceback."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler.cli.commands import main

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "programs" / "mlp.py"
STEPS, PARTICLES, LR = 3, 20_000, 1.0  # small: these tests check plumbing, test_training the numbers


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_cli")
    rng = np.random.default_rng(0)
    arrays = {
        "X": rng.standard_normal((3, 3)),
        "Y": np.array([1.0, -1.0, 0.5]),
        "XE": rng.standard_normal((2, 3)),
        "Y4": np.ones(4),
        "Y2": np.ones((3, 2)),
        "Y01": np.array([1.0, 0.0, 1.0]),
    }
    paths = {}
    for name, arr in arrays.items():
        paths[name] = d / f"{name}.npy"
        np.save(paths[name], arr)
    return {"dir": d, "arrays": arrays, **paths}


def tpc(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def train_argv(data, out, param, *extra, y="Y", phi="tanh"):
    return ["train", MLP, "-p", "depth=2", "-p", f"phi={phi}", "--param", param, "--x", data["X"],
            "--y", data[y], "--lr", LR, "--steps", STEPS, "--particles", PARTICLES, "--seed", 0,
            "--out", out, *extra]


def reference(data, abc, with_eval=True, batch=None):
    a = data["arrays"]
    net = tp.load(MLP, depth=2, phi="tanh", d=3)
    sgd = tp.SGD(a["X"], a["Y"], steps=STEPS, lr=LR, batch=batch, X_eval=a["XE"] if with_eval else None)
    return tp.train(net, abc, sgd, particles=PARTICLES, seed=0)


def assert_one_error_line(rc, err, *words):
    assert rc != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpc: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_train_mup(capsys, data):
    out = data["dir"] / "mup.npz"
    rc, stdout, err = tpc(capsys, *train_argv(data, out, "mup", "--eval", data["XE"]))
    assert rc == 0, err
    assert "feature learning" in stdout
    with np.load(out) as T:
        assert {"f_train", "f_eval", "regime"} <= set(T.files)
        assert T["f_train"].shape == (STEPS + 1, 3) and T["f_eval"].shape == (STEPS + 1, 2)
        assert str(T["regime"]) == "feature learning"
        ref = reference(data, tp.named("mup", 2))
        np.testing.assert_array_equal(T["f_train"], ref.f_train)
        np.testing.assert_array_equal(T["f_eval"], ref.f_eval)
        assert np.all(T["f_train"][0] == 0) and np.all(T["f_eval"][0] == 0)  # muP: f_0 = 0 exactly
        assert np.abs(T["f_train"][-1]).max() > 0.1


def test_train_kernel_regime(capsys, data):
    out = data["dir"] / "ntp.npz"
    rc, stdout, err = tpc(capsys, *train_argv(data, out, "ntp", "--eval", data["XE"]))
    assert rc == 0, err
    with np.load(out) as T:
        assert str(T["regime"]) == "kernel"
        assert T["f_train"].shape == (STEPS + 1, 3) and T["f_eval"].shape == (STEPS + 1, 2)
        ref = reference(data, tp.named("ntp", 2))
        np.testing.assert_array_equal(T["f_train"], ref.f_train)
        np.testing.assert_array_equal(T["f_eval"], ref.f_eval)
        assert np.all(T["f_train"][0] == 0)  # the mean over initializations starts at 0
        # kernel gradient descent on the squared loss: the training residual shrinks
        resid = T["f_train"] - data["arrays"]["Y"]
        assert np.all(np.diff(np.linalg.norm(resid, axis=1)) < 0)
    # train_argv passes --particles and --seed (as a sweep over --param does): accepted, and
    # the line says they were not used (they were ignored in silence: training audit)
    assert stdout.strip().endswith("; --particles/--seed not used (this regime's limit is exact)"), stdout
    rc, stdout, err = tpc(capsys, "train", MLP, "-p", "depth=2", "--param", "ntp", "--x", data["X"], "--y", data["Y"],
                          "--lr", LR, "--steps", 1, "--out", data["dir"] / "ntp_plain.npz")
    assert rc == 0 and "not used" not in stdout, (stdout, err)


def test_train_explicit_exponents_are_the_abc_symmetry(capsys, data):
    """muP shifted by t = 1/2, written out: the same trajectory to the last bit as muP's (its
    reference, which test_train_mup checks the command's muP output against; read from that
    test's file, this test failed whenever it ran first or on another worker)."""
    shifted = tp.named("mup", 2).shifted("1/2")
    text = str(shifted)
    assert text == "a=0,1/2,1;b=0,0,0;c=-1"
    out = data["dir"] / "shifted.npz"
    rc, _, err = tpc(capsys, *train_argv(data, out, text, "--eval", data["XE"]))
    assert rc == 0, err
    mup = reference(data, tp.named("mup", 2))
    with np.load(out) as T:
        assert str(T["regime"]) == "feature learning"
        np.testing.assert_array_equal(T["f_train"], mup.f_train)
        np.testing.assert_array_equal(T["f_eval"], mup.f_eval)


def test_train_minibatch_without_eval(capsys, data):
    out = data["dir"] / "batch.npz"
    rc, _, err = tpc(capsys, *train_argv(data, out, "mup", "--batch", 1))
    assert rc == 0, err
    with np.load(out) as T:
        assert T["f_train"].shape == (STEPS + 1, 3) and T["f_eval"].shape == (STEPS + 1, 0)
        ref = reference(data, tp.named("mup", 2), with_eval=False, batch=1)
        np.testing.assert_array_equal(T["f_train"], ref.f_train)
        full = reference(data, tp.named("mup", 2), with_eval=False)
        assert np.abs(T["f_train"][-1] - full.f_train[-1]).max() > 1e-3  # the batch was used


def test_train_unstable_is_one_line_naming_the_conditions(capsys, data):
    out = data["dir"] / "sp.npz"
    rc, stdout, err = tpc(capsys, *train_argv(data, out, "sp", "--eval", data["XE"]))
    assert_one_error_line(rc, err, "unstable", "r = -1 < 0", "2a_3 + c = 0 < 1")
    assert not out.exists() and stdout == ""


@pytest.mark.parametrize("param,extra,y,words", [
    ("mup", ["-p", "b_std=1.0"], "Y", ["'b1' is trained (a bias?)", "(the bundled programs: -p b_std=None drops the biases)"]),
    ("a=0,1/2;b=0,0;c=0", [], "Y", ["depth 2 needs 3"]),
    ("mfp", [], "Y", ["mfp", "depth 1 only"]),
    ("foo", [], "Y", ["unknown parametrization 'foo'"]),
    ("mup", [], "Y4", ["--y has 4 rows but --x has 3"]),
    ("mup", [], "Y2", ["targets have 2 columns but the network has 1 outputs"]),
    ("ntp", ["--loss", "logistic"], "Y01", ["squared loss"]),
])
def test_train_errors(capsys, data, param, extra, y, words):
    out = data["dir"] / "err.npz"
    rc, _, err = tpc(capsys, *train_argv(data, out, param, *extra, y=y))
    assert_one_error_line(rc, err, *words)
    assert not out.exists()


def test_train_unstable_in_a_real_process(data):
    out = data["dir"] / "sp_proc.npz"
    proc = subprocess.run([sys.executable, "-m", "tpcompiler.cli", *map(str, train_argv(data, out, "sp"))],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert_one_error_line(proc.returncode, proc.stderr, "unstable", "r = -1 < 0")
    assert proc.stdout == "" and not out.exists()


def test_a_diverging_run_is_one_line_without_numpy_warnings(data):
    """A learning rate of 1e300: the output overflows and the step is refused in one line.
    numpy's overflow warnings used to print first (7-11 lines of stderr, CLI audit); the
    finiteness checks that follow say what went wrong."""
    out = data["dir"] / "diverged.npz"
    argv = [*map(str, train_argv(data, out, "mup")), "--lr", "1e300", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "tpcompiler.cli", *argv], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert_one_error_line(proc.returncode, proc.stderr, "not finite")
    assert not out.exists()


# -- classify: the table of docs/DESIGN.md 2.4 through the command line --------------------------
@pytest.mark.parametrize("depth,param,r,regime", [
    (2, "mup", "0", "feature learning"),
    (3, "mup", "0", "feature learning"),
    (1, "mfp", "0", "feature learning"),
    (2, "ntp", "1/2", "kernel"),
    (2, "sp_c1", "1/2", "kernel"),
    (2, "sp", "-1", "unstable"),
])
def test_classify_json(capsys, depth, param, r, regime):
    rc, out, err = tpc(capsys, "classify", "--depth", depth, "--param", param, "--json")
    assert rc == 0 and err == ""
    assert len(out.strip().splitlines()) == 1
    report = json.loads(out)
    stable = regime != "unstable"
    assert report["r"] == r and report["regime"] == regime
    assert report["stable"] is stable and report["feature_learning"] is (regime == "feature learning")
    assert report["nontrivial"] is (regime in ("feature learning", "kernel"))
    assert set(report) == {"stable", "nontrivial", "feature_learning", "r", "regime", "violated"}
    if stable:
        assert report["violated"] == []
    else:
        assert len(report["violated"]) == 3 and any("r = -1 < 0" in v for v in report["violated"])


def test_classify_explicit_exponents_match_the_name(capsys):
    """muP shifted by t = -1/3 given as exponents (--a=... so argparse reads the leading '-')."""
    s = tp.named("mup", 2).shifted("-1/3")
    args = ["--a=" + ",".join(map(str, s.a)), "--b=" + ",".join(map(str, s.b)), f"--c={s.c}"]
    rc, out, err = tpc(capsys, "classify", "--depth", 2, *args, "--json")
    rc2, out2, _ = tpc(capsys, "classify", "--depth", 2, "--param", "mup", "--json")
    assert rc == rc2 == 0, err
    assert json.loads(out) == json.loads(out2)


def test_classify_negative_exponents_in_the_documented_form(capsys):
    """docs/DESIGN.md 5 writes `--a a1,..,a_{L+1}`; muP's a_1 = -1/2 must be accepted that way."""
    rc, out, err = tpc(capsys, "classify", "--depth", 2, "--a", "-1/2,0,1/2", "--b", "1/2", "--c", "0", "--json")
    assert rc == 0, err
    assert json.loads(out)["regime"] == "feature learning"


def test_a_history_that_does_not_fit_in_memory_is_one_line(capsys, data, tmp_path, monkeypatch):
    """The step engine reserves the whole history before the first step; with (pretend) 1 MiB
    available, `tpc train` with muP (feature learning: particles) says what it needs."""
    from tpcompiler.training import engine

    monkeypatch.setattr(engine, "available_memory", lambda: 2**20)
    rc, _, err = tpc(capsys, *train_argv(data, tmp_path / "T.npz", "mup"))
    assert_one_error_line(rc, err, "GiB", "available", "fewer particles")
    assert not (tmp_path / "T.npz").exists()


def test_the_state_file_written_is_named(capsys, data):
    """--save-state STATE (no suffix): numpy writes STATE.npz, and the command says so, as it
    does for --out (docs audit: the step engine's line named no state file)."""
    out, state = data["dir"] / "with_state.npz", data["dir"] / "state_without_suffix"
    rc, stdout, err = tpc(capsys, *train_argv(data, out, "mup", "--save-state", state, "--quiet"))
    assert rc == 0, err
    assert f"; state {state}.npz" in stdout and (data["dir"] / "state_without_suffix.npz").exists()


def test_a_state_resumed_with_another_batch_is_one_error_line(capsys, data):
    """--resume with another --batch than the state's run: one line naming --resume and both
    batches (it continued in silence with the new batch: training audit)."""
    out, state = data["dir"] / "batch1.npz", data["dir"] / "batch1_state.npz"
    rc, _, err = tpc(capsys, *train_argv(data, out, "mup", "--batch", 1, "--save-state", state, "--quiet"))
    assert rc == 0, err
    argv = train_argv(data, data["dir"] / "batch2.npz", "mup", "--batch", 2, "--resume", state, "--quiet")
    argv[argv.index("--steps") + 1] = STEPS + 1
    rc, _, err = tpc(capsys, *argv)
    assert_one_error_line(rc, err, "--resume:", "batch 1, not 2")


def test_a_diverging_kernel_run_is_written_with_one_warning_line(capsys, data):
    """Kernel gradient descent past its stable rate is still the limit: the trajectory is
    written (exit 0), and stderr has one line saying it diverges, not Python's two-line form."""
    out = data["dir"] / "diverging.npz"
    argv = train_argv(data, out, "ntp")
    argv[argv.index("--lr") + 1] = 1000.0
    rc, stdout, err = tpc(capsys, *argv)
    assert rc == 0, err
    assert err.splitlines() == [err.strip()] and err.startswith("tpc: warning: kernel gradient descent diverges"), err
    with np.load(out) as T:
        assert np.isfinite(T["f_train"]).all() and np.abs(T["f_train"][-1]).max() > 1e6


def test_train_particles_below_ten_groups_run_in_two_groups(capsys, data):
    """The step engine needs 4 particles per group (the bias extrapolation's half-size run has
    2), so tp.train splits them into 10 groups from 40 particles on and into 2 below: 20 to 39
    were split into 10 and refused as "expected >= 40", while 8 to 19 ran."""
    out = data["dir"] / "p30.npz"
    # (one step: few jointly Gaussian members per matrix family, which 15 particles per group hold)
    rc, stdout, err = tpc(capsys, *train_argv(data, out, "mup", "--particles", 30, "--steps", 1))
    assert rc == 0, err
    with np.load(out) as T:
        assert str(T["regime"]) == "feature learning"
        assert np.isfinite(T["f_train"]).all() and np.abs(T["f_train"][-1]).max() > 0
    rc, _, err = tpc(capsys, *train_argv(data, data["dir"] / "p7.npz", "mup", "--particles", 7))
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--particles" in err and ">= 8" in err, err
