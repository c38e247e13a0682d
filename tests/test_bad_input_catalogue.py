"""Bad-input catalogue (issue 7, "What to build" item 2, invalid-input half).

Every row is one invalid input to ``tpc`` or to the Python API.  Each must be refused: ``tpc``
with exactly one line "tpc: error: ..." on stderr and exit code 2 (a user error, not an
internal one, never a traceback, nothing written), the API with an exception of the project's
error type (``tp.ProgramError``; ``DSLError`` and ``validation.ArgumentError`` are ones).  The
message must name the culprit: each row carries a regex that the message must match.

CLI rows run ``tpcompiler.cli.main`` in-process (fast); a few run as real processes.
"""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import tpcompiler as tp
from tpcompiler.cli.commands import main
from tpcompiler.validation import ArgumentError

ROOT = Path(__file__).resolve().parent.parent
ZDOT = str(ROOT / "programs" / "zdot.py")
MLP = str(ROOT / "programs" / "mlp.py")
PINET = str(ROOT / "programs" / "pinet.py")

PROGRAM_FILES = {
    "noout": "import tpcompiler as tp\n\ndef build():\n    p = tp.Program('noout')\n    p.vec('u')\n    return p\n",
    "exit0": "import sys\n\ndef build():\n    sys.exit(0)\n",
    "exit_import": "import sys\nsys.exit(3)\n\ndef build():\n    pass\n",
    "bigsigma": ("import tpcompiler as tp\n\ndef build(sigma=1e200, var=1.0):\n    p = tp.Program('big')\n"
                 "    u = p.vec('u', var=var)\n    W = p.mat('W', sigma=sigma)\n    h = W @ u\n"
                 "    p.output('m', tp.mean(h * h))\n    return p\n"),
    "foreign": ("import sympy as sp\nimport tpcompiler as tp\n\ndef build():\n    p = tp.Program('f')\n"
                "    u = p.vec('u')\n    z = sp.Symbol('zeta')\n    v = tp.nonlin(lambda a: sp.tanh(a + z), u)\n"
                "    p.output('m', tp.mean(v * v))\n    return p\n"),
    "undefined": ("import sympy as sp\nimport tpcompiler as tp\n\ndef build():\n    p = tp.Program('f')\n"
                  "    u = p.vec('u')\n    F = sp.Function('Fancy')\n    v = tp.nonlin(lambda a: F(a), u)\n"
                  "    p.output('m', tp.mean(v * v))\n    return p\n"),
    "dirac": ("import sympy as sp\nimport tpcompiler as tp\n\ndef build():\n    p = tp.Program('dirac')\n"
              "    u = p.vec('u')\n    W = p.mat('W')\n    h = W @ u\n    v = tp.nonlin(lambda a: sp.DiracDelta(a), h)\n"
              "    p.output('m', tp.mean(v * u))\n    return p\n"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("catalogue")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 3))
    arrays = {
        "X": X,
        "Y": np.array([1.0, -1.0, 0.5]),
        "Y01": np.array([1.0, 0.0, 1.0]),
        "Y012": np.array([1.0, 0.0, 2.0]),
        "Y15": np.array([1.5, 0.0, 1.0]),
        "Ynan": np.array([1.0, np.nan, 0.0]),
        "Yc": np.array([1.0, 0.0, 1.0]) + 1j,
        "Xc": X + 1j,
        "Xc0": X.astype(np.complex128),  # complex dtype with zero imaginary part: still refused
        "Xnan": np.where(np.eye(3) > 0, np.nan, X),
        "Xinf": np.where(np.eye(3) > 0, -np.inf, X),
        "Xbig": X * 1e200,
        "Xbig60": X * 1e60,
        "X1d": X[0],
        "X3d": X[None],
        "X4": rng.standard_normal((2, 4)),
        "Xd0": np.zeros((3, 0)),
        "Xstr": np.array([["a", "b", "c"]]),
        "X0d": np.float64(3.0),
        "Xempty": np.zeros((0, 3)),
        "Yempty": np.zeros(0),
    }
    paths = {}
    for name, arr in arrays.items():
        paths[name] = str(d / f"{name}.npy")
        np.save(paths[name], arr)
    for name, text in PROGRAM_FILES.items():
        paths[name] = str(d / f"{name}.py")
        Path(paths[name]).write_text(text)
    paths["dir"] = str(d)
    paths["missing_dir_out"] = str(d / "no" / "such" / "K.npz")
    return paths


def train(*extra, param="ntp", x="{X}", y="{Y}", lr="0.5", steps="2"):
    """tpc train argv with one thing changed (options given later override earlier ones)."""
    return ["train", MLP, "-p", "depth=1", "--param", param, "--x", x, "--y", y, "--lr", lr,
            "--steps", steps, "--particles", "2000", "--out", "{dir}/T.npz", *extra]


def kernels(*extra, x="{X}"):
    return ["kernels", MLP, "-p", "depth=1", "--x", x, "--out", "{dir}/K.npz", *extra]


# (argv, regex the error line must match)
CLI_CASES = [
    # -- counts: particles, seed, width, seeds, depth, batch, steps
    (["limit", ZDOT, "--particles", "0"], r"--particles: expected a positive integer, got 0"),
    (["limit", ZDOT, "--particles", "-5"], r"--particles: expected a positive integer, got -5"),
    (["limit", ZDOT, "--particles", "2.5"], r"--particles: expected a positive integer, got 2\.5"),
    (["limit", ZDOT, "--particles", "1e-3"], r"--particles: expected a positive integer, got 0\.001"),
    (["limit", ZDOT, "--particles", "nan"], r"--particles: invalid int value: 'nan'"),
    (["limit", ZDOT, "--particles", "inf"], r"--particles: invalid int value: 'inf'"),
    (["limit", ZDOT, "--particles", "1e400"], r"--particles: expected a positive integer, got inf"),
    (["limit", ZDOT, "--particles", ""], r"--particles: invalid int value: ''"),
    (["limit", ZDOT, "--particles", "True"], r"--particles: invalid int value: 'True'"),
    (["limit", ZDOT, "--seed", "-1"], r"--seed: expected a non-negative integer, got -1"),
    (["limit", ZDOT, "--seed", "1.5"], r"--seed: expected a non-negative integer, got 1\.5"),
    (["limit", ZDOT, "--seed", "abc"], r"--seed: invalid int value: 'abc'"),
    (["simulate", ZDOT, "--width", "-3"], r"--width: expected a positive integer, got -3"),
    (["simulate", ZDOT, "--width", "2.5"], r"--width: expected a positive integer, got 2\.5"),
    (["simulate", ZDOT, "--width", "nan"], r"--width: invalid int value: 'nan'"),
    (["simulate", ZDOT, "--width", "64", "--seeds", "0"], r"--seeds: expected a positive integer, got 0"),
    (["simulate", ZDOT, "--width", "64", "--seeds", "-2"], r"--seeds: expected a positive integer, got -2"),
    (["simulate", ZDOT, "--width", "64", "--seed", "-2"], r"--seed: expected a non-negative integer, got -2"),
    (["check", ZDOT, "--widths", "32,64", "--seeds", "0"], r"--seeds: expected a positive integer, got 0"),
    (["check", ZDOT, "--widths", "64,64", "--seeds", "2"], r"--widths: .*at least two widths"),
    (["check", ZDOT, "--widths", "0,64"], r"--widths must be comma-separated integers, got '0,64' \(each >= 1\)"),
    (["check", ZDOT, "--widths=-64,128"], r"--widths must be comma-separated integers, got '-64,128'"),
    (["check", ZDOT, "--widths", "64.5,128"], r"--widths must be comma-separated integers, got '64\.5,128'"),
    (["check", ZDOT, "--particles", "0"], r"--particles: expected a positive integer, got 0"),
    (["check", ZDOT, "--seed", "-1"], r"--seed: expected a non-negative integer, got -1"),
    (["classify", "--depth", "0", "--param", "mup"], r"--depth: expected an integer in 1\.\.100000, got 0"),
    (["classify", "--depth", "-1", "--param", "mup"], r"--depth: expected an integer in 1\.\.100000, got -1"),
    (["classify", "--depth", "1.5", "--param", "mup"], r"--depth: expected an integer in 1\.\.100000, got 1\.5"),
    (train("--batch", "0"), r"--batch: expected a positive integer, got 0"),
    (train("--batch", "1.5"), r"--batch: expected a positive integer, got 1\.5"),
    (train("--batch", "10"), r"--batch: 10 is larger than the training set \(N = 3\)"),
    (train(steps="-1"), r"--steps: expected an integer in 0\.\.1000000, got -1"),
    (train(steps="2.5"), r"--steps: expected an integer in 0\.\.1000000, got 2\.5"),
    (train(steps="100000000"), r"--steps: 100000000 is above the limit 1000000 \(every step is kept"),
    (train(steps="1e8"), r"--steps: 100000000 is above the limit 1000000"),
    (train("--clip", "0", param="mup"), r"--clip: expected a positive finite number, got 0"),
    (train("--weight-decay", "-1", param="mup"), r"--weight-decay(/--wd)?: expected a number between 0 and 1e\+300, got -1"),
    (train("--eval-every", "0", param="mup"), r"--eval-every: expected a positive integer, got 0"),
    (train("--resume", "{X}", param="mup"), r"--resume: checkpoint .*not a step-engine checkpoint"),
    (train("--save-state", "{dir}/S.npz"), r"--save-state: only feature-learning training keeps a state \(this parametrization is in the kernel regime\)"),
    (train("--particles", "0"), r"--particles: expected a positive integer, got 0"),
    (train("--seed", "-1"), r"--seed: expected a non-negative integer, got -1"),
    # -- real numbers: learning rate, quadrature accuracy
    (train(lr="nan"), r"--lr: expected a positive finite number, got nan"),
    (train(lr="inf"), r"--lr: expected a positive finite number, got inf"),
    (train(lr="-inf"), r"--lr: expected a positive finite number, got -inf"),
    (train(lr="1e400"), r"--lr: expected a positive finite number, got inf"),
    (train(lr="0"), r"--lr: expected a positive finite number, got 0\.0"),
    (train(lr="-1"), r"--lr: expected a positive finite number, got -1\.0"),
    (train(lr="fast"), r"--lr: invalid float value: 'fast'"),
    (kernels("--rtol", "0"), r"--rtol: expected a positive finite number, got 0\.0"),
    (kernels("--rtol", "-1"), r"--rtol: expected a positive finite number, got -1\.0"),
    (kernels("--rtol", "nan"), r"--rtol: expected a positive finite number, got nan"),
    (kernels("--rtol", "inf"), r"--rtol: expected a positive finite number, got inf"),
    (kernels("--rtol", "1e-20"), r"--rtol: expected a number between 1e-14 and 0\.1, got 1e-20"),
    (kernels("--rtol", "0.5"), r"--rtol: expected a number between 1e-14 and 0\.1, got 0\.5"),
    (kernels("--rtol", "tight"), r"--rtol: invalid float value: 'tight'"),
    # -- data files: complex, non-finite, huge, wrong shape, not numbers
    (kernels(x="{Xc}"), r"--x file '.*Xc\.npy' holds complex numbers"),
    (kernels(x="{Xc0}"), r"--x file '.*Xc0\.npy' holds complex numbers"),
    (kernels(x="{Xnan}"), r"--x file '.*Xnan\.npy' has NaN or infinite entries \(first at index \(0, 0\)\)"),
    (kernels(x="{Xinf}"), r"--x file '.*Xinf\.npy' has NaN or infinite entries"),
    (kernels(x="{Xbig}"), r"--x file '.*Xbig\.npy' has entries as large as .*e\+200.*rescale"),
    (kernels(x="{Xbig60}"), r"--x file '.*Xbig60\.npy' has entries as large as .*e\+60"),
    (kernels(x="{X1d}"), r"--x must be an N x d array \(one row per example\), got shape \(3,\)"),
    (kernels(x="{X3d}"), r"--x must be an N x d array, got shape \(1, 3, 3\)"),
    (kernels(x="{Xstr}"), r"--x file '.*Xstr\.npy' does not hold numbers"),
    (kernels(x="{Xd0}"), r"input 'xi': dimension d must be a positive integer, got 0"),
    (kernels("--x2", "{X4}"), r"X2: program 'mlp' takes inputs of dimension d = 3, got 4"),
    (kernels("--x2", "{Xnan}"), r"--x2 file '.*Xnan\.npy' has NaN or infinite entries"),
    (kernels("--x2", "{Xc}"), r"--x2 file '.*Xc\.npy' holds complex numbers"),
    (train(x="{Xc}"), r"--x file '.*Xc\.npy' holds complex numbers"),
    (train(x="{Xbig}"), r"--x file '.*Xbig\.npy' has entries as large as"),
    (train(x="{X1d}"), r"--x must be an N x d array \(one row per example\), got shape \(3,\)"),
    (train(y="{Ynan}"), r"--y file '.*Ynan\.npy' has NaN or infinite entries \(first at index \(1,\)\)"),
    (train(y="{Yc}"), r"--y file '.*Yc\.npy' holds complex numbers"),
    (train("--eval", "{Xinf}"), r"--eval file '.*Xinf\.npy' has NaN or infinite entries"),
    (train("--eval", "{X4}"), r"--eval must be an N_eval x 3 array \(the columns of --x, N_eval >= 1\), got shape \(2, 4\)"),
    (train("--eval", "{X1d}"), r"--eval must be an N x d array \(one row per example\), got shape \(3,\)"),
    (train("--eval", "{Xc}"), r"--eval file '.*Xc\.npy' holds complex numbers"),
    (train("--loss", "logistic", param="mup", y="{Y012}"), r"--y: the logistic loss needs labels 0 or 1, got 2"),
    (train("--loss", "logistic", param="mup", y="{Y}"), r"--y: the logistic loss needs labels 0 or 1, got -1"),
    (train("--loss", "softmax", param="mup", y="{Y15}"), r"--y: the softmax loss needs probability rows"),
    (["limit", MLP, "--x", "{Xc}", "--particles", "2000"], r"--x file '.*Xc\.npy' holds complex numbers"),
    (["limit", MLP, "--x", "{Xbig}", "--particles", "2000"], r"--x file '.*Xbig\.npy' has entries as large as"),
    (["limit", MLP, "--x", "{Xinf}", "--particles", "2000"], r"--x file '.*Xinf\.npy' has NaN or infinite entries"),
    (["simulate", MLP, "--x", "{Xc}", "--width", "16"], r"--x file '.*Xc\.npy' holds complex numbers"),
    (["check", MLP, "--x", "{Xbig}", "--widths", "16,32"], r"--x file '.*Xbig\.npy' has entries as large as"),
    # -- outputs that would lie
    (kernels(x="{X}")[:-2] + ["--out", "{dir}"], r"--out: '.*' is a directory; give a file name"),
    (kernels(x="{X}")[:-2] + ["--out", "{missing_dir_out}"], r"--out: cannot write '.*K\.npz' \(directory .* does not exist\)"),
    (train()[:-2] + ["--out", "{dir}"], r"--out: '.*' is a directory"),
    (["check", ZDOT, "--widths", "8,16", "--seeds", "2", "--plot", "{dir}"], r"--plot: '.*' is a directory"),
    (["check", ZDOT, "--widths", "8,16", "--seeds", "2", "--plot", "{missing_dir_out}"], r"--plot: cannot write .*does not exist"),
    (["limit", "{noout}"], r"program 'noout' has no outputs"),
    (["simulate", "{noout}", "--width", "8"], r"program 'noout' has no outputs"),
    (["check", "{noout}", "--widths", "8,16", "--seeds", "2"], r"program 'noout' has no outputs"),
    (["limit", "{exit0}"], r"build\(\) in '.*exit0\.py' called sys\.exit\(0\)"),
    (["formulas", "{exit0}"], r"build\(\) in '.*exit0\.py' called sys\.exit\(0\)"),
    (["formulas", "{exit_import}"], r"program file '.*exit_import\.py' called sys\.exit\(3\) while being imported"),
    # -- numbers inside programs
    (["limit", "{bigsigma}"], r"evaluating sigma_W\*\*2 overflows float64 \('sigma_W' is 1e\+200\)"),
    (["simulate", "{bigsigma}", "--width", "8"], r"at finite width, output 'm' is not finite \(NaN or overflow\)"),
    (["limit", "{bigsigma}", "-p", "sigma=1.0", "-p", "var=1e310"], r"initial vector 'u'.*not finite"),
    (["limit", ZDOT, "-p", "sigma=1e400"], r"matrix 'W': sigma: the number inf is not finite"),
    (["limit", ZDOT, "-p", "sigma=nan"], r"matrix 'W': sigma: expected a number, got 'nan'"),
    (["limit", ZDOT, "-p", "sigma=-1.5"], r"matrix 'W': sigma -1\.5 is negative"),
    (["simulate", "{dirac}", "--width", "8"], r"instruction 'm': a Dirac delta cannot be evaluated coordinatewise"),
    (["check", "{dirac}", "--widths", "8,16", "--seeds", "2", "--particles", "200"], r"a Dirac delta cannot be evaluated"),
    (["formulas", "{foreign}"], r"tp\.nonlin: the function uses the sympy symbol 'zeta'"),
    (["formulas", "{undefined}"], r"tp\.nonlin: 'Fancy' is an undefined sympy function"),
    # -- found by a fuzz of every command (2026-12-06): internal errors and options ignored before
    (["limit", MLP, "--x", "{X0d}"], r"--x file '.*X0d\.npy' holds a single number \(a 0-d array\)"),
    (["simulate", MLP, "--width", "8", "--x", "{X0d}"], r"--x file .* holds a single number"),
    (train(y="{X0d}"), r"--y file .* holds a single number"),
    (train(param="mup", *["-p", "w_std=0"]), r"input matrix 'U' has scale 0 \(sigma = w_std\)"),
    (train("-p", "w_std=0"), r"input matrix 'U' has scale 0"),
    (kernels("--scheduler", "garbage"), r"--scheduler: 'garbage' is not a scheduler address"),
    (kernels("--scheduler", ""), r"--scheduler: '' is not a scheduler address"),
    (["kernels", MLP, "--x", "{X}", "--out", ""], r"--out: the file name is empty"),
    (["predict", MLP, "--x", "{Xempty}", "--y", "{Yempty}", "--xt", "{X}", "--out", "{dir}/K.npz"],
     r"--x must be an N x d array with N >= 1 training rows, got shape \(0, 3\)"),
    (["predict", MLP, "--x", "{X}", "--y", "{Y}", "--xt", "{X}", "--get", "gp", "--out", "{dir}/K.npz"],
     r"^tpc: error: --get: expected 'nngp', 'ntk' or both \(a tuple or a comma-separated list\), got 'gp'$"),
    (train("--save-state", "{dir}/T.npz"), r"--save-state and --out are the same file"),
    (train("--save-state", "{dir}/T"), r"--save-state and --out are the same file"),
    (train("--seeds", "3"), r"--seeds: the networks per finite width of the plot; give --plot FILE\.png and --widths"),
    (train("--lr-end", "0.01"), r"--lr-end: only --schedule linear reads it"),
    (train("--eval", "{Xempty}"), r"--eval must be an N_eval x 3 array .* got shape \(0, 3\)"),
    (train(param="mup", *["--particles", "5"]), r"--particles: expected an integer >= 8, got 5"),
    (["classify", "--depth", "1e9", "--param", "mup"], r"--depth: 1000000000 is above the limit 100000"),
    (["coordcheck", MLP, "-p", "depth=1", "--x", "{X}", "--y", "{Y}", "--batch", "2"],
     r"--batch: the size of the random probe batch, which --x and --y replace"),
    (["coordcheck", MLP, "-p", "depth=1", "--params", ""], r"--params: no names given"),
    # -- options that were accepted and ignored (session of 2026-12-06, second)
    (["train", PINET, "--param", "pi", "--x", "{X}", "--y", "{Y}", "--lr", "0.1", "--steps", "1", "--lr-mult", "bias=2",
      "--out", "{dir}/T.npz"], r"--lr-mult: bias=2, but this pi-net has no biases \(give -p alpha_bias=A"),
]


def _fill(argv, files):
    return [a.format(**files) if "{" in a else a for a in argv]


@pytest.mark.parametrize("argv, pattern", CLI_CASES, ids=[" ".join(a)[-70:] for a, _ in CLI_CASES])
def test_cli_refuses(capsys, files, argv, pattern):
    for stale in ("T.npz", "K.npz"):
        Path(files["dir"], stale).unlink(missing_ok=True)
    rc = main(_fill(argv, files))
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and "internal error" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpc: error: "), err
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert not Path(files["dir"], "T.npz").exists() and not Path(files["dir"], "K.npz").exists()
    assert not out.startswith("wrote")


SUBPROCESS_CASES = [
    (train(lr="nan"), r"--lr: expected a positive finite number, got nan"),
    (["limit", "{exit0}"], r"called sys\.exit\(0\)"),
    (kernels(x="{X}")[:-2] + ["--out", "{dir}"], r"--out: '.*' is a directory"),
]


@pytest.mark.parametrize("argv, pattern", SUBPROCESS_CASES, ids=[" ".join(a)[-50:] for a, _ in SUBPROCESS_CASES])
def test_cli_refuses_in_a_real_process(files, argv, pattern):
    proc = subprocess.run([sys.executable, "-m", "tpcompiler.cli", *_fill(argv, files)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpc: error: "), proc.stderr
    assert re.search(pattern, lines[0]), (pattern, lines[0])


# -- API -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(files):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((3, 3))
    zdot = tp.load(ZDOT)
    mlp = tp.load(MLP, depth=1, d=3)
    return {
        "X": X, "Y": np.array([1.0, -1.0, 0.5]),
        "zdot": zdot, "zc": tp.compile(zdot),
        "mlp": mlp, "mc": tp.compile(mlp),
        "mup": tp.named("mup", 1), "ntp": tp.named("ntp", 1),
        "files": files,
    }


def sgd(a, **kw):
    args = dict(X=a["X"], Y=a["Y"], steps=2, lr=0.5)
    args.update(kw)
    return tp.SGD(**args)


def train_mlp(a, **kw):
    from tpcompiler.training.finite import train_mlp as run

    args = dict(X=a["X"], Y=a["Y"], depth=1, phi="tanh", w_std=1.0, a=[0, "1/2"], b=[0, 0], c=0,
                lr=0.5, steps=2, width=8, seed=0)
    args.update(kw)
    return run(**args)


def late_output(a):
    p = tp.Program("late")
    u = p.vec("u")
    p.output("a", tp.mean(u * u))
    c = tp.compile(p)
    p.output("b", tp.mean(u * u * u * u))
    return c.limit()


def nonlin_program(fn, *arity):
    p = tp.Program("nl")
    u, v = p.vec("u"), p.vec("v")
    return tp.nonlin(fn, *(u, v)[:len(arity) or 1])


def big_var(a):
    p = tp.Program("bigvar")
    u = p.vec("u", var=1e300)
    p.output("m", tp.mean(u * u * u * u))
    return tp.compile(p).limit()


# (id, call, regex)
API_CASES = [
    ("simulate width=2.5", lambda a: tp.simulate(a["zdot"], width=2.5), r"^width: expected a positive integer, got 2\.5$"),
    ("simulate width=0", lambda a: tp.simulate(a["zdot"], width=0), r"^width: expected a positive integer, got 0$"),
    ("simulate width=-8", lambda a: tp.simulate(a["zdot"], width=-8), r"^width: expected a positive integer, got -8$"),
    ("simulate width=nan", lambda a: tp.simulate(a["zdot"], width=float("nan")), r"^width: .*got nan$"),
    ("simulate width=inf", lambda a: tp.simulate(a["zdot"], width=np.inf), r"^width: .*got inf$"),
    ("simulate width='64'", lambda a: tp.simulate(a["zdot"], width="64"), r"^width: expected a positive integer, got '64'$"),
    ("simulate width=True", lambda a: tp.simulate(a["zdot"], width=True), r"^width: .*got the boolean True$"),
    ("simulate width=None", lambda a: tp.simulate(a["zdot"], width=None), r"^width: .*got None$"),
    ("simulate seed=-1", lambda a: tp.simulate(a["zdot"], width=8, seed=-1), r"^seed: expected a non-negative integer, got -1$"),
    ("simulate seed=0.5", lambda a: tp.simulate(a["zdot"], width=8, seed=0.5), r"^seed: .*got 0\.5$"),
    ("simulate x complex", lambda a: tp.simulate(a["mlp"], width=8, x=a["X"] + 1j), r"^x: holds complex numbers"),
    ("simulate no outputs", lambda a: tp.simulate(tp.Program("empty"), width=8), r"program 'empty' has no outputs"),
    ("limit particles=1e4+0.5", lambda a: a["zc"].limit(particles=1e4 + 0.5), r"^particles: .*got 10000\.5$"),
    ("limit particles=0", lambda a: a["zc"].limit(particles=0), r"^particles: expected a positive integer, got 0$"),
    ("limit particles=-1", lambda a: a["zc"].limit(particles=-1), r"^particles: expected a positive integer, got -1$"),
    ("limit particles=nan", lambda a: a["zc"].limit(particles=np.nan), r"^particles: .*got nan$"),
    ("limit particles=None", lambda a: a["zc"].limit(particles=None), r"^particles: .*got None$"),
    ("limit particles=[1]", lambda a: a["zc"].limit(particles=[1000]), r"^particles: .*got \[1000\]$"),
    ("limit seed=-1", lambda a: a["zc"].limit(seed=-1), r"^seed: expected a non-negative integer, got -1$"),
    ("limit seed=1.5", lambda a: a["zc"].limit(seed=1.5), r"^seed: .*got 1\.5$"),
    ("limit seed=np.bool_", lambda a: a["zc"].limit(seed=np.True_), r"^seed: .*boolean"),
    ("limit groups=1", lambda a: a["zc"].limit(groups=1), r"^groups: expected an integer >= 2, got 1$"),
    ("limit method", lambda a: a["zc"].limit(method="fast"), r"^method: expected one of auto, exact, pairwise, particles, got 'fast'$"),
    ("limit x complex", lambda a: a["mc"].limit(particles=2000, x=a["X"] + 1j), r"^x: holds complex numbers"),
    ("limit x huge", lambda a: a["mc"].limit(particles=2000, x=a["X"] * 1e200), r"^x: has entries as large as .*rescale"),
    ("limit x strings", lambda a: a["mc"].limit(particles=2000, x=[["a", "b", "c"]]), r"^x: does not hold numbers"),
    ("limit x ragged", lambda a: a["mc"].limit(particles=2000, x=[[1.0, 2.0], [3.0]]), r"^x: expected an array"),
    ("limit x nan", lambda a: a["mc"].limit(particles=2000, x=np.array([[np.nan, 0, 1.0]])), r"the input data has NaN or infinite"),
    ("limit no outputs", lambda a: tp.compile(tp.Program("empty")).limit(), r"program 'empty' has no outputs"),
    ("limit output added after compile", late_output, r"program 'late' changed after tp\.compile \(output 'b' was added\)"),
    ("limit sigma 1e200", lambda a: tp.compile(tp.load(a["files"]["bigsigma"])).limit(), r"overflows float64 \('sigma_W' is 1e\+200\)"),
    ("limit var 1e300", big_var, r"overflows float64|not (a )?finite"),
    ("kernels X complex", lambda a: a["mc"].kernels(a["X"] + 1j), r"^X: holds complex numbers"),
    ("kernels X nan", lambda a: a["mc"].kernels(np.where(np.eye(3) > 0, np.nan, a["X"])), r"^X: has NaN or infinite entries \(first at index \(0, 0\)\)"),
    ("kernels X 1-d", lambda a: a["mc"].kernels(a["X"][0]), r"^X: expected an N x d matrix, got shape \(3,\)$"),
    ("kernels X huge", lambda a: a["mc"].kernels(a["X"] * 1e100), r"^X: has entries as large as"),
    ("kernels X2 inf", lambda a: a["mc"].kernels(a["X"], np.full((1, 3), np.inf)), r"^X2: has NaN or infinite entries"),
    ("kernels X2 complex", lambda a: a["mc"].kernels(a["X"], a["X"] * 1j), r"^X2: holds complex numbers"),
    ("kernels rtol=0", lambda a: a["mc"].kernels(a["X"], rtol=0), r"^rtol: expected a positive finite number, got 0\.0$"),
    ("kernels rtol<0", lambda a: a["mc"].kernels(a["X"], rtol=-1e-3), r"^rtol: expected a positive finite number, got -0\.001$"),
    ("kernels rtol=nan", lambda a: a["mc"].kernels(a["X"], rtol=np.nan), r"^rtol: .*got nan$"),
    ("kernels rtol=1e-20", lambda a: a["mc"].kernels(a["X"], rtol=1e-20), r"^rtol: expected a relative accuracy between 1e-14 and 0\.1, got 1e-20$"),
    ("kernels rtol=1", lambda a: a["mc"].kernels(a["X"], rtol=1.0), r"^rtol: .*between 1e-14 and 0\.1, got 1$"),
    ("kernels rtol str", lambda a: a["mc"].kernels(a["X"], rtol="1e-10"), r"^rtol: .*got '1e-10'$"),
    ("kernel_function rtol=inf", lambda a: a["mc"].kernel_function(np.inf), r"^rtol: .*got inf$"),
    # the kernel function itself, called directly: complex data refused, not cast to its real part (QA)
    ("kernel_function X complex", lambda a: a["mc"].kernel_function()(a["X"] + 0j), r"^X: holds complex numbers"),
    ("kernel_function X2 strings", lambda a: a["mc"].kernel_function()(a["X"], [["a", "b", "c"]]), r"^X2: does not hold numbers"),
    ("SGD lr=-1", lambda a: sgd(a, lr=-1), r"^lr: expected a positive finite number, got -1\.0$"),
    ("SGD lr=0", lambda a: sgd(a, lr=0), r"^lr: expected a positive finite number, got 0\.0$"),
    ("SGD lr=nan", lambda a: sgd(a, lr=float("nan")), r"^lr: .*got nan$"),
    ("SGD lr=inf", lambda a: sgd(a, lr=float("inf")), r"^lr: .*got inf$"),
    ("SGD lr=complex", lambda a: sgd(a, lr=0.1 + 0j), r"^lr: .*complex"),
    ("SGD lr='0.1'", lambda a: sgd(a, lr="0.1"), r"^lr: .*got '0\.1'$"),
    ("SGD steps=-1", lambda a: sgd(a, steps=-1), r"^steps: expected an integer in 0\.\.1000000, got -1$"),
    ("SGD steps=2.5", lambda a: sgd(a, steps=2.5), r"^steps: .*got 2\.5$"),
    ("SGD steps=1e8", lambda a: sgd(a, steps=1e8), r"^steps: 100000000 is above the limit 1000000"),
    ("SGD batch=0", lambda a: sgd(a, batch=0), r"^batch: expected a positive integer, got 0$"),
    ("SGD batch=1.5", lambda a: sgd(a, batch=1.5), r"^batch: .*got 1\.5$"),
    ("SGD batch>N", lambda a: sgd(a, batch=4), r"^batch: 4 is larger than the training set \(N = 3\)$"),
    ("SGD loss", lambda a: sgd(a, loss="hinge"), r"^loss: unknown loss 'hinge'; use one of mse, logistic, softmax$"),
    ("SGD logistic labels", lambda a: sgd(a, loss="logistic", Y=np.array([0.0, 2.0, 1.0])), r"^Y: the logistic loss needs labels 0 or 1, got 2"),
    ("SGD softmax rows", lambda a: sgd(a, loss="softmax", Y=np.array([[0.5, 0.2], [1.0, 0.0], [0.0, 1.0]])), r"^Y: the softmax loss needs probability rows"),
    ("SGD X complex", lambda a: sgd(a, X=a["X"] + 1j), r"^X: holds complex numbers"),
    ("SGD X huge", lambda a: sgd(a, X=a["X"] * 1e60), r"^X: has entries as large as"),
    ("SGD X 3-d", lambda a: sgd(a, X=a["X"][None]), r"^X: expected .*got shape \(1, 3, 3\)$"),
    ("SGD Y nan", lambda a: sgd(a, Y=np.array([1.0, np.nan, 0.0])), r"^Y: has NaN or infinite entries \(first at index \(1,\)\)"),
    ("SGD X_eval inf", lambda a: sgd(a, X_eval=np.full((2, 3), -np.inf)), r"^X_eval: has NaN or infinite entries"),
    ("train particles=0", lambda a: tp.train(a["mlp"], a["mup"], sgd(a), particles=0), r"^particles: expected a positive integer, got 0$"),
    ("train seed=-1", lambda a: tp.train(a["mlp"], a["mup"], sgd(a), seed=-1), r"^seed: expected a non-negative integer, got -1$"),
    ("train method", lambda a: tp.train(a["mlp"], a["mup"], sgd(a), method="mc"), r"^method: expected one of auto, exact, particles"),
    # options tp.train used to ignore without a word (training audit)
    ("train lr_end, constant", lambda a: tp.train(a["mlp"], a["mup"], sgd(a, lr_end=0.01)), r"^lr_end: only the linear schedule reads it"),
    ("train features", lambda a: tp.train(a["mlp"], a["mup"], sgd(a, features=True)), r"^features: tp\.train records f only"),
    ("train abc='mup'", lambda a: tp.train(a["mlp"], "mup", sgd(a)), r"^abc: expected a parametrization such as tp\.named\('mup', depth\)"),
    ("train sgd=None", lambda a: tp.train(a["mlp"], a["mup"], None), r"^sgd: expected tp\.SGD\(X, Y, steps=\.\.\., lr=\.\.\.\), got None$"),
    ("train net=str", lambda a: tp.train("programs/mlp.py", a["mup"], sgd(a)), r"expected a tpcompiler\.Program, got str"),
    ("unroll weight decay", lambda a: tp.unroll(a["mlp"], a["mup"], sgd(a, weight_decay=0.1)), r"^weight_decay: the unrolled program implements plain SGD only"),
    ("SGD schedule", lambda a: sgd(a, schedule="cosine"), r"^schedule: unknown schedule 'cosine'; use one of constant, linear$"),
    ("SGD clip=0", lambda a: sgd(a, clip=0), r"^clip: expected a positive finite number, got 0"),
    ("unroll(Program, 'mup')", lambda a: tp.unroll(a["mlp"], "mup", sgd(a)), r"^abc: expected a parametrization"),
    ("unroll sgd dict", lambda a: tp.unroll(a["mlp"], a["mup"], {"lr": 0.1}), r"^sgd: expected tp\.SGD"),
    ("classify('mup')", lambda a: tp.classify("mup"), r"^classify: expected an abc-parametrization such as tp\.named\('mup', depth\)"),
    ("classify(None)", lambda a: tp.classify(None), r"^classify: expected an abc-parametrization"),
    ("compile(str)", lambda a: tp.compile("programs/mlp.py"), r"expected a tpcompiler\.Program, got str"),
    ("nonlin foreign symbol", lambda a: nonlin_program(lambda x: sp.tanh(x + sp.Symbol("zeta"))), r"tp\.nonlin: the function uses the sympy symbol 'zeta'"),
    ("nonlin foreign symbol, 2 args", lambda a: nonlin_program(lambda x, y: x * y * sp.Symbol("c"), 1, 2), r"sympy symbol 'c'"),
    ("nonlin undefined function", lambda a: nonlin_program(lambda x: sp.Function("Fancy")(x)), r"tp\.nonlin: 'Fancy' is an undefined sympy function"),
    ("nonlin undefined nested", lambda a: nonlin_program(lambda x: sp.exp(sp.Function("g")(x))), r"'g' is an undefined sympy function"),
    ("formulas format", lambda a: a["zc"].formulas(format="html"), r"^format: expected one of markdown, latex, got 'html'$"),
    ("train_mlp width=2.5", lambda a: train_mlp(a, width=2.5), r"^width: expected a positive integer, got 2\.5$"),
    ("train_mlp steps=2.5", lambda a: train_mlp(a, steps=2.5), r"^steps: expected a non-negative integer, got 2\.5$"),
    ("train_mlp lr=nan", lambda a: train_mlp(a, lr=np.nan), r"^lr: expected a positive finite number, got nan$"),
    ("train_mlp depth=0", lambda a: train_mlp(a, depth=0), r"^depth: expected a positive integer, got 0$"),
    ("train_mlp seed=-1", lambda a: train_mlp(a, seed=-1), r"^seed: expected a non-negative integer, got -1$"),
    ("train_mlp X complex", lambda a: train_mlp(a, X=a["X"] + 1j), r"^X: holds complex numbers"),
    ("train_mlp w_std=-1", lambda a: train_mlp(a, w_std=-1.0), r"^w_std: expected a non-negative finite number, got -1\.0$"),
    ("train_mlp phi=3", lambda a: train_mlp(a, phi=3), r"^phi: expected a nonlinearity name or a sympy function, got 3$"),
    ("simulate Dirac delta", lambda a: tp.simulate(tp.load(a["files"]["dirac"]), width=8), r"instruction 'm': a Dirac delta"),
    ("load exit0", lambda a: tp.load(a["files"]["exit0"]), r"build\(\) in '.*exit0\.py' called sys\.exit\(0\)"),
    ("load exit on import", lambda a: tp.load(a["files"]["exit_import"]), r"called sys\.exit\(3\) while being imported"),
    ("train a matrix of scale 0", lambda a: tp.train(tp.load(MLP, depth=1, d=3, w_std=0.0), a["mup"], sgd(a)),
     r"^program 'mlp': input matrix 'U' has scale 0 \(sigma = w_std\)"),
    ("named depth 10^9", lambda a: tp.named("mup", 10**9), r"^depth must be at most 100000"),
    # -- found by a fuzz of the Python API (2026-12-06): wrong numbers and ignored arguments before
    ("variance a negative Scalar", lambda a: (lambda p: p.vec("u", var=p.scalar("b", -1.0)))(tp.Program("v")),
     r"^initial vector 'u': variance b = -1\.0+ is negative$"),
    ("readout var a negative Scalar", lambda a: (lambda p: p.readout(p.vec("x"), var=p.scalar("vv", -2.0)))(tp.Program("v")),
     r"^initial vector 'v': variance vv = -2\.0+ is negative$"),
    ("ntk_weight negative", lambda a: tp.Program("v").mat("W", ntk_weight=-100), r"^matrix 'W': ntk_weight -100 is negative$"),
    ("variance I", lambda a: tp.Program("v").vec("u", var=sp.I), r"^initial vector 'u': variance: I is not a finite real number$"),
    ("nonlin complex", lambda a: (lambda p: tp.nonlin(lambda x: x * sp.I, p.vec("u")))(tp.Program("v")),
     r"^tp\.nonlin: the function .* has complex values \(it contains I\)"),
    ("compile drop_zdot='no'", lambda a: tp.compile(a["zdot"], drop_zdot="no"), r"^drop_zdot: expected True or False, got 'no'$"),
    ("vec trainable='no'", lambda a: tp.Program("v").vec("u", trainable="no"),
     r"^initial vector 'u': trainable: expected True or False, got 'no'$"),
    ("layers input_shape (3.9,)", lambda a: tp.layers.serial(tp.layers.Dense(4), tp.layers.Relu(), tp.layers.Dense(1)).program((3.9,)),
     r"input_shape must be a tuple of positive integers, got \(3\.9,\)"),
    ("Dense standard W_std=0 readout", lambda a: tp.layers.serial(tp.layers.Dense(4), tp.layers.Relu(), tp.layers.Dense(
        1, W_std=0, parameterization="standard")).program((3,)),
     r"^Dense\(1\) \(the readout\): W_std = 0 in the standard parameterization, whose NTK weight divides by W_std\^2"),
    ("Dense standard W_std=1e-200", lambda a: tp.layers.Dense(4, W_std=1e-200, parameterization="standard"),
     r"^Dense: W_std = 1e-200 in the standard parameterization, whose NTK weights divide by W_std\^2, which is 0"),
    ("SGD lr_end negative", lambda a: sgd(a, schedule="linear", lr_end=-5.0), r"^lr_end: expected a non-negative"),
    ("schedules.linear negative end", lambda a: tp.schedules.linear(0.1, -1.0, 10), r"^lr_end: expected a non-negative"),
    ("nngp_ensemble of -I", lambda a: tp.predict.nngp_ensemble(-np.eye(3), np.ones((2, 3)), np.ones(3)),
     r"^k_train: has a negative diagonal entry \(-1\), so it is not a kernel matrix"),
    ("nngp_ensemble asymmetric k_test", lambda a: tp.predict.nngp_ensemble(np.eye(3), np.ones((2, 3)), np.ones(3),
                                                                           np.array([[1.0, 0.5], [0.0, 1.0]])),
     r"^k_test: is not symmetric"),
    ("nngp_ensemble no target columns", lambda a: tp.predict.nngp_ensemble(np.eye(3), np.ones((2, 3)), np.ones((3, 0))),
     r"^y: has no target columns"),
    ("output divided by 0", lambda a: (lambda p: p.output("o", tp.mean(p.vec("u")) / 0))(tp.Program("v")),
     r"^output 'o': .* divides by zero$"),
    ("output 1/m at m = 0", lambda a: (lambda p: (p.output("o", 1 / tp.mean(p.vec("u"))), tp.compile(p).limit()))(tp.Program("v")),
     r"^evaluating 1/\w+ divides by zero \('\w+' is 0\)"),
    ("output sqrt(-m)", lambda a: (lambda p: (p.output("o", (-tp.mean(p.vec("u") ** 2)) ** 0.5), tp.compile(p).limit()))(tp.Program("v")),
     r"gives the complex number .*; the program's outputs must be real$"),
    ("output name 3", lambda a: (lambda p: p.output(3, tp.mean(p.vec("u"))))(tp.Program("v")),
     r"^output: the name must be a non-empty string, got 3$"),
    ("readout sigma of another program", lambda a: (lambda p, q: p.readout(p.vec("x"), sigma=q.scalar("s", 1.0)))(
        tp.Program("v"), tp.Program("w")), r"^readout sigma: mixes variables of two programs"),
    ("load(3)", lambda a: tp.load(3), r"^program file: expected a path"),
    ("kernels client='local'", lambda a: a["mc"].kernels(a["X"], client="local"), r"^client: expected a dask\.distributed\.Client"),
    ("vecs asymmetric", lambda a: tp.Program("v").vecs(["a", "b"], [[1, 0.5], [0.4, 1]]), r"covariance is not symmetric"),
    ("vecs NaN", lambda a: tp.Program("v").vecs(["a", "b"], [[1, np.nan], [np.nan, 1]]), r"covariance has entries that are not finite"),
    ("SGD X_eval columns", lambda a: sgd(a, X_eval=np.ones((2, 5))), r"^X_eval: has 5 columns but X has 3"),
    # -- accepted and ignored before (session of 2026-12-06, second)
    ("fit X_eval without eval_every", lambda a: tp.fit(limit_engine(a), a["X"], a["Y"], steps=1, X_eval=a["X"]),
     r"^X_eval: f is evaluated on it only at the steps eval_every gives"),
    ("fit checkpoint_every without checkpoint", lambda a: tp.fit(limit_engine(a), a["X"], a["Y"], steps=1, checkpoint_every=1),
     r"^checkpoint_every: no checkpoint file to save to"),
    ("StepEngine particles with a width", lambda a: tp.StepEngine(a["mlp"], a["mup"], method="particles", width=64),
     r"^width=64: only the finite method runs networks of a width"),
    ("StepEngine in the limit with seeds", lambda a: limit_engine(a, seeds=4), r"^seeds=4: only the finite method"),
    ("PiFinite mult NaN", lambda a: tp.PiFinite(pi_spec(), width=8, mult={"first": np.nan}), r"^mult\['first'\]: .*nan"),
    ("PiLimit mult negative", lambda a: tp.PiLimit(pi_spec(), mult={"last": -1}), r"^mult\['last'\]: .*-1"),
    ("PiLimit step mult inf", lambda a: tp.PiLimit(pi_spec()).step(a["X"], np.eye(2)[[0, 1, 0]], 0.1, mult={"bias": np.inf}),
     r"^mult\['bias'\]: .*inf"),
    ("PiLimit loss", lambda a: tp.PiLimit(pi_spec(), loss="hinge"), r"^loss must be one of"),
    ("PiLimit X shape", lambda a: tp.PiLimit(pi_spec()).predict(np.ones((2, 5))), r"^X: expected an \(N, d = 3\) array"),
    ("kernels of a row at 1e-300", lambda a: a["mc"].kernels(a["X"] * np.array([[1.0], [1e-300], [1.0]])),
     r"^X: row 1 is not zero but has no entry of magnitude 1e-150 or more \(largest .*e-300\); its squared norm underflows"),
    ("limit at a row of 1e-200", lambda a: a["mc"].limit(x=a["X"] * 1e-200),
     r"^program 'mlp': input data: row 0 is not zero but has no entry of magnitude 1e-150"),
    ("kernels of a user's sympy Function class", lambda a: tp.compile(user_function_program()).kernels(a["X"]),
     r"the generated kernel code cannot evaluate 'scaled_tanh' \(a function sympy and tpcompiler have no code for\)"),
    ("layers Gelu(approximate=True)", lambda a: tp.layers.Gelu(approximate=True),
     r"^Gelu: approximate=True: in neural-tangents it changes the finite network only"),
    ("layers Dense batch_axis=1", lambda a: tp.layers.Dense(4, batch_axis=1), r"^Dense: only batch_axis=0 is supported"),
    ("layers Conv channels first", lambda a: tp.layers.Conv(4, (3, 3), dimension_numbers=("NCHW", "OIHW", "NCHW")),
     r"^Conv: only channels-last dimension_numbers \('NHWC', 'HWIO', 'NHWC'\)"),
    ("layers GlobalAvgPool channel_axis=1", lambda a: tp.layers.GlobalAvgPool(channel_axis=1),
     r"^GlobalAvgPool: only channel_axis=-1 is supported"),
    ("layers Relu do_stabilize='yes'", lambda a: tp.layers.Relu(do_stabilize="yes"), r"^Relu: do_stabilize must be True or False"),
    ("layers Exp b=nan", lambda a: tp.layers.Exp(1.0, float("nan")), r"^Exp: b must be a finite real number, got nan"),
    # (these reached the program and were refused there as a division by zero, or as numpy functions)
    ("layers Erf a=nan", lambda a: tp.layers.Erf(float("nan")), r"^Erf: a must be a finite real number, got nan"),
    ("layers Sin b=inf", lambda a: tp.layers.Sin(1.0, float("inf")), r"^Sin: b must be a finite real number, got inf"),
    ("layers Sin c=None", lambda a: tp.layers.Sin(1, 2, None), r"^Sin: c must be a finite real number, got None"),
    ("CoordCheck.slope label", lambda a: measured_coordcheck().slope("sp", "h", 1), r"^slope: no parametrization 'sp' was measured"),
    ("CoordCheck.slope layer", lambda a: measured_coordcheck().slope("mup", "g", 1), r"^slope: no layer 'g'; layers \['h'\]"),
    ("CoordCheck.slope step", lambda a: measured_coordcheck().slope("mup", "h", 2), r"^slope: step must be an integer from 0"),
]


def limit_engine(a, **kw):
    """A step engine on the bundled MLP (depth 1, its default phi) in the limit."""
    return tp.StepEngine(a["mlp"], a["mup"], method="particles", particles=8, groups=2, extrapolate=False, **kw)


class scaled_tanh(sp.Function):
    """A user's own sympy function, tanh(1.3 x): the particles evaluate it through ``_imp_``;
    generated kernel code cannot (it was a PrintMethodNotImplementedError traceback)."""

    nargs = 1
    _imp_ = staticmethod(lambda x: np.tanh(1.3 * x))

    def fdiff(self, argindex=1):
        return 1.3 * (1 - sp.tanh(1.3 * self.args[0]) ** 2)


def user_function_program():
    p = tp.Program("userfn")
    h = p.input_matrix("U", 3).apply(p.input("xi", 3), name="h")
    p.readout(tp.nonlin(lambda a: scaled_tanh(a), h).named("x"), sigma=1.0)
    return p


def pi_spec():
    return tp.PiSpec.from_program(tp.load(PINET))


def measured_coordcheck():
    """A CoordCheck of one parametrization ('mup'), one layer ('h') and one step, as coordcheck() fills it."""
    from tpcompiler.coordcheck import CoordCheck

    cc = CoordCheck("p", ["mup"], [tp.named("mup", 1)], [8, 16], ["h"], 1, 1, 0.1)
    cc.size_slope["mup"], cc.change_slope["mup"] = np.zeros((2, 1)), np.full((1, 1), 0.5)
    return cc


@pytest.mark.parametrize("call, pattern", [(c, p) for _, c, p in API_CASES], ids=[i for i, _, _ in API_CASES])
def test_api_refuses(api, call, pattern):
    with pytest.raises(tp.ProgramError) as excinfo:
        call(api)
    message = str(excinfo.value)
    assert "\n" not in message
    assert re.search(pattern, message), (pattern, message)


def test_catalogue_size():
    """Issue 7 asks for at least 100 invalid inputs across the CLI and the API."""
    assert len(CLI_CASES) + len(SUBPROCESS_CASES) + len(API_CASES) >= 100
    assert len(CLI_CASES) >= 50 and len(API_CASES) >= 50


# -- the other side of the validation layer: valid spellings are accepted ----------------------
def test_integral_floats_are_counts(api):
    """particles=1e4, width=16.0, steps=2.0 are the integers they denote (not TypeErrors)."""
    a = api
    r1, r2 = a["zc"].limit(particles=1e4, seed=0.0), a["zc"].limit(particles=10_000, seed=0)
    assert r1 == r2
    assert tp.simulate(a["zdot"], width=16.0, seed=np.int64(1)) == tp.simulate(a["zdot"], width=16, seed=1)
    s = sgd(a, steps=2.0, batch=np.int32(2))
    assert s.steps == 2 and isinstance(s.steps, int) and s.batch == 2


def test_cli_integral_float_counts(capsys):
    assert main(["limit", ZDOT, "--particles", "2e4", "--seed", "0", "--json"]) == 0
    a = capsys.readouterr().out
    assert main(["limit", ZDOT, "--particles", "20000", "--seed", "0", "--json"]) == 0
    assert capsys.readouterr().out == a


def test_out_without_suffix_reports_the_real_file(capsys, files, tmp_path):
    target = tmp_path / "kern"
    rc = main(_fill(kernels()[:-2] + ["--out", str(target)], files))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith(f"wrote {target}.npz: ")
    assert (tmp_path / "kern.npz").exists() and not target.exists()


def test_plot_without_extension_reports_the_real_file(capsys, tmp_path):
    target = tmp_path / "errors"
    rc = main(["check", ZDOT, "--widths", "8,16", "--seeds", "2", "--particles", "2000", "--plot", str(target)])
    out, err = capsys.readouterr()
    assert rc in (0, 1), err
    assert f"plot written to {target}.png" in out
    assert (tmp_path / "errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not target.exists()


def test_internal_errors_look_internal(capsys, monkeypatch):
    """A KeyError / TypeError raised by a bug is not reported as the user's mistake."""
    import tpcompiler.cli.commands as cli

    def broken(args):
        raise KeyError("q_3")

    monkeypatch.setattr(cli, "cmd_formulas", broken)
    rc = cli.main(["formulas", ZDOT])
    err = capsys.readouterr().err
    assert rc == 3
    assert err.startswith("tpc: internal error: KeyError: 'q_3'") and "please report" in err
    assert len(err.splitlines()) == 1


def test_argument_error_is_the_project_type():
    assert issubclass(ArgumentError, tp.ProgramError) and issubclass(ArgumentError, TypeError)


def test_a_hundred_layers_derive_and_deeper_is_one_error_line(capsys, files, monkeypatch):
    """The kernel backend's symmetry proofs recurse through the layers (about 12 frames each):
    a 100-layer MLP's kernels stopped with an internal RecursionError under Python's default
    limit of 1,000 frames, which tpcompiler now raises (tp.RECURSION_LIMIT).  Its NNGP off the
    diagonal is checked against the arc-cosine recursion written out here.  A recursion deeper
    still is one error line."""
    import tpcompiler.cli.commands as cli

    X = np.load(files["X"])
    depth = 100
    nngp = tp.compile(tp.load(MLP, depth=depth, phi="relu", d=3)).kernels(X)["nngp"]
    K = X @ X.T / 3  # input layer, w_std = 1, no bias: the relu arc-cosine map, layer by layer
    for _ in range(depth):
        d = np.sqrt(np.outer(np.diag(K), np.diag(K)))
        t = np.arccos(np.clip(K / d, -1.0, 1.0))
        K = d * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi)
    assert nngp == pytest.approx(K, rel=1e-9)

    def too_deep(args):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(cli, "cmd_formulas", too_deep)
    rc = cli.main(["formulas", ZDOT])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("tpc: error: the program is too deep for the derivation") and len(err.splitlines()) == 1


def test_a_pi_state_read_from_a_npy_file_is_refused_by_name(files):
    """A .npy (one bare array) as a pi-net state was a TypeError of np.load's context manager."""
    with pytest.raises(ValueError, match=r"cannot read '.*X\.npy': not a \.npz state file"):
        tp.PiLimit(tp.PiSpec.from_program(tp.load(PINET)), state=files["X"])
    rc = main(["train", PINET, "--param", "pi", "--init", files["X"], "--x", files["X"], "--y", files["Y"],
               "--lr", "0.1", "--steps", "1", "--out", str(Path(files["dir"]) / "pi.npz")])
    assert rc == 2


def test_scikit_learn_bounds_and_complex_inputs_are_refused():
    """Bounds (-1, 2) gave NaN bounds in log-space, which GaussianProcessRegressor optimized
    with; complex inputs were cut to their real part with only a ComplexWarning."""
    from tpcompiler.sklearn import NNGP

    with pytest.raises(tp.ProgramError, match=r"^w_std_bounds: expected 0 < low < high"):
        NNGP(MLP, w_std_bounds=(-1, 2)).bounds
    with pytest.raises(tp.ProgramError, match=r"^w_std_bounds: expected 'fixed' or a pair"):
        NNGP(MLP, w_std_bounds="nope").bounds
    with pytest.raises(tp.ProgramError, match=r"^X: holds complex numbers"):
        NNGP(MLP)(np.ones((2, 3)) * 1j)


def test_a_layers_program_takes_shaped_inputs_everywhere_and_abs_of_a_vector():
    """limit(x=) and predict_program refused (N, *input_shape) inputs of a tp.layers program,
    which kernels() and simulate() take; abs(u) was a TypeError (tp.phi("abs") exists)."""
    net = tp.layers.serial(tp.layers.Conv(4, (2,), padding="SAME"), tp.layers.Relu(), tp.layers.Flatten(), tp.layers.Dense(1))
    c = tp.compile(net.program((3, 2)))
    X = np.random.default_rng(0).standard_normal((2, 3, 2))
    kernels = c.kernels(X)
    limit = c.limit(x=X)
    assert limit["ntk[0,1]"] == (pytest.approx(kernels["ntk"][0, 1], rel=1e-12), 0.0)
    predicted = tp.predict.predict_program(c, X, np.ones(2), X[:1])
    assert predicted["nngp"].mean == pytest.approx(np.ones(1), abs=1e-8)  # (a training point's posterior mean)
    p = tp.Program("abs")
    p.output("m", tp.mean(abs(p.vec("u"))))
    assert tp.compile(p).limit()["m"][0] == pytest.approx(np.sqrt(2 / np.pi), rel=1e-9)


@pytest.mark.parametrize("lr", [np.nan, np.inf, -0.1])
def test_a_pi_step_refuses_a_learning_rate_that_is_not_a_non_negative_number(lr):
    """PiLimit.step and PiFinite.step took float(lr): NaN made every later prediction NaN."""
    spec = tp.PiSpec.from_program(tp.load(PINET))
    X = np.random.default_rng(0).standard_normal((2, spec.d))
    Y = np.eye(spec.dout)[[0, 1]] if spec.dout > 1 else np.ones((2, 1))
    for engine in (tp.PiLimit(spec), tp.PiFinite(spec, width=16)):
        with pytest.raises(tp.ProgramError, match=r"^lr: expected a non-negative finite number"):
            engine.step(X, Y, lr)


def test_zero_rows_and_tiny_entries_are_still_inputs(api):
    """The refusal of rows whose squared norm underflows (above) leaves alone an all-zero row
    (an input like any other: a relu net without biases has kernel 0 there) and a tiny entry
    beside an ordinary one (the same kernels as without it, to float64)."""
    kf = tp.compile(tp.load(MLP, depth=2, phi="relu", b_std=None, d=3)).kernel_function()
    X = np.array([[0.3, -1.2, 0.8], [0.0, 0.0, 0.0], [1.0, 1e-300, 0.0], [1.0, 0.0, 0.0]])
    K = kf(X)
    for k in ("nngp", "ntk"):
        assert np.all(K[k][1] == 0.0)
        np.testing.assert_allclose(K[k][2], K[k][3], rtol=1e-15)
