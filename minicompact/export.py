"""A trained CompactNet as an ONNX graph, and the check that ONNX Runtime computes the same.

The graph takes what the loaders yield and returns what ``CompactNet.forward`` and a soft-max
return, for a fixed crop size (the pyramid's regions depend on it) and any batch size:

    image (N, 3, S, S) uint8 ──Cast, Sub(255·mean), Div(255·std)──▶ the normalised input
      → L × [Conv (batch-norm folded in) → Relu → MaxPool 3×3]          (sec. 3.1)
      → the R regions of the pyramid, each a Slice + ReduceMax → (N, K·R)  (sec. 3.2)
      → Gemm with W (Y, K·R) and b → "scores" (N, Y) → Softmax → "probabilities" (N, Y)

* The input normalisation is inside the graph (``transforms.normalize``'s arithmetic); the
  mean and std, the class names and the crop size are also in the model's metadata.
* Batch-norm is in inference form, folded into the convolution before it:
  W'[k] = W[k]·γ_k/√(σ²_k+ε), b'[k] = β_k − μ_k·γ_k/√(σ²_k+ε)  (a conv has no bias of its own).
* Max-pooling pads with −∞ in both (ONNX MaxPool ignores its pads), with the same output
  size floor((H + 2p − 3)/s) + 1; the pyramid's regions are exactly ``SpatialPyramidPool``'s
  (``pyramid_bins``: neighbouring bins overlap by a pixel where n does not divide the side).
* A thinned network (``thin.py``, ``thin.npz``) is a narrower CompactNet and exports the same
  way: the graph is physically smaller.

``to_onnx`` builds the graph (the ``onnx`` package); ``compare`` runs it in ONNX Runtime and
the model in minicompact on the same images.  Both packages are optional
(``pip install "minicompact[onnx]"``); nothing else imports this module.
"""
import numpy as np

from .backend import to_cpu
from .layers.pooling import pyramid_bins

OPSET = 21


def _onnx():
    """The ``onnx`` package, or ImportError with the one line that says how to get it."""
    try:
        import onnx
    except ImportError:
        raise ImportError('exporting needs the onnx package: pip install "minicompact[onnx]" '
                          "(onnx and onnxruntime)") from None
    return onnx


def folded_convs(model):
    """[(W', b', stride, padding, pool stride)] of every feature layer: each conv with the
    batch-norm after it folded in, in float64 (module doc).  model: a ``CompactNet``."""
    out = []
    for conv, bn, pool in zip(model.convs, model.bns, model.pools):
        W = to_cpu(conv.params["W"]).astype(np.float64)
        gamma, beta = (to_cpu(bn.params[k]).astype(np.float64) for k in ("gamma", "beta"))
        mean, var = (to_cpu(bn.buffers[k]).astype(np.float64) for k in ("running_mean", "running_var"))
        scale = gamma / np.sqrt(var + bn.eps)
        out.append((W * scale[:, None, None, None], beta - mean * scale, conv.stride, conv.padding, pool))
    return out


def feature_side(model, crop):
    """The side of the last feature map for ``crop``-pixel inputs (the pyramid's input)."""
    side = crop
    for conv, pool in zip(model.convs, model.pools):
        kh = conv.kernel_size[0]
        side = (side + 2 * conv.padding - kh) // conv.stride + 1
        side = (side + 2 * pool.padding - pool.kernel_size[0]) // pool.stride + 1
    return side


def to_onnx(model, crop, mean, std, classes=None, producer="minicompact"):
    """The ``onnx.ModelProto`` of ``model`` (a ``CompactNet``) for ``crop``×``crop`` uint8 inputs.

    mean, std: the per-channel normalisation (3,) of x/255 the model was trained with; classes:
    class names for the metadata (default: the model's).  Float32 weights, opset ``OPSET``;
    inputs "image" (N, 3, crop, crop) uint8; outputs "scores" and "probabilities" (N, Y).
    """
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    mean64, std64 = np.asarray(mean, np.float64).reshape(1, 3, 1, 1), np.asarray(std, np.float64).reshape(1, 3, 1, 1)
    x = node("Cast", ["image"], "image_float", to=TensorProto.FLOAT)
    x = node("Sub", [x, const("pixel_mean", 255 * mean64)], "centred")
    x = node("Div", [x, const("pixel_std", 255 * std64)], "normalised")
    for l, (W, b, stride, padding, pool) in enumerate(folded_convs(model), start=1):
        kh, kw = W.shape[2:]
        x = node("Conv", [x, const(f"conv{l}.W", W), const(f"conv{l}.b", b)], f"conv{l}",
                 kernel_shape=[kh, kw], strides=[stride, stride], pads=[padding] * 4)
        x = node("Relu", [x], f"relu{l}")
        k, s, p = pool.kernel_size[0], pool.stride, pool.padding
        x = node("MaxPool", [x], f"pool{l}", kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    side = feature_side(model, crop)
    axes, keep = const("hw_axes", [2, 3], np.int64), []
    for i, (y0, y1, x0, x1) in enumerate((y0, y1, x0, x1) for n in model.spp.levels
                                         for (y0, y1) in pyramid_bins(side, n) for (x0, x1) in pyramid_bins(side, n)):
        region = node("Slice", [x, const(f"region{i}.starts", [y0, x0], np.int64),
                                const(f"region{i}.ends", [y1, x1], np.int64), axes], f"region{i}")
        keep.append(node("ReduceMax", [region, axes], f"region{i}.max", keepdims=1))   # (N, K, 1, 1)
    f = node("Concat", keep, "pyramid", axis=2)                                         # (N, K, R, 1)
    f = node("Flatten", [f], "features", axis=1)                                        # (N, K·R), k-major
    W = to_cpu(model.classifier.params["W"]).astype(np.float32)
    b = to_cpu(model.classifier.params["b"]).astype(np.float32)
    scores = node("Gemm", [f, const("classifier.W", W.reshape(W.shape[0], -1)), const("classifier.b", b)],
                  "scores", transB=1)
    node("Softmax", [scores], "probabilities", axis=1)
    y = W.shape[0]
    graph = helper.make_graph(
        nodes, "compactnet", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, crop, crop])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", y]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", y])], inits)
    proto = helper.make_model(graph, producer_name=producer, opset_imports=[helper.make_opsetid("", OPSET)])
    names = list(classes if classes is not None else model.config.classes)
    meta = {"classes": "\n".join(names), "crop": str(crop), "mean": " ".join(f"{v:.9g}" for v in np.ravel(mean)),
            "std": " ".join(f"{v:.9g}" for v in np.ravel(std)),
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
