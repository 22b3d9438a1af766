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

Folding the constants (``folding.py``, as along a chain).  A removed channel that an alive
filter reads is constant (``graph_metrics``: it is alive otherwise), and its value follows the
data path: after conv1 of a block c = max(0, bn(u)); at a block's output the sum of the two
branches' constants, then the ReLU; after the stem the ReLU (and its max-pool, which keeps a
constant).  Exact except within kh//2 pixels of a zero-padded border (``thin.py``'s module
docstring); 1×1 projections and the classifier fold exactly.
"""
from dataclasses import replace

import numpy as np

from .architectures import bn_name, build_model
from .backend import device_of
from .folding import BN_ARRAYS, conv_record, fold_classifier, fold_conv
from .graph_metrics import alive_in_graph
from .metrics import threshold_


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
        layers.append(conv_record(spec.name, T, spaces[reads], spaces[writes], alive, out[f"{spec.name}.W"], count))
        # What the removed channels of the written space hold (module docstring).
        if spec.name.endswith(".conv2"):                  # a block's main branch, before its sum
            main = bn_const
            if spec.name[:-len("conv2")] + "shortcut.conv" not in names:
                const[writes] = np.maximum(0.0, main + const[writes])      # + the identity's input
        elif spec.name.endswith(".shortcut.conv"):
            const[writes] = np.maximum(0.0, main + bn_const)
        else:                                             # ReLU (then a max-pool) of a constant
            const[writes] = np.maximum(0.0, bn_const)

    classifier, row = fold_classifier(W, b, spaces[head], const[head])
    out.update({f"classifier.{k}": v for k, v in classifier.items()})
    layers.append(row)

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
