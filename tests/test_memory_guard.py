"""The memory guard (tpcompiler/memory.py): a derivation that would take more memory than the
machine has stops with one clear error (which derivation, which step, how much, what to do)
instead of being killed by the operating system; nothing changes for one that fits."""
import itertools
from pathlib import Path

import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler import memory
from tpcompiler.backends.kernels.kernel import KernelFunction
from tpcompiler.cli.commands import main
from tpcompiler.ir.graph import ProgramError
from tpcompiler.layers import Conv, Dense, GlobalAvgPool, Relu, serial

ROOT = Path(__file__).resolve().parent.parent


def cnn(L: int = 5):
    """A 2-D conv net, depth 2 (its kernel derivation makes one quantity per pair of positions)."""
    return serial(Conv(8, (3, 3), None, "SAME", 1.5, 0.1), Relu(), Conv(8, (3, 3), None, "SAME", 1.5, 0.1), Relu(),
                  GlobalAvgPool(), Dense(1, 1.5, 0.1)).program((L, L, 2))


def no_memory_left(monkeypatch):
    """From now on the machine has no memory available: the first check of a guarded
    derivation that has grown by a page fails."""
    monkeypatch.setattr(memory, "available_bytes", lambda: 0)


def test_the_kernel_derivation_stops_with_a_clear_error(monkeypatch):
    c = tp.compile(cnn())
    no_memory_left(monkeypatch)
    with pytest.raises(memory.OutOfMemory) as info:
        KernelFunction(c.source)
    message = str(info.value)
    assert message.startswith("kernels of program 'layers': stopped before running out of memory (in step ")
    assert "the machine had 0 bytes available" in message
    assert "square of its number of positions" in message and "limit(x=X)" in message
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ProgramError)
    assert memory._active is None  # the guard ended with the derivation


def test_the_derivation_is_the_same_after_a_stop(monkeypatch):
    """Stopping leaves nothing behind (interned pools, paused collector, active guard): the
    next derivation, with memory, makes the code a derivation in a fresh state makes."""
    c = tp.compile(cnn(4))
    no_memory_left(monkeypatch)
    with pytest.raises(memory.OutOfMemory):
        KernelFunction(c.source)
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**50)
    again = KernelFunction(c.source)
    fresh = KernelFunction(tp.compile(cnn(4)).source)
    assert again.source == fresh.source
    X = np.random.default_rng(0).standard_normal((3, 32))
    np.testing.assert_array_equal(again(X)["ntk"], fresh(X)["ntk"])


def test_tp_compile_stops_with_a_clear_error(monkeypatch):
    no_memory_left(monkeypatch)
    monkeypatch.setattr(memory, "CHECK_EVERY", 1)
    with pytest.raises(memory.OutOfMemory, match=r"^tp.compile 'layers': stopped before running out of memory "
                                                   r"\(in step '(backward|kernel program|derive)'\)"):
        tp.compile(cnn(6))


def test_tpc_prints_one_line(monkeypatch, tmp_path, capsys):
    no_memory_left(monkeypatch)
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path / "cache"))  # (derived here, not read back)
    np.save(tmp_path / "X.npy", np.random.default_rng(0).standard_normal((3, 50)))
    rc = main(["kernels", str(ROOT / "programs" / "cnn1d.py"), "-p", "L=25", "-p", "depth=2", "--x", str(tmp_path / "X.npy"),
               "--out", str(tmp_path / "K.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith("tpc: error: ") and "stopped before running out of memory" in line


def test_the_check_compares_the_growth_with_the_available_memory(monkeypatch):
    """Every CHECK_EVERY ticks the resident memory is read; past start + FRACTION x available
    the guard raises, naming the step, not before."""
    reads = itertools.count()
    monkeypatch.setattr(memory, "resident_bytes", lambda: 1000 + 100 * next(reads))  # 100 bytes more per read
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    monkeypatch.setattr(memory, "CHECK_EVERY", 3)
    ticks = 0
    with pytest.raises(memory.OutOfMemory, match=r"\(in step 'work'\): this process grew from 1 kB to 2 kB, and "
                                                 r"the machine had 1 kB available"):
        with memory.guarded("a test", "try less") as step:
            step("work")
            for ticks in range(1, 100):
                memory.tick()
    # limit 1000 + 900: the reads at the start (1000) and at ticks 3, 6, ..., 27 (1100 .. 1900) pass, 30 (2000) fails
    assert ticks == 30
    assert memory._active is None


def test_outside_a_guard_and_nested_guards(monkeypatch):
    monkeypatch.setattr(memory, "CHECK_EVERY", 1)
    monkeypatch.setattr(memory, "available_bytes", lambda: 0)
    memory.tick()  # no guard: nothing is read
    grown = itertools.count(10**9, 10**6)
    monkeypatch.setattr(memory, "resident_bytes", lambda: next(grown))
    with memory.guarded("outer", "") as outer:
        outer("a")
        with pytest.raises(memory.OutOfMemory, match=r"^outer: .*\(in step 'a'\)"):
            with memory.guarded("inner", "") as inner:  # the outer guard stays the one checked
                inner("b")
                memory.tick()
        assert memory._active is not None
    assert memory._active is None


def test_unknown_memory_leaves_the_derivation_unguarded(monkeypatch):
    """Where the memory cannot be read (not Linux), nothing is checked."""
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    monkeypatch.setattr(memory, "CHECK_EVERY", 1)
    with memory.guarded("x", "") as step:
        step("s")
        assert memory._active is None
        memory.tick()


def test_the_machine_s_memory_is_read():
    resident, available = memory.resident_bytes(), memory.available_bytes()
    assert resident is None or 10**6 < resident < 10**13
    assert available is None or 0 <= available < 10**14
    assert memory.size_text(2.1e9) == "2.1 GB" and memory.size_text(512e6) == "0.512 GB"
    assert memory.size_text(12e6) == "12 MB" and memory.size_text(0) == "0 bytes"
