"""Issue 10 — nothing lost, nothing silent: every numbered case, and one case per principle
that the original list of requirements left out (output folders, the tree walk, the cache key, signals).

Tiny runs on generated folders (see test_run.py); the signal and kill -9 tests run run.py in
a subprocess with a timeout, so a regression fails instead of hanging.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from test_processes import alive, wait_dead
from test_run import TINY, main, read_log, write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "run.py")


@pytest.fixture
def data(tmp_path):
    return write_folder(tmp_path / "data")


def outcome(capsys, *args):
    """(exit status, stdout, stderr) of run.py, whether it exits through SystemExit or returns."""
    try:
        code = main(*args)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_failure(capsys, *args, match, code=2):
    """run.py fails with ``code``, one "run.py: error:" line containing ``match``, no traceback."""
    got, _, err = outcome(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("run.py: error:")]
    assert got == code, err
    assert len(errors) == 1 and all(line.startswith("run.py:") for line in lines), err
    assert match in errors[0], errors[0]
    return errors[0]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# -- 1. Re-running into an existing output folder ------------------------------------------------
def test_case1_an_earlier_run_is_never_overwritten(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    before = snapshot(out)
    error = one_line_failure(capsys, "--data", data, "--epochs", 1, "--out", out, *TINY, "--lr", "0.01",
                             match="already holds a run")
    assert f"--resume {out / 'last.npz'}" in error and "another --out" in error and "--overwrite" in error
    assert snapshot(out) == before
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY, "--lr", "0.01", "--overwrite") == 0
    assert len(read_log(out)) == 1 and read_log(out)[0]["lr"] != json.loads(before["log.jsonl"])["lr"]
    # The default folder: the same command twice gives runs/<name> and runs/<name>-2.
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main("--data", data, "--epochs", 1, *TINY) == 0
    assert sorted(os.listdir(tmp_path / "runs")) == ["compact-d3-rho0.03", "compact-d3-rho0.03-2"]
    assert "runs/compact-d3-rho0.03 exists; this run goes to runs/compact-d3-rho0.03-2" in capsys.readouterr().err


def test_output_rule_resuming_an_earlier_checkpoint_keeps_the_later_state(data, tmp_path, capsys):
    """Not in the original requirements: --resume OUT/early.npz (epoch 1) while OUT/last.npz is at epoch 2 would
    overwrite last.npz and rewrite the log.  A branch goes to another --out; a finished run
    is neither trained nor reported again."""
    out = tmp_path / "x"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    (out / "early.npz").write_bytes((out / "last.npz").read_bytes())
    assert main("--resume", out / "last.npz", "--epochs", 2, "--workers", 0, "--no-progress") == 0
    assert [r["epoch"] for r in read_log(out)] == [1, 2]  # continued in place
    before = snapshot(out)
    capsys.readouterr()
    one_line_failure(capsys, "--resume", out / "early.npz", "--epochs", 2, "--workers", 0,
                     match="last.npz is further along (epoch 2, step 0)")
    assert snapshot(out) == before
    branch = tmp_path / "branch"
    assert main("--resume", out / "early.npz", "--epochs", 2, "--workers", 0, "--no-progress", "--out", branch) == 0
    assert [r["epoch"] for r in read_log(branch)] == [1, 2] and snapshot(out) == before
    one_line_failure(capsys, "--resume", out / "last.npz", "--workers", 0, match="has already trained 2 epochs")


# -- 2. --evaluate ---------------------------------------------------------------------------------
def test_case2_evaluate_writes_beside_the_run_and_reads_model_npz(data, tmp_path, capsys):
    out = tmp_path / "x"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    before = snapshot(out)
    trained = json.loads(before["report.json"])["after_threshold"]["accuracy"]
    assert main("--evaluate", out / "best.npz", "--workers", 0, "--no-progress") == 0
    assert main("--evaluate", out / "model.npz", "--workers", 0, "--no-progress") == 0
    assert main("--evaluate", out / "model.npz", "--workers", 0, "--no-progress") == 0
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["eval-best", "eval-model", "eval-model-2"]
    again = json.loads((out / "eval-model" / "report.json").read_text())["after_threshold"]["accuracy"]
    assert again == trained  # the thresholded model, evaluated again: the same numbers
    capsys.readouterr()
    one_line_failure(capsys, "--evaluate", out / "best.npz", "--out", out, "--workers", 0,
                     match="already holds a run")  # the run's model.npz and report.json
    one_line_failure(capsys, "--evaluate", out / "best.npz", "--out", out / "eval-best", "--workers", 0,
                     match="already holds an evaluation")
    assert snapshot(out) == before
    from minicompact.model import CompactNet
    CompactNet.load(out / "model.npz").save(tmp_path / "plain.npz")  # no run settings in it
    one_line_failure(capsys, "--evaluate", tmp_path / "plain.npz", match="without the run settings")


# -- 3. The cache ----------------------------------------------------------------------------------
def test_case3_cache_serves_new_pixels_and_retries_fixed_files(data, tmp_path):
    out = tmp_path / "x"
    red = data / "train" / "red" / "000.jpg"
    good = red.read_bytes()
    red.write_bytes(b"broken")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert main("--data", data, "--epochs", 1, "--out", out, *TINY, "--cache") == 0
    assert read_log(out)[0]["skipped"] == 1
    red.write_bytes(good)
    os.utime(red, ns=(time.time_ns() + 10**9,) * 2)
    blue = data / "val" / "blue" / "000.jpg"
    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(blue)  # replaced in place
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY, "--cache", "--overwrite") == 0
    assert read_log(out)[0]["skipped"] == 0
    from minicompact.data.cache import ImageCache
    val = ImageCache(str(out / "cache" / "val_18px.npy"), str(out / "cache" / "val_18px.json"))
    assert val.images[0].min() >= 250 and val.failed == {}


def test_cache_can_be_added_on_resume_and_is_kept(data, tmp_path, capsys):
    """--cache changes no number (the cache holds what decoding gives), so a resumed run may
    add it; it used to be refused ("--cache True ignored; the checkpoint's value False is
    used").  Once on, a resume without the flag keeps it."""
    out = tmp_path / "x"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    capsys.readouterr()
    code, _, err = outcome(capsys, "--resume", out / "last.npz", "--epochs", 2, "--cache", "--workers", 0,
                           "--no-progress")
    assert code == 0 and "ignored" not in err and (out / "cache" / "train_18px.npy").exists(), err
    assert main("--resume", out / "last.npz", "--epochs", 3, "--workers", 0, "--no-progress") == 0
    assert json.loads(str(np.load(out / "last.npz")["__train__"]))["settings"]["cache"] is True


# -- 4. A symlink loop (and a FIFO, case 8) ---------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_case4_and_8_symlink_loop_and_fifo_are_listed_never_opened(data, tmp_path, capsys):
    os.symlink(".", data / "train" / "red" / "loop")
    os.mkfifo(data / "train" / "red" / "pipe.jpg")
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("run.py hung"))
    signal.setitimer(signal.ITIMER_REAL, 60)
    try:
        code, out, err = outcome(capsys, "--data", data, "--epochs", 1, "--out", tmp_path / "x", *TINY)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert code == 0 and "24 train / 12 val images" in out
    assert "run.py: warning:" in err and "red/loop" in err and "red/pipe.jpg" in err


# -- 5. Unreadable splits and classes -------------------------------------------------------------
@pytest.mark.parametrize("broken, match", [
    ("val", "val: none of the images of 3 of 3 classes can be read (blue, green, red)"),
    ("train", "train: none of the images of 3 of 3 classes can be read"),
    ("train/red", "train: none of the images of 1 of 3 classes can be read (red); e.g. red/000.jpg")])
def test_case5_a_class_without_readable_images_stops_before_training(data, tmp_path, monkeypatch, capsys,
                                                                    broken, match):
    for p in (data / broken).rglob("*.jpg"):
        p.write_bytes(b"not a jpeg")
    monkeypatch.chdir(tmp_path)
    one_line_failure(capsys, "--data", data, "--epochs", 1, *TINY, match=match)
    assert os.listdir(tmp_path / "runs") == []  # its new default folder, still empty, is removed


def test_case5_evaluation_of_zero_images_is_an_error_not_100_percent(data):
    from minicompact.data.folders import ImageFolder
    from minicompact.data.loader import BatchLoader
    from minicompact.model import CompactNet, ModelConfig
    from minicompact.training.recipe import Network
    from minicompact.training.trainer import NoImages, Trainer
    for p in (data / "val").rglob("*.jpg"):
        p.write_bytes(b"")
    loader = BatchLoader(ImageFolder(data / "val"), 4, 18, 16, "center")
    model = CompactNet(ModelConfig(depth=3, num_classes=3, width_mult=0.03, stem="small"))
    images = SimpleNamespace(train=None, val=loader, mean=[0.5] * 3, std=[0.25] * 3)
    trainer = Trainer(Network(model, None, None), images, epochs=1)
    with pytest.warns(UserWarning), pytest.raises(NoImages, match=r"no image .* \(12 skipped"):
        trainer.evaluate()


# -- 6 and 10. Flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["--warmup", "inf"], "--warmup must be a finite number, got inf"),
    (["--warmup", "3", "--epochs", "2"], "--warmup 3 is longer than the run (--epochs 2)"),
    (["--lr", "nan"], "--lr must be a finite number"), (["--rho", "nan"], "--rho must be a finite"),
    (["--cw", "inf"], "--cw must be a finite"), (["--threshold=-inf"], "--threshold must be a finite"),
    (["--width-mult", "inf"], "--width-mult must be a finite"), (["--seed", "-1"], "--seed must be in"),
    (["--width-mult", "1000"], "--width-mult must be in (0, 64]"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'")])
def test_case6_and_10_flags_are_finite_and_in_range(args, match, capsys):
    one_line_failure(capsys, *TINY, *args, match=match)


def test_a_checkpoints_warmup_longer_than_the_run_is_not_blamed_on_flags(data, tmp_path, capsys):
    """A checkpoint whose warmup exceeds --epochs: --evaluate trains nothing, so no note;
    --resume notes it without 'set --warmup' (which a resume ignores) and is not refused."""
    out = tmp_path / "x"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    with np.load(out / "last.npz") as z:
        arrays = {k: z[k] for k in z.files}
    state = json.loads(str(arrays["__train__"]))
    state["settings"]["warmup"] = 3.0
    arrays["__train__"] = np.array(json.dumps(state))
    np.savez(out / "long.npz", **arrays)
    capsys.readouterr()
    code, _, err = outcome(capsys, "--evaluate", out / "long.npz", "--workers", 0, "--no-progress")
    assert code == 0 and "warmup" not in err, err
    code, _, err = outcome(capsys, "--resume", out / "long.npz", "--epochs", 2, "--warmup", 3, "--workers", 0,
                           "--no-progress", "--out", tmp_path / "y")
    assert code == 0 and "--warmup 3 is longer than the run (--epochs 2)" in err and "set --warmup" not in err, err


def test_case10_checkpoint_files_that_are_not_checkpoints(tmp_path, data, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "photo.jpg")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.npz").write_bytes(b"")
    np.savez(tmp_path / "pickled.npz", a=np.array([{"x": 1}], dtype=object))
    for path, match in [("notes.txt", "not an .npz archive"), ("photo.jpg", "not an .npz archive"),
                        ("run", f"is a folder, not a checkpoint file; did you mean {tmp_path / 'run' / 'last.npz'}"),
                        ("pickled.npz", "holds pickled Python objects")]:
        error = one_line_failure(capsys, "--resume", tmp_path / path, match=match)
        assert "allow_pickle" not in error


def test_case10_resume_on_other_data_and_ctrl_c_while_estimating(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x"
    from minicompact import optim
    real_step, calls = optim.SGD.step, []

    def step_then_interrupt(self):
        real_step(self)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(optim.SGD, "step", step_then_interrupt)
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 130
    monkeypatch.setattr(optim.SGD, "step", real_step)
    for p in list((data / "train" / "red").glob("*.jpg"))[2:]:
        p.unlink()
    capsys.readouterr()
    one_line_failure(capsys, "--resume", out / "last.npz", "--workers", 0,
                     match="stopped at step 2 of epoch 1 on a training set of 24 images; this one has 18")

    from minicompact.data import transforms

    def ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(transforms, "estimate_mean_std", ctrl_c)
    code, _, err = outcome(capsys, "--data", data, "--epochs", 1, "--out", tmp_path / "y", *TINY)
    assert code == 130 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("run.py: stopped by SIGINT")


def test_case10_resume_at_an_epoch_end_on_changed_data_continues_with_a_note(data, tmp_path, capsys):
    out = tmp_path / "x"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    (data / "train" / "red" / "000.jpg").unlink()
    capsys.readouterr()
    code, _, err = outcome(capsys, "--resume", out / "last.npz", "--epochs", 2, "--workers", 0, "--no-progress")
    assert code == 0 and "the training set changed since" in err and "(24 -> 23 images)" in err


# -- 9. Unwritable output folders ---------------------------------------------------------------------
def test_case9_unusable_out_fails_in_one_line_before_any_training(data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    one_line_failure(capsys, "--data", data, *TINY, "--out", tmp_path / "file", match="exists and is not a folder")
    one_line_failure(capsys, "--data", data, *TINY, "--out", tmp_path / "file" / "sub",
                     match="cannot create the output folder")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        one_line_failure(capsys, "--data", data, *TINY, "--out", ro, match="is not writable")


def test_case9_read_only_mount_is_found_before_training(data, tmp_path, monkeypatch, capsys):
    """What a read-only mount does to the probe file (simulated: the tests may run as root)."""
    import errno
    from minicompact.cli import rundir

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)
    monkeypatch.setattr(rundir, "open", read_only, raising=False)
    error = one_line_failure(capsys, "--data", data, *TINY, "--epochs", 1, "--out", tmp_path / "x",
                             match="is not writable (Read-only file system)")
    assert "epoch" not in error and not (tmp_path / "x" / "log.jsonl").exists()


def test_case9_disk_failure_during_training_is_one_line(data, tmp_path, monkeypatch, capsys):
    from minicompact.training import checkpoint

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "x" / "best.npz"))
    monkeypatch.setattr(checkpoint.np, "savez", full)
    one_line_failure(capsys, "--data", data, "--epochs", 1, "--out", tmp_path / "x", *TINY,
                     match="cannot write", code=1)


# -- 11. Small things ---------------------------------------------------------------------------------
def test_case11_small_things(data, tmp_path, monkeypatch, capsys):
    from minicompact.training import plots
    figures = []
    real_save = plots.save_png
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figures.append(fig) or real_save(fig, path))
    monkeypatch.chdir(data.parent)
    out = tmp_path / "x"
    # Progress bars on (no --no-progress): stderr is not a terminal, so no \r updates.
    args = [a for a in TINY if a != "--no-progress"]
    assert main("--data", "data", "--epochs", 1, "--out", out, *args, "--loss", "hinge", "--rho", "0.5") == 0
    assert "\r" not in capsys.readouterr().err
    curves, sparsity = figures
    assert curves.axes[0].get_ylabel() == "multiclass hinge loss"
    ax = sparsity.axes[0]
    sparsity.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent())  # above the bars, never over one
    modes = {name: stat.S_IMODE(os.stat(out / name).st_mode) for name in ("last.npz", "report.json", "log.jsonl")}
    assert len(set(modes.values())) == 1, modes
    # A relative --data is stored absolute: resuming from elsewhere finds it.
    monkeypatch.chdir(tmp_path)
    state = json.loads(str(np.load(out / "last.npz")["__train__"]))
    assert state["settings"]["data"] == str(data)
    # An explicit flag equal to its default but not to the checkpoint's value gets the note.
    code, _, err = outcome(capsys, "--resume", out / "last.npz", "--epochs", 2, "--rho", "0.03",
                           "--workers", 0, "--no-progress")
    assert code == 0 and "--rho 0.03 ignored; the checkpoint's value 0.5 is used" in err


def test_case11_help_has_no_empty_defaults(capsys):
    with pytest.raises(SystemExit):
        main("--help")
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 12)" in text and "(default: 0)" in text
    assert "(default: fp32)" in text  # its help says "PyTorch's default convolutions"


# -- 7. Signals and process hygiene (subprocesses) --------------------------------------------------
def start(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([sys.executable, RUN, *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    return proc, log


def children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def wait_for(predicate, seconds, proc):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def reap(workers):
    """The workers still alive after a few seconds; killed, so a failing test leaves none behind."""
    survivors = wait_dead(workers)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    return survivors


LONG = ["--depth", "3", "--width-mult", "0.03", "--image-size", "16", "--batch-size", "2", "--epochs", "100000",
        "--workers", "2", "--no-progress", "--lr", "0.01"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("target", ["process", "group"])
def test_case7_sigterm_checkpoints_and_stops_the_workers(data, tmp_path, target):
    """SIGTERM to run.py (``timeout``, ``kill``) or to its whole process group (a scheduler,
    a case the original requirements left out) is Ctrl-C: finish the step, checkpoint, exit 143."""
    out = tmp_path / "x"
    proc, log = start(["--data", data, "--out", out, *LONG], tmp_path)
    try:
        assert wait_for(lambda: (out / "log.jsonl").exists(), 60, proc), (tmp_path / "run.log").read_text()
        workers = children(proc.pid)
        assert len(workers) >= 2
        (os.killpg if target == "group" else os.kill)(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert "by SIGTERM; checkpoint written" in text and "Traceback" not in text, text
    assert (out / "last.npz").exists() and reap(workers) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_case7_kill_9_of_the_main_process_takes_the_workers_with_it(data, tmp_path):
    out = tmp_path / "x"
    proc, log = start(["--data", data, "--out", out, *LONG], tmp_path)
    try:
        assert wait_for(lambda: (out / "log.jsonl").exists(), 60, proc), (tmp_path / "run.log").read_text()
        workers = children(proc.pid)
        assert len(workers) >= 2 and all(alive(w) for w in workers)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert reap(workers) == [], "decoding workers outlived kill -9 of run.py"


def test_a_checkpoint_of_a_model_run_py_would_not_build_is_one_line(data, tmp_path, capsys):
    """A checkpoint whose model configuration differs from what its settings build (saved by
    another program, say) is refused before any array is loaded, not with a traceback."""
    from minicompact.system.npz import atomic_savez
    assert main("--data", data, "--epochs", 1, "--out", tmp_path / "a", *TINY) == 0
    with np.load(tmp_path / "a" / "last.npz") as z:
        arrays = {k: z[k] for k in z.files}
    config = json.loads(str(arrays["__config__"]))
    config["widths"] = [64, 128, 256]
    config["width_mult"] = 0.06  # the same 4 and 8 filters: its arrays fit it, run.py's settings do not
    arrays["__config__"] = np.array(json.dumps(config))
    atomic_savez(tmp_path / "other.npz", arrays)
    one_line_failure(capsys, "--evaluate", tmp_path / "other.npz", "--out", tmp_path / "e",
                     match="widths (64, 128, 256) vs (128, 256, 512)")


# -- Issue 26 ---------------------------------------------------------------------------------------
def capped_run(args, cwd, gib=4, timeout=60):
    """run.py ARGS in a subprocess whose address space is capped at ``gib`` GiB, with a timeout:
    a regression that allocates without bound fails here instead of growing until the
    machine's OOM killer ends it (or the test suite)."""
    import resource
    limit = gib * 2**30
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, RUN, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout, check=False,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))


def assert_one_line(proc, match):
    """The subprocess failed with exit 2 and printed one ``run.py: error:`` line with ``match``."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("run.py: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match in errors[0], errors[0]


def test_issue26_image_size_has_one_upper_bound(data, tmp_path):
    t0 = time.monotonic()
    proc = capped_run(["--data", data, "--epochs", 1, *TINY, "--image-size", 100000], cwd=tmp_path)
    assert_one_line(proc, "--image-size: image size 100000 is above 2048 px")
    assert time.monotonic() - t0 < 30 and not (tmp_path / "runs").exists()


def test_issue26_report_says_how_many_val_images_were_scored_and_skipped(data, tmp_path, capsys):
    for p in sorted((data / "val" / "red").glob("*.jpg"))[:2]:  # as if deleted mid-run
        p.write_bytes(b"")
    out = tmp_path / "x"
    with pytest.warns(UserWarning):
        code, printed, _ = outcome(capsys, "--data", data, "--epochs", 1, "--out", out, *TINY)
    assert code == 0
    assert "scored on 10 of 12 val images: 2 skipped as unreadable" in printed
    report = json.loads((out / "report.json").read_text())
    for crops in ("single_crop", "ten_crop"):
        acc = report["after_threshold"]["accuracy"][crops]
        assert (acc["images"], acc["skipped"]) == (10, 2)
