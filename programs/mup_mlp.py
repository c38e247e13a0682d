"""muP training of an MLP (docs/DESIGN.md 2.5): T steps of full-batch SGD of the network of
programs/mlp.py (depth L, nonlinearity phi, no biases) under the maximal-update
parametrization, unrolled into one NETSOR-transpose program by tp.unroll.  Its outputs are
f_train[t,i] and f_eval[t,i]: the network's output on the training and evaluation inputs
after t steps.  The compiler derives the limit -- ZHat + ZDot for every use of the initial
weights, the weight updates as Moments and linear combinations of earlier vectors -- with
the same Master-theorem machinery as any program; at finite width the same program is
exactly SGD of the width-n network.
"""
from pathlib import Path

import numpy as np

import tpcompiler as tp

MLP = Path(__file__).with_name("mlp.py")
#: docs/ shows the derived recursions for depth 1 and 2 after one and two steps (batch of one input).
DOC_VARIANTS = [dict(depth=1, steps=1, N=1, N_eval=0), dict(depth=1, steps=2, N=1, N_eval=0),
                dict(depth=2, steps=1, N=1, N_eval=0), dict(depth=2, steps=2, N=1, N_eval=0)]


def default_data(N, N_eval, d):
    """Fixed inputs and targets (so the program is reproducible without data files)."""
    k = np.arange(1, (N + N_eval) * d + 1, dtype=float).reshape(N + N_eval, d)
    X = np.cos(1.3 * k) + 0.2 * np.sin(0.7 * k)
    Y = np.sin(np.arange(1, N + 1) * 1.1)
    return X[:N], Y, X[N:]


def build(depth=2, phi="tanh", steps=2, lr=1.0, N=2, N_eval=1, d=3, w_std=1.0, loss="mse", param="mup"):
    net = tp.load(MLP, depth=depth, phi=phi, w_std=w_std, b_std=None, d=d)
    X, Y, Xe = default_data(N, N_eval, d)
    abc = tp.named(param, depth) if "=" not in param else tp.parse_abc(param, depth)
    sgd = tp.SGD(X, Y, steps=steps, lr=lr, loss=loss, X_eval=Xe if N_eval else None)
    graph = tp.unroll(net.graph, abc, sgd)
    graph.name = f"mup_mlp_L{depth}_T{steps}"
    return tp.Program.from_graph(graph)
