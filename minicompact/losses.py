"""The data term L of the learning problem, Eq. (1): soft-max cross-entropy (the paper's
choice) and, as the paper also evaluated, a multiclass hinge loss; plus top-k accuracy.

Every loss takes scores (N, Y) and integer labels (N,) and returns ``(loss, dscores)``: the
mean over the batch as a 0-d array of the scores' dtype on the scores' device (a NumPy scalar
on the CPU; ``float(loss)`` gives the Python number) and dL/dscores (N, Y) in the scores'
dtype, on the scores' device.  Labels may be NumPy or CuPy; they are moved to the scores'
device.

Nothing here reads a value of a GPU array back into Python: on a GPU each such read (a
``float()``, an ``int()``, a label check's min and max) makes the host wait until the GPU has
finished all its queued work, a *sync*.  A training loop keeps the loss and the accuracy counts
on the device, sums them there and reads the sums once per log interval
(``training.trainer.Trainer``).  For the same reason labels are range-checked only where they are
still on the host (``check_labels``): call it where the labels come from, before moving them.
"""
import numpy as np

from .backend import get_array_module, is_gpu_array


def check_labels(labels, num_classes, name="labels"):
    """Raise ValueError unless the host labels are integers in [0, num_classes).

    labels: (N,) NumPy array (or sequence) of class indices; num_classes: Y; name: of the
    caller, for the message.  Runs on the host: no device work, no sync.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} expects integer labels, got dtype {labels.dtype}")
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} expects labels in [0, {num_classes}), got labels in [{lo}, {hi}]")
    return labels


def _check(scores, labels, name):
    """Validate scores (N, Y) floating and labels (N,) integers; return labels on the scores'
    device.  Host labels are also checked to lie in [0, Y); device labels are not (reading
    their min and max would be a sync per call: check them on the host, ``check_labels``)."""
    shape = getattr(scores, "shape", None)
    if shape is None or scores.ndim != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} expects scores of shape (N, Y) with N, Y >= 1, got shape {shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"{name} expects floating scores, got dtype {scores.dtype} (shape {tuple(shape)})")
    n, y = shape
    if not is_gpu_array(labels):
        labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{name} expects labels of shape ({n},) for scores of shape {tuple(shape)}, "
                         f"got labels of shape {tuple(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} expects integer labels, got dtype {labels.dtype}")
    if not is_gpu_array(labels):
        check_labels(labels, y, name)
    return get_array_module(scores).asarray(labels)


def softmax(scores):
    """Row-wise soft-max of scores (N, Y) → probabilities (N, Y), same dtype (stable: the row
    maximum is subtracted before exponentiating)."""
    xp = get_array_module(scores)
    p = scores - scores.max(axis=-1, keepdims=True)
    xp.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def softmax_cross_entropy(scores, labels):
    """Mean soft-max cross-entropy, the loss L of Eq. (1).

    scores: (N, Y) floating; labels: (N,) integers in [0, Y).
    L = 1/N Σ_n [log Σ_y exp(s_ny) - s_n,label_n], computed as a log-sum-exp of
    ``s - max_y s`` so that scores of any magnitude neither overflow nor underflow.
    dL/ds = (softmax(s) - onehot(label)) / N.
    Returns (loss: 0-d, dscores: (N, Y)), both in the scores' dtype on the scores' device.
    """
    labels = _check(scores, labels, "softmax_cross_entropy")
    xp = get_array_module(scores)
    n = scores.shape[0]
    rows = xp.arange(n)
    shifted = scores - scores.max(axis=1, keepdims=True)   # (N, Y); max of each row is 0
    correct = shifted[rows, labels]                        # (N,), copied before exp below
    p = xp.exp(shifted, out=shifted)                       # reuse the buffer: it becomes dscores
    total = p.sum(axis=1)                                  # in [1, Y]: log is safe
    loss = (xp.log(total) - correct).mean()               # 0-d, stays on the device
    p /= total[:, None]
    p[rows, labels] -= 1                                   # one entry per row: no accumulation
    p /= n
    return loss, p


def multiclass_hinge_loss(scores, labels, margin=1.0):
    """Mean multiclass hinge loss in the Weston–Watkins form (as CS231n's SVM).

    scores: (N, Y) floating; labels: (N,) integers in [0, Y); margin: Δ > 0.
    L = 1/N Σ_n Σ_{y ≠ label_n} max(0, s_ny - s_n,label_n + Δ).
    Its (sub)gradient: each violated margin contributes +1/N to its class and -1/N to the
    correct class (at a kink, max(0, ·) takes slope 0).
    Returns (loss: 0-d, dscores: (N, Y)), both in the scores' dtype on the scores' device.
    """
    labels = _check(scores, labels, "multiclass_hinge_loss")
    xp = get_array_module(scores)
    n = scores.shape[0]
    rows = xp.arange(n)
    margins = scores - scores[rows, labels][:, None]       # (N, Y)
    margins += margin
    xp.maximum(margins, 0, out=margins)
    margins[rows, labels] = 0                              # the correct class is not a violation
    loss = margins.sum() / n                               # 0-d, stays on the device
    dscores = (margins > 0).astype(scores.dtype)
    dscores[rows, labels] = -dscores.sum(axis=1)
    dscores /= n
    return loss, dscores


def accuracy_topk(scores, labels, ks=(1, 5)):
    """Count the items whose label is among the k highest scores, for each k in ``ks``.

    scores: (N, Y); labels: (N,) integers in [0, Y). Returns a tuple of 0-d integer arrays
    on the scores' device, one count per k in the order of ``ks`` (``c1, c5 =
    accuracy_topk(s, y)``; ``int(c1)`` reads one; a k >= Y counts every item). Ties count
    *against* the label: an item is correct at k when fewer than k other classes score at
    least as high as its label (so an all-equal or NaN row is never counted as a top-1 hit).
    No sort: one comparison pass.
    """
    labels = _check(scores, labels, "accuracy_topk")
    xp = get_array_module(scores)
    n = scores.shape[0]
    correct = scores[xp.arange(n), labels][:, None]        # (N, 1)
    rank = (~(scores < correct)).sum(axis=1) - 1           # others scoring >= the label (or NaN)
    return tuple((rank < k).sum() for k in ks)
