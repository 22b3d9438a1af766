"""Plain, loop-based, obviously-correct layers: slow, NumPy only, for tests and lessons.

Each loops over output positions and writes the definition down directly; the fast layers in
``minicompact.layers`` are tested against them.  The backward references spell out the tie
rule: the gradient of a max goes to the first maximal input in row-major window order.
"""
import math

import numpy as np


def _pad(x, padding, value):
    """x: (N, C, H, W) → (N, C, H + 2p, W + 2p) with ``value`` around it."""
    return np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
                  constant_values=value)


def conv2d_reference(x, W, stride=1, padding=0):
    """out[n, k, y, x] = Σ_{c,i,j} xpad[n, c, s·y + i, s·x + j] · W[k, c, i, j].

    x: (N, C, H, W); W: (K, C, kh, kw). Returns (N, K, Ho, Wo), x's dtype.
    """
    _, kc, kh, kw = W.shape
    xpad = _pad(x, padding, 0)
    ho = (xpad.shape[2] - kh) // stride + 1
    wo = (xpad.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], W.shape[0], ho, wo), dtype=x.dtype)
    for y in range(ho):
        for xx in range(wo):
            window = xpad[:, :, y * stride:y * stride + kh, xx * stride:xx * stride + kw]
            for n in range(x.shape[0]):
                for k in range(W.shape[0]):
                    out[n, k, y, xx] = np.sum(window[n] * W[k])
    return out


def maxpool2d_reference(x, k, stride=1, padding=0):
    """out[n, c, y, x] = max of the k×k window at (s·y, s·x) of the -inf-padded input.

    x: (N, C, H, W); k: int kernel size. Returns (N, C, Ho, Wo), x's dtype.
    """
    xpad = _pad(x, padding, -np.inf)
    ho = (xpad.shape[2] - k) // stride + 1
    wo = (xpad.shape[3] - k) // stride + 1
    out = np.empty(x.shape[:2] + (ho, wo), dtype=x.dtype)
    for y in range(ho):
        for xx in range(wo):
            out[:, :, y, xx] = xpad[:, :, y * stride:y * stride + k,
                                    xx * stride:xx * stride + k].max(axis=(2, 3))
    return out


def maxpool2d_backward_reference(x, dout, k, stride=1, padding=0):
    """dx of ``maxpool2d_reference``: each dout[n, c, y, x] goes to its window's first max.

    x: (N, C, H, W); dout: (N, C, Ho, Wo). Returns dx (N, C, H, W).
    """
    xpad = _pad(x, padding, -np.inf)
    dpad = np.zeros(xpad.shape, dtype=dout.dtype)
    n_, c_, ho, wo = dout.shape
    for n in range(n_):
        for c in range(c_):
            for y in range(ho):
                for xx in range(wo):
                    window = xpad[n, c, y * stride:y * stride + k, xx * stride:xx * stride + k]
                    i, j = np.unravel_index(np.argmax(window), window.shape)  # first max
                    dpad[n, c, y * stride + i, xx * stride + j] += dout[n, c, y, xx]
    return dpad[:, :, padding:padding + x.shape[2], padding:padding + x.shape[3]]


def pyramid_regions_reference(h, w, levels):
    """Regions (y0, y1, x0, x1): level by level, row-major; bin i of n on an axis of length
    L is [floor(i·L/n), ceil((i+1)·L/n))."""
    regions = []
    for n in levels:
        for i in range(n):
            for j in range(n):
                regions.append((math.floor(i * h / n), math.ceil((i + 1) * h / n),
                                math.floor(j * w / n), math.ceil((j + 1) * w / n)))
    return regions


def spatial_pyramid_pool_reference(x, levels=(1, 2, 4)):
    """out[n, c, r] = max of x[n, c] over pyramid region r.

    x: (N, C, H, W). Returns (N, C, R), R = Σ n², x's dtype.
    """
    regions = pyramid_regions_reference(x.shape[2], x.shape[3], levels)
    out = np.empty(x.shape[:2] + (len(regions),), dtype=x.dtype)
    for r, (y0, y1, x0, x1) in enumerate(regions):
        for n in range(x.shape[0]):
            for c in range(x.shape[1]):
                out[n, c, r] = x[n, c, y0:y1, x0:x1].max()
    return out


def spatial_pyramid_pool_backward_reference(x, dout, levels=(1, 2, 4)):
    """dx of ``spatial_pyramid_pool_reference``: dout[n, c, r] goes to region r's first max.

    x: (N, C, H, W); dout: (N, C, R). Returns dx (N, C, H, W).
    """
    regions = pyramid_regions_reference(x.shape[2], x.shape[3], levels)
    dx = np.zeros(x.shape, dtype=dout.dtype)
    for r, (y0, y1, x0, x1) in enumerate(regions):
        for n in range(x.shape[0]):
            for c in range(x.shape[1]):
                patch = x[n, c, y0:y1, x0:x1]
                i, j = np.unravel_index(np.argmax(patch), patch.shape)
                dx[n, c, y0 + i, x0 + j] += dout[n, c, r]
    return dx
