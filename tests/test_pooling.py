"""MaxPool2D and SpatialPyramidPool: references, gradients, the tie rule, bins, errors."""
import numpy as np
import pytest

from minicompact.backend import to_cpu
from minicompact.gradcheck import GradientCheckError, check_layer
from minicompact.layers.pooling import (MaxPool2D, SpatialPyramidPool, max_pool_backward,
                                        max_pool_forward, pyramid_bins,
                                        spatial_pyramid_pool_backward, spatial_pyramid_pool_forward)
from minicompact.reference import (maxpool2d_backward_reference, maxpool2d_reference,
                                   pyramid_regions_reference, spatial_pyramid_pool_backward_reference,
                                   spatial_pyramid_pool_reference)

# A max is piecewise linear: central differences are exact as long as no step of ±H_STEP
# changes a winner, which distinct values GAP = 10·H_STEP apart guarantee (no ties, no kinks).
H_STEP, GAP = 1e-3, 1e-2


def shuffled_linspace(shape, seed=0):
    """Distinct values GAP apart in random order (Chainer's shuffled_linspace)."""
    size = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(size) - size / 2).reshape(shape) * GAP


@pytest.fixture(params=["separable", "simple"])
def impl(request):
    """Every max-pool test runs on the readable version and on the fast one."""
    return request.param


POOL_CASES = [  # (kernel, stride, padding, input shape)
    (3, 1, 1, (2, 3, 9, 7)),
    (3, 2, 1, (2, 3, 9, 7)),
    (3, 2, 1, (1, 2, 8, 8)),
    (2, 2, 0, (2, 2, 7, 6)),
    (3, 1, 0, (1, 1, 5, 4)),
]


@pytest.mark.parametrize("k, s, p, shape", POOL_CASES)
def test_maxpool_matches_reference(k, s, p, shape, xp, impl):
    x = shuffled_linspace(shape)
    layer = MaxPool2D(k, s, p, impl=impl)
    out = layer.forward(xp.asarray(x))
    np.testing.assert_array_equal(to_cpu(out), maxpool2d_reference(x, k, s, p))
    dout = np.random.default_rng(1).standard_normal(out.shape)
    dx = to_cpu(layer.backward(xp.asarray(dout)))
    np.testing.assert_allclose(dx, maxpool2d_backward_reference(x, dout, k, s, p), atol=1e-14)


@pytest.mark.parametrize("k, s, p, shape", [POOL_CASES[0], POOL_CASES[1], POOL_CASES[3]])
def test_maxpool_gradients(k, s, p, shape, xp, impl):
    check_layer(MaxPool2D(k, s, p, impl=impl), xp.asarray(shuffled_linspace(shape)), tol=1e-7, h=H_STEP)


def test_maxpool_stride_1_keeps_and_stride_2_halves_the_size(impl):
    x = np.zeros((1, 2, 28, 28), np.float32)
    assert MaxPool2D(3, 1, 1, impl=impl).forward(x).shape == (1, 2, 28, 28)
    assert MaxPool2D(3, 2, 1, impl=impl).forward(x).shape == (1, 2, 14, 14)


def test_maxpool_ties_go_to_the_first_offset_in_row_major_order(xp, impl):
    """Constant 3x3 map, 3x3 windows, pad 1: every window's gradient goes to its top-left real pixel."""
    layer = MaxPool2D(3, 1, 1, impl=impl)
    x = xp.full((1, 1, 3, 3), 2.0)
    out = layer.forward(x)
    dx = to_cpu(layer.backward(xp.ones_like(out)))[0, 0]
    np.testing.assert_array_equal(dx, [[4, 2, 0], [2, 1, 0], [0, 0, 0]])
    # the same on a batch, random dout, stride 2: one winner per window
    x = np.full((2, 3, 7, 6), -3.0)   # all negative: padding (-inf) still never wins
    layer = MaxPool2D(3, 2, 1, impl=impl)
    out = layer.forward(xp.asarray(x))
    assert bool((out == -3.0).all())
    dout = np.random.default_rng(2).standard_normal(out.shape)
    dx = to_cpu(layer.backward(xp.asarray(dout)))
    np.testing.assert_allclose(dx, maxpool2d_backward_reference(x, dout, 3, 2, 1), atol=1e-14)
    assert np.isclose(dx.sum(), dout.sum())


def test_maxpool_float32_stays_float32(xp, impl):
    x = shuffled_linspace((2, 3, 8, 7)).astype(np.float32)
    layer = MaxPool2D(3, 2, 1, impl=impl)
    out = layer.forward(xp.asarray(x))
    assert out.dtype == xp.float32
    np.testing.assert_array_equal(to_cpu(out), maxpool2d_reference(x.astype(np.float64), 3, 2, 1))
    assert layer.backward(xp.ones_like(out)).dtype == xp.float32


def test_maxpool_errors(impl):
    layer = MaxPool2D(3, 1, 0, impl=impl)
    with pytest.raises(ValueError, match=r"got shape \(4, 4\)"):
        layer.forward(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="int32"):
        layer.forward(np.zeros((1, 1, 4, 4), np.int32))
    with pytest.raises(ValueError, match=r"H >= 3 and W >= 3, got shape \(1, 1, 2, 4\)"):
        layer.forward(np.zeros((1, 1, 2, 4)))
    with pytest.raises(ValueError, match="padding"):
        MaxPool2D(3, 1, 3, impl=impl)
    layer.forward(np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2\).*\(1, 1, 2, 3\)"):
        layer.backward(np.zeros((1, 1, 2, 3)))


def _maxpool_loops(x, dout, kh, kw, s, p):
    """Loop reference for any (kh, kw) kernel: out and dx, ties to the first max in row-major
    window order (``maxpool2d_reference`` only takes square kernels)."""
    xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
    ho, wo = (xpad.shape[2] - kh) // s + 1, (xpad.shape[3] - kw) // s + 1
    out = np.empty(x.shape[:2] + (ho, wo))
    dpad = np.zeros(xpad.shape)
    for n, c, y, xx in np.ndindex(*out.shape):
        window = xpad[n, c, s * y:s * y + kh, s * xx:s * xx + kw]
        i, j = np.unravel_index(np.argmax(window), window.shape)   # first max
        out[n, c, y, xx] = window[i, j]
        dpad[n, c, s * y + i, s * xx + j] += dout[n, c, y, xx]
    return out, dpad[:, :, p:p + x.shape[2], p:p + x.shape[3]]


@pytest.mark.parametrize("k, s, p, shape", [
    ((3, 3), 3, 1, (1, 2, 8, 7)),   # stride = kernel
    ((2, 2), 3, 1, (1, 2, 7, 8)),   # stride > kernel: some pixels are in no window
    ((2, 3), 2, 1, (2, 1, 6, 9)),   # rectangular kernels
    ((3, 1), 1, 0, (1, 2, 5, 4)),
    ((1, 4), 2, 0, (1, 2, 3, 9)),
    ((3, 3), 2, 1, (1, 1, 1, 1)),   # a 1×1 map: every window is mostly padding
    ((4, 4), 2, 3, (1, 1, 2, 5)),
])
def test_maxpool_other_geometries_match_loops(k, s, p, shape, xp, impl):
    x = shuffled_linspace(shape)
    layer = MaxPool2D(k, s, p, impl=impl)
    out = layer.forward(xp.asarray(x))
    dout = np.random.default_rng(1).standard_normal(out.shape)
    want_out, want_dx = _maxpool_loops(x, dout, k[0], k[1], s, p)
    np.testing.assert_array_equal(to_cpu(out), want_out)
    np.testing.assert_allclose(to_cpu(layer.backward(xp.asarray(dout))), want_dx, atol=1e-14)


@pytest.mark.parametrize("k, s, p", [(3, 1, 1), (3, 2, 1), (2, 2, 0), (3, 3, 1)])
def test_maxpool_many_ties_match_reference(k, s, p, xp, impl):
    """Values in {-inf, 0, 1, 2}: most windows hold tied maxima, in different rows and
    columns, some are all -inf (then the first pixel wins, even if it is padding)."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, 3, (3, 2, 9, 8)).astype(float)
    x[rng.random(x.shape) < 0.1] = -np.inf
    x[0, 0, :3, :3] = -np.inf
    layer = MaxPool2D(k, s, p, impl=impl)
    out = layer.forward(xp.asarray(x))
    np.testing.assert_array_equal(to_cpu(out), maxpool2d_reference(x, k, s, p))
    dout = rng.standard_normal(out.shape)
    dx = to_cpu(layer.backward(xp.asarray(dout)))
    np.testing.assert_allclose(dx, maxpool2d_backward_reference(x, dout, k, s, p), atol=1e-14)


def test_maxpool_non_contiguous_arrays(xp, impl):
    x = shuffled_linspace((2, 3, 7, 9))
    dout = np.random.default_rng(5).standard_normal((2, 3, 4, 5))
    want = MaxPool2D(3, 2, 1, impl=impl)
    want_out = to_cpu(want.forward(xp.asarray(x)))
    want_dx = to_cpu(want.backward(xp.asarray(dout)))
    layer = MaxPool2D(3, 2, 1, impl=impl)
    xt = xp.asarray(np.ascontiguousarray(x.transpose(3, 2, 1, 0))).transpose(3, 2, 1, 0)
    dt = xp.asarray(np.asfortranarray(dout))
    np.testing.assert_array_equal(to_cpu(layer.forward(xt)), want_out)
    dx = layer.backward(dt)
    assert dx.flags.c_contiguous
    np.testing.assert_allclose(to_cpu(dx), want_dx, atol=1e-14)


@pytest.mark.parametrize("k, s, p, shape", POOL_CASES + [((2, 3), 2, 1, (2, 1, 6, 9)),
                                                    ((4, 4), 2, 3, (1, 1, 2, 5))])
@pytest.mark.parametrize("ties", [False, True])
def test_default_maxpool_matches_the_short_pair(k, s, p, shape, ties, xp):
    """What runs by default (separable on the CPU, the kernels on a GPU) against
    ``max_pool_forward`` / ``max_pool_backward``, with distinct values and with many ties."""
    x = (np.random.default_rng(6).integers(0, 3, shape).astype(float) if ties
         else shuffled_linspace(shape))
    kernel = (k, k) if isinstance(k, int) else k
    layer = MaxPool2D(k, s, p)
    assert layer.impl == "separable"
    out = layer.forward(xp.asarray(x))
    want, cache = max_pool_forward(xp.asarray(x), kernel, s, p)
    np.testing.assert_array_equal(to_cpu(out), to_cpu(want))
    dout = xp.asarray(np.random.default_rng(7).standard_normal(out.shape))
    np.testing.assert_allclose(to_cpu(layer.backward(dout)),
                               to_cpu(max_pool_backward(dout, cache, kernel, s, p)), rtol=0, atol=1e-14)


class _DoubledMaxPool(MaxPool2D):
    def backward(self, dout):
        return 2 * super().backward(dout)


def test_maxpool_gradient_check_can_fail(impl):
    with pytest.raises(GradientCheckError):
        check_layer(_DoubledMaxPool(3, 2, 1, impl=impl), shuffled_linspace((1, 2, 6, 5)), h=H_STEP)


# ---- spatial pyramid pooling -------------------------------------------------------------

def test_num_regions():
    assert SpatialPyramidPool().num_regions == 21
    assert SpatialPyramidPool((1, 2)).num_regions == 5
    assert SpatialPyramidPool((3,)).num_regions == 9


def test_pyramid_bins_cover_the_map():
    assert pyramid_bins(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert pyramid_bins(7, 4) == [(0, 2), (1, 4), (3, 6), (5, 7)]   # overlaps of one pixel
    for n in range(1, 7):
        for size in range(n, 30):
            bins = pyramid_bins(size, n)
            covered = set().union(*(range(a, b) for a, b in bins))
            assert covered == set(range(size))
            assert all(b > a for a, b in bins)
            assert all(0 <= bins[i][1] - bins[i + 1][0] <= 1 for i in range(n - 1))
    layer = SpatialPyramidPool((1, 2, 4))
    for h, w in [(4, 4), (7, 7), (9, 5), (13, 8)]:
        assert layer.regions(h, w) == pyramid_regions_reference(h, w, (1, 2, 4))


def test_spp_region_order():
    """Level 1, then level 2's quadrants row-major, then level 4's cells row-major."""
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    out = SpatialPyramidPool((1, 2, 4)).forward(x)[0, 0]
    np.testing.assert_array_equal(out, [15, 5, 7, 13, 15] + list(range(16)))


SPP_CASES = [((2, 3, 8, 8), (1, 2, 4)), ((2, 3, 7, 7), (1, 2, 4)), ((1, 2, 9, 5), (1, 2, 4)),
             ((2, 2, 4, 4), (1, 2, 4)), ((1, 2, 5, 7), (1, 3))]


@pytest.mark.parametrize("shape, levels", SPP_CASES)
def test_spp_matches_reference(shape, levels, xp):
    x = shuffled_linspace(shape)
    layer = SpatialPyramidPool(levels)
    out = layer.forward(xp.asarray(x))
    assert out.shape == shape[:2] + (layer.num_regions,)
    np.testing.assert_array_equal(to_cpu(out), spatial_pyramid_pool_reference(x, levels))
    dout = np.random.default_rng(1).standard_normal(out.shape)
    dx = to_cpu(layer.backward(xp.asarray(dout)))
    np.testing.assert_allclose(dx, spatial_pyramid_pool_backward_reference(x, dout, levels), atol=1e-14)


@pytest.mark.parametrize("shape, levels", SPP_CASES)
def test_spp_layer_matches_the_short_pair(shape, levels, xp):
    """The layer (the pair itself on the CPU, one kernel a way on a GPU) against
    ``spatial_pyramid_pool_forward`` / ``spatial_pyramid_pool_backward`` on its regions."""
    x = xp.asarray(shuffled_linspace(shape))
    layer = SpatialPyramidPool(levels)
    regions = layer.regions(*shape[2:])
    out = layer.forward(x)
    want, arg = spatial_pyramid_pool_forward(x, regions)
    np.testing.assert_array_equal(to_cpu(out), to_cpu(want))
    dout = xp.asarray(np.random.default_rng(8).standard_normal(out.shape))
    np.testing.assert_allclose(to_cpu(layer.backward(dout)),
                               to_cpu(spatial_pyramid_pool_backward(dout, arg, shape, regions)),
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 2, 7, 9)])   # divisible, non-divisible
def test_spp_gradients(shape, xp):
    check_layer(SpatialPyramidPool(), xp.asarray(shuffled_linspace(shape)), tol=1e-7, h=H_STEP)


def test_spp_ties_and_overlaps(xp):
    """Constant input: each region's gradient goes to its top-left pixel; overlaps add up."""
    x = np.ones((1, 1, 5, 5))
    layer = SpatialPyramidPool((1, 2))
    out = layer.forward(xp.asarray(x))
    dx = to_cpu(layer.backward(xp.ones_like(out)))[0, 0]
    want = np.zeros((5, 5))
    want[0, 0] = 2           # the whole map and the top-left quadrant
    want[0, 2] = want[2, 0] = want[2, 2] = 1   # quadrants start at floor(5/2) = 2
    np.testing.assert_array_equal(dx, want)
    dout = np.random.default_rng(3).standard_normal((2, 3, 21))
    x = np.zeros((2, 3, 7, 6))
    layer = SpatialPyramidPool()
    layer.forward(xp.asarray(x))
    dx = to_cpu(layer.backward(xp.asarray(dout)))
    np.testing.assert_allclose(dx, spatial_pyramid_pool_backward_reference(x, dout), atol=1e-14)


def test_spp_float32_and_errors(xp):
    layer = SpatialPyramidPool()
    x = xp.asarray(shuffled_linspace((2, 3, 7, 7)).astype(np.float32))
    out = layer.forward(x)
    assert out.dtype == xp.float32 and layer.backward(out).dtype == xp.float32
    with pytest.raises(ValueError, match=r"H >= 4 and W >= 4, got shape \(2, 3, 3, 8\)"):
        layer.forward(xp.zeros((2, 3, 3, 8), dtype=xp.float32))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 8\)"):
        layer.forward(xp.zeros((2, 3, 8), dtype=xp.float32))
    with pytest.raises(ValueError, match="levels"):
        SpatialPyramidPool((1, 0))
    with pytest.raises(ValueError, match=r"\(2, 3, 21\).*\(2, 3, 20\)"):
        layer.backward(xp.zeros((2, 3, 20), dtype=xp.float32))


class _DoubledSPP(SpatialPyramidPool):
    def backward(self, dout):
        return 2 * super().backward(dout)


def test_spp_gradient_check_can_fail():
    with pytest.raises(GradientCheckError):
        check_layer(_DoubledSPP(), shuffled_linspace((1, 2, 5, 6)), h=H_STEP)
