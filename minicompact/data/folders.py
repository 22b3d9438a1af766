"""ImageNet-style folders: ``ROOT/train/<class>/<images>`` and ``ROOT/val/<class>/<images>``.

The layout is the one of pytorch/examples' ImageNet script (paper sec. 5.1, "Dataset
Details"): one folder per class, class names sorted to give the labels 0..K-1, and the same
classes in ``train/`` and ``val/``.

Decisions:

* Images are found **recursively** inside a class folder (files directly in it and in any
  subfolder, symlinks followed), like torchvision's ``ImageFolder``; paths are sorted so the
  sample list — and hence every shuffle — is the same on every machine.
* The listing follows a file *tree*, not a graph: a link to a folder already visited (a
  loop such as ``ln -s . loop``, or a second path to the same folder) is not followed, and a
  file reachable by several paths (links, hard links) is listed once per split: at a path
  without links if it has one, else in the first class.  Only regular files are listed: a FIFO, socket or device named
  ``*.jpg`` would block or fail the decoder, and a broken link has nothing to read.  Each of
  these, and folders that cannot be read, is counted in one warning per split.
* Extensions are matched case-insensitively (``IMAGE_EXTENSIONS``); other files are ignored.
* Hidden files and folders (name starting with ``.``, e.g. ``.DS_Store``,
  ``.ipynb_checkpoints``) are ignored everywhere.
* Every layout mistake raises ``DatasetError`` with a one-line message *before* any
  training starts; whether each file really decodes is checked later, by the loader.
"""
import os
import warnings

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
VALPREP_HINT = ("sort them into one folder per class first, e.g. with the valprep.sh script "
                "linked from pytorch/examples' imagenet README "
                "(github.com/soumith/imagenetloader.torch)")


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on; the message is one line."""


def _some(names, k=3):
    """``"a, b, c, ..."``: the first ``k`` names, for a one-line message."""
    names = sorted(names)
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def is_image_file(name):
    """True for a visible file name with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _visible_entries(folder):
    """(sub-folder names, image file names) directly inside ``folder``, hidden ones dropped."""
    dirs, images = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():  # follows symlinks
                dirs.append(e.name)
            elif is_image_file(e.name) and e.is_file():
                images.append(e.name)
    return sorted(dirs), sorted(images)


class _Notes:
    """What a listing left out, by kind: each a list of paths, for one warning per kind."""

    KINDS = {
        "revisited": "links to folders already listed were not followed",
        "special": "entries with image names are not regular files (FIFO, socket, device or "
                   "broken link) and were ignored",
        "duplicate": "files reachable by more than one path were listed once",
        "unreadable": "folders could not be read and their images are left out",
    }

    def __init__(self):
        self.paths = {kind: [] for kind in self.KINDS}

    def warn(self, root):
        for kind, what in self.KINDS.items():
            found = self.paths[kind]
            if found:
                rel = [os.path.relpath(p, root) for p in found]
                warnings.warn(f"{root}: {len(found)} {what} (e.g. {_some(rel, 2)})", stacklevel=3)


def _scan(folder, notes):
    """[(path, identity, linked)] of the regular image files under ``folder``, walked as a tree.

    The real folders come first (depth first, sorted), then the folders reached through
    links, so a link to a folder that is also reachable without one is the path dropped.
    identity: (device, inode), free for plain files (the directory entry holds the inode),
    one ``stat`` for a symlinked file; linked: whether a link is on the path.
    """
    found, visited, stack, links = [], set(), [(folder, False)], []
    while stack or links:
        top, via_link = stack.pop() if stack else links.pop(0)
        try:
            st = os.stat(top)
            if (st.st_dev, st.st_ino) in visited:
                notes.paths["revisited"].append(top)
                continue
            visited.add((st.st_dev, st.st_ino))
            with os.scandir(top) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:
            notes.paths["unreadable"].append(top)
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir():  # follows links; the visited set stops loops
                    if e.is_symlink():
                        links.append((e.path, True))
                    else:
                        subdirs.append((e.path, via_link))
                elif not is_image_file(e.name):
                    continue
                elif not e.is_file():  # FIFO, socket, device, broken link
                    notes.paths["special"].append(e.path)
                elif e.is_symlink():
                    target = os.stat(e.path)
                    found.append((e.path, (target.st_dev, target.st_ino), True))
                else:
                    found.append((e.path, (st.st_dev, e.inode()), via_link))
            except OSError:
                notes.paths["special"].append(e.path)
        stack.extend(reversed(subdirs))
    return found


def _unique(found_by_label, notes):
    """{label: sorted paths}, each file identity once: at a path without links if there is one,
    else in the first class, else at the first path in sorted order."""
    best = {}
    for label, found in enumerate(found_by_label):
        for path, identity, linked in found:
            key = (linked, label, path)
            if identity in best:
                notes.paths["duplicate"].append(max(best[identity], key)[2])
                key = min(best[identity], key)
            best[identity] = key
    out = [[] for _ in found_by_label]
    for _, label, path in best.values():
        out[label].append(path)
    return [sorted(paths) for paths in out]


class ImageFolder:
    """One split folder (``train/`` or ``val/``): its classes and its (path, label) samples.

    root: the split folder.
    classes: class folder names, sorted; ``classes[label]`` names a label.
    class_to_idx: ``{class name: label}``.
    samples: list of ``(path, label)``, sorted by class then path.

    Raises ``DatasetError`` for a missing folder, no class folders (with the ImageNet
    ``valprep`` hint when images lie directly in the split), or class folders without images.
    """

    def __init__(self, split_dir):
        self.root = os.fspath(split_dir)
        if not os.path.isdir(self.root):
            raise DatasetError(f"split folder {self.root} does not exist or is not a folder")
        classes, loose = _visible_entries(self.root)
        if not classes:
            if loose:
                raise DatasetError(
                    f"{self.root} holds {len(loose)} images directly but no class folders: "
                    f"{VALPREP_HINT}")
            raise DatasetError(f"{self.root} has no class folders "
                               f"(expected {self.root}/<class>/<images>)")
        if loose:
            warnings.warn(f"{self.root}: ignoring {len(loose)} images lying outside any "
                          f"class folder (e.g. {_some(loose, 2)})", stacklevel=2)
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples, empty = [], []
        notes = _Notes()
        found = _unique([_scan(os.path.join(self.root, c), notes) for c in classes], notes)
        for label, (c, paths) in enumerate(zip(classes, found)):
            if not paths:
                empty.append(c)
            self.samples.extend((p, label) for p in paths)
        notes.warn(self.root)
        if not self.samples:
            raise DatasetError(
                f"{self.root}: no images in any of its {len(classes)} class folders "
                f"(looked for {' '.join(IMAGE_EXTENSIONS)}, any case)")
        if empty:
            raise DatasetError(
                f"{self.root}: {len(empty)} of {len(classes)} class folders hold no images: "
                f"{_some(empty)}")

    def __len__(self):
        return len(self.samples)

    @property
    def labels(self):
        """Labels of ``samples`` in order, a list of ints."""
        return [label for _, label in self.samples]

    def __repr__(self):
        return (f"ImageFolder({self.root!r}: {len(self.samples)} images, "
                f"{len(self.classes)} classes)")


def open_dataset(root):
    """Check ``root`` and return ``(train, val)`` ImageFolders with identical classes.

    Raises ``DatasetError`` (one line) for a missing root, a missing ``train/`` or ``val/``,
    any split problem ``ImageFolder`` reports, or val classes that differ from train's (it
    names a few missing and extra ones).
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise DatasetError(f"dataset root {root} does not exist "
                           "(expected ROOT/train/<class>/<images> and ROOT/val/<class>/<images>)")
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root {root} is not a folder")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DatasetError(f"{root} has no '{split}' folder "
                               f"(expected {root}/{split}/<class>/<images>)")
    train = ImageFolder(os.path.join(root, "train"))
    val = ImageFolder(os.path.join(root, "val"))
    if val.classes != train.classes:
        missing = set(train.classes) - set(val.classes)
        extra = set(val.classes) - set(train.classes)
        parts = []
        if missing:
            parts.append(f"{len(missing)} train classes missing from val ({_some(missing)})")
        if extra:
            parts.append(f"{len(extra)} val classes not in train ({_some(extra)})")
        raise DatasetError(f"val classes differ from train classes in {root}: "
                           + "; ".join(parts))
    return train, val
