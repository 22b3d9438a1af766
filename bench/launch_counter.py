"""A stand-in for CuPy on the CPU that counts kernel launches and the bytes they move.

On a GPU every CuPy array expression is at least one kernel launch, and each launch costs
host time whether the kernel has 10 elements or 10 million.  This module plays CuPy on the
CPU (NumPy computes every value) and records, for each operation, the launches CuPy would
make, the bytes each reads and writes, the multiply-adds of matrix products and the layer
that asked for it.  ``bench/gpu_budget.py`` turns the records into a step-time estimate;
``tests/test_gpu_budget.py`` holds the training step to a launch budget.

What counts as a launch (modelled on CuPy's source, cupy/_core and cupy/linalg/_einsum.py):

* every ufunc call (``a + b``, ``a += b``, ``xp.maximum(a, 0, out=a)``, ``xp.sqrt``, a
  comparison): 1, also on 0-d arrays (CuPy launches for those too, which is why a
  regularizer's scalar arithmetic costs launches);
* every reduction (``sum``, ``max``, ``mean``, ``argmax``, ``any``): 1;
* ``matmul``/``@``/``dot``: 1 cuBLAS GEMM, plus 1 copy per operand that is neither C- nor
  F-contiguous (cuBLAS needs one of the two);
* ``einsum`` of two operands with a contraction: CuPy moves each operand's axes into
  (batch, kept, summed) order, a copy unless that is already its layout, then one batched
  GEMM: "nchw,nchw->c" is 2 copies + 1 GEMM;
* copies: ``astype`` (none with ``copy=False`` and the same dtype), ``copy``,
  ``ascontiguousarray`` of a non-contiguous array, a ``reshape``/``ravel`` that cannot be a
  view, ``copyto``, and ``a[slice] = b`` (an elementwise copy; 0 when ``b`` *is* that slice,
  as after ``a[s] += b``, where CuPy skips the self-copy);
* fills: ``zeros``, ``ones``, ``full`` (and ``_like``), ``arange``, ``a.fill``,
  ``a[slice] = scalar``: 1 each.  ``empty``/``empty_like`` allocate from CuPy's pool and
  launch nothing: 0;
* views launch nothing: basic slicing, ``reshape`` of a contiguous array, ``transpose``,
  ``.T``, ``view(dtype)``, ``swapaxes``;
* integer-array ("fancy") indexing ``a[i]`` with one index array: 1 gather; with k >= 2 index
  arrays CuPy first fills a flat index and folds each array into it: k + 2 (its setitem, a
  scatter, the same); ``take_along_axis`` on an n-d array adds n - 1 ``arange``s to that;
* a host array moved to the device (``asarray`` of a NumPy array): 1 (a copy, not a kernel,
  but it costs a call the same way);
* an operation on zero elements: 0 (CuPy returns before launching).

Bytes: each launch reads the arrays it is given (a broadcast operand counts its own size, a
strided view its elements) and writes its output; a GEMM reads both operands and writes
the product.  Caches are ignored: an estimate of the traffic, not of a GPU's cache hits.

**Hand-written kernels** (``minicompact/cuda``): ``CudaKernel`` runs its twin inside this
module's ``emulate_kernel(name)``.  The twin's operations are not counted; one launch named
after the kernel is, reading the kernel's arguments and writing the new arrays the twin
returns.  With ``MINICOMPACT_KERNELS=off`` ``CudaKernel`` never enters ``emulate_kernel`` and
the twin's operations count one by one: the "before" of a kernel.

Each launch is attributed to a layer by walking the Python stack to the innermost frame of a
minicompact module that names one (``LAYER_OF_FILE``), and to forward or backward by whether
``CompactNet.forward`` or ``CompactNet.backward`` is on the stack.

Usage::

    with launch_counter.installed():          # minicompact.backend now sees "CuPy"
        model = CompactNet(...).to("gpu")      # arrays become CountedArray
        with launch_counter.counting() as log:
            train_step(...)
    log.total()  # {"launches": ..., "bytes": ..., "flops": ...}
"""
import contextlib
import os
import sys
import types
import weakref
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

# The minicompact file (relative to the package) → the layer its launches are charged to.
LAYER_OF_FILE = {
    "layers/conv.py": "conv", "layers/conv_choice.py": "conv", "layers/workspace.py": "conv",
    "im2col.py": "conv", "winograd.py": "conv", "layers/batchnorm.py": "batchnorm",
    "distributed/sync_batchnorm.py": "batchnorm", "layers/activations.py": "relu",
    "layers/pooling.py": "maxpool", "separable_maxpool.py": "maxpool",
    "layers/classifier.py": "classifier", "losses.py": "loss", "regularizers.py": "regularizer",
    "optim.py": "optimizer", "objective.py": "objective",
}
# Classes and functions whose file holds two layers' code: the class or function decides
# (layers/pooling.py holds max-pooling and the pyramid, each with its kernel wrappers).
LAYER_OF_CLASS = {"SpatialPyramidPool": "pyramid", "Penalty": "regularizer",
                  "spatial_pyramid_pool_forward": "pyramid", "spatial_pyramid_pool_backward": "pyramid",
                  "spatial_pyramid_pool_forward_cuda": "pyramid",
                  "spatial_pyramid_pool_backward_cuda": "pyramid"}


@dataclass
class Launch:
    """One kernel launch: what ran, for which layer and phase, and what it moved."""
    name: str           # the operation ("add", "sum", "gemm", "copy", a CUDA kernel's name)
    layer: str          # "conv", "batchnorm", ... ("other" outside every named file)
    phase: str          # "forward", "backward" or "" (loss, regularizer, update)
    read: int           # bytes read
    written: int        # bytes written
    flops: int = 0      # floating-point operations of a matrix product (2 per multiply-add)


class LaunchLog(list):
    """The launches of a counted region, with sums by layer."""

    def total(self):
        """{"launches", "bytes", "flops"} over every launch."""
        return {"launches": len(self), "bytes": sum(l.read + l.written for l in self),
                "flops": sum(l.flops for l in self)}

    def by_layer(self):
        """layer → {"launches", "forward", "backward", "bytes", "flops"}."""
        rows = defaultdict(lambda: dict(launches=0, forward=0, backward=0, bytes=0, flops=0))
        for l in self:
            row = rows[l.layer]
            row["launches"] += 1
            if l.phase:
                row[l.phase] += 1
            row["bytes"] += l.read + l.written
            row["flops"] += l.flops
        return dict(rows)

    def by_name(self, layer=None):
        """operation name → launches (of one layer, or all)."""
        counts = defaultdict(int)
        for l in self:
            if layer is None or l.layer == layer:
                counts[l.name] += 1
        return dict(counts)


class _State:
    """What the counter is doing now: a log to append to (None: not counting), how deep
    inside one counted operation we are (its NumPy insides are not launches), and the
    emulated kernel whose twin is running."""
    log = None
    depth = 0
    kernel = None


STATE = _State()
_PACKAGE = os.sep + "minicompact" + os.sep
_file_layers = {}   # filename → its LAYER_OF_FILE entry (None outside), cached


def _layer_of_file(filename):
    if filename not in _file_layers:
        i = filename.rfind(_PACKAGE)
        rel = filename[i + len(_PACKAGE):].replace(os.sep, "/") if i >= 0 else None
        _file_layers[filename] = LAYER_OF_FILE.get(rel)
    return _file_layers[filename]


def _where():
    """(layer, phase) of the code running now, from the Python stack."""
    layer, phase = None, ""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if layer is None:
            layer = _layer_of_file(code.co_filename)
            if layer is not None:
                layer = LAYER_OF_CLASS.get(code.co_qualname.split(".")[0], layer)
        if code.co_qualname in ("CompactNet.forward", "CompactNet.backward"):
            phase = code.co_name
            break
        frame = frame.f_back
    return layer or "other", phase


def _host(a):
    return a.view(np.ndarray) if isinstance(a, CountedArray) else a


def _wrap(value):
    """NumPy results as device arrays; host scalars become 0-d arrays, as in CuPy."""
    if isinstance(value, CountedArray):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value).view(CountedArray)
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _nbytes(arrays):
    return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


def _arrays(values):
    """The arrays among values (nested in tuples and lists too)."""
    found = []
    for v in values:
        if isinstance(v, np.ndarray):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            found += _arrays(v)
    return found


def _data(a):
    return a.__array_interface__["data"][0]


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _record(name, reads, writes, flops=0, launches=1):
    """Log ``launches`` launches of ``name`` reading arrays ``reads`` and writing ``writes``.

    Inside an emulated kernel nothing is logged: the arrays written are remembered instead,
    to be the kernel's outputs."""
    if STATE.log is None or launches == 0:
        return
    writes = [w for w in _arrays(writes) if w.size]
    if not writes and name not in ("gemm",):
        return   # zero elements: CuPy launches nothing
    if STATE.kernel is not None:
        STATE.kernel.wrote(writes)
        return
    layer, phase = _where()
    read, written = _nbytes(_arrays(reads)), _nbytes(writes)
    for i in range(launches):   # a multi-launch operation: its bytes on the first launch
        first = i == 0
        STATE.log.append(Launch(name, layer, phase, read if first else 0,
                                written if first else 0, flops if first else 0))


@contextlib.contextmanager
def _inside():
    """The NumPy code of one counted operation: its own operations are not launches."""
    STATE.depth += 1
    try:
        yield
    finally:
        STATE.depth -= 1


def _counting_now():
    return STATE.log is not None and STATE.depth == 0


def _fancy(index):
    """The integer index arrays of an index (0: basic indexing, a view), and whether one is
    a boolean mask."""
    items = index if isinstance(index, tuple) else (index,)
    arrays = [i for i in items if isinstance(i, np.ndarray) and i.ndim > 0 or isinstance(i, list)]
    mask = any(isinstance(i, np.ndarray) and i.dtype == bool for i in arrays)
    return len(arrays), mask


def _index_launches(k, mask):
    """Launches of an index with k integer arrays (see the module doc)."""
    if mask:
        return 2   # CuPy: a scan for the positions, then the gather or scatter
    return 1 if k == 1 else k + 2


def _gemm(name, a, b, out):
    """A matrix product's launches: copies of operands cuBLAS cannot read, then the GEMM."""
    for operand in (a, b):
        if operand.ndim >= 2 and not (operand.flags.c_contiguous or operand.flags.f_contiguous):
            _record("copy", [operand], [operand])   # a contiguous copy of the same size
    m, k = (a.shape[-2], a.shape[-1]) if a.ndim >= 2 else (1, a.shape[-1])
    n = b.shape[-1] if b.ndim >= 2 else 1
    batch = max(1, out.size // max(1, m * n))
    _record(name, [a, b], [out], flops=2 * batch * m * n * k)


def _einsum(subscripts, operands, out):
    """CuPy's einsum of one or two operands (cupy/linalg/_einsum.py, reduced_binary_einsum)."""
    inputs, _, output = subscripts.replace(" ", "").partition("->")
    subs = inputs.split(",")
    if len(operands) != 2 or "->" not in subscripts:
        _record("einsum", operands, [out])
        return
    (s0, s1), (a0, a1) = subs, operands
    shared = set(s0) & set(s1)
    batch, contract = shared & set(output), shared - set(output)
    for s, a in ((s0, a0), (s1, a1)):
        own = set(s) - shared - set(output)       # summed in one operand only: a reduction first
        if own:
            _record("sum", [a], [out])
    if not contract:
        _record("multiply", operands, [out])
        return
    for s, a in ((s0, a0), (s1, a1)):
        # CuPy's order: batch axes, kept axes, contracted axes, each sorted by label.
        order = sorted(range(len(s)), key=lambda i: (s[i] not in batch, s[i] in contract,
                                                     subscripts.index(s[i])))
        if order != list(range(len(s))) or not a.flags.c_contiguous:
            _record("copy", [a], [a])
    size = {c: d for s, a in ((s0, a0), (s1, a1)) for c, d in zip(s, a.shape)}
    mult = int(np.prod([size[c] for c in set(s0) | set(s1)], dtype=np.int64))
    _record("gemm", operands, [out], flops=2 * mult)


# Module functions that allocate without launching, fill, or are views unless they must copy.
_ALLOCATE = {"empty", "empty_like"}
_FILL = {"zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "arange", "linspace",
         "eye", "identity"}
_MAYBE_VIEW = {"reshape", "ravel", "transpose", "swapaxes", "moveaxis", "expand_dims", "squeeze",
               "broadcast_to", "atleast_1d", "atleast_2d", "atleast_3d", "asarray", "asanyarray",
               "ascontiguousarray", "real", "imag"}
_NO_ARRAYS = {"result_type", "min_scalar_type", "promote_types", "can_cast", "shape", "ndim",
              "size", "shares_memory", "may_share_memory", "iscomplexobj", "isscalar"}
_GEMM = {"matmul", "dot", "tensordot", "inner", "vdot"}


def _function(name, fn, args, kwargs):
    """Run NumPy's ``fn`` as the CuPy function ``name``, recording its launches."""
    if name in _NO_ARRAYS or not _counting_now():
        with _inside():
            return _wrap(fn(*args, **kwargs))
    given = _arrays(list(args) + list(kwargs.values()))
    host_given = [a for a in given if not isinstance(a, CountedArray)]
    with _inside():
        result = _wrap(fn(*args, **kwargs))
    outs = _arrays([result])
    if name in _ALLOCATE:
        _record(name, [], outs, launches=0)
        if STATE.kernel is not None:
            STATE.kernel.wrote(outs)
    elif name in _FILL:
        _record(name, [], outs)
    elif name in ("asarray", "asanyarray", "array") and host_given:
        _record("copy host->device", host_given, outs)
    elif name in _MAYBE_VIEW:
        if outs and given and not _same_buffer(outs[0], given[0]):
            _record("copy", given[:1], outs)
    elif name == "array" or name == "copy":
        _record("copy", given[:1], outs)
    elif name in _GEMM:
        _gemm(name if name != "dot" else "gemm", _host(given[0]), _host(given[1]), outs[0])
    elif name == "einsum":
        _einsum(args[0], [_host(a) for a in args[1:]], outs[0] if outs else None)
    elif name == "take_along_axis":
        a, indices = args[0], args[1]
        for _ in range(a.ndim - 1):
            _record("arange", [], [indices])
        _record("gather", [indices, result], outs, launches=_index_launches(a.ndim, False))
    elif name == "copyto":
        dst = args[0]
        _record("copyto", given[1:], [dst])
    elif name in ("concatenate", "stack", "hstack", "vstack"):
        _record(name, given, outs, launches=max(1, len(given)))
    else:   # an elementwise function or a reduction: one kernel
        _record(name, given, outs or [a for a in _arrays(kwargs.get("out", ()))])
    return result


def _same_buffer(a, b):
    return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and _root(a) is _root(b)


class CountedArray(np.ndarray):
    """A NumPy array standing for a CuPy array: every operation on it is counted (module doc)."""

    def __array_wrap__(self, obj, context=None, return_scalar=False):
        return super().__array_wrap__(obj, context, False)   # 0-d arrays, never host scalars

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for a in inputs:
            if type(a) is np.ndarray and a.ndim > 0:
                raise TypeError(f"launch counter: {ufunc.__name__} mixes a device array with a NumPy "
                                f"array of shape {a.shape} (CuPy raises TypeError)")
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_host(o) for o in out)
        with _inside():
            result = getattr(ufunc, method)(*(_host(a) for a in inputs), **kwargs)
        result = out[0] if out is not None and len(out) == 1 else (out if out is not None else _wrap(result))
        if _counting_now():
            written = _arrays([result])
            if ufunc is np.matmul and method == "__call__":
                _gemm("gemm", _host(inputs[0]), _host(inputs[1]), written[0])
            else:
                name = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
                _record(name, inputs, written)
        return result

    def __array_function__(self, func, types_, args, kwargs):
        if not _counting_now():
            return super().__array_function__(func, types_, args, kwargs)
        return _function(func.__name__, lambda *a, **k: func._implementation(*a, **k)
                         if hasattr(func, "_implementation") else func(*a, **k), args, kwargs)

    # -- methods that launch (sum, max, any, ... reach __array_ufunc__ as ufunc reductions) --
    def _method(self, name, *args, **kwargs):
        with _inside():
            result = _wrap(getattr(np.ndarray, name)(self, *args, **kwargs))
        return result

    def _counted(self, name, launch_name, *args, **kwargs):
        result = self._method(name, *args, **kwargs)
        if _counting_now():
            _record(launch_name, [self], _arrays([result]))
        return result

    def mean(self, *args, **kwargs):
        return self._counted("mean", "mean", *args, **kwargs)

    def argmax(self, *args, **kwargs):
        return self._counted("argmax", "argmax", *args, **kwargs)

    def argmin(self, *args, **kwargs):
        return self._counted("argmin", "argmin", *args, **kwargs)

    def var(self, *args, **kwargs):
        return self._counted("var", "var", *args, **kwargs)

    def std(self, *args, **kwargs):
        return self._counted("std", "std", *args, **kwargs)

    def cumsum(self, *args, **kwargs):
        return self._counted("cumsum", "cumsum", *args, **kwargs)

    def copy(self, *args, **kwargs):
        return self._counted("copy", "copy", *args, **kwargs)

    def flatten(self, *args, **kwargs):
        return self._counted("flatten", "copy", *args, **kwargs)

    def take(self, *args, **kwargs):
        return self._counted("take", "gather", *args, **kwargs)

    def astype(self, dtype, *args, **kwargs):
        result = self._method("astype", dtype, *args, **kwargs)
        if _counting_now() and result is not self and not _same_buffer(result, self):
            _record("astype", [self], [result])
        return result

    def reshape(self, *args, **kwargs):
        result = self._method("reshape", *args, **kwargs)
        if _counting_now() and not _same_buffer(result, self):
            _record("copy", [self], [result])
        return result

    def ravel(self, *args, **kwargs):
        result = self._method("ravel", *args, **kwargs)
        if _counting_now() and not _same_buffer(result, self):
            _record("copy", [self], [result])
        return result

    def fill(self, value):
        with _inside():
            np.ndarray.fill(self, value)
        if _counting_now():
            _record("fill", [], [self])

    def dot(self, other, out=None):
        with _inside():
            result = _wrap(np.ndarray.dot(self, other, out))
        if _counting_now():
            _gemm("gemm", _host(self), _host(other), result)
        return result

    def __getitem__(self, index):
        k, mask = _fancy(index)
        with _inside():
            item = super().__getitem__(index)
        item = np.asarray(item).view(CountedArray) if isinstance(item, np.generic) else item
        if k and _counting_now():
            indices = [i for i in (index if isinstance(index, tuple) else (index,))
                       if isinstance(i, np.ndarray)]
            _record("gather", indices + [item], [item], launches=_index_launches(k, mask))
        return item

    def __setitem__(self, index, value):
        k, mask = _fancy(index)
        counting = _counting_now()
        if counting and not k:
            target = np.asarray(super().__getitem__(index))   # the part written (a view)
        with _inside():
            super().__setitem__(index, _host(value) if isinstance(value, CountedArray) else value)
        if not counting:
            return
        if k:
            indices = [i for i in (index if isinstance(index, tuple) else (index,))
                       if isinstance(i, np.ndarray)]
            _record("scatter", indices + _arrays([value]), [value] if isinstance(value, np.ndarray)
                    else indices, launches=_index_launches(k, mask))
        elif not isinstance(value, np.ndarray):
            _record("fill", [], [target])
        elif not (value.shape == target.shape and value.strides == target.strides
                  and _data(value) == _data(target)):
            _record("copy", [value], [target])   # not itself (a[s] += b leaves nothing to copy)


class _EmulatedKernel:
    """One hand-written kernel run as its twin: the twin's operations are not counted; one
    launch is, reading the kernel's arguments and writing what the twin wrote that is still
    alive when it returns (its outputs; its temporaries are gone by then)."""

    def __init__(self, name):
        self.name, self.active, self.args, self.writes = name, False, [], []

    def wrote(self, arrays):
        for a in arrays:   # no reference to a itself: a temporary must be free to go
            root = _root(a)
            self.writes.append((weakref.ref(root), id(root), _data(a), a.shape, a.nbytes))

    def __enter__(self):
        if STATE.log is None or STATE.depth or STATE.kernel is not None:
            return self   # not counting, or inside another kernel (which is the launch)
        # CudaKernel.__call__(self, *args) enters us: its args are the kernel's inputs.
        self.args = _arrays(sys._getframe(1).f_locals.get("args", ()))
        self.active, STATE.kernel = True, self
        return self

    def __exit__(self, *exc):
        if not self.active:
            return False
        STATE.kernel, self.active = None, False
        inputs = {id(_root(a)) for a in self.args}
        written, seen = 0, set()
        for ref, root_id, data, shape, nbytes in self.writes:
            root = ref()
            if root is None:
                continue                                       # a temporary of the twin
            if root_id in inputs:
                key, size = (root_id, data, shape), nbytes     # written into an argument
            else:
                key, size = root_id, root.nbytes               # a new array it returns
            if key not in seen:
                seen.add(key)
                written += size
        self.writes = []
        layer, phase = _where()
        STATE.log.append(Launch(self.name, layer, phase, _nbytes(self.args), written))
        return False


class _Stream:
    def synchronize(self):
        pass


class CountingCupy(types.ModuleType):
    """``cupy`` as far as minicompact uses it: NumPy functions on ``CountedArray``, counted."""

    ndarray = CountedArray

    def __init__(self):
        super().__init__("counting_cupy")
        self.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
                                          get_current_stream=lambda: _Stream())

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, (np.ufunc, type)) or not callable(attr):
            return attr   # ufuncs reach CountedArray.__array_ufunc__; dtypes stay types

        def function(*args, **kwargs):
            return _function(name, attr, args, kwargs)
        function.__name__ = name
        return function

    @staticmethod
    def emulate_kernel(name):
        """A kernel of minicompact/cuda: its twin runs inside, counted as one launch."""
        return _EmulatedKernel(name)

    @staticmethod
    def get_array_module(*arrays):
        return COUNTING_CUPY if any(isinstance(a, CountedArray) for a in arrays) else np

    @staticmethod
    def asnumpy(x):
        return np.array(_host(x))


COUNTING_CUPY = CountingCupy()


@contextlib.contextmanager
def installed():
    """Put the counting CuPy behind ``minicompact.backend`` (as if ``import cupy`` worked):
    ``model.to("gpu")`` then makes its arrays ``CountedArray``.  Restored on exit."""
    from minicompact import backend
    saved = backend._cupy, backend._CUPY_ERROR
    backend._cupy, backend._CUPY_ERROR = COUNTING_CUPY, None
    try:
        yield COUNTING_CUPY
    finally:
        backend._cupy, backend._CUPY_ERROR = saved


@contextlib.contextmanager
def counting():
    """Count the launches of the code inside; yields the ``LaunchLog`` it fills."""
    log, saved = LaunchLog(), (STATE.log, STATE.depth, STATE.kernel)
    STATE.log, STATE.depth, STATE.kernel = log, 0, None
    try:
        yield log
    finally:
        STATE.log, STATE.depth, STATE.kernel = saved
