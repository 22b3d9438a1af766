"""im2col / col2im: a convolution as one large matrix product (paper sec. 3.1).

``im2col`` copies every kh×kw receptive field of the input into one column, so that the
convolution with the dictionary Θ^l (K^l × K^{l-1} × S) becomes a single GEMM.  It is the
shortest honest im2col: a Python loop over the kh·kw kernel offsets only, each one strided
slice copy of the whole batch; ``col2im`` is the same loop with ``+=`` (its adjoint).  The
code runs unchanged on NumPy and CuPy (``xp``) and keeps the input's dtype.

Column layout: ``cols`` has shape (C·kh·kw, N·Ho·Wo) — rows ordered (c, i, j) like
``W.reshape(K, -1)``, columns ordered (n, ho, wo).  With it, forward is one GEMM
``W2 (K, C·kh·kw) @ cols → (K, N·Ho·Wo)`` and backward two, ``dWᵀ = cols @ dout2.T`` and
``dcols = W2.T @ dout2``, all large; BLAS reads the ``.T`` views directly, so the big column
matrix is never transposed.  Only the output and dout are, between NCHW and (K, N·Ho·Wo);
they are C·kh·kw/K times smaller (9 for a 3×3 layer with C = K).  The alternatives lose
for a reason: a per-image (N, C·kh·kw, Ho·Wo) layout with a batched matmul runs N smaller
GEMMs and needs a sum over N for dW; the 2-D (N·Ho·Wo, C·kh·kw) layout of DLFS transposes
the column matrix itself (the figures are in docs/measurements.md).

On a GPU each of the two is one CUDA kernel instead of kh·kw slice copies (``cuda/im2col.py``);
``im2col_loops`` and ``col2im_loops`` below are their twins, and what the CPU runs.
"""
from .backend import get_array_module
from .cuda import CudaKernel
from .cuda import im2col as cuda_im2col


def output_size(size, k, stride=1, padding=0):
    """Output length of a convolution/pooling axis: ``floor((size + 2·padding - k) / stride) + 1``.

    Can be < 1 when the padded input is shorter than the kernel; callers reject that.
    """
    return (size + 2 * padding - k) // stride + 1


def _out_hw(h, w, kh, kw, stride, padding):
    """(Ho, Wo), raising ValueError when the padded input is smaller than the kernel."""
    if stride < 1 or padding < 0:
        raise ValueError(f"need stride >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"a {kh}x{kw} kernel with padding {padding} needs H >= {kh - 2 * padding} "
                         f"and W >= {kw - 2 * padding}, got an input of spatial size {h}x{w}")
    return ho, wo


def im2col(x, kh, kw, stride=1, padding=0, out=None):
    """Gather the kh×kw receptive fields of ``x`` into the columns of one matrix.

    x: (N, C, H, W). kh, kw: kernel size; stride, padding: ints (zero padding).
    out: optional contiguous (C·kh·kw, N·Ho·Wo) array of x's dtype to write into (a buffer
    reused between calls; saves the allocation and first-touch cost of a fresh one).
    Returns cols (C·kh·kw, N·Ho·Wo), x's dtype, with
    ``cols[(c, i, j), (n, ho, wo)] = xpad[n, c, ho·stride + i, wo·stride + j]``.

    Computed by ``im2col_loops`` on the CPU; on a GPU by one CUDA kernel (``cuda/im2col.py``,
    a thread per column entry) that ``im2col_loops`` is the twin of.
    """
    n, c, h, w = x.shape
    ho, wo = _out_hw(h, w, kh, kw, stride, padding)
    shape = (c * kh * kw, n * ho * wo)
    if out is not None and (out.shape != shape or out.dtype != x.dtype
                            or not out.flags.c_contiguous):
        raise ValueError(f"im2col out must be a contiguous {x.dtype} array of shape {shape}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return IM2COL(x, kh, kw, stride, padding, out)


def im2col_loops(x, kh, kw, stride=1, padding=0, out=None):
    """``im2col`` as a loop over the kh·kw kernel offsets, each one strided slice copy of the
    whole batch: the reference, the CPU path and the twin of the CUDA kernel.  Arguments and
    result as ``im2col`` (which checks ``out``)."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    ho, wo = _out_hw(h, w, kh, kw, stride, padding)
    src = x.transpose(1, 0, 2, 3)  # (C, N, H, W) view: batch goes into the columns
    if padding:
        src = xp.zeros((c, n, h + 2 * padding, w + 2 * padding), dtype=x.dtype)
        src[:, :, padding:padding + h, padding:padding + w] = x.transpose(1, 0, 2, 3)
    if out is None:
        out = xp.empty((c * kh * kw, n * ho * wo), dtype=x.dtype)
    cols = out.reshape(c, kh, kw, n, ho, wo)  # a view of out
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = src[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
    return out


def col2im(cols, x_shape, kh, kw, stride=1, padding=0):
    """Adjoint of ``im2col``: add every column back onto the pixels it was copied from.

    cols: (C·kh·kw, N·Ho·Wo) (e.g. dL/dcols); x_shape: (N, C, H, W) of the im2col input.
    Returns dx (N, C, H, W), contiguous, cols' dtype; pixels shared by overlapping
    receptive fields receive the sum of their columns, so <im2col(x), c> = <x, col2im(c)>.

    Computed by ``col2im_loops`` on the CPU; on a GPU by one CUDA kernel (``cuda/im2col.py``)
    that *gathers*: a thread per pixel of dx sums the columns it was copied into, in the
    loops' order, so no two threads write one pixel (no atomics; the same bits every run).
    """
    n, c, h, w = x_shape
    ho, wo = _out_hw(h, w, kh, kw, stride, padding)
    if cols.shape != (c * kh * kw, n * ho * wo):
        raise ValueError(f"col2im expects cols of shape {(c * kh * kw, n * ho * wo)} for input "
                         f"shape {tuple(x_shape)}, got {tuple(cols.shape)}")
    return COL2IM(cols, tuple(x_shape), kh, kw, stride, padding)


def col2im_loops(cols, x_shape, kh, kw, stride=1, padding=0):
    """``col2im`` as the loop of ``im2col_loops`` with ``+=``: the reference, the CPU path and
    the twin of the CUDA kernel.  Arguments and result as ``col2im`` (which checks the shapes)."""
    xp = get_array_module(cols)
    n, c, h, w = x_shape
    ho, wo = _out_hw(h, w, kh, kw, stride, padding)
    dx = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=cols.dtype)
    dst = dx.transpose(1, 0, 2, 3)  # (C, N, Hp, Wp) view, matching the column order
    cols = cols.reshape(c, kh, kw, n, ho, wo)
    for i in range(kh):
        for j in range(kw):
            dst[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += cols[:, i, j]
    if padding:
        return xp.ascontiguousarray(dx[:, :, padding:padding + h, padding:padding + w])
    return dx


# Each loop version above as one CUDA kernel on a GPU (cuda/im2col.py), checked against it at
# first use; NumPy (and a kernel that fails its check) runs the loops.
IM2COL = CudaKernel("im2col", cuda_im2col.SOURCE, ["im2col"], cuda_im2col.launch_im2col, im2col_loops,
                    cuda_im2col.sample_im2col)
COL2IM = CudaKernel("col2im", cuda_im2col.SOURCE, ["col2im"], cuda_im2col.launch_col2im, col2im_loops,
                    cuda_im2col.sample_col2im)
