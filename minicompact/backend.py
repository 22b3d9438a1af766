"""One switch between NumPy (CPU) and CuPy (GPU).

Every layer is written once against an *array module* ``xp``: ``numpy`` on the CPU,
``cupy`` on a GPU.  Layers never import either directly for computation; they ask
``get_array_module(x)`` for the module that owns their input, so the same code runs on
both devices and float32 stays float32.

Devices are named by strings:

* ``"cpu"``  – NumPy, always available.
* ``"gpu"``  – CuPy on the current CUDA device; a clear ``BackendError`` if CuPy or a GPU is
  missing.
* ``"auto"`` – the GPU when usable, else the CPU (says so once).

``set_precision("tf32")`` lets CuPy's float32 matrix products use TF32 tensor cores.
"""
import os
import warnings

import numpy as np

try:  # CuPy is optional: the project installs, runs and tests without it.
    import cupy as _cupy
except Exception as exc:  # ImportError, or a CUDA library that fails to load
    _cupy = None
    _CUPY_ERROR = f"CuPy is not importable ({type(exc).__name__}: {exc})"
else:
    _CUPY_ERROR = None

DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("fp32", "tf32")
_auto_fallback_reported = False
# CuPy itself reads CUPY_TF32 the first time it multiplies float32 matrices.
_precision = "fp32" if os.environ.get("CUPY_TF32", "0") in ("", "0") else "tf32"


class BackendError(RuntimeError):
    """Raised when a device is asked for that this machine cannot provide."""


def _gpu_problem():
    """Return ``None`` when a GPU is usable through CuPy, else a one-line reason."""
    if _cupy is None:
        return _CUPY_ERROR
    try:
        count = _cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return f"CuPy found no usable CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return "CuPy found no CUDA device"
    return None


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
    return _gpu_problem() is None


def resolve_device(device="auto"):
    """Turn ``"auto" | "cpu" | "gpu"`` into the concrete ``"cpu"`` or ``"gpu"``.

    Raises ``BackendError`` for ``"gpu"`` without a usable GPU and ``ValueError`` for an
    unknown name.  ``"auto"`` falls back to the CPU and warns once per process.
    """
    global _auto_fallback_reported
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return "cpu"
    problem = _gpu_problem()
    if device == "gpu":
        if problem is not None:
            raise BackendError(
                f"--device gpu was asked for but {problem}; install the cupy-cudaXXx wheel "
                "matching your CUDA version, or use --device cpu")
        return "gpu"
    if problem is not None:
        if not _auto_fallback_reported:
            warnings.warn(f"device auto: using the CPU (NumPy) because {problem}", stacklevel=2)
            _auto_fallback_reported = True
        return "cpu"
    return "gpu"


def array_module(device):
    """The array module of a concrete device: ``numpy`` for "cpu", ``cupy`` for "gpu"."""
    device = resolve_device(device)
    return _cupy if device == "gpu" else np


def get_array_module(*arrays):
    """The module (numpy or cupy) that owns ``arrays`` — the ``xp`` of every layer."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def is_gpu_array(x):
    """True for a CuPy array."""
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def device_of(x):
    """``"gpu"`` for a CuPy array, ``"cpu"`` otherwise."""
    return "gpu" if is_gpu_array(x) else "cpu"


def to_cpu(x):
    """Return ``x`` as a NumPy array (copies from the GPU; no copy for NumPy input)."""
    if is_gpu_array(x):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_device(x, device):
    """Move an array to ``device`` ("cpu" or "gpu"); no copy when it is already there."""
    device = resolve_device(device)
    if device == "gpu":
        return _cupy.asarray(x)
    return to_cpu(x)


def synchronize(x=None):
    """Wait for queued GPU work (for honest timings); a no-op on the CPU."""
    if _cupy is not None and (x is None or is_gpu_array(x)):
        try:
            _cupy.cuda.get_current_stream().synchronize()
        except Exception:
            pass


def set_precision(precision):
    """How float32 matrix products run on the GPU: "fp32" (full float32, the default) or
    "tf32" (TensorFloat-32 tensor cores, Ampere and newer: the inputs of each product are
    rounded to a 10-bit mantissa, sums stay float32; several times the GEMM throughput for a
    relative error of about 1e-3).  It covers every CuPy matmul of the process — the
    convolutions' one GEMM each way and the classifier — as PyTorch's
    ``torch.backends.cuda.matmul.fp32_precision`` does for its GEMMs.  NumPy has no TF32:
    on the CPU the setting changes nothing.  Returns the previous setting.
    """
    global _precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    previous, _precision = _precision, precision
    tf32 = precision == "tf32"
    os.environ["CUPY_TF32"] = "1" if tf32 else "0"   # for a CuPy that has not multiplied yet
    if gpu_available():
        try:  # CuPy's own switch behind CUPY_TF32, for a CuPy that already has
            from cupy._core import _routines_linalg as linalg
            linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if tf32
                                    else linalg.COMPUTE_TYPE_DEFAULT)
        except (ImportError, AttributeError):  # another CuPy layout: the variable still holds
            warnings.warn("set_precision: this CuPy has no _routines_linalg.set_compute_type; "
                          "CUPY_TF32 applies only if no float32 product ran yet", stacklevel=2)
    return previous


def get_precision():
    """The current ``set_precision`` setting, "fp32" or "tf32"."""
    return _precision
