"""Thinning: remove a trained CompactNet's dead structure for real (paper secs. 4 and 5.2.2).

``metrics.alive_channels`` finds, to a fixed point, the channels whose removal leaves the
network's function unchanged: filters that are all zero or read only dead channels (their
map is a constant), filters no alive filter or class reads, and so input channels no alive
filter reads and feature maps no class reads.  ``thin_model`` builds the narrower network
that ``metrics.effective_parameters`` counts ("structural"): a ``CompactNet`` with explicit
per-layer widths (``ModelConfig.layer_widths``), holding the alive rows and columns of every
Θ^l and of W, the alive batch-norm parameters and running statistics.

Folding the constants.  A dead filter k of layer l outputs a constant map: its pre-BN map
is a constant u_k (0 for an all-zero filter), so after evaluation-mode batch norm, ReLU and
max-pooling (padded with -inf, so still constant) it is the constant

    c_k = max(0, γ_k (u_k - μ_k) / sqrt(σ²_k + ε) + β_k).

A consumer j of layer l+1 then receives, *away from the zero-padded borders*, the constant
δ_j = Σ_{k dead} c_k · Σ_taps Θ^{l+1}[j, k] on its pre-BN map, and its batch norm computes
(y_j + δ_j - μ_j)·s_j: the thin model gets the same from y_j alone with μ_j ← μ_j - δ_j.
u of a dead filter of l+1 is its δ.  After the last feature layer the spatial pyramid of a
constant map is that constant in every region, so class y's score shifts by
Σ_{k dead} c_k Σ_r W[y, k, r], which goes into the bias b_y (exactly, no border there).

Inexact only at the borders: within kh//2 pixels of an edge the dense conv sees the
constant only through the in-image taps, the thin one assumes all taps.  The difference is
zero where a dead channel's constant is 0 (ReLU cut it) or its consumers' weights are
centre-only, and it is *measured* by ``compare_predictions`` (scores and predictions of the
dense and thin model on the same images, and over a whole split by ``evaluate_pair``);
``run.py --thin`` (``cli/thin_command.py``) writes it into its report.

The first layer's input channels (the image's colours) are never removed: the data would
have to change with them.

A VGG11 or ResNet18 goes to ``thin_graph.thin_network``, which does the same across residual
connections (channels joined by an addition are removed together or not at all).
"""
from dataclasses import replace

import numpy as np

from .architectures import build_model
from .backend import device_of, get_array_module, to_cpu
from .data.transforms import normalize
from .folding import BN_ARRAYS, conv_record, fold_classifier, fold_conv
from .layers.compact_conv import CompactConv2D, dense_fraction
from .losses import accuracy_topk
from .metrics import alive_channels, threshold_
from .model import CompactNet
from .training.checkpoint_check import read_checkpoint
from .thin_graph import thin_network
from .training.trainer import scores


def _dead_error(l, k):
    return ValueError(f"every one of the {k} filters of conv{l} is dead (all zero, or read by no "
                      "class): the network's output does not depend on its input; nothing to thin")


def thin_model(model, threshold=None):
    """The network without its dead structure, and a record of what was removed.

    model: a ``CompactNet`` (any mode, any device, float32 or float64; not modified).
    threshold: zero |w| < threshold in copies of Θ^l and W first (sec. 5.2.1); None: only
    exact zeros count.
    Returns (thin, record): thin, a ``CompactNet`` on model's device and dtype, in
    evaluation mode, whose ``config.layer_widths`` are the alive counts; record, a dict of
    Python values: "layers" (one dict per conv and the classifier: widths, inputs and
    parameters before/after, how many filters were all zero, constant or unread, and how
    many constants were folded), "removed" (channels removed in all), "changed" (False when
    nothing was removed).  Raises ``ValueError`` (one line) when a whole layer is dead.
    A VGG11 or ResNet18 (``architectures``) is thinned by ``thin_graph.thin_network``, across
    its residual connections, and returns the same.
    """
    if not isinstance(model, CompactNet):
        return thin_network(model, threshold)
    # Copies (state_arrays returns NumPy arrays themselves): the model is never modified.
    arrays = {k: np.array(v, copy=True) for k, v in model.state_arrays().items()}
    L1 = len(model.convs)
    thetas = [arrays[f"conv{l}.W"] for l in range(1, L1 + 1)]
    W, b = arrays["classifier.W"], arrays["classifier.b"]
    if threshold is not None:
        threshold_(thetas + [W], threshold)
    alive = alive_channels(thetas, W)
    if not all(a.any() for a in alive):       # one dead layer kills all: name where it starts
        zero_layers = [l for l, t in enumerate(thetas, 1) if not t.any()]
        l = zero_layers[0] if zero_layers else (len(thetas) if not W.any() else
                                                 next(l for l, a in enumerate(alive, 1) if not a.any()))
        raise _dead_error(l, thetas[l - 1].shape[0])

    out, layers = {}, []
    keep_in = np.ones(model.config.in_channels, dtype=bool)     # the image: every colour stays
    const = np.zeros(model.config.in_channels)                  # the value of each removed channel
    for l, (T, a, bn) in enumerate(zip(thetas, alive, model.bns), start=1):
        folded, bn_const, count = fold_conv(T, {k: arrays[f"bn{l}.{k}"] for k in BN_ARRAYS}, keep_in, const,
                                            a, bn.eps)
        out[f"conv{l}.W"] = folded.pop("W")
        out.update({f"bn{l}.{k}": v for k, v in folded.items()})
        layers.append(conv_record(f"conv{l}", T, keep_in, a, a, out[f"conv{l}.W"], count))
        keep_in, const = a, np.maximum(0.0, bn_const)           # c_k after ReLU and max-pool

    # The classifier: drop the maps no class reads or that are constant; fold c_k into b.
    classifier, row = fold_classifier(W, b, keep_in, const)
    out.update({f"classifier.{k}": v for k, v in classifier.items()})
    layers.append(row)

    widths = tuple(int(a.sum()) for a in alive)
    config = _with_widths(model.config, widths)
    dtype = model.classifier.params["W"].dtype
    thin = CompactNet(config, dtype=dtype, input_grad=model.convs[0].need_input_grad)
    thin.load_state_arrays(out)
    thin.to(device_of(model.classifier.params["W"])).eval()
    removed = sum(int((~a).sum()) for a in alive)
    return thin, {"layers": layers, "widths_before": [int(a.size) for a in alive],
                  "widths_after": list(widths), "removed": removed, "changed": removed > 0,
                  "params_before": model.parameter_count(), "params_after": thin.parameter_count()}


def _with_widths(config, widths):
    """A copy of ``config`` with explicit ``layer_widths`` (None when they equal the rule's)."""
    rule = replace(config, layer_widths=None).filter_counts()
    return replace(config, layer_widths=None if list(widths) == rule else tuple(widths)).validate()


def use_compact_convs(model, names, groups=None):
    """Swap the named convs of ``model`` (e.g. ["conv3"]) for ``CompactConv2D`` layers with
    the same weights, in place; returns model.  groups: dict name -> groups (default:
    ``group_filters`` of the weights).  The saved arrays do not change (``state_arrays``)."""
    for name in names:
        l = int(name[4:]) - 1
        old = model.convs[l]
        new = CompactConv2D(old.params["W"], groups=(groups or {}).get(name), stride=old.stride,
                            padding=old.padding, need_input_grad=old.need_input_grad)
        new.train(model.training)
        model.convs[l] = new
        model.layers[model.layers.index(old)] = new
    return model


def choose_convs(model, x, repeats=5, min_gain=1.1):
    """Per conv layer, measure once whether ``CompactConv2D`` beats the dense GEMM; use it
    where it does (by ``min_gain`` or more).  model: a (thin) ``CompactNet``, changed in
    place; x: a batch of its inputs (the layer inputs are this batch's activations).
    Timings alternate dense and compact calls on the layer's real input.
    Returns one dict per conv: layer, groups, computed (share of the dense channel pairs
    the groups compute), dense_ms, compact_ms, choice ("compact" or "dense").
    """
    import time
    was = model.training
    model.eval()
    records, chosen = [], []
    h = x
    for l, conv in enumerate(list(model.convs)):
        compact = CompactConv2D(conv.params["W"], stride=conv.stride, padding=conv.padding).eval()
        frac = dense_fraction(compact.groups, conv.out_channels, conv.in_channels)
        times = {"dense": [], "compact": []}
        if frac < 1.0:
            conv.forward(h), compact.forward(h)
            for _ in range(repeats):
                for name, layer in (("dense", conv), ("compact", compact)):
                    t0 = time.perf_counter()
                    layer.forward(h)
                    times[name].append(time.perf_counter() - t0)
        dense_s = float(np.median(times["dense"])) if times["dense"] else None
        compact_s = float(np.median(times["compact"])) if times["compact"] else None
        better = compact_s is not None and dense_s >= min_gain * compact_s
        records.append({"layer": f"conv{l + 1}", "groups": len(compact.groups), "computed": frac,
                        "dense_ms": None if dense_s is None else 1e3 * dense_s,
                        "compact_ms": None if compact_s is None else 1e3 * compact_s,
                        "choice": "compact" if better else "dense"})
        if better:
            chosen.append(f"conv{l + 1}")
        for layer in model.layers[4 * l:4 * l + 4]:      # conv, BN, ReLU, pool: the next input
            h = layer.forward(h)
        compact.cache = None
    model.release_caches()
    use_compact_convs(model, chosen)
    model.train(was)
    return records


def compare_predictions(dense, thin, x):
    """Scores of both models in evaluation mode on the same inputs, and how far apart they are.

    x: (N, C, H, W) on the models' device, their dtype.  Returns a dict: "max_abs_score_diff"
    (the largest |s_dense - s_thin| over N·Y scores), "max_abs_score" (of the dense scores),
    "same_prediction" (fraction of the N images with the same arg-max class), and the
    scores (NumPy (N, Y) arrays) as "dense" and "thin".
    """
    sd, st = to_cpu(dense.predict(x)), to_cpu(thin.predict(x))
    return {"max_abs_score_diff": float(np.abs(sd - st).max()), "max_abs_score": float(np.abs(sd).max()),
            "same_prediction": float((sd.argmax(axis=1) == st.argmax(axis=1)).mean()),
            "dense": sd, "thin": st}


# -- measuring a dense and a thin network side by side ------------------------------------
def evaluate_pair(dense, thin, loader, mean, std):
    """Top-1/top-5 errors (%) of both models over ``loader`` and how often they disagree.

    dense, thin: ``CompactNet``s in evaluation mode; loader: a ``BatchLoader`` ("center" or
    "tencrop"; each batch scored as ``Trainer.evaluate`` scores it, ``trainer.scores``);
    mean, std: the run's normalisation (3,).  Returns a dict: "dense" and "thin"
    ({"top1_error", "top5_error"}), "images", "same_prediction" (fraction of images whose
    top-1 class is the same), "max_abs_score_diff" (over every score, or log-probability
    for ten crops).
    """
    xp = get_array_module(dense.classifier.params["W"])
    hits = np.zeros((2, 2))
    same, n, diff = 0, 0, 0.0
    try:
        for images, labels in loader.epoch(0):
            sd, st = [scores(m, images, mean, std, xp) for m in (dense, thin)]
            y = xp.asarray(labels)
            for i, s in enumerate((sd, st)):
                hits[i] += [int(c) for c in accuracy_topk(s, y, ks=(1, 5))]
            same += int((sd.argmax(axis=1) == st.argmax(axis=1)).sum())
            diff = max(diff, float(xp.abs(sd - st).max()))
            n += len(labels)
    finally:
        dense.release_caches()
        thin.release_caches()
    err = 100 * (1 - hits / max(n, 1))
    return {"dense": {"top1_error": err[0, 0], "top5_error": err[0, 1]},
            "thin": {"top1_error": err[1, 0], "top5_error": err[1, 1]},
            "images": n, "same_prediction": same / max(n, 1), "max_abs_score_diff": diff}


def images_per_second(models, x, repeats=7):
    """Inference throughput of each model on the same batch x, measured side by side.

    models: dict name -> model (evaluation mode); the calls alternate between the models
    (A, B, A, B, ...) so that a change of machine load hits them alike; one warm-up call
    each.  Returns dict name -> median images/s over ``repeats`` calls.
    """
    import time
    times = {name: [] for name in models}
    for name, m in models.items():
        m.forward(x)
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m.forward(x)
            times[name].append(time.perf_counter() - t0)
    for m in models.values():
        m.release_caches()
    return {name: x.shape[0] / float(np.median(t)) for name, t in times.items()}


def load_dense(path):
    """(model, train_state, settings) from a run's checkpoint, checked whole before the model
    is built (``checkpoint_check.read_checkpoint``); ``ValueError`` (one line) otherwise.
    The model is the checkpoint's network: a ``CompactNet``, or a VGG11 or ResNet18
    (``architectures.build_model``)."""
    config, arrays, _, state = read_checkpoint(path)  # CheckpointError is a ValueError
    model = build_model(config).load_state_arrays(arrays)
    return model.eval(), state, dict(state.get("settings") or {})


def measure_pair(dense, thin, center, ten_crop, mean, std, repeats=7):
    """Accuracy and speed of a network and its thinning on the same images: what
    ``run.py --thin`` reports.

    dense, thin: networks in evaluation mode (thin from ``thin_model(dense)``);
    center, ten_crop: ``BatchLoader``s of the val split ("center" and "tencrop" mode); mean,
    std: the normalisation (3,); repeats: timed calls per model.  The first centre batch is
    the one every model is timed on and on which ``choose_convs`` picks, layer by layer, the
    convs of a copy of thin that run as ``CompactConv2D`` ("thin_compact"; CompactNets only:
    for a VGG11 or ResNet18 "compact_convs" is empty and "thin_compact" is thin).
    Returns a dict: "accuracy" ({"single_crop", "ten_crop"}: ``evaluate_pair``'s dicts),
    "compact_convs" (``choose_convs``'s records), "speed" (batch, image_size, repeats,
    images_per_s of "dense", "thin" and "thin_compact", the speed-ups over dense and the
    machine's load average while it ran: timings are only comparable on an idle machine).
    """
    import os
    batches = center.epoch(0)
    first = next(batches)[0]
    batches.close()
    accuracy = {"single_crop": evaluate_pair(dense, thin, center, mean, std),
                "ten_crop": evaluate_pair(dense, thin, ten_crop, mean, std)}
    xp = get_array_module(dense.classifier.params["W"])
    x = normalize(first, mean, std, xp)
    timed, convs = {"dense": dense, "thin": thin}, []
    if isinstance(thin, CompactNet):   # choose_convs walks a CompactNet's chain of layers
        fast = CompactNet(thin.config, dtype=thin.classifier.params["W"].dtype).load_state_arrays(thin.state_arrays())
        fast.to(device_of(thin.classifier.params["W"])).eval()
        convs = choose_convs(fast, x)
    if any(c["choice"] == "compact" for c in convs):
        timed["thin_compact"] = fast                     # else it is the same network as thin
    speed = images_per_second(timed, x, repeats)
    speed.setdefault("thin_compact", speed["thin"])
    return {"accuracy": accuracy, "compact_convs": convs,
            "speed": {"batch": int(x.shape[0]), "image_size": int(x.shape[-1]), "repeats": repeats,
                      "images_per_s": speed, "speedup": speed["thin"] / speed["dense"],
                      "speedup_with_compact_convs": speed["thin_compact"] / speed["dense"],
                      "load_average": list(os.getloadavg())}}
