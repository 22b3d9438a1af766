"""Checkpoints: one ``.npz`` holding the model, the optimizer state and the training state.

Written atomically (a temporary file in the same folder, flushed, then renamed over the
target), so a crash or Ctrl-C while saving never leaves a half-written checkpoint behind.

Layout of a training checkpoint (all NumPy arrays, no pickles):

* ``"<layer>.<param>"`` — weights and batch-norm running statistics (``CompactNet.state_arrays``)
* ``"__config__"`` — the ``ModelConfig`` as JSON
* ``"opt.<key>"`` — the optimizer's momentum buffers
* ``"__train__"`` — JSON: epoch, step within the epoch, best accuracy, history, run settings.
"""
import json
import os
import zipfile

import numpy as np

from .atomic import atomic_write


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not one of ours (one-line message)."""


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


def save_checkpoint(path, model, optimizer=None, train_state=None):
    """Save model (+ optimizer momentum + JSON-able ``train_state``) to ``path`` atomically."""
    arrays = model.state_arrays()
    arrays["__config__"] = np.array(model.config.to_json())
    if optimizer is not None:
        for k, v in optimizer.state_dict().items():
            arrays[f"opt.{k}"] = np.asarray(v)
    arrays["__train__"] = np.array(json.dumps(train_state or {}))
    atomic_savez(path, arrays)


def _train_state(arrays, path):
    if "__train__" not in arrays:
        return {}
    try:
        return json.loads(str(arrays["__train__"]))
    except ValueError:
        raise CheckpointError(f"{path!r}: its training state is not valid JSON") from None


def load_checkpoint(path):
    """Read a checkpoint: returns ``(arrays, optimizer_state, train_state)``.

    arrays: the model's arrays incl. ``"__config__"`` (for ``CompactNet.load_state_arrays``);
    optimizer_state: dict for ``optimizer.load_state_dict`` ({} when absent);
    train_state: the JSON dict saved with it ({} when absent).
    """
    arrays = read_npz(path)
    if "__config__" not in arrays:
        raise CheckpointError(f"{path!r} is not a minicompact checkpoint (no model configuration)")
    opt = {k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}
    train_state = _train_state(arrays, path)
    model_arrays = {k: v for k, v in arrays.items() if not k.startswith("opt.") and k != "__train__"}
    return model_arrays, opt, train_state


def read_train_state(path):
    """Only the JSON training state of a checkpoint ({} when it has none); the weights are not read."""
    return _train_state(read_npz(path, keys=("__train__",)), path)
