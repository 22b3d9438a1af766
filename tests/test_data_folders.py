"""ImageNet-style folder layout: what is found, what is ignored, and every layout error."""
import os

import numpy as np
import pytest
from PIL import Image

from minicompact.data.folders import DatasetError, ImageFolder, open_dataset


def _img(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format="PNG")


def _tree(root, splits=("train", "val"), classes=("cat", "dog"), per_class=2):
    for split in splits:
        for c in classes:
            for i in range(per_class):
                _img(os.path.join(root, split, c, f"{i}.png"))
    return root


def _error(fn, *args):
    with pytest.raises(DatasetError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    return msg


def test_valid_layout_classes_labels_and_ignored_files(tmp_path):
    root = _tree(tmp_path / "d", classes=("zebra", "ant", "moth"))
    train = tmp_path / "d" / "train"
    _img(str(train / "ant" / "sub" / "deep.png"))          # recursive: counted
    _img(str(train / "ant" / "UPPER.JPG"))                  # case-insensitive extension
    _img(str(train / "ant" / "x.jpeg"))
    _img(str(train / "ant" / ".hidden.png"))                # hidden file: ignored
    _img(str(train / "ant" / ".cache" / "h.png"))           # hidden folder: ignored
    _img(str(train / ".ipynb_checkpoints" / "c.png"))       # hidden class folder: ignored
    (train / "ant" / "notes.txt").write_text("not an image")
    (train / "ant" / "noext").write_text("not an image")
    tr, va = open_dataset(root)
    assert tr.classes == ["ant", "moth", "zebra"] == va.classes
    assert tr.class_to_idx == {"ant": 0, "moth": 1, "zebra": 2}
    names = sorted(os.path.relpath(p, train) for p, label in tr.samples if label == 0)
    assert names == ["ant/0.png", "ant/1.png", "ant/UPPER.JPG", "ant/sub/deep.png", "ant/x.jpeg"]
    assert len(tr) == 5 + 2 + 2 and len(va) == 6
    assert [label for _, label in tr.samples] == sorted(label for _, label in tr.samples)
    assert tr.labels == [label for _, label in tr.samples]


def test_missing_root(tmp_path):
    msg = _error(open_dataset, tmp_path / "nowhere")
    assert "nowhere" in msg and "does not exist" in msg and "train/<class>" in msg


def test_root_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "not a folder" in _error(open_dataset, tmp_path / "f")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(tmp_path, split):
    root = _tree(tmp_path / "d", splits=[s for s in ("train", "val") if s != split])
    msg = _error(open_dataset, root)
    assert f"no '{split}' folder" in msg


def test_split_without_class_folders(tmp_path):
    root = _tree(tmp_path / "d", splits=("val",))
    os.makedirs(tmp_path / "d" / "train")
    msg = _error(open_dataset, root)
    assert "no class folders" in msg and "train" in msg


def test_flat_val_folder_hints_at_valprep(tmp_path):
    root = _tree(tmp_path / "d", splits=("train",))
    for i in range(3):
        _img(str(tmp_path / "d" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG"))
    msg = _error(open_dataset, root)
    assert "3 images directly" in msg and "no class folders" in msg and "valprep" in msg


def test_empty_class_folder_is_named(tmp_path):
    root = _tree(tmp_path / "d")
    os.makedirs(tmp_path / "d" / "train" / "emu")
    (tmp_path / "d" / "train" / "emu" / "readme.txt").write_text("no images here")
    msg = _error(open_dataset, root)
    assert "emu" in msg and "1 of 3 class folders hold no images" in msg


def test_split_with_no_images_at_all(tmp_path):
    root = _tree(tmp_path / "d", splits=("val",))
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "d" / "train" / c)
    msg = _error(open_dataset, root)
    assert "no images in any of its 2 class folders" in msg and ".jpeg" in msg


def test_val_classes_differ_names_missing_and_extra(tmp_path):
    root = tmp_path / "d"
    _tree(root, splits=("train",), classes=("a", "b", "c", "d", "e"))
    _tree(root, splits=("val",), classes=("a", "x"))
    msg = _error(open_dataset, root)
    assert "4 train classes missing from val (b, c, d, ...)" in msg
    assert "1 val classes not in train (x)" in msg


def test_loose_images_beside_class_folders_warn(tmp_path):
    _tree(tmp_path / "d", splits=("val",))
    _img(str(tmp_path / "d" / "val" / "stray.png"))
    with pytest.warns(UserWarning, match="ignoring 1 images"):
        va = ImageFolder(tmp_path / "d" / "val")
    assert len(va) == 4


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


def test_symlink_loop_lists_each_image_once_and_warns(tmp_path):
    """Issue 10, case 4: ``ln -s . train/a/loop`` used to list the class 41 times, silently."""
    root = _tree(tmp_path / "d", classes=("a", "b"), per_class=3)
    os.symlink(".", tmp_path / "d" / "train" / "a" / "loop")
    with pytest.warns(UserWarning, match=r"1 links to folders already listed were not followed \(e.g. a/loop\)"):
        tr, _ = open_dataset(root)
    assert len(tr) == 6 and len({p for p, _ in tr.samples}) == 6


def test_listing_is_a_tree_each_file_once(tmp_path):
    """Cases the original list of requirements left out: a second path to a folder, a linked file, a hard link,
    a link into another class (first class keeps it), a broken link and a socket named *.png."""
    import socket
    root = _tree(tmp_path / "d", classes=("a", "b"), per_class=2)
    a, b = tmp_path / "d" / "train" / "a", tmp_path / "d" / "train" / "b"
    _img(str(a / "sub" / "deep.png"))
    os.symlink("sub", a / "again")                      # second path to a/sub
    os.symlink(a / "0.png", a / "linked.png")           # a file and a link to it
    os.link(a / "1.png", a / "hard.png")                # a hard link: the same file
    os.symlink(a / "sub" / "deep.png", b / "2.png")     # the same file in another class
    os.symlink(tmp_path / "nowhere.png", b / "broken.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(b / "sock.png"))
    try:
        with pytest.warns(UserWarning) as record:
            tr, _ = open_dataset(root)
    finally:
        sock.close()
    rel = sorted(os.path.relpath(p, tmp_path / "d" / "train") for p, _ in tr.samples)
    assert rel == ["a/0.png", "a/1.png", "a/sub/deep.png", "b/0.png", "b/1.png"]
    text = " | ".join(str(w.message) for w in record)
    assert "1 links to folders already listed" in text and "(e.g. a/again)" in text
    assert "3 files reachable by more than one path" in text  # hard.png, linked.png, b/2.png
    assert "2 entries with image names are not regular files" in text


def test_unreadable_subfolder_is_reported(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every folder")
    root = _tree(tmp_path / "d", classes=("a", "b"))
    locked = tmp_path / "d" / "train" / "a" / "locked"
    _img(str(locked / "x.png"))
    os.chmod(locked, 0)
    try:
        with pytest.warns(UserWarning, match="1 folders could not be read"):
            tr, _ = open_dataset(root)
    finally:
        os.chmod(locked, 0o755)
    assert len(tr) == 4
