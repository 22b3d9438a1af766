"""Stopping a run on request: Ctrl-C and SIGTERM as one request, the same on every rank.

``StopSignals`` turns the first signal into a flag the training loop checks between steps
(so the step in flight finishes and a checkpoint can be written) and a second one into an
immediate ``KeyboardInterrupt``.  ``stop_votes``/``agreed_stop`` turn each rank's flag into
numbers the ranks sum together, so that all ranks stop after the same step.  ``Interrupted``
is what the loop raises once it has stopped.
"""
import signal


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived; a checkpoint was written at the current position.

    ``signum``: the signal that asked for the stop (on any rank of a data-parallel run).
    """

    signum = signal.SIGINT


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (``kill``, ``timeout``, cluster schedulers) as one request.

    graceful=True: the first signal sets ``raised`` and ``signum`` (the training loop checks
    ``raised`` between steps, then checkpoints and stops); a second one raises
    ``KeyboardInterrupt`` at once.  graceful=False: every signal raises ``KeyboardInterrupt``
    at once (the code outside training, which has nothing to checkpoint), with ``signum`` set.
    The previous handlers come back on exit, so the two nest.  Outside the main thread
    signals cannot be handled and are left alone.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    last_signum = None  # the latest signal any instance saw (for the exit status)

    def __init__(self, graceful=True):
        self.graceful = graceful
        self.raised = False
        self.signum = None
        self._old = {}

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not in the main thread: leave signals alone
            self._restore()
        return self

    def _handle(self, signum, frame):
        first = not self.raised
        self.raised, self.signum = True, self.signum or signum
        StopSignals.last_signum = signum
        if first and self.graceful:
            return
        raise KeyboardInterrupt

    def _restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc):
        self._restore()
        return False


def stop_votes(stop):
    """[SIGINT asked for, SIGTERM asked for] on this rank, as 0/1 for ``comm.sum``.

    stop: the ``StopSignals`` of the loop (or None: nothing can ask)."""
    raised = stop is not None and stop.raised
    term = getattr(stop, "signum", None) == signal.SIGTERM
    return [int(raised and not term), int(raised and term)]


def agreed_stop(asked_int, asked_term):
    """The signal the ranks agreed to stop for (their summed votes; SIGTERM first), or None."""
    return signal.SIGTERM if asked_term else signal.SIGINT if asked_int else None


def interrupted(message, signum):
    """``Interrupted(message)`` carrying ``signum``."""
    exc = Interrupted(message)
    exc.signum = signum
    return exc
