"""Thinning a VGG11 or a ResNet18: removing dead channels across residual connections.

``thin.thin_model`` removes a CompactNet's dead structure along its chain of convs.  Here the
convs form a graph (``ArchConfig.channel_spaces``): each reads one *space* of feature maps and
writes one, and a ResNet's residual stream "layer<s>" is one space that the stem or the
stage's projection and every block's conv2 add into, and that every block, the next stage
and (last) the classifier read.  ``graph_metrics.alive_in_graph`` says which channels of
each space are alive.  A channel of a stream is one map for all of them (*coupled*): it dies
only as a whole, when no writer moves it (every writer's filter is dead: the sum is a
constant) or no reader reads it, and it then leaves every writer's filters and every reader's
inputs at once; one writer's dead filter alone removes nothing.  The channels between a
block's two convs are free, as in a chain.  VGG11 is a chain of spaces, thinned exactly as a
CompactNet is.

What the thin network holds, per conv: the rows of the channels its space keeps and the
columns of the channels the space it reads keeps.  A conv that writes into a stream keeps a
row for every alive channel of the stream, also where its own filter is dead (all zero, or
reading only dead channels): the other writers keep the channel alive, and the dead filter
still adds its constant there (after batch norm, before the block's ReLU), so it stays as a
zero row whose batch norm makes that constant.

Folding the constants, as ``thin.py`` does along a chain.  A removed channel that an alive
filter reads is constant (``graph_metrics``: it is alive otherwise), and its value follows the
data path: after conv1 of a block c = max(0, bn(u)); at a block's output the sum of the two
branches' constants, then the ReLU; after the stem the ReLU (and its max-pool, which keeps
a constant).  A reader's pre-BN map then receives δ_j = Σ_{k removed} c_k Σ_taps Θ[j, k], which
its batch norm absorbs as μ_j ← μ_j − δ_j; the classifier's biases absorb
Σ_k c_k Σ_r W[y, k, r] (the pyramid or the global average of a constant map is that constant).
Exact except within kh//2 pixels of a zero-padded border (``thin.py``'s module docstring);
1×1 projections and the classifier fold exactly.
"""
from dataclasses import replace

import numpy as np

from .architectures import bn_name, build_model
from .backend import device_of
from .graph_metrics import alive_in_graph
from .metrics import threshold_

BN_ARRAYS = ("gamma", "beta", "running_mean", "running_var")


def fold_conv(T, bn, keep_in, const_in, keep_out, eps):
    """One conv and its batch norm without their removed channels, and the constant each
    filter outputs when it reads only removed (constant) channels (module docstring).

    T: Θ (K, C, kh, kw); bn: dict of the batch norm's arrays ("gamma", "beta",
    "running_mean", "running_var"), each (K,); keep_in: bool (C,), the input channels kept;
    const_in: float64 (C,), the value of each removed input channel (read where ~keep_in);
    keep_out: bool (K,), the filters kept; eps: the batch norm's ε.
    Returns (arrays, bn_const, folded): arrays, the conv's "W" (K', C', kh, kw) and its batch
    norm's four (K',) arrays, in their own dtypes; bn_const, float64 (K,): the batch norm's
    output (γ (δ − μ)/√(σ² + ε) + β) of a filter whose kept inputs are all zero;
    folded: how many (kept filter, removed input) pairs added a nonzero constant.
    """
    tap_sums = T[:, ~keep_in].astype(np.float64).sum(axis=(2, 3))          # (K, removed)
    delta = tap_sums @ const_in[~keep_in]
    mean = bn["running_mean"].astype(np.float64)
    scale = bn["gamma"].astype(np.float64) / np.sqrt(bn["running_var"].astype(np.float64) + eps)
    bn_const = (delta - mean) * scale + bn["beta"].astype(np.float64)
    arrays = {"W": T[keep_out][:, keep_in],
              "gamma": bn["gamma"][keep_out], "beta": bn["beta"][keep_out],
              "running_mean": (mean - delta)[keep_out].astype(bn["running_mean"].dtype),
              "running_var": bn["running_var"][keep_out]}
    folded = int(np.count_nonzero((tap_sums[keep_out] != 0) & (const_in[~keep_in] != 0)[None, :]))
    return arrays, bn_const, folded


def _filter_record(spec, T, keep_in, keep_out, alive, thin_W, folded):
    """One row of the record ``thin_network`` returns (``thin.thin_model``'s keys, plus
    "dead_kept": dead filters kept because their residual channel lives)."""
    groups = T.reshape(T.shape[0], T.shape[1], -1).any(axis=2)
    all_zero = ~groups.any(axis=1)
    reads_kept = groups[:, keep_in].any(axis=1)
    removed = ~keep_out
    return {"layer": spec.name, "filters_before": int(T.shape[0]), "filters_after": int(keep_out.sum()),
            "inputs_before": int(T.shape[1]), "inputs_after": int(keep_in.sum()),
            "params_before": int(T.size + 2 * T.shape[0]),
            "params_after": int(thin_W.size + 2 * keep_out.sum()),
            "zero_filters": int((removed & all_zero).sum()),
            "constant_filters": int((removed & ~all_zero & ~reads_kept).sum()),
            "unread_filters": int((removed & ~all_zero & reads_kept).sum()),
            "dead_kept": int((keep_out & ~alive).sum()),
            "folded_constants": folded}


def thin_network(model, threshold=None):
    """``thin.thin_model`` for a VGG11 or ResNet18 (``architectures``): (thin, record).

    model: the network (any mode and device, float32 or float64; not modified); threshold:
    zero |w| < threshold in copies of every Θ and W first (None: exact zeros only).
    thin: a network of the same arch on model's device and dtype, in evaluation mode, whose
    ``config.layer_widths`` are the kept widths (None where they are the rule's); record: a
    dict of Python values: "layers" (one dict per conv, then the classifier), "widths_before"
    and "widths_after" (filters per conv, ``conv_plan`` order), "removed" (channels removed,
    each channel of a space counted once), "changed", "params_before", "params_after".
    Raises ``ValueError`` (one line) when every channel of a space is dead.
    """
    config = model.config
    arrays = {k: np.array(v, copy=True) for k, v in model.state_arrays().items()}
    plan = config.conv_plan()
    edges, head = config.channel_spaces()
    thetas = [arrays[f"{spec.name}.W"] for spec in plan]
    W, b = arrays["classifier.W"], arrays["classifier.b"]
    if threshold is not None:
        threshold_(thetas + [W], threshold)
    filters, spaces = alive_in_graph(thetas, edges, W, head)
    for space, keep in spaces.items():
        if not keep.any():
            raise ValueError(f"every one of the {keep.size} channels of {space!r} is dead (all zero, or "
                             "read by no class): the network's output does not depend on its input; "
                             "nothing to thin")

    eps = {spec.name: bn.eps for spec, bn in zip(plan, model.bns)}
    names = {spec.name for spec in plan}
    const = {"image": np.zeros(config.in_channels)}     # the value of each space's removed channels
    out, layers, main = {}, [], None
    for spec, T, alive, (reads, writes) in zip(plan, thetas, filters, edges):
        bn = bn_name(spec.name)
        folded, bn_const, count = fold_conv(T, {k: arrays[f"{bn}.{k}"] for k in BN_ARRAYS}, spaces[reads],
                                            const[reads], spaces[writes], eps[spec.name])
        out[f"{spec.name}.W"] = folded.pop("W")
        out.update({f"{bn}.{k}": v for k, v in folded.items()})
        layers.append(_filter_record(spec, T, spaces[reads], spaces[writes], alive, out[f"{spec.name}.W"], count))
        # What the removed channels of the written space hold (module docstring).
        if spec.name.endswith(".conv2"):                  # a block's main branch, before its sum
            main = bn_const
            if spec.name[:-len("conv2")] + "shortcut.conv" not in names:
                const[writes] = np.maximum(0.0, main + const[writes])      # + the identity's input
        elif spec.name.endswith(".shortcut.conv"):
            const[writes] = np.maximum(0.0, main + bn_const)
        else:                                             # ReLU (then a max-pool) of a constant
            const[writes] = np.maximum(0.0, bn_const)

    shift = W[:, ~spaces[head], :].astype(np.float64).sum(axis=2) @ const[head][~spaces[head]]     # (Y,)
    out["classifier.W"] = W[:, spaces[head], :]
    out["classifier.b"] = (b.astype(np.float64) + shift).astype(b.dtype)
    layers.append({
        "layer": "classifier", "filters_before": int(W.shape[0]), "filters_after": int(W.shape[0]),
        "inputs_before": int(W.shape[1]), "inputs_after": int(spaces[head].sum()),
        "params_before": int(W.size + b.size), "params_after": int(out["classifier.W"].size + b.size),
        "folded_constants": int(np.count_nonzero((const[head][~spaces[head]] != 0)
                                                 & W[:, ~spaces[head], :].any(axis=(0, 2))))})

    widths = tuple(int(spaces[writes].sum()) for _, writes in edges)
    rule = tuple(spec.out_channels for spec in config.rule_plan())
    thin_config = replace(config, layer_widths=None if widths == rule else widths).validate()
    dtype = model.classifier.params["W"].dtype
    thin = build_model(thin_config, dtype=dtype, input_grad=model.convs[0].need_input_grad)
    thin.load_state_arrays(out)
    thin.to(device_of(model.classifier.params["W"])).eval()
    removed = sum(int((~keep).sum()) for space, keep in spaces.items() if space != "image")
    return thin, {"layers": layers, "widths_before": [spec.out_channels for spec in plan],
                  "widths_after": list(widths), "removed": removed, "changed": removed > 0,
                  "params_before": model.parameter_count(), "params_after": thin.parameter_count()}
