"""word2vec's CBOW network (Tensor Programs IV, edwardjhu/TP4 Word2Vec/src/word2vec.c) as a
network template for the step engine: no training inside (unlike programs/word2vec.py).

Input xi in R^V: the context mean, xi_w = (count of word w in the context) / |C|.
Network:  h = w_std sum_w xi_w U_w  (U: an input matrix of V initial N(0, 1) vectors, applied
with norm 1),  f_k = mean(v_k h)  (readout of V vectors, zero at init: var = 0).

Which parametrization makes this exactly word2vec.c at width n.  word2vec.c (TP4) keeps input
rows E_w in R^n (E_w ~ N(0, 1/n) coordinatewise at init; TP4 draws them uniform with that
variance), output rows O_k = 0, and for one CBOW example with learning rate alpha:
    e = sum_w xi_w E_w,  f_k = e . O_k,  g_k = alpha (y_k - sigmoid(f_k)) for the target and the
    negatives k,  O_k += g_k e,  and every context position's row E_w += (sum_k g_k O_k) / |C|,
i.e. plain SGD with learning rate alpha on sum_k [logistic loss of f_k] (the rows' gradients
taken at the old weights; a word repeated in the context moves once per occurrence, which is
xi_w = count / |C|).  Under muP with one hidden layer, tp.named("mup", 1) (a_1 = -1/2, b_1 = 1/2,
a_2 = b_2 = 1/2, c = 0; training/sgd.py: trained tensors P = n^-a p, p ~ N(0, sigma^2 n^-2b),
p <- p - eta n^-c dLoss/dp), w_std = 1 and learning rate eta = alpha, this program is that
network under the change of variables
    U_w = sqrt(n) E_w   (so U has N(0, 1) entries and h = sqrt(n) e),
    v_k = sqrt(n) O_k   (so v_0 = 0 and f_k = mean(v_k h) = e . O_k):
the input tensor P_1 = n^{1/2} p_1 has N(0, 1) entries (= U) and moves by
-eta n dLoss/dP_1 = -eta n (dLoss/dh) xi^T with dLoss/dh = n^-1 sum_k chi_k v_k, i.e.
U_w <- U_w - alpha xi_w sum_k chi_k v_k, chi_k = sigmoid(f_k) - y_k, which is
E_w += xi_w sum_k g_k O_k; the readout P_2 = n^-1/2 p_2 = v / n moves by
-eta n^-1 dLoss/dP_2, i.e. v_k <- v_k - alpha chi_k h, which is O_k += g_k e.  So
StepEngine(build(V), tp.named("mup", 1), loss="negative_sampling") stepped with lr = alpha,
X = the context mean and outputs = [target, negatives] with labels [1, 0, ...] is word2vec.c's
CBOW step (up to word2vec.c's sequential treatment of a negative drawn twice, and its clipped
sigmoid table); the n -> infinity limit of it is TP4's infinite-width word2vec (exact: every
vector is a combination of the V basis Gaussians U_w).  ``frozen=True`` declares U not
trainable: the NTK/GP baseline in which the input embeddings stay at their initial values.

Outputs (so that the template is also a program with a limit to check and to document): the
initial embedding kernel K_h = E[Z^h(xi) Z^h(xi')] = w_std^2 xi . xi'.
"""
import numpy as np

import tpcompiler as tp


def default_inputs(V):
    """Two context means over a vocabulary of V words (three context words each, one shared)."""
    X = np.zeros((2, V))
    X[0, [0, 1 % V, 2 % V]] += 1.0 / 3.0
    X[1, [2 % V, 3 % V, 4 % V]] += 1.0 / 3.0
    return X


def build(V=6, w_std=1.0, frozen=False):
    if not isinstance(V, int) or V < 1:
        raise ValueError(f"word2vec_cbow: V must be a positive integer, got {V!r}")
    if not isinstance(frozen, bool):
        raise ValueError(f"word2vec_cbow: frozen must be True or False, got {frozen!r}")
    p = tp.Program("word2vec_cbow")
    xi = p.input("xi", V, default=default_inputs(V))
    U = p.input_matrix("U", V, trainable=not frozen, scale=w_std)
    h = (w_std * U.apply(xi, norm=1)).named("h")
    p.readout(h, sigma=1.0, out_dim=V, var=0.0)
    p.output("K_h", tp.mean(h * h.prime))
    return p
