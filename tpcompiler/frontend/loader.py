"""Program files (docs/DESIGN.md 5): ``programs/NAME.py`` defines ``build(**params)`` returning a
``tpcompiler.Program``.  ``load`` imports the file and calls ``build`` with checked params."""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import numbers
from pathlib import Path

from tpcompiler.frontend.dsl import Program
from tpcompiler.ir.graph import ProgramError


def parse_value(text: str):
    """A command-line value: a Python literal where possible, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_params(items) -> dict:
    """``["k=v", ...]`` -> {k: literal(v)} with a clear error for malformed items and for a key
    given twice with different values (``-p d=3 -p d=4``: which one was meant is not known)."""
    params = {}
    for item in items or ():
        if "=" not in item:
            raise ProgramError(f"parameter {item!r} must look like key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise ProgramError(f"parameter name {key!r} is not a valid name")
        value = parse_value(value.strip())
        if key in params and repr(params[key]) != repr(value):
            raise ProgramError(f"parameter {key!r} is given twice, as {params[key]!r} and as {value!r}; give it once")
        params[key] = value
    return params


def _module(path: Path):
    """The program file run as a fresh module, compiled from its source text every time.
    Python's import would read a bytecode file in ``__pycache__`` whose stamp (the source's
    modification time in whole seconds, and its size) still matched after an edit within the
    same second that kept the size, and build the old program (a sweep rewriting sigma 1.1 ->
    1.3 got the kernels of 1.1, in that process and every later one)."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"tpc_program_{path.stem}_{digest}", path)
    if spec is None or spec.loader is None:
        raise ProgramError(f"cannot import program file {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    try:
        code = compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102 - the user's program file, as importing it would run it
    except ProgramError:
        raise
    except SystemExit as exc:
        raise ProgramError(f"program file {str(path)!r} called sys.exit({exc.code!r}) while being imported; "
                           "a program file must only define build(**params)") from None
    except Exception as exc:
        raise ProgramError(f"program file {str(path)!r} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def build_function(path):
    """The ``build`` function of a program file, with clear errors."""
    if not isinstance(path, (str, Path)):
        raise ProgramError(f"program file: expected a path (str or pathlib.Path), got {path!r}")
    path = Path(path)
    if not path.exists():
        raise ProgramError(f"program file {str(path)!r} not found")
    if path.suffix != ".py":
        raise ProgramError(f"program file {str(path)!r} must be a Python file (.py)")
    build = getattr(_module(path), "build", None)
    if not callable(build):
        raise ProgramError(f"program file {str(path)!r} defines no build(**params) function")
    return build


def parameters(path) -> dict:
    """{name: default} of a program file's build parameters."""
    sig = inspect.signature(build_function(path))
    return {k: p.default for k, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _refuse_booleans_for_numbers(name: str, sig: inspect.Signature, params: dict) -> None:
    """A boolean given for a parameter whose default is a number (``-p depth=True``) is
    refused: Python counts True as the integer 1, so a program would silently build depth 1."""
    for key, value in params.items():
        declared = sig.parameters.get(key)
        default = None if declared is None else declared.default
        if isinstance(value, bool) and isinstance(default, numbers.Number) and not isinstance(default, bool):
            raise ProgramError(f"program {name}: parameter {key!r} is a number (default {default!r}), "
                               f"got the boolean {value!r}")


def load(path, **params) -> Program:
    """``build(**params)`` from the program file at ``path`` (docs/DESIGN.md 5)."""
    build = build_function(path)
    sig = inspect.signature(build)
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    known = [k for k, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in params if k not in known]
    if unknown and not accepts_any:
        raise ProgramError(
            f"program {Path(path).name} has no parameter {unknown[0]!r}; its parameters are: {', '.join(known) or '(none)'}"
        )
    _refuse_booleans_for_numbers(Path(path).name, sig, params)
    try:
        program = build(**params)
    except ProgramError:  # DSLError included: already names the instruction
        raise
    except ValueError as exc:  # the program's own checks of its parameters: already clear
        raise ProgramError(str(exc)) from exc
    except SystemExit as exc:
        raise ProgramError(f"build() in {str(path)!r} called sys.exit({exc.code!r}); it must return a tpcompiler.Program") from None
    except Exception as exc:  # a bug in the program file: one line naming the file
        raise ProgramError(f"build() in {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(program, Program):
        raise ProgramError(f"build() in {str(path)!r} returned {type(program).__name__}, not a tpcompiler.Program")
    return program
