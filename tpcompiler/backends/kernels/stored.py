"""Kernel derivations stored on disk (issue 11: compile time of programs with many positions).

A KernelFunction's derivation (pairwise engine, lowering, grouping, code generation) is a pure
function of the program graph, the options it was asked with and the code that derives it.
Its result is small: the generated module's source and the input features the calls
evaluate (``Features.runtime_state``).  It is stored under a *key*, the SHA-256 of

* the graph, every attribute of it written out exactly (``fingerprint``: sympy expressions by
  ``srepr``, floats by ``repr``, which round-trip; dicts and sets in sorted order, so the key
  does not depend on the process's hash seed),
* the options (rtol, runtime parameters, share, templates),
* the source of every module of the tpcompiler package and the versions of Python, sympy,
  numpy, scipy and numba,

so a stored derivation is read back only for the same program derived by the same code; any
change to either is another key.  The generated module itself goes through the content-
addressed module cache and Numba's own cache (codegen.load_module), so a second process that
compiles the same program pays neither the derivation nor Numba's compile.

An object the fingerprint does not know how to write exactly raises ``Unkeyable``: the
derivation is then simply not stored (never keyed by something inexact).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import sympy as sp

#: Bumped when the stored state's layout changes.
FORMAT = 1
_PACKAGE = Path(__file__).resolve().parents[2]  # the tpcompiler package directory
_code_digest: list = []


class Unkeyable(TypeError):
    """The graph holds an object ``fingerprint`` cannot write exactly."""


def code_digest() -> str:
    """SHA-256 of every .py file of the tpcompiler package (relative path and bytes, in sorted
    order) and of the versions of the libraries a derivation depends on; computed once per
    process."""
    if not _code_digest:
        import numba
        import scipy

        h = hashlib.sha256()
        for path in sorted(_PACKAGE.rglob("*.py")):
            h.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
        for version in (sys.version, sp.__version__, np.__version__, scipy.__version__, numba.__version__):
            h.update(version.encode() + b"\0")
        _code_digest.append(h.hexdigest())
    return _code_digest[0]


def fingerprint(obj) -> str:
    """An exact, process-independent text of ``obj`` (module docstring): equal texts mean equal
    objects as far as a derivation can see."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return repr(obj)
    if isinstance(obj, float):
        return f"f{obj!r}"
    if isinstance(obj, type):
        return f"type:{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, sp.Basic):
        _known_functions(obj)
        return f"S({sp.srepr(obj)})"
    if isinstance(obj, np.ndarray):
        return f"A({obj.dtype.str},{obj.shape},{hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()})"
    if isinstance(obj, (np.integer, np.floating)):
        return fingerprint(obj.item())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = ",".join(f"{f.name}={fingerprint(getattr(obj, f.name))}" for f in dataclasses.fields(obj))
        return f"{type(obj).__module__}.{type(obj).__qualname__}({fields})"
    if isinstance(obj, (list, tuple)):
        return ("L[" if isinstance(obj, list) else "T[") + ",".join(fingerprint(x) for x in obj) + "]"
    if isinstance(obj, dict):
        return "D{" + ",".join(sorted(f"{fingerprint(k)}:{fingerprint(v)}" for k, v in obj.items())) + "}"
    if isinstance(obj, (set, frozenset)):
        return "F{" + ",".join(sorted(fingerprint(x) for x in obj)) + "}"
    if isinstance(obj, nx.DiGraph):
        # node and edge order as inserted: a program's instruction order
        nodes = ",".join(f"{fingerprint(n)}:{fingerprint(d)}" for n, d in obj.nodes(data=True))
        edges = ",".join(f"{fingerprint(a)}>{fingerprint(b)}:{fingerprint(d)}" for a, b, d in obj.edges(data=True))
        return f"G[{nodes}|{edges}]"
    raise Unkeyable(f"cannot fingerprint a {type(obj).__name__}")


def _known_functions(expr: sp.Basic) -> None:
    """Refuse (``Unkeyable``) an expression calling a function class defined outside sympy and
    tpcompiler: srepr writes only its name, and a class of that name defined differently in
    another run would read back this derivation (sympy's undefined functions, f = Function("f"),
    have no definition to differ)."""
    for call in expr.atoms(sp.Function):
        module = type(call).__module__
        if module is not None and module.split(".")[0] not in ("sympy", "tpcompiler"):
            raise Unkeyable(f"the function {type(call).__name__} is defined in {module}, outside sympy and tpcompiler")


def graph_fingerprint(graph) -> str:
    """``fingerprint`` of every attribute of a program graph, by name."""
    return "Graph{" + ",".join(f"{name}={fingerprint(value)}" for name, value in sorted(vars(graph).items())) + "}"


def derivation_key(graph, options: dict) -> str | None:
    """The key of a derivation of ``graph`` with ``options`` (module docstring), or None if the
    graph holds something ``fingerprint`` cannot write."""
    try:
        text = f"{FORMAT}\n{code_digest()}\n{graph_fingerprint(graph)}\n{fingerprint(options)}"
    except Unkeyable:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _path(key: str) -> str:
    from tpcompiler.backends.codegen import cache_dir

    return os.path.join(cache_dir("derivations"), key + ".pickle")


def load(key: str | None) -> dict | None:
    """The state stored under ``key``, or None (no key, nothing stored, or a file that does not
    read back: then it is derived again and overwritten)."""
    if key is None:
        return None
    try:
        with open(_path(key), "rb") as fh:
            state = pickle.load(fh)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, TypeError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != key:
        return None
    return state


def store(key: str | None, state: dict) -> None:
    """Store ``state`` under ``key`` (atomically; a cache that cannot be written is skipped:
    storing only saves time)."""
    if key is None:
        return
    from tpcompiler.backends.codegen import atomic_write_bytes

    try:
        atomic_write_bytes(_path(key), pickle.dumps({**state, "format": FORMAT, "key": key}, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        pass
