"""README.md states the commands CI runs, and its quick start works."""
import re
import shlex
from pathlib import Path

import pytest

from tpcompiler.cli.commands import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
MAIN_JOB = "tpc formulas programs/mlp.py && tpc limit programs/mlp.py -p depth=2 -p phi=relu"


def ci_command(var):
    m = re.search(rf'^{var}="(.*)"\s*$', CI, re.MULTILINE)
    assert m, f".ci/run defines no {var}"
    return m.group(1)


def code_lines(text):
    """Lines of the README's fenced sh code blocks."""
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("var", ["INSTALL_CMD", "TEST_CMD"])
def test_readme_states_the_ci_commands(var):
    cmd = ci_command(var)
    assert cmd in code_lines(README), f"README.md does not state {var} of .ci/run exactly: {cmd}"


def test_readme_states_the_main_job():
    assert MAIN_JOB in code_lines(README)


def test_main_job_runs(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for part in MAIN_JOB.split("&&"):
        argv = shlex.split(part)
        assert argv[0] == "tpc"
        rc = main(argv[1:])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert "Traceback" not in err and out.strip()
    lines = out.splitlines()  # the limit: nngp and ntk on the two default inputs
    names = [line.split("\t")[0] for line in lines]
    assert names == [f"{k}[{a},{b}]" for k in ("nngp", "ntk") for a in range(2) for b in range(2)]
    assert all(float(line.split("\t")[1]) > 0 for line in lines)
