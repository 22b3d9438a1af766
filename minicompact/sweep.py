"""``python -m minicompact.sweep``: train a grid of run.py runs and draw the paper's Figs. 6-9.

    python -m minicompact.sweep --out SWEEP --depths 4,8,12 --rhos 0.01,0.03,0.1 \\
        --models compact,compressed,simple --jobs 2 -- --data ROOT --epochs 15

Every point is an ordinary ``run.py`` run in SWEEP/points/<point> (layout: ``sweep_points``),
with the flags after ``--`` passed through; they are checked once (``run.py --check``) before
any point starts.  ``--jobs N`` trains N points at once and gives each an equal share of the
cores (BLAS threads, decoding workers); a finished point is never trained again, an
interrupted one continues from its last.npz (``run.py --resume``), so running the same command
again only collects.  Every point reads one decoded-image cache (``run.py --cache-dir``).
Beyond one machine, ``--shard i/n`` trains every n-th point (one scheduler array task per
shard), ``--collect`` writes the table and figures from whatever has finished, and
``--launcher "mpiexec -n 4"`` starts each point data-parallel.
Outputs (``sweep_plots``): results.csv, heatmap.png (Fig. 6), best_per_depth.png (Fig. 7),
gap.png (Fig. 8), pareto.png (Fig. 9, with the B/C/M operation modes), summary.md.
"""
import argparse
import os
import shlex
import subprocess
import sys
import time

from .harness.sweep_points import (Locked, SweepError, check_sweep_file, grid, parse_list, point_dir,
                                   point_flags, point_lock, point_state, read_point, shard)

OWNED = ("--out", "--resume", "--evaluate", "--overwrite", "--depth", "--rho", "--model", "--check",
         "--cache-dir")
RUN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run.py")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m minicompact.sweep", description="Train a grid of run.py runs (depth x rho x "
        "model) and draw the paper's Figs. 6-9; flags after -- go to every run.py.")
    p.add_argument("--out", required=True, metavar="SWEEP", help="the sweep's folder")
    p.add_argument("--depths", default="12", help="comma-separated depths L (default: 12)")
    p.add_argument("--rhos", default="0.03", help="comma-separated rho values; CompressedNet's beta")
    p.add_argument("--models", default="compact", help="comma-separated: compact, compressed, simple")
    p.add_argument("--jobs", type=int, default=1, help="points trained at once on this machine")
    p.add_argument("--shard", metavar="i/n", help="train only every n-th point, from the i-th (0-based)")
    p.add_argument("--collect", action="store_true", help="train nothing: write the table and figures")
    p.add_argument("--launcher", default="", help='prefix of each point\'s command, e.g. "mpiexec -n 4"')
    p.add_argument("--cache-dir", metavar="DIR", help="the shared image cache (default: SWEEP/cache)")
    p.add_argument("--near", type=float, default=2.0,
                   help="Fig. 9's C mode: error within this many points of the best (default: 2)")
    p.add_argument("--run-py", default=RUN_PY, help="the run.py to start (default: the repository's)")
    return p


def split_argv(argv):
    """(sweep flags, run.py flags): everything after the first ``--`` is run.py's."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def check_run_args(run_py, run_args, point):
    """One line unless run.py accepts ``run_args`` for ``point`` (``run.py --check``)."""
    owned = [a for a in run_args if a.split("=")[0] in OWNED]
    if owned:
        raise SweepError(f"{owned[0].split('=')[0]} is set by the sweep for each point; leave it out of "
                         "the run.py flags")
    if not os.path.isfile(run_py):
        raise SweepError(f"run.py not found at {run_py}; give --run-py PATH")
    cmd = [sys.executable, run_py, "--check", *point_flags(point), *run_args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [l for l in (done.stderr + done.stdout).splitlines() if l.strip()]
        raise SweepError(f"run.py refuses the flags after --: {lines[-1] if lines else done.returncode}")


def point_command(args, point, run_args, cache_dir, threads):
    """The command line that trains (or continues) ``point``."""
    folder = point_dir(args.out, point["name"])
    base = shlex.split(args.launcher) + [sys.executable, args.run_py]
    common = ["--cache-dir", cache_dir, "--no-progress"]
    if not any(a.split("=")[0] == "--workers" for a in run_args):
        common += ["--workers", str(max(0, threads - 1))]
    if point_state(folder) == "interrupted":
        return base + ["--resume", os.path.join(folder, "last.npz"), *common, *run_args]
    # A folder without last.npz holds at most a partial first epoch's files: start again.
    return base + ["--out", folder, "--overwrite", *point_flags(point), *common, *run_args]


def child_env(threads):
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    return env


class Scheduler:
    """Runs points as child processes, ``jobs`` at once, each holding its point's lock."""

    def __init__(self, args, run_args, todo, cache_dir, say):
        self.args, self.run_args, self.todo, self.say = args, run_args, list(todo), say
        self.cache_dir = cache_dir
        self.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        self.running = {}  # Popen -> (point, lock context, log file, start time)
        self.durations, self.finished, self.failed = [], 0, []

    def _start(self, point):
        lock = point_lock(os.path.join(self.args.out, "points", point["name"] + ".lock"))
        try:
            lock.__enter__()
        except Locked as exc:
            self.say(f"sweep: {point['name']} is being trained elsewhere ({exc}); skipped")
            return
        log = open(os.path.join(self.args.out, "logs", point["name"] + ".log"), "a")
        cmd = point_command(self.args, point, self.run_args, self.cache_dir, self.threads)
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(self.threads))
        self.running[proc] = (point, lock, log, time.time())

    def _finish(self, proc):
        point, lock, log, t0 = self.running.pop(proc)
        log.close()
        lock.__exit__(None, None, None)
        seconds = time.time() - t0
        folder = point_dir(self.args.out, point["name"])
        if proc.returncode != 0 or point_state(folder) != "done":
            self.failed.append(point["name"])
            self.say(f"sweep: {point['name']} failed (exit status {proc.returncode}); see "
                     f"{os.path.join(self.args.out, 'logs', point['name'] + '.log')}")
            return
        self.durations.append(seconds)
        self.finished += 1
        row = read_point(folder, point)
        left = len(self.todo) + len(self.running)
        eta = sum(self.durations) / len(self.durations) * left / max(1, self.args.jobs)
        self.say(f"sweep: [{self.finished}/{self.total}] {point['name']}: top-1 error {row['val_top1_error']:.1f}% "
                 f"(10 crops {row['val_top1_error_10crop']:.1f}%), {row['structural_params']:,} of "
                 f"{row['total_params']:,} parameters left; {seconds:.0f} s; ETA {eta / 60:.1f} min")

    def run(self):
        self.total = len(self.todo)
        try:
            while self.todo or self.running:
                while self.todo and len(self.running) < max(1, self.args.jobs):
                    self._start(self.todo.pop(0))
                # Poll our own children only (os.wait would also reap other children of
                # this process, e.g. a caller's worker pool).
                ended = [p for p in self.running if p.poll() is not None]
                for proc in ended:
                    self._finish(proc)
                if self.running and not ended:
                    time.sleep(0.2)
        except KeyboardInterrupt:  # the children got the signal too: each writes its last.npz
            for proc in list(self.running):
                proc.wait()
                self._finish(proc)
            raise
        return self.failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    mine, run_args = split_argv(argv)
    args = build_parser().parse_args(mine)
    say = print
    try:
        points = grid(parse_list(args.depths, int, "--depths"), parse_list(args.rhos, float, "--rhos"),
                      parse_list(args.models, str, "--models"))
        if args.jobs < 1:
            raise SweepError(f"--jobs must be >= 1, got {args.jobs}")
        mine_points = shard(points, args.shard) if args.shard else points
        args.out = os.path.abspath(args.out)
        if not args.collect:
            check_run_args(args.run_py, run_args, points[0])
        check_sweep_file(args.out, run_args)
    except SweepError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    for sub in ("points", "logs"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    failed = []
    if not args.collect:
        todo = [p for p in mine_points if point_state(point_dir(args.out, p["name"])) != "done"]
        done = len(mine_points) - len(todo)
        say(f"sweep: {len(points)} points{f', shard {args.shard}: {len(mine_points)}' if args.shard else ''}; "
            f"{done} finished, {len(todo)} to train, {args.jobs} at a time")
        cache_dir = os.path.abspath(args.cache_dir or os.path.join(args.out, "cache"))
        try:
            failed = Scheduler(args, run_args, todo, cache_dir, say).run()
        except KeyboardInterrupt:
            print("\nsweep: stopped; run the same command again to continue", file=sys.stderr)
            return 130
    if args.shard and not args.collect:
        return 1 if failed else 0  # the shards' results are collected once, by --collect
    from .harness.sweep_plots import collect
    written = collect(args.out, points, near=args.near)
    say(f"sweep: {written['finished']} of {len(points)} points finished; wrote "
        f"{', '.join(written['files'])} in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
