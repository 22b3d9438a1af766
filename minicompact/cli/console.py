"""What run.py prints: one line per message, from rank 0 only, and the error it stops with.

Every failure a user can cause is a ``RunError``: one line (``run.py: error: ...``) and an
exit status, never a traceback.  ``Parser`` gives argparse's own errors the same shape.
"""
import argparse
import sys

from ..distributed.launcher import is_first_process, launcher_rank


class RunError(Exception):
    """A failure the user can cause: printed as one line, exit status ``code``."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # sent from the rank that failed to the others (comm.agree)
        return type(self), (str(self), self.code)


def fail(message):
    """One clear line and exit status 2, before any work starts (printed by run.py's ``main``)."""
    raise RunError(message, 2)


def fail_alone(comm, message):
    """A failure of this rank alone: ``RunError`` (exit 1) with one process; with several,
    end them all now with the message (the others cannot be told: they may be waiting in a
    collective)."""
    if comm.size > 1:
        comm.abort(f"run.py: error: {message}", 1)
    raise RunError(message, 1) from None


def say(message, file=None):
    """Print, on rank 0 only (every rank would say the same)."""
    if is_first_process():
        print(message, file=file or sys.stdout)


def note(message):
    say(f"run.py: note: {message}", sys.stderr)


def one_line_warning(message, category, filename, lineno, line=None):
    """``warnings.formatwarning`` for run.py: ``run.py: warning: ...`` (and the rank if not 0)."""
    rank = "" if is_first_process() else f" [rank {launcher_rank()}]"  # its own files' warnings
    return f"run.py{rank}: warning: {message}\n"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where there is a default that the help does not already state."""

    def _get_help_string(self, action):
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line like every other error of run.py (no usage block)."""

    def error(self, message):
        self.exit(2, f"run.py: error: {message} (run.py --help lists the flags)\n")

    def _print_message(self, message, file=None):
        if is_first_process():  # every rank parses the same flags: rank 0 speaks for all
            super()._print_message(message, file)
