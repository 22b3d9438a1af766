"""A stand-in for CuPy on the CPU that counts host syncs, for tests/test_syncs.py.

On a GPU, Python reading a value of a device array (``float(x)``, ``int(x)``, ``bool(x)``,
``x.item()``, ``cupy.asnumpy(x)``, a boolean-mask index, whose result size must be known)
makes the host wait until the GPU has finished everything queued before it: a *sync*.
Nothing on the CPU shows them, so this module plays the GPU:

* ``DeviceArray`` is a NumPy array subclass standing for a CuPy array.  NumPy keeps the
  subclass through ufuncs, methods and views; reductions and element reads (``a[i]``, and
  iterating) return 0-d arrays instead of scalars, as CuPy does.  Every way of reading its
  values into Python is recorded, and an operation mixing it with a NumPy array raises
  TypeError, as CuPy does.
* ``FakeCupy`` is the module: every NumPy function, with array results made ``DeviceArray``;
  ``asnumpy``, ``cuda.get_current_stream().synchronize()`` and the functions whose result
  size depends on the values (``nonzero``, one-argument ``where``, ``unique``, ...) are
  recorded syncs.

``install(monkeypatch)`` puts it behind ``minicompact.backend`` (as if ``import cupy`` had
succeeded), so the code under test takes the very branches it takes on a real GPU: ``to_device``
moves arrays to the fake, ``is_gpu_array`` sees them, ``to_cpu`` syncs.  What it cannot see:
a sync hidden inside a real CuPy function (none of those called by the training step syncs;
their sync points are exactly the conversions above), and host→device copies (not syncs).
"""
import contextlib
import traceback
import types

import numpy as np


class SyncLog(list):
    """The recorded syncs: one (what, where) per sync, where = 'file:line' of the caller."""

    def record(self, what):
        # The line that asked for the value: the innermost one outside this fake and the
        # backend's converters (to_cpu is where a sync happens, not who asked for it).
        outside = [f for f in traceback.extract_stack()
                   if f.filename != __file__ and not f.filename.endswith("backend.py")]
        frame = outside[-1]
        self.append((what, f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"))


SYNCS = SyncLog()


def _is_mask(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, np.ndarray) and i.dtype == bool for i in items)


class DeviceArray(np.ndarray):
    """A NumPy array that behaves like a CuPy array where syncs are concerned."""

    def __array_wrap__(self, obj, context=None, return_scalar=False):
        # CuPy reductions return 0-d arrays, never host scalars.
        return super().__array_wrap__(obj, context, False)

    def _sync(self, what):
        SYNCS.record(what)
        return self.view(np.ndarray)

    def __float__(self):
        return float(self._sync("float()"))

    def __int__(self):
        return int(self._sync("int()"))

    def __index__(self):
        return self._sync("operator.index()").__index__()

    def __bool__(self):
        return bool(self._sync("bool()"))

    def __complex__(self):
        return complex(self._sync("complex()"))

    def __format__(self, spec):
        return format(self._sync("format()"), spec)

    def item(self, *args):
        return self._sync("item()").item(*args)

    def tolist(self):
        return self._sync("tolist()").tolist()

    def get(self):
        return np.array(self._sync("get()"))

    def nonzero(self):
        return _to_device(self._sync("nonzero()").nonzero())

    def __getitem__(self, index):
        if _is_mask(index):   # the output's size depends on the mask's values
            SYNCS.record("boolean-mask index")
        item = super().__getitem__(index)
        # CuPy's a[i] is a 0-d device array, not a host scalar: keep it one, so that a
        # float(a[i]) (or of a value met iterating over a) is seen as the sync it is.
        return np.asarray(item).view(DeviceArray) if isinstance(item, np.generic) else item

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # CuPy raises TypeError on an operation mixing a device array with a NumPy array
        # (NumPy scalars are fine): a step that does so would crash on a GPU.
        for a in inputs + tuple(kwargs.get("out", ())):
            if type(a) is np.ndarray and a.ndim > 0:
                raise TypeError(f"fake GPU: {ufunc.__name__} mixes a device array with a NumPy "
                                f"array of shape {a.shape} (CuPy raises TypeError)")
        host = lambda arrays: tuple(a.view(np.ndarray) if isinstance(a, DeviceArray) else a  # noqa: E731
                                    for a in arrays)
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = host(out)
        result = getattr(ufunc, method)(*host(inputs), **kwargs)
        if out is not None:  # in place (a += b): the very arrays given, as NumPy returns them
            return out[0] if len(out) == 1 else out
        return _to_device(result)

    def __setitem__(self, index, value):
        if _is_mask(index):   # CuPy counts the mask's True entries on the host
            SYNCS.record("boolean-mask assignment")
        if isinstance(value, DeviceArray):   # a copy on the device (NumPy would float() it)
            value = value.view(np.ndarray)
        super().__setitem__(index, value)


def _to_device(value):
    if isinstance(value, DeviceArray):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value).view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_to_device(v) for v in value)
    if isinstance(value, list):
        return [_to_device(v) for v in value]
    return value


# CuPy functions whose result size depends on the values: they read the device (a sync).
_SIZED_BY_VALUES = ("nonzero", "argwhere", "flatnonzero", "unique", "extract", "compress")


def _device_function(fn):
    name = getattr(fn, "__name__", "wrapped")

    def wrapped(*args, **kwargs):
        before = len(SYNCS)
        result = _to_device(fn(*args, **kwargs))
        sized = name in _SIZED_BY_VALUES or (name == "where" and len(args) == 1)
        if sized and len(SYNCS) == before:   # once (NumPy may call a.nonzero(), a sync itself)
            SYNCS.record(f"{name}()")
        return result
    wrapped.__name__ = name
    return wrapped


class _Stream:
    def synchronize(self):
        SYNCS.record("stream.synchronize()")


class FakeCupy(types.ModuleType):
    """``cupy`` as far as minicompact uses it: NumPy functions returning ``DeviceArray``."""

    ndarray = DeviceArray

    def __init__(self):
        super().__init__("fake_cupy")
        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
            get_current_stream=lambda: _Stream())

    def __getattr__(self, name):
        attr = getattr(np, name)
        # ufuncs already keep the subclass; types (dtypes) must stay types.
        if isinstance(attr, (np.ufunc, type)) or not callable(attr):
            return attr
        return _device_function(attr)

    @staticmethod
    def emulate_kernel(name):
        """A kernel of minicompact/cuda runs here as its twin (no CUDA on the CPU)."""
        return contextlib.nullcontext()

    @staticmethod
    def get_array_module(*arrays):
        return FAKE if any(isinstance(a, DeviceArray) for a in arrays) else np

    @staticmethod
    def asnumpy(x):
        if isinstance(x, DeviceArray):
            return np.array(x._sync("asnumpy()"))
        return np.asarray(x)


FAKE = FakeCupy()


def install(monkeypatch):
    """Make ``minicompact.backend`` use the fake GPU for the rest of the test; return the log."""
    from minicompact import backend
    monkeypatch.setattr(backend, "_cupy", FAKE)
    monkeypatch.setattr(backend, "_CUPY_ERROR", None)
    SYNCS.clear()
    return SYNCS
