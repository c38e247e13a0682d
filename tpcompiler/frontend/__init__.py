"""Front end: the DSL (``dsl``) that traces Python into a program, and ``loader`` for program files."""
