"""Thinning (minicompact/thin.py): the fixed point, folding dead filters, idempotence, refusals,
and the thin network as an ordinary CompactNet (explicit widths, save/load, training)."""
import numpy as np
import pytest

from minicompact.metrics import alive_channels, effective_parameters
from minicompact.model import CompactNet, ModelConfig
from minicompact.objective import Penalty, train_step
from minicompact.optim import SGD
from minicompact.regularizers import variant
from minicompact.thin import compare_predictions, thin_model

CLASSES = 5


def random_model(seed=1, dtype=np.float64, depth=4):
    """A depth-4 net (8, 16, 32 filters) with batch-norm statistics far from their init, so
    that a dead filter's constant c = ReLU(β - μ·γ/σ) is not zero."""
    m = CompactNet(ModelConfig(depth=depth, num_classes=CLASSES, width_mult=1 / 16, stem="small"),
                   seed=seed, dtype=dtype)
    return far_from_init(m, seed)


def far_from_init(m, seed):
    """``m``'s batch norms given γ, β and running statistics far from their init (β > 0), in
    evaluation mode: a dead filter's constant after batch norm is then not zero."""
    rng = np.random.default_rng(seed)
    for bn in m.bns:
        k = bn.channels
        bn.params["gamma"][:] = rng.uniform(0.5, 1.5, k)
        bn.params["beta"][:] = rng.uniform(0.1, 1.0, k)
        bn.buffers["running_mean"][:] = rng.normal(0, 0.3, k)
        bn.buffers["running_var"][:] = rng.uniform(0.5, 2.0, k)
    return m.eval()


def centre_only(theta, k):
    """Keep only the centre tap of every group Θ[:, k]: a consumer that sees a constant input
    the same way at the borders (the centre tap of a 3×3, padding-1 conv is always inside)."""
    c = theta[:, k, 1, 1].copy()
    theta[:, k] = 0
    theta[:, k, 1, 1] = c


def dead_model(exact=True):
    """Dead structure of every kind, each with a known reason:

    conv1 filters 1 and 4 all zero (constant maps); conv2 filter 3 all zero; conv2 filter 5
    reads only conv1's dead 1 and 4 (a constant map, not zero); conv2 map 2 read by no conv3
    filter; conv3 map 7 read by no class.  exact: every group that reads a constant map is
    centre-only, so folding is exact at the borders too.
    """
    m = random_model()
    T = m.thetas()
    T[0][[1, 4]] = 0
    T[1][3] = 0
    T[1][5] = 0
    T[1][5, [1, 4], 1, 1] = 0.7
    T[2][:, 2] = 0
    m.classifier.params["W"][:, 7] = 0
    if exact:
        for k in (1, 4):
            centre_only(T[1], k)
        for k in (3, 5):
            centre_only(T[2], k)
    return m


def images(n=6, size=16, seed=2):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size))


def test_removes_dead_structure_of_every_kind_and_agrees_with_the_structural_count():
    m = dead_model()
    thin, record = thin_model(m)
    assert record["widths_before"] == [8, 16, 32]
    assert record["widths_after"] == [6, 13, 31]      # conv1: 1, 4; conv2: 2, 3, 5; conv3: 7
    assert thin.config.layer_widths == (6, 13, 31)
    conv1, conv2, conv3, cls = record["layers"]
    assert (conv1["zero_filters"], conv2["zero_filters"], conv2["constant_filters"],
            conv2["unread_filters"], conv3["unread_filters"]) == (2, 1, 1, 1, 1)
    assert conv2["inputs_after"] == 6 and conv3["inputs_after"] == 13 and cls["inputs_after"] == 31
    # Its nonzero parameters are exactly what metrics.effective_parameters calls structural.
    counts = effective_parameters(m.thetas(), m.classifier.params["W"], CLASSES)
    nonzero = (sum(int(np.count_nonzero(t)) for t in thin.thetas())
               + int(np.count_nonzero(thin.classifier.params["W"])) + 2 * sum(thin.config.layer_widths)
               + CLASSES)
    assert nonzero == counts["structural"]
    assert record["params_after"] == thin.parameter_count() < record["params_before"]


def test_fixed_point_a_chain_of_removals():
    """Removing conv3 map 0 (no class reads it) leaves conv2 map 0 unread (only conv3 filter 0
    read it), which leaves conv1 map 0 unread: one removal at the top walks down the chain."""
    m = random_model()
    T = m.thetas()
    T[1][:, 0] = 0
    T[1][0, 0] = 0.5                  # conv1 map 0 is read only by conv2 filter 0
    T[2][:, 0] = 0
    T[2][0, 0] = 0.5                  # conv2 map 0 is read only by conv3 filter 0
    m.classifier.params["W"][:, 0] = 0  # conv3 map 0 is read by no class
    thin, record = thin_model(m)
    assert record["widths_after"] == [7, 15, 31]
    assert [r["unread_filters"] for r in record["layers"][:3]] == [1, 1, 1]
    np.testing.assert_allclose(compare_predictions(m, thin, images())["thin"],
                               m.predict(images()), rtol=1e-12, atol=1e-12)
    # A fixed point: nothing is left to remove.
    assert all(a.all() for a in alive_channels(thin.thetas(), thin.classifier.params["W"]))


def test_folding_dead_filters_is_exact_without_border_effects():
    m = dead_model(exact=True)
    thin, record = thin_model(m)
    assert record["layers"][1]["folded_constants"] > 0 and record["layers"][2]["folded_constants"] > 0
    x = images()
    c = compare_predictions(m, thin, x)
    assert c["max_abs_score_diff"] < 1e-12 * max(1.0, c["max_abs_score"])
    assert c["same_prediction"] == 1.0


def test_folding_without_it_would_be_wrong():
    """Thinning the same way but dropping the folded constants changes the scores: the
    test above can fail."""
    m = dead_model(exact=True)
    thin, _ = thin_model(m)
    alive = alive_channels(m.thetas(), m.classifier.params["W"])
    for bn, bn_thin, a in zip(m.bns, thin.bns, alive):    # undo the folding
        bn_thin.buffers["running_mean"][:] = bn.buffers["running_mean"][a]
    c = compare_predictions(m, thin, images())
    assert c["max_abs_score_diff"] > 1e-3


def test_folding_is_exact_away_from_the_borders():
    """With full 3×3 consumers of constant maps, conv2's batch-norm output of the thin model
    equals the dense one exactly on interior pixels and differs only within one pixel of an
    edge (the zero padding sees the constant through fewer taps)."""
    m = dead_model(exact=False)
    thin, _ = thin_model(m)
    alive = alive_channels(m.thetas(), m.classifier.params["W"])
    x = images()
    dense_out, thin_out = x, x
    for layers, layers_t in ((m.layers[:4], thin.layers[:4]), (m.layers[4:6], thin.layers[4:6])):
        for a, b in zip(layers, layers_t):
            dense_out, thin_out = a.forward(dense_out), b.forward(thin_out)
    d = dense_out[:, alive[1]]          # after conv2 and bn2, alive channels only
    assert np.abs(d[:, :, 1:-1, 1:-1] - thin_out[:, :, 1:-1, 1:-1]).max() < 1e-12
    assert np.abs(d - thin_out).max() > 1e-3
    c = compare_predictions(m, thin, x)  # end to end: measured, small, not zero
    assert 0 < c["max_abs_score_diff"] < 0.2 * c["max_abs_score"]


def test_idempotent_and_nothing_to_remove():
    thin, record = thin_model(dead_model())
    again, record2 = thin_model(thin)
    assert record["changed"] and not record2["changed"] and record2["removed"] == 0
    assert again.config.layer_widths == thin.config.layer_widths
    x = images()
    np.testing.assert_array_equal(again.predict(x), thin.predict(x))
    plain, rec = thin_model(random_model())          # a dense net: nothing to remove
    assert not rec["changed"] and plain.config.layer_widths is None


def test_every_filter_dead_is_one_clear_error():
    m = random_model()
    m.thetas()[2][:] = 0
    with pytest.raises(ValueError, match="every one of the 32 filters of conv3 is dead"):
        thin_model(m)
    m = random_model()
    m.classifier.params["W"][:] = 0              # no class reads anything: conv3 unread
    with pytest.raises(ValueError, match="conv3 is dead"):
        thin_model(m)


def test_threshold_counts_small_weights_as_zero_without_touching_the_model():
    m = random_model()
    T = m.thetas()
    T[0][2] = 1e-7
    _, record = thin_model(m)
    assert not record["changed"]
    thin, record = thin_model(m, threshold=1e-5)
    assert record["widths_after"][0] == 7 and T[0][2].max() == 1e-7


def test_thin_npz_loads_as_an_ordinary_network(tmp_path):
    thin, _ = thin_model(dead_model())
    path = tmp_path / "thin.npz"
    thin.save(path)
    back = CompactNet.load(path, dtype=np.float64)
    assert back.config == thin.config and back.config.layer_widths == (6, 13, 31)
    x = images()
    np.testing.assert_array_equal(back.predict(x), thin.predict(x))
    assert "layer_widths" not in ModelConfig(depth=4).to_json()       # old files read as before
    assert ModelConfig.from_json(ModelConfig(depth=4).to_json()) == ModelConfig(depth=4)


def test_layer_widths_are_validated():
    with pytest.raises(ValueError, match="layer_widths must be 3 integers >= 1"):
        ModelConfig(depth=4, layer_widths=(3, 0, 2)).validate()
    with pytest.raises(ValueError, match="layer_widths must be 3 integers"):
        ModelConfig(depth=4, layer_widths=(3, 2)).validate()


def test_a_thin_network_trains():
    thin, _ = thin_model(dead_model())
    thin.astype(np.float32).train()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, CLASSES, 8)
    reg = Penalty(thin, variant("compact", 4, rho=0.5), cw=1e-3, ctheta=1e-3, update="proximal")
    opt = SGD(thin.param_layers, lr=0.01, momentum=0.9)
    losses = [float(train_step(thin, opt, x, y, reg)[1]) for _ in range(10)]
    assert losses[-1] < losses[0]
