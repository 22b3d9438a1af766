#!/usr/bin/env python3
"""Run the lesson notebooks top to bottom with a real Jupyter kernel.

    python lessons/execute.py                  # re-execute every lesson, outputs saved in place
    python lessons/execute.py 03 08            # only the lessons whose file name starts so
    python lessons/execute.py --device gpu     # run them on CuPy (outputs are not saved)
    python lessons/execute.py --check          # run them, save nothing (what the tests do)

Each notebook sets ``DEVICE = "cpu"`` in its first code cell; ``--device gpu`` rewrites that
one line in memory, so the same notebooks run on NumPy or CuPy.  A notebook that raises
stops with its error and the command exits with status 1.  ``tests/test_lessons.py`` calls
``execute`` on every ``lessons/NN_*.ipynb``, so a lesson can never silently rot.
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
DEVICE_LINE = re.compile(r'^DEVICE = "cpu"', re.MULTILINE)


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


def execute(path, device="cpu", timeout=300):
    """Execute the notebook at ``path`` in its own folder; return (notebook, seconds).

    Raises ``nbclient.exceptions.CellExecutionError`` (naming the cell and the error) when a
    cell fails.
    """
    nb = nbformat.read(path, as_version=4)
    if device != "cpu":
        set_device(nb, device)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            resources={"metadata": {"path": os.path.dirname(path)}})
    start = time.perf_counter()
    client.execute()
    return coalesce_streams(nb), time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description="Execute the lesson notebooks.")
    ap.add_argument("prefixes", nargs="*", help="only lessons whose file name starts so (e.g. 03)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="run on NumPy (cpu) or CuPy (gpu); gpu runs are never saved")
    ap.add_argument("--check", action="store_true", help="execute without saving the outputs")
    args = ap.parse_args(argv)
    paths = lesson_paths(args.prefixes)
    if not paths:
        ap.exit(2, f"execute.py: error: no lesson matches {' '.join(args.prefixes)}\n")
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
