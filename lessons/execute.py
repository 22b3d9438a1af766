#!/usr/bin/env python3
"""Run the lesson notebooks top to bottom with a real Jupyter kernel.

    python lessons/execute.py                  # re-execute every lesson, outputs saved in place
    python lessons/execute.py 03 08            # only the lessons whose file name starts so
    python lessons/execute.py --device gpu     # run them on CuPy (outputs are not saved)
    python lessons/execute.py --check          # run them, save nothing (what the tests do)
    python lessons/execute.py --blank OUTDIR   # write student copies: exercise bodies removed

Each notebook sets ``DEVICE = "cpu"`` in its first code cell; ``--device gpu`` rewrites that
one line in memory, so the same notebooks run on NumPy or CuPy.  A notebook that raises
stops with its error and the command exits with status 1.  ``tests/test_lessons.py`` calls
``execute`` on every ``lessons/NN_*.ipynb``, so a lesson can never silently rot.

The kernel runs in ``lessons/`` with this checkout's root first on ``PYTHONPATH``, so a
lesson imports the ``minicompact`` beside it, whatever is pip-installed.

"Implement it" cells hold a function ``my_...`` whose body the reader writes, between two
marker lines (``# --- your code here ---`` and ``# --- end of your code ---``).  The stored
notebooks carry a working answer; ``--blank`` writes copies in which each marked body is
replaced by ``raise NotImplementedError`` (and all outputs are cleared), so that the check
cell after it fails with "not implemented yet" until the reader has written it.

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
    ``raise NotImplementedError(...)`` and every output is cleared.  Returns (nb, count).

    Raises ValueError for a begin marker without its end marker (or the reverse).
    """
    count = 0
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
    """The kernel's environment: ours, this checkout's root first on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
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


def main(argv=None):
    ap = argparse.ArgumentParser(description="Execute the lesson notebooks.")
    ap.add_argument("prefixes", nargs="*", help="only lessons whose file name starts so (e.g. 03)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="run on NumPy (cpu) or CuPy (gpu); gpu runs are never saved")
    ap.add_argument("--check", action="store_true", help="execute without saving the outputs")
    ap.add_argument("--blank", metavar="OUTDIR",
                    help="write student copies (exercise bodies removed, no outputs) into OUTDIR")
    args = ap.parse_args(argv)
    paths = lesson_paths(args.prefixes)
    if not paths:
        ap.exit(2, f"execute.py: error: no lesson matches {' '.join(args.prefixes)}\n")
    if args.blank:
        if os.path.abspath(args.blank) == LESSONS:
            ap.exit(2, "execute.py: error: --blank needs another folder than lessons/ (it would "
                       "overwrite the answers)\n")
        os.makedirs(args.blank, exist_ok=True)
        for path in paths:
            nb, count = blank(nbformat.read(path, as_version=4))
            target = os.path.join(args.blank, os.path.basename(path))
            if os.path.exists(target):
                ap.exit(2, f"execute.py: error: {target} exists; choose an empty folder\n")
            nbformat.write(nb, target)
            print(f"{os.path.basename(path)}: {count} exercise{'s' if count != 1 else ''} blanked")
        return 0
    save = not args.check and args.device == "cpu"
    total = 0.0
    for path in paths:
        name = os.path.basename(path)
        try:
            nb, seconds = execute(path, args.device)
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
