"""Build the documentation site in strict mode and check every page in headless Chromium.

    python tools/check_site.py [--no-build] [--site DIR] [--screenshots DIR]

1. ``mkdocs build --strict`` (a warning, a broken link or a failing tutorial fails the build);
2. serves the built site on 127.0.0.1 and opens every page in Debian's headless Chromium
   (``apt-get install -y chromium chromium-driver``) through selenium, with every host but
   127.0.0.1 unresolvable, so a page that needs the network fails;
3. fails on: a formula KaTeX could not render (``.katex-error``, or an ``.arithmatex`` element
   left without KaTeX output), a console message of level SEVERE (JavaScript errors, failed
   loads), an image that did not load, a page that renders no formula although its source
   has math;
4. opens the home page from disk (file://) too and searches it: the site works without a server;
5. saves screenshots of a few pages (``site-check/*.png``) for a person to look at.

Exit code 0 when every page passes, 1 otherwise (each problem printed as one line).
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Pages photographed: (page, file name, scroll to the first element matching this CSS selector).
SCREENSHOTS = [
    ("index.html", "home.png", None),
    ("concepts.html", "concepts.png", "#zhat-and-zdot"),
    ("programs/mlp.html", "program-mlp.png", "#zhat-families-independent-across-families-w-and-wt-are-different"),
    ("tutorials/first_program.html", "tutorial-first-program.png", "#the-derived-recursions"),
    ("tutorials/kernels.html", "tutorial-kernels.png", "img"),
    ("tutorials/training.html", "tutorial-training.png", "img"),
    ("tutorials/word2vec.html", "tutorial-word2vec.png", "img"),
    ("api.html", "api.png", None),
]
#: Run in the page after load: everything the check needs, as one JSON-able dict.
PROBE = """
const math = document.querySelectorAll('.arithmatex');
const unrendered = [...math].filter(e => !e.querySelector('.katex')).map(e => e.textContent.slice(0, 80));
const errors = [...document.querySelectorAll('.katex-error, merror')].map(
    e => (e.getAttribute('title') || e.textContent).slice(0, 160));
const images = [...document.querySelectorAll('img')];
const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
return {math: math.length, rendered: document.querySelectorAll('.katex').length,
        unrendered: unrendered, errors: errors, images: images.length, broken: broken};
"""


def build(site: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, env=env)
    if done.returncode != 0:
        sys.exit(f"check_site: `mkdocs build --strict` failed (exit {done.returncode}); see its output above")
    print(f"check_site: built {site} in {time.perf_counter() - t0:.0f} s")


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            sys.exit(f"check_site: {path} not found: install Debian's packages "
                     f"(apt-get install -y chromium chromium-driver; missing: {package})")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def source_has_math(page: Path) -> bool:
    """Whether the built page contains math markup at all (arithmatex output)."""
    return 'class="arithmatex"' in page.read_text()


def check_page(driver, url: str, page: Path) -> list[str]:
    driver.get(url)
    deadline = time.time() + 20
    while driver.execute_script("return document.readyState") != "complete" and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # KaTeX renders on the document$ event after load
    found = driver.execute_script(PROBE)
    problems = [f"KaTeX error: {e}" for e in found["errors"]]
    problems += [f"formula not rendered: {t!r}" for t in found["unrendered"][:5]]
    problems += [f"image not loaded: {src}" for src in found["broken"]]
    if source_has_math(page) and found["rendered"] == 0:
        problems.append("page has math but KaTeX rendered none of it")
    problems += [f"console {entry['level']}: {entry['message'][:300]}" for entry in driver.get_log("browser")
                 if entry["level"] == "SEVERE"]
    return problems, found


def check_from_disk(driver, site: Path) -> list[str]:
    """The home page opened as a file renders its math and its search finds pages."""
    from selenium.webdriver.common.by import By

    page = site / "index.html"
    problems, _ = check_page(driver, page.resolve().as_uri(), page)
    box = driver.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.click()
    box.send_keys("ZDot")
    deadline, hits = time.time() + 15, 0
    while not hits and time.time() < deadline:
        time.sleep(0.5)
        hits = driver.execute_script("return document.querySelectorAll('.md-search-result__item').length")
    if not hits:
        problems.append("search for 'ZDot' found nothing")
    return problems + [f"console {e['level']}: {e['message'][:300]}" for e in driver.get_log("browser")
                       if e["level"] == "SEVERE"]


def screenshot(driver, base: str, page: str, target: Path, selector: str | None) -> None:
    driver.get(base + page)
    time.sleep(0.8)
    if selector:
        driver.execute_script("const e = document.querySelector(arguments[0]); if (e) e.scrollIntoView();", selector)
        time.sleep(0.3)
    driver.save_screenshot(str(target))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true", help="check an existing site/ without building it")
    parser.add_argument("--site", default=str(ROOT / "site"), help="site directory (default: site/)")
    parser.add_argument("--screenshots", default=str(ROOT / "site-check"), help="where screenshots go")
    args = parser.parse_args(argv)
    site, shots = Path(args.site), Path(args.screenshots)
    if not args.no_build:
        build(site)
    pages = sorted(p for p in site.rglob("*.html") if p.name != "404.html")
    if not pages:
        sys.exit(f"check_site: no pages in {site}")
    server, base = serve(site)
    driver = browser()
    failures, totals = 0, {"math": 0, "rendered": 0, "images": 0}
    try:
        for page in pages:
            rel = page.relative_to(site).as_posix()
            problems, found = check_page(driver, base + rel, page)
            for key in totals:
                totals[key] += found[key]
            for problem in problems:
                print(f"FAIL {rel}: {problem}")
            failures += bool(problems)
        problems = check_from_disk(driver, site)
        for problem in problems:
            print(f"FAIL file://index.html: {problem}")
        failures += bool(problems)
        if shots.exists():
            shutil.rmtree(shots)
        shots.mkdir(parents=True)
        for rel, name, selector in SCREENSHOTS:
            if (site / rel).exists():
                screenshot(driver, base, rel, shots / name, selector)
    finally:
        driver.quit()
        server.shutdown()
    print(f"check_site: {len(pages)} pages, {totals['rendered']} formulas rendered by KaTeX "
          f"({totals['math']} math elements), {totals['images']} images; {failures} pages with problems; "
          f"screenshots in {shots}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
