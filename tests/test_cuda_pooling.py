"""The pooling kernels of minicompact/cuda/pooling.py beside their twins.

Without a GPU: the wrappers return their twin's results and caches; every launch passes the
arguments its CUDA signature asks for, in order and of the right types; on the fake GPU the
layers run through the kernels (one launch each way, no sync), give the NumPy path's results
and pass their gradient checks; a cache from either path feeds either backward.  With a GPU
(the ``cupy`` tests, skipped here): every kernel against its twin, bit for bit, on ties, NaN,
-inf, odd sizes, strides, batch 1, float32 and float64.
"""
import contextlib
import ctypes
import re
import shutil
import subprocess
import warnings

import numpy as np
import pytest

import fake_gpu
from minicompact import backend
from minicompact.backend import to_cpu
from minicompact.cuda import THREADS, source_for
from minicompact.cuda import pooling as cuda_pool
from minicompact.layers import pooling as kernels   # the CudaKernels, beside their twins
from minicompact.layers.pooling import (max_pool_backward, max_pool_backward_cuda, max_pool_forward,
                                        max_pool_forward_cuda, spatial_pyramid_pool_backward,
                                        spatial_pyramid_pool_backward_cuda, spatial_pyramid_pool_forward,
                                        spatial_pyramid_pool_forward_cuda)
from minicompact.gradcheck import check_layer
from minicompact.layers.pooling import MaxPool2D, SpatialPyramidPool
from minicompact.reference import spatial_pyramid_pool_backward_reference, spatial_pyramid_pool_reference
from test_pooling import H_STEP, POOL_CASES, SPP_CASES, _maxpool_loops, shuffled_linspace

KERNELS = [kernels.MAX_POOL_FORWARD, kernels.MAX_POOL_BACKWARD, kernels.SPP_FORWARD, kernels.SPP_BACKWARD]

# (kernel (kh, kw), stride, padding, input shape): odd sizes, strides 1 to 3 (3 > a 2×2 kernel
# leaves pixels in no window), rectangular kernels, batch 1, a 1×1 map, padding near the kernel.
GEOMETRIES = [((3, 3), 1, 1, (2, 3, 9, 7)), ((3, 3), 2, 1, (2, 3, 9, 7)), ((3, 3), 2, 1, (1, 2, 8, 8)),
              ((2, 2), 2, 0, (2, 2, 7, 6)), ((3, 3), 3, 1, (1, 2, 8, 7)), ((2, 2), 3, 1, (1, 2, 7, 8)),
              ((2, 3), 2, 1, (2, 1, 6, 9)), ((1, 4), 2, 0, (1, 2, 3, 9)), ((3, 3), 2, 1, (1, 1, 1, 1)),
              ((4, 4), 2, 3, (1, 1, 2, 5)), ((3, 3), 1, 1, (3, 16, 33, 31)), ((3, 3), 2, 1, (4, 32, 57, 56))]


def ties(shape, seed=0):
    """Values in {0, 1, 2, 3}: most windows and regions hold tied maxima."""
    return np.random.default_rng(seed).integers(0, 4, shape).astype(float)


def with_infinities(shape, seed=0):
    """Ties, a tenth of the pixels -inf, and a corner all -inf (windows with no finite value)."""
    x = ties(shape, seed)
    x[np.random.default_rng(seed + 1).random(shape) < 0.1] = -np.inf
    x[0, 0, :3, :3] = -np.inf
    return x


# ---- the wrappers on NumPy: their twin's results and caches ------------------------------

@pytest.mark.parametrize("k, s, p, shape", GEOMETRIES[:10])
def test_max_pool_wrappers_return_their_twins_results_and_cache(k, s, p, shape):
    x = ties(shape)
    out, (x_shape, arg) = max_pool_forward_cuda(x, k, s, p)
    want_out, (want_shape, want_arg) = max_pool_forward(x, k, s, p)
    np.testing.assert_array_equal(out, want_out)
    assert x_shape == want_shape == shape and arg.dtype == want_arg.dtype == np.uint8
    np.testing.assert_array_equal(arg, want_arg)
    dout = np.random.default_rng(1).standard_normal(out.shape)
    dx = max_pool_backward_cuda(dout, (x_shape, arg), k, s, p)
    np.testing.assert_array_equal(dx, max_pool_backward(dout, (x_shape, arg), k, s, p))
    np.testing.assert_allclose(dx, _maxpool_loops(x, dout, k[0], k[1], s, p)[1], atol=1e-14)


@pytest.mark.parametrize("shape, levels", SPP_CASES)
def test_spp_twin_returns_the_max_and_its_flat_index_within_the_region(shape, levels):
    layer = SpatialPyramidPool(levels)
    regions = layer.regions(*shape[2:])
    x = ties(shape)
    out, arg = spatial_pyramid_pool_forward_cuda(x, regions)
    assert out.shape == arg.shape == shape[:2] + (len(regions),) and arg.dtype == np.int32
    np.testing.assert_array_equal(out, spatial_pyramid_pool_reference(x, levels))
    for r, (y0, y1, x0, x1) in enumerate(regions):
        flat = x[:, :, y0:y1, x0:x1].reshape(shape[0], shape[1], -1)
        np.testing.assert_array_equal(arg[:, :, r], flat.argmax(axis=2))   # the first maximum
    dout = np.random.default_rng(1).standard_normal(out.shape)
    dx = spatial_pyramid_pool_backward_cuda(dout, arg, shape, regions)
    np.testing.assert_array_equal(dx, spatial_pyramid_pool_backward(dout, arg, shape, regions))
    np.testing.assert_allclose(dx, spatial_pyramid_pool_backward_reference(x, dout, levels), atol=1e-14)


# ---- the launches: the arguments each CUDA signature asks for -----------------------------

# C parameter type -> what the launch must pass: an array of that dtype, or a NumPy scalar.
C_TYPES = {"const T*": "T", "T*": "T", "unsigned char*": np.uint8, "const unsigned char*": np.uint8,
           "int*": np.int32, "const int*": np.int32, "long long": np.int64, "int": np.int32}


def signature(kernel):
    """[(C type, parameter name)] of the kernel's one ``extern "C"`` function."""
    source = " ".join(kernel.source.split())
    params = re.search(r'extern "C" __global__ void \w+\((.*?)\)', source).group(1)
    pairs = []
    for param in params.split(","):
        ctype, name = param.strip().rsplit("*" if "*" in param else " ", 1)
        pairs.append((ctype.strip() + ("*" if "*" in param else ""), name.strip()))
    return pairs


class Recorder:
    """Stands in for a compiled RawKernel: keeps (grid, block, args) of every launch."""

    def __init__(self):
        self.launches = []

    def __call__(self, grid, block, args):
        self.launches.append((grid, block, args))


def host_bounds(xp, regions, like):
    """``_bounds`` for NumPy arrays (which have no CUDA device)."""
    return np.array(regions, np.int32).reshape(-1, 4)


def record(kernel, args, monkeypatch):
    """Launch ``kernel`` on NumPy ``args`` with a Recorder; return (outputs, grid, block, args)."""
    monkeypatch.setattr(cuda_pool, "_bounds", host_bounds)
    recorder = Recorder()
    outputs = kernel.launch({name: recorder for name in kernel.function_names}, *args)
    [(grid, block, passed)] = recorder.launches
    return outputs, grid, block, passed


def shapes_of(outputs):
    return [(o.shape, o.dtype) for o in (outputs if isinstance(outputs, tuple) else (outputs,))]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_launch_matches_its_cuda_signature(kernel, dtype, monkeypatch):
    """Argument count, order and types as the C function declares them (a long long passed as
    an int, or two arrays swapped, would read garbage on the GPU), contiguous arrays, enough
    threads for every element, and outputs of the twin's shapes and dtypes."""
    args = kernel.sample(np, dtype)
    outputs, grid, block, passed = record(kernel, args, monkeypatch)
    params = signature(kernel)
    assert len(passed) == len(params), (params, passed)
    for (ctype, name), value in zip(params, passed):
        want = C_TYPES[ctype]
        if "*" in ctype:
            assert isinstance(value, np.ndarray) and value.flags.c_contiguous, name
            assert value.dtype == (np.dtype(dtype) if want == "T" else want), (name, value.dtype)
        else:
            assert type(value) is want, (name, type(value))
    total = passed[[name for _, name in params].index("total")]
    assert block == (THREADS,) and grid[0] * THREADS >= total > (grid[0] - 1) * THREADS
    assert shapes_of(outputs) == shapes_of(kernel.twin(*args))
    first = outputs[0] if isinstance(outputs, tuple) else outputs
    assert total == first.size      # one thread per output element (forward) or input pixel (backward)


def test_the_launch_passes_the_geometry_in_the_signatures_order(monkeypatch):
    x = np.zeros((2, 3, 9, 7), np.float32)
    (_, _, _, passed) = record(kernels.MAX_POOL_FORWARD, (x, (2, 3), 2, 1), monkeypatch)
    names = [name for _, name in signature(kernels.MAX_POOL_FORWARD)]
    geometry = {name: int(v) for name, v in zip(names, passed) if not isinstance(v, np.ndarray)}
    assert geometry == {"total": 2 * 3 * 5 * 4, "h": 9, "w": 7, "ho": 5, "wo": 4, "kh": 2, "kw": 3, "s": 2, "p": 1}
    dout = np.zeros((2, 3, 5, 4), np.float32)
    (_, _, _, passed) = record(kernels.MAX_POOL_BACKWARD,
                               (dout, np.zeros(dout.shape, np.uint8), x.shape, (2, 3), 2, 1), monkeypatch)
    names = [name for _, name in signature(kernels.MAX_POOL_BACKWARD)]
    geometry = {name: int(v) for name, v in zip(names, passed) if not isinstance(v, np.ndarray)}
    assert geometry == {"total": 2 * 3 * 9 * 7, "h": 9, "w": 7, "ho": 5, "wo": 4, "kh": 2, "kw": 3, "s": 2, "p": 1}
    regions = SpatialPyramidPool().regions(9, 7)
    (_, _, _, passed) = record(kernels.SPP_FORWARD, (x, tuple(regions)), monkeypatch)
    np.testing.assert_array_equal(passed[1], regions)                       # bounds: (y0, y1, x0, x1) rows
    assert [int(v) for v in passed[4:]] == [2 * 3 * 21, 9, 7, 21]


def test_region_bounds_go_to_the_device_once_per_map_size_and_device():
    class Device:
        def __init__(self, id):
            self.id = id

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Like:
        def __init__(self, id):
            self.device = Device(id)

    cuda_pool._BOUNDS.clear()
    regions = ((0, 2, 0, 3), (1, 2, 2, 3))
    a = cuda_pool._bounds(np, regions, Like(0))
    assert a.dtype == np.int32 and a.tolist() == [[0, 2, 0, 3], [1, 2, 2, 3]]
    assert cuda_pool._bounds(np, regions, Like(0)) is a
    assert cuda_pool._bounds(np, regions, Like(1)) is not a
    cuda_pool._BOUNDS.clear()


# ---- the layers on the fake GPU: through the kernels, the NumPy path's results ------------

@pytest.fixture
def gpu(monkeypatch):
    """The fake GPU of tests/fake_gpu.py, and the names of the kernels launched on it."""
    syncs = fake_gpu.install(monkeypatch)
    launched = []
    monkeypatch.setattr(fake_gpu.FAKE, "emulate_kernel",
                        lambda name: launched.append(name) or contextlib.nullcontext())
    return fake_gpu.FAKE, launched, syncs


@pytest.mark.parametrize("impl", ["separable", "simple"])
@pytest.mark.parametrize("k, s, p, shape", POOL_CASES + GEOMETRIES[4:10])
@pytest.mark.parametrize("values", [shuffled_linspace, with_infinities])
def test_maxpool_on_the_gpu_runs_the_kernels_and_matches_numpy(k, s, p, shape, impl, values, gpu):
    xp, launched, syncs = gpu
    x = values(shape)
    if min(shape[2:]) < 3:
        x = shuffled_linspace(shape)          # too small for a corner of -inf
    cpu = MaxPool2D(k, s, p, impl=impl)
    want_out = cpu.forward(x)
    dout = np.random.default_rng(1).standard_normal(want_out.shape)
    want_dx = cpu.backward(dout)
    layer = MaxPool2D(k, s, p, impl=impl)
    syncs.clear()
    out = layer.forward(xp.asarray(x))
    dx = layer.backward(xp.asarray(dout))
    assert launched == ["max_pool_forward", "max_pool_backward"] and syncs == []
    assert type(out) is type(dx) is fake_gpu.DeviceArray and layer.cache[1].dtype == np.uint8
    np.testing.assert_array_equal(to_cpu(out), want_out)
    if impl == "simple":      # the same sums in the same order
        np.testing.assert_array_equal(to_cpu(dx), want_dx)
    else:                     # the separable backward adds overlapping windows in another order
        np.testing.assert_allclose(to_cpu(dx), want_dx, rtol=1e-15, atol=1e-15)


def device_dout(xp, layer, x):
    """A random upstream gradient on the device (check_layer takes the fake GPU's arrays,
    a NumPy subclass, for NumPy ones)."""
    shape = layer.forward(x).shape
    return xp.asarray(np.random.default_rng(0).standard_normal(shape))


@pytest.mark.parametrize("k, s, p, shape", [POOL_CASES[0], POOL_CASES[1], POOL_CASES[3]])
def test_maxpool_gradients_on_the_gpu(k, s, p, shape, gpu):
    xp, launched, _ = gpu
    layer, x = MaxPool2D(k, s, p), xp.asarray(shuffled_linspace(shape))
    check_layer(layer, x, device_dout(xp, layer, x), tol=1e-7, h=H_STEP)
    assert set(launched) == {"max_pool_forward", "max_pool_backward"}


def test_maxpool_float32_on_the_gpu(gpu):
    xp, _, _ = gpu
    x = shuffled_linspace((2, 3, 8, 7)).astype(np.float32)
    layer = MaxPool2D(3, 2, 1)
    out = layer.forward(xp.asarray(x))
    assert out.dtype == np.float32 and layer.backward(xp.ones_like(out)).dtype == np.float32
    np.testing.assert_array_equal(to_cpu(out), MaxPool2D(3, 2, 1).forward(x))


@pytest.mark.parametrize("shape, levels", SPP_CASES)
@pytest.mark.parametrize("values", [shuffled_linspace, ties])
def test_spp_on_the_gpu_runs_the_kernels_and_matches_numpy(shape, levels, values, gpu):
    xp, launched, syncs = gpu
    x = values(shape)
    cpu = SpatialPyramidPool(levels)
    want_out = cpu.forward(x)
    dout = np.random.default_rng(1).standard_normal(want_out.shape)
    want_dx = cpu.backward(dout)
    layer = SpatialPyramidPool(levels)
    syncs.clear()
    out = layer.forward(xp.asarray(x))
    dx = layer.backward(xp.asarray(dout))
    assert launched == ["spatial_pyramid_pool_forward", "spatial_pyramid_pool_backward"] and syncs == []
    np.testing.assert_array_equal(to_cpu(out), want_out)
    np.testing.assert_array_equal(to_cpu(dx), want_dx)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 2, 7, 9)])
def test_spp_gradients_on_the_gpu(shape, gpu):
    xp, launched, _ = gpu
    layer, x = SpatialPyramidPool(), xp.asarray(shuffled_linspace(shape))
    check_layer(layer, x, device_dout(xp, layer, x), tol=1e-7, h=H_STEP)
    assert set(launched) == {"spatial_pyramid_pool_forward", "spatial_pyramid_pool_backward"}


def test_kernels_off_runs_the_twins_on_the_gpu(gpu, monkeypatch):
    xp, launched, _ = gpu
    monkeypatch.setenv("MINICOMPACT_KERNELS", "off")
    x = ties((2, 3, 7, 6))
    for layer, cpu in [(MaxPool2D(3, 2, 1), MaxPool2D(3, 2, 1)), (SpatialPyramidPool(), SpatialPyramidPool())]:
        out = layer.forward(xp.asarray(x))
        np.testing.assert_array_equal(to_cpu(out), cpu.forward(x))
        np.testing.assert_array_equal(to_cpu(layer.backward(xp.ones_like(out))), cpu.backward(np.ones(out.shape)))
    assert launched == []


def test_windows_of_more_than_256_taps_keep_the_twins_uint16_cache(gpu):
    xp, launched, _ = gpu
    x = shuffled_linspace((1, 2, 20, 19))
    layer = MaxPool2D(17, 1, 8)
    out = layer.forward(xp.asarray(x))
    assert layer.cache[1].dtype == np.uint16 and launched == []
    dout = np.random.default_rng(1).standard_normal(out.shape)
    want_out, want_dx = _maxpool_loops(x, dout, 17, 17, 1, 8)
    np.testing.assert_array_equal(to_cpu(out), want_out)
    np.testing.assert_allclose(to_cpu(layer.backward(xp.asarray(dout))), want_dx, atol=1e-14)


# ---- caches: whichever path wrote one, a backward reads it -------------------------------

def test_a_maxpool_cache_feeds_either_backward(gpu):
    """The kernel writes the readable version's cache (x.shape, arg); the layer picks its
    backward by the cache's form, so changing impl, or the path, between forward and backward
    changes nothing."""
    xp, _, _ = gpu
    x = ties((2, 3, 9, 7))
    dout = np.random.default_rng(1).standard_normal((2, 3, 5, 4))
    want = MaxPool2D(3, 2, 1, impl="simple")
    want.forward(x)
    want_dx = want.backward(dout)
    out, cache = max_pool_forward(xp.asarray(x), (3, 3), 2, 1)        # the twin's cache ...
    np.testing.assert_array_equal(to_cpu(max_pool_backward_cuda(xp.asarray(dout), cache, (3, 3), 2, 1)), want_dx)
    out, cache = max_pool_forward_cuda(xp.asarray(x), (3, 3), 2, 1)   # ... and the kernel's
    np.testing.assert_array_equal(to_cpu(max_pool_backward(xp.asarray(dout), cache, (3, 3), 2, 1)), want_dx)
    for first, then in [("separable", "simple"), ("simple", "separable")]:   # impl changed midway
        for on in (np, xp):
            layer = MaxPool2D(3, 2, 1, impl=first)
            layer.forward(on.asarray(x))
            layer.impl = then
            np.testing.assert_allclose(to_cpu(layer.backward(on.asarray(dout))), want_dx, atol=1e-14)


def test_an_spp_cache_feeds_either_backward(gpu):
    xp, _, _ = gpu
    x = ties((2, 3, 7, 6))
    regions = SpatialPyramidPool().regions(7, 6)
    dout = np.random.default_rng(1).standard_normal((2, 3, 21))
    want = spatial_pyramid_pool_backward_reference(x, dout)
    _, arg = spatial_pyramid_pool_forward(xp.asarray(x), regions)
    np.testing.assert_allclose(to_cpu(spatial_pyramid_pool_backward_cuda(xp.asarray(dout), arg, x.shape, regions)),
                               want, atol=1e-14)
    _, arg = spatial_pyramid_pool_forward_cuda(xp.asarray(x), regions)
    np.testing.assert_allclose(to_cpu(spatial_pyramid_pool_backward(xp.asarray(dout), arg, x.shape, regions)),
                               want, atol=1e-14)


# ---- every kernel against its twin: on the CPU (g++) and on a GPU -------------------------

# The kernels are plain C: g++ compiles their exact source for the CPU, given the few CUDA
# names they use, and a loop over the grid runs the threads one at a time.  What this cannot
# see (a GPU can): NVRTC's own compile, the card's arithmetic, races between threads (these
# kernels have none: every thread writes its own elements) and speed.
HOST_SHIM = r'''
#include <algorithm>
#include <cstring>
struct Dim3 { unsigned int x; };
static Dim3 blockIdx, blockDim, threadIdx;
#define __global__
using std::min;
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, sizeof f); return f; }
'''


def compile_for_host(kernel, dtype, folder):
    """{function name: callable(grid, block, args)}, the kernel's source compiled by g++."""
    wrappers = []
    for name in kernel.function_names:
        params = signature(kernel)
        wrappers.append(f'extern "C" void host_{name}(unsigned int grid, unsigned int block, '
                        + ", ".join(f"{ctype} {p}" for ctype, p in params) + ") {\n"
                        "    blockDim.x = block;\n"
                        "    for (blockIdx.x = 0; blockIdx.x < grid; ++blockIdx.x)\n"
                        "        for (threadIdx.x = 0; threadIdx.x < block; ++threadIdx.x)\n"
                        f"            {name}(" + ", ".join(p for _, p in params) + ");\n}\n")
    source = folder / "kernel.cpp"
    source.write_text(HOST_SHIM + source_for(kernel.source, dtype) + "\n".join(wrappers))
    proc = subprocess.run(["g++", "-std=c++14", "-O1", "-Wall", "-Werror", "-shared", "-fPIC",
                           "-o", str(folder / "kernel.so"), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    library = ctypes.CDLL(str(folder / "kernel.so"))

    def runner(name):
        params, function = signature(kernel), getattr(library, f"host_{name}")

        def run(grid, block, args):
            assert len(args) == len(params)
            c_args = []
            for (ctype, p), a in zip(params, args):
                if "*" in ctype:   # the type checks of test_each_launch_matches_its_cuda_signature
                    want = np.dtype(dtype) if C_TYPES[ctype] == "T" else np.dtype(C_TYPES[ctype])
                    assert isinstance(a, np.ndarray) and a.dtype == want and a.flags.c_contiguous, p
                    c_args.append(ctypes.c_void_p(a.ctypes.data))
                else:
                    c_args.append(ctypes.c_longlong(int(a)) if ctype == "long long" else ctypes.c_int(int(a)))
            function(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *c_args)
        return run
    return {name: runner(name) for name in kernel.function_names}


@pytest.fixture(scope="module")
def host_build(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    built = {}

    def functions(kernel, dtype):
        key = (kernel.name, np.dtype(dtype))
        if key not in built:
            built[key] = compile_for_host(kernel, dtype, tmp_path_factory.mktemp(kernel.name))
        return built[key]
    return functions


@pytest.fixture(params=["host", "gpu"])
def run(request, monkeypatch):
    """run(kernel, dtype, *args) -> the kernel's own outputs (never its twin's), as NumPy
    arrays, for NumPy args: its CUDA source compiled by g++ ("host"), or by NVRTC on a GPU
    ("gpu", after asserting that the kernel passes its self-check on this card)."""
    if request.param == "host":
        functions = request.getfixturevalue("host_build")
        monkeypatch.setattr(cuda_pool, "_bounds", host_bounds)
        return lambda kernel, dtype, *args: kernel.launch(functions(kernel, dtype), *args)
    if not backend.gpu_available():
        pytest.skip("no GPU/CuPy on this machine")
    cp = backend.array_module("gpu")

    def on_gpu(kernel, dtype, *args):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernel._check(cp, np.dtype(dtype)), kernel.name
        args = tuple(cp.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
        outputs = kernel.launch(kernel.compile(cp, np.dtype(dtype)), *args)
        return tuple(map(to_cpu, outputs)) if isinstance(outputs, tuple) else to_cpu(outputs)
    return on_gpu


DTYPES = [np.float32, np.float64]
VALUES = {"distinct": shuffled_linspace, "ties": ties, "-inf": with_infinities}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values", sorted(VALUES))
@pytest.mark.parametrize("k, s, p, shape", GEOMETRIES)
def test_max_pool_kernels_match_their_twins_bit_for_bit(k, s, p, shape, values, dtype, run):
    """out and arg are copies and indices: equal.  dx too: each pixel adds the same terms in
    the same order as the twin (increasing tap order)."""
    x = (VALUES[values](shape) if min(shape[2:]) >= 3 else shuffled_linspace(shape)).astype(dtype)
    out, arg = run(kernels.MAX_POOL_FORWARD, dtype, x, k, s, p)
    want_out, (_, want_arg) = max_pool_forward(x, k, s, p)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(arg, want_arg)
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    dx = run(kernels.MAX_POOL_BACKWARD, dtype, dout, arg, shape, k, s, p)
    assert dx.dtype == dtype and dx.shape == shape
    np.testing.assert_array_equal(dx, max_pool_backward(dout, (shape, want_arg), k, s, p))


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_kernel_propagates_nan_as_its_twin(dtype, run):
    """A NaN in a window makes its max NaN (xp.maximum) and freezes arg where it stood."""
    x = ties((2, 3, 9, 8)).astype(dtype)
    x[np.random.default_rng(7).random(x.shape) < 0.05] = np.nan
    for k, s, p in [((3, 3), 1, 1), ((3, 3), 2, 1), ((2, 2), 2, 0)]:
        out, arg = run(kernels.MAX_POOL_FORWARD, dtype, x, k, s, p)
        want_out, (_, want_arg) = max_pool_forward(x, k, s, p)
        assert np.isnan(want_out).any()
        np.testing.assert_array_equal(out, want_out)     # NaN where the twin has NaN
        np.testing.assert_array_equal(arg, want_arg)


SPP_GEOMETRIES = SPP_CASES + [((8, 64, 13, 13), (1, 2, 4)), ((1, 5, 6, 11), (1, 2, 3, 6))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values", sorted(VALUES))
@pytest.mark.parametrize("shape, levels", SPP_GEOMETRIES)
def test_spp_kernels_match_their_twins_bit_for_bit(shape, levels, values, dtype, run):
    x = VALUES[values](shape).astype(dtype)
    regions = tuple(SpatialPyramidPool(levels).regions(*shape[2:]))
    out, arg = run(kernels.SPP_FORWARD, dtype, x, regions)
    want_out, want_arg = spatial_pyramid_pool_forward(x, regions)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(arg, want_arg)
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    dx = run(kernels.SPP_BACKWARD, dtype, dout, arg, shape, regions)
    assert dx.dtype == dtype and dx.shape == shape
    np.testing.assert_array_equal(dx, spatial_pyramid_pool_backward(dout, want_arg, shape, regions))


@pytest.mark.parametrize("dtype", DTYPES)
def test_spp_kernel_lets_the_first_nan_win_as_argmax(dtype, run):
    x = ties((2, 3, 7, 9)).astype(dtype)
    x[np.random.default_rng(7).random(x.shape) < 0.05] = np.nan
    regions = tuple(SpatialPyramidPool().regions(7, 9))
    out, arg = run(kernels.SPP_FORWARD, dtype, x, regions)
    want_out, want_arg = spatial_pyramid_pool_forward(x, regions)
    assert np.isnan(want_out).any()
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(arg, want_arg)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_kernel_agrees_with_its_twin_on_its_self_check_sample(kernel, dtype, host_build, monkeypatch):
    """What the self-check will compare on a GPU, compared here with the host build."""
    monkeypatch.setattr(cuda_pool, "_bounds", host_bounds)
    args = kernel.sample(np, dtype)
    got = kernel.launch(host_build(kernel, dtype), *args)
    want = kernel.twin(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        np.testing.assert_array_equal(g, w)


def test_layers_on_the_gpu_use_the_kernels():
    """No kernel fell back to its twin: each passed its self-check on this card."""
    if not backend.gpu_available():
        pytest.skip("no GPU/CuPy on this machine")
    cp = backend.array_module("gpu")
    x = cp.asarray(ties((2, 3, 9, 7)))
    for layer in (MaxPool2D(3, 2, 1), SpatialPyramidPool()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer.backward(cp.ones_like(layer.forward(x)))
    assert all(k._trusted.get(np.dtype(np.float64)) for k in KERNELS)
