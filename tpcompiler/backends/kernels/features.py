"""Input features of the kernel backend: the input-dependent coefficients of a quantity DAG,
computed from the data outside the generated per-pair code (docs/DESIGN.md 2.7, strategy 2).

An *input-only* subexpression is a polynomial in the input coordinates xi_j (first input),
xi_j' (second input) and input-layer covariances InputCov (one atom standing for a sum over
input coordinates).  Each is split by the inputs it involves:

* row features: functions of one input, one vector over the data rows (a second-input row
  feature is the same vector indexed by the column);
* pair features: const + row(xi) + row(xi') + sum_m c_m G_m(xi, xi'), with G_m base Gram
  matrices: an input-layer covariance (F_a F_b^T, one BLAS call) or one bilinear form
  X A X2^T collecting the explicit xi_j xi'_k terms.

So d never enters the per-pair code, and the Grams cost one matrix product each.
"""
from __future__ import annotations


import numpy as np
import sympy as sp

from tpcompiler import memory, threads
from tpcompiler.ir import ops
from tpcompiler.ir import symbols
from tpcompiler.ir.graph import Graph, ProgramError
from tpcompiler.ir.rules import RuleTable
from tpcompiler.backends.lowering import numpy_function
from tpcompiler.backends.kernels.shared import add_terms, flat_atoms, float_value, mul, number, product, total


class Features:
    """Feature symbols and their numeric values (see module docstring)."""

    def __init__(self, graph: Graph, inputs0: dict):
        self.graph = graph
        self.inputs0 = inputs0                                    # xi_j -> data column
        self.inputs1 = {symbols.primed(s): c for s, c in inputs0.items()}
        self.all_inputs = set(inputs0) | set(self.inputs1)
        self.dependent = graph.input_dependent()
        self.row: list[sp.Expr] = []          # row features (first-input form)
        self.bases: list[tuple] = []          # ("cov", a, b) or ("bilinear", A dict)
        self._row_index: dict = {}
        self._base_index: dict = {}
        self._memo: dict = {}
        self._featurized: dict = {}   # call -> featurize(call)
        self._input_only: dict = {}
        self._has_inputs: dict = {}

    #: What evaluating the features reads (``row_values``, ``pair_values``), besides the row
    #: features' entries (``_row_entries``): the rest of the object is the derivation's
    #: bookkeeping.
    _RUNTIME = ("inputs0", "inputs1", "all_inputs", "dependent", "bases")

    def runtime_state(self) -> dict:
        """The attributes the numeric evaluation reads, without the graph, and the row
        features as ``_row_entries`` (stored.py stores them with a derivation; ``restored``
        rebuilds the object)."""
        state = {name: getattr(self, name) for name in self._RUNTIME}
        state["rows"] = self._row_entries()
        return state

    @classmethod
    def restored(cls, graph: Graph, state: dict) -> "Features":
        """Features that evaluate as the ones whose ``runtime_state`` is ``state`` did, for
        ``graph`` (the program they were derived from).  Their ``row`` holds the expression
        of each row feature kept as one, None for those restored as linear combinations of
        input covariances (numbers only: a 2-D 8x8 CNN's 6,112 such rows took 2.2 s to read
        back as sympy expressions)."""
        features = cls(graph, state["inputs0"])
        for name in cls._RUNTIME:
            setattr(features, name, state[name])
        features._memo["row_entries"] = state["rows"]
        features.row = [entry[1] if entry[0] == "expression" else None for entry in state["rows"]]
        return features

    def _row_entries(self) -> list:
        """Per row feature, ("linear", coefficients, covariances) when it is a sum of numbers
        and numbers times input covariances (``_linear_in_covs``: plain numbers and names,
        added in this order), else ("expression", its expression); memoised."""
        if "row_entries" not in self._memo:
            entries = []
            for expr in self.row:
                linear = _linear_in_covs(expr)
                entries.append(("expression", expr) if linear is None else (
                    "linear", [c for c, _ in linear],
                    [None if cov is None else (cov.args[0].name, cov.args[1].name) for _, cov in linear]))
            self._memo["row_entries"] = entries
        return self._memo["row_entries"]

    # -- classification -------------------------------------------------------------------
    def _atom_sides(self, atom) -> set:
        if isinstance(atom, ops.InputCov):
            a, b, pa, pb = atom.args[0].name, atom.args[1].name, int(atom.args[2]), int(atom.args[3])
            return {p for key, p in ((a, pa), (b, pb)) if key in self.dependent}
        return {int(symbols.is_primed(atom))}

    def _sides(self, expr: sp.Expr) -> set:
        sides = set()
        for s in expr.free_symbols:
            sides |= self._atom_sides(s)
        for c in expr.atoms(ops.InputCov):
            sides |= self._atom_sides(c)
        return sides

    def input_only(self, expr: sp.Expr) -> bool:
        """A polynomial in input coordinates and input-layer covariances.  Decided node by
        node with a memo: featurize asks it of every subexpression of a large sum, and a
        whole-tree walk per question made lowering quadratic (a CNN's kernel: minutes)."""
        memo = self._input_only
        if expr not in memo:
            if isinstance(expr, ops.InputCov):
                memo[expr] = True
            elif expr.is_Symbol:
                memo[expr] = expr in self.all_inputs
            elif expr.is_Atom:
                memo[expr] = True
            elif expr.is_Pow:
                memo[expr] = bool(expr.exp.is_Integer and expr.exp >= 0) and self.input_only(expr.base)
            elif isinstance(expr, sp.Function) or not (expr.is_Add or expr.is_Mul):
                memo[expr] = False
            else:
                memo[expr] = all(self.input_only(a) for a in expr.args)
        return memo[expr]

    def has_inputs(self, expr: sp.Expr) -> bool:
        """Whether an input coordinate or an input-layer covariance occurs in expr (memo, as
        input_only)."""
        memo = self._has_inputs
        if expr not in memo:
            atoms = flat_atoms(expr)  # (no input-layer covariance in it: read off its atoms)
            if atoms is not None:
                memo[expr] = any(a in self.all_inputs for a in atoms)
            elif isinstance(expr, ops.InputCov):
                memo[expr] = True
            elif expr.is_Atom:
                memo[expr] = expr in self.all_inputs
            else:
                memo[expr] = any(self.has_inputs(a) for a in expr.args)
        return memo[expr]

    # -- symbols ----------------------------------------------------------------------------
    def _to_first_input(self, expr: sp.Expr) -> sp.Expr:
        """A second-input-only expression rewritten as the same function of the first input."""
        rep = {}
        for c in expr.atoms(ops.InputCov):
            a, b, pa, pb = c.args
            rep[c] = ops.input_cov(a, b, 0, 0)
        return symbols.to_first_input(expr.xreplace(rep))

    def _row_symbol(self, expr: sp.Expr, second: bool) -> sp.Symbol:
        if expr not in self._row_index:
            self._row_index[expr] = len(self.row)
            self.row.append(expr)
        return symbols.row_feature(self._row_index[expr], second)

    def _base_symbol(self, key) -> sp.Symbol:
        if key not in self._base_index:
            self._base_index[key] = len(self.bases)
            self.bases.append(key)
        return symbols.gram(self._base_index[key])

    def feature(self, expr: sp.Expr) -> sp.Expr:
        """The symbolic stand-in for an input-only polynomial."""
        if expr in self._memo:
            return self._memo[expr]
        sides = self._sides(expr)
        if not sides:
            out = self.graph.expand_input_cov(expr)
        elif sides == {0}:
            out = self._row_symbol(expr, False)
        elif sides == {1}:
            out = self._row_symbol(self._to_first_input(expr), True)
        else:
            out = self._pair(expr)
        self._memo[expr] = out
        return out

    def _pair(self, expr: sp.Expr) -> sp.Expr:
        covariances = self._cross_covariances(expr)
        if covariances is not None:
            return self._gram_sum(*covariances)
        row0, row1, const, bilinear = [], [], sp.S.Zero, {}
        out = []
        for term in sp.Add.make_args(expr if _expanded(expr) else sp.expand(expr)):
            sides = self._sides(term)
            if not sides:
                const += term
            elif sides == {0}:
                row0.append(term)
            elif sides == {1}:
                row1.append(term)
            else:
                bil = self._bilinear_term(term)
                if bil is not None:
                    jk, c = bil
                    bilinear[jk] = bilinear.get(jk, 0.0) + c
                else:
                    out.append(self._separable(term))
        if bilinear:
            scale = max(abs(v) for v in bilinear.values())
            key = ("bilinear", tuple(sorted((jk, round(v / scale, 14)) for jk, v in bilinear.items())))
            out.append(sp.Float(scale) * self._base_symbol(key))
        if row0:
            out.append(self._row_symbol(sp.Add(*row0), False))
        if row1:
            out.append(self._row_symbol(self._to_first_input(sp.Add(*row1)), True))
        return const + sp.Add(*out)

    def _cross_covariances(self, expr: sp.Expr):
        """(number or None, [(coefficient, InputCov), ...]) when expr is a number plus numbers
        times input-layer covariances of the two inputs, each a Gram base of its own (a
        window's covariance at the first layer, one per pair of positions); else None."""
        parts = _numbers_and_covariances(expr, lambda cov: self._atom_sides(cov) == {0, 1})
        if parts is None:
            return None
        constants = [c for c, cov in parts if cov is None]
        terms = [(c, _cov_key(cov)) for c, cov in parts if cov is not None]
        if len(constants) > 1 or not terms or len({key for _, key in terms}) < len(terms):
            return None  # (two terms of one Gram: collected by the general path)
        return (constants[0] if constants else None), terms

    def _gram_sum(self, constant, terms: list) -> sp.Expr:
        """``_pair`` of ``_cross_covariances``' sum, built directly: the object the general
        path's sympy arithmetic (``_separable`` per term, then their sum) makes, without the
        expansion, side and bilinear checks it does per term (a 2-D CNN's 8x8 positions: 4096
        such sums, 0.5 s)."""
        grams = [product(c, [self._base_symbol(key)]) for c, key in terms]
        return total([constant, *grams]) if constant is not None else total(grams)

    def _bilinear_term(self, term: sp.Expr):
        """((j, k), c) if term = c xi_j xi'_k, else None."""
        s0 = [s for s in term.free_symbols if s in self.inputs0]
        s1 = [s for s in term.free_symbols if s in self.inputs1]
        if len(s0) != 1 or len(s1) != 1 or term.atoms(ops.InputCov):
            return None
        c = term / (s0[0] * s1[0])
        if c.free_symbols or not c.is_number:
            return None
        return (self.inputs0[s0[0]], self.inputs1[s1[0]]), float(c)

    def _separable(self, term: sp.Expr) -> sp.Expr:
        """A mixed term as (row feature of xi) (row feature of xi') (input-layer Grams)."""
        const, side0, side1, grams = sp.S.One, [], [], []
        for f in sp.Mul.make_args(term):
            base, exp = f.as_base_exp()
            sides = self._sides(f)
            if not sides:
                const *= f
            elif sides == {0}:
                side0.append(f)
            elif sides == {1}:
                side1.append(f)
            elif isinstance(base, ops.InputCov) and exp.is_Integer and exp > 0:
                grams.append(self._base_symbol(_cov_key(base)) ** exp)
            else:
                raise ProgramError(f"kernel backend: cannot separate the input dependence {f} of {term}")
        out = const * sp.Mul(*grams)
        if side0:
            out *= self._row_symbol(sp.Mul(*side0), False)
        if side1:
            out *= self._row_symbol(self._to_first_input(sp.Mul(*side1)), True)
        return out

    def featurize(self, expr: sp.Expr) -> sp.Expr:
        """Replace input-only coefficients by feature symbols, grouping the terms of a sum that
        multiply the same non-input factor (so sum_j c_j xi_j xi_j' q is one Gram times q)."""
        if not self.has_inputs(expr):
            return expr
        if self.input_only(expr):
            return self.feature(expr)
        if expr.is_Add:
            groups: dict = {}
            for a in expr.args:
                inside, rest = self._split(a)
                groups.setdefault(rest, []).append(inside)
            out = []
            for rest, insides in groups.items():
                coef = total(insides)
                coef = self.feature(coef) if self.has_inputs(coef) else coef
                out.append(mul(coef, self.featurize(rest)))
            return total(out)
        if expr.is_Mul:
            inside, rest = self._split(expr)
            coef = self.feature(inside) if self.has_inputs(inside) else inside
            return mul(coef, mul(*[self.featurize(f) for f in sp.Mul.make_args(rest)]))
        # any other node (a call reading input-layer covariances, a power), memoised: the
        # terms of one pair of positions share their calls
        done = self._featurized.get(expr)
        if done is None:
            done = self._featurized[expr] = expr.func(*[self.featurize(a) for a in expr.args])
        return done

    def featurize_terms(self, terms: dict) -> dict:
        """``featurize`` of a term sum (``shared.add_terms``), as a term sum: the terms that
        multiply the same non-input factor are grouped as ``featurize`` groups a sum's."""
        if not any(self.has_inputs(t) for t in terms):
            return dict(terms)
        groups: dict = {}
        for t, c in terms.items():
            memory.tick()
            inside, rest = self._split(t)
            groups.setdefault(rest, []).append((c, inside))
        out: dict = {}
        for rest, insides in groups.items():
            if len(insides) == 1:  # c * feature(inside): the number stays out of the feature
                (c, inside), = insides
                coef = self.feature(inside) if self.has_inputs(inside) else inside
                add_terms(out, mul(coef, self.featurize(rest)), c)
                continue
            coef = total([product(number(c), [inside]) for c, inside in insides])
            coef = self.feature(coef) if self.has_inputs(coef) else coef
            add_terms(out, mul(coef, self.featurize(rest)))
        return out

    def _split(self, term: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
        """(product of the input-only factors, product of the others) of a term; the term
        itself is not rebuilt when one side is empty (most of a CNN's terms)."""
        factors = sp.Mul.make_args(term)
        only = [self.input_only(f) for f in factors]
        if not any(only):
            return sp.S.One, term
        if all(only):
            return term, sp.S.One
        return (mul(*[f for f, o in zip(factors, only) if o]),
                mul(*[f for f, o in zip(factors, only) if not o]))

    # -- numeric values ---------------------------------------------------------------------
    def _layer_values(self, key: str, X: np.ndarray, positions: tuple) -> np.ndarray:
        """Per data row, the scalars of input layer ``key`` at the given positions (a view of
        X itself when they are input coordinates 0..d-1 in order, the dense input layer)."""
        how, plan = self._layer_plan(key, positions)
        if how == "identity" and len(plan) == X.shape[1]:
            return X
        if how == "scalars":
            return np.stack([LAYER_SCALARS(o)(X, o) for o in plan], axis=1)
        return np.ascontiguousarray(X[:, plan])  # row-major, as the columns stacked were

    def _layer_plan(self, key: str, positions: tuple):
        """How ``_layer_values`` reads the scalars, built once per layer and positions (a
        CNN's kernels read one Gram per pair of windows): the input columns as an index array
        when every scalar is an input coordinate ("columns"; "identity" when they are
        0, 1, ..., k-1 in order), else the scalars' ops ("scalars")."""
        memo_key = ("layer", key, positions)
        plan = self._memo.get(memo_key)
        if plan is None:
            sops = [self.graph.op(self.graph.args(key)[1:][p]) for p in positions]
            plan = ("scalars", sops)
            if all(type(o) is ops.Input for o in sops):
                columns = np.array([o.index for o in sops], dtype=np.intp)
                plan = ("identity" if np.array_equal(columns, np.arange(len(columns))) else "columns", columns)
            self._memo[memo_key] = plan
        return plan

    def _matched(self, a: str, b: str) -> tuple[tuple, tuple]:
        """Positions of the scalars of input layers a and b that share a column of U."""
        key = ("matched", a, b)
        if key not in self._memo:
            ca, cb = self.graph.op(a).columns, self.graph.op(b).columns
            where = {}
            for k, c in enumerate(cb):
                where.setdefault(c, []).append(k)
            pairs = [(i, k) for i, c in enumerate(ca) for k in where.get(c, ())]
            self._memo[key] = (tuple(i for i, _ in pairs), tuple(k for _, k in pairs))
        return self._memo[key]

    def _cov_values(self, a: str, b: str, X: np.ndarray, Y: np.ndarray | None, diagonal: bool,
                    out: np.ndarray | None = None) -> np.ndarray:
        """Cov(Z^a, Z^b) of input layers a and b at the rows of X (first input) and of Y
        (second input; None: X): a vector over the rows (``diagonal``) or a Gram (into
        ``out`` when given)."""
        (ia, ib), scale, same = self._cov_terms(a, b)
        A = self._layer_values(a, X, ia)
        B = A if (Y is None and same) else self._layer_values(b, X if Y is None else Y, ib)
        if diagonal:
            return np.einsum("ij,ij->i", A, B) * scale
        if Y is None and same:
            return symmetric_gram(A * np.sqrt(scale), out)
        return cross_gram(A * scale, B, out)

    def _cov_terms(self, a: str, b: str) -> tuple:
        """(matched positions of a and b, 1/sqrt(norm_a norm_b), whether a and b are one layer
        at the same positions: then Cov(Z^a, Z^b) of one input is a symmetric Gram)."""
        matched = self._matched(a, b)
        scale = 1.0 / np.sqrt(self.graph.op(a).norm * self.graph.op(b).norm)
        return matched, scale, a == b and matched[0] == matched[1]

    def _row_plan(self) -> list:
        """Per row feature: (numpy function, input columns, input covariances) -- built once,
        so evaluating rows does no sympy work.  A feature that is a linear combination of
        input-layer covariances (a CNN's variance of a window, one per position or pair of
        positions: thousands) is planned as (None, coefficients, covariances), no function
        built for it."""
        if "row_plan" not in self._memo:
            plan = []
            for kind, *entry in self._row_entries():
                if kind == "linear":
                    plan.append((None, *entry))
                    continue
                expr, = entry
                covs = sorted(expr.atoms(ops.InputCov), key=sp.default_sort_key)
                dummies = [sp.Dummy(f"c{i}") for i in range(len(covs))]
                body = expr.xreplace(dict(zip(covs, dummies)))
                syms = sorted(body.free_symbols & set(self.inputs0), key=sp.default_sort_key)
                plan.append((numpy_function(body, syms + dummies), [self.inputs0[s] for s in syms],
                             [(c.args[0].name, c.args[1].name) for c in covs]))
            self._memo["row_plan"] = plan
        return self._memo["row_plan"]

    def row_values(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((X.shape[0], max(len(self.row), 1)))
        for k, (fn, columns, covs) in enumerate(self._row_plan()):
            if fn is None:  # sum of c * Cov(a, b) and numbers, added in the printed order
                value = None
                for c, cov in zip(columns, covs):
                    term = c if cov is None else c * self._cov_values(*cov, X, None, True)
                    value = term if value is None else value + term
                out[:, k] = value
                continue
            args = [X[:, j] for j in columns] + [self._cov_values(a, b, X, None, True) for a, b in covs]
            out[:, k] = np.broadcast_to(fn(*args), (X.shape[0],))
        return out

    def pair_values(self, X: np.ndarray, X2: np.ndarray | None, stacked: bool = False):
        """One N x N2 array per base Gram (separate arrays: the generated loop vectorises);
        ``stacked``: one (number of Grams) x N x N2 array instead (the looped pair stage of
        shared.py indexes Grams by a run-time number)."""
        if stacked:
            out = np.empty((len(self.bases), X.shape[0], (X if X2 is None else X2).shape[0]))
            one_by_one = range(len(self.bases))
            if out.shape[1] * out.shape[2] <= _BATCHED_UP_TO:
                batches, one_by_one = self._gram_batches()
                self._batched_cov_grams(batches, X, X2, out)
            for m in one_by_one:
                self._base_values(m, X, X2, out[m])
            return out
        return [self._base_values(m, X, X2) for m in range(len(self.bases))]

    @staticmethod
    def _batched_cov_grams(batches: list, X: np.ndarray, X2: np.ndarray | None, out: np.ndarray) -> None:
        """The input-covariance Grams of ``batches`` (``_gram_batches``) at (X, X2), written into
        ``out`` a batch at a time (one stacked matrix product per batch of Grams with as many
        matched columns: the same BLAS call per Gram as ``_cov_values`` makes, so the same
        bits, without its Python work per Gram, which a CNN's thousands of Grams of a few
        columns spent at small N: 2-D 8x8 depth 2, 4,096 Grams at N = 7, 27 -> 3 ms)."""
        Y = X if X2 is None else X2
        for same, idx, cols_a, cols_b, scale in batches:
            per_gram = X.shape[0] * Y.shape[0] + (X.shape[0] + Y.shape[0]) * cols_a.shape[1]
            chunk = max(1, _BATCH_DOUBLES // per_gram)
            for start in range(0, len(idx), chunk):
                part = slice(start, start + chunk)
                A = _gathered(X, cols_a[part])
                if same and X2 is None:
                    Z = A * np.sqrt(scale[part])[:, None, None]
                    out[idx[part]] = np.matmul(Z, Z.transpose(0, 2, 1))
                else:
                    B = _gathered(Y, cols_b[part])
                    out[idx[part]] = np.matmul(A * scale[part][:, None, None], B.transpose(0, 2, 1))

    def _gram_batches(self) -> tuple[list, list]:
        """([(one layer at the same positions, base indices, columns of a, columns of b,
        scales)], the other bases): the bases ("cov", a, b) whose scalars are all input
        columns, batched by their number of matched columns and whether ``_cov_values`` takes
        a symmetric Gram of them; built once."""
        if "gram_batches" not in self._memo:
            batches: dict = {}
            others = []
            for m, base in enumerate(self.bases):
                plans = None
                if base[0] == "cov":
                    (ia, ib), scale, same = self._cov_terms(base[1], base[2])
                    plans = self._layer_plan(base[1], ia), self._layer_plan(base[2], ib)
                if plans is None or not ia or "scalars" in (plans[0][0], plans[1][0]):
                    others.append(m)
                    continue
                batches.setdefault((same, len(ia)), []).append((m, plans[0][1], plans[1][1], scale))
            self._memo["gram_batches"] = ([
                (same, np.array([m for m, *_ in items], dtype=np.intp), np.array([c for _, c, _, _ in items]),
                 np.array([c for _, _, c, _ in items]), np.array([sc for *_, sc in items], dtype=np.float64))
                for (same, _), items in batches.items()], others)
        return self._memo["gram_batches"]

    def _base_values(self, m: int, X: np.ndarray, X2: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
        """Base Gram m of (X, X2) (into ``out`` when given)."""
        base = self.bases[m]
        if base[0] == "cov":
            return self._cov_values(base[1], base[2], X, X2, False, out)
        return _bilinear_gram(dict(base[1]), X, X2, out)


def _linear_in_covs(expr: sp.Expr):
    """[(c, Cov or None), ...] when expr is a sum of numbers c (None) and numbers times
    first-input input-layer covariances, in the order of the sum's arguments (the order the
    terms are added in; sympy's printing order, ``as_ordered_terms``, cost a 2-D 8x8 CNN
    1.5 s for its 6,000 row features), else None."""
    parts = _numbers_and_covariances(expr, lambda cov: cov.args[2] == 0 and cov.args[3] == 0)
    if parts is None or all(cov is None for _, cov in parts):
        return None
    return [(float_value(c), cov) for c, cov in parts]


def _numbers_and_covariances(expr: sp.Expr, accepted) -> list | None:
    """[(c, InputCov or None), ...] when expr is a sum of numbers c (None) and numbers c times
    input-layer covariances that ``accepted(cov)``, in the order of the sum's arguments; else
    None."""
    parts = []
    for term in sp.Add.make_args(expr):
        c, rest = term.as_coeff_Mul()
        if rest is sp.S.One:
            parts.append((c, None))
        elif isinstance(rest, ops.InputCov) and accepted(rest):
            parts.append((c, rest))
        else:
            return None
    return parts


#: The value on every data row of one scalar of an input layer, by op: rule(X, op) -> column.
LAYER_SCALARS = RuleTable("input-layer scalars", domain=(ops.Input, ops.Param))
LAYER_SCALARS.register(ops.Input)(lambda X, op: X[:, op.index])
LAYER_SCALARS.register(ops.Param)(lambda X, op: np.full(X.shape[0], op.value))


#: Rows from which ``symmetric_gram`` and ``cross_gram`` split a Gram over two threads.
_TWO_THREADS_FROM = 256

#: The doubles a batch of ``_batched_cov_grams`` may hold (its Grams and gathered columns).
_BATCH_DOUBLES = 4_000_000

#: The Gram size (N x N2 entries) up to which ``pair_values`` computes the Grams of input
#: columns in batches: beyond it the gathering and scattering of the batches cost more than
#: the Python work per Gram they save (2-D 8x8 depth 2: the same time at N = 100, 10% more
#: at N = 200).
_BATCHED_UP_TO = 100 * 100


def _gathered(X: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """X's columns ``columns[g]`` for each g, as one C-contiguous (G, rows, k) array."""
    G, k = columns.shape
    return np.ascontiguousarray(X[:, columns.ravel()].reshape(X.shape[0], G, k).transpose(1, 0, 2))


def _in_two_threads(first, second) -> None:
    """Run both (numpy releases the GIL in BLAS) and wait; their exceptions propagate."""
    threads.run((first, second))


def symmetric_gram(Z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Z Z^T (into ``out`` when given) in two balanced halves on two threads, each a
    single-threaded BLAS call when the caller limits BLAS to one thread (kernels.py does, see
    there): with Z = [A; B], one thread computes the symmetric blocks A A^T and B B^T (numpy:
    syrk), the other A B^T; the same flops as one syrk, half the wall time on two cores."""
    N = Z.shape[0]
    out = np.empty((N, N)) if out is None else out
    if N < _TWO_THREADS_FROM:
        return np.matmul(Z, Z.T, out=out)
    h = N // 2
    A, B = Z[:h], Z[h:]

    def diagonal_blocks():
        np.matmul(A, A.T, out=out[:h, :h])
        np.matmul(B, B.T, out=out[h:, h:])

    def off_diagonal_block():
        np.matmul(A, B.T, out=out[:h, h:])

    _in_two_threads(diagonal_blocks, off_diagonal_block)
    out[h:, :h] = out[:h, h:].T
    return out


def cross_gram(A: np.ndarray, B: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A B^T (into ``out`` when given), the rows of A in two halves on two threads (see
    symmetric_gram)."""
    N = A.shape[0]
    out = np.empty((N, B.shape[0])) if out is None else out
    if N < _TWO_THREADS_FROM:
        return np.matmul(A, B.T, out=out)
    h = N // 2

    def half(rows):
        np.matmul(A[rows], B.T, out=out[rows])

    _in_two_threads(lambda: half(slice(0, h)), lambda: half(slice(h, N)))
    return out


def _bilinear_gram(A: dict, X: np.ndarray, X2: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
    """X A X2^T for a sparse bilinear form (a diagonal A costs one matrix product), into
    ``out`` when given."""
    Y = X if X2 is None else X2
    if all(j == k for j, k in A):
        cols = np.array(sorted(j for j, _ in A))
        w = np.array([A[(j, j)] for j in cols])
        if np.all(w >= 0) and X2 is None:
            return symmetric_gram(X[:, cols] * np.sqrt(w), out)
        return cross_gram(X[:, cols] * w, Y[:, cols], out)
    M = np.zeros((X.shape[1], Y.shape[1]))
    for (j, k), c in A.items():
        M[j, k] += c
    return cross_gram(X @ M, Y, out)


def _cov_key(cov: ops.InputCov) -> tuple:
    """The Gram base of an input-layer covariance of the two inputs: its layers, the first
    input's first."""
    a, b, pa, pb = cov.args
    return ("cov", str(a), str(b)) if int(pa) == 0 else ("cov", str(b), str(a))


def _expanded(expr: sp.Expr) -> bool:
    """Whether expr is a sum of numbers, symbols, input-layer covariances and numbers times
    one of those, which ``sp.expand`` returns as it is (a window's covariance sum, a pair
    feature of a CNN, one per pair of windows: expanding each cost a millisecond)."""
    def atom(x):
        return x.is_Symbol or isinstance(x, ops.InputCov)

    for t in sp.Add.make_args(expr):
        if not (t.is_Number or atom(t) or (t.is_Mul and len(t.args) == 2 and t.args[0].is_Number and atom(t.args[1]))):
            return False
    return True
