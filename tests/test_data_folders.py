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
