"""Evaluators of programs and Z programs: finite width (``interpreter``), exact Gaussian-linear (``exact``), particles, and the kernel backend (``kernels``)."""
