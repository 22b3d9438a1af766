"""What the MPI launcher (``mpiexec``, ``srun``) tells a process through its environment.

Read before MPI is started — and before NumPy is imported, so this module imports neither:
run.py uses it to print a bad flag's message on rank 0 only and to share the CPU cores
between the ranks of a node before OpenBLAS starts its threads.
"""
import os
import sys
import warnings

# Variables that MPI launchers set in every process they start.  None is set by a plain
# ``python run.py``, so a single-process run never imports mpi4py.
_SIZE = ("PMI_SIZE",               # MPICH's hydra (the mpich wheel), Intel MPI, srun --mpi=pmi2
         "OMPI_COMM_WORLD_SIZE",   # Open MPI
         "MV2_COMM_WORLD_SIZE")    # MVAPICH
_RANK = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK",
         "PMIX_RANK")              # PMIx launchers (srun --mpi=pmix, prterun): no size variable
_LOCAL_SIZE = ("MPI_LOCALNRANKS",              # hydra (MPICH, Intel MPI)
               "OMPI_COMM_WORLD_LOCAL_SIZE",   # Open MPI
               "MV2_COMM_WORLD_LOCAL_SIZE")    # MVAPICH
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _first_int(env, names):
    for name in names:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def launched_by_mpi(environ=None):
    """(launched, size): whether an MPI launcher started this process, and the number of
    processes it says it started (None when the launcher does not say)."""
    env = os.environ if environ is None else environ
    size = _first_int(env, _SIZE)
    if size is not None:
        return True, size
    return any(name in env for name in _RANK), None


def launcher_rank(environ=None):
    """This process's rank as the launcher numbered it (None without a launcher)."""
    return _first_int(os.environ if environ is None else environ, _RANK)


def is_first_process(environ=None):
    """True unless a launcher started this process as a rank other than 0: the process that
    prints what every rank would print alike (a bad flag's message, notes)."""
    return launcher_rank(environ) in (None, 0)


def share_cores(environ=None, cores=None, machine_cores=None):
    """Give each of the launcher's ranks on this node its share of the cores for BLAS threads.

    Without this, N ranks on a node each start one OpenBLAS thread per core: N times too many
    threads, which wait on each other and for the cores (docs/data-parallel.md has the figure).
    Sets OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS to cores // ranks per node
    (at least 1) — as ``torchrun`` sets OMP_NUM_THREADS — but only when the launcher says how
    many ranks share the node, more than one do, and the user has set none of the three.
    cores: the CPUs this process may run on (default: its affinity mask); when that is fewer
    than machine_cores (default: ``os.cpu_count()``), the launcher or scheduler bound each
    rank to its own cores, and they are all this rank's.
    Must run before NumPy is imported: the BLAS that NumPy loads reads these variables once, when
    it starts its threads.  Called later, it still sets them (for child processes) but warns
    that this process's BLAS keeps the threads it started with.  Returns the number set, or None.
    """
    env = os.environ if environ is None else environ
    local = _first_int(env, _LOCAL_SIZE)
    if not launched_by_mpi(env)[0] or not local or local < 2 or any(v in env for v in THREAD_VARIABLES):
        return None
    machine_cores = machine_cores or os.cpu_count() or 1
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine_cores
    threads = cores if cores < machine_cores else max(1, cores // local)
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    if environ is None and "numpy" in sys.modules:
        # Not only slower: OpenBLAS's float32 products round differently with another number
        # of threads, so such a launch (a script that imports NumPy, then calls run.main)
        # trains differently from `mpiexec ... run.py`, and a run resumed across the two is
        # not bit-identical to an uninterrupted one.
        warnings.warn(f"NumPy was imported before share_cores(): its BLAS keeps its own threads "
                      f"instead of {threads} per rank; call share_cores() before importing NumPy",
                      RuntimeWarning, stacklevel=2)
    return threads
