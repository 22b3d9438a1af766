"""Conv2D: gradients, forward against SciPy and the loop reference, dtype, errors, init."""
import numpy as np
import pytest
from scipy import signal

from minicompact.backend import to_cpu
from minicompact.gradcheck import GradientCheckError, check_layer
from minicompact.layers import conv_choice
from minicompact.layers.conv import Conv2D, conv2d_backward, conv2d_forward
from minicompact.layers.workspace import ColumnWorkspace
from minicompact.reference import conv2d_reference

CONFIGS = [  # (N, C_in, C_out, H, W, kernel, stride, padding)
    (1, 2, 3, 9, 7, 3, 1, 1),
    (3, 2, 2, 9, 7, 3, 2, 0),
    (2, 3, 2, 8, 8, 3, 2, 1),
    (1, 2, 3, 6, 5, 3, 1, 3),
    (1, 2, 2, 9, 7, 7, 1, 3),
    (3, 1, 2, 11, 9, 7, 2, 3),
    (2, 2, 2, 7, 9, 7, 1, 0),
]
# The output is linear in each single entry of x and of W, so central differences are exact
# up to rounding for any step; a larger step than the default keeps that rounding far below
# the 1e-7 tolerance.
H_STEP = 1e-3


def make(config, device="cpu", dtype=np.float64, seed=0):
    n, c, k, h, w, ks, s, p = config
    rng = np.random.default_rng(seed)
    layer = Conv2D(c, k, ks, stride=s, padding=p, dtype=dtype, rng=rng).to(device)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    return layer, x


@pytest.mark.parametrize("config", CONFIGS)
def test_gradients(config, device, xp):
    layer, x = make(config, device)
    errors = check_layer(layer, xp.asarray(x), tol=1e-7, h=H_STEP, seed=1)
    assert set(errors) == {"x", "W"}


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_matches_scipy_and_loop_reference(config, device, xp):
    layer, x = make(config, device)
    out = to_cpu(layer.forward(xp.asarray(x)))
    W = to_cpu(layer.params["W"])
    s, p = layer.stride, layer.padding
    xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    # scipy correlates over (C, H, W) at once; 'valid' along C sums the channels
    want = np.stack([np.stack([signal.correlate(xpad[n], W[k], mode="valid", method="direct")[0, ::s, ::s]
                               for k in range(W.shape[0])]) for n in range(x.shape[0])])
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, conv2d_reference(x, W, s, p), rtol=1e-12, atol=1e-12)


def test_float32_matches_float64_and_stays_float32(device, xp):
    config = (2, 8, 4, 10, 9, 3, 1, 1)
    l64, x64 = make(config, device)
    l32 = Conv2D(8, 4, 3, padding=1, dtype=np.float32).to(device)
    l32.params["W"] = l64.params["W"].astype(xp.float32)
    x32 = xp.asarray(x64.astype(np.float32))
    out64, out32 = l64.forward(xp.asarray(x64)), l32.forward(x32)
    assert out32.dtype == xp.float32
    scale = float(abs(out64).max())
    np.testing.assert_allclose(to_cpu(out32), to_cpu(out64), rtol=0, atol=1e-6 * scale)
    dout = xp.asarray(np.random.default_rng(3).standard_normal(out64.shape))
    dx64, dx32 = l64.backward(dout), l32.backward(dout.astype(xp.float32))
    assert dx32.dtype == xp.float32 and l32.grads["W"].dtype == xp.float32
    np.testing.assert_allclose(to_cpu(dx32), to_cpu(dx64), rtol=0, atol=1e-6 * float(abs(dx64).max()))
    np.testing.assert_allclose(to_cpu(l32.grads["W"]), to_cpu(l64.grads["W"]), rtol=0,
                               atol=1e-5 * float(abs(l64.grads["W"]).max()))


def test_he_initialisation():
    layer = Conv2D(64, 32, 3, rng=np.random.default_rng(0))
    W = layer.params["W"]
    assert W.shape == (32, 64, 3, 3) and W.dtype == np.float32
    assert abs(W.std() / np.sqrt(2.0 / (9 * 64)) - 1) < 0.03   # N(0, 2 / (S K^{l-1}))
    assert abs(W.mean()) < 0.01
    same = Conv2D(64, 32, 3, rng=np.random.default_rng(0)).params["W"]
    np.testing.assert_array_equal(W, same)
    assert Conv2D(3, 64, (7, 5)).params["W"].shape == (64, 3, 7, 5)


def test_reused_buffer_gives_fresh_results(device, xp):
    """The column buffer is reused across forwards: outputs must not alias it, shapes may change."""
    rng = np.random.default_rng(4)
    layer = Conv2D(2, 3, 3, padding=1, dtype=np.float64, rng=rng).to(device)
    W = to_cpu(layer.params["W"])
    xs = [rng.standard_normal(shape) for shape in [(2, 2, 6, 5), (3, 2, 6, 5), (2, 2, 6, 5)]]
    outs = [layer.forward(xp.asarray(x)) for x in xs]
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(to_cpu(out), conv2d_reference(x, W, 1, 1), atol=1e-12)
    dout = xp.asarray(rng.standard_normal(outs[-1].shape))
    layer.backward(dout)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(dout)   # backward consumes the cached columns
    layer.cache = None         # frees the buffer; the next forward allocates a new one
    np.testing.assert_allclose(to_cpu(layer.forward(xp.asarray(xs[0]))),
                               conv2d_reference(xs[0], W, 1, 1), atol=1e-12)


def test_backward_rejects_wrong_dout():
    layer, x = make(CONFIGS[0])
    layer.forward(x)
    with pytest.raises(ValueError, match=r"\(1, 3, 9, 7\).*\(1, 3, 9, 6\)"):
        layer.backward(np.zeros((1, 3, 9, 6)))


def test_bad_input_raises_clear_errors():
    layer = Conv2D(3, 4, 3)  # float32, no padding
    with pytest.raises(ValueError, match=r"got shape \(3, 8, 8\)"):
        layer.forward(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3, \.\.\.\).*got shape \(2, 4, 8, 8\)"):
        layer.forward(np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="float32.*float64"):
        layer.forward(np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="int64"):
        layer.forward(np.zeros((2, 3, 8, 8), np.int64))
    with pytest.raises(ValueError, match=r"H >= 3 and W >= 3, got shape \(2, 3, 2, 8\)"):
        layer.forward(np.zeros((2, 3, 2, 8), np.float32))
    with pytest.raises(ValueError, match="H >= 7"):
        Conv2D(3, 4, 7, padding=0).forward(np.zeros((1, 3, 5, 9), np.float32))
    Conv2D(3, 4, 7, padding=3).forward(np.zeros((1, 3, 1, 1), np.float32))  # padding makes it fit
    for bad in [dict(kernel_size=0), dict(kernel_size=3, stride=0), dict(kernel_size=3, padding=-1)]:
        with pytest.raises(ValueError):
            Conv2D(3, 4, **bad)


def test_first_layer_can_skip_the_input_gradient(device, xp):
    layer, x = make(CONFIGS[5], device)
    first = Conv2D(1, 2, 7, stride=2, padding=3, dtype=np.float64, need_input_grad=False).to(device)
    first.params["W"] = layer.params["W"].copy()
    x = xp.asarray(x)
    dout = xp.asarray(np.random.default_rng(6).standard_normal(layer.forward(x).shape))
    layer.backward(dout)
    first.forward(x)
    assert first.backward(dout) is None
    np.testing.assert_allclose(to_cpu(first.grads["W"]), to_cpu(layer.grads["W"]), rtol=1e-12)
    check_layer(first, x, h=H_STEP, check_input=False)


@pytest.mark.parametrize("algo, shared", [("im2col", False), ("im2col", True), ("winograd", False),
                                          ("winograd", True), ("auto", False)])
@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 1, 0), (7, 2, 3), (3, 2, 1)])
def test_every_path_of_the_layer_matches_the_short_pair(algo, shared, kernel, stride, padding,
                                                        device, xp, monkeypatch):
    """Conv2D's fast paths (its own reused buffer, shared columns, Winograd, auto's timing)
    against ``conv2d_forward`` / ``conv2d_backward``, forward and backward, over three
    forwards: the second reuses the first's buffer, the third has a new shape."""
    monkeypatch.setattr(conv_choice, "_CHOICES", {})
    rng = np.random.default_rng(10)
    layer = Conv2D(3, 4, kernel, stride, padding, dtype=np.float64, rng=rng, algo=algo).to(device)
    if shared:
        layer.columns = ColumnWorkspace()
    W = layer.params["W"]
    for shape in [(2, 3, 9, 8), (2, 3, 9, 8), (1, 3, 7, 10)]:
        x = xp.asarray(rng.standard_normal(shape))
        want, cols = conv2d_forward(x, W, stride, padding)
        dout = xp.asarray(rng.standard_normal(want.shape))
        dx_want, dW_want = conv2d_backward(dout, cols, W, x.shape, stride, padding)
        x_kept = x.copy()
        np.testing.assert_allclose(to_cpu(layer.forward(x)), to_cpu(want), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(to_cpu(layer.backward(dout)), to_cpu(dx_want), rtol=1e-12,
                                   atol=1e-12)
        np.testing.assert_allclose(to_cpu(layer.grads["W"]), to_cpu(dW_want), rtol=1e-12, atol=1e-12)
        assert bool((x == x_kept).all())   # no path writes into its input
    ran, chosen = layer.cache.algorithm.name, layer.algorithm(x)
    if algo == "winograd" and (kernel, stride) == (3, 1):
        assert ran == chosen == "winograd"
    else:
        assert ran == ("im2col-shared" if shared and chosen == "im2col" else chosen)


class _DoubledDx(Conv2D):
    def backward(self, dout):
        return 2 * super().backward(dout)


class _FlippedDW(Conv2D):
    def backward(self, dout):
        dx = super().backward(dout)
        self.grads["W"] = self.grads["W"][:, :, ::-1, ::-1].copy()  # a transposed index
        return dx


@pytest.mark.parametrize("cls, name", [(_DoubledDx, r"\.x"), (_FlippedDW, r"\.W")])
def test_gradient_check_can_fail(cls, name):
    rng = np.random.default_rng(5)
    layer = cls(2, 2, 3, padding=1, dtype=np.float64, rng=rng)
    with pytest.raises(GradientCheckError, match=name):
        check_layer(layer, rng.standard_normal((2, 2, 5, 4)), h=H_STEP)
