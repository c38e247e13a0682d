"""LaTeX listing of a program graph, one line per instruction, in the papers' notation.

``ProgramPrinter`` is the TeX ``Printer`` with one ``_print_<Op>(op, key)`` method per
instruction type of ``ir.ops`` (sympy's printer dispatch is the rule table of this stage:
adding an op means adding its method; a missing one raises ``MissingRule``).  Coordinates
are sympy ``Indexed`` entries (``IndexedBase`` of the node's symbol), printed without double
subscripts:

* initial vector   v in R^n:  v_alpha ~ N(0, var)  (with its covariances to earlier ones);
* matrix           W in R^{n x n}:  W_{alpha beta} ~ N(0, sigma^2 / n);
* input matrix     U in R^{n x k}:  U_{alpha j} ~ N(0, 1);
* input layer      h := (1/sqrt(norm)) sum_i s_i U_{c_i};
* MatMul           h := W x  or  W^T x;   Nonlin  y := phi(x, ..);
* Moment           theta := (1/n) sum_alpha psi(x_alpha, ..), x_alpha(xi') at the second input.
"""
from __future__ import annotations

import sympy as sp

from tpcompiler.ir import ops
from tpcompiler.ir.ops import node_symbol
from tpcompiler.ir.symbols import NodeSymbol
from tpcompiler.ir.rules import MissingRule
from tpcompiler.printing.latex import Printer, name, text

ALPHA, BETA, J = sp.symbols("alpha beta j")


class Coordinate(sp.Indexed):
    """A coordinate ``x[indices]`` of a program variable x (``IndexedBase`` of its symbol).

    It sorts in products as the symbol x does, then by its indices, so a listing orders its
    factors as the expressions they come from (x_alpha before x_alpha(xi'), U_1 before xi)."""

    def sort_key(self, order=None):
        cls, (n, names), *rest = self.base.label.sort_key(order)
        return (cls, (n, names + (str(self.indices),)), *rest)


def entry(key: str, *indices, primed: bool = False) -> Coordinate:
    """The coordinate ``key[indices]`` of node ``key`` (at the second input if ``primed``)."""
    return Coordinate(sp.IndexedBase(NodeSymbol(key, primed)), *indices)


def tex_number(value: float) -> str:
    r"""A Param value in TeX (1e-05 -> 1.0 \cdot 10^{-5}, 0.5 -> 0.5, 2.0 -> 2)."""
    integral = float(value).is_integer() and abs(value) < 1e15
    return Printer().doprint(sp.Integer(int(value)) if integral else sp.Float(value, 6))


class ProgramPrinter(Printer):
    """TeX of the instructions of ``graph`` (see the module docstring)."""

    def __init__(self, graph, settings=None):
        super().__init__(settings)
        self.graph = graph

    # -- entry points ---------------------------------------------------------------------
    def instruction(self, key: str) -> str:
        """The listing line of node ``key``."""
        op = self.graph.op(key)
        if not hasattr(self, f"_print_{type(op).__name__}"):
            raise MissingRule(f"the printing stage has no rule for op {type(op).__name__}; "
                              f"add ProgramPrinter._print_{type(op).__name__}")
        line = self._print(op, key=key)
        aliases = [a for a in self.graph.aliases.get(key, ()) if a not in self.graph.g]
        if aliases:  # the other names it was asked for (Graph.aliases)
            line += r" \qquad (\text{also } " + ", ".join(self.node(a) for a in aliases) + ")"
        return line

    def listing(self, keys=None) -> list[str]:
        """The listing lines of ``keys`` (default: the whole program in order)."""
        return [self.instruction(k) for k in (self.graph.order() if keys is None else keys)]

    def node(self, key: str) -> str:
        """The typeset name of node ``key``."""
        return self._print(node_symbol(key))

    def _earlier(self, key: str, partners) -> list[str]:
        """The keys among ``partners`` created before ``key``."""
        index = self.graph.g.nodes
        return [o for o in partners if index[o]["index"] < index[key]["index"]]

    # -- one method per instruction type ----------------------------------------------------
    def _print_InitVec(self, op, key):
        covs = [rf"\mathrm{{Cov}}({self._print(entry(key, ALPHA))}, {self._print(entry(o, ALPHA))}) = {self._print(c)}"
                for pair, c in self.graph.init_cov.items() if key in pair
                for o in self._earlier(key, pair - {key})]
        return (rf"{self.node(key)} \in \mathbb{{R}}^n:\ \text{{initial}},\ "
                rf"{self._print(entry(key, ALPHA))} \sim \mathcal{{N}}(0, {self._print(op.var)})"
                + "".join(r",\ " + c for c in covs))

    def _print_InitMat(self, op, key):
        return (rf"{self.node(key)} \in \mathbb{{R}}^{{n\times n}}:\ {self._print(entry(key, ALPHA, BETA))} "
                rf"\sim \mathcal{{N}}(0, {self._print(op.sigma ** 2)}/n)")

    def _print_InputMat(self, op, key):
        return (rf"{self.node(key)} \in \mathbb{{R}}^{{n\times {op.k}}}:\ {self._print(entry(key, ALPHA, J))} "
                rf"\sim \mathcal{{N}}(0, 1)\ {text(f'({op.k} initial vectors)')}")

    def _print_InputLayer(self, op, key):
        U, *scalars = self.graph.args(key)
        body = sp.Add(*[node_symbol(s) * entry(U, c + 1) for c, s in zip(op.columns, scalars)]) / sp.sqrt(op.norm)
        return rf"{self.node(key)} := {self._print(body)}"

    def _print_Param(self, op, key):
        return rf"{self.node(key)} = {tex_number(op.value)}"

    def _print_WidthPower(self, op, key):
        return rf"{self.node(key)} = n^{{{self._print(op.exponent)}}}"

    def _print_Input(self, op, key):
        return rf"{self.node(key)}:\ {text(f'input coordinate {op.index + 1} of ')} {name(op.group)}"

    def _print_MatMul(self, op, key):
        mat, x, tr = self.graph.matmul_parts(key)
        top = r"^{\top}" if tr else ""
        return rf"{self.node(key)} := {self.node(mat)}{top} {self.node(x)}"

    def _print_Nonlin(self, op, key):
        return rf"{self.node(key)} := {self._print(op.expr)}"

    def _print_Moment(self, op, key):
        return rf"{self.node(key)} := \frac{{1}}{{n}} \sum_{{\alpha=1}}^{{n}} {self._print(self.coordinates(op.expr))}"

    def coordinates(self, expr: sp.Expr) -> sp.Expr:
        """A Moment's summand with every vector x written as its coordinate x_alpha (at the
        second input if x is primed)."""
        rep = {}
        for s in expr.free_symbols:
            key, primed = ops.unprime(s)
            if self.graph.kind(key) == ops.VEC:
                rep[s] = entry(key, ALPHA, primed=primed)
        return expr.xreplace(rep)


def listing(graph) -> list[str]:
    """The program ``graph`` in the papers' notation, one TeX line per instruction."""
    return ProgramPrinter(graph).listing()
