"""What the benchmark scripts share: a description of the machine a run was measured on, and
writing one section of docs/benchmarks.md (replaced in place, other sections kept)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np


def machine_info() -> dict:
    """CPU model, cores available to this process, memory, OS, library versions, the date and
    the load averages (1, 5, 15 min) at the time of the call."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    import numba

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory": mem, "os": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "load": os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3}


def write_section(docs: Path, heading: str, text: str) -> None:
    """Put ``text`` (which starts with ``heading``) into ``docs``: replace the section under
    that heading, or append it."""
    docs.parent.mkdir(parents=True, exist_ok=True)
    old = docs.read_text() if docs.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(heading) + r"\n.*?(?=\n## |\Z)", re.S)
    # (the match stops before the newline that ends the section's last line: one more keeps the
    # blank line before the next heading)
    new = pattern.sub(lambda m: text.rstrip("\n") + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    docs.write_text(new.rstrip("\n") + "\n")


def machine_line(info: dict) -> str:
    """The machine a table was measured on, as its docs section says it."""
    return (f"Machine: {info['cpu']}, {info['cores']} cores, load {'/'.join(f'{x:.1f}' for x in info['load'])}, "
            f"{info['date']}.")


def publish_table(docs: Path, heading: str, description: str, info: dict, columns: list, rows: list,
                  write: bool) -> None:
    """A benchmark's docs section (``heading``, what was run, the machine ``info`` it ran on, a
    table of ``rows`` under ``columns``), printed, and written into ``docs`` if ``write``."""
    text = "\n".join([heading, "", description, "", machine_line(info), "",
                      "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows, ""])
    print(text)
    if write:
        write_section(docs, heading, text)


def table_arguments(description: str, docs: Path, run_case):
    """The command line of a benchmark that writes one table into ``docs`` (``--write-docs``),
    or None in the child process ``spawn`` starts, once that child has run its case
    (``run_child_case``)."""
    if run_child_case(run_case):
        return None
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--write-docs", action="store_true", help=f"write the table into {docs}")
    return parser.parse_args()


def run_child_case(run_case) -> bool:
    """In the child process ``spawn`` starts (arguments ``--case JSON``): run the case, print
    its JSON result, and say so (True); else False, and the script runs as its user asked."""
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(json.dumps(run_case(json.loads(sys.argv[2]))))
        return True
    return False


def spawn(script, case: dict, timeout: float) -> dict:
    """``script --case JSON`` in a fresh interpreter (its own peak memory; a crash loses one
    case): the JSON object on its last line of output, or {"error": ...}."""
    try:
        proc = subprocess.run([sys.executable, str(script), "--case", json.dumps(case)], capture_output=True,
                              text=True, timeout=timeout, cwd=Path(script).parent)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer in {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
