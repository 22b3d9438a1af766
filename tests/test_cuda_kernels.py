"""The CUDA kernels of minicompact/cuda/: every one compiles with nvcc (on a machine without a
GPU too), and the machinery around them — the twin on the CPU, one launch on a stand-in for
CuPy, the self-check that falls back to the twin — behaves as its module doc says."""
import importlib
import pkgutil
import shutil
import subprocess
import warnings

import numpy as np
import pytest

import minicompact.cuda as cuda
from minicompact.cuda import REGISTRY, CudaKernel, source_for


def _load_all():
    """Import every module that makes kernels, so that REGISTRY holds them all: the package's
    own, and the layers, im2col and the optimizer, which make theirs beside their twins."""
    for info in pkgutil.iter_modules(cuda.__path__):
        importlib.import_module(f"minicompact.cuda.{info.name}")
    for name in ("minicompact.model", "minicompact.optim", "minicompact.objective"):
        importlib.import_module(name)
    return sorted(REGISTRY)


ALL = _load_all()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", [n for n in ALL if not n.startswith("test-")])
def test_every_kernel_compiles_with_nvcc(name, dtype, tmp_path):
    """A syntax or type error must not wait for a GPU: nvcc compiles each kernel's exact
    source (as NVRTC will) for a current architecture, warnings as errors."""
    source = tmp_path / "k.cu"
    source.write_text(source_for(REGISTRY[name].source, dtype))
    proc = subprocess.run(["nvcc", "-c", "--std=c++14", "-arch=sm_80", "-Werror=all-warnings",
                           "-o", str(tmp_path / "k.o"), str(source)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for function in REGISTRY[name].function_names:
        assert f'extern "C" __global__ void {function}(' in " ".join(REGISTRY[name].source.split()), function


# A kernel of the tests' own, to exercise the machinery: y = 2x.
DOUBLE = r'''
extern "C" __global__ void test_double(const T* x, T* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = 2 * x[i];
}
'''


def _launch(functions, x):
    y = x * 0
    functions["test_double"]((cuda.blocks(x.size),), (cuda.THREADS,), (x, y, np.int64(x.size)))
    return y


def _kernel(name, twin=lambda x: 2 * x):
    REGISTRY.pop(name, None)
    return CudaKernel(name, DOUBLE, ["test_double"], _launch, twin, lambda xp, dtype: (xp.ones(5, dtype=dtype),))


def test_on_the_cpu_the_twin_runs():
    k = _kernel("test-cpu")
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(k(x), 2 * x)
    assert k._compiled == {}                          # nothing compiled on the CPU


def test_a_stand_in_for_cupy_counts_the_twin_as_one_launch(monkeypatch):
    """The stand-in's emulate_kernel wraps the twin: the counter sees one kernel, by name."""
    seen = []

    class Emulated:
        def __init__(self, name):
            seen.append(name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = type("FakeCupy", (), {"emulate_kernel": staticmethod(Emulated)})()
    monkeypatch.setattr(cuda, "get_array_module", lambda *a: fake)
    k = _kernel("test-fake")
    np.testing.assert_array_equal(k(np.ones(3, np.float32)), 2 * np.ones(3))
    assert seen == ["test-fake"]


class _BrokenCupy:
    """A CuPy whose compiler always fails (an old driver, a missing NVRTC)."""

    class RawModule:
        def __init__(self, code, options=()):
            raise RuntimeError("nvrtc: error: unsupported architecture\nsecond line")


def test_a_kernel_that_does_not_compile_warns_once_and_the_twin_runs(monkeypatch):
    monkeypatch.setattr(cuda, "get_array_module", lambda *a: _BrokenCupy)
    k = _kernel("test-broken")
    x = np.ones(3, np.float32)
    with pytest.warns(UserWarning, match=r"test-broken \(float32\) failed its self-check \(RuntimeError: "
                                         r"nvrtc: error: unsupported architecture\)"):
        np.testing.assert_array_equal(k(x), 2 * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # once: no second warning
        np.testing.assert_array_equal(k(x), 2 * x)


class _WorkingCupy:
    """A CuPy whose kernels were compiled already (the tests put them in ``_compiled``)."""
    ones = staticmethod(np.ones)


def test_a_kernel_that_disagrees_with_its_twin_is_never_used(monkeypatch):
    """The self-check runs launch and twin on the sample; a wrong kernel (here: a twin that
    says 3x) is caught before any user data goes through it."""
    compiled = {"test_double": object()}
    k = _kernel("test-wrong", twin=lambda x: 3 * x)
    k._compiled[np.dtype(np.float32)] = compiled
    k.launch = lambda functions, x: 2 * x            # what the "GPU" computes
    monkeypatch.setattr(cuda, "get_array_module", lambda *a: _WorkingCupy)
    with pytest.warns(UserWarning, match=r"test-wrong .* \(output 0 differs by 0.333"):
        np.testing.assert_array_equal(k(np.ones(2, np.float32)), 3 * np.ones(2))
    assert k._trusted == {np.dtype(np.float32): False}


def test_a_kernel_that_agrees_is_used(monkeypatch):
    k = _kernel("test-right")
    k._compiled[np.dtype(np.float32)] = {"test_double": None}
    calls = []
    k.launch = lambda functions, x: calls.append(1) or 2 * x
    monkeypatch.setattr(cuda, "get_array_module", lambda *a: _WorkingCupy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(k(np.arange(3, dtype=np.float32)), [0, 2, 4])
    assert len(calls) == 2                            # the self-check's run, then the call's


def test_kernels_off_uses_the_twins(monkeypatch):
    monkeypatch.setenv("MINICOMPACT_KERNELS", "off")
    monkeypatch.setattr(cuda, "get_array_module", lambda *a: _BrokenCupy)
    k = _kernel("test-off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # the kernel is not even compiled
        np.testing.assert_array_equal(k(np.ones(2, np.float32)), [2, 2])


def teardown_module():
    for name in [n for n in REGISTRY if n.startswith("test-")]:
        REGISTRY.pop(name)
