"""BatchNorm2D and its short pair: gradient checks (train and eval), the layer against the pair,
running statistics, dtype, input errors."""
import numpy as np
import pytest

from minicompact.backend import to_cpu
from minicompact.gradcheck import GradientCheckError, check_layer
from minicompact.layers.batchnorm import BatchNorm2D, batchnorm_backward, batchnorm_forward


def make_bn(channels, device, dtype=np.float64, seed=0, eps=1e-5):
    """A BatchNorm2D with random gamma, beta and running statistics, on ``device``."""
    rng = np.random.default_rng(seed)
    bn = BatchNorm2D(channels, eps=eps, dtype=dtype)
    bn.params["gamma"] = rng.uniform(0.5, 2.0, channels).astype(dtype)
    bn.params["beta"] = rng.standard_normal(channels).astype(dtype)
    bn.buffers["running_mean"] = rng.standard_normal(channels).astype(dtype)
    bn.buffers["running_var"] = rng.uniform(0.5, 2.0, channels).astype(dtype)
    return bn.to(device)


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (4, 2, 3, 5), (3, 4, 1, 2)])
def test_gradcheck_train(xp, device, shape):
    bn = make_bn(shape[1], device)
    x = xp.asarray(np.random.default_rng(1).standard_normal(shape) * 2 + 0.5)
    # Five-point stencil, h = 1e-3: over 150 random seeds of these shapes the worst error of
    # the correct backward was 3e-9; the default two-point h = 1e-5 reached 4.7e-7 (rounding
    # on entries with tiny gradients), so a passing seed would have been luck.
    errors = check_layer(bn, x, seed=2, h=1e-3, points=4)
    assert set(errors) == {"x", "gamma", "beta"}


def test_gradcheck_eval(xp, device):
    bn = make_bn(3, device).eval()
    x = xp.asarray(np.random.default_rng(1).standard_normal((2, 3, 4, 5)))
    check_layer(bn, x, seed=3)


class _BNWithoutMeanTerm(BatchNorm2D):
    """A classic mistake: treat the batch mean and variance as constants in backward."""

    def backward(self, dout):
        _, xhat, inv_std = self.cache
        self.grads["gamma"] = (dout * xhat).sum(axis=(0, 2, 3))
        self.grads["beta"] = dout.sum(axis=(0, 2, 3))
        return dout * (self.params["gamma"] * inv_std).reshape(1, -1, 1, 1)


def test_gradcheck_catches_wrong_backward(xp, device):
    bn = _BNWithoutMeanTerm(3, dtype=np.float64).to(device)
    x = xp.asarray(np.random.default_rng(1).standard_normal((2, 3, 4, 5)))
    with pytest.raises(GradientCheckError, match="_BNWithoutMeanTerm.x"):
        check_layer(bn, x)


def test_running_statistics_follow_documented_formula(xp, device):
    mom, eps = 0.3, 1e-5
    bn = BatchNorm2D(2, eps=eps, momentum=mom, dtype=np.float64).to(device)
    rng = np.random.default_rng(4)
    rm, rv = np.zeros(2), np.ones(2)
    for step in range(4):
        x = rng.standard_normal((3, 2, 4, 5)) * (step + 1) + step
        bn.forward(xp.asarray(x))
        rm = (1 - mom) * rm + mom * x.mean(axis=(0, 2, 3))
        rv = (1 - mom) * rv + mom * x.var(axis=(0, 2, 3), ddof=1)  # unbiased, as PyTorch
    np.testing.assert_allclose(to_cpu(bn.buffers["running_mean"]), rm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_cpu(bn.buffers["running_var"]), rv, rtol=1e-12, atol=1e-12)

    # eval mode normalises with those running statistics, and leaves them alone
    bn.eval()
    x = rng.standard_normal((2, 2, 3, 3))
    out = to_cpu(bn.forward(xp.asarray(x)))
    expect = (x - rm[None, :, None, None]) / np.sqrt(rv[None, :, None, None] + eps)
    np.testing.assert_allclose(out, expect, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_cpu(bn.buffers["running_mean"]), rm, rtol=0, atol=0)


def test_train_output_is_standardised_float32(xp, device):
    bn = BatchNorm2D(4).to(device)
    rng = np.random.default_rng(5)
    # offset 1e3: a one-pass E[x²] - E[x]² variance is off by 40% in float32 here
    x = (rng.standard_normal((8, 4, 6, 7)) * np.array([1, 2, 0.5, 3])[None, :, None, None]
         + 1e3).astype(np.float32)
    out = bn.forward(xp.asarray(x))
    assert out.dtype == np.float32
    o = to_cpu(out).astype(np.float64)
    np.testing.assert_allclose(o.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(o.var(axis=(0, 2, 3)), 1, atol=1e-4)
    dx = bn.backward(xp.asarray(rng.standard_normal(x.shape).astype(np.float32)))
    assert dx.dtype == np.float32
    for arr in (*bn.grads.values(), *bn.buffers.values()):
        assert arr.dtype == np.float32
    bn.eval()
    assert bn.forward(xp.asarray(x)).dtype == np.float32
    assert bn.backward(xp.asarray(x)).dtype == np.float32


def test_float32_backward_matches_float64(xp, device):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3, 5, 5))
    dout = rng.standard_normal(x.shape)
    results = []
    for dtype in (np.float32, np.float64):
        bn = BatchNorm2D(3, dtype=dtype).to(device)
        bn.forward(xp.asarray(x.astype(dtype)))
        results.append(to_cpu(bn.backward(xp.asarray(dout.astype(dtype)))))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_backward_leaves_dout_untouched(xp, device):
    bn = BatchNorm2D(2, dtype=np.float64).to(device)
    bn.forward(xp.asarray(np.random.default_rng(7).standard_normal((2, 2, 3, 3))))
    dout = xp.asarray(np.random.default_rng(8).standard_normal((2, 2, 3, 3)))
    keep = dout.copy()
    bn.backward(dout)
    assert bool((dout == keep).all())


def test_bad_inputs_raise_clear_errors():
    bn = BatchNorm2D(3)
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 5\)"):
        bn.forward(np.zeros((2, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 3, 5\)"):
        bn.forward(np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="float64"):
        bn.forward(np.zeros((2, 3, 5, 5), np.float64))
    with pytest.raises(ValueError, match="more than one value"):
        bn.forward(np.zeros((1, 3, 1, 1), np.float32))
    bn.eval().forward(np.zeros((1, 3, 1, 1), np.float32))  # fine with running statistics
    with pytest.raises(ValueError, match=r"\(1, 3, 1, 1\)"):
        bn.backward(np.zeros((1, 3, 2, 1), np.float32))


# ---- the short pair: batchnorm_forward / batchnorm_backward ------------------------------

class _BNPair:
    """``batchnorm_forward`` / ``batchnorm_backward`` as a layer for ``check_layer``; backward:
    the function under test (a deliberately wrong one in the failing checks)."""

    def __init__(self, gamma, beta, backward=batchnorm_backward):
        self.params, self.grads, self._backward = {"gamma": gamma, "beta": beta}, {}, backward

    def forward(self, x):
        out, self.cache = batchnorm_forward(x, self.params["gamma"], self.params["beta"])
        return out

    def backward(self, dout):
        dx, self.grads["gamma"], self.grads["beta"] = self._backward(dout, self.cache)
        return dx


def _pair_inputs(xp, shape, seed=1):
    rng = np.random.default_rng(seed)
    x = xp.asarray(rng.standard_normal(shape) * 2 + 0.5)
    return x, xp.asarray(rng.uniform(0.5, 2.0, shape[1])), xp.asarray(rng.standard_normal(shape[1]))


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (4, 2, 3, 5), (3, 4, 1, 2)])
def test_pair_gradcheck(xp, device, shape):
    x, gamma, beta = _pair_inputs(xp, shape)
    errors = check_layer(_BNPair(gamma, beta), x, seed=2, h=1e-3, points=4)   # as test_gradcheck_train
    assert set(errors) == {"x", "gamma", "beta"}


def _doubled_dgamma(dout, cache):
    dx, dgamma, dbeta = batchnorm_backward(dout, cache)
    return dx, 2 * dgamma, dbeta


def _dx_without_variance_term(dout, cache):
    """Forgets that the variance depends on x: the - xhat·Σ dout·xhat term is missing."""
    xhat, gamma, inv_std = cache
    _, dgamma, dbeta = batchnorm_backward(dout, cache)
    m = dout.size // dout.shape[1]
    dx = gamma.reshape(1, -1, 1, 1) * inv_std * (dout - dbeta.reshape(1, -1, 1, 1) / m)
    return dx, dgamma, dbeta


@pytest.mark.parametrize("wrong, name", [(_doubled_dgamma, r"_BNPair\.gamma"),
                                         (_dx_without_variance_term, r"_BNPair\.x")])
def test_pair_gradcheck_catches_wrong_backward(xp, device, wrong, name):
    x, gamma, beta = _pair_inputs(xp, (2, 3, 4, 5))
    with pytest.raises(GradientCheckError, match=name):
        check_layer(_BNPair(gamma, beta, backward=wrong), x, seed=2, h=1e-3, points=4)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (1, 2, 3, 3), (6, 4, 1, 1)])
def test_layer_in_training_mode_matches_the_pair(xp, device, shape):
    """BatchNorm2D (two-pass statistics, einsum sums, the sync-BN hooks) computes the pair."""
    bn = make_bn(shape[1], device, eps=1e-3)
    rng = np.random.default_rng(3)
    x = xp.asarray(rng.standard_normal(shape) * 3 + 5)
    dout = xp.asarray(rng.standard_normal(shape))
    want, cache = batchnorm_forward(x, bn.params["gamma"], bn.params["beta"], eps=bn.eps)
    np.testing.assert_allclose(to_cpu(bn.forward(x)), to_cpu(want), rtol=1e-12, atol=1e-12)
    dx_want, dgamma_want, dbeta_want = batchnorm_backward(dout, cache)
    np.testing.assert_allclose(to_cpu(bn.backward(dout)), to_cpu(dx_want), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_cpu(bn.grads["gamma"]), to_cpu(dgamma_want), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_cpu(bn.grads["beta"]), to_cpu(dbeta_want), rtol=1e-12, atol=1e-12)


def test_fused_relu_matches_the_pair_then_relu(xp, device):
    """forward_relu = max(0, pair's out); its backward = the pair's backward of dout·[out > 0]."""
    bn = make_bn(3, device)
    rng = np.random.default_rng(4)
    x = xp.asarray(rng.standard_normal((4, 3, 5, 6)))
    dout = xp.asarray(rng.standard_normal((4, 3, 5, 6)))
    pre, cache = batchnorm_forward(x, bn.params["gamma"], bn.params["beta"], eps=bn.eps)
    assert float(abs(pre).min()) > 1e-6    # away from ReLU's kink: both sides agree on the mask
    out = bn.forward_relu(x)
    assert bn.relu_fused
    np.testing.assert_allclose(to_cpu(out), to_cpu(xp.maximum(pre, 0)), rtol=1e-12, atol=1e-12)
    dx_want, dgamma_want, dbeta_want = batchnorm_backward(dout * (pre > 0), cache)
    np.testing.assert_allclose(to_cpu(bn.backward(dout)), to_cpu(dx_want), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_cpu(bn.grads["gamma"]), to_cpu(dgamma_want), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_cpu(bn.grads["beta"]), to_cpu(dbeta_want), rtol=1e-12, atol=1e-12)


def test_pair_keeps_float32_and_leaves_dout_untouched(xp, device):
    x, gamma, beta = (a.astype(xp.float32) for a in _pair_inputs(xp, (3, 2, 4, 4)))
    out, cache = batchnorm_forward(x, gamma, beta)
    dout = xp.asarray(np.random.default_rng(5).standard_normal(x.shape).astype(np.float32))
    keep = dout.copy()
    grads = batchnorm_backward(dout, cache)
    assert out.dtype == xp.float32 and all(g.dtype == xp.float32 for g in grads)
    assert bool((dout == keep).all())
