"""load_rgb: every Pillow mode ends as exact (or JPEG-close) 8-bit RGB; bad files raise."""
import os

import numpy as np
import pytest
from PIL import Image

from minicompact.data.images import BadImageError, load_rgb


def _save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_rgb_jpeg_is_resized_uint8(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)),
                 tmp_path / "a.jpg")
    out = load_rgb(path, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert load_rgb(path, None).shape == (30, 50, 3)


@pytest.mark.parametrize("name", ["a.JPG", "b.jpeg", "c.JPEG"])
def test_extension_spellings(tmp_path, name):
    path = _save(Image.new("RGB", (8, 8), (200, 10, 10)), tmp_path / name, format="JPEG")
    assert np.abs(load_rgb(path, 8).astype(int) - [200, 10, 10]).max() <= 6


def test_jpeg_draft_matches_full_decode(tmp_path):
    """Decode-time downscaling stays close to decoding at full size and resizing."""
    y, x = np.mgrid[0:384, 0:512]
    arr = np.stack([y * 255 // 383, x * 255 // 511, (x + y) * 255 // 894], -1).astype(np.uint8)
    path = _save(Image.fromarray(arr), tmp_path / "big.jpg", quality=95)
    fast = load_rgb(path, 64).astype(int)
    with Image.open(path) as img:
        slow = np.asarray(img.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(fast - slow).mean() < 2.0


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    path = _save(img, tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    out = load_rgb(path, 8)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 8


def test_greyscale_l_and_1bit(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = load_rgb(_save(Image.fromarray(grey, mode="L"), tmp_path / "g.png"), 8)
    assert np.array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))
    bits = Image.fromarray(np.eye(8, dtype=bool))
    assert bits.mode == "1"
    out = load_rgb(_save(bits, tmp_path / "b.png"), 8)
    assert np.array_equal(out, np.repeat(np.eye(8, dtype=np.uint8)[:, :, None] * 255, 3, 2))


def test_palette_with_transparency_composites_on_white(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    img.paste(1, (4, 0, 8, 8))                          # right half red
    path = _save(img, tmp_path / "p.png", transparency=0)  # index 0 transparent
    out = load_rgb(path, 8)
    assert np.all(out[:, :4] == 255) and np.all(out[:, 4:] == [255, 0, 0])
    gif = _save(img, tmp_path / "p.gif", transparency=0)
    assert np.array_equal(load_rgb(gif, 8), out)


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert np.all(load_rgb(_save(img, tmp_path / "p.png"), 4) == [10, 20, 30])


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[:, 0] = [10, 20, 30, 255]   # opaque: kept
    rgba[:, 1] = [10, 20, 30, 0]     # transparent: white
    rgba[:, 2] = [0, 0, 0, 128]      # half black over white: 255 * 127 / 255 = 127
    out = load_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"), None)
    assert np.array_equal(out[0], [[10, 20, 30], [255, 255, 255], [127, 127, 127]])
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    out = load_rgb(_save(la, tmp_path / "la.png"), None)
    assert np.array_equal(out[0], [[10] * 3, [255] * 3, [127] * 3])


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")
    out = load_rgb(path, 8)
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(out, np.repeat(expected[:, :, None], 3, axis=2))
    assert out.max() == 255 and out.min() == 0 and len(np.unique(out)) == 64


def test_exif_orientation_is_optional(tmp_path):
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees
    path = _save(Image.fromarray(arr), tmp_path / "o.png", exif=exif)
    assert load_rgb(path, None)[0, 0, 0] == 255
    turned = load_rgb(path, None, exif_transpose=True)
    assert turned[7, 7, 0] == 255 and turned[0, 0, 0] == 0


def _truncated_jpeg(path):
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(path, quality=90)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "folder", "missing"])
def test_bad_files_raise_bad_image_error_with_path(tmp_path, kind):
    path = tmp_path / f"bad_{kind}.jpg" if kind != "text" else tmp_path / "bad_text.png"
    if kind == "truncated":
        _truncated_jpeg(path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("definitely not a PNG")
    elif kind == "folder":
        os.makedirs(path)
    with pytest.raises(BadImageError) as info:
        load_rgb(str(path), 16)
    assert info.value.path == str(path) and str(path) in str(info.value)
    assert info.value.reason


def test_fifo_is_a_bad_image_not_a_hang(tmp_path):
    """Issue 10, case 8: opening a FIFO named *.jpg blocked forever waiting for a writer."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    import signal
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)

    def hung(signum, frame):
        raise TimeoutError("load_rgb blocked on a FIFO")
    old = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 5)
    try:
        with pytest.raises(BadImageError, match="not a regular file"):
            load_rgb(str(fifo), 8)
        with pytest.raises(BadImageError, match="a folder"):
            load_rgb(str(tmp_path), 8)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_error_names_the_file(tmp_path):
    (tmp_path / "t.png").write_text("not an image")
    with pytest.raises(BadImageError) as info:
        load_rgb(str(tmp_path / "t.png"), 8)
    assert repr(str(tmp_path / "t.png")) in info.value.reason and "BufferedReader" not in info.value.reason
