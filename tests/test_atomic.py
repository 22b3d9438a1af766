"""atomic_write: the target is the old file or the complete new one, and no temporary is left."""
import os
import stat

import pytest

from minicompact.system.atomic import atomic_write


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half of the new")
            raise RuntimeError("disk full, say")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


def test_a_write_replaces_the_file_with_the_usual_permissions(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    with atomic_write(path) as f:
        f.write("new\n")
    assert path.read_text() == "new\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert os.listdir(path.parent) == ["log.jsonl"]
