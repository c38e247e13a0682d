"""The ``tpc`` command line (docs/DESIGN.md 5).  Errors are one line on stderr and a non-zero exit,
never a traceback."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

import numpy as np

from tpcompiler import validation
from tpcompiler.ir.graph import ProgramError
from tpcompiler.compiler import CHECK_PARTICLES, DEFAULT_PARTICLES, MAX_RTOL, MIN_RTOL
from tpcompiler.frontend.loader import load, parameters, parse_params
from tpcompiler.ir.ntk import KERNELS
from tpcompiler.training.parametrization import MAX_DEPTH
from tpcompiler.training.sgd import MAX_STEPS, STEPS_WHY


class CommandError(Exception):
    """A user error to be reported as one line."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # exponents such as "-1/2,0,1/2" are values, not options (docs/DESIGN.md 5: --a a1,..), and
        # so is a negative memory size ("--memory -4GB": refused by its check, not "expected one argument")
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf$|nan$)[\d./,;\seE+-]*([kmgt](i?b)?|b)?$", re.IGNORECASE)

    def error(self, message):  # one line instead of usage + message
        raise CommandError(message)


def _count(minimum: int = 0, maximum: int | None = None, why: str = ""):
    """argparse type: an integer >= minimum (integral floats such as 1e6 accepted), checked by
    tpcompiler.validation like the API's counts; argparse prefixes the option name."""
    def parse(text: str) -> int:
        try:
            value = float(text) if re.fullmatch(r"\s*[-+]?[\d._]+([eE][-+]?\d+)?\s*", text) else None
            if value is not None and value.is_integer() and "." not in text and "e" not in text.lower():
                value = int(text)
            if value is None:
                raise validation.ArgumentError(f"invalid int value: {text!r}")
            return validation.count(value, None, minimum, maximum, why)
        except validation.ArgumentError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = "int"
    return parse


def _real(positive: bool = True, low: float | None = None, high: float | None = None):
    """argparse type: a finite float (> 0 by default, in [low, high] if given)."""
    def parse(text: str) -> float:
        try:
            try:
                value = float(text)
            except ValueError:
                raise validation.ArgumentError(f"invalid float value: {text!r}") from None
            value = validation.number(value, None, positive=positive)
            if (low is not None and value < low) or (high is not None and value > high):
                raise validation.ArgumentError(f"expected a number between {low:g} and {high:g}, got {value:g}")
            return value
        except validation.ArgumentError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = "float"
    return parse


def _out_path(path: str, what: str = "--out", suffix: str = ".npz") -> str:
    """The file an output really goes to (numpy appends .npz to a name without it, matplotlib
    .png to a name without an extension); refuse a directory and an empty name."""
    if not path:
        raise CommandError(f"{what}: the file name is empty; give one such as 'out{suffix}'")
    if suffix == ".npz":
        real = path if path.endswith(".npz") else path + ".npz"
    else:
        real = path if os.path.splitext(path)[1] else path + suffix
    for p in (path, real):
        if os.path.isdir(p):
            raise CommandError(f"{what}: {p!r} is a directory; give a file name such as "
                               f"{os.path.join(p, 'out' + suffix)!r}")
    parent = os.path.dirname(os.path.abspath(real))
    if not os.path.isdir(parent):
        raise CommandError(f"{what}: cannot write {real!r} (directory {parent!r} does not exist)")
    return real


def _plot_path(path: str) -> str:
    """The file a --plot goes to (.png appended to a name without a suffix), checked for its
    format (.png or .svg) and directory."""
    from tpcompiler.plotting import check_path

    real = _out_path(path, "--plot", ".png")
    try:
        return check_path(real)
    except validation.ArgumentError as exc:
        raise CommandError(f"--plot: {str(exc).partition(': ')[2]}") from None


def _write_plot(draw, path: str, *args, stream=None, **kwargs) -> None:
    """Draw a figure to ``path`` and say where it went (on ``stream``, default stdout)."""
    try:
        draw(path, *args, **kwargs)
    except OSError as exc:
        raise CommandError(f"--plot: cannot write {path!r} ({exc.strerror or exc})") from None
    print(f"plot written to {path}", file=stream or sys.stdout)


def _increasing_widths(text: str, what: str, minimum: int = 2) -> list[int]:
    """Comma-separated strictly increasing positive integers (at least ``minimum`` of them)."""
    try:
        widths = [validation.count(float(w) if "e" in w.lower() else int(w), None, minimum=1) for w in text.split(",")]
    except (ValueError, validation.ArgumentError):
        raise CommandError(f"{what} must be comma-separated positive integers, got {text!r}") from None
    if len(widths) < minimum or any(b <= a for a, b in zip(widths, widths[1:])):
        raise CommandError(f"{what} must be {'at least ' + str(minimum) + ' ' if minimum > 1 else ''}strictly increasing "
                           f"integers such as 64,128,256, got {text!r}")
    return widths


#: API argument names of tp.SGD -> the tpc train options that carry them
_TRAIN_OPTIONS = {"X": "--x", "Y": "--y", "X_eval": "--eval", "steps": "--steps", "lr": "--lr",
                  "batch": "--batch", "loss": "--loss", "particles": "--particles", "seed": "--seed",
                  "weight_decay": "--weight-decay", "clip": "--clip", "lr_end": "--lr-end", "eval_every": "--eval-every",
                  "resume": "--resume", "save_state": "--save-state"}


def _as_option(exc: validation.ArgumentError) -> CommandError:
    """An API argument error re-worded with the option name the user typed."""
    message = str(exc)
    name, sep, rest = message.partition(": ")
    return CommandError(f"{_TRAIN_OPTIONS[name]}: {rest}" if sep and name in _TRAIN_OPTIONS else message)


def _load_array(path: str, what: str, max_abs: float | None = validation.MAX_DATA_MAGNITUDE) -> np.ndarray:
    """A .npy file of numbers with 1 or 2 axes, checked (``validation.array``: finite, entries
    at most ``max_abs``); one-line errors naming the option ``what``."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except FileNotFoundError:
        raise CommandError(f"{what} file {path!r} not found") from None
    except OSError as exc:
        raise CommandError(f"{what} file {path!r} cannot be read ({exc.strerror or exc})") from None
    if magic != b"\x93NUMPY":
        raise CommandError(f"{what} file {path!r} is not a .npy array file (write one with numpy.save)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CommandError(f"{what} file {path!r} is not a readable .npy array ({exc})") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise CommandError(f"{what} file {path!r} does not hold numbers (dtype {arr.dtype})")
    if arr.ndim == 0:
        raise CommandError(f"{what} file {path!r} holds a single number (a 0-d array); give one row per example "
                           "(an N x d array, or N values)")
    if arr.ndim > 2:  # (the program's d is read from the columns: a 3-D array would set it wrong)
        columns = "K" if what == "--y" else "d"  # (targets: one column per output)
        raise CommandError(f"{what} must be an N x {columns} array, got shape {arr.shape} (one row per example: "
                           "reshape it to (N, -1))")
    try:
        return validation.array(arr, None, max_abs=max_abs)
    except validation.ArgumentError as exc:
        raise CommandError(f"{what} file {path!r} {exc}") from None


def _load_inputs(path: str, what: str = "--x") -> np.ndarray:
    """``_load_array`` of inputs, which must have one row per example: a 1-D file is refused
    (tpc limit read N values as one example of dimension N, tpc kernels refused it)."""
    X = _load_array(path, what)
    if X.ndim == 1:
        raise CommandError(f"{what} must be an N x d array (one row per example), got shape {X.shape}: save X[:, None] "
                           "for N examples of dimension 1, or X[None, :] for one example")
    return X


def _program(args, X=None):
    params = parse_params(args.param)
    if X is not None and "d" not in params and "d" in parameters(args.program):
        params["d"] = int(X.shape[1]) if X.ndim == 2 else int(X.shape[-1])
    return load(args.program, **params)


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("program", help="program file (programs/NAME.py)")
    p.add_argument("-p", dest="param", action="append", default=[], metavar="KEY=VALUE", help="build() parameter")
    if data:
        p.add_argument("--x", help="input data (N x d .npy); fills the program's input and d")


def cmd_formulas(args) -> int:
    from tpcompiler.compiler import compile

    print(compile(_program(args)).formulas(format=args.format), end="")
    return 0


def cmd_limit(args) -> int:
    from tpcompiler.compiler import compile

    X = _load_inputs(args.x) if args.x else None
    particles = DEFAULT_PARTICLES if args.particles is None else args.particles
    result = compile(_program(args, X)).limit(particles=particles, seed=args.seed or 0, x=X, method=args.method)
    unused = [opt for opt, given in (("--particles", args.particles is not None), ("--seed", args.seed is not None))
              if given]
    if unused and all(e == 0 for _, e in result.values()):  # (an exact evaluator: stderr 0)
        print(f"tpc: note: {'/'.join(unused)} not used (the limit is exact)", file=sys.stderr)
    if args.json:
        print(json.dumps({k: {"value": v, "stderr": e} for k, (v, e) in result.items()}))
    else:
        for k, (v, e) in result.items():
            print(f"{k}\t{v:.10g}\t± {e:.3g}")
    return 0


def cmd_simulate(args) -> int:
    from tpcompiler.compiler import simulate_seeds

    X = _load_inputs(args.x) if args.x else None
    runs = simulate_seeds(_program(args, X), args.width, range(args.seed, args.seed + args.seeds), x=X)
    # One seed has no spread to estimate: its stderr is null in JSON (NaN is not JSON).
    result = {
        k: {"mean": float(v.mean()), "stderr": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None}
        for k, v in runs.items()
    }
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        for k, r in result.items():
            spread = f"± {r['stderr']:.3g}" if r["stderr"] is not None else "(one seed: no stderr)"
            print(f"{k}\t{r['mean']:.10g}\t{spread}")
    return 0


def cmd_check(args) -> int:
    from tpcompiler import progress
    from tpcompiler.check import FEW_SEEDS, convergence_check, format_report, plot
    from tpcompiler.compiler import compile

    X = _load_inputs(args.x) if args.x else None
    try:
        widths = [validation.count(float(w) if "e" in w.lower() else int(w), None, minimum=1) for w in args.widths.split(",")]
    except (ValueError, validation.ArgumentError):
        raise CommandError(f"--widths must be comma-separated integers, got {args.widths!r} (each >= 1)") from None
    if len(set(widths)) < 2:
        raise CommandError(f"--widths: a convergence check needs at least two widths, got {args.widths!r}")
    if args.seeds < 2:
        raise CommandError(f"--seeds: a convergence check needs at least two seeds, got {args.seeds}")
    plot_path = _plot_path(args.plot) if args.plot else None
    compiled = compile(_program(args, X))
    with progress.bar(len(widths), "check", unit="width") as bar:
        checks = convergence_check(compiled, widths, args.seeds, args.particles, args.seed, X, progress=lambda n: bar.update())
    print(format_report(checks))
    if args.seeds < FEW_SEEDS:
        print(f"note: {args.seeds} seeds give rough standard errors, with which a correct limit often fails the "
              f"agreement test; use --seeds {FEW_SEEDS} or more for a verdict")
    if plot_path:
        try:
            plot(checks, plot_path, title=compiled.name)
        except OSError as exc:
            raise CommandError(f"--plot: cannot write {plot_path!r} ({exc.strerror or exc})") from None
        print(f"plot written to {plot_path}")
    passed = all(c.passed for c in checks)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


#: The files ``tpc kernels --out DIR/`` can write: each kernel, and with --x2 its "<name>_x2"
#: (``KernelFunction.__call__``'s names)
KERNEL_FILES = (*KERNELS, *(f"{name}_x2" for name in KERNELS))


def cmd_kernels(args) -> int:
    from tpcompiler.backends.kernels import tiled
    from tpcompiler.backends.kernels.kernel import check_kernel_program
    from tpcompiler.compiler import compile

    X = _load_inputs(args.x)  # (N x d: _load_inputs refuses any other shape)
    X2 = _load_inputs(args.x2, "--x2") if args.x2 else None
    to_files = args.out.endswith(("/", os.sep))  # DIR/: memory-mapped .npy files; DIR alone stays an error
    out = args.out if to_files else _out_path(args.out)
    plot_path = _plot_path(args.plot) if args.plot else None
    client = None
    created = tiled.first_missing_folder(out) if to_files else None  # what a run that fails removes again
    try:
        if to_files:
            tiled.output_folder(out)
        client = tiled.connect(args.scheduler) if args.scheduler is not None else None
        program = _program(args, X)
        check_kernel_program(program.graph)  # (before tp.compile: its passes can take seconds)
        compiled = compile(program, get=args.get)
        kf = compiled.kernel_function(args.rtol)
        result = tiled.kernels(kf, X, X2, memory=args.memory, out=out if to_files else None, dtype=args.dtype,
                               client=client)  # refuses non-finite kernels itself (KernelFunction.check_finite)
    except BaseException as exc:
        tiled.remove_created_folders(out, created)
        if isinstance(exc, validation.ArgumentError):
            raise _kernels_option(exc) from None
        raise
    finally:
        _close_client(client, args.scheduler)
    if to_files:
        written = ", ".join(f"{tiled.output_paths(out, [k])[k]} {v.shape}" for k, v in result.items())
        # kernel files of an earlier run into the same place, which this one did not write (--get,
        # no --x2): said, so that they are not read as this run's
        earlier = [path for name, path in tiled.output_paths(out, KERNEL_FILES).items()
                   if name not in result and os.path.isfile(path)]
        if earlier:
            written += f" (not written now, from an earlier run: {', '.join(earlier)})"
    else:
        try:
            np.savez(out, **result)
        except OSError as exc:
            raise CommandError(f"--out: cannot write {out!r} ({exc.strerror or exc})") from None
        written = f"{out}: " + ", ".join(f"{k} {v.shape}" for k, v in result.items())
    t, p = kf.last_timing, kf.last_plan
    print(f"wrote {written} ({args.dtype}); {len(p.jobs)} tile{'s' if len(p.jobs) > 1 else ''} of side {p.tile}; "
          f"compile {kf.compile_seconds:.2f} s, run {sum(t.values()):.2f} s")
    if plot_path:
        from tpcompiler.plotting import kernels_figure

        _write_plot(kernels_figure, plot_path, result, title=f"{compiled.name}: infinite-width kernels on --x")
    return 0


#: API argument names -> the options of tpc kernels that carry them
_KERNELS_OPTIONS = {"memory": "--memory", "out": "--out", "dtype": "--dtype", "scheduler": "--scheduler", "get": "--get"}


def _kernels_option(exc: validation.ArgumentError, options: dict = _KERNELS_OPTIONS) -> CommandError:
    """An error of the kernels' API (tiled.kernels; predict_program) re-worded with the option
    name the command takes for its argument (``options``; tpc kernels' by default)."""
    name, sep, rest = str(exc).partition(": ")
    return CommandError(f"{options[name]}: {rest}" if sep and name in options else str(exc))


def _close_client(client, scheduler: str | None) -> None:
    """Close a Dask client, and the local cluster that --scheduler local:K started."""
    if client is None:
        return
    cluster = client.cluster if scheduler.startswith("local:") else None
    client.close()
    if cluster is not None:
        cluster.close()


def cmd_train(args) -> int:
    from tpcompiler.training.parametrization import resolve
    from tpcompiler.training.sgd import SGD, _layers, train

    X = _load_inputs(args.x)
    Y = _load_array(args.y, "--y")
    if Y.shape[0] != X.shape[0]:
        raise CommandError(f"--y has {Y.shape[0]} rows but --x has {X.shape[0]}")
    Xe = _load_inputs(args.eval, "--eval") if args.eval else None
    if Xe is not None and (Xe.shape[1] != X.shape[1] or Xe.shape[0] == 0):
        raise CommandError(f"--eval must be an N_eval x {X.shape[1]} array (the columns of --x, N_eval >= 1), "
                           f"got shape {Xe.shape}")
    out = _out_path(args.out)
    _refuse_same_file(out, args)
    if args.lr_end and args.schedule != "linear":
        raise CommandError(f"--lr-end: only --schedule linear reads it (the schedule is {args.schedule}); give "
                           "--schedule linear or drop --lr-end")
    if args.parametrization.strip().lower() == "pi":
        if args.plot or args.widths is not None or args.seeds is not None:
            raise CommandError("--plot/--widths/--seeds: not available with --param pi (train with tp.PiLimit / tp.PiFinite "
                               "and tp.fit, and plot the History)")
        given = [opt for opt, on in (("--method", args.method != "auto"), ("--particles", args.particles is not None)) if on]
        if given:
            raise CommandError(f"{given[0]}: a pi-net's limit is exact and deterministic (tp.PiLimit); --width N trains "
                               "the finite pi-net instead")
        return _train_pi(args, X, Y, Xe, out)
    # (given in every regime, as a sweep over --param passes them; the kernel regime's limit is
    # exact, so the success line says they were not used there)
    sampling = [opt for opt, on in (("--method", args.method != "auto"), ("--particles", args.particles is not None),
                                    ("--seed", args.seed is not None)) if on]
    args.seed = 0 if args.seed is None else args.seed
    args.particles = DEFAULT_PARTICLES if args.particles is None else args.particles
    _refuse_pi_options(args)
    plot_path = _plot_path(args.plot) if args.plot else None
    widths = _increasing_widths(args.widths, "--widths", minimum=1) if args.widths is not None else []
    if widths and not plot_path:
        raise CommandError("--widths: finite widths are trained for the plot only; give --plot FILE.png too")
    if args.seeds is not None and not widths:
        raise CommandError("--seeds: the networks per finite width of the plot; give --plot FILE.png and --widths too")
    args.seeds = PLOT_SEEDS if args.seeds is None else args.seeds
    program = _program(args, X)
    graph = program.graph
    abc = resolve(args.parametrization.strip(), graph)
    _layers(graph, abc)  # checks that the program's trained tensors fit the parametrization
    state_path = _out_path(args.save_state, "--save-state") if args.save_state else None
    try:
        sgd = SGD(X, Y, steps=args.steps, lr=args.lr, batch=args.batch, loss=args.loss, X_eval=Xe,
                  weight_decay=args.weight_decay, clip=args.clip, schedule=args.schedule, lr_end=args.lr_end,
                  eval_every=args.eval_every)
        result = train(program, abc, sgd, particles=args.particles, seed=args.seed, method=args.method,
                       progress=False if args.quiet else None, resume=args.resume, save_state=state_path)
        finite = _finite_trajectories(program, abc, sgd, widths, args) if widths else []
    except validation.ArgumentError as exc:
        raise _as_option(exc) from None
    f_eval = result.f_eval if Xe is not None else np.zeros((len(result.steps), 0))
    validation.finite_results({"f_train": result.f_train, "f_eval": f_eval}, "trajectory",
                              "training diverged (float64 overflow); use a smaller --lr")
    try:
        np.savez(out, f_train=result.f_train, f_eval=f_eval, regime=np.array(result.regime), steps=result.steps,
                 f_train_stderr=result.f_train_stderr, f_eval_stderr=result.f_eval_stderr if Xe is not None else f_eval)
    except OSError as exc:
        raise CommandError(f"--out: cannot write {out!r} ({exc.strerror or exc})") from None
    unused = sampling if result.regime != "feature learning" else []
    print(f"wrote {out}: regime {result.regime} ({result.method}); f_train {result.f_train.shape}, f_eval {f_eval.shape}"
          + (f"; state {state_path}" if state_path else "")  # (the file written: numpy adds .npz to a bare name)
          + (f"; {'/'.join(unused)} not used (this regime's limit is exact)" if unused else ""))
    if plot_path:
        from tpcompiler.plotting import Trajectory, training_figure

        what = "kernel regime: mean over initializations" if result.regime == "kernel" else result.regime
        limit = Trajectory(f"limit ({what})", np.asarray(result.steps), result.f_train, result.f_train_stderr)
        _write_plot(training_figure, plot_path, Y, args.loss, [limit] + finite,
                    title=f"{program.name} under {args.parametrization.strip()}, lr {args.lr:g}")
    return 0


#: tpc train --plot --widths: finite networks per width, unless --seeds says
PLOT_SEEDS = 4


def _refuse_same_file(out: str, args) -> None:
    """--out must not be the file of --save-state (the state would be overwritten by the
    trajectories, and a later --resume refused) or of --resume / --init (the state read)."""
    for option, path in (("--save-state", args.save_state), ("--resume", args.resume), ("--init", args.init)):
        if path is None:
            continue
        real = path if option != "--save-state" or path.endswith(".npz") else path + ".npz"
        if os.path.abspath(real) == os.path.abspath(out):
            raise CommandError(f"{option} and --out are the same file {out!r}; give the trajectories (--out) and the "
                               "state files different names")


def _finite_trajectories(program, abc, sgd, widths, args):
    """Finite-width trajectories for tpc train --plot --widths (the step engine's finite method)."""
    from tpcompiler.plotting import finite_trajectories

    try:
        return finite_trajectories(program, abc, sgd, widths, seeds=args.seeds, seed=args.seed)
    except ProgramError as exc:
        raise CommandError(f"--widths: finite-width training failed: {str(exc).splitlines()[0]}") from None


def cmd_coordcheck(args) -> int:
    from tpcompiler.coordcheck import DEFAULT_BATCH, DEFAULT_PARAMS, coordcheck
    from tpcompiler.training.parametrization import NAMES

    widths = _increasing_widths(args.widths, "--widths")
    params = list(args.parametrization)
    if args.params is not None and not args.params.strip(" ,"):
        raise CommandError("--params: no names given; give comma-separated names such as mup,sp")
    for name in (args.params.split(",") if args.params else []):
        name = name.strip()
        if name.lower() not in NAMES:
            raise CommandError(f"--params: unknown parametrization {name!r}; use names from {', '.join(NAMES)} "
                               "(give exponents with --param 'a=..;b=..;c=..')")
        params.append(name)
    params = params or list(DEFAULT_PARAMS)
    plot_path = _plot_path(args.plot) if args.plot else None
    X = _load_inputs(args.x) if args.x else None
    Y = _load_array(args.y, "--y") if args.y else None
    if (X is None) != (Y is None):
        raise CommandError("--x and --y go together (or give neither for a random probe batch)")
    if X is not None and args.batch is not None:
        raise CommandError("--batch: the size of the random probe batch, which --x and --y replace; give one or the other")
    try:
        result = coordcheck(_program(args, X), params, widths, steps=args.steps, seeds=args.seeds, lr=args.lr,
                            X=X, Y=Y, loss=args.loss, batch=DEFAULT_BATCH if args.batch is None else args.batch,
                            seed=args.seed)
    except validation.ArgumentError as exc:
        message = str(exc)
        name, sep, rest = message.partition(": ")
        options = {"params": "--param", "X": "--x", "Y": "--y"}
        raise CommandError(f"{options[name]}: {rest}" if sep and name in options else message) from None
    if plot_path:  # with --json, stdout carries JSON only: the plot's path goes into it and to stderr
        _write_plot(lambda path: result.plot(path), plot_path, stream=sys.stderr if args.json else None)
    if args.json:
        print(json.dumps(dict(result.to_dict(), plot=plot_path), allow_nan=False))
    else:
        print(result.report())
    return 0


def _time_value(text: str) -> float:
    """argparse type of --time: a non-negative number or inf (the end of training)."""
    if text.strip().lower() in ("inf", "infinity"):
        return float("inf")
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number or inf, got {text!r}")
    return value


_time_value.__name__ = "time"


#: predict_program's argument -> the tpc predict option that gives it (its errors' names)
_PREDICT_OPTIONS = {"get": "--get", "X": "--x", "y": "--y", "X_test": "--xt", "t": "--time", "lr": "--lr", "reg": "--reg",
                    "rtol": "--rtol"}


def cmd_predict(args) -> int:
    from tpcompiler.predict import predict_program

    X = _load_inputs(args.x)
    Y = _load_array(args.y, "--y", max_abs=None)  # (predictions are linear in the targets: any size)
    Xt = _load_inputs(args.xt, "--xt")
    if X.shape[0] == 0:
        raise CommandError(f"--x must be an N x d array with N >= 1 training rows, got shape {X.shape}")
    if Y.ndim not in (1, 2) or Y.shape[0] != X.shape[0]:
        raise CommandError(f"--y must hold one target row per row of --x (N = {X.shape[0]}), got shape {Y.shape}")
    if Xt.shape[1] != X.shape[1]:
        raise CommandError(f"--xt must be an N_test x {X.shape[1]} array (the columns of --x), got shape {Xt.shape}")
    out = _out_path(args.out)
    Y = Y.reshape(Y.shape[0], -1)  # P.npz holds N_test x K means whatever the rank of --y
    try:
        result = predict_program(_program(args, X), X, Y, Xt, t=args.time, lr=args.lr, reg=args.reg, rtol=args.rtol,
                                 get=args.get)
    except validation.ArgumentError as exc:  # named by the option that gave the argument
        raise _kernels_option(exc, _PREDICT_OPTIONS) from None
    arrays = {}
    for kind, g in result.items():
        arrays.update({f"{kind}_mean": g.mean, f"{kind}_cov": g.cov, f"{kind}_condition": np.float64(g.condition)})
    try:
        np.savez(out, **arrays)
    except OSError as exc:
        raise CommandError(f"--out: cannot write {out!r} ({exc.strerror or exc})") from None
    print(f"wrote {out}: {_predictions_written(result)}")
    return 0


def _predictions_written(result: dict) -> str:
    """tpc predict's summary of the predictions written (every kind has the same shapes):
    "nngp_mean, ntk_mean (N_test, K), nngp_cov, ntk_cov (N_test, N_test); nngp kernel
    condition C (method); ntk kernel condition C (method)" for both, the one kind's alone."""
    shapes = next(iter(result.values()))
    return (f"{', '.join(f'{k}_mean' for k in result)} {shapes.mean.shape}, "
            f"{', '.join(f'{k}_cov' for k in result)} {shapes.cov.shape}; "
            + "; ".join(f"{k} kernel condition {g.condition:.3g} ({g.method})" for k, g in result.items()))


# -- tpc train --param pi (docs/DESIGN.md 2.10, issue 10) ---------------------------------------
#: tpc train options that only a pi-net takes (dest -> option)
_PI_ONLY = {"init": "--init", "lr_mult": "--lr-mult", "width": "--width"}
_LR_MULT_KEYS = ("first", "last", "bias")


def _pi_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", help="--param pi: start a new run (step 0) from this state (.npz: the limit's keys A1, "
                   "A2.., B2.., Amult2.., b1.., or a finite pi-net's state written by --save-state)")
    p.add_argument("--width", type=_count(1), help="--param pi: train the finite pi-net of width N instead of the limit")
    p.add_argument("--lr-mult", help="--param pi: learning-rate multipliers first=a,last=b,bias=c (default 1 each)")


def _refuse_pi_options(args) -> None:
    given = [opt for dest, opt in _PI_ONLY.items() if getattr(args, dest) is not None]
    if given:
        raise CommandError(f"{given[0]}: only a pi-net takes it (--param pi with programs/pinet.py), "
                           f"not --param {args.parametrization}")


def _lr_mult(text: str | None) -> dict:
    """"first=a,last=b,bias=c" (any subset; the others 1.0) as a dict of non-negative floats."""
    mult = dict.fromkeys(_LR_MULT_KEYS, 1.0)
    if text is None:
        return mult
    seen = set()
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in mult:
            raise CommandError(f"--lr-mult: unknown entry {part!r}; give first=a,last=b,bias=c "
                               f"(keys {', '.join(_LR_MULT_KEYS)})")
        if key in seen:
            raise CommandError(f"--lr-mult: {key} is given twice; give each of {', '.join(_LR_MULT_KEYS)} at most once")
        seen.add(key)
        try:
            mult[key] = validation.number(float(value), None, nonnegative=True)
        except (ValueError, validation.ArgumentError):
            raise CommandError(f"--lr-mult: {key}={value.strip()!r} is not a non-negative number") from None
    return mult


def _pi_engine(args, program, mult: dict):
    """tp.PiLimit, or tp.PiFinite with --width, for the pi-net ``program`` (from --init or --seed)."""
    from tpcompiler.training.pi import PiLimit, PiSpec, state_metadata
    from tpcompiler.training.pi_finite import PiFinite

    try:
        spec = PiSpec.from_program(program)
    except (ValueError, TypeError) as exc:
        raise CommandError(f"--param pi: program {program.name!r} is not a pi-net ({exc}); use programs/pinet.py") from None
    if not spec.bias and mult["bias"] != 1.0:
        raise CommandError(f"--lr-mult: bias={mult['bias']:g}, but this pi-net has no biases "
                           "(give -p alpha_bias=A with A != 0 to train biases, or drop bias= from --lr-mult)")
    for option, path in (("--init", args.init), ("--resume", args.resume)):
        if path is not None and not os.path.isfile(path):
            raise CommandError(f"{option}: {path!r} is a directory; give a state file (.npz)" if os.path.isdir(path)
                               else f"{option}: state file {path!r} not found")
    if args.loss not in ("softmax", "mse"):
        raise CommandError(f"--loss: a pi-net trains with softmax or mse, not {args.loss}")
    if args.width is not None and spec.r > args.width:
        raise CommandError(f"--width: the pi-net's rank r = {spec.r} is larger than the width {args.width}; "
                           f"a finite pi-net needs r <= width (give -p r=.. or a larger --width)")
    # the initial state is the program's (-p seed=S draws it, as in tpc limit and tpc formulas),
    # unless --seed draws another; -p seed alone used to train seed 0's state (audit)
    seed = getattr(program, "pi_seed", 0)
    if args.seed is not None:
        if "seed" in parse_params(args.param) and args.seed != seed:
            raise CommandError(f"--seed {args.seed} and -p seed={seed} disagree: the pi-net's initial state is drawn "
                               "from one seed; give one of them")
        seed = args.seed
    options = dict(loss=args.loss, wd=args.weight_decay, clip=args.clip, mult=mult)
    saved = args.resume or args.init
    meta = state_metadata(saved) if saved is not None else {}
    # (a resumed run needs the state's spec; PiFinite.load refuses another spec for --init too)
    if args.resume is not None and "_spec" in meta and meta["_spec"] != spec.to_json():
        raise CommandError(f"--resume: {saved!r} is the state of another pi-net ({meta['_spec']}; the program "
                           f"gives {spec.to_json()}); give the -p parameters of its run")
    try:
        if meta.get("_method") == "pi-finite":
            return spec, _finite_from_state(args, saved, spec, options)
        if args.resume is not None:
            if args.width is not None:
                raise CommandError(f"--width: {args.resume!r} is a pi-limit state, which has no width; drop --width to "
                                   "continue its run")
            return spec, PiLimit.load(args.resume, spec, **options)
        if args.width is None:
            return spec, PiLimit(spec, state=args.init, seed=seed, **options)
        return spec, PiFinite(spec, width=args.width, state=args.init, seed=seed, **options)
    except (ValueError, KeyError, OSError) as exc:  # tp.pi.check_state's one-line messages, unreadable .npz files
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = "--resume" if args.resume is not None else "--init" if args.init is not None else None
        raise CommandError(f"{where} {saved}: {text}" if where else f"--param pi: {text}") from None


def _finite_from_state(args, path: str, spec, options: dict):
    """tp.PiFinite from the finite pi-net's state at ``path`` (its width, seed and bases;
    --resume continues its run, --init starts a new run from its weights)."""
    from tpcompiler.training.pi_finite import PiFinite

    eng = PiFinite.load(path, spec, **options)
    if args.width is not None and args.width != eng.n:
        raise CommandError(f"--width {args.width}: {path!r} is the state of a width-{eng.n} pi-net; give --width "
                           f"{eng.n} or drop --width")
    if args.resume is None:
        eng.steps_done, eng.saved_run = 0, None  # (a new run from its weights)
    return eng


def _train_pi(args, X, Y, Xe, out) -> int:
    """tpc train --param pi: tp.fit of the pi-limit (or the width-N pi-net) with the options'
    weight decay, per-tensor clip and multipliers; writes T.npz as for every parametrization."""
    from tpcompiler.training.fit import fit, linear

    from tpcompiler.training.sgd import _check_same_run, run_settings

    if args.resume and args.init:
        raise CommandError("--resume and --init: --resume continues a saved run, --init starts a new run from a saved "
                           "state; give one")
    mult = _lr_mult(args.lr_mult)
    if Y.ndim in (1, 2) and "dout" in parameters(args.program) and "dout" not in parse_params(args.param):
        # the outputs from the targets, as d from --x (N targets: one output)
        args.param = args.param + [f"dout={Y.shape[1] if Y.ndim == 2 else 1}"]
    program = _program(args, X)
    spec, eng = _pi_engine(args, program, mult)
    run = run_settings(X, Y, batch=args.batch, schedule=args.schedule, lr=args.lr, lr_end=args.lr_end, steps=args.steps,
                       weight_decay=args.weight_decay, clip=args.clip, loss=args.loss, lr_mult=mult)
    if args.resume:
        try:
            _check_same_run(eng.saved_run, run)
        except validation.ArgumentError as exc:
            raise CommandError(f"--{exc}") from None
        if eng.steps_done >= args.steps:
            raise CommandError(f"--resume: the state has taken {eng.steps_done} steps; --steps {args.steps} counts the "
                               f"whole run (the resumed run continues to step {args.steps}), so give more than "
                               f"{eng.steps_done}")
    eng.run = run
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2 or Y.shape[1] != spec.dout:
        raise CommandError(f"--y: the pi-net has dout = {spec.dout} outputs, so targets must be N x {spec.dout}, got shape {Y.shape}")
    if args.loss == "softmax" and not (np.all((Y == 0) | (Y == 1)) and np.all(Y.sum(axis=1) == 1)):
        raise CommandError("--y: softmax targets must be one-hot rows (one 1 per row, the rest 0)")
    rate = linear(args.lr, args.lr_end, max(args.steps, 1)) if args.schedule == "linear" else args.lr
    save_state = _out_path(args.save_state, "--save-state") if args.save_state else None
    try:
        hist = fit(eng, X, Y, steps=args.steps - eng.steps_done, lr=rate, batch=args.batch, eval_every=args.eval_every,
                   X_eval=Xe, progress=False if args.quiet else None, checkpoint=save_state)
    except validation.ArgumentError as exc:
        raise _as_option(exc) from None
    f_train = np.array(hist.f_train)
    f_eval = np.array(hist.f_eval) if Xe is not None else np.zeros((len(hist.steps), 0, spec.dout))
    if spec.dout == 1:
        f_train, f_eval = f_train[..., 0], f_eval[..., 0]
    validation.finite_results({"f_train": f_train, "f_eval": f_eval}, "trajectory",
                              "training diverged (float64 overflow); use a smaller --lr or a --clip")
    try:
        np.savez(out, f_train=f_train, f_eval=f_eval, regime=np.array("feature learning"),
                 steps=np.array(hist.steps, dtype=np.int64), f_train_stderr=np.zeros_like(f_train),
                 f_eval_stderr=np.zeros_like(f_eval))
    except OSError as exc:
        raise CommandError(f"--out: cannot write {out!r} ({exc.strerror or exc})") from None
    print(f"wrote {out}: regime feature learning ({eng.method}); f_train {f_train.shape}, f_eval {f_eval.shape}"
          + (f"; state {save_state}" if save_state else ""))
    return 0


def cmd_classify(args) -> int:
    from tpcompiler.training.parametrization import classification_report

    if args.param is None and args.a is None:
        raise CommandError("give --param NAME or --a/--b/--c")
    report = classification_report(args.depth, param=args.param, a=args.a, b=args.b, c=args.c)
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k}: {v}")
    return 0


def _memory_size(text: str) -> str:
    """argparse type: a memory size such as 4GB (checked by tiled.parse_memory)."""
    from tpcompiler.backends.kernels.tiled import parse_memory

    try:
        parse_memory(text, None)
    except validation.ArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _kernels_scale_options(p: argparse.ArgumentParser) -> None:
    """tpc kernels at any data size: memory budget, storage type, Dask scheduler."""
    p.add_argument("--memory", type=_memory_size, default=None,
                   help="memory budget of the process (e.g. 4GB, 512MB, 1.5GiB; default: 4 GB beyond what it holds): "
                   "tile size; kernels that do not fit need --out DIR/")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="storage type of the kernels (computed in float64)")
    p.add_argument("--scheduler", help="run the tiles on Dask: a scheduler ADDRESS, or local:K for a local cluster "
                   "of K worker processes (needs the dask extra)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tpc", description="tpcompiler: infinite-width limits of tensor programs")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("formulas", help="derived Z recursions of a program")
    _common(p, data=False)
    p.add_argument("--format", choices=["markdown", "latex"], default="markdown")
    p.set_defaults(func=cmd_formulas)

    p = sub.add_parser("limit", help="infinite-width limit of the outputs")
    _common(p)
    p.add_argument("--particles", type=_count(1), default=None,
                   help=f"particles of the Monte-Carlo evaluator (default {DEFAULT_PARTICLES})")
    p.add_argument("--seed", type=_count(), default=None, help="seed of the Monte-Carlo evaluator (default 0)")
    p.add_argument("--method", choices=["auto", "exact", "pairwise", "particles"], default="auto",
                   help="evaluator: auto (the most exact that applies), exact (Gaussian-linear), "
                        "pairwise (bivariate Gaussian moments), particles (any program)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_limit)

    p = sub.add_parser("simulate", help="finite-width outputs over seeds")
    _common(p)
    p.add_argument("--width", type=_count(1), required=True)
    p.add_argument("--seeds", type=_count(1), default=1)
    p.add_argument("--seed", type=_count(), default=0, help="first seed")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("check", help="finite width converges to the limit (slope -1/2)")
    _common(p)
    p.add_argument("--widths", default="128,256,512,1024,2048,4096")
    p.add_argument("--seeds", type=_count(1), default=20)
    p.add_argument("--particles", type=_count(1), default=CHECK_PARTICLES)
    p.add_argument("--seed", type=_count(), default=0)
    p.add_argument("--plot", help="write a plot of error against width (PNG or SVG, by the suffix)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("kernels", help="infinite-width NNGP and NTK matrices")
    _common(p, data=False)
    p.add_argument("--x", required=True, help="inputs X (N x d .npy)")
    p.add_argument("--x2", help="second inputs X2 (N2 x d .npy): also k(X2, X)")
    p.add_argument("--out", required=True, help="output .npz (nngp, ntk[, nngp_x2, ntk_x2]); a directory with a trailing slash (DIR/): "
                   "memory-mapped DIR/nngp.npy, DIR/ntk.npy[, DIR/nngp_x2.npy, DIR/ntk_x2.npy]")
    p.add_argument("--rtol", type=_real(low=MIN_RTOL, high=MAX_RTOL), default=1e-10, help="quadrature accuracy where no closed form exists")
    p.add_argument("--get", default=None, help="nngp or ntk: that kernel alone (derived and computed alone: a pooled "
                   "CNN's NNGP compiles in less than a third of the time of both); default both")
    p.add_argument("--plot", help="also draw NNGP and NTK k(X, X) as heat maps (.png or .svg)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _kernels_scale_options(p)
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("train", help="infinite-width SGD trajectory (feature learning or kernel regime)")
    _common(p, data=False)
    p.add_argument("--param", dest="parametrization", required=True, help='mup, ntp, sp, mfp, sp_c1, "a=..;b=..;c=.." or pi (a pi-net, programs/pinet.py)')
    p.add_argument("--x", required=True, help="training inputs X (N x d .npy)")
    p.add_argument("--y", required=True, help="targets Y (N or N x K .npy)")
    p.add_argument("--lr", type=_real(), required=True)
    p.add_argument("--steps", type=_count(0, MAX_STEPS, STEPS_WHY), required=True)
    p.add_argument("--batch", type=_count(1), help="batch size (default: full batch)")
    p.add_argument("--loss", choices=["mse", "logistic", "softmax"], default="mse")
    p.add_argument("--eval", help="evaluation inputs (N_eval x d .npy)")
    p.add_argument("--particles", type=_count(1), default=None,
                   help=f"feature learning by particles: how many (default {DEFAULT_PARTICLES})")
    p.add_argument("--seed", type=_count(), default=None,
                   help="random seed (default 0; --param pi: default the program's -p seed, which draws its initial state)")
    p.add_argument("--method", choices=["auto", "exact", "particles"], default="auto",
                   help="feature learning: exact (Gaussian-linear networks) or particles; auto picks exact when it applies")
    p.add_argument("--weight-decay", "--wd", type=_real(positive=False, low=0.0, high=1e300), default=0.0,
                   help="p <- (1 - lr n^-c wd) p - lr n^-c grad (pi: A1, every Amult and the biases times (1 - lr wd))")
    p.add_argument("--clip", type=_real(), default=None,
                   help="clip the global gradient norm to this value (--param pi: each tensor's, DESIGN.md 2.10)")
    p.add_argument("--schedule", choices=["constant", "linear"], default="constant",
                   help="learning rate: constant, or linear from --lr to --lr-end over the steps")
    p.add_argument("--lr-end", type=_real(positive=False, low=0.0, high=1e300), default=0.0, help="final learning rate of --schedule linear")
    p.add_argument("--eval-every", type=_count(1), default=1, help="record f every k steps (and after the last)")
    p.add_argument("--resume", help="continue the run of a state (.npz written by --save-state: the step engine's, or "
                   "with --param pi the pi-net's) to step --steps, which counts the whole run")
    p.add_argument("--save-state", help="write the final step-engine state (.npz; --param pi: the pi-net state)")
    _pi_train_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output .npz (f_train, f_eval, regime, steps)")
    p.add_argument("--plot", help="also draw the loss and f on the training inputs against the step (.png or .svg)")
    p.add_argument("--widths", help="with --plot: also train finite networks of these widths (e.g. 256,1024)")
    p.add_argument("--seeds", type=_count(1), default=None,
                   help=f"with --plot --widths: networks per finite width (mean and stderr; default {PLOT_SEEDS})")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("coordcheck", help="mup-style coordinate check: layer sizes and their change against width")
    _common(p)
    p.add_argument("--param", dest="parametrization", action="append", default=[],
                   help='a parametrization (mup, sp, ntp, ... or "a=..;b=..;c=.."); repeatable')
    p.add_argument("--params", help="comma-separated names (default: mup,sp)")
    p.add_argument("--widths", default="64,128,256,512,1024")
    p.add_argument("--steps", type=_count(1, 100, "a coordinate check looks at the first steps"), default=3)
    p.add_argument("--seeds", type=_count(1), default=8, help="networks per width")
    p.add_argument("--lr", type=_real(), default=0.1)
    p.add_argument("--y", help="targets of --x (N x K .npy); default: a random probe batch")
    p.add_argument("--batch", type=_count(1), default=None, help="size of the random probe batch (default 4; not with --x)")
    p.add_argument("--loss", choices=["mse", "logistic", "softmax"], default="mse")
    p.add_argument("--seed", type=_count(), default=0)
    p.add_argument("--plot", help="write the figure (.png or .svg): a column per parametrization, a row per step")
    p.add_argument("--json", action="store_true", help="measurements and exponents as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_coordcheck)

    p = sub.add_parser("predict", help="NNGP posterior and NTK ensemble predictions (mean, covariance)")
    _common(p, data=False)
    p.add_argument("--x", required=True, help="training inputs X (N x d .npy)")
    p.add_argument("--y", required=True, help="training targets Y (N or N x K .npy)")
    p.add_argument("--xt", required=True, help="test inputs (N_test x d .npy)")
    p.add_argument("--time", type=_time_value, default=float("inf"), help="training time t, or inf (default)")
    p.add_argument("--lr", type=_real(), default=1.0, help="learning rate (gradient flow runs to t * lr)")
    p.add_argument("--reg", type=_real(positive=False, low=0.0, high=1e300), default=0.0,
                   help="diagonal regularizer, relative to the mean of the training kernel's diagonal")
    p.add_argument("--rtol", type=_real(low=MIN_RTOL, high=MAX_RTOL), default=1e-10, help="quadrature accuracy where no closed form exists")
    p.add_argument("--get", default=None, help="nngp or ntk: that prediction alone, from the kernels it reads "
                   "(nngp: the NNGP alone; ntk: both, its covariance reads the NNGP); default both")
    p.add_argument("--out", required=True, help="output .npz (nngp_mean, nngp_cov, nngp_condition, ntk_mean, ntk_cov, "
                   "ntk_condition; with --get, that kind's alone)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("classify", help="classify an abc-parametrization")
    p.add_argument("--depth", type=_count(1, MAX_DEPTH, "the exponents are kept per layer"), required=True)
    p.add_argument("--param")
    p.add_argument("--a")
    p.add_argument("--b")
    p.add_argument("--c")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_classify)
    return parser


#: numpy's floating-point warnings (overflow, invalid value, division by zero).  The command
#: hides them: a run that meets one ends in a non-finite value that the evaluators' finiteness
#: checks refuse in one line, and printed before it they made 3-11 lines of stderr.
_NUMPY_FLOAT_WARNINGS = r"(overflow|invalid value|divide by zero) encountered"


def main(argv=None) -> int:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NUMPY_FLOAT_WARNINGS, category=RuntimeWarning)
        warnings.showwarning = _show_warning
        return _main(argv)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line of stderr, "tpc: warning: ...", without Python's source line."""
    print(f"tpc: warning: {message}", file=sys.stderr if file is None else file)


def _main(argv=None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            raise CommandError("give a command: " + ", ".join(sorted(parser._subparsers._group_actions[0].choices)))
        if sys.stdout is None:  # started with stdout closed (>&-): Python's print would drop every line
            raise CommandError("standard output is closed; redirect it to a file or to /dev/null")
        from tpcompiler import progress

        if getattr(args, "quiet", False):
            with progress.configured(False):
                code = args.func(args)
        else:
            code = args.func(args)
        sys.stdout.flush()  # a full disk fails here, inside this handler, not at the interpreter's exit
        return code
    except BrokenPipeError:  # the reader went away (tpc ... | head): stop quietly, as other tools do
        _detach_stdout()
        return 141
    except OSError as exc:  # the machine's, not a bug: a full disk, an unwritable output
        where = f"{exc.filename}: " if exc.filename else "writing the output: "
        print(f"tpc: error: {where}{exc.strerror or exc}", file=sys.stderr)
        _detach_stdout()
        return 2
    except (CommandError, ProgramError) as exc:  # user errors: the project's error types
        message = str(exc)
        print(f"tpc: error: {message.splitlines()[0] if message else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tpc: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("tpc: error: out of memory; use a smaller --width, --particles, --steps or fewer inputs", file=sys.stderr)
        return 2
    except RecursionError:
        print(f"tpc: error: the program is too deep for the derivation, which nests more than "
              f"{sys.getrecursionlimit()} Python calls through its layers (about 600 layers of an MLP); "
              f"use fewer layers", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug (KeyError, TypeError, ... included): one line, never a traceback
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(f"tpc: internal error: {type(exc).__name__}: {text} (a bug in tpcompiler; please report it "
              f"with the command line)", file=sys.stderr)
        return 3


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what could not be
    written does not print a second error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
