"""Kernel derivations stored on disk (issue 11: compile time of programs with many positions).

A KernelFunction's derivation (pairwise engine, lowering, grouping, code generation) is a pure
function of the program graph, the options it was asked with and the code that derives it.
Its result is small: the generated module's source and the input features the calls
evaluate (``Features.runtime_state``).  It is stored under a *key*, the SHA-256 of

* the graph, every attribute of it but construction bookkeeping written out exactly
  (``graph_parts``, ``fingerprint``: sympy expressions node by node as exactly as ``srepr``
  writes them, floats by ``repr``, which round-trip; dicts and sets in sorted order, so the
  key does not depend on the process's hash seed),
* the options (rtol, runtime parameters, share, templates),
* the source of every module of the tpcompiler package as this process imported it
  (``tpcompiler._code``: a derivation is stored only if the files still are that source) and
  the versions of Python, sympy, mpmath, numpy, scipy, networkx and numba,

so a stored derivation is read back only for the same program derived by the same code; any
change to either is another key.  The graph must be the one the derivation reads:
``tp.compile`` refuses a program changed in place after it was compiled (compiler.py,
``_unchanged``, by ``graph_parts``).  A stored file carries the SHA-256 of its content and is
read back only if it matches (a damaged file is derived again and overwritten).

An object the fingerprint does not know how to write exactly raises ``Unkeyable``: the
derivation is then simply not stored (never keyed by something inexact).  Storing only saves
time: a cache that cannot be read or written is derived around, never an error.

The generated module itself goes through the content-addressed module cache and Numba's own
cache (codegen.load_module), so a second process that compiles the same program pays neither
the derivation nor Numba's compile.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import sys

import networkx as nx
import numpy as np
import sympy as sp
from sympy.core.function import AppliedUndef

from tpcompiler.ir.ops import Record

#: Bumped when the stored state's layout changes.
FORMAT = 3
#: Graph attributes that are construction bookkeeping, not the program: the hash-consing table
#: (a function of the nodes), the counters that name new nodes and the memo of the node order.
BOOKKEEPING = frozenset({"_interned", "_count", "_suffix", "_order_memo"})
#: The entries every stored state has (``load`` checks them).
ENTRIES = frozenset({"source", "shared", "row_symbols", "features"})


class Unkeyable(TypeError):
    """The graph holds an object ``fingerprint`` cannot write exactly."""


@functools.cache
def library_versions() -> str:
    """The versions of the libraries a derivation depends on (computed once)."""
    import mpmath
    import numba
    import scipy

    return "|".join((sys.version, sp.__version__, mpmath.__version__, np.__version__,
                     scipy.__version__, nx.__version__, numba.__version__))


def fingerprint(obj, strict: bool = True, memo: dict | None = None) -> str:
    """An exact, process-independent text of ``obj`` (module docstring): equal texts mean equal
    objects as far as a derivation can see.  ``strict`` False (a snapshot compared within one
    process, never a key): an object it cannot write is written by its type and identity, a
    function class by its name, instead of raising ``Unkeyable``.  ``memo`` ({(id, strict):
    (object, text)}, kept by the caller): the texts of instruction and readout records
    (``ops.Record``: frozen, of immutable values, so one object always has one text) written
    before, read back by identity (``tp.compile``'s second look at a program of 10^5
    instructions)."""
    if memo is not None and isinstance(obj, Record):
        found = memo.get((id(obj), strict))
        if found is None or found[0] is not obj:
            found = memo[(id(obj), strict)] = (obj, fingerprint(obj, strict))
        return found[1]

    def text(x) -> str:  # (a part of obj, with the same strictness and memo)
        return fingerprint(x, strict, memo)

    if obj is None or isinstance(obj, (bool, int, str)):
        return repr(obj)
    if isinstance(obj, float):
        return f"f{obj!r}"
    if isinstance(obj, type):
        return f"type:{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, sp.Basic):
        return f"S({_sympy_text(obj, strict)})"
    if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
        return f"A({obj.dtype.str},{obj.shape},{hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()})"
    if isinstance(obj, (np.integer, np.floating)):
        return text(obj.item())
    if dataclasses.is_dataclass(obj):
        fields = ",".join(f"{f.name}={text(getattr(obj, f.name))}" for f in dataclasses.fields(obj))
        return f"{type(obj).__module__}.{type(obj).__qualname__}({fields})"
    if isinstance(obj, (list, tuple)):
        return ("L[" if isinstance(obj, list) else "T[") + ",".join(text(x) for x in obj) + "]"
    if isinstance(obj, dict):
        return "D{" + ",".join(sorted(f"{text(k)}:{text(v)}" for k, v in obj.items())) + "}"
    if isinstance(obj, (set, frozenset)):
        return "F{" + ",".join(sorted(text(x) for x in obj)) + "}"
    if isinstance(obj, nx.DiGraph):
        # node and edge order as inserted: a program's instruction order
        nodes = ",".join(f"{text(n)}:{text(d)}" for n, d in obj.nodes(data=True))
        edges = ",".join(f"{text(a)}>{text(b)}:{text(d)}" for a, b, d in obj.edges(data=True))
        return f"G[{text(obj.graph)}|{nodes}|{edges}]"
    if not strict:
        return f"?{type(obj).__module__}.{type(obj).__qualname__}@{id(obj):x}"
    raise Unkeyable(f"cannot fingerprint a {type(obj).__name__}" + (" of Python objects" if isinstance(obj, np.ndarray) else ""))


#: The classes whose instances are equal exactly when they are of one class with equal
#: arguments (sympy's default ``_hashable_content``, the arguments): sums, products, powers,
#: calls of defined functions.
_BY_ARGUMENTS = (sp.Basic._hashable_content, sp.Expr._hashable_content)
#: {(class, hashable content, assumptions as given): srepr} of the other nodes written so far
#: (symbols, numbers): an exact key (Float(0.2) at two precisions, 1 and 1.0, are different keys).
_LEAF_TEXTS: dict = {}
_LEAF_TEXTS_KEPT = 1 << 17


def _sympy_text(expr: sp.Basic, strict: bool) -> str:
    """An exact text of a sympy expression, as exact as ``srepr`` and faster to write (srepr
    sorts a sum's terms for printing and dispatches its printer at every node: 2.5 s of
    ``tp.compile``'s first look at a 2-D 32 x 32 CNN).  A node of a class whose instances are
    equal exactly when their arguments are (``_BY_ARGUMENTS``) is its class's name and its
    arguments' texts, in the order sympy keeps them (a sum's and a product's canonical order,
    the same in every process); any other node (a symbol, a number, an undefined function's
    call) is its srepr, remembered by class, content and assumptions.  ``strict``: a call of
    a function class defined outside sympy and tpcompiler raises ``Unkeyable``
    (``_known_functions``)."""
    cls = type(expr)
    if expr.args and cls._hashable_content in _BY_ARGUMENTS and not isinstance(expr, AppliedUndef):
        if strict and isinstance(expr, sp.Function):
            _known_function(cls)
        return f"{cls.__name__}(" + ",".join([_sympy_text(a, strict) for a in expr.args]) + ")"
    if strict and not expr.is_Atom:
        _known_functions(expr)
    # (two symbols sympy finds equal, z positive and z positive and real, are written as they
    # were given: srepr writes a symbol's assumptions as given)
    given = getattr(expr, "_assumptions_orig", None)
    key = (cls, expr._hashable_content(), tuple(given.items()) if given else None)
    text = _LEAF_TEXTS.get(key)
    if text is None:
        text = sp.srepr(expr)
        if len(_LEAF_TEXTS) >= _LEAF_TEXTS_KEPT:
            _LEAF_TEXTS.clear()
        _LEAF_TEXTS[key] = text
    return text


def _known_functions(expr: sp.Basic) -> None:
    """Refuse (``Unkeyable``) an expression calling a function class not defined in sympy or
    tpcompiler: srepr writes only its name, and a class of that name defined differently in
    another run (a user's class; an undefined function, Function("f"), whose assumptions or
    attached implementation srepr leaves out) would read back this derivation."""
    for call in expr.atoms(sp.Function):
        _known_function(type(call))


def _known_function(cls: type) -> None:
    """``_known_functions`` of one function class."""
    module = cls.__module__
    if module is None or module.split(".")[0] not in ("sympy", "tpcompiler"):
        raise Unkeyable(f"the function {cls.__name__} is defined in {module}, outside sympy and tpcompiler")


#: Marks a part of ``graph_parts`` written by its non-strict fingerprint.
_UNKEYABLE = "unkeyable:"


def _part_digest(value, memo: dict | None = None) -> str:
    """SHA-256 of ``value``'s fingerprint; of its non-strict one, marked ``_UNKEYABLE``, if it
    holds something the strict one cannot write (``memo``: ``fingerprint``'s)."""
    try:
        return hashlib.sha256(fingerprint(value, True, memo).encode()).hexdigest()
    except Unkeyable:
        return _UNKEYABLE + hashlib.sha256(fingerprint(value, False, memo).encode()).hexdigest()


def graph_parts(graph, memo: dict | None = None) -> dict:
    """{attribute: ``_part_digest``} of a program graph but its ``BOOKKEEPING``: what
    ``tp.compile`` compares to find a program changed in place, and what ``graph_digest``
    combines.  ``memo``: ``fingerprint``'s, kept by a caller that looks at one program again."""
    return {name: _part_digest(value, memo) for name, value in sorted(vars(graph).items())
            if name not in BOOKKEEPING}


def graph_digest(graph, parts: dict | None = None) -> str | None:
    """SHA-256 of the graph's parts (``graph_parts``; ``parts`` when the caller computed them
    already), None if a part cannot be written exactly."""
    parts = graph_parts(graph) if parts is None else parts
    if any(d.startswith(_UNKEYABLE) for d in parts.values()):
        return None
    return hashlib.sha256("\n".join(f"{name}={d}" for name, d in parts.items()).encode()).hexdigest()


def derivation_key(graph, options: dict, parts: dict | None = None) -> str | None:
    """The key of a derivation of ``graph`` with ``options`` (module docstring), or None if the
    graph or the options hold something ``fingerprint`` cannot write, or the package's source
    could not be read at import.  ``parts``: the graph's ``graph_parts``, when the caller has
    them."""
    from tpcompiler import _code

    digest = graph_digest(graph, parts)
    if _code.AT_IMPORT is None or digest is None:
        return None
    try:
        text = f"{FORMAT}\n{_code.AT_IMPORT}\n{library_versions()}\n{digest}\n{fingerprint(options)}"
    except Unkeyable:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _path(key: str) -> str:
    from tpcompiler.backends.codegen import cache_dir

    return os.path.join(cache_dir("derivations"), key + ".pickle")


def is_stored(key: str | None) -> bool:
    """Whether a state is stored under ``key`` (``load`` may still refuse a damaged one); False
    when the cache cannot be used, which ``load`` and ``store`` treat as nothing stored."""
    if key is None:
        return False
    try:
        return os.path.exists(_path(key))
    except Exception:  # noqa: BLE001 - an unusable cache only means "nothing stored"
        return False


def load(key: str | None) -> dict | None:
    """The state stored under ``key``, or None: no key, nothing stored, or a file that does not
    read back whole (its SHA-256 differs from the one it carries, it does not unpickle, it
    lacks an entry): then it is derived again and overwritten."""
    if key is None:
        return None
    try:
        with open(_path(key), "rb") as fh:
            digest, _, payload = fh.read().partition(b"\n")
        if hashlib.sha256(payload).hexdigest().encode() != digest:
            return None
        state = pickle.loads(payload)
    except Exception:  # noqa: BLE001 - any damage, of any kind, only means "derive it again"
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != key \
            or not ENTRIES <= set(state):
        return None
    return state


def store(key: str | None, state: dict) -> None:
    """Store ``state`` under ``key``, atomically, the SHA-256 of its bytes first; only if the
    package's files are still the source this process imported (``tpcompiler._code``).  A
    cache that cannot be written is skipped: storing only saves time."""
    from tpcompiler import _code
    from tpcompiler.backends.codegen import atomic_write_bytes

    if key is None or _code.current() != _code.AT_IMPORT:
        return
    try:
        payload = pickle.dumps({**state, "format": FORMAT, "key": key}, protocol=pickle.HIGHEST_PROTOCOL)
        atomic_write_bytes(_path(key), hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    except Exception:  # noqa: BLE001 - an unwritable cache, an unpicklable state: not stored
        pass
