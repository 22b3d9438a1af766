"""Transfer learning from a trained network (paper sec. 5.3.3, Table 2): features and fine-tuning.

Two ways to reuse a network trained on one dataset (the *source*: a run's ``model.npz``,
``best.npz`` or ``last.npz``, or any file ``CompactNet.load`` reads) on another:

* **features + a linear classifier** (``run_features``): the frozen network's spatial-pyramid
  features, R·K numbers per image (the classifier's input, ``pyramid_features``), are
  extracted once in batches through the ``BatchLoader`` and fed to ``linear.fit_linear``
  (the linear SVM of the paper, or soft-max), whose λ is chosen on a held-out part of the
  training set; top-1/top-5 errors with one centre crop and with ten crops.
* **fine-tuning** (``finetune_parts``, used by ``run.py --finetune``): the source's feature
  layers, a new classifier for the target's classes initialised as in training (sec. 5.1),
  trained ``head_lr_mult`` times faster than the rest (``optim.SGD(lr_mult=)``), the
  regularizers dropped unless asked for (the paper drops the group-sparse terms), and
  optionally the first ``freeze`` feature layers frozen.

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
import json
import os

import numpy as np

from .backend import get_array_module, to_cpu
from .data.folders import DatasetError, open_dataset
from .data.loader import BatchLoader
from .data.transforms import estimate_mean_std, normalize, scaled_sizes
from .harness.atomic import atomic_write
from .harness.checkpoint import CheckpointError
from .harness.checkpoint_check import read_checkpoint
from .harness.rundir import OutputError, check_writable, claim_new_folder, finished_or_removed, held_files
from .layers import BatchNorm2D, SoftmaxClassifier
from .linear import fit_linear
from .model import CompactNet
from .objective import Regularizer
from .optim import SGD
from .regularizers import variant


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
    model too) transfers.
    """
    try:
        config, arrays, _, state = read_checkpoint(path)
    except CheckpointError as exc:
        raise TransferError(str(exc)) from None
    return CompactNet(config, dtype=dtype).load_state_arrays(arrays), state


def new_classifier(model, classes, seed=0):
    """Replace ``model``'s classifier by a new one for ``classes`` (names), in place.

    Its input size comes from the last feature layer's weights, so a model whose layer widths
    were changed after training (thinned) gets the right one; W ~ N(0, 2/(R·K)) and b = 0 as
    in training (sec. 5.1), drawn from ``seed``.  Returns the model.
    """
    if len(classes) < 2:
        raise TransferError(f"the target data has {len(classes)} class; a classifier needs at least 2")
    old = model.classifier
    channels = model.convs[-1].params["W"].shape[0]
    head = SoftmaxClassifier(channels, model.spp.num_regions, len(classes), dtype=old.params["W"].dtype,
                             rng=np.random.default_rng(seed))
    device = "cpu" if isinstance(old.params["W"], np.ndarray) else "gpu"
    head.to(device)
    model.layers[model.layers.index(old)] = head
    model.classifier = head
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


def finetune_parts(s, classes, device, checkpoint=None, source=None):
    """Model, optimizer, regularizer and normalisation of a fine-tuning run of settings ``s``.

    s: run.py's resolved settings (``finetune``: the source path, ``freeze``, ``head_lr_mult``,
    ``keep_reg``, ``new_stats``, and the usual lr, momentum, model, rho, ...); classes: the
    target's class names.  checkpoint: when resuming (or evaluating), the fine-tuning
    run's own checkpoint, at ``s.resume`` or ``s.evaluate`` (the model is loaded from
    it the way ``CompactNet.load`` does); else
    ``source``, the ``read_source`` result (read here when None).
    Returns (model, optimizer, regularizer or None, (mean, std) or None: estimate them).
    """
    stats = None
    if checkpoint is not None:
        model = CompactNet.load(s.resume or s.evaluate)
    else:
        model, state = source or read_source(s.finetune)
        new_classifier(model, classes, s.seed)
        if not s.new_stats and "mean" in state:
            stats = state["mean"], state["std"]
    model.to(device)
    layers = freeze(model, s.freeze or 0)
    mult = [s.head_lr_mult if layer is model.classifier else 1.0 for layer in layers]
    optimizer = SGD(layers, lr=s.lr, momentum=s.momentum, lr_mult=mult)
    regularizer = None
    if s.keep_reg:
        regularizer = Regularizer(model, variant(s.model, s.depth, s.rho, s.compressed_beta),
                                  s.cw, s.ctheta, s.reg_update, s.momentum, s.group_scale)
    return model, optimizer, regularizer, stats


def finetune_settings(s, given, source_state, source_config):
    """Fill a fresh fine-tuning run's settings ``s`` in place from its source.

    The architecture (depth, width, stem) is the source's; the image size, model variant and
    ρ are the source run's unless given (they name the run and, with ``keep_reg``, pick the
    regularizer).  Raises ``TransferError`` for a ``freeze`` beyond the source's depth.
    """
    saved = source_state.get("settings") or {}
    s.depth, s.width_mult, s.stem = source_config.depth, source_config.width_mult, source_config.stem
    for key in ("image_size", "model", "rho"):
        if key not in given and key in saved:
            setattr(s, key, saved[key])
    n = source_config.depth - 1
    if not 0 <= (s.freeze or 0) <= n:
        raise TransferError(f"--freeze {s.freeze} is beyond the depth of {s.finetune} "
                            f"({n} feature layers: --freeze 0 to {n})")
    if s.head_lr_mult <= 0:
        raise TransferError(f"--head-lr-mult must be > 0, got {s.head_lr_mult}")


# -- features -------------------------------------------------------------------------------
def pyramid_features(model, x):
    """x: (N, 3, H, W) normalised images → (N, K·R) pyramid features (the classifier's input),
    in the model's current mode."""
    for layer in model.layers[:-1]:
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
# images (linear.stratified_split): a class needs one image to fit and one to hold out.
MIN_TRAIN_PER_CLASS = 2


def check_images_per_class(labels, classes, where):
    """``TransferError`` (one line) when a class has fewer than MIN_TRAIN_PER_CLASS images."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    few = [f"{c} ({n})" for c, n in zip(classes, counts.tolist()) if n < MIN_TRAIN_PER_CLASS]
    if few:
        raise TransferError(f"--features needs at least {MIN_TRAIN_PER_CLASS} training images per class "
                            f"(one to fit the classifier, one held out to choose its lambda); "
                            f"{len(few)} of {len(classes)} classes in {where} have fewer: "
                            f"{', '.join(few[:3])}{', ...' if len(few) > 3 else ''}")


def run_features(source_path, root, out=None, overwrite=False, image_size=None, batch_size=64,
                 workers=0, seed=0, cache=False, device="cpu", losses=("svm", "softmax"),
                 new_stats=False, log=print):
    """``run.py --features``: extract the source's features of ``root``'s train and val
    splits, fit a linear classifier per loss, write ``features.json`` into a new run folder.

    Raises ``TransferError`` (one line) before any work for a bad source, dataset, image size
    or output folder.  Returns the report (a dict).
    """
    model, state = read_source(source_path)
    try:
        train_set, val_set = open_dataset(root)
    except DatasetError as exc:
        raise TransferError(str(exc)) from None
    if len(train_set.classes) < 2:
        raise TransferError(f"{root} has {len(train_set.classes)} class; a classifier needs at least 2")
    image_size = int(image_size or (state.get("settings") or {}).get("image_size") or 224)
    try:
        resize, crop = scaled_sizes(image_size)  # the one bound on image sizes (MAX_IMAGE_SIZE)
        model.config.check_image_size(image_size)
    except ValueError as exc:
        raise TransferError(f"--image-size: {exc}") from None
    check_images_per_class(train_set.labels, train_set.classes, os.path.join(root, "train"))
    created = out is None or not os.path.lexists(out)  # then an unfinished run removes it all
    if out is None:
        name = os.path.splitext(os.path.basename(source_path))[0]
        out = claim_new_folder(os.path.join("runs", f"features-{name}"))
    elif held_files(out, ("features.json",)) and not overwrite:
        raise TransferError(f"--out {out} already holds features.json: choose another --out, or add --overwrite")
    try:
        check_writable(out)
    except OutputError as exc:
        if created and os.path.isdir(out):  # check_writable made it before failing
            try:
                os.rmdir(out)
            except OSError:
                pass
        raise TransferError(str(exc)) from None
    # An error or Ctrl-C from here on leaves no empty or half-written folder behind.
    with finished_or_removed(out, created, ("features.json",)):
        model.to(device)
        cache_dir = os.path.join(out, "cache") if cache else None
        common = dict(resize=resize, crop=crop, workers=workers, seed=seed)
        with BatchLoader(train_set, batch_size, mode="center", cache=cache_dir, **common) as train, \
                BatchLoader(val_set, batch_size, mode="center", cache=cache_dir, **common) as val, \
                BatchLoader(val_set, max(1, batch_size // 10), mode="tencrop", cache=val.cache, **common) as ten:
            if new_stats or "mean" not in state:
                mean, std = estimate_mean_std(train_set, resize, seed=seed, cache=train.cache)
            else:
                mean, std = state["mean"], state["std"]
            log(f"run.py: features of {source_path} ({model.convs[-1].params['W'].shape[0]} maps x "
                f"{model.spp.num_regions} regions) for {len(train_set)} train / {len(val_set)} val images, "
                f"{len(train_set.classes)} classes, {crop}px crops; out: {out}")
            X, y = extract_features(model, train, mean, std)
            Xv, yv = extract_features(model, val, mean, std)
            Xt, yt = extract_features(model, ten, mean, std)
        check_images_per_class(y, train_set.classes, f"{os.path.join(root, 'train')} (readable images)")
        report = {"source": os.path.abspath(source_path), "data": os.path.abspath(root),
                  "classes": list(train_set.classes), "train_images": int(len(y)), "val_images": int(len(yv)),
                  "feature_size": int(X.shape[1]), "image_size": image_size, "mean": [float(v) for v in mean],
                  "std": [float(v) for v in std], "classifiers": {}}
        for loss in losses:
            clf, info = fit_linear(X, y, len(train_set.classes), loss, seed=seed)
            (e1, e5), (t1, t5) = clf.errors(Xv, yv), clf.errors(Xt, yt)
            report["classifiers"][loss] = {
                **info, "single_crop": {"top1_error": e1, "top5_error": e5},
                "ten_crop": {"top1_error": t1, "top5_error": t5}}
            log(f"  {loss:8s} lambda {info['lambda']:g}: top-1 error {e1:.1f}% single crop, {t1:.1f}% ten crops; "
                f"top-5 {e5:.1f}% / {t5:.1f}%")
        with atomic_write(os.path.join(out, "features.json")) as f:
            json.dump(report, f, indent=2)
    log(f"  report: {os.path.join(out, 'features.json')}")
    return report
