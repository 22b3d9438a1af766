"""lessons/execute.py's command line: every mistake is one line and exit status 2, found before
anything is written; ``--blank`` writes the student copies.  No notebook is executed here."""
import os
import subprocess
import sys

import nbformat
import pytest

from lessons import execute as ex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "lessons", "execute.py")
LESSONS = [os.path.basename(p) for p in ex.lesson_paths()]


def run(*args):
    """(exit status, stdout, stderr) of ``python lessons/execute.py ARGS``."""
    p = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, out, err, *words):
    assert rc == 2, (rc, out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("execute.py: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err


def test_blank_writes_student_copies(tmp_path):
    out = tmp_path / "new" / "copies"                # folders are created as needed
    rc, stdout, err = run("--blank", out, "01", "08")
    assert rc == 0, err
    names = sorted(os.listdir(out))
    assert names == [n for n in LESSONS if n.startswith(("01", "08"))]
    assert "exercise" in stdout and len(stdout.splitlines()) == 2
    nb = nbformat.read(out / names[-1], as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert any("raise NotImplementedError" in c.source for c in code)


def test_blank_into_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_text("mine")
    assert_one_line_error(*run("--blank", target), "not a folder")
    assert target.read_text() == "mine"


def test_blank_under_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_text("mine")
    assert_one_line_error(*run("--blank", target / "sub"), "not a folder")
    assert os.listdir(tmp_path) == ["afile"] and target.read_text() == "mine"


def test_blank_into_a_folder_holding_one_of_the_copies_writes_nothing(tmp_path):
    held = tmp_path / LESSONS[4]                    # a later lesson: the earlier ones were written before
    held.write_text("mine")
    assert_one_line_error(*run("--blank", tmp_path), LESSONS[4], "nothing was written")
    assert os.listdir(tmp_path) == [LESSONS[4]] and held.read_text() == "mine"


def test_blank_lists_every_copy_already_there(tmp_path):
    for name in LESSONS[1:3]:
        (tmp_path / name).write_text("mine")
    rc, out, err = run("--blank", tmp_path)
    assert_one_line_error(rc, out, err, *LESSONS[1:3])
    assert sorted(os.listdir(tmp_path)) == LESSONS[1:3]


@pytest.mark.parametrize("args, words", [
    (["--blank", os.path.join(ROOT, "lessons")], ["another folder than lessons/"]),
    (["--blank", os.path.join(ROOT, "lessons", "..", "lessons", "")], ["another folder than lessons/"]),
    (["--blank="], ["needs a folder name"]),
    (["03", "zz"], ["no lesson matches zz", "01"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    (["--device", "tpu"], ["invalid choice"]),
    (["--check", "--blank", "somewhere"], ["drop --check"]),
], ids=["lessons", "lessons-again", "empty", "unknown-lesson", "unknown-flag", "device", "blank-and-check"])
def test_argument_errors_are_one_line(args, words, tmp_path):
    rc, out, err = run(*args)
    assert_one_line_error(rc, out, err, *words)
    assert not os.path.exists(os.path.join(ROOT, "somewhere"))


def test_an_unwritable_folder_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Tests run as root, for whom chmod does not forbid writing: make the write itself fail
    (on the second copy) and check the first copy and the folders made for it are removed."""
    real_write = nbformat.write
    calls = []

    def failing_write(nb, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied", getattr(fp, "name", fp))
        return real_write(nb, fp, *a, **k)

    monkeypatch.setattr(ex.nbformat, "write", failing_write)
    assert ex.main(["--blank", str(tmp_path / "a" / "b"), "01", "02", "03"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Permission denied" in err and "nothing was written" in err
    assert os.listdir(tmp_path) == []


def test_a_folder_refused_by_the_system_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ex.os, "access", lambda path, mode: False)
    assert ex.main(["--blank", str(tmp_path / "sub"), "01"]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "not writable" in err
    assert os.listdir(tmp_path) == []
