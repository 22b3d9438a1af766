"""``run.py --features`` and the set-up of ``run.py --finetune``: transfer with run.py's settings.

The maths is ``minicompact.transfer`` (the source network, its new head, frozen layers,
features, linear probes); this module adds what the commands need around it: run.py's
settings, the output folder of ``--features`` (``rundir``'s rule), the loaders and
normalisation (``training.recipe``), and one-line errors (``TransferError``).
"""
import contextlib
import json
import os

import numpy as np

from ..data.folders import DatasetError, open_dataset
from ..data.loader import BatchLoader
from ..data.transforms import scaled_sizes
from ..architectures import arch_of, conv_count, load_model, variant_for
from ..model import CompactNet
from ..objective import Penalty
from ..regularizers import variant
from ..system.atomic import atomic_write
from ..training.recipe import normalisation, open_loaders
from ..transfer import (MIN_TRAIN_PER_CLASS, TransferError, extract_features, finetune_model, finetune_optimizer,
                        fit_probe, read_source)
from .rundir import OutputError, command_folder, finished_or_removed


# -- run.py --finetune ------------------------------------------------------------------------
def finetune_parts(s, classes, device, checkpoint=None, source=None):
    """Model, optimizer, regularizer and normalisation of a fine-tuning run of settings ``s``.

    s: run.py's resolved settings (``finetune``: the source path, ``freeze``, ``head_lr_mult``,
    ``keep_reg``, ``new_stats``, and the usual lr, momentum, model, rho, ...); classes: the
    target's class names; device: "cpu" or "gpu".  checkpoint: when resuming (or
    evaluating), the fine-tuning run's own checkpoint, at ``s.resume`` or ``s.evaluate`` (the
    model is loaded from it the way ``CompactNet.load`` does, whichever network it holds:
    ``architectures.load_model``); else ``source``, the ``transfer.read_source`` result (read
    here when None).
    Returns (model, optimizer, regularizer or None, (mean, std) or None: estimate them).
    """
    stats = None
    if checkpoint is not None:
        model = load_model(s.resume or s.evaluate)
    else:
        model, stats = finetune_model(source or read_source(s.finetune), classes, s.seed, s.new_stats)
    optimizer = finetune_optimizer(model, device, s.freeze or 0, s.lr, s.momentum, s.head_lr_mult)
    regularizer = None
    if s.keep_reg:  # the paper fine-tunes without the group-sparse terms; --keep-reg keeps eq. 1
        reg = (variant(s.model, s.depth, s.rho, s.compressed_beta) if isinstance(model, CompactNet)
               else variant_for(model, s.model, s.rho, s.compressed_beta))
        regularizer = Penalty(model, reg, s.cw, s.ctheta, s.reg_update, s.momentum, s.group_scale)
    return model, optimizer, regularizer, stats


def finetune_settings(s, given, source_state, source_config):
    """Fill a fresh fine-tuning run's settings ``s`` in place from its source.

    given: the flags the user typed; source_state, source_config: the source checkpoint's
    train state and ``ModelConfig`` (or ``ArchConfig``).  The architecture (arch, depth,
    width, stem) is the source's; the image size, model variant and ρ are the source run's
    unless given (they name the run and, with ``keep_reg``, pick the regularizer).  Returns
    None.  Raises ``TransferError`` for an --arch typed other than the source's, a ``freeze``
    beyond the source's convs (a ResNet18's 20, projections counted, in ``conv_plan``
    order) or a ``head_lr_mult`` that is not positive.
    """
    saved = source_state.get("settings") or {}
    arch = arch_of(source_config)
    if "arch" in given and s.arch != arch:
        raise TransferError(f"{s.finetune} holds a {arch}; --arch {s.arch} cannot fine-tune it (leave --arch out)")
    s.arch, s.depth, s.width_mult, s.stem = arch, source_config.depth, source_config.width_mult, source_config.stem
    for key in ("image_size", "model", "rho"):
        if key not in given and key in saved:
            setattr(s, key, saved[key])
    n = conv_count(source_config)
    if not 0 <= (s.freeze or 0) <= n:
        raise TransferError(f"--freeze {s.freeze} is beyond the depth of {s.finetune} "
                            f"({n} feature layers: --freeze 0 to {n})")
    if s.head_lr_mult <= 0:
        raise TransferError(f"--head-lr-mult must be > 0, got {s.head_lr_mult}")


# -- run.py --features ------------------------------------------------------------------------
def check_images_per_class(labels, classes, where):
    """Refuse a training split too small for ``transfer.fit_probe``.

    labels: (N,) class indices; classes: the class names; where: the folder, for the message.
    Returns None; raises ``TransferError`` (one line) when a class has fewer than
    ``MIN_TRAIN_PER_CLASS`` images.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    few = [f"{c} ({n})" for c, n in zip(classes, counts.tolist()) if n < MIN_TRAIN_PER_CLASS]
    if few:
        raise TransferError(f"--features needs at least {MIN_TRAIN_PER_CLASS} training images per class "
                            f"(one to fit the classifier, one held out to choose its lambda); "
                            f"{len(few)} of {len(classes)} classes in {where} have fewer: "
                            f"{', '.join(few[:3])}{', ...' if len(few) > 3 else ''}")


def _features_folder(source_path, out, overwrite):
    """(folder, created): a new runs/features-<checkpoint name> (or -2, -3, ...), or ``out``
    (``rundir.command_folder``); ``TransferError`` (one line) otherwise."""
    name = os.path.splitext(os.path.basename(source_path))[0]
    try:
        return command_folder(out, os.path.join("runs", f"features-{name}"), ("features.json",), overwrite,
                              "a features run")
    except OutputError as exc:
        raise TransferError(str(exc)) from None


def run_features(source_path, root, out=None, overwrite=False, image_size=None, batch_size=64,
                 workers=0, seed=0, cache=False, device="cpu", losses=("svm", "softmax"),
                 new_stats=False, log=print):
    """``run.py --features``: extract the source's features of ``root``'s train and val
    splits, fit a linear classifier per loss, write ``features.json`` into a new run folder.

    source_path: a checkpoint (``transfer.read_source``); root: the target dataset
    (ROOT/train, ROOT/val); out: the folder (default: a new runs/features-<name>);
    image_size: the crop side (default: the source run's); cache: keep decoded images in
    OUT/cache; losses: one linear classifier per loss ("svm", "softmax"); new_stats:
    estimate the normalisation from the target instead of the source's.
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
    out, created = _features_folder(source_path, out, overwrite)
    # An error or Ctrl-C from here on leaves no empty or half-written folder behind.
    with finished_or_removed(out, created, ("features.json",)):
        model.to(device)
        cache_dir = os.path.join(out, "cache") if cache else None
        with contextlib.ExitStack() as stack:
            # The val loaders are training's; the training images' features need a loader of
            # their own: one centre crop each, where training's loader crops and flips at random.
            _, val, ten = open_loaders(stack, train_set, val_set, resize, crop, batch_size, workers, seed,
                                       cache=cache_dir, train_cache=False)
            train = stack.enter_context(BatchLoader(train_set, batch_size, resize, crop, mode="center",
                                                    workers=workers, seed=seed, cache=cache_dir))
            if new_stats or "mean" not in state:
                mean, std = normalisation(train_set, resize, seed, cache=train.cache)
            else:
                mean, std = state["mean"], state["std"]
            _, maps, regions = model.classifier.params["W"].shape
            log(f"run.py: features of {source_path} ({maps} maps x {regions} regions) for {len(train_set)} train / {len(val_set)} val images, "
                f"{len(train_set.classes)} classes, {crop}px crops; out: {out}")
            features = {name: extract_features(model, loader, mean, std)
                        for name, loader in (("train", train), ("val", val), ("ten_crop", ten))}
        y = features["train"][1]
        check_images_per_class(y, train_set.classes, f"{os.path.join(root, 'train')} (readable images)")
        report = {"source": os.path.abspath(source_path), "data": os.path.abspath(root),
                  "classes": list(train_set.classes), "train_images": int(len(y)),
                  "val_images": int(len(features["val"][1])), "feature_size": int(features["train"][0].shape[1]),
                  "image_size": image_size, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
                  "classifiers": {}}
        for loss in losses:
            c = fit_probe(features["train"], features["val"], features["ten_crop"], len(train_set.classes),
                          loss, seed)
            report["classifiers"][loss] = c
            log(f"  {loss:8s} lambda {c['lambda']:g}: top-1 error {c['single_crop']['top1_error']:.1f}% single "
                f"crop, {c['ten_crop']['top1_error']:.1f}% ten crops; top-5 "
                f"{c['single_crop']['top5_error']:.1f}% / {c['ten_crop']['top5_error']:.1f}%")
        with atomic_write(os.path.join(out, "features.json")) as f:
            json.dump(report, f, indent=2)
    log(f"  report: {os.path.join(out, 'features.json')}")
    return report
