"""A one-time cache of the resized dataset, so later epochs never decode a JPEG again.

``open_cache(dataset, resize, path)`` returns an ``ImageCache`` whose ``.images`` is a
read-only memory-mapped uint8 array of shape (N, resize, resize, 3) (NHWC, the output of
``load_rgb`` for every sample, in ``dataset.samples`` order).  On disk, beside
``<name>.npy``:

* ``<name>.rows.npy``: int64 (N, 3), per row the source file's size and modification time
  (ns) when it was decoded, and 1 if it decoded, 0 if it did not;
* ``<name>.json``: ``{"version", "key", "resize", "count", "failed": {"<index>": "<reason>"}}``,
  written last.

Keys: ``key`` hashes ``resize`` and the sample list (paths relative to the split folder,
labels): when it differs, the cache is rebuilt.  When it matches, every file's size and
modification time are compared with its row (one ``stat`` per file, no reading) and the rows
whose file changed are decoded again in place — an image replaced in place gets its new
pixels, and a file that failed is retried once it changes (and only then).  A change that
keeps both the size and the modification time is not seen: delete the cache to force it.

Writing is crash-safe.  A build writes pixels to a temporary .npy (reserved on disk up front,
so a full disk fails cleanly instead of crashing the memory map), deletes the old sidecar,
renames the file into place, then writes the rows and the sidecar (temp + rename each) — a
crash leaves either a complete cache or one without a sidecar, which is rebuilt.  A patch
first marks the changed rows as unknown (size -1) in the rows file, then rewrites their
pixels, then records their new sizes and times: a crash in between leaves them marked, and
the next open decodes them again.

Size: N * resize^2 * 3 bytes — ImageNet's 1.28M training images take 252 GB at 256 px and
5.3 GB at 37 px; ``open_cache`` checks the free space first.

Shared by several runs (``run.py --cache-dir DIR``, a sweep's points): ``shared_cache_folder``
names one folder per dataset, and ``folder_lock`` makes the runs build it one at a time.
"""
import contextlib
import errno
import hashlib
import json
import os
import shutil

import numpy as np

from ..system.atomic import atomic_write
from ..system.processes import pid_alive
from .images import BadImageError, load_rgb

CACHE_VERSION = 2
CHUNK = 256  # images per job when building
UNREADABLE = "unreadable when it was cached"  # reason shown when the sidecar lost the real one


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


def _rows_path(npy_path):
    return npy_path[:-4] + ".rows.npy"


def file_stats(paths):
    """(N, 2) int64: size and modification time (ns) of each file; -2, -2 where it is missing."""
    out = np.full((len(paths), 2), -2, dtype=np.int64)
    for i, path in enumerate(paths):  # one stat per file: the cheapest content identity
        try:
            st = os.stat(path)
        except OSError:
            continue
        out[i] = st.st_size, st.st_mtime_ns
    return out


class ImageCache:
    """An existing cache: ``images`` (N, R, R, 3) uint8 read-only memmap, ``failed`` dict."""

    def __init__(self, npy_path, json_path):
        with open(json_path) as f:
            meta = json.load(f)
        self.npy_path, self.json_path = npy_path, json_path
        self.key, self.resize, self.count = meta["key"], meta["resize"], meta["count"]
        self.rows = np.load(_rows_path(npy_path))
        if self.rows.shape != (self.count, 3):
            raise ValueError(f"cache {npy_path}: rows of shape {self.rows.shape}, expected ({self.count}, 3)")
        reasons = meta.get("failed", {})
        self.failed = {int(i): reasons.get(str(i), UNREADABLE) for i in np.flatnonzero(self.rows[:, 2] == 0)}
        self.images = np.load(npy_path, mmap_mode="r")
        if self.images.shape != (self.count, self.resize, self.resize, 3):
            raise ValueError(f"cache {npy_path} holds shape {self.images.shape}, its sidecar "
                             f"says ({self.count}, {self.resize}, {self.resize}, 3)")

    def __len__(self):
        return self.count

    def holds(self, dataset, resize):
        """Whether this cache was built for exactly ``dataset``'s files at ``resize`` px."""
        return (self.resize == resize and self.count == len(dataset.samples)
                and self.key == _dataset_key(dataset, resize))

    def get(self, index):
        """Image ``index`` as (R, R, 3) uint8; ``BadImageError`` if it failed to decode."""
        if index in self.failed:
            raise BadImageError(f"cache entry {index}", self.failed[index])
        return np.asarray(self.images[index])


_open_maps = {}  # per process: cache .npy path -> (file identity, memmap)


def read_rows(npy_path, indices):
    """Rows ``indices`` of the cache file ``npy_path`` (what a decoding worker reads), (N, R, R, 3) uint8 (a copy).

    The memory map is opened once per process and file.  A cache rebuilt under the same name
    is a new file (``build_cache`` renames it into place), so the map is keyed on the file's
    identity too: the old map would serve the old pixels, and old row numbers.  (While
    mapped, the old file keeps its inode, so a new file cannot reuse it.)
    """
    st = os.stat(npy_path)
    identity = (st.st_dev, st.st_ino)
    held = _open_maps.get(npy_path)
    if held is None or held[0] != identity:
        held = _open_maps[npy_path] = (identity, np.load(npy_path, mmap_mode="r"))
    return held[1][indices]


def _read_meta(json_path):
    try:
        with open(json_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _fill_rows(npy_path, rows, paths, resize):
    """Decode ``paths`` into ``rows`` of the cache file; return {row: reason} of the failures.

    Runs in a worker process; workers write disjoint rows of one shared memory map.
    """
    arr = np.load(npy_path, mmap_mode="r+")
    failed = {}
    for row, path in zip(rows, paths):
        try:
            arr[row] = load_rgb(path, resize)
        except BadImageError as exc:
            arr[row] = 0
            failed[int(row)] = exc.reason
    arr.flush()
    return failed


def _decode_into(npy_path, rows, paths, resize, executor=None, progress=False):
    """Decode ``paths`` into ``rows`` (in chunks, on ``executor`` if given); {row: reason}."""
    chunks = [(rows[s:s + CHUNK], paths[s:s + CHUNK]) for s in range(0, len(rows), CHUNK)]
    if executor is None:
        results = (_fill_rows(npy_path, r, p, resize) for r, p in chunks)
    else:
        results = executor.map(_fill_rows, [npy_path] * len(chunks), [r for r, _ in chunks],
                               [p for _, p in chunks], [resize] * len(chunks))
    if progress:
        from tqdm import tqdm  # only when a bar is drawn: a worker process never needs it
        results = tqdm(results, total=len(chunks), desc=f"caching images at {resize} px", unit="chunk")
    failed = {}
    for f in results:
        failed.update(f)
    return failed


def _save_npy(path, array):
    """``np.save`` to a temporary name, then rename: readers see the old or the new file."""
    with atomic_write(path, "wb") as f:
        np.save(f, array)


def _write_meta(json_path, dataset, resize, n, failed):
    meta = {"version": CACHE_VERSION, "key": _dataset_key(dataset, resize), "resize": resize,
            "count": n, "failed": {str(k): v for k, v in sorted(failed.items())}}
    with atomic_write(json_path) as f:
        json.dump(meta, f, indent=1)


def _rows(stats, failed):
    ok = np.ones((len(stats), 1), dtype=np.int64)
    ok[list(failed), 0] = 0
    return np.concatenate([stats, ok], axis=1)


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


def _remove_stale_temps(npy_path):
    """Delete temporary pixel files of builds whose process was killed (they are cache-sized)."""
    folder, name = os.path.split(npy_path)
    prefix = name + ".tmp"
    for entry in os.listdir(folder or "."):
        if entry.startswith(prefix) and entry.endswith(".npy"):
            try:
                pid = int(entry[len(prefix):-4])
            except ValueError:
                continue
            if not pid_alive(pid):
                try:
                    os.remove(os.path.join(folder, entry))
                except OSError:
                    pass


def build_cache(dataset, resize, npy_path, json_path, executor=None, progress=False):
    """Decode every sample at ``resize`` into a new cache file (see the module docstring).

    ``executor``: a concurrent.futures executor (the loader's worker pool) to decode in
    parallel; None decodes in this process.
    """
    n = len(dataset.samples)
    shape = (n, resize, resize, 3)
    folder = os.path.dirname(os.path.abspath(npy_path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temps(npy_path)
    need = int(np.prod(shape, dtype=np.int64)) + 4096
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(errno.ENOSPC, f"the image cache needs {need / 2**30:.1f} GiB, only "
                      f"{free / 2**30:.1f} GiB free in {folder}; use a smaller image size, "
                      "another --cache folder, or no cache")
    paths = [p for p, _ in dataset.samples]
    stats = file_stats(paths)  # before decoding: a file changed meanwhile is decoded again later
    tmp = f"{npy_path}.tmp{os.getpid()}.npy"
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        nbytes = arr.offset + arr.nbytes
        del arr
        _reserve(tmp, nbytes)
        failed = _decode_into(tmp, np.arange(n), paths, resize, executor, progress)
        if os.path.exists(json_path):
            os.remove(json_path)  # the old sidecar must never describe the new pixels
        os.replace(tmp, npy_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _save_npy(_rows_path(npy_path), _rows(stats, failed))
    _write_meta(json_path, dataset, resize, n, failed)
    return ImageCache(npy_path, json_path)


def refresh_cache(cache, dataset, executor=None, progress=False):
    """Decode again, in place, the rows whose file's size or modification time changed.

    Returns the number of rows decoded again (0: the cache was up to date).
    """
    paths = [p for p, _ in dataset.samples]
    stats = file_stats(paths)
    changed = np.flatnonzero((cache.rows[:, :2] != stats).any(axis=1))
    if changed.size == 0:
        return 0
    rows_path = _rows_path(cache.npy_path)
    marked = cache.rows.copy()
    marked[changed, 0] = -1  # "unknown" until the new pixels are in: a crash redoes them
    _save_npy(rows_path, marked)
    failed = _decode_into(cache.npy_path, changed, [paths[i] for i in changed], cache.resize,
                          executor, progress)
    redone = set(changed.tolist())
    failed.update({i: r for i, r in cache.failed.items() if i not in redone})  # unchanged failures stay
    _save_npy(rows_path, _rows(stats, failed))
    _write_meta(cache.json_path, dataset, cache.resize, cache.count, failed)
    return int(changed.size)


def open_cache(dataset, resize, path, executor=None, rebuild=False, progress=False):
    """The cache of ``dataset`` at ``resize`` under ``path``: reused, refreshed or built.

    dataset: an ImageFolder (``.samples``, ``.root``).
    resize: side of the cached images.
    path: a ``.npy`` file path, or a folder (the file is named after the split).
    executor: worker pool used to build it (None: decode in this process).
    rebuild: ignore an existing cache.
    Returns an ``ImageCache``, up to date with the files' sizes and modification times.
    """
    resize = int(resize)
    npy_path, json_path = cache_paths(path, dataset, resize)
    meta = None if rebuild else _read_meta(json_path)
    if (meta is not None and meta.get("version") == CACHE_VERSION
            and meta.get("resize") == resize and meta.get("count") == len(dataset.samples)
            and meta.get("key") == _dataset_key(dataset, resize) and os.path.exists(npy_path)):
        try:
            cache = ImageCache(npy_path, json_path)
        except (OSError, ValueError):
            pass  # damaged: rebuild below
        else:
            if refresh_cache(cache, dataset, executor, progress):
                cache = ImageCache(npy_path, json_path)
            return cache
    return build_cache(dataset, resize, npy_path, json_path, executor, progress)


@contextlib.contextmanager
def folder_lock(folder):
    """An exclusive ``flock`` on ``folder``/.lock while the block runs (waits for it).

    Used around building a shared image cache, so runs started together decode it once.
    The kernel drops the lock when its process dies: it can never go stale.  Without
    ``fcntl`` (Windows) it does nothing.
    """
    os.makedirs(folder, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(folder, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shared_cache_folder(cache_dir, data_root, train_key):
    """DIR/<key>: the cache folder of one dataset, keyed on its absolute root and its training
    listing (``cache_key``), so runs on the same data share it and other data never
    collides with it (within it, this module keys each split's file on its own listing)."""
    digest = hashlib.sha256(f"{os.path.abspath(data_root)}\n{train_key}".encode("utf-8", "surrogateescape"))
    return os.path.join(os.path.abspath(cache_dir), digest.hexdigest()[:16])
