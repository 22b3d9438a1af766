"""Batches of cropped uint8 images, decoded by a pool of worker processes ahead of the model.

    with BatchLoader(train, 256, resize=256, crop=224, mode="train", workers=8) as loader:
        for images, labels in loader.epoch(epoch, start_batch):
            x = normalize(images, mean, std, xp)    # (N, 3, 224, 224) float32 on the device
            ...
            checkpoint["start_batch"] = loader.next_batch

Modes: ``"train"`` shuffles and takes one random crop + flip per image (paper sec. 5.1);
``"center"`` and ``"tencrop"`` keep dataset order and take the centre crop or the ten test
crops.  Batches are ``(images, labels)``: uint8 NCHW ``(N, 3, crop, crop)`` — or
``(N, 10, 3, crop, crop)`` for tencrop — and int64 ``(N,)``.

Determinism (so a resumed run is bit-identical): the shuffle is a pure function of
(seed, epoch) and each image's crop and flip a pure function of (seed, epoch, sample index)
(``hashed_crop_params``), so batches do not depend on the number of workers or on
``start_batch``, which skips whole batches without decoding them.

Unreadable images are skipped with one warning per file and listed in ``loader.skipped``
(reset each epoch); their batch is shorter, and a batch with no readable image is not
yielded at all — which is why a trainer should resume from ``loader.next_batch`` (the index
of the batch after the one just yielded), not from a count of yielded batches.

Data-parallel runs (``rank``, ``ranks``; ``data/sharding.py``): in training mode batch b is
rank ``rank``'s part of global batch b of ``ranks`` × ``batch_size`` images, so every rank
has ``len(loader)`` batches, and every one is yielded — a part with no readable image (or
none at all, in a short last global batch) as an empty batch, (0, 3, crop, crop) and (0,),
so that the ranks stay in step.  In ``"center"`` and ``"tencrop"`` mode the loader reads
rank ``rank``'s contiguous block of the dataset (``eval_shard``).

``workers > 0`` decodes in a process pool ("fork" where available, else "spawn") with at
most ``max(prefetch, workers)`` batches in flight; ``workers = 0`` decodes inline.  The
workers exit with the main process however it ends, ``kill -9`` included
(``processes.die_with_parent``).
"""
import collections
import contextlib
import multiprocessing
import os
import signal
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from ..system.processes import die_with_parent
from .cache import ImageCache, open_cache, read_rows
from .images import BadImageError, load_rgb
from .sharding import eval_shard, rank_batch, steps_per_epoch
from .transforms import center_crop, crop_flip, hashed_crop_params, ten_crop

MODES = ("train", "center", "tencrop")


class UnreadableImageWarning(UserWarning):
    """An image file was skipped because it could not be decoded."""


class WorkerError(RuntimeError):
    """A decoding worker process died (killed, out of memory); the message is one line."""


def _init_worker(parent_pid):
    """Worker initializer: exit with the main process however it ends (``kill -9`` too).

    SIGINT and SIGTERM are ignored: sent to the whole process group (Ctrl-C in a terminal, a
    scheduler's stop), they are the main process's to handle; it finishes its step with the
    workers' batches, then stops them (``close`` kills them).
    """
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def first_readable(paths, resize):
    """Index of the first of ``paths`` that decodes at ``resize`` (None if none does)."""
    for i, path in enumerate(paths):
        try:
            load_rgb(path, resize)
        except BadImageError:
            continue
        return i
    return None


def make_batch(job):
    """Decode (or read from the cache) and crop one batch.  Runs in a worker or inline.

    job: dict with mode, crop, resize, seed, epoch, indices ((N,) int64 dataset
        indices), paths (N file paths, used without a cache) and cache (the cache's .npy
        path or None).
    Returns (images, ok, reasons): images uint8 NCHW of the readable ones (None if none is);
    ok (N,) bool; reasons {position in batch: why it failed}.
    """
    indices, resize, crop = job["indices"], job["resize"], job["crop"]
    n = len(indices)
    ok = np.ones(n, dtype=bool)
    reasons = {}
    if job["cache"] is not None:
        decoded = read_rows(job["cache"], indices)
    else:
        decoded = np.empty((n, resize, resize, 3), dtype=np.uint8)
        for i, path in enumerate(job["paths"]):  # one file at a time: decoding is per file
            try:
                decoded[i] = load_rgb(path, resize)
            except BadImageError as exc:
                ok[i], reasons[i] = False, exc.reason
        if not ok.all():
            decoded = decoded[ok]
    if not ok.any():
        return None, ok, reasons
    mode = job["mode"]
    if mode == "train":
        params = hashed_crop_params(job["seed"], job["epoch"], indices[ok], (resize, resize),
                                    crop)
        images = crop_flip(decoded, crop, *params)
    elif mode == "center":
        images = center_crop(decoded, crop)
    else:
        images = ten_crop(decoded, crop)
    return images, ok, reasons


class BatchLoader:
    """Epochs of (uint8 NCHW images, int64 labels) batches from an ImageFolder.

    dataset: ImageFolder (anything with ``.samples``: list of (path, label)).
    batch_size: images per batch.
    resize, crop: images are downsized to resize x resize, then cropped to crop x crop
        (paper: 256 and 224; see ``scaled_sizes``).
    mode: "train" (shuffled, random crop + flip), "center" or "tencrop" (dataset order).
    workers: decoding processes; 0 decodes inline.
    seed: seeds the shuffle and the crops.
    prefetch: batches decoded ahead (at least one per worker).
    cache: None, an ``ImageCache`` of this dataset at ``resize``, or a path (``.npy``
        file or folder) where one is reused or built with this loader's workers.
    drop_last: drop a final (global) batch shorter than ``batch_size`` (× ``ranks``).
    rank, ranks: this process's part of a data-parallel run of ``ranks`` processes (see
        the module docstring); 0 and 1 for one process.
    """

    def __init__(self, dataset, batch_size, resize, crop, mode, workers=0, seed=0,
                 prefetch=4, cache=None, drop_last=False, rank=0, ranks=1):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= rank < ranks:
            raise ValueError(f"need 0 <= rank < ranks, got rank {rank} of {ranks}")
        if batch_size < 1 or workers < 0 or prefetch < 1:
            raise ValueError(f"need batch_size >= 1, workers >= 0, prefetch >= 1; got "
                             f"{batch_size}, {workers}, {prefetch}")
        if crop > resize:
            raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
        self.dataset, self.mode = dataset, mode
        self.batch_size, self.resize, self.crop = int(batch_size), int(resize), int(crop)
        self.workers, self.seed, self.prefetch = int(workers), int(seed), int(prefetch)
        self.drop_last = bool(drop_last)
        self.rank, self.ranks = int(rank), int(ranks)
        self.paths = [p for p, _ in dataset.samples]
        self.labels = np.array([label for _, label in dataset.samples], dtype=np.int64)
        if len(self.paths) == 0:
            raise ValueError("BatchLoader: the dataset has no samples")
        self.skipped = []
        self.next_batch = 0
        self._warned = set()
        self._executor = None
        if cache is not None and not isinstance(cache, ImageCache):
            with self._worker_deaths():
                cache = open_cache(dataset, self.resize, cache, executor=self._pool())
        if cache is not None and not cache.holds(dataset, self.resize):
            raise ValueError(f"cache {cache.npy_path} was built for another dataset or size "
                             f"({len(cache)} images at {cache.resize} px; this loader has "
                             f"{len(self.paths)} at {self.resize} px)")
        self.cache = cache
        self._failed = None  # with a cache that has failures: (N,) bool, True for a failed image
        if cache is not None and cache.failed:
            self._failed = np.zeros(len(self.paths), dtype=bool)
            self._failed[list(cache.failed)] = True

    def __len__(self):
        if self.mode == "train":
            return steps_per_epoch(len(self.paths), self.batch_size, self.ranks, self.drop_last)
        n, b = len(self.order(0)), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch):
        """Dataset indices (int64) of ``epoch``: in training mode all N, shuffled, a pure
        function of (seed, epoch) (the same on every rank); otherwise this rank's block of
        them in dataset order."""
        n = len(self.paths)
        if self.mode != "train":
            return np.arange(n, dtype=np.int64)[eval_shard(n, self.rank, self.ranks)]
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n).astype(np.int64)

    def _pool(self):
        """The worker pool, started on first use (None when ``workers == 0``)."""
        if self.workers == 0:
            return None
        if self._executor is None:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._executor = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                                 initargs=(os.getpid(),))
        return self._executor

    @contextlib.contextmanager
    def _worker_deaths(self):
        """A worker that dies (killed, out of memory) breaks the whole pool, which then raises
        ``BrokenProcessPool`` from whichever call uses it next (``submit``, ``map`` or a
        result): stop the pool and raise one-line ``WorkerError`` instead."""
        try:
            yield
        except BrokenProcessPool as exc:
            self.close()
            raise WorkerError("a data-loading worker process died (out of memory? "
                              "try fewer --workers or a smaller batch)") from exc

    def classes_without_images(self):
        """Labels of the classes none of whose images can be read, sorted (empty: all fine).

        With a cache this is free (its failed rows); otherwise each class's files are decoded
        in order until one succeeds, so a healthy dataset costs one decode per class, spread
        over the worker pool.
        """
        by_class = collections.defaultdict(list)
        for index, label in enumerate(self.labels.tolist()):
            by_class[label].append(index)
        if self.cache is not None:
            return sorted(c for c, idx in by_class.items() if self._failed is not None and self._failed[idx].all())
        labels = sorted(by_class)
        jobs = [[self.paths[i] for i in by_class[c]] for c in labels]
        pool = self._pool()
        if pool is None:
            found = [first_readable(paths, self.resize) for paths in jobs]
        else:
            with self._worker_deaths():
                found = list(pool.map(first_readable, jobs, [self.resize] * len(jobs)))
        return [c for c, i in zip(labels, found) if i is None]

    def _job(self, epoch, order, b):
        """The job of batch ``b``; cached failures are dropped here and reported at once."""
        if self.mode == "train":
            idx = rank_batch(order, b, self.batch_size, self.rank, self.ranks)
        else:
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        bad = []
        if self._failed is not None:
            keep = ~self._failed[idx]
            bad = [(int(i), self.cache.failed[int(i)]) for i in idx[~keep]]
            idx = idx[keep]
        job = {"mode": self.mode, "crop": self.crop, "resize": self.resize, "seed": self.seed,
               "epoch": int(epoch), "indices": idx,
               "paths": None if self.cache is not None else [self.paths[i] for i in idx],
               "cache": None if self.cache is None else self.cache.npy_path}
        return job, bad

    def _skip(self, index, reason):
        path = self.paths[index]
        self.skipped.append(path)
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(f"skipping unreadable image {path} ({reason})",
                          UnreadableImageWarning, stacklevel=4)

    def _finish(self, job, bad, result):
        """Record skipped files; return (images, labels) or None for an all-bad batch."""
        for index, reason in bad:
            self._skip(index, reason)
        images, ok, reasons = result
        for pos, reason in reasons.items():
            self._skip(int(job["indices"][pos]), reason)
        if images is not None:
            return images, self.labels[job["indices"][ok]]
        if self.mode == "train" and self.ranks > 1:  # a placeholder keeps the ranks in step
            return (np.empty((0, 3, self.crop, self.crop), dtype=np.uint8),
                    np.empty(0, dtype=np.int64))
        return None

    def epoch(self, epoch, start_batch=0):
        """Iterate over the batches of ``epoch`` from batch ``start_batch`` on.

        Yields (images, labels): uint8 (N, 3, crop, crop) — (N, 10, 3, crop, crop) for
        tencrop — and int64 (N,), N <= batch_size (N = 0: a data-parallel placeholder).
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        return self._batches(epoch, start_batch)  # checked now, not at the first next()

    def _batches(self, epoch, start_batch):
        self.skipped = []
        self.next_batch = start_batch
        order = self.order(epoch)
        batches = range(start_batch, len(self))
        pool = self._pool()
        if pool is None:
            for b in batches:
                job, bad = self._job(epoch, order, b)
                out = self._finish(job, bad, make_batch(job))
                self.next_batch = b + 1
                if out is not None:
                    yield out
            return
        pending = collections.deque()  # (batch index, job, bad, future), in batch order
        todo = iter(batches)
        in_flight = max(self.prefetch, self.workers)
        try:
            while True:
                with self._worker_deaths():
                    while len(pending) < in_flight:
                        b = next(todo, None)
                        if b is None:
                            break
                        job, bad = self._job(epoch, order, b)
                        pending.append((b, job, bad, pool.submit(make_batch, job)))
                    if not pending:
                        return
                    b, job, bad, future = pending.popleft()
                    result = future.result()
                out = self._finish(job, bad, result)
                self.next_batch = b + 1
                if out is not None:
                    yield out
        finally:
            for *_, future in pending:
                future.cancel()  # an abandoned epoch stops queueing work

    def close(self):
        """Stop the worker processes now (also on errors and Ctrl-C, via ``with``)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # The executor keeps its processes in a private dict; reading it lets us stop a worker
        # in the middle of a batch instead of waiting for it.  The executor's own thread then
        # sees them gone and reaps them, and shutdown(wait=True) waits for that thread.
        for p in list((getattr(executor, "_processes", None) or {}).values()):
            if p.is_alive():
                p.kill()  # SIGKILL: workers ignore SIGTERM (see _init_worker)
        executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
