"""Crops on images whose pixels encode their own coordinates, normalisation and statistics."""
import numpy as np
import pytest
from PIL import Image

from minicompact.backend import to_cpu
from minicompact.data.transforms import (TEN_CROP_ORDER, center_crop, crop_flip,
                                         estimate_mean_std, hashed_crop_params, normalize,
                                         random_crop_flip, scaled_sizes, ten_crop)


def coord_images(n, h, w):
    """(n, h, w, 3) uint8 NHWC: channel 0 = row, 1 = column, 2 = image number."""
    y, x = np.mgrid[0:h, 0:w]
    one = np.stack([y, x, np.zeros_like(y)], axis=-1)
    out = np.repeat(one[None], n, axis=0)
    out[..., 2] = np.arange(n)[:, None, None]
    return out.astype(np.uint8)


def window(h, w, crop, oy, ox, mirror):
    """Expected (3, crop, crop) crop of a single coord image with its number 0."""
    rows = oy + np.arange(crop)
    cols = ox + np.arange(crop)
    cols = cols[::-1] if mirror else cols
    return np.stack([np.repeat(rows[:, None], crop, 1), np.repeat(cols[None], crop, 0),
                     np.zeros((crop, crop), int)]).astype(np.uint8)


def test_scaled_sizes():
    assert scaled_sizes(224) == (256, 224)
    assert scaled_sizes(32) == (37, 32)
    assert scaled_sizes(64) == (73, 64)
    assert scaled_sizes(112) == (128, 112)
    assert scaled_sizes(32, resize=40) == (40, 32)
    with pytest.raises(ValueError, match="resize"):
        scaled_sizes(32, resize=30)
    assert scaled_sizes(2048) == (2341, 2048)  # the one bound on image sizes (issue 26)
    with pytest.raises(ValueError, match="above 2048 px"):
        scaled_sizes(2049)


def test_ten_crop_geometry_and_order():
    h, w, c = 9, 12, 4  # not square, so swapped axes fail
    imgs = coord_images(2, h, w)
    out = ten_crop(imgs, c)
    assert out.shape == (2, 10, 3, c, c) and out.dtype == np.uint8 and out.flags.c_contiguous
    cy, cx = (h - c) // 2, (w - c) // 2
    corners = [(0, 0), (0, w - c), (h - c, 0), (h - c, w - c), (cy, cx)]
    assert (cy, cx) == (2, 4) and len(TEN_CROP_ORDER) == 10
    for k, (oy, ox) in enumerate(corners):
        for mirror in (False, True):
            expect = window(h, w, c, oy, ox, mirror)
            got = out[:, k + 5 * mirror]
            assert np.array_equal(got[0], expect), (TEN_CROP_ORDER[k + 5 * mirror])
            assert np.array_equal(got[1, :2], expect[:2]) and np.all(got[1, 2] == 1)
    assert ten_crop(imgs[0], c).shape == (10, 3, c, c)
    assert np.array_equal(ten_crop(imgs[0], c), out[0])


def test_center_crop_geometry():
    imgs = coord_images(3, 9, 12)
    out = center_crop(imgs, 4)
    assert out.shape == (3, 3, 4, 4) and out.flags.c_contiguous
    assert np.array_equal(out[0], window(9, 12, 4, 2, 4, False))
    assert np.array_equal(center_crop(imgs[0], 4), out[0])
    with pytest.raises(ValueError, match=r"\(3, 9, 12, 3\)"):
        center_crop(imgs, 10)


def test_crop_flip_exact_positions():
    imgs = coord_images(3, 9, 12)
    oy, ox, flip = np.array([0, 5, 2]), np.array([8, 0, 3]), np.array([False, True, True])
    out = crop_flip(imgs, 4, oy, ox, flip)
    assert out.shape == (3, 3, 4, 4) and out.flags.c_contiguous
    for i in range(3):
        expect = window(9, 12, 4, oy[i], ox[i], flip[i])
        assert np.array_equal(out[i, :2], expect[:2]) and np.all(out[i, 2] == i)


def _offsets_of(crops):
    """Recover (oy, ox, flip) from NCHW crops of coord images and check they are windows."""
    rows, cols = crops[:, 0].astype(int), crops[:, 1].astype(int)
    c = crops.shape[-1]
    oy = rows[:, 0, 0]
    flip = cols[:, 0, 0] > cols[:, 0, -1]
    ox = np.where(flip, cols[:, 0, -1], cols[:, 0, 0])
    ar = np.arange(c)
    assert np.array_equal(rows, np.broadcast_to((oy[:, None] + ar)[:, :, None], rows.shape))
    expect_cols = ox[:, None] + np.where(flip[:, None], ar[::-1], ar)
    assert np.array_equal(cols, np.broadcast_to(expect_cols[:, None, :], cols.shape))
    return oy, ox, flip


def test_random_crop_flip_in_bounds_and_varied():
    h, w, c = 10, 13, 6
    imgs = coord_images(400, h, w)
    out = random_crop_flip(imgs, c, np.random.default_rng(0))
    assert out.shape == (400, 3, c, c)
    oy, ox, flip = _offsets_of(out)
    assert np.array_equal(out[:, 2, 0, 0], np.arange(400) % 256)  # each image its own crop
    assert oy.min() == 0 and oy.max() == h - c and ox.min() == 0 and ox.max() == w - c
    assert 120 < flip.sum() < 280
    assert random_crop_flip(imgs[0], c, np.random.default_rng(1)).shape == (3, c, c)


def test_hashed_crop_params_pure_in_range_and_epoch_dependent():
    idx = np.arange(1000)
    oy, ox, flip = hashed_crop_params(7, 3, idx, (37, 40), 32)
    assert oy.min() == 0 and oy.max() == 5 and ox.min() == 0 and ox.max() == 8
    assert 400 < flip.sum() < 600
    # a sample's crop does not depend on its batch-mates
    sub = hashed_crop_params(7, 3, idx[[999, 5, 42]], (37, 40), 32)
    for a, b in zip(sub, (oy, ox, flip)):
        assert np.array_equal(a, b[[999, 5, 42]])
    for other in (hashed_crop_params(7, 4, idx, (37, 40), 32),
                  hashed_crop_params(8, 3, idx, (37, 40), 32)):
        same = (other[0] == oy) & (other[1] == ox) & (other[2] == flip)
        assert same.mean() < 0.1  # 1/(6*9*2) expected by chance
    again = hashed_crop_params(7, 3, idx, (37, 40), 32)
    assert all(np.array_equal(a, b) for a, b in zip(again, (oy, ox, flip)))


def test_normalize_values_dtype_and_device(xp):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 3, 4, 5), dtype=np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = normalize(x, mean, std, xp)
    assert isinstance(out, xp.ndarray) and out.dtype == np.float32 and out.shape == x.shape
    expect = (x / 255.0 - mean[:, None, None]) / std[:, None, None]
    assert np.abs(to_cpu(out) - expect).max() < 1e-5
    ten = normalize(np.stack([x, x], axis=1), mean, std, xp)  # (N, 10-like, 3, H, W)
    assert ten.shape == (2, 2, 3, 4, 5) and np.allclose(to_cpu(ten[:, 1]), to_cpu(out))
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 3\)"):
        normalize(x.transpose(0, 2, 3, 1), mean, std, xp)


class _Samples:
    def __init__(self, samples):
        self.samples = samples


def test_estimate_mean_std_exact_on_solid_images(tmp_path):
    samples = []
    for i, colour in enumerate([(0, 128, 255), (255, 128, 0)]):
        path = str(tmp_path / f"{i}.png")
        Image.new("RGB", (6, 4), colour).save(path)
        samples.append((path, 0))
    bad = str(tmp_path / "bad.png")
    open(bad, "w").write("nope")
    mean, std = estimate_mean_std(_Samples(samples + [(bad, 0)]), 5, max_images=10)
    assert mean.dtype == np.float32 and std.shape == (3,)
    assert np.allclose(mean, np.array([127.5, 128, 127.5]) / 255, atol=1e-7)
    assert np.allclose(std, np.array([127.5, 0, 127.5]) / 255, atol=1e-7)
    one_mean, _ = estimate_mean_std(_Samples(samples), 5, max_images=1, seed=3)
    assert np.allclose(one_mean * 255, (0, 128, 255)) or np.allclose(one_mean * 255, (255, 128, 0))
