"""Gaussian expectations E[phi(u) psi(v)], (u, v) ~ N(0, [[k11, k12], [k12, k22]]), and E[phi(u)]
as generated Numba code: the numeric core of the kernel backend (docs/DESIGN.md 2.7, strategy 2).

Modules, in the order data flows through them:

* ``functions``: one-variable functions (``as_lambda``) and their structure (kinks, parity,
  reflection, polynomials);
* ``closed_forms``: atoms, the closed-form rule tables and ``closed_form_pair`` /
  ``closed_form_1d`` (sympy expressions in K11, K12, K22 or K);
* ``special``: the sympy functions of closed forms (arc-cosine kernels, determinant, angle)
  with their Numba source, and ``fusable``;
* ``quadrature``: the quadrature rules as templates of generated source;
* ``probing``: the choice of rule and step by measured error, stored with the module;
* ``source``: code templates and content-addressed generated modules;
* ``builders``: ``pair_expectation`` and ``expectation``, which pick a strategy and return
  ``PairExpectation`` / ``Expectation1D`` objects.
"""
from tpcompiler.expectations.builders import Expectation1D, PairExpectation, expectation, pair_expectation
from tpcompiler.expectations.closed_forms import K, K11, K12, K22, closed_form_1d, closed_form_pair
from tpcompiler.expectations.functions import as_lambda
from tpcompiler.expectations.special import fusable

__all__ = [
    "PairExpectation",
    "Expectation1D",
    "pair_expectation",
    "expectation",
    "closed_form_pair",
    "closed_form_1d",
    "as_lambda",
    "fusable",
    "K",
    "K11",
    "K12",
    "K22",
]
