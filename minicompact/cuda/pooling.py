"""Max-pooling (paper sec. 3.1) and the spatial pyramid's region max (sec. 3.2): the readable
array-expression versions, and beside each the CUDA kernel that computes the same in one launch.

The readable functions are the kernels' *twins* (``minicompact/cuda/__init__.py``): the CPU
path, the reference the kernels are tested against, and what runs on a GPU whenever a kernel
cannot be trusted.  ``minicompact.layers.pooling`` builds its layers on them.

    max_pool_forward / max_pool_backward                 a loop over the kh·kw window taps
    spatial_pyramid_pool_forward / ..._backward          a loop over the R regions
    max_pool_forward_cuda, ..., spatial_pyramid_pool_backward_cuda
                                                         the same arguments, the same results
                                                         and caches, one kernel launch each

A forward kernel runs one thread per output element.  A backward kernel runs one thread per
*input* pixel, which gathers the gradient of every window (region) it won: no two threads
write the same element, so there are no atomics and the result does not depend on scheduling.
Each pixel adds its windows in the order in which the twin adds them, so kernel and twin agree
bit for bit.
"""
import numpy as np

from ..backend import get_array_module
from ..im2col import output_size
from . import THREADS, CudaKernel, blocks


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


# ---- the kernels -------------------------------------------------------------------------
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


def _launch_max_pool_forward(functions, x, kernel_size, stride, padding):
    (kh, kw), s, p = kernel_size, stride, padding
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    n, c, h, w = x.shape
    ho, wo = output_size(h, kh, s, p), output_size(w, kw, s, p)
    out = xp.empty((n, c, ho, wo), dtype=x.dtype)
    arg = xp.empty((n, c, ho, wo), dtype=np.uint8)
    functions["max_pool_forward"]((blocks(out.size),), (THREADS,),
                                  (x, out, arg, np.int64(out.size), *_ints(h, w, ho, wo, kh, kw, s, p)))
    return out, arg


def _launch_max_pool_backward(functions, dout, arg, x_shape, kernel_size, stride, padding):
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


def _launch_spp_forward(functions, x, regions):
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    n, c, h, w = x.shape
    out = xp.empty((n, c, len(regions)), dtype=x.dtype)
    arg = xp.empty((n, c, len(regions)), dtype=np.int32)
    functions["spatial_pyramid_pool_forward"]((blocks(out.size),), (THREADS,),
                                              (x, _bounds(xp, regions, x), out, arg, np.int64(out.size),
                                               *_ints(h, w, len(regions))))
    return out, arg


def _launch_spp_backward(functions, dout, arg, x_shape, regions):
    xp = get_array_module(dout)
    dout, arg = xp.ascontiguousarray(dout), xp.ascontiguousarray(arg)
    dx = xp.empty(x_shape, dtype=dout.dtype)
    functions["spatial_pyramid_pool_backward"]((blocks(dx.size),), (THREADS,),
                                               (dout, arg, _bounds(xp, regions, dout), dx, np.int64(dx.size),
                                                *_ints(x_shape[2], x_shape[3], len(regions))))
    return dx


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


MAX_POOL_FORWARD = CudaKernel("max_pool_forward", MAX_POOL_FORWARD_SOURCE, ["max_pool_forward"],
                              _launch_max_pool_forward, _max_pool_forward_twin, _max_pool_sample)
MAX_POOL_BACKWARD = CudaKernel("max_pool_backward", MAX_POOL_BACKWARD_SOURCE, ["max_pool_backward"],
                               _launch_max_pool_backward, _max_pool_backward_twin, _max_pool_backward_sample)
SPP_FORWARD = CudaKernel("spatial_pyramid_pool_forward", SPP_FORWARD_SOURCE, ["spatial_pyramid_pool_forward"],
                         _launch_spp_forward, spatial_pyramid_pool_forward, _spp_sample)
SPP_BACKWARD = CudaKernel("spatial_pyramid_pool_backward", SPP_BACKWARD_SOURCE, ["spatial_pyramid_pool_backward"],
                          _launch_spp_backward, spatial_pyramid_pool_backward, _spp_backward_sample)

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
