"""Bivariate Gaussian expectations E[f(u) g(v)]: closed forms, quadrature templates and the builders of kernel code."""
