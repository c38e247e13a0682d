"""Generates tests/data/nt_predict_reference.npz (+ .json) with neural-tangents' predict functions.

Run ONCE, by hand, in a scratch environment holding neural-tangents 0.6.5 and jax 0.5.3
(/work/shared/reference/README.md says how to install it):

    /work/ntvenv/bin/python tests/data/make_nt_predict_reference.py

The tests never run this script; they read the arrays it wrote.  For every case it stores
neural-tangents' own kernel matrices (train-train, test-train, test-test, NNGP and NTK) and the
outputs of ``nt.predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train,
learning_rate, diag_reg)(t, x_test, get=("nngp", "ntk"), compute_cov=True)`` -- the mean
(N_test x K) and covariance (N_test x N_test) of both the NNGP and the NTK ensemble -- at
t = None (infinite time, Cholesky path) and at finite times (eigendecomposition path), so
that tpcompiler.predict can be checked on the same matrices number for number.
"""
import json

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import neural_tangents as nt  # noqa: E402
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402

OUT = "tests/data/nt_predict_reference"


def mlp(depth, phi, w_std, b_std):
    """programs/mlp.py's network (docs/DESIGN.md 5) in neural-tangents' stax."""
    act = {"relu": stax.Relu(), "erf": stax.Erf()}[phi]
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(512, W_std=w_std, b_std=b_std), act]
    layers.append(stax.Dense(1, W_std=w_std, b_std=b_std))
    return stax.serial(*layers)


NETS = {
    "relu2": dict(depth=2, phi="relu", w_std=1.5, b_std=0.1),
    "erf1": dict(depth=1, phi="erf", w_std=1.0, b_std=None),
}
#: (name, net, learning_rate, diag_reg, times) -- times: None is NT's infinite time
CASES = [
    ("relu2_inf", "relu2", 1.0, 0.0, None),
    ("relu2_inf_reg", "relu2", 1.0, 1e-2, None),
    ("relu2_t", "relu2", 1.0, 0.0, [0.3, 3.0, 30.0]),
    ("relu2_t_lr_reg", "relu2", 0.5, 1e-3, [0.3, 3.0, 30.0]),
    ("erf1_inf", "erf1", 1.0, 1e-4, None),
    ("erf1_t", "erf1", 2.0, 0.0, [1.0, 10.0]),
]
#: predictions on the training inputs (x_test None), whose regularizer neural-tangents treats
#: as part of the training kernel (added 2026-12-07; the arrays above are unchanged)
TRAIN_CASES = [
    ("relu2_train_reg", "relu2", 1.0, 1e-2, None),
    ("relu2_train_t_reg", "relu2", 0.5, 1e-3, [0.3, 3.0, 30.0]),
    ("erf1_train_t", "erf1", 2.0, 0.0, [1.0, 10.0]),
]


def main():
    rng = np.random.default_rng(20261202)
    data = {
        "x_train": rng.standard_normal((12, 4)),
        "y_train": rng.standard_normal((12, 2)),
        "x_test": rng.standard_normal((5, 4)),
    }
    arrays = dict(data)
    meta = {"generator": "tests/data/make_nt_predict_reference.py",
            "versions": {"neural_tangents": nt.__version__, "jax": jax.__version__}, "dtype": "float64",
            "nets": NETS, "cases": {}}
    x, y, xt = (jnp.asarray(data[k]) for k in ("x_train", "y_train", "x_test"))
    for name, spec in NETS.items():
        kernel_fn = mlp(**spec)[2]
        ktt = kernel_fn(x, None, ("nngp", "ntk"))
        ktd = kernel_fn(xt, x, ("nngp", "ntk"))
        kss = kernel_fn(xt, None, ("nngp", "ntk"))
        for g in ("nngp", "ntk"):
            arrays[f"{name}__{g}_train"] = np.asarray(getattr(ktt, g))
            arrays[f"{name}__{g}_test_train"] = np.asarray(getattr(ktd, g))
            arrays[f"{name}__{g}_test"] = np.asarray(getattr(kss, g))
    for (name, net, lr, reg, times), test in [(case, xt) for case in CASES] + [(case, None) for case in TRAIN_CASES]:
        kernel_fn = mlp(**NETS[net])[2]
        predict_fn = nt.predict.gradient_descent_mse_ensemble(kernel_fn, x, y, learning_rate=lr, diag_reg=reg)
        out = predict_fn(None if times is None else jnp.asarray(times), test, ("nngp", "ntk"), compute_cov=True)
        for g in ("nngp", "ntk"):
            arrays[f"{name}__{g}_mean"] = np.asarray(getattr(out, g).mean)
            arrays[f"{name}__{g}_cov"] = np.asarray(getattr(out, g).covariance)
        meta["cases"][name] = {"net": net, "learning_rate": lr, "diag_reg": reg, "t": times,
                               "x_test": "x_test" if test is not None else None,
                               "shapes": {"mean": list(arrays[f"{name}__ntk_mean"].shape),
                                          "cov": list(arrays[f"{name}__ntk_cov"].shape)}}
    np.savez(OUT + ".npz", **arrays)
    with open(OUT + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    print("wrote", OUT + ".npz", len(arrays), "arrays")


if __name__ == "__main__":
    main()
