"""Batch-norm training as four CUDA kernels (three with a ReLU variant): source, launches, samples.

``layers/batchnorm.py`` makes each a ``CudaKernel`` beside the function it is the twin of
(imports point down: the layer uses this module, never the reverse).

The array-expression version of a training step is about a dozen launches over the whole
input (a sum, a subtraction, an einsum, three in-place products and sums, ... and as many in
backward).  Here it is two launches each way, with the layer's hooks between them, where
sync batch-norm all-reduces the per-channel sums over ranks::

    forward:  bn_stats      (a block per channel)   Σ x and Σ (x - own mean)², one pass
              -> _batch_sum, twice (mean, then variance; (C,) vectors)
              bn_normalise  (a thread per element)  xhat and out = gamma·xhat + beta
    backward: bn_grad_sums  (a block per channel)   Σ dout·xhat and Σ dout, one pass
              -> _gradient_sums
              bn_grad_input (a thread per element)  dx

and the ``_relu`` variants of the last three, with the ReLU that follows folded in (below).

**Why Welford in ``bn_stats``.**  The CPU version centres first and then squares (two
passes), because Σ x² - (Σ x)²/M cancels catastrophically in float32 once |mean| >> std.
The kernel keeps that accuracy in one pass over x: each thread runs Welford's update
(count, mean, Σ (x - mean)²) over its share of the channel, and the block merges the
threads' triples pairwise with Chan et al.'s formula (a tree of 9 levels), so no sum of
squares about 0 is ever formed.  It returns the plain Σ x too, which the hook needs.  The
layer then moves the centred sum from the batch's own mean to the (all-reduced) global mean
with the same formula, ``+ M·(own mean - mean)²``.  A channel is one block of
``REDUCE_THREADS`` threads (C blocks in all): enough to stream the channel, no second launch
to combine partial results, no atomics (the same bits every run).

**How the ReLU after it is fused.**  In the model every BN is followed by a ``ReLU``.  On a
GPU in training mode ``CompactNet.forward`` runs the pair as one step (the layer list is
unchanged; the ``ReLU`` layer is skipped): ``bn_normalise_relu`` writes xhat and
out = max(0, gamma·xhat + beta), and the layer keeps that out for backward, where
``bn_grad_sums_relu`` and ``bn_grad_input_relu`` mask dout as ReLU's backward does,
dout·[out > 0] (out > 0 exactly where ReLU's input was), as they read it.  That saves ReLU's
three launches a layer (its mask and maximum forward, its product backward) and its
traffic; the CPU runs the two layers one after the other.
"""
import numpy as np

from ..backend import get_array_module
from . import THREADS, blocks

REDUCE_THREADS = 512  # threads of the block that reduces one channel (a power of two)

SOURCE = "#define REDUCE_THREADS %d\n" % REDUCE_THREADS + r'''
// x is (N, C, H*W); channel c of it holds m = N*H*W values.  Offset of the k-th of them:
__device__ long long channel_offset(long long k, long long c, long long channels, long long hw) {
    const long long n = k / hw;
    return (n * channels + c) * hw + (k - n * hw);
}

// Chan et al.: merge the statistics (count nb, mean_b, centred sum of squares m2_b) of one
// set of values into those (*na, *mean_a, *m2_a) of another.
__device__ void chan_merge(long long* na, T* mean_a, T* m2_a, long long nb, T mean_b, T m2_b) {
    if (nb == 0) return;
    const long long n = *na + nb;
    const T delta = mean_b - *mean_a, fb = (T)nb / (T)n;
    *m2_a += m2_b + delta * delta * (T)(*na) * fb;
    *mean_a += delta * fb;
    *na = n;
}

// One block per channel c: sum[c] = sum of x, centred[c] = sum of (x - mean_c)^2 with
// mean_c the channel's own mean; Welford per thread, Chan's merge across the block.
extern "C" __global__ void bn_stats(const T* x, T* sum, T* centred, long long channels,
                                    long long hw, long long m) {
    __shared__ long long s_count[REDUCE_THREADS];
    __shared__ T s_sum[REDUCE_THREADS], s_mean[REDUCE_THREADS], s_m2[REDUCE_THREADS];
    const long long c = blockIdx.x;
    const int t = threadIdx.x;
    long long count = 0;
    T total = 0, mean = 0, m2 = 0;
    for (long long k = t; k < m; k += REDUCE_THREADS) {
        const T v = x[channel_offset(k, c, channels, hw)];
        count += 1;
        total += v;
        const T delta = v - mean;
        mean += delta / (T)count;
        m2 += delta * (v - mean);
    }
    s_count[t] = count; s_sum[t] = total; s_mean[t] = mean; s_m2[t] = m2;
    __syncthreads();
    for (int half = REDUCE_THREADS / 2; half > 0; half /= 2) {
        if (t < half) {
            s_sum[t] += s_sum[t + half];
            chan_merge(&s_count[t], &s_mean[t], &s_m2[t], s_count[t + half], s_mean[t + half],
                       s_m2[t + half]);
        }
        __syncthreads();
    }
    if (t == 0) {
        sum[c] = s_sum[0];
        centred[c] = s_m2[0];
    }
}

// ReLU as activations.py has it.  Forward: max(v, 0), NaN kept (NumPy's and CuPy's maximum).
__device__ T relu(T v) { return (v > 0 || v != v) ? v : (T)0; }

// Backward: dout * [out > 0] as a product (so dout * 0 stays what NumPy gives: -0, NaN for inf).
// out is the fused output max(0, y): out > 0 exactly where y > 0.  relu_out == nullptr: no ReLU.
__device__ T relu_grad(const T* dout, const T* relu_out, long long i) {
    return relu_out ? dout[i] * (T)(relu_out[i] > 0) : dout[i];
}

// A thread per element: xhat = (x - mean[c]) * inv_std[c], out = gamma[c] * xhat + beta[c],
// then out = max(0, out) when with_relu.
__device__ void normalise(const T* x, const T* mean, const T* inv_std, const T* gamma,
                          const T* beta, T* xhat, T* out, long long channels, long long hw,
                          long long size, bool with_relu) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= size) return;
    const long long c = (i / hw) % channels;
    const T h = (x[i] - mean[c]) * inv_std[c];
    const T y = h * gamma[c] + beta[c];
    xhat[i] = h;
    out[i] = with_relu ? relu(y) : y;
}

extern "C" __global__ void bn_normalise(const T* x, const T* mean, const T* inv_std,
                                        const T* gamma, const T* beta, T* xhat, T* out,
                                        long long channels, long long hw, long long size) {
    normalise(x, mean, inv_std, gamma, beta, xhat, out, channels, hw, size, false);
}

extern "C" __global__ void bn_normalise_relu(const T* x, const T* mean, const T* inv_std,
                                             const T* gamma, const T* beta, T* xhat, T* out,
                                             long long channels, long long hw, long long size) {
    normalise(x, mean, inv_std, gamma, beta, xhat, out, channels, hw, size, true);
}

// One block per channel c: sum_dout_xhat[c] = sum of g*xhat, sum_dout[c] = sum of g, with
// g = dout, or ReLU's dout * [relu_out > 0].
__device__ void grad_sums(const T* dout, const T* xhat, const T* relu_out, T* sum_dout_xhat,
                          T* sum_dout, long long channels, long long hw, long long m) {
    __shared__ T s_a[REDUCE_THREADS], s_b[REDUCE_THREADS];
    const long long c = blockIdx.x;
    const int t = threadIdx.x;
    T a = 0, b = 0;
    for (long long k = t; k < m; k += REDUCE_THREADS) {
        const long long i = channel_offset(k, c, channels, hw);
        const T g = relu_grad(dout, relu_out, i);
        a += g * xhat[i];
        b += g;
    }
    s_a[t] = a; s_b[t] = b;
    __syncthreads();
    for (int half = REDUCE_THREADS / 2; half > 0; half /= 2) {
        if (t < half) {
            s_a[t] += s_a[t + half];
            s_b[t] += s_b[t + half];
        }
        __syncthreads();
    }
    if (t == 0) {
        sum_dout_xhat[c] = s_a[0];
        sum_dout[c] = s_b[0];
    }
}

extern "C" __global__ void bn_grad_sums(const T* dout, const T* xhat, T* sum_dout_xhat,
                                        T* sum_dout, long long channels, long long hw,
                                        long long m) {
    grad_sums(dout, xhat, nullptr, sum_dout_xhat, sum_dout, channels, hw, m);
}

extern "C" __global__ void bn_grad_sums_relu(const T* dout, const T* xhat, const T* relu_out,
                                             T* sum_dout_xhat, T* sum_dout, long long channels,
                                             long long hw, long long m) {
    grad_sums(dout, xhat, relu_out, sum_dout_xhat, sum_dout, channels, hw, m);
}

// A thread per element, g = dout (or ReLU's dout * [relu_out > 0]):
// dx = gamma[c]*inv_std[c] * (g - xhat * sum_dout_xhat[c] / m - sum_dout[c] / m).
__device__ void grad_input(const T* dout, const T* xhat, const T* relu_out,
                           const T* sum_dout_xhat, const T* sum_dout, const T* gamma,
                           const T* inv_std, T* dx, T m, long long channels, long long hw,
                           long long size) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= size) return;
    const long long c = (i / hw) % channels;
    dx[i] = (relu_grad(dout, relu_out, i) - xhat[i] * (sum_dout_xhat[c] / m) - sum_dout[c] / m)
            * (gamma[c] * inv_std[c]);
}

extern "C" __global__ void bn_grad_input(const T* dout, const T* xhat, const T* sum_dout_xhat,
                                         const T* sum_dout, const T* gamma, const T* inv_std,
                                         T* dx, T m, long long channels, long long hw,
                                         long long size) {
    grad_input(dout, xhat, nullptr, sum_dout_xhat, sum_dout, gamma, inv_std, dx, m, channels, hw,
               size);
}

extern "C" __global__ void bn_grad_input_relu(const T* dout, const T* xhat, const T* relu_out,
                                              const T* sum_dout_xhat, const T* sum_dout,
                                              const T* gamma, const T* inv_std, T* dx, T m,
                                              long long channels, long long hw, long long size) {
    grad_input(dout, xhat, relu_out, sum_dout_xhat, sum_dout, gamma, inv_std, dx, m, channels,
               hw, size);
}
'''


def _sizes(a):
    """(channels, H·W) of an (N, C, H, W) array, as the kernels' int64 arguments."""
    return np.int64(a.shape[1]), np.int64(a.shape[2] * a.shape[3])


def launch_stats(functions, x):
    xp = get_array_module(x)
    channels, hw = _sizes(x)
    sums, centred = (xp.empty(x.shape[1], dtype=x.dtype) for _ in range(2))
    functions["bn_stats"]((x.shape[1],), (REDUCE_THREADS,),
                          (xp.ascontiguousarray(x), sums, centred, channels, hw,
                           np.int64(x.size // x.shape[1])))
    return sums, centred


def launch_normalise(functions, x, mean, inv_std, gamma, beta, name="bn_normalise"):
    xp = get_array_module(x)
    xhat, out = xp.empty(x.shape, dtype=x.dtype), xp.empty(x.shape, dtype=x.dtype)
    vectors = [xp.ascontiguousarray(v, dtype=x.dtype) for v in (mean, inv_std, gamma, beta)]
    functions[name]((blocks(x.size),), (THREADS,),
                    (xp.ascontiguousarray(x), *vectors, xhat, out, *_sizes(x), np.int64(x.size)))
    return xhat, out


def launch_normalise_relu(functions, x, mean, inv_std, gamma, beta):
    return launch_normalise(functions, x, mean, inv_std, gamma, beta, name="bn_normalise_relu")


def launch_grad_sums(functions, dout, xhat, relu_out=None):
    """``bn_grad_sums``, or with ``relu_out`` (the fused forward's output) ``bn_grad_sums_relu``."""
    xp = get_array_module(dout)
    channels, hw = _sizes(dout)
    sum_dout_xhat, sum_dout = (xp.empty(dout.shape[1], dtype=dout.dtype) for _ in range(2))
    arrays = [xp.ascontiguousarray(a) for a in (dout, xhat)]
    if relu_out is not None:
        arrays.append(xp.ascontiguousarray(relu_out))
    functions["bn_grad_sums" if relu_out is None else "bn_grad_sums_relu"](
        (dout.shape[1],), (REDUCE_THREADS,),
        (*arrays, sum_dout_xhat, sum_dout, channels, hw, np.int64(dout.size // dout.shape[1])))
    return sum_dout_xhat, sum_dout


def launch_grad_input(functions, dout, xhat, sum_dout_xhat, sum_dout, gamma, inv_std, m,
                      relu_out=None):
    """``bn_grad_input``, or with ``relu_out`` ``bn_grad_input_relu``."""
    xp = get_array_module(dout)
    dx = xp.empty(dout.shape, dtype=dout.dtype)
    arrays = [xp.ascontiguousarray(a) for a in (dout, xhat)]
    if relu_out is not None:
        arrays.append(xp.ascontiguousarray(relu_out))
    vectors = [xp.ascontiguousarray(v, dtype=dout.dtype)
               for v in (sum_dout_xhat, sum_dout, gamma, inv_std)]
    functions["bn_grad_input" if relu_out is None else "bn_grad_input_relu"](
        (blocks(dout.size),), (THREADS,),
        (*arrays, *vectors, dx, dout.dtype.type(m), *_sizes(dout), np.int64(dout.size)))
    return dx


def launch_grad_sums_relu(functions, dout, xhat, relu_out):
    return launch_grad_sums(functions, dout, xhat, relu_out)


def launch_grad_input_relu(functions, dout, xhat, relu_out, sum_dout_xhat, sum_dout, gamma,
                           inv_std, m):
    return launch_grad_input(functions, dout, xhat, sum_dout_xhat, sum_dout, gamma, inv_std, m,
                             relu_out)


# Self-check inputs: odd sizes, more values per channel than a block has threads, and a
# mean far from 0 (what a sum of squares about 0 would get wrong).
_SHAPE = (3, 5, 13, 17)


def _arrays(xp, dtype, seed, *shapes, loc=0.0):
    rng = np.random.default_rng(seed)
    return [xp.asarray((rng.standard_normal(s) + loc).astype(dtype)) for s in shapes]


def _vectors(xp, dtype, seed, count=4):
    rng = np.random.default_rng(seed)
    return [xp.asarray(rng.uniform(0.5, 2.0, _SHAPE[1]).astype(dtype)) for _ in range(count)]


def sample_stats(xp, dtype):
    return _arrays(xp, dtype, 0, _SHAPE, loc=3.0)


def sample_normalise(xp, dtype):
    return _arrays(xp, dtype, 0, _SHAPE) + _vectors(xp, dtype, 1)


def sample_grad_sums(xp, dtype):
    return _arrays(xp, dtype, 2, _SHAPE, _SHAPE)


def sample_grad_input(xp, dtype):
    m = _SHAPE[0] * _SHAPE[2] * _SHAPE[3]
    return _arrays(xp, dtype, 3, _SHAPE, _SHAPE) + _vectors(xp, dtype, 4) + [m]


# The ReLU variants: a fused output max(0, ·) with about half its entries 0.
def _relu_out(xp, dtype, seed):
    rng = np.random.default_rng(seed)
    return xp.asarray(np.maximum(rng.standard_normal(_SHAPE), 0).astype(dtype))


def sample_grad_sums_relu(xp, dtype):
    return sample_grad_sums(xp, dtype) + [_relu_out(xp, dtype, 5)]


def sample_grad_input_relu(xp, dtype):
    dout, xhat, *rest = sample_grad_input(xp, dtype)
    return [dout, xhat, _relu_out(xp, dtype, 5), *rest]
