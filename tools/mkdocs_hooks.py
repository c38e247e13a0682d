"""MkDocs hooks of the documentation site (mkdocs.yml: ``hooks:``).

The site's browser files are shipped with it, never loaded from the network when a page is
read: the build installs the versions pinned in tools/site_assets/package.json (with its lock
file) from the npm registry into tools/site_assets/node_modules (``npm ci``, once), and copies
into site/assets/ KaTeX's browser files (they render the formulas) and iframe-worker's shim
(Material's offline search runs its web worker through it when a page is opened from disk).
The tutorials run in the build's process against the tpcompiler of this checkout, which goes
first on sys.path (an installed tpcompiler of another checkout would otherwise be imported).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tools" / "site_assets"
MODULES = ASSETS / "node_modules"
#: (file or folder under node_modules, where it goes under site/assets/)
SHIPPED = [(f"katex/dist/{name}", f"katex/{name}")
           for name in ("katex.min.js", "katex.min.css", "fonts", "contrib/auto-render.min.js")]
SHIPPED.append(("iframe-worker/shim/index.js", "iframe-worker/shim.js"))


def _pinned() -> dict[str, str]:
    return json.loads((ASSETS / "package.json").read_text())["dependencies"]


def _installed(package: str) -> str | None:
    manifest = MODULES / package / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.exists() else None


def _missing() -> list[str]:
    return [f"{name}@{version}" for name, version in _pinned().items() if _installed(name) != version]


def install_assets() -> None:
    """``npm ci`` in tools/site_assets when a pinned package is missing or at another version."""
    if not _missing():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise PluginError(f"the site ships {', '.join(_missing())} from the npm registry, but `npm` is not "
                          "on PATH: install Node.js and npm (Debian: apt-get install -y nodejs npm)")
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=ASSETS,
                          capture_output=True, text=True)
    if done.returncode != 0 or _missing():
        raise PluginError(f"`npm ci` in {ASSETS} did not install {', '.join(_missing())}: "
                          f"{done.stderr.strip()[-500:]}")


def on_config(config):
    if sys.path[:1] != [str(ROOT)]:
        sys.path.insert(0, str(ROOT))
    install_assets()  # fail before the (long) build if the assets cannot be had
    return config


def on_post_build(config):
    install_assets()
    target = Path(config["site_dir"]) / "assets"
    for src, dst in SHIPPED:
        src, dst = MODULES / src, target / dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
