"""docs/programs/NAME.md is generated from programs/NAME.py and must not go stale."""
from pathlib import Path

import pytest

from tpcompiler import docs

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = sorted((ROOT / "programs").glob("*.py"))
FIX = "docs are stale: run `python -m tpcompiler.docs` and commit docs/programs/"


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
