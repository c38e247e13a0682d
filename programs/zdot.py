"""ZDot example (docs/DESIGN.md 2.2): h = W u, v = W^T g(h), and products that reuse W and W^T.

Every product after the first has a non-zero ZDot term, so a derivation that drops them
gives wrong limits:
  Z^v = ZHat^v + sigma^2 Z^u E[g'(Z^h)]                     (the example of docs/DESIGN.md 2.2)
  Z^w = ZHat^w + sigma^2 g(Z^h) E[tanh'(Z^v)]                (w = W tanh(v))
  Z^r = ZHat^r + sigma^2 Z^u E[d sin(Z^w)/d ZHat^h] + ...    (nested: through the ZDot of w)
  Z^s = ZHat^s + sigma^2 Z^u E[delta(Z^h)]                   (s = W^T step(h): Stein's lemma)
Closed forms: E[h h] = sigma^2, E[v u] = sigma^2 E[g'(Z^h)], E[s u] = sigma / sqrt(2 pi).
"""
import tpcompiler as tp


def build(phi="tanh", sigma=1.5):
    p = tp.Program("zdot")
    g = tp.phi(phi)
    u = p.vec("u")
    W = p.mat("W", sigma=sigma)
    h = (W @ u).named("h")
    v = (W.T @ g(h)).named("v")
    w = (W @ tp.tanh(v)).named("w")
    r = (W.T @ tp.sin(w)).named("r")
    s = (W.T @ tp.step(h)).named("s")
    p.output("hh", tp.mean(h * h))
    p.output("vu", tp.mean(v * u))
    p.output("vv", tp.mean(v * v))
    p.output("wg", tp.mean(w * g(h)))
    p.output("ru", tp.mean(r * u))
    p.output("rv", tp.mean(r * v))
    p.output("su", tp.mean(s * u))
    return p
