"""Training: SGD programs and the limit (``sgd``), the finite-width reference (``finite``), abc-parametrizations (``parametrization``)."""
