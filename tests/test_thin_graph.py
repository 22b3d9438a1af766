"""Thinning a VGG11 or a ResNet18 (minicompact/thin_graph.py): coupled residual channels, free
channels inside a block, folding constants across a residual sum, and the thin network as an
ordinary one of its arch (explicit per-conv widths, save/load, training)."""
import numpy as np
import pytest

from minicompact.architectures import ArchConfig, build_model, load_model
from minicompact.graph_metrics import alive_in_graph, graph_effective_parameters
from minicompact.losses import softmax_cross_entropy
from minicompact.thin import compare_predictions, thin_model
from test_thin import far_from_init

CLASSES = 5


def network(arch="resnet18", seed=1, stem="small"):
    """A float64 net at widths ×1/16 (ResNet18: streams of 4, 8, 16, 32 maps) in evaluation
    mode, with batch-norm statistics far from their init, so that a dead filter's constant
    after batch norm is not zero."""
    m = build_model(ArchConfig(arch=arch, num_classes=CLASSES, width_mult=1 / 16, stem=stem),
                    seed=seed, dtype=np.float64)
    return far_from_init(m, seed)


def conv(m, name):
    """The weights Θ of the conv ``name`` (``conv_plan``'s names), the array itself."""
    return dict(m.named_layers())[name].params["W"]


def centre_only(theta, c):
    """Keep only the centre tap of the groups Θ[:, c]: a constant input map then reaches every
    output pixel the same way, borders included (the centre tap of a 3×3, padding-1 conv,
    stride 1 or 2, is always inside the image), so folding it is exact."""
    keep = theta[:, c, 1, 1].copy()
    theta[:, c] = 0
    theta[:, c, 1, 1] = keep


def images(n=4, size=16, seed=2):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size))


def assert_same_scores(dense, thin, size=16):
    c = compare_predictions(dense, thin, images(size=size))
    assert c["max_abs_score_diff"] < 1e-10 * max(1.0, c["max_abs_score"]) and c["same_prediction"] == 1.0


# Channel 1 of the stream "layer1": the stem writes it, the two blocks of stage 1 add into it
# (their conv2), and it is read by both blocks' conv1, by stage 2's first conv1 and its projection.
WRITERS = ("conv1", "layer1.0.conv2", "layer1.1.conv2")
READERS = ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.shortcut.conv")


def test_a_channel_dead_in_the_block_but_alive_in_the_shortcut_is_kept():
    """layer1.0's conv2 filter 1 is all zero: dead in the block.  Its channel of the stream is
    still written by the stem and carried by the identity shortcut into everything after, so
    thinning keeps it (a zero row whose batch norm adds its constant) and changes nothing."""
    m = network()
    conv(m, "layer1.0.conv2")[1] = 0
    thin, record = thin_model(m)
    assert not record["changed"] and record["widths_after"] == record["widths_before"]
    row = next(r for r in record["layers"] if r["layer"] == "layer1.0.conv2")
    assert row["dead_kept"] == 1 and row["filters_after"] == 4
    assert_same_scores(m, thin)
    # The channel matters: silencing it for every writer changes the scores, so the kept
    # channel is not kept for nothing (a chain's rule would have removed it).
    silenced = network()
    for name in WRITERS:
        conv(silenced, name)[1] = 0
    assert compare_predictions(m, silenced, images())["max_abs_score_diff"] > 1e-3


def test_coupled_removal_across_every_writer_and_reader():
    """Channel 1 of layer1 read by no conv: removed from the stem, from both blocks' conv2
    (their rows) and from the four readers (their columns), at once; the scores are unchanged
    (nothing read it), and a chain's count, which sees no stream, would say otherwise."""
    m = network()
    for name in READERS:
        conv(m, name)[:, 1] = 0
    thin, record = thin_model(m)
    widths = dict(zip([r["layer"] for r in record["layers"]], record["widths_after"]))
    assert all(widths[name] == 3 for name in WRITERS)
    assert record["removed"] == 1 and record["changed"]
    for name in READERS:
        assert conv(thin, name).shape[1] == 3
    assert thin.config.layer_widths[:5] == (3, 4, 3, 4, 3)
    assert_same_scores(m, thin)


# Stage 2's stream "layer2": its first block's projection and conv2 write it (no stem).
WRITERS2 = ("layer2.0.conv2", "layer2.0.shortcut.conv", "layer2.1.conv2")
READERS2 = ("layer2.1.conv1", "layer3.0.conv1", "layer3.0.shortcut.conv")


@pytest.mark.parametrize("writers, readers", [(WRITERS, READERS), (WRITERS2, READERS2)], ids=["layer1", "layer2"])
def test_a_constant_stream_channel_is_folded_across_the_residual_sums(writers, readers):
    """Channel 2 of a stream is constant: every writer's filter 2 is all zero, so the stem
    gives ReLU(bn(0)) (layer1) or the projection bn(0) (layer2), and each block adds its bn2's
    constant before its ReLU.  The readers still read it (centre taps, and the 1×1
    projection), so thinning must fold the constant, carried through every sum, into their
    batch norms: the scores stay the same, and undoing one fold changes them."""
    m = network()
    for name in writers:
        conv(m, name)[2] = 0
    for name in readers:
        if not name.endswith("shortcut.conv"):
            centre_only(conv(m, name), 2)
    thin, record = thin_model(m)
    widths = dict(zip([r["layer"] for r in record["layers"]], record["widths_after"]))
    assert all(widths[name] == conv(m, name).shape[0] - 1 for name in writers)
    folded = {r["layer"]: r["folded_constants"] for r in record["layers"]}
    assert all(folded[name] > 0 for name in readers)
    assert_same_scores(m, thin)
    bn_name = readers[1].replace("conv1", "bn1")
    dict(thin.named_layers())[bn_name].buffers["running_mean"][:] = \
        dict(m.named_layers())[bn_name].buffers["running_mean"]
    assert compare_predictions(m, thin, images())["max_abs_score_diff"] > 1e-3


def test_channels_between_a_blocks_two_convs_are_free():
    """conv1 of layer2.1 loses filter 3 (all zero) and filter 5 (read by no filter of conv2):
    both go alone, nothing else narrows, and the constant of filter 3 is folded into conv2."""
    m = network()
    conv(m, "layer2.1.conv1")[3] = 0
    conv(m, "layer2.1.conv2")[:, 5] = 0
    centre_only(conv(m, "layer2.1.conv2"), 3)
    thin, record = thin_model(m)
    changed = {r["layer"]: (b, a) for r, b, a in zip(record["layers"], record["widths_before"],
                                                      record["widths_after"]) if b != a}
    assert changed == {"layer2.1.conv1": (8, 6)} and record["removed"] == 2
    assert conv(thin, "layer2.1.conv2").shape == (8, 6, 3, 3)
    assert_same_scores(m, thin)


def test_the_imagenet_stem_and_vgg11():
    """The ResNet's stem max-pool keeps a constant; VGG11 is a chain of spaces thinned as a
    CompactNet is (conv3 filter 0 zero, its constant folded into conv4's centre taps)."""
    m = network(stem="imagenet")
    for name in WRITERS:
        conv(m, name)[2] = 0
    for name in READERS[:3]:
        centre_only(conv(m, name), 2)
    thin, record = thin_model(m)
    assert record["removed"] == 1
    assert_same_scores(m, thin, size=64)
    v = network("vgg11")
    conv(v, "conv3")[0] = 0
    centre_only(conv(v, "conv4"), 0)
    v.classifier.params["W"][:, 7] = 0        # conv8's map 7: read by no class
    thin, record = thin_model(v)
    assert record["widths_after"] == [4, 8, 15, 16, 32, 32, 32, 31]
    assert_same_scores(v, thin, size=32)


def test_nonzero_count_is_the_graph_count_plus_the_kept_dead_filters():
    """The thin network's nonzero parameters are what ``graph_metrics`` calls structural,
    plus the batch norm (γ, β) of each dead filter kept in a living residual channel."""
    rng = np.random.default_rng(3)
    m = network()
    for t in m.thetas():
        t[rng.random(t.shape[:2]) < 0.7] = 0
    m.classifier.params["W"][rng.random(m.classifier.params["W"].shape[:2]) < 0.7] = 0
    thin, record = thin_model(m)
    edges, head = m.config.channel_spaces()
    counts = graph_effective_parameters(m.thetas(), edges, m.classifier.params["W"], head, CLASSES)
    nonzero = (sum(int(np.count_nonzero(t)) for t in thin.thetas())
               + int(np.count_nonzero(thin.classifier.params["W"])) + 2 * sum(thin.config.layer_widths) + CLASSES)
    kept_dead = sum(r.get("dead_kept", 0) for r in record["layers"])
    assert record["removed"] > 0 and kept_dead > 0          # both kinds occur in this draw
    assert nonzero == counts["structural"] + 2 * kept_dead
    # a fixed point: thinning again removes nothing, and every space of the thin net is alive
    again, record2 = thin_model(thin)
    assert not record2["changed"] and again.config.layer_widths == thin.config.layer_widths
    _, spaces = alive_in_graph([np.asarray(t) for t in thin.thetas()], edges, thin.classifier.params["W"], head)
    assert all(a.all() for a in spaces.values())
    c = compare_predictions(m, thin, images())   # full 3×3 consumers: borders differ, measured
    assert c["same_prediction"] >= 0.75 and c["max_abs_score_diff"] < 0.5 * c["max_abs_score"]


def test_a_dead_space_is_one_clear_error():
    m = network()
    for name in WRITERS:
        conv(m, name)[:] = 0
    for name in READERS:
        conv(m, name)[:] = 0
    with pytest.raises(ValueError, match="channels of 'layer1' is dead"):
        thin_model(m)


def test_the_thin_network_saves_loads_and_trains(tmp_path):
    m = network()
    conv(m, "layer1.0.conv1")[0] = 0
    for name in READERS:
        conv(m, name)[:, 1] = 0
    thin, _ = thin_model(m)
    path = tmp_path / "thin.npz"
    thin.save(path)
    back = load_model(path, dtype=np.float64)
    assert back.config == thin.config and back.config.layer_widths == thin.config.layer_widths
    assert back.blocks[0].conv1.out_channels == 3 and back.blocks[0].conv2.out_channels == 3
    x = images()
    np.testing.assert_array_equal(back.eval().predict(x), thin.predict(x))
    back.train()
    loss, d = softmax_cross_entropy(back.forward(x), np.arange(4) % CLASSES)
    back.backward(d)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for layer in back.param_layers
                                     for g in layer.grads.values())
    assert "layer_widths" not in ArchConfig().to_json()             # an unthinned file reads as before


def test_layer_widths_are_validated():
    with pytest.raises(ValueError, match="layer_widths must be 20 integers >= 1"):
        ArchConfig(arch="resnet18", layer_widths=(4,) * 19).validate()
    bad = list(ArchConfig(arch="resnet18", width_mult=1 / 16).rule_plan())
    widths = [s.out_channels for s in bad]
    widths[2] = 3                  # layer1.0.conv2 writes layer1, which the stem gives 4
    with pytest.raises(ValueError, match="layer1.0.conv2 3 filters, but it adds into 'layer1'"):
        ArchConfig(arch="resnet18", width_mult=1 / 16, layer_widths=tuple(widths)).validate()
    text = ArchConfig(arch="vgg11", layer_widths=(1,) * 8).to_json().replace("[1, 1", "[0, 1")
    with pytest.raises(ValueError, match="layer_widths must be null or a list of integers >= 1"):
        ArchConfig.from_json(text)
