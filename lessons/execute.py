#!/usr/bin/env python3
"""Run the lesson notebooks top to bottom with a real Jupyter kernel.

    python lessons/execute.py                  # re-execute every lesson, outputs saved in place
    python lessons/execute.py 03 08            # only the lessons whose file name starts so
    python lessons/execute.py --device gpu     # run them on CuPy (outputs are not saved)
    python lessons/execute.py --check          # run them, save nothing (what the tests do)
    python lessons/execute.py --check --seed 3 # the same under another seed (never saved)
    python lessons/execute.py --blank OUTDIR   # write student copies: exercise bodies removed

Each notebook sets ``DEVICE = "cpu"`` in its first code cell; ``--device gpu`` rewrites that
one line in memory, so the same notebooks run on NumPy or CuPy.  A notebook that raises
stops with its error and the command exits with status 1.  A mistake in the command line or
its folders (an unknown lesson, ``--blank`` into a file, or into a folder already holding one
of the copies) is one line, ``execute.py: error: ...``, and exit status 2, found before
anything is written.  ``tests/test_lessons.py`` calls
``execute`` on every ``lessons/NN_*.ipynb``, so a lesson can never silently rot.

The kernel runs in ``lessons/`` with this checkout's root first on ``PYTHONPATH``, so a
lesson imports the ``minicompact`` beside it, whatever is pip-installed.

Every random draw of a lesson starts from ``exercises.lesson_seed()`` (0 unless the
environment's ``MINICOMPACT_LESSON_SEED`` says otherwise; ``--seed N`` sets it for the
kernel), so a claim can be checked under other seeds: ``--seed`` runs are never saved, and
``MINICOMPACT_LESSON_SEED=N python -m pytest tests/test_lessons.py`` runs the suite's checks so.

"Implement it" cells hold a function ``my_...`` whose body the reader writes, between two
marker lines (``# --- your code here ---`` and ``# --- end of your code ---``).  The stored
notebooks carry a working answer; ``--blank`` writes copies in which each marked body is
replaced by ``raise NotImplementedError`` (and all outputs are cleared), so that the check
cell after it fails with "not implemented yet" until the reader has written it.  A cell whose
metadata tags hold ``answer`` (the library's own solution, shown after the check; a "usual
mistake" that is nearly the answer) is left out of the blank copies altogether.

"""
import argparse
import glob
import os
import re
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

LESSONS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(LESSONS)
DEVICE_LINE = re.compile(r'^DEVICE = "cpu"', re.MULTILINE)
BEGIN_ANSWER = re.compile(r"^(\s*)# -+ your code here")
END_ANSWER = re.compile(r"^\s*# -+ end of your code")
ANSWER_TAG = "answer"                       # a cell with this tag is left out of blank copies
SEED_VARIABLE = "MINICOMPACT_LESSON_SEED"   # read by minicompact.exercises.lesson_seed


def lesson_paths(prefixes=()):
    """The lesson notebooks ``lessons/NN_*.ipynb`` in order, or those whose names start so."""
    paths = sorted(glob.glob(os.path.join(LESSONS, "[0-9][0-9]_*.ipynb")))
    if prefixes:
        paths = [p for p in paths if os.path.basename(p).startswith(tuple(prefixes))]
    return paths


def set_device(nb, device):
    """Point the notebook's ``DEVICE = "cpu"`` line at ``device``; error if it has none."""
    for cell in nb.cells:
        if cell.cell_type == "code" and DEVICE_LINE.search(cell.source):
            cell.source = DEVICE_LINE.sub(f'DEVICE = "{device}"', cell.source, count=1)
            return nb
    raise ValueError("the notebook has no 'DEVICE = \"cpu\"' line to switch")


def coalesce_streams(nb):
    """Join consecutive stdout (or stderr) outputs of a cell into one, as they read.

    The kernel may split one ``print`` across several stream messages; joining them makes a
    re-run save the same file when the printed text is the same.
    """
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            if (merged and out.output_type == "stream" and merged[-1].output_type == "stream"
                    and merged[-1].name == out.name):
                merged[-1].text += out.text
            else:
                merged.append(out)
        if cell.cell_type == "code":
            cell.outputs = merged
    return nb


def blank(nb):
    """Turn a lesson into a student copy, in place: every marked answer becomes
    ``raise NotImplementedError(...)``, every cell tagged ``answer`` (the library's solution
    shown after a check, a "usual mistake" that is nearly the answer) is left out, and every
    output is cleared.  Returns (nb, count).

    Raises ValueError for a begin marker without its end marker (or the reverse).
    """
    count = 0
    nb.cells = [cell for cell in nb.cells if ANSWER_TAG not in cell.get("metadata", {}).get("tags", [])]
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        lines, out, inside = cell.source.splitlines(), [], None
        for line in lines:
            begin, end = BEGIN_ANSWER.match(line), END_ANSWER.match(line)
            if begin and inside is None:
                inside = begin.group(1)
                out += [line, f'{inside}raise NotImplementedError("write this body, then run the check below")']
                count += 1
            elif end and inside is not None:
                out.append(line)
                inside = None
            elif begin or end:
                raise ValueError(f"unbalanced answer markers in cell:\n{cell.source}")
            elif inside is None:
                out.append(line)
        if inside is not None:
            raise ValueError(f"an answer marker is never closed in cell:\n{cell.source}")
        cell.source = "\n".join(out)
    return nb, count


def kernel_env(extra=None):
    """The kernel's environment: ours, this checkout's root first on PYTHONPATH, one BLAS
    thread unless the environment says otherwise (the lessons' small products gain nothing
    from more, and lose much when the cores are busy), plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    env.update(extra or {})
    return env


def run(nb, device="cpu", timeout=300, env=None, allow_errors=False):
    """Execute the notebook object ``nb`` in ``lessons/``; return (notebook, seconds).

    env: extra environment variables for the kernel.  allow_errors: keep going past a
    failing cell (its error is recorded in its outputs) instead of raising.
    """
    if device != "cpu":
        set_device(nb, device)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            allow_errors=allow_errors,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            resources={"metadata": {"path": LESSONS}})
    start = time.perf_counter()
    client.execute(env=kernel_env(env))
    return coalesce_streams(nb), time.perf_counter() - start


def execute(path, device="cpu", timeout=300, env=None):
    """Execute the notebook at ``path`` in ``lessons/``; return (notebook, seconds).

    Raises ``nbclient.exceptions.CellExecutionError`` (naming the cell and the error) when a
    cell fails.  env: extra environment variables for the kernel.
    """
    return run(nbformat.read(path, as_version=4), device, timeout, env)


class UserError(Exception):
    """A mistake in the command line or its folders: one line, exit status 2, nothing written."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line like every other error of this script."""

    def error(self, message):
        self.exit(2, f"execute.py: error: {message} (execute.py --help lists the arguments)\n")


def _first_line(exc):
    """An exception's message as one line (an OSError's own words, without the errno)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def blank_targets(paths, outdir):
    """The student copies ``{target path: notebook}`` for ``paths`` in ``outdir``, checked before
    anything is written.  Raises ``UserError`` (one line) when ``outdir`` is the lessons folder,
    not a folder, not writable, or already holds one of the copies; or when a lesson cannot be
    read or blanked."""
    if not outdir:
        raise UserError("--blank needs a folder name")
    folder = os.path.abspath(outdir)
    if os.path.realpath(folder) == os.path.realpath(LESSONS):
        raise UserError("--blank needs another folder than lessons/ (it would overwrite the answers)")
    # The nearest part of the path that exists: it must be a folder we may write into.
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{outdir}: {existing} exists and is not a folder" if existing != folder
                        else f"{outdir} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{outdir}: the folder {existing} is not writable")
    targets = {}
    for path in paths:
        name = os.path.basename(path)
        try:
            nb, count = blank(nbformat.read(path, as_version=4))
        except (OSError, ValueError) as exc:   # nbformat's read errors are ValueErrors too
            raise UserError(f"{name}: {_first_line(exc)}") from None
        targets[os.path.join(folder, name)] = (nb, count)
    taken = [os.path.basename(t) for t in targets if os.path.lexists(t)]
    if taken:
        raise UserError(f"{outdir} already holds {', '.join(taken)}; choose an empty folder "
                        "(nothing was written)")
    return targets


def write_blanks(targets, outdir):
    """Write the checked copies; on any failure remove what this call created (files and
    folders) and raise ``UserError``, so that a failed run leaves nothing behind."""
    folder = os.path.abspath(outdir)
    created, written = [], []
    try:
        missing = []
        parent = folder
        while not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for d in reversed(missing):
            os.mkdir(d)
            created.append(d)
        for target, (nb, _) in targets.items():
            with open(target, "x", encoding="utf-8") as f:   # "x": never over a file that appeared
                written.append(target)
                nbformat.write(nb, f)
    except OSError as exc:
        for path in reversed(written):
            try:
                os.remove(path)
            except OSError:
                pass
        for d in reversed(created):
            try:
                os.rmdir(d)
            except OSError:
                pass
        where = getattr(exc, "filename", None) or outdir
        raise UserError(f"cannot write into {outdir} ({_first_line(exc)}: {where}); nothing was written") from None


def main(argv=None):
    ap = Parser(description="Execute the lesson notebooks.")
    ap.add_argument("prefixes", nargs="*", help="only lessons whose file name starts so (e.g. 03)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="run on NumPy (cpu) or CuPy (gpu); gpu runs are never saved")
    ap.add_argument("--check", action="store_true", help="execute without saving the outputs")
    ap.add_argument("--blank", metavar="OUTDIR",
                    help="write student copies (exercise bodies removed, no outputs) into OUTDIR; "
                         "executes nothing, and writes nothing if OUTDIR already holds one of them")
    ap.add_argument("--seed", type=int, default=None,
                    help="the lessons' seed (MINICOMPACT_LESSON_SEED; default 0); outputs are then not saved")
    args = ap.parse_args(argv)
    try:
        unmatched = [p for p in args.prefixes if not lesson_paths([p])]
        if unmatched:
            names = " ".join(os.path.basename(p)[:2] for p in lesson_paths())
            raise UserError(f"no lesson matches {' '.join(unmatched)} (the lessons: {names})")
        paths = lesson_paths(args.prefixes)
        if not paths:
            raise UserError(f"no lesson notebooks in {LESSONS}")
        if args.blank is not None:
            if args.check or args.device != "cpu":
                raise UserError("--blank writes copies and executes nothing: drop --check and --device")
            targets = blank_targets(paths, args.blank)
            write_blanks(targets, args.blank)
            for target, (_, count) in targets.items():
                print(f"{os.path.basename(target)}: {count} exercise{'s' if count != 1 else ''} blanked")
            return 0
    except UserError as exc:
        print(f"execute.py: error: {exc}", file=sys.stderr)
        return 2
    save = not args.check and args.device == "cpu" and args.seed is None
    env = None if args.seed is None else {SEED_VARIABLE: str(args.seed)}
    total = 0.0
    for path in paths:
        name = os.path.basename(path)
        try:
            nb, seconds = execute(path, args.device, env=env)
        except CellExecutionError as exc:
            print(f"{name}: FAILED\n{exc}", file=sys.stderr)
            return 1
        total += seconds
        if save:
            nbformat.write(nb, path)
        print(f"{name}: {seconds:5.1f} s{'  (saved)' if save else ''}", flush=True)
    print(f"{len(paths)} lessons in {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
