"""A one-time cache of the resized dataset, so later epochs never decode a JPEG again.

``open_cache(dataset, resize, path)`` returns an ``ImageCache`` whose ``.images`` is a
read-only memory-mapped uint8 array of shape (N, resize, resize, 3) (NHWC, the output of
``load_rgb`` for every sample, in ``dataset.samples`` order), stored as ``<path>.npy`` with a
small JSON sidecar ``<path>.json``:

    {"version", "key", "resize", "count", "failed": {"<index>": "<reason>"}}

``key`` hashes ``resize`` and the sample list (paths relative to the split folder, labels):
a cache is reused when its sidecar matches, rebuilt when it does not.  File *contents* are
not hashed — after replacing images in place, pass ``rebuild=True``.

Writing is atomic: pixels go to a temporary .npy (reserved on disk up front, so a full disk
fails cleanly instead of crashing the memory map), the old sidecar is deleted, the file is
renamed into place, and the sidecar is written (temp + rename) last — a crash at any point
leaves either a complete matching cache or one that will be rebuilt.

Size: N * resize^2 * 3 bytes — ImageNet's 1.28M training images take 252 GB at 256 px and
5.3 GB at 37 px; ``open_cache`` checks the free space first.
"""
import errno
import hashlib
import json
import os
import shutil

import numpy as np

from .images import BadImageError, load_rgb

CACHE_VERSION = 1
CHUNK = 256  # images per job when building


def cache_key(samples, resize, root=None):
    """Hex digest naming a (sample list, resize) pair; paths are taken relative to ``root``."""
    h = hashlib.sha256(f"minicompact-cache v{CACHE_VERSION} resize={int(resize)}\n".encode())
    for path, label in samples:
        rel = os.path.relpath(path, root) if root is not None else path
        h.update(f"{rel}\t{int(label)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _dataset_key(dataset, resize):
    return cache_key(dataset.samples, resize, getattr(dataset, "root", None))


def cache_paths(path, dataset, resize):
    """(.npy path, .json path).  A folder gets ``<split folder name>_<resize>px.npy`` inside."""
    path = os.fspath(path)
    if not path.endswith(".npy"):
        split = os.path.basename(os.path.normpath(getattr(dataset, "root", "images")))
        path = os.path.join(path, f"{split}_{int(resize)}px.npy")
    return path, path[:-4] + ".json"


class ImageCache:
    """An existing cache: ``images`` (N, R, R, 3) uint8 read-only memmap, ``failed`` dict."""

    def __init__(self, npy_path, json_path):
        with open(json_path) as f:
            meta = json.load(f)
        self.npy_path, self.json_path = npy_path, json_path
        self.key, self.resize, self.count = meta["key"], meta["resize"], meta["count"]
        self.failed = {int(k): v for k, v in meta["failed"].items()}
        self.images = np.load(npy_path, mmap_mode="r")
        if self.images.shape != (self.count, self.resize, self.resize, 3):
            raise ValueError(f"cache {npy_path} holds shape {self.images.shape}, its sidecar "
                             f"says ({self.count}, {self.resize}, {self.resize}, 3)")

    def __len__(self):
        return self.count

    def get(self, index):
        """Image ``index`` as (R, R, 3) uint8; ``BadImageError`` if it failed to decode."""
        if index in self.failed:
            raise BadImageError(f"cache entry {index}", self.failed[index])
        return np.asarray(self.images[index])


def _read_meta(json_path):
    try:
        with open(json_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _fill_chunk(npy_path, start, paths, resize):
    """Decode ``paths`` into rows ``start..`` of the cache file; return {index: reason}.

    Runs in a worker process; workers write disjoint rows of one shared memory map.
    """
    arr = np.load(npy_path, mmap_mode="r+")
    failed = {}
    for i, path in enumerate(paths):
        try:
            arr[start + i] = load_rgb(path, resize)
        except BadImageError as exc:
            arr[start + i] = 0
            failed[start + i] = exc.reason
    arr.flush()
    return failed


def _reserve(npy_path, nbytes):
    """Allocate the file's blocks now, so a full disk raises here, not as SIGBUS later."""
    fd = os.open(npy_path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except (AttributeError, OSError) as exc:  # not every OS / filesystem supports it
        if getattr(exc, "errno", None) == errno.ENOSPC:
            raise
    finally:
        os.close(fd)


def build_cache(dataset, resize, npy_path, json_path, executor=None, progress=False):
    """Decode every sample at ``resize`` into a new cache file (see the module docstring).

    ``executor``: a concurrent.futures executor (the loader's worker pool) to decode in
    parallel; None decodes in this process.
    """
    n = len(dataset.samples)
    shape = (n, resize, resize, 3)
    folder = os.path.dirname(os.path.abspath(npy_path))
    os.makedirs(folder, exist_ok=True)
    need = int(np.prod(shape, dtype=np.int64)) + 4096
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(errno.ENOSPC, f"the image cache needs {need / 2**30:.1f} GiB, only "
                      f"{free / 2**30:.1f} GiB free in {folder}; use a smaller image size, "
                      "another --cache folder, or no cache")
    tmp = f"{npy_path}.tmp{os.getpid()}.npy"
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        nbytes = arr.offset + arr.nbytes
        del arr
        _reserve(tmp, nbytes)
        paths = [p for p, _ in dataset.samples]
        starts = range(0, n, CHUNK)
        if executor is None:
            results = (_fill_chunk(tmp, s, paths[s:s + CHUNK], resize) for s in starts)
        else:
            results = executor.map(_fill_chunk, [tmp] * len(starts), starts,
                                   [paths[s:s + CHUNK] for s in starts],
                                   [resize] * len(starts))
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(starts), desc=f"caching images at {resize} px",
                           unit="chunk")
        failed = {}
        for f in results:
            failed.update(f)
        if os.path.exists(json_path):
            os.remove(json_path)  # the old sidecar must never describe the new pixels
        os.replace(tmp, npy_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    meta = {"version": CACHE_VERSION, "key": _dataset_key(dataset, resize), "resize": resize,
            "count": n, "failed": {str(k): v for k, v in sorted(failed.items())}}
    tmp_json = f"{json_path}.tmp{os.getpid()}"
    with open(tmp_json, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp_json, json_path)
    return ImageCache(npy_path, json_path)


def open_cache(dataset, resize, path, executor=None, rebuild=False, progress=False):
    """The cache of ``dataset`` at ``resize`` under ``path``: reused if it matches, else built.

    Args:
        dataset: an ImageFolder (``.samples``, ``.root``).
        resize: side of the cached images.
        path: a ``.npy`` file path, or a folder (the file is named after the split).
        executor: worker pool used to build it (None: decode in this process).
        rebuild: ignore an existing cache.
    Returns:
        ImageCache.
    """
    resize = int(resize)
    npy_path, json_path = cache_paths(path, dataset, resize)
    meta = None if rebuild else _read_meta(json_path)
    if (meta is not None and meta.get("version") == CACHE_VERSION
            and meta.get("resize") == resize and meta.get("count") == len(dataset.samples)
            and meta.get("key") == _dataset_key(dataset, resize) and os.path.exists(npy_path)):
        try:
            return ImageCache(npy_path, json_path)
        except (OSError, ValueError):
            pass  # damaged: rebuild below
    return build_cache(dataset, resize, npy_path, json_path, executor, progress)
