"""Checking a reader's own implementation against the library's, with a diagnosis.

The lessons have "implement it" cells: the reader writes the body of a function such as
``my_im2col`` and a check cell compares it, on random inputs, with the library function it
re-implements.  A bare "not close" teaches little; ``diagnose`` says *how* two arrays differ
in the ways hand-written array code usually goes wrong:

* a wrong shape (and whether it is the expected shape transposed, or the right number of
  entries laid out differently);
* a wrong dtype (float32 silently promoted to float64);
* a constant factor (a term counted twice, a missing ½ or 1/M, a flipped sign);
* two axes swapped (a transposed index), or an axis reversed (a flipped kernel);
* the right values in another order (an index order mixed up);
* otherwise the worst element and how many entries are wrong.

``check_exercise`` runs both functions on the same inputs and raises ``ExerciseError`` (an
``AssertionError``) with that diagnosis; a body that still raises ``NotImplementedError``
gets a one-line "not implemented yet".  Works on NumPy and CuPy arrays.
"""
import copy
import itertools
import os

import numpy as np

from .backend import to_cpu


def lesson_seed(offset=0):
    """The seed a lesson's random draws start from, plus ``offset`` (one per generator):
    0 unless ``MINICOMPACT_LESSON_SEED`` is set (``lessons/execute.py --seed N``), so every
    claim a lesson makes about random data can be checked under other seeds."""
    return int(os.environ.get("MINICOMPACT_LESSON_SEED", "0")) + offset


class ExerciseError(AssertionError):
    """A reader's function disagrees with the library's; the message says how."""


def _as_numpy(a):
    return np.asarray(to_cpu(a))


def _close(a, b, rtol, atol):
    return a.shape == b.shape and np.allclose(a, b, rtol=rtol, atol=atol)


def diagnose(yours, expected, rtol=1e-7, atol=1e-9):
    """How ``yours`` differs from ``expected`` (two arrays), in one line; None when they match.

    yours, expected: arrays (NumPy or CuPy) or scalars; tolerances as ``np.allclose``, with
    atol scaled by the largest |expected| so that the check does not depend on units.
    Returns None or a string such as "off by a constant factor 2 (a term counted twice?)".
    """
    if yours is None:
        return "returned None (a missing `return`?)"
    if isinstance(yours, NotImplementedError):
        return "is not implemented yet"
    try:
        y = _as_numpy(yours)
    except (TypeError, ValueError):
        return f"returned a {type(yours).__name__}, expected an array"
    e = _as_numpy(expected)
    if y.shape != e.shape:
        got = f"has shape {y.shape}, expected {e.shape}"
        if sorted(y.shape) == sorted(e.shape) and y.ndim <= 6:
            for perm in itertools.permutations(range(e.ndim)):
                t = e.transpose(perm)
                if t.shape == y.shape and np.allclose(y, t, rtol=rtol, atol=atol):
                    if e.ndim == 2:
                        return f"{got}: it is the transpose"
                    return f"{got}: it is the expected array transposed by axes {perm}"
            if y.shape == e.shape[::-1]:
                return f"{got}: the transpose?"
            return f"{got}: axes in the wrong order?"
        if y.size == e.size:
            return (f"{got}: the right number of entries in another layout (a reshape "
                    f"before a transpose?)")
        return got
    if y.dtype != e.dtype and e.dtype.kind == "f":
        return (f"has dtype {y.dtype}, expected {e.dtype} (a float64 constant or array "
                f"promoting float32?)")
    scale = float(np.abs(e).max()) if e.size else 0.0
    atol = atol * max(scale, 1.0)
    if not np.isfinite(y).all():
        return f"has {int((~np.isfinite(y)).sum())} non-finite entries (NaN or inf)"
    if _close(y, e, rtol, atol):
        return None
    ee = float((e * e).sum())
    if ee > 0:
        factor = float((y * e).sum()) / ee
        if not np.isclose(factor, 1.0, rtol=1e-6) and _close(y, factor * e, rtol, atol):
            if np.isclose(factor, -1.0):
                return "has the wrong sign (−1 times the expected values)"
            hint = ""
            if np.isclose(factor, 2.0) or np.isclose(factor, 0.5):
                hint = " (a term counted twice, or a missing ½?)"
            return f"is off by a constant factor {factor:.6g}{hint}"
    if y.ndim >= 2:
        for i, j in itertools.combinations(range(y.ndim), 2):
            if y.shape[i] == y.shape[j] and _close(y, np.swapaxes(e, i, j), rtol, atol):
                return f"has axes {i} and {j} swapped (a transposed index?)"
    for i in range(y.ndim):
        if y.shape[i] > 1 and _close(y, np.flip(e, axis=i), rtol, atol):
            return f"is reversed along axis {i} (a flipped index?)"
    for i in range(y.ndim):
        if y.shape[i] > 1 and _close(np.sort(y, axis=i), np.sort(e, axis=i), rtol, atol):
            return (f"has the right values along axis {i}, in another order (an index order "
                    f"mixed up, such as (n, u, v) read as (u, v, n)?)")
    if _close(np.sort(y, axis=None), np.sort(e, axis=None), rtol, atol):
        return "has the right values in the wrong places (an order mixed up?)"
    wrong = ~np.isclose(y, e, rtol=rtol, atol=atol)
    worst = np.unravel_index(int(np.argmax(np.abs(y - e))), y.shape)
    worst = tuple(int(i) for i in worst)
    return (f"differs in {int(wrong.sum())} of {y.size} entries; worst at {worst}: "
            f"yours {float(y[worst])!r}, expected {float(e[worst])!r}")


def _outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def check_exercise(yours, reference, inputs, rtol=1e-7, atol=1e-9, names=None):
    """Run ``yours(*args)`` and ``reference(*args)`` on each argument tuple; raise on a difference.

    yours: the reader's function; reference: the library's (or a thin wrapper around it)
    returning an array or a tuple of arrays; inputs: a list of argument tuples (each call
    gets its own deep copy, so functions that work in place do not disturb each other).
    names: optional names of the outputs, for the message ("dx", "dgamma", ...).
    Raises ``ExerciseError`` naming the function, the input and the diagnosis (``diagnose``).
    Returns the number of inputs checked.
    """
    label = getattr(yours, "__name__", "your function")
    for n, args in enumerate(inputs):
        expected = _outputs(reference(*copy.deepcopy(args)))
        try:
            got = yours(*copy.deepcopy(args))
        except NotImplementedError:
            raise ExerciseError(f"{label} is not implemented yet: write its body, then run "
                                f"this cell again") from None
        got = _outputs(got) if len(expected) > 1 else [got]
        if len(got) != len(expected):
            raise ExerciseError(f"{label} returned {len(got)} values, expected {len(expected)}")
        shapes = ", ".join(str(tuple(np.shape(a))) for a in args if hasattr(a, "shape"))
        for k, (g, e) in enumerate(zip(got, expected)):
            problem = diagnose(g, e, rtol, atol)
            if problem is not None:
                what = names[k] if names else (f"output {k}" if len(expected) > 1 else "its result")
                raise ExerciseError(f"{label}, input {n} (shapes {shapes}): {what} {problem}")
    return len(inputs)
