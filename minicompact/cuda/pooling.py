"""Max-pooling and the spatial pyramid's region max as CUDA kernels: their source and launches.

``minicompact.layers.pooling`` makes each a ``CudaKernel`` beside the readable function it is
the twin of (``max_pool_forward`` / ``max_pool_backward``, ``spatial_pyramid_pool_forward`` /
``..._backward``); imports point down: the layer uses this module, never the reverse.

A forward kernel runs one thread per output element.  A backward kernel runs one thread per
*input* pixel, which gathers the gradient of every window (region) it won: no two threads
write the same element, so there are no atomics and the result does not depend on scheduling.
Each pixel adds its windows in the order in which the twin adds them, so kernel and twin agree
bit for bit.
"""
import numpy as np

from ..backend import get_array_module
from . import THREADS, blocks


# ---- the kernels' source ----------------------------------------------------------------------
# Arrays are C-contiguous NCHW; e is the thread's flat element index.  Sizes are int except
# the element count (long long: a batch of activations may pass 2**31 elements).
MAX_POOL_FORWARD_SOURCE = r'''
// One thread per output element e = (n, c, oy, ox) of (N, C, Ho, Wo): the running max over
// the kh*kw taps of window (oy, ox) in row-major order, as max_pool_forward's loop.  Tap (i, j)
// is input pixel (oy*s - p + i, ox*s - p + j).  A tap replaces the max only where strictly
// greater, so the first maximum keeps a tie.  Padding taps are -inf, which never replaces
// anything: they are skipped.
extern "C" __global__ void max_pool_forward(const T* x, T* out, unsigned char* arg, long long total,
                                            int h, int w, int ho, int wo, int kh, int kw, int s, int p) {
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    int ox = (int)(e % wo), oy = (int)(e / wo % ho);
    const T* map = x + e / ((long long)ho * wo) * h * w;     // input map (n, c)
    T m = -(T)__int_as_float(0x7f800000);                     // -inf (the bits of +inf, negated)
    int a = 0;
    for (int i = 0; i < kh; ++i) {
        int y = oy * s - p + i;
        for (int j = 0; j < kw; ++j) {
            int xx = ox * s - p + j;
            if (y < 0 || y >= h || xx < 0 || xx >= w) continue;   // padding
            T v = map[y * w + xx];
            if (v > m) { m = v; a = i * kw + j; }
            else if (v != v) m = v;   // NaN: the max is NaN from here on, as xp.maximum makes it
        }
    }
    out[e] = m;
    arg[e] = (unsigned char)a;
}
'''

MAX_POOL_BACKWARD_SOURCE = r'''
// One thread per input pixel e = (n, c, y, x) of (N, C, H, W): the sum of dout over the windows
// this pixel won (a gather: each thread writes its own dx, no atomics).  In padded coordinates
// (py, px) = (y + p, x + p) the pixel is tap (i, j) = (py - oy*s, px - ox*s) of window (oy, ox)
// when 0 <= i < kh and 0 <= j < kw.  The loops start at the last window that can hold the pixel
// and walk back while it is inside: increasing tap order, the order in which max_pool_backward
// adds the windows, so the sums agree bit for bit.
extern "C" __global__ void max_pool_backward(const T* dout, const unsigned char* arg, T* dx, long long total,
                                             int h, int w, int ho, int wo, int kh, int kw, int s, int p) {
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    int py = (int)(e / w % h) + p, px = (int)(e % w) + p;
    long long first = e / ((long long)h * w) * ho * wo;      // window (0, 0) of map (n, c)
    T sum = 0;
    for (int oy = min(py / s, ho - 1); oy >= 0 && py - oy * s < kh; --oy) {
        for (int ox = min(px / s, wo - 1); ox >= 0 && px - ox * s < kw; --ox) {
            long long k = first + oy * wo + ox;
            if (arg[k] == (py - oy * s) * kw + (px - ox * s)) sum += dout[k];
        }
    }
    dx[e] = sum;
}
'''

SPP_FORWARD_SOURCE = r'''
// One thread per output element e = (n, k, r) of (N, K, R): the max of map (n, k) over region
// r, rows y0..y1-1 and columns x0..x1-1 with (y0, y1, x0, x1) = bounds[4r .. 4r+3], scanned in
// row-major order.  A pixel replaces the max only where strictly greater, so the first maximum
// keeps a tie, as argmax does; a NaN wins and keeps it (argmax's rule too).  arg: the flat
// row-major index of the winner within its region.
extern "C" __global__ void spatial_pyramid_pool_forward(const T* x, const int* bounds, T* out, int* arg,
                                                        long long total, int h, int w, int regions) {
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const int* b = bounds + 4 * (int)(e % regions);
    const T* map = x + e / regions * h * w;                   // input map (n, k)
    int y0 = b[0], y1 = b[1], x0 = b[2], x1 = b[3];
    T m = map[y0 * w + x0];
    int a = 0;
    for (int y = y0; y < y1; ++y) {
        for (int xx = x0; xx < x1; ++xx) {
            T v = map[y * w + xx];
            if (v > m || (v != v && m == m)) { m = v; a = (y - y0) * (x1 - x0) + (xx - x0); }
        }
    }
    out[e] = m;
    arg[e] = a;
}
'''

SPP_BACKWARD_SOURCE = r'''
// One thread per input pixel e = (n, k, y, x) of (N, K, H, W): the sum of dout[n, k, r] over
// the regions r that hold the pixel and whose winner it is.  Regions overlap (the levels nest,
// and neighbouring bins may share a pixel), so a pixel may win several; it visits all R in
// order r = 0, 1, ..., the order in which spatial_pyramid_pool_backward adds them.  No atomics.
extern "C" __global__ void spatial_pyramid_pool_backward(const T* dout, const int* arg, const int* bounds,
                                                         T* dx, long long total, int h, int w, int regions) {
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    int y = (int)(e / w % h), xx = (int)(e % w);
    long long first = e / ((long long)h * w) * regions;      // (n, k, 0) in dout and arg
    T sum = 0;
    for (int r = 0; r < regions; ++r) {
        const int* b = bounds + 4 * r;                          // y0, y1, x0, x1
        if (y >= b[0] && y < b[1] && xx >= b[2] && xx < b[3]
            && arg[first + r] == (y - b[0]) * (b[3] - b[2]) + (xx - b[2]))
            sum += dout[first + r];
    }
    dx[e] = sum;
}
'''


def _ints(*values):
    """Sizes as the kernels' ``int`` arguments."""
    return tuple(np.int32(v) for v in values)


def launch_max_pool_forward(functions, x, kernel_size, stride, padding):
    (kh, kw), s, p = kernel_size, stride, padding
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    n, c, h, w = x.shape
    # im2col.output_size, written out: this module sits below im2col.py and does not import it
    ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    out = xp.empty((n, c, ho, wo), dtype=x.dtype)
    arg = xp.empty((n, c, ho, wo), dtype=np.uint8)
    functions["max_pool_forward"]((blocks(out.size),), (THREADS,),
                                  (x, out, arg, np.int64(out.size), *_ints(h, w, ho, wo, kh, kw, s, p)))
    return out, arg


def launch_max_pool_backward(functions, dout, arg, x_shape, kernel_size, stride, padding):
    (kh, kw), s, p = kernel_size, stride, padding
    xp = get_array_module(dout)
    dout, arg = xp.ascontiguousarray(dout), xp.ascontiguousarray(arg)
    ho, wo = dout.shape[2:]
    dx = xp.empty(x_shape, dtype=dout.dtype)
    functions["max_pool_backward"]((blocks(dx.size),), (THREADS,),
                                   (dout, arg, dx, np.int64(dx.size),
                                    *_ints(x_shape[2], x_shape[3], ho, wo, kh, kw, s, p)))
    return dx


_BOUNDS = {}   # (regions, device id) -> the regions as an int32 (R, 4) device array


def _bounds(xp, regions, like):
    """The regions on ``like``'s device, copied there once per map size and device."""
    key = (regions, like.device.id)
    if key not in _BOUNDS:
        with like.device:
            _BOUNDS[key] = xp.asarray(np.array(regions, dtype=np.int32).reshape(-1, 4))
    return _BOUNDS[key]


def launch_spp_forward(functions, x, regions):
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    n, c, h, w = x.shape
    out = xp.empty((n, c, len(regions)), dtype=x.dtype)
    arg = xp.empty((n, c, len(regions)), dtype=np.int32)
    functions["spatial_pyramid_pool_forward"]((blocks(out.size),), (THREADS,),
                                              (x, _bounds(xp, regions, x), out, arg, np.int64(out.size),
                                               *_ints(h, w, len(regions))))
    return out, arg


def launch_spp_backward(functions, dout, arg, x_shape, regions):
    xp = get_array_module(dout)
    dout, arg = xp.ascontiguousarray(dout), xp.ascontiguousarray(arg)
    dx = xp.empty(x_shape, dtype=dout.dtype)
    functions["spatial_pyramid_pool_backward"]((blocks(dx.size),), (THREADS,),
                                               (dout, arg, _bounds(xp, regions, dout), dx, np.int64(dx.size),
                                                *_ints(x_shape[2], x_shape[3], len(regions))))
    return dx
