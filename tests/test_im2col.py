"""im2col / col2im: the column layout, adjointness, dtype and error handling."""
import numpy as np
import pytest

from minicompact.backend import to_cpu
from minicompact.im2col import col2im, im2col, output_size

CASES = [  # (N, C, H, W, kh, kw, stride, padding)
    (1, 1, 5, 5, 3, 3, 1, 0),
    (2, 3, 9, 7, 3, 3, 1, 1),
    (3, 2, 9, 7, 3, 3, 2, 1),
    (2, 2, 8, 6, 7, 7, 2, 3),
    (1, 2, 7, 9, 2, 3, 3, 0),
]


def test_output_size():
    assert output_size(28, 3, 1, 1) == 28   # 3x3, stride 1, pad 1 keeps the size
    assert output_size(28, 3, 2, 1) == 14   # stride 2 halves it
    assert output_size(7, 3, 2, 1) == 4
    assert output_size(224, 7, 2, 3) == 112
    assert output_size(5, 7, 1, 0) < 1


@pytest.mark.parametrize("case", CASES)
def test_im2col_matches_definition(case, xp):
    n, c, h, w, kh, kw, s, p = case
    x = np.random.default_rng(0).standard_normal((n, c, h, w))
    cols = to_cpu(im2col(xp.asarray(x), kh, kw, s, p))
    ho, wo = output_size(h, kh, s, p), output_size(w, kw, s, p)
    xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    want = np.empty((c * kh * kw, n * ho * wo))
    for ci in range(c):
        for i in range(kh):
            for j in range(kw):
                for ni in range(n):
                    for y in range(ho):
                        for xx in range(wo):
                            want[(ci * kh + i) * kw + j, (ni * ho + y) * wo + xx] = \
                                xpad[ni, ci, y * s + i, xx * s + j]
    np.testing.assert_array_equal(cols, want)


@pytest.mark.parametrize("case", CASES)
def test_col2im_is_the_adjoint_of_im2col(case, xp):
    """<im2col(x), c> == <x, col2im(c)> for random x and c: col2im is the exact transpose."""
    n, c, h, w, kh, kw, s, p = case
    rng = np.random.default_rng(1)
    x = xp.asarray(rng.standard_normal((n, c, h, w)))
    cols = im2col(x, kh, kw, s, p)
    cc = xp.asarray(rng.standard_normal(cols.shape))
    dx = col2im(cc, x.shape, kh, kw, s, p)
    assert dx.shape == x.shape
    lhs, rhs = float((cols * cc).sum()), float((x * dx).sum())
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs)) + 1e-12


def test_col2im_counts_overlapping_windows():
    """3x3, stride 1, pad 1: an interior pixel lies in 9 windows, a corner in 4, an edge in 6."""
    x = np.ones((1, 1, 4, 5))
    counts = col2im(im2col(x, 3, 3, 1, 1), x.shape, 3, 3, 1, 1)[0, 0]
    assert counts[0, 0] == 4 and counts[0, 2] == 6 and counts[2, 2] == 9


def test_float32_stays_float32(xp):
    x = xp.ones((2, 3, 6, 6), dtype=xp.float32)
    cols = im2col(x, 3, 3, 2, 1)
    assert cols.dtype == xp.float32
    assert col2im(cols, x.shape, 3, 3, 2, 1).dtype == xp.float32


def test_out_buffer_is_used_and_checked():
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 5)).astype(np.float32)
    buf = np.empty((27, 2 * 25), dtype=np.float32)
    assert im2col(x, 3, 3, 1, 1, out=buf) is buf
    np.testing.assert_array_equal(buf, im2col(x, 3, 3, 1, 1))
    with pytest.raises(ValueError, match=r"\(27, 50\)"):
        im2col(x, 3, 3, 1, 1, out=np.empty((27, 49), dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        im2col(x, 3, 3, 1, 1, out=np.empty((27, 50)))


def test_input_smaller_than_kernel_is_rejected():
    with pytest.raises(ValueError, match="5x5"):
        im2col(np.zeros((1, 1, 5, 5)), 7, 7, 1, 0)
    with pytest.raises(ValueError, match=r"\(9, 16\)"):
        col2im(np.zeros((9, 5)), (1, 1, 4, 4), 3, 3, 1, 1)
