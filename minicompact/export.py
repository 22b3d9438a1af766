"""Trained networks as ONNX graphs (a CompactNet, VGG11 or ResNet18), and the check that ONNX
Runtime computes the same.

The graph takes what the loaders yield and returns what the network's ``forward`` and a
soft-max return, for a fixed crop size (the pyramid's regions depend on it; ResNet18's graph
is fixed to it too) and any batch size.  ``to_onnx`` walks the network's data path
(``data_path``) and writes each layer as ONNX operators, its shapes read from its own arrays:

    image (N, 3, S, S) uint8 ──Cast, Sub(255·mean), Div(255·std)──▶ the normalised input
    CompactNet: L × [Conv (batch-norm folded in) → Relu → MaxPool 3×3]              (sec. 3.1)
                → the R regions of the pyramid, each a Slice + ReduceMax → (N, K·R)  (sec. 3.2)
    VGG11:      8 × [Conv (BN folded) → Relu (→ MaxPool 2×2/2 after convs 1, 2, 4, 6)]
                → the same pyramid → (N, K·R)
    ResNet18:   Conv (BN folded) → Relu (→ MaxPool 3×3/2) → 8 basic blocks, each
                  Relu(Conv(Relu(Conv x)) + shortcut), the shortcut x or a 1×1 Conv of x
                → GlobalAveragePool → Flatten → (N, K), R = 1
    then Gemm with W (Y, K·R) and b → "scores" (N, Y) → Softmax → "probabilities" (N, Y)

* The input normalisation is inside the graph (``transforms.normalize``'s arithmetic); the
  mean and std, the class names, the network and the crop size are also in the model's metadata.
* Batch-norm is in inference form, folded into the convolution before it (``fold_batchnorm``):
  W'[k] = W[k]·γ_k/√(σ²_k+ε), b'[k] = β_k − μ_k·γ_k/√(σ²_k+ε)  (a conv has no bias of its own).
* Every Conv and MaxPool takes its kernel, stride and padding from its layer, and a Conv its
  widths from its W (K, C, kh, kw), never from the configuration's width rule: a thinned
  network (``thin.py``) is a narrower one, a residual block's conv1 may be narrower than its
  conv2, and the graph is physically smaller.
* Max-pooling pads with −∞ in both (ONNX MaxPool ignores its pads), with the same output
  size floor((H + 2p − k)/s) + 1; the pyramid's regions are exactly ``SpatialPyramidPool``'s
  (``pyramid_bins``: neighbouring bins overlap by a pixel where n does not divide the side).
* The classifier's W (Y, K, R) is read k-major, W.reshape(Y, K·R), as ``SoftmaxClassifier``
  reads it: the pyramid's Concat (N, K, R, 1) and the global pool's (N, K, 1, 1) both flatten
  to that order.

``to_onnx`` builds the graph (the ``onnx`` package); ``compare`` runs it in ONNX Runtime and
the model in minicompact on the same images.  Both packages are optional
(``pip install "minicompact[onnx]"``); nothing else imports this module.
"""
from collections import Counter

import numpy as np

from .architectures import arch_of
from .backend import to_cpu
from .im2col import output_size
from .layers.activations import ReLU
from .layers.batchnorm import BatchNorm2D
from .layers.classifier import SoftmaxClassifier
from .layers.conv import Conv2D
from .layers.global_pool import GlobalAvgPool
from .layers.pooling import MaxPool2D, SpatialPyramidPool
from .layers.residual import BasicBlock

OPSET = 21


def _onnx():
    """The ``onnx`` package, or ImportError with the one line that says how to get it."""
    try:
        import onnx
    except ImportError:
        raise ImportError('exporting needs the onnx package: pip install "minicompact[onnx]" '
                          "(onnx and onnxruntime)") from None
    return onnx


def fold_batchnorm(conv, bn):
    """(W', b') of ``conv`` (a ``Conv2D``) with the ``BatchNorm2D`` after it folded in, in
    float64 (module doc): W' (K, C, kh, kw) of conv's W's shape, b' (K,)."""
    W = to_cpu(conv.params["W"]).astype(np.float64)
    gamma, beta = (to_cpu(bn.params[k]).astype(np.float64) for k in ("gamma", "beta"))
    mean, var = (to_cpu(bn.buffers[k]).astype(np.float64) for k in ("running_mean", "running_var"))
    scale = gamma / np.sqrt(var + bn.eps)
    return W * scale[:, None, None, None], beta - mean * scale


def data_path(model):
    """What ``model.forward`` runs, in order: a VGG11's or ResNet18's ``sequence`` (layers,
    and a ResNet's ``BasicBlock``s), a CompactNet's ``layers``."""
    return list(getattr(model, "sequence", model.layers))


class _Graph:
    """The nodes and initializers of a graph being written: one method per kind of step of a
    data path, each taking the name of its input tensor (N, C, H, W) and (H, W), and returning
    those of its output ((H, W) None once the features are flat)."""

    def __init__(self, model):
        self.nodes, self.inits, self.counts = [], [], Counter()
        self.names = {id(layer): name for name, layer in model.named_layers()}   # "layer2.0.conv1"

    def const(self, name, value, dtype=np.float32):
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op, inputs, output, **attrs):
        from onnx import helper
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def numbered(self, stem):
        """"relu1", "relu2", ...: a fresh name for a step that has none of its own."""
        self.counts[stem] += 1
        return f"{stem}{self.counts[stem]}"

    def steps(self, x, hw, steps):
        """Write ``steps`` (``data_path``) one after the other; a ``Conv2D`` takes the
        ``BatchNorm2D`` after it along (folded in)."""
        steps = iter(steps)
        for step in steps:
            if isinstance(step, Conv2D):
                bn = next(steps, None)
                if not isinstance(bn, BatchNorm2D):
                    raise ValueError(f"export: {step!r} is followed by {bn!r}, not by the batch norm "
                                     "that minicompact/export.py folds into it")
                x, hw = self.conv(x, hw, step, bn)
            elif isinstance(step, ReLU):
                x = self.node("Relu", [x], self.numbered("relu"))
            elif isinstance(step, MaxPool2D):
                x, hw = self.max_pool(x, hw, step)
            elif isinstance(step, BasicBlock):
                x, hw = self.block(x, hw, step)
            elif isinstance(step, SpatialPyramidPool):
                x, hw = self.pyramid(x, hw, step)
            elif isinstance(step, GlobalAvgPool):
                x, hw = self.global_pool(x, step)
            elif isinstance(step, SoftmaxClassifier):
                x, hw = self.classifier(x, step)
            else:
                raise ValueError(f"export: minicompact/export.py has no ONNX form for {step!r}")
        return x, hw

    def conv(self, x, hw, conv, bn):
        """Conv with ``bn`` folded in (``fold_batchnorm``), named as ``named_layers`` names
        ``conv``: (N, C, H, W) → (N, K, Ho, Wo), K and C from W."""
        name = self.names[id(conv)]
        W, b = fold_batchnorm(conv, bn)
        (kh, kw), s, p = conv.kernel_size, conv.stride, conv.padding
        y = self.node("Conv", [x, self.const(f"{name}.W", W), self.const(f"{name}.b", b)], name,
                      kernel_shape=[kh, kw], strides=[s, s], pads=[p] * 4)
        return y, (output_size(hw[0], kh, s, p), output_size(hw[1], kw, s, p))

    def max_pool(self, x, hw, pool):
        """MaxPool of ``pool``'s kernel, stride and padding: (N, C, H, W) → (N, C, Ho, Wo)."""
        (kh, kw), s, p = pool.kernel_size, pool.stride, pool.padding
        y = self.node("MaxPool", [x], self.numbered("pool"), kernel_shape=[kh, kw], strides=[s, s], pads=[p] * 4)
        return y, (output_size(hw[0], kh, s, p), output_size(hw[1], kw, s, p))

    def block(self, x, hw, block):
        """A ``BasicBlock``: Relu(conv2(Relu(conv1 x)) + shortcut), the shortcut x itself or the
        1×1 projection of x (each conv with its batch norm folded in); the output is named
        after the block ("layer2.0"), its addition "layer2.0.add"."""
        name = self.names[id(block.conv1)].rpartition(".")[0]
        h, out_hw = self.conv(x, hw, block.conv1, block.bn1)
        h = self.node("Relu", [h], f"{name}.relu1")
        h, out_hw = self.conv(h, out_hw, block.conv2, block.bn2)
        s = x if block.shortcut_conv is None else self.conv(x, hw, block.shortcut_conv, block.shortcut_bn)[0]
        return self.node("Relu", [self.node("Add", [h, s], f"{name}.add")], name), out_hw

    def pyramid(self, x, hw, spp):
        """One Slice + ReduceMax per region of ``spp.regions(H, W)``, in its order:
        (N, K, H, W) → "features" (N, K·R), k-major."""
        if min(hw) < max(spp.levels):
            raise ValueError(f"export: the crop leaves {hw[0]}x{hw[1]} feature maps before a pyramid of "
                             f"levels {spp.levels}")
        axes, keep = self.const("hw_axes", [2, 3], np.int64), []
        for i, (y0, y1, x0, x1) in enumerate(spp.regions(*hw)):
            region = self.node("Slice", [x, self.const(f"region{i}.starts", [y0, x0], np.int64),
                                         self.const(f"region{i}.ends", [y1, x1], np.int64), axes], f"region{i}")
            keep.append(self.node("ReduceMax", [region, axes], f"region{i}.max", keepdims=1))  # (N, K, 1, 1)
        f = self.node("Concat", keep, "pyramid", axis=2)                                        # (N, K, R, 1)
        return self.node("Flatten", [f], "features", axis=1), None

    def global_pool(self, x, pool):
        """GlobalAveragePool: (N, K, H, W) → "features" (N, K), the (N, K, 1) of ``GlobalAvgPool``."""
        g = self.node("GlobalAveragePool", [x], "global_pool")                                  # (N, K, 1, 1)
        return self.node("Flatten", [g], "features", axis=1), None

    def classifier(self, f, classifier):
        """Gemm: features (N, K·R) → "scores" (N, Y) = f · W.reshape(Y, K·R)ᵀ + b."""
        W = to_cpu(classifier.params["W"]).astype(np.float32)
        b = to_cpu(classifier.params["b"]).astype(np.float32)
        return self.node("Gemm", [f, self.const("classifier.W", W.reshape(W.shape[0], -1)),
                                  self.const("classifier.b", b)], "scores", transB=1), None


def to_onnx(model, crop, mean, std, classes=None, producer="minicompact"):
    """The ``onnx.ModelProto`` of ``model`` (a ``CompactNet``, ``VGG11`` or ``ResNet18``) for
    ``crop``×``crop`` uint8 inputs.

    mean, std: the per-channel normalisation (3,) of x/255 the model was trained with; classes:
    class names for the metadata (default: the model's).  Float32 weights, opset ``OPSET``;
    inputs "image" (N, 3, crop, crop) uint8; outputs "scores" and "probabilities" (N, Y).
    ``ValueError`` (one line) for a data path it cannot write or a crop too small for the pyramid.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper

    g = _Graph(model)
    mean64, std64 = np.asarray(mean, np.float64).reshape(1, 3, 1, 1), np.asarray(std, np.float64).reshape(1, 3, 1, 1)
    x = g.node("Cast", ["image"], "image_float", to=TensorProto.FLOAT)
    x = g.node("Sub", [x, g.const("pixel_mean", 255 * mean64)], "centred")
    x = g.node("Div", [x, g.const("pixel_std", 255 * std64)], "normalised")
    scores, _ = g.steps(x, (crop, crop), data_path(model))
    if scores != "scores":
        raise ValueError(f"export: the data path of {type(model).__name__} does not end in its classifier")
    g.node("Softmax", [scores], "probabilities", axis=1)
    y = model.classifier.params["W"].shape[0]
    network = arch_of(model.config)
    graph = helper.make_graph(
        g.nodes, network, [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, crop, crop])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", y]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", y])], g.inits)
    proto = helper.make_model(graph, producer_name=producer, opset_imports=[helper.make_opsetid("", OPSET)])
    names = list(classes if classes is not None else model.config.classes)
    meta = {"classes": "\n".join(names), "crop": str(crop), "mean": " ".join(f"{v:.9g}" for v in np.ravel(mean)),
            "std": " ".join(f"{v:.9g}" for v in np.ravel(std)), "network": network,
            "input": "uint8 RGB crops (N, 3, crop, crop), normalised inside the graph"}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def session(proto):
    """An ONNX Runtime inference session (CPU) of ``proto``; ImportError without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError('checking the export needs onnxruntime: pip install "minicompact[onnx]"') from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compare(model, proto, batches, mean, std):
    """Run ``proto`` in ONNX Runtime and ``model`` in minicompact (evaluation mode, on its
    device) on the same uint8 ``batches`` ((N, 3, S, S) arrays, e.g. a centre-crop loader's).

    Returns {"images", "same_top1" (how many images get the same top-1 class),
    "max_abs_diff", "max_rel_diff" (of the scores, relative to the largest score magnitude of
    each image)}: the two agree when same_top1 == images and max_rel_diff is ~1e-5 in float32.
    """
    from .data.transforms import normalize
    from .backend import get_array_module
    run = session(proto)
    xp = get_array_module(model.classifier.params["W"])
    model.eval()
    n = same = 0
    worst_abs = worst_rel = 0.0
    for images in batches:
        ours = to_cpu(model.forward(normalize(images, mean, std, xp))).astype(np.float64)
        theirs = run.run(["scores"], {"image": np.ascontiguousarray(images, dtype=np.uint8)})[0].astype(np.float64)
        diff = np.abs(ours - theirs)
        scale = np.maximum(np.abs(ours).max(axis=1, keepdims=True), 1e-12)
        n += len(images)
        same += int((ours.argmax(axis=1) == theirs.argmax(axis=1)).sum())
        worst_abs, worst_rel = max(worst_abs, float(diff.max())), max(worst_rel, float((diff / scale).max()))
    model.release_caches()
    return {"images": n, "same_top1": same, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel}
