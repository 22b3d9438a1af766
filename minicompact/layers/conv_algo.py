"""Which algorithm a ``Conv2D`` uses: im2col + one GEMM, or Winograd F(2×2, 3×3).

* ``"im2col"`` (the default): every layer, the readable reference path (``minicompact.im2col``).
* ``"winograd"``: 3×3 stride-1 layers by ``minicompact.winograd`` (16 instead of 36
  multiplies per 2×2 output tile and channel pair, a larger float32 rounding error); other
  layers (the 7×7 stem, strided ones) stay on im2col.
* ``"auto"``: for 3×3 stride-1 layers, the first forward of each (input shape, K, padding,
  dtype, device) times both algorithms' forward + backward on that input, twice each,
  alternating, and keeps the faster for every later call with that key (cuDNN's benchmark
  mode).  The choice depends on the machine and its load, so two runs may pick differently:
  their float32 results then differ by rounding (docs/winograd.md bounds it).

``set_conv_algo(model, algo)`` sets it model-wide (every layer in ``model.convs``); run.py's
``--conv-algo`` calls it.  The algorithm changes no parameter and nothing in a checkpoint.
"""
import time

from ..backend import device_of, get_array_module, synchronize

ALGOS = ("auto", "im2col", "winograd")
_CHOICES = {}   # (N, C, H, W, K, padding, dtype, device) -> "im2col" | "winograd"


def check_algo(algo):
    """``algo`` if it is one of ``ALGOS``, else a one-line ValueError."""
    if algo not in ALGOS:
        raise ValueError(f"conv algorithm must be one of {', '.join(ALGOS)}, got {algo!r}")
    return algo


def winograd_applies(kernel_size, stride):
    """Whether F(2×2, 3×3) can compute a layer: a 3×3 kernel with stride 1."""
    return tuple(kernel_size) == (3, 3) and stride == 1


def measured_choice(x, W, padding, steps):
    """The faster of "im2col" and "winograd" for this input and filters, measured once per key.

    x: (N, C, H, W); W: (K, C, 3, 3); steps: {"im2col": f, "winograd": f}, each f() one
    forward + backward of that algorithm on x and W (``Conv2D.algorithm`` builds them, so
    this module needs nothing from conv.py).  Times each step twice, alternating, and keeps
    the smaller of each pair's times.
    """
    key = tuple(x.shape) + (W.shape[0], padding, x.dtype.str, device_of(x))
    if key in _CHOICES:
        return _CHOICES[key]
    best = {name: float("inf") for name in steps}
    for _ in range(2):
        for name, step in steps.items():
            synchronize()
            t0 = time.perf_counter()
            step()
            synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    _CHOICES[key] = min(best, key=best.get)
    return _CHOICES[key]


def set_conv_algo(model, algo):
    """Use ``algo`` ("auto", "im2col" or "winograd") in every conv of ``model``; returns model."""
    check_algo(algo)
    for conv in model.convs:
        conv.algo = algo
        conv.cache = None     # a buffer of the other algorithm is of no use
    return model


class ColumnWorkspace:
    """One column buffer shared by the im2col convolutions of a network (``share_columns``).

    A layer using it keeps only its input for backward (1× the input instead of the kh·kw·×
    of its columns) and rebuilds the columns in backward, in this same buffer: the network's
    column memory is that of its largest layer instead of the sum over layers, for one extra
    im2col copy per layer and step.  The input must not change between forward and backward
    (no layer of a CompactNet writes into its input).
    """

    def __init__(self):
        self.buffer = None

    def get(self, shape, dtype, like):
        """A contiguous view of ``shape`` and ``dtype`` on ``like``'s device (the buffer grows
        to the largest request; its old contents are not kept)."""
        size = 1
        for s in shape:
            size *= int(s)
        b = self.buffer
        if b is None or b.size < size or b.dtype != dtype or device_of(b) != device_of(like):
            self.buffer = b = get_array_module(like).empty(size, dtype=dtype)
        return b[:size].reshape(shape)


def share_columns(model, on=True):
    """Give every conv of ``model`` one shared ``ColumnWorkspace`` (``on=False``: each layer
    keeps its own columns again, the default).  Affects the im2col path only.  Returns model."""
    workspace = ColumnWorkspace() if on else None
    for conv in model.convs:
        conv.columns = workspace
        conv.cache = None
    return model
