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


def _first_max(taps, out=None):
    """Elementwise max over a list of same-shape arrays, and which one reached it first.

    taps: k arrays of one shape S; out: optional buffer of shape S for the max → m (S),
    the taps' dtype, and arg (S) uint8 (wider for k > 256): the smallest t with taps[t] == m.
    """
    xp = get_array_module(taps[0])
    if len(taps) == 1:   # a kernel one pixel wide
        out = xp.empty_like(taps[0]) if out is None else out
        out[...] = taps[0]
        return out, xp.zeros(out.shape, dtype=np.uint8)
    # Strictly greater: on a tie the earlier tap keeps the max (the tie rule).  A bool array
    # is a 0/1 byte array, so tap 1's comparison already is the argmax of taps {0, 1}.
    arg = xp.greater(taps[1], taps[0]).view(np.uint8)
    arg = arg.astype(np.min_scalar_type(len(taps) - 1), copy=False)
    m = xp.maximum(taps[0], taps[1], out=out)
    better = xp.empty(m.shape, dtype=bool)
    code = xp.empty(m.shape, dtype=arg.dtype)
    for t, tap in enumerate(taps[2:], start=2):
        xp.greater(tap, m, out=better)
        xp.maximum(m, tap, out=m)
        # Taps only grow, so "arg = t where better" is arg = max(arg, better·t), which
        # avoids slow masked copies.
        xp.multiply(better, arg.dtype.type(t), out=code)
        xp.maximum(arg, code, out=arg)
    return m, arg


def _route_back(d, arg, dests, fresh):
    """Backward of ``_first_max``: dests[t] += d where arg == t.

    d, arg: (S); dests: k views of shape S into one buffer.  The first ``fresh`` dests are
    disjoint and nothing wrote them yet, so they are assigned instead (one pass less each).
    """
    xp = get_array_module(d)
    won = xp.empty(d.shape, dtype=bool)
    share = xp.empty_like(d)
    for t, dest in enumerate(dests):
        xp.equal(arg, t, out=won)
        if t < fresh:
            xp.multiply(d, won, out=dest)
        else:
            xp.multiply(d, won, out=share)
            dest += share   # one view is injective: no repeated index within a +=


def _phase(size, p, s, a):
    """Phase a of an axis padded by p and split by stride s: padded index s·y + a.

    size: the unpadded length → (y0, y1, i0): phase entries y0:y1 are the input entries
    i0, i0 + s, ... (< size); the entries before y0 and from y1 on are padding.
    """
    y0 = -((a - p) // s)   # ceil((p - a) / s): the first y with s·y + a >= p
    i0 = s * y0 + a - p
    return y0, y0 + len(range(i0, size, s)), i0


class MaxPool2D(Layer):
    """Max over kh×kw windows: 3×3, stride 1 keeps the size, stride 2 halves it (sec. 3.1).

    kernel_size: int or (kh, kw); stride: int; padding: int < kernel size.  Padding is -inf,
    so it never wins.  Separable: a window's max is the max over its kh rows of each row's
    max over kw columns, so forward is a running max over the kw column taps, then over the
    kh row taps of those row maxima (kh + kw - 2 max steps instead of kh·kw - 1).  Each step
    keeps its winning tap (a byte per element) and backward routes dout back through the row
    taps, then the column taps (kh + kw masked additions instead of kh·kw).  Ties go to the
    first tap at each step: the first row whose row max is the window max, then the first
    column in that row, i.e. the first maximum in row-major window order.

    Layout, for NumPy's sake: the padded input is split into s×s phase planes (plane (a, b)
    holds padded pixels (s·y + a, s·x + b)), each flattened.  Column tap j is then plane
    b = j mod s shifted by j // s, and row tap i is phase a = i mod s shifted by (i // s)
    rows: every step is one contiguous slice, not a 4-D strided view that NumPy walks row by
    row at several times the cost.  Windows that run over a row's or an image's end come out
    as junk entries that are never read.  Memory kept for backward: the winning taps, one
    byte each, about (H+2p)(W+2p)/s of them (column step) and /s² (row step) per map.
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

    def _out_hw(self, h, w):
        (kh, kw), s, p = self.kernel_size, self.stride, self.padding
        return output_size(h, kh, s, p), output_size(w, kw, s, p)

    def _geometry(self, h, w):
        """Phase-plane sizes (hq, wq) and the phases: [(a, b, rows, cols)] of ``_phase``."""
        s, p = self.stride, self.padding
        hq, wq = -(-(h + 2 * p) // s), -(-(w + 2 * p) // s)
        phases = [(a, b, _phase(h, p, s, a), _phase(w, p, s, b))
                  for a in range(s) for b in range(s)]
        return hq, wq, phases

    def _taps(self, a, k, shift):
        """The k taps of one pass over a (s, ..., L) phase-split flat array: tap t is phase
        t mod s shifted by (t // s)·shift, each of length L - (k-1)//s · shift."""
        s = self.stride
        n = a.shape[-1] - (k - 1) // s * shift
        return [a[t % s, ..., t // s * shift:t // s * shift + n] for t in range(k)]

    def forward(self, x):
        """x: (N, C, H, W), floating → (N, C, Ho, Wo), same dtype."""
        (kh, kw), p, s = self.kernel_size, self.padding, self.stride
        check_input(self, x, 4, min_hw=(max(1, kh - 2 * p), max(1, kw - 2 * p)))
        xp = get_array_module(x)
        n, c, h, w = x.shape
        ho, wo = self._out_hw(h, w)
        hq, wq, phases = self._geometry(h, w)
        planes = xp.empty((s, s, n, c, hq, wq), dtype=x.dtype)   # the -inf-padded input
        for a, b, (y0, y1, i0), (x0, x1, j0) in phases:
            plane = planes[a, b]
            plane[:, :, y0:y1, x0:x1] = x[:, :, i0::s, j0::s]
            for edge in (np.s_[:, :, :y0], np.s_[:, :, y1:], np.s_[:, :, y0:y1, :x0],
                         np.s_[:, :, y0:y1, x1:]):
                plane[edge] = -np.inf
        # rowmax[a, q]: max over the columns of a window row; win[q]: max over its rows, for
        # the window whose top-left padded pixel is the one at flat position q of plane (0, 0).
        rowmax, col_arg = _first_max(self._taps(planes.reshape(s, s, -1).swapaxes(0, 1), kw, 1))
        win = planes[0, 0]   # (N, C, hq, wq): free again, so reuse it
        row_taps = self._taps(rowmax, kh, wq)
        _, row_arg = _first_max(row_taps, out=win.reshape(-1)[:row_taps[0].shape[0]])
        self.cache = (x.shape, col_arg, row_arg)
        return xp.ascontiguousarray(win[:, :, :ho, :wo])

    def backward(self, dout):
        """dout: (N, C, Ho, Wo) → dx (N, C, H, W): each dout goes to its window's first max."""
        if self.cache is None:
            raise RuntimeError("MaxPool2D.backward needs a forward first")
        x_shape, col_arg, row_arg = self.cache
        n, c, h, w = x_shape
        ho, wo = self._out_hw(h, w)
        if tuple(dout.shape) != (n, c, ho, wo):
            raise ValueError(f"MaxPool2D.backward expects dout of shape {(n, c, ho, wo)}, "
                             f"got {tuple(dout.shape)}")
        xp = get_array_module(dout)
        (kh, kw), s = self.kernel_size, self.stride
        hq, wq, phases = self._geometry(h, w)
        dwin = xp.empty((n, c, hq, wq), dtype=dout.dtype)
        dwin[:, :, :ho, :wo] = dout
        dwin[:, :, ho:] = dwin[:, :, :ho, wo:] = 0   # junk windows get no gradient
        # Taps t < s are the s phases unshifted: they write their whole phase up to the
        # taps' length; what no such tap reaches starts at zero.
        drow = xp.empty(col_arg.shape, dtype=dout.dtype)
        row_taps = self._taps(drow, kh, wq)
        drow[min(s, kh):] = 0
        drow[:, row_taps[0].shape[0]:] = 0
        _route_back(dwin.reshape(-1)[:row_arg.shape[0]], row_arg, row_taps, fresh=s)
        dplanes = xp.empty((s, s, n * c * hq * wq), dtype=dout.dtype)
        col_taps = self._taps(dplanes.swapaxes(0, 1), kw, 1)
        dplanes[:, min(s, kw):] = 0
        dplanes[:, :, col_taps[0].shape[-1]:] = 0
        _route_back(drow, col_arg, col_taps, fresh=s)
        dx = xp.empty(x_shape, dtype=dout.dtype)
        dplanes = dplanes.reshape(s, s, n, c, hq, wq)
        for a, b, (y0, y1, i0), (x0, x1, j0) in phases:
            dx[:, :, i0::s, j0::s] = dplanes[a, b, :, :, y0:y1, x0:x1]
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
