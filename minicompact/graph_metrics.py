"""Dead structure in a network whose convolutions form a graph: ResNet18's residual streams.

``metrics.alive_channels`` follows dead channels along one chain of convs, where each conv
reads the one before it.  A ResNet breaks the chain twice: a block's projection reads the
block's input beside its first conv, and every block *adds* its conv2's maps to the maps it
read.  Here a network is a list of convs that each read one *space* of feature maps and write
one (``ArchConfig.channel_spaces``): "image", a conv's own output inside a block or a chain, or
a residual stream "layer<s>", whose channel c is one map that the stem (or the stage's
projection), and every block's conv2 of the stage, add to, and that every block of the stage,
the next stage's first block and (for the last stage) the classifier read.

A channel c of a space is alive when both hold:

* forward: some conv writing the space has an alive filter c (one that reads an alive input
  channel through a nonzero group; the image's channels are always alive).  A stream channel
  that every writer leaves constant is constant all along the stage;
* backward: some alive filter of a conv reading the space has a nonzero group on c, or, for
  the classifier's space, some class has a nonzero W[y, c, :].

and a filter k of a conv is alive when it reads an alive input (forward) and channel k of the
space it writes is alive.  So inside a block channels die as in a chain (conv1's maps have one
reader, conv2), and a stream's channel dies only when no block and no class reads it, or no
writer moves it.  Each round only removes, so repeating both sweeps ends at a fixed point; on
a chain of convs (a CompactNet, VGG11) it is ``metrics.alive_channels`` exactly (tested).

Counted as in ``metrics.effective_parameters`` ("structural"): the nonzero weights of alive
filters on alive input channels, the batch-norm γ and β of alive filters, the classifier's
nonzero weights on alive maps, and its biases.  One difference from a chain: a dead filter
that writes into a stream whose channel stays alive adds its batch norm's constant β' to the
sum, before the block's ReLU.  A chain folds such constants into the next batch norm for
free; a thinned ResNet would keep each as one bias of the addition.  The count leaves those
biases out, as it leaves out every folded constant (and the zero-padded borders, where folding
is approximate: ``metrics.effective_parameters``).
"""
import numpy as np

from .backend import to_cpu
from .metrics import layers_report


def used_groups(weight):
    """Boolean (filters, channels): True where the group weight[f, c, ...] has a nonzero weight.

    weight: Θ (K, T, kh, kw) or W (Y, K, R), on the CPU."""
    return weight.reshape(weight.shape[0], weight.shape[1], -1).any(axis=2)


def space_sizes(thetas, edges):
    """{space: channels} from the convs' shapes; ``ValueError`` naming the first conv whose
    input or output does not fit what another conv says of its space."""
    sizes = {}
    for i, (t, (reads, writes)) in enumerate(zip(thetas, edges)):
        for space, n, side in ((reads, t.shape[1], "reads"), (writes, t.shape[0], "writes")):
            if sizes.setdefault(space, n) != n:
                raise ValueError(f"conv {i} {side} {n} channels of {space!r}, which has {sizes[space]}")
    return sizes


def alive_in_graph(thetas, edges, W, head):
    """Follow dead structure through a graph of convs to a fixed point (module docstring).

    thetas: one Θ (K, T, kh, kw) per conv; edges: one (reads, writes) pair of space names per
    conv ("image" is the input); W: (Y, K, R), the classifier, reading the space ``head``.
    Returns (filters, spaces): a boolean (K,) per conv, True for an alive filter, and
    {space: boolean (channels,)}, True for an alive channel ("image" all True).
    """
    sizes = space_sizes(thetas, edges)
    if W.shape[1] != sizes.get(head):
        raise ValueError(f"the classifier reads {W.shape[1]} maps of {head!r}, which has {sizes.get(head)}")
    used = [used_groups(t) for t in thetas]
    read_by_classes = used_groups(W).any(axis=0)
    filters = [u.any(axis=1) for u in used]                   # start: nonzero filters
    spaces = {s: np.ones(n, dtype=bool) for s, n in sizes.items()}
    changed = True
    while changed:
        before = [f.copy() for f in filters] + [a.copy() for a in spaces.values()]
        for i, (reads, _) in enumerate(edges):                # forward: reads an alive input?
            filters[i] &= used[i][:, spaces[reads]].any(axis=1)
        for s in spaces:
            if s == "image":
                continue
            written = np.zeros_like(spaces[s])
            read = read_by_classes.copy() if s == head else np.zeros_like(spaces[s])
            for i, (reads, writes) in enumerate(edges):
                if writes == s:
                    written |= filters[i]
                if reads == s:                                 # backward: read by an alive filter?
                    read |= used[i][filters[i]].any(axis=0)
            spaces[s] &= written & read
        for i, (_, writes) in enumerate(edges):
            filters[i] &= spaces[writes]
        after = [f.copy() for f in filters] + [a.copy() for a in spaces.values()]
        changed = any((a != b).any() for a, b in zip(after, before))
    return filters, spaces


def graph_effective_parameters(thetas, edges, W, head, bias_count, bn_per_layer=2):
    """``metrics.effective_parameters`` for a graph of convs: a dict of Python ints.

    thetas, edges, W, head: as ``alive_in_graph``; bias_count: the classifier's biases (Y);
    bn_per_layer: batch-norm parameters per conv output channel (γ and β).  total, nonzero,
    structural, alive_channels and channels (per conv: alive and all filters) mean what they
    mean there; structural counts what the module docstring says.
    """
    thetas = [to_cpu(t) for t in thetas]
    W = to_cpu(W)
    filters, spaces = alive_in_graph(thetas, edges, W, head)
    bn_total = bn_per_layer * sum(t.shape[0] for t in thetas)
    structural = int(bias_count) + bn_per_layer * sum(int(f.sum()) for f in filters)
    for t, f, (reads, _) in zip(thetas, filters, edges):
        structural += int(np.count_nonzero(t[f][:, spaces[reads]]))
    structural += int(np.count_nonzero(W[:, spaces[head]]))
    return {
        "total": sum(int(t.size) for t in thetas) + int(W.size) + bn_total + int(bias_count),
        "nonzero": sum(int(np.count_nonzero(t)) for t in thetas) + int(np.count_nonzero(W)) + bn_total
                   + int(bias_count),
        "structural": structural,
        "alive_channels": [int(f.sum()) for f in filters],
        "channels": [int(t.shape[0]) for t in thetas],
    }


def graph_sparsity_report(names, thetas, edges, W, head, bias_count):
    """``metrics.sparsity_report`` for a graph of convs, JSON-serialisable, with the same keys.

    names: one name per conv (the rows of "layers", as ``named_layers`` names them); thetas,
    edges, W, head, bias_count: as ``graph_effective_parameters``.  Arrays are read as they
    are (threshold them first: ``metrics.threshold_``).
    """
    thetas = [to_cpu(t) for t in thetas]
    W = to_cpu(W)
    return layers_report(names, thetas, W, graph_effective_parameters(thetas, edges, W, head, bias_count))


def network_sparsity(model):
    """``graph_sparsity_report`` of a VGG11 or ResNet18 (``architectures``): its convs named
    and connected by its configuration (``conv_plan``, ``channel_spaces``)."""
    edges, head = model.config.channel_spaces()
    names = [spec.name for spec in model.config.conv_plan()]
    classifier = model.classifier.params
    return graph_sparsity_report(names, model.thetas(), edges, classifier["W"], head, classifier["b"].size)
