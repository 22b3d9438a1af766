"""Winograd F(2×2, 3×3): a 3×3 stride-1 convolution with 16 multiplies per 2×2 output tile.

The 1-D minimal filtering F(2, 3) (Winograd 1980; Lavin & Gray 2016) computes two outputs of
a 3-tap correlation, y0 = d0·g0 + d1·g1 + d2·g2 and y1 = d1·g0 + d2·g1 + d3·g2, from a
4-sample input tile d with 4 multiplies instead of 6::

    m0 = (d0 - d2)·g0            m1 = (d1 + d2)·(g0 + g1 + g2)/2
    m3 = (d1 - d3)·g2            m2 = (d2 - d1)·(g0 - g1 + g2)/2
    y0 = m0 + m1 + m2            y1 = m1 - m2 - m3

(expand m1 + m2 = d1·g1 + d2·(g0 + g2) and m1 - m2 = d1·(g0 + g2) + d2·g1 to check).  In
matrix form y = Aᵀ[(G g) ⊙ (Bᵀ d)] with

    Bᵀ = [[1,  0, -1,  0],     G = [[1,    0,   0 ],     Aᵀ = [[1, 1,  1,  0],
          [0,  1,  1,  0],          [1/2, 1/2, 1/2],           [0, 1, -1, -1]]
          [0, -1,  1,  0],          [1/2,-1/2, 1/2],
          [0,  1,  0, -1]]          [0,    0,   1 ]]

(the input, filter and output transforms; ``BT``, ``G``, ``AT`` below).  Nesting it along both
axes gives F(2×2, 3×3): a 4×4 input tile d and a 3×3 filter g give the 2×2 outputs

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A,

16 multiplies where the direct (or im2col) form needs 2·2·9 = 36: 2.25× fewer.  Over C input
and K output channels the element-wise product becomes a sum over c, so each of the 16
positions (a, b) of the 4×4 transformed tile is one GEMM over all tiles at once::

    M[a, b] = U[a, b] (K × C) · V[a, b] (C × P),   U = G W Gᵀ,  V = Bᵀ d B,  P = N·⌈Ho/2⌉·⌈Wo/2⌉

— 16 GEMMs of K·C·P multiply-adds against im2col's one GEMM of K·9C·(P·4).  Tiles overlap by
2 pixels (stride 2, size 4); an odd output is padded to even tiles and cropped.

The price is rounding: the transforms add and halve values before the products, so float32
results carry a larger error than im2col's (characterised in tests/test_winograd.py and
docs/winograd.md), and the kernel is for 3×3, stride 1 only.

``winograd_simple_forward`` / ``winograd_simple_backward`` are the version to read: the
formula above as four ``einsum``s over every tile at once, and their adjoints.  The fast
``winograd_forward`` / ``winograd_backward`` below compute the same with the transforms
written out as adds into reused buffers and the 16 GEMMs as one batched ``matmul``; the tests
hold them against the simple pair and against ``conv2d_forward`` / ``conv2d_backward``.

Layouts (channels first, like ``im2col``): V (4, 4, C, P), U (4, 4, K, C), M (4, 4, K, P), the
tiles ordered (n, tile row, tile column).  Everything is slicing, adds and ``xp.matmul``, on
NumPy or CuPy, in the input's dtype.  The backward (``winograd_backward``) gets dW from the
same transformed tiles (dU = dM · Vᵀ, 16 GEMMs, then Gᵀ dU G) and dx from this same
algorithm on the flipped, channel-transposed filters (a full correlation).
"""
import numpy as np

from .backend import get_array_module

BT = np.array([[1, 0, -1, 0],
               [0, 1, 1, 0],
               [0, -1, 1, 0],
               [0, 1, 0, -1]], dtype=np.float64)      # input transform Bᵀ (4×4)
G = np.array([[1.0, 0.0, 0.0],
              [0.5, 0.5, 0.5],
              [0.5, -0.5, 0.5],
              [0.0, 0.0, 1.0]], dtype=np.float64)      # filter transform G (4×3)
AT = np.array([[1, 1, 1, 0],
               [0, 1, -1, -1]], dtype=np.float64)      # output transform Aᵀ (2×4)


def winograd_simple_forward(x, W, padding=1):
    """y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A for every 4×4 tile d and filter g, summed over the
    input channels (Lavin & Gray 2016, sec. 4.1): a 3×3 stride-1 convolution.

    x: (N, C, H, W); W: (K, C, 3, 3); padding: zeros on each side (>= 0).  Returns (out,
    cache): out (N, K, Ho, Wo), Ho = H + 2·padding - 2, x's dtype; cache for the backward.
    """
    xp = get_array_module(x)
    n, c, h, w = x.shape
    ho, wo, th, tw = tiles(h, w, padding)
    Bt, Gm, At = (xp.asarray(m, dtype=x.dtype) for m in (BT, G, AT))
    xpad = xp.zeros((n, c, 2 * th + 2, 2 * tw + 2), dtype=x.dtype)
    xpad[:, :, padding:padding + h, padding:padding + w] = x
    # d[i, j, n, c, y, x]: pixel (i, j) of the tile at tile row y, column x (stride 2, size 4)
    d = xp.stack([xp.stack([xpad[:, :, i:i + 2 * th:2, j:j + 2 * tw:2] for j in range(4)])
                  for i in range(4)])
    U = xp.einsum("ai,kcij,bj->abkc", Gm, W, Gm)             # G g Gᵀ
    V = xp.einsum("ai,ijncyx,bj->abncyx", Bt, d, Bt)         # Bᵀ d B
    M = xp.einsum("abkc,abncyx->abnkyx", U, V)               # ⊙, summed over c
    Y = xp.einsum("ia,abnkyx,jb->nkyixj", At, M, At)         # Aᵀ M A: output (2y + i, 2x + j)
    out = Y.reshape(n, W.shape[0], 2 * th, 2 * tw)[:, :, :ho, :wo]
    return xp.ascontiguousarray(out), (x.shape, padding, U, V)


def winograd_simple_backward(dout, cache):
    """Gradients of ``winograd_simple_forward``: each einsum's adjoint, in reverse order.

    dout: (N, K, Ho, Wo), not modified; cache from forward.
    Returns (dx (N, C, H, W), dW (K, C, 3, 3)), dout's dtype.
    """
    xp = get_array_module(dout)
    (n, c, h, w), padding, U, V = cache
    k, ho, wo = dout.shape[1:]
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    Bt, Gm, At = (xp.asarray(m, dtype=dout.dtype) for m in (BT, G, AT))
    dY = xp.zeros((n, k, 2 * th, 2 * tw), dtype=dout.dtype)
    dY[:, :, :ho, :wo] = dout                                 # cropped outputs: no gradient
    dM = xp.einsum("ia,nkyixj,jb->abnkyx", At, dY.reshape(n, k, th, 2, tw, 2), At)
    dU = xp.einsum("abnkyx,abncyx->abkc", dM, V)
    dV = xp.einsum("abkc,abnkyx->abncyx", U, dM)
    dW = xp.einsum("ai,abkc,bj->kcij", Gm, dU, Gm)            # Gᵀ dU G
    dd = xp.einsum("ai,abncyx,bj->ijncyx", Bt, dV, Bt)        # B dV Bᵀ
    dxpad = xp.zeros((n, c, 2 * th + 2, 2 * tw + 2), dtype=dout.dtype)
    for i, j in np.ndindex(4, 4):   # tiles overlap: their gradients add up
        dxpad[:, :, i:i + 2 * th:2, j:j + 2 * tw:2] += dd[i, j]
    return xp.ascontiguousarray(dxpad[:, :, padding:padding + h, padding:padding + w]), dW


def tiles(h, w, padding):
    """(Ho, Wo, th, tw): output size of a 3×3 stride-1 convolution and its 2×2 tile grid."""
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    if ho < 1 or wo < 1:
        raise ValueError(f"a 3x3 kernel with padding {padding} needs H >= {3 - 2 * padding} and "
                         f"W >= {3 - 2 * padding}, got an input of spatial size {h}x{w}")
    return ho, wo, (ho + 1) // 2, (wo + 1) // 2


def filter_transform(W):
    """U = G g Gᵀ for every filter: W (K, C, 3, 3) → U (4, 4, K, C), contiguous, W's dtype.

    U[a, b] = Σ_ij G[a, i] g[i, j] G[b, j], i.e. vec(U) = (G ⊗ G) vec(g): one small GEMM
    (K·C × 9)·(9 × 16) for all filters.
    """
    xp = get_array_module(W)
    if W.shape[2:] != (3, 3):
        raise ValueError(f"Winograd F(2x2, 3x3) needs 3x3 filters, got W of shape {tuple(W.shape)}")
    k, c = W.shape[:2]
    GG = xp.asarray(np.kron(G, G), dtype=W.dtype)           # (16, 9)
    return (GG @ W.reshape(k * c, 9).T).reshape(4, 4, k, c)


def _bt(d, out):
    """The four rows of Bᵀ d into ``out``: d0 - d2, d1 + d2, d2 - d1, d1 - d3 (in place)."""
    xp = get_array_module(d[0])
    xp.subtract(d[0], d[2], out=out[0])
    xp.add(d[1], d[2], out=out[1])
    xp.subtract(d[2], d[1], out=out[2])
    xp.subtract(d[1], d[3], out=out[3])


def input_transform(x, padding, out=None):
    """V = Bᵀ d B of every 4×4 input tile d: x (N, C, H, W) → V (4, 4, C, N·th·tw).

    padding: zero padding on each side; a negative one crops instead (the backward's full
    correlation of a layer padded by more than 2).  The padded input is extended at the
    bottom and right to 2·th + 2 rows and 2·tw + 2 columns, so that odd outputs fill whole
    tiles (the extra outputs are cropped by ``inverse_transform``).  out: optional contiguous
    (4, 4, C, N·th·tw) array of x's dtype to write V into (a buffer reused between calls).
    """
    xp = get_array_module(x)
    n, c, h, w = x.shape
    _, _, th, tw = tiles(h, w, padding)
    hp, wp = 2 * th + 2, 2 * tw + 2
    src = xp.zeros((c, n, hp, wp), dtype=x.dtype)   # (C, N, Hp, Wp): the batch joins the tiles
    r0, c0 = max(-padding, 0), max(-padding, 0)      # first row/column of x that is kept
    r1, c1 = min(h, hp - padding), min(w, wp - padding)
    src[:, :, r0 + padding:r1 + padding, c0 + padding:c1 + padding] = \
        x[:, :, r0:r1, c0:c1].transpose(1, 0, 2, 3)
    # rows first: row a of every tile is src[:, :, a::2] (tile stride 2, tile size 4)
    rows = xp.empty((4, c, n, th, wp), dtype=x.dtype)
    _bt([src[:, :, a:a + 2 * th:2] for a in range(4)], rows)
    shape = (4, 4, c, n * th * tw)
    if out is None:
        out = xp.empty(shape, dtype=x.dtype)
    elif out.shape != shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"input_transform out must be a contiguous {x.dtype} array of shape "
                         f"{shape}, got {out.dtype} {tuple(out.shape)}")
    V = out.reshape(4, 4, c, n, th, tw)
    for a in range(4):   # then columns, written straight into V[a, b]
        _bt([rows[a][..., b:b + 2 * tw:2] for b in range(4)], V[a])
    return out


def inverse_transform(M, n, ho, wo):
    """Y = Aᵀ m A of every tile: M (4, 4, K, N·th·tw) → out (N, K, Ho, Wo), contiguous.

    Odd Ho or Wo: the last tile row/column's extra outputs are cropped.
    """
    xp = get_array_module(M)
    k = M.shape[2]
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    M = M.reshape(4, 4, k, n, th, tw)
    rows = xp.empty((2, 4, k, n, th, tw), dtype=M.dtype)   # Aᵀ m: rows m0+m1+m2, m1-m2-m3
    xp.add(M[0], M[1], out=rows[0])
    rows[0] += M[2]
    xp.subtract(M[1], M[2], out=rows[1])
    rows[1] -= M[3]
    out = xp.empty((n, k, th, 2, tw, 2), dtype=M.dtype)
    for a in range(2):   # then (Aᵀ m) A, each 2×2 output written to its place in the image
        for b, (p, q, r, sign) in enumerate([(0, 1, 2, 1), (1, 2, 3, -1)]):
            dst = out[:, :, :, a, :, b].transpose(1, 0, 2, 3)   # (K, N, th, tw) view
            if sign > 0:
                xp.add(rows[a, p], rows[a, q], out=dst)
                dst += rows[a, r]
            else:
                xp.subtract(rows[a, p], rows[a, q], out=dst)
                dst -= rows[a, r]
    out = out.reshape(n, k, 2 * th, 2 * tw)
    if (2 * th, 2 * tw) != (ho, wo):
        out = xp.ascontiguousarray(out[:, :, :ho, :wo])
    return out


def winograd_forward(x, W, padding=1, U=None, workspace=None):
    """y[n, k] = Σ_c x[n, c] ⋆ W[k, c] (3×3, stride 1, zero padding) by F(2×2, 3×3).

    x: (N, C, H, W); W: (K, C, 3, 3), same dtype and device; U: W's ``filter_transform``
    when the caller already has it; workspace: optional buffer for V (see
    ``input_transform``).  Returns (out, V): out (N, K, Ho, Wo) contiguous, x's
    dtype; V (4, 4, C, P) the transformed input tiles that ``winograd_backward`` needs.
    """
    xp = get_array_module(x)
    n, c, h, w = x.shape
    k = W.shape[0]
    ho, wo, _, _ = tiles(h, w, padding)
    U = filter_transform(W) if U is None else U
    V = input_transform(x, padding, out=workspace)
    M = xp.matmul(U.reshape(16, k, c), V.reshape(16, c, -1))   # the 16 GEMMs (K×C)·(C×P)
    return inverse_transform(M.reshape(4, 4, k, -1), n, ho, wo), V


def winograd_backward(dout, V, W, x_shape, padding=1, input_grad=True):
    """Gradients of ``winograd_forward``.

    dout: (N, K, Ho, Wo) (not modified); V: (4, 4, C, P) from forward; W: (K, C, 3, 3);
    x_shape: (N, C, H, W).  input_grad: False skips dx and returns None for it.

    * dW: the adjoint of the forward's three steps, tile by tile: dM = A dY Aᵀ (each 2×2
      output gradient spread over a 4×4 tile), dU = dM · Vᵀ (16 GEMMs (K×P)·(P×C)), and
      dW = Gᵀ dU G.  2.25× fewer multiplies than im2col's dW GEMM, and no column matrix.
    * dx: dx[n, c] = Σ_k dout[n, k] ⋆ rot180(W[k, c]) with padding 2 - padding (a full
      correlation): ``winograd_forward`` on the flipped, channel-transposed filters.

    Returns (dx (N, C, H, W) or None, dW (K, C, 3, 3)), dout's dtype.
    """
    xp = get_array_module(dout)
    n, k, ho, wo = dout.shape
    c = x_shape[1]
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    # dY tiles (K, N, th, 2, tw, 2); an odd output's missing row/column is zero
    dy = xp.zeros((k, n, th, 2, tw, 2), dtype=dout.dtype)
    dy.reshape(k, n, 2 * th, 2 * tw)[:, :, :ho, :wo] = dout.transpose(1, 0, 2, 3)
    # dM = A dY Aᵀ; A's rows are (1, 0), (1, 1), (1, -1), (0, -1)
    rows = xp.empty((4, 2, k, n, th, tw), dtype=dout.dtype)
    for s in range(2):
        d0, d1 = dy[:, :, :, 0, :, s], dy[:, :, :, 1, :, s]
        rows[0, s] = d0
        xp.add(d0, d1, out=rows[1, s])
        xp.subtract(d0, d1, out=rows[2, s])
        xp.negative(d1, out=rows[3, s])
    dM = xp.empty((4, 4, k, n, th, tw), dtype=dout.dtype)
    for a in range(4):
        e0, e1 = rows[a, 0], rows[a, 1]
        dM[a, 0] = e0
        xp.add(e0, e1, out=dM[a, 1])
        xp.subtract(e0, e1, out=dM[a, 2])
        xp.negative(e1, out=dM[a, 3])
    del rows, dy
    dM = dM.reshape(16, k, -1)
    dU = xp.matmul(dM, V.reshape(16, c, -1).transpose(0, 2, 1))   # (16, K, C)
    del dM
    GG = xp.asarray(np.kron(G, G), dtype=dout.dtype)        # Gᵀ dU G = (G ⊗ G)ᵀ vec(dU)
    dW = (dU.reshape(16, k * c).T @ GG).reshape(k, c, 3, 3)
    if not input_grad:
        return None, dW
    flipped = xp.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))   # (C, K, 3, 3)
    dx, _ = winograd_forward(dout, flipped, padding=2 - padding)
    return dx, dW
