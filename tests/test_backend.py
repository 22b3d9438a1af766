"""The NumPy/CuPy switch: device names, the GPU error, the one-time CPU fallback note, precision."""
import os
import warnings

import numpy as np
import pytest

from minicompact import backend


def test_cpu_is_numpy():
    assert backend.resolve_device("cpu") == "cpu"
    assert backend.array_module("cpu") is np
    x = np.arange(3.0, dtype=np.float32)
    assert backend.get_array_module(x) is np
    assert backend.to_cpu(x) is x  # no copy
    assert backend.to_device(x, "cpu") is x
    assert backend.device_of(x) == "cpu" and not backend.is_gpu_array(x)


def test_unknown_device_is_a_value_error():
    with pytest.raises(ValueError, match="device must be one of"):
        backend.resolve_device("tpu")


@pytest.mark.skipif(backend.gpu_available(), reason="this machine has a GPU")
def test_gpu_without_cupy_or_device_is_one_clear_error():
    with pytest.raises(backend.BackendError) as exc:
        backend.resolve_device("gpu")
    message = str(exc.value)
    assert "\n" not in message and "cupy" in message.lower() and "--device cpu" in message


@pytest.mark.skipif(backend.gpu_available(), reason="this machine has a GPU")
def test_auto_falls_back_to_cpu_and_says_so_once(monkeypatch):
    monkeypatch.setattr(backend, "_auto_fallback_reported", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend.resolve_device("auto") == "cpu"
        assert backend.resolve_device("auto") == "cpu"
    assert len(caught) == 1 and "using the CPU" in str(caught[0].message)


def test_round_trip_through_the_device(device):
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    on = backend.to_device(x, device)
    assert backend.device_of(on) == device
    back = backend.to_cpu(on)
    assert isinstance(back, np.ndarray) and back.dtype == np.float32
    np.testing.assert_array_equal(back, x)


def test_set_precision_switches_and_validates(monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "0")
    previous = backend.set_precision("tf32")
    try:
        assert backend.get_precision() == "tf32" and os.environ["CUPY_TF32"] == "1"
        with pytest.raises(ValueError, match="precision must be one of"):
            backend.set_precision("fp16")
    finally:
        backend.set_precision(previous)
    assert backend.get_precision() == previous
