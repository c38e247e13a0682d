"""``python -m tpcompiler.cli``: the ``tpc`` command."""
import sys

from tpcompiler.cli.commands import main

sys.exit(main())
