"""The embedded default dataset: layout, determinism, caching, and that it needs a CNN."""
import json
import os

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from minicompact.data import synthetic
from minicompact.data.synthetic import (CLASSES, ensure_synthetic_dataset,
                                        default_dataset_root, make_synthetic_dataset)

SMALL = {"num_classes": 3, "train_per_class": 4, "val_per_class": 2, "size": 24, "seed": 1}
DEAD_PID = 2 ** 22 + 1  # above Linux's largest pid_max: no such process can exist


def _files(root):
    """{relative path: bytes} of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _temps(root):
    return list(root.parent.glob(f".{root.name}.tmp-*"))


# ----------------------------------------------------------------- layout and files
def test_layout_counts_and_marker(tmp_path):
    root = make_synthetic_dataset(tmp_path / "ds", **SMALL)
    for split, n in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(CLASSES[:3])
        for name in CLASSES[:3]:
            assert sorted(p.name for p in (root / split / name).iterdir()) == [
                f"{i:04d}.jpg" for i in range(n)]
    marker = json.loads((root / synthetic.MARKER).read_text())
    assert marker == {"version": synthetic.VERSION, "params": SMALL,
                      "classes": list(CLASSES[:3])}


def test_images_are_rgb_jpegs_of_the_right_size(tmp_path):
    root = make_synthetic_dataset(tmp_path / "ds", **SMALL)
    paths = sorted(root.rglob("*.jpg"))
    assert len(paths) == 3 * (4 + 2)
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (24, 24)
            assert "exif" not in img.info
            pixels = np.asarray(img)
        assert pixels.std() > 5  # an object was drawn, not a flat colour


def test_generation_is_deterministic(tmp_path):
    a = _files(make_synthetic_dataset(tmp_path / "a", **SMALL))
    b = _files(make_synthetic_dataset(tmp_path / "b", **SMALL))
    assert a == b
    c = _files(make_synthetic_dataset(tmp_path / "c", **{**SMALL, "seed": 2}))
    assert c.keys() == a.keys()
    assert all(c[k] != a[k] for k in a if k.endswith(".jpg"))


def test_refuses_bad_parameters_and_non_empty_roots(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_dataset(tmp_path / "x", num_classes=len(CLASSES) + 1)
    with pytest.raises(TypeError, match="colour"):
        ensure_synthetic_dataset(tmp_path / "x", colour=3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(tmp_path / "full", **SMALL)


# ----------------------------------------------------------------- caching
@pytest.fixture
def counted(monkeypatch):
    """Counts calls of ``make_synthetic_dataset`` made by ``ensure_synthetic_dataset``."""
    calls = []
    real = synthetic.make_synthetic_dataset

    def wrapper(root, **params):
        calls.append(root)
        return real(root, **params)

    monkeypatch.setattr(synthetic, "make_synthetic_dataset", wrapper)
    return calls


def test_ensure_makes_once_then_reuses(tmp_path, counted):
    root = ensure_synthetic_dataset(tmp_path / "ds", **SMALL)
    stamp = (root / synthetic.MARKER).stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path / "ds", **SMALL) == root
    assert len(counted) == 1
    assert (root / synthetic.MARKER).stat().st_mtime_ns == stamp
    assert _files(root) == _files(make_synthetic_dataset(tmp_path / "ref", **SMALL))
    assert _temps(root) == []


def test_default_root_is_in_the_cache_and_keyed_by_parameters(tmp_path, monkeypatch,
                                                              counted):
    monkeypatch.setenv("MINICOMPACT_CACHE", str(tmp_path / "cache"))
    root = default_dataset_root(**SMALL)
    assert root.parent == tmp_path / "cache" and root.name.startswith("synthetic-v1-")
    assert default_dataset_root(**SMALL) == root
    assert default_dataset_root(**{**SMALL, "seed": 2}) != root
    assert default_dataset_root() != root
    assert ensure_synthetic_dataset(**SMALL) == root
    assert ensure_synthetic_dataset(None, **SMALL) == root
    assert len(counted) == 1 and (root / synthetic.MARKER).is_file()


def test_ensure_recovers_from_leftover_temp_folders(tmp_path, counted):
    root = tmp_path / "ds"
    dead = tmp_path / f".ds.tmp-{DEAD_PID}-deadbeef"         # its process was killed
    (dead / "train" / "disc").mkdir(parents=True)
    (dead / "train" / "disc" / "0000.jpg").write_bytes(b"half a jpeg")
    old = tmp_path / f".ds.tmp-{os.getppid()}-0ld0ld00"      # a live pid, but abandoned
    old.mkdir()
    os.utime(old, (0, 0))
    live = tmp_path / f".ds.tmp-{os.getppid()}-11ve11ve"     # someone generating right now
    live.mkdir()
    assert ensure_synthetic_dataset(root, **SMALL) == root
    assert len(counted) == 1 and (root / synthetic.MARKER).is_file()
    assert _temps(root) == [live]


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    real, drawn = synthetic.draw_image, []

    def crash_midway(*args, **kwargs):
        drawn.append(1)
        if len(drawn) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "draw_image", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(root, **SMALL)
    assert not root.exists() and _temps(root) == []
    monkeypatch.setattr(synthetic, "draw_image", real)
    assert (ensure_synthetic_dataset(root, **SMALL) / synthetic.MARKER).is_file()


def test_losing_the_rename_race_uses_the_winners_copy(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    real = synthetic.make_synthetic_dataset

    def another_process_finishes_first(tmp, **params):
        real(root, **params)
        return real(tmp, **params)

    monkeypatch.setattr(synthetic, "make_synthetic_dataset", another_process_finishes_first)
    assert ensure_synthetic_dataset(root, **SMALL) == root
    assert (root / synthetic.MARKER).is_file() and _temps(root) == []


def test_ensure_never_touches_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="no synthetic.json"):
        ensure_synthetic_dataset(tmp_path / "other", **SMALL)
    assert _files(tmp_path / "other") == {"photo.jpg": b"x"}
    ensure_synthetic_dataset(tmp_path / "ds", **SMALL)
    with pytest.raises(FileExistsError, match="other parameters"):
        ensure_synthetic_dataset(tmp_path / "ds", **{**SMALL, "seed": 5})
    (tmp_path / "empty").mkdir()  # an empty folder is simply filled
    assert (ensure_synthetic_dataset(tmp_path / "empty", **SMALL) / "val").is_dir()


# ----------------------------------------------------------------- needs a CNN
# Measured on this split (8 classes, 150 train / 50 val each, seed 0; chance 12.5 %):
# best ridge on raw pixels ~20 % val; random conv features + ReLU + global pool ~70 % val.
CHANCE = 1 / 8


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """(x_train, y_train, x_val, y_val); x float32 (N, 32, 32, 3) in [0, 1], y int (N,)."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "ds",
                                  train_per_class=150, val_per_class=50)
    out = []
    for split in ("train", "val"):
        x, y = [], []
        for label, folder in enumerate(sorted((root / split).iterdir())):
            for path in sorted(folder.glob("*.jpg")):
                with Image.open(path) as img:
                    x.append(np.asarray(img.convert("RGB"), dtype=np.float32) / 255)
                y.append(label)
        out += [np.stack(x), np.array(y)]
    return out


def ridge_accuracies(f_train, y_train, f_val, y_val, lams):
    """Val accuracy of one-vs-rest least squares for each L2 penalty in ``lams``.

    f_train (N, D), f_val (M, D) features; y_train (N,), y_val (M,) integer labels.
    Features are standardised with the training statistics and get a bias column.  Solved
    in the dual, ``w = a^T (a a^T + lam I)^-1 Y``, so one (N, N) Gram matrix serves every
    penalty and N < D (pixels) stays cheap.
    """
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    a = np.c_[(f_train - mean) / std, np.ones(len(f_train))].astype(np.float64)
    b = np.c_[(f_val - mean) / std, np.ones(len(f_val))]
    gram, targets, val_gram = a @ a.T, np.eye(8)[y_train], b @ a.T
    accs = []
    for lam in lams:
        dual = np.linalg.solve(gram + lam * np.eye(len(a)), targets)
        accs.append(float(np.mean(np.argmax(val_gram @ dual, 1) == y_val)))
    return accs


def random_conv_features(x, num_filters=64, k=5, seed=0):
    """Random zero-mean k x k filters, both signs, ReLU, global average and max pool.

    x (N, H, W, 3) float32 -> (N, 4 * num_filters): a one-layer CNN with untrained
    weights, translation invariant by the global pooling.
    """
    filters = np.random.default_rng(seed).normal(size=(num_filters, k, k, 3))
    filters = (filters - filters.mean((1, 2, 3), keepdims=True)).astype(np.float32)
    x = (x - x.mean((1, 2, 3), keepdims=True)) / (x.std((1, 2, 3), keepdims=True) + 1e-6)
    feats = []
    for start in range(0, len(x), 200):  # chunks bound the (n, H', W', 3, k, k) view's product
        patches = sliding_window_view(x[start:start + 200], (k, k), axis=(1, 2))
        r = np.einsum("nhwcij,fijc->nhwf", patches, filters, optimize=True)
        r = np.maximum(np.concatenate([r, -r], -1), 0)
        feats.append(np.concatenate([r.mean((1, 2)), r.max((1, 2))], 1))
    return np.concatenate(feats)


def test_a_linear_model_on_pixels_stays_near_chance(arrays):
    x_train, y_train, x_val, y_val = arrays
    flat_train, flat_val = x_train.reshape(len(x_train), -1), x_val.reshape(len(x_val), -1)
    # Best over the penalty, chosen on val itself: optimistic for the linear model.
    accs = ridge_accuracies(flat_train, y_train, flat_val, y_val, (1e2, 1e3, 1e4, 1e5))
    assert max(accs) < 2 * CHANCE, accs


def test_nonlinear_translation_invariant_features_separate_the_classes(arrays):
    x_train, y_train, x_val, y_val = arrays
    (acc,) = ridge_accuracies(random_conv_features(x_train), y_train,
                              random_conv_features(x_val), y_val, (10.0,))
    assert acc > 4 * CHANCE, acc
