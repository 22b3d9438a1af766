"""BatchLoader: determinism across workers and resumption, bad files, the cache, cleanup.

The images are 12x12 PNGs whose pixels encode (row * 10, column * 10, sample number), so
every crop can be traced back to its sample and window.
"""
import os
import signal
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from minicompact.data import cache as cache_module
from minicompact.data.cache import open_cache
from minicompact.data.folders import ImageFolder
from minicompact.data.images import load_rgb
from minicompact.data.loader import BatchLoader, UnreadableImageWarning, WorkerError
from minicompact.data.transforms import hashed_crop_params, ten_crop

SIDE, PER_CLASS, CLASSES = 12, 7, 3
N = PER_CLASS * CLASSES


def _coord_image(number):
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    return np.stack([y * 10, x * 10, np.full_like(y, number)], -1).astype(np.uint8)


def _make_split(root):
    for k in range(N):
        folder = os.path.join(root, f"c{k // PER_CLASS}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(_coord_image(k)).save(os.path.join(folder, f"{k:03d}.png"))
    return ImageFolder(root)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return _make_split(str(tmp_path_factory.mktemp("data") / "train"))


def _truncated(path):
    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(path, format="JPEG")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.fixture(scope="module")
def bad_split(tmp_path_factory):
    """c0: 4 good images; c1: good, empty file, text named .png, truncated JPEG; c2: 3 bad."""
    root = tmp_path_factory.mktemp("bad") / "train"
    for c in range(3):
        os.makedirs(root / f"c{c}")
    for i in range(4):
        Image.fromarray(_coord_image(i)).save(root / "c0" / f"{i}.png")
    Image.fromarray(_coord_image(4)).save(root / "c1" / "0_good.png")
    (root / "c1" / "1_empty.jpg").write_bytes(b"")
    (root / "c1" / "2_text.png").write_text("not an image")
    _truncated(root / "c1" / "3_trunc.JPG")
    for i in range(3):
        (root / "c2" / f"bad{i}.jpeg").write_bytes(b"\xff\xd8 junk")
    return ImageFolder(str(root))


def _all(loader, epoch, start=0):
    return [(x.copy(), y.copy()) for x, y in loader.epoch(epoch, start)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x1, x2) and np.array_equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b))


def test_len_and_argument_checks(split):
    assert len(BatchLoader(split, 4, SIDE, 8, "train")) == 6
    assert len(BatchLoader(split, 4, SIDE, 8, "train", drop_last=True)) == 5
    with pytest.raises(ValueError, match="mode"):
        BatchLoader(split, 4, SIDE, 8, "random")
    with pytest.raises(ValueError, match="crop"):
        BatchLoader(split, 4, SIDE, 16, "train")


def test_train_epoch_covers_every_sample_with_its_hashed_crop(split):
    loader = BatchLoader(split, 4, SIDE, 8, "train", seed=5)
    batches = _all(loader, epoch=2)
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    assert images.shape == (N, 3, 8, 8) and images.dtype == np.uint8 and labels.dtype == np.int64
    ids = images[:, 2, 0, 0].astype(int)
    assert sorted(ids) == list(range(N)) and not np.array_equal(ids, np.arange(N))
    assert np.array_equal(ids, loader.order(2)) and np.array_equal(labels, ids // PER_CLASS)
    oy, ox, flip = hashed_crop_params(5, 2, ids, (SIDE, SIDE), 8)
    cols = images[:, 1, 0].astype(int) // 10  # first row's columns
    assert np.array_equal(images[:, 0, 0, 0] // 10, oy)
    assert np.array_equal(np.where(flip, cols[:, -1], cols[:, 0]), ox)
    assert np.array_equal(cols[:, 0] > cols[:, -1], flip)
    assert loader.next_batch == 6 and loader.skipped == []


def test_epochs_and_seeds_differ_same_epoch_repeats(split):
    loader = BatchLoader(split, 4, SIDE, 8, "train", seed=5)
    e0, e1 = _all(loader, 0), _all(loader, 1)
    assert _same(e0, _all(loader, 0))
    assert not np.array_equal(loader.order(0), loader.order(1))
    assert not np.array_equal(loader.order(0), BatchLoader(split, 4, SIDE, 8, "train").order(0))

    def by_sample(batches):
        x = np.concatenate([b[0] for b in batches])
        return x[np.argsort(x[:, 2, 0, 0])]
    a, b = by_sample(e0), by_sample(e1)
    assert np.mean([not np.array_equal(a[i], b[i]) for i in range(N)]) > 0.6


@pytest.mark.parametrize("mode", ["train", "tencrop"])
def test_workers_and_start_batch_do_not_change_batches(split, mode):
    inline = _all(BatchLoader(split, 4, SIDE, 8, mode, seed=1), 3)
    with BatchLoader(split, 4, SIDE, 8, mode, workers=2, seed=1, prefetch=2) as loader:
        assert _same(_all(loader, 3), inline)
        resumed = []
        for batch in loader.epoch(3, start_batch=2):
            resumed.append(batch)
            assert loader.next_batch == 2 + len(resumed)
        assert _same(resumed, inline[2:])
    assert _same(_all(BatchLoader(split, 4, SIDE, 8, mode, seed=1), 3, start=5), inline[5:])


def test_center_and_tencrop_keep_dataset_order(split):
    center = _all(BatchLoader(split, 5, SIDE, 8, "center"), 0)
    ids = np.concatenate([x[:, 2, 0, 0] for x, _ in center])
    assert np.array_equal(ids, np.arange(N))
    assert center[0][0][0, 0, 0, 0] == 20 and center[0][0][0, 1, 0, 0] == 20  # offset 2
    tens = _all(BatchLoader(split, 5, SIDE, 8, "tencrop"), 0)
    assert tens[0][0].shape == (5, 10, 3, 8, 8) and tens[-1][0].shape == (1, 10, 3, 8, 8)
    full = np.stack([_coord_image(k) for k in range(5)])
    assert np.array_equal(tens[0][0], ten_crop(full, 8))
    assert np.array_equal(tens[0][1], [0, 0, 0, 0, 0])


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_counted_and_warned_once(bad_split, workers):
    with BatchLoader(bad_split, 3, SIDE, 8, "center", workers=workers) as loader:
        with pytest.warns(UnreadableImageWarning) as record:
            batches = _all(loader, 0)
        bad = [p for p, _ in bad_split.samples if "good" not in p and "/c0/" not in p]
        assert sorted(loader.skipped) == sorted(bad) and len(bad) == 6
        assert sorted(str(w.message).split()[3] for w in record) == sorted(bad)
        # batches: [g g g] [g g empty] [text trunc bad0] [bad1 bad2] -> last one not yielded
        assert [len(y) for _, y in batches] == [3, 2]
        assert np.array_equal(np.concatenate([x[:, 2, 0, 0] for x, _ in batches]), range(5))
        assert np.array_equal(np.concatenate([y for _, y in batches]), [0, 0, 0, 0, 1])
        assert loader.next_batch == len(loader) == 4
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second epoch warns no more
            assert len(_all(loader, 1)) == 2
        assert len(loader.skipped) == 6


def test_ranks_read_their_parts_of_every_global_batch(split):
    """Two ranks × batch 4 read, batch by batch, the two halves of one process's batch of 8
    (same images, crops and flips); both have the same number of batches."""
    whole = _all(BatchLoader(split, 8, SIDE, 8, "train", seed=3), 1)
    parts = [_all(BatchLoader(split, 4, SIDE, 8, "train", seed=3, rank=r, ranks=2), 1) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 3  # 21 images: 8, 8, 5 (3 + 2)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert np.array_equal(np.concatenate([x0, x1]), x) and np.array_equal(np.concatenate([y0, y1]), y)
    assert [len(y) for _, y in parts[0]] == [4, 4, 3] and [len(y) for _, y in parts[1]] == [4, 4, 2]
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(split, 4, SIDE, 8, "train", rank=2, ranks=2)


def test_a_rank_with_no_readable_image_gets_an_empty_batch(bad_split):
    """The unreadable part of a data-parallel rank is yielded empty (the ranks stay in step);
    one process skips such a batch.  Evaluation shards are contiguous blocks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        for rank in (0, 1):
            loader = BatchLoader(bad_split, 3, SIDE, 8, "center", rank=rank, ranks=2)
            assert np.array_equal(loader.order(0), np.arange(6) if rank == 0 else np.arange(6, 11))
        train = BatchLoader(bad_split, 3, SIDE, 8, "train", rank=1, ranks=2)
        counts = [len(y) for _, y in train.epoch(0)]
        assert len(counts) == len(train) == 2 and train.next_batch == 2
        order = train.order(0)
        readable = [sum("good" in bad_split.samples[i][0] or "/c0/" in bad_split.samples[i][0]
                        for i in part) for part in (order[3:6], order[9:11])]
        assert counts == readable
        batches = _all(BatchLoader(bad_split, 11, SIDE, 8, "train", rank=0, ranks=2), 0)
        assert len(batches) == 1  # ranks 0 and 1 take 6 and 5 of the 11 images
        empty = [(x, y) for x, y in _all(BatchLoader(bad_split, 1, SIDE, 8, "train", rank=1, ranks=2), 0)
                 if len(y) == 0]
        assert empty and all(x.shape == (0, 3, 8, 8) and x.dtype == np.uint8 and y.dtype == np.int64
                             for x, y in empty)


def test_cache_round_trip_reuse_and_rebuild(split, tmp_path, monkeypatch):
    cache = open_cache(split, 10, tmp_path / "c")
    assert cache.images.shape == (N, 10, 10, 3) and cache.failed == {}
    assert os.path.basename(cache.npy_path) == "train_10px.npy"
    for k in (0, 7, N - 1):
        assert np.array_equal(cache.images[k], load_rgb(split.samples[k][0], 10))
    direct = _all(BatchLoader(split, 4, 10, 8, "train", seed=2), 1)
    assert _same(_all(BatchLoader(split, 4, 10, 8, "train", seed=2, cache=cache), 1), direct)

    def no_build(*args, **kw):
        raise AssertionError("the cache was rebuilt")
    with monkeypatch.context() as m:
        m.setattr(cache_module, "build_cache", no_build)
        with BatchLoader(split, 4, 10, 8, "train", seed=2, workers=2,
                         cache=str(tmp_path / "c")) as loader:
            assert _same(_all(loader, 1), direct)
        with pytest.raises(AssertionError, match="rebuilt"):
            open_cache(split, 11, tmp_path / "c")  # another size: a new cache
    other = open_cache(split, 10, tmp_path / "c", rebuild=True)
    assert np.array_equal(other.images, cache.images)
    with open(other.json_path, "w") as f:
        f.write("{broken")
    assert open_cache(split, 10, tmp_path / "c").count == N  # damaged sidecar: rebuilt
    assert sorted(os.listdir(tmp_path / "c")) == ["train_10px.json", "train_10px.npy", "train_10px.rows.npy"]
    with pytest.raises(ValueError, match="another dataset or size"):
        BatchLoader(split, 4, 12, 8, "train", cache=cache)


def test_cache_built_by_workers_records_failures(bad_split, tmp_path):
    with BatchLoader(bad_split, 3, SIDE, 8, "center", workers=2,
                     cache=str(tmp_path / "c.npy")) as loader:
        assert sorted(loader.cache.failed) == [5, 6, 7, 8, 9, 10]
        with pytest.warns(UnreadableImageWarning):
            cached = _all(loader, 0)
        assert len(loader.skipped) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = _all(BatchLoader(bad_split, 3, SIDE, 8, "center"), 0)
    assert _same(cached, direct)
    inline = open_cache(bad_split, SIDE, tmp_path / "inline.npy")
    assert np.array_equal(inline.images, loader.cache.images)


def test_sample_list_change_rebuilds_cache(tmp_path):
    ds = _make_split(str(tmp_path / "train"))
    first = open_cache(ds, SIDE, tmp_path / "c")
    os.rename(tmp_path / "train" / "c0" / "000.png", tmp_path / "train" / "c1" / "000.png")
    moved = open_cache(ImageFolder(str(tmp_path / "train")), SIDE, tmp_path / "c")
    assert moved.count == N and moved.key != first.key  # same count, other labels: rebuilt
    assert moved.images[PER_CLASS - 1, 0, 0, 2] == 0 and first.images[0, 0, 0, 2] == 0
    Image.fromarray(_coord_image(99)).save(tmp_path / "train" / "c0" / "zzz.png")
    second = open_cache(ImageFolder(str(tmp_path / "train")), SIDE, tmp_path / "c")
    assert second.count == N + 1 and first.key != second.key
    assert second.images[PER_CLASS - 1, 0, 0, 2] == 99  # c0: 001..006, zzz


def test_a_rebuilt_cache_is_read_again_by_the_same_process(tmp_path):
    """A loader reads cache rows through a memory map kept per process; a cache rebuilt under
    the same name (a file added: a new sample list) is a new file, and the old map served
    the old file (stale pixels; here an IndexError for the new row)."""
    ds = _make_split(str(tmp_path / "train"))
    with BatchLoader(ds, N, SIDE, 8, "center", cache=tmp_path / "c") as loader:
        assert next(loader.epoch(0))[0].shape[0] == N
    for k in range(N):  # every image replaced, and one added
        Image.fromarray(_coord_image(100 + k)).save(tmp_path / "train" / f"c{k // PER_CLASS}" / f"{k:03d}.png")
    Image.fromarray(_coord_image(99)).save(tmp_path / "train" / "c2" / "zzz.png")
    ds = ImageFolder(str(tmp_path / "train"))
    with BatchLoader(ds, N + 1, SIDE, 8, "center", cache=tmp_path / "c") as loader:
        images, _ = next(loader.epoch(0))
    assert images[:, 2, 0, 0].tolist() == [100 + k for k in range(N)] + [99]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_workers_stop_on_errors(split, error):
    loader = BatchLoader(split, 2, SIDE, 8, "train", workers=2, prefetch=3)
    with pytest.raises(error):
        with loader:
            for _ in loader.epoch(0):
                procs = list(loader._executor._processes.values())
                raise error("stop")
    assert procs and not any(p.is_alive() for p in procs)
    assert loader._executor is None
    loader.close()  # idempotent
    assert len(_all(loader, 0)) == len(loader)  # a closed loader starts a new pool on demand
    loader.close()


def test_a_dead_worker_is_a_worker_error_not_a_broken_pool(split):
    """A worker killed while the main process trains (the out-of-memory killer) breaks the
    pool; the loader's next ``submit`` then raised a bare ``BrokenProcessPool`` (a traceback
    from run.py) instead of the one-line ``WorkerError``."""
    with BatchLoader(split, 2, SIDE, 8, "train", workers=1, prefetch=1) as loader:
        batches = loader.epoch(0)
        next(batches)
        for p in list(loader._executor._processes.values()):
            os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not loader._executor._broken and time.monotonic() < deadline:
            time.sleep(0.01)  # until the pool has noticed: its next submit fails
        with pytest.raises(WorkerError, match="worker process died"):
            next(batches)
        assert loader._executor is None


def test_start_batch_is_checked_at_call_time(split):
    loader = BatchLoader(split, 4, SIDE, 8, "train")
    with pytest.raises(ValueError, match=r"start_batch must be in \[0, 6\], got 7"):
        loader.epoch(0, start_batch=7)
    assert list(loader.epoch(0, start_batch=6)) == []


def _rewrite(path, number, mtime_step=10):
    """Write another coordinate image over ``path``; move its mtime on, as a later edit would."""
    before = os.stat(path).st_mtime_ns
    Image.fromarray(_coord_image(number)).save(path)
    os.utime(path, ns=(before + mtime_step * 10**9,) * 2)


def test_cache_follows_files_replaced_in_place_and_retries_fixed_ones(tmp_path, monkeypatch):
    """Issue 10, case 3: old pixels after an in-place replacement; a fixed file stayed skipped."""
    ds = _make_split(str(tmp_path / "train"))
    broken = tmp_path / "train" / "c2" / "020.png"
    broken.write_bytes(b"not a png")
    first = open_cache(ds, SIDE, tmp_path / "c")
    assert first.failed == {20: first.failed[20]} and first.images[3, 0, 0, 2] == 3
    _rewrite(tmp_path / "train" / "c0" / "003.png", 77)     # same size: only the time moved
    _rewrite(broken, 20)                                    # fixed
    decoded = []
    real = cache_module.load_rgb
    monkeypatch.setattr(cache_module, "load_rgb", lambda p, r: decoded.append(p) or real(p, r))
    again = open_cache(ds, SIDE, tmp_path / "c")
    assert sorted(os.path.basename(p) for p in decoded) == ["003.png", "020.png"]  # only those
    assert again.images[3, 0, 0, 2] == 77 and again.images[20, 0, 0, 2] == 20 and again.failed == {}
    decoded.clear()
    broken.write_bytes(b"broken again")
    assert 20 in open_cache(ds, SIDE, tmp_path / "c").failed and len(decoded) == 1
    decoded.clear()
    assert 20 in open_cache(ds, SIDE, tmp_path / "c").failed and decoded == []  # unchanged: not retried


@pytest.mark.parametrize("then", ["kept", "undone"])
def test_interrupted_cache_refresh_is_redone(tmp_path, monkeypatch, then):
    """The cache key, a case the original requirements left out: a refresh killed after writing a
    changed file's new pixels but before recording its size and time is redone by the next
    open, also when the edit was undone meanwhile, old modification time included (``cp -p``,
    ``rsync -t``): the row is marked unknown before its pixels are touched.  (Killed before
    writing, as this test once did, it passed without the mark.)"""
    ds = _make_split(str(tmp_path / "train"))
    open_cache(ds, SIDE, tmp_path / "c")
    target = tmp_path / "train" / "c1" / "010.png"
    original, st = target.read_bytes(), os.stat(target)
    new = tmp_path / "new.png"
    Image.fromarray(_coord_image(55)).save(new)
    os.replace(new, target)
    real = cache_module._fill_rows

    def killed_after_writing(*args):
        real(*args)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(cache_module, "_fill_rows", killed_after_writing)
        with pytest.raises(KeyboardInterrupt):
            open_cache(ds, SIDE, tmp_path / "c")
    if then == "undone":
        target.write_bytes(original)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    cache = open_cache(ds, SIDE, tmp_path / "c")
    assert cache.images[10, 0, 0, 2] == (55 if then == "kept" else 10) and cache.failed == {}
