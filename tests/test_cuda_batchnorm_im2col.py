"""The CUDA kernels of batch-norm and im2col/col2im (minicompact/cuda/batchnorm.py, im2col.py).

On the CPU, through the fake GPU of ``fake_gpu.py``: a GPU array takes the kernel path, which
there runs the kernels' twins, and the layers give NumPy's results bit for bit, their
gradient checks still pass, and each step is the one launch (by name) the kernel will be.
With CuPy and a GPU (skipped otherwise): each kernel against its twin on random inputs (odd
sizes, stride 2, padding, batch 1, float32 and float64), col2im deterministic, and the float32
variance of ``bn_stats`` accurate when |mean| >> std.
"""
import contextlib
import warnings

import numpy as np
import pytest

import fake_gpu
from minicompact import backend
from minicompact.backend import to_cpu
from minicompact import im2col as im2col_kernels          # IM2COL, COL2IM: the kernels and their twins
from minicompact.layers import batchnorm as bn_kernels   # BN_STATS, ...
from minicompact.gradcheck import check_layer
from minicompact.im2col import col2im, im2col, output_size
from minicompact.layers.batchnorm import BatchNorm2D
from minicompact.layers.conv import Conv2D

DTYPES = [np.float32, np.float64]
BN_SHAPES = [(1, 3, 1, 2),       # batch 1, two values per channel (the fewest training allows)
             (1, 5, 13, 17),     # odd sizes, fewer values per channel than a block's threads
             (4, 7, 3, 5),
             (3, 2, 33, 31),     # more values per channel than threads: several per thread
             (64, 4, 7, 7)]      # H·W below the threads of a block, many images
IM2COL_CASES = [  # (N, C, H, W, kh, kw, stride, padding)
    (1, 1, 5, 5, 3, 3, 1, 0),
    (2, 3, 9, 7, 3, 3, 1, 1),
    (3, 2, 9, 7, 3, 3, 2, 1),
    (2, 2, 8, 6, 7, 7, 2, 3),
    (1, 2, 7, 9, 2, 3, 3, 0),
    (1, 3, 11, 13, 3, 3, 2, 0),
    (1, 7300, 3, 3, 3, 3, 1, 1),   # C·kh·kw = 65700 rows: more than one grid row per block row
]


def _bn(channels, dtype, seed=0):
    rng = np.random.default_rng(seed)
    bn = BatchNorm2D(channels, momentum=0.3, dtype=dtype)
    bn.params["gamma"] = rng.uniform(0.5, 2.0, channels).astype(dtype)
    bn.params["beta"] = rng.standard_normal(channels).astype(dtype)
    return bn


def _record_launches(monkeypatch):
    """The kernels the fake GPU is asked for, by name, in order."""
    seen = []

    def emulate(name):
        seen.append(name)
        return contextlib.nullcontext()
    monkeypatch.setattr(fake_gpu.FakeCupy, "emulate_kernel", staticmethod(emulate))
    return seen


# -- the fake GPU: NumPy's bits through the kernel path ---------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_on_the_fake_gpu_is_numpy_bit_for_bit(monkeypatch, shape, dtype):
    rng = np.random.default_rng(1)
    cpu = _bn(shape[1], dtype)
    fake_gpu.install(monkeypatch)
    launches = _record_launches(monkeypatch)
    gpu = _bn(shape[1], dtype).to("gpu")
    for step in range(2):   # the second step starts from updated running statistics
        x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
        dout = rng.standard_normal(shape).astype(dtype)
        launches.clear()
        out = gpu.forward(backend.to_device(x, "gpu"))
        assert launches == ["bn_stats", "bn_normalise"]
        dx = gpu.backward(backend.to_device(dout, "gpu"))
        assert launches == ["bn_stats", "bn_normalise", "bn_grad_sums", "bn_grad_input"]
        assert type(out) is fake_gpu.DeviceArray and type(dx) is fake_gpu.DeviceArray
        np.testing.assert_array_equal(to_cpu(out), cpu.forward(x))
        np.testing.assert_array_equal(to_cpu(dx), cpu.backward(dout))
        for name in ("gamma", "beta"):
            np.testing.assert_array_equal(to_cpu(gpu.grads[name]), cpu.grads[name])
        for name in ("running_mean", "running_var"):
            np.testing.assert_array_equal(to_cpu(gpu.buffers[name]), cpu.buffers[name])
    gpu.eval(), cpu.eval()
    np.testing.assert_array_equal(to_cpu(gpu.forward(backend.to_device(x, "gpu"))), cpu.forward(x))


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (4, 2, 3, 5)])
def test_batchnorm_gradcheck_on_the_fake_gpu(monkeypatch, shape):
    fake_gpu.install(monkeypatch)
    bn = _bn(shape[1], np.float64).to("gpu")
    x = backend.to_device(np.random.default_rng(1).standard_normal(shape) * 2 + 0.5, "gpu")
    dout = backend.to_device(np.random.default_rng(2).standard_normal(shape), "gpu")
    errors = check_layer(bn, x, dout=dout, h=1e-3, points=4)
    assert set(errors) == {"x", "gamma", "beta"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", IM2COL_CASES[:-1])
def test_conv_on_the_fake_gpu_is_numpy_bit_for_bit(monkeypatch, case, dtype):
    """Forward (im2col into the reused workspace from the second step on) and backward
    (col2im) of Conv2D, with stride and padding."""
    n, c, h, w, kh, kw, s, p = case
    rng = np.random.default_rng(2)
    cpu = Conv2D(c, 4, (kh, kw), stride=s, padding=p, dtype=dtype, rng=np.random.default_rng(0))
    fake_gpu.install(monkeypatch)
    launches = _record_launches(monkeypatch)
    gpu = Conv2D(c, 4, (kh, kw), stride=s, padding=p, dtype=dtype,
                 rng=np.random.default_rng(0)).to("gpu")
    for step in range(2):
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
        out = cpu.forward(x)
        dout = rng.standard_normal(out.shape).astype(dtype)
        launches.clear()
        np.testing.assert_array_equal(to_cpu(gpu.forward(backend.to_device(x, "gpu"))), out)
        np.testing.assert_array_equal(to_cpu(gpu.backward(backend.to_device(dout, "gpu"))),
                                      cpu.backward(dout))
        np.testing.assert_array_equal(to_cpu(gpu.grads["W"]), cpu.grads["W"])
        assert launches == ["im2col", "col2im"]


def test_conv_gradcheck_on_the_fake_gpu(monkeypatch):
    fake_gpu.install(monkeypatch)
    conv = Conv2D(2, 3, 3, stride=2, padding=1, dtype=np.float64,
                  rng=np.random.default_rng(0)).to("gpu")
    x = backend.to_device(np.random.default_rng(1).standard_normal((2, 2, 7, 6)), "gpu")
    dout = backend.to_device(np.random.default_rng(2).standard_normal((2, 3, 4, 3)), "gpu")
    assert set(check_layer(conv, x, dout=dout)) == {"x", "W"}


def test_im2col_still_checks_its_workspace_on_the_fake_gpu(monkeypatch):
    fake_gpu.install(monkeypatch)
    x = backend.to_device(np.ones((1, 2, 5, 5), np.float32), "gpu")
    with pytest.raises(ValueError, match="im2col out must be a contiguous float32 array"):
        im2col(x, 3, 3, out=fake_gpu.FAKE.empty((18, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="col2im expects cols of shape"):
        col2im(fake_gpu.FAKE.ones((18, 10)), x.shape, 3, 3)


# -- a real GPU: every kernel against its twin ------------------------------------------------

@pytest.fixture
def cupy():
    """CuPy, when this machine has a GPU (these tests compare kernels, which the CPU lacks)."""
    if not backend.gpu_available():
        pytest.skip("no GPU/CuPy on this machine")
    return backend.array_module("gpu")


def _kernel_and_twin(kernel, xp, *args):
    """The kernel's outputs (after its self-check passed, silently) and the twin's."""
    dtype = np.dtype(args[0].dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel._check(xp, dtype), kernel.name
    got = kernel.launch(kernel.compile(xp, dtype), *args)
    want = kernel.twin(*args)
    if not isinstance(got, tuple):
        got, want = (got,), (want,)
    return [to_cpu(g) for g in got], [to_cpu(w) for w in want]


def _close(got, want, dtype):
    rtol = 2e-5 if dtype == np.float32 else 1e-12
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = max(1.0, float(np.abs(w).max()))
        err = float(np.abs(g - w).max()) / scale
        worst = np.unravel_index(np.abs(g - w).argmax(), g.shape)
        assert err <= rtol, f"error {err:.3g} (relative to {scale:.3g}) at {worst} of {g.shape}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", IM2COL_CASES)
def test_im2col_kernel_is_the_loops_bit_for_bit(cupy, case, dtype):
    n, c, h, w, kh, kw, s, p = case
    x = cupy.asarray(np.random.default_rng(0).standard_normal((n, c, h, w)).astype(dtype))
    got, want = _kernel_and_twin(im2col_kernels.IM2COL, cupy, x, kh, kw, s, p, None)
    np.testing.assert_array_equal(got[0], want[0])
    ws = cupy.full(want[0].shape, np.nan, dtype=dtype)          # a reused workspace
    assert im2col(x, kh, kw, s, p, out=ws) is ws
    np.testing.assert_array_equal(to_cpu(ws), want[0])
    xt = cupy.asarray(np.random.default_rng(1).standard_normal((c, n, h, w)).astype(dtype))
    np.testing.assert_array_equal(to_cpu(im2col(xt.transpose(1, 0, 2, 3), kh, kw, s, p)),
                                  to_cpu(im2col_kernels.IM2COL.twin(xt.transpose(1, 0, 2, 3),
                                                                    kh, kw, s, p)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", IM2COL_CASES)
def test_col2im_kernel_is_the_loops_bit_for_bit_and_deterministic(cupy, case, dtype):
    """The gather adds each pixel's columns in the loops' order: the same bits, every run."""
    n, c, h, w, kh, kw, s, p = case
    ho, wo = output_size(h, kh, s, p), output_size(w, kw, s, p)
    cols = cupy.asarray(np.random.default_rng(0).standard_normal((c * kh * kw, n * ho * wo))
                        .astype(dtype))
    got, want = _kernel_and_twin(im2col_kernels.COL2IM, cupy, cols, (n, c, h, w), kh, kw, s, p)
    np.testing.assert_array_equal(got[0], want[0])
    again = to_cpu(col2im(cols, (n, c, h, w), kh, kw, s, p))
    np.testing.assert_array_equal(again, got[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_kernels_match_their_twins(cupy, shape, dtype):
    rng = np.random.default_rng(0)
    x, dout, xhat = (cupy.asarray((rng.standard_normal(shape) + loc).astype(dtype))
                     for loc in (3.0, 0.0, 0.0))
    c, m = shape[1], shape[0] * shape[2] * shape[3]
    vectors = [cupy.asarray(rng.uniform(0.5, 2.0, c).astype(dtype)) for _ in range(4)]
    _close(*_kernel_and_twin(bn_kernels.BN_STATS, cupy, x), dtype)
    _close(*_kernel_and_twin(bn_kernels.BN_NORMALISE, cupy, x, *vectors), dtype)
    _close(*_kernel_and_twin(bn_kernels.BN_GRAD_SUMS, cupy, dout, xhat), dtype)
    _close(*_kernel_and_twin(bn_kernels.BN_GRAD_INPUT, cupy, dout, xhat, *vectors, m), dtype)


@pytest.mark.parametrize("loc", [0.0, 1000.0])
def test_bn_stats_float32_variance_is_centred(cupy, loc):
    """Welford + Chan in float32 when |mean| = 1000·std: within 2e-5 of the float64 variance
    of the same values (Σx² - (Σx)²/M in float32 is off by about 6% here)."""
    x = (np.random.default_rng(0).standard_normal((64, 3, 28, 28)) + loc).astype(np.float32)
    sums, centred = bn_kernels.BN_STATS(cupy.asarray(x))
    x64 = x.astype(np.float64)
    want_sum = x64.sum(axis=(0, 2, 3))
    want_centred = ((x64 - x64.mean(axis=(0, 2, 3), keepdims=True)) ** 2).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(to_cpu(sums), want_sum, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(to_cpu(centred), want_centred, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_with_kernels_match_the_twins(cupy, monkeypatch, dtype):
    """BatchNorm2D and a stride-2 padded Conv2D on the GPU: kernels on against
    MINICOMPACT_KERNELS=off (the array expressions), forward and backward."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 11, 9)).astype(dtype) * 2 + 1
    results = []
    for kernels in ("on", "off"):
        monkeypatch.setenv("MINICOMPACT_KERNELS", kernels)
        conv = Conv2D(3, 5, 3, stride=2, padding=1, dtype=dtype,
                      rng=np.random.default_rng(0)).to("gpu")
        bn = _bn(5, dtype).to("gpu")
        out = bn.forward(conv.forward(cupy.asarray(x)))
        dout = cupy.asarray(np.random.default_rng(4).standard_normal(out.shape).astype(dtype))
        dx = conv.backward(bn.backward(dout))
        results.append([to_cpu(a) for a in (out, dx, conv.grads["W"], bn.grads["gamma"],
                                            bn.grads["beta"], bn.buffers["running_var"])])
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    for on, off in zip(*results):
        np.testing.assert_allclose(on, off, rtol=rtol, atol=rtol)
