"""tpcompiler: a symbolic tensor-program compiler for infinite-width neural networks.

Pipeline (DESIGN.md 3): DSL (``dsl``) -> graph IR (``ir``) -> symbolic Z program
(``symbolic``) -> evaluators (``interpreter`` at finite width, ``particles`` for the limit)
and renderers (``render``).  Public names follow DESIGN.md 5.
"""
from .compiler import Compiled, compile, simulate
from .dsl import (
    DSLError, Mat, Program, Scalar, Vec, cos, erf, exp, gelu, identity, mean, nonlin, phi,
    power, relu, sigmoid, sin, softplus, step, tanh,
)
from .ir import ProgramError
from .loader import load
from .parametrization import ABC, classify, named, parse_abc
from .training import SGD, TrainResult, train, unroll

__version__ = "0.1.0"
