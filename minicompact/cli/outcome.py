"""How run.py ends: exit statuses, signals, and every rank taking each step together.

The one place that turns what can go wrong into an exit status and one line (run.py's
docstring lists them): 2 for a user's mistake before any training (``RunError``), 1 for a
failure during it, 128 + the signal's number after Ctrl-C (130) or SIGTERM (143).  Under
``mpiexec``/``srun`` every rank runs run.py's same flow; ``Ranks`` takes each of its steps
with the others (``comm.agree``), so one rank's failure stops all at the same point with one
message, and ``on_every_rank`` ends all ranks if one fails in a way they cannot agree on.
"""
import contextlib
import os
import signal
import sys
import warnings

from .. import backend
from ..data.loader import WorkerError
from ..distributed import init
from ..objective import NonFiniteLoss
from ..training.stopping import Interrupted, StopSignals
from ..training.trainer import NoImages, ReplicasDiffer
from .console import RunError, fail, fail_alone, one_line_warning, say


def exit_status(command):
    """``command()``'s exit status, with run.py's one-line errors and signals (module doc)."""
    old_format, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        with StopSignals(graceful=False) as stop:
            try:
                return command()
            except KeyboardInterrupt:  # a signal outside training, or a second one inside it
                signum = stop.signum or StopSignals.last_signum or signal.SIGINT
                say(f"\nrun.py: stopped by {signal.Signals(signum).name}; any checkpoint already "
                    "written is kept", sys.stderr)
                return 128 + signum
    except RunError as exc:  # before training (every rank stops here together)
        say(f"run.py: error: {exc}", sys.stderr)
        raise SystemExit(exc.code) from None
    finally:
        warnings.formatwarning = old_format


class Ranks:
    """The processes of this run (one without a launcher), each step taken by all of them.

    comm: the communicator; device: "cpu" or "gpu"; notes: warnings from choosing the device
    (said once the settings are known to be good).
    """

    def __init__(self, device_flag, precision):
        try:
            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always")
                self.device = backend.resolve_device(device_flag)
            backend.set_precision(precision)
            self.comm = init(self.device)  # one process without a launcher; mpiexec/srun: MPI (NCCL on GPUs)
        except backend.BackendError as exc:
            fail(str(exc))
        self.notes = [str(w.message) for w in notes]

    def each(self, fn, *args):
        """``fn(*args)`` on every rank; a ``RunError`` of one is raised by all."""
        return self.comm.agree(fn, *args, errors=RunError)

    def root(self, fn, *args):
        """``fn(*args)`` on rank 0, its result sent to all; a ``RunError`` raised by all."""
        return self.comm.agree(fn, *args, root_only=True, errors=RunError)

    def root_first(self, fn, *args):
        """``fn(*args)`` on rank 0, then on the others (rank 0 builds what they then read)."""
        return self.comm.agree(fn, *args, root_first=True, errors=RunError)

    def summary(self, s):
        """", 4 ranks x batch 32 = global batch 128" for run.py's first line ("" for one process)."""
        if self.comm.size == 1:
            return ""
        return (f", {self.comm.size} ranks x batch {s.batch_size} = global batch {s.global_batch}"
                f"{' (sync-BN)' if s.sync_bn else ''}")

    def run(self, flow, *args):
        """``flow(self, *args)`` on every rank; any failure of one rank ends them all
        (``abort_on_failure``) rather than leaving them waiting for it."""
        comm = self.comm
        with comm.abort_on_failure():
            try:
                return flow(self, *args)
            except RunError as exc:
                agreed = exc
            except KeyboardInterrupt:
                if comm.size == 1:
                    raise
                signum = StopSignals.last_signum or signal.SIGINT
                comm.abort(f"run.py: stopped by {signal.Signals(signum).name}; ending all {comm.size} "
                           "ranks; any checkpoint already written is kept", 128 + signum)
        raise agreed


def removing_unused(folder, work):
    """``work()``'s exit status; a new default run folder left empty by a failure is removed.
    A ``RunError`` raised by every rank is printed here as one line."""
    code = None
    try:
        code = work()
    except RunError as exc:
        say(f"run.py: error: {exc}", sys.stderr)
        code = exc.code
    finally:
        if code != 0 and folder:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return code


def training_status(comm, out, work):
    """``work()`` (train and report), or the exit status of how it stopped: a signal (the
    checkpoint written), a diverged loss, an unreadable split, a dead decoding worker, a full
    disk.  Interrupted, NonFiniteLoss, NoImages and ReplicasDiffer are raised by every rank
    at once; the others are a failure of this rank alone (``fail_alone``)."""
    try:
        return work()
    except Interrupted as exc:
        say(f"\nrun.py: {exc} by {signal.Signals(exc.signum).name}; checkpoint written: "
            f"{os.path.join(out, 'last.npz')} (continue with --resume)", sys.stderr)
        return 128 + exc.signum
    except NonFiniteLoss as exc:
        say(f"\nrun.py: stopped: {exc}", sys.stderr)
        return 1
    except (NoImages, ReplicasDiffer) as exc:
        raise RunError(f"stopped: {exc}", 1) from None
    except WorkerError as exc:
        fail_alone(comm, f"stopped: {exc}")
    except OSError as exc:  # a full disk, a folder made read-only during the run
        where = f" {exc.filename}" if exc.filename else ""
        fail_alone(comm, f"cannot write{where}: {exc.strerror or exc}; the last checkpoint written is kept")
