"""tpcompiler: a symbolic tensor-program compiler for infinite-width neural networks.

Pipeline (docs/DESIGN.md 3), one subpackage per stage: ``frontend`` (DSL -> program) ->
``ir`` (graph and passes) -> ``symbolic`` (Master theorem -> Z program) -> ``backends``
(finite width, exact, particles, kernels; ``expectations`` for bivariate Gaussians) ->
``printing`` (formulas); ``training`` and ``cli`` on top.  Public names follow
docs/DESIGN.md 5.
"""
from tpcompiler import _code  # first: the digest of the source this process imports (kernels/stored.py)
import sys as _sys

#: Python frames the derivations may nest.  They recurse through a program's layers, about 12
#: frames per layer of an MLP (the kernel backend's symmetry proofs), so depth 100 needs ~1,300,
#: above Python's default of 1,000.  8,000 reaches about 600 layers and stays well inside the
#: 8 MB C stack (a recursion through any(), a C call per frame, crashed the interpreter only near
#: 30,000).  Deeper still is a one-line error (tpc) or a RecursionError (Python).
RECURSION_LIMIT = 8000
if _sys.getrecursionlimit() < RECURSION_LIMIT:
    _sys.setrecursionlimit(RECURSION_LIMIT)
from tpcompiler.compiler import Compiled, compile, simulate
from tpcompiler.frontend.dsl import (
    DSLError, Mat, Program, Scalar, Vec, add, cos, erf, exp, gelu, identity, mean, nonlin, phi,
    power, relu, sigmoid, sin, softplus, step, tanh,
)
from tpcompiler.ir import nonlinearities, ops  # public modules: tp.nonlinearities.builtin, tp.ops.node_symbol
from tpcompiler.ir.graph import ProgramError
from tpcompiler.symbolic.existence import UndefinedLimit  # tp.compile's refusal of a limit that does not exist
from tpcompiler.memory import OutOfMemory  # a derivation or call stopped before the machine ran out of memory
from tpcompiler.frontend.loader import load
from tpcompiler.training.parametrization import ABC, classify, named, parse_abc
from tpcompiler.training.sgd import SGD, TrainResult, train, unroll
from tpcompiler.training.engine import StepEngine
from tpcompiler.training.fit import History, fit
from tpcompiler.training import fit as schedules  # tp.schedules.linear(...), tp.schedules.constant(...)
# plots and progress (issue 12): tp.coordcheck(...) -> tp.CoordCheck; tp.progress.configured(False) silences bars
from tpcompiler import progress
from tpcompiler.coordcheck import CoordCheck, coordcheck
# pi-networks (docs/DESIGN.md 2.10): tp.pi.init_state / check_state, the limit and the finite pi-net
from tpcompiler.training import pi
from tpcompiler.training.pi import PiLimit, PiSpec
from tpcompiler.training.pi_finite import PiFinite

# predictions from kernels (NNGP posterior, NTK ensemble): tp.predict.predict_program(...)
from tpcompiler import predict

__version__ = "0.1.0"
from tpcompiler import layers  # tp.layers.serial(...).program(input_shape): neural-tangents-style networks as programs
# The kernel backend's derivation code, read now with the rest (36 ms), so that the source
# digest taken at import (tpcompiler._code) describes it too: stored derivations are keyed by it.
from tpcompiler.backends.kernels import kernel as _kernel, limit as _limit, tiled as _tiled  # noqa: F401
