"""Rendering of a derived Z program to Markdown (with $...$ math) or LaTeX (docs/DESIGN.md 3).

Everything printed is read off the ``ZProgram``: the listing, the initial Gaussians, the
ZHat families and their covariance rule, each Z recursion with its ZDot terms (zero terms
shown with the symmetry that proves them zero), the moments and the outputs.
"""
from __future__ import annotations

import sympy as sp

from tpcompiler.ir import ops
from tpcompiler.ir.graph import describe
from tpcompiler.printing.latex import escape_text, latex, text
from tpcompiler.ir.ops import node_symbol
from tpcompiler.symbolic.master import Expectation, Z, ZProgram


def _node_latex(key: str) -> str:
    return latex(node_symbol(key))


def tex(expr) -> str:
    """LaTeX of an expression with Z^x, ZHat^x and scalar names typeset."""
    return latex(sp.sympify(expr))


def _family_name(family: tuple) -> str:
    mat, tr = family
    return _node_latex(mat) + (r"^{\top}" if tr else "")


def _zdot_lines(zp: ZProgram, key: str) -> list[str]:
    entry = zp.entries[key]
    mat, x, tr = zp.graph.matmul_parts(key)
    other = _family_name((mat, not tr))
    if not entry.zdot:
        return [rf"\dot{{Z}}^{{{_node_latex(key)}}} = 0 \quad\text{{(}}Z^{{{_node_latex(x)}}}\text{{ depends on no earlier }}{other}\text{{ product)}}"]
    lines = []
    nonzero = [t for t in entry.zdot if not t.is_zero]
    rhs = " + ".join(tex(zp.display(t.coefficient) * Z(t.y)) for t in nonzero) or "0"
    lines.append(rf"\dot{{Z}}^{{{_node_latex(key)}}} = {rhs}")
    for t in entry.zdot:
        if t.is_zero:
            d = zp.derivative_display(x, t.source)
            lines.append(
                rf"\quad \text{{term }} Z^{{{_node_latex(t.y)}}}:\ \mathbb{{E}}\left[{tex(d)}\right] = 0"
                rf"\ {text('(' + t.zero_reason + ')')}"
            )
    return lines


def _input_layer_line(g, key: str) -> str:
    """An input layer: a Gaussian whose covariance is an inner product of inputs."""
    k = _node_latex(key)
    U = g.args(key)[0]
    parts = [rf"Z^{{{k}}}\ \text{{Gaussian, independent of all but the input layers of }} {_node_latex(U)}"]
    dependent = g.input_dependent()
    if key in dependent:
        parts.append(rf"\mathrm{{Cov}}(Z^{{{k}}}, Z^{{{k}}}(\xi')) = {latex(g.init_covariance(key, key, prime_b=True))}")
    else:
        parts.append(rf"\mathrm{{Var}}(Z^{{{k}}}) = {latex(g.init_covariance(key, key))}")
    for other in g.keys_of(ops.InputLayer):
        if other == key:
            break
        if g.args(other)[0] == U:
            c = g.init_covariance(other, key, prime_b=key in dependent)
            second = r"(\xi')" if key in dependent else ""
            parts.append(rf"\mathrm{{Cov}}(Z^{{{_node_latex(other)}}}, Z^{{{k}}}{second}) = {latex(c)}")
    return r",\ ".join(parts)


def _sections(zp: ZProgram) -> list[tuple[str, list[str]]]:
    g = zp.graph
    listing = [describe(g, k, latex=True) for k in zp.order]
    inits, families, recursions, moments = [], [], [], []
    for key in zp.order:
        e = zp.entries[key]
        k = _node_latex(key)
        if e.rule == "init" and isinstance(g.op(key), ops.InputLayer):
            inits.append(_input_layer_line(g, key))
        elif e.rule == "init":
            cov = [
                rf"\mathrm{{Cov}}(Z^{{{k}}}, Z^{{{_node_latex(o)}}}) = {latex(c)}"
                for pair, c in g.init_cov.items() if key in pair
                for o in pair - {key} if g.g.nodes[o]["index"] < g.g.nodes[key]["index"]
            ]
            inits.append(rf"Z^{{{k}}} \sim \mathcal{{N}}(0, {latex(g.op(key).var)})" + ("".join(r",\ " + c for c in cov)))
        elif e.rule == "nonlin":
            recursions.append(rf"Z^{{{k}}} = {tex(e.z)}")
        elif e.rule == "matmul":
            recursions.append(rf"Z^{{{k}}} = \hat{{Z}}^{{{k}}} + \dot{{Z}}^{{{k}}}")
            recursions.extend(_zdot_lines(zp, key))
        elif e.rule == "moment":
            op = g.op(key)
            rep = {}
            for s in op.expr.free_symbols:
                base, primed = ops.unprime(s)
                if g.kind(base) == ops.VEC:
                    rep[s] = Z(base, primed)
            zexpr = op.expr.xreplace(rep)
            if e.z == 0:
                moments.append(rf"\mathring{{{k}}} = {tex(Expectation(zexpr))} = 0 \quad{text('(' + e.zero_reason + ')')}")
            else:
                moments.append(rf"\mathring{{{k}}} = {tex(e.z)}")
    for family, members in zp.families.items():
        items = ", ".join(rf"\hat{{Z}}^{{{_node_latex(m)}}}\ ({_family_name(family)} {_node_latex(zp.entries[m].x)})" for m in members)
        mat = family[0]
        families.append(
            rf"{_family_name(family)}:\ {items};\quad \mathrm{{Cov}}(\hat{{Z}}^{{{_family_name(family)}x}}, \hat{{Z}}^{{{_family_name(family)}y}}) = {latex(g.op(mat).sigma ** 2)}\,\mathbb{{E}}[Z^x Z^y]"
        )
    outputs = [rf"{text(name)} = {latex(expr)}" for name, expr in g.outputs.items()]
    return [
        ("Program", listing),
        ("Initial Gaussians (ZInit)", inits),
        ("ZHat families (independent across families; W and W^T are different)", families),
        ("Z recursions (ZNonlin, ZMatMul = ZHat + ZDot)", recursions),
        ("Moments (limits of scalars: ZMoment)", moments),
        ("Outputs", outputs),
    ]


def render(zp: ZProgram, format: str = "markdown") -> str:
    """The derived formulas of ``zp`` as Markdown or LaTeX."""
    sections = _sections(zp)
    if format == "markdown":
        out = [f"# `{zp.graph.name}`: derived infinite-width limit", ""]
        out.append(
            "Master theorem (NETSOR-transpose): each vector x has a limit random variable $Z^x$; "
            r"$\mathring\theta$ is the deterministic limit of a scalar $\theta$; "
            r"$\dot Z^{Wx} = \sigma_W^2 \sum_y Z^y\, \mathbb{E}[\partial Z^x/\partial \hat Z^{W^\top y}]$ "
            "over the earlier transposed products."
        )
        for title, lines in sections:
            out += ["", f"## {title}", ""]
            out += [f"- ${line}$" for line in lines] if lines else ["(none)"]
        return "\n".join(out) + "\n"
    if format == "latex":
        out = [f"% {zp.graph.name}: derived infinite-width limit (tpcompiler)"]
        for title, lines in sections:
            out.append(rf"\paragraph{{{escape_text(title)}}}")
            if lines:
                out.append(r"\begin{align*}")
                out.append(" \\\\\n".join(f"& {line}" for line in lines))
                out.append(r"\end{align*}")
        return "\n".join(out) + "\n"
    raise ValueError(f"unknown format {format!r}; use 'markdown' or 'latex'")
