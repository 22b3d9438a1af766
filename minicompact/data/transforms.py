"""Crops, flips and normalisation of paper sec. 5.1 ("Data Augmentation"), vectorised.

Layouts: decoded images are **NHWC uint8** ``(N, R, R, 3)`` (as Pillow and the cache store
them); every crop function takes NHWC (or one HWC image) and returns **NCHW uint8**, the
layout of the model, so the transpose happens once, on one byte per value.  ``normalize``
then turns NCHW uint8 into float32 on the model's device.

* Training: one random ``crop x crop`` window and a random horizontal flip per image, a
  different one each time the image is used (``random_crop_flip`` / ``crop_flip`` with
  ``hashed_crop_params``, which makes the draw a pure function of (seed, epoch, sample)).
* Testing: ``center_crop``, or ``ten_crop``: four corners + centre and their mirrors,
  whose predictions are averaged.
* ``scaled_sizes``: the paper's 256 -> 224 ratio for other image sizes.
"""
import numpy as np

from ..backend import get_array_module, to_cpu
from .images import BadImageError, load_rgb

TEN_CROP_ORDER = ("top-left", "top-right", "bottom-left", "bottom-right", "center",
                  "top-left mirrored", "top-right mirrored", "bottom-left mirrored",
                  "bottom-right mirrored", "center mirrored")


# The largest network input minicompact accepts, in pixels per side: the one bound on image
# sizes (training, --evaluate, --finetune, --thin and --features all pass through
# ``scaled_sizes``).  The paper uses 224; 2048 leaves room for fine-grained targets at 4-8x
# that, while one 2048-px image is still small (about 50 MB as float32, 2341-px resize).
# Without a bound a typo such as 60000 makes Pillow's resize and the first batch ask for tens
# of GB: the process grows until the kernel kills it, with no message.
MAX_IMAGE_SIZE = 2048


def scaled_sizes(image_size, resize=None):
    """``(resize, crop)`` for a network input of ``image_size`` pixels.

    crop = image_size; resize = floor(image_size * 256 / 224 + 0.5) (round half up), the
    paper's 256/224 ratio: 224 -> 256, 112 -> 128, 64 -> 73, 32 -> 37.  ``resize`` overrides
    it (it must be at least ``image_size``).  Raises ``ValueError`` (one line) for an
    ``image_size`` outside [1, MAX_IMAGE_SIZE].
    """
    crop = int(image_size)
    if crop < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if crop > MAX_IMAGE_SIZE:
        raise ValueError(f"image size {crop} is above {MAX_IMAGE_SIZE} px, the largest minicompact "
                         f"accepts (the paper uses 224; a batch of 64 such images alone is "
                         f"{64 * 3 * 4 * crop * crop / 2**30:,.1f} GiB as float32)")
    if resize is None:
        resize = (crop * 256 + 112) // 224  # integer round-half-up of crop * 256 / 224
    if int(resize) < crop:
        raise ValueError(f"resize ({resize}) must be >= the crop size ({crop})")
    return int(resize), crop


def _as_batch(images, crop):
    """NHWC view of ``images`` ((N, H, W, 3) or (H, W, 3)) and whether it was one image."""
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.ndim != 4 or batch.shape[3] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3) or (H, W, 3), "
                         f"got {images.shape}")
    if batch.shape[1] < crop or batch.shape[2] < crop:
        raise ValueError(f"crop {crop} is larger than the images, shape {images.shape}")
    return batch, single


def _mix64(x):
    """SplitMix64 finaliser: a bijective uint64 hash (wrapping arithmetic is intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_crop_params(seed, epoch, indices, size, crop):
    """Crop offsets and flips as a pure function of (seed, epoch, sample index).

    The same sample gets the same crop in the same epoch whatever the batch it lands in,
    the number of workers or where a resumed epoch starts; a new epoch draws a new crop.

    indices: (N,) int dataset indices of the images.
    size: (H, W) of the images.
    Returns (oy, ox, flip): (N,) int64 top and left offsets in [0, H-crop] and [0, W-crop],
    (N,) bool horizontal flips.
    """
    idx = np.asarray(indices, dtype=np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        key = _mix64(_mix64(np.array([seed], dtype=np.uint64)) + np.uint64(epoch))
        draws = [_mix64(key ^ _mix64(idx * np.uint64(3) + np.uint64(k))) for k in range(3)]
    h, w = size
    oy = (draws[0] % np.uint64(h - crop + 1)).astype(np.int64)
    ox = (draws[1] % np.uint64(w - crop + 1)).astype(np.int64)
    flip = (draws[2] >> np.uint64(63)).astype(bool)
    return oy, ox, flip


def crop_flip(images, crop, oy, ox, flip):
    """Cut one ``crop x crop`` window per image at given offsets, mirroring where asked.

    No per-image loop and no per-pixel index arithmetic: a strided view lists every window
    of every image, shape (N, H-crop+1, W-crop+1, crop, crop, 3), without copying; indexing
    it with (n, oy, ox) copies N whole windows, row by contiguous row.  Transposed copies
    then write them into the NCHW output, the mirrored ones with reversed columns.  (Gathering
    pixel by pixel with broadcast row and column indices would build and read an index per
    pixel instead of copying contiguous rows.)

    images: (N, H, W, 3) uint8 (NHWC).
    oy, ox: (N,) int top/left offsets; flip: (N,) bool.
    Returns (N, 3, crop, crop) uint8, C-contiguous (NCHW).
    """
    batch, _ = _as_batch(images, crop)
    xp = get_array_module(batch)
    n, h, w, _ = batch.shape
    if not len(oy) == len(ox) == len(flip) == n:
        raise ValueError(f"need one offset and flip per image: images {images.shape}, "
                         f"oy {len(oy)}, ox {len(ox)}, flip {len(flip)}")
    sn, sh, sw, sc = batch.strides
    windows = xp.lib.stride_tricks.as_strided(
        batch, shape=(n, h - crop + 1, w - crop + 1, crop, crop, 3),
        strides=(sn, sh, sw, sh, sw, sc))  # read only: windows overlap in memory
    picked = windows[xp.arange(n), xp.asarray(oy), xp.asarray(ox)].transpose(0, 3, 1, 2)
    flip = xp.asarray(flip, dtype=bool)
    out = xp.empty((n, 3, crop, crop), dtype=batch.dtype)
    out[~flip] = picked[~flip]
    out[flip] = picked[flip][..., ::-1]
    return out


def random_crop_flip(images, crop, rng):
    """A random ``crop x crop`` window and a random horizontal flip per image (sec. 5.1).

    images: (N, H, W, 3) uint8 NHWC batch, or one (H, W, 3) image.
    rng: numpy Generator the offsets and flips are drawn from.
    Returns (N, 3, crop, crop) uint8 NCHW, or (3, crop, crop) for one image.
    """
    batch, single = _as_batch(images, crop)
    n, h, w, _ = batch.shape
    oy = rng.integers(0, h - crop + 1, size=n)
    ox = rng.integers(0, w - crop + 1, size=n)
    flip = rng.random(n) < 0.5
    out = crop_flip(batch, crop, oy, ox, flip)
    return out[0] if single else out


def center_crop(images, crop):
    """The central ``crop x crop`` window (offset floor((H - crop) / 2)).

    images: (N, H, W, 3) uint8 NHWC, or one (H, W, 3) image.
    Returns (N, 3, crop, crop) uint8 NCHW, or (3, crop, crop) for one image.
    """
    batch, single = _as_batch(images, crop)
    xp = get_array_module(batch)
    h, w = batch.shape[1:3]
    cy, cx = (h - crop) // 2, (w - crop) // 2
    out = xp.ascontiguousarray(batch[:, cy:cy + crop, cx:cx + crop].transpose(0, 3, 1, 2))
    return out[0] if single else out


def ten_crop(images, crop):
    """Four corners, centre and the horizontal mirror of each: the paper's 10 test crops.

    Order (``TEN_CROP_ORDER``): top-left, top-right, bottom-left, bottom-right, centre, then
    crop k+5 is crop k mirrored.  (torchvision's crop 6 is the top-left crop of the mirrored
    image, i.e. our crop 7; the set is the same, and predictions are averaged anyway.)

    images: (N, H, W, 3) uint8 NHWC, or one (H, W, 3) image.
    Returns (N, 10, 3, crop, crop) uint8, or (10, 3, crop, crop) for one image.
    """
    batch, single = _as_batch(images, crop)
    xp = get_array_module(batch)
    n, h, w, _ = batch.shape
    cy, cx = (h - crop) // 2, (w - crop) // 2  # centre rounds towards the top-left
    corners = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), (cy, cx)]
    out = xp.empty((n, 10, 3, crop, crop), dtype=batch.dtype)
    for k, (y, x) in enumerate(corners):  # five fixed windows, each a whole-batch copy
        window = batch[:, y:y + crop, x:x + crop].transpose(0, 3, 1, 2)
        out[:, k] = window
        out[:, k + 5] = window[..., ::-1]
    return out[0] if single else out


def normalize(images, mean, std, xp=np):
    """Per-channel normalisation ``(x / 255 - mean) / std`` on ``xp``'s device, float32.

    Call it in the main process: uint8 travels to the GPU (4x fewer bytes than float32) and
    the conversion runs there.  Computed as ``x * (1 / (255 std)) - mean / std``, in float32.

    images: (..., 3, H, W) uint8 NCHW, e.g. (N, 3, H, W) or (N, 10, 3, H, W).
    mean, std: (3,) per-channel statistics of x / 255 (see ``estimate_mean_std``).
    xp: numpy or cupy, the device of the result.
    Returns float32 array of the same shape on ``xp``'s device.
    """
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"expected uint8 images of shape (..., 3, H, W), got {images.shape}")
    mean = to_cpu(mean).astype(np.float64).reshape(3)  # tiny: the arithmetic stays on the host
    std = to_cpu(std).astype(np.float64).reshape(3)
    if np.any(std <= 0):
        raise ValueError(f"std must be positive, got {std}")
    scale = xp.asarray((1.0 / (255.0 * std)).astype(np.float32).reshape(3, 1, 1))
    shift = xp.asarray((-mean / std).astype(np.float32).reshape(3, 1, 1))
    out = xp.asarray(images).astype(xp.float32)  # one new array; the rest is in place
    out *= scale
    out += shift
    return out


def estimate_mean_std(dataset, resize, max_images=2000, seed=0, cache=None):
    """Per-channel mean and std of x / 255 over a random sample of training images.

    The statistics are over every pixel of the resized images (exact integer sums), from
    ``max_images`` images drawn without replacement; unreadable files are left out.

    dataset: an ImageFolder (anything with ``.samples``, a list of (path, label)).
    resize: the side the images are downsized to (as in training).
    cache: an ``ImageCache`` of the same dataset and size, read instead of decoding.
    Returns (mean, std): (3,) float32 arrays, in units of x / 255.
    """
    n = len(dataset.samples)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=min(max_images, n), replace=False))
    total = np.zeros(3, dtype=np.uint64)
    total_sq = np.zeros(3, dtype=np.uint64)
    pixels = 0
    for i in chosen:  # one file at a time: this is decoding, not a hot path
        try:
            img = cache.get(i) if cache is not None else load_rgb(dataset.samples[i][0], resize)
        except BadImageError:
            continue
        flat = img.reshape(-1, 3).astype(np.uint64)
        total += flat.sum(axis=0)
        total_sq += (flat * flat).sum(axis=0)
        pixels += flat.shape[0]
    if pixels == 0:
        raise ValueError("estimate_mean_std: none of the sampled images could be decoded")
    mean = total / pixels
    var = np.maximum(total_sq / pixels - mean * mean, 0.0)
    return (mean / 255).astype(np.float32), (np.sqrt(var) / 255).astype(np.float32)
