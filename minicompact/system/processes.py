"""Child processes that never outlive their parent, and a test for a live process id.

A decoding worker blocked on its job queue does not notice that the main process died: with
the "fork" start method it holds both ends of the queue's pipe itself, so the pipe never
closes.  ``die_with_parent`` (run first thing in a worker) covers every way a parent can end,
``kill -9`` included:

* on Linux the kernel kills the worker the moment its parent exits
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, through ctypes);
* everywhere, a daemon thread watches the parent: on POSIX the worker's parent id changes
  when the parent dies (the orphan is adopted by init or a subreaper), elsewhere the
  parent's process sentinel becomes ready; either way the worker exits.

``PR_SET_PDEATHSIG`` fires when the *thread* that started the worker ends, so start worker
pools from a thread that lives as long as the pool (the main thread, in minicompact).
"""
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
POLL_SECONDS = 0.5


def pid_alive(pid):
    """True when a process ``pid`` exists (or when that cannot be told: assume it does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but not ours, or cannot tell
    return True


def _kill_on_parent_exit():
    """Linux: have the kernel send SIGKILL to this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_ppid(parent_pid, interval):
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(1)


def _watch_sentinel(sentinel):
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def die_with_parent(parent_pid, interval=POLL_SECONDS):
    """Make this (child) process exit when process ``parent_pid``, its parent, ends.

    Call it first thing in the child, e.g. as a pool's ``initializer``; ``parent_pid`` is
    ``os.getpid()`` taken in the parent, so a parent that died before this call is noticed.
    """
    _kill_on_parent_exit()
    if os.name == "posix":
        if os.getppid() != parent_pid:  # already orphaned before the kernel request took hold
            os._exit(1)
        target, args = _watch_ppid, (parent_pid, interval)
    else:
        parent = multiprocessing.parent_process()
        if parent is None or parent.sentinel is None:
            return
        target, args = _watch_sentinel, (parent.sentinel,)
    threading.Thread(target=target, args=args, name="watch-parent", daemon=True).start()
