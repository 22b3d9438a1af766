"""Batch-norm with the ReLU after it fused (issue 27): ``bn_normalise_relu``,
``bn_grad_sums_relu``, ``bn_grad_input_relu`` (minicompact/cuda/batchnorm.py).

On the CPU, through the fake GPU of ``fake_gpu.py``: a training step of ``CompactNet`` on GPU
arrays runs each BN + ReLU pair as the fused kernels, skips the ReLU layer both ways, and
gives the unfused step's results bit for bit (outputs, every gradient, the running
statistics), and NumPy's scores and running statistics bit for bit (its gradients to float
rounding: the GPU path of the layers below differs from NumPy's in the last bit, fused or
not); the layer list is unchanged, evaluation mode and the CPU run the layers one by one, and a
frozen or sync batch norm still works.  With CuPy and a GPU (skipped otherwise): each fused
kernel against its twin, and the fused model against the unfused twins.
"""
import contextlib
import os
import sys
import warnings

import numpy as np
import pytest

import fake_gpu
import minicompact.model
from minicompact import backend
from minicompact.backend import to_cpu, to_device
from minicompact.distributed.comm import Communicator
from minicompact.distributed.sync_batchnorm import use_sync_batchnorm
from minicompact.layers import batchnorm as bn_kernels
from minicompact.layers.activations import ReLU
from minicompact.layers.batchnorm import BatchNorm2D
from minicompact.model import CompactNet, ModelConfig
from minicompact.transfer import freeze
from test_cuda_batchnorm_im2col import BN_SHAPES, DTYPES, _close, _kernel_and_twin, _record_launches

CONFIG = ModelConfig(depth=4, num_classes=3, widths=(4, 6, 8), stem="small", levels=(1, 2))
BN_NAMES = {"bn_stats", "bn_normalise", "bn_grad_sums", "bn_grad_input", "bn_normalise_relu",
            "bn_grad_sums_relu", "bn_grad_input_relu"}


def _model(dtype, seed=0):
    """A small CompactNet whose first batch norm has a channel with gamma = beta = 0: its
    output is exactly 0 there, where ReLU's mask (x > 0) is False."""
    model = CompactNet(CONFIG, seed=seed, dtype=dtype, input_grad=True)
    rng = np.random.default_rng(seed + 1)
    for bn in model.bns:
        bn.params["gamma"] = rng.uniform(0.5, 2.0, bn.channels).astype(dtype)
        bn.params["beta"] = rng.standard_normal(bn.channels).astype(dtype)
    model.bns[0].params["gamma"][0] = 0
    model.bns[0].params["beta"][0] = 0
    return model


def _batch(dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 3, 12, 12)).astype(dtype)
    dscores = rng.standard_normal((3, CONFIG.num_classes)).astype(dtype)
    return x, dscores


def _step(model, x, dscores, device):
    """forward + backward: (scores, dx, every gradient, every buffer) on the host."""
    scores = model.forward(to_device(x, device))
    dx = model.backward(to_device(dscores, device))
    arrays = [scores, dx] + [g for layer in model.param_layers for g in layer.grads.values()]
    arrays += [b for layer in model.param_layers for b in layer.buffers.values()]
    return [to_cpu(a) for a in arrays]


@contextlib.contextmanager
def _unfused():
    """CompactNet sees no GPU array inside, so runs BN and ReLU one by one (the layers
    themselves still take their GPU paths): the unfused step to compare with."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(minicompact.model, "is_gpu_array", lambda x: False)
        yield


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def _spy_relu(monkeypatch):
    """Counts of ReLU.forward and ReLU.backward calls."""
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        original = getattr(ReLU, name)

        def spy(self, a, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, a)
        monkeypatch.setattr(ReLU, name, spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_model_on_the_fake_gpu_is_the_unfused_model_bit_for_bit(monkeypatch, dtype):
    cpu = _model(dtype)
    fake_gpu.install(monkeypatch)
    gpu, unfused = _model(dtype).to("gpu"), _model(dtype).to("gpu")
    layers_before = list(gpu.layers)
    n_out = 2 + sum(len(layer.grads) for layer in cpu.param_layers)   # scores, dx, grads
    for step in range(2):    # the second step starts from updated running statistics
        x, dscores = _batch(dtype, step)
        want = _step(cpu, x, dscores, "cpu")
        with _unfused():
            want_gpu = _step(unfused, x, dscores, "gpu")
        assert not any(bn.relu_fused for bn in unfused.bns)
        with pytest.MonkeyPatch.context() as mp:
            launches = _record_launches(mp)
            relu_calls = _spy_relu(mp)
            got = _step(gpu, x, dscores, "gpu")
        _same(got, want_gpu)
        assert relu_calls == {"forward": 0, "backward": 0}
        bn_launches = [name for name in launches if name in BN_NAMES]
        depth = len(gpu.bns)
        assert bn_launches == (["bn_stats", "bn_normalise_relu"] * depth
                               + ["bn_grad_sums_relu", "bn_grad_input_relu"] * depth)
        # NumPy: the scores and running statistics to the bit, the gradients to rounding
        _same([got[0]] + got[n_out:], [want[0]] + want[n_out:])
        tol = 1e-5 if dtype == np.float32 else 1e-12
        for g, w in zip(got[1:n_out], want[1:n_out]):
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    assert gpu.layers == layers_before and [type(l) for l in gpu.layers[1:4]] == [
        BatchNorm2D, ReLU, type(gpu.pools[0])]
    assert all(bn.relu_fused for bn in gpu.bns)
    assert all(layer.cache is None for layer in gpu.layers if isinstance(layer, ReLU))


def test_the_cpu_and_evaluation_mode_run_bn_and_relu_one_by_one(monkeypatch):
    model = _model(np.float32)
    x, dscores = _batch(np.float32, 0)
    relu_calls = _spy_relu(monkeypatch)
    model.forward(x)
    model.backward(dscores)
    depth = len(model.bns)
    assert relu_calls == {"forward": depth, "backward": depth}
    assert not any(bn.relu_fused for bn in model.bns)

    want = _model(np.float32).predict(x)
    fake_gpu.install(monkeypatch)
    launches = _record_launches(monkeypatch)
    relu_calls = _spy_relu(monkeypatch)
    gpu = _model(np.float32).to("gpu")
    np.testing.assert_array_equal(to_cpu(gpu.predict(to_device(x, "gpu"))), want)
    assert relu_calls == {"forward": depth, "backward": 0}
    assert not any(name in BN_NAMES for name in launches)   # eval: an affine map, no kernels


def test_a_frozen_batch_norm_is_not_fused_the_others_are(monkeypatch):
    fake_gpu.install(monkeypatch)
    unfused, gpu = _model(np.float64).to("gpu"), _model(np.float64).to("gpu")
    freeze(unfused, 1), freeze(gpu, 1)
    x, dscores = _batch(np.float64, 3)
    with _unfused():
        want = _step(unfused, x, dscores, "gpu")
    relu_calls = _spy_relu(monkeypatch)
    got = _step(gpu, x, dscores, "gpu")
    _same(got, want)
    assert relu_calls == {"forward": 1, "backward": 1}
    assert [bn.relu_fused for bn in gpu.bns] == [False] + [True] * (len(gpu.bns) - 1)


def test_sync_batch_norm_fuses_too(monkeypatch):
    fake_gpu.install(monkeypatch)
    unfused = use_sync_batchnorm(_model(np.float32).to("gpu"), Communicator())
    gpu = use_sync_batchnorm(_model(np.float32).to("gpu"), Communicator())
    x, dscores = _batch(np.float32, 4)
    with _unfused():
        want = _step(unfused, x, dscores, "gpu")
    launches = _record_launches(monkeypatch)
    got = _step(gpu, x, dscores, "gpu")
    _same(got, want)
    assert launches.count("bn_normalise_relu") == len(gpu.bns)
    assert "bn_normalise" not in launches


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 3, 3)])
def test_forward_relu_is_forward_then_relu_and_backward_masks(monkeypatch, shape):
    """The layer alone, float64: forward_relu + backward against BatchNorm2D then ReLU, on the
    fake GPU against NumPy, bit for bit."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape) * 2 + 0.5
    dout = rng.standard_normal(shape)
    cpu_bn, relu = BatchNorm2D(shape[1], dtype=np.float64), ReLU()
    want_out = relu.forward(cpu_bn.forward(x))
    want_dx = cpu_bn.backward(relu.backward(dout))
    fake_gpu.install(monkeypatch)
    bn = BatchNorm2D(shape[1], dtype=np.float64).to("gpu")
    out = bn.forward_relu(to_device(x, "gpu"))
    dx = bn.backward(to_device(dout, "gpu"))
    np.testing.assert_array_equal(to_cpu(out), want_out)
    np.testing.assert_array_equal(to_cpu(dx), want_dx)
    for name in ("gamma", "beta"):
        np.testing.assert_array_equal(to_cpu(bn.grads[name]), cpu_bn.grads[name])
    bn.eval()
    with pytest.raises(RuntimeError, match="training mode only"):
        bn.forward_relu(to_device(x, "gpu"))


def test_the_launch_counter_sees_no_relu_in_a_fused_step():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import gpu_budget
    from timing import NETWORKS
    log = gpu_budget.count_step(dict(NETWORKS["demo"], batch=4), "on")
    assert "relu" not in log.by_layer()
    names = log.by_name("batchnorm")
    assert "bn_normalise" not in names and names["bn_normalise_relu"] == names["bn_stats"]
    assert names["bn_grad_sums_relu"] == names["bn_grad_input_relu"] == names["bn_stats"]


# -- a real GPU: the fused kernels against their twins ----------------------------------------

@pytest.fixture
def cupy():
    if not backend.gpu_available():
        pytest.skip("no GPU/CuPy on this machine")
    return backend.array_module("gpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_fused_kernels_match_their_twins(cupy, shape, dtype):
    rng = np.random.default_rng(0)
    x, dout, xhat, y = (cupy.asarray(rng.standard_normal(shape).astype(dtype)) for _ in range(4))
    relu_out = cupy.maximum(y, 0)
    relu_out[:, 0] = 0      # a whole channel cut: its sums are 0
    c, m = shape[1], shape[0] * shape[2] * shape[3]
    vectors = [cupy.asarray(rng.uniform(0.5, 2.0, c).astype(dtype)) for _ in range(4)]
    vectors[3] -= 1.25      # beta of either sign: some outputs cut
    _close(*_kernel_and_twin(bn_kernels.BN_NORMALISE_RELU, cupy, x, *vectors), dtype)
    _close(*_kernel_and_twin(bn_kernels.BN_GRAD_SUMS_RELU, cupy, dout, xhat, relu_out), dtype)
    _close(*_kernel_and_twin(bn_kernels.BN_GRAD_INPUT_RELU, cupy, dout, xhat, relu_out,
                             *vectors, m), dtype)
    got, _ = _kernel_and_twin(bn_kernels.BN_NORMALISE_RELU, cupy, x, *vectors)
    assert (got[1] >= 0).all()
    mask = to_cpu(relu_out) > 0
    dx, _ = _kernel_and_twin(bn_kernels.BN_GRAD_INPUT_RELU, cupy, dout, xhat, relu_out, *vectors, m)
    unmasked, _ = _kernel_and_twin(bn_kernels.BN_GRAD_INPUT, cupy, dout * cupy.asarray(mask), xhat,
                                   *vectors, m)
    np.testing.assert_array_equal(dx[0], unmasked[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_model_on_the_gpu_matches_the_twins(cupy, monkeypatch, dtype):
    """A training step with the kernels on against MINICOMPACT_KERNELS=off, and the unfused
    NumPy model."""
    x, dscores = _batch(dtype, 0)
    results = []
    for kernels in ("on", "off"):
        monkeypatch.setenv("MINICOMPACT_KERNELS", kernels)
        with warnings.catch_warnings():
            warnings.simplefilter("error")      # no kernel may fail its self-check
            model = _model(dtype).to("gpu")
            results.append(_step(model, x, dscores, "gpu"))
        assert all(bn.relu_fused for bn in model.bns)
    results.append(_step(_model(dtype), x, dscores, "cpu"))
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    for on, off, cpu in zip(*results):
        np.testing.assert_allclose(on, off, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(on, cpu, rtol=rtol, atol=rtol)
