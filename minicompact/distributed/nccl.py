"""All-reduce of CuPy arrays with NCCL; MPI for everything else.  RUN WITH ONE RANK ONLY.

Written from CuPy's ``cupy.cuda.nccl`` documentation while no GPU was available; since run
on one H200 with one rank (``mpiexec -n 1 python bench/bench_data_parallel.py --device gpu``:
set-up, the unique id over MPI, training steps through the all-reduce), never with several
GPUs (docs/gpu.md).  Importing this module imports CuPy, so nothing imports it unless a GPU
run asks for NCCL (``distributed.init(device="gpu")``); the CPU test suite never does.

Setup, as NCCL's multi-process recipe (one process per GPU):

1. MPI starts the processes; each selects GPU ``local_rank % n_gpus`` (before any CuPy
   array exists, so every allocation lands there);
2. rank 0 asks NCCL for a unique id (128 opaque bytes) and MPI broadcasts it;
3. every rank builds ``NcclCommunicator(size, id, rank)`` (a collective call: it returns
   once all ranks have joined).

Collectives are enqueued on CuPy's current stream, so they are ordered with the kernels
before and after them without a host synchronisation.  NCCL reduces a buffer with a ring
(or tree) algorithm over NVLink, PCIe or the network: every rank ends with the same bits.
"""
import cupy
from cupy.cuda import nccl

from ..backend import BackendError, is_gpu_array
from .checks import check_buffer, check_op
from .comm import MPICommunicator

_NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
               "int32": "NCCL_INT32", "int64": "NCCL_INT64", "uint8": "NCCL_UINT8"}


def _nccl_type(dtype):
    name = _NCCL_TYPES.get(str(dtype))
    if name is None:
        raise TypeError(f"NCCL collectives take {sorted(_NCCL_TYPES)}, got {dtype}")
    return getattr(nccl, name)


class NCCLCommunicator(MPICommunicator):
    """``MPICommunicator`` whose ``allreduce`` and ``broadcast`` of CuPy arrays go through NCCL.

    NumPy arrays, host numbers and objects still go through MPI (``sum``, ``broadcast_object``,
    ``barrier``, ``abort``).  ``device`` is the index of this rank's GPU.
    """

    backend = "nccl"

    def __init__(self, mpi_comm=None):
        super().__init__(mpi_comm)
        if not getattr(nccl, "available", False):
            raise BackendError("CuPy was built without NCCL; use backend='mpi' (slower: "
                               "gradients are staged through host memory)")
        self.device = self.local_rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.device).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, uid, self.rank)

    def allreduce(self, x, op="sum"):
        if not is_gpu_array(x):
            return super().allreduce(x, op)
        check_op(op)
        check_buffer(x, "allreduce")
        stream = cupy.cuda.get_current_stream().ptr
        # In place (send buffer = receive buffer) is allowed by NCCL.
        self.nccl.allReduce(x.data.ptr, x.data.ptr, x.size, _nccl_type(x.dtype), nccl.NCCL_SUM,
                            stream)
        if op == "mean":
            x /= self.size
        return x

    def broadcast(self, x, root=0):
        if not is_gpu_array(x):
            return super().broadcast(x, root)
        check_buffer(x, "broadcast")
        stream = cupy.cuda.get_current_stream().ptr
        self.nccl.bcast(x.data.ptr, x.size, _nccl_type(x.dtype), root, stream)
        return x

    def abort(self, message, code=1):
        """Abort the NCCL communicator (so no rank stays in a kernel waiting for a peer),
        then every MPI rank."""
        try:
            self.nccl.abort()
        except Exception:  # noqa: BLE001 - ending anyway
            pass
        super().abort(message, code)
