"""The CompactNet: L-1 feature extraction layers and one classification layer (paper sec. 3).

An L-layer network (``depth`` = L) is::

    [Conv2D → BatchNorm2D → ReLU → MaxPool2D 3×3] × (L-1)  →  SpatialPyramidPool  →  SoftmaxClassifier

* The first conv is 7×7 (S = 49), the others 3×3 (S = 9); convs are padded to keep the size.
* Dictionary sizes grow with depth (sec. 5.3.1): the L-1 feature layers are split into three
  near-equal groups of 128, 256 and 512 filters (see ``dictionary_sizes``).
* Max-pool stride is 2 exactly where the number of filters doubles, 1 elsewhere (sec. 3.1).
* The *stem* (first layer's conv and pool strides) brings the image down: ``"imagenet"`` uses
  conv stride 2 and pool stride 2 (224 px → 56 px); ``"small"`` uses strides 1 (32-px images).
* Weights are initialised as in sec. 5.1: conv Θ^l ~ N(0, 2/(S·K^{l-1})), classifier
  W ~ N(0, 2/(R·K^{L-1})).

The same model class serves SimpleNet, CompressedNet and CompactNet: they differ only in the
regularizer they are trained with (``minicompact.regularizers.variant``).
"""
import json
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .backend import is_gpu_array, to_cpu, to_device
from .system.npz import CheckpointError, atomic_savez, check_array, read_npz, short_repr
from .im2col import output_size
from .layers import BatchNorm2D, Conv2D, MaxPool2D, ReLU, SoftmaxClassifier, SpatialPyramidPool

STEMS = {"imagenet": (2, 2), "small": (1, 1)}  # stem name -> (first conv stride, first pool stride)
SMALL_STEM_BELOW = 96  # px: "auto" picks the small stem for images narrower than this
POOL = 3  # every max-pool is 3×3 with padding 1
# Bounds of a configuration read from a file (``ModelConfig.from_json``), checked before
# anything is built: run.py's --depth stops at 30, and 10^9 numbers are 4 GB in float32.
MAX_DEPTH = 100
MAX_NUMBERS = 10**9


def dictionary_sizes(depth, widths=(128, 256, 512), width_mult=1.0):
    """Number of filters K^l of each feature layer l = 1..L-1 (sec. 5.3.1).

    The n = L-1 feature layers form three groups using ``widths`` (128, 256, 512 filters).
    For n >= 3 each group gets n // 3 layers and the remaining n % 3 layers go to the
    *deepest* groups (deeper layers need more patterns, sec. 5.2.2): n = 11 (depth 12) gives
    3 × 128, 4 × 256, 4 × 512.  For n < 3 there is one layer per width,
    starting at 128 (depth 2: [128]; depth 3: [128, 256]).  ``width_mult`` scales every size
    (rounded, at least 1) for small machines.

    Returns a list of n ints.
    """
    if not isinstance(depth, (int, np.integer)) or depth < 2:
        raise ValueError(f"depth must be an integer >= 2, got {depth!r}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
    n = depth - 1
    if n < 3:
        counts = [1] * n + [0] * (3 - n)
    else:
        counts = [n // 3] * 3
        for g in range(n % 3):
            counts[2 - g] += 1
    sizes = []
    for width, count in zip(widths, counts):
        sizes += [max(1, int(round(width * width_mult)))] * count
    return sizes


@dataclass
class ModelConfig:
    """Everything needed to rebuild a CompactNet (saved inside every checkpoint)."""

    depth: int = 12
    num_classes: int = 1000
    in_channels: int = 3
    widths: tuple = (128, 256, 512)
    width_mult: float = 1.0
    stem: str = "imagenet"
    levels: tuple = (1, 2, 4)
    classes: list = field(default_factory=list)  # class names, for predictions and checkpoints
    # Explicit K^l of each feature layer (a thinned network, ``minicompact.thin``); None: the
    # rule of ``dictionary_sizes``.  The strides still follow that rule (``feature_layers``).
    layer_widths: tuple = None

    def validate(self):
        rule = dictionary_sizes(self.depth, self.widths, self.width_mult)
        if self.layer_widths is not None:
            lw = self.layer_widths
            if (len(lw) != len(rule)
                    or not all(isinstance(k, (int, np.integer)) and k >= 1 for k in lw)):
                raise ValueError(f"layer_widths must be {len(rule)} integers >= 1 (one per feature "
                                 f"layer of depth {self.depth}), got {list(lw)}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {sorted(STEMS)}, got {self.stem!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not self.levels or min(self.levels) < 1:
            raise ValueError(f"pyramid levels must be positive integers, got {self.levels}")
        return self

    def feature_layers(self):
        """(kernel size, conv stride, max-pool stride) of each feature layer l = 1..L-1 (sec. 3.1).

        The first conv is 7×7 and the stem sets its strides; after it convs are 3×3 with
        stride 1 and the pool stride is 2 exactly where the number of filters doubles.
        ``CompactNet`` is built from this list, so it is the one place these rules live.
        """
        sizes = dictionary_sizes(self.depth, self.widths, self.width_mult)
        layers = [(7,) + STEMS[self.stem]]
        layers += [(3, 1, 2 if k > prev else 1) for prev, k in zip(sizes, sizes[1:])]
        return layers

    @staticmethod
    def stem_for(stem, image_size):
        """``stem`` with ``"auto"`` decided: ``"small"`` below 96 px, else ``"imagenet"``.

        The imagenet stem divides the side by 4 before the first 3×3 pool of a deep net;
        small images (CIFAR's 32 px) would reach the pyramid as a pixel or two.
        """
        if stem != "auto":
            return stem
        return "small" if image_size < SMALL_STEM_BELOW else "imagenet"

    def filter_counts(self):
        """K^l of each feature layer l = 1..L-1: ``layer_widths`` when given, else the rule."""
        if self.layer_widths is not None:
            return [int(k) for k in self.layer_widths]
        return dictionary_sizes(self.depth, self.widths, self.width_mult)

    def pyramid_input_side(self, image_size):
        """Side of the feature maps that reach the spatial pyramid for square ``image_size`` inputs.

        Each feature layer is a conv (kernel k, padding k//2) then a 3×3 max-pool (padding 1),
        with the strides of ``feature_layers``; ``im2col.output_size`` gives each side.
        """
        side = int(image_size)
        for k, conv_stride, pool_stride in self.feature_layers():
            side = output_size(side, k, conv_stride, k // 2)
            side = output_size(side, POOL, pool_stride, POOL // 2)
        return side

    def check_image_size(self, image_size):
        """Raise ``ValueError`` (one line) when ``image_size`` leaves maps smaller than the pyramid."""
        side, need = self.pyramid_input_side(image_size), max(self.levels)
        if side < need:
            raise ValueError(f"image size {image_size} leaves {side}x{side} feature maps before the "
                             f"spatial pyramid (its finest level needs >= {need}x{need})")
        return side

    def layer_shapes(self):
        """The shape of every array of the model, from the configuration alone (nothing built).

        Returns a list of ``(layer name, params, buffers)`` in ``CompactNet.named_layers``
        order; params and buffers are dicts name -> shape: conv l: W (K^l, K^{l-1}, k, k);
        bn l: gamma, beta and running_mean, running_var, each (K^l,); classifier: W (Y, K^{L-1}, R)
        with R = Σ n² over the pyramid levels, and b (Y,).
        """
        out, channels = [], self.in_channels
        for l, (k, (ksize, _, _)) in enumerate(zip(self.filter_counts(), self.feature_layers()), start=1):
            out.append((f"conv{l}", {"W": (k, channels, ksize, ksize)}, {}))
            out.append((f"bn{l}", {"gamma": (k,), "beta": (k,)}, {"running_mean": (k,), "running_var": (k,)}))
            channels = k
        regions = sum(n * n for n in self.levels)
        out.append(("classifier", {"W": (self.num_classes, channels, regions), "b": (self.num_classes,)}, {}))
        return out

    def state_shapes(self):
        """dict ``"<layer>.<name>"`` -> shape of every array ``CompactNet.state_arrays`` saves."""
        return {f"{name}.{k}": shape for name, params, buffers in self.layer_shapes()
                for k, shape in {**params, **buffers}.items()}

    def to_json(self):
        d = asdict(self)
        d["widths"], d["levels"] = list(self.widths), list(self.levels)
        if self.layer_widths is None:
            del d["layer_widths"]      # the file reads as before for every unthinned model
        else:
            d["layer_widths"] = [int(k) for k in self.layer_widths]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text):
        """The configuration a file holds (``to_json``'s text), checked before anything is built.

        Raises ``ValueError`` (one line, naming the field) for text that is not a JSON
        object, an unknown field, a field of the wrong type or range, class names that do
        not number ``num_classes``, and a model of more than ``MAX_NUMBERS`` numbers — counted
        from ``state_shapes``, so a declared size of 10^9 filters allocates nothing.
        """
        d = json_fields(text, cls)
        _check_fields(d)
        return config_from_fields(cls, d, ("widths", "levels", "layer_widths"), lambda c: (
            f" (widest layer {max(c.filter_counts())} filters, {c.num_classes} classes)"))


def json_fields(text, cls):
    """The dict a saved configuration's JSON ``text`` holds, every key a field of the
    dataclass ``cls``: ``ValueError`` (one line) for text that is not a JSON object or a key
    that is not a field.  Each configuration then checks the fields' types and ranges."""
    try:
        d = json.loads(text)
    except ValueError:
        raise ValueError("it is not valid JSON") from None
    if not isinstance(d, dict):
        raise ValueError("it is not a JSON object")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    return d


def config_from_fields(cls, d, sequences, detail=lambda config: ""):
    """``cls(**d)``, its fields checked already, with the lists named in ``sequences`` as
    tuples, validated, and refused (``ValueError``, one line; ``detail(config)`` adds to it)
    when ``state_shapes`` declares more than ``MAX_NUMBERS`` numbers: nothing is allocated."""
    for key in sequences:
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    config = cls(**d).validate()
    numbers = sum(math.prod(shape) for shape in config.state_shapes().values())
    if numbers > MAX_NUMBERS:
        raise ValueError(f"it declares a model of {numbers:.3g} numbers{detail(config)}; "
                         f"minicompact loads at most {MAX_NUMBERS:.0e}")
    return config


def read_model_file(path, parse):
    """(config, arrays) of a saved model, both checked before anything is built: ``parse``
    (a configuration class's ``from_json``) reads its "__config__", and every array must have
    the shape the configuration gives it.  ``ValueError`` (one line naming ``path``) otherwise."""
    arrays = read_npz(path)
    if "__config__" not in arrays:
        raise ValueError(f"{path} holds no model configuration")
    try:
        config = parse(str(arrays["__config__"]))
    except ValueError as exc:
        raise ValueError(f"{path} holds a model configuration minicompact cannot use: {exc}") from None
    try:
        check_state_arrays(config.state_shapes(), arrays)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return config, arrays


def _check_fields(d):
    """``ValueError`` naming the first field of the dict ``d`` (a saved ``ModelConfig``) of the
    wrong type or range; bounds ``depth`` so that nothing after this builds long lists."""
    def integer(lo, hi=None):
        return lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= lo
                          and (hi is None or v <= hi))

    def integers(n=None):
        return lambda v: (isinstance(v, list) and len(v) >= 1 and (n is None or len(v) == n)
                          and all(map(integer(1), v)))

    rules = {
        "depth": (integer(2, MAX_DEPTH), f"an integer in [2, {MAX_DEPTH}]"),
        "num_classes": (integer(2), "an integer >= 2"),
        "in_channels": (integer(1), "an integer >= 1"),
        "widths": (integers(3), "a list of 3 integers >= 1"),
        "width_mult": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) and v > 0, "a finite number > 0"),
        "stem": (lambda v: v in STEMS, f"one of {sorted(STEMS)}"),
        "levels": (integers(), "a list of integers >= 1"),
        "classes": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of names"),
        "layer_widths": (lambda v: v is None or integers()(v), "null or a list of integers >= 1"),
    }
    for key, (ok, what) in rules.items():
        if key in d and not ok(d[key]):
            raise ValueError(f"{key} must be {what}, got {short_repr(d[key])}")
    classes, n = d.get("classes") or [], d.get("num_classes", ModelConfig.num_classes)
    if classes and len(classes) != n:
        raise ValueError(f"num_classes is {n} but it names {len(classes)} classes")


def _bn_then_relu(layer, following):
    """Whether ``layer`` is a batch norm and ``following`` the ReLU after it (fusable)."""
    return isinstance(layer, BatchNorm2D) and isinstance(following, ReLU)


def check_state_arrays(shapes, arrays):
    """``CheckpointError`` (a ValueError; one line naming the array) unless ``arrays`` (dict
    key -> NumPy array) holds every key of ``shapes`` (dict key -> shape) as a finite
    floating-point array of that shape, with batch-norm running variances >= 0
    (``checkpoint.check_array``).  Keys of ``arrays`` not in ``shapes`` are ignored."""
    for key, shape in shapes.items():
        if key not in arrays:
            raise CheckpointError(f"saved state has no {key!r}")
        check_array(key, arrays[key], shape)


class CompactNet:
    """An L-layer CompactNet: ``forward(x) -> scores``, ``backward(dscores) -> dx``.

    x: (N, in_channels, H, W) float array (NumPy or CuPy); scores: (N, num_classes).
    ``layers`` is the flat list the data flows through; ``convs``, ``bns`` and
    ``classifier`` name the parameterised layers (Θ^1..Θ^{L-1}, their batch norms, W).
    config: a ``ModelConfig`` (or its fields as keyword arguments); seed: of the initial
    weights; dtype: float32 (training) or float64 (gradient checks); input_grad: whether
    ``backward`` computes dL/dx (off by default: training never needs it).
    """

    def __init__(self, config=None, seed=0, dtype=np.float32, input_grad=False, **kwargs):
        self.config = (config or ModelConfig(**kwargs)).validate()
        cfg = self.config
        rng = np.random.default_rng(seed)
        sizes = cfg.filter_counts()
        self.convs, self.bns, self.pools, self.layers = [], [], [], []
        channels = cfg.in_channels
        for l, (k, (ksize, stride_c, stride_p)) in enumerate(zip(sizes, cfg.feature_layers())):
            first = l == 0
            # The first conv reads the image: its input gradient is rarely wanted and costs
            # a third of that layer's backward (``input_grad=True`` asks for it).
            conv = Conv2D(channels, k, ksize, stride=stride_c, padding=ksize // 2, dtype=dtype, rng=rng,
                          need_input_grad=input_grad or not first)
            bn = BatchNorm2D(k, dtype=dtype)
            pool = MaxPool2D(POOL, stride=stride_p, padding=POOL // 2)
            self.convs.append(conv)
            self.bns.append(bn)
            self.pools.append(pool)
            self.layers += [conv, bn, ReLU(), pool]
            channels = k
        self.spp = SpatialPyramidPool(cfg.levels)
        self.classifier = SoftmaxClassifier(channels, self.spp.num_regions, cfg.num_classes,
                                            dtype=dtype, rng=rng)
        self.layers += [self.spp, self.classifier]
        self.training = True

    # -- the data path -------------------------------------------------------------------
    def forward(self, x):
        """x: (N, C, H, W) → scores (N, Y). Keeps in each layer what backward needs.

        On a GPU in training mode a ``BatchNorm2D`` and the ``ReLU`` after it run as one step,
        ``forward_relu`` (the ReLU layer is skipped, and its launches with it); on the CPU
        and in evaluation mode every layer runs on its own.
        """
        fuse = is_gpu_array(x)
        i, layers = 0, self.layers
        while i < len(layers):
            layer = layers[i]
            if fuse and i + 1 < len(layers) and _bn_then_relu(layer, layers[i + 1]) and layer.training:
                x = layer.forward_relu(x)
                layers[i + 1].cache = None     # the skipped ReLU keeps no stale mask
                i += 2
            else:
                x = layer.forward(x)
                i += 1
        return x

    def backward(self, dscores):
        """dscores: (N, Y) = dL/dscores → dL/dx (N, C, H, W), or None unless built with
        ``input_grad=True``; fills every layer's ``grads``.  A ReLU whose batch norm ran
        ``forward_relu`` is skipped: the batch norm's backward applies its mask."""
        d = dscores
        layers = self.layers
        for i in reversed(range(len(layers))):
            layer = layers[i]
            if i > 0 and _bn_then_relu(layers[i - 1], layer) and layers[i - 1].relu_fused:
                continue
            d = layer.backward(d)
        return d

    def predict(self, x):
        """Class scores in evaluation mode (running BN statistics); restores the mode after."""
        was = self.training
        self.eval()
        try:
            return self.forward(x)
        finally:
            self.train(was)

    # -- modes, devices, dtypes ----------------------------------------------------------
    def train(self, mode=True):
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def to(self, device):
        for layer in self.layers:
            layer.to(device)
        return self

    def astype(self, dtype):
        for layer in self.layers:
            layer.astype(dtype)
        return self

    def zero_grad(self):
        for layer in self.layers:
            layer.zero_grad()

    def release_caches(self):
        """Drop what forward kept for backward (frees memory between evaluation batches)."""
        for layer in self.layers:
            layer.cache = None

    # -- parameters ----------------------------------------------------------------------
    @property
    def param_layers(self):
        """The layers that own parameters, in data order (see ``named_layers`` for their names)."""
        return [layer for layer in self.layers if layer.params]

    def named_layers(self):
        """Yield (name, layer) for every parameterised layer: conv1, bn1, ..., classifier."""
        for l, (conv, bn) in enumerate(zip(self.convs, self.bns), start=1):
            yield f"conv{l}", conv
            yield f"bn{l}", bn
        yield "classifier", self.classifier

    def replace_layer(self, old, new):
        """Put the layer ``new`` where ``old`` is: in ``layers`` (the data path) and in
        ``convs``, ``bns`` or ``classifier`` (sync batch-norm, a fine-tune's new classifier).
        Returns the model."""
        for group in (self.layers, self.convs, self.bns):
            for i, layer in enumerate(group):
                if layer is old:
                    group[i] = new
        if self.classifier is old:
            self.classifier = new
        return self

    def thetas(self):
        """The dictionaries Θ^1..Θ^{L-1}, each (K^l, K^{l-1}, kh, kw) (views, not copies)."""
        return [conv.params["W"] for conv in self.convs]

    def parameter_count(self):
        """Total number of trainable parameters (convs, batch norms, classifier W and b)."""
        return int(sum(p.size for layer in self.layers for p in layer.params.values()))

    def summary(self):
        """A short text table: one line per feature layer, then the classifier."""
        lines = []
        for l, (conv, pool) in enumerate(zip(self.convs, self.pools), start=1):
            W = conv.params["W"]
            lines.append(f"layer {l:2d}: conv {W.shape[2]}x{W.shape[3]} {W.shape[1]:4d}->{W.shape[0]:4d}"
                         f" stride {conv.stride}, max-pool 3x3 stride {pool.stride}")
        W = self.classifier.params["W"]
        lines.append(f"classifier: pyramid {tuple(self.config.levels)} (R={W.shape[2]}), "
                     f"W {tuple(W.shape)} + b")
        lines.append(f"parameters: {self.parameter_count():,}")
        return "\n".join(lines)

    # -- save / load ---------------------------------------------------------------------
    def state_arrays(self):
        """Every parameter and buffer as NumPy arrays keyed ``"<layer>.<name>"``."""
        out = {}
        for name, layer in self.named_layers():
            for k, v in layer.params.items():
                out[f"{name}.{k}"] = to_cpu(v)
            for k, v in layer.buffers.items():
                out[f"{name}.{k}"] = to_cpu(v)
        return out

    def load_state_arrays(self, arrays):
        """Inverse of ``state_arrays``.  Every array is checked before any is loaded: present,
        floating-point, of this model's shape, finite, running variances >= 0
        (``check_state_arrays``; a ValueError naming the array otherwise)."""
        check_state_arrays({f"{name}.{k}": tuple(v.shape) for name, layer in self.named_layers()
                            for store in (layer.params, layer.buffers) for k, v in store.items()}, arrays)
        for name, layer in self.named_layers():
            for store in (layer.params, layer.buffers):
                for k, v in store.items():
                    a = np.asarray(arrays[f"{name}.{k}"])
                    device = "gpu" if not isinstance(v, np.ndarray) else "cpu"
                    store[k] = to_device(a.astype(v.dtype), device)
        return self

    def save(self, path):
        """Write config, weights and BN running statistics to one ``.npz`` (atomically)."""
        arrays = self.state_arrays()
        arrays["__config__"] = np.array(self.config.to_json())
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path, dtype=np.float32):
        """Rebuild a model saved with ``save`` (or from a training checkpoint).  The
        configuration and every array are checked before the model is built (``from_json``,
        ``check_state_arrays``); ``ValueError`` (one line) otherwise."""
        config, arrays = read_model_file(path, ModelConfig.from_json)
        return cls(config, dtype=dtype).load_state_arrays(arrays)
