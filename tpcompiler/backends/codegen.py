"""Code generation shared by the Numba backends (docs/DESIGN.md 3, "backends"): a sympy printer
for scalar float64 Numba code, straight-line bodies with common subexpressions, and a
compile cache of generated modules keyed by the hash of their source.

Generated modules are written once to a content-addressed file in the cache directory
(``TPCOMPILER_CACHE_DIR`` if set, else ``~/.cache/tpcompiler``, else
``$TMPDIR/tpcompiler-$UID``) and imported from there, so numba's ``cache=True`` finds its
compiled code on the next run: a second run of the same program pays no JIT time.

The module's Python bytecode is kept next to it (``_bytecode``), so an import does not compile
megabytes of index tables again.

Several processes may share the cache: every file is written to a unique temporary file in
the same directory and renamed into place (``atomic_write``), so a reader sees either no file
or a complete one, never a partial write.  Content-addressed names make concurrent writers of
the same module write identical bytes.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import marshal
import math
import os
import sys
import tempfile
import threading
import zlib

import numpy as np
import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from tpcompiler.ir import nonlinearities as nl
from tpcompiler.ir.graph import ProgramError

_LOCK = threading.RLock()
_MODULES: dict = {}

#: Scalar helper functions generated code may call, by name -> njit source.  Backends
#: register theirs here (the arc-cosine helpers of expectations.special, for instance).
HELPER_SOURCE: dict[str, str] = {}


class NumbaPrinter(PythonCodePrinter):
    """Python source for scalar float64 Numba code: math functions, custom nonlinearities and
    generated helpers by name, rationals as float literals."""

    def __init__(self, extra_functions=()):
        funcs = {name: name for name in nl.SCALAR_SOURCE}
        funcs.update({name: name for name in HELPER_SOURCE})
        funcs.update({name: name for name in extra_functions})
        super().__init__({"fully_qualified_modules": True, "user_functions": funcs})

    def _print_not_supported(self, expr):
        """sympy's code printers raise a PrintMethodNotImplementedError (a traceback) for what
        they cannot write, such as a user's own sympy Function class (which the particles and
        finite widths evaluate through its ``_imp_``): a ProgramError that says what to do."""
        what = type(expr).__name__ if isinstance(expr, sp.Function) else sp.sstr(expr)
        raise ProgramError(f"the generated kernel code cannot evaluate {what!r} (a function sympy and tpcompiler "
                           "have no code for): write the nonlinearity with sympy's functions (sympy.tanh, sympy.exp, "
                           "...) or tpcompiler's built-ins")

    def _print_DiracDelta(self, expr):
        raise ValueError(
            "a Dirac delta (a derivative of step or relu) has no pointwise value; "
            "its expectation exists only in closed form"
        )

    def _print_Heaviside(self, expr):
        a = self._print(expr.args[0])
        return f"(1.0 if ({a}) > 0.0 else (0.0 if ({a}) < 0.0 else 0.5))"

    def _print_Integer(self, expr):
        return str(expr.p) if abs(expr.p) <= _EXACT_FLOAT_INT else _float_literal(expr)

    def _print_Rational(self, expr):
        if max(abs(expr.p), expr.q) > _EXACT_FLOAT_INT:
            return _float_literal(expr)
        return f"({expr.p}.0/{expr.q}.0)"

    def _print_Float(self, expr):
        return _literal(float(expr))


#: Integers up to this size are exact as float64 and as Numba's int64 literals; a larger one
#: (a weight of 1e20 squared, made exact by the derivation) is printed as the float nearest to
#: it, as float arithmetic on the original would have it: Numba refuses an int literal beyond
#: int64, and p.0/q.0 of huge integers is inf/inf.
_EXACT_FLOAT_INT = 2**53


def _float_literal(number: sp.Rational) -> str:
    """The float nearest to a rational, as source (+-inf, math.inf, beyond the float range:
    the kernels then refuse the non-finite result, KernelFunction.check_finite)."""
    try:
        value = float(number.p) if number.q == 1 else float(number)
    except OverflowError:
        value = math.inf if number > 0 else -math.inf
    return _literal(value)


def _literal(value: float) -> str:
    """A float as source; inf and nan as math's names (a sympy Float beyond the float range,
    w_std = 1e160 squared, printed as the bare name inf, which the generated module lacks)."""
    if math.isfinite(value):
        return repr(value)
    return "math.nan" if math.isnan(value) else ("math.inf" if value > 0 else "-math.inf")


def custom_functions_source(exprs) -> str:
    """njit definitions of the custom nonlinearities (nonlinearities.SCALAR_SOURCE) and the
    registered helpers (HELPER_SOURCE) that exprs use."""
    names = set()
    for e in exprs:
        for f in sp.sympify(e).atoms(sp.Function):
            names.add(type(f).__name__)
    custom = "".join("\n@njit(cache=True)\n" + nl.SCALAR_SOURCE[n] for n in sorted(names & set(nl.SCALAR_SOURCE)))
    helpers = "".join(HELPER_SOURCE[n] for n in sorted(names & set(HELPER_SOURCE)))
    return custom + helpers


def print_expressions(exprs, indent: str = "    ") -> tuple[list[str], list[str]]:
    """Straight-line code for ``exprs`` whose symbols are already the variables of the
    generated function (their names are used as they are)."""
    exprs = [sp.sympify(e) for e in exprs]
    helpers = {type(f).__name__ for e in exprs for f in e.atoms(sp.Function) if type(f).__name__.startswith("_e")}
    printer = NumbaPrinter(helpers)
    reps, reduced = common_subexpressions(exprs)
    return [f"{indent}{printer.doprint(s)} = {printer.doprint(e)}" for s, e in reps], [printer.doprint(e) for e in reduced]


def load_names(loaded) -> dict:
    """The local variables _v0, _v1, ... that ``print_body`` reads the loaded symbols into, in
    the order of their names."""
    return {s: sp.Symbol(f"_v{k}", real=True) for k, s in enumerate(sorted(loaded, key=lambda s: s.name))}


def common_subexpressions(exprs: list) -> tuple[list, list]:
    """sympy's cse as the printers apply it: (replacements _c0, _c1, ..., reduced exprs).

    Without cse's optional "basic" rewrites (its pre- and post-processing of signs), which
    turned a sum of a residual CNN's NTK terms into a product of them (sympy 1.14; the kernels
    were off by up to 244%, found against neural-tangents).  The common subexpressions
    themselves are found the same way either way."""
    return sp.cse(exprs, symbols=sp.numbered_symbols("_c"), optimizations=None)


def print_body(exprs, loads: dict, indent: str = "    ", assignments=()) -> tuple[list[str], list[str]]:
    """Straight-line code computing ``exprs``: returns (lines, printed results).

    ``assignments``: (symbol, expr) pairs defining intermediate values in dependency order
    (later ones may use earlier symbols); ``loads`` maps the remaining free symbols to the
    source that reads them (``"R1[i, 3]"``), each read once into a local variable.  Common
    subexpressions of everything are shared (sympy's cse) and lines are emitted in an order
    that respects every dependency."""
    assignments = [(s, sp.sympify(e)) for s, e in assignments]
    exprs = [sp.sympify(e) for e in exprs]
    defined = {s for s, _ in assignments}
    everything = [e for _, e in assignments] + exprs
    used = set().union(*(e.free_symbols for e in everything)) if everything else set()
    missing = sorted(s.name for s in used - defined if s not in loads)
    if missing:
        raise ValueError(f"generated code has no value for {missing[:5]}")
    names = load_names((used - defined) & set(loads))
    names.update({s: sp.Symbol(f"_q{k}", real=True) for k, (s, _) in enumerate(assignments)})
    lines = [f"{indent}{names[s].name} = {loads[s]}" for s in sorted(used - defined, key=lambda s: names[s].name)]
    everything = [e.xreplace(names) for e in everything]
    helpers = {type(f).__name__ for e in everything for f in e.atoms(sp.Function) if type(f).__name__.startswith("_e")}
    printer = NumbaPrinter(helpers)
    reps, reduced = common_subexpressions(everything)
    k = len(assignments)
    pending = dict(reps)
    pending.update({names[s]: e for (s, _), e in zip(assignments, reduced[:k])})
    order = [s for s, _ in reps] + [names[s] for s, _ in assignments]
    emitted: set = set()

    def emit(sym):
        if sym in emitted or sym not in pending:
            return
        emitted.add(sym)
        for dep in sorted(pending[sym].free_symbols, key=lambda s: s.name):
            emit(dep)
        lines.append(f"{indent}{printer.doprint(sym)} = {printer.doprint(pending[sym])}")

    for sym in order:
        emit(sym)
    return lines, [printer.doprint(e) for e in reduced[k:]]


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that concurrent readers (other threads or processes, even
    on other machines sharing the directory) see the old file or the complete new one: a
    uniquely named temporary file in the same directory, flushed, then ``os.replace``."""
    _atomic_write(path, text, "w")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """``atomic_write`` of bytes (a stored derivation, kernels/stored.py)."""
    _atomic_write(path, data, "wb")


def _atomic_write(path: str, data, mode: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class CacheUnavailable(ProgramError):
    """TPCOMPILER_CACHE_DIR cannot hold the generated code: an error of the setup, never a
    reason to change method (the kernel backend's rule builders turn their ValueErrors into
    NotPairwise, and tpc limit's auto method then ran particles in silence)."""


def cache_dir(kind: str) -> str:
    """The cache directory for ``kind`` ("kernels", "gaussian2", "derivations"), created if needed."""
    candidates = []
    if os.environ.get("TPCOMPILER_CACHE_DIR"):
        base = os.environ["TPCOMPILER_CACHE_DIR"]
        d = os.path.join(base, kind)
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as exc:
            problem = exc.strerror or str(exc)
        else:
            if os.access(d, os.W_OK):
                return d
            problem = "not writable"
        raise CacheUnavailable(f"TPCOMPILER_CACHE_DIR={base!r}: cannot use {d!r} as the cache ({problem}); "
                               "point it to a writable directory or unset it")
    candidates.append(os.path.join(os.path.expanduser("~"), ".cache", "tpcompiler"))
    candidates.append(os.path.join(tempfile.gettempdir(), f"tpcompiler-{os.getuid()}"))
    for base in candidates:
        d = os.path.join(base, kind)
        try:
            os.makedirs(d, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError("no writable cache directory for generated code")


#: Types of the arrays ``packed_array`` writes into source: little-endian, so a module reads
#: back the same numbers on any machine.
_PACKED_TYPES = {"int64": "<i8", "float64": "<f8"}
_NATIVE_TYPES = {"<i8": np.int64, "<f8": np.float64}


def packed_array(array: np.ndarray) -> str:
    """A Python expression, for generated source, that rebuilds ``array`` (1-D, int64 or
    float64) bit for bit: ``unpacked_array`` of its little-endian bytes, zlib-compressed and
    base64-encoded in one string literal.  Python compiles one string in microseconds, where
    a list literal of a 2-D 8x8 depth-2 CNN's index tables (a million numbers) took 5 s to
    compile; the indices compress about tenfold."""
    name = np.asarray(array).dtype.name
    if name not in _PACKED_TYPES or np.ndim(array) != 1:
        raise ValueError(f"packed_array: a 1-D int64 or float64 array, not {np.ndim(array)}-D {name}")
    kind = _PACKED_TYPES[name]
    data = np.ascontiguousarray(array, dtype=kind).tobytes()
    text = base64.b64encode(zlib.compress(data, 6)).decode("ascii")
    return f"_unpacked_array({text!r}, {kind!r})"


def unpacked_array(text: str, kind: str) -> np.ndarray:
    """The array ``packed_array`` wrote (a writable native-order copy)."""
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=kind).astype(_NATIVE_TYPES[kind])


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:20]


def module_name(source: str, kind: str) -> str:
    """The importable name of a generated module (content-addressed)."""
    return f"_tpc_{kind}_{source_hash(source)}"


def load_module(source: str, kind: str):
    """Import generated ``source`` as a module from its content-addressed file (cached; a file
    whose text is not ``source``, damaged or cut short, is written again)."""
    name = module_name(source, kind)
    with _LOCK:
        mod = _MODULES.get(name)
        if mod is not None:
            return mod
        path = os.path.join(cache_dir(kind), name + ".py")
        if not _holds(path, source):
            atomic_write(path, source)
        code = _bytecode(source, path)
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        exec(code, mod.__dict__)  # what spec.loader.exec_module does, with the code object from _bytecode
        _MODULES[name] = mod
        return mod


def _holds(path: str, text: str) -> bool:
    """Whether the file ``path`` exists and holds exactly ``text``."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.read() == text
    except (OSError, UnicodeDecodeError):
        return False


def tolerate_damaged_numba_caches() -> None:
    """Make a damaged Numba cache file of tpcompiler's functions a cache miss.

    Numba's ``Cache.load_overload`` reads a function's index (.nbi) and compiled code (.nbc)
    and raises on a file that is cut short or corrupted (UnpicklingError, EOFError, LLVM's
    "bitcode parsing error"): every later run then stopped with that error until the cache
    was deleted by hand.  For functions of generated modules (``_tpc_*``) and of this package,
    the wrapper below removes the damaged index and returns None, which Numba takes as "not
    cached": it compiles the function and writes its cache files again.  Other functions'
    caches are left to Numba.  A no-op where Numba's cache has another shape."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover - numba is a dependency
        return
    original = getattr(caching.Cache, "load_overload", None)
    if original is None or getattr(original, "tolerates_damage", False):
        return

    def load_overload(self, sig, target_context):
        try:
            return original(self, sig, target_context)
        except Exception:
            module = getattr(getattr(self, "_py_func", None), "__module__", "") or ""
            index = getattr(getattr(self, "_cache_file", None), "_index_path", None)
            if index is None or not (module.startswith("_tpc_") or module.split(".")[0] == "tpcompiler"):
                raise
            try:
                os.remove(index)
            except OSError:
                pass
            return None

    load_overload.tolerates_damage = True
    caching.Cache.load_overload = load_overload


tolerate_damaged_numba_caches()


def _bytecode(source: str, path: str):
    """The code object of a generated module (``source``, stored at ``path``), compiled once and
    kept next to it as ``<module>.<python tag>.code`` (marshal data, after a line with the
    SHA-256 of what it was compiled from -- source, path, optimisation level, bytecode
    version -- and of the data), whatever
    PYTHONDONTWRITEBYTECODE says: many containers set it, and Python's compile of a CNN's
    generated module (megabytes of index tables) took 2 s at every import.  A file that does
    not match is compiled again and replaced."""
    stored = f"{path[:-3]}.{sys.implementation.cache_tag}.code"
    # what the code object depends on besides the source: the path it names (Numba's cache
    # and tracebacks find the module by it; a cache directory moved elsewhere compiles anew),
    # the optimisation level and the bytecode's magic number
    made_for = f"{path}\0{sys.flags.optimize}\0{importlib.util.MAGIC_NUMBER.hex()}\0".encode() + source.encode()
    head = hashlib.sha256(made_for).hexdigest().encode()
    try:
        with open(stored, "rb") as fh:
            found, _, data = fh.read().partition(b"\n")
        if found == head + b":" + hashlib.sha256(data).hexdigest().encode():
            return marshal.loads(data)
    except (OSError, ValueError, EOFError, TypeError):
        pass
    code = compile(source, path, "exec", dont_inherit=True)  # not this module's __future__ imports
    data = marshal.dumps(code)
    try:
        atomic_write_bytes(stored, head + b":" + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
    except OSError:
        pass  # not kept: compiled again next time
    return code
