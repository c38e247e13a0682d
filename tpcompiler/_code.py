"""The digest of tpcompiler's own source, taken when the package is imported (kernels/stored.py
keys stored derivations by it).

Taken first thing at import, before the package's modules are read, so it describes the code
this process runs: a checkout that changes while the process is alive (a ``git pull`` under
an open notebook) changes the files, not the loaded modules.  ``current`` reads the files
again; a derivation is stored only while the two agree."""
from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def current() -> str | None:
    """SHA-256 of every .py file of the package (relative path and bytes, sorted by path), or
    None if one cannot be read (then nothing is keyed by it).  Entries that are not regular
    files (an editor's dangling lock link ``.#kernel.py``) are skipped."""
    h = hashlib.sha256()
    try:
        for path in sorted(PACKAGE.rglob("*.py")):
            if path.is_file():
                h.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    except OSError:
        return None
    return h.hexdigest()


#: The digest of the source as imported.
AT_IMPORT = current()
