"""The convolution of a feature extraction layer (paper sec. 3.1), as im2col + one GEMM.

Layer l convolves its K^{l-1} input maps with K^l filters of size S = kh·kw (7×7 in the
first layer, 3×3 after).  Its dictionary Θ^l (K^l × K^{l-1} × S) is stored as
``W`` of shape (K^l, K^{l-1}, kh, kw), so ``W[k, c]`` is the group Θ^l_{k,c,·} on which the
regularizers of sec. 4 act.  There is no bias: batch-normalization follows.

``conv2d_forward`` / ``conv2d_backward`` are the pure function pair to read, and what runs by
default.  ``Conv2D`` runs one of three ``ConvAlgorithm``s, each a forward/backward pair over
the array its forward keeps: ``IM2COL`` (that pair, its columns reused as scratch),
``WINOGRAD`` (``minicompact.winograd``, 3×3 stride-1 layers) or ``shared_columns`` (im2col
with one column buffer for every layer, ``workspace.py``); ``conv_choice.py`` picks between
the first two.  The tests hold each against ``conv2d_forward`` / ``conv2d_backward``.
"""
from typing import Callable, NamedTuple

import numpy as np

from ..backend import device_of, get_array_module
from ..im2col import col2im, im2col, output_size
from ..winograd import tiles, winograd_backward, winograd_forward
from .base import Layer, check_input, kernel_pair
from .conv_choice import check_algo, measured_choice, winograd_applies


def conv2d_forward(x, W, stride=1, padding=0, workspace=None):
    """y[n, k] = Σ_c x[n, c] ⋆ Θ[k, c]  (cross-correlation, zero padding), as one GEMM.

    x: (N, C, H, W); W: (K, C, kh, kw), same dtype and device; workspace: optional
    (C·kh·kw, N·Ho·Wo) buffer for the columns (see ``im2col``).
    Returns (out, cols): out (N, K, Ho, Wo) contiguous, x's dtype; cols (C·kh·kw, N·Ho·Wo)
    the column matrix that ``conv2d_backward`` needs.
    """
    xp = get_array_module(x)
    n = x.shape[0]
    k, _, kh, kw = W.shape
    ho = output_size(x.shape[2], kh, stride, padding)
    wo = output_size(x.shape[3], kw, stride, padding)
    cols = im2col(x, kh, kw, stride, padding, out=workspace)
    y = W.reshape(k, -1) @ cols                       # (K, N·Ho·Wo): the one big GEMM
    out = xp.ascontiguousarray(y.reshape(k, n, ho, wo).transpose(1, 0, 2, 3))
    return out, cols


def conv2d_backward(dout, cols, W, x_shape, stride=1, padding=0, overwrite_cols=False,
                    input_grad=True):
    """Gradients of ``conv2d_forward``: dx = col2im(W2ᵀ · dout2), dW = dout2 · colsᵀ.

    dout: (N, K, Ho, Wo), dL/dout (not modified); cols: (C·kh·kw, N·Ho·Wo) from forward;
    W: (K, C, kh, kw); x_shape: (N, C, H, W).  overwrite_cols: write dL/dcols into ``cols``
    instead of a fresh array of the same (large) size; cols is garbage afterwards.
    input_grad: False skips dx (its GEMM and the col2im) and returns None for it.
    Returns (dx (N, C, H, W) or None, dW (K, C, kh, kw)), both dout's dtype.
    """
    xp = get_array_module(dout)
    k, _, kh, kw = W.shape
    # (K, N·Ho·Wo): the one transpose of backward, on an array C·kh·kw/K times smaller than cols
    dout2 = xp.ascontiguousarray(dout.transpose(1, 0, 2, 3)).reshape(k, -1)
    # dW = dout2 · colsᵀ, computed as (cols · dout2ᵀ)ᵀ: the order in which BLAS shares its work
    # between threads (docs/decisions.md)
    dW = (cols @ dout2.T).T.reshape(W.shape)
    if not input_grad:
        return None, dW
    W2 = W.reshape(k, -1)
    dcols = xp.matmul(W2.T, dout2, out=cols if overwrite_cols else None)
    dx = col2im(dcols, x_shape, kh, kw, stride, padding)
    return dx, dW


class ConvAlgorithm(NamedTuple):
    """One way to run a convolution: a forward/backward pair over the array forward keeps.

    forward(x, W, stride, padding, buffer) -> (out, saved): buffer, when not None, an array of
    ``buffer_shape`` (the last forward's ``saved``) to write ``saved`` into.
    backward(dout, saved, W, x_shape, stride, padding, input_grad) -> (dx or None, dW); it may
    overwrite ``saved``, so it runs once per forward.
    buffer_shape(x_shape, W_shape, stride, padding): the shape of ``saved``, or None when
    ``saved`` is not a buffer of the layer's own (then a forward never writes into it).
    """
    name: str
    forward: Callable
    backward: Callable
    buffer_shape: Callable


def _columns_shape(x_shape, W_shape, stride, padding):
    n, c, h, w = x_shape
    kh, kw = W_shape[2:]
    return c * kh * kw, n * output_size(h, kh, stride, padding) * output_size(w, kw, stride, padding)


def _im2col_forward(x, W, stride, padding, buffer=None):
    return conv2d_forward(x, W, stride, padding, workspace=buffer)


def _im2col_backward(dout, cols, W, x_shape, stride, padding, input_grad=True):
    # dL/dcols goes into the columns' own buffer instead of a second array of their size
    return conv2d_backward(dout, cols, W, x_shape, stride, padding, overwrite_cols=True,
                           input_grad=input_grad)


def _tiles_shape(x_shape, W_shape, stride, padding):
    n, c, h, w = x_shape
    _, _, th, tw = tiles(h, w, padding)
    return 4, 4, c, n * th * tw


def _winograd_forward(x, W, stride, padding, buffer=None):
    return winograd_forward(x, W, padding, workspace=buffer)


def _winograd_backward(dout, V, W, x_shape, stride, padding, input_grad=True):
    return winograd_backward(dout, V, W, x_shape, padding, input_grad=input_grad)   # V only read


IM2COL = ConvAlgorithm("im2col", _im2col_forward, _im2col_backward, _columns_shape)
WINOGRAD = ConvAlgorithm("winograd", _winograd_forward, _winograd_backward, _tiles_shape)
ALGORITHMS = {"im2col": IM2COL, "winograd": WINOGRAD}


def shared_columns(columns):
    """im2col with its columns in ``columns``, a ``ColumnWorkspace`` shared by every layer.

    Forward keeps only x; backward rebuilds the columns from it, in the same shared buffer.
    """
    def forward(x, W, stride, padding, buffer=None):
        cols = columns.get(_columns_shape(x.shape, W.shape, stride, padding), x.dtype, x)
        return conv2d_forward(x, W, stride, padding, workspace=cols)[0], x

    def backward(dout, x, W, x_shape, stride, padding, input_grad=True):
        cols = im2col(x, W.shape[2], W.shape[3], stride, padding, out=columns.get(
            _columns_shape(x_shape, W.shape, stride, padding), x.dtype, x))
        return _im2col_backward(dout, cols, W, x_shape, stride, padding, input_grad)

    return ConvAlgorithm("im2col-shared", forward, backward, lambda *shapes: None)


class ConvCache(NamedTuple):
    """What ``Conv2D.forward`` keeps for backward."""
    algorithm: ConvAlgorithm   # the pair that ran
    x_shape: tuple
    saved: object              # its forward's second result: the columns, V, or (shared) x
    fresh: bool = True         # False once backward ran: ``saved`` is then only a buffer


class Conv2D(Layer):
    """A bias-free 2-D convolution with filters Θ^l (paper sec. 3.1), He-initialised.

    in_channels: K^{l-1}; out_channels: K^l; kernel_size: int or (kh, kw); stride, padding:
    ints (zero padding); dtype: of W; rng: ``numpy.random.Generator`` for the init (a fresh
    one when None).  need_input_grad: False for the first layer, whose input is the image:
    backward then fills ``grads["W"]`` only and returns None, skipping dx's GEMM and col2im
    (about a third of that layer's time).  algo: "im2col" (default), "winograd" or "auto",
    the algorithm of a 3×3 stride-1 layer (see ``conv_choice``; other layers always use
    im2col); it may be changed at any time (``layer.algo = ...``).

    params: ``W`` (K^l, K^{l-1}, kh, kw) ~ N(0, 2 / (S·K^{l-1})), S = kh·kw (He et al. 2015,
    paper sec. 5.1).

    What runs: forward picks a ``ConvAlgorithm`` (``IM2COL``: ``conv2d_forward`` /
    ``conv2d_backward`` above, the short pair to read; ``WINOGRAD``; or ``shared_columns``)
    and keeps a ``ConvCache``; backward runs the same algorithm's backward.

    Memory: forward keeps the column matrix for backward in ``cache``, C·kh·kw·N·Ho·Wo
    elements — kh·kw/stride² times the input (231 MB in float32 for N=64, 128 channels, 28×28,
    3×3).  The buffer is reused: backward writes dL/dcols into it once dW is computed (so
    backward runs once per forward), and the next forward of the same shape writes its columns
    into it.  ``layer.cache = None`` frees it.  With Winograd the cache holds the transformed
    input tiles V instead, 16·C·N·⌈Ho/2⌉·⌈Wo/2⌉ elements (about 4× the input, against 9× for
    the columns), reused the same way; dW comes from V and dx needs no column matrix.
    ``columns``: a ``workspace.ColumnWorkspace`` shared by all layers (``share_columns``), or
    None; with one, an im2col layer keeps only its input and rebuilds its columns in backward.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dtype=np.float32, rng=None, need_input_grad=True, algo="im2col"):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"Conv2D needs in_channels and out_channels >= 1, got "
                             f"({in_channels}, {out_channels})")
        if int(stride) != stride or stride < 1 or int(padding) != padding or padding < 0:
            raise ValueError(f"Conv2D needs an int stride >= 1 and padding >= 0, got "
                             f"stride={stride!r}, padding={padding!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = kernel_pair(kernel_size, "kernel_size")
        self.stride, self.padding = int(stride), int(padding)
        self.need_input_grad = bool(need_input_grad)
        self.algo = check_algo(algo)
        self.columns = None   # a shared ColumnWorkspace (workspace.share_columns), or None
        kh, kw = self.kernel_size
        rng = np.random.default_rng() if rng is None else rng
        std = np.sqrt(2.0 / (kh * kw * in_channels))
        W = rng.standard_normal((out_channels, in_channels, kh, kw)) * std
        self.params = {"W": W.astype(dtype)}
        self.zero_grad()

    def forward(self, x):
        """x: (N, K^{l-1}, H, W), W's dtype and device → (N, K^l, Ho, Wo), same dtype."""
        kh, kw = self.kernel_size
        p = self.padding
        check_input(self, x, 4, channels=self.in_channels,
                    min_hw=(max(1, kh - 2 * p), max(1, kw - 2 * p)))
        W = self.params["W"]
        if device_of(x) != device_of(W):
            raise ValueError(f"Conv2D has its parameters on the {device_of(W)} but got an input "
                             f"of shape {tuple(x.shape)} on the {device_of(x)}; use layer.to()")
        algo = ALGORITHMS[self.algorithm(x)]
        if algo is IM2COL and self.columns is not None:
            algo = shared_columns(self.columns)
        out, saved = algo.forward(x, W, self.stride, p, self._reusable_buffer(algo, x))
        self.cache = ConvCache(algo, tuple(x.shape), saved)
        return out

    def _reusable_buffer(self, algo, x):
        """The last forward's buffer if ``algo`` wrote it and can write this forward's into it
        (same shape, dtype and device), else None (allocate a fresh one)."""
        if self.cache is None or self.cache.algorithm.name != algo.name:
            return None
        shape = algo.buffer_shape(x.shape, self.params["W"].shape, self.stride, self.padding)
        buf = self.cache.saved
        if shape is None or buf.shape != shape or buf.dtype != x.dtype \
                or device_of(buf) != device_of(x):
            return None
        return buf

    def algorithm(self, x):
        """"im2col" or "winograd": what this layer's forward uses for input ``x``."""
        if self.algo == "im2col" or not winograd_applies(self.kernel_size, self.stride):
            return "im2col"
        if self.algo == "winograd":
            return "winograd"
        return measured_choice(x, self.params["W"], self.padding, ALGORITHMS)

    def backward(self, dout):
        """dout: (N, K^l, Ho, Wo) → dx (N, K^{l-1}, H, W) (None if not need_input_grad);
        fills ``grads["W"]``."""
        if self.cache is None or not self.cache.fresh:
            raise RuntimeError("Conv2D.backward needs a forward first (once per forward: it "
                               "reuses the cached columns as scratch)")
        algo, x_shape, saved, _ = self.cache
        n, _, h, w = x_shape
        (kh, kw), st, p = self.kernel_size, self.stride, self.padding
        want = (n, self.out_channels, output_size(h, kh, st, p), output_size(w, kw, st, p))
        if tuple(dout.shape) != want or dout.dtype != saved.dtype:
            raise ValueError(f"Conv2D.backward expects dout of shape {want} and dtype "
                             f"{saved.dtype}, got shape {tuple(dout.shape)} and dtype {dout.dtype}")
        self.cache = self.cache._replace(fresh=False)   # saved may be overwritten below
        dx, self.grads["W"] = algo.backward(dout, saved, self.params["W"], x_shape, st, p,
                                            self.need_input_grad)
        return dx

    def __repr__(self):
        kh, kw = self.kernel_size
        return (f"Conv2D({self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"stride={self.stride}, padding={self.padding}"
                + ("" if self.algo == "im2col" else f", algo={self.algo!r}") + ")")
