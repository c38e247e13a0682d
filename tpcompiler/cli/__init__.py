"""The ``tpc`` command line (``commands``) and the docs generator (``docs``)."""
from tpcompiler.cli.commands import main

__all__ = ["main"]
