"""A linear embedding model, word2vec-style (Tensor Programs IV): a vocabulary of V words as
one-hot inputs, an input embedding (the input matrix U: the embedding of word w is its
column U_w) and an output embedding (one readout vector v_c per context word), the logits
f_c(w) = sigma mean(v_c h(w)) with h(w) = sigma U e_w / sqrt(V), trained under muP with the
softmax cross-entropy of (word, context) pairs.  The model is Gaussian-linear, so its limit
is exact; at finite width the program is exactly SGD of the width-n embeddings.
"""
import numpy as np

import tpcompiler as tp


def pairs(V):
    """(word, context) training pairs: each word predicts its successor on a cycle."""
    return [(w, (w + 1) % V) for w in range(V)]


def build(V=4, steps=2, lr=2.0, w_std=1.0):
    p = tp.Program("word2vec")
    xi = p.input("w", V)
    h = p.input_layer("U", xi, sigma=w_std).named("h")
    p.readout(h, sigma=w_std, out_dim=V)
    data = pairs(V)
    X = np.eye(V)[[w for w, _ in data]]
    Y = np.eye(V)[[c for _, c in data]]
    sgd = tp.SGD(X, Y, steps=steps, lr=lr, loss="softmax")
    graph = tp.unroll(p.graph, tp.named("mup", 1), sgd)
    graph.name = f"word2vec_V{V}_T{steps}"
    return tp.Program.from_graph(graph)
