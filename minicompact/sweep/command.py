"""``python -m minicompact.sweep``: train a grid of run.py runs and draw the paper's Figs. 6-9.

    python -m minicompact.sweep --out SWEEP --depths 4,8,12 --rhos 0.01,0.03,0.1 \\
        --models compact,compressed,simple --jobs 2 -- --data ROOT --epochs 15
    python -m minicompact.sweep --out SWEEP --archs compactnet,resnet18 --rhos 0.01,0.03 -- ...

Every point is an ordinary ``run.py`` run in SWEEP/points/<point> (layout: ``points.py``),
with the flags after ``--`` passed through; they are checked once (``run.py --check``) before
any point starts.  ``--jobs N`` trains N points at once and gives each an equal share of the
cores (BLAS threads, decoding workers); a finished point is never trained again, an
interrupted one continues from its last.npz (``run.py --resume``), so running the same command
again only collects; SIGINT or SIGTERM is passed on to the running points, which checkpoint.
Every point reads one decoded-image cache (``run.py --cache-dir``).
Beyond one machine, ``--shard i/n`` trains every n-th point (one scheduler array task per
shard), ``--collect`` writes the table and figures from whatever has finished, and
``--launcher "mpiexec -n 4"`` starts each point data-parallel.
Outputs (``plots.py``): results.csv, heatmap.png (Fig. 6), best_per_depth.png (Fig. 7),
gap.png (Fig. 8), pareto.png (Fig. 9, with the B/C/M operation modes), summary.md.
"""
import argparse
import os
import shlex
import signal
import subprocess
import sys
import time

from .points import (Locked, SweepError, check_folder, check_near, check_sweep_file, grid,
                     parse_list, parse_run_args, point_dir, point_flags, point_lock, point_state,
                     read_point, shard)

OWNED = ("--out", "--resume", "--evaluate", "--overwrite", "--arch", "--depth", "--rho", "--model", "--check",
         "--cache-dir")
RUN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "run.py")


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line like every other error of the sweep (no usage block)."""

    def error(self, message):
        self.exit(2, f"sweep: error: {message} (python -m minicompact.sweep --help lists the flags)\n")


def build_parser():
    p = Parser(
        prog="python -m minicompact.sweep", description="Train a grid of run.py runs (arch x depth x rho x "
        "model) and draw the paper's Figs. 6-9; flags after -- go to every run.py.")
    p.add_argument("--out", required=True, metavar="SWEEP", help="the sweep's folder")
    p.add_argument("--archs", default="compactnet", help="comma-separated networks (run.py --arch): compactnet, "
                   "vgg11, resnet18; vgg11 and resnet18 have one depth each, so --depths sweeps CompactNets only")
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
    """One line unless run.py accepts ``run_args`` for ``point`` (``run.py --check``; the caller
    checks one point per arch: the image size a network needs is its own)."""
    # Parsed by run.py's own parser, so that an abbreviation (--dep 4) or --depth=4 is caught too.
    given = parse_run_args(run_args)[1]
    owned = [flag for flag in OWNED if flag[2:].replace("-", "_") in given]
    if owned:
        raise SweepError(f"{owned[0]} is set by the sweep for each point; leave it out of the run.py flags")
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
    state = point_state(folder)
    if state == "done":  # --overwrite would delete a finished result (the caller checks under the lock)
        raise ValueError(f"{point['name']} is finished; it is never trained again")
    if state == "interrupted":
        return base + ["--resume", os.path.join(folder, "last.npz"), *common, *run_args]
    # A folder without last.npz or report.json holds at most a partial first epoch's files:
    # start again over them.
    overwrite = ["--overwrite"] if os.path.exists(folder) else []
    return base + ["--out", folder, *overwrite, *point_flags(point), *common, *run_args]


def child_env(threads):
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    return env


def last_error(log_path):
    """The last error line of a point's log, or "": run.py's one-line ``run.py: error: ...``, or
    the last line of a traceback (``ValueError: ...``)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if "error:" in line.lower()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class Scheduler:
    """Runs points as child processes, ``jobs`` at once, each holding its point's lock.

    SIGINT and SIGTERM are passed on to the running points, once per signal received: each
    point runs in a session of its own, so Ctrl-C on the terminal reaches the sweep alone and
    no point sees a signal twice (run.py's second signal stops it without its checkpoint).
    SIGHUP (the terminal closed) is passed on as SIGTERM, which run.py handles: left alone,
    the points would train on with their locks held by a dead sweep.  The sweep then starts
    nothing more, waits for the points to write their last.npz and exit, and releases their
    locks; ``signals`` lists what arrived.
    """

    SIGNALS = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}

    def __init__(self, args, run_args, todo, cache_dir, say):
        self.args, self.run_args, self.todo, self.say = args, run_args, list(todo), say
        self.cache_dir = cache_dir
        self.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        self.running = {}  # Popen -> (point, lock context, log file, start time, resumed?, signals sent)
        self.durations, self.finished, self.failed, self.signals = [], 0, [], []

    def _start(self, point):
        lock = point_lock(os.path.join(self.args.out, "points", point["name"] + ".lock"))
        try:
            lock.__enter__()
        except Locked as exc:
            self.say(f"sweep: {point['name']} is being trained elsewhere ({exc}); skipped")
            return
        # The to-do list was made before this lock was ours: another sweep may have finished
        # the point since.  Look again, now that no one else can start it.
        folder = point_dir(self.args.out, point["name"])
        if point_state(folder) == "done":
            lock.__exit__(None, None, None)
            self.say(f"sweep: {point['name']} was finished by another sweep meanwhile; skipped")
            return
        resumed = point_state(folder) == "interrupted"
        log = open(os.path.join(self.args.out, "logs", point["name"] + ".log"), "a")
        cmd = point_command(self.args, point, self.run_args, self.cache_dir, self.threads)
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(self.threads), start_new_session=True)
        self.running[proc] = [point, lock, log, time.time(), resumed, 0]

    def _finish(self, proc):
        point, lock, log, t0, resumed, _ = self.running.pop(proc)
        log.close()
        lock.__exit__(None, None, None)
        seconds = time.time() - t0
        folder = point_dir(self.args.out, point["name"])
        if proc.returncode != 0 or point_state(folder) != "done":
            if self.signals:
                return  # stopped on request: main says so once for all points
            self.failed.append(point["name"])
            why = last_error(log.name)
            hint = ""
            if resumed:  # a damaged last.npz would fail every re-run the same way: say how out
                hint = (f"; it continued from {os.path.join(folder, 'last.npz')}: if that file is damaged, "
                        f"delete it (or the folder {folder}) to train the point from the start")
            self.say(f"sweep: {point['name']} failed (exit status {proc.returncode}"
                     f"{': ' + why if why else ''}); see {log.name}{hint}")
            return
        self.durations.append(seconds)
        try:
            row = read_point(folder, point)
        except SweepError as exc:  # the run said it finished, but its files cannot be read
            self.failed.append(point["name"])
            self.say(f"sweep: {exc}")
            return
        self.finished += 1
        left = len(self.todo) + len(self.running)
        eta = sum(self.durations) / len(self.durations) * left / max(1, self.args.jobs)
        self.say(f"sweep: [{self.finished}/{self.total}] {point['name']}: top-1 error {row['val_top1_error']:.1f}% "
                 f"(10 crops {row['val_top1_error_10crop']:.1f}%), {row['structural_params']:,} of "
                 f"{row['total_params']:,} parameters left; {seconds:.0f} s; ETA {eta / 60:.1f} min")

    def _note_signal(self, signum, frame):
        self.signals.append(signum)  # passed on by the loop, which alone touches self.running

    def _forward_signals(self):
        """Send each running point every signal it has not been sent yet."""
        for proc, entry in self.running.items():
            while entry[5] < len(self.signals):
                if proc.poll() is None:
                    proc.send_signal(self.SIGNALS[self.signals[entry[5]]])
                entry[5] += 1

    def run(self):
        self.total = len(self.todo)
        old = {}
        try:
            for sig in self.SIGNALS:
                old[sig] = signal.signal(sig, self._note_signal)
        except ValueError:  # not the main thread: signals stay with whoever handles them
            pass
        try:
            while self.running or (self.todo and not self.signals):
                while self.todo and not self.signals and len(self.running) < max(1, self.args.jobs):
                    self._start(self.todo.pop(0))
                self._forward_signals()
                # Poll our own children only (os.wait would also reap other children of
                # this process, e.g. a caller's worker pool).
                ended = [p for p in self.running if p.poll() is not None]
                for proc in ended:
                    self._finish(proc)
                if self.running and not ended:
                    time.sleep(0.2)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return self.failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        return sweep(argv)
    except KeyboardInterrupt:  # Ctrl-C outside training (checks, collecting): every file is written whole
        print("\nsweep: stopped by SIGINT; run the same command again to continue", file=sys.stderr)
        return 128 + signal.SIGINT


def sweep(argv):
    """The sweep of the command line ``argv`` (the sweep's flags, then -- and run.py's); its exit status."""
    mine, run_args = split_argv(argv)
    args = build_parser().parse_args(mine)
    say = print
    try:
        points = grid(parse_list(args.depths, int, "--depths"), parse_list(args.rhos, float, "--rhos"),
                      parse_list(args.models, str, "--models"), parse_list(args.archs, str, "--archs"))
        if args.jobs < 1:
            raise SweepError(f"--jobs must be >= 1, got {args.jobs}")
        check_near(args.near)
        mine_points = shard(points, args.shard) if args.shard is not None else points
        args.out = os.path.abspath(args.out)
        cache_dir = os.path.abspath(args.cache_dir or os.path.join(args.out, "cache"))
        check_folder(args.out, "--out")
        if not args.collect:
            check_folder(cache_dir, "--cache-dir")
            for arch in dict.fromkeys(p["arch"] for p in points):
                check_run_args(args.run_py, run_args, next(p for p in points if p["arch"] == arch))
        check_sweep_file(args.out, run_args, create=not args.collect)
        try:
            for sub in ("points", "logs"):
                os.makedirs(os.path.join(args.out, sub), exist_ok=True)
        except OSError as exc:
            raise SweepError(f"cannot create {os.path.join(args.out, sub)}: {exc.strerror or exc}") from None
    except SweepError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    failed = []
    if not args.collect:
        todo = [p for p in mine_points if point_state(point_dir(args.out, p["name"])) != "done"]
        done = len(mine_points) - len(todo)
        say(f"sweep: {len(points)} points{f', shard {args.shard}: {len(mine_points)}' if args.shard else ''}; "
            f"{done} finished, {len(todo)} to train, {args.jobs} at a time")
        scheduler = Scheduler(args, run_args, todo, cache_dir, say)
        failed = scheduler.run()
        if scheduler.signals:
            signum = scheduler.signals[0]
            after_ctrl_c = "\n" if signum == signal.SIGINT else ""  # not on the terminal's ^C line
            print(f"{after_ctrl_c}sweep: stopped by {signal.Signals(signum).name}; the running points kept "
                  "their last.npz; run the same command again to continue", file=sys.stderr)
            return 128 + signum
    if args.shard and not args.collect:
        return 1 if failed else 0  # the shards' results are collected once, by --collect
    from .plots import collect
    written = collect(args.out, points, near=args.near)
    for line in written["unreadable"]:
        say(f"sweep: warning: {line}; left out of the results")
    say(f"sweep: {written['finished']} of {len(points)} points finished; wrote "
        f"{', '.join(written['files'])} in {args.out}")
    return 1 if failed or written["unreadable"] else 0

