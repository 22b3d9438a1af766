"""``init``: the communicator of this process (one process, MPI or NCCL) and its GPU.

Apart from ``comm.py`` because it picks between engines that build on ``comm.py``
(``nccl.NCCLCommunicator`` subclasses ``comm.MPICommunicator``): here both are imported,
and neither imports this module.
"""
from ..backend import BackendError
from .comm import Communicator, MPICommunicator
from .launcher import launched_by_mpi


def init(device="cpu", backend="auto"):
    """The communicator of this process, and (on GPUs) its device selected.

    device: "cpu" or "gpu" (already resolved, ``backend.resolve_device``).
    backend: "auto" (the default), "single", "mpi" or "nccl":

    * "auto": launched by ``mpiexec``/``srun`` (``launched_by_mpi``) → NCCL on GPUs, MPI on
      CPUs; otherwise the single process, without importing mpi4py.
    * "mpi" / "nccl" force that engine (mpi4py must be installed; "nccl" needs CuPy).

    On GPUs each rank uses GPU ``local_rank % n_gpus``, selected here: call ``init`` before
    any CuPy array is made.  Raises ``BackendError`` with a one-line reason when the engine
    cannot be had (mpi4py or CuPy missing), and ends the job with a message when the
    launcher started N processes but the MPI library that mpi4py loaded sees another number
    (a launcher from another MPI than the library: each process would train alone).
    """
    if backend not in ("auto", "single", "mpi", "nccl"):
        raise ValueError(f"backend must be auto, single, mpi or nccl, got {backend!r}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    launched, launcher_size = launched_by_mpi()
    if backend == "single" or (backend == "auto" and not launched):
        return Communicator()
    try:
        if device == "gpu" and backend in ("auto", "nccl"):
            from .nccl import NCCLCommunicator  # imports CuPy
            comm = NCCLCommunicator()
        else:
            comm = MPICommunicator()
            if device == "gpu":
                select_gpu(comm.local_rank)
    except ImportError as exc:
        raise BackendError(f"MPI was asked for (or this run was started by an MPI launcher) but "
                           f"{exc}; pip install -r requirements.txt") from None
    if launcher_size is not None and launcher_size != comm.size:
        comm.abort(f"the launcher started {launcher_size} processes but MPI sees {comm.size}: "
                   f"mpiexec and the MPI library that mpi4py loaded come from different MPIs "
                   f"(use the mpiexec installed with the mpich wheel, or set MPI4PY_LIBMPI to "
                   f"your cluster's libmpi.so)")
    return comm


def select_gpu(local_rank):
    """Make GPU ``local_rank % n_gpus`` CuPy's current device; returns its index."""
    import cupy  # GPU runs only
    index = local_rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(index).use()
    return index
