"""Rendering of a derived Z program to Markdown (with $...$ math) or LaTeX (docs/DESIGN.md 3).

Everything printed is read off the ``ZProgram`` by one printer, ``ZProgramPrinter`` (the
program printer of ``printing.program`` extended to the Master theorem's objects): the
listing, the initial Gaussians, the ZHat families and their covariance rule, each Z
recursion with its ZDot terms (zero terms shown with the symmetry that proves them zero),
the moments and the outputs.  The formulas are the same for both formats; only the page
around them differs (``render``).
"""
from __future__ import annotations

import sympy as sp

from tpcompiler.ir import ops
from tpcompiler.printing.latex import escape_text, text
from tpcompiler.printing.program import ProgramPrinter
from tpcompiler.symbolic.master import Expectation, Z, ZProgram


class ZProgramPrinter(ProgramPrinter):
    """TeX of a Z program: the program printer with the Master theorem's lines."""

    def __init__(self, zp: ZProgram, settings=None):
        super().__init__(zp.graph, settings)
        self.zp = zp

    def z(self, key: str, primed: bool = False) -> str:
        return self._print(Z(key, primed))

    def family(self, family: tuple) -> str:
        """A ZHat family: W or W^T."""
        mat, tr = family
        return self.node(mat) + (r"^{\top}" if tr else "")

    def cov(self, a: str, b: str, c: sp.Expr, prime_b: bool = False) -> str:
        return rf"\mathrm{{Cov}}({self.z(a)}, {self.z(b, prime_b)}) = {self._print(c)}"

    # -- sections -----------------------------------------------------------------------
    def initial(self, key: str) -> str:
        """An initial Gaussian: its variance and covariances with earlier ones."""
        g = self.graph
        if isinstance(g.op(key), ops.InputLayer):
            return self.input_layer(key)
        covs = [self.cov(key, o, c) for pair, c in g.init_cov.items() if key in pair
                for o in self._earlier(key, pair - {key})]
        return rf"{self.z(key)} \sim \mathcal{{N}}(0, {self._print(g.op(key).var)})" + "".join(r",\ " + c for c in covs)

    def input_layer(self, key: str) -> str:
        """An input layer: a Gaussian whose covariance is an inner product of inputs."""
        g = self.graph
        U = g.args(key)[0]
        parts = [rf"{self.z(key)}\ {text('Gaussian, independent of all but the input layers of ')} {self.node(U)}"]
        second = key in g.input_dependent()
        if second:
            parts.append(self.cov(key, key, g.init_covariance(key, key, prime_b=True), prime_b=True))
        else:
            parts.append(rf"\mathrm{{Var}}({self.z(key)}) = {self._print(g.init_covariance(key, key))}")
        for other in g.keys_of(ops.InputLayer):
            if other == key:
                break
            if g.args(other)[0] == U:
                earlier_first = g.init_covariance(other, key, prime_b=second)
                parts.append(self.cov(other, key, earlier_first, prime_b=second))
                # at two inputs Cov(Z^a, Z^b(xi')) is Cov(Z^b, Z^a(xi')) with xi and xi'
                # exchanged: another function, which outputs read too (a convolution's taps)
                later_first = g.init_covariance(key, other, prime_b=True) if second else earlier_first
                if later_first != earlier_first:
                    parts.append(self.cov(key, other, later_first, prime_b=True))
        return r",\ ".join(parts)

    def zdot(self, key: str) -> list[str]:
        """ZDot^key: its nonzero terms, then each zero term with the symmetry proving it."""
        zp = self.zp
        entry = zp.entries[key]
        mat, x, tr = self.graph.matmul_parts(key)
        head = rf"\dot{{Z}}^{{{self.node(key)}}}"
        if not entry.zdot:
            return [rf"{head} = 0 \quad{text('(')}{self.z(x)}{text(' depends on no earlier ')}"
                    rf"{self.family((mat, not tr))}{text(' product)')}"]
        nonzero = [t for t in entry.zdot if not t.is_zero]
        rhs = self._print(sp.Add(*[zp.display(t.coefficient) * Z(t.y) for t in nonzero])) if nonzero else "0"
        lines = [rf"{head} = {rhs}"]
        for t in entry.zdot:
            if t.is_zero:
                d = zp.derivative_display(x, t.source)
                lines.append(rf"\quad {text('term ')} {self.z(t.y)}:\ \mathbb{{E}}\left[{self._print(d)}\right] = 0"
                             rf"\ {text('(' + t.zero_reason + ')')}")
        return lines

    def recursion(self, key: str) -> list[str]:
        entry = self.zp.entries[key]
        if entry.rule == "nonlin":
            return [rf"{self.z(key)} = {self._print(entry.z)}"]
        k = self.node(key)
        return [rf"{self.z(key)} = \hat{{Z}}^{{{k}}} + \dot{{Z}}^{{{k}}}"] + self.zdot(key)

    def moment(self, key: str) -> str:
        """The limit of a Moment: its expectation, or 0 with the symmetry proving it."""
        entry = self.zp.entries[key]
        head = rf"\mathring{{{self.node(key)}}}"
        if entry.z != 0:
            return rf"{head} = {self._print(entry.z)}"
        op = self.graph.op(key)
        rep = {}
        for s in op.expr.free_symbols:
            k, primed = ops.unprime(s)
            if self.graph.kind(k) == ops.VEC:
                rep[s] = Z(k, primed)
        psi = Expectation(op.expr.xreplace(rep))
        return rf"{head} = {self._print(psi)} = 0 \quad{text('(' + entry.zero_reason + ')')}"

    def families(self) -> list[str]:
        lines = []
        for family, members in self.zp.families.items():
            f = self.family(family)
            items = ", ".join(rf"\hat{{Z}}^{{{self.node(m)}}}\ ({f} {self.node(self.zp.entries[m].x)})" for m in members)
            sigma2 = self._print(self.graph.op(family[0]).sigma ** 2)
            lines.append(rf"{f}:\ {items};\quad \mathrm{{Cov}}(\hat{{Z}}^{{{f}x}}, \hat{{Z}}^{{{f}y}}) = "
                         rf"{sigma2}\,\mathbb{{E}}[Z^x Z^y]")
        return lines

    def sections(self) -> list[tuple[str, list[str]]]:
        zp = self.zp
        rules = {k: zp.entries[k].rule for k in zp.order}
        return [
            ("Program", self.listing(zp.order)),
            ("Initial Gaussians (ZInit)", [self.initial(k) for k in zp.order if rules[k] == "init"]),
            ("ZHat families (independent across families; W and W^T are different)", self.families()),
            ("Z recursions (ZNonlin, ZMatMul = ZHat + ZDot)",
             [line for k in zp.order if rules[k] in ("nonlin", "matmul") for line in self.recursion(k)]),
            ("Moments (limits of scalars: ZMoment)", [self.moment(k) for k in zp.order if rules[k] == "moment"]),
            ("Outputs", [rf"{text(name)} = {self._print(expr)}" for name, expr in self.graph.outputs.items()]),
        ]


INTRODUCTION = (
    "Master theorem (NETSOR-transpose): each vector x has a limit random variable $Z^x$; "
    r"$\mathring\theta$ is the deterministic limit of a scalar $\theta$; "
    r"$\dot Z^{Wx} = \sigma_W^2 \sum_y Z^y\, \mathbb{E}[\partial Z^x/\partial \hat Z^{W^\top y}]$ "
    "over the earlier transposed products; a prime or $(\\xi')$ marks a value at the second input $\\xi'$."
)


def render(zp: ZProgram, format: str = "markdown") -> str:
    """The derived formulas of ``zp`` as Markdown or LaTeX."""
    sections = ZProgramPrinter(zp).sections()
    if format == "markdown":
        out = [f"# `{zp.graph.name}`: derived infinite-width limit", "", INTRODUCTION]
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
