"""The paper's recipe as plain functions a notebook can call: images → network → fit → report.

    from minicompact.training import open_images, build_network, Trainer, write_report

    with open_images("my_photos", image_size=32, batch_size=32) as images:   # ROOT/train, ROOT/val
        net = build_network(images, model="compact", depth=8, rho=0.03, width_mult=0.25, epochs=10)
        trainer = Trainer(net, images, epochs=10, out_dir="runs/photos")
        trainer.fit()                                    # epochs of eq. 1, last.npz, best.npz, log
        report = write_report(trainer, images.ten_crop, "runs/photos")
    print(report["after_threshold"]["accuracy"]["single_crop"]["top1_error"])

run.py makes the same four calls; what it adds is the command line (flags, the paper's and
the demo's settings, one-line errors, run folders, resume, several ranks).

* ``open_images``    the train and val splits of a folder, their loaders and the normalisation
* ``build_network``  a CompactNet, CompressedNet or SimpleNet with SGD, its schedule and the
                     regulariser of eq. 1 (its strength following the run's length); or
                     VGG11 / ResNet18 with the same regularisers (``arch``, sec. 5.3.4)
* ``Images``, ``Network``  what the two hold; ``Trainer`` takes one of each
"""
import contextlib
from dataclasses import dataclass, field

from .. import losses
from ..architectures import ArchConfig, build_architecture, variant_for
from ..data import transforms
from ..data.folders import open_dataset
from ..data.loader import BatchLoader
from ..group_scale import for_run
from ..model import CompactNet, ModelConfig
from ..objective import Penalty, loss_function
from ..optim import SGD, StepLR
from ..regularizers import variant


@dataclass
class Images:
    """A dataset's two splits, ready to train on: what ``Trainer`` reads.

    train_set, val_set: ``ImageFolder``s; train, val, ten_crop: ``BatchLoader``s (random crops
    and flips; the centre crop; the ten crops of sec. 5.1); mean, std: the per-channel
    normalisation (3,) of the training images; resize, crop: the image sizes.
    ``close()`` (or leaving a ``with`` block) stops the loaders' worker processes.
    """
    train_set: object
    val_set: object
    train: BatchLoader
    val: BatchLoader
    ten_crop: BatchLoader
    mean: tuple
    std: tuple
    resize: int
    crop: int
    _stack: contextlib.ExitStack = field(default=None, repr=False)

    @property
    def classes(self):
        """The class names, in label order."""
        return list(self.train_set.classes)

    def close(self):
        if self._stack is not None:
            self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_loaders(stack, train_set, val_set, resize, crop, batch_size, workers=0, seed=0, cache=None,
                 train_cache=True, rank=0, ranks=1):
    """(train, val, ten-crop val) ``BatchLoader``s of one rank, entered into ``stack`` (a
    ``contextlib.ExitStack``: their worker pools stop with it).  The one place loaders are built.

    cache: None, or a folder where each split's uint8 cache is reused or built; train_cache:
    False leaves the training loader uncached (an evaluation reads no training image).
    rank, ranks: this process's share of a data-parallel run.
    """
    common = dict(resize=resize, crop=crop, workers=workers, seed=seed, rank=rank, ranks=ranks)
    train = stack.enter_context(BatchLoader(train_set, batch_size, mode="train", drop_last=False,
                                            cache=cache if train_cache else None, **common))
    val = stack.enter_context(BatchLoader(val_set, batch_size, mode="center", cache=cache, **common))
    ten = stack.enter_context(BatchLoader(val_set, max(1, batch_size // 10), mode="tencrop",
                                          cache=val.cache, **common))
    return train, val, ten


def normalisation(train_set, resize, seed=0, cache=None):
    """Per-channel (mean, std) of the training images, in units of x/255: the one estimate
    every command uses (``transforms.estimate_mean_std``); ``ValueError`` if none decodes."""
    mean, std = transforms.estimate_mean_std(train_set, resize, seed=seed, cache=cache)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def open_images(root, image_size=224, batch_size=32, workers=0, seed=0, cache=None, mean_std=None):
    """``Images`` of the folder ``root`` (``root/train/<class>/*``, ``root/val/<class>/*``).

    image_size: the crop side (images are resized to ``scaled_sizes(image_size)``, 256/224 as
    the paper); cache: a folder for decoded-image caches (None: decode every epoch);
    mean_std: a known normalisation (e.g. a checkpoint's) instead of estimating it.
    Raises ``data.folders.DatasetError`` (one line) for a folder that is not a dataset.
    """
    train_set, val_set = open_dataset(root)
    resize, crop = transforms.scaled_sizes(image_size)
    stack = contextlib.ExitStack()
    try:
        train, val, ten = open_loaders(stack, train_set, val_set, resize, crop, batch_size, workers, seed, cache)
        mean, std = mean_std or normalisation(train_set, resize, seed, train.cache)
    except BaseException:
        stack.close()
        raise
    return Images(train_set, val_set, train, val, ten, tuple(mean), tuple(std), resize, crop, stack)


@dataclass
class Network:
    """What one training step needs besides the data: the model, ``SGD`` and its ``StepLR``
    schedule, the regulariser of eq. 1 (an ``objective.Penalty``, or None) and the loss."""
    model: CompactNet
    optimizer: SGD
    schedule: StepLR
    penalty: Penalty = None
    loss: object = losses.softmax_cross_entropy


def build_network(images, model="compact", depth=8, rho=0.03, width_mult=0.25, stem="auto", epochs=10,
                  lr=0.01, momentum=0.9, lr_step=8, warmup=2.0, cw=1e-4, ctheta=1e-4, update="auto",
                  group_scale="auto", compressed_beta=0.1, loss="cross_entropy", seed=0, device="cpu",
                  layer_widths=None, arch="compactnet"):
    """A ``Network`` for ``images`` (an ``Images``): CompactNet (Γ, eq. 6, and Ω, eq. 2, with
    ρ), CompressedNet (Ψ, eq. 7) or SimpleNet (ℓ2 only) — ``model`` "compact", "compressed"
    or "simple" — trained by SGD with momentum, ×0.1 every ``lr_step`` epochs after
    ``warmup`` epochs of linear warmup.

    arch: "compactnet" (the paper's network, of ``depth`` layers), or "vgg11" / "resnet18"
    (``architectures``: VGG11_CC and ResNet18_CC of sec. 5.3.4 with the "compact" model),
    whose depth is their own (``depth`` is not used) and whose regulariser is ``model``'s,
    one β per conv (``variant_for``).

    update, group_scale "auto": the group-lasso parts of C_W and C_Θ are scaled to the run's
    length and the update rule chosen by it (``group_scale.for_run``: the paper's schedule
    keeps eq. 1 as written and subgradient steps; a shorter run gets a larger scale and
    proximal steps).  Otherwise update is "subgradient" or "proximal" and group_scale a pair
    (k_W, k_Θ) or None (eq. 1 as written).  layer_widths: a thinned network's K^l (for
    vgg11 and resnet18, its filters per conv: ``ArchConfig.layer_widths``).
    """
    if "auto" in (update, group_scale):
        k, rule, _ = for_run(len(images.train_set), images.train.batch_size, lr, lr_step, epochs, warmup)
        group_scale = (k, k) if group_scale == "auto" else group_scale
        update = rule if update == "auto" else update
    stem = ModelConfig.stem_for(stem, images.crop)
    if arch == "compactnet":
        config = ModelConfig(depth=depth, num_classes=len(images.classes), width_mult=width_mult, stem=stem,
                             classes=images.classes, layer_widths=None if layer_widths is None else tuple(layer_widths))
        net = CompactNet(config, seed=seed).to(device)
        reg = variant(model, depth, rho, compressed_beta=compressed_beta)
    else:
        config = ArchConfig(arch=arch, num_classes=len(images.classes), width_mult=width_mult, stem=stem,
                            classes=images.classes, layer_widths=None if layer_widths is None else tuple(layer_widths))
        net = build_architecture(config, seed=seed).to(device)
        reg = variant_for(net, model, rho, compressed_beta=compressed_beta)
    penalty = Penalty(net, reg, cw, ctheta, update, momentum, group_scale)
    return Network(net, SGD(net.param_layers, lr=lr, momentum=momentum),
                   StepLR(lr, step_size=lr_step, gamma=0.1, warmup_epochs=warmup), penalty, loss_function(loss))
