"""Max-pooling (paper sec. 3.1) and spatial pyramid pooling (paper sec. 3.2).

``max_pool_forward`` / ``max_pool_backward`` are the max-pool to read: a loop over the
kh·kw window offsets.  They live in ``minicompact.cuda.pooling``, right beside the CUDA
kernels that compute the same on a GPU (kernels sit below the layers, so their reference
does too), and are imported here.  On the CPU ``MaxPool2D`` runs, by default, the faster
separable version of ``minicompact.separable_maxpool`` with the same results (tested against
each other and the loops); on a GPU it runs the kernels.  All of them route each output's
gradient to the single input that won its max.  Ties go to the *first* candidate in row-major
order (top row first, left to right), so on a constant input every window sends its whole
gradient to its top-left real pixel.
"""
import numpy as np

from ..backend import is_gpu_array
from ..cuda.pooling import (max_pool_backward, max_pool_backward_cuda, max_pool_forward,
                            max_pool_forward_cuda, spatial_pyramid_pool_backward,
                            spatial_pyramid_pool_backward_cuda, spatial_pyramid_pool_forward,
                            spatial_pyramid_pool_forward_cuda)
from ..im2col import output_size
from ..separable_maxpool import separable_max_pool_backward, separable_max_pool_forward
from .base import Layer, check_input, kernel_pair


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
    impl, on the CPU: "separable" (default: the same results in fewer passes,
    ``minicompact.separable_maxpool``) or "simple" (``max_pool_forward`` / ``max_pool_backward``,
    the version to read).  On a GPU either runs ``max_pool_forward_cuda``: one kernel launch
    each way, whose twin (after a failed self-check, or with ``MINICOMPACT_KERNELS=off``) is
    the simple version.
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
    regions row-major (top-left first).  The max is ``spatial_pyramid_pool_forward``, a loop
    over the R regions, on the CPU, and one kernel launch for all regions on a GPU.  Memory
    kept for backward: one int32 argmax index per (n, c, region).
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
