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


def _docs_of(tmp_path, monkeypatch, programs: dict) -> Path:
    """docs.main over a programs/ folder of ``programs`` {file name: source} and an empty
    docs/programs/ (returned)."""
    (tmp_path / "programs").mkdir()
    for name, source in programs.items():
        (tmp_path / "programs" / name).write_text(source)
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(docs, "PROGRAMS", tmp_path / "programs")
    monkeypatch.setattr(docs, "DOCS", tmp_path / "docs" / "programs")
    return tmp_path / "docs" / "programs"


ZDOT_SOURCE = (ROOT / "programs" / "zdot.py").read_text()


def test_check_names_pages_of_no_program_and_writing_deletes_them(tmp_path, monkeypatch, capsys):
    """A program renamed or removed leaves its page: --check says so (as test_no_orphan_pages
    does), and writing deletes the pages it generated, never a hand-written file."""
    out = _docs_of(tmp_path, monkeypatch, {"zdot.py": ZDOT_SOURCE})
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0
    (out / "old.md").write_text((out / "zdot.md").read_text())   # the page of a program since renamed
    (out / "notes.md").write_text("# written by hand\n")
    capsys.readouterr()
    assert docs.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pages of no program: docs/programs/notes.md, docs/programs/old.md" in err
    assert docs.main([]) == 0
    assert not (out / "old.md").exists() and (out / "notes.md").exists()
    assert "kept docs/programs/notes.md: not a generated page" in capsys.readouterr().err


@pytest.mark.parametrize("source, message", [
    ("import tpcompiler as tp\ndef build(n=1):\n    raise ValueError('n must be 2')\n", "programs/bad.py: n must be 2"),
    ("X = 1\n", "programs/bad.py: "),
    (ZDOT_SOURCE + "\nDOC_VARIANTS = [{'nothere': 1}]\n", "programs/bad.py: "),
], ids=["build raises", "no build", "unknown variant parameter"])
def test_a_program_that_cannot_be_built_is_a_one_line_error(tmp_path, monkeypatch, capsys, source, message):
    _docs_of(tmp_path, monkeypatch, {"bad.py": source})
    for argv in ([], ["--check"]):
        assert docs.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("docs: error: " + message), err


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
