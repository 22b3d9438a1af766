"""The pieces of a sweep that know nothing of processes: the grid, a point's folder and state,
the lock on it, and one results row per point (the shared image cache's folder and its lock
are ``data/cache.py``'s).

A sweep (``python -m minicompact.sweep``) trains one ordinary ``run.py`` run per point of a
grid over depth L, ρ and model (the paper's sensitivity analysis, sec. 5.3.2, Figs. 6-9)::

    SWEEP/sweep.json                 the run.py flags every point shares (refuses other ones)
    SWEEP/points/<point>/            each point's run.py --out (log.jsonl, last.npz, report.json ...)
    SWEEP/points/<point>.lock        held while a process trains the point (pid, host)
    SWEEP/logs/<point>.log           the point's run.py output
    SWEEP/cache/<data key>/          the decoded images every point reads (run.py --cache-dir)
    SWEEP/results.csv ... summary.md what --collect writes (plots.py)

Points: CompactNet at every (depth, ρ); CompressedNet has no ρ of its own (α = 0, Ψ with
β = --compressed-beta), so the swept ρ is its β (sec. 5.3.2 tunes each model's strength); SimpleNet
has no strength at all: one point per depth, ρ = 0.  Each network of ``--archs`` gets those
points: "compactnet" (the default, named as ever: ``compact-d12-rho0.03``) over the depths,
VGG11 and ResNet18 (run.py --arch, sec. 5.3.4) once, at their own depth
(``resnet18-compact-rho0.03``).
"""
import contextlib
import csv
import io
import json
import math
import os
import socket

from ..architectures import CHOICES, ArchConfig
from ..system.atomic import atomic_write
from ..cli.flags import parse
from ..cli.rundir import run_name
from ..system.processes import pid_alive

MODELS = ("compact", "compressed", "simple")


class SweepError(Exception):
    """A bad sweep request; the message is one line."""


# --------------------------------------------------------------------------- the grid
def parse_list(text, kind, flag):
    """'4,8,12' -> [4, 8, 12] (kind: int, float or str); one line on a bad item."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise SweepError(f"{flag} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None


def point_name(model, depth, rho, arch="compactnet"):
    """The folder name of a point, run.py's default name: ``compact-d12-rho0.03``, or
    ``resnet18-compact-rho0.03`` (``rundir.run_name``)."""
    return run_name(arch, model, depth, rho)


def grid(depths, rhos, models, archs=("compactnet",)):
    """The points, in a fixed order: a list of dicts {name, arch, model, depth, rho}.

    SimpleNet gets one point per depth (ρ = 0); VGG11 and ResNet18 one per model and ρ, at
    their own depth (9, 18); duplicates are dropped.  Raises SweepError for an empty grid, an
    unknown arch or model or a ρ outside [0, 1].
    """
    for flag, given, known in (("--archs", archs, CHOICES), ("--models", models, MODELS)):
        bad = [m for m in given if m not in known]
        if bad:
            raise SweepError(f"{flag}: unknown {flag[2:-1]} {bad[0]!r}; choose from {', '.join(known)}")
    out_of_range = [r for r in rhos if not 0.0 <= r <= 1.0]
    if out_of_range:
        raise SweepError(f"--rhos must lie in [0, 1], got {out_of_range[0]:g}")
    points, seen = [], set()
    for arch in archs:
        arch_depths = depths if arch == "compactnet" else [ArchConfig(arch=arch).depth]
        for model in models:
            for depth in arch_depths:
                for rho in ([0.0] if model == "simple" else rhos):
                    name = point_name(model, depth, rho, arch)
                    if name not in seen:
                        seen.add(name)
                        points.append(dict(name=name, arch=arch, model=model, depth=depth, rho=float(rho)))
    if not points:
        raise SweepError("the grid is empty: give at least one --archs, --depths, --rhos and --models value")
    return points


def point_flags(point):
    """The run.py flags that place a point in the grid (a CompactNet point's as before --arch)."""
    arch = point.get("arch", "compactnet")
    flags = (["--model", point["model"], "--depth", str(point["depth"])] if arch == "compactnet"
             else ["--arch", arch, "--model", point["model"]])
    if point["model"] == "compressed":
        return flags + ["--compressed-beta", f"{point['rho']:g}"]
    return flags + ["--rho", f"{point['rho']:g}"]


def shard(points, spec):
    """The points of shard ``spec`` = "i/n" (0 <= i < n): every n-th point from the i-th."""
    try:
        i, n = (int(v) for v in str(spec).split("/"))
    except ValueError:
        raise SweepError(f"--shard must be i/n (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise SweepError(f"--shard {spec}: need 0 <= i < n")
    return points[i::n]


# --------------------------------------------------------------------------- folders
def point_dir(sweep, name):
    return os.path.join(sweep, "points", name)


def point_state(folder):
    """'done' (report.json written), 'interrupted' (a last.npz to resume) or 'new'."""
    if os.path.exists(os.path.join(folder, "report.json")):
        return "done"
    if os.path.exists(os.path.join(folder, "last.npz")):
        return "interrupted"
    return "new"


def check_folder(path, flag):
    """One line (SweepError) unless ``path`` is a folder, or can be made one, that we may write in.

    Walks up to the nearest part of ``path`` that exists: it must be a folder (not a file)
    and writable.  Nothing is created here, so a refused command leaves nothing behind.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise SweepError(f"{flag} {path} is a file, not a folder")
    nearest = path
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        raise SweepError(f"{flag} {path} cannot be created: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise SweepError(f"{flag} {path}: no permission to write in {nearest}")


def check_near(near):
    """--near, the margin of Fig. 9's C mode in error points: finite and >= 0.  NaN or a negative
    margin leaves no point within it (``operation_modes``), so the C rows would silently vanish;
    0 is meaningful (C: the fewest parameters at exactly the best error)."""
    if not (math.isfinite(near) and near >= 0):
        raise SweepError(f"--near must be a finite number of error points >= 0, got {near:g}")


# run.py flags that change how a point runs but not its numbers, so sweeps that differ only
# in them may share a folder: --workers (batches do not depend on the number of decoding
# processes, data/loader.py), --no-progress (bars only), --cache (every point gets the
# sweep's --cache-dir, which takes its place), --cuda-graph (a captured step is checked
# against the eager one and computes the same numbers).  The names are argparse's dests.
NOT_RESULTS = ("workers", "no_progress", "cache", "cuda_graph")


def parse_run_args(run_args):
    """(values, given): ``run_args`` parsed by run.py's own parser (``flags.parse``) as
    {dest: value} and the set of dests typed; SweepError with run.py's one line if it refuses them."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            args, given = parse(list(run_args))
    except SystemExit:  # argparse's error (or --help): run.py's own line, not its exit
        lines = [line for line in said.getvalue().splitlines() if line.strip()]
        raise SweepError(f"run.py refuses the flags after --: {lines[-1] if lines else 'they print help'}") from None
    return vars(args), given


def differing_flags(held, now):
    """The run.py flags (``--name``) whose parsed values differ between the flag lists ``held``
    and ``now``, leaving out ``NOT_RESULTS``: ``--epochs=3`` and ``--epochs 3``, or two orders
    of the same flags, do not differ."""
    if list(held) == list(now):
        return []
    try:
        before = parse_run_args(held)[0]
    except SweepError:
        raise SweepError(f"the flags recorded in sweep.json ({' '.join(held)}) are no longer accepted by "
                         "run.py; use another --out") from None
    after = parse_run_args(now)[0]
    return [f"--{k.replace('_', '-')}" for k in before
            if k not in NOT_RESULTS and before[k] != after.get(k)]


def check_sweep_file(sweep, run_args, create=True):
    """Record the run.py flags of this sweep in SWEEP/sweep.json, or check them against it.

    An --out that already holds a sweep with other flags (compared as parsed values, see
    ``differing_flags``) is refused: its points would mix two recipes in one table.
    create=False (--collect): a folder without sweep.json is refused and nothing is written,
    so that a later sweep into it still records its own flags.  Raises SweepError.
    """
    path = os.path.join(sweep, "sweep.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                held = json.load(f)["run_args"]
        except (OSError, ValueError, KeyError, TypeError):
            raise SweepError(f"{path} is not a sweep file; use another --out") from None
        differ = differing_flags(held, run_args)
        if differ:
            raise SweepError(f"--out {sweep} holds a sweep with other run.py flags ({' '.join(held) or 'none'}; "
                             f"now: {' '.join(run_args) or 'none'}; they differ in {', '.join(differ)}); "
                             "use another --out")
        return
    if not create:
        raise SweepError(f"--out {sweep} holds no sweep (no sweep.json): nothing to collect")
    if os.path.isdir(sweep) and os.listdir(sweep):
        raise SweepError(f"--out {sweep} exists and is not a sweep folder; use another --out")
    try:
        with atomic_write(path) as f:
            json.dump({"version": 1, "run_args": list(run_args)}, f, indent=1)
    except OSError as exc:  # check_folder looked, but e.g. a read-only file system or an ACL
        raise SweepError(f"cannot write {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- the lock
class Locked(Exception):
    """The point is being trained by another live process (message: who)."""


@contextlib.contextmanager
def point_lock(path):
    """Hold ``path`` (a lock file holding "pid host") while the block runs.

    The file is written whole under a temporary name and then hard-linked to ``path``
    (``os.link`` fails if ``path`` exists), so no process ever sees a half-written lock.
    A lock left by a dead process of this machine is stale and taken over; a lock held by a
    live process, or by any process of another machine (whose liveness cannot be told from
    here), or one that cannot be read, raises ``Locked``.  Removed on the way out.
    """
    host = socket.gethostname()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {host}\n")
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                try:
                    with open(path) as f:
                        pid, who = f.read().split()[:2]
                    pid = int(pid)
                except FileNotFoundError:
                    continue  # its holder just let it go
                except (OSError, ValueError):
                    raise Locked(f"{path} cannot be read; remove it if no process holds it") from None
                if who == host and not pid_alive(pid):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)  # stale
                    continue
                raise Locked(f"held by pid {pid} on {who}") from None
        else:
            raise Locked("could not take over a stale lock")
    finally:
        os.remove(tmp)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# --------------------------------------------------------------------------- results
def read_point(folder, point):
    """One results row (a dict) from a finished point's report.json and log.jsonl.

    ``SweepError`` (one line naming the file and the way out) for a file that is not what a
    run writes: edited by hand, cut short by a full disk, copied half-way."""
    try:
        return _row(folder, point)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else (exc.strerror or str(exc))
        raise SweepError(f"{point['name']}: cannot read its report.json or log.jsonl in {folder} ({what}); delete "
                         "that folder to train the point again") from None


def _row(folder, point):
    with open(os.path.join(folder, "report.json")) as f:
        report = json.load(f)
    history = []
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(folder, "log.jsonl")) as f:
            history = [json.loads(line) for line in f if line.strip()]
    after = report["after_threshold"]
    acc, sp = after["accuracy"], after["sparsity"]
    eff = sp["effective_parameters"]
    last = history[-1] if history else {}
    row = dict(point=point["name"], arch=point.get("arch", "compactnet"), model=point["model"],
               depth=point["depth"], rho=point["rho"],
               epochs=report.get("epochs"),
               # errors in % to 4 decimals: 100·(1 − a) leaves float noise (28.500000000000004)
               train_top1_error=round(100 * (1 - last["train_top1"]), 4) if "train_top1" in last else "",
               val_top1_error=round(acc["single_crop"]["top1_error"], 4),
               val_top1_error_10crop=round(acc["ten_crop"]["top1_error"], 4),
               val_top5_error=round(acc["single_crop"]["top5_error"], 4),
               val_top5_error_10crop=round(acc["ten_crop"]["top5_error"], 4),
               total_params=report["total_parameters"], nonzero_params=eff["nonzero"],
               structural_params=eff["structural"],
               layer_sparsity=" ".join(f"{100 * m['layer_sparsity']:.1f}" for m in sp["layers"].values()),
               train_seconds=round(sum(h.get("seconds", 0) for h in history), 1))
    return row


FIELDS = ("point", "arch", "model", "depth", "rho", "epochs", "train_top1_error", "val_top1_error",
          "val_top1_error_10crop", "val_top5_error", "val_top5_error_10crop", "total_params",
          "nonzero_params", "structural_params", "layer_sparsity", "train_seconds")


def write_results(path, rows):
    """results.csv: one row per finished point (``FIELDS``; layer_sparsity: % per layer,
    conv1 ... classifier, space-separated; train_top1_error: the last epoch's running
    training error over its random crops)."""
    with atomic_write(path) as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def series(row):
    """The group of a results row in the operation modes and the figures: its model ("compact",
    "compressed", "simple") for a CompactNet point, "<arch>-<model>" ("resnet18-compact") for
    the others."""
    arch = row.get("arch", "compactnet")
    return row["model"] if arch == "compactnet" else f"{arch}-{row['model']}"


def operation_modes(rows, near=2.0):
    """The operation modes of sec. 5.3.2 for each group-regularized model (Fig. 9).

    rows: results rows. near: the error margin, in points, that counts as "reaching" an error.
    Returns {model: {"B": row, "C": row, "M": {other model: row}}}, a "model" being a row's
    ``series`` (a VGG11 or ResNet18 with each regularizer is one of its own):

    * B (best performance): the model's lowest single-crop top-1 error;
    * C (compressed): its fewest structural effective parameters with an error within
      ``near`` points of the best error of any model (the paper: near-AlexNet error);
    * M (performance match): for each other model, its fewest structural parameters with an
      error no worse than that model's best (when there is one).
    SimpleNet gets B only.
    """
    by_model = {}
    for r in rows:
        by_model.setdefault(series(r), []).append(r)
    best = {m: min(rs, key=lambda r: r["val_top1_error"]) for m, rs in by_model.items()}
    target = min(r["val_top1_error"] for r in best.values()) + near if best else None
    modes = {}
    for m, rs in by_model.items():
        modes[m] = {"B": best[m]}
        if rs[0]["model"] == "simple":
            continue
        ok = [r for r in rs if r["val_top1_error"] <= target]
        if ok:
            modes[m]["C"] = min(ok, key=lambda r: r["structural_params"])
        match = {}
        for other, b in best.items():
            if other != m:
                ok = [r for r in rs if r["val_top1_error"] <= b["val_top1_error"]]
                if ok:
                    match[other] = min(ok, key=lambda r: r["structural_params"])
        modes[m]["M"] = match
    return modes
