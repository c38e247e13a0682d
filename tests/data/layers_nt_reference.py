"""Generates tests/data/layers_nt_reference.{npz,json}: neural-tangents kernels of the networks
tests/test_layers.py ports line by line with tp.layers.  Run ONCE in a scratch environment with
neural-tangents (shared/reference/README.md: neural-tangents 0.6.5, jax 0.5.3, float64):

    /work/ntvenv/bin/python tests/data/layers_nt_reference.py

It is kept here as the note of origin of the stored values; the tests never run it.
Every case: nngp, ntk = k(x, x) and nngp_test, ntk_test = k(x_test, x) (NT's kernel_fn(x_test,
x)), NTK parametrization unless the case says standard.
"""
import json
import sys
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
import neural_tangents as nt  # noqa: E402
from neural_tangents import stax  # noqa: E402

OUT = Path(__file__).resolve().parent
W, B = 1.5, 0.1

INPUTS = {
    "x_fc": np.random.RandomState(10).randn(4, 3),
    "x_fc_test": np.random.RandomState(11).randn(2, 3),
    "x_1d": np.random.RandomState(12).randn(4, 3, 2),
    "x_1d_test": np.random.RandomState(13).randn(2, 3, 2),
    "x_2d": np.random.RandomState(14).randn(4, 2, 3, 1),
    "x_2d_test": np.random.RandomState(15).randn(2, 2, 3, 1),
}

# name -> (input, stax layers as source text); the text is evaluated here and read by the test
CASES = {
    "fc_abs": ("x_fc", "Dense(512, W, B), Abs(), Dense(1, W, B)"),
    "fc_exp": ("x_fc", "Dense(512, W, B), Exp(), Dense(1, W, B)"),
    "fc_cos": ("x_fc", "Dense(512, W, B), Cos(), Dense(1, W, B)"),
    "fc_flatten_input": ("x_1d", "Flatten(), Dense(512, W, B), Relu(), Dense(1, W, B)"),
    "fc_concat": ("x_fc", "Dense(512, W, B), FanOut(2), parallel(serial(Dense(256, W, B), Relu()), "
                          "serial(Dense(512, W, B), Erf())), FanInConcat(), Dense(512, W, B), Relu(), Dense(1, W, B)"),
    "fc_concat_readout": ("x_fc", "Dense(512, W, B), FanOut(2), parallel(Relu(), serial(Dense(256, W), Erf())), "
                                  "FanInConcat(), Dense(1, W, B)"),
    "conv1d_valid_stride_flatten": ("x_1d", "Conv(512, (3,), (2,), 'VALID', W, B), Relu(), Flatten(), Dense(1, W, B)"),
    "conv1d_same_even_gap": ("x_1d", "Conv(512, (2,), None, 'SAME', W, B), Erf(), Conv(512, (2,), None, 'SAME', W, B), "
                                     "Relu(), GlobalAvgPool(), Dense(1, W, B)"),
    "conv1d_circular_standard": ("x_1d", "Conv(512, (3,), None, 'CIRCULAR', W, B, parameterization='standard'), Relu(), "
                                         "GlobalAvgPool(), Dense(1, W, B, parameterization='standard')"),
    "conv2d_same_gap": ("x_2d", "Conv(512, (2, 2), None, 'SAME', W, B), Relu(), GlobalAvgPool(), Dense(1, W, B)"),
    "conv2d_circular_gap": ("x_2d", "Conv(512, (2, 3), None, 'CIRCULAR', W, B), Relu(), GlobalAvgPool(), Dense(1, W, B)"),
    "conv2d_valid_avgpool_flatten": ("x_2d", "Conv(512, (2, 2), None, 'VALID', W, B), Relu(), "
                                             "AvgPool((2, 2), (1, 1), 'SAME'), Flatten(), Dense(1, W, B)"),
    "conv2d_same_avgpool_normalized_flatten": ("x_2d", "Conv(512, (2, 2), None, 'SAME', W, B), Relu(), "
                                                       "AvgPool((2, 2), (1, 1), 'SAME', True), Flatten(), Dense(1, W, B)"),
    "conv2d_dense_positions": ("x_2d", "Dense(512, W, B), Relu(), Conv(512, (2, 2), (2, 2), 'SAME', W), Relu(), "
                                       "GlobalAvgPool(), Dense(1, W, B)"),
    "layernorm": ("x_fc", "Dense(512, W, B), LayerNorm(), Relu(), Dense(1, W, B)"),
    # concatenation along a spatial axis (of independent Gaussian branches, as NT requires),
    # read by a Conv across the junction; in 2-D, branches of different widths
    "conv1d_concat_spatial": ("x_1d", "Conv(512, (2,), None, 'SAME', W, B), FanOut(2), "
                                      "parallel(Conv(512, (2,), None, 'SAME', W, B), Conv(512, (3,), None, 'SAME', 1.2, B)), "
                                      "FanInConcat(axis=1), Relu(), Conv(512, (2,), None, 'SAME', W, B), Relu(), "
                                      "GlobalAvgPool(), Dense(1, W, B)"),
    "conv2d_concat_spatial": ("x_2d", "Conv(512, (2, 2), None, 'SAME', W, B), FanOut(2), "
                                      "parallel(Conv(512, (2, 2), None, 'SAME', W, B), Conv(512, (1, 2), None, 'VALID', W, B)), "
                                      "FanInConcat(axis=-2), Relu(), Flatten(), Dense(1, W, B)"),
    # neural-tangents' elementwise layers with their arguments, and its layout arguments at their
    # defaults (added 2026-12-06: an audit found them TypeErrors in tp.layers)
    "fc_relu_family": ("x_fc", "Dense(512, W, B), ABRelu(-0.3, 1.2), Dense(512, W, B), LeakyRelu(0.1, do_stabilize=True), "
                               "Dense(512, W, B, batch_axis=0, channel_axis=-1), Sign(), Dense(1, W, B)"),
    "fc_exp_family": ("x_fc", "Dense(512, W, B), Exp(0.5, 0.3), Dense(512, W, B), Gaussian(1.2, -0.5), Dense(512, W, B), "
                              "Cos(0.5, 0.3, 0.1), Dense(512, W, B), Sigmoid_like(), Dense(1, W, B)"),
    "conv1d_layout_arguments": ("x_1d", "Conv(512, (2,), None, 'SAME', W, B, dimension_numbers=('NWC', 'WIO', 'NWC')), "
                                        "Gelu(approximate=False), AvgPool((2,), (1,), 'SAME', False, 0, -1), "
                                        "Conv(512, (2,), None, 'SAME', W, B), Relu(do_stabilize=True), "
                                        "GlobalAvgPool(batch_axis=0, channel_axis=-1), "
                                        "Dense(1, W, B)"),
    "flatten_layout_arguments": ("x_1d", "Flatten(batch_axis=0, batch_axis_out=0), Dense(512, W, B), "
                                         "Abs(do_stabilize=False), Dense(1, W, B)"),
    # LayerNorm over positions and channels, and over one spatial axis and channels, of a 2-D
    # conv (added 2026-12-06: tp.layers now writes a group's mean and variance as one Moment each;
    # neural-tangents normalises Gaussian inputs only: right after a Conv)
    "conv2d_layernorm_spatial": ("x_2d", "Conv(512, (2, 2), None, 'SAME', W, B), LayerNorm(axis=(1, 2, 3)), Relu(), "
                                         "Conv(512, (2, 2), None, 'SAME', W, B), Relu(), GlobalAvgPool(), Dense(1, W, B)"),
    "conv2d_layernorm_rows": ("x_2d", "Conv(512, (2, 2), None, 'SAME', W, B), LayerNorm(axis=(2, 3)), Erf(), "
                                      "Conv(512, (2, 2), None, 'CIRCULAR', W, B), Erf(), Flatten(), Dense(1, W, B)"),
}


def main():
    scope = {k: getattr(stax, k) for k in dir(stax) if not k.startswith("_")}
    scope.update(W=W, B=B)
    arrays = dict(INPUTS)
    meta = {"generator": "tests/data/layers_nt_reference.py",
            "versions": {"neural_tangents": nt.__version__, "jax": jax.__version__, "numpy": np.__version__,
                         "python": sys.version.split()[0]},
            "dtype": "float64 (jax_enable_x64=True), CPU", "W": W, "B": B,
            "inputs": {"x_fc": "RandomState(10).randn(4, 3)", "x_fc_test": "RandomState(11).randn(2, 3)",
                       "x_1d": "RandomState(12).randn(4, 3, 2)", "x_1d_test": "RandomState(13).randn(2, 3, 2)",
                       "x_2d": "RandomState(14).randn(4, 2, 3, 1)", "x_2d_test": "RandomState(15).randn(2, 2, 3, 1)"},
            "outputs": "C__nngp, C__ntk = k(x, x); C__nngp_test, C__ntk_test = k(x_test, x)",
            "cases": {}}
    for name, (inp, text) in CASES.items():
        _, _, kernel_fn = eval(f"serial({text})", scope)
        x, xt = INPUTS[inp], INPUTS[inp + "_test"]
        k = kernel_fn(x, None, ("nngp", "ntk"))
        kt = kernel_fn(xt, x, ("nngp", "ntk"))
        arrays[f"{name}__nngp"], arrays[f"{name}__ntk"] = np.asarray(k.nngp), np.asarray(k.ntk)
        arrays[f"{name}__nngp_test"], arrays[f"{name}__ntk_test"] = np.asarray(kt.nngp), np.asarray(kt.ntk)
        meta["cases"][name] = {"input": inp, "stax": f"stax.serial({text})"}
        print(name, np.asarray(k.ntk)[0, :2])
    np.savez(OUT / "layers_nt_reference.npz", **arrays)
    (OUT / "layers_nt_reference.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
