"""GlobalAvgPool, ResNet's head: the mean of each map, its gradient, a wrong backward caught."""
import numpy as np
import pytest

from minicompact.backend import to_cpu
from minicompact.gradcheck import GradientCheckError, check_layer
from minicompact.layers.classifier import SoftmaxClassifier
from minicompact.layers.global_pool import GlobalAvgPool, global_avg_pool_backward, global_avg_pool_forward


def test_forward_is_the_mean_of_each_map_written_as_loops(xp):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    out = to_cpu(GlobalAvgPool().forward(xp.asarray(x)))
    assert out.shape == (2, 3, 1)
    for n in range(2):
        for k in range(3):
            assert out[n, k, 0] == pytest.approx(sum(x[n, k, i, j] for i in range(4) for j in range(5)) / 20)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 1, 1), (3, 1, 7, 2)])
def test_gradients(shape, xp):
    x = np.random.default_rng(1).standard_normal(shape)
    check_layer(GlobalAvgPool(), xp.asarray(x), tol=1e-8)


class _ForgetsTheMean(GlobalAvgPool):
    """A backward that spreads the whole gradient to every pixel (no 1/(H·W))."""

    def backward(self, dout):
        return global_avg_pool_backward(dout, self.cache) * (self.cache[2] * self.cache[3])


def test_gradcheck_catches_a_backward_without_the_mean(xp):
    with pytest.raises(GradientCheckError):
        check_layer(_ForgetsTheMean(), xp.asarray(np.random.default_rng(2).standard_normal((2, 3, 2, 2))))


def test_float32_stays_float32_and_feeds_a_classifier_with_R_1(xp):
    x = xp.asarray(np.random.default_rng(3).standard_normal((4, 6, 3, 3)).astype(np.float32))
    pool = GlobalAvgPool()
    f = pool.forward(x)
    assert f.dtype == np.float32
    head = SoftmaxClassifier(6, 1, 5, rng=np.random.default_rng(0)).to("cpu" if xp is np else "gpu")
    scores = head.forward(f)
    dx = pool.backward(head.backward(xp.ones_like(scores)))
    assert scores.shape == (4, 5) and dx.dtype == np.float32 and dx.shape == x.shape
    assert dx.flags.c_contiguous


def test_the_function_pair_and_errors():
    x = np.arange(8.0).reshape(1, 2, 2, 2)
    out, cache = global_avg_pool_forward(x)
    np.testing.assert_array_equal(out[:, :, 0], [[1.5, 5.5]])
    dout = np.array([[[4.0], [8.0]]])
    np.testing.assert_array_equal(global_avg_pool_backward(dout, cache), [[[[1, 1], [1, 1]], [[2, 2], [2, 2]]]])
    np.testing.assert_array_equal(dout, [[[4.0], [8.0]]])  # dout untouched
    pool = GlobalAvgPool()
    with pytest.raises(RuntimeError, match="forward first"):
        pool.backward(dout)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        pool.forward(np.zeros((2, 3)))
    pool.forward(x)
    with pytest.raises(ValueError, match=r"\(1, 2, 1\)"):
        pool.backward(np.zeros((1, 2)))
