"""The builder API researchers write programs in (docs/DESIGN.md 5).

Handles (``Vec``, ``Scalar``, ``Mat``) are lazy: arithmetic and nonlinearities on vectors
build one sympy expression over the program's node symbols, and only when a vector is read
by an instruction (``W @ x``, ``tp.mean``) or named is it materialised as a single Nonlin
instruction.  So ``y = 2.0 * v + h * u`` is one instruction ``y := 2 v + h u``, and equal
unnamed expressions share one node (``Graph.intern``: the graph is hash-consed).  Type
errors are raised at construction time, naming the variables involved.
"""
from __future__ import annotations

import functools
import numbers
import operator
from typing import Callable, Sequence

import numpy as np
import sympy as sp
from sympy.core.function import AppliedUndef

from tpcompiler import validation
from tpcompiler.ir import ops
from tpcompiler.ir.graph import Graph, InputDecl, ProgramError
from tpcompiler.ir.nonlinearities import builtin
from tpcompiler.ir.ops import MAT, SCALAR, VEC, node_symbol, primed_symbol, unprime
from tpcompiler.ir.symbols import NodeSymbol


class DSLError(ProgramError, TypeError):
    """Misuse of the DSL (wrong types, mixed programs, non-sympy nonlinearity)."""


def _number(x, where: str | None = None) -> sp.Expr:
    """A Python/numpy number as a sympy number (integral floats become Integers).

    ``where`` (e.g. "matrix 'W': sigma") prefixes the error of a value that must be a number."""
    if isinstance(x, (bool, np.bool_)):
        raise DSLError(f"{where + ': ' if where else ''}a boolean ({x}) is not a number of a program")
    if isinstance(x, numbers.Integral):
        return sp.Integer(int(x))
    if isinstance(x, numbers.Real):
        x = float(x)
        if not np.isfinite(x):
            raise DSLError(f"{where + ': ' if where else ''}the number {x} is not finite")
        return sp.Integer(int(x)) if x.is_integer() else sp.Float(x)
    if isinstance(x, sp.Expr) and x.is_number:
        if x.is_real is False or x.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
            raise DSLError(f"{where + ': ' if where else ''}{x} is not a finite real number")
        return x
    if where:
        raise DSLError(f"{where}: expected a number, got {x!r}")
    raise DSLError(f"{x!r} is not a number, Vec or Scalar")


def _place(where) -> str:
    """The place an error names: ``where`` itself, or what it returns if it is a function."""
    return where() if callable(where) else where


class _Value:
    """Common arithmetic of Vec and Scalar handles: a sympy expression over node symbols."""

    __slots__ = ("program", "_expr", "_renames")
    kind = "?"

    def __init__(self, program: "Program", expr: sp.Expr):
        self.program = program
        self._expr = expr  # (over the nodes' names when it was made: handles are made from current ones)
        self._renames = program._renames()

    @property
    def expr(self) -> sp.Expr:
        """The expression over node symbols (following any later renaming of its nodes),
        renamed only when a node was renamed since it last was: an RNN's NTK, a sum of
        T^2 terms added one at a time, was renamed whole at every addition (programs/rnn.py
        at T = 30 took 12.5 s to build, mostly in this and in re-sorting the sum)."""
        if self._renames != self.program._renames():
            self._expr = self.program._resolve(self._expr)
            self._renames = self.program._renames()
        return self._expr

    def _binary(self, other, fn, sym: str):
        other_expr, other_kind = self.program._coerce(other, lambda: f"{self._show()} {sym} ...")
        kind = VEC if VEC in (self.kind, other_kind) else SCALAR
        return _make(self.program, fn(self.expr, other_expr), kind)

    def _rbinary(self, other, fn, sym: str):
        other_expr, other_kind = self.program._coerce(other, lambda: f"... {sym} {self._show()}")
        kind = VEC if VEC in (self.kind, other_kind) else SCALAR
        return _make(self.program, fn(other_expr, self.expr), kind)

    def __add__(self, o): return self._binary(o, lambda a, b: a + b, "+")
    def __radd__(self, o): return self._rbinary(o, lambda a, b: a + b, "+")
    def __sub__(self, o): return self._binary(o, lambda a, b: a - b, "-")
    def __rsub__(self, o): return self._rbinary(o, lambda a, b: a - b, "-")
    def __mul__(self, o): return self._binary(o, lambda a, b: a * b, "*")
    def __rmul__(self, o): return self._rbinary(o, lambda a, b: a * b, "*")
    def __truediv__(self, o): return self._binary(o, lambda a, b: a / b, "/")
    def __rtruediv__(self, o): return self._rbinary(o, lambda a, b: a / b, "/")
    def __pow__(self, o): return self._binary(o, lambda a, b: a**b, "**")
    def __rpow__(self, o): return self._rbinary(o, lambda a, b: a**b, "**")
    def __neg__(self): return _make(self.program, -self.expr, self.kind)
    def __pos__(self): return self
    def __abs__(self): return _make(self.program, sp.Abs(self.expr), self.kind)  # abs(u): tp.phi("abs")(u)

    def __matmul__(self, other):
        raise DSLError(f"'@' needs a matrix on the left; {self._show()} is a {self.kind}")

    def _compare(self, other):
        raise DSLError(f"{self._show()}: comparisons are not instructions; use tp.step(x - c) for an indicator")

    __lt__ = __le__ = __gt__ = __ge__ = _compare

    def __bool__(self):
        raise DSLError(f"{self._show()} has no truth value inside a program; use tp.step or tp.nonlin for conditionals")

    def _show(self) -> str:
        text = sp.sstr(self.expr)
        return text if len(text) < 40 else text[:37] + "..."

    def __repr__(self):
        return f"{self.kind}({sp.sstr(self.expr)})"


class Vec(_Value):
    """An n-vector (lazily an expression over earlier vectors and scalars)."""

    kind = VEC

    def named(self, name: str) -> "Vec":
        """Materialise this vector as an instruction called ``name``."""
        if not isinstance(name, str):
            raise DSLError(f"named: {name!r} is not a valid variable name (give a string)")
        return Vec(self.program, node_symbol(self.program._materialize(self, name)))

    @property
    def prime(self) -> "Vec":
        """This vector evaluated at a second input xi' (for kernel outputs: tp.mean(x * x.prime))."""
        if not self.program.graph.inputs:
            raise DSLError(f"{self._show()}.prime: the program has no input, so there is no second input xi'")
        expr, dependent = self.expr, self.program._input_dependent
        return Vec(self.program, expr.xreplace({s: primed_symbol(s.key) for s in expr.free_symbols if dependent(s.key)}))


class Scalar(_Value):
    """A scalar with a deterministic limit: a constant, Param, input coordinate or Moment."""

    kind = SCALAR

    def named(self, name: str) -> "Scalar":
        key = self.program._scalar_key(self, name)
        return Scalar(self.program, node_symbol(key))


def _make(program, expr, kind) -> _Value:
    return Vec(program, expr) if kind == VEC else Scalar(program, expr)


class Mat:
    """An n x n matrix with iid N(0, sigma^2/n) entries; ``W.T`` is its transpose."""

    __slots__ = ("program", "key", "transposed")
    kind = MAT

    def __init__(self, program: "Program", key: str, transposed: bool = False):
        self.program = program
        self.key = key
        self.transposed = transposed

    @property
    def T(self) -> "Mat":
        return Mat(self.program, self.key, not self.transposed)

    def _show(self) -> str:
        return self.key + (".T" if self.transposed else "")

    def __matmul__(self, x) -> Vec:
        p = self.program
        if isinstance(x, Mat):
            raise DSLError(f"{self._show()} @ {x._show()}: a matrix where a vector is needed (MatMul multiplies a matrix by a Vec)")
        if isinstance(x, Scalar) or isinstance(x, (numbers.Number, sp.Expr)) and not isinstance(x, _Value):
            raise DSLError(f"{self._show()} @ {getattr(x, '_show', lambda: repr(x))()}: a matrix can only multiply a Vec, not a Scalar")
        if not isinstance(x, Vec):
            raise DSLError(f"{self._show()} @ {x!r}: a matrix can only multiply a Vec")
        p._same_program(x, lambda: f"{self._show()} @ {x._show()}")
        return Vec(p, node_symbol(p._matmul(self.key, p._materialize(x), self.transposed)))

    def __rmatmul__(self, x):
        raise DSLError(f"... @ {self._show()}: only matrix @ vector is an instruction (use {self.T._show()} @ x for a product with the transpose)")

    def __mul__(self, o):
        raise DSLError(f"{self._show()} * ...: a matrix where a vector is needed; use {self._show()} @ x for a matrix-vector product")

    __rmul__ = __add__ = __radd__ = __sub__ = __rsub__ = __truediv__ = __mul__

    def __repr__(self):
        return f"Mat({self._show()})"


class InputMatrix:
    """Handle of an input matrix U (n x k, N(0, 1) entries): ``U.apply(s)`` is an input layer."""

    __slots__ = ("program", "key", "k")

    def __init__(self, program: "Program", key: str, k: int):
        self.program = program
        self.key = key
        self.k = k

    def apply(self, scalars: Sequence, columns: Sequence[int] | None = None, norm: int | None = None, name: str | None = None) -> Vec:
        """(1/sqrt(norm)) sum_i scalars[i] U[:, columns[i]] (default columns 0..k-1, norm k).

        The scalars must be input coordinates or constants (Params / numbers)."""
        p = self.program
        columns = tuple(range(len(scalars))) if columns is None else tuple(int(c) for c in columns)
        if len(columns) != len(scalars):
            raise DSLError(f"{self.key}.apply: {len(scalars)} scalars but {len(columns)} columns")
        if any(not 0 <= c < self.k for c in columns):
            raise DSLError(f"{self.key}.apply: columns must lie in 0..{self.k - 1}, got {columns}")
        keys = []
        for s in scalars:
            if isinstance(s, Scalar):
                p._same_program(s, f"{self.key}.apply")
                e = s.expr
                if not (isinstance(e, NodeSymbol) and e.key in p.graph.g and isinstance(p.graph.op(e.key), (ops.Input, ops.Param))):
                    raise DSLError(f"{self.key}.apply: input coordinates or constants only, got {s._show()}")
                keys.append(e.key)
            else:
                keys.append(p.graph.intern(ops.Param(float(_number(s, f"{self.key}.apply")))))
        layer, args = ops.InputLayer(columns, norm=self.k if norm is None else int(norm)), (self.key, *keys)
        key = p.graph.add(p._name(name), layer, args) if name else p.graph.intern(layer, args)
        return Vec(p, node_symbol(key))

    def __repr__(self):
        return f"InputMatrix({self.key}, k={self.k})"


class Program:
    """A NETSOR-transpose program under construction (docs/DESIGN.md 2.1, 5)."""

    def __init__(self, name: str):
        if not isinstance(name, str) or not name:
            raise DSLError("Program needs a non-empty name")
        self.name = name
        self.graph = Graph(name)
        self._renamed: dict[sp.Symbol, sp.Symbol] = {}
        self._dependent: dict[str, bool] = {}  # node -> whether it depends on the input (_input_dependent)

    @classmethod
    def from_graph(cls, graph: Graph) -> "Program":
        """A Program wrapping a graph made by a pass (e.g. SGD unrolled by tp.unroll)."""
        p = cls(graph.name)
        p.graph = graph
        return p

    # -- variables ----------------------------------------------------------------------
    def vec(self, name: str, var=1.0, trainable: bool = True, ntk_weight=None) -> Vec:
        """Initial vector with iid N(0, var) coordinates.

        ``var`` a number or a Scalar expression of Params (``b**2`` with ``b = p.scalar("b_std",
        0.5)``: formulas keep the symbol, and a kernel compiled with that Param as a runtime
        argument serves every value of it).  ``trainable``/``ntk_weight`` only matter for
        kernels and training: its NTK contribution is ntk_weight * E[du du'] (default weight
        var: neural-tangents' NTK parametrization)."""
        if isinstance(var, Scalar):
            self._same_program(var, f"initial vector {name!r}: variance")
            v = var.expr
            bad = sorted(s.name for s in v.free_symbols
                         if not (isinstance(s, NodeSymbol) and s.key in self.graph.g and isinstance(self.graph.op(s.key), ops.Param)))
            if bad:
                raise DSLError(f"initial vector {name!r}: its variance {sp.sstr(v)} may only depend on constants "
                               f"(p.scalar), but reads {bad[0]!r}")
        else:
            v = _number(var, f"initial vector {name!r}: variance")
        self._nonnegative(v, f"initial vector {name!r}: variance")
        weight = self._weight(ntk_weight, f"initial vector {name!r}")
        reads = tuple(sorted(s.key for s in v.free_symbols))  # the Params of a symbolic variance, as InitMat's sigma
        return Vec(self, node_symbol(self.graph.add(self._name(name), ops.InitVec(v, validation.flag(trainable, f"initial vector {name!r}: trainable"), weight), reads)))

    def vecs(self, names: Sequence[str], cov) -> list[Vec]:
        """Initial vectors whose coordinates are jointly Gaussian with covariance ``cov``."""
        try:
            cov = np.asarray(cov, dtype=np.float64)
        except (TypeError, ValueError):
            raise DSLError(f"vecs {list(names)}: covariance must be a matrix of numbers, got {cov!r}") from None
        k = len(names)
        if cov.shape != (k, k):
            raise DSLError(f"vecs {list(names)}: covariance must be a symmetric {k}x{k} matrix, got shape {cov.shape}")
        if not np.isfinite(cov).all():
            raise DSLError(f"vecs {list(names)}: covariance has entries that are not finite numbers")
        if not np.allclose(cov, cov.T):
            raise DSLError(f"vecs {list(names)}: covariance is not symmetric (largest |C - C^T| = "
                           f"{float(np.abs(cov - cov.T).max()):.3g})")
        if np.linalg.eigvalsh(cov).min() < -1e-12 * max(1.0, np.abs(cov).max()):
            raise DSLError(f"vecs {list(names)}: covariance is not positive semi-definite")
        out = [self.vec(n, cov[i, i]) for i, n in enumerate(names)]
        for i in range(k):
            for j in range(i):
                if cov[i, j] != 0.0:
                    self.graph.init_cov[frozenset((names[i], names[j]))] = _number(cov[i, j])
        return out

    def mat(self, name: str, sigma=1.0, trainable: bool = True, ntk_weight=None) -> Mat:
        """n x n matrix with iid N(0, sigma^2/n) entries; sigma appears as the symbol sigma_name.

        NTK contribution (kernels, training): ntk_weight * sum over uses of E[r r'] E[c c']
        (default weight sigma^2: neural-tangents' NTK parametrization)."""
        key = self._name(name)  # checked before sigma_name is added, so errors name the matrix
        if isinstance(sigma, Scalar):  # (checked at its value now, as a number is below)
            self._same_program(sigma, f"mat {name!r}")
            sig = self._nonnegative(sigma.expr, f"matrix {name!r}: sigma")
        else:
            s = _number(sigma, f"matrix {name!r}: sigma")
            if s.is_negative:
                raise DSLError(f"matrix {name!r}: sigma {sigma} is negative")
            sig = node_symbol(self.graph.add(self._name(f"sigma_{name}"), ops.Param(float(s))))
        weight = self._weight(ntk_weight, f"matrix {name!r}")
        self.graph.add(key, ops.InitMat(sig, validation.flag(trainable, f"matrix {name!r}: trainable"), weight), tuple(sorted(s.key for s in sig.free_symbols)))
        return Mat(self, key)

    def scalar(self, name: str, value) -> Scalar:
        """A named constant (hyperparameter); formulas keep it as a symbol."""
        return Scalar(self, node_symbol(self.graph.add(self._name(name), ops.Param(float(_number(value, f"scalar {name!r}"))))))

    def input(self, name: str, d: int, default=None) -> list[Scalar]:
        """The program's finite-dimensional input xi (d coordinates, docs/DESIGN.md 2.1).

        The program is then a template over xi; evaluation binds xi to data rows
        (``default``: an (N, d) array used when no data is given)."""
        if self.graph.inputs:
            raise DSLError(f"program {self.name!r} already has an input; one input per program")
        if not isinstance(d, numbers.Integral) or d < 1:
            raise DSLError(f"input {name!r}: dimension d must be a positive integer, got {d!r}")
        if default is not None:  # checked before any node is added
            default = np.atleast_2d(np.array(default, dtype=np.float64))  # a copy: the rows as declared
            if default.ndim != 2 or default.shape[1] != d:
                raise DSLError(f"input {name!r}: default data has shape {default.shape}, expected (N, d = {d})")
        keys = [self.graph.add(self._name(f"{name}_{j + 1}"), ops.Input(name, j)) for j in range(d)]
        self.graph.inputs[name] = InputDecl(keys, default)
        return [Scalar(self, node_symbol(k)) for k in keys]

    def input_matrix(self, name: str, k: int, trainable: bool = True, ntk_weight=None, scale=1.0) -> "InputMatrix":
        """An n x k matrix of iid N(0, 1) entries (k initial vectors) acting on inputs.

        NTK weight per column: default 1 (the columns are the trained parameters).  ``scale``:
        the factor the program multiplies this layer by (h = scale U xi / sqrt(d)); the trained
        tensor is scale U, which SGD under an abc-parametrization needs to know."""
        if not isinstance(k, numbers.Integral) or k < 1:
            raise DSLError(f"input matrix {name!r}: k must be a positive integer, got {k!r}")
        key = self._name(name)
        sc = self._own(scale, f"input matrix {name!r}: scale") if isinstance(scale, Scalar) else _number(scale, f"input matrix {name!r}: scale")
        self.graph.add(key, ops.InputMat(int(k), validation.flag(trainable, f"input matrix {name!r}: trainable"), self._weight(ntk_weight, f"input matrix {name!r}"), sc))
        return InputMatrix(self, key, int(k))

    def input_layer(self, name: str, xi: Sequence[Scalar], sigma=1.0, parameterization: str = "ntk") -> Vec:
        """An n x d input layer applied to xi: sigma / sqrt(d) sum_j xi_j U_j with U an input
        matrix of d initial N(0, 1) vectors (neural-tangents' Dense on the input).  In the
        "standard" parameterization the trained matrix is (sigma/sqrt(d)) U itself, so its
        columns carry NTK weight d / sigma^2 (neural-tangents' n_in K_in term)."""
        if parameterization not in ("ntk", "standard"):
            raise DSLError(f"input_layer {name!r}: parameterization must be 'ntk' or 'standard', got {parameterization!r}")
        d = len(xi)
        sig = self._own(sigma, f"input_layer {name!r}: sigma") if isinstance(sigma, Scalar) else self.scalar(f"sigma_{name}", sigma).expr
        weight = None if parameterization == "ntk" else sp.Integer(d) / sig**2
        U = self.input_matrix(name, d, ntk_weight=weight, scale=Scalar(self, sig))
        return Vec(self, sig * U.apply(xi).expr)

    def readout(self, x, sigma=1.0, bias=None, name: str = "v", ntk_weight=None, bias_ntk_weight=None, out_dim: int = 1,
                var=1.0):
        """Declare the network output f(xi) = sigma/sqrt(n) v . x (+ bias * beta), v a fresh
        initial N(0, var) vector (returned, so a hand-written backward pass can use it), beta ~
        N(0, 1) (docs/DESIGN.md 2.3).  Kernels and training read this declaration.  NTK weights:
        v's default 1 (NTK parametrization; standard: n_in / sigma^2) and beta's default
        bias^2 (standard: 1).  With ``out_dim`` K > 1 the output is K-dimensional (K
        independent readout vectors name_1..name_K, returned as a list); kernels are the
        per-output ones.  ``var``: the readout vectors' initial variance (default 1; 0 starts
        training from a zero readout, as word2vec's output embeddings)."""
        if not isinstance(out_dim, numbers.Integral) or out_dim < 1:
            raise DSLError(f"readout: out_dim must be a positive integer, got {out_dim!r}")
        if self.graph.readout is not None:
            raise DSLError(f"program {self.name!r} already has a readout")
        if not isinstance(x, Vec):
            raise DSLError(f"readout: needs the Vec the output reads, got {x!r}")
        self._same_program(x, "readout")
        key = self._materialize(x)
        names = [name] if out_dim == 1 else [f"{name}_{k + 1}" for k in range(out_dim)]
        vs = [self.vec(nm, var=var, ntk_weight=ntk_weight) for nm in names]
        sig = self._own(sigma, "readout sigma") if isinstance(sigma, Scalar) else _number(sigma, "readout sigma")
        b = None if bias is None else (self._own(bias, "readout bias") if isinstance(bias, Scalar) else _number(bias, "readout bias"))
        bw = None if bias_ntk_weight is None else _number(bias_ntk_weight, "readout bias_ntk_weight")
        self.graph.readout = ops.Readout(key, vs[0].expr.key, sig, b, bw, tuple(v.expr.key for v in vs[1:]))
        return vs[0] if out_dim == 1 else vs

    def output(self, name: str, value) -> None:
        """Declare a scalar output (a Moment or an expression of scalars)."""
        if not isinstance(name, str) or not name:
            raise DSLError(f"output: the name must be a non-empty string, got {name!r}")
        if isinstance(value, Vec):
            raise DSLError(f"output {name!r}: a Vec cannot be an output (its limit is a random variable); use tp.mean(...)")
        if isinstance(value, Mat):
            raise DSLError(f"output {name!r}: a matrix cannot be an output")
        expr, _ = self._coerce(value, f"output {name!r}")
        if expr.has(sp.zoo, sp.nan):
            raise DSLError(f"output {name!r}: {sp.sstr(expr)} divides by zero")
        if name in self.graph.outputs:
            raise DSLError(f"output {name!r} is declared twice")
        expr = self._adopt_name(expr, name)
        self.graph.outputs[name] = expr

    def let(self, name: str, value):
        """Name a vector (one Nonlin instruction) or a scalar."""
        if isinstance(value, (Vec, Scalar)):
            return value.named(name)
        raise DSLError(f"let {name!r}: expected a Vec or Scalar, got {value!r}")

    # -- internals ----------------------------------------------------------------------
    def _name(self, name: str) -> str:
        if not isinstance(name, str) or not name.isidentifier():
            raise DSLError(f"{name!r} is not a valid variable name (use letters, digits and '_', not starting with a digit)")
        if name in self.graph.g and name in self.graph.generated:
            raise DSLError(f"program {self.name!r}: the name {name!r} is already used by an unnamed instruction, "
                           f"{sp.sstr(self.graph.op(name).expr) if hasattr(self.graph.op(name), 'expr') else name}, "
                           "which the program named automatically (t1, t2, ..., theta1, ..., c1, ...); pick another name")
        if name in self.graph.g or node_symbol(name) in self._renamed:
            raise DSLError(f"program {self.name!r}: the name {name!r} is already used")
        return name

    def _resolve(self, expr: sp.Expr) -> sp.Expr:
        return expr.xreplace(self._renamed) if self._renamed else expr

    def _renames(self) -> int:
        """How many renamings there were so far (``_renamed`` gains a key with each: an old
        name cannot be used again)."""
        return len(self._renamed)

    def _input_dependent(self, key: str) -> bool:
        """Whether node ``key`` depends on the program's input (an input coordinate, or a node
        reading one), memoised per node: nodes are only added, never changed, so the answer
        stays (``graph.input_dependent()`` walked the whole graph at every ``.prime``, which
        an RNN's NTK asks T^2 times)."""
        memo, g = self._dependent, self.graph.g
        if key in memo or key not in g:
            return memo.get(key, False)
        inputs = set(self.graph.input_keys())
        stack = [key]
        while stack:  # (iterative: a long chain of nodes is deeper than Python's recursion)
            k = stack[-1]
            waiting = [a for a in g.predecessors(k) if a not in memo]
            if waiting:
                stack.extend(waiting)
                continue
            stack.pop()
            memo[k] = k in inputs or any(memo[a] for a in g.predecessors(k))
        return memo[key]

    def _rename(self, old: str, new: str) -> str:
        """Rename node ``old`` (no instruction reads it yet); handles keep working.  Its own name
        again (``(W @ u).named("t1")`` where W @ u was made as t1) is no change."""
        if new == old and isinstance(new, str) and new.isidentifier():
            self.graph.generated.discard(old)  # (the author's name now: an output does not rename it)
            return old
        self.graph.rename(old, self._name(new))
        self._renamed = {k: (node_symbol(new) if v.key == old else v) for k, v in self._renamed.items()}
        self._renamed[node_symbol(old)] = node_symbol(new)
        return new

    def _weight(self, weight, where: str):
        """An NTK weight: None (the parametrization's default), a number or a Scalar, not negative."""
        if weight is None:
            return None
        if isinstance(weight, Scalar):
            self._same_program(weight, where)
            value = weight.expr
        elif isinstance(weight, sp.Expr) and not weight.is_number:
            value = weight
        else:
            value = _number(weight, f"{where}: ntk_weight")
        return self._nonnegative(value, f"{where}: ntk_weight")

    def _nonnegative(self, value: sp.Expr, where: str) -> sp.Expr:
        """``value`` (a number, or an expression of Params at their values now) checked to be a
        real number >= 0: a variance or an NTK weight.  A negative one given as a Scalar gave a
        limit of -1 for E[u u] and negative NTKs; sp.I got through to a TypeError."""
        now = self.graph.at_param_values(value)
        if now.is_number:
            shown = sp.sstr(value) if now == value else f"{sp.sstr(value)} = {sp.sstr(now)}"
            if now.is_real is False:
                raise DSLError(f"{where} {shown} is not a real number")
            if now.is_negative:
                raise DSLError(f"{where} {shown} is negative")
        return value

    def _own(self, value: "Scalar", where: str) -> sp.Expr:
        """The expression of a Scalar of this program (another program's was a KeyError later)."""
        self._same_program(value, where)
        return value.expr

    def _same_program(self, value, where) -> None:
        """``where``: the place named in the error, or a function returning it (an operator's
        operands are printed only when there is an error: a pooled sum printed at every
        addition cost most of building a 2-D 12x12 CNN)."""
        if value.program is not self:
            raise DSLError(f"{_place(where)}: mixes variables of two programs ({value._show()} belongs to "
                           f"{value.program.name!r}, not {self.name!r})")

    def _coerce(self, value, where) -> tuple[sp.Expr, str]:
        if isinstance(value, Mat):
            raise DSLError(f"{_place(where)}: a matrix ({value._show()}) where a Vec or Scalar is needed")
        if isinstance(value, _Value):
            self._same_program(value, where)
            return value.expr, value.kind
        return _number(value), SCALAR

    def _no_pair_moment(self, expr: sp.Expr, where) -> None:
        for s in expr.free_symbols:
            k = unprime(s)[0]
            if k in self.graph.g and self.graph.is_pair_moment(k):
                raise DSLError(f"{_place(where)}: reads the pair moment {k!r}; pair moments (kernels) may only be read by outputs")

    def _materialize(self, vec: Vec, name: str | None = None) -> str:
        expr = vec.expr
        self._no_pair_moment(expr, vec._show)
        if any(unprime(s)[1] for s in expr.free_symbols):
            raise DSLError(f"{vec._show()}: a primed vector (second input) can only appear inside tp.mean for a kernel output")
        if isinstance(expr, NodeSymbol) and expr.key in self.graph.g:
            return self._rename(expr.key, name) if name is not None else expr.key
        return self._instruction(ops.Nonlin(expr), name)

    def _matmul(self, mat: str, x: str, transposed: bool) -> str:
        return self.graph.intern(ops.MatMul(transposed), (mat, x))

    def _moment(self, vec: Vec, name: str | None = None) -> str:
        expr = vec.expr
        self._no_pair_moment(expr, lambda: f"tp.mean({vec._show()})")
        return self._instruction(ops.Moment(expr, pair=any(unprime(s)[1] for s in expr.free_symbols)), name)

    def _instruction(self, op, name: str | None) -> str:
        """The node of a Nonlin or Moment: a new node called ``name`` (the user asked for that
        variable), or without a name the program's node for the same expression (interned)."""
        args = self.graph.expr_args(op.expr)
        return self.graph.add(self._name(name), op, args) if name else self.graph.intern(op, args)

    def _adopt_name(self, expr: sp.Expr, name: str) -> sp.Expr:
        """An output that is an unnamed, unread Moment gives the Moment its name."""
        if (isinstance(expr, NodeSymbol) and expr.key in self.graph.generated
                and isinstance(self.graph.op(expr.key), ops.Moment) and name.isidentifier()
                and name not in self.graph.g and not self.graph.g.out_degree(expr.key)
                and not any(expr in e.free_symbols for e in self.graph.outputs.values())):
            return node_symbol(self._rename(expr.key, name))
        return expr

    def _scalar_key(self, s: Scalar, name: str) -> str:
        if isinstance(s.expr, NodeSymbol) and s.expr.key in self.graph.g:
            return self._rename(s.expr.key, name)
        raise DSLError(f"only Params and Moments can be named; {s._show()} is an expression (name its parts, or use it directly)")


# ---------------------------------------------------------------------------------------
# Free functions: tp.mean, tp.nonlin and the built-in nonlinearities.
# ---------------------------------------------------------------------------------------
def mean(x, name: str | None = None) -> Scalar:
    """Moment: (1/n) sum_a x_a of a Vec expression (docs/DESIGN.md 2.1)."""
    if isinstance(x, Mat):
        raise DSLError(f"tp.mean({x._show()}): a Moment of a matrix is not an instruction; tp.mean needs a Vec")
    if not isinstance(x, Vec):
        raise DSLError(f"tp.mean needs a Vec expression, got {x!r}")
    return Scalar(x.program, node_symbol(x.program._moment(x, name)))


def add(*terms) -> "Vec | Scalar":
    """terms[0] + terms[1] + ... of Vecs, Scalars and numbers, built as one sum: the same
    expression (a Vec if any term is one), but Python's ``sum(terms)`` adds one term at a
    time, and each addition rebuilds and sorts the sum so far (sympy's Add), which is
    quadratic in the number of terms: a Flatten readout's sum over the 1,024 positions of a
    32 x 32 image took 11 s."""
    lead = next((k for k, t in enumerate(terms) if isinstance(t, (_Value, Mat))), None)  # the first Vec or Scalar
    if lead is None:
        raise DSLError(f"tp.add needs at least one Vec or Scalar term, got {len(terms)} numbers" if terms else
                       "tp.add needs at least one Vec or Scalar term, got none")
    program = terms[lead].program
    exprs, kinds = [], set()
    if lead:  # the numbers before the first Vec or Scalar, added as a + b + ... adds them: by
        # Python (2.5 + 2.5 is a program's integer 5, not sympy's 5.0)
        for k in range(lead):
            _number(terms[k], f"tp.add: term {k}")
        exprs.append(_number(functools.reduce(operator.add, terms[:lead]), "tp.add: its leading numbers' sum"))
        kinds.add(SCALAR)
    for k, t in enumerate(terms[lead:], lead):
        if isinstance(t, (_Value, Mat)):
            expr, kind = program._coerce(t, lambda k=k: f"tp.add: term {k}")
        else:
            expr, kind = _number(t, f"tp.add: term {k}"), SCALAR
        # a sum's terms in its place: sympy's Add would take them after the other terms, and
        # like terms' float coefficients would then be added in another order than by a + b + ...
        if expr.is_Add:
            exprs.extend(expr.args)
        else:
            exprs.append(expr)
        kinds.add(kind)
    return _make(program, sp.Add(*exprs), VEC if VEC in kinds else SCALAR)


def _program_of(args) -> "Program | None":
    progs = {id(a.program): a.program for a in args if isinstance(a, (_Value, Mat))}
    if len(progs) > 1:
        names = sorted(p.name for p in progs.values())
        raise DSLError(f"a nonlinearity mixes variables of two programs: {names}")
    return next(iter(progs.values()), None)


def nonlin(fn: Callable | sp.Lambda, *args):
    """Apply any coordinatewise function given as a sympy expression of its arguments.

    ``fn`` is a Python function of sympy symbols returning a sympy expression (or a sympy
    Lambda); arguments are Vecs, Scalars or numbers.  The result is a Vec if any argument is."""
    if not args:
        raise DSLError("tp.nonlin needs at least one argument")
    program = _program_of(args)
    placeholders = [sp.Dummy(f"a{i}", real=True) for i in range(len(args))]
    try:
        body = fn(*placeholders)
    except Exception as exc:  # the user's function could not be applied to symbols
        raise DSLError(f"tp.nonlin: the function could not be applied to sympy symbols ({type(exc).__name__}: {exc}); write it with sympy functions (sympy.exp, sympy.tanh, ...) instead of numpy/math") from None
    if isinstance(body, (int, float)):
        body = _number(body)
    if not isinstance(body, sp.Expr) or isinstance(body, sp.MatrixBase):
        raise DSLError(f"tp.nonlin: the function must return a sympy expression, got {type(body).__name__}")
    foreign = sorted(str(s) for s in body.free_symbols - set(placeholders))
    if foreign:
        raise DSLError(f"tp.nonlin: the function uses the sympy symbol {foreign[0]!r}, which is not one of its "
                       f"arguments; pass it as an argument or substitute a number")
    if body.has(sp.I):
        shown = sp.sstr(body.xreplace({a: sp.Symbol(f"a{i}") for i, a in enumerate(placeholders)}))
        raise DSLError(f"tp.nonlin: the function {shown} has complex values (it contains I); programs "
                       "compute with real functions")
    if body.has(sp.factorial):  # (the same function for real x; no code printer writes factorial of a float)
        body = body.replace(lambda e: isinstance(e, sp.factorial), lambda e: sp.gamma(e.args[0] + 1))
    undefined = sorted({type(f).__name__ for f in body.atoms(AppliedUndef)})
    if undefined:
        raise DSLError(f"tp.nonlin: {undefined[0]!r} is an undefined sympy function (it has no formula); write the "
                       f"function with sympy expressions, e.g. sympy.tanh or sympy.Lambda")
    exprs, kinds = [], []
    for a in args:
        if isinstance(a, Mat):
            raise DSLError(f"tp.nonlin: a matrix ({a._show()}) where a Vec or Scalar is needed")
        if isinstance(a, _Value):
            exprs.append(a.expr)
            kinds.append(a.kind)
        else:
            exprs.append(_number(a))
            kinds.append(SCALAR)
    expr = body.xreplace(dict(zip(placeholders, exprs)))
    if program is None:
        return expr
    return _make(program, expr, VEC if VEC in kinds else SCALAR)


def _unary(name: str):
    f = builtin(name)

    def apply(x):
        return nonlin(f, x)

    apply.__name__ = name
    apply.__doc__ = f"The built-in nonlinearity {name}, applied coordinatewise."
    return apply


relu = _unary("relu")
step = _unary("step")
tanh = _unary("tanh")
erf = _unary("erf")
sigmoid = _unary("sigmoid")
gelu = _unary("gelu")
sin = _unary("sin")
cos = _unary("cos")
exp = _unary("exp")
softplus = _unary("softplus")
identity = _unary("identity")


def power(x, k):
    """x ** k coordinatewise."""
    return nonlin(lambda a: a**k, x)


def phi(name: str):
    """The built-in nonlinearity called ``name`` as a function of Vecs ("relu", "tanh", ...)."""
    try:
        builtin(name)
    except ValueError as exc:
        raise DSLError(f"tp.phi: {exc}") from None
    return _unary(name)
