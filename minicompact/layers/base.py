"""The layer protocol every building block follows.

A layer is a forward and a backward you can read on one screen:

* ``forward(x)`` computes the output and keeps in ``self.cache`` what backward needs;
* ``backward(dout)`` returns dL/dx and fills ``self.grads`` (same keys as ``self.params``);
  it never modifies ``dout``;
* ``params`` holds the trainable arrays, ``buffers`` the non-trainable state (batch-norm
  running statistics), ``training`` selects training or evaluation behaviour
  (``train()`` / ``eval()``).

Arrays are NCHW at every layer boundary and live on one device (NumPy or CuPy); layers
compute with the array module of their input, so float32 stays float32.
"""
import numpy as np

from ..backend import get_array_module, to_device


class Layer:
    """Base class: parameter bookkeeping, mode switch, device and dtype moves."""

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self.training = True
        self.cache = None

    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dout):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def train(self, mode=True):
        """Select training behaviour (batch statistics); returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Select evaluation behaviour (running statistics); returns self."""
        return self.train(False)

    def zero_grad(self):
        """Set every gradient to zeros of its parameter's shape."""
        for k, p in self.params.items():
            self.grads[k] = get_array_module(p).zeros_like(p)

    def to(self, device):
        """Move parameters, gradients and buffers to ``device`` ("cpu" or "gpu")."""
        for d in (self.params, self.grads, self.buffers):
            for k in d:
                d[k] = to_device(d[k], device)
        self.cache = None
        return self

    def astype(self, dtype):
        """Cast parameters, gradients and floating buffers to ``dtype`` (float32/float64)."""
        for d in (self.params, self.grads, self.buffers):
            for k, v in d.items():
                if np.issubdtype(v.dtype, np.floating):
                    d[k] = v.astype(dtype)
        self.cache = None
        return self

    @property
    def dtype(self):
        """The floating dtype of the parameters (None for a parameter-free layer)."""
        for p in self.params.values():
            return p.dtype
        return None

    def __repr__(self):
        return f"{type(self).__name__}()"


def kernel_pair(v, name):
    """An int or a pair of ints → a pair of positive ints."""
    pair = (v, v) if np.isscalar(v) else tuple(v)
    if len(pair) != 2 or not all(isinstance(a, (int, np.integer)) and a >= 1 for a in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return int(pair[0]), int(pair[1])


def check_input(layer, x, ndim, channels=None, min_hw=None):
    """Validate a layer's input; raise ``ValueError`` naming expected and received shapes.

    x: the array; ndim: expected number of dimensions (4 for NCHW); channels: expected size
    of axis 1 (or None); min_hw: smallest allowed (H, W) (or None). The dtype must be floating
    and, for a layer with parameters, equal to the parameters' dtype.
    """
    name = type(layer).__name__
    shape = getattr(x, "shape", None)
    if shape is None or getattr(x, "ndim", None) is None:
        raise ValueError(f"{name} expects an array, got {type(x).__name__}")
    dims = "(N, C, H, W)" if ndim == 4 else f"{ndim} dimensions"
    want_c = "?" if channels is None else channels
    if x.ndim != ndim:
        raise ValueError(f"{name} expects input of shape {dims} with C={want_c}, got shape {tuple(shape)}")
    if channels is not None and shape[1] != channels:
        raise ValueError(f"{name} expects input of shape (N, {channels}, ...) , got shape {tuple(shape)}")
    if shape[0] < 1:
        raise ValueError(f"{name} expects a batch of at least one item, got shape {tuple(shape)}")
    if min_hw is not None and (shape[2] < min_hw[0] or shape[3] < min_hw[1]):
        raise ValueError(f"{name} expects H >= {min_hw[0]} and W >= {min_hw[1]}, got shape {tuple(shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} expects a floating input, got dtype {x.dtype} (shape {tuple(shape)})")
    want = layer.dtype
    if want is not None and x.dtype != want:
        raise ValueError(f"{name} has {want} parameters but got a {x.dtype} input of shape "
                         f"{tuple(shape)}; cast one to match (layer.astype or x.astype)")
