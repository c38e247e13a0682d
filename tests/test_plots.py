"""Plots and progress (issue 12): `tpc coordcheck/train/kernels --plot` write an image that
matplotlib reads back, with the panels and lines the figure promises (counted on the figure
object); progress bars stay off the output when standard error is not a terminal or --quiet is
given and appear when forced; bad input is one line on stderr."""
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler import plotting, progress
from tpcompiler.cli.commands import main

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "programs" / "mlp.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("plots")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 3))
    np.save(d / "X.npy", X)
    np.save(d / "Y.npy", np.sin(X[:, 0]))
    return d


def tpc(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def figures(monkeypatch):
    """The figures the commands save (the file is written as usual)."""
    saved = []
    real = plotting.save

    def keep(fig, path, dpi=110):
        saved.append(fig)
        real(fig, path, dpi)

    monkeypatch.setattr(plotting, "save", keep)
    return saved


def _image(path: Path) -> np.ndarray:
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


def test_coordcheck_json_and_plot_have_a_panel_per_parametrization_and_step(capsys, tmp_path, figures):
    path = tmp_path / "cc.png"
    rc, out, err = tpc(capsys, "coordcheck", MLP, "-p", "depth=2", "--params", "mup,ntp", "--widths", "16,32",
                       "--steps", "1", "--seeds", "2", "--plot", path, "--json")
    assert rc == 0, err
    result = json.loads(out)  # stdout is JSON only; the plot's path is in it and on stderr
    assert result["plot"] == str(path) and f"plot written to {path}" in err
    assert set(result["params"]) == {"mup", "ntp"} and result["widths"] == [16, 32]
    layers = result["layers"]
    assert layers == ["g", "h1", "x1", "h2", "x2", "f"]
    change = result["params"]["ntp"]["change"]["h2"]
    assert len(change["values"]) == 1 and len(change["values"][0]) == 2 and len(change["slopes"]) == 1
    _image(path)
    (fig,) = figures
    axes = fig.get_axes()
    assert len(axes) == 2 * 2  # parametrizations x (init + 1 step)
    assert all(len(ax.get_lines()) == len(layers) for ax in axes)


def test_coordcheck_report_is_a_table_of_exponents(capsys):
    rc, out, err = tpc(capsys, "coordcheck", MLP, "-p", "depth=1", "--param", "mup", "--widths", "8,16",
                       "--steps", "1", "--seeds", "1")
    assert rc == 0, err
    assert "mup (a=-1/2,1/2;b=1/2,1/2;c=0):" in out
    assert "change@1" in out and "init size" in out


def test_train_plot_draws_the_limit_and_each_finite_width(capsys, data, tmp_path, figures):
    path = tmp_path / "train.svg"
    rc, out, err = tpc(capsys, "train", MLP, "-p", "depth=2", "-p", "phi=identity", "--param", "mup",
                       "--x", data / "X.npy", "--y", data / "Y.npy", "--lr", "0.5", "--steps", "3",
                       "--out", tmp_path / "t.npz", "--plot", path, "--widths", "16,32", "--seeds", "2")
    assert rc == 0, err
    assert f"plot written to {path}" in out
    assert path.read_text().lstrip().startswith("<?xml") and "<svg" in path.read_text()[:2000]
    (fig,) = figures
    loss_ax, f_ax = fig.get_axes()
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels == ["limit (feature learning)", "width 16 (2 seeds)", "width 32 (2 seeds)"]
    # f on the first 3 training inputs per trajectory, plus the 3 target lines
    assert len(f_ax.get_lines()) == 3 * 3 + 3
    # the limit's loss is that of the trajectory written to --out
    f = np.load(tmp_path / "t.npz")["f_train"]
    Y = np.sin(np.load(data / "X.npy")[:, 0])
    np.testing.assert_allclose(loss_ax.get_lines()[0].get_ydata(), 0.5 * np.mean((f - Y) ** 2, axis=1), rtol=1e-12)


def test_kernels_plot_has_two_heat_maps(capsys, data, tmp_path, figures):
    path = tmp_path / "k.png"
    rc, out, err = tpc(capsys, "kernels", MLP, "-p", "depth=1", "--x", data / "X.npy", "--out", tmp_path / "k.npz",
                       "--plot", path)
    assert rc == 0, err
    assert f"plot written to {path}" in out
    _image(path)
    (fig,) = figures
    heat = [ax for ax in fig.get_axes() if ax.get_images()]
    assert [ax.get_title().split()[0] for ax in heat] == ["NNGP", "NTK"]
    K = np.load(tmp_path / "k.npz")
    np.testing.assert_array_equal(heat[1].get_images()[0].get_array(), K["ntk"])


# -- progress --------------------------------------------------------------------------------
def _count_to(n, **kwargs):
    with progress.bar(n, "counting", unit="it", **kwargs) as b:
        for _ in range(n):
            b.update(1)


def test_progress_is_quiet_when_stderr_is_not_a_terminal(capsys):
    _count_to(5)
    with progress.status("compiling"):
        pass
    assert capsys.readouterr().err == ""


def test_progress_appears_when_forced_and_explicit_flags_win(capsys):
    with progress.configured(True):
        _count_to(5)
        with progress.status("compiling"):
            pass
        _count_to(5, enabled=False)
    err = capsys.readouterr().err
    assert "counting" in err and "5/5" in err
    assert "compiling" in err and "done" in err
    assert err.count("counting") >= 1 and "5/5" in err.split("compiling")[0]
    with progress.configured(False):
        _count_to(5, enabled=True)
    assert "counting" in capsys.readouterr().err


def test_a_status_line_waits_for_its_delay_and_names_its_steps(capsys):
    import time

    with progress.configured(True):
        with progress.status("quick", delay=5.0) as running:
            running("a step")
        assert capsys.readouterr().err == ""  # over before its delay
        with progress.status("slow", delay=0.2) as running:
            running("first step")
            time.sleep(progress.STATUS_REFRESH + 0.3)
            running("second step")
            time.sleep(progress.STATUS_REFRESH + 0.1)
    err = capsys.readouterr().err
    assert "slow" in err and "first step" in err and "second step" in err and "done" in err
    with progress.status("hidden", delay=0.0) as running:
        running("a step")  # not a terminal: nothing, and the step function still takes its text
    assert capsys.readouterr().err == ""


def test_compile_and_kernel_derivation_say_which_step_runs_when_slow(capsys, monkeypatch, tmp_path):
    """tp.compile and a kernel derivation show a status line naming the pass or step that runs,
    once they have run progress.COMPILE_DELAY seconds (set to 0 here; most programs are
    quicker than the default and print nothing)."""
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path))
    net = tp.load(MLP, depth=1, d=3)
    with progress.configured(True):
        tp.compile(net).kernel_function(cache=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "COMPILE_DELAY", 0.0)
    with progress.configured(True):
        tp.compile(net).kernel_function(cache=False)
    err = capsys.readouterr().err
    assert "tp.compile mlp" in err and "kernel program" in err and "derive" in err
    assert "kernels: deriving mlp" in err and "pair expectations" in err and err.count("done") == 2


def test_timed_steps_records_each_step_of_a_status_call_shown_or_not(capsys, monkeypatch, tmp_path):
    """Within progress.timed_steps(), a status call's steps are recorded with their wall time
    (a step lasts until the next one starts or the call ends), printed or not; a compilation's
    steps are its passes, one after the other within its time."""
    import time

    with progress.timed_steps() as times:
        with progress.status("hidden call") as running:
            running("short")
            time.sleep(0.02)
            running("long")
            time.sleep(0.2)
        with progress.configured(True), progress.status("shown call", delay=0.0) as running:
            running("only")
    assert [(d, s) for d, s, _ in times] == [("hidden call", "short"), ("hidden call", "long"), ("shown call", "only")]
    assert 0.02 <= times[0][2] < 0.2 <= times[1][2]
    assert "shown call" in capsys.readouterr().err
    with progress.status("after the block") as running:
        running("not recorded")
    assert len(times) == 3
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path))
    net = tp.load(MLP, depth=1, d=3)
    with progress.timed_steps() as times:
        start = time.perf_counter()
        tp.compile(net).kernel_function(cache=False)
        took = time.perf_counter() - start
    steps = {s for d, s, _ in times if d == "kernels: deriving mlp"}
    assert {"kernel program", "pair expectations", "writing code"} <= steps
    assert all(t > 0 for _, _, t in times) and sum(t for _, _, t in times) <= took


def test_fit_shows_its_bar_only_when_forced(capsys):
    net = tp.load(MLP, depth=1, phi="identity", d=3)
    X, Y = np.ones((2, 3)), np.ones((2, 1))
    eng = tp.StepEngine(net, tp.named("mup", 1), method="finite", width=8, seeds=1)
    tp.fit(eng, X, Y, steps=2, lr=0.1)
    assert capsys.readouterr().err == ""
    with progress.configured(True):
        tp.fit(eng, X, Y, steps=2, lr=0.1)
    assert "train (finite)" in capsys.readouterr().err


def test_particle_limit_shows_its_groups_only_when_forced(capsys):
    p = tp.Program("tiny")
    h = p.mat("W") @ p.vec("u")
    p.output("s", tp.mean(tp.tanh(h) * tp.tanh(h)))
    c = tp.compile(p)
    quiet = c.limit(particles=2000, method="particles")
    assert capsys.readouterr().err == ""
    with progress.configured(True):
        forced = c.limit(particles=2000, method="particles")
    err = capsys.readouterr().err
    assert "particles (2000)" in err and "10/10" in err
    assert forced == quiet  # the bar does not touch the random streams


def test_quiet_option_silences_a_forced_bar(capsys):
    argv = ["coordcheck", MLP, "-p", "depth=1", "--params", "mup", "--widths", "8,16", "--steps", "1", "--seeds", "1"]
    with progress.configured(True):
        rc, _, err = tpc(capsys, *argv)
        assert rc == 0 and "coordcheck" in err
        rc, _, err = tpc(capsys, *argv, "--quiet")
    assert rc == 0 and err == ""


# -- bad input: one line on stderr -----------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--params", "mup,bogus"], "--params: unknown parametrization 'bogus'"),
    (["--widths", "128,64"], "--widths must be at least 2 strictly increasing integers"),
    (["--widths", "64,64"], "--widths must be at least 2 strictly increasing integers"),
    (["--widths", "64"], "--widths must be at least 2 strictly increasing integers"),
    (["--widths", "64,1.5"], "--widths must be comma-separated positive integers"),
    (["--widths", "0,64"], "--widths must be comma-separated positive integers"),
    (["--plot", "/nonexistent-dir-tpc/cc.png"], "--plot: cannot write '/nonexistent-dir-tpc/cc.png' (directory"),
    (["--plot", "cc.jpg"], "--plot: cannot write 'cc.jpg': unsupported format '.jpg'"),
    (["--steps", "0"], "argument --steps"),
    (["--param", "a=0;b=0;c=0;d=1"], ""),
])
def test_coordcheck_bad_input_is_one_line(capsys, args, message):
    rc, out, err = tpc(capsys, "coordcheck", MLP, "-p", "depth=1", "--widths", "8,16", *args)
    assert rc == 2, err
    assert err.startswith("tpc: error: ") and err.count("\n") == 1
    assert message in err


def test_coordcheck_data_must_match(capsys, data, tmp_path):
    np.save(tmp_path / "Y5.npy", np.ones(5))
    rc, _, err = tpc(capsys, "coordcheck", MLP, "-p", "depth=1", "--widths", "8,16", "--x", data / "X.npy",
                     "--y", tmp_path / "Y5.npy")
    assert rc == 2 and err.startswith("tpc: error: --y: need one row of targets per row of X (4)") and err.count("\n") == 1
    rc, _, err = tpc(capsys, "coordcheck", MLP, "-p", "depth=1", "--widths", "8,16", "--x", data / "X.npy")
    assert rc == 2 and "--x and --y go together" in err


def test_train_and_kernels_plot_bad_input_is_one_line(capsys, data, tmp_path):
    common = ["train", MLP, "-p", "depth=1", "--param", "mup", "--x", data / "X.npy", "--y", data / "Y.npy",
              "--lr", "0.1", "--steps", "1", "--out", tmp_path / "t.npz"]
    rc, _, err = tpc(capsys, *common, "--widths", "16,32")
    assert rc == 2 and "--widths: finite widths are trained for the plot only" in err and err.count("\n") == 1
    rc, _, err = tpc(capsys, *common, "--plot", tmp_path / "p.png", "--widths", "32,16")
    assert rc == 2 and "--widths must be strictly increasing" in err and err.count("\n") == 1
    rc, _, err = tpc(capsys, "kernels", MLP, "--x", data / "X.npy", "--out", tmp_path / "k.npz",
                     "--plot", tmp_path / "missing" / "k.png")
    assert rc == 2 and "--plot: cannot write" in err and "does not exist" in err and err.count("\n") == 1


def test_api_refuses_bad_widths_and_params():
    net = tp.load(MLP, depth=1, d=3)
    with pytest.raises(tp.ProgramError, match="widths: need at least two strictly increasing integers"):
        tp.coordcheck(net, "mup", [32, 16])
    with pytest.raises(tp.ProgramError, match="unknown parametrization 'nope'"):
        tp.coordcheck(net, ["mup", "nope"], [8, 16])
