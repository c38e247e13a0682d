"""tp.coordcheck (mup-style coordinate check): the measured growth exponents against the
abc-parametrization theory (docs/DESIGN.md 2.4), not the picture.

Expected exponents of the change after the first SGD step (derivation in the docstring of
tpcompiler/coordcheck.py; backward vectors have coordinates n^{-(a_{L+1} + b_{L+1})}):
first layer n^{-c - 2 a_1 - (a_{L+1} + b_{L+1})}, hidden layer n^{1 - c - 2 a_l - (a_{L+1} + b_{L+1})},
output n^{1 - c - 2 a_{L+1}} at least.
  muP  (a = -1/2, 0, 1/2; b = 1/2; c = 0): 0 everywhere, at every step;
  NTP  (a = 0, 1/2, 1/2; b = 0; c = 0):    every layer -1/2, f 0;
  SP   (a = 0; b = 0, 1/2, 1/2; c = 0):    layer 1 -1/2, layer 2 +1/2, f +1 (linear network;
       with relu the mean of dx^2 adds dv . dx^2 ~ n^{3/2}: the slope lies between 1 and 3/2).
At initialization every layer is Theta(1); f_0 is n^{-1/2} under muP (docs/DESIGN.md 2.8).
Tolerances: the spread of the slopes over probe seeds 0..3 (widths 32..256, 16 networks each):
about 0.05 for relu (0.2 for f, whose two terms n and n^{3/2} mix at these widths), up to 0.18 for
the linear network.
"""
import json
from pathlib import Path

import pytest

import tpcompiler as tp

PROGRAMS = Path(__file__).resolve().parent.parent / "programs"
WIDTHS = (32, 64, 128, 256)
TOL = 0.15
LINEAR_TOL = 0.2  # the linear network's slopes spread more over probe seeds (0.1 to 0.18)


@pytest.fixture(scope="module")
def relu_check():
    net = tp.load(PROGRAMS / "mlp.py", depth=2, phi="relu", d=4)
    return tp.coordcheck(net, ["mup", "sp", "ntp"], WIDTHS, steps=2, seeds=16, lr=0.5)


def test_layers_are_the_forward_vectors_and_the_output(relu_check):
    assert relu_check.layers == ["g", "h1", "x1", "h2", "x2", "f"]
    assert relu_check.size["mup"].shape == (len(WIDTHS), 3, 6)
    assert relu_check.change["sp"].shape == (len(WIDTHS), 2, 6)


def test_mup_changes_every_layer_by_theta_1_at_every_step(relu_check):
    for step in (1, 2):
        for layer in relu_check.layers:
            assert abs(relu_check.slope("mup", layer, step)) < TOL, (layer, step)


def test_every_layer_starts_at_theta_1_and_mup_output_at_n_minus_half(relu_check):
    for label in ("mup", "sp", "ntp"):
        for layer in ["g", "h1", "x1", "h2", "x2"]:
            assert abs(relu_check.slope(label, layer, 0)) < TOL, (label, layer)
    assert abs(relu_check.slope("mup", "f", 0) + 0.5) < 0.2
    assert abs(relu_check.slope("sp", "f", 0)) < 0.2


def test_sp_with_constant_lr_blows_up_after_one_step(relu_check):
    for layer in ("g", "h1", "x1"):
        assert abs(relu_check.slope("sp", layer, 1) + 0.5) < TOL, layer
    for layer in ("h2", "x2"):
        assert abs(relu_check.slope("sp", layer, 1) - 0.5) < TOL, layer
    assert 1.0 - TOL < relu_check.slope("sp", "f", 1) < 1.5 + TOL


def test_ntp_features_move_like_n_minus_half_and_f_like_1(relu_check):
    for layer in ("g", "h1", "x1", "h2", "x2"):
        assert abs(relu_check.slope("ntp", layer, 1) + 0.5) < TOL, layer
    assert abs(relu_check.slope("ntp", "f", 1)) < TOL


def test_sp_linear_network_hidden_layers_grow_like_root_n_and_output_like_n():
    net = tp.load(PROGRAMS / "mlp.py", depth=3, phi="identity", d=4)
    check = tp.coordcheck(net, "sp", WIDTHS, steps=1, seeds=16, lr=0.5)
    assert abs(check.slope("sp", "x1", 1) + 0.5) < LINEAR_TOL
    for layer in ("x2", "x3"):
        assert abs(check.slope("sp", layer, 1) - 0.5) < LINEAR_TOL, layer
    assert abs(check.slope("sp", "f", 1) - 1.0) < LINEAR_TOL


def test_a_diverging_network_is_reported_not_fitted():
    """SP with a huge learning rate overflows at step 2: those steps have no values and no
    slope (NaN, null in JSON), and the report says where it diverged."""
    import json
    import math

    net = tp.load(PROGRAMS / "mlp.py", depth=2, phi="relu", d=3)
    check = tp.coordcheck(net, "sp", (8, 16), steps=2, seeds=1, lr=1e60)
    assert check.diverged["sp"] == {8: 2, 16: 2}
    assert math.isfinite(check.slope("sp", "h2", 1)) and math.isnan(check.slope("sp", "h2", 2))
    assert json.loads(check.to_json())["params"]["sp"]["change"]["f"]["slopes"][1] is None
    assert "width 8: diverged at step 2" in check.report()


def test_a_learning_rate_that_blows_up_every_width_is_said_to(relu_check):
    """lr = 1e6 under muP: coordinates of 1e16 and more at every width, whose slopes (the
    blow-up's own scaling) would read as a parametrization's exponents; the report says that
    the learning rate blows up even the smallest width.  The checks at lr 0.5 say nothing."""
    net = tp.load(PROGRAMS / "mlp.py", depth=2, phi="relu", d=4)
    check = tp.coordcheck(net, "mup", (16, 32), steps=1, seeds=2, lr=1e6)
    growth, step, layer = check.blown_up("mup")
    assert growth > 1e6 and step == 1
    size = check.size["mup"][0, :, check.layers.index(layer)]
    assert size[1] / size[0] == pytest.approx(growth)
    assert "width 16: " in check.report() and "the learning rate blows up even the smallest width" in check.report()
    assert json.loads(check.to_json())["params"]["mup"]["blown_up"] == {"growth": growth, "step": 1, "layer": layer}
    for label in ("mup", "sp", "ntp"):
        assert relu_check.blown_up(label) is None and "blows up" not in relu_check.report()
    # a readout that starts at 0 (var=0): its growth against the network's largest initial size
    p = tp.Program("zero_readout")
    xi = p.input("xi", 4)
    p.readout(tp.relu(p.input_layer("U", xi, sigma=1.0)), sigma=1.0, var=0.0)
    check = tp.coordcheck(p, "mup", (16, 32), steps=1, seeds=2, lr=1e12)
    assert check.size["mup"][0, 0, check.layers.index("f")] == 0.0
    assert check.blown_up("mup") is not None and check.blown_up("mup")[1] == 1


def test_a_trained_hidden_bias_moves_like_every_other_layer():
    """maml_linear's hidden bias beta is a trained vector: its change after a step is Theta(1)
    under muP and n^-1/2 under SP (theory above, a hidden layer's rule with fan-in 1).  The
    check reported 0 for it at every width: StepEngine.activations handed out the engine's own
    state array for a trained vector, which the step then updated in place (audit)."""
    net = tp.load(PROGRAMS / "maml_linear.py")
    check = tp.coordcheck(net, ["mup", "sp"], (64, 256), steps=1, seeds=8, lr=0.1, progress_bar=False)
    assert min(check.change["mup"][:, 0, check.layers.index("beta")]) > 1e-3
    assert abs(check.slope("mup", "beta", 1)) < TOL
    assert abs(check.slope("sp", "beta", 1) + 0.5) < TOL


def test_a_vector_that_does_not_move_is_reported_as_such():
    """word2vec_cbow's readout starts at 0, so its hidden vector h does not move at the first
    step: its change is exactly 0 at every width, which has no exponent.  The report printed
    "n/a" there, the mark of a diverged width (audit)."""
    check = tp.coordcheck(tp.load(PROGRAMS / "word2vec_cbow.py"), ["mup"], (32, 64), steps=1, seeds=2,
                          progress_bar=False)
    row = next(line for line in check.report().splitlines() if line.split()[:1] == ["h"])
    assert row.split() == ["h", row.split()[1], "none"] and not check.diverged["mup"]
