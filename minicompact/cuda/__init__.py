"""Hand-written CUDA kernels, each beside the array-expression twin it must agree with.

On a GPU every CuPy array expression is a kernel launch of its own (about 10 µs of host time
each), so a layer written as a chain of them is bound by launches at small sizes.  The
modules of this package write a layer's hot loop as one CUDA C kernel instead: a thread per
output element, reading each input once.  Each kernel has a *twin*: the CuPy/NumPy-expression
function that computes the same thing (the layer's readable version), which

* runs on the CPU (NumPy has no kernels),
* is the reference the kernel is tested against, and
* takes over on a GPU whenever the kernel cannot be trusted.

**Self-check at first use.**  The first time a kernel is asked for on a GPU it is compiled
(NVRTC, through ``cupy.RawModule``) and run once on a small random input beside its twin.  If
compiling fails or the results differ, it warns once, naming the kernel and the error, and the
twin is used from then on: a kernel that has never run on the user's card can cost speed, never
a wrong answer.  ``MINICOMPACT_KERNELS=off`` in the environment uses the twins everywhere (for
a side-by-side timing, or to rule the kernels out).

**Counting without a GPU.**  A stand-in for CuPy (``tests/fake_gpu.py``, the launch counter of
``bench/gpu_budget.py``) may define ``emulate_kernel(name)``, a context manager: the kernel's
twin then runs inside it, so the stand-in can count the whole twin as the one launch the kernel
would be.  Real CuPy has no such attribute.

Writing a kernel: a module of this package holds the CUDA C source and the function that
launches it (``pooling.py``, ``batchnorm.py``, ``im2col.py``, ``sgd.py``); the module of the
readable version (``layers/pooling.py``, ..., ``optim.py`` and ``objective.py`` for ``sgd.py``)
makes ``CudaKernel(name, source, functions, launch, twin, sample)`` right beside that version,
its twin, so imports point down.  ``source`` is CUDA C with ``T`` for the element type,
compiled once per dtype (float, double) with ``#define T ...`` in front, so every
``extern "C" __global__`` function is plain C and also compiles with ``nvcc``
(``tests/test_cuda_kernels.py`` does that on a machine without a GPU); ``launch(functions,
*args)`` allocates the outputs and launches the compiled functions (a dict name ->
``cupy.RawKernel``), or returns None for a call it cannot launch (an output that is not
contiguous, say), which the twin then computes; ``twin(*args)`` returns the same outputs;
``sample(xp, dtype)`` returns small arguments for the self-check.
"""
import os
import warnings

import numpy as np

from ..backend import get_array_module

# Every kernel of the package, by name: what the nvcc test compiles and the self-check report lists.
REGISTRY = {}
DTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
THREADS = 256  # threads per block of the one-thread-per-element kernels


def kernels_enabled():
    """False when ``MINICOMPACT_KERNELS=off`` (or 0/false/no) asks for the twins everywhere."""
    return os.environ.get("MINICOMPACT_KERNELS", "on").strip().lower() not in ("off", "0", "false", "no")


def blocks(n, threads=THREADS):
    """Blocks of ``threads`` that cover ``n`` elements (at least one)."""
    return max(1, -(-int(n) // threads))


def source_for(source, dtype):
    """The CUDA C text compiled for ``dtype`` (float32 or float64): ``T`` defined first."""
    return f"#define T {DTYPES[np.dtype(dtype)]}\n{source}"


def _same(a, b, dtype):
    """Whether outputs ``a`` and ``b`` (arrays, or tuples of arrays) agree for ``dtype``: exactly
    for integer outputs (argmax indices), to float rounding for the rest."""
    xs = a if isinstance(a, (tuple, list)) else (a,)
    ys = b if isinstance(b, (tuple, list)) else (b,)
    if len(xs) != len(ys):
        return False, f"{len(xs)} outputs against the twin's {len(ys)}"
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    for i, (x, y) in enumerate(zip(xs, ys)):
        x, y = np.asarray(_host(x)), np.asarray(_host(y))
        if x.shape != y.shape:
            return False, f"output {i} has shape {x.shape}, the twin's {y.shape}"
        if x.dtype.kind in "iub":
            if not np.array_equal(x, y):
                return False, f"output {i}: {int((x != y).sum())} of {x.size} entries differ"
        else:
            scale = max(1.0, float(np.abs(y).max(initial=0.0)))
            err = float(np.abs(x - y).max(initial=0.0)) / scale
            if not err <= tol:  # also catches NaN
                return False, f"output {i} differs by {err:.3g} (relative to its largest value)"
    return True, ""


def _host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else x


class CudaKernel:
    """One layer step as CUDA kernels, with its twin (module doc).

    name: unique, used in warnings and counts; source: CUDA C using ``T``; launch(functions,
    *args) -> outputs, where functions maps each ``extern "C"`` name in ``source`` to its
    compiled ``RawKernel``, or None: "this call cannot be launched, use the twin";
    twin(*args) -> the same outputs from array expressions; sample(xp, dtype) -> args for the
    self-check (which the launch must accept).
    """

    def __init__(self, name, source, functions, launch, twin, sample):
        if name in REGISTRY:
            raise ValueError(f"a CUDA kernel named {name!r} exists already")
        self.name, self.source, self.function_names = name, source, tuple(functions)
        self.launch, self.twin, self.sample = launch, twin, sample
        self._compiled = {}    # dtype -> {function name: RawKernel}
        self._trusted = {}     # dtype -> True (checked) / False (failed: the twin is used)
        REGISTRY[name] = self

    def __call__(self, *args):
        """The outputs for ``args``: the kernel on a GPU once it has checked itself, the twin
        otherwise (NumPy, a stand-in for CuPy, ``MINICOMPACT_KERNELS=off``, a failed check, a
        launch that returns None)."""
        xp = get_array_module(args[0])
        if xp is np or not kernels_enabled():
            return self.twin(*args)
        emulate = getattr(xp, "emulate_kernel", None)
        if emulate is not None:  # a stand-in for CuPy: one launch, computed by the twin
            with emulate(self.name):
                return self.twin(*args)
        dtype = np.dtype(args[0].dtype)
        if dtype not in DTYPES or not self._check(xp, dtype):
            return self.twin(*args)
        out = self.launch(self._compiled[dtype], *args)
        return self.twin(*args) if out is None else out

    def compile(self, xp, dtype):
        """{function name: RawKernel} for ``dtype``, compiled once (NVRTC through CuPy)."""
        if dtype not in self._compiled:
            module = xp.RawModule(code=source_for(self.source, dtype), options=("--std=c++14",))
            self._compiled[dtype] = {f: module.get_function(f) for f in self.function_names}
        return self._compiled[dtype]

    def _check(self, xp, dtype):
        """Whether the kernel may be used for ``dtype``: compiled and run once against the twin
        on ``sample``'s input; on any failure warn once and trust the twin from then on."""
        if dtype not in self._trusted:
            try:
                functions = self.compile(xp, dtype)
                args = self.sample(xp, dtype)
                got = self.launch(functions, *args)
                if got is None:
                    ok, why = False, "its launch refused the sample"
                else:
                    ok, why = _same(got, self.twin(*args), dtype)
            except Exception as exc:  # noqa: BLE001 - a compile or launch error of any kind
                ok, why = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
            if not ok:
                warnings.warn(f"CUDA kernel {self.name} ({np.dtype(dtype).name}) failed its self-check "
                              f"({why}); its array-expression twin is used instead", stacklevel=3)
            self._trusted[dtype] = ok
        return self._trusted[dtype]

    def __repr__(self):
        return f"CudaKernel({self.name!r})"
