"""scikit-learn interface to the infinite-width kernels of any program (docs/DESIGN.md 2.3).

* ``NNGP(program, **params)`` and ``NTK(program, **params)``: kernels for
  ``sklearn.gaussian_process`` (subclasses of ``sklearn.gaussian_process.kernels.Kernel``:
  they combine with ``WhiteKernel``, ``ConstantKernel``, sums and products, and work in
  ``GaussianProcessRegressor`` and pipelines).  ``program`` is a program file path, a
  ``build`` function, or a ``tp.Program`` (fixed: no parameters); ``params`` are its build()
  parameters (``d`` is filled from the data).  Every build() parameter whose value is a positive
  float (``w_std``, ``b_std`` of programs/mlp.py when given) is a hyperparameter, optimised in
  log-space within ``<name>_bounds`` (default (1e-2, 1e2); ``"fixed"`` to hold it).
  ``eval_gradient=True`` returns dK/dlog(theta) by central finite differences in log-space
  (step h = 1e-4: relative truncation error h^2 p^2 / 6 where K grows like a^p in the
  hyperparameter a: 3e-8 for w_std of a depth-1 relu net, 8e-7 at depth 10, p = 2(L+1);
  plus the kernel's quadrature error rtol / 1e-4 where no closed form exists).  A hyperparameter that only sets Params of the
  program (``_followers``: found by building it once more at a moved value) is a runtime
  argument of one compiled kernel (``kernel_function``): a new value costs a build of the
  program (milliseconds, to check its structure) and the evaluation.  Other parameters, and
  values whose build has another structure, are compiled per value (seconds), then cached.
* ``KernelTransformer(program, kernel="ntk", params=None)``: X -> k(X, X_fit), the
  precomputed kernel against the inputs it was fitted on, to put before
  ``SVC(kernel="precomputed")``, ``KernelRidge(kernel="precomputed")``, ... in a Pipeline.
* ``KernelEstimator(program, estimator=None, kernel="ntk", params=None)``: the pair in one
  estimator: fits ``estimator`` (default ``KernelRidge(kernel="precomputed")``; any estimator
  taking ``kernel="precomputed"``, e.g. ``SVC``, ``SVR``) on k(X, X) and predicts from
  k(X_new, X).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import math
import numbers
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sklearn.base import BaseEstimator, MetaEstimatorMixin, TransformerMixin, clone, is_classifier
from sklearn.gaussian_process.kernels import Hyperparameter, Kernel
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, has_fit_parameter, validate_data

from tpcompiler import validation
from tpcompiler.frontend.dsl import Program
from tpcompiler.ir import ops
from tpcompiler.ir.graph import ProgramError
from tpcompiler.memory import OutOfMemory

#: Default search interval of a hyperparameter (log-uniform in sklearn's optimizer).
DEFAULT_BOUNDS = (1e-2, 1e2)
#: Central-difference step in log-space of ``eval_gradient``.
GRADIENT_STEP = 1e-4
KINDS = ("nngp", "ntk")
DIAG_ROWS = 256  # rows per call of a kernel's diag()
_CACHE: dict = {}     # (program, params) -> compiled kernel function
_DEFAULTS: dict = {}  # program file (_identity) -> its build() defaults


# ---------------------------------------------------------------------------------------
# Programs: a file path, a build function or a fixed Program -> a compiled kernel function.
# ---------------------------------------------------------------------------------------
def _identity(program):
    """A program's key in this module's caches: a program file by its path and the SHA-256 of
    its contents (an edited file is another program: keyed by the path alone, a kernel built
    after an edit was the old program's), a build function or a Program by its id."""
    if isinstance(program, (str, Path)):
        try:
            digest = hashlib.sha256(Path(program).read_bytes()).hexdigest()
        except OSError:  # (missing: loading it says so)
            digest = None
        return (str(program), digest)
    return id(program)


def _defaults(program) -> dict:
    """{name: default} of the program's build() parameters ({} for a fixed Program)."""
    from tpcompiler.frontend.loader import parameters

    if isinstance(program, Program):
        return {}
    if isinstance(program, (str, Path)):
        key = _identity(program)
        if key not in _DEFAULTS:
            _DEFAULTS[key] = parameters(program)
        return _DEFAULTS[key]
    if callable(program):
        sig = inspect.signature(program)
        return {k: p.default for k, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    raise ProgramError(f"program: expected a program file path, a build function or a tpcompiler.Program, "
                       f"got {type(program).__name__}")


def _build(program, params: dict) -> Program:
    from tpcompiler.frontend.loader import load

    if isinstance(program, Program):
        if params:
            raise ProgramError(f"params: a tpcompiler.Program is already built, so {sorted(params)} cannot be applied; "
                               "pass its file path or build function instead")
        return program
    if isinstance(program, (str, Path)):
        return load(program, **params)
    built = program(**params)
    if not isinstance(built, Program):
        raise ProgramError(f"program: the build function returned {type(built).__name__}, not a tpcompiler.Program")
    return built


def _plain(value):
    """numpy scalars (sklearn's exp(theta)) as Python numbers, so build() sees what a user types."""
    return value.item() if isinstance(value, np.generic) else value


#: Factor by which ``_template`` moves a hyperparameter to see which Params follow it (any
#: value not special to a program: not 1, not a simple fraction).
PROBE_FACTOR = 1.2345678912345
_TEMPLATES: dict = {}  # (program, other params' values, runtime names, rtol) -> (program, _Template or None)
_ANALYSED: dict = {}   # (program, other params' values, hyperparameter names) -> (program, {name: its Params})


class _Template(NamedTuple):
    """One compilation serving every value of the runtime hyperparameters ``names``: the
    kernel evaluator with the Params ``binding`` (Param key -> build() parameter) as runtime
    arguments, and the structure every build at new values must have (``_signature``)."""

    kf: object
    names: tuple
    binding: dict
    signature: tuple
    verified: set


def _signature(graph, masked) -> tuple:
    """The graph as data (nodes in program order with op and arguments, outputs, readout,
    covariance table, input names and shape), the values of the Params ``masked`` left out:
    two builds with equal signatures differ only in those Params' values."""
    nodes = tuple((k, dataclasses.replace(graph.op(k), value=0.0) if k in masked else graph.op(k), graph.args(k))
                  for k in graph.order())
    return (nodes, tuple(graph.outputs.items()), graph.readout, tuple(sorted(graph.init_cov.items(), key=str)),
            tuple((name, tuple(decl.keys)) for name, decl in graph.inputs.items()), getattr(graph, "input_shape", None))


def _params_of(graph) -> dict:
    return {k: graph.op(k).value for k in graph.keys_of(ops.Param)}


def _followers(program, params: dict, name: str, base) -> list | None:
    """The Params of the program that carry the build() parameter ``name`` and nothing else
    changes with it, found by building once more at value * PROBE_FACTOR: every Param whose
    value moves must equal the parameter in both builds, and the graphs must be equal apart
    from those values (``_signature``).  None when ``name`` changes the structure."""
    v0 = float(params[name])
    v1 = v0 * PROBE_FACTOR
    try:
        moved = _build(program, {**params, name: v1}).graph
    except Exception:  # the build refuses the probe value: treat the parameter as structural
        return None
    p0, p1 = _params_of(base), _params_of(moved)
    if p0.keys() != p1.keys():
        return None
    keys = [k for k in p0 if p0[k] != p1[k]]
    if any(p0[k] != v0 or p1[k] != v1 for k in keys):
        return None
    if _signature(base, set(keys)) != _signature(moved, set(keys)):
        return None
    return keys


def _runtime_names(program, params: dict, names: list) -> tuple:
    """The hyperparameters among ``names`` that only set Params (``_followers``), analysed
    once per program and values of the other parameters."""
    key = (_identity(program), tuple(sorted((k, repr(v)) for k, v in params.items() if k not in names)), tuple(names))
    if key not in _ANALYSED:
        base = _build(program, params).graph
        _ANALYSED[key] = (program, {n: keys for n in names if (keys := _followers(program, params, n, base)) is not None})
    return _ANALYSED[key][1]


def _template(program, params: dict, names: list, rtol: float, get=None) -> _Template | None:
    """The compiled kernel of ``program`` at ``params`` with the hyperparameters ``names``
    as runtime arguments where they only set Params (``_runtime_names``); cached per program,
    runtime names and the values of every other parameter (so a structural hyperparameter's
    value selects its own compilation).  None when none of ``names`` can be a runtime
    argument (or the kernel backend refuses them: a Param inside a quadrature function, an
    input layer's scalar) -- the caller then compiles per value."""
    from tpcompiler.backends.kernels.kernel import KernelFunction
    from tpcompiler.backends.kernels.pairwise import NotPairwise
    from tpcompiler.compiler import run_passes

    followers = _runtime_names(program, params, names)
    runtime = tuple(n for n in names if n in followers)
    if not runtime:
        return None
    fixed = tuple(sorted((k, repr(v)) for k, v in params.items() if k not in runtime))
    key = (_identity(program), fixed, runtime, rtol, get)
    if key not in _TEMPLATES:
        base = _build(program, params).graph
        binding = {k: n for n in runtime for k in followers[n]}
        graph = run_passes(Program.from_graph(base), until="validate").graph
        try:
            kf = KernelFunction(graph, rtol=rtol, runtime=tuple(binding), cache=True, get=get)
        except OutOfMemory:
            raise  # (compiling per value would derive the same program again, and fail again)
        except (NotPairwise, ProgramError):
            template = None
        else:
            values = tuple(float(params[n]) for n in runtime)
            template = _Template(kf, runtime, binding, _signature(base, set(binding)), {values})
        _TEMPLATES[key] = (program, template)
    return _TEMPLATES[key][1]


class _Evaluator:
    """A compiled kernel bound to values of its runtime parameters: ``kf(X, X2=None)`` as
    ``KernelFunction.__call__``."""

    def __init__(self, kf, values: dict | None = None):
        self.kf = kf
        self.values = values

    def __call__(self, X, X2=None):
        return self.kf(X, X2, params=self.values)


def _full_params(program, params: dict, d: int) -> dict:
    params = {k: _plain(v) for k, v in params.items()}
    if "d" in _defaults(program) and "d" not in params:
        params["d"] = d
    return params


def _compiled_per_value(program, params: dict, rtol: float, get=None):
    """The old path: build and compile the program at exactly these values (cached)."""
    from tpcompiler.compiler import compile

    key = (_identity(program), tuple(sorted((k, repr(v)) for k, v in params.items())), rtol, get)
    if key not in _CACHE or (isinstance(program, Program) and _changed(_CACHE[key][1])):
        compiled = compile(_build(program, params), get=get)
        _CACHE[key] = (program, compiled, compiled.kernel_function(rtol))
    return _CACHE[key][2]


def _changed(compiled) -> bool:
    """Whether a Program compiled earlier changed since (``Compiled._unchanged``): a Program is
    known here by its id, and one changed in place kept its old kernels."""
    try:
        compiled._unchanged()
    except ProgramError:
        return True
    return False


def kernel_function(program, params: dict, d: int, runtime=None, verify: bool = True, rtol: float = 1e-10,
                    get=None):
    """The compiled kernel evaluator of ``program`` built with ``params`` (and ``d`` from the
    data when build() takes it): ``f(X, X2=None)`` -> {"nngp", "ntk"[, "nngp_x2", "ntk_x2"]},
    or of the one kernel ``get`` ("nngp" or "ntk"), derived and computed alone.

    ``runtime``: build() parameters to serve from one compilation (default: every positive
    float parameter, ``_is_hyperparameter``).  Those that only set Params of the program
    (``_followers``) become runtime arguments of the generated code: a new value costs one
    build of the program (milliseconds) to check that its structure is the compiled one
    (``verify``; the gradient's nearby points skip it), not a compilation.  Every other
    parameter, and a value whose build has another structure, is compiled per value."""
    from tpcompiler.backends.kernels.kernel import kernel_names

    get = kernel_names(get)
    params = _full_params(program, params, d)
    defaults = _defaults(program)
    if runtime is None:
        runtime = [k for k in params if _is_hyperparameter(k, params[k], defaults.get(k))]
    names = sorted(k for k in runtime if k in params)
    template = _template(program, params, names, rtol, get) if names and not isinstance(program, Program) else None
    if template is None:
        return _compiled_per_value(program, params, rtol, get)
    values = tuple(float(params[n]) for n in template.names)
    if verify and values not in template.verified:
        graph = _build(program, params).graph
        bound = _params_of(graph)
        if _signature(graph, set(template.binding)) != template.signature or any(
                bound[k] != float(params[n]) for k, n in template.binding.items()):
            return _compiled_per_value(program, params, rtol, get)  # this value changes the structure
        if len(template.verified) < 100_000:
            template.verified.add(values)
    return _Evaluator(template.kf, {k: float(params[n]) for k, n in template.binding.items()})


def cross_kernel(kf, A: np.ndarray, B: np.ndarray) -> dict[str, np.ndarray]:
    """{"nngp", "ntk"} (those ``kf`` computes): k(A, B) (len(A) x len(B)), ``kernel.cross``."""
    from tpcompiler.backends.kernels.kernel import cross

    return cross(kf, A, B)


def _require_same_program(program, made_from, what: str) -> None:
    """Refuse a program file that changed since ``made_from`` (its ``_identity`` then): values
    of the edited program beside values of the old one (a fitted model's kernel) would be
    neither model's."""
    if isinstance(program, (str, Path)) and _identity(program) != made_from:
        raise ProgramError(f"program: the file {str(program)!r} changed since this was {what}")


def _is_hyperparameter(name: str, value, default) -> bool:
    """A positive float-valued build() parameter (or one whose default is a float)."""
    if name == "d" or isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    floaty = isinstance(value, (float, np.floating)) or isinstance(default, float)
    return floaty and math.isfinite(float(value)) and float(value) > 0


# ---------------------------------------------------------------------------------------
# Gaussian-process kernels.
# ---------------------------------------------------------------------------------------
def _not_a_hyperparameter(name: str, value, hyper: list) -> str:
    """Why ``<name>_bounds`` is refused: name is not a hyperparameter (at ``value``)."""
    hint = ""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and value > 0:
        hint = f"; hyperparameters are the positive float parameters: give {name}={float(value)!r}"
    return (f"{name}_bounds: {name!r} is not a hyperparameter of this program (hyperparameters: "
            f"{', '.join(hyper) or 'none'}){hint}")


def _checked_bounds(name: str, bounds):
    """A hyperparameter's bounds: "fixed", or (low, high) with 0 < low < high finite (theta is
    searched in log-space: (-1, 2) gave NaN bounds, which the optimizer ran with)."""
    if isinstance(bounds, str) and bounds == "fixed":
        return bounds
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ProgramError(f"{name}_bounds: expected 'fixed' or a pair (low, high), got {bounds!r}") from None
    if not (0 < low < high < np.inf):
        raise ProgramError(f"{name}_bounds: expected 0 < low < high (finite; searched in log-space), got {bounds!r}")
    return (low, high)


class _ProgramKernel(Kernel):
    """A program's NNGP or NTK as a scikit-learn kernel (module docstring)."""

    kind = "nngp"

    def __init__(self, program, **params):
        self.program = program
        defaults = _defaults(program)
        bounds = {k: v for k, v in params.items() if k.endswith("_bounds") and k not in defaults}
        build = {k: v for k, v in params.items() if k not in bounds}
        values = {**defaults, **build}
        hyper = [k for k in dict.fromkeys([*build, *defaults]) if _is_hyperparameter(k, values[k], defaults.get(k))]
        # (bounds of a parameter that is None now, b_std without a bias, wait until it is set: a
        # kernel whose set_params(b_std=None) kept its b_std_bounds could not be cloned)
        unknown = [name for name in (k[: -len("_bounds")] for k in bounds)
                   if name not in hyper and not (name in values and values[name] is None)]
        if unknown:
            raise ProgramError(_not_a_hyperparameter(unknown[0], values.get(unknown[0]), hyper))
        # every build() parameter is a parameter of the estimator (get_params, set_params,
        # a grid search over phi), defaults included; the hyperparameters' defaults also
        # become theta.  Not d: a build()'s input dimension comes from the data (_full_params).
        for name, value in defaults.items():
            if name not in build and name != "d":
                build[name] = value
        self._names = [*build, *bounds]
        self._bound_names = list(bounds)
        self._made_from = _identity(program)
        for k, v in {**build, **bounds}.items():
            setattr(self, k, v)

    @property
    def _hyper(self) -> list[str]:
        """The hyperparameters at the parameters' current values: set_params(b_std=0.5) on a
        kernel built without a bias makes b_std one, as a new kernel (its clone, which
        GaussianProcessRegressor fits) would have it; b_std=None removes it."""
        defaults = _defaults(self.program)
        return [k for k in self._names
                if k not in self._bound_names and _is_hyperparameter(k, getattr(self, k), defaults.get(k))]

    def get_params(self, deep=True):
        return {"program": self.program, **{k: getattr(self, k) for k in self._names}}

    def set_params(self, **params):
        """scikit-learn's set_params; also takes ``<name>_bounds`` of a hyperparameter that had
        none (the default bounds until then), after the parameters given with it."""
        new_bounds = {k: v for k, v in params.items() if k.endswith("_bounds") and k not in self._names}
        super().set_params(**{k: v for k, v in params.items() if k not in new_bounds})
        if "program" in params:
            self._made_from = _identity(self.program)
        hyper = self._hyper
        for k, v in new_bounds.items():
            name = k[: -len("_bounds")]
            if name not in hyper:
                raise ProgramError(_not_a_hyperparameter(name, getattr(self, name, None), hyper))
            setattr(self, k, _checked_bounds(name, v))
            self._names.append(k)
            self._bound_names.append(k)
        return self

    def _build_params(self) -> dict:
        return {k: getattr(self, k) for k in self._names if k not in self._bound_names}

    @property
    def hyperparameters(self):
        return [Hyperparameter(name, "numeric", _checked_bounds(name, getattr(self, name + "_bounds", DEFAULT_BOUNDS)))
                for name in self._hyper]

    def _matrix(self, params: dict, X: np.ndarray, Y: np.ndarray | None, verify: bool = True) -> np.ndarray:
        # (GaussianProcessRegressor keeps a clone made at fit: its alpha_ is the old program's)
        _require_same_program(self.program, self._made_from, "made (a fitted model's copy too); make it again")
        kf = kernel_function(self.program, params, X.shape[1], runtime=self._hyper, verify=verify, get=self.kind)
        if Y is None:
            return kf(X)[self.kind]
        return cross_kernel(kf, X, Y)[self.kind]

    def __call__(self, X, Y=None, eval_gradient=False):
        X = _inputs(X, "X")
        Y = None if Y is None else _inputs(Y, "Y")
        if Y is not None and Y.shape[1] != X.shape[1]:  # (the program's d is read off X: say Y, not the kernel's X2)
            raise ValueError(f"Y: has {Y.shape[1]} columns but X has {X.shape[1]}; k(X, Y) needs inputs of one "
                             "dimension")
        if eval_gradient and Y is not None:
            raise ValueError("Gradient can only be evaluated when Y is None.")
        params = self._build_params()
        K = self._matrix(params, X, Y)
        if not eval_gradient:
            return K
        free = [h.name for h in self.hyperparameters if not h.fixed]
        grad = np.empty(K.shape + (len(free),))
        for i, name in enumerate(free):
            value = float(params[name])
            up = self._matrix({**params, name: value * math.exp(GRADIENT_STEP)}, X, None, verify=False)
            down = self._matrix({**params, name: value * math.exp(-GRADIENT_STEP)}, X, None, verify=False)
            grad[..., i] = (up - down) / (2 * GRADIENT_STEP)
        return K, grad

    def diag(self, X):
        """k(x, x) for the rows of X, from the kernels of DIAG_ROWS rows at a time (memory and
        time grow with N, not N^2: GaussianProcessRegressor.predict(return_std=True) asks it
        of every test point).  A row's k(x, x) does not depend on the other rows of its call,
        so the values are those of the diagonal of k(X)."""
        X = _inputs(X, "X")
        return np.concatenate([np.diag(self(X[s:s + DIAG_ROWS])) for s in range(0, len(X), DIAG_ROWS)]
                              or [np.empty(0)])

    def is_stationary(self):
        return False

    def __repr__(self):
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._names)
        return f"{type(self).__name__}({str(self.program) if isinstance(self.program, (str, Path)) else self.program!r}" \
               + (f", {shown})" if shown else ")")


class NNGP(_ProgramKernel):
    """The program's NNGP kernel K(x, x') (docs/DESIGN.md 2.3) for scikit-learn."""

    kind = "nngp"


class NTK(_ProgramKernel):
    """The program's NTK Theta(x, x') (docs/DESIGN.md 2.3) for scikit-learn."""

    kind = "ntk"


def _inputs(X, name: str) -> np.ndarray:
    # (validation.array refuses complex data, which np.asarray(dtype=float) cut to its real part)
    X = validation.array(X, name, finite=False, max_abs=None).astype(np.float64, copy=False)
    if X.ndim != 2:
        raise ValueError(f"{name}: expected an N x d array of inputs, got shape {X.shape}")
    return X


# ---------------------------------------------------------------------------------------
# Precomputed kernels for kernel ridge, SVMs, ...
# ---------------------------------------------------------------------------------------
def _check_kind(kernel) -> str:
    if kernel not in KINDS:
        raise ValueError(f"kernel: expected 'nngp' or 'ntk', got {kernel!r}")
    return kernel


class KernelTransformer(TransformerMixin, BaseEstimator):
    """X -> k(X, X_fit) with k the program's NNGP or NTK: the precomputed kernel that
    ``SVC(kernel="precomputed")``, ``KernelRidge(kernel="precomputed")`` and the like take
    (fit_transform gives k(X, X) for their fit, transform k(X_new, X) for predict)."""

    def __init__(self, program="programs/mlp.py", kernel="ntk", params=None):
        self.program = program
        self.kernel = kernel
        self.params = params

    def fit(self, X, y=None):
        _check_kind(self.kernel)
        self.X_fit_ = validate_data(self, X, dtype=np.float64, reset=True)
        # the program and parameters fitted with: transform computes k(X, X_fit) of these (a
        # program file edited, or the params dict changed in place, after fit made predictions
        # of neither model)
        self.program_ = _identity(self.program)
        # a Program's own copy (one changed in place after fit gave its kernel against the old fit)
        self.fitted_program_ = copy.deepcopy(self.program) if isinstance(self.program, Program) else self.program
        self.params_ = copy.deepcopy(dict(self.params or {}))
        self.kernel_ = self.kernel
        # build errors surface in fit
        kernel_function(self.fitted_program_, dict(self.params_), self.X_fit_.shape[1], get=self.kernel_)
        return self

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        _require_same_program(self.program, self.program_, "fitted; fit it again")
        kf = kernel_function(self.fitted_program_, dict(self.params_), X.shape[1], get=self.kernel_)
        return cross_kernel(kf, X, self.X_fit_)[self.kernel_]


class KernelEstimator(MetaEstimatorMixin, BaseEstimator):
    """``estimator`` (default ``KernelRidge(kernel="precomputed")``) fitted on the program's
    kernel k(X, X) and predicting from k(X_new, X): kernel ridge, SVMs, ... with the NNGP or
    NTK of any program.  A classifier when ``estimator`` is one."""

    def __init__(self, program="programs/mlp.py", estimator=None, kernel="ntk", params=None):
        self.program = program
        self.estimator = estimator
        self.kernel = kernel
        self.params = params

    def _inner(self):
        from sklearn.kernel_ridge import KernelRidge

        return KernelRidge(kernel="precomputed") if self.estimator is None else self.estimator

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        inner = self._inner().__sklearn_tags__()
        tags.estimator_type = inner.estimator_type
        tags.classifier_tags = inner.classifier_tags
        tags.regressor_tags = inner.regressor_tags
        tags.target_tags = inner.target_tags
        return tags

    def fit(self, X, y, sample_weight=None):
        """Fit the estimator on k(X, X), with ``sample_weight`` when given (then the estimator's
        fit must take it)."""
        inner = self._inner()
        if sample_weight is not None and not has_fit_parameter(inner, "sample_weight"):
            raise ValueError(f"sample_weight: {type(inner).__name__}.fit takes no sample_weight")
        self.transformer_ = KernelTransformer(self.program, self.kernel, self.params)
        K = self.transformer_.fit_transform(X)
        self.n_features_in_ = self.transformer_.n_features_in_
        weights = {} if sample_weight is None else {"sample_weight": sample_weight}
        self.estimator_ = clone(inner).fit(K, y, **weights)
        if is_classifier(self.estimator_):
            self.classes_ = self.estimator_.classes_
        return self

    def _kernel(self, X):
        check_is_fitted(self)
        return self.transformer_.transform(X)

    def predict(self, X):
        K = self._kernel(X)
        return self.estimator_.predict(K)

    @available_if(lambda self: hasattr(self._inner(), "decision_function"))
    def decision_function(self, X):
        K = self._kernel(X)
        return self.estimator_.decision_function(K)

    @available_if(lambda self: hasattr(self._inner(), "predict_proba"))
    def predict_proba(self, X):
        K = self._kernel(X)
        return self.estimator_.predict_proba(K)

    @available_if(lambda self: hasattr(self._inner(), "predict_log_proba"))
    def predict_log_proba(self, X):
        K = self._kernel(X)
        return self.estimator_.predict_log_proba(K)

    def score(self, X, y, sample_weight=None):
        K = self._kernel(X)
        return self.estimator_.score(K, y, sample_weight=sample_weight)
