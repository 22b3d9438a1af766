"""The fast max-pool on NumPy: separable, over contiguous phase planes.

Same results as the readable ``layers.pooling.max_pool_forward`` / ``max_pool_backward`` (the
tests hold the two against each other and against the loops of ``minicompact.reference``),
in fewer and cheaper passes:

* **Separable.**  A window's max is the max over its kh rows of each row's max over kw
  columns, so forward is a running max over the kw column taps, then over the kh row taps of
  those row maxima: kh + kw - 2 max steps instead of kh·kw - 1.  Each step keeps its winning
  tap (a byte per element); backward routes dout back through the row taps, then the column
  taps (kh + kw masked additions instead of kh·kw).  Ties go to the first tap at each step:
  the first row whose row max is the window max, then the first column in that row, i.e. the
  first maximum in row-major window order, as in the readable version.
* **Phase planes.**  NumPy walks a 4-D strided view row by row at several times the cost of
  a contiguous slice.  So the -inf-padded input is split into s×s phase planes (plane (a, b)
  holds padded pixels (s·y + a, s·x + b)), each flattened.  Column tap j is then plane
  b = j mod s shifted by j // s, and row tap i is phase a = i mod s shifted by (i // s) rows:
  every step is one contiguous slice.  Windows that run over a row's or an image's end come
  out as junk entries that are never read.

Memory kept for backward: the winning taps, one byte each, about (H+2p)(W+2p)/s of them
(column step) and /s² (row step) per map.
"""
import numpy as np

from .backend import get_array_module
from .im2col import output_size


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


def _geometry(h, w, s, p):
    """Phase-plane sizes (hq, wq) and the phases: [(a, b, rows, cols)] of ``_phase``."""
    hq, wq = -(-(h + 2 * p) // s), -(-(w + 2 * p) // s)
    phases = [(a, b, _phase(h, p, s, a), _phase(w, p, s, b)) for a in range(s) for b in range(s)]
    return hq, wq, phases


def _taps(a, k, s, shift):
    """The k taps of one pass over a (s, ..., L) phase-split flat array: tap t is phase
    t mod s shifted by (t // s)·shift, each of length L - (k-1)//s · shift."""
    n = a.shape[-1] - (k - 1) // s * shift
    return [a[t % s, ..., t // s * shift:t // s * shift + n] for t in range(k)]


def separable_max_pool_forward(x, kernel_size, stride, padding):
    """x: (N, C, H, W) → (out (N, C, Ho, Wo), cache for ``separable_max_pool_backward``).

    kernel_size: (kh, kw); stride, padding: ints (-inf padding, padding < kernel).
    """
    (kh, kw), s, p = kernel_size, stride, padding
    xp = get_array_module(x)
    n, c, h, w = x.shape
    ho, wo = output_size(h, kh, s, p), output_size(w, kw, s, p)
    hq, wq, phases = _geometry(h, w, s, p)
    planes = xp.empty((s, s, n, c, hq, wq), dtype=x.dtype)   # the -inf-padded input
    for a, b, (y0, y1, i0), (x0, x1, j0) in phases:
        plane = planes[a, b]
        plane[:, :, y0:y1, x0:x1] = x[:, :, i0::s, j0::s]
        for edge in (np.s_[:, :, :y0], np.s_[:, :, y1:], np.s_[:, :, y0:y1, :x0],
                     np.s_[:, :, y0:y1, x1:]):
            plane[edge] = -np.inf
    # rowmax[a, q]: max over the columns of a window row; win[q]: max over its rows, for
    # the window whose top-left padded pixel is the one at flat position q of plane (0, 0).
    rowmax, col_arg = _first_max(_taps(planes.reshape(s, s, -1).swapaxes(0, 1), kw, s, 1))
    win = planes[0, 0]   # (N, C, hq, wq): free again, so reuse it
    row_taps = _taps(rowmax, kh, s, wq)
    _, row_arg = _first_max(row_taps, out=win.reshape(-1)[:row_taps[0].shape[0]])
    return xp.ascontiguousarray(win[:, :, :ho, :wo]), (x.shape, col_arg, row_arg)


def separable_max_pool_backward(dout, cache, kernel_size, stride, padding):
    """dout: (N, C, Ho, Wo) → dx (N, C, H, W): each dout goes to its window's first max."""
    x_shape, col_arg, row_arg = cache
    (kh, kw), s, p = kernel_size, stride, padding
    xp = get_array_module(dout)
    n, c, h, w = x_shape
    ho, wo = dout.shape[2:]
    hq, wq, phases = _geometry(h, w, s, p)
    dwin = xp.empty((n, c, hq, wq), dtype=dout.dtype)
    dwin[:, :, :ho, :wo] = dout
    dwin[:, :, ho:] = dwin[:, :, :ho, wo:] = 0   # junk windows get no gradient
    # Taps t < s are the s phases unshifted: they write their whole phase up to the
    # taps' length; what no such tap reaches starts at zero.
    drow = xp.empty(col_arg.shape, dtype=dout.dtype)
    row_taps = _taps(drow, kh, s, wq)
    drow[min(s, kh):] = 0
    drow[:, row_taps[0].shape[0]:] = 0
    _route_back(dwin.reshape(-1)[:row_arg.shape[0]], row_arg, row_taps, fresh=s)
    dplanes = xp.empty((s, s, n * c * hq * wq), dtype=dout.dtype)
    col_taps = _taps(dplanes.swapaxes(0, 1), kw, s, 1)
    dplanes[:, min(s, kw):] = 0
    dplanes[:, :, col_taps[0].shape[-1]:] = 0
    _route_back(drow, col_arg, col_taps, fresh=s)
    dx = xp.empty(x_shape, dtype=dout.dtype)
    dplanes = dplanes.reshape(s, s, n, c, hq, wq)
    for a, b, (y0, y1, i0), (x0, x1, j0) in phases:
        dx[:, :, i0::s, j0::s] = dplanes[a, b, :, :, y0:y1, x0:x1]
    return dx
