"""Kernels of any data size (tpcompiler.backends.kernels.tiled, issue 11 item 3): tiles under a
memory budget, memory-mapped .npy output, float32 storage, progress over tiles, Dask tasks.

The reference of every comparison is the untiled call ``KernelFunction.__call__`` (the kernel
backend as tested against neural-tangents and finite width in test_kernels*.py): a tile runs the
same generated code on a sub-block of the Grams, so the results agree to rounding (1e-12)."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

import tpcompiler as tp
from tpcompiler.backends.kernels import tiled
from tpcompiler.cli.commands import main
from tpcompiler.validation import ArgumentError

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "programs" / "mlp.py"
PARAMS = dict(depth=3, phi="relu", w_std=1.5, b_std=0.1, d=4)  # as test_kernels.py: shares its code cache
CLI_PARAMS = ["-p", "depth=3", "-p", "phi=relu", "-p", "w_std=1.5", "-p", "b_std=0.1"]
N, N2 = 230, 90


@pytest.fixture(autouse=True)
def data_only_budget(monkeypatch):
    """Budgets below count only the arrays of the call (the process's own resident set, some
    hundred MB under pytest, is set aside; test_budget_counts_the_process checks it counts)."""
    monkeypatch.setattr(tiled, "process_baseline", lambda: 0)


@pytest.fixture(scope="module")
def compiled():
    return tp.compile(tp.load(str(MLP), **PARAMS))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    return rng.standard_normal((N, 4)), 2.0 * rng.standard_normal((N2, 4))


@pytest.fixture(scope="module")
def reference(compiled, data):
    """The untiled kernels."""
    return compiled.kernel_function()(*data)


def assert_close(result, reference, rtol=1e-12):
    assert set(result) == set(reference)
    for name, K in reference.items():
        assert result[name].shape == K.shape, name
        err = np.max(np.abs(np.asarray(result[name], dtype=np.float64) - K)) / np.max(np.abs(K))
        assert err <= rtol, (name, err)


@pytest.mark.parametrize("tile", [64, 100])
def test_tiles_equal_the_untiled_kernels(compiled, data, reference, tile):
    """Uneven last tiles (230 = 3 x 64 + 38 = 2 x 100 + 30) and the X2 block included."""
    result = compiled.kernels(*data, tile=tile)
    assert compiled.kernel_function().last_plan.tile == tile
    assert_close(result, reference)
    for name in ("nngp", "ntk"):
        assert np.array_equal(result[name], result[name].T)  # off-diagonal tiles written both ways


def test_memory_budget_chooses_the_tiles(compiled, data, reference):
    """A budget too small for the whole N x N working set: several tiles, same values, and the
    planned peak within the budget."""
    budget = tiled.parse_memory("3MB")
    result = compiled.kernels(*data, memory=budget)
    plan = compiled.kernel_function().last_plan
    assert plan.tile < N and len(plan.jobs) > 1
    assert plan.peak_bytes <= budget
    assert_close(result, reference)


def test_budget_counts_the_process(compiled, data, monkeypatch):
    monkeypatch.undo()
    baseline = tiled.process_baseline()
    assert baseline > tiled.RESERVE  # the resident set is read (Linux)
    for options in ({}, {"dtype": "float32"}):  # below the process itself: no output format helps (audit)
        with pytest.raises(ArgumentError, match="is below what this process uses already") as error:
            compiled.kernels(data[0], memory=baseline - tiled.RESERVE, **options)
        assert "float32" not in str(error.value) and "out=" not in str(error.value)
    compiled.kernels(data[0], memory=baseline + 2 * tiled.RESERVE)
    assert compiled.kernel_function().last_plan.peak_bytes <= baseline + 2 * tiled.RESERVE


def test_default_budget_is_beyond_what_the_process_holds(compiled, data, reference, monkeypatch):
    """Without a budget, a process already larger than 4 GB (a long session, a big data set
    loaded; the whole test suite reached it) still computes small kernels: the default is
    4 GB beyond what it holds (at most the memory available).  A budget given counts the
    whole process, as before."""
    held = 6 * 2**30
    monkeypatch.setattr(tiled, "process_baseline", lambda: held)
    monkeypatch.setattr(tiled, "available_bytes", lambda: 10 * 2**30)
    result = compiled.kernels(*data)
    for name, K in reference.items():
        assert np.array_equal(result[name], K)
    assert compiled.kernel_function().last_plan.peak_bytes <= held + 4 * 10**9
    with pytest.raises(ArgumentError, match=r"the budget of 4 GB is below what this process uses already"):
        compiled.kernels(*data, memory="4GB")
    monkeypatch.setattr(tiled, "available_bytes", lambda: 2**20)  # the machine nearly full: tiles of the memory left
    assert tiled.default_budget(held) == held + 2**20


def test_whole_call_within_budget_is_the_untiled_call(compiled, data, reference):
    result = compiled.kernels(*data)
    for name, K in reference.items():
        assert np.array_equal(result[name], K)
    result32 = compiled.kernels(*data, dtype="float32")
    for name, K in reference.items():
        assert result32[name].dtype == np.float32 and np.array_equal(result32[name], K.astype(np.float32))


def test_memory_mapped_float32_output(compiled, data, reference, tmp_path):
    """out=DIR/: one .npy per kernel, returned as read-only memory maps; float32 storage is the
    float64 result rounded once (computation in float64)."""
    result = compiled.kernels(*data, memory="1MB", out=str(tmp_path / "K") + "/", dtype="float32")
    for name, K in reference.items():
        assert isinstance(result[name], np.memmap) and not result[name].flags.writeable
        on_disk = np.load(tmp_path / "K" / f"{name}.npy")
        assert on_disk.dtype == np.float32 and np.array_equal(on_disk, K.astype(np.float32)), name
    prefixed = compiled.kernels(*data, memory="1MB", out=str(tmp_path / "run"))
    assert sorted(p.name for p in tmp_path.glob("run_*.npy")) == ["run_nngp.npy", "run_nngp_x2.npy",
                                                                 "run_ntk.npy", "run_ntk_x2.npy"]
    assert_close(prefixed, reference)


def test_files_of_a_run_that_fails_are_removed(compiled, data, reference, tmp_path, monkeypatch):
    """A run into out=DIR/ that stops in a tile (an error, an interrupt) leaves no kernel files:
    they would hold zeros where no tile was written, under the names of a finished run's."""
    kf = compiled.kernel_function()
    block, calls = kf.block, []

    def failing_block(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return block(*args)

    monkeypatch.setattr(kf, "block", failing_block)
    (tmp_path / "K").mkdir()
    (tmp_path / "K" / "nngp.npy").write_bytes(b"an earlier run's")
    with pytest.raises(KeyboardInterrupt):
        tiled.kernels(kf, data[0], tile=100, out=str(tmp_path / "K") + "/")
    assert len(calls) == 2 and list((tmp_path / "K").iterdir()) == []
    monkeypatch.setattr(kf, "block", block)
    # stopped before any tile, in the row values: the same
    rows = kf.rows
    monkeypatch.setattr(kf, "rows", lambda X: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        tiled.kernels(kf, data[0], tile=100, out=str(tmp_path / "K") + "/")
    assert list((tmp_path / "K").iterdir()) == []
    monkeypatch.setattr(kf, "rows", rows)
    # the second file cannot be opened (a folder of its name): the first is not left behind
    (tmp_path / "K" / "ntk.npy").mkdir()
    with pytest.raises(ArgumentError, match="cannot write"):
        tiled.kernels(kf, data[0], tile=100, out=str(tmp_path / "K") + "/")
    assert [p.name for p in (tmp_path / "K").iterdir()] == ["ntk.npy"]
    (tmp_path / "K" / "ntk.npy").rmdir()
    assert_close(tiled.kernels(kf, data[0], tile=100, out=str(tmp_path / "K") + "/"),
                 {k: reference[k] for k in ("nngp", "ntk")})
    # into new folders (out="new/sub/"): the folders it created go too, but not one that was there
    monkeypatch.setattr(kf, "block", failing_block)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        tiled.kernels(kf, data[0], tile=100, out=str(tmp_path / "new" / "sub") + "/")
    assert not (tmp_path / "new").exists()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        tiled.kernels(kf, data[0], tile=100, out=str(tmp_path / "K" / "sub") + "/")
    assert (tmp_path / "K").is_dir() and not (tmp_path / "K" / "sub").exists()


def test_progress_bar_counts_tiles(compiled, data, capsys):
    compiled.kernels(data[0], tile=100, progress=True)  # 3 blocks: 6 tiles of the upper triangle
    err = capsys.readouterr().err
    assert "6/6" in err and "tile" in err
    compiled.kernels(data[0], tile=100)  # stderr is not a terminal: quiet
    assert capsys.readouterr().err == ""


def test_bad_arguments(compiled, data, tmp_path):
    X, _ = data
    for memory in ("lots", "4 parsecs", "-1GB", 0):
        with pytest.raises(ArgumentError, match="memory: expected"):
            compiled.kernels(X, memory=memory)
    with pytest.raises(ArgumentError, match="too small: .* one 64 x 64 tile"):
        compiled.kernels(X, memory="20kB", out=str(tmp_path) + "/")
    with pytest.raises(ArgumentError, match="do not fit the budget.*out=DIRECTORY"):
        compiled.kernels(X, memory="300kB")
    with pytest.raises(ArgumentError, match="dtype"):
        compiled.kernels(X, dtype="float16")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ArgumentError, match="out: cannot"):
        compiled.kernels(X, out=str(blocker / "K") + "/")


def test_dask_tasks_equal_the_local_tiles(compiled, data, reference, tmp_path):
    """The same tiles as tasks on a 2-worker local cluster (threads in this process: fast and
    reliable in CI; real worker processes rebuild the kernel from the graph, tested below)."""
    distributed = pytest.importorskip("distributed")
    local = compiled.kernels(*data, tile=64)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        on_dask = compiled.kernels(*data, client=client, tile=64)
        to_files = compiled.kernels(*data, client=client, memory="1MB", out=str(tmp_path) + "/")
    assert_close(on_dask, local)
    assert_close(on_dask, reference)
    assert_close(to_files, reference)


def test_one_kernel_in_tiles_on_dask_and_in_files(compiled, data, reference, tmp_path):
    """``get``: the NNGP alone (its own derivation, test_one_kernel.py) in tiles, as tasks on a
    local cluster and in memory-mapped files: only its matrices, equal to both's NNGP."""
    distributed = pytest.importorskip("distributed")
    alone = {k: reference[k] for k in ("nngp", "nngp_x2")}
    assert_close(compiled.kernels(*data, tile=64, get="nngp"), alone)
    assert compiled.kernel_function(get="nngp").last_plan.tile == 64
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        assert_close(compiled.kernels(*data, client=client, tile=64, get="nngp"), alone)
    to_files = compiled.kernels(*data, memory="1MB", out=str(tmp_path) + "/", get="nngp")
    assert_close(to_files, alone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nngp.npy", "nngp_x2.npy"]


def test_a_worker_builds_the_kernel_it_is_asked_for(compiled, data, reference):
    """A worker process's KernelFunction computes the kernels of the one it stands for: the
    NTK alone gives one block, the NTK's."""
    X, _ = data
    kf = compiled.kernel_function(get="ntk")
    RF, R = kf.rows(X)
    key = "test-rebuild-ntk"
    try:
        block = tiled.remote_block(pickle.loads(pickle.dumps(kf.graph)), kf.rtol, key, (X[:50], RF[:50], R[:50]),
                                   (X[50:], RF[50:], R[50:]), False, kf.kernels)
        assert tiled._WORKER_KERNELS[key].kernels == ("ntk",)
    finally:
        tiled._WORKER_KERNELS.pop(key, None)
    (ntk,) = block
    assert_close({"ntk": ntk}, {"ntk": reference["ntk"][:50, 50:]})


def _bilinear(a: float):
    """h = xi_0 u_0 + a xi_1 u_1 + xi_2 u_2, relu, readout: programs of one generated source for
    every a (the coefficient is an input feature the source reads at run time)."""
    p = tp.Program("coefs")
    xi = p.input("xi", 3)
    us = [p.vec(f"u{j}") for j in range(3)]
    h = tp.add(*[(a if j == 1 else 1.0) * xi[j] * us[j] for j in range(3)]).named("h")
    p.readout(tp.relu(h).named("x"), sigma=1.0)
    return tp.compile(p)


def test_dask_workers_tell_programs_of_one_source_apart(data):
    """Workers kept one KernelFunction per generated source: a second program of the same
    source (other input features) got the first one's tiles, 41% off (cache audit)."""
    distributed = pytest.importorskip("distributed")
    X = data[0][:80, :3]
    first, second = _bilinear(0.5), _bilinear(0.7)
    assert first.kernel_function().source == second.kernel_function().source
    references = [c.kernel_function()(X) for c in (first, second)]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        on_dask = [c.kernels(X, client=client, tile=64) for c in (first, second)]
    for result, reference in zip(on_dask, references):
        assert_close(result, reference)


def test_worker_rebuilds_the_kernel_from_the_pickled_graph(compiled, data, reference):
    """What a worker process does: unpickle the program's graph, build its KernelFunction
    (the same generated code), compute a tile."""
    X, _ = data
    kf = compiled.kernel_function()
    RF, R = kf.rows(X)
    graph = pickle.loads(pickle.dumps(kf.graph))
    key = "test-rebuild"
    try:
        block = tiled.remote_block(graph, kf.rtol, key, (X[:50], RF[:50], R[:50]), (X[50:], RF[50:], R[50:]), False)
        assert tiled._WORKER_KERNELS[key] is not kf
    finally:
        tiled._WORKER_KERNELS.pop(key, None)
    assert_close(dict(zip(("nngp", "ntk"), block)), {k: reference[k][:50, 50:] for k in ("nngp", "ntk")})


# -- tpc kernels ---------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path, data):
    np.save(tmp_path / "X.npy", data[0])
    np.save(tmp_path / "X2.npy", data[1])
    return tmp_path


def tpc_kernels(files, *extra):
    return main(["kernels", str(MLP), *CLI_PARAMS, "--x", str(files / "X.npy"), *extra])


def test_cli_npz_contract_and_memory_mapped_directory(files, reference, capsys):
    assert tpc_kernels(files, "--x2", str(files / "X2.npy"), "--out", str(files / "K.npz"), "--memory", "2MB") == 0
    with np.load(files / "K.npz") as K:
        assert_close(dict(K), reference)
    assert tpc_kernels(files, "--x2", str(files / "X2.npy"), "--out", str(files / "D") + "/", "--memory", "1MB",
                       "--dtype", "float32") == 0
    for name, K in reference.items():
        assert np.array_equal(np.load(files / "D" / f"{name}.npy"), K.astype(np.float32)), name
    out = capsys.readouterr().out
    assert "D/nngp.npy (230, 230)" in out and "float32" in out and "earlier run" not in out
    # the same folder again for the NTK alone: the NNGP files left there are named as not this run's
    assert tpc_kernels(files, "--out", str(files / "D") + "/", "--get", "ntk") == 0
    out = capsys.readouterr().out
    assert "D/ntk.npy (230, 230)" in out
    assert "not written now, from an earlier run: " in out and "D/nngp.npy" in out.split("earlier run")[1]
    assert "D/ntk_x2.npy" in out.split("earlier run")[1] and "D/ntk.npy" not in out.split("earlier run")[1]


def test_cli_one_kernel(files, reference, capsys):
    assert tpc_kernels(files, "--x2", str(files / "X2.npy"), "--out", str(files / "N.npz"), "--get", "nngp") == 0
    with np.load(files / "N.npz") as K:
        assert_close(dict(K), {k: reference[k] for k in ("nngp", "nngp_x2")})
    assert "N.npz: nngp (230, 230), nngp_x2 (90, 230)" in capsys.readouterr().out


def one_line_error(capsys, code):
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("tpc: error:"), err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--memory", "lots"], "argument --memory: expected a memory size"),
    (["--memory", "-4GB"], "argument --memory: expected a positive memory size, got '-4GB'"),
    (["--memory", "-4G"], "argument --memory: expected a positive memory size, got '-4G'"),
    (["--memory", "20kB", "--out", "DIR/"], "--memory: the budget of 20 kB is too small"),
    (["--memory", "300kB", "--out", "K.npz"], "--memory: the kernels (2 matrices of 230 columns, float64: 0.846 MB)"),
    (["--out", "FILE/K/"], "--out: cannot create the directory"),
    (["--out", "K.npz", "--scheduler", "local:0"], "--scheduler: expected local:K"),
    (["--out", "K.npz", "--get", "nngg"], "--get: expected 'nngp', 'ntk' or both"),
])
def test_cli_bad_input(files, capsys, extra, message):
    (files / "FILE").write_text("")
    extra = [str(files / a) + ("/" if a.endswith("/") else "") if a.endswith(("/", ".npz")) else a for a in extra]
    if "--out" not in extra:
        extra += ["--out", str(files / "K.npz")]
    assert message in one_line_error(capsys, tpc_kernels(files, *extra))
    assert not (files / "DIR").exists()  # a new DIR/ of a refused run is not left behind, empty


def test_a_refused_run_removes_only_the_folders_it_created(files, capsys):
    """--out DIR/ of a run that fails: an empty DIR/ that was there before stays; new nested
    folders are removed up to the first one that existed."""
    (files / "old").mkdir()
    for out in ("old/", "old/new/deeper/"):
        one_line_error(capsys, tpc_kernels(files, "--memory", "20kB", "--out", str(files / out)))
    assert (files / "old").is_dir() and list((files / "old").iterdir()) == []


def test_without_dask(compiled, data, reference, files, capsys, monkeypatch):
    """The single-machine path never imports Dask; asking for a scheduler says how to get it."""
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    assert_close(compiled.kernels(data[0], tile=64), {k: reference[k] for k in ("nngp", "ntk")})
    err = one_line_error(capsys, tpc_kernels(files, "--out", str(files / "K.npz"), "--scheduler", "local:2"))
    assert "Dask is not installed" in err and "tpcompiler[dask]" in err
