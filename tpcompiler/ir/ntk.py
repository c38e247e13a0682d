"""Kernel outputs as pair moments of the differentiated program (docs/DESIGN.md 2.3).

For the readout f(xi) = sigma/sqrt(n) v . x + b beta and the gradient vectors dz of the
backward pass, the infinite-width kernels are pair moments (xi, xi'):

  NNGP(xi, xi') = var sigma^2 E[Z^x Z^x'] + b^2      (v ~ N(0, var)),
  NTK(xi, xi')  = sum over trained parameters P of <df/dP(xi), df/dP(xi')>:
      initial vector u:  ntk_weight_u * E[Z^{du} Z^{du}']                (du = sqrt(n) df/du)
      matrix W:          ntk_weight_W * sum_{uses a,b} E[Z^{r_a} Z^{r_b}'] E[Z^{c_a} Z^{c_b}']
                         (use y = W x: r = dy, c = x;  use y = W^T x: r = x, c = dy)
      readout v:         ntk_weight_v * sigma^2 E[Z^x Z^x'] (default weight 1);  bias beta: bias_weight.

Terms that multiply one pair of gradients E[Z^{r_a} Z^{r_b}'] are one product: the uses of
matrices (and input matrices) that share it, and an initial vector whose gradient is a
numeric linear combination of such gradients (a bias b added to h = W x + b has db =
sum of dh over its uses, each dh a multiple of the r of a matrix use), folded in as a
constant: E[r_a r_b'] (sum_W w_W E[c_a c_b'] + w_b e_a e_b / (s_a s_b)) with r = s D,
db = sum e D, when the s are non-zero numbers (a layer scaled by a Param keeps the bias's
own pair moment: the Param could be zero).  A convolution's NTK (tp.layers) is then one
product per pair of positions and layer, Theta = Sigma-dot (window sum + bias), not one for
the weights and one for the bias.

Because these are ordinary pair moments, the same outputs are evaluated by every backend:
exactly by the pairwise kernel backend, by particles, and at finite width by the interpreter
(where each pair moment is exactly the empirical kernel's sum over the parameter's entries).
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field

import sympy as sp

from tpcompiler import memory
from tpcompiler.ir import ops
from tpcompiler.ir.backward import derive_backward, forward_nodes
from tpcompiler.ir.construct import product, total
from tpcompiler.ir.graph import Graph
from tpcompiler.ir.ops import node_symbol, primed_symbol
from tpcompiler.ir.parity import Characters
from tpcompiler.ir.rules import RuleTable
from tpcompiler.ir.symbols import linear_coefficients, monomial
from tpcompiler.validation import ArgumentError

#: The kernels of a program with a readout, the outputs of its kernel program
KERNELS = ("nngp", "ntk")


def asked_kernels(get) -> tuple[str, ...]:
    """The kernels ``get`` names (neural-tangents' argument: "nngp", "ntk", or a tuple or list
    of them; here also a comma-separated string; None: both), each once, in the order given
    (``layers.kernel_fn`` returns them so); a clear error for anything else."""
    if get is None:
        return KERNELS
    names = [n.strip() for n in get.split(",")] if isinstance(get, str) else get
    try:
        names = tuple(names)
    except TypeError:
        names = (get,)
    if not names or any(not isinstance(n, str) or n.lower() not in KERNELS for n in names):
        raise ArgumentError(f"get: expected 'nngp', 'ntk' or both (a tuple or a comma-separated list), got {get!r}")
    return tuple(dict.fromkeys(n.lower() for n in names))


def kernel_names(get) -> tuple[str, ...]:
    """The kernels ``get`` asks for (``asked_kernels``) in KERNELS' order: which to derive."""
    asked = asked_kernels(get)
    return tuple(k for k in KERNELS if k in asked)


def as_asked(get, values: dict, typename: str):
    """neural-tangents' return convention for ``get``: a string naming one kernel gives its value
    in ``values`` alone, anything else (a tuple, None) a named tuple ``typename`` of the values of
    the kernels asked (``asked_kernels``), in the order given."""
    names = asked_kernels(get)
    if isinstance(get, str) and len(names) == 1:
        return values[names[0]]
    return _named_tuple(typename, names)(*[values[n] for n in names])


@functools.cache
def _named_tuple(typename: str, names: tuple):
    return collections.namedtuple(typename, names)


def _pair(d: "_Differentiated", a: str, b: str) -> sp.Symbol:
    """The pair moment E[Z^a Z^b(xi')]: b is primed where it depends on the input.  Interned,
    so the program's own pair moment of the same expression (or an earlier request) is reused;
    memoised (a convolution's taps share their gradient pairs)."""
    found = d.pairs.get((a, b))
    if found is None:
        memory.tick()
        expr = monomial(node_symbol(a), primed_symbol(b) if b in d.dependent else node_symbol(b))
        found = d.pairs[(a, b)] = node_symbol(
            d.out.intern_expr(ops.Moment, expr, f"K_{a}_{b}" if a != b else f"K_{a}", pair=True))
    return found


@dataclass
class _Differentiated:
    """A template and its backward pass: ``out`` (the graph gradients were appended to),
    ``grads`` {z: dz}, the forward vectors and the input-dependent nodes of ``out``, the
    pair moments made so far, and the NTK's products of gradient pairs: (r_a, r_b) -> the
    factors that multiply E[Z^{r_a} Z^{r_b}'] (``NTK_TERMS`` of the matrices fill it, the
    initial vectors fold into it, ``_gradient_pair_terms`` writes it out)."""

    graph: Graph
    out: Graph
    grads: dict
    forward: set
    dependent: set
    pairs: dict = field(default_factory=dict)   # (a, b) -> its pair moment's symbol (_pair)
    #: (r_a, r_b) -> the parts of the factor of E[Z^{r_a} Z^{r_b}']: ("use", w, c_a, c_b) for
    #: w E[c_a c_b'], ("cov", w, A, B) for w Cov(Z^A, Z^B'), ("constant", c); their pair
    #: moments are made when the products are written (``_gradient_pair_terms``), in the
    #: order the rules found them
    by_rows: dict = field(default_factory=dict)
    base_rows: dict | None = None  # ``_base_rows``' memo
    #: the flip characters of ``out`` (parity.py) when the kernel program is that of the
    #: limit, whose products of pair moments 0 by a flip symmetry are left out; None keeps
    #: every product (finite width, where such a moment is not 0, only its expectation)
    characters: Characters | None = None

    def vanishes(self, a: str, b: str) -> bool:
        """Whether E[Z^a Z^b'] = 0 is proven by a flip symmetry (only in the limit's kernel program)."""
        return self.characters is not None and self.characters.vanishes(a, b)


def kernel_program(graph: Graph, in_the_limit: bool = False, ntk: bool = True) -> Graph:
    """``graph`` with its backward pass and the outputs ``nngp`` and ``ntk`` (pair moments);
    ``in_the_limit``: see ``kernel_outputs``.  ``ntk`` False: a copy of ``graph`` with the
    output ``nngp`` alone, which reads no gradient (the kernel backend's ``get="nngp"``: a
    CNN's backward pass and the NTK's pair moments, ~3 per pair of positions, are not made)."""
    if not ntk:
        out = graph.copy()
        d = _Differentiated(graph, out, {}, set(forward_nodes(graph)), out.input_dependent())
        out.outputs = {"nngp": _nngp(d)}
        return out
    return kernel_outputs(graph, *derive_backward(graph), in_the_limit=in_the_limit)


def _nngp(d: "_Differentiated") -> sp.Expr:
    """NNGP = var sigma^2 E[Z^x Z^x'] + b^2 of the readout f = sigma/sqrt(n) v . x + b beta,
    v ~ N(0, var) (``Program.readout``'s var; it was left out: var = 2 gave the NNGP of 1, and
    var = 0, whose f is 0 at initialization, that of 1 too)."""
    ro = d.graph.readout
    var = d.graph.op(ro.readout).var
    scale = ro.sigma**2 if var == 1 else var * ro.sigma**2
    return scale * _pair(d, ro.vector, ro.vector) + (ro.bias**2 if ro.bias is not None else sp.S.Zero)


def _readout_weight(graph: Graph) -> sp.Expr:
    """The readout vector's NTK weight: its ``ntk_weight``, by default 1 (``Program.readout``:
    the trained parameters are v's entries whatever its initial variance), 0 if frozen.  Not
    an initial vector's default weight, var (the parameter u / sqrt(var)): with var = 2 the
    readout's term was doubled, and with var = 0 (a readout that starts at zero, word2vec's)
    the NTK was 0, as if the readout did not train."""
    op = graph.op(graph.readout.readout)
    if not op.trainable:
        return sp.S.Zero
    return sp.S.One if op.ntk_weight is None else op.ntk_weight


def kernel_outputs(graph: Graph, out: Graph, grads: dict[str, str], in_the_limit: bool = False) -> Graph:
    """The kernel-program pass: ``out`` (``graph`` with its backward pass, gradients
    ``grads`` = {z: dz}) with the outputs ``nngp`` and ``ntk`` as pair moments, replacing its
    outputs.  NTK = v's term + the bias term + the contributions of every trained parameter
    type, each by its rule in ``NTK_TERMS`` (the matrices', then the initial vectors', which
    may fold into the matrices' products of gradient pairs: module docstring).

    ``in_the_limit``: the kernel program of the limit (every limit backend reads it), which
    leaves out the NTK's products of a pair moment that a flip symmetry proves 0
    (``parity.py``: a Flatten readout's gradients at two positions); they are not 0 at finite
    width, where the program run by the interpreter is the network's own empirical kernel, so
    the finite-width kernel program (the default) keeps them."""
    d = _Differentiated(graph, out, grads, set(forward_nodes(graph)), out.input_dependent(),
                        characters=Characters(out) if in_the_limit else None)
    ro = graph.readout
    out.outputs = {}
    nngp = _nngp(d)
    terms = [_readout_weight(graph) * ro.sigma**2 * _pair(d, ro.vector, ro.vector)]
    if ro.bias is not None:
        terms.append(ro.bias_weight if ro.bias_weight is not None else ro.bias**2)
    # the matrices' products of gradient pairs first, so that initial vectors can fold into
    # them; their pair moments are made after the vectors' (as they were when every rule
    # wrote its own terms), and a vector that folds makes none
    for op_type in sorted(NTK_TERMS.domain, key=lambda t: t is ops.InitVec):
        keys = [k for k in graph.keys_of(op_type) if graph.op(k).weight() != 0 and k != ro.readout]
        terms += NTK_TERMS(op_type)(d, keys)
    terms += _gradient_pair_terms(d)
    out.outputs["nngp"] = nngp
    out.outputs["ntk"] = total(terms)
    return out


def _gradient_pair_terms(d: _Differentiated) -> list:
    """The products E[Z^{r_a} Z^{r_b}'] * (sum of its factor's parts) of ``d.by_rows``, in the
    order they were found (a single part: one product of its factors, w * E[r_a r_b'] *
    E[c_a c_b'] or w * Cov * E[r_a r_b'], as sympy flattens it)."""
    terms = []
    for (ra, rb), parts in d.by_rows.items():
        memory.tick()
        pair = _pair(d, ra, rb)  # (before the parts' own pair moments: the order of the graph's nodes)
        factors = [_factor_part(d, part) for part in parts]
        # (built directly, construct.py: one product of a sum per pair of positions and layer)
        terms.append(product(sp.S.One, [pair, factors[0] if len(factors) == 1 else total(factors)]))
    return terms


def _factor_part(d: _Differentiated, part: tuple) -> sp.Expr:
    """One part of a gradient pair's factor (``_Differentiated.by_rows``) as an expression."""
    if part[0] == "use":
        return monomial(part[1], _pair(d, part[2], part[3]))
    if part[0] == "cov":
        return sp.Mul(part[1], d.out.init_covariance(part[2], part[3], prime_b=True, compact=True))
    return part[1]


#: NTK contributions of the trained parameters, by op type: rule(differentiated, keys of that
#: type with a nonzero NTK weight) -> terms (the matrices' go into ``by_rows`` instead).
NTK_TERMS = RuleTable("NTK contributions", domain=ops.INITIAL)


@NTK_TERMS.register(ops.InitVec)
def _ntk_vectors(d: _Differentiated, keys: list) -> list:
    """Initial vector u: w_u E[Z^{du} Z^{du}'].  A vector whose gradient is a numeric linear
    combination of the matrices' row gradients (a bias) is folded into their products
    (``_fold_into_rows``; module docstring).  Vectors whose gradients are scalar multiples
    c_u D of one vector (the d columns of an input layer: dU_j = (sigma xi_j / sqrt(d)) dh)
    share one pair moment: sum_u w_u c_u(xi) c_u(xi') E[Z^D Z^D']."""
    scaled: dict[str, sp.Expr] = {}
    for key in keys:
        if key not in d.grads or _fold_into_rows(d, d.graph.op(key).weight(), d.grads[key]):
            continue
        coef, base = _scalar_multiple(d.out, d.grads[key])
        primed = coef.xreplace({s: primed_symbol(s.key) for s in coef.free_symbols if s.key in d.dependent})
        scaled[base] = scaled.get(base, sp.S.Zero) + d.graph.op(key).weight() * coef * primed
    return [coef * _pair(d, base, base) for base, coef in scaled.items()]


@NTK_TERMS.register(ops.InputMat)
def _ntk_input_matrices(d: _Differentiated, keys: list) -> list:
    """Input matrix U: the columns U_j of an input layer A = sum_i s_i U_{c_i} / sqrt(norm)
    have gradients (s_i / sqrt(norm)) dA, so U contributes w_U sum_{A,B} Cov(Z^A, Z^B') E[dA dB']
    (into ``by_rows``: the part w_U Cov(Z^A, Z^B') of the gradient pair (dA, dB)); in the
    limit's kernel program without the pairs a flip symmetry proves 0."""
    for U in keys:
        layers = [k for k in d.graph.keys_of(ops.InputLayer) if d.graph.args(k)[0] == U and k in d.grads]
        partners = _partners(d, [d.grads[a] for a in layers])
        for i, a in enumerate(layers):
            for b in (layers if partners is None else [layers[j] for j in partners[i]]):
                d.by_rows.setdefault((d.grads[a], d.grads[b]), []).append(("cov", d.graph.op(U).weight(), a, b))
    return []


@NTK_TERMS.register(ops.InitMat)
def _ntk_matrices(d: _Differentiated, keys: list) -> list:
    """Matrix W: w_W sum_{uses a,b} E[Z^{r_a} Z^{r_b}'] E[Z^{c_a} Z^{c_b}'] over its forward
    uses (y = W x: r = dy, c = x;  y = W^T x: r = x, c = dy), matrices in order of first use;
    in the limit's kernel program without the pairs of uses a flip symmetry proves 0."""
    uses: dict[str, list[tuple[str, str]]] = {}
    for key in d.graph.keys_of(ops.MatMul):
        mat, x, tr = d.graph.matmul_parts(key)
        if key in d.forward and key in d.grads and mat in keys:
            uses.setdefault(mat, []).append((x, d.grads[key]) if tr else (d.grads[key], x))
    # Pairs of uses with the same (r_a, r_b), of any matrices, share that factor:
    # E[Z^{r_a} Z^{r_b}'] * sum w_W E[Z^{c_a} Z^{c_b}'].  A convolution's taps that read one
    # pair of output positions have one gradient pair, so its term is one product per pair of
    # positions (the NTK recursion's Theta = Sigma-dot * (sum over the window)), not one per
    # pair of positions and tap.  A single pair stays one product of three factors.
    weights = {mat: d.graph.op(mat).weight() for mat in uses}
    for mat, pairs in uses.items():
        partners = _partners(d, [r for r, _ in pairs])
        check_columns = d.characters is not None and len({d.characters.of(c) for _, c in pairs}) > 1
        for a, (ra, ca) in enumerate(pairs):
            for b in (range(len(pairs)) if partners is None else partners[a]):
                rb, cb = pairs[b]
                memory.tick()
                if check_columns and d.vanishes(ca, cb):
                    continue
                d.by_rows.setdefault((ra, rb), []).append(("use", weights[mat], ca, cb))
    return []


def _partners(d: _Differentiated, rows: list) -> list | None:
    """For the uses of one parameter with gradient rows r: partners[a] the uses b, in order,
    whose E[Z^{r_a} Z^{r_b}'] is not proven 0 (``d.vanishes``), found through the rows'
    characters instead of a test per pair of uses (a Flatten CNN's P^2 per tap); None for
    every use (the finite-width program; rows that all have the same characters)."""
    if d.characters is None:
        return None
    characters_of = [d.characters.of(r) for r in rows]
    if len(set(characters_of)) == 1:
        return None
    by_character: dict = {}
    for b, characters in enumerate(characters_of):
        for character in characters:
            by_character.setdefault(character, []).append(b)
    return [sorted(set().union(*(by_character[c] for c in characters))) for characters in characters_of]


def _fold_into_rows(d: _Differentiated, weight: sp.Expr, grad: str) -> bool:
    """Add an initial vector's w E[du du'] to the products of ``by_rows`` when du = sum_k e_k
    D_k (numeric e_k, ``_linear_combination``) and every pair (D_k, D_l) is the pair of base
    vectors of a product's gradients (r = s D, ``_scalar_multiple``, s a non-zero number; a
    Param could be zero, and the constant divides by it): the constant w e_k e_l / (s_a s_b)
    joins the factors of E[r_a r_b'] (of one product per base pair, ``_base_rows``).  Whether
    it did (else nothing is added)."""
    combination = _linear_combination(d.out, grad)
    if combination is None or not d.by_rows:
        return False
    rows = _base_rows(d)
    folds = []
    constants: dict = {}  # (e_k, e_l, s_a s_b) -> w e_k e_l / (s_a s_b): a few values for many pairs
    bases = list(combination)
    partners = _partners(d, bases)  # (the pairs left out are proven 0: a shared bias's P^2)
    for k, dk in enumerate(bases):
        for dl in (bases if partners is None else [bases[m] for m in partners[k]]):
            ek, el = combination[dk], combination[dl]
            found = rows.get((dk, dl))
            if found is None:
                if d.vanishes(dk, dl):
                    continue  # (E[D_k D_l'] = 0: a product left out of the limit's)
                return False
            key = (ek, el, found[1])
            constant = constants.get(key)
            if constant is None:
                constant = constants[key] = weight * ek * el / found[1]
            folds.append((found[0], constant))
    for key, constant in folds:
        d.by_rows[key].append(("constant", constant))
    return True


def _base_rows(d: _Differentiated) -> dict:
    """{(D_a, D_b): ((r_a, r_b), s_a s_b)} over the gradient pairs of ``by_rows`` with r = s D
    for non-zero numbers s, a pair whose s_a s_b is 1 preferred (its constant is the weight
    itself, not a rounded quotient); made once (folding adds parts, never pairs)."""
    if d.base_rows is None:
        bases = {r: _scalar_multiple(d.out, r) for r in dict.fromkeys(r for pair in d.by_rows for r in pair)}
        rows: dict = {}
        for ra, rb in d.by_rows:
            (sa, da), (sb, db) = bases[ra], bases[rb]
            if sa.is_number and sb.is_number and sa != 0 and sb != 0:
                found = rows.get((da, db))
                if found is None or (found[1] != 1 and sa * sb == 1):
                    rows[(da, db)] = ((ra, rb), sa * sb)
        d.base_rows = rows
    return d.base_rows


def _linear_combination(graph: Graph, key: str) -> dict | None:
    """{D: e} with Z^key = sum e Z^D for numeric e, D vectors of ``graph``: a Nonlin linear in
    its vectors (a bias's gradient, the sum of its uses' dh), else {key: 1}; None if a
    coefficient is not a number."""
    op = graph.op(key)
    if isinstance(op, ops.Nonlin):
        vectors = sorted((s for s in op.expr.free_symbols if graph.kind(s.key) == ops.VEC),
                         key=lambda v: graph.g.nodes[v.key]["index"])
        coefficients = linear_coefficients(op.expr, vectors)
        if coefficients is not None:
            return {v.key: c for v, c in zip(vectors, coefficients)} if all(c.is_number for c in coefficients) else None
    return {key: sp.S.One}


def _scalar_multiple(graph: Graph, key: str) -> tuple[sp.Expr, str]:
    """(c, D) with Z^key = c * Z^D for a scalar c (c = 1, D = key otherwise)."""
    op = graph.op(key)
    if isinstance(op, ops.Nonlin):
        vectors = [s for s in op.expr.free_symbols if graph.kind(s.key) == ops.VEC]
        if len(vectors) == 1:
            c = sp.simplify(op.expr / vectors[0])
            if not c.has(vectors[0]):
                return c, vectors[0].key
    return sp.S.One, key
