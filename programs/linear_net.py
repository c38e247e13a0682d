"""Linear one-hidden-layer network with a K-dimensional output (the MAML-style network of
Tensor Programs IV) trained by SGD under muP, unrolled into one program.  Every Z is a
linear combination of a finite Gaussian basis, so the limit is computed exactly (docs/DESIGN.md
2.7, strategy 1): f = sigma mean(v_k h), h = sigma U xi / sqrt(d).
"""
import numpy as np

import tpcompiler as tp


def default_data(N, N_eval, d, K):
    k = np.arange(1, (N + N_eval) * d + 1, dtype=float).reshape(N + N_eval, d)
    X = np.cos(0.9 * k) - 0.3 * np.sin(1.7 * k)
    Y = np.cos(np.outer(np.arange(1, N + 1), np.arange(1, K + 1)) * 0.8)
    return X[:N], Y, X[N:]


def network(d=3, K=2, w_std=1.0):
    p = tp.Program("linear_net")
    xi = p.input("xi", d)
    h = p.input_layer("U", xi, sigma=w_std).named("h")
    p.readout(h, sigma=w_std, out_dim=K)
    return p


def build(d=3, K=2, steps=3, lr=0.5, N=3, N_eval=2, w_std=1.0, param="mup"):
    X, Y, Xe = default_data(N, N_eval, d, K)
    abc = tp.named(param, 1) if "=" not in param else tp.parse_abc(param, 1)
    sgd = tp.SGD(X, Y, steps=steps, lr=lr, X_eval=Xe if N_eval else None)
    graph = tp.unroll(network(d, K, w_std).graph, abc, sgd)
    graph.name = f"linear_net_K{K}_T{steps}"
    return tp.Program.from_graph(graph)
