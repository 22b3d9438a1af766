"""The convolution of a feature extraction layer (paper sec. 3.1), as im2col + one GEMM.

Layer l convolves its K^{l-1} input maps with K^l filters of size S = kh·kw (7×7 in the
first layer, 3×3 after).  Its dictionary Θ^l (K^l × K^{l-1} × S) is stored as
``W`` of shape (K^l, K^{l-1}, kh, kw), so ``W[k, c]`` is the group Θ^l_{k,c,·} on which the
regularizers of sec. 4 act.  There is no bias: batch-normalization follows.

``conv2d_forward`` / ``conv2d_backward`` are the pure function pair; ``Conv2D`` wraps them
with the parameter bookkeeping of ``Layer``.
"""
import numpy as np

from ..backend import device_of, get_array_module
from ..im2col import col2im, im2col, output_size
from ..winograd import winograd_backward, winograd_forward
from .base import Layer, check_input, kernel_pair
from .conv_algo import check_algo, measured_choice, winograd_applies


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
    # dWᵀ = cols · dout2ᵀ (dout2ᵀ a view BLAS reads transposed).  The same product as
    # dout2 · colsᵀ, but written this way OpenBLAS splits its long inner dimension across
    # threads; for the other order it splits the short dimension and leaves threads idle.
    dW = (cols @ dout2.T).T.reshape(W.shape)
    if not input_grad:
        return None, dW
    W2 = W.reshape(k, -1)
    dcols = xp.matmul(W2.T, dout2, out=cols if overwrite_cols else None)
    dx = col2im(dcols, x_shape, kh, kw, stride, padding)
    return dx, dW


class Conv2D(Layer):
    """A bias-free 2-D convolution with filters Θ^l (paper sec. 3.1), He-initialised.

    in_channels: K^{l-1}; out_channels: K^l; kernel_size: int or (kh, kw); stride, padding:
    ints (zero padding); dtype: of W; rng: ``numpy.random.Generator`` for the init (a fresh
    one when None).  need_input_grad: False for the first layer, whose input is the image:
    backward then fills ``grads["W"]`` only and returns None, skipping dx's GEMM and col2im
    (about a third of that layer's time).  algo: "im2col" (default), "winograd" or "auto",
    the algorithm of a 3×3 stride-1 layer (see ``conv_algo``; other layers always use
    im2col); it may be changed at any time (``layer.algo = ...``).

    params: ``W`` (K^l, K^{l-1}, kh, kw) ~ N(0, 2 / (S·K^{l-1})), S = kh·kw (He et al. 2015,
    paper sec. 5.1).

    Memory: forward keeps the column matrix for backward in ``cache``, C·kh·kw·N·Ho·Wo
    elements — kh·kw/stride² times the input (231 MB in float32 for N=64, 128 channels, 28×28,
    3×3).  The buffer is reused: backward writes dL/dcols into it once dW is computed (so
    backward runs once per forward), and the next forward of the same shape writes its columns
    into it.  ``layer.cache = None`` frees it.  With Winograd the cache holds the transformed
    input tiles V instead, 16·C·N·⌈Ho/2⌉·⌈Wo/2⌉ elements (about 4× the input, against 9× for
    the columns), reused the same way; dW comes from V and dx needs no column matrix.
    ``columns``: a ``conv_algo.ColumnWorkspace`` shared by all layers (``share_columns``), or
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
        self.columns = None   # a shared ColumnWorkspace (conv_algo.share_columns), or None
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
        n, _, h, w = x.shape
        algo = self.algorithm(x)
        ho, wo = output_size(h, kh, self.stride, p), output_size(w, kw, self.stride, p)
        if algo == "winograd":
            shape = (4, 4, self.in_channels, n * ((ho + 1) // 2) * ((wo + 1) // 2))
        else:
            shape = (self.in_channels * kh * kw, n * ho * wo)
        ws = None if self.cache is None else self.cache[1]   # the last forward's buffer
        if ws is not None and (ws.shape != shape or ws.dtype != x.dtype
                               or device_of(ws) != device_of(x)):
            ws = None  # a new shape, dtype or device: allocate a fresh buffer
        if algo == "winograd":
            out, buf = winograd_forward(x, W, p, workspace=ws)
        elif self.columns is not None:   # columns in the shared buffer; keep x, rebuild them later
            out, _ = conv2d_forward(x, W, self.stride, p,
                                    workspace=self.columns.get(shape, x.dtype, x))
            self.cache = (x.shape, x, True, "im2col-shared")
            return out
        else:
            out, buf = conv2d_forward(x, W, self.stride, p, workspace=ws)
        self.cache = (x.shape, buf, True, algo)   # True: buf holds this forward's cols or V
        return out

    def algorithm(self, x):
        """"im2col" or "winograd": what this layer's forward uses for input ``x``."""
        if self.algo == "im2col" or not winograd_applies(self.kernel_size, self.stride):
            return "im2col"
        if self.algo == "winograd":
            return "winograd"
        W, p = self.params["W"], self.padding

        def im2col_step():
            out, cols = conv2d_forward(x, W, 1, p)
            conv2d_backward(out, cols, W, x.shape, 1, p, overwrite_cols=True)

        def winograd_step():
            out, V = winograd_forward(x, W, p)
            winograd_backward(out, V, W, x.shape, p)

        return measured_choice(x, W, p, {"im2col": im2col_step, "winograd": winograd_step})

    def backward(self, dout):
        """dout: (N, K^l, Ho, Wo) → dx (N, K^{l-1}, H, W) (None if not need_input_grad);
        fills ``grads["W"]``."""
        if self.cache is None or not self.cache[2]:
            raise RuntimeError("Conv2D.backward needs a forward first (once per forward: it "
                               "reuses the cached columns as scratch)")
        x_shape, cols, _, algo = self.cache
        n, _, h, w = x_shape
        (kh, kw), st, p = self.kernel_size, self.stride, self.padding
        want = (n, self.out_channels, output_size(h, kh, st, p), output_size(w, kw, st, p))
        if algo == "im2col-shared":   # cols holds the input: rebuild the columns
            cols = im2col(cols, kh, kw, st, p, out=self.columns.get(
                (self.in_channels * kh * kw, want[0] * want[2] * want[3]), cols.dtype, cols))
        if tuple(dout.shape) != want or dout.dtype != cols.dtype:
            raise ValueError(f"Conv2D.backward expects dout of shape {want} and dtype "
                             f"{cols.dtype}, got shape {tuple(dout.shape)} and dtype {dout.dtype}")
        self.cache = (x_shape, cols, False, algo)  # cols is overwritten below; kept as a buffer
        if algo == "winograd":   # V is only read: kept as the next forward's buffer
            dx, self.grads["W"] = winograd_backward(dout, cols, self.params["W"], x_shape, p,
                                                    input_grad=self.need_input_grad)
            return dx
        dx, self.grads["W"] = conv2d_backward(dout, cols, self.params["W"], x_shape,
                                              self.stride, self.padding, overwrite_cols=True,
                                              input_grad=self.need_input_grad)
        return dx

    def __repr__(self):
        kh, kw = self.kernel_size
        return (f"Conv2D({self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"stride={self.stride}, padding={self.padding}"
                + ("" if self.algo == "im2col" else f", algo={self.algo!r}") + ")")
