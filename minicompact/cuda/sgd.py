"""The optimizer's update and the regularizer's group terms as CUDA kernels, one launch per
parameter: their source and launches.

``minicompact.optim`` makes ``SGD_MOMENTUM`` beside ``SGD.step`` and its twin
(``momentum_twin``); ``minicompact.objective`` makes ``GROUP_GRADIENT`` and ``GROUP_SHRINK``
beside ``Penalty``, with theirs (``group_gradient_twin``, ``group_shrink_twin``).  Imports point
down: those modules use this one, never the reverse.

Written as array expressions (``optim.SGD.step``, ``regularizers.mixed_term`` and
``group_soft_threshold``), one step costs about four launches per parameter for momentum SGD
and about twenty per regularized parameter for the group-lasso term: each ``a * b``, each
0-d value.  The kernels here do each parameter's work in one launch (two for the
regularizer's gradient, whose value is a second, one-block reduction):

* ``sgd_momentum``   v ← μ·v + g;  p ← p − lr·v  (Nesterov: p ← p − lr·(g + μ·v));
  without momentum p ← p − lr·g.  One thread per element.
* ``group_gradient`` grad ← grad + C·∂[(1−m)·½‖x‖² + m·Σ_g ‖x_g‖]  (the ℓ2 part always, the
  group part g/‖g‖ in subgradient mode), then ``group_value``: total ← total + C·value.
  One warp per group.
* ``group_shrink``   x_g ← x_g · max(0, 1 − τ/‖x_g‖) with τ = lr/(1−μ)·C·m: the proximal step of
  ``Penalty.after_step``.  One warp per group.

Every group of Ω, Γ and Ψ is a run of trailing axes (``regularizers.OMEGA_AXES`` ...), so group
``k`` of an array is its elements ``[k·size, (k+1)·size)``: a warp sums their squares, shares
the norm by shuffles (a fixed order: no atomics, the same bits every run), then scales them.

**The learning rate is read on the device** (``lr``: a 0-d float64 array, ``SGD.lr_array``):
a kernel given a Python float would carry that number inside a captured CUDA graph
(``training/graph_step.py``) for ever.  It is rounded to the parameter's dtype after the
double-precision products, as the array expressions round a Python float.

**Outputs, as NumPy's ``out=``.**  Each launch takes its outputs last: None allocates new
arrays (the self-check's sample, which must leave its inputs as they were for the twin), and
the optimizer passes the parameter itself to update in place.  Given an output that is not
C-contiguous (the layers never make one) a launch returns None, and ``CudaKernel`` runs the
twin instead.

Products are written ``mul_rn`` (``__fmul_rn``): rounded on their own, never fused with the
following add into an FMA, so each kernel performs the twin's operations in the twin's order;
only the group norms' sums run in another order than NumPy's.
"""
import math

import numpy as np

from ..backend import get_array_module
from . import THREADS, blocks

WARP = 32
REDUCE_THREADS = 256  # the one block of group_value; its shared arrays have this size

SOURCE = r'''
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Sum of a lane's value over its warp, the same total in every lane (a fixed order).
__device__ __forceinline__ T warp_sum(T s) {
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
    return s;
}

// SGD with momentum, one thread per element (optim.SGD.step):
//   v <- mu v + g;  p <- p - lr v  (nesterov: p <- p - lr (g + mu v));  momentum 0: p <- p - lr g.
// lr: this step's rate on the device, times lr_scale (the layer's lr_mult).
extern "C" __global__ void sgd_momentum(const T* p, const T* g, const T* v, const double* lr,
                                        double lr_scale, double momentum, int nesterov,
                                        T* p_out, T* v_out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    T step = (T)(lr[0] * lr_scale);
    if (momentum == 0.0) {
        p_out[i] = p[i] - mul_rn(step, g[i]);
        return;
    }
    T mu = (T)momentum;
    T vi = mul_rn(v[i], mu) + g[i];
    T d = nesterov ? g[i] + mul_rn(mu, vi) : vi;
    p_out[i] = p[i] - mul_rn(step, d);
    v_out[i] = vi;
}

// The gradient of C [(1-mix) ||x||^2 / 2 + mix sum_g ||x_g||] added to grad, one warp per group
// of `size` consecutive elements; each group's squared norm goes to sq (for group_value).
// subgradient = 0 leaves the group part out (proximal mode: the ell-2 part only).
extern "C" __global__ void group_gradient(const T* x, const T* grad, double c, double mix,
                                          int subgradient, T* grad_out, T* sq,
                                          long long groups, long long size) {
    long long group = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (group >= groups) return;  // the whole warp: a warp never straddles two groups
    const long long start = group * size;
    T s = 0;
    for (long long k = lane; k < size; k += 32) s += mul_rn(x[start + k], x[start + k]);
    s = warp_sum(s);
    if (lane == 0) sq[group] = s;
    T norm = sqrt(s);
    T inverse = norm > 0 ? (T)1 / norm : (T)0;  // 0 at a zero group: it stays at zero
    T factor = subgradient ? (T)(1.0 - mix) + mul_rn((T)mix, inverse) : (T)(1.0 - mix);
    for (long long k = lane; k < size; k += 32) {
        long long i = start + k;
        grad_out[i] = grad[i] + mul_rn(mul_rn(x[i], factor), (T)c);
    }
}

// The value C [(1-mix) sum_g sq_g / 2 + mix sum_g sqrt(sq_g)] added to total (has_total = 0:
// the first term of the sum), in one block of 256 threads.
extern "C" __global__ void group_value(const T* sq, const T* total, int has_total, double c,
                                       double mix, T* total_out, long long groups) {
    __shared__ T squares[256];
    __shared__ T norms[256];
    T a = 0, b = 0;
    for (long long g = threadIdx.x; g < groups; g += blockDim.x) {
        a += sq[g];
        b += sqrt(sq[g]);
    }
    squares[threadIdx.x] = a;
    norms[threadIdx.x] = b;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            squares[threadIdx.x] += squares[threadIdx.x + half];
            norms[threadIdx.x] += norms[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        T value = mul_rn((T)((1.0 - mix) * 0.5), squares[0]) + mul_rn((T)mix, norms[0]);
        T term = mul_rn((T)c, value);
        total_out[0] = has_total ? total[0] + term : term;
    }
}

// The proximal step of tau sum_g ||x_g|| with tau = lr / (1 - momentum) * c * mix, one warp
// per group: x_g * (1 - tau / max(||x_g||, tau)), exactly 0 for ||x_g|| <= tau.
extern "C" __global__ void group_shrink(const T* x, const double* lr, double one_minus_momentum,
                                        double c, double mix, T* out, long long groups,
                                        long long size) {
    long long group = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (group >= groups) return;
    const long long start = group * size;
    T s = 0;
    for (long long k = lane; k < size; k += 32) s += mul_rn(x[start + k], x[start + k]);
    T norm = sqrt(warp_sum(s));
    T tau = (T)(lr[0] / one_minus_momentum * c * mix);
    T m = max(norm, tau);
    T scale = m > 0 ? (T)1 - tau / m : (T)1;  // tau = 0 and a zero group: left as it is
    for (long long k = lane; k < size; k += 32) out[start + k] = mul_rn(x[start + k], scale);
}
'''


# --------------------------------------------------------------------------- helpers
def _contiguous(*arrays):
    return all(a is None or a.flags.c_contiguous for a in arrays)


def group_shape(x, group_axes):
    """(groups, size) of ``x`` split into groups along ``group_axes``, which must be its last
    axes (as all of Ω's, Γ's and Ψ's are): group k is x.ravel()[k·size : (k+1)·size]."""
    axes = tuple(a % x.ndim for a in group_axes)
    if axes != tuple(range(x.ndim - len(axes), x.ndim)):
        raise ValueError(f"group axes {group_axes} of an array of shape {tuple(x.shape)} are not its last axes")
    size = math.prod(x.shape[a] for a in axes)
    return (x.size // size if size else 0), size


# --------------------------------------------------------------------------- SGD with momentum
def launch_momentum(functions, p, g, v, lr, lr_scale, momentum, nesterov, p_out=None, v_out=None):
    """``optim.momentum_twin``'s (p_out, v_out) from ``sgd_momentum``; None (use the twin) for
    an output that is not C-contiguous."""
    xp = get_array_module(p)
    if not _contiguous(p_out, v_out):  # only ever given arrays the layers created: contiguous
        return None
    p, g = xp.ascontiguousarray(p), xp.ascontiguousarray(g)
    p_out = xp.empty_like(p) if p_out is None else p_out
    if momentum == 0:
        v = v_out = None
    else:
        v = xp.ascontiguousarray(v)
        v_out = xp.empty_like(v) if v_out is None else v_out
    functions["sgd_momentum"]((blocks(p.size),), (THREADS,), (
        p, g, g if v is None else v, lr, np.float64(lr_scale), np.float64(momentum), np.int32(bool(nesterov)),
        p_out, p_out if v_out is None else v_out, np.int64(p.size)))
    return p_out, v_out


def sample_momentum(xp, dtype):
    rng = np.random.default_rng(0)
    p, g, v = (xp.asarray(rng.standard_normal((7, 45)).astype(dtype)) for _ in range(3))
    return p, g, v, xp.asarray(np.float64(0.05)), 10.0, 0.9, True


# --------------------------------------------------------------------------- the regularizer's gradient
def launch_group_gradient(functions, x, grad, total, c, mix, group_axes, subgradient, grad_out=None):
    """``objective.group_gradient_twin``'s (grad_out, total) from ``group_gradient`` and
    ``group_value``; None (use the twin) for a grad_out that is not C-contiguous."""
    xp = get_array_module(x)
    if not _contiguous(grad_out):
        return None
    groups, size = group_shape(x, group_axes)
    x, grad = xp.ascontiguousarray(x), xp.ascontiguousarray(grad)
    grad_out = xp.empty_like(grad) if grad_out is None else grad_out
    sq = xp.empty(max(groups, 1), dtype=x.dtype)
    functions["group_gradient"]((blocks(groups * WARP),), (THREADS,), (
        x, grad, np.float64(c), np.float64(mix), np.int32(bool(subgradient)), grad_out, sq,
        np.int64(groups), np.int64(size)))
    out = xp.empty((), dtype=x.dtype)
    functions["group_value"]((1,), (REDUCE_THREADS,), (
        sq, out if total is None else total, np.int32(total is not None), np.float64(c), np.float64(mix),
        out, np.int64(groups)))
    return grad_out, out


def sample_group_gradient(xp, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 4, 21)).astype(dtype)
    x[1, 2] = 0  # a zero group: its subgradient is 0
    grad = rng.standard_normal(x.shape).astype(dtype)
    return xp.asarray(x), xp.asarray(grad), xp.asarray(np.asarray(0.25, dtype=dtype)), 0.5, 0.3, (2,), True


# --------------------------------------------------------------------------- the proximal step
def launch_group_shrink(functions, x, lr, one_minus_momentum, c, mix, group_axes, out=None):
    """``objective.group_shrink_twin``'s result from ``group_shrink``; None (use the twin) for
    an out that is not C-contiguous."""
    xp = get_array_module(x)
    if not _contiguous(out):
        return None
    groups, size = group_shape(x, group_axes)
    x = xp.ascontiguousarray(x)
    out = xp.empty_like(x) if out is None else out
    functions["group_shrink"]((blocks(groups * WARP),), (THREADS,), (
        x, lr, np.float64(one_minus_momentum), np.float64(c), np.float64(mix), out, np.int64(groups),
        np.int64(size)))
    return out


def sample_group_shrink(xp, dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5, 3, 3)).astype(dtype)
    x[0, 1] *= 1e-3  # a group under the threshold: exactly 0
    x[2, 3] = 0
    return xp.asarray(x), xp.asarray(np.float64(0.1)), 0.1, 1.0, 0.5, (2, 3)
