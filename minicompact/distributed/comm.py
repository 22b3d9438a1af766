"""Communicators: one interface, three engines (one process, MPI on CPUs, NCCL on GPUs).

Every rank of a data-parallel run holds a ``Communicator`` and calls the same collectives in
the same order::

    comm.rank, comm.size, comm.local_rank     # this process; how many; its index on this node
    comm.allreduce(x, op="sum" | "mean")      # in place on a contiguous array; returns x
    comm.broadcast(x, root=0)                 # in place: every rank gets root's x
    comm.sum([loss_sum, n, ...])              # a few host numbers (logs, counts) -> floats
    comm.broadcast_object(obj), comm.gather_object(obj)   # small picklable objects
    comm.barrier()
    comm.agree(fn, *args)                     # fn on every rank; one rank's failure raised on all
    comm.abort(message)                       # end every rank now, with a message
    with comm.abort_on_failure(): main()      # one rank's failure or exit(N) ends them all

* ``Communicator`` (this module) is the single process: size 1, every collective is the
  identity (nothing is copied, nothing is rounded), so ``python run.py`` is unchanged.
* ``MPICommunicator`` (this module) uses mpi4py on NumPy arrays (a CuPy array is staged
  through host memory).  mpi4py is imported only when a run was launched by ``mpiexec``/``srun``
  (``launched_by_mpi``) or MPI is asked for.
* ``NCCLCommunicator`` (``distributed/nccl.py``) reduces CuPy arrays with NCCL and keeps MPI
  for everything else.

``start.init`` picks one of them.
"""
import contextlib
import os
import sys
import time
import traceback

import numpy as np

from ..backend import is_gpu_array, to_cpu
from .checks import check_buffer, check_op

class Communicator:
    """The single process: rank 0 of 1, every collective the identity.

    This is also the interface the other communicators implement; code written against it
    runs unchanged with one process or many.
    """

    backend = "single"

    def __init__(self):
        self.rank, self.size = 0, 1
        self.local_rank, self.local_size = 0, 1

    @property
    def is_root(self):
        """True on rank 0, the rank that writes logs, checkpoints and the report."""
        return self.rank == 0

    def allreduce(self, x, op="sum"):
        """Σ (or the mean) over ranks of the array x (any shape, C-contiguous), in place.

        Every rank passes an array of the same shape and dtype and gets the same result, bit
        for bit.  Returns x.
        """
        check_op(op)
        return x

    def broadcast(self, x, root=0):
        """Overwrite x (C-contiguous, same shape and dtype on every rank) with root's x."""
        return x

    def sum(self, values):
        """Σ over ranks of a few host numbers (Python or NumPy scalars) → list of floats,
        identical on every rank (summed in float64: integers below 2^53 stay exact)."""
        return [float(v) for v in values]

    def broadcast_object(self, obj, root=0):
        """Root's picklable ``obj`` on every rank."""
        return obj

    def gather_object(self, obj, root=0):
        """On root: the list of every rank's ``obj``, in rank order; None on other ranks."""
        return [obj]

    def barrier(self):
        """Wait until every rank has reached this call."""

    def agree(self, fn, *args, root_only=False, root_first=False, errors=(Exception,)):
        """``fn(*args)`` as one step of the whole group: its result, or one failure for all.

        Every rank runs fn and gets its own result; root_only: rank 0 alone runs it, and its
        result is sent to every rank; root_first: rank 0 runs it, then the others do (say,
        rank 0 builds a cache that the others then open).
        If fn raises one of ``errors`` on any rank, every rank raises the same exception —
        rank 0's, else the lowest failing rank's — so all ranks stop at the same point, the
        same way, instead of some waiting for the others in a collective for ever.  fn must
        not itself call collectives (a rank that failed before one would leave the others
        waiting in it); the exceptions and root_only's result must be picklable.
        Here (one process): fn(*args).
        """
        return fn(*args)

    def abort(self, message, code=1):
        """End every rank now with ``message`` on stderr and exit status ``code`` (here: the
        one process, through ``SystemExit``)."""
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)

    @contextlib.contextmanager
    def abort_on_failure(self):
        """Around a rank's whole program: with several ranks, an exception or a non-zero
        ``sys.exit`` on one rank ends every rank (``MPICommunicator``); here, nothing."""
        yield

    def __repr__(self):
        return (f"{type(self).__name__}(rank {self.rank} of {self.size}, "
                f"local rank {self.local_rank} of {self.local_size})")


class MPICommunicator(Communicator):
    """Collectives over MPI (mpi4py), on NumPy arrays.

    mpi_comm: an ``mpi4py.MPI.Comm`` (default ``COMM_WORLD``).  ``local_rank`` is the rank
    among the processes of this node (``Split_type(COMM_TYPE_SHARED)``), which picks the GPU.

    A CuPy array passed to ``allreduce`` or ``broadcast`` is copied to the host, reduced and
    copied back (a CUDA-aware MPI could take device pointers, but the MPI wheels are not
    CUDA-aware); on GPUs ``NCCLCommunicator`` is the fast path.

    With more than one rank an uncaught exception on any rank ends the whole job
    (``abort``) instead of leaving the other ranks waiting in a collective forever.
    """

    backend = "mpi"

    def __init__(self, mpi_comm=None):
        from mpi4py import MPI  # only when MPI is wanted
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        if self.size > 1:
            _abort_on_uncaught_exception(self)

    def allreduce(self, x, op="sum"):
        check_op(op)
        check_buffer(x, "allreduce")
        if self.size == 1:
            return x
        if is_gpu_array(x):
            host = to_cpu(x)  # a copy
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
            x.set(host)
        else:
            self.comm.Allreduce(self.MPI.IN_PLACE, x, op=self.MPI.SUM)
        if op == "mean":
            x /= self.size
        return x

    def broadcast(self, x, root=0):
        check_buffer(x, "broadcast")
        if self.size == 1:
            return x
        if is_gpu_array(x):
            host = to_cpu(x)
            self.comm.Bcast(host, root=root)
            x.set(host)
        else:
            self.comm.Bcast(x, root=root)
        return x

    def sum(self, values):
        buf = np.array([float(v) for v in values], dtype=np.float64)
        if self.size > 1 and buf.size:
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf.tolist()

    def broadcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def gather_object(self, obj, root=0):
        return self.comm.gather(obj, root=root)

    def barrier(self):
        self.comm.Barrier()

    def agree(self, fn, *args, root_only=False, root_first=False, errors=(Exception,)):
        if root_first:
            first = self.agree(lambda: fn(*args) if self.rank == 0 else None, errors=errors)
            later = self.agree(lambda: None if self.rank == 0 else fn(*args), errors=errors)
            return first if self.rank == 0 else later
        result, error = None, None
        if self.rank == 0 or not root_only:
            try:
                result = fn(*args)
            except errors as exc:
                error = exc
        failures = self.comm.gather(error, root=0)
        first = next((e for e in failures if e is not None), None) if self.rank == 0 else None
        first = self.comm.bcast(first, root=0)
        if first is not None:
            raise first
        return self.comm.bcast(result, root=0) if root_only else result

    def abort(self, message, code=1):
        """Print ``message`` (prefixed with this rank) and end every rank with MPI_Abort."""
        print(f"[rank {self.rank} of {self.size}] {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        time.sleep(0.5)  # the launcher forwards what this rank printed before it ends the job
        self.comm.Abort(code)
        # MPICH's MPI_Abort returns, and the launcher then kills every rank: wait for that
        # without running more of the program (which would print again), but not for ever.
        time.sleep(10)
        os._exit(code)

    @contextlib.contextmanager
    def abort_on_failure(self):
        """Around a rank's whole program (run.py's main): an exception, Ctrl-C or a non-zero
        ``sys.exit`` on one rank ends every rank with ``abort``.

        A rank that merely exits while the others wait in a collective leaves them waiting
        for ever (MPI_Finalize waits for them); uncaught exceptions are also covered outside
        this block (``init`` installs an excepthook), but ``SystemExit`` never reaches it.
        """
        try:
            yield
        except SystemExit as exc:
            if self.size > 1 and exc.code not in (None, 0):
                code = exc.code if isinstance(exc.code, int) else 1
                self.abort(f"{exc.code if isinstance(exc.code, str) else f'exit status {code}'}"
                           f"; ending all {self.size} ranks", code)
            raise
        except BaseException as exc:
            if self.size > 1:
                traceback.print_exc()
                self.abort(_ending_message(exc, self.size), 130 if isinstance(exc, KeyboardInterrupt) else 1)
            raise


def _abort_on_uncaught_exception(comm):
    """Make an uncaught exception end all ranks (after printing its traceback as usual).

    Without this, a rank that dies of an exception leaves the others blocked in their next
    collective.  (``python -m mpi4py script.py`` does the same for a whole script.)
    """
    if getattr(sys.excepthook, "ends_all_ranks", False):
        return  # installed by an earlier communicator
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        comm.abort(_ending_message(value, comm.size))

    hook.ends_all_ranks = True
    sys.excepthook = hook


def _ending_message(exc, size):
    return f"{type(exc).__name__} on this rank: ending all {size} ranks"
