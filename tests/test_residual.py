"""ResNet's basic block: the residual addition, the projection shortcut, gradients of the whole
block in float64 with batch-norm in training mode, and backwards that drop a branch caught."""
import numpy as np
import pytest

from minicompact.backend import to_cpu
from minicompact.gradcheck import GradientCheckError, check_layer
from minicompact.layers.residual import BasicBlock, residual_add_backward, residual_add_forward


def block(c_in, c_out, stride, seed=0, dtype=np.float64, **kwargs):
    return BasicBlock(c_in, c_out, stride, dtype=dtype, rng=np.random.default_rng(seed), **kwargs)


def test_residual_add_sends_the_gradient_to_both_branches():
    a, b = np.ones((2, 3, 2, 2)), np.full((2, 3, 2, 2), 2.0)
    out, cache = residual_add_forward(a, b)
    np.testing.assert_array_equal(out, 3.0)
    dout = np.random.default_rng(0).standard_normal(out.shape)
    dmain, dshort = residual_add_backward(dout, cache)
    np.testing.assert_array_equal(dmain, dout)
    np.testing.assert_array_equal(dshort, dout)
    with pytest.raises(ValueError, match=r"one shape.*\(2, 3, 2, 2\).*\(2, 3, 1, 1\)"):
        residual_add_forward(a, np.ones((2, 3, 1, 1)))


@pytest.mark.parametrize("c_in, c_out, stride, projection", [(4, 4, 1, False), (3, 5, 1, True), (3, 4, 2, True)])
def test_structure_and_output_shape(c_in, c_out, stride, projection):
    b = block(c_in, c_out, stride)
    assert (b.shortcut_conv is not None) == projection
    if projection:
        assert b.shortcut_conv.params["W"].shape == (c_out, c_in, 1, 1) and b.shortcut_conv.stride == stride
    x = np.random.default_rng(1).standard_normal((2, c_in, 6, 6))
    assert b.forward(x).shape == (2, c_out, 6 // stride, 6 // stride)
    names = [n for n, _ in b.named_layers()]
    assert names[:5] == ["conv1", "bn1", "relu1", "conv2", "bn2"] and names[-1] == "relu2"
    assert ("shortcut.conv" in names) == projection
    assert set(b.params) == set(b.grads)


def test_a_thinned_block_keeps_its_projection_and_refuses_a_wrong_identity():
    b = block(3, 3, 2, mid_channels=2, projection=True)
    assert b.conv1.params["W"].shape == (2, 3, 3, 3) and b.conv2.params["W"].shape == (3, 2, 3, 3)
    assert b.shortcut_conv is not None and "mid_channels=2" in repr(b)
    assert block(3, 3, 1, projection=True).shortcut_conv is not None   # kept although widths match
    with pytest.raises(ValueError, match="identity shortcut needs stride 1 and C_in = C_out"):
        block(3, 4, 1, projection=False)


def test_identity_block_computes_relu_of_main_plus_x():
    b = block(3, 3, 1)
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 5))
    main = b.bn2.forward(b.conv2.forward(b.relu1.forward(b.bn1.forward(b.conv1.forward(x)))))
    np.testing.assert_allclose(b.forward(x), np.maximum(main + x, 0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c_in, c_out, stride, mid", [(3, 3, 1, None), (3, 4, 2, None), (3, 3, 1, 2)])
def test_block_gradients_with_batchnorm_in_training_mode(c_in, c_out, stride, mid, xp):
    """dL/dx and every conv and batch-norm parameter of the block, float64, random dout; also a
    thinned block whose conv1 has fewer filters than conv2 (``mid_channels``)."""
    b = block(c_in, c_out, stride, seed=3, mid_channels=mid)
    if xp is not np:
        for layer in b.layers:
            layer.to("gpu")
    x = xp.asarray(np.random.default_rng(4).standard_normal((2, c_in, 6, 6)))
    errors = check_layer(b, x, tol=1e-7, h=1e-4, points=4)
    assert {"x", "conv1.W", "bn2.gamma"} <= set(errors)
    assert ("shortcut.conv.W" in errors) == (stride != 1)


class _DropsTheShortcut(BasicBlock):
    """A backward that forgets the shortcut's gradient: only the main branch reaches x."""

    def backward(self, dout):
        d = self.relu2.backward(dout)
        dmain = self.conv2.backward(self.bn2.backward(d))
        dmain = self.conv1.backward(self.bn1.backward(self.relu1.backward(dmain)))
        if self.shortcut_conv is not None:
            self.shortcut_conv.backward(self.shortcut_bn.backward(d))  # grads filled, dx lost
        return dmain


class _DropsTheMainBranch(BasicBlock):
    """A backward that returns the shortcut's gradient alone (parameter gradients all filled)."""

    def backward(self, dout):
        d = self.relu2.backward(dout)
        self.conv1.backward(self.bn1.backward(self.relu1.backward(self.conv2.backward(self.bn2.backward(d)))))
        return d if self.shortcut_conv is None else self.shortcut_conv.backward(self.shortcut_bn.backward(d))


@pytest.mark.parametrize("wrong", [_DropsTheShortcut, _DropsTheMainBranch])
@pytest.mark.parametrize("c_in, c_out, stride", [(3, 3, 1), (3, 4, 2)])
def test_gradcheck_catches_a_backward_that_drops_a_branch(wrong, c_in, c_out, stride):
    b = wrong(c_in, c_out, stride, dtype=np.float64, rng=np.random.default_rng(3))
    x = np.random.default_rng(4).standard_normal((2, c_in, 6, 6))
    with pytest.raises(GradientCheckError, match=r"\.x \(shape"):
        check_layer(b, x, h=1e-4, points=4)


def test_with_a_silent_main_branch_the_gradient_still_reaches_x_through_the_shortcut():
    """conv2 = 0: the main branch passes no gradient, so dL/dx is exactly the shortcut's,
    dout masked by the last ReLU.  A backward that drops the shortcut would return zeros."""
    b = block(3, 3, 1, seed=5)
    b.conv2.params["W"][...] = 0
    x = np.random.default_rng(6).standard_normal((2, 3, 4, 4))
    out = b.forward(x)
    dout = np.random.default_rng(7).standard_normal(out.shape)
    dx = b.backward(dout)
    np.testing.assert_allclose(dx, dout * (out > 0), rtol=0, atol=1e-12)
    assert np.abs(dx).max() > 0.1
    b_wrong = _DropsTheShortcut(3, 3, 1, dtype=np.float64, rng=np.random.default_rng(5))
    b_wrong.conv2.params["W"][...] = 0
    b_wrong.forward(x)
    assert np.abs(b_wrong.backward(dout)).max() < 1e-12


def test_float32_stays_float32(xp):
    b = block(3, 4, 2, dtype=np.float32)
    if xp is not np:
        for layer in b.layers:
            layer.to("gpu")
    x = xp.asarray(np.random.default_rng(8).standard_normal((2, 3, 8, 8)).astype(np.float32))
    out = b.forward(x)
    dx = b.backward(xp.ones_like(out))
    assert out.dtype == dx.dtype == np.float32
    assert all(to_cpu(g).dtype == np.float32 for g in b.grads.values())
