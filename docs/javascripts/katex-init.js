// Renders the math of every page with the KaTeX shipped in assets/katex/ (tools/mkdocs_hooks.py).
// pymdownx.arithmatex (generic mode) wraps each $...$ / $$...$$ in <span|div class="arithmatex">
// with \( \) or \[ \] delimiters.  A formula KaTeX cannot parse becomes a visible
// .katex-error element (throwOnError: false), which tools/check_site.py looks for.
function renderMath() {
  for (const el of document.querySelectorAll(".arithmatex")) {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
}
// Material's instant navigation swaps page content without a reload: render on every page.
if (typeof document$ !== "undefined") {
  document$.subscribe(renderMath);
} else {
  document.addEventListener("DOMContentLoaded", renderMath);
}
