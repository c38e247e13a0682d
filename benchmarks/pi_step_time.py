"""Per-step time of tp.PiLimit (docs/DESIGN.md 2.10) at depth 2, r = 200, batch 8, d = 784,
dout = 10 (the MNIST configuration) when the layers hold M = 1000, 10000, 40000 rows.

    python benchmarks/pi_step_time.py [PHI]

The layers are grown to M rows by appending random unit rows (a step's cost depends on M, not
on the rows' values).  Report the machine load (`uptime`) with the numbers; with busy cores,
OpenBLAS/Numba threads can be much slower than one thread (OPENBLAS_NUM_THREADS=1
NUMBA_NUM_THREADS=1).
"""
import numpy as np, time, sys
import tpcompiler as tp
phi = sys.argv[1] if len(sys.argv) > 1 else "relu"
spec = tp.PiSpec(depth=2, r=200, d=784, dout=10, phi=phi, bias=True, a1=1.0, ao=0.5, ab=0.5)
lim = tp.PiLimit(spec, seed=0, clip=0.4, wd=1e-5, mult=dict(first=0.1, last=4.0, bias=0.5))
rng = np.random.default_rng(0)
X = rng.standard_normal((8, 784)) / 28; Y = np.eye(10)[rng.integers(0, 10, 8)]
lim.reserve(40000)
lim.step(X, Y, 0.5)
for M in (1000, 10000, 40000):
    # grow to M rows by appending random unit rows (the cost depends on M only)
    for l, layer in lim.layers.items():
        k = M - layer.m
        if k > 0:
            B = rng.standard_normal((k, 200)); B /= np.linalg.norm(B, axis=1, keepdims=True)
            layer.append(0.01 * rng.standard_normal((k, layer.A.shape[1])), B, np.full(k, -0.1))
    lim.step(X, Y, 0.5)
    t = time.perf_counter(); n = 5
    for _ in range(n):
        lim.step(X, Y, 0.5)
    print(phi, M, f"{(time.perf_counter()-t)/n*1000:.1f} ms/step", flush=True)
