"""SoftmaxClassifier: gradient checks of W, b and the input, a direct evaluation of the
scores of sec. 3.2, initialisation, dtype and shape errors."""
import numpy as np
import pytest

from minicompact.backend import to_cpu
from minicompact.gradcheck import GradientCheckError, check_layer
from minicompact.layers.classifier import SoftmaxClassifier


def make(device, K=3, R=5, Y=4, dtype=np.float64, seed=0):
    clf = SoftmaxClassifier(K, R, Y, dtype=dtype, rng=np.random.default_rng(seed))
    clf.params["b"] = np.random.default_rng(seed + 1).standard_normal(Y).astype(dtype)
    return clf.to(device)


def test_gradcheck(xp, device):
    clf = make(device)
    f = xp.asarray(np.random.default_rng(2).standard_normal((2, 3, 5)))
    errors = check_layer(clf, f)
    assert set(errors) == {"x", "W", "b"}


def test_scores_match_the_paper_sum(xp, device):
    clf = make(device, K=2, R=3, Y=5)
    f = np.random.default_rng(3).standard_normal((4, 2, 3))
    W, b = to_cpu(clf.params["W"]), to_cpu(clf.params["b"])
    expect = np.einsum("ykr,nkr->ny", W, f) + b
    np.testing.assert_allclose(to_cpu(clf.forward(xp.asarray(f))), expect, rtol=1e-12, atol=1e-12)


class _TransposedRegions(SoftmaxClassifier):
    """A wrong backward: dW computed with the (K, R) axes of f swapped."""

    def backward(self, dscores):
        df = super().backward(dscores)
        f = self.cache
        g = dscores.T @ f.transpose(0, 2, 1).reshape(f.shape[0], -1)
        self.grads["W"] = g.reshape(self.params["W"].shape)
        return df


def test_gradcheck_catches_transposed_index(xp, device):
    clf = _TransposedRegions(3, 3, 2, dtype=np.float64, rng=np.random.default_rng(0)).to(device)
    with pytest.raises(GradientCheckError, match="W"):
        check_layer(clf, xp.asarray(np.random.default_rng(1).standard_normal((2, 3, 3))))


def test_init_and_float32(xp, device):
    K, R, Y = 64, 21, 10
    clf = SoftmaxClassifier(K, R, Y, rng=np.random.default_rng(0)).to(device)
    W = to_cpu(clf.params["W"])
    assert W.shape == (Y, K, R) and W.dtype == np.float32
    assert abs(W.std() / np.sqrt(2 / (R * K)) - 1) < 0.05  # He: N(0, 2/(R·K)), sec. 5.1
    assert not to_cpu(clf.params["b"]).any()
    f = xp.asarray(np.random.default_rng(1).standard_normal((3, K, R)).astype(np.float32))
    scores = clf.forward(f)
    assert scores.shape == (3, Y) and scores.dtype == np.float32
    df = clf.backward(xp.ones((3, Y), dtype=np.float32))
    assert df.shape == (3, K, R) and df.dtype == np.float32
    assert clf.grads["W"].dtype == np.float32 and clf.grads["b"].dtype == np.float32


def test_bad_inputs():
    clf = SoftmaxClassifier(3, 5, 4)
    with pytest.raises(ValueError, match=r"\(2, 3, 6\)"):
        clf.forward(np.zeros((2, 3, 6), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 4, 5\)"):
        clf.forward(np.zeros((2, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 15\)"):
        clf.forward(np.zeros((2, 15), np.float32))
    with pytest.raises(ValueError, match="float64"):
        clf.forward(np.zeros((2, 3, 5), np.float64))
    clf.forward(np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        clf.backward(np.zeros((2, 3), np.float32))
