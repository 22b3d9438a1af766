"""The output folder of a run: which folder, and never over an earlier run's files.

The rule (docs/running.md, "What a run writes"):

* a *default* folder is always a new one: when ``runs/<name>`` exists, the run goes to
  ``runs/<name>-2``, ``runs/<name>-3``, ... (the first name that does not exist, created at
  once with ``mkdir``, so two runs started together never share one);
* an *explicit* folder that holds files of an earlier run is refused (the caller says how to
  go on), unless the user asks for ``--overwrite``, which removes those files first;
* files that belong to no run (anything else in the folder, the image cache) are left alone;
* before any work, the folder is created and a probe file written and removed, so an
  unwritable folder fails at once, not after an epoch of training;
* a command that ends without finishing (an error, Ctrl-C) takes back what it wrote
  (``finished_or_removed``), so no empty or half-written folder is left to puzzle over.
"""
import contextlib
import os
import shutil

from ..system.npz import CheckpointError
from ..training.checkpoint import read_train_state
from .console import fail, note

# What a training run writes, and what an evaluation writes.
RUN_FILES = ("log.jsonl", "last.npz", "best.npz", "model.npz", "report.json", "curves.png", "sparsity.png")
EVAL_FILES = ("model.npz", "report.json", "curves.png", "sparsity.png")


class OutputError(Exception):
    """The output folder cannot be used; the message is one line."""


def held_files(folder, names):
    """The ``names`` that exist in ``folder`` (any kind of entry), in the order given."""
    return [n for n in names if os.path.lexists(os.path.join(folder, n))]


def claim_new_folder(base):
    """Create and return ``base``, or ``base-2``, ``base-3``, ... : the first that did not exist.

    ``mkdir`` is atomic, so of two runs started at once each gets its own folder.
    """
    parent = os.path.dirname(base)
    if parent:
        os.makedirs(parent, exist_ok=True)
    folder, k = base, 1
    while True:
        try:
            os.mkdir(folder)
            return folder
        except FileExistsError:
            k += 1
            folder = f"{base}-{k}"


def remove_files(folder, names, keep=None):
    """Delete the ``names`` present in ``folder`` (the user asked for ``--overwrite``).

    keep: a path not to delete (e.g. the checkpoint a run is resumed from).
    """
    for n in held_files(folder, names):
        path = os.path.join(folder, n)
        if keep is not None and os.path.exists(keep) and os.path.samefile(path, keep):
            continue
        os.remove(path)


@contextlib.contextmanager
def finished_or_removed(folder, created, names):
    """Run the ``with`` body that fills ``folder``; if it ends without finishing (an error,
    Ctrl-C), remove what it wrote and re-raise.

    created: this command made ``folder`` (a claimed default or a new ``--out``): all of it
    goes.  Otherwise only the ``names`` it writes go: the caller refused or removed them before
    the work, so any present now are this command's, and a user's other files stay.
    """
    try:
        yield folder
    except BaseException:
        with contextlib.suppress(OSError):  # the error that stopped the command is the one to show
            if created:
                shutil.rmtree(folder)
            else:
                remove_files(folder, names)
        raise


def check_writable(folder):
    """Create ``folder`` if needed and write and remove a probe file; ``OutputError`` if not."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"{folder} exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {folder} ({exc.strerror or exc})") from None
    probe = os.path.join(folder, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"minicompact")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as exc:
        raise OutputError(f"the output folder {folder} is not writable ({exc.strerror or exc})") from None


def command_folder(out, default_base, names, overwrite, what):
    """(folder, created) for a command that writes the files ``names`` (--thin, --features).

    out: the folder the user gave (refused if it holds any of ``names``, unless
    ``overwrite``, which removes them first), or None for a new folder claimed from
    ``default_base`` (``claim_new_folder``); what: how the message names such files ("a
    thinning").  created: this call made the folder, so an unfinished command removes all of
    it (``finished_or_removed``).  ``OutputError`` (one line) otherwise; a folder this call
    made is not left behind.
    """
    created = out is None or not os.path.lexists(out)
    if out is None:
        out = claim_new_folder(default_base)
    else:
        held = held_files(out, names) if os.path.isdir(out) else []
        if held and not overwrite:
            raise OutputError(f"--out {out} already holds {what} ({', '.join(held)}): choose another --out, "
                              "or add --overwrite to replace it")
        remove_files(out, held)
    try:
        check_writable(out)
    except OutputError:
        if created and os.path.isdir(out):  # check_writable made it before failing
            with contextlib.suppress(OSError):
                os.rmdir(out)
        raise
    return out, created


def run_name(arch, model, depth, rho):
    """A run's default folder name, and a sweep point's: ``compact-d12-rho0.03``, or
    ``resnet18-compact-rho0.03`` (VGG11 and ResNet18 have one depth each)."""
    if arch == "compactnet":
        return f"{model}-d{depth}-rho{rho:g}"
    return f"{arch}-{model}-rho{rho:g}"


def choose_output(s, how, checkpoint):
    """The run's output folder by the rule above: refuse to overwrite, claim, probe (one line
    on failure).  A default folder this creates is recorded in ``how.claimed``."""
    path = s.resume or s.evaluate
    explicit = s.out is not None
    names = EVAL_FILES if s.evaluate else RUN_FILES
    run_dir = os.path.dirname(os.path.abspath(path)) if path else None
    if explicit:
        out = s.out
    elif s.resume:
        out = run_dir
    else:
        base = (os.path.join(run_dir, "eval-" + os.path.splitext(os.path.basename(path))[0]) if s.evaluate
                else os.path.join("runs", ("finetune-" if s.finetune else "") + run_name(s.arch, s.model, s.depth, s.rho)))
        try:
            out = claim_new_folder(base)
        except OSError as exc:
            fail(f"cannot create the output folder {base} ({exc.strerror or exc}); give --out DIR")
        how.claimed = out
        if out != base:
            note(f"{base} exists; {'this evaluation' if s.evaluate else 'this run'} goes to {out}")
    out = os.path.abspath(out)
    # The checkpoint's folder is its run's folder when it is the run's last/best.npz or holds
    # a last.npz; a checkpoint kept anywhere else is treated like any --out.
    same_run = (s.resume and os.path.isdir(out) and os.path.samefile(out, run_dir)
                and (os.path.basename(path) in ("last.npz", "best.npz")
                     or os.path.exists(os.path.join(run_dir, "last.npz"))))
    held = held_files(out, names) if os.path.isdir(out) else []
    if same_run:  # continuing a run in its own folder: its files are this run's
        state = checkpoint[2]
        last = os.path.join(out, "last.npz")
        branch = os.path.exists(last) and not os.path.samefile(last, path)
        if branch and not s.overwrite:
            try:
                later = read_train_state(last)
            except CheckpointError:
                later = {}
            here, there = (state.get("epoch", 0), state.get("step", 0)), (later.get("epoch", 0), later.get("step", 0))
            if there > here:
                fail(f"{last} is further along (epoch {there[0]}, step {there[1]}) than {path} "
                     f"(epoch {here[0]}, step {here[1]}); resuming here would overwrite it: give "
                     "another --out to branch off, or add --overwrite")
        finished = state.get("epoch", 0) >= s.epochs and not state.get("partial")
        if finished and held_files(out, ("report.json", "model.npz")) and not s.overwrite:
            fail(f"{path} has already trained {state.get('epoch', 0)} epochs (--epochs {s.epochs}) "
                 f"and {out} holds its report; raise --epochs to train longer, or use --evaluate")
        if branch and s.overwrite:
            remove_files(out, names, keep=path)  # the branch replaces the later state
    elif held:
        if not s.overwrite:
            hint = (f"continue it with --resume {os.path.join(out, 'last.npz')}, "
                    if "last.npz" in held and not s.evaluate else "")
            what = "a run" if held_files(out, ("last.npz",)) else "an evaluation"  # whatever wrote them
            fail(f"--out {out} already holds {what} ({', '.join(held[:3])}"
                 f"{', ...' if len(held) > 3 else ''}): {hint}choose another --out, or add "
                 "--overwrite to replace it")
        remove_files(out, names, keep=path)
    try:
        check_writable(out)
    except OutputError as exc:
        fail(f"{exc}{'' if explicit else '; give --out DIR to write elsewhere'}")
    return out
