"""The ``tpc`` command line (DESIGN.md 5).  Errors are one line on stderr and a non-zero exit,
never a traceback."""
from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np

from .ir import ProgramError
from .ops import InitMat
from .loader import load, parameters, parse_params


class CommandError(Exception):
    """A user error to be reported as one line."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # exponents such as "-1/2,0,1/2" are values, not options (DESIGN.md 5: --a a1,..)
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d)[\d./,;\s]*$")

    def error(self, message):  # one line instead of usage + message
        raise CommandError(message)


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
    try:
        return np.asarray(arr, dtype=np.float64)
    except (ValueError, TypeError):
        raise CommandError(f"{what} file {path!r} does not hold numbers (dtype {arr.dtype})") from None


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
    from .compiler import compile

    print(compile(_program(args)).formulas(format=args.format), end="")
    return 0


def cmd_limit(args) -> int:
    from .compiler import compile

    X = _load_array(args.x, "--x") if args.x else None
    result = compile(_program(args, X)).limit(particles=args.particles, seed=args.seed, x=X)
    if args.json:
        print(json.dumps({k: {"value": v, "stderr": e} for k, (v, e) in result.items()}))
    else:
        for k, (v, e) in result.items():
            print(f"{k}\t{v:.10g}\t± {e:.3g}")
    return 0


def cmd_simulate(args) -> int:
    from .compiler import simulate_seeds

    X = _load_array(args.x, "--x") if args.x else None
    if args.width < 1 or args.seeds < 1:
        raise CommandError("--width and --seeds must be positive")
    runs = simulate_seeds(_program(args, X), args.width, range(args.seed, args.seed + args.seeds), x=X)
    result = {
        k: {"mean": float(v.mean()), "stderr": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")}
        for k, v in runs.items()
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, r in result.items():
            print(f"{k}\t{r['mean']:.10g}\t± {r['stderr']:.3g}")
    return 0


def cmd_check(args) -> int:
    from tqdm import tqdm

    from .check import convergence_check, format_report, plot
    from .compiler import compile

    X = _load_array(args.x, "--x") if args.x else None
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        raise CommandError(f"--widths must be comma-separated integers, got {args.widths!r}") from None
    compiled = compile(_program(args, X))
    with tqdm(total=len(widths), desc="widths", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        checks = convergence_check(compiled, widths, args.seeds, args.particles, args.seed, X, progress=lambda n: bar.update())
    print(format_report(checks))
    if args.plot:
        try:
            plot(checks, args.plot, title=compiled.name)
        except OSError as exc:
            raise CommandError(f"--plot: cannot write {args.plot!r} ({exc.strerror or exc})") from None
        print(f"plot written to {args.plot}")
    passed = all(c.passed for c in checks)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def cmd_kernels(args) -> int:
    from .compiler import compile

    X = _load_array(args.x, "--x")
    X2 = _load_array(args.x2, "--x2") if args.x2 else None
    compiled = compile(_program(args, X))
    kf = compiled.kernel_function(args.rtol)
    result = kf(X, X2)
    try:
        np.savez(args.out, **result)
    except OSError as exc:
        raise CommandError(f"--out: cannot write {args.out!r} ({exc.strerror or exc})") from None
    t = kf.last_timing
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in result.items())
          + f"; compile {kf.compile_seconds:.2f} s, run {sum(t.values()):.2f} s")
    return 0


def cmd_train(args) -> int:
    from .parametrization import named, parse_abc
    from .training import SGD, _layers, train

    X = _load_array(args.x, "--x")
    Y = _load_array(args.y, "--y")
    if X.ndim != 2:
        raise CommandError(f"--x must be an N x d array, got shape {X.shape}")
    if Y.shape[0] != X.shape[0]:
        raise CommandError(f"--y has {Y.shape[0]} rows but --x has {X.shape[0]}")
    Xe = _load_array(args.eval, "--eval") if args.eval else None
    program = _program(args, X)
    graph = program.graph
    depth = 1 + sum(1 for k in graph.g if isinstance(graph.op(k), InitMat) and graph.op(k).trainable)
    text = args.parametrization.strip()
    if "=" in text:
        abc = parse_abc(text, depth)
    else:
        abc = named(text, depth)
    _layers(graph, abc)  # checks that the program's trained tensors fit the parametrization
    if args.steps < 0 or args.lr <= 0:
        raise CommandError("--steps must be >= 0 and --lr > 0")
    sgd = SGD(X, Y, steps=args.steps, lr=args.lr, batch=args.batch, loss=args.loss, X_eval=Xe)
    result = train(program, abc, sgd, particles=args.particles, seed=args.seed)
    f_eval = result.f_eval if Xe is not None else np.zeros((args.steps + 1, 0))
    try:
        np.savez(args.out, f_train=result.f_train, f_eval=f_eval, regime=np.array(result.regime),
                 f_train_stderr=result.f_train_stderr, f_eval_stderr=result.f_eval_stderr if Xe is not None else f_eval)
    except OSError as exc:
        raise CommandError(f"--out: cannot write {args.out!r} ({exc.strerror or exc})") from None
    print(f"wrote {args.out}: regime {result.regime} ({result.method}); f_train {result.f_train.shape}, f_eval {f_eval.shape}")
    return 0


def cmd_classify(args) -> int:
    from .parametrization import classification_report

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
    p.add_argument("--particles", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_limit)

    p = sub.add_parser("simulate", help="finite-width outputs over seeds")
    _common(p)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("check", help="finite width converges to the limit (slope -1/2)")
    _common(p)
    p.add_argument("--widths", default="128,256,512,1024,2048,4096")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--particles", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="write a PNG of error against width")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("kernels", help="infinite-width NNGP and NTK matrices")
    _common(p, data=False)
    p.add_argument("--x", required=True, help="inputs X (N x d .npy)")
    p.add_argument("--x2", help="second inputs X2 (N2 x d .npy): also k(X2, X)")
    p.add_argument("--out", required=True, help="output .npz (nngp, ntk[, nngp_x2, ntk_x2])")
    p.add_argument("--rtol", type=float, default=1e-10, help="quadrature accuracy where no closed form exists")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("train", help="infinite-width SGD trajectory (feature learning or kernel regime)")
    _common(p, data=False)
    p.add_argument("--param", dest="parametrization", required=True, help='mup, ntp, sp, mfp, sp_c1 or "a=..;b=..;c=.."')
    p.add_argument("--x", required=True, help="training inputs X (N x d .npy)")
    p.add_argument("--y", required=True, help="targets Y (N or N x K .npy)")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, help="batch size (default: full batch)")
    p.add_argument("--loss", choices=["mse", "logistic", "softmax"], default="mse")
    p.add_argument("--eval", help="evaluation inputs (N_eval x d .npy)")
    p.add_argument("--particles", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .npz (f_train, f_eval, regime)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("classify", help="classify an abc-parametrization")
    p.add_argument("--depth", type=int, required=True)
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
    except (CommandError, ProgramError, ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"tpc: error: {message.splitlines()[0] if message else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tpc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, never a traceback
        print(f"tpc: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
