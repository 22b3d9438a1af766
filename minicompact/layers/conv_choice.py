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
Where the columns live (one buffer per layer, or one shared by all) is ``workspace.py``'s.
"""
import time

from ..backend import device_of, synchronize

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


def measured_choice(x, W, padding, algorithms):
    """The name of the faster of ``algorithms`` for this input and filters, measured once per key.

    x: (N, C, H, W); W: (K, C, 3, 3); algorithms: {name: algorithm}, each with
    ``forward(x, W, stride, padding, buffer) -> (out, saved)`` and
    ``backward(dout, saved, W, x_shape, stride, padding, input_grad)`` (conv.py's
    ``ConvAlgorithm``s; this module needs nothing from conv.py).  Times one forward + backward
    of each twice, alternating, and keeps the smaller of each pair's times.
    """
    key = tuple(x.shape) + (W.shape[0], padding, x.dtype.str, device_of(x))
    if key in _CHOICES:
        return _CHOICES[key]
    best = {name: float("inf") for name in algorithms}
    for _ in range(2):
        for name, algo in algorithms.items():
            synchronize()
            t0 = time.perf_counter()
            out, saved = algo.forward(x, W, 1, padding, None)
            algo.backward(out, saved, W, x.shape, 1, padding, True)
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
