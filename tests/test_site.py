"""The documentation site's configuration (mkdocs.yml) stays in step with docs/; cheap checks
only: building the site and opening it in a browser is tools/check_site.py."""
import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG = (ROOT / "mkdocs.yml").read_text()


def nav_pages() -> list[str]:
    """The Markdown files the nav lists (entries ``- title: path.md`` or ``- path.md``)."""
    nav = CONFIG[CONFIG.index("\nnav:"):]
    return re.findall(r"^\s*-\s+(?:(?:\"[^\"\n]*\"|[^:\n]+):\s+)?([\w/.-]+\.md)\s*$", nav, re.MULTILINE)


def test_every_nav_entry_exists():
    missing = [p for p in nav_pages() if not (DOCS / p).exists()]
    assert nav_pages() and not missing, f"mkdocs.yml lists pages that do not exist: {missing}"


def test_every_page_is_in_the_nav():
    """A new program page (python -m tpcompiler.cli.docs) or tutorial must be added to the nav."""
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    missing = sorted(pages - set(nav_pages()))
    assert not missing, f"docs pages missing from mkdocs.yml's nav: {missing}"


def test_tutorials_execute_code():
    """Every tutorial runs code at build time (markdown-exec), so its output is real."""
    tutorials = sorted((DOCS / "tutorials").glob("*.md"))
    assert len(tutorials) >= 4
    idle = [t.name for t in tutorials if '```python exec="on"' not in t.read_text()]
    assert not idle, f"tutorials with no executed block: {idle}"


def test_build_is_strict_and_math_is_shipped():
    assert re.search(r"^strict: true$", CONFIG, re.MULTILINE)
    assert not re.search(r"^\s*-\s+https?://", CONFIG, re.MULTILINE), "extra_javascript/css must be shipped files"
    assets = ROOT / "tools" / "site_assets"
    pinned = json.loads((assets / "package.json").read_text())["dependencies"]
    locked = json.loads((assets / "package-lock.json").read_text())["packages"]
    for name, version in pinned.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name} must be pinned exactly, got {version}"
        assert locked[f"node_modules/{name}"]["version"] == version, f"package-lock.json is stale for {name}"


def test_docs_extra_is_pinned():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["docs"] and all("==" in req for req in extras["docs"]), extras["docs"]
