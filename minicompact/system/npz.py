"""The ``.npz`` files minicompact writes and reads, and what a saved array must be.

A leaf below every module that saves or loads arrays (the model, the optimizer, the training
checkpoint of ``training/checkpoint.py``): ``atomic_savez`` writes an archive so that a crash
leaves the old file or the new one, whole; ``read_npz`` reads one without ever unpickling;
``check_array`` holds a saved array to its expected shape, a floating dtype and finite
values; ``CheckpointError`` is the one-line error every command prints as it is.
"""
import os
import zipfile

import numpy as np

from .atomic import atomic_write


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not one of ours (one-line message)."""


def short_repr(value, limit=60):
    """``repr(value)``, cut to ``limit`` characters (a hand-edited file may hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_array(key, a, shape):
    """``CheckpointError`` (one line naming ``key``) unless the saved array ``a`` is a
    floating-point NumPy array of ``shape`` whose every value is finite.

    Batch-norm running variances must also be >= 0 (``key`` ending ``.running_var``): the
    evaluation-mode batch norm takes their square root.
    """
    a = np.asarray(a)
    if a.dtype.kind != "f":
        what = "text" if a.dtype.kind in "US" else f"{a.dtype.name} values"
        raise CheckpointError(f"{key} holds {what}, not floating-point numbers")
    if a.shape != tuple(shape):
        raise CheckpointError(f"{key}: expected shape {tuple(shape)}, saved {a.shape}")
    if not np.isfinite(a).all():
        raise CheckpointError(f"{key} holds NaN or infinite values")
    if key.endswith(".running_var") and (a < 0).any():
        raise CheckpointError(f"{key} has negative values")


def atomic_savez(path, arrays):
    """Write ``arrays`` (dict name -> array) to ``path`` as an uncompressed ``.npz``, atomically."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def _check_file(path):
    """``CheckpointError`` unless ``path`` is an existing ``.npz`` (zip) archive."""
    if os.path.isdir(path):
        hint = (f"; did you mean {os.path.join(path, 'last.npz')}?"
                if os.path.isfile(os.path.join(path, "last.npz")) else "")
        raise CheckpointError(f"checkpoint {path!r} is a folder, not a checkpoint file{hint}")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a regular file")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc.strerror or exc}") from None
    if not is_zip:
        raise CheckpointError(f"{path!r} is not a minicompact checkpoint (not an .npz archive)")


def read_npz(path, keys=None):
    """Load the arrays of an ``.npz`` (all, or only ``keys`` present) into a dict.

    Raises ``CheckpointError`` (one line) for a folder, a missing file, a file that is not an
    ``.npz`` archive, one that holds pickled objects (never loaded) or a damaged one.
    """
    path = os.fspath(path)
    _check_file(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            names = z.files if keys is None else [k for k in keys if k in z.files]
            return {k: z[k] for k in names}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise CheckpointError(f"{path!r} holds pickled Python objects, which minicompact never "
                                  "writes; not loaded (it is not one of our checkpoints)") from None
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged zip raises many kinds of errors
        raise CheckpointError(f"cannot read checkpoint {path!r}: {type(exc).__name__}: {exc}") from None
