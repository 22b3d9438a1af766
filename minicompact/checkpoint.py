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
import tempfile

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not one of ours (one-line message)."""


def atomic_savez(path, arrays):
    """Write ``arrays`` (dict name -> array) to ``path`` as an uncompressed ``.npz``, atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_npz(path):
    """Load every array of an ``.npz`` into a dict; ``CheckpointError`` when it can't."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
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
    train_state = json.loads(str(arrays["__train__"])) if "__train__" in arrays else {}
    model_arrays = {k: v for k, v in arrays.items() if not k.startswith("opt.") and k != "__train__"}
    return model_arrays, opt, train_state
