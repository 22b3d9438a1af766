"""How compact a trained network is: the sparsity metrics of secs. 5.2.1 and 5.2.2.

Weights are thresholded first (|w| < 1e-5 -> 0, sec. 5.2.1, ``threshold_``); then each layer
is read as a matrix of *groups*:

* conv layer l, Θ^l: (K^l, K^{l-1}, kh, kw): "filters" are the K^l rows Θ[k], "channels" the
  K^{l-1} input feature maps, a group is Θ[k, t, :, :] (the contribution C^l(k, t), eq. 5);
* classifier, W: (Y, K^{L-1}, R): "filters" are the Y class classifiers W[y], "channels" the
  K^{L-1} feature maps, a group is W[y, k, :] (eq. 4).

A group is zero when *all* its weights are exactly zero.  Everything here runs on the CPU
with NumPy (arrays are brought over with ``backend.to_cpu``) and returns plain Python
numbers, so the results are JSON-serialisable.
"""
import numpy as np

from .backend import get_array_module, to_cpu

KINDS = {"conv": 4, "classifier": 3}


def threshold_(arrays, threshold=1e-5):
    """Zero, in place, every weight with |w| < threshold (sec. 5.2.1).

    arrays: one array or an iterable of arrays (NumPy or CuPy, any shape).
    Returns the number of entries this call set to zero (entries already zero not counted).
    """
    if hasattr(arrays, "shape"):
        arrays = [arrays]
    zeroed = 0
    for a in arrays:
        xp = get_array_module(a)
        small = (xp.abs(a) < threshold) & (a != 0)
        zeroed += int(small.sum())
        a[small] = 0
    return zeroed


def _zero_groups(weight, kind):
    """Boolean (filters, channels) matrix: True where the group weight[f, c, ...] is all zero."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    w = to_cpu(weight)
    if w.ndim != KINDS[kind]:
        expected = "(K, T, kh, kw)" if kind == "conv" else "(Y, K, R)"
        raise ValueError(f"a {kind} weight must have shape {expected}, got shape {w.shape}")
    return ~w.reshape(w.shape[0], w.shape[1], -1).any(axis=2)


def layer_metrics(weight, kind):
    """Dictionary sparsity, average compactness and layer sparsity of one layer (sec. 5.2.2).

    weight: Θ^l of shape (K, T, kh, kw) for kind "conv", or W of shape (Y, K, R) for kind
    "classifier".  For the classifier the "filters" are the Y class classifiers, so its
    dictionary sparsity is the fraction of classes whose classifier is all zero.
    Returns a dict of Python numbers:

    * dictionary_sparsity: zero filters / filters;
    * average_compactness: the mean over *all* filters of the fraction of input channels
      whose group is zero, where a zero filter contributes 0 (its groups are already counted
      by dictionary sparsity).  So dictionary_sparsity + average_compactness is the fraction
      of zero groups, which is <= layer_sparsity, the inequality sec. 5.2.2 states;
    * average_compactness_alive: the same mean taken over the nonzero filters only
      (0 when every filter is zero);
    * layer_sparsity: zero weights / weights;
    * counts: filters, channels, zero_filters, zero_groups (all zero groups, those of zero
      filters included), params, zero_params.
    """
    w = to_cpu(weight)
    zero = _zero_groups(w, kind)
    filters, channels = zero.shape
    dead = zero.all(axis=1)
    zero_in_alive = int(zero[~dead].sum())
    n_alive = filters - int(dead.sum())
    params = int(w.size)
    zero_params = params - int(np.count_nonzero(w))
    return {
        "dictionary_sparsity": float(dead.mean()),
        "average_compactness": zero_in_alive / (filters * channels),
        "average_compactness_alive": zero_in_alive / (n_alive * channels) if n_alive else 0.0,
        "layer_sparsity": zero_params / params,
        "filters": filters,
        "channels": channels,
        "zero_filters": int(dead.sum()),
        "zero_groups": int(zero.sum()),
        "params": params,
        "zero_params": zero_params,
    }


def feature_maps_per_class(W):
    """How many feature maps each class classifier uses (the per-class count of eq. 3).

    W: (Y, K, R). Returns a NumPy int array (Y,): the number of k with W[y, k, :] not all zero.
    """
    return (~_zero_groups(W, "classifier")).sum(axis=1)


def _check_chain(shapes, w_shape):
    """Consecutive layers must agree: Θ^l is (K^l, K^{l-1}, ...), W is (Y, K^{L-1}, R)."""
    if not shapes:
        raise ValueError("need at least one conv dictionary (depth >= 2)")
    for l in range(1, len(shapes)):
        if shapes[l][1] != shapes[l - 1][0]:
            raise ValueError(f"conv{l + 1} weight has shape {shapes[l]}: expected "
                             f"{shapes[l - 1][0]} input channels to match conv{l} "
                             f"{shapes[l - 1]}")
    if w_shape[1] != shapes[-1][0]:
        raise ValueError(f"classifier weight has shape {w_shape}: expected {shapes[-1][0]} "
                         f"feature maps to match conv{len(shapes)} {shapes[-1]}")


def alive_channels(thetas, W):
    """Follow dead structure through the network to a fixed point.

    thetas: L-1 arrays Θ^l (K^l, K^{l-1}, kh, kw). W: (Y, K^{L-1}, R).
    Returns a list of L-1 boolean NumPy arrays (K^l,): True for a channel whose removal
    changes the network's function.  A channel k of conv l is dead when

    * forward: every group Θ^l[k, t] reading an *alive* input channel t is zero (pixels are
      always alive), so its pre-BN output is constant; or
    * backward: no alive consumer reads it: every Θ^{l+1}[j, k] of an alive j is zero, or,
      for the last conv, every W[y, k, :] is zero (every class is a consumer).

    Killing a channel can kill others in both directions, so both sweeps repeat until
    nothing changes (each round only removes channels, so this ends).
    """
    groups = [~_zero_groups(t, "conv") for t in thetas]      # True: group is used
    used_by_classes = (~_zero_groups(W, "classifier")).any(axis=0)
    alive = [g.any(axis=1) for g in groups]                   # start: nonzero filters
    changed = True
    while changed:
        before = [a.copy() for a in alive]
        for l in range(1, len(groups)):                       # forward: reads alive input?
            alive[l] &= groups[l][:, alive[l - 1]].any(axis=1)
        alive[-1] &= used_by_classes
        for l in range(len(groups) - 2, -1, -1):              # backward: read by alive j?
            alive[l] &= groups[l + 1][alive[l + 1], :].any(axis=0)
        changed = any((a != b).any() for a, b in zip(alive, before))
    return alive


def effective_parameters(thetas, W, bias_count, bn_per_layer=2):
    """Parameter counts of a (thresholded) network: total, nonzero and structural.

    thetas: L-1 arrays Θ^l (K^l, K^{l-1}, kh, kw). W: (Y, K^{L-1}, R).
    bias_count: number of classifier biases (Y). bn_per_layer: batch-norm parameters per
    conv output channel (γ and β: 2).  Returns a dict of Python ints:

    * total: every weight of Θ^l and W, plus bn_per_layer·ΣK^l BN parameters, plus the
      biases;
    * nonzero: the nonzero weights of Θ^l and W plus *all* BN parameters and biases (these
      are not regularized nor thresholded).  This is the paper's "# Params." count: the
      parameters left after thresholding at 1e-5 (sec. 5.2.1);
    * structural: what survives once dead structure is removed (``alive_channels``): the
      nonzero weights of Θ^l[k, t] with k and t alive (t any pixel channel for l = 1) and
      of W[:, k, :] with k alive, plus the BN parameters of alive channels, plus the biases;
    * alive_channels / channels: per conv layer, alive and total output channel counts.

    Why a dead channel can be removed: a zero filter outputs 0, BN turns that into the
    constant β, then ReLU and max-pooling keep it constant.  A constant input adds a constant
    to each pre-BN map of the next conv, which the next BN's mean subtraction removes (and
    a constant feature into W only shifts each class score, foldable into the biases).
    Caveat: at zero-padded borders the next conv sees the constant only partially, so there
    the removal is approximate, not exact; the structural count ignores that border effect.
    """
    thetas = [to_cpu(t) for t in thetas]
    W = to_cpu(W)
    _check_chain([t.shape for t in thetas], W.shape)
    bias_count = int(bias_count)
    channels = [t.shape[0] for t in thetas]
    bn_total = bn_per_layer * sum(channels)
    weights = sum(int(t.size) for t in thetas) + int(W.size)
    nonzero_weights = sum(int(np.count_nonzero(t)) for t in thetas) + int(np.count_nonzero(W))

    alive = alive_channels(thetas, W)
    structural = bias_count + bn_per_layer * sum(int(a.sum()) for a in alive)
    for l, t in enumerate(thetas):
        inputs = alive[l - 1] if l > 0 else slice(None)      # pixels are always alive
        structural += int(np.count_nonzero(t[alive[l]][:, inputs]))
    structural += int(np.count_nonzero(W[:, alive[-1]]))
    return {
        "total": weights + bn_total + bias_count,
        "nonzero": nonzero_weights + bn_total + bias_count,
        "structural": structural,
        "alive_channels": [int(a.sum()) for a in alive],
        "channels": channels,
    }


def sparsity_report(thetas, W, bias_count, threshold=None):
    """Everything secs. 5.2.1-5.2.2 report about one network, JSON-serialisable.

    thetas: L-1 arrays Θ^l (K^l, K^{l-1}, kh, kw). W: (Y, K^{L-1}, R). bias_count: Y.
    threshold: when given, the report is computed on thresholded CPU *copies* (the model's
    arrays are left untouched); when None the arrays are read as they are.
    Returns a dict: overall_sparsity (zero weights / weights over all Θ^l and W), layers
    ({"conv1": layer_metrics, ..., "classifier": layer_metrics}), feature_maps_per_class
    (list of Y ints), effective_parameters (``effective_parameters``'s dict).
    """
    thetas = [to_cpu(t) for t in thetas]
    W = to_cpu(W)
    if threshold is not None:
        thetas = [t.copy() for t in thetas]
        W = W.copy()
        threshold_(thetas + [W], threshold)
    names = [f"conv{l + 1}" for l in range(len(thetas))]
    return layers_report(names, thetas, W, effective_parameters(thetas, W, bias_count))


def layers_report(names, thetas, W, effective):
    """``sparsity_report``'s dict from CPU arrays read as they are: one ``layer_metrics`` row
    per name (``names[l]`` for Θ^l, then "classifier" for W), the overall sparsity, the
    feature maps each class reads, and ``effective`` (an effective-parameter count's dict:
    the chain's, or ``graph_metrics``' for networks with residual streams)."""
    layers = {name: layer_metrics(t, "conv") for name, t in zip(names, thetas)}
    layers["classifier"] = layer_metrics(W, "classifier")
    params = sum(m["params"] for m in layers.values())
    zeros = sum(m["zero_params"] for m in layers.values())
    return {
        "overall_sparsity": zeros / params,
        "layers": layers,
        "feature_maps_per_class": [int(n) for n in feature_maps_per_class(W)],
        "effective_parameters": effective,
    }
