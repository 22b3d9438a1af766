"""CompactConv2D: filter groups that read only their channels — gradients, equality with the
dense Conv2D on weights with Γ's zero groups, the grouping, and a check that can fail."""
import numpy as np
import pytest

from minicompact.backend import to_cpu
from minicompact.gradcheck import GradientCheckError, check_layer
from minicompact.layers.compact_conv import CompactConv2D, dense_fraction, group_filters
from minicompact.layers.conv import Conv2D

H_STEP = 1e-3   # the output is linear in each entry of x and W: central differences are exact


def sparse_weights(k, c, ks, density, seed=0, dead_filter=True):
    """Θ (k, c, ks, ks) float64 whose groups Θ[f, t] are zero with probability 1 - density,
    plus (dead_filter) one all-zero filter and one channel no filter reads."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((k, c, ks, ks))
    W *= rng.random((k, c, 1, 1)) < density
    if dead_filter:
        W[1] = 0
        W[:, -1] = 0
    return W


CONFIGS = [  # (N, C, K, H, W, kernel, stride, padding, density)
    (2, 5, 6, 7, 6, 3, 1, 1, 0.4),
    (1, 6, 4, 9, 8, 3, 2, 1, 0.5),
    (2, 3, 5, 9, 9, 7, 1, 3, 0.6),
]


def make(config, seed=0, groups=None):
    n, c, k, h, w, ks, s, p, d = config
    W = sparse_weights(k, c, ks, d, seed)
    x = np.random.default_rng(seed + 1).standard_normal((n, c, h, w))
    return CompactConv2D(W, groups=groups, stride=s, padding=p), W, x


@pytest.mark.parametrize("config", CONFIGS)
def test_gradients(config, device, xp):
    layer, W, x = make(config)
    layer.to(device)
    errors = check_layer(layer, xp.asarray(x), tol=1e-7, h=H_STEP, seed=1)
    assert set(errors) == {"x", "W"}
    outside = np.ones(W.shape[:2], dtype=bool)          # entries no group reads get no gradient
    for f, u in layer.groups:
        outside[np.ix_(f, u)] = False
    assert outside.any() and (to_cpu(layer.grads["W"])[outside] == 0).all()


@pytest.mark.parametrize("config", CONFIGS)
def test_gradients_with_two_groups_given(config):
    """Hand-made groups, one of them not a contiguous range of filters (the fancy-index path)."""
    n, c, k, *_ = config
    groups = [(np.arange(0, k, 2), np.arange(c)), (np.arange(1, k, 2), np.arange(c))]
    layer, _, x = make(config, groups=groups)
    check_layer(layer, x, tol=1e-7, h=H_STEP, seed=2)


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_and_backward_equal_the_dense_conv(config, device, xp):
    n, c, k, h, w, ks, s, p, d = config
    layer, W, x = make(config)
    dense = Conv2D(c, k, ks, stride=s, padding=p, dtype=np.float64)
    dense.params["W"] = W.copy()
    layer.to(device), dense.to(device)
    xd = xp.asarray(x)
    out, want = layer.forward(xd), dense.forward(xd)
    np.testing.assert_allclose(to_cpu(out), to_cpu(want), rtol=1e-12, atol=1e-12)
    dout = xp.asarray(np.random.default_rng(3).standard_normal(out.shape))
    dx, dx_dense = layer.backward(dout), dense.backward(dout)
    np.testing.assert_allclose(to_cpu(dx), to_cpu(dx_dense), rtol=1e-12, atol=1e-12)
    live = W.reshape(k, c, -1).any(axis=2)
    np.testing.assert_allclose(to_cpu(layer.grads["W"])[live], to_cpu(dense.grads["W"])[live],
                               rtol=1e-12, atol=1e-12)


def test_evaluation_mode_and_float32():
    layer, W, x = make(CONFIGS[0])
    layer.astype(np.float32).eval()
    x32 = x.astype(np.float32)
    a = layer.forward(x32)
    b = layer.forward(x32)           # the split weights are cached in evaluation mode
    assert a.dtype == np.float32 and np.array_equal(a, b)
    dense = Conv2D(W.shape[1], W.shape[0], 3, padding=1, dtype=np.float32)
    dense.params["W"] = W.astype(np.float32)
    np.testing.assert_allclose(a, dense.forward(x32), rtol=1e-5, atol=1e-5)


def test_grouping_partitions_the_filters_and_skips_zero_groups():
    W = sparse_weights(32, 24, 3, 0.3, seed=4)
    groups = group_filters(W)
    filters = np.sort(np.concatenate([f for f, _ in groups]))
    assert np.array_equal(filters, np.arange(32))
    use = W.reshape(32, 24, -1).any(axis=2)
    for f, u in groups:                     # every live group is inside its filter group's channels
        assert not use[f][:, np.setdiff1d(np.arange(24), u)].any()
    assert 23 not in np.concatenate([u for _, u in groups])      # the unread channel is never read
    assert dense_fraction(groups, 32, 24) <= 23 / 24
    # Two blocks reading disjoint halves are found exactly (block-diagonal Γ pattern).
    B = np.zeros((16, 16, 3, 3))
    B[:8, :8] = 1
    B[8:, 8:] = 1
    perm = np.random.default_rng(0).permutation(16)
    found = group_filters(B[perm])
    assert len(found) == 2 and dense_fraction(found, 16, 16) == 0.5


def test_a_dense_layer_is_one_group():
    W = np.random.default_rng(0).standard_normal((8, 6, 3, 3))
    groups = group_filters(W)
    assert len(groups) == 1 and dense_fraction(groups, 8, 6) == 1.0


class _DoubledDx(CompactConv2D):
    def backward(self, dout):
        return 2 * super().backward(dout)           # a wrong factor of two


class _FlippedDW(CompactConv2D):
    def backward(self, dout):
        dx = super().backward(dout)
        self.grads["W"] = self.grads["W"][:, :, ::-1, ::-1].copy()   # a transposed index
        return dx


class _DxOfOneGroupOnly(CompactConv2D):
    def backward(self, dout):
        dx = super().backward(dout)
        f, u = self.groups[-1]
        dx[:, u] *= 0.5                               # a group's share of dx counted half
        return dx


@pytest.mark.parametrize("cls, name", [(_DoubledDx, r"\.x"), (_FlippedDW, r"\.W"),
                                       (_DxOfOneGroupOnly, r"\.x")])
def test_gradient_check_can_fail(cls, name):
    n, c, k, h, w, ks, s, p, d = CONFIGS[0]
    W = sparse_weights(k, c, ks, d, 5)
    groups = [(np.arange(0, 3), np.arange(c)), (np.arange(3, k), np.arange(2, c))]
    W[3:, :2] = 0
    layer = cls(W, groups=groups, stride=s, padding=p)
    with pytest.raises(GradientCheckError, match=name):
        check_layer(layer, np.random.default_rng(6).standard_normal((n, c, h, w)), h=H_STEP)


def test_bad_groups_are_refused():
    W = np.ones((4, 2, 3, 3))
    with pytest.raises(ValueError, match="partition"):
        CompactConv2D(W, groups=[(np.arange(3), np.arange(2))])
