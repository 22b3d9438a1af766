"""The output folder of a run: which folder, and never over an earlier run's files.

The rule (README, "What a run writes"):

* a *default* folder is always a new one: when ``runs/<name>`` exists, the run goes to
  ``runs/<name>-2``, ``runs/<name>-3``, ... (the first name that does not exist, created at
  once with ``mkdir``, so two runs started together never share one);
* an *explicit* folder that holds files of an earlier run is refused (the caller says how to
  go on), unless the user asks for ``--overwrite``, which removes those files first;
* files that belong to no run (anything else in the folder, the image cache) are left alone;
* before any work, the folder is created and a probe file written and removed, so an
  unwritable folder fails at once, not after an epoch of training.
"""
import os

# What a training run writes, and what an evaluation writes.
RUN_FILES = ("log.jsonl", "last.npz", "best.npz", "model.npz", "report.json", "curves.png", "sparsity.png")
EVAL_FILES = ("model.npz", "report.json", "curves.png", "sparsity.png")


class OutputError(Exception):
    """The output folder cannot be used; the message is one line."""


def held_files(folder, names):
    """The ``names`` that exist in ``folder`` (any kind of entry), in the order given."""
    return [n for n in names if os.path.lexists(os.path.join(folder, n))]


def claim_new_folder(base):
    """Create and return ``base``, or ``base-2``, ``base-3``, ... : the first that did not exist.

    ``mkdir`` is atomic, so of two runs started at once each gets its own folder.
    """
    parent = os.path.dirname(base)
    if parent:
        os.makedirs(parent, exist_ok=True)
    folder, k = base, 1
    while True:
        try:
            os.mkdir(folder)
            return folder
        except FileExistsError:
            k += 1
            folder = f"{base}-{k}"


def remove_files(folder, names, keep=None):
    """Delete the ``names`` present in ``folder`` (the user asked for ``--overwrite``).

    keep: a path not to delete (e.g. the checkpoint a run is resumed from).
    """
    for n in held_files(folder, names):
        path = os.path.join(folder, n)
        if keep is not None and os.path.exists(keep) and os.path.samefile(path, keep):
            continue
        os.remove(path)


def check_writable(folder):
    """Create ``folder`` if needed and write and remove a probe file; ``OutputError`` if not."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"{folder} exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {folder} ({exc.strerror or exc})") from None
    probe = os.path.join(folder, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"minicompact")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as exc:
        raise OutputError(f"the output folder {folder} is not writable ({exc.strerror or exc})") from None
