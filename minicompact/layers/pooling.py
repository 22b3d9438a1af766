"""Max-pooling (paper sec. 3.1) and spatial pyramid pooling (paper sec. 3.2).

``max_pool_forward`` / ``max_pool_backward`` are the max-pool to read: a loop over the
kh·kw window offsets; on a GPU each is one CUDA kernel (``cuda/pooling.py``) that is checked
against it at first use.  On the CPU ``MaxPool2D`` runs, by default, the faster
separable version of ``minicompact.separable_maxpool`` with the same results (tested against
each other and the loops); on a GPU it runs the kernels.  All of them route each output's
gradient to the single input that won its max.  Ties go to the *first* candidate in row-major
order (top row first, left to right), so on a constant input every window sends its whole
gradient to its top-left real pixel.
"""
import numpy as np

from ..backend import get_array_module, is_gpu_array
from ..cuda import CudaKernel
from ..cuda import pooling as cuda_pool
from ..im2col import output_size
from ..separable_maxpool import separable_max_pool_backward, separable_max_pool_forward
from .base import Layer, check_input, kernel_pair


def max_pool_forward(x, kernel_size, stride, padding):
    """The max over every kh×kw window, as a running max over the kh·kw window offsets.

    Tap (i, j) is one strided slice holding pixel (i, j) of every window at once; the loop
    runs over the kh·kw taps only (9 for 3×3), never over pixels.  A tap replaces the running
    max only where it is *strictly* greater, so on a tie the earlier tap in row-major order
    keeps it: the first-maximum rule.

    x: (N, C, H, W); kernel_size: (kh, kw); stride, padding: ints (padding is -inf, so it
    never wins).  Returns (out, cache): out (N, C, Ho, Wo), x's dtype; cache = (x.shape,
    arg) with arg (N, C, Ho, Wo) (uint8 up to 256 taps) the winning tap t = i·kw + j of every window.
    """
    (kh, kw), s, p = kernel_size, stride, padding
    xp = get_array_module(x)
    n, c, h, w = x.shape
    ho, wo = output_size(h, kh, s, p), output_size(w, kw, s, p)
    xpad = xp.full((n, c, h + 2 * p, w + 2 * p), -np.inf, dtype=x.dtype)
    xpad[:, :, p:p + h, p:p + w] = x
    out = xp.full((n, c, ho, wo), -np.inf, dtype=x.dtype)
    arg = xp.zeros((n, c, ho, wo), dtype=np.min_scalar_type(kh * kw - 1))
    for t, (i, j) in enumerate(np.ndindex(kh, kw)):
        tap = xpad[:, :, i:i + s * ho:s, j:j + s * wo:s]   # pixel (i, j) of every window
        better = tap > out            # strictly: on a tie the earlier tap keeps the max
        xp.copyto(arg, t, where=better)   # arg = t where better (a mask index would sync a GPU)
        xp.maximum(out, tap, out=out)
    return out, (x.shape, arg)


def max_pool_backward(dout, cache, kernel_size, stride, padding):
    """Backward of ``max_pool_forward``: each dout[n, c, y, x] goes to its window's winner.

    dout: (N, C, Ho, Wo); cache: (x.shape, arg) from forward.  Returns dx (N, C, H, W).
    Overlapping windows (stride < kernel) may share a winner: its gradients add up.
    """
    (kh, kw), s, p = kernel_size, stride, padding
    x_shape, arg = cache
    xp = get_array_module(dout)
    n, c, h, w = x_shape
    ho, wo = dout.shape[2:]
    dxpad = xp.zeros((n, c, h + 2 * p, w + 2 * p), dtype=dout.dtype)
    for t, (i, j) in enumerate(np.ndindex(kh, kw)):
        # One tap's slice never repeats a pixel, so this += adds every window's share.
        dxpad[:, :, i:i + s * ho:s, j:j + s * wo:s] += dout * (arg == t)
    return xp.ascontiguousarray(dxpad[:, :, p:p + h, p:p + w])


def spatial_pyramid_pool_forward(x, regions):
    """The max of every map over each of R regions, and where it is (paper sec. 3.2).

    A Python loop over the regions (R is small), each a max over the whole batch and all
    channels.  x: (N, K, H, W); regions: R tuples (y0, y1, x0, x1), rows y0..y1-1 and columns
    x0..x1-1 (they may overlap).  Returns (out, arg): out (N, K, R), x's dtype; arg (N, K, R)
    int32, the flat row-major index of the first maximum within its region.
    """
    xp = get_array_module(x)
    n, c = x.shape[:2]
    out = xp.empty((n, c, len(regions)), dtype=x.dtype)
    arg = xp.empty((n, c, len(regions)), dtype=np.int32)
    for r, (y0, y1, x0, x1) in enumerate(regions):
        flat = x[:, :, y0:y1, x0:x1].reshape(n, c, -1)   # (N, K, region pixels)
        a = flat.argmax(axis=2)                          # first max in row-major order
        out[:, :, r] = xp.take_along_axis(flat, a[:, :, None], axis=2)[:, :, 0]
        arg[:, :, r] = a
    return out, arg


def spatial_pyramid_pool_backward(dout, arg, x_shape, regions):
    """Backward of ``spatial_pyramid_pool_forward``: dout[n, k, r] goes to region r's winner.

    dout: (N, K, R); arg: (N, K, R) from forward; x_shape: (N, K, H, W).  Returns dx, x_shape,
    dout's dtype.  A pixel in several regions (the levels nest; bins may overlap) adds them up.
    """
    xp = get_array_module(dout)
    n, c = x_shape[:2]
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    for r, (y0, y1, x0, x1) in enumerate(regions):
        size = (y1 - y0) * (x1 - x0)
        won = xp.arange(size) == arg[:, :, r, None]      # (N, K, size) one-hot
        dx[:, :, y0:y1, x0:x1] += (won * dout[:, :, r:r + 1]).reshape(n, c, y1 - y0, x1 - x0)
    return dx


# ------------------------------------------------------------ the CUDA kernels beside them
# Each function above as one kernel launch on a GPU (cuda/pooling.py), checked against it
# at first use; NumPy (and a kernel that fails its check) runs the function.
def _max_pool_forward_twin(x, kernel_size, stride, padding):
    out, (_, arg) = max_pool_forward(x, kernel_size, stride, padding)
    return out, arg


def _max_pool_backward_twin(dout, arg, x_shape, kernel_size, stride, padding):
    return max_pool_backward(dout, (x_shape, arg), kernel_size, stride, padding)


# Self-check inputs: small integers, so most windows and regions hold tied maxima; odd sizes,
# stride 2, overlapping windows and regions: the cases a wrong index or tie rule would miss.
def _max_pool_sample(xp, dtype):
    x = np.random.default_rng(0).integers(0, 4, (2, 3, 7, 6))
    return xp.asarray(x, dtype=dtype), (3, 3), 2, 1


def _max_pool_backward_sample(xp, dtype):
    x, kernel_size, stride, padding = _max_pool_sample(xp, dtype)
    out, arg = _max_pool_forward_twin(x, kernel_size, stride, padding)
    dout = xp.asarray(np.random.default_rng(1).standard_normal(out.shape), dtype=dtype)
    return dout, arg, x.shape, kernel_size, stride, padding


SAMPLE_REGIONS = ((0, 5, 0, 7), (0, 3, 0, 4), (0, 3, 3, 7), (2, 5, 0, 4), (2, 5, 3, 7), (4, 5, 6, 7))


def _spp_sample(xp, dtype):
    x = np.random.default_rng(0).integers(0, 4, (2, 3, 5, 7))
    return xp.asarray(x, dtype=dtype), SAMPLE_REGIONS


def _spp_backward_sample(xp, dtype):
    x, regions = _spp_sample(xp, dtype)
    out, arg = spatial_pyramid_pool_forward(x, regions)
    dout = xp.asarray(np.random.default_rng(1).standard_normal(out.shape), dtype=dtype)
    return dout, arg, x.shape, regions


MAX_POOL_FORWARD = CudaKernel("max_pool_forward", cuda_pool.MAX_POOL_FORWARD_SOURCE, ["max_pool_forward"],
                              cuda_pool.launch_max_pool_forward, _max_pool_forward_twin, _max_pool_sample)
MAX_POOL_BACKWARD = CudaKernel("max_pool_backward", cuda_pool.MAX_POOL_BACKWARD_SOURCE, ["max_pool_backward"],
                               cuda_pool.launch_max_pool_backward, _max_pool_backward_twin, _max_pool_backward_sample)
SPP_FORWARD = CudaKernel("spatial_pyramid_pool_forward", cuda_pool.SPP_FORWARD_SOURCE, ["spatial_pyramid_pool_forward"],
                         cuda_pool.launch_spp_forward, spatial_pyramid_pool_forward, _spp_sample)
SPP_BACKWARD = CudaKernel("spatial_pyramid_pool_backward", cuda_pool.SPP_BACKWARD_SOURCE, ["spatial_pyramid_pool_backward"],
                          cuda_pool.launch_spp_backward, spatial_pyramid_pool_backward, _spp_backward_sample)

MAX_TAPS = 256   # the kernels keep the winning tap in a uint8


def max_pool_forward_cuda(x, kernel_size, stride, padding):
    """``max_pool_forward`` in one launch on a GPU: the same arguments, out and cache.

    The twin runs instead on NumPy, with ``MINICOMPACT_KERNELS=off``, after a failed
    self-check, and for windows of more than 256 taps (whose index needs a uint16).
    """
    kernel_size, stride, padding = (int(kernel_size[0]), int(kernel_size[1])), int(stride), int(padding)
    if kernel_size[0] * kernel_size[1] > MAX_TAPS:
        return max_pool_forward(x, kernel_size, stride, padding)
    out, arg = MAX_POOL_FORWARD(x, kernel_size, stride, padding)
    return out, (x.shape, arg)


def max_pool_backward_cuda(dout, cache, kernel_size, stride, padding):
    """``max_pool_backward`` in one launch on a GPU; ``cache`` from either forward."""
    x_shape, arg = cache
    kernel_size, stride, padding = (int(kernel_size[0]), int(kernel_size[1])), int(stride), int(padding)
    if arg.dtype != np.uint8:
        return max_pool_backward(dout, cache, kernel_size, stride, padding)
    return MAX_POOL_BACKWARD(dout, arg, tuple(x_shape), kernel_size, stride, padding)


def spatial_pyramid_pool_forward_cuda(x, regions):
    """``spatial_pyramid_pool_forward`` in one launch on a GPU, all R regions at once."""
    return SPP_FORWARD(x, tuple(tuple(int(v) for v in region) for region in regions))


def spatial_pyramid_pool_backward_cuda(dout, arg, x_shape, regions):
    """``spatial_pyramid_pool_backward`` in one launch on a GPU; ``arg`` from either forward."""
    return SPP_BACKWARD(dout, arg, tuple(x_shape), tuple(tuple(int(v) for v in region) for region in regions))


# name -> (forward, backward) on the CPU: the readable version and the fast one beside it.
MAX_POOL_IMPLS = {"simple": (max_pool_forward, max_pool_backward),
                  "separable": (separable_max_pool_forward, separable_max_pool_backward)}


def max_pool_backward_for(cache, dout):
    """The backward that reads ``cache``: the separable one's (x.shape, col_arg, row_arg), or
    the readable one's (x.shape, arg), which the CUDA kernel also writes — on a GPU array the
    kernel, else the readable version."""
    if len(cache) == 3:
        return separable_max_pool_backward
    return max_pool_backward_cuda if is_gpu_array(dout) else max_pool_backward


class MaxPool2D(Layer):
    """Max over kh×kw windows: 3×3, stride 1 keeps the size, stride 2 halves it (sec. 3.1).

    kernel_size: int or (kh, kw); stride: int; padding: int < kernel size.  Padding is -inf,
    so it never wins.  Ties go to the first maximum in row-major window order.

    What runs.  The short version to read is ``max_pool_forward`` / ``max_pool_backward`` at
    the top of this module.  impl, on the CPU: "separable" (default: the same results in fewer
    passes, ``minicompact.separable_maxpool``) or "simple" (that short pair).  On a GPU either
    runs ``max_pool_forward_cuda``: one kernel launch each way, whose twin (after a failed
    self-check, or with ``MINICOMPACT_KERNELS=off``) is the short pair.  The tests hold the
    separable path and the kernels against the short pair.
    """

    def __init__(self, kernel_size=3, stride=1, padding=1, impl="separable"):
        super().__init__()
        self.kernel_size = kernel_pair(kernel_size, "kernel_size")
        if int(stride) != stride or stride < 1 or int(padding) != padding or padding < 0:
            raise ValueError(f"MaxPool2D needs an int stride >= 1 and padding >= 0, got "
                             f"stride={stride!r}, padding={padding!r}")
        if padding >= min(self.kernel_size):
            raise ValueError(f"MaxPool2D padding must be smaller than the kernel "
                             f"{self.kernel_size} so that every window sees a real pixel, "
                             f"got padding={padding}")
        if impl not in MAX_POOL_IMPLS:
            raise ValueError(f"impl must be one of {sorted(MAX_POOL_IMPLS)}, got {impl!r}")
        self.stride, self.padding, self.impl = int(stride), int(padding), impl

    def _out_hw(self, h, w):
        (kh, kw), s, p = self.kernel_size, self.stride, self.padding
        return output_size(h, kh, s, p), output_size(w, kw, s, p)

    def forward(self, x):
        """x: (N, C, H, W), floating → (N, C, Ho, Wo), same dtype."""
        (kh, kw), p = self.kernel_size, self.padding
        check_input(self, x, 4, min_hw=(max(1, kh - 2 * p), max(1, kw - 2 * p)))
        forward = max_pool_forward_cuda if is_gpu_array(x) else MAX_POOL_IMPLS[self.impl][0]
        out, self.cache = forward(x, self.kernel_size, self.stride, self.padding)
        return out

    def backward(self, dout):
        """dout: (N, C, Ho, Wo) → dx (N, C, H, W): each dout goes to its window's first max."""
        if self.cache is None:
            raise RuntimeError("MaxPool2D.backward needs a forward first")
        n, c, h, w = self.cache[0]
        ho, wo = self._out_hw(h, w)
        if tuple(dout.shape) != (n, c, ho, wo):
            raise ValueError(f"MaxPool2D.backward expects dout of shape {(n, c, ho, wo)}, "
                             f"got {tuple(dout.shape)}")
        backward = max_pool_backward_for(self.cache, dout)   # whichever forward wrote the cache
        return backward(dout, self.cache, self.kernel_size, self.stride, self.padding)

    def __repr__(self):
        return (f"MaxPool2D(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, impl={self.impl!r})")


def pyramid_bins(size, n):
    """The n bins of one pyramid level along an axis of length ``size`` (size >= n).

    Bin i covers [floor(i·size/n), ceil((i+1)·size/n)): together they cover the axis; when n
    does not divide size, neighbours overlap by one pixel.  Returns a list of (start, stop).
    """
    return [((i * size) // n, -((-(i + 1) * size) // n)) for i in range(n)]


class SpatialPyramidPool(Layer):
    """Max over the R regions of a spatial pyramid (Lazebnik et al. 2006; paper sec. 3.2).

    levels: grid sizes n, level n cutting the map into n×n regions (see ``pyramid_bins``);
    (1, 2, 4) gives R = 1 + 4 + 16 = 21.  Region order: level by level as given, each level's
    regions row-major (top-left first).

    What runs: on the CPU the short pair ``spatial_pyramid_pool_forward`` /
    ``spatial_pyramid_pool_backward`` above (a loop over the R regions); on a GPU one kernel
    launch each way for all regions (``spatial_pyramid_pool_forward_cuda``), checked against
    that pair.  Memory kept for backward: one int32 argmax index per (n, c, region).
    """

    def __init__(self, levels=(1, 2, 4)):
        super().__init__()
        levels = tuple(levels)
        if not levels or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in levels):
            raise ValueError(f"SpatialPyramidPool levels must be positive ints, got {levels!r}")
        self.levels = tuple(int(n) for n in levels)

    @property
    def num_regions(self):
        """R = Σ n² over the levels."""
        return sum(n * n for n in self.levels)

    def regions(self, h, w):
        """The R regions of an h×w map, in output order: a list of (y0, y1, x0, x1)."""
        return [(y0, y1, x0, x1) for n in self.levels
                for (y0, y1) in pyramid_bins(h, n) for (x0, x1) in pyramid_bins(w, n)]

    def forward(self, x):
        """x: (N, K, H, W), H and W >= max(levels) → (N, K, R), same dtype."""
        finest = max(self.levels)
        check_input(self, x, 4, min_hw=(finest, finest))
        regions = self.regions(*x.shape[2:])
        forward = spatial_pyramid_pool_forward_cuda if is_gpu_array(x) else spatial_pyramid_pool_forward
        out, arg = forward(x, regions)
        self.cache = (x.shape, regions, arg)
        return out

    def backward(self, dout):
        """dout: (N, K, R) → dx (N, K, H, W); overlapping regions add up."""
        if self.cache is None:
            raise RuntimeError("SpatialPyramidPool.backward needs a forward first")
        x_shape, regions, arg = self.cache
        n, c = x_shape[:2]
        if tuple(dout.shape) != (n, c, len(regions)):
            raise ValueError(f"SpatialPyramidPool.backward expects dout of shape "
                             f"{(n, c, len(regions))}, got {tuple(dout.shape)}")
        backward = spatial_pyramid_pool_backward_cuda if is_gpu_array(dout) else spatial_pyramid_pool_backward
        return backward(dout, arg, x_shape, regions)

    def __repr__(self):
        return f"SpatialPyramidPool(levels={self.levels})"
