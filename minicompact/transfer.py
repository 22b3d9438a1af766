"""Transfer learning from a trained network (paper sec. 5.3.3, Table 2): features and fine-tuning.

Two ways to reuse a network trained on one dataset (the *source*: a run's ``model.npz``,
``best.npz`` or ``last.npz``, or any file ``CompactNet.load`` reads) on another:

* **features + a linear classifier**: the frozen network's spatial-pyramid features, R·K
  numbers per image (the classifier's input, ``pyramid_features``), are extracted once in
  batches through the ``BatchLoader`` (``extract_features``) and fed to
  ``linear_probe.fit_linear`` (the linear SVM of the paper, or soft-max), whose λ is chosen
  on a held-out part of the training set; top-1/top-5 errors with one centre crop and with
  ten crops (``fit_probe``).
* **fine-tuning**: the source's feature layers with a new classifier for the target's
  classes initialised as in training (sec. 5.1; ``finetune_model``), trained
  ``head_lr_mult`` times faster than the rest (``optim.SGD(lr_mult=)``), optionally with the
  first ``frozen`` feature layers frozen (``finetune_optimizer``); the regularizers are
  dropped unless asked for (the paper drops the group-sparse terms).

``run.py --features`` and ``run.py --finetune`` are these calls with the command line's
settings, folders and one-line errors around them (``cli/transfer_commands.py``).

Frozen layers are left out of the optimizer (no update, no momentum) and their batch norms
stay in evaluation mode, running statistics included (``FrozenBatchNorm2D``): a frozen layer
must compute exactly the source's function, and re-estimating its statistics from a small
target set's batches would change it while its γ, β could not follow.

The target's classes may differ from the source's (that is the point); its image size may
differ too, as long as the feature maps reaching the pyramid are at least as large as its
finest level (``ModelConfig.check_image_size`` says so in one line otherwise).  The
normalisation (mean, std) is the source's: the transferred first layer was trained on inputs
normalised that way.
"""
import numpy as np

from .architectures import build_model
from .backend import get_array_module, to_cpu
from .data.transforms import normalize
from .layers import BatchNorm2D, SoftmaxClassifier
from .linear_probe import fit_linear
from .optim import SGD
from .system.npz import CheckpointError
from .training.checkpoint_check import read_checkpoint


class TransferError(ValueError):
    """A source checkpoint or target dataset that cannot be used; the message is one line."""


class FrozenBatchNorm2D(BatchNorm2D):
    """A batch norm that stays in evaluation mode: it normalises with its running statistics
    and never updates them, whatever ``train()`` asks (a frozen layer, see the module doc)."""

    def train(self, mode=True):
        return super().train(False)


def read_source(path, dtype=np.float32):
    """The source network of a checkpoint: ``(model, train_state)`` on the CPU.

    train_state: the run's JSON state ({} for a file written by ``CompactNet.save``), whose
    ``mean``, ``std`` and ``settings`` (image size, model, ρ) fine-tuning reuses.  Raises
    ``TransferError`` (one line) for a file that does not hold a model, checked whole before
    the model is built (``checkpoint_check.read_checkpoint``).  Whatever it loads (a thinned
    model, a VGG11 or a ResNet18 too: ``architectures.build_model``) transfers.
    """
    try:
        config, arrays, _, state = read_checkpoint(path)
    except CheckpointError as exc:
        raise TransferError(str(exc)) from None
    return build_model(config, dtype=dtype).load_state_arrays(arrays), state


def new_classifier(model, classes, seed=0):
    """Replace ``model``'s classifier by a new one for ``classes`` (names), in place.

    Its input size (K maps × R regions) is the old classifier's, so a model whose layer widths
    were changed after training (thinned) gets the right one; W ~ N(0, 2/(R·K)) and b = 0 as
    in training (sec. 5.1), drawn from ``seed``.  Returns the model.
    """
    if len(classes) < 2:
        raise TransferError(f"the target data has {len(classes)} class; a classifier needs at least 2")
    old = model.classifier
    _, channels, regions = old.params["W"].shape
    head = SoftmaxClassifier(channels, regions, len(classes), dtype=old.params["W"].dtype,
                             rng=np.random.default_rng(seed))
    device = "cpu" if isinstance(old.params["W"], np.ndarray) else "gpu"
    head.to(device)
    model.replace_layer(old, head)
    model.config.num_classes, model.config.classes = len(classes), list(classes)
    return model


def freeze(model, n):
    """Freeze the first ``n`` feature layers (conv + batch norm) of ``model`` in place.

    Returns the parameterised layers left to train (the optimizer's list), in data order.
    """
    depth = len(model.convs)
    if not 0 <= n <= depth:
        raise TransferError(f"--freeze {n}: the network has {depth} feature layers (0 to {depth} can be frozen)")
    for bn in model.bns[:n]:
        bn.__class__ = FrozenBatchNorm2D
        bn.train(False)
    frozen = set(map(id, model.convs[:n] + model.bns[:n]))
    return [layer for layer in model.param_layers if id(layer) not in frozen]


def finetune_model(source, classes, seed=0, new_stats=False):
    """The model a fine-tuning starts from: the source's feature layers and a new classifier.

    source: ``(model, train_state)`` as ``read_source`` returns it (the model is changed in
    place); classes: the target's class names; seed: draws the new classifier's weights;
    new_stats: estimate the normalisation from the target instead of reusing the source's.
    Returns (model, (mean, std) or None): the source run's normalisation, or None where it
    has none or new_stats asks for the target's own (the caller estimates it then).
    """
    model, state = source
    new_classifier(model, classes, seed)
    stats = None if new_stats or "mean" not in state else (state["mean"], state["std"])
    return model, stats


def finetune_optimizer(model, device="cpu", frozen=0, lr=0.01, momentum=0.9, head_lr_mult=10.0):
    """Move ``model`` to ``device``, freeze its first ``frozen`` feature layers (``freeze``)
    and return the ``SGD`` that trains the rest, the classifier ``head_lr_mult`` times faster.

    Returns an ``optim.SGD`` over the layers left to train, in data order (the classifier last).
    """
    model.to(device)
    layers = freeze(model, frozen)
    mult = [head_lr_mult if layer is model.classifier else 1.0 for layer in layers]
    return SGD(layers, lr=lr, momentum=momentum, lr_mult=mult)


# -- features -------------------------------------------------------------------------------
def pyramid_features(model, x):
    """x: (N, 3, H, W) normalised images → (N, K·R) pyramid features (the classifier's input),
    in the model's current mode (a ResNet18's: its K globally pooled maps, R = 1)."""
    for layer in getattr(model, "sequence", model.layers)[:-1]:   # a ResNet's blocks hold its layers
        x = layer.forward(x)
    return x.reshape(x.shape[0], -1)


def extract_features(model, loader, mean, std):
    """Pyramid features of every image of ``loader``'s epoch 0, in evaluation mode.

    loader: a ``BatchLoader`` in "center" mode (features (N, K·R)) or "tencrop" mode
    ((N, 10, K·R)).  Returns (features float32 on the host, labels (N,) int64).
    """
    xp = get_array_module(model.classifier.params["W"])
    feats, labels = [], []
    model.eval()
    try:
        for images, y in loader.epoch(0):
            crops = images.shape[1] if images.ndim == 5 else None
            x = images.reshape((-1,) + images.shape[-3:]) if crops else images
            f = pyramid_features(model, normalize(x, mean, std, xp))
            feats.append(to_cpu(f.reshape(y.shape[0], crops, -1) if crops else f))
            labels.append(y)
            model.release_caches()
    finally:
        model.release_caches()
    if not feats:
        raise TransferError(f"no image of {loader.dataset.root} could be read "
                            f"({len(loader.skipped)} skipped with a warning)")
    return np.concatenate(feats), np.concatenate(labels)


# fit_linear chooses the classifier's lambda on a held-out part of each class's training
# images (linear_probe.stratified_split): a class needs one image to fit and one to hold out.
MIN_TRAIN_PER_CLASS = 2


# fit_linear chooses the classifier's lambda on a held-out part of each class's training
# images (linear_probe.stratified_split): a class needs one image to fit and one to hold out.
MIN_TRAIN_PER_CLASS = 2


def fit_probe(train, val, ten_crop, num_classes, loss="svm", seed=0):
    """Fit a linear classifier on a frozen network's features and measure it on val.

    train, val: (features (N, D) float32, labels (N,)) of the training images and of the val
    images' centre crops; ten_crop: (features (N, 10, D), labels (N,)) of the val images' ten
    crops (``extract_features``); loss: "svm" (the paper's) or "softmax"; seed: the held-out
    split that chooses λ.  Every class needs ``MIN_TRAIN_PER_CLASS`` training images.
    Returns a dict: ``fit_linear``'s "lambda" and "held_out_top1_error", and "single_crop"
    and "ten_crop" ({"top1_error", "top5_error"} in %).
    """
    clf, info = fit_linear(*train, num_classes, loss, seed=seed)
    (e1, e5), (t1, t5) = clf.errors(*val), clf.errors(*ten_crop)
    return {**info, "single_crop": {"top1_error": e1, "top5_error": e5},
            "ten_crop": {"top1_error": t1, "top5_error": t5}}
