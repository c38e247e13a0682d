"""The finite pi-net at width n, the oracle of the pi-limit (docs/DESIGN.md 2.10).

A real width-n network built from a pi-limit state and bases Omega_l (n x r, iid N(0, 1),
drawn from ``seed``), l = 1..L.  Normalisation (ours; DESIGN.md writes n^{-1/2} factors for a
basis of columns of norm ~1): with Omega iid N(0, 1) the pre-activations are h^l = Omega_l g^l
with O(1) coordinates, and

    W^1     = Omega_1 A1^T                                   (n x d),
    W^l     = (1/n) Omega_l (Amult_l * A_l)^T phi(Omega_{l-1} B_l^T)^T     (n x n), 2 <= l <= L,
    W^{L+1} = (1/n) (Amult * A)^T phi(Omega_L B^T)^T                         (dout x n),
    beta_l  = Omega_l b_l (hidden biases, n),  readout bias b (dout);

    h^1 = a1 (W^1 x + ab beta_1),  x^l = phi(h^l),  h^l = W^l x^{l-1} + ab beta_l,
    out = ao (W^{L+1} x^L + ab b).

W^l x^{l-1} = Omega_l sum_m Amult_m A_m (1/n) sum_i phi(B_m.omega_i) phi(g.omega_i), whose
limit is the pi-limit's layer.  Training is SGD on (W, beta, b) with the gradients of the
input and hidden layers and hidden biases projected onto span(Omega_l) (P_l = Q_l Q_l^T) and
muP's per-layer rates, so that each update is the finite version of the limit's:

    W^1    -= lr mult_first n P_1 dL/dW^1,      W^l -= lr P_l dL/dW^l,
    W^{L+1} -= lr mult_last (1/n) dL/dW^{L+1},  beta_l -= lr mult_bias n P_l dL/dbeta_l,
    b      -= lr mult_bias dL/db.

Projected SGD keeps every column of W^l (l <= L) and beta_l in span(Omega_l), so the
parameters are stored exactly in factored form, W^l = Omega_l K_l and beta_l = Omega_l c_l,
and an update P dL/dW = Omega (Omega^T Omega)^{-1} Omega^T dL/dW costs O(B n r), not O(n^2).
Weight decay first multiplies every parameter by 1 - lr wd (the limit's A1, Amult, b).
Clipping scales each update direction D by min(1, c / (1e-10 + norm)) with the finite
analogue of the limit's norm (the same number as n -> inf): ||D||/sqrt(n) for W^1 and beta_l,
||D|| for hidden W^l, sqrt(n) ||D|| for the readout, ||D|| for its bias.  Outputs converge to
the limit's like n^{-1/2}.
"""
from __future__ import annotations

import math

import numpy as np

from tpcompiler import memory, validation
from tpcompiler.training.pi import (
    PiSpec, _resolve_state, check_batch, check_options, clip_factor, finite_outputs, limited_threads, load_state_file,
    loss_and_delta, restore_progress, save_metadata, spec_and_options, transforms,
)


class PiFinite:
    """The width-n pi-net (module docstring) with the PiLimit interface."""

    method = "pi-finite"

    def __init__(self, spec: PiSpec, width: int, state=None, seed: int = 0, loss: str = "softmax",
                 wd: float = 0.0, clip=None, mult=None, threads: int | None = 1):
        if not isinstance(spec, PiSpec):
            raise validation.ArgumentError(f"PiFinite: spec must be a PiSpec, got {type(spec).__name__}")
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
            raise validation.ArgumentError(f"PiFinite: width must be a positive integer, got {width!r}")
        if spec.r > width:
            raise validation.ArgumentError(f"PiFinite: r = {spec.r} is larger than the width n = {width}; the basis "
                                           "Omega (n x r) needs r <= n")
        self.spec = spec
        self.n = int(width)
        self.seed = seed
        self.threads = threads  # BLAS/Numba threads in step/forward (see pi.limited_threads)
        self.loss = loss
        self.wd, self.clip, self.mult = check_options(wd, clip, mult, loss)
        T = transforms(spec.phi)
        self.phi, self.dphi = T.numpy_phi, T.numpy_dphi
        state = _resolve_state(spec, state, seed)
        rows = max((len(state[f"B{l}"]) for l in spec.layers()), default=0)
        # the bases and hidden coefficients (n x r each per layer), the readout (dout x n), and
        # the features of the state's rows that _build multiplies (n x rows, twice: phi's copy)
        self._check_memory(8 * self.n * (2 * spec.depth * spec.r + spec.dout + 2 * rows), "its weights")
        self._build(state, seed)
        self.steps_done = 0  # (as PiLimit's)
        self.run: dict | None = None
        self.saved_run: dict | None = None

    def _build(self, state: dict, seed) -> None:
        """Parameters in the factored form W^l = Omega_l K_l (l <= L), beta_l = Omega_l c_l:
        projected SGD keeps every update in span(Omega_l), so this is the same network."""
        spec, n = self.spec, self.n
        rng = np.random.default_rng([int(seed), 0x9E3779B9])  # not the init stream of init_state
        self.omega = {l: rng.standard_normal((n, spec.r)) for l in range(1, spec.depth + 1)}
        self._gram()
        K = {1: state["A1"].T.copy()}
        for l in spec.layers():
            feats = self.phi(self.omega[l - 1] @ state[f"B{l}"].T)              # n x M
            K[l] = (state[f"Amult{l}"][:, None] * state[f"A{l}"]).T @ feats.T / n  # cols x n
        self.K = K
        self.c = {l: state[f"b{l}"].copy() for l in range(1, spec.depth + 2)} if spec.bias else {}

    def _check_memory(self, need: int, what: str) -> None:
        """Refuse, before allocating them, arrays of ``need`` bytes that this machine does not
        have available (``memory.available_bytes``): at width 10^8 the process grew until the
        system killed it, without a word."""
        available = memory.available_bytes()
        if available is not None and need > available:
            raise validation.ArgumentError(
                f"PiFinite: at width n = {self.n:,} {what} need about {memory.size_text(need)}, but this machine has "
                f"{memory.size_text(available)} available; use a smaller width (the pi-limit itself: no width)")

    def _batch_memory(self, X) -> None:
        """``_check_memory`` for a forward and backward pass of the batch X: per layer its
        pre-activations, their phi and the backward's vectors (B x n each)."""
        self._check_memory(8 * len(X) * self.n * (3 * self.spec.depth + 2), f"the {len(X)} examples' activations")

    def _gram(self) -> None:
        self.gram = {l: o.T @ o for l, o in self.omega.items()}
        self.gram_inv = {l: np.linalg.inv(g) for l, g in self.gram.items()}

    def weight(self, l: int) -> np.ndarray:
        """The dense weight W^l (n x d, n x n, or dout x n for the readout)."""
        return self.omega[l] @ self.K[l] if l <= self.spec.depth else self.K[l]

    def _pre(self, l: int, x: np.ndarray) -> np.ndarray:
        """x W^l^T + ab beta_l for a batch x (B x fan-in)."""
        spec = self.spec
        coef = x @ self.K[l].T
        if spec.bias:
            coef = coef + spec.ab * self.c[l]
        return coef @ self.omega[l].T if l <= spec.depth else coef

    # -- forward and backward -------------------------------------------------------------
    def _forward(self, X):
        spec = self.spec
        hs = [spec.a1 * self._pre(1, X)]
        for l in spec.layers():
            hs.append(self._pre(l, self.phi(hs[-1])))
        return hs, spec.ao * hs[-1]

    def _updates(self, X, hs, delta):
        """Per parameter: (update direction D in factored coordinates, its finite norm, the
        learning-rate multiplier key).  D_K = G^{-1} Omega^T dL/dW (times n for the input
        layer and hidden biases, / n for the readout): P dL/dW = Omega D_K."""
        spec, n = self.spec, self.n
        L = spec.depth
        out = {}
        dh = spec.ao * delta                                  # dL/d(pre-readout), B x dout
        for l in range(L + 1, 0, -1):
            x = self.phi(hs[l - 2]) if l > 1 else X
            scale = spec.a1 if l == 1 else 1.0
            if l == L + 1:
                D = dh.T @ x / n
                out[("K", l)] = (D, math.sqrt(n) * np.linalg.norm(D), "last")
                if spec.bias:
                    Db = spec.ab * dh.sum(axis=0)
                    out[("c", l)] = (Db, np.linalg.norm(Db), "bias")
            else:
                proj = self.gram_inv[l] @ (self.omega[l].T @ dh.T)    # r x B
                factor = scale * (n if l == 1 else 1.0)
                D = factor * proj @ x
                # ||Omega proj x||_F^2 = sum((proj^T G proj) * (x x^T)): O(r^2 B + B^2 fan-in), not O(r^2 fan-in)
                sq = np.sum((proj.T @ self.gram[l] @ proj) * (x @ x.T))
                norm = factor * math.sqrt(max(float(sq), 0.0)) / (math.sqrt(n) if l == 1 else 1.0)
                out[("K", l)] = (D, norm, "first" if l == 1 else None)
                if spec.bias:
                    Db = n * scale * spec.ab * proj.sum(axis=1)
                    out[("c", l)] = (Db, self._norm(l, Db[:, None]) / math.sqrt(n), "bias")
            if l > 1:
                back = dh @ self.K[l] if l == L + 1 else (dh @ self.omega[l]) @ self.K[l]
                dh = back * self.dphi(hs[l - 2])              # dL/dh^{l-1}
        return out

    def _norm(self, l: int, D: np.ndarray) -> float:
        """||Omega_l D||_F = sqrt(tr(D^T G D))."""
        return math.sqrt(max(float(np.sum(D * (self.gram[l] @ D))), 0.0))  # an unoptimised 3-operand einsum took 0.16 s

    def step(self, X, Y, lr, wd=None, clip=None, mult=None, outputs=None):
        """One projected SGD step (module docstring); returns the per-example losses before it."""
        wd, clip, mult = check_options(self.wd if wd is None else wd, self.clip if clip is None else clip,
                                       self.mult if mult is None else mult)
        lr = validation.number(lr, "lr", nonnegative=True)  # (NaN or inf made every prediction NaN)
        X, Y = check_batch(self.spec, X, Y)
        self._batch_memory(X)
        with limited_threads(self.threads):
            hs, out = self._forward(X)
            losses, delta = loss_and_delta(out, Y, self.loss)
            updates = self._updates(X, hs, delta)
        if wd:
            decay = 1.0 - lr * wd
            for params in (self.K, self.c):
                for v in params.values():
                    v *= decay
        for (kind, l), (D, norm, key) in updates.items():
            m = 1.0 if key is None else mult[key]
            (self.K if kind == "K" else self.c)[l] -= lr * m * clip_factor(norm, clip) * D
        self.steps_done += 1
        return losses

    def forward(self, X) -> np.ndarray:
        X = check_batch(self.spec, X)
        self._batch_memory(X)
        with limited_threads(self.threads):
            return finite_outputs(self._forward(X)[1], "forward")

    def predict(self, X):
        f = self.forward(X)
        return f, np.zeros_like(f)

    def reserve(self, rows: int) -> None:
        """Nothing to pre-allocate: the finite network has a fixed size."""

    def state(self) -> dict:
        """The finite parameters in factored form (K{l}: W^l = Omega_l K{l}, readout K{L+1} = W;
        c{l}: beta_l = Omega_l c{l}, readout bias c{L+1}) and the bases Omega{l}."""
        out = {f"K{l}": k.copy() for l, k in self.K.items()}
        out.update({f"c{l}": c.copy() for l, c in self.c.items()})
        out.update({f"Omega{l}": o.copy() for l, o in self.omega.items()})
        return out

    def options(self) -> dict:
        return dict(loss=self.loss, wd=self.wd, clip=self.clip, mult=dict(self.mult))

    def save(self, path) -> None:
        np.savez(path, **self.state(), **save_metadata(self), _width=np.array(self.n), _seed=np.array(self.seed))

    @classmethod
    def load(cls, path, spec: PiSpec | None = None, **kwargs):
        arrays, meta = load_state_file(path)
        if spec is not None and "_spec" in meta and meta["_spec"] != spec.to_json():
            # (its K/c/Omega are the saved net's; read as another spec's they trained that net, or
            # failed inside numpy)
            raise validation.ArgumentError(f"pi state: {str(path)!r} is the state of another pi-net ({meta['_spec']}; "
                                           f"given {spec.to_json()}); give the spec it was saved with")
        spec, kwargs = spec_and_options(path, meta, spec, kwargs)
        obj = cls(spec, int(meta["_width"]), state=None, seed=int(meta["_seed"]), **kwargs)
        obj.K = {int(k[1:]): v for k, v in arrays.items() if k.startswith("K")}
        obj.c = {int(k[1:]): v for k, v in arrays.items() if k.startswith("c")}
        obj.omega = {int(k[5:]): v for k, v in arrays.items() if k.startswith("Omega")}
        obj._gram()
        restore_progress(obj, meta)
        return obj
