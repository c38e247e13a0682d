"""The ``tpc`` command line (docs/DESIGN.md 5).  Errors are one line on stderr and a non-zero exit,
never a traceback."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

from tpcompiler import validation
from tpcompiler.ir.graph import ProgramError
from tpcompiler.ir.ops import InitMat
from tpcompiler.compiler import CHECK_PARTICLES, DEFAULT_PARTICLES, MAX_RTOL, MIN_RTOL
from tpcompiler.frontend.loader import load, parameters, parse_params
from tpcompiler.training.sgd import MAX_STEPS, STEPS_WHY


class CommandError(Exception):
    """A user error to be reported as one line."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # exponents such as "-1/2,0,1/2" are values, not options (docs/DESIGN.md 5: --a a1,..)
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf$|nan$)[\d./,;\seE+-]*$", re.IGNORECASE)

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
    .png to a name without an extension); refuse a directory."""
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


def _load_array(path: str, what: str) -> np.ndarray:
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
    try:
        return validation.array(arr, None)
    except validation.ArgumentError as exc:
        raise CommandError(f"{what} file {path!r} {exc}") from None


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

    X = _load_array(args.x, "--x") if args.x else None
    result = compile(_program(args, X)).limit(particles=args.particles, seed=args.seed, x=X, method=args.method)
    if args.json:
        print(json.dumps({k: {"value": v, "stderr": e} for k, (v, e) in result.items()}))
    else:
        for k, (v, e) in result.items():
            print(f"{k}\t{v:.10g}\t± {e:.3g}")
    return 0


def cmd_simulate(args) -> int:
    from tpcompiler.compiler import simulate_seeds

    X = _load_array(args.x, "--x") if args.x else None
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
    from tqdm import tqdm

    from tpcompiler.check import convergence_check, format_report, plot
    from tpcompiler.compiler import compile

    X = _load_array(args.x, "--x") if args.x else None
    try:
        widths = [validation.count(float(w) if "e" in w.lower() else int(w), None, minimum=1) for w in args.widths.split(",")]
    except (ValueError, validation.ArgumentError):
        raise CommandError(f"--widths must be comma-separated integers, got {args.widths!r} (each >= 1)") from None
    if len(set(widths)) < 2:
        raise CommandError(f"--widths: a convergence check needs at least two widths, got {args.widths!r}")
    if args.seeds < 2:
        raise CommandError(f"--seeds: a convergence check needs at least two seeds, got {args.seeds}")
    plot_path = _out_path(args.plot, "--plot", ".png") if args.plot else None
    compiled = compile(_program(args, X))
    with tqdm(total=len(widths), desc="widths", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        checks = convergence_check(compiled, widths, args.seeds, args.particles, args.seed, X, progress=lambda n: bar.update())
    print(format_report(checks))
    if plot_path:
        try:
            plot(checks, plot_path, title=compiled.name)
        except OSError as exc:
            raise CommandError(f"--plot: cannot write {plot_path!r} ({exc.strerror or exc})") from None
        print(f"plot written to {plot_path}")
    passed = all(c.passed for c in checks)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def cmd_kernels(args) -> int:
    from tpcompiler.compiler import compile

    X = _load_array(args.x, "--x")
    X2 = _load_array(args.x2, "--x2") if args.x2 else None
    for arr, what in ((X, "--x"), (X2, "--x2")):
        if arr is not None and arr.ndim != 2:
            raise CommandError(f"{what} must be an N x d array, got shape {arr.shape}")
    out = _out_path(args.out)
    compiled = compile(_program(args, X))
    kf = compiled.kernel_function(args.rtol)
    result = kf(X, X2)  # refuses non-finite kernels itself (KernelFunction._check_finite)
    try:
        np.savez(out, **result)
    except OSError as exc:
        raise CommandError(f"--out: cannot write {out!r} ({exc.strerror or exc})") from None
    t = kf.last_timing
    print(f"wrote {out}: " + ", ".join(f"{k} {v.shape}" for k, v in result.items())
          + f"; compile {kf.compile_seconds:.2f} s, run {sum(t.values()):.2f} s")
    return 0


def cmd_train(args) -> int:
    from tpcompiler.training.parametrization import named, parse_abc
    from tpcompiler.training.sgd import SGD, _layers, train

    X = _load_array(args.x, "--x")
    Y = _load_array(args.y, "--y")
    if X.ndim != 2:
        raise CommandError(f"--x must be an N x d array, got shape {X.shape}")
    if Y.shape[0] != X.shape[0]:
        raise CommandError(f"--y has {Y.shape[0]} rows but --x has {X.shape[0]}")
    Xe = _load_array(args.eval, "--eval") if args.eval else None
    if Xe is not None and (Xe.ndim != 2 or Xe.shape[1] != X.shape[1]):
        raise CommandError(f"--eval must be an N_eval x {X.shape[1]} array (the columns of --x), got shape {Xe.shape}")
    out = _out_path(args.out)
    if args.parametrization.strip().lower() == "pi":
        return _train_pi(args, X, Y, Xe, out)
    _refuse_pi_options(args)
    program = _program(args, X)
    graph = program.graph
    depth = 1 + sum(1 for k in graph.g if isinstance(graph.op(k), InitMat) and graph.op(k).trainable)
    text = args.parametrization.strip()
    if "=" in text:
        abc = parse_abc(text, depth)
    else:
        abc = named(text, depth)
    _layers(graph, abc)  # checks that the program's trained tensors fit the parametrization
    try:
        sgd = SGD(X, Y, steps=args.steps, lr=args.lr, batch=args.batch, loss=args.loss, X_eval=Xe,
                  weight_decay=args.weight_decay, clip=args.clip, schedule=args.schedule, lr_end=args.lr_end,
                  eval_every=args.eval_every)
        result = train(program, abc, sgd, particles=args.particles, seed=args.seed, method=args.method,
                       progress=False if args.quiet else None, resume=args.resume,
                       save_state=_out_path(args.save_state, "--save-state") if args.save_state else None)
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
    print(f"wrote {out}: regime {result.regime} ({result.method}); f_train {result.f_train.shape}, f_eval {f_eval.shape}")
    return 0


# -- tpc train --param pi (docs/DESIGN.md 2.10, issue 10) ---------------------------------------
#: tpc train options that only a pi-net takes (dest -> option)
_PI_ONLY = {"init": "--init", "lr_mult": "--lr-mult", "width": "--width"}
_LR_MULT_KEYS = ("first", "last", "bias")


def _pi_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", help="--param pi: start from this state (.npz, keys A1, A2.., B2.., Amult2.., b1..)")
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
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in mult:
            raise CommandError(f"--lr-mult: unknown entry {part!r}; give first=a,last=b,bias=c "
                               f"(keys {', '.join(_LR_MULT_KEYS)})")
        try:
            mult[key] = validation.number(float(value), None, nonnegative=True)
        except (ValueError, validation.ArgumentError):
            raise CommandError(f"--lr-mult: {key}={value.strip()!r} is not a non-negative number") from None
    return mult


def _pi_engine(args, program, mult: dict):
    """tp.PiLimit, or tp.PiFinite with --width, for the pi-net ``program`` (from --init or --seed)."""
    from tpcompiler.training.pi import PiLimit, PiSpec
    from tpcompiler.training.pi_finite import PiFinite

    try:
        spec = PiSpec.from_program(program)
    except (ValueError, TypeError) as exc:
        raise CommandError(f"--param pi: program {program.name!r} is not a pi-net ({exc}); use programs/pinet.py") from None
    if args.init is not None and not os.path.isfile(args.init):
        raise CommandError(f"--init: state file {args.init!r} not found")
    if args.loss not in ("softmax", "mse"):
        raise CommandError(f"--loss: a pi-net trains with softmax or mse, not {args.loss}")
    if args.width is not None and spec.r > args.width:
        raise CommandError(f"--width: the pi-net's rank r = {spec.r} is larger than the width {args.width}; "
                           f"a finite pi-net needs r <= width (give -p r=.. or a larger --width)")
    options = dict(state=args.init, seed=args.seed, loss=args.loss, wd=args.weight_decay, clip=args.clip, mult=mult)
    try:
        if args.width is None:
            return spec, PiLimit(spec, **options)
        return spec, PiFinite(spec, width=args.width, **options)
    except (ValueError, KeyError, OSError) as exc:  # tp.pi.check_state's one-line messages, unreadable .npz files
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CommandError(f"--init {args.init}: {text}" if args.init is not None else f"--param pi: {text}") from None


def _train_pi(args, X, Y, Xe, out) -> int:
    """tpc train --param pi: tp.fit of the pi-limit (or the width-N pi-net) with the options'
    weight decay, per-tensor clip and multipliers; writes T.npz as for every parametrization."""
    from tpcompiler.training.fit import fit, linear

    if args.resume:
        raise CommandError("--resume: a pi-net starts from --init STATE.npz (a state written by --save-state)")
    mult = _lr_mult(args.lr_mult)
    if Y.ndim == 2 and "dout" in parameters(args.program) and not any(a.split("=")[0].strip() == "dout" for a in args.param):
        args.param = args.param + [f"dout={Y.shape[1]}"]  # the outputs from the targets, as d from --x
    program = _program(args, X)
    spec, eng = _pi_engine(args, program, mult)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2 or Y.shape[1] != spec.dout:
        raise CommandError(f"--y: the pi-net has dout = {spec.dout} outputs, so targets must be N x {spec.dout}, got shape {Y.shape}")
    if args.loss == "softmax" and not (np.all((Y == 0) | (Y == 1)) and np.all(Y.sum(axis=1) == 1)):
        raise CommandError("--y: softmax targets must be one-hot rows (one 1 per row, the rest 0)")
    rate = linear(args.lr, args.lr_end, max(args.steps, 1)) if args.schedule == "linear" else args.lr
    save_state = _out_path(args.save_state, "--save-state") if args.save_state else None
    try:
        hist = fit(eng, X, Y, steps=args.steps, lr=rate, batch=args.batch, eval_every=args.eval_every, X_eval=Xe,
                   progress=False if args.quiet else None, checkpoint=save_state)
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tpc", description="tpcompiler: infinite-width limits of tensor programs")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("formulas", help="derived Z recursions of a program")
    _common(p, data=False)
    p.add_argument("--format", choices=["markdown", "latex"], default="markdown")
    p.set_defaults(func=cmd_formulas)

    p = sub.add_parser("limit", help="infinite-width limit of the outputs")
    _common(p)
    p.add_argument("--particles", type=_count(1), default=DEFAULT_PARTICLES)
    p.add_argument("--seed", type=_count(), default=0)
    p.add_argument("--method", choices=["auto", "exact", "pairwise", "particles"], default="auto",
                   help="evaluator: auto (the most exact that applies), exact (Gaussian-linear), "
                        "pairwise (bivariate Gaussian moments), particles (any program)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_limit)

    p = sub.add_parser("simulate", help="finite-width outputs over seeds")
    _common(p)
    p.add_argument("--width", type=_count(1), required=True)
    p.add_argument("--seeds", type=_count(1), default=1)
    p.add_argument("--seed", type=_count(), default=0, help="first seed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("check", help="finite width converges to the limit (slope -1/2)")
    _common(p)
    p.add_argument("--widths", default="128,256,512,1024,2048,4096")
    p.add_argument("--seeds", type=_count(1), default=20)
    p.add_argument("--particles", type=_count(1), default=CHECK_PARTICLES)
    p.add_argument("--seed", type=_count(), default=0)
    p.add_argument("--plot", help="write a PNG of error against width")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("kernels", help="infinite-width NNGP and NTK matrices")
    _common(p, data=False)
    p.add_argument("--x", required=True, help="inputs X (N x d .npy)")
    p.add_argument("--x2", help="second inputs X2 (N2 x d .npy): also k(X2, X)")
    p.add_argument("--out", required=True, help="output .npz (nngp, ntk[, nngp_x2, ntk_x2])")
    p.add_argument("--rtol", type=_real(low=MIN_RTOL, high=MAX_RTOL), default=1e-10, help="quadrature accuracy where no closed form exists")
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
    p.add_argument("--particles", type=_count(1), default=DEFAULT_PARTICLES)
    p.add_argument("--seed", type=_count(), default=0)
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
    p.add_argument("--resume", help="start from a step-engine state (.npz written by --save-state)")
    p.add_argument("--save-state", help="write the final step-engine state (.npz; --param pi: the pi-net state)")
    _pi_train_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output .npz (f_train, f_eval, regime, steps)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("classify", help="classify an abc-parametrization")
    p.add_argument("--depth", type=_count(1), required=True)
    p.add_argument("--param")
    p.add_argument("--a")
    p.add_argument("--b")
    p.add_argument("--c")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_classify)
    return parser


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            raise CommandError("give a command: " + ", ".join(sorted(parser._subparsers._group_actions[0].choices)))
        return args.func(args)
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
    except Exception as exc:  # a bug (KeyError, TypeError, ... included): one line, never a traceback
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(f"tpc: internal error: {type(exc).__name__}: {text} (a bug in tpcompiler; please report it "
              f"with the command line)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
