"""python -m minicompact.sweep on a tiny generated dataset: grid, skip/resume, shards, the shared
cache, the lock and the one-line refusals."""
import csv
import os
import subprocess
import sys

import pytest

from minicompact.sweep import command as sweep
from minicompact.sweep import plots as sweep_plots, points as SP
from test_run import write_folder

RUN = ["--width-mult", "0.03", "--image-size", "16", "--batch-size", "8", "--workers", "0",
       "--lr", "0.05", "--warmup", "0.5", "--lr-step", "5", "--epochs", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("sweepdata") / "data", train=6, val=3)


def go(*args):
    return sweep.main([str(a) for a in args])


def rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def commands(out, name):
    return [l for l in (out / "logs" / f"{name}.log").read_text().splitlines() if l.startswith("$ ")]


def test_grid():
    points = SP.grid([3, 4], [0.1, 0.5], ["compact", "compressed", "simple"])
    names = [p["name"] for p in points]
    assert names == ["compact-d3-rho0.1", "compact-d3-rho0.5", "compact-d4-rho0.1", "compact-d4-rho0.5",
                     "compressed-d3-rho0.1", "compressed-d3-rho0.5", "compressed-d4-rho0.1",
                     "compressed-d4-rho0.5", "simple-d3-rho0", "simple-d4-rho0"]   # one SimpleNet per depth
    assert SP.point_flags(points[4]) == ["--model", "compressed", "--depth", "3", "--compressed-beta", "0.1"]
    assert SP.point_flags(points[0])[-2:] == ["--rho", "0.1"]
    assert [p["name"] for p in SP.shard(points, "1/4")] == names[1::4]
    assert sum(len(SP.shard(points, f"{i}/3")) for i in range(3)) == len(points)
    for bad, message in ((([], [0.1], ["compact"]), "empty"), (([3], [2.0], ["compact"]), "[0, 1]"),
                         (([3], [0.1], ["big"]), "unknown model")):
        with pytest.raises(SP.SweepError, match=message):
            SP.grid(*bad)
    for spec in ("4/4", "x", "1/0"):
        with pytest.raises(SP.SweepError):
            SP.shard(points, spec)


def test_operation_modes():
    def row(model, err, params):
        return dict(model=model, val_top1_error=err, structural_params=params)
    rows_ = [row("simple", 10, 100), row("compressed", 9, 80), row("compressed", 11, 50),
             row("compact", 8, 90), row("compact", 9.5, 40), row("compact", 12, 10)]
    modes = SP.operation_modes(rows_, near=2.0)
    assert modes["compact"]["B"]["val_top1_error"] == 8
    assert modes["compact"]["C"]["structural_params"] == 40            # within 2 points of 8
    assert modes["compact"]["M"]["simple"]["structural_params"] == 40  # <= 10 % error, fewest
    assert modes["compact"]["M"]["compressed"]["structural_params"] == 90
    assert set(modes["simple"]) == {"B"}
    # Fig. 9 labels each marked point once, with every mode that landed on it.
    for i, r in enumerate(rows_):
        r["point"] = f"p{i}"
    labels = [(model, r["point"], text) for model, r, text in sweep_plots.mode_labels(modes)]
    assert ("compact", "p4", "CompactNet: C, M(Simp)") in labels
    assert ("compact", "p3", "CompactNet: B, M(Comp)") in labels
    assert ("compressed", "p1", "CompressedNet: B, C, M(Simp)") in labels
    assert len(labels) == len({(m, p) for m, p, _ in labels}) == 4   # one per marked point


def test_point_lock(tmp_path):
    path = str(tmp_path / "p.lock")
    with SP.point_lock(path):
        assert open(path).read().split()[0] == str(os.getpid())
        with pytest.raises(SP.Locked, match="held by pid"):    # a live holder
            with SP.point_lock(path):
                pass
    assert not os.path.exists(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    import socket
    with open(path, "w") as f:
        f.write(f"{dead} {socket.gethostname()}\n")
    with SP.point_lock(path):                                 # stale: its process is gone
        assert open(path).read().split()[0] == str(os.getpid())
    with open(path, "w") as f:
        f.write(f"{dead} another-machine\n")                  # cannot tell: treated as held
    with pytest.raises(SP.Locked, match="another-machine"):
        with SP.point_lock(path):
            pass
    with open(path, "w") as f:
        f.write("")                                           # unreadable: never taken over
    with pytest.raises(SP.Locked, match="cannot be read"):
        with SP.point_lock(path):
            pass
    assert open(path).read() == "" and os.listdir(tmp_path) == ["p.lock"]   # no temp file left


def test_sweep_trains_skips_resumes_and_collects(data, tmp_path, capsys):
    out = tmp_path / "sw"
    grid_args = ["--out", out, "--depths", "3", "--rhos", "0.1,0.5", "--models", "compact,simple"]
    assert go(*grid_args, "--", "--data", data, *RUN) == 0
    said = capsys.readouterr().out
    assert "3 points" in said and "[3/3]" in said and "ETA" in said
    table = rows(out)
    assert [r["point"] for r in table] == ["compact-d3-rho0.1", "compact-d3-rho0.5", "simple-d3-rho0"]
    assert all(int(r["total_params"]) >= int(r["structural_params"]) for r in table)
    for name in ("heatmap.png", "best_per_depth.png", "gap.png", "pareto.png", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    # One cache for every point, keyed on the data: one folder holding both splits.
    (key,) = [d for d in (out / "cache").iterdir() if d.is_dir()]
    assert sorted(p.name for p in key.glob("*.npy") if "rows" not in p.name) == ["train_18px.npy", "val_18px.npy"]
    assert not any((out / "points" / r["point"] / "cache").exists() for r in table)
    # The same command again trains nothing.
    stamp = (out / "points" / "simple-d3-rho0" / "report.json").stat().st_mtime_ns
    assert go(*grid_args, "--", "--data", data, *RUN) == 0
    assert "0 to train" in capsys.readouterr().out
    assert (out / "points" / "simple-d3-rho0" / "report.json").stat().st_mtime_ns == stamp
    assert len(commands(out, "simple-d3-rho0")) == 1
    # An interrupted point (a last.npz, no report) continues from its checkpoint.
    for name in ("report.json", "model.npz"):
        (out / "points" / "compact-d3-rho0.5" / name).unlink()
    assert go(*grid_args, "--", "--data", data, *RUN) == 0
    assert "--resume" in commands(out, "compact-d3-rho0.5")[-1]
    assert len(rows(out)) == 3
    # Another recipe into the same folder is refused in one line.
    assert go(*grid_args, "--", "--data", data, *RUN, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "holds a sweep with other run.py flags" in err and len(err.strip().splitlines()) == 1


def test_shards_then_collect(data, tmp_path, capsys):
    out = tmp_path / "sh"
    grid_args = ["--out", out, "--depths", "2,3", "--rhos", "0.3", "--models", "compact"]
    assert go(*grid_args, "--shard", "0/2", "--", "--data", data, *RUN) == 0
    assert not (out / "results.csv").exists()                  # shards leave collecting to --collect
    assert (out / "points" / "compact-d2-rho0.3" / "report.json").exists()
    assert not (out / "points" / "compact-d3-rho0.3").exists()
    assert go(*grid_args, "--shard", "1/2", "--", "--data", data, *RUN) == 0
    assert go(*grid_args, "--collect", "--", "--data", data, *RUN) == 0
    assert [r["point"] for r in rows(out)] == ["compact-d2-rho0.3", "compact-d3-rho0.3"]
    assert "2 of 2 points finished" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--models", "compact", "--depths", ""], "the grid is empty"),
    (["--", "--lr", "-1"], "run.py refuses the flags after --: run.py: error: --lr, --lr-step, --warmup: StepLR needs base_lr > 0"),
    (["--", "--no-such-flag"], "unrecognized arguments"),
    (["--", "--depth", "4"], "--depth is set by the sweep"),
    (["--jobs", "0"], "--jobs must be >= 1"),
])
def test_refusals_are_one_line(tmp_path, capsys, extra, message):
    assert go("--out", tmp_path / "bad", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()                     # nothing started, nothing written


def test_launcher_jobs_and_thread_shares(tmp_path):
    """--launcher prefixes each point's command; --jobs N gives each point cores / N BLAS
    threads and that minus one decoding workers, unless the run.py flags name --workers."""
    args = sweep.build_parser().parse_args(["--out", str(tmp_path), "--jobs", "2", "--launcher", "mpiexec -n 4"])
    point = SP.grid([3], [0.1], ["compact"])[0]
    cmd = sweep.point_command(args, point, ["--epochs", "1"], "/cache", threads=3)
    assert cmd[:3] == ["mpiexec", "-n", "4"] and cmd[3] == sys.executable
    assert cmd[cmd.index("--workers") + 1] == "2" and cmd[cmd.index("--cache-dir") + 1] == "/cache"
    cmd = sweep.point_command(args, point, ["--workers", "5"], "/cache", threads=3)
    assert cmd.count("--workers") == 1 and cmd[cmd.index("--workers") + 1] == "5"
    env = sweep.child_env(3)
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert sweep.Scheduler(args, [], [], "/cache", print).threads == max(1, (os.cpu_count() or 1) // 2)
