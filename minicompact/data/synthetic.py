"""The embedded default dataset: procedurally drawn shapes, saved as JPEGs in ImageNet layout.

``python run.py`` with no ``--data`` trains on this, so the project runs anywhere without a
download.  The layout is the one an ImageNet loader expects::

    ROOT/train/<class>/0000.jpg ...
    ROOT/val/<class>/0000.jpg ...
    ROOT/synthetic.json             marker: parameters + version; present only when complete

Each image is one object drawn on a plain background.  The class is the object's *local
structure* (filled disc, ring, square outline, triangle, plus, X, horizontal stripes,
vertical stripes, checkerboard); everything else is a nuisance drawn independently of the
class: position, scale, rotation, foreground and background colours, a background
illumination gradient, a few small clutter dots and pixel noise.  Because the two colours
are drawn from the same distribution and may swap, every class has the same mean image, so
a linear model on raw pixels stays near chance, while a few layers of local filters, a
non-linearity and pooling (a small CNN) separate the classes easily.

Shapes are drawn from signed distance functions on a coordinate grid (negative inside,
``alpha = clip(0.5 - d, 0, 1)`` gives one pixel of anti-aliasing), so drawing is
vectorised over pixels; the loop over images runs once, when the dataset is made.

Defaults (``DEFAULTS``): 8 classes x (300 train + 50 val) images of 32x32, 4 MB of JPEGs
(12 MB on disk in 4 KiB blocks) -- small enough to make in seconds and for a tiny CNN to see
several epochs on a laptop CPU.  Measured (tests/test_synthetic.py): ridge
regression on raw pixels reaches ~20 % val accuracy (chance 12.5 %); the same classifier on
untrained random conv filters + ReLU + global pooling reaches ~70 %.
"""
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from ..system.processes import pid_alive

VERSION = "synthetic-v1"
MARKER = "synthetic.json"
# Class order fixes which classes ``num_classes`` keeps; the folders are these names.
CLASSES = ("disc", "ring", "square", "triangle", "plus", "cross", "hstripes", "vstripes",
           "checker")
DEFAULTS = {"num_classes": 8, "train_per_class": 300, "val_per_class": 50, "size": 32,
            "seed": 0}
JPEG_QUALITY = 90
STALE_TEMP_SECONDS = 3600  # a temp folder this old is abandoned even if its pid lives on
_SPLITS = (("train", 0, "train_per_class"), ("val", 1, "val_per_class"))


# --------------------------------------------------------------------------- drawing
@functools.lru_cache(maxsize=4)
def _pixel_centres(size):
    """Read-only ``(y, x)`` pixel-centre coordinates, each (size, size) float32."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    grid.flags.writeable = False
    return grid[0], grid[1]


def _rotated_grid(size, cx, cy, theta):
    """Pixel-centre coordinates in the object's frame.

    Returns ``(u, v)``, each of shape (size, size) float32: the offsets of every pixel
    centre from ``(cx, cy)`` rotated by ``-theta``, so a shape drawn axis-aligned in
    ``(u, v)`` appears rotated by ``theta`` in the image.
    """
    y, x = _pixel_centres(size)
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    return c * dx + s * dy, -s * dx + c * dy


def _box(u, v, half_u, half_v):
    """Signed (Chebyshev) distance to an axis-aligned box; (size, size) like ``u``."""
    return np.maximum(np.abs(u) - half_u, np.abs(v) - half_v)


def _soft(d):
    """Coverage in [0, 1] from a signed distance ``d`` (negative inside); same shape."""
    return np.clip(np.float32(0.5) - d, 0.0, 1.0)


def _stripes(t, period, phase):
    """Square-ish wave in [0, 1] along coordinate ``t`` (any shape), bars half a period wide."""
    return np.clip(0.5 + 1.5 * np.cos(2 * np.pi * t / period + phase), 0.0, 1.0)


def _shape_alpha(name, rng, size):
    """Draw one object of class ``name`` at a random pose.

    Returns the coverage mask, shape (size, size) float32 in [0, 1].  Radius ``r`` (the
    object's half-extent), stroke ``w`` and texture period scale with ``size``.
    """
    r = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    w = rng.uniform(0.07, 0.11) * size
    # plus/X and the textures keep their orientation (a plus turned 45 degrees is an X);
    # round or symmetric shapes may turn freely.
    free = name in ("disc", "ring", "square", "triangle")
    theta = rng.uniform(0, 2 * np.pi) if free else rng.uniform(-1, 1) * np.deg2rad(15)
    if name == "cross":
        theta += np.pi / 4
    u, v = _rotated_grid(size, cx, cy, theta)

    if name == "disc":
        return _soft(np.hypot(u, v) - r)
    if name == "ring":
        return _soft(np.abs(np.hypot(u, v) - (r - w / 2)) - w / 2)
    if name == "square":
        a = 0.8 * r
        return _soft(np.abs(_box(u, v, a, a) + w / 2) - w / 2)
    if name == "triangle":  # equilateral, circumradius r: three half-planes at inradius r/2
        angles = np.pi / 2 + 2 * np.pi / 3 * np.arange(3)
        d = np.max([np.cos(t) * u + np.sin(t) * v for t in angles], axis=0) - r / 2
        return _soft(d.astype(np.float32))
    if name in ("plus", "cross"):
        half = 0.6 * w
        return _soft(np.minimum(_box(u, v, r, half), _box(u, v, half, r)))
    # Textures: a square patch of stripes or checks.
    window = _soft(_box(u, v, r, r))
    period = rng.uniform(0.18, 0.26) * size
    pu, pv = rng.uniform(0, 2 * np.pi, size=2)
    if name == "hstripes":
        pattern = _stripes(v, period, pv)
    elif name == "vstripes":
        pattern = _stripes(u, period, pu)
    elif name == "checker":
        pattern = np.clip(0.5 + 3.0 * np.cos(2 * np.pi * u / period + pu)
                          * np.cos(2 * np.pi * v / period + pv), 0.0, 1.0)
    else:
        raise ValueError(f"unknown class {name!r}; expected one of {CLASSES}")
    return (window * pattern).astype(np.float32)


def _colour_pair(rng):
    """Background and foreground RGB colours, each shape (3,) in [0, 1], independent of class.

    Both come from the same distribution (so swapping them changes nothing on average) and
    differ in luminance by at least 0.25, so the object is visible in grey too.
    """
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        bg, fg = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
        if abs(luma @ (fg - bg)) >= 0.25:
            return bg, fg


def draw_image(name, rng, size=32):
    """Draw one image of class ``name`` with all nuisance factors.

    name: a class name from ``CLASSES``.
    rng: a ``numpy.random.Generator``; the image is a function of its state alone.
    size: side in pixels.
    Returns uint8 array, shape (size, size, 3).
    """
    bg, fg = _colour_pair(rng)
    alpha = _shape_alpha(name, rng, size)[..., None]                      # (S, S, 1)
    # Background: a plain colour under a gentle linear illumination gradient.
    u, _ = _rotated_grid(size, size / 2, size / 2, rng.uniform(0, 2 * np.pi))
    shade = (np.float32(rng.uniform(0, 0.15) / size) * u)[..., None]     # (S, S, 1)
    img = (bg + shade) * (1 - alpha) + fg * alpha                         # (S, S, 3)
    # Clutter: a few small dots in random colours, anywhere (also over the object).
    for _ in range(rng.integers(0, 4)):
        cx, cy = rng.uniform(0, size, size=2)
        d = np.hypot(*_rotated_grid(size, cx, cy, 0.0)) - rng.uniform(0.6, 1.4)
        a = _soft(d)[..., None]
        img = img * (1 - a) + rng.uniform(0, 1, size=3).astype(np.float32) * a
    sigma = np.float32(rng.uniform(0.01, 0.05))
    img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- files
def _params(**params):
    """Fill in ``DEFAULTS`` and validate; returns a new dict with exactly their keys."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown synthetic dataset parameter(s) {sorted(unknown)}; "
                        f"expected some of {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **params}
    p = {k: int(v) for k, v in p.items()}
    if not 2 <= p["num_classes"] <= len(CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(CLASSES)}, got {p['num_classes']}")
    if p["size"] < 16:
        raise ValueError(f"size must be at least 16 pixels, got {p['size']}")
    if min(p["train_per_class"], p["val_per_class"]) < 1:
        raise ValueError("train_per_class and val_per_class must be at least 1, got "
                         f"{p['train_per_class']} and {p['val_per_class']}")
    return p


def _marker_content(p):
    """The marker's JSON text for parameters ``p``: deterministic (sorted keys, no time)."""
    return json.dumps({"version": VERSION, "params": p, "classes": list(
        CLASSES[:p["num_classes"]])}, sort_keys=True, indent=1) + "\n"


def make_synthetic_dataset(root, num_classes=DEFAULTS["num_classes"],
                           train_per_class=DEFAULTS["train_per_class"],
                           val_per_class=DEFAULTS["val_per_class"], size=DEFAULTS["size"],
                           seed=DEFAULTS["seed"]):
    """Write the dataset into ``root`` (absent or empty) and return ``root`` as a ``Path``.

    Image ``i`` of class ``c`` in split ``s`` is drawn from its own generator seeded with
    ``(seed, s, c, i)``, and JPEGs are saved with fixed settings and no metadata, so the same
    arguments give byte-identical files, and changing one count does not change the others.
    The marker file is written last.  Use ``ensure_synthetic_dataset`` for a cached copy.
    """
    p = _params(num_classes=num_classes, train_per_class=train_per_class,
                val_per_class=val_per_class, size=size, seed=seed)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"refusing to write the synthetic dataset into non-empty {root}")
    for split, split_id, count_key in _SPLITS:
        for c, name in enumerate(CLASSES[:p["num_classes"]]):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(p[count_key]):
                rng = np.random.default_rng([p["seed"], split_id, c, i])
                Image.fromarray(draw_image(name, rng, p["size"])).save(
                    folder / f"{i:04d}.jpg", format="JPEG", quality=JPEG_QUALITY,
                    subsampling=0, optimize=False)
    (root / MARKER).write_text(_marker_content(p))
    return root


def default_dataset_root(**params):
    """Cache folder for the dataset with ``params`` (defaults filled in), as a ``Path``.

    ``$MINICOMPACT_CACHE`` if set, else ``~/.cache/minicompact``, then
    ``synthetic-v1-<10 hex digits of a hash of the parameters>``.
    """
    p = _params(**params)
    cache = os.environ.get("MINICOMPACT_CACHE") or Path.home() / ".cache" / "minicompact"
    digest = hashlib.sha256(_marker_content(p).encode()).hexdigest()[:10]
    return Path(cache).expanduser() / f"{VERSION}-{digest}"


def _is_complete(root, p):
    """True when ``root`` holds a finished dataset with parameters ``p``.

    Raises ``FileExistsError`` when ``root`` exists but is something else (no marker, or a
    marker for other parameters): we never delete or overwrite a folder we did not make.
    """
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False  # an empty folder is fine to fill: the rename replaces it
    marker = root / MARKER
    if not marker.is_file():
        raise FileExistsError(f"{root} exists but has no {MARKER}: not a complete synthetic "
                              "dataset; remove it or pass another root")
    found = marker.read_text()
    if found != _marker_content(p):
        raise FileExistsError(f"{root} holds a synthetic dataset with other parameters: "
                              f"expected {_marker_content(p)!r}, found {found!r}")
    return True


def _temp_prefix(root):
    return f".{root.name}.tmp-"


def _remove_stale_temps(root):
    """Delete temp folders left by a killed generation of ``root``.

    A temp folder is named ``.<root name>.tmp-<pid>-<random>``; it is stale when that
    process no longer runs, or when it is older than ``STALE_TEMP_SECONDS``.  A live
    generator's folder is left alone: both generators then finish and one rename wins.
    """
    if not root.parent.is_dir():
        return
    for tmp in root.parent.glob(_temp_prefix(root) + "*"):
        try:
            pid = int(tmp.name[len(_temp_prefix(root)):].split("-")[0])
            age = time.time() - tmp.stat().st_mtime
        except (ValueError, OSError):
            continue
        if age > STALE_TEMP_SECONDS or not pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_synthetic_dataset(root=None, **params):
    """Return the root of a complete synthetic dataset, making it only if needed.

    root: where it lives; ``None`` for ``default_dataset_root(**params)``.
    **params: any of ``DEFAULTS`` (see ``make_synthetic_dataset``).
    Returns ``Path`` of the root, holding ``train/``, ``val/`` and the marker.

    The dataset is generated into a temp folder beside ``root`` and renamed into place in
    one step, so an interrupted run never leaves a half dataset at ``root``; leftovers from
    killed runs are removed on the next call.
    """
    p = _params(**params)
    root = Path(root) if root is not None else default_dataset_root(**p)
    if _is_complete(root, p):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = root.parent / f"{_temp_prefix(root)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        make_synthetic_dataset(tmp, **p)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first: use its copy if it is the same dataset.
            if not _is_complete(root, p):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
