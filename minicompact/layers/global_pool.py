"""Global average pooling: ResNet's head (He et al. 2016), one region per feature map.

Each feature map k of the last block is averaged over all its H·W positions, so the
classifier reads an (N, K, 1) array: ``SoftmaxClassifier(K, 1, Y)`` is then the plain linear
layer of a ResNet, and Ω (eq. 2) acts on groups W[y, k, :] of R = 1 weight each, as the paper
sets R = 1 for a classifier whose input is not a spatial pyramid (sec. 5.3.4).
"""
from ..backend import get_array_module
from .base import Layer, check_input


def global_avg_pool_forward(x):
    """out[n, k, 0] = 1/(H·W) Σ_{i,j} x[n, k, i, j].

    x: (N, K, H, W).  Returns (out, cache): out (N, K, 1), x's dtype; cache = x.shape.
    """
    return x.mean(axis=(2, 3))[:, :, None], tuple(x.shape)


def global_avg_pool_backward(dout, cache):
    """Every position of a map gets 1/(H·W) of that map's gradient.

    dout: (N, K, 1), not modified; cache: x.shape from forward.  Returns dx (N, K, H, W),
    a new C-contiguous array of dout's dtype.
    """
    n, k, h, w = cache
    dx = get_array_module(dout).empty(cache, dtype=dout.dtype)
    dx[...] = dout[:, :, :, None] / (h * w)    # (N, K, 1, 1) broadcast over H×W
    return dx


class GlobalAvgPool(Layer):
    """(N, K, H, W) → (N, K, 1): the mean of each feature map; no parameters.

    Memory kept for backward: the input's shape only.
    """

    def forward(self, x):
        """x: (N, K, H, W), floating → (N, K, 1), same dtype."""
        check_input(self, x, 4)
        out, self.cache = global_avg_pool_forward(x)
        return out

    def backward(self, dout):
        """dout: (N, K, 1) → dx (N, K, H, W)."""
        if self.cache is None:
            raise RuntimeError("GlobalAvgPool.backward needs a forward first")
        n, k = self.cache[:2]
        if tuple(dout.shape) != (n, k, 1):
            raise ValueError(f"GlobalAvgPool.backward expects dout of shape {(n, k, 1)}, "
                             f"got {tuple(dout.shape)}")
        return global_avg_pool_backward(dout, self.cache)
