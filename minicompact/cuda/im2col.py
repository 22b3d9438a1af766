"""im2col and col2im as one CUDA kernel each: their source, launches and self-check inputs.

``minicompact/im2col.py`` makes each a ``CudaKernel`` beside its twin, ``im2col_loops`` or
``col2im_loops`` (the column layout is explained there; imports point down: it uses this
module, never the reverse).

The loop versions copy one kernel offset (i, j) of the whole batch per step: kh·kw slice
copies, and for a padded input one more to build the padded copy, each a launch on a GPU.
Here each is one launch, with no padded copy (a tap that falls in the padding reads 0):

* ``im2col``: a thread per column entry.  ``blockIdx.y`` picks the row (c, i, j) of the
  column matrix, the threads of ``blockIdx.x`` run along its columns (n, ho, wo), so
  neighbouring threads write neighbouring entries (coalesced) and read x at ``stride`` apart.
  A pure copy: the same bits as the loops.
* ``col2im``: a *gather*, as Chainer's col2im kernel: a thread per pixel (n, c, y, x) of dx
  adds up the kh·kw or fewer column entries that were copied from it.  No two threads write
  one pixel, so no atomics are needed and every run gives the same bits; the thread adds in
  the loops' (i, j) order from 0, so those are also the loops' bits.  Only the pixels of x
  are computed, not the padding the loops build and then cut away.
"""
import numpy as np

from ..backend import get_array_module
from . import THREADS, blocks

MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y; im2col loops over the rows beyond it

SOURCE = r'''
// cols[(c, i, j), (n, oy, ox)] = xpad[n, c, oy*stride + i, ox*stride + j]: x is (N, C, H, W),
// cols (C*kh*kw, N*Ho*Wo) with ncols = N*Ho*Wo; a tap in the zero padding writes 0.
extern "C" __global__ void im2col(const T* x, T* cols, long long channels, long long h,
                                  long long w, long long kh, long long kw, long long stride,
                                  long long padding, long long ho, long long wo,
                                  long long ncols) {
    const long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;   // column (n, oy, ox)
    if (q >= ncols) return;
    const long long ox = q % wo, oy = (q / wo) % ho, n = q / (wo * ho);
    for (long long r = blockIdx.y; r < channels * kh * kw; r += gridDim.y) {  // row (c, i, j)
        const long long c = r / (kh * kw), i = (r / kw) % kh, j = r % kw;
        const long long y = oy * stride + i - padding, xx = ox * stride + j - padding;
        const bool inside = y >= 0 && y < h && xx >= 0 && xx < w;
        cols[r * ncols + q] = inside ? x[((n * channels + c) * h + y) * w + xx] : (T)0;
    }
}

// dx[n, c, y, x] = the sum of the entries cols[(c, i, j), (n, oy, ox)] with
// oy*stride + i = y + padding and ox*stride + j = x + padding: a thread per pixel of dx
// (N, C, H, W), size = N*C*H*W, adding in (i, j) order.
extern "C" __global__ void col2im(const T* cols, T* dx, long long channels, long long h,
                                  long long w, long long kh, long long kw, long long stride,
                                  long long padding, long long ho, long long wo,
                                  long long ncols, long long size) {
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;   // pixel (n, c, y, x)
    if (p >= size) return;
    const long long xx = p % w, y = (p / w) % h, c = (p / (w * h)) % channels;
    const long long n = p / (w * h * channels);
    T total = 0;
    for (long long i = 0; i < kh; ++i) {
        const long long ty = y + padding - i;           // = oy*stride for a window that covers y
        if (ty < 0 || ty % stride != 0 || ty / stride >= ho) continue;
        const long long row = (c * kh + i) * kw, column = (n * ho + ty / stride) * wo;
        for (long long j = 0; j < kw; ++j) {
            const long long tx = xx + padding - j;
            if (tx < 0 || tx % stride != 0 || tx / stride >= wo) continue;
            total += cols[(row + j) * ncols + column + tx / stride];
        }
    }
    dx[p] = total;
}
'''


def _sizes(x_shape, kh, kw, stride, padding):
    """The kernels' size arguments (as int64) for an input of ``x_shape``."""
    n, c, h, w = x_shape
    # im2col.output_size, written out: this module sits below im2col.py and does not import it
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    return [np.int64(v) for v in (c, h, w, kh, kw, stride, padding, ho, wo, n * ho * wo)]


def launch_im2col(functions, x, kh, kw, stride=1, padding=0, out=None):
    xp = get_array_module(x)
    sizes = _sizes(x.shape, kh, kw, stride, padding)
    rows, ncols = int(sizes[0]) * kh * kw, int(sizes[-1])
    if out is None:
        out = xp.empty((rows, ncols), dtype=x.dtype)
    grid = (blocks(ncols), min(rows, MAX_GRID_Y))
    functions["im2col"](grid, (THREADS,), (xp.ascontiguousarray(x), out, *sizes))
    return out


def launch_col2im(functions, cols, x_shape, kh, kw, stride=1, padding=0):
    xp = get_array_module(cols)
    dx = xp.empty(tuple(x_shape), dtype=cols.dtype)
    functions["col2im"]((blocks(dx.size),), (THREADS,),
                        (xp.ascontiguousarray(cols), dx, *_sizes(x_shape, kh, kw, stride, padding),
                         np.int64(dx.size)))
    return dx


_SAMPLE = ((2, 3, 7, 6), 3, 3, 2, 1)   # odd sizes, stride 2, padding 1


def sample_im2col(xp, dtype):
    x_shape, kh, kw, stride, padding = _SAMPLE
    x = xp.asarray(np.random.default_rng(0).standard_normal(x_shape).astype(dtype))
    return x, kh, kw, stride, padding, None   # out=None: kernel and twin each allocate their own


def sample_col2im(xp, dtype):
    x, kh, kw, stride, padding, _ = sample_im2col(xp, dtype)
    rows = x.shape[1] * kh * kw
    ncols = int(_sizes(x.shape, kh, kw, stride, padding)[-1])
    cols = xp.asarray(np.random.default_rng(1).standard_normal((rows, ncols)).astype(dtype))
    return cols, tuple(x.shape), kh, kw, stride, padding
