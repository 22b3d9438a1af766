"""VGG11 and ResNet18 for CompactNets' regularizers: VGG11_CC and ResNet18_CC (sec. 5.3.4, Table 3).

The paper applies Ω (eq. 2) and Γ (eq. 6) to two standard networks "in the same fashion as in
CompactNets, except for layers whose inputs are not convolutional feature maps or a
spatial-pyramid decomposition", where R and S are set to 1.  Here:

* ``VGG11``: VGG's configuration A with batch norm (Simonyan & Zisserman 2015): eight 3×3
  convolutions of 64-128-256-256-512-512-512-512 filters, each followed by batch norm and
  ReLU, with 2×2/2 max-pools after convs 1, 2, 4 and 6.  VGG's fifth pool and its three
  fully-connected layers are replaced by CompactNet's head, ``SpatialPyramidPool`` (1, 2, 4)
  and ``SoftmaxClassifier(512, 21, Y)``, as SPP-net replaced pool5 (He et al. 2014).  That is
  a choice, not the paper's network (whose VGG11_CC keeps the FC layers, 63 M effective
  parameters): Ω then acts on groups W[y, k, :] of one feature map over the R = 21 regions,
  exactly as in a CompactNet, and the network has 9.3 M parameters for 10 classes, 20.0 M for
  1000, instead of 133 M.
* ``ResNet18``: He et al. 2016, basic blocks (``layers.residual.BasicBlock``), stages of
  64-128-256-512 filters × 2 blocks, a 1×1 projection shortcut where the width or the stride
  changes, global average pooling and ``SoftmaxClassifier(512, 1, Y)``: the plain linear
  layer, Ω with R = 1; the 1×1 projections get Γ with S = 1.  11,689,512 parameters for 1000
  classes (torchvision's ``resnet18``), 11,173,962 for 10 classes on 32-px images.

Image size picks the stem as for a CompactNet (``ModelConfig.stem_for``): "imagenet" is
ResNet's 7×7/2 conv + 3×3/2 max-pool and all four of VGG11's pools (224 px reach ResNet18's
global pool at 7×7, VGG11's pyramid at 14×14); "small" (below 96 px) is a 3×3/1 conv and no
stem pool for ResNet (the usual CIFAR ResNet18), and VGG11 without its first pool (32 px reach
the head at 4×4 in both).  ``width_mult`` scales every width (rounded, at least 1).

The regularizers (``variant_for``): every convolution Θ, projections included, is one Θ^l of
eq. 1, in ``thetas()`` order; β of a conv grows linearly with its *depth index*, the number of
convs on the longest path from the image to it, itself included, exactly as
``regularizers.beta_schedule`` over L = that longest path + 1 (VGG11: 8 + 1 = 9; ResNet18:
17 + 1 = 18, its name).  A projection shortcut reads the block's input, as the block's first
conv does, so it shares that conv's depth index and β.  CompressedNet's Ψ and SimpleNet's ℓ2
apply unchanged (one β for every conv).

What the training code uses of a ``CompactNet`` (objective.Penalty, optim.SGD, metrics,
training.Trainer, checkpoints) both networks offer under the same names: ``forward``,
``backward``, ``layers`` (every layer, flat), ``param_layers``, ``named_layers()``, ``convs``,
``bns``, ``classifier``, ``thetas()``, modes, devices, ``state_arrays()``, ``save``/``load``,
``replace_layer`` (sync batch-norm, a fine-tune's new classifier); the bookkeeping among them
is CompactNet's own methods, borrowed (they read only ``layers``, ``named_layers()``,
``convs`` and ``config``).  ``ArchConfig.channel_spaces`` says which feature maps each conv
reads and writes, so that ``graph_metrics`` counts the dead structure of a ResNet's residual
streams (``training.write_report``), and ``thin_graph`` removes it, across residual connections,
into a network of explicit per-conv widths (``ArchConfig.layer_widths``); ``export`` writes
either as an ONNX graph.  Not yet for either network: the GPU's fused batch-norm + ReLU (each
layer runs on its own).

A checkpoint says which network it holds: its ``__config__`` JSON has an "arch" field for
these two and none for a CompactNet.  ``config_from_json``, ``build_model`` and
``load_model`` read either kind (run.py's --resume, --evaluate, --features, --finetune).
"""
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np

from .im2col import output_size
from .layers.activations import ReLU
from .layers.batchnorm import BatchNorm2D
from .layers.classifier import SoftmaxClassifier
from .layers.conv import Conv2D
from .layers.global_pool import GlobalAvgPool
from .layers.pooling import MaxPool2D, SpatialPyramidPool
from .layers.residual import BasicBlock
from .model import CompactNet, ModelConfig, config_from_fields, json_fields, read_model_file
from .regularizers import variant
from .system.npz import short_repr

ARCHS = ("vgg11", "resnet18")
CHOICES = ("compactnet",) + ARCHS   # run.py --arch
STEMS = ("imagenet", "small")
# VGG11 (configuration A): conv widths, "M" a 2×2/2 max-pool; VGG's fifth pool is the pyramid.
VGG11_PLAN = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)
VGG_LEVELS = (1, 2, 4)
RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))   # (width, stride of its first block)
RESNET18_BLOCKS = 2                                          # basic blocks per stage


def scaled(width, width_mult):
    """A width times ``width_mult``, rounded, at least 1."""
    return max(1, int(round(width * width_mult)))


class ConvSpec(NamedTuple):
    """One convolution of a network: its name, C_in, C_out, kernel side, stride, and depth
    index (convs on the longest path from the image to it, itself included)."""
    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    depth: int


def bn_name(conv_name):
    """The batch norm after a conv: "conv3" → "bn3", "layer2.0.shortcut.conv" → "layer2.0.shortcut.bn"."""
    head, dot, tail = conv_name.rpartition(".")
    return head + dot + tail.replace("conv", "bn", 1)


@dataclass
class ArchConfig:
    """Everything needed to rebuild a VGG11 or ResNet18 (saved in every checkpoint as JSON).

    arch: "vgg11" or "resnet18"; stem: "imagenet" or "small" (``stem_for`` decides "auto"
    from the image size); levels: VGG11's pyramid (None: (1, 2, 4)); ResNet18 has none.
    layer_widths: a thinned network's filters per conv, in ``conv_plan`` order (``thin.py``);
    None: the widths of the rule (``width_mult``).  Convs that write one residual stream
    (``channel_spaces``) have one width; a block's projection exists where the rule's
    network has one, whatever the widths.
    """

    arch: str = "resnet18"
    num_classes: int = 1000
    in_channels: int = 3
    width_mult: float = 1.0
    stem: str = "imagenet"
    levels: tuple = None
    classes: list = field(default_factory=list)
    layer_widths: tuple = None

    stem_for = staticmethod(ModelConfig.stem_for)

    def validate(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.in_channels < 1 or not self.width_mult > 0:
            raise ValueError(f"in_channels must be >= 1 and width_mult > 0, got "
                             f"{self.in_channels} and {self.width_mult}")
        if self.levels is not None:
            if self.arch != "vgg11":
                raise ValueError("levels are VGG11's pyramid; ResNet18 pools globally (R = 1)")
            if not self.levels or min(self.levels) < 1:
                raise ValueError(f"pyramid levels must be positive integers, got {self.levels}")
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"num_classes is {self.num_classes} but it names {len(self.classes)} classes")
        if self.layer_widths is not None:
            self._space_widths()
        return self

    def _space_widths(self):
        """{space: width} of ``layer_widths`` (``channel_spaces``'s spaces, "image" included);
        ``ValueError`` (one line) for the wrong count, a width < 1, or two convs writing one
        residual stream with different widths."""
        lw, rule = self.layer_widths, self.rule_plan()
        if len(lw) != len(rule) or not all(isinstance(k, (int, np.integer)) and k >= 1 for k in lw):
            raise ValueError(f"layer_widths must be {len(rule)} integers >= 1 (one per convolution of "
                             f"{self.arch}), got {list(lw)}")
        widths = {"image": self.in_channels}
        for spec, (_, writes), k in zip(rule, self.channel_spaces()[0], lw):
            if widths.setdefault(writes, int(k)) != k:
                raise ValueError(f"layer_widths give {spec.name} {k} filters, but it adds into "
                                 f"{writes!r}, which another conv gives {widths[writes]}")
        return widths

    @property
    def pyramid_levels(self):
        """VGG11's pyramid levels; () for ResNet18 (global average pooling)."""
        return () if self.arch == "resnet18" else tuple(self.levels or VGG_LEVELS)

    @property
    def regions(self):
        """R of the classifier W (Y, K, R): Σ n² over the pyramid levels, 1 for ResNet18."""
        return sum(n * n for n in self.pyramid_levels) or 1

    def vgg_plan(self):
        """VGG11's sequence of conv widths (scaled) and "M" pools, the small stem's first pool left out."""
        plan = list(VGG11_PLAN)
        if self.stem == "small":
            plan.remove("M")
        return [w if w == "M" else scaled(w, self.width_mult) for w in plan]

    def resnet_blocks(self):
        """ResNet18's blocks after the stem: (name "layer<s>.<b>", C_in, C_out, stride) each."""
        blocks, channels = [], scaled(RESNET18_STAGES[0][0], self.width_mult)
        for s, (width, stride) in enumerate(RESNET18_STAGES, start=1):
            width = scaled(width, self.width_mult)
            for b in range(RESNET18_BLOCKS):
                blocks.append((f"layer{s}.{b}", channels, width, stride if b == 0 else 1))
                channels = width
        return blocks

    def conv_plan(self):
        """Every convolution as a ``ConvSpec``, in ``thetas()`` order (data order; within a
        ResNet block conv1, conv2, then the projection), with ``layer_widths`` when given.
        The one place the architectures' convolutions are listed: the networks,
        ``state_shapes`` and ``variant_for`` read it."""
        rule = self.rule_plan()
        if self.layer_widths is None:
            return rule
        widths = self._space_widths()
        return [spec._replace(in_channels=widths[reads], out_channels=int(k))
                for spec, (reads, _), k in zip(rule, self.channel_spaces()[0], self.layer_widths)]

    def rule_plan(self):
        """``conv_plan`` at the widths of the rule (``width_mult``), ``layer_widths`` aside."""
        if self.arch == "vgg11":
            specs, channels = [], self.in_channels
            for width in (w for w in self.vgg_plan() if w != "M"):
                l = len(specs) + 1
                specs.append(ConvSpec(f"conv{l}", channels, width, 3, 1, l))
                channels = width
            return specs
        small = self.stem == "small"
        stem_width = scaled(RESNET18_STAGES[0][0], self.width_mult)
        specs, depth = [ConvSpec("conv1", self.in_channels, stem_width, 3 if small else 7,
                                 1 if small else 2, 1)], 1
        for name, c_in, c_out, stride in self.resnet_blocks():
            specs += [ConvSpec(f"{name}.conv1", c_in, c_out, 3, stride, depth + 1),
                      ConvSpec(f"{name}.conv2", c_out, c_out, 3, 1, depth + 2)]
            if stride != 1 or c_in != c_out:
                specs.append(ConvSpec(f"{name}.shortcut.conv", c_in, c_out, 1, stride, depth + 1))
            depth += 2
        return specs

    @property
    def depth(self):
        """L of the regularizers: the longest chain of convs plus the classifier (9 and 18)."""
        return max(spec.depth for spec in self.conv_plan()) + 1

    def head_side(self, image_size):
        """Side of the feature maps that reach the pyramid (VGG11) or the global pool (ResNet18)
        for square ``image_size`` inputs (convs pad k//2; VGG pools are 2×2/2, ResNet's 3×3/2/1)."""
        side = int(image_size)
        if self.arch == "vgg11":
            for w in self.vgg_plan():
                side = output_size(side, 2, 2, 0) if w == "M" else side
            return side
        for spec in self.conv_plan():
            if not spec.name.endswith("shortcut.conv"):
                side = output_size(side, spec.kernel, spec.stride, spec.kernel // 2)
            if spec.name == "conv1" and self.stem == "imagenet":
                side = output_size(side, 3, 2, 1)
        return side

    def check_image_size(self, image_size):
        """Raise ``ValueError`` (one line) when ``image_size`` leaves maps too small for the head."""
        side, need = self.head_side(image_size), max(self.pyramid_levels, default=1)
        if side < need:
            raise ValueError(f"image size {image_size} leaves {side}x{side} feature maps before the "
                             f"{'spatial pyramid' if self.pyramid_levels else 'global pool'} of "
                             f"{self.arch} (it needs >= {need}x{need})")
        return side

    def layer_shapes(self):
        """The shape of every array of the network, from the configuration alone (nothing
        built), as ``ModelConfig.layer_shapes``: a list of ``(layer name, params, buffers)`` in
        ``named_layers`` order (each conv, its batch norm, then the classifier); params and
        buffers are dicts name -> shape."""
        out = []
        for spec in self.conv_plan():
            k = spec.out_channels
            out.append((spec.name, {"W": (k, spec.in_channels, spec.kernel, spec.kernel)}, {}))
            out.append((bn_name(spec.name), {"gamma": (k,), "beta": (k,)},
                        {"running_mean": (k,), "running_var": (k,)}))
        last = self.conv_plan()[-1].out_channels    # the last conv2 of ResNet18, never a projection
        out.append(("classifier", {"W": (self.num_classes, last, self.regions), "b": (self.num_classes,)}, {}))
        return out

    def state_shapes(self):
        """dict ``"<layer>.<name>"`` -> shape of every array ``state_arrays`` saves, from the
        configuration alone (nothing built)."""
        return {f"{name}.{k}": shape for name, params, buffers in self.layer_shapes()
                for k, shape in {**params, **buffers}.items()}

    def channel_spaces(self):
        """Which feature maps each convolution reads and writes: ``(edges, head)``.

        edges: one ``(reads, writes)`` pair of *space* names per conv, in ``conv_plan`` order;
        head: the space the classifier reads.  A space is a set of feature maps that share
        their channel index: "image" (the input), one conv's output in a chain (VGG11's
        "conv3", a block's "layer2.0.conv1"), or a residual stream "layer<s>": the maps of
        stage s, which the stem or the stage's first block writes, every block of the stage
        adds to (its conv2 and its projection write into it) and every block reads.
        ``graph_metrics`` follows dead channels through these spaces.
        """
        if self.arch == "vgg11":
            names = [spec.name for spec in self.rule_plan()]
            return list(zip(["image"] + names[:-1], names)), names[-1]
        projected = {spec.name[:-len(".shortcut.conv")] for spec in self.rule_plan()
                     if spec.name.endswith(".shortcut.conv")}
        edges, stream = [("image", "layer1")], "layer1"
        for name, _, _, _ in self.resnet_blocks():
            added = name.split(".")[0]                       # "layer2.0" adds to "layer2"
            edges += [(stream, f"{name}.conv1"), (f"{name}.conv1", added)]
            if name in projected:
                edges.append((stream, added))
            stream = added
        return edges, stream

    def to_json(self):
        d = asdict(self)
        d["levels"] = None if self.levels is None else list(self.levels)
        if self.layer_widths is None:
            del d["layer_widths"]      # an unthinned network's file reads as before
        else:
            d["layer_widths"] = [int(k) for k in self.layer_widths]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text):
        """The configuration ``to_json`` wrote, checked before anything is built: ``ValueError``
        (one line) for text that is not a JSON object, an unknown field or one of the wrong type
        or range, and a model of more than ``model.MAX_NUMBERS`` numbers."""
        d = json_fields(text, cls)
        def integer(lo):
            return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo

        rules = {
            "arch": (lambda v: v in ARCHS, f"one of {list(ARCHS)}"),
            "num_classes": (integer(2), "an integer >= 2"),
            "in_channels": (integer(1), "an integer >= 1"),
            "width_mult": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) and 0 < v <= 1000, "a number in (0, 1000]"),
            "stem": (lambda v: v in STEMS, f"one of {list(STEMS)}"),
            "levels": (lambda v: v is None or (isinstance(v, list) and 1 <= len(v) <= 10
                                               and all(map(integer(1), v)) and max(v) <= 1000),
                       "null or a list of integers >= 1"),
            "classes": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of names"),
            "layer_widths": (lambda v: v is None or (isinstance(v, list) and len(v) <= 1000
                                                     and all(map(integer(1), v)) and max(v, default=1) <= 100_000),
                             "null or a list of integers >= 1"),
        }
        for key, (ok, what) in rules.items():
            if key in d and not ok(d[key]):
                raise ValueError(f"{key} must be {what}, got {short_repr(d[key])}")
        return config_from_fields(cls, d, ("levels", "layer_widths"))


def variant_for(config, name, rho, compressed_beta=0.1):
    """``regularizers.variant`` for a VGG11 or ResNet18: one β per conv of ``thetas()``.

    config: an ``ArchConfig`` (or a network, whose ``config`` is read); name: "simple",
    "compressed" or "compact"; rho, compressed_beta: as ``variant``.  CompactNet's schedule
    β^l = ρ·(l-1)/(L-2) is taken over L = ``config.depth`` and each conv gets the β of its
    depth index (``ConvSpec.depth``), so the projections share their block's first conv's.
    Returns a ``RegConfig`` whose ``betas`` pair with ``thetas()`` (its ``depth`` property,
    len(betas) + 1, then counts the convs, not the network's depth).
    """
    config = getattr(config, "config", config)
    base = variant(name, config.depth, rho, compressed_beta=compressed_beta)
    return replace(base, betas=tuple(base.betas[spec.depth - 1] for spec in config.conv_plan()))


class ArchNet:
    """What ``VGG11`` and ``ResNet18`` share: the data path through ``sequence`` (layers and
    blocks), and CompactNet's bookkeeping, borrowed (module docstring).

    A subclass sets ``config``, ``sequence`` (what forward runs, in order), ``layers`` (every
    layer, flat, in data order), ``convs`` and ``bns`` (in ``config.conv_plan()`` order),
    ``classifier`` and ``training``.
    """

    arch = None

    def _config(self, config, kwargs):
        config = (config or ArchConfig(arch=self.arch, **kwargs)).validate()
        if config.arch != self.arch:
            raise ValueError(f"{type(self).__name__} needs a configuration of arch {self.arch!r}, "
                             f"got {config.arch!r}")
        return config

    def forward(self, x):
        """x: (N, C, H, W) → scores (N, Y); each layer keeps what backward needs."""
        for step in self.sequence:
            x = step.forward(x)
        return x

    def backward(self, dscores):
        """dscores: (N, Y) = dL/dscores → dL/dx (N, C, H, W), or None unless built with
        ``input_grad=True``; fills every layer's ``grads``."""
        d = dscores
        for step in reversed(self.sequence):
            d = step.backward(d)
        return d

    @property
    def depth(self):
        return self.config.depth

    def conv_depths(self):
        """The depth index of each conv of ``thetas()`` (``ConvSpec.depth``)."""
        return [spec.depth for spec in self.config.conv_plan()]

    def named_layers(self):
        """Yield (name, layer) for every parameterised layer, convs and batch norms in
        ``conv_plan`` order, then "classifier"."""
        for spec, conv, bn in zip(self.config.conv_plan(), self.convs, self.bns):
            yield spec.name, conv
            yield bn_name(spec.name), bn
        yield "classifier", self.classifier

    def summary(self):
        """A short text table: one line per convolution, then the classifier."""
        lines = [f"{s.name:<22} conv {s.kernel}x{s.kernel} {s.in_channels:4d}->{s.out_channels:4d} "
                 f"stride {s.stride}, depth index {s.depth}" for s in self.config.conv_plan()]
        W = self.classifier.params["W"]
        lines.append(f"classifier: R={W.shape[2]}, W {tuple(W.shape)} + b")
        lines.append(f"parameters: {self.parameter_count():,}")
        return "\n".join(lines)

    @classmethod
    def load(cls, path, dtype=np.float32):
        """A network saved with ``save`` (or a training checkpoint), checked as ``load_architecture``."""
        model = load_architecture(path, dtype)
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a {model.config.arch}, not a {cls.arch}")
        return model

    # CompactNet's bookkeeping, borrowed: each reads only layers, named_layers(), convs, config.
    train, eval, to, astype = CompactNet.train, CompactNet.eval, CompactNet.to, CompactNet.astype
    zero_grad, release_caches, predict = CompactNet.zero_grad, CompactNet.release_caches, CompactNet.predict
    param_layers, thetas, parameter_count = CompactNet.param_layers, CompactNet.thetas, CompactNet.parameter_count
    state_arrays, load_state_arrays, save = CompactNet.state_arrays, CompactNet.load_state_arrays, CompactNet.save
    replace_layer = CompactNet.replace_layer   # VGG11's lists; ResNet18 has its own


class VGG11(ArchNet):
    """VGG11 with batch norm and CompactNet's head: ``forward(x) -> scores`` (module docstring).

    [Conv2D 3×3 → BatchNorm2D → ReLU (→ MaxPool2D 2×2/2)] × 8 → SpatialPyramidPool → SoftmaxClassifier

    config: an ``ArchConfig`` of arch "vgg11" (or its fields as keyword arguments); seed: of
    the initial weights (He, as a CompactNet's); dtype: float32 or float64; input_grad:
    whether ``backward`` returns dL/dx.  ``layers`` is a list, as a CompactNet's, so layers
    may be swapped in it (``replace_layer``, as ``use_sync_batchnorm`` does).
    """

    arch = "vgg11"

    def __init__(self, config=None, seed=0, dtype=np.float32, input_grad=False, **kwargs):
        self.config = cfg = self._config(config, kwargs)
        rng = np.random.default_rng(seed)
        specs = iter(cfg.conv_plan())
        self.convs, self.bns, self.pools, self.layers = [], [], [], []
        for item in cfg.vgg_plan():
            if item == "M":
                self.pools.append(MaxPool2D(2, stride=2, padding=0))
                self.layers.append(self.pools[-1])
                continue
            spec = next(specs)
            conv = Conv2D(spec.in_channels, spec.out_channels, 3, stride=1, padding=1, dtype=dtype,
                          rng=rng, need_input_grad=input_grad or spec.depth > 1)
            self.convs.append(conv)
            self.bns.append(BatchNorm2D(spec.out_channels, dtype=dtype))
            self.layers += [conv, self.bns[-1], ReLU()]
        self.spp = SpatialPyramidPool(cfg.pyramid_levels)
        self.classifier = SoftmaxClassifier(self.convs[-1].out_channels, cfg.regions, cfg.num_classes,
                                            dtype=dtype, rng=rng)
        self.layers += [self.spp, self.classifier]
        self.training = True

    @property
    def sequence(self):
        return self.layers


class ResNet18(ArchNet):
    """ResNet18: ``forward(x) -> scores`` (module docstring).

    stem: Conv2D (7×7/2 or 3×3/1) → BatchNorm2D → ReLU (→ MaxPool2D 3×3/2 for "imagenet"),
    then 4 stages × 2 ``BasicBlock``s → GlobalAvgPool → SoftmaxClassifier(K, 1, Y).

    config, seed, dtype, input_grad: as ``VGG11``.  ``blocks`` lists the basic blocks.
    ``layers``, ``convs`` and ``bns`` are tuples: each block holds its own layers, so swapping
    one in these tuples would not reach the data path, and trying to is an error; a layer is
    swapped with ``replace_layer`` (``use_sync_batchnorm``, ``transfer.new_classifier``).
    """

    arch = "resnet18"

    def __init__(self, config=None, seed=0, dtype=np.float32, input_grad=False, **kwargs):
        self.config = cfg = self._config(config, kwargs)
        rng = np.random.default_rng(seed)
        stem = cfg.conv_plan()[0]
        conv = Conv2D(stem.in_channels, stem.out_channels, stem.kernel, stride=stem.stride,
                      padding=stem.kernel // 2, dtype=dtype, rng=rng, need_input_grad=input_grad)
        bn = BatchNorm2D(stem.out_channels, dtype=dtype)
        self.stem = [conv, bn, ReLU()] + ([MaxPool2D(3, stride=2, padding=1)] if cfg.stem == "imagenet" else [])
        specs = {spec.name: spec for spec in cfg.conv_plan()}
        self.blocks = []
        for name, _, _, stride in cfg.resnet_blocks():
            c1, c2 = specs[f"{name}.conv1"], specs[f"{name}.conv2"]
            self.blocks.append(BasicBlock(c1.in_channels, c2.out_channels, stride, dtype=dtype, rng=rng,
                                          mid_channels=c1.out_channels,
                                          projection=f"{name}.shortcut.conv" in specs))
        self.pool = GlobalAvgPool()
        self.classifier = SoftmaxClassifier(self.blocks[-1].conv2.out_channels, 1, cfg.num_classes,
                                            dtype=dtype, rng=rng)
        self._collect()
        self.training = True

    def _collect(self):
        """The tuples ``sequence``, ``layers``, ``convs`` and ``bns``, from the stem, the blocks
        and the head, where the layers live."""
        self.sequence = tuple(self.stem + self.blocks + [self.pool, self.classifier])
        self.layers = tuple(self.stem + [layer for block in self.blocks for layer in block.layers]
                            + [self.pool, self.classifier])
        self.convs, self.bns = (self.stem[0],), (self.stem[1],)
        for block in self.blocks:   # conv_plan's order: conv1, conv2, then the projection
            self.convs += tuple(c for c in (block.conv1, block.conv2, block.shortcut_conv) if c is not None)
            self.bns += tuple(b for b in (block.bn1, block.bn2, block.shortcut_bn) if b is not None)

    def replace_layer(self, old, new):
        """Put the layer ``new`` where ``old`` is, in the stem, a block or the head, where the
        data path reads it; the tuples follow (``CompactNet.replace_layer``).  Returns the model."""
        self.stem = [new if layer is old else layer for layer in self.stem]
        for block in self.blocks:
            for attr, layer in list(vars(block).items()):
                if layer is old:
                    setattr(block, attr, new)
        if self.classifier is old:
            self.classifier = new
        self._collect()
        return self


ARCHITECTURES = {"vgg11": VGG11, "resnet18": ResNet18}


def build_architecture(config, seed=0, dtype=np.float32, input_grad=False):
    """The network of ``config`` (an ``ArchConfig``): a ``VGG11`` or a ``ResNet18``."""
    return ARCHITECTURES[config.validate().arch](config, seed=seed, dtype=dtype, input_grad=input_grad)


def load_architecture(path, dtype=np.float32):
    """Rebuild a VGG11 or ResNet18 saved with ``save`` (or a training checkpoint of one),
    checked as ``load_model``; ``ValueError`` (one line) for anything else."""
    model = load_model(path, dtype)
    if not isinstance(model, ArchNet):
        raise ValueError(f"{path} holds a CompactNet, not a VGG11 or ResNet18")
    return model


def arch_of(config):
    """The run.py --arch of a configuration: "compactnet" for a ``ModelConfig``, else its arch."""
    return getattr(config, "arch", "compactnet")


def config_from_json(text):
    """The configuration a checkpoint's ``__config__`` holds: an ``ArchConfig`` when its JSON
    object has an "arch" field, else a ``ModelConfig``; each checked by its own ``from_json``
    (``ValueError``, one line: an unknown arch is "arch must be one of [...]")."""
    try:
        d = json.loads(text)
    except ValueError:
        raise ValueError("it is not valid JSON") from None
    if isinstance(d, dict) and "arch" in d:
        return ArchConfig.from_json(text)
    return ModelConfig.from_json(text)


def build_model(config, seed=0, dtype=np.float32, input_grad=False):
    """The network of either kind of configuration: a ``CompactNet`` for a ``ModelConfig``,
    a ``VGG11`` or ``ResNet18`` for an ``ArchConfig``."""
    if isinstance(config, ArchConfig):
        return build_architecture(config, seed=seed, dtype=dtype, input_grad=input_grad)
    return CompactNet(config, seed=seed, dtype=dtype, input_grad=input_grad)


def load_model(path, dtype=np.float32):
    """``CompactNet.load`` for any network: the configuration (``config_from_json``) and every
    array are checked before it is built; ``ValueError`` (one line) otherwise."""
    config, arrays = read_model_file(path, config_from_json)
    return build_model(config, dtype=dtype).load_state_arrays(arrays)


def conv_count(config):
    """The convolutions (each with its batch norm) of either kind of configuration: L - 1 for
    a CompactNet, 8 for VGG11, 20 for ResNet18 (17 + 3 projections)."""
    return (len(config.layer_shapes()) - 1) // 2
