"""Files that readers see whole or not at all: write a temporary file, then rename it.

Every file a run writes (checkpoints, the log, the report, figures, the image cache's index)
goes through ``atomic_write``: the data goes to a new temporary file in the same folder, is
flushed to disk, and is renamed over the target in one step.  A crash, Ctrl-C or full disk
while writing leaves the previous version in place and no temporary file behind.
"""
import contextlib
import os
import secrets


def _create_temp(folder, suffix):
    """A new, empty, hidden temporary file in ``folder``: (fd, path).

    Unlike ``tempfile.mkstemp`` (always mode 0600) it is created with 0666 minus the umask,
    so the renamed result has the same permissions as every other file a run writes.
    """
    for _ in range(100):
        path = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder}")


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """``with atomic_write(path, "wb") as f: ...`` writes ``path`` atomically.

    path: the target (its folder is created if needed); mode: "w" (text) or "wb" (binary).
    Yields the open temporary file.  On success it is flushed, synced and renamed over
    ``path``; on any exception it is removed and the exception propagates.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temp(folder, os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
