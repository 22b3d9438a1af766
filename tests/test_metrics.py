"""Sparsity metrics (secs. 5.2.1-5.2.2) on weights whose answers are known by construction."""
import json

import numpy as np
import pytest

from minicompact import metrics as M
from minicompact.backend import to_cpu


def test_threshold_(xp):
    a = xp.asarray([1e-6, -9e-6, 1e-5, -2e-5, 0.0, 0.3, -4e-7])
    b = xp.asarray([[1e-7, 1.0], [-1.0, 0.0]])
    assert M.threshold_([a, b]) == 4                 # already-zero entries are not counted
    np.testing.assert_array_equal(to_cpu(a), [0, 0, 1e-5, -2e-5, 0, 0.3, 0])
    np.testing.assert_array_equal(to_cpu(b), [[0, 1], [-1, 0]])
    c = xp.asarray([0.05, 0.2], dtype=xp.float32)
    assert M.threshold_(c, threshold=0.1) == 1       # a single array, another threshold
    np.testing.assert_array_equal(to_cpu(c), np.array([0, 0.2], np.float32))
    assert M.threshold_(c, threshold=0.1) == 0


def conv_weight():
    """Θ (4 filters, 3 channels, 2x2): filter 0 zero; filter 1 drops channels 0 and 2 and has
    one scattered zero; filter 2 dense; filter 3 drops channel 1."""
    t = np.arange(1, 49, dtype=np.float64).reshape(4, 3, 2, 2)
    t[0] = 0
    t[1, 0] = 0
    t[1, 2] = 0
    t[1, 1, 0, 1] = 0
    t[3, 1] = 0
    return t


def test_layer_metrics_conv(xp):
    m = M.layer_metrics(xp.asarray(conv_weight()), "conv")
    assert m["filters"] == 4 and m["channels"] == 3
    assert m["zero_filters"] == 1
    assert m["zero_groups"] == 3 + 2 + 1             # filters 0, 1, 3: three, two, one
    assert m["params"] == 48
    assert m["zero_params"] == 12 + 8 + 1 + 4
    assert m["dictionary_sparsity"] == pytest.approx(1 / 4)
    assert m["average_compactness"] == pytest.approx((0 + 2 / 3 + 0 + 1 / 3) / 4)
    assert m["average_compactness_alive"] == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)
    assert m["layer_sparsity"] == pytest.approx(25 / 48)
    # sec. 5.2.2: dictionary sparsity + average compactness <= layer sparsity
    assert m["dictionary_sparsity"] + m["average_compactness"] <= m["layer_sparsity"]
    json.dumps(m)


def test_layer_metrics_classifier(xp):
    W = np.ones((3, 4, 2))                           # 3 classes, 4 feature maps, R = 2
    W[2] = 0                                         # class 2's classifier is all zero
    W[0, 1] = 0
    W[0, 3] = 0
    W[1, 0, 1] = 0                                   # scattered zero: no group is zero
    m = M.layer_metrics(xp.asarray(W), "classifier")
    assert (m["filters"], m["channels"], m["zero_filters"], m["zero_groups"]) == (3, 4, 1, 6)
    assert m["dictionary_sparsity"] == pytest.approx(1 / 3)
    assert m["average_compactness"] == pytest.approx((2 / 4 + 0 + 0) / 3)
    assert m["layer_sparsity"] == pytest.approx((8 + 4 + 1) / 24)
    np.testing.assert_array_equal(M.feature_maps_per_class(xp.asarray(W)), [2, 4, 0])


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="kind"):
        M.layer_metrics(np.ones((2, 3, 4)), "dense")
    with pytest.raises(ValueError, match=r"\(K, T, kh, kw\).*\(2, 3, 4\)"):
        M.layer_metrics(np.ones((2, 3, 4)), "conv")
    with pytest.raises(ValueError, match=r"\(Y, K, R\).*\(2, 3\)"):
        M.feature_maps_per_class(np.ones((2, 3)))
    with pytest.raises(ValueError, match="conv2"):
        M.effective_parameters([np.ones((4, 3, 2, 2)), np.ones((3, 5, 2, 2))],
                               np.ones((2, 3, 1)), 2)
    with pytest.raises(ValueError, match="classifier"):
        M.effective_parameters([np.ones((4, 3, 2, 2))], np.ones((2, 3, 1)), 2)


def dead_network():
    """Pixels (3) -> conv1 (4) -> conv2 (3) -> conv3 (2) -> classifier (3 classes, R = 2).

    * conv1 filter 1 is all zero: channel 1 is dead (forward);
    * conv2 filter 0 reads only conv1 channel 1, so it is dead too (a dead filter propagates);
    * classifier ignores conv3 channel 1 (W[:, 1] = 0): dead (no one reads it);
    * conv2 channel 2 is read only by conv3 filter 1 (dead): dead, so its filter is useless;
    * conv1 channel 3 is read only by conv2 filter 2 (dead): dead.
    Alive: conv1 {0, 2}, conv2 {1}, conv3 {0}.  Every nonzero group is dense (4 weights),
    except one scattered zero in conv1 filter 0.
    """
    t1 = np.ones((4, 3, 2, 2))
    t1[1] = 0
    t1[0, 0, 0, 0] = 0
    t2 = np.zeros((3, 4, 2, 2))
    t2[0, 1] = 1
    t2[1, [0, 1, 2]] = 1                             # group [1, 1] reads a dead channel
    t2[2, [0, 3]] = 1
    t3 = np.zeros((2, 3, 2, 2))
    t3[0, [0, 1]] = 1                                # group [0, 0] reads a dead channel
    t3[1, [1, 2]] = 1
    W = np.zeros((3, 2, 2))
    W[:, 0] = 1
    return [t1, t2, t3], W


def test_effective_parameters_follow_dead_structure(xp):
    thetas, W = dead_network()
    alive = M.alive_channels(thetas, W)
    assert [list(np.flatnonzero(a)) for a in alive] == [[0, 2], [1], [0]]
    p = M.effective_parameters([xp.asarray(t) for t in thetas], xp.asarray(W), bias_count=3)
    weights = 48 + 48 + 24 + 12
    bn = 2 * (4 + 3 + 2)
    assert p["total"] == weights + bn + 3
    nonzero_weights = (3 * 3 * 4 - 1) + (1 + 3 + 2) * 4 + 4 * 4 + 3 * 2
    assert p["nonzero"] == nonzero_weights + bn + 3
    # alive conv1 filters 0, 2 on all pixels (minus the scattered zero), conv2 filter 1 on
    # conv1 channels 0 and 2, conv3 filter 0 on conv2 channel 1, W[:, 0]; BN of 2 + 1 + 1.
    assert p["structural"] == (2 * 3 * 4 - 1) + 2 * 4 + 4 + 3 * 2 + 2 * (2 + 1 + 1) + 3
    assert p["alive_channels"] == [2, 1, 1] and p["channels"] == [4, 3, 2]
    assert p["structural"] <= p["nonzero"] <= p["total"]
    json.dumps(p)


def test_a_dense_network_is_all_alive_and_a_silent_classifier_kills_everything():
    thetas = [np.ones((4, 3, 3, 3)), np.ones((5, 4, 3, 3))]
    W = np.ones((2, 5, 1))
    p = M.effective_parameters(thetas, W, bias_count=2, bn_per_layer=2)
    assert p["structural"] == p["nonzero"] == p["total"] == 108 + 180 + 10 + 18 + 2
    W[:] = 0
    p = M.effective_parameters(thetas, W, bias_count=2)
    assert p["alive_channels"] == [0, 0]
    assert p["structural"] == 2                      # only the biases remain


def test_sparsity_report(xp):
    thetas, W = dead_network()
    thetas = [xp.asarray(t) for t in thetas]
    thetas[0][0, 1, 0, 0] = 3e-6                     # below the threshold
    W = xp.asarray(W)
    report = M.sparsity_report(thetas, W, bias_count=3, threshold=1e-5)
    assert float(thetas[0][0, 1, 0, 0]) == 3e-6      # the model's arrays are untouched
    json.loads(json.dumps(report))
    assert list(report["layers"]) == ["conv1", "conv2", "conv3", "classifier"]
    zeros = 14 + 24 + 8 + 6
    assert report["overall_sparsity"] == pytest.approx(zeros / 132)
    assert report["layers"]["conv1"]["zero_params"] == 14
    assert report["layers"]["conv1"]["dictionary_sparsity"] == pytest.approx(0.25)
    assert report["layers"]["classifier"]["average_compactness"] == pytest.approx(0.5)
    assert report["feature_maps_per_class"] == [1, 1, 1]
    assert report["effective_parameters"]["alive_channels"] == [2, 1, 1]
    assert report["effective_parameters"]["structural"] == 23 - 1 + 8 + 4 + 6 + 8 + 3
    # without a threshold the small weight counts as nonzero
    unthresholded = M.sparsity_report(thetas, W, bias_count=3)
    assert unthresholded["layers"]["conv1"]["zero_params"] == 13
