"""Decode one image file into a fixed-size uint8 RGB array (paper sec. 5.1, first step).

"First, we downsize all images to 256 x 256 pixels": ``load_rgb(path, 256)`` returns a
``(256, 256, 3)`` uint8 array.  The aspect ratio is not kept (the paper's wording, and
Krizhevsky et al.'s procedure).

Decisions:

* JPEGs are decoded in Pillow's *draft* mode: libjpeg scales by 1/2, 1/4 or 1/8 during the
  DCT while staying at least ``resize`` pixels on both sides, which makes a 500x375
  ImageNet JPEG several times cheaper to decode; the antialiased bilinear resize finishes
  the job.
* Every Pillow mode ends as 8-bit RGB: CMYK and YCbCr are converted, greyscale (L, 1) is
  replicated to three channels, palette images are expanded, 16-bit greyscale (I;16*, I)
  is *scaled* from 0..65535 to 0..255 (round(v * 255 / 65535)), not clipped.
* Transparency (RGBA, LA, PA, P with a transparent index) is composited on **white**, the
  background such images (logos, product shots) are drawn for; black would swallow dark
  foregrounds.  Compositing happens at full size, before the resize, so transparent pixels'
  hidden colours cannot bleed into the result.
* EXIF orientation is ignored by default (as torchvision's ImageNet reference does);
  ``exif_transpose=True`` applies it.
* Anything that fails to decode raises ``BadImageError`` naming the file; the loader skips
  such files and counts them.  Only regular files are opened, and never in a way that
  blocks: a FIFO named ``*.jpg`` is a bad image, not a hang.
"""
import os
import stat

import numpy as np
from PIL import Image, ImageOps

_BILINEAR = Image.Resampling.BILINEAR  # antialiased when downscaling (support grows with scale)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class BadImageError(Exception):
    """A file that cannot be decoded to an image.  ``.path`` and ``.reason`` say which and why."""

    def __init__(self, path, reason):
        super().__init__(path, reason)  # both in args, so the error pickles across processes
        self.path, self.reason = str(path), str(reason)

    def __str__(self):
        return f"cannot decode image {self.path}: {self.reason}"


def _sixteen_bit_to_l(img):
    """16-bit (or 32-bit int) greyscale -> mode "L", scaling 0..65535 to 0..255 with rounding."""
    v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)  # mode "I" may hold wider ints
    return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def _composite_on_white(img):
    """Any image with an alpha channel -> RGB, alpha-blended over white."""
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)  # uint16 holds 255*255 exactly
    rgb, a = rgba[..., :3], rgba[..., 3:]
    out = (rgb * a + 255 * (255 - a) + 127) // 255  # rounded (rgb*a + 255*(255-a)) / 255
    return Image.fromarray(out.astype(np.uint8), mode="RGB")


def to_rgb(img):
    """Convert a Pillow image of any mode to mode "RGB" (see the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT:
        return _sixteen_bit_to_l(img).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        return _composite_on_white(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F (clipped to 0..255)


def _open_regular(path):
    """Open ``path`` for reading, refusing anything but a regular file without blocking.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the
    ``fstat`` of the opened descriptor (not of the name, which could change in between)
    then rejects FIFOs, sockets and devices.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (FIFO, socket or device)"
            raise OSError(f"{kind}")
        f = os.fdopen(fd, "rb")
        f.raw.name = os.fspath(path)  # for Pillow's messages, which name the file
        return f
    except BaseException:
        os.close(fd)
        raise


def load_rgb(path, resize, exif_transpose=False):
    """Decode ``path`` and downsize it to ``resize x resize`` RGB.

    path: image file.
    resize: side of the output in pixels (paper: 256), or None to keep the original size.
    exif_transpose: apply the EXIF orientation tag first.
    Returns uint8 array of shape (resize, resize, 3) (or (H, W, 3) when ``resize`` is None).
    Raises ``BadImageError`` when the file is missing, empty, truncated, not an image, a
    folder or not a regular file.
    """
    f = None
    try:
        f = _open_regular(path)
        with f, Image.open(f) as img:
            if resize is not None and img.format == "JPEG":
                img.draft("RGB", (resize, resize))  # decode-time downscale, >= resize per side
            img.load()  # decode now, inside the try: truncated files fail here
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
            if resize is not None and img.size != (resize, resize):
                img = img.resize((resize, resize), _BILINEAR)
            out = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - malformed files raise all kinds of errors
        if isinstance(exc, MemoryError):
            raise
        text = str(exc) if f is None else str(exc).replace(repr(f), repr(os.fspath(path)))
        raise BadImageError(path, f"{type(exc).__name__}: {text}") from None
    if out.shape[2:] != (3,):  # defensive: to_rgb always yields 3 channels
        raise BadImageError(path, f"decoded to shape {out.shape}, expected (H, W, 3)")
    return out
