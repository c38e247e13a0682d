"""docs/programs/NAME.md is generated from programs/NAME.py, must not go stale, and holds
only valid TeX math (checked on the committed files, independently of the generator)."""
from pathlib import Path

import pytest

from tpcompiler.cli import docs

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = sorted((ROOT / "programs").glob("*.py"))
FIX = "docs are stale: run `python -m tpcompiler.cli.docs` and commit docs/programs/"


@pytest.fixture(scope="module")
def generated():
    return docs.pages()


def test_there_are_programs():
    assert PROGRAMS, "no programs/*.py found"
    assert docs.PROGRAMS == ROOT / "programs" and docs.DOCS == ROOT / "docs" / "programs"


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_page_exists_and_is_current(generated, program):
    page = ROOT / "docs" / "programs" / f"{program.stem}.md"
    assert page.exists(), f"{page.relative_to(ROOT)} is missing; {FIX}"
    assert page in generated
    assert page.read_text() == generated[page], f"{page.relative_to(ROOT)} differs from the generator; {FIX}"


def test_no_orphan_pages():
    stems = {p.stem for p in PROGRAMS}
    orphans = [p.name for p in (ROOT / "docs" / "programs").glob("*.md") if p.stem not in stems]
    assert not orphans, f"docs/programs has pages of no program: {orphans}; delete them"


def test_check_mode_agrees(capsys):
    assert docs.main(["--check"]) == 0, capsys.readouterr().err


PAGES = sorted((ROOT / "docs" / "programs").glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_every_formula_on_the_committed_pages_is_valid_tex(page):
    """Independent of the generator: the committed page's $...$ formulas parse as TeX math
    (matplotlib's mathtext, plus a text-mode check of every \\text{}; see texcheck.py)."""
    import logging

    import texcheck

    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    formulas = texcheck.markdown_formulas(page.read_text())
    assert len(formulas) > 10, f"{page.name}: too few formulas found ({len(formulas)})"
    bad = [f"{f!r}: {p}" for f in formulas for p in texcheck.problems(f)]
    assert not bad, f"{page.name}: {len(bad)} invalid formulas, e.g. {bad[:3]}"


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_every_initial_covariance_a_formula_reads_is_defined(program):
    """Each Cov(Z^a, Z^b(xi')) of initial Gaussians that a page's formulas read is stated in its
    ZInit section.  At two inputs Cov(Z^a, Z^b(xi')) and Cov(Z^b, Z^a(xi')) are different
    functions (xi and xi' exchanged); the section listed one order only, while cnn1d's and
    rnn's NTKs read both (review of the docs)."""
    import re

    text = (ROOT / "docs" / "programs" / f"{program.stem}.md").read_text()
    zinit = text.split("## Initial Gaussians (ZInit)")[1].split("\n## ")[0] if "## Initial Gaussians" in text else ""
    cov = re.compile(r"\\mathrm\{Cov\}\((Z\^\{[^()]*\}), (Z\^\{[^()]*\}(?:\(\\xi'\))?)\)")
    defined = {m.groups() for m in re.finditer(cov.pattern + r" = ", zinit)}
    read = {m.groups() for m in cov.finditer(text)}
    assert read <= defined, sorted(read - defined)
