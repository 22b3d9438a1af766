"""ReLU: gradient check away from the kink, dtype, dout untouched, input errors."""
import numpy as np
import pytest

from minicompact.backend import to_cpu
from minicompact.gradcheck import GradientCheckError, check_layer
from minicompact.layers.activations import ReLU


def away_from_zero(shape, seed=0, gap=0.1):
    """Random values with |x| >= gap, half of them negative (no kink within ±h)."""
    rng = np.random.default_rng(seed)
    signs = rng.permutation(np.resize([-1.0, 1.0], int(np.prod(shape)))).reshape(shape)
    return rng.uniform(gap, 2.0, shape) * signs


def test_gradcheck(xp, device):
    x = xp.asarray(away_from_zero((2, 3, 4, 5)))
    check_layer(ReLU(), x)


def test_forward_values_and_dtype(xp, device):
    x = away_from_zero((3, 4), seed=1).astype(np.float32)
    relu = ReLU()
    out = relu.forward(xp.asarray(x))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(to_cpu(out), np.maximum(x, 0))
    dout = xp.asarray(np.full(x.shape, 3.0, np.float32))
    dx = relu.backward(dout)
    assert dx.dtype == np.float32
    np.testing.assert_array_equal(to_cpu(dx), np.where(x > 0, 3.0, 0.0))
    np.testing.assert_array_equal(to_cpu(dout), 3.0)  # dout untouched


class _LeakyByMistake(ReLU):
    def backward(self, dout):
        return dout.copy()


def test_gradcheck_catches_wrong_backward(xp, device):
    with pytest.raises(GradientCheckError):
        check_layer(_LeakyByMistake(), xp.asarray(away_from_zero((2, 3))))


def test_bad_input():
    with pytest.raises(ValueError, match="floating"):
        ReLU().forward(np.zeros((2, 3), np.int32))
    relu = ReLU()
    relu.forward(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        relu.backward(np.zeros((3, 2)))
