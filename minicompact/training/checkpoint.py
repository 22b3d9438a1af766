"""Checkpoints: one ``.npz`` holding the model, the optimizer state and the training state.

Written atomically (a temporary file in the same folder, flushed, then renamed over the
target), so a crash or Ctrl-C while saving never leaves a half-written checkpoint behind.

Layout of a training checkpoint (all NumPy arrays, no pickles):

* ``"<layer>.<param>"`` — weights and batch-norm running statistics (``CompactNet.state_arrays``)
* ``"__config__"`` — the ``ModelConfig`` as JSON
* ``"opt.<key>"`` — the optimizer's momentum buffers
* ``"__train__"`` — JSON: epoch, step within the epoch, best accuracy, history, run settings.

The ``.npz`` reader and writer and what a saved array must be are ``system/npz.py``; what a training state must be,
``check_train_state``, is written here once; ``checkpoint_check.check_contents`` applies both.
"""
import json
import math

import numpy as np

from ..system.npz import CheckpointError, atomic_savez, read_npz, short_repr


def save_checkpoint(path, model, optimizer=None, train_state=None):
    """Save model (+ optimizer momentum + JSON-able ``train_state``) to ``path`` atomically."""
    arrays = model.state_arrays()
    arrays["__config__"] = np.array(model.config.to_json())
    if optimizer is not None:
        for k, v in optimizer.state_dict().items():
            arrays[f"opt.{k}"] = np.asarray(v)
    arrays["__train__"] = np.array(json.dumps(train_state or {}))
    atomic_savez(path, arrays)


EXACT = 2**53  # JSON integers beyond this have no exact float: no field of ours holds one


def _number(v):
    """Whether ``v`` is a finite JSON number (not a bool) that converts to a float."""
    if isinstance(v, bool):
        return False
    return (isinstance(v, int) and abs(v) <= EXACT) or (isinstance(v, float) and math.isfinite(v))


def _count(v):
    """Whether ``v`` is an integer >= 0 (not a bool, not 3.0)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= EXACT


def check_train_state(state):
    """``CheckpointError`` (one line naming the field) unless the JSON training state ``state``
    has the fields ``Trainer`` writes, each of its type: epoch and step integers >= 0,
    best_top1 a number in [-1, 1], history a list of objects, partial null or an object of
    numbers, mean and std lists of finite numbers (std > 0), settings an object, final a bool.
    A field that is absent is not checked (a file of ``CompactNet.save`` has none)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"its training state is not a JSON object but {short_repr(state)}")
    rules = {
        "epoch": (_count, "an integer >= 0"),
        "step": (_count, "an integer >= 0"),
        "best_top1": (lambda v: _number(v) and -1 <= v <= 1, "a number in [-1, 1]"),
        "history": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
                    "a list of objects"),
        "partial": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("skipped", []), list)
                                            and all(_number(x) for k, x in v.items() if k != "skipped")),
                    "null or an object of numbers"),
        "mean": (lambda v: isinstance(v, list) and len(v) >= 1 and all(map(_number, v)),
                 "a list of finite numbers"),
        "std": (lambda v: isinstance(v, list) and len(v) == len(state.get("mean", v))
                and all(_number(x) and x > 0 for x in v), "a list of numbers > 0, one per mean"),
        "settings": (lambda v: isinstance(v, dict), "an object"),
        "final": (lambda v: isinstance(v, bool), "true or false"),
    }
    for key, (ok, what) in rules.items():
        if key in state and not ok(state[key]):
            raise CheckpointError(f"its training state's {key} must be {what}, got {short_repr(state[key])}")


def _train_state(arrays, path):
    """The checked JSON training state of ``arrays`` ({} when it has none)."""
    if "__train__" not in arrays:
        return {}
    try:
        state = json.loads(str(arrays["__train__"]))
    except ValueError:
        raise CheckpointError(f"{path!r}: its training state is not valid JSON") from None
    try:
        check_train_state(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return state


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
