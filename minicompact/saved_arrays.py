"""What an array or value read from a file must be before anything is built from it.

A leaf below every module that loads saved state (the model, the optimizer, the checkpoint
reader of ``harness/checkpoint.py``), so each checks what it loads without importing the run
harness: ``check_array`` holds a saved array to its expected shape, a floating dtype and
finite values; ``CheckpointError`` is the one-line error every command prints as it is.
"""
import numpy as np


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
