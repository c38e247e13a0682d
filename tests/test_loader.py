"""tp.load (docs/DESIGN.md 5): programs/NAME.py defines build(**params) returning a Program; every
way a program file can be wrong gives one clear ProgramError naming the file."""
import os
import re
import sys
from pathlib import Path

import pytest

import tpcompiler as tp
from tpcompiler.ir import ops
from tpcompiler.ir.ops import node_symbol
from tpcompiler.frontend.loader import parameters, parse_params, parse_value

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "programs"
MLP = PROGRAMS / "mlp.py"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line(excinfo):
    assert isinstance(excinfo.value, ValueError)
    assert "\n" not in str(excinfo.value)


def test_unknown_parameter_lists_known_ones():
    with pytest.raises(tp.ProgramError, match=r"program mlp\.py has no parameter 'height'; "
                                              r"its parameters are: depth, phi, w_std, b_std, d") as e:
        tp.load(MLP, height=3)
    one_line(e)


def test_unknown_parameter_of_a_parameterless_build(tmp_path):
    path = write(tmp_path, "noparams.py", "import tpcompiler as tp\ndef build():\n    return tp.Program('x')\n")
    with pytest.raises(tp.ProgramError, match=r"has no parameter 'a'; its parameters are: \(none\)"):
        tp.load(path, a=1)


def test_var_keyword_build_accepts_anything(tmp_path):
    path = write(tmp_path, "kw.py", "import tpcompiler as tp\ndef build(**kw):\n    return tp.Program('kw_' + str(len(kw)))\n")
    assert tp.load(path, a=1, b=2).name == "kw_2"


def test_missing_file(tmp_path):
    with pytest.raises(tp.ProgramError, match=r"program file '.*nothere\.py' not found") as e:
        tp.load(tmp_path / "nothere.py")
    one_line(e)


def test_not_a_python_file(tmp_path):
    path = write(tmp_path, "prog.txt", "def build(): pass\n")
    with pytest.raises(tp.ProgramError, match=r"must be a Python file \(\.py\)"):
        tp.load(path)


def test_file_without_build(tmp_path):
    path = write(tmp_path, "nobuild.py", "x = 1\n")
    with pytest.raises(tp.ProgramError, match=r"program file '.*nobuild\.py' defines no build\(\*\*params\) function") as e:
        tp.load(path)
    one_line(e)


def test_build_not_callable(tmp_path):
    path = write(tmp_path, "buildvalue.py", "build = 3\n")
    with pytest.raises(tp.ProgramError, match=r"defines no build\(\*\*params\) function"):
        tp.load(path)


@pytest.mark.parametrize("ret, kind", [("3", "int"), ("None", "NoneType"), ("tp.Program('a').graph", "Graph")])
def test_build_returns_something_else(tmp_path, ret, kind):
    path = write(tmp_path, "badret.py", f"import tpcompiler as tp\ndef build():\n    return {ret}\n")
    with pytest.raises(tp.ProgramError, match=rf"build\(\) in '.*badret\.py' returned {kind}, not a tpcompiler\.Program") as e:
        tp.load(path)
    one_line(e)


@pytest.mark.parametrize("text, what", [
    ("import nonexistent_module_xyz\n", r"ModuleNotFoundError: No module named 'nonexistent_module_xyz'"),
    ("def build(:\n    pass\n", r"SyntaxError: "),
    ("raise RuntimeError('boom\\nsecond line')\n", r"RuntimeError: boom"),
])
def test_file_that_fails_to_import(tmp_path, text, what):
    path = write(tmp_path, "broken.py", text)
    with pytest.raises(tp.ProgramError, match=r"program file '.*broken\.py' failed to import: " + what):
        tp.load(path)


def test_build_that_raises_is_reported_with_the_file(tmp_path):
    path = write(tmp_path, "raises.py", "def build():\n    return {}['missing']\n")
    with pytest.raises(tp.ProgramError, match=r"build\(\) in '.*raises\.py' failed: KeyError: 'missing'"):
        tp.load(path)


def test_program_errors_from_build_pass_through_unchanged():
    with pytest.raises(tp.DSLError, match=r"^tp\.phi: unknown nonlinearity 'foo'"):
        tp.load(MLP, phi="foo")
    with pytest.raises(ValueError, match=r"^mlp: depth must be a positive integer, got 0$"):
        tp.load(MLP, depth=0)


def hidden_layers(program):
    g = program.graph
    return sorted(k for k in g.g if re.fullmatch(r"h\d+", k) and g.kind(k) == ops.VEC)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_depth_passes_through(depth):
    p = tp.load(MLP, depth=depth)
    assert hidden_layers(p) == [f"h{layer}" for layer in range(1, depth + 1)]
    mats = sorted(k for k in p.graph.g if p.graph.kind(k) == ops.MAT)
    assert mats == [f"W{layer}" for layer in range(2, depth + 1)]


def test_other_parameters_pass_through():
    p = tp.load(MLP, depth=2, phi="erf", w_std=1.5, b_std=0.1, d=5)
    g = p.graph
    assert g.op("w_std").value == 1.5 and g.op("b_std").value == 0.1
    assert g.op("b1").var == node_symbol("b_std") ** 2  # the symbol b_std (a runtime kernel argument)
    assert len(g.inputs["xi"].keys) == 5
    assert "erf" in str(g.op("x1").expr)
    assert tp.load(MLP).graph.op("w_std").value == 1.0  # defaults


def test_parameters_of_a_file():
    assert parameters(MLP) == {"depth": 2, "phi": "relu", "w_std": 1.0, "b_std": None, "d": 3,
                               "parameterization": "ntk", "width": 512}


def test_every_bundled_program_loads():
    for path in sorted(PROGRAMS.glob("*.py")):
        assert isinstance(tp.load(path), tp.Program), path


def test_parse_params():
    assert parse_params(["depth=3", "phi=relu", "w_std=1.5", "b_std=None", "name = a b"]) == {
        "depth": 3, "phi": "relu", "w_std": 1.5, "b_std": None, "name": "a b"}
    assert parse_value("[1, 2]") == [1, 2] and parse_value("x=y") == "x=y"
    with pytest.raises(tp.ProgramError, match=r"parameter 'depth' must look like key=value"):
        parse_params(["depth"])
    with pytest.raises(tp.ProgramError, match=r"parameter name '1a' is not a valid name"):
        parse_params(["1a=2"])
    with pytest.raises(tp.ProgramError, match=r"parameter name '' is not a valid name"):
        parse_params(["=2"])
    # a key given twice: one value is accepted, two different ones are refused
    assert parse_params(["d=3", "d = 3"]) == {"d": 3}
    with pytest.raises(tp.ProgramError, match=r"parameter 'd' is given twice, as 3 and as 4; give it once"):
        parse_params(["d=3", "d=4"])
    with pytest.raises(tp.ProgramError, match=r"parameter 'd' is given twice, as 3 and as 3.0"):
        parse_params(["d=3", "d=3.0"])


def test_a_program_edited_within_a_second_at_the_same_size_is_the_new_program(tmp_path, monkeypatch):
    """A sweep that rewrites a program file (sigma 1.1 -> 1.3: same size) within the second
    got the old program: Python's import read the bytecode file it had written, whose stamp
    is the source's modification time in whole seconds and its size (cache audit).  The
    limit is sigma^2 E[u^2] = sigma^2 (closed form)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # (the environment may set PYTHONDONTWRITEBYTECODE)
    path = tmp_path / "sweep.py"
    text = ("import tpcompiler as tp\n\ndef build():\n    p = tp.Program('sweep')\n    u = p.vec('u')\n"
            "    W = p.mat('W', sigma={})\n    h = W @ u\n    p.output('m', tp.mean(h * h))\n    return p\n")
    path.write_text(text.format("1.1"))
    stamp = path.stat().st_mtime_ns
    assert tp.compile(tp.load(path)).limit()["m"][0] == pytest.approx(1.21, rel=1e-12)
    path.write_text(text.format("1.3"))
    os.utime(path, ns=(stamp, stamp))  # the same second, as a fast sweep writes it
    assert tp.compile(tp.load(path)).limit()["m"][0] == pytest.approx(1.69, rel=1e-12)
    assert not (tmp_path / "__pycache__").exists()
