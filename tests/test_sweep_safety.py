"""python -m minicompact.sweep never loses a finished point, refuses bad input in one line, and
stops cleanly on a signal (issue 26).  Most tests start a stand-in run.py (FAKE_RUN) that trains
nothing, so they take a moment, not a training."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from minicompact.sweep import command as sweep
from minicompact.sweep import points as SP
from minicompact.system.processes import pid_alive
from test_run import write_folder

RUN = ["--width-mult", "0.03", "--image-size", "16", "--batch-size", "8", "--workers", "0",
       "--lr", "0.05", "--warmup", "0.5", "--lr-step", "5", "--epochs", "1"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for run.py: accepts --check; otherwise, like run.py, removes the earlier run's
# files on --overwrite, then waits FAKE_SECONDS and, on SIGTERM/SIGINT, writes last.npz and
# exits 128 + the signal.  It records its pid in OUT/started.
FAKE_RUN = r'''
import os, signal, sys, time
argv = sys.argv[1:]
if "--check" in argv:
    sys.exit(0)
out = argv[argv.index("--out") + 1] if "--out" in argv else os.path.dirname(argv[argv.index("--resume") + 1])
if "--overwrite" in argv:
    for name in ("report.json", "last.npz"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
os.makedirs(out, exist_ok=True)
def stop(signum, frame):
    with open(os.path.join(out, "last.npz"), "w") as f:
        f.write("checkpoint")
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
with open(os.path.join(out, "started"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(float(os.environ.get("FAKE_SECONDS", "0")))
deadline = time.time() + 60  # FAKE_WAIT_FOR: wait until that file exists, FAKE_WAIT_GONE: until gone
while time.time() < deadline and not (
        os.path.exists(os.environ.get("FAKE_WAIT_FOR", os.devnull))
        and not os.path.exists(os.environ.get("FAKE_WAIT_GONE", "/nonexistent"))):
    time.sleep(0.05)
if os.environ.get("FAKE_REPORT"):
    with open(os.path.join(out, "report.json"), "w") as f:
        f.write("finished")
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
'''


@pytest.fixture
def fake_run(tmp_path):
    path = tmp_path / "fake_run.py"
    path.write_text(FAKE_RUN)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("sweepdata") / "data", train=6, val=3)


def go(*args):
    return sweep.main([str(a) for a in args])


def one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- 1: data loss
def test_a_point_finished_meanwhile_is_not_retrained(tmp_path, fake_run):
    """The to-do list is made before a point's lock is taken; a point another sweep finished
    in between must be looked at again under the lock, never retrained with --overwrite."""
    out = tmp_path / "sw"
    point = SP.grid([3], [0.1], ["compact"])[0]
    folder = out / "points" / point["name"]
    folder.mkdir(parents=True)
    (out / "logs").mkdir()
    (folder / "report.json").write_text('{"finished": true}')  # the other sweep's result
    args = sweep.build_parser().parse_args(["--out", str(out), "--run-py", str(fake_run)])
    said = []
    failed = sweep.Scheduler(args, [], [point], str(tmp_path / "cache"), said.append).run()
    assert failed == []
    assert (folder / "report.json").read_text() == '{"finished": true}'   # kept
    assert not (folder / "started").exists()                              # nothing was started
    assert any("finished by another sweep" in line for line in said), said
    assert not (out / "points" / f"{point['name']}.lock").exists()
    with pytest.raises(ValueError, match="finished"):                     # and never a command for it
        sweep.point_command(args, point, [], "/cache", threads=1)


def test_two_sweeps_sharing_a_point_never_retrain_it(tmp_path, fake_run):
    """The issue's reproduction with two real sweeps, ordered by files instead of sleeps: A
    trains P; B lists P as to do while A runs, trains Q, and reaches P only after A finished
    it and let go of its lock.  B must look again under the lock and leave P alone (before,
    it retrained P with --overwrite, deleting A's result first).  The stand-ins exit 1 so the
    sweeps read no report; --shard 0/1 keeps them from collecting one."""
    out = tmp_path / "sw"
    points = out / "points"
    p, q = points / "compact-d3-rho0.1", points / "compact-d3-rho0.05"

    def start(rhos, **env):
        return subprocess.Popen(
            [sys.executable, "-m", "minicompact.sweep", "--out", str(out), "--depths", "3", "--rhos", rhos,
             "--shard", "0/1", "--run-py", str(fake_run)], cwd=str(tmp_path), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONPATH=ROOT, FAKE_EXIT="1", **env))

    a = start("0.1", FAKE_REPORT="1", FAKE_WAIT_FOR=str(q / "started"))
    b = None
    try:
        deadline = time.time() + 30
        while not (p / "started").exists():
            assert time.time() < deadline and a.poll() is None, a.communicate()
            time.sleep(0.05)
        b = start("0.05,0.1", FAKE_WAIT_FOR=str(p / "report.json"), FAKE_WAIT_GONE=str(points / "compact-d3-rho0.1.lock"))
        said_a, said_b = a.communicate(timeout=60)[0], b.communicate(timeout=60)[0]
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "2 points, shard 0/1: 2; 0 finished, 2 to train" in said_b, said_b   # P was on B's list
    assert (p / "report.json").read_text() == "finished", said_a + said_b      # A's result kept
    assert "compact-d3-rho0.1 was finished by another sweep meanwhile; skipped" in said_b, said_b
    assert "--overwrite" not in (out / "logs" / "compact-d3-rho0.1.log").read_text()


# --------------------------------------------------------------------------- 5, 11: folders
def test_out_that_is_a_file_or_under_one(tmp_path, capsys, fake_run):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, message in ((afile, "is a file, not a folder"), (afile / "sub", "cannot be created")):
        assert go("--out", out, "--run-py", fake_run) == 2
        assert message in one_line(capsys)
    assert afile.read_text() == "mine"
    assert go("--out", tmp_path / "sw", "--cache-dir", afile, "--run-py", fake_run) == 2
    assert "--cache-dir" in one_line(capsys) and not (tmp_path / "sw").exists()


def test_out_without_permission(tmp_path, capsys, fake_run, monkeypatch):
    """Root passes every permission check, so the refusals are simulated: os.access says no,
    or (a read-only file system, an ACL) creating the folder fails anyway."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert go("--out", tmp_path / "sw", "--run-py", fake_run) == 2
    assert "no permission to write" in one_line(capsys)
    monkeypatch.undo()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "makedirs", refuse)
    assert go("--out", tmp_path / "sw", "--run-py", fake_run) == 2
    assert "Permission denied" in one_line(capsys)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["fake_run.py"]                        # nothing written


# --------------------------------------------------------------------------- 8 and the parser
@pytest.mark.parametrize("flags, message", [
    (["--near", "nan"], "--near must be a finite number"),
    (["--near", "-5"], "--near must be a finite number"),
    (["--near", "inf"], "--near must be a finite number"),
    (["--near", "two"], "invalid float value"),
    (["--jobs", "x"], "invalid int value"),
    (["--jobs", "-1"], "--jobs must be >= 1"),
    (["--shard", "1/2/3"], "--shard must be i/n"),
    (["--shard", ""], "--shard must be i/n"),
    (["--shard=-1/2"], "need 0 <= i < n"),
    (["--shard", "2/2"], "need 0 <= i < n"),
])
def test_bad_values_are_one_line(tmp_path, capsys, fake_run, flags, message):
    code = None
    try:
        code = go("--out", tmp_path / "sw", "--run-py", fake_run, *flags)
    except SystemExit as exc:   # argparse's own errors exit
        code = exc.code
    assert code == 2
    assert message in one_line(capsys)
    assert not (tmp_path / "sw").exists()


def test_missing_out_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        go("--depths", "3")
    assert exc.value.code == 2 and "--out" in one_line(capsys)


def test_near_zero_keeps_the_c_mode():
    """--near 0 is a margin of no points: C is the fewest parameters at exactly the best error."""
    rows = [dict(model="compact", val_top1_error=8, structural_params=90),
            dict(model="compact", val_top1_error=8, structural_params=40),
            dict(model="compact", val_top1_error=9, structural_params=10)]
    SP.check_near(0.0)
    assert SP.operation_modes(rows, near=0.0)["compact"]["C"]["structural_params"] == 40


# --------------------------------------------------------------------------- 9: --collect, flags
def test_collect_without_a_sweep_writes_nothing(tmp_path, capsys):
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        assert go("--out", out, "--collect", "--", "--epochs", "3") == 2
        assert "nothing to collect" in one_line(capsys)
    assert not new.exists() and os.listdir(empty) == []
    SP.check_sweep_file(str(empty), ["--epochs", "3"])           # the real sweep is still welcome
    assert json.loads((empty / "sweep.json").read_text())["run_args"] == ["--epochs", "3"]


def test_flags_are_compared_as_parsed_values(tmp_path):
    out = str(tmp_path / "sw")
    held = ["--epochs", "30", "--lr", "0.1", "--workers", "2"]
    SP.check_sweep_file(out, held)
    for same in (["--epochs=30", "--lr=0.1"],                          # = or a space
                 ["--lr", "0.1", "--epochs", "30"],                    # another order
                 ["--epochs", "30", "--lr", "1e-1", "--workers", "7", "--no-progress", "--cache"],
                 ["--ep", "30", "--lr", "0.1", "--seed", "0"]):         # an abbreviation, a default
        SP.check_sweep_file(out, same)
    for other, differ in ((["--epochs", "31", "--lr", "0.1"], "--epochs"),
                          (["--epochs", "30", "--lr", "0.1", "--seed", "1"], "--seed"),
                          (["--epochs", "30"], "--lr")):
        with pytest.raises(SP.SweepError, match=f"holds a sweep with other run.py flags.*differ in {differ}"):
            SP.check_sweep_file(out, other)
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["run_args"] == held   # unchanged


def test_owned_flags_are_caught_when_abbreviated(tmp_path, capsys, fake_run):
    for flags in (["--dep", "4"], ["--depth=4"], ["--overw"]):
        assert go("--out", tmp_path / "sw", "--run-py", fake_run, "--", *flags) == 2
        assert "is set by the sweep" in one_line(capsys)
    assert not (tmp_path / "sw").exists()


# --------------------------------------------------------------------------- 11: corrupt last.npz
def test_a_damaged_last_npz_names_the_file_and_the_way_out(data, tmp_path, capsys):
    out = tmp_path / "sw"
    run_args = ["--data", str(data), *RUN]
    SP.check_sweep_file(str(out), run_args)
    folder = out / "points" / "compact-d3-rho0.1"
    folder.mkdir(parents=True)
    (folder / "last.npz").write_text("not a checkpoint")
    assert go("--out", out, "--depths", "3", "--rhos", "0.1", "--", *run_args) == 1
    (line,) = [l for l in capsys.readouterr().out.splitlines() if "failed" in l]
    assert "not a minicompact checkpoint" in line                      # run.py's own reason
    assert f"{folder / 'last.npz'}: if that file is damaged, delete it" in line
    assert not (out / "points" / "compact-d3-rho0.1.lock").exists()


def test_a_damaged_report_is_one_warning_and_the_others_are_collected(tmp_path, capsys, fake_run):
    """A finished point whose report.json was cut short is named with the way out and left
    out of the table; --collect still writes the others' results, and exits 1."""
    out = tmp_path / "sw"
    SP.check_sweep_file(str(out), ["--epochs", "3"])
    points = {p["name"]: p for p in SP.grid([3], [0.1, 0.3], ["compact"])}
    for name in points:
        (out / "points" / name).mkdir(parents=True)
    good, bad = sorted(points)
    crops = {c: {"top1_error": 12.5, "top5_error": 1.0} for c in ("single_crop", "ten_crop")}
    report = {"epochs": 3, "total_parameters": 100, "after_threshold": {"accuracy": crops, "sparsity": {
        "effective_parameters": {"nonzero": 90, "structural": 80}, "layers": {"conv1": {"layer_sparsity": 0.1}}}}}
    (out / "points" / good / "report.json").write_text(json.dumps(report))
    (out / "points" / bad / "report.json").write_text(json.dumps(report)[:40])    # cut short
    with pytest.raises(SP.SweepError, match=f"{bad}: cannot read its report.json .* delete that folder"):
        SP.read_point(str(out / "points" / bad), points[bad])
    code = go("--out", out, "--depths", "3", "--rhos", "0.1,0.3", "--run-py", fake_run, "--collect", "--",
              "--epochs", "3")
    said = capsys.readouterr().out
    assert code == 1 and f"sweep: warning: {bad}: cannot read its report.json" in said, said
    assert "1 of 2 points finished" in said and "Traceback" not in said
    assert (out / "results.csv").read_text().count("\n") == 2               # header + the good point


# --------------------------------------------------------------------------- 11: signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_sweep_alone_stops_its_points(tmp_path, fake_run, signum):
    """kill PID of the sweep alone: the running point gets the signal once (SIGHUP as SIGTERM),
    writes its last.npz and exits; the sweep releases the lock and exits 128 + signum with one
    line."""
    out = tmp_path / "sw"
    point = out / "points" / "compact-d3-rho0.1"
    env = dict(os.environ, FAKE_SECONDS="60", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "minicompact.sweep", "--out", str(out), "--depths", "3",
                             "--rhos", "0.1", "--run-py", str(fake_run)], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        deadline = time.time() + 30
        while not (point / "started").exists() or not (point / "started").read_text():
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        child = int((point / "started").read_text())
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 128 + signum, err
        err = err.strip()
        assert len(err.splitlines()) == 1 and f"stopped by {signal.Signals(signum).name}" in err, err
        assert (point / "last.npz").read_text() == "checkpoint"       # the point checkpointed
        assert not pid_alive(child)                                     # no orphan
        assert not (out / "points" / "compact-d3-rho0.1.lock").exists()  # no stale lock
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child and pid_alive(child):
            os.kill(child, signal.SIGKILL)
