"""The disk cache of generated code (README "Caches"): one place, set by TPCOMPILER_CACHE_DIR,
written atomically so that several processes can share it."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler.backends import codegen

ROOT = Path(__file__).resolve().parent.parent


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path / "c"))
    assert codegen.cache_dir("kernels") == str(tmp_path / "c" / "kernels")
    assert (tmp_path / "c" / "kernels").is_dir()


def test_unusable_cache_dir_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(blocker))
    with pytest.raises(tp.ProgramError, match=r"^TPCOMPILER_CACHE_DIR='.*file': cannot use .* as the cache"):
        codegen.cache_dir("kernels")


def test_atomic_write_replaces_whole_files_and_cleans_up(tmp_path):
    path = tmp_path / "m.py"
    codegen.atomic_write(str(path), "X = 1\n")
    assert path.read_text() == "X = 1\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    with pytest.raises(TypeError):
        codegen.atomic_write(str(path), b"bytes are not text")  # fails mid-write
    assert path.read_text() == "X = 1\n"  # the old content is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.py"]  # no temporary file left behind


WORKER = textwrap.dedent("""
    import sys
    from tpcompiler.backends import codegen
    pad = "# " + "x" * 50_000 + "\\n"  # large files: a torn write would be visible
    for i in range(20):
        mod = codegen.load_module(pad + f"VALUE = {i}\\n", "kernels")
        assert mod.VALUE == i, (i, mod.VALUE)
    print("ok")
""")


def test_two_processes_share_the_cache(tmp_path):
    env = dict(os.environ, TPCOMPILER_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err
    files = sorted((tmp_path / "kernels").glob("*"))
    assert len([f for f in files if f.suffix == ".py"]) == 20
    assert not [f for f in files if f.name.endswith(".tmp")]


def test_generated_bytecode_is_kept_and_a_damaged_copy_is_compiled_again(tmp_path, monkeypatch):
    """A generated module's code object is kept next to it (``codegen._bytecode``), whatever
    PYTHONDONTWRITEBYTECODE says, and read back only when it matches its source."""
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path))
    source = "VALUE = 41 + 1\n"

    def fresh_load():
        codegen._MODULES.pop(codegen.module_name(source, "kernels"), None)
        return codegen.load_module(source, "kernels")

    assert fresh_load().VALUE == 42
    (kept,) = (tmp_path / "kernels").glob("*.code")

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again although the kept code object matches")

    monkeypatch.setattr(codegen, "compile", no_compile, raising=False)
    assert fresh_load().VALUE == 42  # read back, not compiled
    monkeypatch.undo()
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path))
    whole = kept.read_bytes()
    other = "VALUE = 41 - 1\n"  # a whole, valid code object of another source
    codegen.load_module(other, "kernels")
    (other_kept,) = [p for p in (tmp_path / "kernels").glob("*.code") if p != kept]
    for damaged in (whole[:-3], whole[:-1] + bytes([whole[-1] ^ 1]), b"", b"\n" + whole, other_kept.read_bytes()):
        kept.write_bytes(damaged)
        assert fresh_load().VALUE == 42
        assert kept.read_bytes() == whole  # compiled again and replaced


def test_a_cache_moved_elsewhere_compiles_for_its_new_place(tmp_path, monkeypatch):
    """The kept code object names the module's file (Numba's cache and tracebacks find it by
    that name): read from a cache directory that was moved, it would name a path that is gone."""
    import shutil

    source = "def f(x):\n    return x + 1\n"
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path / "a"))
    name = codegen.module_name(source, "kernels")
    codegen._MODULES.pop(name, None)
    assert codegen.load_module(source, "kernels").f(1) == 2
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    monkeypatch.setenv("TPCOMPILER_CACHE_DIR", str(tmp_path / "b"))
    codegen._MODULES.pop(name, None)
    mod = codegen.load_module(source, "kernels")
    assert mod.f.__code__.co_filename == str(tmp_path / "b" / "kernels" / f"{name}.py") == mod.__file__


@pytest.mark.parametrize("array", [
    np.array([0, 1, -1, 2**62, -(2**63), 7, 7, 7], dtype=np.int64),
    np.array([0.0, -0.0, 1.5, -2.25e-310, np.inf, -np.inf, np.pi, 1e308], dtype=np.float64),
    np.zeros(0, dtype=np.int64),
])
def test_packed_arrays_read_back_bit_for_bit(array):
    """A generated module's index and weight tables are written as one string
    (codegen.packed_array) and must come back with every bit (signed zeros, subnormals) and
    writable, in the dtype the generated stages were compiled for."""
    expression = codegen.packed_array(array)
    back = eval(expression, {"_unpacked_array": codegen.unpacked_array})
    assert back.dtype == array.dtype and back.flags.writeable and back.flags.c_contiguous
    assert back.tobytes() == array.tobytes()


def test_packed_array_refuses_other_types():
    with pytest.raises(ValueError, match="1-D int64 or float64 array, not 1-D float32"):
        codegen.packed_array(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="not 2-D int64"):
        codegen.packed_array(np.zeros((2, 2), dtype=np.int64))


KERNELS_RUN = textwrap.dedent("""
    import sys
    import numpy as np
    import tpcompiler as tp
    X = np.random.default_rng(0).standard_normal((5, 3))
    K = tp.compile(tp.load("programs/mlp.py", depth=2, phi="tanh", b_std=0.2)).kernels(X)
    np.save(sys.argv[1], np.stack([K["nngp"], K["ntk"]]))
""")


def test_damaged_numba_and_module_files_are_compiled_again(tmp_path):
    """A cache file cut short (a generated module, Numba's index or compiled code of a
    generated kernel or quadrature rule) stopped every later run with Numba's UnpicklingError
    or LLVM's bitcode error, or a TokenError, until the cache was deleted (cache audit).  Now
    the damaged files are written again and the kernels come out as before."""
    env = dict(os.environ, TPCOMPILER_CACHE_DIR=str(tmp_path / "cache"))

    def run(name):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-c", KERNELS_RUN, str(out)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return np.load(out)

    first = run("first.npy")
    damaged = [f for f in (tmp_path / "cache").rglob("*") if f.suffix in (".nbi", ".nbc")
               or (f.suffix == ".py" and f.name.startswith("_tpc_"))]
    assert {f.suffix for f in damaged} == {".nbi", ".nbc", ".py"}
    assert any("gaussian2" in str(f) for f in damaged) and any("kernels" in str(f) for f in damaged)
    for f in damaged:
        f.write_bytes(f.read_bytes()[:100])
    assert np.array_equal(run("second.npy"), first)
