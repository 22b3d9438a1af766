"""Shared fixtures: one parametrised backend instead of a second copy of every test."""
import os

import numpy as np
import pytest


from minicompact import backend


@pytest.fixture(params=["cpu", "gpu"])
def device(request):
    """Each test using this runs on NumPy and, when a GPU is present, on CuPy."""
    if request.param == "gpu" and not backend.gpu_available():
        pytest.skip("no GPU/CuPy on this machine")
    return request.param


@pytest.fixture
def xp(device):
    """The array module (numpy or cupy) of the ``device`` fixture."""
    return backend.array_module(device)


SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "..", "shared", "data")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
