"""TP4's few-shot model (Yang & Hu, "Feature Learning in Infinite-Width Neural Networks",
section 9 / appendix D): a linear network with one hidden layer and a hidden-layer bias,
f(x) = W2 (W1 x + alpha b), K outputs, meta-trained by first-order MAML.  ``build`` returns
the network template; ``parametrization()`` and ``engine_inputs(X)`` are the two other pieces
that make the step engine's network *exactly* TP4's.

TP4's width-n network (input x in R^d, logits f in R^K):
    h = W1 x + alpha b,      f = W2 h,
    W1 = sigma_u Omega[:, :d] / sqrt(n),  W2 = sigma_v Omega[:, d:]^T / sqrt(n),  b = 0,
with Omega ~ N(0, 1) of shape n x (d + K) (so W1, W2 independent Gaussians); every trained
tensor theta in {W1, b, W2} moves by plain SGD, theta <- theta - eta dLoss/dtheta, with no
width-dependent learning rate, and the meta-gradient is clipped to a global norm over
(W1, b, W2).  TP4's infinite-width limit is this network's n -> infinity; TP4 computes it
as the width-(d + K) network W1 = [sigma_u I_d; 0], W2 = [0, sigma_v I_K] (both are linear
in Omega, so every vector stays in the span of Omega's d + K columns).

The template (this file):
    h' = sigma_u U xi / sqrt(d) + alpha beta,      f_k = sigma_v n^{1-(a_2+b_2)} mean(v_k h'),
U an n x d input matrix (N(0, 1) entries), beta a trained vector (the bias, initial
variance 0), v_1..v_K the readout vectors (N(0, 1)).

The mapping (training/sgd.py's convention: a trained tensor P = n^{-a} p with
p ~ N(0, sigma^2 n^{-2b}), updated p <- p - eta n^{-c} dLoss/dp).  Take muP,
tp.named("mup", 1): a_1 = -1/2, b_1 = 1/2 (input layer and bias), a_2 = b_2 = 1/2
(readout), c = 0, and feed the engine xi = sqrt(d) x (``engine_inputs``).  Then with
U = Omega[:, :d], v_k = Omega[:, d + k]:
  * input layer: P_1 = sigma_u U, p_1 = n^{a_1} P_1 = sigma_u Omega[:, :d] / sqrt(n) = W1;
    P_1 xi / sqrt(d) = sqrt(n) W1 x;
  * bias: beta = n^{-a_1} p_b with p_b = b (both 0 at init), so alpha beta = sqrt(n) alpha b;
    hence h' = sqrt(n) h;
  * readout: P_2 = sigma_v n^{-(a_2+b_2)} v = sigma_v v / n, p_2 = n^{a_2} P_2 =
    sigma_v v / sqrt(n) = W2^T, and f_k = P_2,k . h' = (W2 h)_k: the same logits;
  * c = 0: p <- p - eta dLoss/dp is TP4's plain SGD on (W1, b, W2), since the p's *are*
    TP4's tensors and the loss is the same function of them; the global gradient norm in p
    coordinates (the engine's ``clip``) is TP4's clipping norm.
So at width n the engine's finite network is TP4's width-n network, step for step, and the
engine's limit is TP4's limit.  (Without xi = sqrt(d) x one would need different learning
rates for the input layer and the readout: the 1/sqrt(d) of the input layer is a constant
the learning rate of layer 1 would otherwise have to undo.)

The bias in muP coordinates: beta is a layer-1 tensor with the constant input alpha, so one
SGD step on a batch of B examples moves it by
    beta <- beta - (eta / B) n^{-c - 2 a_1 - (a_2 + b_2)} alpha sum_i dh'_i,
dh' = n dLoss/dh' the O(1) backward vector (for muP every power is n^0); alpha beta then
moves h' by -(eta / B) alpha^2 sum_i dh'_i, as the input layer moves h'(xi) by
-(eta / B) sum_i dh'_i (xi_i . xi / d): the bias is an input column whose input is the
constant alpha and whose initial value is 0.  Its clipping contribution is
|dLoss/dp_b|^2 = alpha^2 mean((sum_i dh'_i / B)^2) (p_b = beta / sqrt(n)).

Kernels (tp.compile(build(...)).kernels(X), NTK parametrization, data xi = sqrt(d) x):
NNGP = sigma_u^2 sigma_v^2 xi . xi' / d and NTK = 2 sigma_u^2 sigma_v^2 xi . xi' / d +
alpha^2 sigma_v^2 (readout, input layer and bias, the bias with NTK weight 1), per output.
The template also declares them as its outputs (pair moments, as programs/mlp.py does), so
the compiler's limit, the finite-width interpreter and the kernel backend can be compared.

Defaults d = 3, K = 2 keep the bundled-program checks (docs page, convergence, TeX) small;
the experiment builds d = 784, K = 5 (a 784-coordinate input makes the symbolic limit of
the outputs take minutes, the kernels of the readout declaration stay fast).
"""
import math

import numpy as np

import tpcompiler as tp


def default_inputs(d):
    """Two fixed inputs of dimension d (the outputs' default data)."""
    j = np.arange(1, d + 1)
    return np.stack([np.cos(j) + 0.3, np.sin(2.0 * j) - 0.2])


def build(d=3, K=2, sigma_u=1.0, sigma_v=1 / 32, bias=True, bias_alpha=1.0):
    """The template h' = sigma_u U xi / sqrt(d) [+ bias_alpha beta], f = readout of h' (K
    outputs), with the kernels as outputs (pair moments over two inputs xi, xi', written
    like programs/mlp.py with the backward vector dh = sigma_v v_1 = sqrt(n) df_1/dh'):
    nngp = sigma_v^2 E[h h'],  ntk = nngp + (sigma_u^2 E[g g'] + bias_alpha^2) E[dh dh'],
    g = U xi / sqrt(d) (E[g g'] = xi . xi' / d)."""
    if not isinstance(bias, bool):
        raise ValueError(f"maml_linear: bias must be True or False, got {bias!r}")
    p = tp.Program("maml_linear")
    xi = p.input("xi", d, default=default_inputs(d))
    su = p.scalar("sigma_u", sigma_u)
    U = p.input_matrix("U", d, scale=su)
    g = U.apply(xi, name="g")  # sum_j xi_j U_j / sqrt(d)
    h = su * g
    if bias:
        # TP4's hidden-layer bias: trained, zero at init; NTK weight 1 (the trained tensor is beta)
        beta = p.vec("beta", var=0.0, ntk_weight=1.0)
        h = h + bias_alpha * beta
    h = h.named("h")
    v = p.readout(h, sigma=sigma_v, out_dim=K, var=1.0)
    dh = (sigma_v * v[0] if K > 1 else sigma_v * v).named("dh")
    nngp = sigma_v**2 * tp.mean(h * h.prime, name="K_h")
    alpha2 = bias_alpha**2 if bias else 0.0
    p.output("nngp", nngp)
    p.output("ntk", nngp + (su**2 * tp.mean(g * g.prime, name="K_in") + alpha2) * tp.mean(dh * dh.prime, name="K_dh"))
    return p


def parametrization():
    """muP for one hidden layer: a = (-1/2, 1/2), b = (1/2, 1/2), c = 0 (see the module docstring)."""
    return tp.named("mup", 1)


def engine_inputs(X):
    """The engine's input xi = sqrt(d) x for TP4's input x (rows of X), undoing the input layer's 1/sqrt(d)."""
    X = np.asarray(X, dtype=np.float64)
    return math.sqrt(X.shape[-1]) * X
