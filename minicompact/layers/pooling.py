"""Max-pooling (paper sec. 3.1) and spatial pyramid pooling (paper sec. 3.2).

Both route each output's gradient to the single input that won its max.  Ties go to the
*first* candidate in row-major order (top row first, left to right), so on a constant input
every window sends its whole gradient to its top-left real pixel.
"""
import numpy as np

from ..backend import get_array_module
from ..im2col import output_size
from .base import Layer, check_input
from .conv import _pair


class MaxPool2D(Layer):
    """Max over kh×kw windows: 3×3, stride 1 keeps the size, stride 2 halves it (sec. 3.1).

    kernel_size: int or (kh, kw); stride: int; padding: int < kernel size.  Padding is -inf,
    so it never wins.  No im2col copy: forward is a running max over the kh·kw shifted,
    strided slices of the padded input, remembering the winning offset o = i·kw + j as a small
    integer per output; backward adds ``dout · (argmax == o)`` onto each shifted slice.
    Memory kept for backward: the offsets, one byte per output element.
    """

    def __init__(self, kernel_size=3, stride=1, padding=1):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        if int(stride) != stride or stride < 1 or int(padding) != padding or padding < 0:
            raise ValueError(f"MaxPool2D needs an int stride >= 1 and padding >= 0, got "
                             f"stride={stride!r}, padding={padding!r}")
        if padding >= min(self.kernel_size):
            raise ValueError(f"MaxPool2D padding must be smaller than the kernel "
                             f"{self.kernel_size} so that every window sees a real pixel, "
                             f"got padding={padding}")
        self.stride, self.padding = int(stride), int(padding)
        self._offset_dtype = np.min_scalar_type(self.kernel_size[0] * self.kernel_size[1] - 1)

    def _windows(self, a):
        """Yield (o, view) over the kernel offsets: view[n, c, y, x] = a[n, c, s·y + i, s·x + j]."""
        kh, kw = self.kernel_size
        s = self.stride
        ho, wo = self._out_hw(a.shape[2] - 2 * self.padding, a.shape[3] - 2 * self.padding)
        for i in range(kh):
            for j in range(kw):
                yield i * kw + j, a[:, :, i:i + s * ho:s, j:j + s * wo:s]

    def _out_hw(self, h, w):
        (kh, kw), s, p = self.kernel_size, self.stride, self.padding
        return output_size(h, kh, s, p), output_size(w, kw, s, p)

    def forward(self, x):
        """x: (N, C, H, W), floating → (N, C, Ho, Wo), same dtype."""
        (kh, kw), p = self.kernel_size, self.padding
        check_input(self, x, 4, min_hw=(max(1, kh - 2 * p), max(1, kw - 2 * p)))
        xp = get_array_module(x)
        n, c, h, w = x.shape
        xpad = x
        if p:
            xpad = xp.full((n, c, h + 2 * p, w + 2 * p), -np.inf, dtype=x.dtype)
            xpad[:, :, p:p + h, p:p + w] = x
        out = argmax = better = code = None
        for o, view in self._windows(xpad):
            if out is None:  # offset 0 starts the running max
                out = view.copy()
                argmax = xp.zeros(out.shape, dtype=self._offset_dtype)
                better = xp.empty(out.shape, dtype=bool)
                code = xp.empty(out.shape, dtype=self._offset_dtype)
                continue
            # Strictly greater: on a tie the earlier offset keeps the max (the tie rule).  Offsets
            # only grow, so "argmax = o where better" is argmax = max(argmax, better·o), which
            # avoids slow masked copies.
            xp.greater(view, out, out=better)
            xp.maximum(out, view, out=out)
            xp.multiply(better, self._offset_dtype.type(o), out=code)
            xp.maximum(argmax, code, out=argmax)
        self.cache = (x.shape, argmax)
        return out

    def backward(self, dout):
        """dout: (N, C, Ho, Wo) → dx (N, C, H, W): each dout goes to its window's argmax."""
        if self.cache is None:
            raise RuntimeError("MaxPool2D.backward needs a forward first")
        x_shape, argmax = self.cache
        if tuple(dout.shape) != tuple(argmax.shape):
            raise ValueError(f"MaxPool2D.backward expects dout of shape {tuple(argmax.shape)}, "
                             f"got {tuple(dout.shape)}")
        xp = get_array_module(dout)
        n, c, h, w = x_shape
        p = self.padding
        dx = xp.zeros((n, c, h + 2 * p, w + 2 * p), dtype=dout.dtype)
        won = xp.empty(dout.shape, dtype=bool)
        share = xp.empty_like(dout)
        for o, view in self._windows(dx):
            xp.equal(argmax, o, out=won)
            xp.multiply(dout, won, out=share)
            view += share  # one slice is injective: no repeated index within a +=
        if p:
            return xp.ascontiguousarray(dx[:, :, p:p + h, p:p + w])
        return dx

    def __repr__(self):
        return (f"MaxPool2D(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding})")


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
    regions row-major (top-left first).  A Python loop over the R regions (R is small), each a
    max over the whole batch and all channels.  Memory kept for backward: one argmax index per
    (n, c, region).
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
        xp = get_array_module(x)
        n, c, h, w = x.shape
        regions = self.regions(h, w)
        out = xp.empty((n, c, len(regions)), dtype=x.dtype)
        argmaxes = []
        for r, (y0, y1, x0, x1) in enumerate(regions):
            flat = x[:, :, y0:y1, x0:x1].reshape(n, c, -1)   # (N, K, region pixels)
            a = flat.argmax(axis=2)                          # first max in row-major order
            out[:, :, r] = xp.take_along_axis(flat, a[:, :, None], axis=2)[:, :, 0]
            argmaxes.append(a)
        self.cache = (x.shape, regions, argmaxes)
        return out

    def backward(self, dout):
        """dout: (N, K, R) → dx (N, K, H, W); overlapping regions add up."""
        if self.cache is None:
            raise RuntimeError("SpatialPyramidPool.backward needs a forward first")
        x_shape, regions, argmaxes = self.cache
        n, c = x_shape[:2]
        if tuple(dout.shape) != (n, c, len(regions)):
            raise ValueError(f"SpatialPyramidPool.backward expects dout of shape "
                             f"{(n, c, len(regions))}, got {tuple(dout.shape)}")
        xp = get_array_module(dout)
        dx = xp.zeros(x_shape, dtype=dout.dtype)
        for r, ((y0, y1, x0, x1), a) in enumerate(zip(regions, argmaxes)):
            size = (y1 - y0) * (x1 - x0)
            won = xp.arange(size) == a[:, :, None]           # (N, K, size) one-hot
            dx[:, :, y0:y1, x0:x1] += (won * dout[:, :, r:r + 1]).reshape(n, c, y1 - y0, x1 - x0)
        return dx

    def __repr__(self):
        return f"SpatialPyramidPool(levels={self.levels})"
