"""Data-parallel training: the one-process communicator, sharding, sync batch-norm on one
rank, and the multi-rank checks of tests/mpi_checks.py launched here with ``mpiexec -n 2``.

The multi-rank tests skip, saying why, only when no MPI runtime is installed (mpi4py and the
mpich wheel come with requirements.txt).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

from minicompact.backend import to_cpu
from minicompact.data.sharding import eval_shard, rank_batch, steps_per_epoch
from minicompact.distributed import Communicator, GradientAllReduce, init, launched_by_mpi
from minicompact.distributed.launcher import (THREAD_VARIABLES, is_first_process, launcher_rank,
                                              share_cores)
from minicompact.gradcheck import check_layer
from minicompact.layers.batchnorm import BatchNorm2D
from minicompact.distributed.sync_batchnorm import SyncBatchNorm2D, use_sync_batchnorm
from minicompact.model import CompactNet, ModelConfig
from minicompact.objective import objective

HERE = os.path.dirname(os.path.abspath(__file__))


# -- the one-process communicator ----------------------------------------------------------
def test_single_process_collectives_are_the_identity():
    comm = Communicator()
    assert (comm.rank, comm.size, comm.local_rank, comm.is_root) == (0, 1, 0, True)
    x = np.array([1.5, -2.0], dtype=np.float32)
    assert comm.allreduce(x) is x and comm.allreduce(x, op="mean") is x
    assert comm.broadcast(x) is x and x.tolist() == [1.5, -2.0]
    assert comm.sum([np.float32(0.5), 3]) == [0.5, 3.0]
    assert comm.broadcast_object({"a": 1}) == {"a": 1} and comm.gather_object(7) == [7]
    with pytest.raises(ValueError, match="op must be"):
        comm.allreduce(x, op="max")
    with pytest.raises(SystemExit):
        comm.abort("stop")
    with pytest.raises(SystemExit), comm.abort_on_failure():  # one process: just exits
        sys.exit(2)


def test_launcher_detection(monkeypatch):
    assert launched_by_mpi({}) == (False, None)
    assert launched_by_mpi({"PMI_SIZE": "4", "PMI_RANK": "1"}) == (True, 4)
    assert launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "2"}) == (True, 2)
    assert launched_by_mpi({"PMIX_RANK": "0"}) == (True, None)
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert type(init("cpu")) is Communicator  # plain `python run.py`: no MPI at all


def test_launcher_rank_and_the_first_process():
    assert launcher_rank({}) is None and is_first_process({})
    assert launcher_rank({"PMI_RANK": "3"}) == 3 and not is_first_process({"PMI_RANK": "3"})
    assert launcher_rank({"OMPI_COMM_WORLD_RANK": "0"}) == 0 and is_first_process({"PMIX_RANK": "0"})


def test_ranks_of_a_machine_share_its_cores_for_blas():
    env = {"PMI_SIZE": "2", "PMI_RANK": "1", "MPI_LOCALNRANKS": "2"}
    assert share_cores(env, cores=8, machine_cores=8) == 4
    assert {k: env[k] for k in THREAD_VARIABLES} == dict.fromkeys(THREAD_VARIABLES, "4")
    three = {"PMI_SIZE": "3", "MPI_LOCALNRANKS": "3"}
    assert share_cores(three, cores=2, machine_cores=2) == 1  # at least one thread each
    bound = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    assert share_cores(bound, cores=6, machine_cores=24) == 6  # already given its own cores
    for env in ({}, {"PMI_SIZE": "2"}, {"PMI_SIZE": "1", "MPI_LOCALNRANKS": "1"},
                {"PMI_SIZE": "2", "MPI_LOCALNRANKS": "2", "OMP_NUM_THREADS": "3"}):
        before = dict(env)
        assert share_cores(env, cores=8, machine_cores=8) is None and env == before


def test_agree_on_one_process_is_the_call():
    comm = Communicator()
    assert comm.agree(lambda a, b: a + b, 1, 2) == 3
    assert comm.agree(lambda: "root", root_only=True) == comm.agree(lambda: "root", root_first=True) == "root"
    with pytest.raises(KeyError):
        comm.agree({}.__getitem__, "missing", errors=KeyError)


def test_importing_the_launcher_imports_no_numpy():
    code = ("import sys; import minicompact.distributed.launcher; "
            "sys.exit('numpy' in sys.modules or 'minicompact.distributed.comm' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(HERE),
                                                                  os.environ.get("PYTHONPATH")) if p))
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


def test_sharing_cores_after_numpy_is_imported_warns():
    """NumPy's BLAS reads the thread variables once, when NumPy is imported: share_cores() after
    that shares nothing, and says so (with one BLAS thread per core, float32 products round
    differently, so such a launch does not train bit-identically to `mpiexec ... run.py`)."""
    env = dict(os.environ, PMI_SIZE="2", PMI_RANK="0", MPI_LOCALNRANKS="2",  # as mpiexec -n 2
               PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(HERE), os.environ.get("PYTHONPATH")) if p))
    for name in THREAD_VARIABLES:
        env.pop(name, None)
    code = ("{first}from minicompact.distributed.launcher import share_cores; "
            "import os; print(share_cores(), os.environ['OPENBLAS_NUM_THREADS'])")
    runs = {first: subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code.format(first=first)],
                                  env=env, capture_output=True, text=True, check=False)
            for first in ("", "import numpy; ")}
    before, after = runs[""], runs["import numpy; "]
    threads = max(1, len(os.sched_getaffinity(0)) // 2) if hasattr(os, "sched_getaffinity") else None
    assert before.returncode == 0 and before.stderr == "", before.stderr
    assert threads is None or before.stdout == f"{threads} {threads}\n", before.stdout
    assert after.returncode != 0 and "RuntimeWarning: NumPy was imported before share_cores()" in after.stderr, after.stderr


def test_nccl_module_is_never_imported_without_a_gpu_run():
    assert "minicompact.distributed.nccl" not in sys.modules


# -- sharding --------------------------------------------------------------------------------
@pytest.mark.parametrize("n, batch, size", [(23, 4, 2), (24, 4, 2), (17, 3, 3), (5, 2, 4),
                                            (10, 5, 1)])
def test_ranks_split_every_global_batch_of_one_process(n, batch, size):
    order = np.random.default_rng(n).permutation(n)
    steps = steps_per_epoch(n, batch, size)
    assert steps == -(-n // (batch * size))
    seen = []
    for step in range(steps):
        parts = [rank_batch(order, step, batch, r, size) for r in range(size)]
        lengths = [len(p) for p in parts]
        assert max(lengths) <= batch and max(lengths) - min(lengths) <= 1, lengths
        # the ranks' parts, in rank order, are exactly one process's batch of size·batch
        whole = order[step * batch * size:(step + 1) * batch * size]
        assert np.array_equal(np.concatenate(parts), whole)
        seen += [i for p in parts for i in p.tolist()]
    assert sorted(seen) == list(range(n))  # each image once per epoch, on one rank


def test_drop_last_drops_the_short_global_batch():
    assert steps_per_epoch(23, 4, 2, drop_last=True) == 2
    assert steps_per_epoch(24, 4, 2, drop_last=True) == 3


@pytest.mark.parametrize("n, size", [(10, 3), (2, 4), (7, 1)])
def test_eval_shards_cover_the_set_once(n, size):
    parts = [np.arange(n)[eval_shard(n, r, size)] for r in range(size)]
    assert np.array_equal(np.concatenate(parts), np.arange(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


# -- sync batch-norm on one rank: BatchNorm2D, bit for bit -----------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sync_batchnorm_on_one_rank_is_batchnorm_bit_for_bit(xp, device, dtype):
    rng = np.random.default_rng(0)
    plain = BatchNorm2D(3, momentum=0.3, dtype=dtype).to(device)
    plain.params["gamma"][:] = xp.asarray(rng.uniform(0.5, 2, 3).astype(dtype))
    sync = SyncBatchNorm2D.from_batchnorm(BatchNorm2D(3, momentum=0.3, dtype=dtype).to(device),
                                          Communicator())
    sync.params["gamma"][:] = plain.params["gamma"]
    for step in range(3):
        x = xp.asarray((rng.standard_normal((4, 3, 5, 6)) * (step + 1) + 2).astype(dtype))
        dout = xp.asarray(rng.standard_normal(x.shape).astype(dtype))
        out_p, out_s = plain.forward(x), sync.forward(x)
        dx_p, dx_s = plain.backward(dout), sync.backward(dout)
        for a, b in [(out_p, out_s), (dx_p, dx_s)] + [
                (plain.grads[k], sync.grads[k]) for k in ("gamma", "beta")] + [
                (plain.buffers[k], sync.buffers[k]) for k in ("running_mean", "running_var")]:
            assert a.dtype == b.dtype == dtype
            assert bool((a == b).all())


def test_sync_batchnorm_gradcheck_on_one_rank():
    sync = SyncBatchNorm2D(3, Communicator(), dtype=np.float64)
    sync.params["gamma"] = np.random.default_rng(1).uniform(0.5, 2, 3)
    x = np.random.default_rng(2).standard_normal((3, 3, 4, 5)) + 0.5
    # The stencil of test_batchnorm.py: over 40 seeds the two-point default reached 1.1e-6
    # (a pass at tol 1e-7 was luck), the five-point one with h = 1e-3 at most 1.8e-8.
    assert set(check_layer(sync, x, seed=3, h=1e-3, points=4)) == {"x", "gamma", "beta"}


def test_use_sync_batchnorm_shares_parameters_and_keeps_the_output():
    model = CompactNet(ModelConfig(depth=3, num_classes=4, width_mult=1 / 64, stem="small"), seed=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    old_bns = list(model.bns)
    want = model.forward(x)
    use_sync_batchnorm(model, Communicator())
    assert all(isinstance(bn, SyncBatchNorm2D) for bn in model.bns)
    assert all(new.params is old.params and new.buffers is old.buffers
               for new, old in zip(model.bns, old_bns))
    assert sum(isinstance(layer, SyncBatchNorm2D) for layer in model.layers) == len(old_bns)
    np.testing.assert_array_equal(model.forward(x), want)


def test_gradient_all_reduce_on_one_rank_keeps_the_gradients(xp, device):
    model = CompactNet(ModelConfig(depth=3, num_classes=4, width_mult=1 / 64, stem="small"),
                       seed=0, dtype=np.float64).to(device)
    x = xp.asarray(np.random.default_rng(0).standard_normal((3, 3, 8, 8)))
    y = xp.asarray(np.array([0, 3, 1]))
    _, want_loss, _ = objective(model, x, y)
    want = {(i, k): to_cpu(g).copy() for i, layer in enumerate(model.param_layers)
            for k, g in layer.grads.items()}
    reducer = GradientAllReduce(Communicator(), model)
    _, loss, _ = objective(model, x, y, reduce_gradients=reducer)
    assert abs(float(loss) - float(want_loss)) < 1e-15
    for i, layer in enumerate(model.param_layers):
        for k, g in layer.grads.items():
            np.testing.assert_allclose(to_cpu(g), want[i, k], rtol=1e-15, atol=1e-18)
    reducer.flat.fill(0)  # every gradient is a view of the persistent buffer: no copies out
    assert all(not to_cpu(g).any() for layer in model.param_layers for g in layer.grads.values())


# -- several ranks: mpiexec -n 2 -------------------------------------------------------------
def find_mpiexec():
    """The mpiexec installed beside this Python (with the mpich wheel), else one on PATH, or None."""
    beside = os.path.join(sysconfig.get_path("scripts"), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def mpi_runtime_problem():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -r requirements.txt)"
    if find_mpiexec() is None:
        return "no mpiexec found (pip install -r requirements.txt installs the mpich wheel's)"
    return None


def run_ranks(check, ranks=2, timeout=120):
    """Run tests/mpi_checks.py CHECK on ``ranks`` processes; returns (returncode, output, s)."""
    problem = mpi_runtime_problem()
    if problem:
        pytest.skip(problem)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               # Open MPI refuses to start as root without these (MPICH ignores them)
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(HERE), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.run([find_mpiexec(), "-n", str(ranks), sys.executable,
                           os.path.join(HERE, "mpi_checks.py"), check],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


@pytest.mark.parametrize("check", [
    "communicator",
    "broadcast_weights",
    "gradients_are_the_weighted_mean_of_the_parts",
    "per_rank_batchnorm_steps",
    "sync_batchnorm_steps",
    "sync_batchnorm_gradcheck",
    "sharded_evaluation",
    "per_rank_batchnorm_buffers_follow_the_global_batch",
    "agree",
])
def test_two_ranks(check):
    code, output, _ = run_ranks(check)
    assert code == 0 and f"OK {check}" in output, output


def test_a_failing_rank_ends_the_job_instead_of_hanging():
    code, output, _ = run_ranks("abort_ends_every_rank", timeout=60)
    assert code != 0, output
    assert "a deliberate failure on rank 1" in output, output
    assert "RuntimeError on this rank: ending all 2 ranks" in output, output


def test_an_exiting_rank_ends_the_job_instead_of_hanging():
    code, output, _ = run_ranks("exit_ends_every_rank", timeout=60)
    assert code == 3 and "exit status 3; ending all 2 ranks" in output, (code, output)
