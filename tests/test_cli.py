"""The `tpc` command line (docs/DESIGN.md 5): output formats, and errors that are exactly one line
"tpc: error: ..." on stderr with a non-zero exit, never a traceback."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tpcompiler.cli.commands import main

ROOT = Path(__file__).resolve().parent.parent
ZDOT = str(ROOT / "programs" / "zdot.py")
MLP = str(ROOT / "programs" / "mlp.py")
ZDOT_OUTPUTS = {"hh", "vu", "vv", "wg", "ru", "rv", "su"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tpc(capsys, *argv):
    """Run tpc in-process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_tpc(*argv):
    proc = subprocess.run([sys.executable, "-m", "tpcompiler.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_error_line(rc, err, match=""):
    assert rc != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {err!r}"
    assert lines[0].startswith("tpc: error: "), lines[0]
    assert match in lines[0], (match, lines[0])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    files = {
        "X": rng.standard_normal((3, 4)),
        "Xnan": np.array([[1.0, np.nan, 0.0, 0.5], [0.0, 1.0, 2.0, 3.0]]),
        "Xstr": np.array(["a", "b"]),
        "X3d": np.ones((2, 3, 1)),
    }
    paths = {}
    for name, arr in files.items():
        np.save(d / f"{name}.npy", arr)
        paths[name] = d / f"{name}.npy"
    paths["text"] = d / "text.npy"
    paths["text"].write_text("not an array\n")
    paths["csv"] = d / "X.csv"
    paths["csv"].write_text("1,2,3,4\n")
    paths["nobuild"] = d / "nobuild.py"
    paths["nobuild"].write_text("x = 1\n")
    paths["dir"] = d
    return paths


# -- formulas ----------------------------------------------------------------------------
def test_formulas_markdown(capsys):
    rc, out, err = tpc(capsys, "formulas", ZDOT)
    assert rc == 0 and err == ""
    assert out.lstrip().startswith("#") and "zdot" in out
    assert "Z^{v}" in out and r"\mathbb{E}" in out and r"\dot{Z}" in out


def test_formulas_latex(capsys):
    rc, out, err = tpc(capsys, "formulas", ZDOT, "--format", "latex")
    assert rc == 0 and err == ""
    assert r"\begin{align*}" in out and r"\end{align*}" in out
    assert "\n## " not in out  # not markdown


def test_formulas_params_change_the_program(capsys):
    _, out_tanh, _ = tpc(capsys, "formulas", ZDOT)
    rc, out_sin, _ = tpc(capsys, "formulas", ZDOT, "-p", "phi=sin", "-p", "sigma=2.0")
    assert rc == 0 and out_sin != out_tanh and "2" in out_sin


# -- limit / simulate: JSON formats ----------------------------------------------------
def test_limit_json_format(capsys):
    rc, out, err = tpc(capsys, "limit", ZDOT, "--particles", 20000, "--json")
    assert rc == 0 and err == ""
    result = json.loads(out)
    assert set(result) == ZDOT_OUTPUTS
    for name, entry in result.items():
        assert set(entry) == {"value", "stderr"}, name
        assert isinstance(entry["value"], float) and math.isfinite(entry["value"])
        assert isinstance(entry["stderr"], float) and entry["stderr"] >= 0
    assert abs(result["hh"]["value"] - 1.5**2) < 5 * result["hh"]["stderr"] + 1e-9  # E[h h] = sigma^2


def test_limit_text_format(capsys):
    rc, out, err = tpc(capsys, "limit", ZDOT, "--particles", 20000)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["hh", "vu", "vv", "wg", "ru", "rv", "su"]


def test_simulate_json_format(capsys):
    rc, out, err = tpc(capsys, "simulate", ZDOT, "--width", 64, "--seeds", 3, "--json")
    assert rc == 0 and err == ""
    result = json.loads(out)
    assert set(result) == ZDOT_OUTPUTS
    for name, entry in result.items():
        assert set(entry) == {"mean", "stderr"}, name
        assert math.isfinite(entry["mean"]) and entry["stderr"] > 0


def test_simulate_one_seed(capsys):
    rc, out, err = tpc(capsys, "simulate", ZDOT, "--width", 32, "--json")
    assert rc == 0
    # strict JSON: NaN is not a JSON value, so one seed's missing stderr is null
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert set(result) == ZDOT_OUTPUTS
    assert all(entry["stderr"] is None and math.isfinite(entry["mean"]) for entry in result.values())


def test_limit_mlp_with_data_fills_d(capsys, data):
    rc, out, err = tpc(capsys, "limit", MLP, "--x", data["X"], "--particles", 20000, "--json")
    # (the limit is exact, pairwise: a given --particles is said not to be used, as tpc train says)
    assert rc == 0 and err == "tpc: note: --particles not used (the limit is exact)\n"
    result = json.loads(out)
    expected = {f"{k}[{a},{b}]" for k in ("nngp", "ntk") for a in range(3) for b in range(3)}
    assert set(result) == expected
    for k in ("nngp", "ntk"):
        for a in range(3):
            assert result[f"{k}[{a},{a}]"]["value"] > 0
            for b in range(3):  # kernels are symmetric (same particles for both orders)
                assert result[f"{k}[{a},{b}]"]["value"] == pytest.approx(result[f"{k}[{b},{a}]"]["value"])


def test_simulate_mlp_with_data(capsys, data):
    rc, out, err = tpc(capsys, "simulate", MLP, "--x", data["X"], "--width", 32, "--seeds", 2, "--json")
    assert rc == 0
    assert len(json.loads(out)) == 18


# -- check ---------------------------------------------------------------------------------
def test_check_report_and_plot(capsys, tmp_path):
    png = tmp_path / "f.png"
    rc, out, err = tpc(capsys, "check", ZDOT, "--widths", "32,64,128", "--seeds", 3,
                       "--particles", 20000, "--plot", png)
    assert rc in (0, 1)
    assert "Traceback" not in err
    for name in ZDOT_OUTPUTS:
        assert f"\n{name}: limit " in "\n" + out
    for width in (32, 64, 128):
        assert len([line for line in out.splitlines() if line.split()[:1] == [str(width)]]) == len(ZDOT_OUTPUTS)
    verdicts = [line for line in out.splitlines() if line.strip().startswith("slope ")]
    assert len(verdicts) == len(ZDOT_OUTPUTS)
    assert all(("PASS" in v) != ("FAIL" in v) for v in verdicts)
    assert out.rstrip().splitlines()[-1] == ("PASS" if rc == 0 else "FAIL")
    # 3 seeds: the verdict comes with a note that so few seeds make it rough
    assert "note: 3 seeds give rough standard errors" in out and "--seeds 10 or more" in out
    assert png.read_bytes()[:8] == PNG_MAGIC
    rc, out, err = tpc(capsys, "check", ZDOT, "--widths", "8,16", "--seeds", 10, "--particles", 2000)
    assert "note:" not in out and out.rstrip().splitlines()[-1] in ("PASS", "FAIL")


# -- classify ------------------------------------------------------------------------------
def test_classify_mup_json(capsys):
    rc, out, err = tpc(capsys, "classify", "--depth", 2, "--param", "mup", "--json")
    assert rc == 0
    report = json.loads(out)
    assert {"stable", "nontrivial", "feature_learning", "r", "regime", "violated"} <= set(report)
    assert report["stable"] is True and report["nontrivial"] is True and report["feature_learning"] is True
    assert report["r"] == "0" and report["regime"] == "feature learning" and report["violated"] == []


def test_classify_sp_json(capsys):
    rc, out, err = tpc(capsys, "classify", "--depth", 2, "--param", "sp", "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["stable"] is False and report["regime"] == "unstable"
    assert report["violated"] and all(isinstance(v, str) and v for v in report["violated"])


# -- errors: one line, non-zero, no traceback ------------------------------------------------
ERRORS = [
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "give a command"),
    (["formulas", "nothere.py"], "program file 'nothere.py' not found"),
    (["formulas", "{nobuild}"], "defines no build(**params) function"),
    (["formulas", ZDOT, "-p", "foo=1"], "has no parameter 'foo'; its parameters are: phi, sigma"),
    (["formulas", ZDOT, "-p", "foo"], "parameter 'foo' must look like key=value"),
    (["formulas", ZDOT, "-p", "1a=2"], "parameter name '1a' is not a valid name"),
    (["formulas", ZDOT, "-p", "sigma=1", "-p", "sigma=2"], "parameter 'sigma' is given twice, as 1 and as 2; give it once"),
    (["formulas", ZDOT, "-p", "phi=foo"], "unknown nonlinearity 'foo'"),
    (["formulas", ZDOT, "--format", "html"], "invalid choice: 'html'"),
    (["limit", MLP, "--x", "missing.npy"], "--x file 'missing.npy' not found"),
    (["limit", MLP, "--x", "{text}"], "is not a .npy array file"),
    (["limit", MLP, "--x", "{csv}"], "is not a .npy array file"),
    (["limit", MLP, "--x", "{dir}"], "cannot be read"),
    (["limit", MLP, "--x", "{Xstr}"], "does not hold numbers"),
    (["limit", MLP, "--x", "{X3d}"], "--x must be an N x d array, got shape (2, 3, 1) (one row per example: reshape"),
    (["limit", MLP, "--x", "{X}", "-p", "d=3", "--particles", "2000"], "input 'xi' has dimension 3, data has shape (3, 4)"),
    (["limit", ZDOT, "--x", "{X}", "--particles", "2000"], "program 'zdot' has no input, but input data was given"),
    (["limit", MLP, "--x", "{Xnan}", "--particles", "2000"], "NaN or infinite"),
    (["simulate", MLP, "--x", "{Xnan}", "--width", "16"], "NaN or infinite"),
    (["limit", ZDOT, "--particles", "abc"], "invalid int value: 'abc'"),
    (["simulate", ZDOT], "the following arguments are required: --width"),
    (["simulate", ZDOT, "--width", "0"], "argument --width: expected a positive integer, got 0"),
    (["check", ZDOT, "--widths", "64,abc"], "--widths must be comma-separated integers, got '64,abc'"),
    (["check", ZDOT, "--widths", ""], "--widths must be comma-separated integers"),
    (["check", ZDOT, "--widths", "64", "--particles", "2000"], "at least two widths"),
    (["check", ZDOT, "--widths", "32,64", "--seeds", "1", "--particles", "2000"], "at least two seeds"),
    (["check", ZDOT, "--widths", "16,32", "--seeds", "2", "--particles", "2000", "--plot", "/nonexistent/dir/f.png"],
     "--plot: cannot write '/nonexistent/dir/f.png'"),
    (["limit", MLP, "-p", "depth=0", "--particles", "2000"], "depth must be a positive integer, got 0"),
    # Python counts True as 1: mlp.py built depth 1 (CLI audit)
    (["limit", MLP, "-p", "depth=True", "--particles", "2000"], "parameter 'depth' is a number (default 2), got the boolean True"),
    (["limit", ZDOT, "-p", "sigma=abc"], "matrix 'W': sigma: expected a number, got 'abc'"),
    # a step network's backward pass reads step' = delta: E[delta delta'] diverges on the NTK's diagonal,
    # and particles cannot evaluate a delta (an internal error with exit 3 before; a QA finding)
    (["limit", MLP, "-p", "phi=step", "-p", "depth=1"],
     "instruction 'dh1': a Dirac delta has no value at particles (samples); the exact pairwise limit did not apply: "
     "the pairwise-Gaussian value of 'ntk[0,0]' is not finite"),
    (["limit", MLP, "-p", "phi=step", "-p", "depth=1", "--method", "particles"],
     "a Dirac delta has no value at particles (samples); its limit needs Stein's lemma"),
    (["classify", "--depth", "2"], "give --param NAME or --a/--b/--c"),
    (["classify", "--depth", "2", "--param", "foo"], "unknown parametrization 'foo'"),
]


@pytest.mark.parametrize("argv, match", ERRORS, ids=[" ".join(a)[:60] for a, _ in ERRORS])
def test_errors_are_one_line(capsys, data, argv, match):
    argv = [a.format(**data) if a.startswith("{") else a for a in argv]
    rc, out, err = tpc(capsys, *argv)
    assert_one_error_line(rc, err, match)


CLASSIFY = [sys.executable, "-m", "tpcompiler.cli", "classify", "--depth", "2", "--param", "mup"]


def _classify(**streams) -> subprocess.CompletedProcess:
    return subprocess.run(CLASSIFY, cwd=ROOT, timeout=120, text=True, **streams)


def test_output_that_cannot_be_written_is_one_line():
    """stdout closed (>&-), on a full disk (/dev/full), or read by a reader that stops (| head):
    before, an exit status 0 with the output silently lost, an "internal error" (OSError), and
    an "internal error" (BrokenPipeError) (CLI audit)."""
    closed = _classify(stdout=None, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, close_fds=True,
                       preexec_fn=lambda: __import__("os").close(1))
    assert_one_error_line(closed.returncode, closed.stderr, "standard output is closed")
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            proc = _classify(stdout=full, stderr=subprocess.PIPE)
        assert_one_error_line(proc.returncode, proc.stderr, "writing the output: No space left on device")
    reader = subprocess.Popen(CLASSIFY, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader.stdout.close()  # the reader stops before the first line
    assert reader.wait(timeout=120) == 141
    assert reader.stderr.read() == ""


def test_failing_build_is_one_line(capsys, tmp_path):
    path = tmp_path / "raises.py"
    path.write_text("def build():\n    raise RuntimeError('boom\\nmore')\n")
    rc, out, err = tpc(capsys, "formulas", path)
    assert_one_error_line(rc, err, "build() in")
    assert "RuntimeError: boom" in err


# -- as a real process ---------------------------------------------------------------------
def test_subprocess_success():
    rc, out, err = subprocess_tpc("limit", ZDOT, "--particles", 2000, "--json")
    assert rc == 0, err
    assert "Traceback" not in err
    assert set(json.loads(out)) == ZDOT_OUTPUTS


@pytest.mark.parametrize("argv, match", [
    (["bogus"], "invalid choice"),
    (["formulas", "nothere.py"], "not found"),
    (["formulas", ZDOT, "-p", "phi=foo"], "unknown nonlinearity 'foo'"),
    (["limit", MLP, "--x", "{Xnan}", "--particles", "2000"], "NaN or infinite"),
])
def test_subprocess_errors(data, argv, match):
    argv = [a.format(**data) if a.startswith("{") else a for a in argv]
    rc, out, err = subprocess_tpc(*argv)
    assert rc == 2
    assert_one_error_line(rc, err, match)


def test_installed_entry_point():
    exe = Path(sys.executable).with_name("tpc")
    if not exe.exists():
        pytest.skip("tpc entry point not installed next to this interpreter")
    proc = subprocess.run([str(exe), "formulas", "nothere.py"], capture_output=True, text=True, timeout=60)
    assert_one_error_line(proc.returncode, proc.stderr, "not found")


@pytest.mark.parametrize("argv", [
    ["limit", MLP], ["simulate", MLP, "--width", 16], ["check", MLP, "--widths", "16,32"],
    ["kernels", MLP, "--out", "K.npz"], ["predict", MLP, "--y", "Y1.npy", "--xt", "X1.npy", "--out", "P.npz"],
])
def test_one_dimensional_inputs_are_refused_by_every_command(capsys, tmp_path, monkeypatch, argv):
    """A 1-D --x: tpc limit, simulate and check read its N values as one example of dimension N
    (QA), the other commands refused it; now every command says how to save it."""
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "X1.npy", np.array([0.3, -1.3, -0.5, 0.2]))
    np.save(tmp_path / "Y1.npy", np.array([0.1, 0.2, 0.3, 0.4]))
    rc, _, err = tpc(capsys, *argv, "--x", "X1.npy")
    assert_one_error_line(rc, err, "--x must be an N x d array (one row per example), got shape (4,)")
