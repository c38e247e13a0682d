"""Graph IR: the instruction set (``ops``), the program graph (``graph``), its passes (``backward``, ``ntk``), built-in nonlinearities and the compiler's typed symbols (``symbols``)."""
