"""Kernel backend: the pairwise-Gaussian engine (``pairwise``), feature maps (``features``) and compiled kernel functions (``kernel``)."""
