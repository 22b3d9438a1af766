"""The run's images: open the folders, check them, build the loaders, estimate the normalisation.

Each function turns what can go wrong with a user's data into a one-line ``RunError``
before training starts: a folder that is not a dataset, ranks that see different files, a
class none of whose images can be read, a cache that cannot be built, a split with no
readable image to estimate the mean from.
"""
import contextlib
import os
import sys
import warnings

from ..data import transforms
from ..data.cache import cache_key, folder_lock, shared_cache_folder
from ..data.folders import DatasetError, open_dataset
from ..data.images import BadImageError, load_rgb
from ..data.synthetic import ensure_synthetic_dataset
from ..training import recipe
from .console import RunError, fail, say
from .settings import missing_data_folder


def open_data(s, comm):
    """(train, val) ``ImageFolder`` splits of ``s.data`` (the generated demo dataset when None),
    the same files on every rank; sets ``s.data``, ``s.train_images`` and ``s.train_key``."""
    if s.data is None:
        say("run.py: no --data given: using the generated demo dataset (see README)")
        s.data = str(comm.agree(ensure_synthetic_dataset, root_first=True))
    (train_set, val_set), caught = comm.agree(open_splits, s.data, errors=RunError)
    for w in caught:
        say(f"run.py: warning: {w.message}", sys.stderr)
    if len(train_set.classes) < 2:
        fail(f"{s.data} has {len(train_set.classes)} class; a classifier needs at least 2")
    keys = listing_keys(train_set, val_set)
    s.train_images, s.train_key = len(train_set), keys[0]
    comm.agree(same_files_on_every_rank, comm.gather_object(keys), s.data, root_only=True, errors=RunError)
    return train_set, val_set


def open_splits(root):
    """``((train, val), warnings)`` of the image folders under ``root``; one line if unusable."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return open_dataset(root), caught
    except DatasetError as exc:
        fail(str(exc))


def listing_keys(train_set, val_set):
    """(train key, val key): names of the two file listings (equal keys: the same files)."""
    return cache_key(train_set.samples, 0, train_set.root), cache_key(val_set.samples, 0, val_set.root)


def same_files_on_every_rank(seen, root):
    """One line unless every rank (``seen``: each rank's ``listing_keys``) lists the same
    files: ranks on machines that see different data would train on different images."""
    for rank, keys in enumerate(seen):
        if keys != seen[0]:
            fail(f"rank {rank} lists other files under {root} than rank 0; every rank must read the "
                 "same dataset (a folder on a file system all machines share)")


def open_loaders(stack, s, train_set, val_set, resize, crop, rank=0, ranks=1):
    """(train, val, ten-crop val) ``BatchLoader``s of this rank (``recipe.open_loaders``), their
    worker pools entered into the ``contextlib.ExitStack`` ``stack``.

    With ``s.cache`` one uint8 cache per split in OUT/cache; with ``s.cache_dir`` (which
    implies it) in DIR/<data key>/, shared by every run on this data (a sweep's points) and
    built by one run at a time.  An evaluation reads no training image, so its training
    loader stays idle and uncached."""
    cache_dir = os.path.join(s.out, "cache") if s.cache else None
    lock = contextlib.nullcontext()
    if s.cache_dir:  # implies --cache
        cache_dir = shared_cache_folder(s.cache_dir, s.data, s.train_key)
        if rank == 0:  # the other ranks read what rank 0 built (root_first)
            lock = folder_lock(cache_dir)
    try:
        with lock:
            return recipe.open_loaders(stack, train_set, val_set, resize, crop, s.batch_size, s.workers, s.seed,
                                       cache_dir, train_cache=not s.evaluate, rank=rank, ranks=ranks)
    except OSError as exc:
        raise RunError(f"cannot build the image cache in {cache_dir}: {exc.strerror or exc}", 1) from None


def images_for(stack, s, train_set, val_set, known_stats, ranks):
    """The run's ``recipe.Images`` on this rank, every step taken by all ranks (``ranks``: an
    ``outcome.Ranks``): the loaders (rank 0 first: it builds any cache the others read), a
    check that every class has a readable image, the normalisation (``known_stats``: a
    checkpoint's or a fine-tune source's (mean, std); None: estimated on rank 0)."""
    comm = ranks.comm
    resize, crop = transforms.scaled_sizes(s.image_size)
    train, val, ten = ranks.root_first(open_loaders, stack, s, train_set, val_set, resize, crop, comm.rank,
                                       comm.size)
    checked = [val] + ([] if s.evaluate else [train])
    ranks.root(lambda: [require_readable_classes(loader) for loader in checked])
    mean, std = known_stats or ranks.root(normalisation, train, s.seed)
    return recipe.Images(train_set, val_set, train, val, ten, tuple(mean), tuple(std), resize, crop)


def require_readable_classes(loader):
    """``RunError`` naming the classes of ``loader``'s split none of whose images can be read.

    Training without a class, or reporting an error measured on no image, would be silently
    wrong; so the run stops before training (one decode per class when the data is healthy).
    """
    dataset = loader.dataset
    missing = loader.classes_without_images()
    if not missing:
        return
    names = [dataset.classes[c] for c in missing]
    first = next(p for p, label in dataset.samples if label == missing[0])
    try:
        load_rgb(first, loader.resize)
        why = ""
    except BadImageError as exc:
        why = f"; e.g. {os.path.relpath(first, dataset.root)}: {exc.reason}"
    raise RunError(f"{dataset.root}: none of the images of {len(names)} of {len(dataset.classes)} classes can "
                   f"be read ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}){why}; fix or remove "
                   "those class folders in train/ and val/")


def normalisation(train_loader, seed):
    """Per-channel (mean, std) of the training images (``recipe.normalisation``)."""
    try:
        return recipe.normalisation(train_loader.dataset, train_loader.resize, seed, train_loader.cache)
    except ValueError as exc:  # every sampled image failed to decode
        raise RunError(str(exc)) from None


def checkpoint_data(path, data, settings, state, classes):
    """The val images a saved model is measured on (--thin, --export): its run's dataset, or
    ``data`` when given (the folder moved).  Returns (train_set, val_set, resize, crop, mean,
    std), the sizes and the normalisation the run trained with.

    path: the checkpoint (for messages); settings, state: its run settings and training
    state; classes: its model's class names.  ``ValueError`` (one line) for no dataset, a
    missing folder, a folder that is not a dataset or one with other classes.
    """
    root = data or settings.get("data")
    if not root:
        raise ValueError(f"{path} names no dataset; give --data ROOT (its val/ split is evaluated)")
    problem = missing_data_folder(root, from_checkpoint=not data)
    if problem:
        raise ValueError(problem)
    try:
        train_set, val_set = open_dataset(root)
    except DatasetError as exc:
        raise ValueError(str(exc)) from None
    if list(val_set.classes) != list(classes):
        raise ValueError(f"{root} has other classes than the model of {path}; give --data ROOT of its run")
    resize, crop = transforms.scaled_sizes(settings.get("image_size", 224))
    if "mean" in state:
        mean, std = state["mean"], state["std"]
    else:
        mean, std = recipe.normalisation(train_set, resize, settings.get("seed", 0))
    return train_set, val_set, resize, crop, mean, std

